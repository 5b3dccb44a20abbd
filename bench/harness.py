"""One timing loop for every runtime, with MLPerf-style validity rules.

A runtime is an adapter with `run(x) -> np.ndarray` (for the correctness check) and
`measure(n) -> list[float]` (n timed inferences, seconds each, on the input given to `prepare`).
The harness owns warm-up, sample counts, minimum duration and statistics; a run that misses a rule
is kept and marked invalid, never silently averaged in.
"""

from __future__ import annotations

import math
import time
from dataclasses import dataclass

import numpy as np

from bench.runtimes import Runtime
from targets import BenchRules


@dataclass(frozen=True)
class Timing:
    samples_s: tuple[float, ...]
    warmup: int
    valid: bool
    invalid_reason: str

    @property
    def duration_s(self) -> float:
        return float(sum(self.samples_s))

    def stats_ms(self) -> dict[str, float]:
        ms = np.asarray(self.samples_s) * 1e3
        mean = float(ms.mean())
        std = float(ms.std(ddof=1)) if len(ms) > 1 else 0.0
        return {
            "latency_mean_ms": mean,
            "latency_std_ms": std,
            "latency_cov": std / mean if mean else 0.0,
            "latency_min_ms": float(ms.min()),
            "latency_p50_ms": float(np.percentile(ms, 50)),
            "latency_p90_ms": float(np.percentile(ms, 90)),
            "latency_p99_ms": float(np.percentile(ms, 99)),
            "latency_max_ms": float(ms.max()),
        }


def time_runtimes(runtimes: list[Runtime], rules: BenchRules, rounds: int = 3, max_samples: int = 10_000) -> list[Timing]:
    """Warm every runtime up, then time them in interleaved rounds (A B C A B C ...).

    Interleaving spreads the drift of a shared, noisy machine over all runtimes, so their
    ratios stay meaningful. Rounds repeat until each runtime has both the minimum sample count and
    the minimum total duration, or `max_samples`. A runtime whose samples are short gets larger
    batches, each about `1/rounds` of the minimum duration, so a fast model is not timed in
    hundreds of rounds each waiting for the other runtimes' threads to go idle.
    """
    for runtime in runtimes:
        runtime.measure(rules.warmup)
    per_round = max(1, -(-rules.samples // rounds))
    samples: list[list[float]] = [[] for _ in runtimes]
    while True:
        for collected, runtime in zip(samples, runtimes):
            if not _enough(collected, rules) and len(collected) < max_samples:
                wait_for_idle_threads()
                batch = _batch_size(collected, rules, per_round, rounds)
                collected.extend(runtime.measure(min(batch, max_samples - len(collected))))
        if all(_enough(c, rules) or len(c) >= max_samples for c in samples):
            break
    timings = []
    for collected in samples:
        reasons = []
        if len(collected) < rules.samples:
            reasons.append(f"{len(collected)} samples < {rules.samples}")
        if sum(collected) < rules.min_duration_s:
            reasons.append(f"{sum(collected):.2f} s timed < {rules.min_duration_s} s")
        timings.append(Timing(tuple(collected), rules.warmup, not reasons, "; ".join(reasons)))
    return timings


def wait_for_idle_threads(window_s: float = 0.01, busy_fraction: float = 0.1, timeout_s: float = 1.0) -> None:
    """Return once this process's threads have stopped spinning, so the next runtime has the cores.

    A thread pool spins for a while after each job before it sleeps (TVM's for about 80 ms of one
    core on this machine); the runtime timed next would otherwise share its cores with it.
    """
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        cpu = time.process_time()
        time.sleep(window_s)
        if time.process_time() - cpu < busy_fraction * window_s:
            return


def _batch_size(collected: list[float], rules: BenchRules, per_round: int, rounds: int) -> int:
    """`per_round`, or more once the samples so far show that many would not fill a round's share of the minimum duration."""
    mean = sum(collected) / len(collected) if collected else 0.0
    if mean <= 0.0:
        return per_round
    return max(per_round, math.ceil(rules.min_duration_s / rounds / mean))


def _enough(collected: list[float], rules: BenchRules) -> bool:
    return len(collected) >= rules.samples and sum(collected) >= rules.min_duration_s
