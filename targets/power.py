"""Power probes: plugins named by a target's `[power] source`, each reading a real Linux interface.

Every probe answers one question, `read() -> cumulative joules since the probe was opened`, so a
sampler can difference any two reads. Energy counters (RAPL) accumulate their deltas; sensors of
instantaneous power (hwmon, tegrastats, vcgencmd) integrate with the trapezoid rule between reads.
An estimate is a separate probe marked `is_estimate`, and `none` refuses to read at all, so neither
can pass for a measurement.

A probe reads its files and runs its commands through a `SensorHost`: this machine, or a board
over SSH (`BoardSensors`), so one probe class serves both and `open_target_probe` picks the host
from the target's connection.
"""

from __future__ import annotations

import fnmatch
import inspect
import json
import os
import re
import shlex
import subprocess
import threading
import time
from pathlib import PurePosixPath
from typing import TYPE_CHECKING, Callable, Iterator, Protocol

import numpy as np

from errors import UserError

if TYPE_CHECKING:
    from targets.config import TargetConfig
    from targets.ssh import SshSession

Clock = Callable[[], float]


class ProbeError(UserError):
    """A power sensor could not be opened or read; the message names the file or command."""


class Follower(Protocol):
    """A long-running command's output, line by line (tegrastats)."""

    def lines(self) -> Iterator[str]: ...

    def poll(self) -> int | None: ...

    def close(self) -> None: ...


class SensorHost:
    """Where a probe's sysfs files and commands are: this machine (`LOCAL`) or a board (`BoardSensors`).

    Failures look like the local ones (OSError per file, FileNotFoundError for a missing command,
    subprocess.TimeoutExpired), so probes handle both the same way.
    """

    where = ""  # prefix for file and command names in messages: "" here, "user@host:" on a board

    def list_dir(self, folder: PurePosixPath) -> list[str]:
        """Sorted entry names; [] when `folder` is not a readable folder."""
        raise NotImplementedError

    def read_files(self, paths: list[PurePosixPath]) -> list[str | OSError]:
        """Each file's text, or the error reading it, read one after another as close in time as possible."""
        raise NotImplementedError

    def run(self, argv: list[str], timeout_s: float) -> tuple[int, str, str]:
        """(exit status, stdout, stderr) of a short command."""
        raise NotImplementedError

    def follow(self, argv: list[str]) -> Follower:
        raise NotImplementedError

    def close(self) -> None:
        """Release the connection, if any."""


class _LocalFollower:
    def __init__(self, argv: list[str]):
        self._proc = subprocess.Popen(argv, stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, text=True)

    def lines(self) -> Iterator[str]:
        return iter(self._proc.stdout)

    def poll(self) -> int | None:
        return self._proc.poll()

    def close(self) -> None:
        if self._proc.poll() is None:
            self._proc.terminate()
            self._proc.wait()


class LocalSensors(SensorHost):
    """This machine's files and commands."""

    def list_dir(self, folder: PurePosixPath) -> list[str]:
        try:
            return sorted(os.listdir(folder))
        except OSError:
            return []

    def read_files(self, paths: list[PurePosixPath]) -> list[str | OSError]:
        texts: list[str | OSError] = []
        for path in paths:
            try:
                with open(path) as file:
                    texts.append(file.read())
            except OSError as exc:
                texts.append(exc)
        return texts

    def run(self, argv: list[str], timeout_s: float) -> tuple[int, str, str]:
        done = subprocess.run(argv, capture_output=True, text=True, timeout=timeout_s)
        return done.returncode, done.stdout, done.stderr

    def follow(self, argv: list[str]) -> Follower:
        return _LocalFollower(argv)


LOCAL = LocalSensors()

# Runs on the board (any python3, standard library only) and answers one JSON request per line:
# each read is taken when the probe asks, one round trip over one SSH channel, so readings stay in
# step with the benchmark window measured on this side.
BOARD_READER = """
import json, os, shutil, subprocess, sys
def answer(op, arg):
    if op == "list":
        try:
            return sorted(os.listdir(arg))
        except OSError:
            return []
    if op == "read":
        texts = []
        for path in arg:
            try:
                with open(path) as f:
                    texts.append([f.read(), 0, ""])
            except OSError as e:
                texts.append([None, e.errno or 0, e.strerror or str(e)])
        return texts
    if op == "which":
        return shutil.which(arg) is not None
    argv, timeout = arg
    try:
        done = subprocess.run(argv, stdout=subprocess.PIPE, stderr=subprocess.PIPE, universal_newlines=True, timeout=timeout)
    except FileNotFoundError:
        return "not found"
    except subprocess.TimeoutExpired:
        return "timeout"
    return [done.returncode, done.stdout, done.stderr]
for line in sys.stdin:
    print(json.dumps(answer(*json.loads(line))), flush=True)
"""
READER_TIMEOUT_S = 10.0


class BoardSensors(SensorHost):
    """A board's files and commands, through `BOARD_READER` running there over SSH.

    Owns the SSH session: closing the probe closes it. The reader uses the board's `[ssh] python`
    (default python3); any Python 3 will do, TVM is not needed.
    """

    def __init__(self, session: SshSession, python: str | None = None):
        self._session = session
        self.where = f"{session.settings.user}@{session.settings.host}:"
        self._python = python or session.settings.python or "python3"
        self._reader = session.start(f"{shlex.quote(self._python)} -u -c {shlex.quote(BOARD_READER)}")
        self._lock = threading.Lock()
        self._ask("list", "/")  # fails here, not mid-benchmark, when the board has no such python

    def _ask(self, op: str, arg, timeout_s: float = READER_TIMEOUT_S):
        with self._lock:
            try:
                self._reader.write(json.dumps([op, arg]) + "\n")
                line = self._reader.readline(timeout_s)
            except (OSError, UserError) as exc:
                raise ProbeError(f"{self.where} the sensor reader does not answer ({exc})") from None
        if not line:
            status = self._reader.poll()
            raise ProbeError(
                f"{self.where} the sensor reader `{self._python} -c ...` ended"
                + (f" with status {status}" if status is not None else "")
                + (" (is python3 installed on the board? set [ssh] python)" if status == 127 else "")
            )
        return json.loads(line)

    def list_dir(self, folder: PurePosixPath) -> list[str]:
        return self._ask("list", str(folder))

    def read_files(self, paths: list[PurePosixPath]) -> list[str | OSError]:
        answers = self._ask("read", [str(path) for path in paths])
        return [text if text is not None else OSError(number, message) for text, number, message in answers]

    def run(self, argv: list[str], timeout_s: float) -> tuple[int, str, str]:
        answer = self._ask("run", [argv, timeout_s], timeout_s=timeout_s + READER_TIMEOUT_S)
        if answer == "not found":
            raise FileNotFoundError(argv[0])
        if answer == "timeout":
            raise subprocess.TimeoutExpired(argv, timeout_s)
        return tuple(answer)

    def follow(self, argv: list[str]) -> Follower:
        if not self._ask("which", argv[0]):
            raise FileNotFoundError(argv[0])
        return self._session.start(shlex.join(argv), pty=True)  # closing it hangs the command up

    def close(self) -> None:
        self._reader.close()
        self._session.close()


class PowerProbe:
    """What every probe offers; subclasses set `source` and implement `read` and `describe`."""

    source: str = ""
    is_estimate: bool = False
    available: bool = True  # False only for `none`: nothing is measured
    host: SensorHost = LOCAL

    def read(self) -> float:
        """Cumulative energy in joules since the probe was opened (monotonic)."""
        raise NotImplementedError

    def describe(self) -> str:
        """What is read (sysfs paths, command), for the benchmark record."""
        raise NotImplementedError

    def close(self) -> None:
        """Release what the probe holds (a child process, the SSH connection to a board)."""
        self.host.close()

    def __enter__(self) -> PowerProbe:
        return self

    def __exit__(self, *exc) -> None:
        self.close()


def _read_ints(host: SensorHost, paths: list[PurePosixPath]) -> list[int]:
    """One integer per sysfs file; anything else is a ProbeError naming the file."""
    values = []
    for path, text in zip(paths, host.read_files(paths)):
        if isinstance(text, OSError):
            hint = " (run as root or grant read access)" if isinstance(text, PermissionError) else ""
            raise ProbeError(f"{host.where}{path}: cannot read ({text.strerror or text}){hint}")
        try:
            values.append(int(text.strip()))
        except ValueError:
            raise ProbeError(f"{host.where}{path}: expected an integer, got {text.strip()[:40]!r}") from None
    return values


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

    def __init__(self, root: str | PurePosixPath = "/sys/class/powercap", host: SensorHost = LOCAL):
        self.host = host
        root = PurePosixPath(root)
        zones = sorted((int(m.group(1)), root / name) for name in host.list_dir(root) if (m := self._ZONE.fullmatch(name)))
        names = host.read_files([path / "name" for _, path in zones])
        self._zones = [
            (path, name.strip())
            for (_, path), name in zip(zones, names)
            if isinstance(name, str) and name.strip().startswith("package")
        ]
        if not self._zones:
            raise ProbeError(
                f"{host.where}{root}: no RAPL package zones (intel-rapl:N named package-*); is intel_rapl_msr loaded?"
            )
        self._counters = [path / "energy_uj" for path, _ in self._zones]
        self._ranges = [top + 1 for top in _read_ints(host, [path / "max_energy_range_uj" for path, _ in self._zones])]
        self._last = _read_ints(host, self._counters)
        self._total_uj = 0

    def read(self) -> float:
        for i, now in enumerate(_read_ints(self.host, self._counters)):
            self._total_uj += (now - self._last[i]) % self._ranges[i]  # the counter wraps at max_energy_range_uj
            self._last[i] = now
        return self._total_uj / 1e6

    def describe(self) -> str:
        return "RAPL energy counters: " + ", ".join(
            f"{self.host.where}{counter} ({name})" for counter, (_, name) in zip(self._counters, self._zones)
        )


class HwmonProbe(_IntegratingProbe):
    """hwmon power monitors (INA219/INA226/INA3221 and alike), summed over chips and channels.

    A chip's `power*_input` (µW) is used when it has one; otherwise `curr<n>_input` (mA) times
    `in<n>_input` (mV) of the same channel n, which is how the INA3221 driver reports its bus
    voltages. `name_filter` (a glob on the chip's `name` file) keeps unrelated chips out.
    """

    source = "hwmon"

    def __init__(self, root: str | PurePosixPath = "/sys/class/hwmon", name_filter: str | None = None,
                 clock: Clock = time.monotonic, host: SensorHost = LOCAL):
        self.host = host
        root = PurePosixPath(root)
        self._power: list[PurePosixPath] = []
        self._pairs: list[tuple[PurePosixPath, PurePosixPath]] = []
        self._chips: list[str] = []
        chips = [root / name for name in fnmatch.filter(host.list_dir(root), "hwmon*")]
        listings = [host.list_dir(chip) for chip in chips]
        names = host.read_files([chip / "name" for chip in chips])
        seen = []
        for chip, files, name in zip(chips, listings, names):
            name = name.strip() if isinstance(name, str) else "?"
            seen.append(name)
            if name_filter and not fnmatch.fnmatch(name, name_filter):
                continue
            power = [chip / f for f in fnmatch.filter(files, "power*_input")]
            pairs = [
                (chip / f, chip / f"in{m.group(1)}_input")
                for f in files
                if (m := re.fullmatch(r"curr(\d+)_input", f)) and f"in{m.group(1)}_input" in files
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
                f"{host.where}{root}: no hwmon chip{wanted} with power*_input or curr<n>_input/in<n>_input; "
                f"chips seen: {', '.join(seen) or 'none'}"
            )
        self._files = self._power + [f for pair in self._pairs for f in pair]  # read together, in one round trip
        super().__init__(clock)

    def power_w(self) -> float:
        values = _read_ints(self.host, self._files)
        microwatts = sum(values[: len(self._power)])
        paired = values[len(self._power) :]
        paired_microwatts = sum(paired[i] * paired[i + 1] for i in range(0, len(paired), 2))  # mA × mV = µW
        return (microwatts + paired_microwatts) / 1e6

    def describe(self) -> str:
        files = [f"{self.host.where}{p}" for p in self._power] + [f"{self.host.where}{c}×{v.name}" for c, v in self._pairs]
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
        host: SensorHost = LOCAL,
    ):
        self.host = host
        self._argv = [*command, "--interval", str(interval_ms)]
        self._shown = f"{host.where}{' '.join(self._argv)}"
        try:
            self._proc = host.follow(self._argv)
        except FileNotFoundError:
            raise ProbeError(
                f"{host.where}{command[0]}: command not found (tegrastats ships with NVIDIA Jetson Linux)"
            ) from None
        self._latest: dict[str, float] = {}
        self._first = threading.Event()  # set by the first line with rails, or by tegrastats ending
        threading.Thread(target=self._follow, daemon=True, name="tegrastats").start()
        self._first.wait(interval_ms / 1e3 * 10 + 2)
        if not self._latest:
            self.close()
            raise ProbeError(f"{self._shown}: printed no power rails")
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
        for line in self._proc.lines():
            if rails := parse_tegrastats(line):
                self._latest = rails
                self._first.set()
        self._first.set()

    def power_w(self) -> float:
        if (status := self._proc.poll()) is not None:
            raise ProbeError(f"{self._shown}: exited with code {status}")
        missing = [r for r in self.rails if r not in self._latest]
        if missing:
            raise ProbeError(f"tegrastats: no rail {', '.join(missing)}; rails: {', '.join(self._latest)}")
        return sum(self._latest[r] for r in self.rails)

    def describe(self) -> str:
        return f"`{self._shown}` rails {' + '.join(self.rails)}"

    def close(self) -> None:
        self._proc.close()
        super().close()


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

    def __init__(self, command: tuple[str, ...] = ("vcgencmd", "pmic_read_adc"), clock: Clock = time.monotonic,
                 host: SensorHost = LOCAL):
        self.host = host
        self._argv = list(command)
        self._shown = f"{host.where}{' '.join(self._argv)}"
        super().__init__(clock)

    def power_w(self) -> float:
        try:
            status, stdout, stderr = self.host.run(self._argv, timeout_s=5)
        except FileNotFoundError:
            raise ProbeError(f"{self.host.where}{self._argv[0]}: command not found (Raspberry Pi firmware tools)") from None
        except subprocess.TimeoutExpired:
            raise ProbeError(f"{self._shown}: no answer within 5 s") from None
        if status:
            raise ProbeError(f"{self._shown}: exited with code {status}: {stderr.strip()}")
        rails = parse_pmic_adc(stdout)
        if not rails:
            raise ProbeError(f"{self._shown}: no rail with both current and voltage in its output")
        return sum(rails.values())

    def describe(self) -> str:
        return f"`{self._shown}`: sum of PMIC rails current × voltage (not the 5 V input)"


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
    """The probe named by a target's `[power] source`, reading this machine, with its options checked before opening."""
    return _open_on(LOCAL, source, options)


def open_target_probe(config: TargetConfig, ssh_destination: str | None = None) -> PowerProbe:
    """The target's `[power]` probe, reading the sensor where the device is.

    A local target's sensor is read here; a board's is read on the board over SSH (its `[ssh]`
    table, or `ssh_destination` as user@host[:port]). The probe owns that connection: close it
    (or use it in a `with` block) when the benchmark ends.
    """
    source, options = config.power_source, config.power_options
    measured_here = config.link.power_read_here or source in (NoProbe.source, EstimateProbe.source)
    if measured_here:
        return _open_on(LOCAL, source, options)
    if not (config.ssh or ssh_destination):
        raise UserError(
            f"{config.path}: power source {source!r} is on the board, read over SSH: add an [ssh] table "
            "(host, user, key_file, known_hosts) or give the board's user@host"
        )
    from targets import ssh

    session = ssh.connect(ssh.settings_for(config.ssh, ssh_destination, base_dir=config.path.parent))
    host = None
    try:
        host = BoardSensors(session)
        return _open_on(host, source, options)
    except BaseException:
        (host or session).close()
        raise


def _open_on(host: SensorHost, source: str, options: dict) -> PowerProbe:
    if source not in _PROBES:
        raise UserError(f"unknown power source {source!r}; allowed: {', '.join(POWER_SOURCES)}")
    probe = _PROBES[source]
    parameters = inspect.signature(probe).parameters
    allowed = ", ".join(name for name in parameters if name != "host") or "none"
    if "host" in options:  # where the sensor is follows from the target's connection, never an option
        raise UserError(f"power source {source!r}: 'host' is not an option; options: {allowed}")
    arguments = {**options, "host": host} if "host" in parameters else options
    try:
        inspect.signature(probe).bind(**arguments)
    except TypeError as exc:
        raise UserError(f"power source {source!r}: {exc}; options: {allowed}") from None
    return probe(**arguments)


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
