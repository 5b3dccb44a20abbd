"""bench/harness.py: warm-up first, interleaved rounds, validity rules, statistics."""

from __future__ import annotations

import numpy as np

from bench.harness import Timing, time_runtimes
from targets import BenchRules


class ScriptedRuntime:
    """Returns a fixed duration per inference and logs every measure() call."""

    threads = 1

    def __init__(self, name: str, seconds: float, log: list) -> None:
        self.name, self.seconds, self.log = name, seconds, log

    def prepare(self, x):
        pass

    def run(self, x):
        return x

    def measure(self, n: int) -> list[float]:
        self.log.append((self.name, n))
        return [self.seconds] * n


def test_warmup_then_interleaved_until_rules_are_met():
    log: list = []
    rules = BenchRules(threads=1, warmup=4, samples=9, min_duration_s=0.5)
    fast, slow = ScriptedRuntime("fast", 0.01, log), ScriptedRuntime("slow", 0.2, log)
    timings = time_runtimes([fast, slow], rules, rounds=3)
    assert log[:2] == [("fast", 4), ("slow", 4)]
    timed = log[2:]
    assert [name for name, _ in timed[:4]] == ["fast", "slow", "fast", "slow"]
    for timing in timings:
        assert timing.valid and timing.invalid_reason == ""
        assert len(timing.samples_s) >= rules.samples and timing.duration_s >= rules.min_duration_s
    # The fast runtime needs more rounds to reach the minimum duration; the slow one stops early.
    assert len(timings[0].samples_s) >= 50 and len(timings[1].samples_s) == 9


def test_too_short_to_reach_min_duration_is_invalid():
    rules = BenchRules(threads=1, warmup=0, samples=3, min_duration_s=10.0)
    (timing,) = time_runtimes([ScriptedRuntime("tiny", 0.001, [])], rules, max_samples=30)
    assert not timing.valid and "s timed < 10.0 s" in timing.invalid_reason
    assert len(timing.samples_s) == 30


def test_statistics_match_numpy():
    samples = np.random.default_rng(0).uniform(0.01, 0.02, 101)
    stats = Timing(tuple(samples), warmup=1, valid=True, invalid_reason="").stats_ms()
    ms = samples * 1e3
    assert np.isclose(stats["latency_p50_ms"], np.percentile(ms, 50))
    assert np.isclose(stats["latency_p99_ms"], np.percentile(ms, 99))
    assert np.isclose(stats["latency_mean_ms"], ms.mean())
    assert np.isclose(stats["latency_std_ms"], ms.std(ddof=1))
    assert np.isclose(stats["latency_cov"], ms.std(ddof=1) / ms.mean())
    assert stats["latency_min_ms"] == ms.min() and stats["latency_max_ms"] == ms.max()
