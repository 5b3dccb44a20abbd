"""Power probes: plugins named by a target's `[power] source`, each reading a real Linux interface.

Every probe answers one question, `read() -> cumulative joules since the probe was opened`, so a
sampler can difference any two reads. Energy counters (RAPL) accumulate their deltas; sensors of
instantaneous power (hwmon, tegrastats, vcgencmd) integrate with the trapezoid rule between reads.
An estimate is a separate probe marked `is_estimate`, and `none` refuses to read at all, so neither
can pass for a measurement.
"""

from __future__ import annotations

import fnmatch
import inspect
import re
import subprocess
import threading
import time
from pathlib import Path
from typing import Callable

import numpy as np

from errors import UserError

Clock = Callable[[], float]


class ProbeError(UserError):
    """A power sensor could not be opened or read; the message names the file or command."""


class PowerProbe:
    """What every probe offers; subclasses set `source` and implement `read` and `describe`."""

    source: str = ""
    is_estimate: bool = False
    available: bool = True  # False only for `none`: nothing is measured

    def read(self) -> float:
        """Cumulative energy in joules since the probe was opened (monotonic)."""
        raise NotImplementedError

    def describe(self) -> str:
        """What is read (sysfs paths, command), for the benchmark record."""
        raise NotImplementedError

    def close(self) -> None:
        """Release what the probe holds (a child process); most hold nothing."""

    def __enter__(self) -> PowerProbe:
        return self

    def __exit__(self, *exc) -> None:
        self.close()


def _read_int(path: Path) -> int:
    """One integer from a sysfs file; anything else is a ProbeError naming the file."""
    try:
        text = path.read_text()
    except OSError as exc:
        hint = " (run as root or grant read access)" if isinstance(exc, PermissionError) else ""
        raise ProbeError(f"{path}: cannot read ({exc.strerror or exc}){hint}") from exc
    try:
        return int(text.strip())
    except ValueError:
        raise ProbeError(f"{path}: expected an integer, got {text.strip()[:40]!r}") from None


class _IntegratingProbe(PowerProbe):
    """Turns instantaneous power into cumulative energy with the trapezoid rule between reads."""

    def __init__(self, clock: Clock):
        self._clock = clock
        self._last_w = self.power_w()
        self._last_t = clock()
        self._joules = 0.0

    def power_w(self) -> float:
        raise NotImplementedError

    def read(self) -> float:
        watts = self.power_w()
        now = self._clock()
        self._joules += (watts + self._last_w) / 2 * (now - self._last_t)
        self._last_w, self._last_t = watts, now
        return self._joules


class RaplProbe(PowerProbe):
    """Linux RAPL powercap energy counters, summed over CPU packages.

    Only top-level `intel-rapl:N` zones named `package-*` count: subzones (`intel-rapl:N:M`: core,
    uncore, dram) lie inside their package, `psys` (laptops) covers the whole SoC including the
    packages, and `intel-rapl-mmio:N` re-exposes package 0 — each would count energy twice. AMD
    CPUs appear under the same `intel-rapl` name (the kernel's intel_rapl_msr drives both).
    `energy_uj` is root-only since Linux 5.10.
    """

    source = "rapl"
    _ZONE = re.compile(r"intel-rapl:(\d+)")

    def __init__(self, root: Path = Path("/sys/class/powercap")):
        root = Path(root)
        zones = sorted(
            (int(m.group(1)), path)
            for path in (root.iterdir() if root.is_dir() else ())
            if (m := self._ZONE.fullmatch(path.name)) and (path / "name").is_file()
        )
        names = [(path, (path / "name").read_text().strip()) for _, path in zones]
        self._zones = [(path, name) for path, name in names if name.startswith("package")]
        if not self._zones:
            raise ProbeError(f"{root}: no RAPL package zones (intel-rapl:N named package-*); is intel_rapl_msr loaded?")
        self._ranges = [_read_int(path / "max_energy_range_uj") + 1 for path, _ in self._zones]
        self._last = [_read_int(path / "energy_uj") for path, _ in self._zones]
        self._total_uj = 0

    def read(self) -> float:
        for i, (path, _) in enumerate(self._zones):
            now = _read_int(path / "energy_uj")
            self._total_uj += (now - self._last[i]) % self._ranges[i]  # the counter wraps at max_energy_range_uj
            self._last[i] = now
        return self._total_uj / 1e6

    def describe(self) -> str:
        return "RAPL energy counters: " + ", ".join(f"{path / 'energy_uj'} ({name})" for path, name in self._zones)


class HwmonProbe(_IntegratingProbe):
    """hwmon power monitors (INA219/INA226/INA3221 and alike), summed over chips and channels.

    A chip's `power*_input` (µW) is used when it has one; otherwise `curr<n>_input` (mA) times
    `in<n>_input` (mV) of the same channel n, which is how the INA3221 driver reports its bus
    voltages. `name_filter` (a glob on the chip's `name` file) keeps unrelated chips out.
    """

    source = "hwmon"

    def __init__(self, root: Path = Path("/sys/class/hwmon"), name_filter: str | None = None, clock: Clock = time.monotonic):
        root = Path(root)
        self._power: list[Path] = []
        self._pairs: list[tuple[Path, Path]] = []
        self._chips: list[str] = []
        seen = []
        for chip in sorted(root.glob("hwmon*")):
            name = (chip / "name").read_text().strip() if (chip / "name").is_file() else "?"
            seen.append(name)
            if name_filter and not fnmatch.fnmatch(name, name_filter):
                continue
            power = sorted(chip.glob("power*_input"))
            pairs = [
                (curr, chip / f"in{m.group(1)}_input")
                for curr in sorted(chip.glob("curr*_input"))
                if (m := re.fullmatch(r"curr(\d+)_input", curr.name)) and (chip / f"in{m.group(1)}_input").exists()
            ]
            if power:
                self._power += power
            elif pairs:
                self._pairs += pairs
            else:
                continue
            self._chips.append(f"{chip.name} ({name})")
        if not self._chips:
            wanted = f" named {name_filter!r}" if name_filter else ""
            raise ProbeError(
                f"{root}: no hwmon chip{wanted} with power*_input or curr<n>_input/in<n>_input; "
                f"chips seen: {', '.join(seen) or 'none'}"
            )
        super().__init__(clock)

    def power_w(self) -> float:
        microwatts = sum(_read_int(path) for path in self._power)
        paired_microwatts = sum(_read_int(curr) * _read_int(volt) for curr, volt in self._pairs)  # mA × mV = µW
        return (microwatts + paired_microwatts) / 1e6

    def describe(self) -> str:
        files = [str(p) for p in self._power] + [f"{c}×{v.name}" for c, v in self._pairs]
        return f"hwmon power of {', '.join(self._chips)}: " + ", ".join(files)


# `VDD_IN 5120mW/5120mW` (Orin) or `POM_5V_IN 3090/3090` (Nano, TX2, Xavier): current/average in mW.
# The lookahead keeps `RAM 2288/3964MB` and `IRAM 0/252kB` out.
_TEGRA_RAIL = re.compile(r"(?<!\S)([A-Z][A-Z0-9_]*) (\d+)(?:mW)?/(\d+)(?:mW)?(?=\s|$)")
# Rails that are the whole module's input, so summing sub-rails under them would double count.
TEGRA_TOTAL_RAILS = ("VDD_IN", "POM_5V_IN")


def parse_tegrastats(line: str) -> dict[str, float]:
    """Rail -> current (not averaged) power in watts, from one tegrastats line."""
    return {m.group(1): int(m.group(2)) / 1e3 for m in _TEGRA_RAIL.finditer(line)}


class TegrastatsProbe(_IntegratingProbe):
    """NVIDIA Jetson power from a running `tegrastats`.

    tegrastats prints one line per interval for as long as it runs, so a reader thread keeps the
    latest line and `read` integrates that, never a backlog. Without `rails`, the module's total
    input rail is used; boards without one (AGX Xavier/Orin) need the rails named explicitly.
    """

    source = "tegrastats"

    def __init__(
        self,
        rails: tuple[str, ...] | None = None,
        interval_ms: int = 100,
        command: tuple[str, ...] = ("tegrastats",),
        clock: Clock = time.monotonic,
    ):
        self._argv = [*command, "--interval", str(interval_ms)]
        try:
            self._proc = subprocess.Popen(self._argv, stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, text=True)
        except FileNotFoundError:
            raise ProbeError(f"{command[0]}: command not found (tegrastats ships with NVIDIA Jetson Linux)") from None
        self._latest: dict[str, float] = {}
        self._first = threading.Event()  # set by the first line with rails, or by tegrastats ending
        threading.Thread(target=self._follow, daemon=True, name="tegrastats").start()
        self._first.wait(interval_ms / 1e3 * 10 + 2)
        if not self._latest:
            self.close()
            raise ProbeError(f"{' '.join(self._argv)}: printed no power rails")
        if rails is None:
            rails = next(((r,) for r in TEGRA_TOTAL_RAILS if r in self._latest), None)
            if rails is None:
                self.close()
                raise ProbeError(
                    f"tegrastats: no total input rail ({', '.join(TEGRA_TOTAL_RAILS)}); "
                    f"name the rails to sum, from: {', '.join(self._latest)}"
                )
        self.rails = tuple(rails)
        super().__init__(clock)

    def _follow(self) -> None:
        for line in self._proc.stdout:
            if rails := parse_tegrastats(line):
                self._latest = rails
                self._first.set()
        self._first.set()

    def power_w(self) -> float:
        if self._proc.poll() is not None:
            raise ProbeError(f"{' '.join(self._argv)}: exited with code {self._proc.returncode}")
        missing = [r for r in self.rails if r not in self._latest]
        if missing:
            raise ProbeError(f"tegrastats: no rail {', '.join(missing)}; rails: {', '.join(self._latest)}")
        return sum(self._latest[r] for r in self.rails)

    def describe(self) -> str:
        return f"`{' '.join(self._argv)}` rails {' + '.join(self.rails)}"

    def close(self) -> None:
        if self._proc.poll() is None:
            self._proc.terminate()
            self._proc.wait()


# `VDD_CORE_A current(7)=2.03000000A` / `VDD_CORE_V volt(15)=0.80000000V`
_PMIC_LINE = re.compile(r"\s*(\S+)_([AV]) (?:current|volt)\(\d+\)=(-?[\d.]+)[AV]\s*")


def parse_pmic_adc(text: str) -> dict[str, float]:
    """Rail -> watts from `vcgencmd pmic_read_adc`, for rails reporting both current and voltage."""
    amps, volts = {}, {}
    for line in text.splitlines():
        if m := _PMIC_LINE.fullmatch(line):
            (amps if m.group(2) == "A" else volts)[m.group(1)] = float(m.group(3))
    return {rail: amps[rail] * volts[rail] for rail in amps if rail in volts}


class VcgencmdProbe(_IntegratingProbe):
    """Raspberry Pi 5 power from the PMIC's rail ADCs (`vcgencmd pmic_read_adc`).

    The sum covers the PMIC's rails only — not USB, peripherals or the PMIC's own conversion loss —
    so it reads below wall power; it is still a measurement, and comparable between runs.
    """

    source = "vcgencmd"

    def __init__(self, command: tuple[str, ...] = ("vcgencmd", "pmic_read_adc"), clock: Clock = time.monotonic):
        self._argv = list(command)
        super().__init__(clock)

    def power_w(self) -> float:
        try:
            done = subprocess.run(self._argv, capture_output=True, text=True, timeout=5)
        except FileNotFoundError:
            raise ProbeError(f"{self._argv[0]}: command not found (Raspberry Pi firmware tools)") from None
        except subprocess.TimeoutExpired:
            raise ProbeError(f"{' '.join(self._argv)}: no answer within 5 s") from None
        if done.returncode:
            raise ProbeError(f"{' '.join(self._argv)}: exited with code {done.returncode}: {done.stderr.strip()}")
        rails = parse_pmic_adc(done.stdout)
        if not rails:
            raise ProbeError(f"{' '.join(self._argv)}: no rail with both current and voltage in its output")
        return sum(rails.values())

    def describe(self) -> str:
        return f"`{' '.join(self._argv)}`: sum of PMIC rails current × voltage (not the 5 V input)"


class NoProbe(PowerProbe):
    """`source = "none"`: the target has no power sensor; reading is an error, never a zero."""

    source = "none"
    available = False

    def read(self) -> float:
        raise ProbeError("power source 'none' measures nothing (check probe.available before sampling)")

    def describe(self) -> str:
        return "no power measurement"


class EstimateProbe(_IntegratingProbe):
    """Energy from stated constants (e.g. a datasheet TDP), labelled so it is never taken for a measurement."""

    source = "estimate"
    is_estimate = True

    def __init__(self, watts_active: float, watts_idle: float, label: str, clock: Clock = time.monotonic):
        if not 0 <= watts_idle <= watts_active:
            raise UserError(f"estimate {label!r}: need 0 <= watts_idle <= watts_active, got {watts_idle} and {watts_active}")
        self.watts_active, self.watts_idle, self.label = float(watts_active), float(watts_idle), label
        super().__init__(clock)

    def power_w(self) -> float:
        return self.watts_active

    def describe(self) -> str:
        return f"ESTIMATE {self.label!r}: {self.watts_active} W active, {self.watts_idle} W idle (constants, not measured)"


_PROBES: dict[str, type[PowerProbe]] = {
    probe.source: probe for probe in (NoProbe, RaplProbe, HwmonProbe, TegrastatsProbe, VcgencmdProbe, EstimateProbe)
}
POWER_SOURCES = tuple(_PROBES)


def open_probe(source: str, **options) -> PowerProbe:
    """The probe named by a target's `[power] source`, with its options checked before opening."""
    if source not in _PROBES:
        raise UserError(f"unknown power source {source!r}; allowed: {', '.join(POWER_SOURCES)}")
    probe = _PROBES[source]
    try:
        inspect.signature(probe).bind(**options)
    except TypeError as exc:
        allowed = ", ".join(inspect.signature(probe).parameters) or "none"
        raise UserError(f"power source {source!r}: {exc}; options: {allowed}") from None
    return probe(**options)


class PowerSampler:
    """Reads a probe in a background thread while a benchmark loop runs.

    Samples are `(seconds, joules)` since entry, starting at (0, 0), with a last one taken on exit
    so the window is exactly the `with` block. A sensor failing mid-run stops sampling and is raised
    on exit; `samples` and `error` stay on the sampler for whoever wants the partial run.
    """

    def __init__(self, probe: PowerProbe, interval_s: float = 0.05, clock: Clock = time.monotonic):
        self.probe = probe
        self.interval_s = interval_s
        self._clock = clock
        self.samples: list[tuple[float, float]] = []
        self.error: Exception | None = None

    def __enter__(self) -> PowerSampler:
        self.samples, self.error = [], None
        self._t0 = self._clock()
        self._j0 = self.probe.read()
        self.samples.append((0.0, 0.0))
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True, name="power-sampler")
        self._thread.start()
        return self

    def _sample(self) -> None:
        joules = self.probe.read()
        self.samples.append((self._clock() - self._t0, joules - self._j0))

    def _run(self) -> None:
        while not self._stop.wait(self.interval_s):
            try:
                self._sample()
            except Exception as exc:  # kept for __exit__, which raises it in the caller's thread
                self.error = exc
                return

    def __exit__(self, exc_type, exc, tb) -> None:
        self._stop.set()
        self._thread.join()
        if self.error is None:
            try:
                self._sample()
            except Exception as error:
                self.error = error
        if self.error is None or exc_type is not None:  # never hide the loop's own exception
            return
        if isinstance(self.error, ProbeError):
            raise ProbeError(
                f"{self.error} (sampling stopped after {self.duration_s:.2f} s; {len(self.samples)} samples kept)"
            ) from self.error
        raise self.error

    @property
    def energy_j(self) -> float:
        return self.samples[-1][1]

    @property
    def duration_s(self) -> float:
        return self.samples[-1][0]

    @property
    def average_w(self) -> float:
        return self.energy_j / self.duration_s


def measure_idle(probe: PowerProbe, seconds: float, interval_s: float = 0.05) -> float:
    """Average watts while nothing runs, to subtract from a benchmark's energy (an estimate states its own)."""
    if isinstance(probe, EstimateProbe):
        return probe.watts_idle
    with PowerSampler(probe, interval_s) as sampler:
        time.sleep(seconds)
    return sampler.average_w


def energy_per_inference(active: PowerSampler, idle_w: float, inferences: int, chunks: int = 4) -> tuple[float, float]:
    """Energy above idle per inference in mJ, and its spread.

    mean = (active energy - idle_w × duration) / inferences. For the spread the window is cut into
    `chunks` equal spans of time, the cumulative energy interpolated at their edges, and each span's
    energy above idle divided by its share of the inferences (assuming a steady loop, which spreads
    inferences evenly in time); the spread is the sample standard deviation of those per-span values.
    """
    if inferences <= 0:
        raise UserError(f"energy per inference needs at least one inference, got {inferences}")
    if len(active.samples) < 2 or active.duration_s <= 0:
        raise UserError("energy per inference needs a power sampling window longer than zero")
    times, joules = np.asarray(active.samples).T
    edges = np.linspace(0.0, active.duration_s, chunks + 1)
    per_span = (np.diff(np.interp(edges, times, joules)) - idle_w * np.diff(edges)) / (inferences / chunks) * 1e3
    mean = (active.energy_j - idle_w * active.duration_s) / inferences * 1e3
    return mean, float(per_span.std(ddof=1))
