"""bench/energy.py and its wiring into bench_model: power windows over a fake RAPL tree whose counter a
thread advances faster while the runtime runs, so the expected energy per inference is known."""

from __future__ import annotations

import os
import threading
import time
from pathlib import Path

import pytest

import targets
from bench.energy import measure_energy
from bench.run import bench_model
from compile.pipeline import from_variant
from lwgan_models.registry import find_variant
from targets import BenchRules
from targets.power import NoProbe, RaplProbe

pytestmark = pytest.mark.usefixtures("one_torch_thread")

IDLE_W, BUSY_W = 1.0, 3.0


class FakePackage:
    """One RAPL package zone whose energy counter advances at IDLE_W, or BUSY_W while `busy` is set."""

    def __init__(self, root: Path) -> None:
        self.zone = root / "intel-rapl:0"
        self.zone.mkdir(parents=True)
        (self.zone / "name").write_text("package-0\n")
        (self.zone / "max_energy_range_uj").write_text(f"{2**32 - 1}\n")
        self.energy_uj = 0.0
        self._write()
        self.busy = threading.Event()
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._advance, daemon=True)

    def _write(self) -> None:
        tmp = self.zone / "energy_uj.tmp"
        tmp.write_text(f"{int(self.energy_uj) % 2**32}\n")
        os.replace(tmp, self.zone / "energy_uj")

    def _advance(self) -> None:
        last = time.monotonic()
        while not self._stop.wait(0.002):
            now = time.monotonic()
            self.energy_uj += (BUSY_W if self.busy.is_set() else IDLE_W) * (now - last) * 1e6
            last = now
            self._write()

    def __enter__(self) -> FakePackage:
        self._thread.start()
        return self

    def __exit__(self, *exc) -> None:
        self._stop.set()
        self._thread.join()


class SleepingRuntime:
    """Inferences of a known length that mark the package busy while they run."""

    name = "sleeper"
    threads = 1

    def __init__(self, package: FakePackage, seconds: float) -> None:
        self.package, self.seconds = package, seconds

    def measure(self, n: int) -> list[float]:
        self.package.busy.set()
        samples = []
        for _ in range(n):
            start = time.perf_counter()
            time.sleep(self.seconds)
            samples.append(time.perf_counter() - start)
        self.package.busy.clear()
        return samples


RULES = BenchRules(threads=1, warmup=0, samples=30, min_duration_s=0.5)


def test_energy_per_inference_is_busy_minus_idle_power_times_latency(tmp_path):
    with FakePackage(tmp_path) as package:
        fields = measure_energy(SleepingRuntime(package, 0.02), RaplProbe(tmp_path), RULES, idle_s=0.5)
    assert fields["power_source"] == "rapl" and not fields["power_estimated"]
    assert fields["idle_w"] == pytest.approx(IDLE_W, rel=0.2)
    assert fields["active_w"] == pytest.approx(BUSY_W, rel=0.2)
    # (3 W - 1 W) x ~20 ms (sleep overshoots a little, and loop overhead runs at idle power)
    assert 30 <= fields["energy_mj"] <= 50
    assert fields["power_samples"] >= 10 and fields["energy_mj_std"] >= 0


def test_no_sensor_says_so_and_measures_nothing():
    fields = measure_energy(SleepingRuntime(None, 0.0), NoProbe(), RULES)
    assert fields == {"power_source": "none"}


def test_sensor_vanishing_mid_run_keeps_the_timing_and_names_the_file(tmp_path):
    with FakePackage(tmp_path) as package:
        probe = RaplProbe(tmp_path)

        class Vanishing(SleepingRuntime):
            def measure(self, n):
                samples = super().measure(n)
                (package.zone / "energy_uj").unlink(missing_ok=True)
                package._stop.set()
                return samples

        fields = measure_energy(Vanishing(package, 0.01), probe, RULES, idle_s=0.2)
    assert "energy_mj" not in fields
    assert "energy_uj" in fields["power_error"]


def test_bench_records_carry_the_target_power_source(tmp_path):
    """A target TOML naming RAPL (a fake tree here) gets energy fields on every runtime's record; host says none."""
    config_path = tmp_path / "rapl-host.toml"
    config_path.write_text(
        'inherits = "host"\nlabel = "host with RAPL"\n'
        f'[power]\nsource = "rapl"\noptions = {{root = "{tmp_path / "powercap"}"}}\n'
    )
    config_path.with_name("host.toml").write_text(targets.load_target("host").path.read_text())
    model = from_variant(find_variant("cyclegan-resnet6-ngf16+kd"), (1, 3, 32, 32))
    rules = BenchRules(threads=1, warmup=1, samples=5, min_duration_s=0.05)
    with FakePackage(tmp_path / "powercap"):
        with_sensor = bench_model(model, targets.resolve(targets.load_target(config_path)), "t", ("torch",), rules,
                                  report=lambda _: None)
    without = bench_model(model, targets.resolve(targets.load_target("host")), "t", ("torch",), rules,
                          report=lambda _: None)
    assert with_sensor[0].power_source == "rapl" and with_sensor[0].energy_mj is not None
    assert with_sensor[0].idle_w == pytest.approx(IDLE_W, rel=0.3)
    assert without[0].power_source == "none" and without[0].energy_mj is None
    assert with_sensor[0].peak_rss_bytes > 50e6  # a process running torch and the model
