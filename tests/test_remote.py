"""Remote boards over TVM RPC: board configs, the tracker's lifecycle, clear errors, and models run on
the emulated aarch64 board (Debian arm64 under qemu-user), checked against torch on the host.

The tracker and the board are started once for the module (about 40 s each on a busy 2-core
machine); the last tests stop them and check that their process groups are gone.
"""

from __future__ import annotations

import dataclasses
import importlib.metadata
import json
import os
import signal
import socket
import subprocess
import time

import pytest
import torch

import targets
from bench.places import BoardRuntime
from conftest import model_under_test
from bench.record import append_records, read_records
from bench.run import TOLERANCE, bench_model
from compile.database import TuningDatabase
from compile.pipeline import ModelUnderTest, from_variant
from compile.tuning import CURVE_FILE, board_measurement, tune
from errors import UserError
from lwgan_models.registry import find_variant
from targets import emulated, rpc

TINY_VARIANT = "cyclegan-resnet6-ngf16+kd"
TINY_SHAPE = (1, 3, 32, 32)
QUIET = {"report": lambda _: None}
needs_rootfs = pytest.mark.skipif(
    not emulated.rootfs_ready(),
    reason=f"the emulated board's rootfs {emulated.ROOTFS_DIR} is not built: `invoke board.emulate` builds it once",
)


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def board_config(name: str, port: int, key: str | None = None) -> targets.TargetConfig:
    """A shipped target pointed at this test's tracker (never the user's on 9190)."""
    config = targets.load_target(name)
    return dataclasses.replace(config, rpc={**config.rpc, "tracker_port": port, **({"key": key} if key else {})})


class TinyGenerator(torch.nn.Module):
    """A generator's layer types (reflection pad, conv, instance norm, tanh) that compile in seconds."""

    def __init__(self) -> None:
        super().__init__()
        self.body = torch.nn.Sequential(
            torch.nn.ReflectionPad2d(1), torch.nn.Conv2d(3, 8, 3), torch.nn.InstanceNorm2d(8), torch.nn.ReLU(),
            torch.nn.Conv2d(8, 3, 1), torch.nn.Tanh(),
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.body(x)


def tiny_generator(shape: tuple[int, ...] = (1, 3, 16, 16)) -> ModelUnderTest:
    torch.manual_seed(0)
    return model_under_test(TinyGenerator().eval(), shape, "tiny-generator")


@pytest.fixture(scope="module")
def tracker(tmp_path_factory):
    state_dir = tmp_path_factory.mktemp("rpc")
    port = free_port()
    started = rpc.start_tracker(port=port, state_dir=state_dir, **QUIET)
    yield started, state_dir, port
    rpc.stop_tracker(state_dir, **QUIET)


@pytest.fixture(scope="module")
def board(tracker):
    _, state_dir, port = tracker
    config = board_config("aarch64-emu", port)
    fingerprint = emulated.start_board(config, state_dir=state_dir, **QUIET)
    yield config, fingerprint, state_dir
    emulated.stop_board(config, state_dir=state_dir, **QUIET)


def test_board_configs():
    rpi4, rpi5, emu = (targets.load_target(n) for n in ("rpi4", "rpi5", "aarch64-emu"))
    for config in (rpi4, rpi5, emu):
        resolved = targets.resolve(config)
        assert config.connection == "rpc" and config.cross["cc"] == "aarch64-linux-gnu-g++"
        assert resolved.tvm_target.attrs["mtriple"] == "aarch64-linux-gnu"
        assert resolved.db_key == config.name  # autotune_logs/<name>/<model>/: no isa levels
    assert targets.resolve(rpi4).tvm_target.attrs["mcpu"] == "cortex-a72"
    assert bool(targets.resolve(rpi5).tvm_target.attrs["feature.has_dotprod"])
    assert not bool(targets.resolve(rpi4).tvm_target.attrs["feature.has_dotprod"])
    # the emulated board is the Pi 4 configuration under another key and label, nothing else
    differing = {f.name for f in dataclasses.fields(rpi4) if getattr(rpi4, f.name) != getattr(emu, f.name)}
    assert differing == {"name", "path", "label", "rpc", "bench", "default_models", "default_input_shape"}
    # ... and a bench table sized for emulation: this machine's 2 cores, a small default set at 64x64
    assert emu.bench.threads == 2 and emu.bench.samples == rpi4.bench.samples
    assert emu.default_input_shape == (1, 3, 64, 64)
    assert {k for k in rpi4.rpc if rpi4.rpc[k] != emu.rpc[k]} == {"key"}


def test_rootfs_uses_the_mirror_apt_uses(tmp_path):
    (tmp_path / "sources.list.d").mkdir()
    (tmp_path / "sources.list.d" / "debian.sources").write_text(
        "Types: deb\n# a comment\nURIs: http://mirror.example/debian\nSuites: bookworm bookworm-updates\n"
        "Components: main\n\nTypes: deb\nURIs: http://mirror.example/debian-security\nSuites: bookworm-security\n"
    )
    assert emulated.debian_mirror(tmp_path) == "http://mirror.example/debian"
    (tmp_path / "sources.list.d" / "debian.sources").unlink()
    (tmp_path / "sources.list").write_text("deb [arch=amd64] http://other.example/debian bookworm main\n")
    assert emulated.debian_mirror(tmp_path) == "http://other.example/debian"
    (tmp_path / "sources.list").write_text("deb http://other.example/debian trixie main\n")
    assert emulated.debian_mirror(tmp_path) == emulated.DEFAULT_MIRROR


@needs_rootfs
def test_a_built_rootfs_is_reused():
    steps = []
    assert emulated.ensure_rootfs(report=steps.append) == emulated.ROOTFS_DIR and steps == []


def test_tracker_reports_its_boards(tracker):
    started, state_dir, port = tracker
    assert rpc.tracker_reachable("127.0.0.1", port)
    assert started.pid in rpc.group_members(started.pid)
    again = rpc.start_tracker(port=port, state_dir=state_dir, **QUIET)
    assert again.pid == started.pid  # reused, not a second tracker
    status = rpc.tracker_status("127.0.0.1", port, state_dir)
    assert f"pid {started.pid}" in status and "Queue Status" in status


def test_no_board_or_no_tracker_fails_fast(tracker):
    _, _, port = tracker
    started = time.time()
    nobody = board_config("aarch64-emu", port, key="nobody-here")
    with pytest.raises(UserError, match="no board with key 'nobody-here'.*invoke board.emulate"):
        rpc.connect(nobody)
    with pytest.raises(UserError, match="no board with key 'nobody-here'"):
        board_measurement(nobody)  # tuning checks before building anything
    with pytest.raises(UserError, match="no board with key 'nobody-here'"):
        bench_model(tiny_generator(), targets.resolve(nobody), "run", **QUIET)  # ... and so does benchmarking
    nobody_listens = free_port()
    with pytest.raises(UserError, match=f"no RPC tracker answers at 127.0.0.1:{nobody_listens}.*invoke tracker.start"):
        rpc.connect(board_config("rpi4", nobody_listens))
    with pytest.raises(UserError, match="is not an RPC board"):
        rpc.connect(targets.load_target("host"))
    assert time.time() - started < 10


@needs_rootfs
def test_emulated_board_runs_a_generator_against_torch(board, tmp_path):
    config, fingerprint, state_dir = board
    # read on the board: an aarch64 userland with the host's TVM, saying it is emulated
    assert fingerprint["machine"] == "aarch64" and fingerprint["emulator"].startswith("qemu-aarch64")
    assert fingerprint["tvm"] == __import__("tvm").__version__ and "bookworm" in fingerprint["os"]
    assert emulated.start_board(config, state_dir=state_dir, **QUIET) == fingerprint  # reused, not restarted
    rules = targets.BenchRules(threads=2, warmup=1, samples=3, min_duration_s=0.0)
    [record] = bench_model(tiny_generator(), targets.resolve(config), "test-run", ("tvm",), rules,
                           samples_dir=tmp_path / "samples", **QUIET)
    assert record.valid, record.invalid_reason
    assert record.max_abs_err <= TOLERANCE["fp32"] == record.tolerance
    assert record.target == "aarch64-emu" and record.runtime == "tvm" and record.threads == 2
    assert record.env["machine"] == "aarch64" and record.env["emulator"] == fingerprint["emulator"]
    assert record.samples == 3 and record.latency_p50_ms > 0
    assert (tmp_path / "samples" / "tiny-generator.png").exists()
    # the session ended with the benchmark: the board registers again as free
    assert rpc.wait_for_board("127.0.0.1", config.rpc["tracker_port"], config.rpc["key"], timeout_s=120)
    status = emulated.board_status(config, state_dir=state_dir)
    assert status.running and status.registered == 1 and status.free == 1


@needs_rootfs
def test_the_board_times_onnx_runtime_and_litert_beside_tvm(board):
    """The peers run on the board (loaded there by the same plug-ins), in the same rounds, under the same rules."""
    config, fingerprint, _ = board
    assert fingerprint["onnxruntime"] == importlib.metadata.version("onnxruntime")  # read on the board
    rules = targets.BenchRules(threads=2, warmup=1, samples=3, min_duration_s=0.0)
    records = bench_model(tiny_generator(), targets.resolve(config), "peers", ("tvm", "onnxruntime", "litert"),
                          rules, **QUIET)
    assert [r.runtime for r in records] == ["tvm", "onnxruntime", "litert"]
    for record in records:
        assert record.valid, (record.runtime, record.invalid_reason)
        assert record.max_abs_err <= TOLERANCE["fp32"] and record.executed_precision == "fp32"
        assert record.env["machine"] == "aarch64" and record.env["emulator"] == fingerprint["emulator"]
        assert record.samples == 3 and record.latency_p50_ms > 0 and record.peak_rss_bytes is None
    assert records[2].artifact_bytes > 0 and records[2].target == "aarch64-emu"


@pytest.mark.slow
@needs_rootfs
def test_emulated_board_runs_a_trained_cyclegan_variant(board):
    config, _, _ = board
    model = from_variant(find_variant(TINY_VARIANT), TINY_SHAPE)
    rules = targets.BenchRules(threads=2, warmup=1, samples=3, min_duration_s=0.0)
    [record] = bench_model(model, targets.resolve(config), "test-run", ("tvm",), rules, **QUIET)
    assert record.valid, record.invalid_reason
    assert record.max_abs_err <= TOLERANCE["fp32"] and record.model == TINY_VARIANT


@pytest.mark.slow
@needs_rootfs
def test_tuning_on_the_emulated_board_writes_a_database(board, tmp_path):
    config, _, _ = board
    database = TuningDatabase(tmp_path / "db" / "tiny-generator")
    ran = tune(tiny_generator().make_relax(), targets.resolve(config).tvm_target, database, trials=8,
               trials_per_task=8, population=16, board=config, seed=0, **QUIET)
    first = database.record_count()
    assert ran >= 8 and first > 0
    curve = [json.loads(line) for line in (database.path / CURVE_FILE).read_text().splitlines()]
    assert any(point["estimated_latency_ms"] for point in curve)  # candidates really ran on the board
    tune(tiny_generator().make_relax(), targets.resolve(config).tvm_target, database, trials=8,
         trials_per_task=8, population=16, board=config, seed=1, **QUIET)
    assert database.record_count() > first  # a rerun resumes: appended to the same database


@needs_rootfs
def test_stopping_the_board_ends_its_process_group(board):
    config, _, state_dir = board
    running = rpc.Background.read(emulated.board_state_file(config.rpc["key"], state_dir))
    assert running is not None and rpc.group_members(running.pid)
    assert emulated.stop_board(config, state_dir=state_dir, **QUIET)
    assert rpc.group_members(running.pid) == []


@needs_rootfs
def test_a_board_killed_mid_run_keeps_earlier_records_and_names_the_board(board, tmp_path, monkeypatch):
    config, _, state_dir = board
    emulated.start_board(config, state_dir=state_dir, **QUIET)  # the test before stopped it
    rules = targets.BenchRules(threads=1, warmup=1, samples=3, min_duration_s=0.0)
    out = append_records(bench_model(tiny_generator(), targets.resolve(config), "killed", ("onnxruntime",), rules,
                                     **QUIET), tmp_path / "killed.jsonl")
    server = rpc.Background.read(emulated.board_state_file(config.rpc["key"], state_dir))
    measure = BoardRuntime.measure

    def killed_while_timing(runtime, n):
        os.killpg(server.pid, signal.SIGKILL)
        return measure(runtime, n)

    monkeypatch.setattr(BoardRuntime, "measure", killed_while_timing)
    with pytest.raises(UserError, match="board 'aarch64-emu': onnxruntime failed on the board"):
        bench_model(tiny_generator((1, 3, 24, 24)), targets.resolve(config), "killed", ("onnxruntime",), rules,
                    **QUIET)
    [kept] = read_records(out)
    assert kept.valid and kept.runtime == "onnxruntime"
    assert not emulated.board_status(config, state_dir=state_dir).running


def test_a_stale_state_file_never_stops_someone_elses_process(tmp_path):
    other = subprocess.Popen(["sleep", "60"], start_new_session=True)  # took over the recorded pid
    try:
        state = tmp_path / "board.json"
        state.write_text(json.dumps({"pid": other.pid, "signature": ["board_server.py"], "log": "/dev/null",
                                     "started": 0.0}))
        assert not rpc.stop_group(state)
        assert other.poll() is None and not state.exists()
    finally:
        other.kill()
        other.wait()


def test_stopping_the_tracker_ends_its_process_group(tracker):
    started, state_dir, port = tracker
    assert rpc.group_members(started.pid)
    assert rpc.stop_tracker(state_dir, **QUIET)
    assert rpc.group_members(started.pid) == []
    # the port is released (polled: a connect to a closed local port can, rarely, meet itself)
    deadline = time.time() + 5
    while rpc.tracker_reachable("127.0.0.1", port) and time.time() < deadline:
        time.sleep(0.2)
    assert not rpc.tracker_reachable("127.0.0.1", port)
    assert not (state_dir / rpc.TRACKER_STATE).exists()
    assert not rpc.stop_tracker(state_dir, **QUIET)  # nothing left to stop
