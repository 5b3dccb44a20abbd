"""Energy per inference: a runtime's own power window, after the interleaved timing.

Power cannot be split between runtimes timed in interleaved rounds, so each runtime gets a window
of its own: idle power first, then its loop under a `PowerSampler` for at least the benchmark's
minimum duration and sample count. A sensor failing mid-run keeps the timing record and says why.
"""

from __future__ import annotations

from bench.runtimes import Runtime
from targets import BenchRules
from targets.power import (
    PowerProbe,
    PowerSampler,
    ProbeError,
    energy_per_inference,
    measure_idle,
)

NO_SENSOR = {"power_source": "none"}
MIN_POWER_RUNS = 30
MIN_POWER_WINDOW_S = 1.0


def measure_energy(runtime: Runtime, probe: PowerProbe, rules: BenchRules, idle_s: float = 1.0) -> dict:
    """Record fields for `runtime` measured with `probe` (just the source when it has no sensor)."""
    if not probe.available:
        return dict(NO_SENSOR)
    fields = {"power_source": probe.source, "power_estimated": probe.is_estimate}
    runs = max(rules.samples, MIN_POWER_RUNS)
    window = max(rules.min_duration_s, MIN_POWER_WINDOW_S)
    try:
        idle_w = measure_idle(probe, idle_s)
        with PowerSampler(probe) as sampler:
            inferences = 0
            elapsed = 0.0
            while inferences < runs or elapsed < window:
                batch = runtime.measure(max(1, runs // 3))
                inferences += len(batch)
                elapsed += sum(batch)
    except ProbeError as exc:
        return {**fields, "power_error": str(exc)}
    mean_mj, spread_mj = energy_per_inference(sampler, idle_w, inferences)
    return {
        **fields,
        "idle_w": idle_w,
        "active_w": sampler.average_w,
        "energy_mj": mean_mj,
        "energy_mj_std": spread_mj,
        "power_samples": len(sampler.samples),
    }
