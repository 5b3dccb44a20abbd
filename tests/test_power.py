"""targets/power.py: probes over fake sysfs trees and sample command output, the sampler, the arithmetic."""

from __future__ import annotations

import os
import sys
import threading
import time
from pathlib import Path

import numpy as np
import pytest

from errors import UserError
from targets.power import (
    POWER_SOURCES,
    HwmonProbe,
    PowerSampler,
    ProbeError,
    RaplProbe,
    TegrastatsProbe,
    VcgencmdProbe,
    energy_per_inference,
    measure_idle,
    open_probe,
    parse_pmic_adc,
    parse_tegrastats,
)


class FakeClock:
    """A clock the test moves by hand, so integration is exact."""

    def __init__(self) -> None:
        self.now = 100.0

    def __call__(self) -> float:
        return self.now


def write(path: Path, value) -> None:
    """Replace a sysfs-like file atomically, as the kernel does: a reader never sees it half written."""
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(f"{value}\n")
    os.replace(tmp, path)


def rapl_zone(root: Path, zone: str, name: str, energy_uj: int, max_uj: int = 262143328850) -> Path:
    write(root / zone / "name", name)
    write(root / zone / "energy_uj", energy_uj)
    write(root / zone / "max_energy_range_uj", max_uj)
    return root / zone / "energy_uj"


@pytest.fixture
def rapl(tmp_path):
    """Two packages, plus zones that must not be summed: a core subzone, psys and the mmio copy."""
    root = tmp_path / "powercap"
    counters = [rapl_zone(root, "intel-rapl:0", "package-0", 1_000_000), rapl_zone(root, "intel-rapl:1", "package-1", 5_000_000)]
    rapl_zone(root, "intel-rapl:0:0", "core", 0)
    rapl_zone(root, "intel-rapl:2", "psys", 0)
    rapl_zone(root, "intel-rapl-mmio:0", "package-0", 0)
    return root, counters


def test_rapl_sums_packages_only(rapl):
    root, (pkg0, pkg1) = rapl
    probe = RaplProbe(root)
    assert probe.read() == 0.0
    write(pkg0, 1_000_000 + 1_500_000)
    write(pkg1, 5_000_000 + 250_000)
    for other in ("intel-rapl:0:0", "intel-rapl:2", "intel-rapl-mmio:0"):
        write(root / other / "energy_uj", 99_000_000)
    assert probe.read() == pytest.approx(1.75)
    assert "intel-rapl:0/energy_uj (package-0)" in probe.describe() and "psys" not in probe.describe()


def test_rapl_counter_wraps_around(tmp_path):
    counter = rapl_zone(tmp_path, "intel-rapl:0", "package-0", 900_000, max_uj=999_999)
    probe = RaplProbe(tmp_path)
    write(counter, 100_000)  # 99_999 µJ to the top, one step to 0, then 100_000 more
    assert probe.read() == pytest.approx(0.2)
    write(counter, 400_000)
    assert probe.read() == pytest.approx(0.5)


def test_rapl_without_packages_is_a_probe_error(tmp_path):
    with pytest.raises(ProbeError, match="no RAPL package zones"):
        RaplProbe(tmp_path)


@pytest.mark.parametrize("break_it, expected", [
    (lambda f: (f.unlink(), f.mkdir()), "cannot read"),  # root reads past chmod 000, not past a directory
    (lambda f: f.write_text("ERR\n"), "expected an integer, got 'ERR'"),
])
def test_unreadable_counter_names_the_file(rapl, break_it, expected):
    root, (pkg0, _) = rapl
    probe = RaplProbe(root)
    break_it(pkg0)
    with pytest.raises(ProbeError, match=f"{pkg0}: {expected}"):
        probe.read()


def test_hwmon_power_input_integrates_with_trapezoids(tmp_path):
    clock = FakeClock()
    write(tmp_path / "hwmon0" / "name", "ina226")
    write(tmp_path / "hwmon0" / "power1_input", 2_000_000)
    write(tmp_path / "hwmon0" / "curr1_input", 999)  # the chip's own power wins over curr × in
    write(tmp_path / "hwmon0" / "in1_input", 999)
    write(tmp_path / "hwmon1" / "name", "coretemp")
    write(tmp_path / "hwmon1" / "temp1_input", 45000)
    probe = HwmonProbe(tmp_path, clock=clock)
    clock.now += 1.0
    assert probe.read() == pytest.approx(2.0)
    write(tmp_path / "hwmon0" / "power1_input", 4_000_000)
    clock.now += 1.0
    assert probe.read() == pytest.approx(2.0 + 3.0)  # (2 W + 4 W) / 2 over 1 s
    assert "power1_input" in probe.describe() and "coretemp" not in probe.describe()


def test_hwmon_ina3221_pairs_current_and_bus_voltage_by_channel(tmp_path):
    clock = FakeClock()
    chip = tmp_path / "hwmon3"
    write(chip / "name", "ina3221")
    for channel, (milliamps, millivolts) in enumerate([(100, 5000), (200, 12000), (50, 3300)], start=1):
        write(chip / f"curr{channel}_input", milliamps)
        write(chip / f"in{channel}_input", millivolts)
        write(chip / f"in{channel + 3}_input", 7)  # shunt voltages: no current of that index, so ignored
    write(tmp_path / "hwmon4" / "name", "ina226")
    write(tmp_path / "hwmon4" / "power1_input", 9_000_000)
    probe = HwmonProbe(tmp_path, name_filter="ina3221", clock=clock)
    clock.now += 2.0
    assert probe.read() == pytest.approx(2.0 * (0.5 + 2.4 + 0.165))
    assert "hwmon4" not in probe.describe()


def test_hwmon_without_matching_chip_lists_what_it_saw(tmp_path):
    write(tmp_path / "hwmon0" / "name", "coretemp")
    with pytest.raises(ProbeError, match="named 'ina\\*'.*chips seen: coretemp"):
        HwmonProbe(tmp_path, name_filter="ina*")


NANO = (
    "RAM 2288/3964MB (lfb 83x4MB) SWAP 0/1982MB (cached 0MB) IRAM 0/252kB(lfb 252kB) "
    "CPU [2%@102,1%@102,off,off] EMC_FREQ 0% GR3D_FREQ 0% PLL@25C CPU@26.5C "
    "POM_5V_IN 3090/3150 POM_5V_GPU 0/0 POM_5V_CPU 618/620"
)
ORIN = (
    "04-11-2024 10:00:00 RAM 1969/7620MB (lfb 1x4MB) CPU [1%@729,0%@729] GR3D_FREQ 0% "
    "cpu@47.5C soc2@46C VDD_IN 5120mW/5100mW VDD_CPU_GPU_CV 599mW/601mW VDD_SOC 1439mW/1440mW"
)


def test_parse_tegrastats_reads_current_values_of_both_formats():
    assert parse_tegrastats(NANO) == {"POM_5V_IN": 3.09, "POM_5V_GPU": 0.0, "POM_5V_CPU": 0.618}
    assert parse_tegrastats(ORIN) == {"VDD_IN": 5.12, "VDD_CPU_GPU_CV": 0.599, "VDD_SOC": 1.439}


def test_tegrastats_probe_follows_the_running_command(tmp_path):
    script = tmp_path / "tegrastats.py"
    script.write_text(f"import time\nwhile True:\n    print({ORIN!r}, flush=True)\n    time.sleep(0.02)\n")
    clock = FakeClock()
    with TegrastatsProbe(command=(sys.executable, str(script)), clock=clock) as probe:
        clock.now += 0.5
        assert probe.read() == pytest.approx(5.12 * 0.5)
        assert probe.rails == ("VDD_IN",)


def test_missing_commands_are_probe_errors():
    with pytest.raises(ProbeError, match="no-such-tegrastats: command not found"):
        TegrastatsProbe(command=("no-such-tegrastats",))
    with pytest.raises(ProbeError, match="no-such-vcgencmd: command not found"):
        VcgencmdProbe(command=("no-such-vcgencmd", "pmic_read_adc"))


PMIC = """\
     3V7_WL_SW_A current(0)=0.00000000A
       3V3_SYS_A current(1)=0.05000000A
      VDD_CORE_A current(7)=2.03000000A
     3V7_WL_SW_V volt(8)=3.71008800V
       3V3_SYS_V volt(9)=3.30000000V
      VDD_CORE_V volt(15)=0.80000000V
         EXT5V_V volt(24)=5.12000000V
"""


def test_parse_pmic_adc_multiplies_rails_with_both_readings():
    rails = parse_pmic_adc(PMIC)
    assert set(rails) == {"3V7_WL_SW", "3V3_SYS", "VDD_CORE"}  # EXT5V has a voltage only
    assert sum(rails.values()) == pytest.approx(0.05 * 3.3 + 2.03 * 0.8)


def test_vcgencmd_probe_runs_the_command(tmp_path):
    clock = FakeClock()
    probe = VcgencmdProbe(command=(sys.executable, "-c", f"print({PMIC!r})"), clock=clock)
    clock.now += 1.0
    assert probe.read() == pytest.approx(0.05 * 3.3 + 2.03 * 0.8)


def test_none_cannot_pass_for_a_measurement():
    probe = open_probe("none")
    assert not probe.available
    with pytest.raises(ProbeError, match="measures nothing"):
        PowerSampler(probe).__enter__()


def test_estimate_is_labelled_and_uses_its_constants():
    clock = FakeClock()
    probe = open_probe("estimate", watts_active=6.0, watts_idle=2.0, label="Pi 5 datasheet", clock=clock)
    clock.now += 2.0
    assert probe.is_estimate and probe.read() == pytest.approx(12.0)
    assert "ESTIMATE 'Pi 5 datasheet'" in probe.describe()
    assert measure_idle(probe, seconds=60) == 2.0  # stated, not slept for


def test_unknown_source_and_bad_options_are_user_errors(tmp_path):
    assert POWER_SOURCES[0] == "none" and "rapl" in POWER_SOURCES
    with pytest.raises(UserError, match="unknown power source 'wattmeter'; allowed: none, rapl, hwmon"):
        open_probe("wattmeter")
    with pytest.raises(UserError, match="power source 'rapl'.*options: root"):
        open_probe("rapl", colour="blue")


def test_sampler_average_matches_a_counter_advancing_at_2_watts(tmp_path):
    counter = rapl_zone(tmp_path, "intel-rapl:0", "package-0", 0)
    stop = threading.Event()
    start = time.monotonic()

    def advance():  # 2 W = 2 µJ per µs, written every 2 ms
        while not stop.wait(0.002):
            write(counter, int(2e6 * (time.monotonic() - start)))

    helper = threading.Thread(target=advance)
    helper.start()
    try:
        with PowerSampler(RaplProbe(tmp_path), interval_s=0.02) as sampler:
            time.sleep(0.4)
    finally:
        stop.set()
        helper.join()
    assert sampler.duration_s == pytest.approx(0.4, abs=0.1)
    assert sampler.average_w == pytest.approx(2.0, rel=0.1)
    assert len(sampler.samples) > 5 and sampler.samples[0] == (0.0, 0.0)


def test_sensor_vanishing_mid_run_keeps_earlier_samples(rapl):
    root, (pkg0, _) = rapl
    with pytest.raises(ProbeError, match=f"{pkg0}: cannot read.*samples kept") as raised:
        with PowerSampler(RaplProbe(root), interval_s=0.005) as sampler:
            _wait_for(lambda: len(sampler.samples) >= 3)
            pkg0.unlink()
            _wait_for(lambda: sampler.error is not None)
    assert len(sampler.samples) >= 3 and isinstance(sampler.error, ProbeError)
    assert str(pkg0) in str(raised.value)


def _wait_for(condition, timeout_s: float = 5.0) -> None:
    deadline = time.monotonic() + timeout_s
    while not condition():
        assert time.monotonic() < deadline, "condition not met in time"
        time.sleep(0.002)


class Window:
    """A finished sampling window, as energy_per_inference sees it."""

    def __init__(self, samples):
        self.samples = samples
        self.energy_j = samples[-1][1]
        self.duration_s = samples[-1][0]


def test_energy_per_inference_subtracts_idle_and_splits_the_window():
    steady = Window([(t / 10, 5.0 * t / 10) for t in range(21)])  # 5 W for 2 s
    mean, spread = energy_per_inference(steady, idle_w=1.0, inferences=400)
    assert mean == pytest.approx((10.0 - 1.0 * 2.0) / 400 * 1e3)  # 20 mJ
    assert spread == pytest.approx(0.0, abs=1e-9)
    # 3 W in the first second, 7 W in the second: chunks of 0.5 s hold 100 inferences each
    uneven = Window([(0.0, 0.0), (1.0, 3.0), (2.0, 10.0)])
    mean, spread = energy_per_inference(uneven, idle_w=1.0, inferences=400)
    per_chunk = [(3.0 / 2 - 0.5) * 10, (3.0 / 2 - 0.5) * 10, (7.0 / 2 - 0.5) * 10, (7.0 / 2 - 0.5) * 10]
    assert mean == pytest.approx(sum(per_chunk) / 4)
    assert spread == pytest.approx(float(np.std(per_chunk, ddof=1)))
    with pytest.raises(UserError, match="at least one inference"):
        energy_per_inference(steady, idle_w=1.0, inferences=0)


def test_measure_idle_averages_a_real_probe(tmp_path):
    write(tmp_path / "hwmon0" / "name", "ina219")
    write(tmp_path / "hwmon0" / "power1_input", 1_500_000)
    assert measure_idle(HwmonProbe(tmp_path), seconds=0.1, interval_s=0.02) == pytest.approx(1.5, rel=0.02)


# ---- sensors on a board, read over SSH (the sshd fixture's "board" is this machine) ----------------


def board_target(tmp_path: Path, sshd, source: str, options: str = "", ssh: bool = True) -> Path:
    """An RPC board's config whose power sensor is read on the board; `options` is an inline TOML table body."""
    ssh_table = "".join(f'{k} = "{v}"\n' if isinstance(v, str) else f"{k} = {v}\n" for k, v in sshd.ssh_table().items())
    path = tmp_path / "powerboard.toml"
    path.write_text(
        'label = "board with a sensor"\nconnection = "rpc"\n[tvm]\nkind = "llvm"\nnum-cores = 1\n'
        "[tuning]\ntrials = 1\ntrials_per_task = 1\npopulation = 2\n"
        "[bench]\nthreads = 1\nwarmup = 1\nsamples = 1\nmin_duration_s = 0.1\n"
        f'[power]\nsource = "{source}"\noptions = {{ {options} }}\n'
        '[rpc]\ntracker_host = "127.0.0.1"\ntracker_port = 9190\nkey = "powerboard"\n'
        + (f"[ssh]\n{ssh_table}" if ssh else "")
    )
    return path


def board_sensors(sshd):
    from targets.power import BoardSensors
    from targets.ssh import connect, settings_for

    return BoardSensors(connect(settings_for(sshd.ssh_table())))


def test_remote_rapl_reads_the_board_counters_and_survives_a_wrap(sshd, tmp_path):
    from targets import load_target
    from targets.power import open_target_probe

    counter = rapl_zone(tmp_path / "sys", "intel-rapl:0", "package-0", 900_000, max_uj=999_999)
    rapl_zone(tmp_path / "sys", "intel-rapl:0:0", "core", 0)
    config = load_target(board_target(tmp_path, sshd, "rapl", f'root = "{tmp_path / "sys"}"'))
    with open_target_probe(config) as probe:
        assert probe.read() == 0.0
        write(counter, 100_000)  # wrapped: 99_999 µJ to the top, one step to 0, then 100_000
        assert probe.read() == pytest.approx(0.2)
        write(counter, 400_000)
        assert probe.read() == pytest.approx(0.5)
        assert probe.describe() == f"RAPL energy counters: {sshd.user}@127.0.0.1:{counter} (package-0)"


def test_remote_sensor_vanishing_mid_run_names_the_board_file(sshd, rapl):
    root, (pkg0, _) = rapl
    with pytest.raises(ProbeError, match=f"{sshd.user}@127.0.0.1:{pkg0}: cannot read \\(No such file.*samples kept"):
        with PowerSampler(RaplProbe(root, host=board_sensors(sshd)), interval_s=0.005) as sampler:
            _wait_for(lambda: len(sampler.samples) >= 3)
            pkg0.unlink()
            _wait_for(lambda: sampler.error is not None)
    assert len(sampler.samples) >= 3
    sampler.probe.close()


def test_remote_sampler_stays_in_step_with_a_2_watt_counter(sshd, tmp_path):
    """Each read is taken on the board when asked, so the window's average matches the true power."""
    counter = rapl_zone(tmp_path, "intel-rapl:0", "package-0", 0)
    stop = threading.Event()
    start = time.monotonic()

    def advance():
        while not stop.wait(0.002):
            write(counter, int(2e6 * (time.monotonic() - start)))

    helper = threading.Thread(target=advance)
    helper.start()
    try:
        with RaplProbe(tmp_path, host=board_sensors(sshd)) as probe, PowerSampler(probe, interval_s=0.02) as sampler:
            time.sleep(0.5)
    finally:
        stop.set()
        helper.join()
    assert sampler.average_w == pytest.approx(2.0, rel=0.1)
    assert len(sampler.samples) > 5


def test_remote_hwmon_integrates_board_readings(sshd, tmp_path):
    clock = FakeClock()
    chip = tmp_path / "hwmon2"
    write(chip / "name", "ina3221")
    for channel, (milliamps, millivolts) in enumerate([(100, 5000), (200, 12000)], start=1):
        write(chip / f"curr{channel}_input", milliamps)
        write(chip / f"in{channel}_input", millivolts)
    with HwmonProbe(tmp_path, name_filter="ina*", clock=clock, host=board_sensors(sshd)) as probe:
        clock.now += 1.0
        assert probe.read() == pytest.approx(0.5 + 2.4)
        write(chip / "curr1_input", 300)
        clock.now += 1.0
        assert probe.read() == pytest.approx(2.9 + (2.9 + 3.9) / 2)
        assert f"{sshd.user}@127.0.0.1:{chip / 'curr1_input'}×in1_input" in probe.describe()


def test_remote_commands_run_on_the_board(sshd, tmp_path):
    clock = FakeClock()
    with VcgencmdProbe(command=("python3", "-c", f"print({PMIC!r})"), clock=clock, host=board_sensors(sshd)) as probe:
        clock.now += 1.0
        assert probe.read() == pytest.approx(0.05 * 3.3 + 2.03 * 0.8)
    with pytest.raises(ProbeError, match=f"{sshd.user}@127.0.0.1:no-such-vcgencmd: command not found"):
        VcgencmdProbe(command=("no-such-vcgencmd",), host=board_sensors(sshd))
    with pytest.raises(ProbeError, match=f"{sshd.user}@127.0.0.1:no-such-tegrastats: command not found"):
        TegrastatsProbe(command=("no-such-tegrastats",), host=board_sensors(sshd))


def test_remote_tegrastats_follows_the_board_command_and_hangs_it_up(sshd, tmp_path):
    pid_file = tmp_path / "tegrastats.pid"
    script = tmp_path / "tegrastats.py"
    script.write_text(f"import os, time\nopen({str(pid_file)!r}, 'w').write(str(os.getpid()))\n"
                      f"while True:\n    print({ORIN!r}, flush=True)\n    time.sleep(0.02)\n")
    clock = FakeClock()
    with TegrastatsProbe(command=("python3", str(script)), clock=clock, host=board_sensors(sshd)) as probe:
        clock.now += 0.5
        assert probe.read() == pytest.approx(5.12 * 0.5)
        pid = int(pid_file.read_text())
        assert Path(f"/proc/{pid}").exists()
    _wait_for(lambda: not Path(f"/proc/{pid}").exists() or Path(f"/proc/{pid}/stat").read_text().split()[2] == "Z")


def test_target_probe_needs_ssh_for_a_board_sensor(sshd, tmp_path):
    from targets import load_target
    from targets.power import open_target_probe

    with pytest.raises(UserError, match="power source 'hwmon' is on the board, read over SSH: add an \\[ssh\\] table"):
        open_target_probe(load_target(board_target(tmp_path, sshd, "hwmon", ssh=False)))
    with pytest.raises(UserError, match="'host' is not an option; options: root, name_filter, clock"):
        open_target_probe(load_target(board_target(tmp_path, sshd, "hwmon", 'host = "pi"')))
    assert not open_target_probe(load_target(board_target(tmp_path, sshd, "none", ssh=False))).available
