"""bench/harness.py: warm-up first, interleaved rounds, validity rules, statistics."""

from __future__ import annotations

import itertools
import math
import os
from pathlib import Path

import numpy as np
import pytest

from bench.harness import Timing, time_runtimes, wait_for_idle_threads
from targets import BenchRules

WARMUP_S = 7.0  # warm-up samples are this long, so any that leak into the timed samples stand out


class ScriptedRuntime:
    """Returns scripted per-sample durations and logs every measure() call in a shared log."""

    threads = 1

    def __init__(self, name: str, timed_s: list[float], log: list, warmup: int) -> None:
        self.name, self.log = name, log
        self._durations = itertools.chain([WARMUP_S] * warmup, itertools.cycle(timed_s))
        self.returned: list[list[float]] = []

    def prepare(self, x):
        self.prepared = x

    def run(self, x):
        return x

    def measure(self, n: int) -> list[float]:
        out = [next(self._durations) for _ in range(n)]
        self.log.append((self.name, n))
        self.returned.append(out)
        return out


def _enough(samples, rules: BenchRules) -> bool:
    return len(samples) >= rules.samples and sum(samples) >= rules.min_duration_s


def test_warmup_first_then_strictly_interleaved():
    log: list = []
    rules = BenchRules(threads=1, warmup=4, samples=9, min_duration_s=0.5)
    a = ScriptedRuntime("A", [0.015, 0.025, 0.02], log, rules.warmup)
    b = ScriptedRuntime("B", [0.02], log, rules.warmup)  # same mean: both need the same number of rounds
    timings = time_runtimes([a, b], rules, rounds=3)

    assert log[:2] == [("A", rules.warmup), ("B", rules.warmup)]
    timed = log[2:]
    assert len(timed) >= 2 and len(timed) % 2 == 0
    assert [name for name, _ in timed] == ["A", "B"] * (len(timed) // 2)
    # The first round takes samples/rounds each; later ones enough to fill a third of the minimum duration.
    per_round = math.ceil(rules.samples / 3)
    later = math.ceil(rules.min_duration_s / 3 / 0.02)
    assert [n for _, n in timed] == [per_round] * 2 + [later] * (len(timed) - 2)

    for runtime, timing in zip([a, b], timings):
        # The timed samples are exactly what the timed calls returned: no warm-up sample leaks in.
        assert timing.samples_s == tuple(itertools.chain.from_iterable(runtime.returned[1:]))
        assert WARMUP_S not in timing.samples_s
        assert timing.warmup == rules.warmup
        assert len(timing.samples_s) >= rules.samples
        assert timing.duration_s == pytest.approx(sum(timing.samples_s))
        assert timing.duration_s >= rules.min_duration_s
        assert timing.valid and timing.invalid_reason == ""
        # It stops as soon as the rules are met: one round fewer would not have been enough.
        assert not _enough(timing.samples_s[:-later], rules)


def test_faster_runtime_keeps_going_alone_after_the_slow_one_is_done():
    log: list = []
    rules = BenchRules(threads=1, warmup=2, samples=6, min_duration_s=0.6)
    fast = ScriptedRuntime("fast", [0.01], log, rules.warmup)
    slow = ScriptedRuntime("slow", [0.2], log, rules.warmup)
    fast_t, slow_t = time_runtimes([fast, slow], rules, rounds=3)

    assert log[:2] == [("fast", 2), ("slow", 2)]
    # slow reaches 6 samples (1.2 s) in three rounds; fast needs 60 samples (0.6 s): after its first
    # round of 2 it takes batches of 20 (0.2 s, a third of the minimum), so it needs a fourth round.
    assert log[2:] == [("fast", 2), ("slow", 2), ("fast", 20), ("slow", 2), ("fast", 20), ("slow", 2), ("fast", 20)]
    assert len(slow_t.samples_s) == 6 and slow_t.valid and slow_t.invalid_reason == ""
    assert len(fast_t.samples_s) == 62 and fast_t.valid and fast_t.invalid_reason == ""
    assert fast_t.duration_s >= rules.min_duration_s and slow_t.duration_s >= rules.min_duration_s


@pytest.mark.parametrize("max_samples", [30, 31])
def test_too_short_to_reach_min_duration_is_invalid(max_samples):
    log: list = []
    rules = BenchRules(threads=1, warmup=1, samples=9, min_duration_s=10.0)
    tiny = ScriptedRuntime("tiny", [0.001], log, rules.warmup)
    normal = ScriptedRuntime("normal", [1.0], log, rules.warmup)
    tiny_t, normal_t = time_runtimes([tiny, normal], rules, rounds=3, max_samples=max_samples)

    # max_samples is a cap, even when it is not a multiple of the round size.
    assert len(tiny_t.samples_s) == max_samples
    assert not tiny_t.valid
    reason = tiny_t.invalid_reason
    assert f"{sum(tiny_t.samples_s):.2f} s timed < 10.0 s" in reason
    assert "samples <" not in reason  # it had enough samples; only the duration is short

    assert normal_t.valid and normal_t.invalid_reason == ""
    # 3 samples, then batches of 4 (a third of the 10 s minimum): 11 s.
    assert len(normal_t.samples_s) == 11 and normal_t.duration_s == pytest.approx(11.0)


def test_too_few_samples_is_invalid_and_says_so():
    rules = BenchRules(threads=1, warmup=0, samples=20, min_duration_s=0.0)
    (timing,) = time_runtimes([ScriptedRuntime("capped", [0.5], [], 0)], rules, max_samples=5)
    assert len(timing.samples_s) == 5 and not timing.valid
    assert "5 samples < 20" in timing.invalid_reason


@pytest.mark.parametrize("size", [2, 7, 101])
def test_statistics_match_numpy(size):
    samples = np.random.default_rng(size).uniform(0.01, 0.02, size)
    stats = Timing(tuple(samples), warmup=1, valid=True, invalid_reason="").stats_ms()
    ms = samples * 1e3
    expected = {
        "latency_mean_ms": ms.mean(),
        "latency_std_ms": ms.std(ddof=1),
        "latency_cov": ms.std(ddof=1) / ms.mean(),
        "latency_min_ms": ms.min(),
        "latency_p50_ms": np.percentile(ms, 50),
        "latency_p90_ms": np.percentile(ms, 90),
        "latency_p99_ms": np.percentile(ms, 99),
        "latency_max_ms": ms.max(),
    }
    assert stats.keys() == expected.keys()
    for key, value in expected.items():
        assert stats[key] == pytest.approx(value, rel=1e-12), key
        assert isinstance(stats[key], float)


def test_statistics_on_known_values():
    stats = Timing((0.001, 0.002, 0.003, 0.004), warmup=0, valid=True, invalid_reason="").stats_ms()
    std = np.std([1.0, 2.0, 3.0, 4.0], ddof=1)
    assert stats["latency_mean_ms"] == pytest.approx(2.5)
    assert stats["latency_std_ms"] == pytest.approx(std)
    assert stats["latency_cov"] == pytest.approx(std / 2.5)
    assert stats["latency_p50_ms"] == pytest.approx(2.5)
    assert stats["latency_min_ms"] == pytest.approx(1.0) and stats["latency_max_ms"] == pytest.approx(4.0)


@pytest.mark.skipif(len(os.sched_getaffinity(0)) < 2, reason="needs a process allowed on two or more cores")
def test_setting_up_tvm_threads_leaves_the_process_on_all_its_cores():
    """TVM pins the calling thread to core 0; ONNX Runtime's and torch's threads started later would inherit that."""
    import tvm

    from bench.runtimes.tvm_vm import TvmRuntime

    before = os.sched_getaffinity(0)
    TvmRuntime(vm=None, device=tvm.cpu(), threads=2)
    assert os.sched_getaffinity(0) == before


@pytest.mark.skipif(len(os.sched_getaffinity(0)) < 2, reason="needs a process allowed on two or more cores")
def test_tvm_runs_the_threads_the_target_asks_for():
    """On x86 TVM's own guess is half the CPUs: on a 2-vCPU machine without SMT it ran one thread."""
    import tvm

    from bench.runtimes.tvm_vm import TvmRuntime

    TvmRuntime(vm=None, device=tvm.cpu(), threads=2)
    assert tvm.get_global_func("runtime.NumThreads")() == 2


def test_more_tvm_threads_than_cpus_is_a_clear_error():
    import tvm

    from bench.runtimes.tvm_vm import TvmRuntime
    from errors import UserError

    with pytest.raises(UserError, match="thread pool runs .* threads where the target asks for"):
        TvmRuntime(vm=None, device=tvm.cpu(), threads=len(os.sched_getaffinity(0)) + 1)


def test_a_thread_count_that_is_not_a_number_is_a_clear_error(monkeypatch):
    from errors import UserError
    from targets.threads import ENV, size_tvm_thread_pool

    monkeypatch.setenv(ENV, "two")
    with pytest.raises(UserError, match="TVM_NUM_THREADS='two': expected a positive whole number"):
        size_tvm_thread_pool()


@pytest.mark.skipif(len(os.sched_getaffinity(0)) < 2, reason="one CPU: every thread is on it anyway")
def test_tvms_worker_threads_are_not_pinned_to_one_core():
    """A fresh process (TVM starts its pool once per process) sets up the pool as the benchmark does:
    every thread may run on every CPU of the process. TVM left to itself pins its worker to one core."""
    import subprocess
    import sys

    from targets.threads import BIND_ENV

    script = ("import glob, tvm\n"
              "from bench.runtimes.tvm_vm import TvmRuntime\n"
              "TvmRuntime(vm=None, device=tvm.cpu(), threads=2)\n"
              "for f in glob.glob('/proc/self/task/*/status'):\n"
              "    print([l.split()[1] for l in open(f) if l.startswith('Cpus_allowed_list')][0])\n")
    env = {k: v for k, v in os.environ.items() if k != BIND_ENV}
    allowed = [subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, check=True,
                              env={**env, **extra}, cwd=Path(__file__).parent.parent).stdout.split()
               for extra in ({}, {BIND_ENV: "1"})]
    assert len(allowed[0]) >= 2 and len(set(allowed[0])) == 1  # the same CPUs for every thread
    assert len(set(allowed[1])) > 1  # pinned: a worker on one core


def test_next_runtime_waits_for_spinning_threads():
    """A pool that spins after its job would share the cores with the runtime timed next."""
    import threading
    import time

    spin_s = 0.2

    def spin():
        end = time.monotonic() + spin_s
        while time.monotonic() < end:
            pass

    spinner = threading.Thread(target=spin)
    start = time.monotonic()
    spinner.start()
    wait_for_idle_threads()
    assert not spinner.is_alive() and time.monotonic() - start >= spin_s
    idle_start = time.monotonic()
    wait_for_idle_threads()
    assert time.monotonic() - idle_start < spin_s
