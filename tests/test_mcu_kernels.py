"""The hand-written Cortex-M int8 convolution (compile/mcu_kernels/conv2d_s8.c) and the cycle estimate.

The kernel must compute exactly what TVM's lowering of the same QDQ convolutions computes: on the
host (its plain-C path) and under qemu (its SMLAD/LDRD path), over the shapes that exercise its
edges: odd pixel and channel counts, stride 2, zero-point padding, 1x1 and 7x7 windows, depths that
are not a multiple of eight, and int8 as well as uint8 activations.
"""

from __future__ import annotations

import ctypes
import dataclasses
import re
import shutil
import subprocess

import numpy as np
import pytest
import torch
from torch import nn

import targets
from compile import NATIVE_CONV
from compile.backends import c as c_export
from compile.int8 import fixed_point
from compile.pipeline import from_onnx_file
from errors import UserError
from lwgan_models.compression import quantize
from targets.mcu import (
    INSTRUCTION_CLASSES,
    build_firmware,
    classify,
    mcu_part,
    plugin_library,
    run_firmware,
)
from test_mcu import needs_qemu, run_on_host

SHAPE = (1, 3, 9, 11)  # 99 output pixels at stride 1: an odd last pixel


class ConvStack(nn.Module):
    """Plain convolutions of the shapes generators use, with relu and tanh between some of them."""

    def __init__(self):
        super().__init__()
        self.layers = nn.Sequential(
            nn.Conv2d(3, 5, 3, padding=1), nn.ReLU(),  # 27 taps, 5 channels: odd channel count
            nn.Conv2d(5, 6, 3, stride=2, padding=1), nn.ReLU(),  # stride 2 with zero-point padding
            nn.Conv2d(6, 4, 1),  # a 1x1 window
            nn.Conv2d(4, 3, 7, padding=3), nn.Tanh())  # 196 taps, 3 channels

    def forward(self, x):
        return self.layers(x)


@pytest.fixture(scope="module")
def conv_qdq(tmp_path_factory):
    torch.manual_seed(0)
    module = ConvStack().eval()
    prepared = quantize.prepare(module, torch.zeros(SHAPE))
    quantize.calibrate(prepared, [torch.rand(SHAPE) * 2 - 1 for _ in range(3)])
    return from_onnx_file(quantize.export_qdq(prepared, SHAPE, tmp_path_factory.mktemp("qdq") / "stack.onnx"))


def export(model, directory, native: bool):
    original = fixed_point.integer_convolutions
    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(c_export, "integer_convolutions", lambda mod, native_kernels=False: original(mod, native))
        return c_export.export_c(model, directory, report=lambda _: None)


@pytest.fixture(scope="module")
def exports(conv_qdq, tmp_path_factory):
    root = tmp_path_factory.mktemp("exports")
    return {native: export(conv_qdq, root / f"native-{native}", native) for native in (True, False)}


def inputs() -> list[np.ndarray]:
    rng = np.random.default_rng(1)
    return [rng.uniform(-1, 1, SHAPE).astype(np.float32), np.full(SHAPE, -1.0, np.float32),
            np.full(SHAPE, 1.0, np.float32)]


def test_every_qdq_convolution_calls_the_native_kernel(exports):
    source = (exports[True].directory / "model.c").read_text()
    assert len(re.findall(rf"^  if \({NATIVE_CONV}\(", source, re.M)) == 4
    assert NATIVE_CONV not in (exports[False].directory / "model.c").read_text()


def test_native_kernel_equals_the_tvm_integer_lowering_on_the_host(exports):
    for x in inputs():
        np.testing.assert_array_equal(run_on_host(exports[True], x), run_on_host(exports[False], x))


@needs_qemu
@pytest.mark.parametrize("target", ["cortex-m4", "cortex-m33"])
def test_native_kernel_under_qemu_equals_the_host_and_counts_its_instructions(exports, target, tmp_path):
    part = mcu_part(targets.load_target(target))
    project = dataclasses.replace(exports[True], directory=tmp_path / "project")
    shutil.copytree(exports[True].directory, project.directory)
    firmware = build_firmware(project, part, report=lambda _: None)
    x = inputs()[0]
    run = run_firmware(firmware, part, x.tobytes(), project.output.nbytes, plugin=plugin_library(tmp_path / "tools"))
    on_arm = np.frombuffer(run.output, np.float32).reshape(project.output.shape)
    np.testing.assert_array_equal(on_arm, run_on_host(exports[True], x))
    # The per-address counts of what model_run reaches add up to qemu's clock of the inference
    # (the call into model_run and the clock reads around it differ by a handful of instructions).
    assert abs(sum(run.instruction_mix.values()) - run.instructions) <= 100
    assert run.instruction_mix["multiply"] > 0 and run.instruction_mix["load_pair"] > 0  # SMLAD and LDRD ran
    expected = sum(count * part.cycles[kind] for kind, count in run.instruction_mix.items())
    assert run.cycles_estimate(part.cycles) == round(expected) > run.instructions  # loads and branches cost more


def reference_conv(conv: fixed_point.FixedPointConv, codes: np.ndarray) -> np.ndarray:
    """The integer convolution in numpy int64: zero-point padding, bias, (a * m + 2^(s-1)) >> s, clamp."""
    top, left, bottom, right = conv.padding
    padded = np.pad(codes.astype(np.int64), ((0, 0), (0, 0), (top, bottom), (left, right)), constant_values=conv.in_zero)
    out_c, _, k_h, k_w = conv.weights.shape
    (s_h, s_w), (_, _, out_h, out_w) = conv.strides, conv.out_shape
    windows = np.lib.stride_tricks.sliding_window_view(padded[0], (k_h, k_w), axis=(1, 2))[:, ::s_h, ::s_w][:, :out_h, :out_w]
    acc = np.einsum("chwij,ocij->ohw", windows, conv.weights.astype(np.int64)) + conv.bias[:, None, None]
    shift = conv.shift[:, None, None]
    scaled = (acc * conv.mantissa[:, None, None] + (np.int64(1) << (shift - 1))) >> shift
    lo, hi = fixed_point.QUANT_RANGE[conv.out_dtype]
    return np.clip(scaled + conv.out_zero, lo, hi).astype(conv.out_dtype)[None]


@pytest.fixture(scope="module")
def kernel_library(tmp_path_factory):
    """conv2d_s8.c built for the host (its plain-C path), called directly through ctypes."""
    if shutil.which("gcc") is None:
        pytest.skip("no host C compiler")
    library = tmp_path_factory.mktemp("kernel") / "conv2d_s8.so"
    subprocess.run(["gcc", "-O2", "-shared", "-fPIC", str(c_export.NATIVE_KERNELS_DIR / "conv2d_s8.c"), "-o",
                    str(library)], check=True)
    return ctypes.CDLL(str(library))


def run_kernel(library, conv: fixed_point.FixedPointConv, codes: np.ndarray) -> np.ndarray:
    arrays = fixed_point.native_arguments(conv)
    geometry = arrays["geometry"]
    scratch = np.zeros((c_export.NATIVE_SCRATCH_PER_TAP + geometry[3] + geometry[3] % 2) * geometry[-1], np.int16)
    output = np.zeros(conv.out_shape, conv.out_dtype)
    pointer = ctypes.c_void_p
    status = getattr(library, NATIVE_CONV)(*(pointer(a.ctypes.data) for a in (
        geometry, np.ascontiguousarray(codes), arrays["weights"], arrays["bias"], arrays["requant"], output, scratch)))
    assert status == 0
    return output


@pytest.mark.parametrize("in_dtype, out_dtype, in_zero, out_zero", [("uint8", "uint8", 131, 9), ("int8", "int8", -3, 4),
                                                                     ("uint8", "int8", 0, -20)])
@pytest.mark.parametrize("window, stride, padding, channels", [(3, 1, (1, 1, 1, 1), (3, 5)), (3, 2, (1, 1, 1, 1), (6, 4)),
                                                               (1, 1, (0, 0, 0, 0), (7, 3)), (7, 1, (3, 2, 1, 0), (2, 1))])
def test_native_kernel_matches_the_integer_reference(kernel_library, in_dtype, out_dtype, in_zero, out_zero, window,
                                                     stride, padding, channels):
    rng = np.random.default_rng(window * 10 + stride)
    in_c, out_c = channels
    in_h, in_w = 7, 9
    top, left, bottom, right = padding
    out_h, out_w = (in_h + top + bottom - window) // stride + 1, (in_w + left + right - window) // stride + 1
    lo, hi = fixed_point.QUANT_RANGE[in_dtype]
    conv = fixed_point.FixedPointConv(
        weights=rng.integers(-127, 128, (out_c, in_c, window, window)).astype(np.int8),
        bias=rng.integers(-5000, 5000, out_c), mantissa=rng.integers(1 << 30, 1 << 31, out_c),
        shift=rng.integers(36, 42, out_c), in_zero=in_zero, in_dtype=in_dtype, out_zero=out_zero, out_dtype=out_dtype,
        padding=padding, strides=(stride, stride), dilation=(1, 1), groups=1, in_shape=(1, in_c, in_h, in_w),
        out_shape=(1, out_c, out_h, out_w))
    assert fixed_point.native_kernel_applies(conv)
    codes = rng.integers(lo, hi + 1, conv.in_shape).astype(in_dtype)
    np.testing.assert_array_equal(run_kernel(kernel_library, conv, codes), reference_conv(conv, codes))


def test_multipliers_of_a_quarter_or_more_stay_with_tvm():
    conv = fixed_point.FixedPointConv(
        weights=np.ones((1, 1, 1, 1), np.int8), bias=np.zeros(1, np.int64), mantissa=np.array([1 << 30]),
        shift=np.array([32]), in_zero=0, in_dtype="uint8", out_zero=0, out_dtype="uint8", padding=(0, 0, 0, 0),
        strides=(1, 1), dilation=(1, 1), groups=1, in_shape=(1, 1, 2, 2), out_shape=(1, 1, 2, 2))
    assert not fixed_point.native_kernel_applies(conv)
    assert not fixed_point.native_kernel_applies(dataclasses.replace(conv, shift=np.array([40]), groups=2))


def test_classes_of_arm_mnemonics():
    expected = {"smlad": "multiply", "ldrd": "load_pair", "ldr.w": "load", "ldrsbne": "load", "strh.w": "store",
                "bne.n": "branch", "bl": "branch", "cbz": "branch", "push": "load_store_multiple",
                "vfma.f32": "fp_multiply_accumulate", "vdiv.f32": "fp_divide", "vldr": "fp_load_store",
                "vcvt.f32.s32": "fp_alu", "usat": "alu", "bics": "alu", "sdiv": "divide", "movge": "alu"}
    assert {m: classify(m) for m in expected} == expected
    assert set(expected.values()) <= set(INSTRUCTION_CLASSES)


def test_a_cycle_table_must_cover_every_instruction_class(tmp_path):
    config = targets.load_target("cortex-m4")
    broken = dataclasses.replace(config, mcu={**config.mcu, "cycles": {"alu": 1, "smlad": 1}})
    with pytest.raises(UserError, match="missing: .*branch.*unknown: smlad"):
        mcu_part(broken)
    negative = dataclasses.replace(config, mcu={**config.mcu, "cycles": dict.fromkeys(INSTRUCTION_CLASSES, 0)})
    with pytest.raises(UserError, match="positive"):
        mcu_part(negative)
