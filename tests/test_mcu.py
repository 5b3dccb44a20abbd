"""The microcontroller path: Relax -> plain C (compile/backends/c.py), firmware and qemu (targets/mcu.py),
records (bench/firmware.py). Tiny generators keep the default run short; the shipped variants are slow."""

from __future__ import annotations

import ctypes
import dataclasses
import re
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import onnx
import onnxruntime as ort
import pytest
import torch

import targets
from bench.run import MIN_OUTPUT_PSNR_DB, TOLERANCE, check_output, reference_output
from bench.firmware import export_and_build
from bench.run import test_image as photo  # (not a test)
from compile import NATIVE_CONV
from compile.backends.c import Lifetime, export_c, plan_memory
from compile.int8.fixed_point import fixed_point
from compile.onnx_import import onnx_at_input_shape, quantize_before_padding
from compile.pipeline import ModelUnderTest, from_onnx_file, from_variant
from conftest import model_under_test
from errors import UserError
from lwgan_models.compression import quantize
from lwgan_models.cyclegan import ResnetGenerator, init_weights
from lwgan_models.registry import find_variant
from targets.mcu import (
    STACK_BYTES,
    Firmware,
    FirmwareTooLarge,
    build_firmware,
    mcu_part,
    run_firmware,
)

REPO = Path(__file__).resolve().parent.parent
SHAPE = (1, 3, 16, 16)
HAVE_ARM_GCC = shutil.which("arm-none-eabi-gcc") is not None
HAVE_QEMU = shutil.which("qemu-system-arm") is not None
needs_arm_gcc = pytest.mark.skipif(not HAVE_ARM_GCC, reason="arm-none-eabi-gcc not installed (gcc-arm-none-eabi)")
needs_qemu = pytest.mark.skipif(not (HAVE_ARM_GCC and HAVE_QEMU),
                                reason="arm-none-eabi-gcc or qemu-system-arm not installed")
pytestmark = pytest.mark.usefixtures("one_torch_thread")


def tiny_generator() -> torch.nn.Module:
    """The official ResNet generator layout (reflection pads, instance norm, transposed convs, tanh), tiny."""
    torch.manual_seed(0)
    return init_weights(ResnetGenerator(3, 3, ngf=2, n_blocks=1), "normal", 0.3).eval()


def tiny_model(module: torch.nn.Module, cache: Path) -> ModelUnderTest:
    return model_under_test(module, SHAPE, "tiny", cache)


def run_on_host(export, x: np.ndarray) -> np.ndarray:
    """Build the exported C project with the host compiler and call model_run through ctypes."""
    library = export.directory / "libmodel.so"
    subprocess.run(["gcc", "-O1", "-shared", "-fPIC", "-I", str(export.directory / "include"), "-I",
                    str(export.directory), *map(str, export.sources), "-o", str(library), "-lm"], check=True)
    output = np.zeros(export.output.shape, dtype=export.output.dtype)
    status = ctypes.CDLL(str(library)).model_run(x.ctypes.data_as(ctypes.c_void_p), output.ctypes.data_as(ctypes.c_void_p))
    assert status == 0
    return output


@pytest.fixture(scope="module")
def fp32_export(tmp_path_factory):
    root = tmp_path_factory.mktemp("fp32")
    model = tiny_model(tiny_generator(), root)
    return model, export_c(model, root / "project", report=lambda _: None)


@pytest.fixture(scope="module")
def qdq_file(tmp_path_factory):
    """A tiny int8 QDQ generator made by the suite's own PTQ (calibrated on photos)."""
    root = tmp_path_factory.mktemp("qdq")
    module = tiny_generator()
    prepared = quantize.prepare(module, torch.zeros(SHAPE))
    photos = [torch.from_numpy(photo(SHAPE)), torch.from_numpy(photo(SHAPE)).flip(-1)]
    quantize.calibrate(prepared, photos)
    return quantize.export_qdq(prepared, SHAPE, root / "tiny+ptq.onnx")


@pytest.fixture(scope="module")
def int8_export(qdq_file, tmp_path_factory):
    model = from_onnx_file(qdq_file)
    return model, export_c(model, tmp_path_factory.mktemp("int8") / "project", report=lambda _: None)


# --- memory planning ------------------------------------------------------------------------------


def test_planner_reuses_the_bytes_of_dead_buffers():
    # a chain: each buffer is written by one step and read by the next, so two are alive at a time
    chain = [Lifetime(f"t{i}", 1000, i, i + 1) for i in range(6)]
    plan = plan_memory(chain)
    assert plan.peak_live_bytes == 2 * 1008  # 1000 rounded up to the 16-byte alignment
    assert plan.arena_bytes == plan.peak_live_bytes < sum(b.nbytes for b in chain)
    assert plan.offsets["t0"] == plan.offsets["t2"] == plan.offsets["t4"]


def test_planner_never_gives_live_buffers_the_same_bytes():
    rng = np.random.default_rng(0)
    buffers = []
    for i in range(150):
        first = int(rng.integers(0, 60))
        buffers.append(Lifetime(f"t{i}", int(rng.integers(1, 5000)), first, first + int(rng.integers(0, 8))))
    plan = plan_memory(buffers)
    for a in buffers:
        assert plan.offsets[a.name] % 16 == 0
        for b in buffers:
            if a is not b and a.first <= b.last and b.first <= a.last:
                assert not plan.overlaps(a, b), (a, b)
    assert plan.peak_live_bytes <= plan.arena_bytes < sum(b.nbytes for b in buffers)
    assert plan.arena_bytes <= 1.25 * plan.peak_live_bytes


def test_planner_rejects_an_impossible_lifetime():
    with pytest.raises(ValueError, match="t0"):
        plan_memory([Lifetime("t0", 10, 3, 1)])


# --- integer requantization -----------------------------------------------------------------------


def test_fixed_point_requantization_matches_real_arithmetic():
    rng = np.random.default_rng(1)
    multipliers = np.exp(rng.uniform(np.log(1e-5), np.log(2.0), 16))
    mantissa, shift = fixed_point(multipliers)
    assert np.all(mantissa < 2**31) and np.all(mantissa >= 2**30) and np.all((shift > 0) & (shift <= 62))
    assert np.allclose(mantissa * 2.0 ** -shift, multipliers, rtol=1e-9)
    # what the generated kernels compute per output channel: (acc * mantissa + half) >> shift, + zero point
    acc = rng.integers(-(2**22), 2**22, (16, 64)).astype(np.int64)
    m, n = mantissa[:, None], shift[:, None]
    got = np.clip(((acc * m + (np.int64(1) << (n - 1))) >> n) + 128, 0, 255)
    exact = np.clip(np.floor(acc * multipliers[:, None] + 0.5) + 128, 0, 255)
    assert np.abs(got - exact).max() <= 1 and np.mean(got == exact) > 0.999
    with pytest.raises(UserError, match="multiplier"):
        fixed_point(np.array([0.0]))


# --- C export checked on the host ------------------------------------------------------------------


@pytest.mark.skipif(shutil.which("gcc") is None, reason="no host C compiler")
def test_fp32_c_export_computes_what_torch_computes(fp32_export):
    model, export = fp32_export
    x = photo(SHAPE)
    output = run_on_host(export, x)
    reference = reference_output(model, x)
    assert np.abs(output - reference).max() <= TOLERANCE["fp32"]
    source = (export.directory / "model.c").read_text()
    weights = re.findall(r"^static (const )?(\w+) (c\d+)\[", source, re.M)
    assert weights and all(const for const, _, _ in weights)  # every weight lives in flash
    assert export.weights_bytes >= 4 * model.params
    assert export.workspace_bytes == 0  # scheduling removed every kernel-internal buffer
    assert export.peak_live_bytes <= export.arena_bytes
    kernels = (export.directory / "kernels.c").read_text()
    assert "TVMBackendAllocWorkspace" not in kernels and "TVMFuncCall" not in kernels


@pytest.mark.skipif(shutil.which("gcc") is None, reason="no host C compiler")
def test_int8_c_export_uses_integer_convolutions_and_matches_the_qdq_reference(int8_export, qdq_file):
    model, export = int8_export
    x = photo(SHAPE)
    output = run_on_host(export, x)
    reference = reference_output(model, x)  # the QDQ file under ONNX Runtime, graph optimisations off
    check = check_output(model, "c-firmware", output, reference)
    assert check.psnr_db >= MIN_OUTPUT_PSNR_DB["int8"] and not check.violations
    convs = [n for n in onnx.load(qdq_file).graph.node if n.op_type == "Conv"]
    source = (export.directory / "model.c").read_text()
    assert len(re.findall(r"^static const int8_t c\d+\[", source, re.M)) == len(convs)  # int8 weights, one per conv
    assert len(re.findall(rf"^  if \({NATIVE_CONV}\(", source, re.M)) == len(convs)  # the SMLAD kernel runs them
    assert export.workspace_bytes == 0


def test_quantizing_before_a_reflection_pad_changes_no_value(qdq_file):
    original = onnx.load(qdq_file)
    swapped = quantize_before_padding(original)
    assert [n.op_type for n in swapped.graph.node] != [n.op_type for n in original.graph.node]
    onnx.checker.check_model(swapped)
    options = ort.SessionOptions()
    options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_DISABLE_ALL
    x = photo(SHAPE)
    outputs = [ort.InferenceSession(m.SerializeToString(), options, providers=["CPUExecutionProvider"])
               .run(None, {"x": x})[0] for m in (original, swapped)]
    np.testing.assert_array_equal(outputs[0], outputs[1])


def test_a_qdq_file_is_repinned_to_another_input_size(qdq_file, tmp_path):
    path = onnx_at_input_shape(qdq_file, (1, 3, 24, 24), tmp_path)
    assert path != qdq_file and onnx_at_input_shape(qdq_file, (1, 3, 24, 24), tmp_path) == path  # cached
    session = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    assert session.run(None, {"x": photo((1, 3, 24, 24))})[0].shape == (1, 3, 24, 24)
    assert onnx_at_input_shape(qdq_file, SHAPE, tmp_path) == qdq_file
    with pytest.raises(UserError, match="only the spatial size"):
        onnx_at_input_shape(qdq_file, (1, 4, 16, 16), tmp_path)


# --- targets, firmware, qemu ---------------------------------------------------------------------


def test_microcontroller_targets_name_a_part_that_qemu_can_hold():
    for name, machine in (("cortex-m4", "mps2-an386"), ("cortex-m33", "mps2-an505"), ("cortex-m7", "mps2-an500")):
        config = targets.load_target(name)
        part = mcu_part(config)
        assert part.machine == machine and config.connection == "qemu-system"
        assert part.flash_bytes >= 1 << 20 and part.ram_bytes >= 320 << 10
        assert targets.resolve(config).tvm_target.kind.name == "c"
    with pytest.raises(UserError, match="not a microcontroller"):
        mcu_part(targets.load_target("host"))


@pytest.mark.parametrize("edit, message", [
    (('qemu_machine = "mps2-an386"', 'qemu_machine = "raspi3b"'), "not supported"),
    (('cpu = "cortex-m4"', 'cpu = "cortex-m7"'), "does not match"),
    (("ram_bytes = 327680", "ram_bytes = 8388608"), "not inside"),
])
def test_a_part_that_qemu_cannot_emulate_is_refused(edit, message, tmp_path):
    text = (REPO / "targets" / "cortex-m4.toml").read_text()
    assert edit[0] in text
    path = tmp_path / "board.toml"
    path.write_text(text.replace(*edit))
    with pytest.raises(UserError, match=message):
        mcu_part(targets.load_target(path))


@needs_arm_gcc
def test_a_model_short_of_ram_is_exported_lean_else_refused(fp32_export, tmp_path):
    model, export = fp32_export
    target = targets.resolve(targets.load_target("cortex-m4"))
    part = mcu_part(target.config)
    lean_dir = tmp_path / "lean-export"
    exports = lambda ram_lean: lean_dir if ram_lean else export.directory  # noqa: E731 (the fixture's export is reused)
    _, roomy = export_and_build(model, target, tmp_path / "roomy", lambda _: None, export_dir=exports)
    messages = []
    with pytest.raises(FirmwareTooLarge) as info:  # 8 KB: not even the lean export fits
        export_and_build(model, target, tmp_path / "tiny", messages.append, export_dir=exports,
                         part=dataclasses.replace(part, ram_bytes=8192))
    assert any("exporting again with paddings computed inside the convolutions" in m for m in messages)
    message = str(info.value)
    assert "\n" not in message and "does not fit" in message and "RAM" in info.value.overflow
    assert re.search(r"RAM \d+ bytes > 8192 \(activation arena \d+", message)
    # one byte short of what the regular export needs: the lean one fits, and still computes the same
    lean, firmware = export_and_build(model, target, tmp_path / "tight", lambda _: None, export_dir=exports,
                                      part=dataclasses.replace(part, ram_bytes=roomy.ram_bytes - 1))
    assert lean.ram_lean and lean.arena_bytes < export.arena_bytes and firmware.ram_bytes < roomy.ram_bytes
    x = photo(SHAPE)
    assert np.abs(run_on_host(lean, x) - reference_output(model, x)).max() <= TOLERANCE["fp32"]


@needs_qemu
def test_one_inference_under_qemu_on_cortex_m4(fp32_export, monkeypatch, tmp_path):
    import bench.firmware

    model, export = fp32_export
    monkeypatch.setattr(bench.firmware, "export_dir", lambda *_: export.directory)  # reuses the export
    monkeypatch.setattr(bench.firmware, "FIRMWARE_DIR", tmp_path)
    target = targets.resolve(targets.load_target("cortex-m4"))
    messages = []
    [record] = bench.firmware.bench_firmware(model, target, "run-1", report=messages.append)
    assert any("reusing the C export" in m for m in messages)
    assert record.valid and record.runtime == "c-firmware" and record.target == "cortex-m4"
    assert record.max_abs_err <= TOLERANCE["fp32"] and record.tolerance == TOLERANCE["fp32"]
    assert record.instructions > 100_000 and record.peak_rss_bytes is None
    assert record.flash_bytes > export.weights_bytes
    assert record.ram_bytes >= record.arena_bytes + export.input.nbytes + export.output.nbytes
    assert "arm-none-eabi-gcc" in record.toolchain and "qemu-system-arm" in record.toolchain
    # the same firmware again: qemu's instruction count is deterministic, and the output equals the host build's
    part = mcu_part(target.config)
    project = dataclasses.replace(export, directory=bench.firmware.firmware_dir(model, target))
    firmware = build_firmware(project, part, report=lambda _: None)
    x = photo(SHAPE)
    again = run_firmware(firmware, part, x.tobytes(), export.output.nbytes)
    assert again.instructions == record.instructions and 0 < again.stack_used_bytes < firmware.stack_bytes
    on_arm = np.frombuffer(again.output, np.float32).reshape(export.output.shape)
    np.testing.assert_allclose(on_arm, run_on_host(export, x), atol=1e-5)


@needs_qemu
def test_int8_firmware_under_qemu_matches_the_qdq_reference(int8_export, monkeypatch, tmp_path):
    """On the Cortex-M4 (SMLAD kernels, 32-bit requantization, newlib's float functions) as on the host."""
    import bench.firmware

    model, export = int8_export
    monkeypatch.setattr(bench.firmware, "export_dir", lambda *_: export.directory)
    monkeypatch.setattr(bench.firmware, "FIRMWARE_DIR", tmp_path)
    target = targets.resolve(targets.load_target("cortex-m4"))
    [record] = bench.firmware.bench_firmware(model, target, "run-1", report=lambda _: None)
    assert record.valid and record.precision == "int8" and record.tolerance is None
    assert record.output_psnr_db >= record.min_output_psnr_db == MIN_OUTPUT_PSNR_DB["int8"]
    assert record.flash_bytes > export.weights_bytes and record.arena_bytes == export.arena_bytes
    # the estimate: model_run's instruction mix weighed by the core's table, carried with the record
    assert abs(sum(record.instruction_mix.values()) - record.instructions) <= 100
    assert record.cycle_table == mcu_part(target.config).cycles and record.cycles_estimate > record.instructions
    built = Firmware(elf=bench.firmware.firmware_dir(model, target) / "firmware.elf", flash_bytes=record.flash_bytes,
                     ram_bytes=record.ram_bytes, stack_bytes=STACK_BYTES, toolchain=record.toolchain)
    x = photo(SHAPE)
    run = run_firmware(built, mcu_part(target.config), x.tobytes(), export.output.nbytes)
    on_arm = np.frombuffer(run.output, np.float32).reshape(export.output.shape)
    np.testing.assert_allclose(on_arm, run_on_host(export, x), atol=1e-5)


# --- the shipped variants (slow: torch.export and lowering of the real generators) ---------------


@pytest.mark.slow
@needs_qemu
@pytest.mark.parametrize("name", ["cyclegan-resnet6-ngf16+kd", "cyclegan-resnet6-ngf16+prune+kd+ptq"])
def test_shipped_variant_runs_on_cortex_m4_at_32x32(name, monkeypatch, tmp_path):
    import bench.firmware

    monkeypatch.setattr(bench.firmware, "FIRMWARE_DIR", tmp_path)
    model = from_variant(find_variant(name), (1, 3, 32, 32))
    [record] = bench.firmware.bench_firmware(model, targets.resolve(targets.load_target("cortex-m4")), "slow",
                                            report=lambda _: None)
    assert record.valid, record.invalid_reason
    assert record.ram_bytes <= 320 << 10 and record.flash_bytes <= 1536 << 10 and record.instructions > 10**6


@pytest.mark.slow
@needs_qemu
def test_invoke_bench_on_a_microcontroller_measures_its_default_fp32_and_int8_models(tmp_path):
    config = targets.load_target("cortex-m4")
    from bench.record import load_records

    subprocess.run([sys.executable, "-m", "invoke", "bench", "--target", "cortex-m4", "--results", str(tmp_path)],
                   cwd=REPO, check=True, capture_output=True)
    frame = load_records(tmp_path)
    assert sorted(frame.model) == sorted(config.default_models) and set(frame.precision) == {"fp32", "int8"}
    assert frame.valid.all() and all(list(s) == list(config.default_input_shape) for s in frame.input_shape)
    assert (frame.flash_bytes <= 1536 << 10).all() and (frame.ram_bytes <= 320 << 10).all()
    assert (frame.arena_bytes < frame.ram_bytes).all() and (frame.instructions > 10**7).all()
    assert frame.toolchain.str.contains("arm-none-eabi-gcc").all()


@pytest.mark.slow
@needs_qemu
def test_invoke_build_writes_a_standalone_project_that_runs(tmp_path):
    out = tmp_path / "project"
    subprocess.run([sys.executable, "-m", "invoke", "build", "--target", "cortex-m4", "--model",
                    "cyclegan-resnet6-ngf16+kd", "--shape", "1x3x32x32", "--out", str(out)], cwd=REPO, check=True)
    for name in ("model.h", "model.c", "kernels.c", "tvm_shim.c", "Makefile", "linker.ld", "firmware.elf", "input.bin"):
        assert (out / name).is_file(), name
    assert "int model_run(const model_input_t* input, model_output_t* output);" in (out / "model.h").read_text()
    subprocess.run(["make", "-s", "-C", str(out), "run"], check=True, capture_output=True, timeout=600)
    assert (out / "output.bin").stat().st_size == 3 * 32 * 32 * 4


# --- the report --------------------------------------------------------------------------------------


def test_report_sets_each_int8_model_beside_the_fp32_network_it_quantizes(tmp_path):
    from bench.record import Record, append_records, load_records
    from reports import render_report

    def firmware(model, precision, target, flash, ram, instructions, macs=25_000_000, cycles=None):
        return Record(run_id="run-1", model=model, family="cyclegan", variant=model.partition("+")[2], base_model="gen",
                      precision=precision, weights="random", input_shape=[1, 3, 64, 64], params=70_000, macs=macs,
                      size_fp32_bytes=280_000, target=target, device=f"{target} (qemu)", isa_level="",
                      runtime="c-firmware", threads=1, samples=1, flash_bytes=flash, ram_bytes=ram, arena_bytes=ram // 2,
                      instructions=instructions, toolchain="arm-none-eabi-gcc 12.2.1, qemu-system-arm 7.2.22",
                      cycles_estimate=cycles, cycle_table=cycles and {"alu": 1, "load": 2},
                      timestamp="2026-01-01T00:00:00+00:00")

    records = [firmware("gen+prune", "fp32", "cortex-m4", 300_000, 320_000, 120_000_000, cycles=200_000_000),
               firmware("gen+prune+ptq", "int8", "cortex-m4", 150_000, 160_000, 60_000_000, cycles=50_000_000),
               firmware("gen+kd", "fp32", "cortex-m4", 100_000, 200_000, 40_000_000, macs=12_000_000),  # another network
               firmware("gen+prune+ptq", "int8", "cortex-m7", 160_000, 160_000, 50_000_000)]  # no fp32 on this core
    append_records(records, tmp_path / "results" / "run.jsonl")
    index = render_report(load_records(tmp_path / "results"), tmp_path / "index.html").read_text()
    gains = re.search(r'<table class="firmware-gains".*?</table>', index, re.S).group()
    rows = [re.sub(r"\s+", " ", re.sub(r"<[^>]+>", " ", row)).strip() for row in re.findall(r"<tr>(.*?)</tr>", gains, re.S)]
    assert rows[1:] == ["cortex-m4 (qemu) gen+prune+ptq gen+prune 0.50× 0.50× 0.50× 0.50× 0.25×"]
    table = re.search(r'<table class="firmware" .*?</table>', index, re.S).group()
    assert table.count("<th colspan=\"6\">") == 2 and "60.00" in table and "50.00" in table
    assert "200.00" in table and ">0.50<" in table  # estimated M cycles and MACs/cycle (25 M MACs / 50 M cycles)
    tables = re.search(r'<table class="cycle-tables".*?</table>', index, re.S).group()
    assert "cortex-m4 (qemu)" in tables and "cortex-m7" not in tables and "load" in tables
    device = (tmp_path / "index-devices" / "cortex-m4.html").read_text()
    assert "arm-none-eabi-gcc 12.2.1, qemu-system-arm 7.2.22" in device
