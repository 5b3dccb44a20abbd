"""compile/int8/lowering.py: QDQ convolutions as real integer kernels (exact int32 accumulation, tensorized on x86)."""

from __future__ import annotations

import contextlib
import dataclasses
import itertools
import subprocess
from pathlib import Path

import numpy as np
import onnx
import onnxruntime as ort
import pytest
import torch
import tvm
from torch import nn
from tvm import relax, tirx
from tvm.script.ir_builder import tirx as T

from compile import TILES_ATTR
from compile.int8 import amx as int8_amx
from compile.int8 import lowering
from compile.int8.packing import pack_input
from compile.int8.lowering import (
    IntegerConv,
    build_kernel,
    lower_quantized_convs,
    pack_weight,
    packed_input_shape,
    plan_kernel,
)
from compile.int8.intrinsics import (
    AVX2_DOT_8X2_I16,
    AVX2_DOT_8X4,
    AVX2_PIXELS_8X4,
    VNNI_DOT_16X4,
    VNNI_PIXELS_16X4,
    pairs_fit_int16,
)
from compile.onnx_import import onnx_to_relax
from compile.pipeline import from_onnx_file, relax_for_target
from compile.subjects import models_under_test
from lwgan_models.compression import quantize
from lwgan_models.compression.evaluate import psnr_db
from targets import load_target, resolve
from targets.config import host_cpu_flags

AVX2 = tvm.target.Target({"kind": "llvm", "mcpu": "x86-64-v3", "num-cores": 2})
VNNI = tvm.target.Target({"kind": "llvm", "mcpu": "x86-64-v4", "mattr": ["+avx512vnni"], "num-cores": 2})
# What this CPU has, from /proc/cpuinfo: `llvm_cpu_has_features` answers for the target it is given
# (one with +amx-tile "has" AMX on any machine), not for the CPU running the test.
HOST_FLAGS = host_cpu_flags()
HOST_HAS_AVX2 = {"avx2", "fma"} <= HOST_FLAGS
HOST_HAS_VNNI = {"avx512_vnni", "avx512bw"} <= HOST_FLAGS
AMX = tvm.target.Target({"kind": "llvm", "mcpu": "x86-64-v4", "mattr": ["+avx512vnni", "+amx-tile", "+amx-int8"],
                         "num-cores": 2})
HOST_HAS_AMX = {"amx_tile", "amx_int8"} <= HOST_FLAGS

pytestmark = pytest.mark.usefixtures("one_torch_thread")


def exact_accumulators(x: np.ndarray, conv: IntegerConv) -> np.ndarray:
    """sum x * w over the receptive field, in int64, with the zero point in the padding."""
    top, left, bottom, right = conv.padding
    padded = np.pad(x.astype(np.int64), ((0, 0), (0, 0), (top, bottom), (left, right)),
                    constant_values=conv.input_zero_point)
    _, _, out_h, out_w = conv.output_shape(x.shape)
    (stride_h, stride_w), weight = conv.strides, conv.weight.astype(np.int64)
    acc = np.zeros((x.shape[0], weight.shape[0], out_h, out_w), np.int64)
    for ky in range(weight.shape[2]):
        for kx in range(weight.shape[3]):
            window = padded[:, :, ky : ky + stride_h * out_h : stride_h, kx : kx + stride_w * out_w : stride_w]
            acc += np.einsum("nchw,oc->nohw", window, weight[:, :, ky, kx])
    return acc


def compiled(mod: tvm.IRModule, target: tvm.target.Target) -> tvm.runtime.Module:
    return tvm.compile(mod, target).mod


def run_kernel(conv: IntegerConv, x: np.ndarray, target: tvm.target.Target = AVX2, build=compiled):
    """`conv`'s kernel for `target`, built by `build(mod, target)` (a runtime module), run on `x`."""
    plan = plan_kernel(conv, x.shape, target)
    kernel = build_kernel(conv, x.shape, plan)
    functions = {"main": kernel.func.with_attr("global_symbol", "main")}
    if kernel.pack is not None:
        functions["pack"] = kernel.pack.with_attr("global_symbol", "pack")
        packed = tvm.runtime.tensor(np.zeros(packed_input_shape(conv, x.shape, plan), np.uint8))
    library = build(tvm.IRModule(functions), target)
    if kernel.pack is not None:
        library["pack"](tvm.runtime.tensor(x), packed)
    out = np.zeros(conv.output_shape(x.shape), conv.out_dtype)
    tensors = [packed if kernel.pack is not None else tvm.runtime.tensor(x),
               *(tvm.runtime.tensor(a) for a in (*kernel.constants, out))]
    library["main"](*tensors)
    return tensors[-1].numpy(), plan, library


def run_exactly(conv: IntegerConv, x: np.ndarray, target: tvm.target.Target, instruction: str | None,
                build=compiled):
    """Run `conv` (dequantizing epilogue, scale 1), check that `instruction` is in its code (unless
    None) and that it returns the exact int32 accumulators; returns the plan."""
    got, plan, library = run_kernel(conv, x, target, build)
    assert instruction is None or instruction in library.inspect_source("asm")  # really tensorized
    expected = exact_accumulators(x, conv) + conv.correction[None, :, None, None]
    assert np.abs(expected).max() < 2**24  # so float32 holds every accumulator exactly
    np.testing.assert_array_equal(got, expected.astype(np.float32))
    return plan


def make_conv(rng, channels, out_channels, kernel, strides=(1, 1), padding=(0, 0, 0, 0), weight_limit=63,
              requantize=False, multiplier=1.0, offset=0.0):
    weight = rng.integers(-weight_limit, weight_limit + 1, (out_channels, channels, *kernel)).astype(np.int8)
    return IntegerConv(
        weight=weight, strides=strides, padding=padding, input_zero_point=int(rng.integers(0, 256)),
        correction=rng.integers(-1000, 1000, out_channels).astype(np.int32),
        multiplier=np.full(out_channels, multiplier, np.float32), offset=np.full(out_channels, offset, np.float32),
        requantize=requantize,
    )


@pytest.mark.parametrize("strides, padding, height, width", [
    ((1, 1), (1, 1, 1, 1), 9, 16),  # MobileNet's depthwise 3x3: whole 16-pixel vectors
    ((2, 2), (1, 1, 1, 1), 9, 11),  # strided, odd width: scalar rows
    ((1, 1), (0, 2, 1, 0), 7, 6),  # asymmetric padding
])
def test_depthwise_kernels_accumulate_exactly_in_int32(strides, padding, height, width):
    rng = np.random.default_rng(5)
    conv = dataclasses.replace(make_conv(rng, 1, 24, (3, 3), strides, padding, weight_limit=127), depthwise=True)
    x = rng.integers(0, 256, (1, 24, height, width)).astype(np.uint8)
    got, plan, _ = run_kernel(conv, x, tvm.target.Target({"kind": "llvm", "num-cores": 2}))
    assert plan.layout == "depthwise"
    top, left, bottom, right = padding
    padded = np.pad(x.astype(np.int64), ((0, 0), (0, 0), (top, bottom), (left, right)),
                    constant_values=conv.input_zero_point)
    _, _, out_h, out_w = conv.output_shape(x.shape)
    expected = sum(padded[:, :, ky: ky + strides[0] * out_h: strides[0], kx: kx + strides[1] * out_w: strides[1]]
                   * conv.weight[None, :, 0, ky, kx, None, None].astype(np.int64) for ky in range(3) for kx in range(3))
    np.testing.assert_array_equal(got, (expected + conv.correction[None, :, None, None]).astype(np.float32))


SHAPES = [  # (C, OC, kernel, strides, padding (top, left, bottom, right), H, W, layout): what the generators contain
    (64, 64, (3, 3), (1, 1), (0, 0, 0, 0), 10, 12, "winograd"),  # residual block conv after reflection padding
    (65, 64, (3, 3), (1, 1), (1, 1, 1, 1), 6, 10, "winograd"),  # zero padding, channels not in whole pairs
    (32, 16, (3, 3), (1, 1), (1, 1, 1, 1), 6, 10, "channels"),  # too few channels for Winograd to pay
    (16, 8, (3, 3), (1, 1), (0, 0, 0, 0), 7, 9, "channels"),  # odd output size: no 2x2 tiles
    (3, 16, (7, 7), (1, 1), (0, 0, 0, 0), 13, 14, "channels"),  # stem: 3 channels are not a whole 4-group
    (16, 32, (3, 3), (2, 2), (1, 1, 1, 1), 9, 11, "channels"),  # strided downsampling with zero padding
    (8, 3, (2, 1), (1, 1), (0, 0, 1, 0), 6, 5, "pixels"),  # sub-pixel phase conv: asymmetric padding, 3 outputs
    (16, 3, (7, 7), (1, 1), (0, 0, 0, 0), 11, 40, "pixels"),  # RGB output layer
]
INTRINSIC_OF = {"winograd": AVX2_DOT_8X2_I16, "channels": AVX2_DOT_8X4, "pixels": AVX2_PIXELS_8X4}
INSTRUCTION_OF = {"winograd": "vpmaddwd", "channels": "vpmaddubsw", "pixels": "vpmaddubsw"}


@pytest.mark.skipif(not HOST_HAS_AVX2, reason="this CPU has no AVX2 to run the tensorized kernels")
@pytest.mark.parametrize("channels, out_channels, kernel, strides, padding, height, width, layout", SHAPES)
def test_tensorized_kernels_accumulate_exactly_in_int32(channels, out_channels, kernel, strides, padding, height,
                                                        width, layout):
    rng = np.random.default_rng(channels * 100 + out_channels)
    conv = make_conv(rng, channels, out_channels, kernel, strides, padding)  # dequantizing epilogue, scale 1
    x = rng.integers(0, 256, (1, channels, height, width), dtype=np.uint8)
    plan = run_exactly(conv, x, AVX2, INSTRUCTION_OF[layout])
    assert (plan.layout, plan.intrinsic) == (layout, INTRINSIC_OF[layout])


def test_weights_that_would_saturate_vpmaddubsw_run_as_exact_portable_integer_code():
    rng = np.random.default_rng(7)
    conv = make_conv(rng, 8, 8, (3, 3), strides=(2, 2), padding=(1, 1, 1, 1), weight_limit=127)
    conv.weight[0, :2, 0, 0] = 127  # one u8 pair reaches 255 * 254 > 32767 in int16
    assert not pairs_fit_int16(pack_weight(conv.weight, 8))
    x = np.full((1, 8, 7, 8), 255, np.uint8)
    x[0, :, 4:, 4:] = rng.integers(0, 256, (8, 3, 4))
    got, plan, _ = run_kernel(conv, x)
    assert plan.intrinsic is None
    np.testing.assert_array_equal(got, (exact_accumulators(x, conv) + conv.correction[None, :, None, None]))


@pytest.mark.skipif(not HOST_HAS_AVX2, reason="this CPU has no AVX2 to run the tensorized kernel")
def test_requantizing_epilogue_rounds_half_to_even_and_clamps_like_quantize_linear():
    rng = np.random.default_rng(3)
    # Power-of-two scales keep every float step exact, so numpy's arithmetic is the kernel's.
    conv = make_conv(rng, 64, 64, (3, 3), padding=(1, 1, 1, 1), requantize=True, multiplier=2.0**-9, offset=128.0)
    x = rng.integers(0, 256, (1, 64, 8, 8), dtype=np.uint8)
    got, plan, library = run_kernel(conv, x)
    assert plan.layout == "winograd"
    value = (exact_accumulators(x, conv) + conv.correction[None, :, None, None]) * 2.0**-9 + 128.0
    expected = np.clip(np.rint(value), 0, 255).astype(np.uint8)  # np.rint rounds half to even
    assert 0 < (expected == 0).sum() and 0 < (expected == 255).sum() and (np.modf(value)[0] == 0.5).any()
    np.testing.assert_array_equal(got, expected)
    # The QDQ graph's DequantizeLinear after it, fused: the same grid values, as floats.
    dequantized, _, _ = run_kernel(dataclasses.replace(conv, dequantize=(0.25, 3)), x)
    np.testing.assert_array_equal(dequantized, (expected.astype(np.float32) - 3) * 0.25)
    assert "vpmaddwd" in library.inspect_source("asm")  # really tensorized


VNNI_SHAPES = [  # (C, OC, kernel, strides, padding, H, W, layout)
    (64, 64, (3, 3), (1, 1), (1, 1, 1, 1), 10, 12, "channels"),  # residual conv: 3x3 runs direct on VNNI; 12 wide
    (3, 16, (7, 7), (1, 1), (0, 0, 0, 0), 13, 14, "channels"),  # stem
    (16, 32, (3, 3), (2, 2), (1, 1, 1, 1), 9, 11, "channels"),  # strided downsampling
    (16, 3, (7, 7), (1, 1), (0, 0, 0, 0), 11, 40, "pixels"),  # RGB output layer: 16 pixels per vector
    (8, 3, (2, 1), (1, 1), (0, 0, 1, 0), 6, 5, "pixels"),  # sub-pixel phase conv, fewer pixels than lanes
    (32, 24, (3, 3), (1, 1), (1, 1, 1, 1), 5, 64, "pixels"),  # rows of whole 32-pixel blocks: 3 blocks of 8 channels
    (3, 16, (7, 7), (1, 1), (0, 0, 0, 0), 8, 38, "pixels"),  # stem on 32-wide rows: 3 channels, one zero-filled group
    (16, 32, (3, 3), (2, 2), (1, 1, 1, 1), 9, 128, "pixels"),  # strided downsampling to 64-wide rows: column phases
    (16, 32, (3, 3), (2, 2), (1, 1, 1, 1), 9, 64, "channels"),  # ... to 32-wide rows: one block a row, channels
    (12, 8, (4, 4), (2, 2), (1, 1, 1, 1), 6, 128, "pixels"),  # a U-Net's 4x4 stride-2 conv, 64 wide, 3 groups
]
VNNI_INTRINSIC_OF = {"channels": VNNI_DOT_16X4, "pixels": VNNI_PIXELS_16X4}


@pytest.mark.skipif(not HOST_HAS_VNNI, reason="this CPU has no AVX-512 VNNI to run the kernels")
@pytest.mark.parametrize("channels, out_channels, kernel, strides, padding, height, width, layout", VNNI_SHAPES)
def test_vnni_kernels_accumulate_exactly_in_int32(channels, out_channels, kernel, strides, padding, height, width,
                                                  layout):
    rng = np.random.default_rng(channels * 100 + out_channels)
    # Full-range 8-bit weights: vpdpbusd adds in int32, so nothing can saturate.
    conv = make_conv(rng, channels, out_channels, kernel, strides, padding, weight_limit=127)
    x = rng.integers(0, 256, (1, channels, height, width), dtype=np.uint8)
    plan = run_exactly(conv, x, VNNI, "vpdpbusd")
    assert (plan.layout, plan.intrinsic) == (layout, VNNI_INTRINSIC_OF[layout])


def reference_packing(x: np.ndarray, packed_shape: tuple[int, ...], zero_point: int, top: int, left: int) -> np.ndarray:
    """`pack_input`'s layout by its definition: column w of phase p is input column w * phases + p - left."""
    n, channels, height, width = x.shape
    phases = packed_shape[3] if len(packed_shape) == 6 else 1
    groups, rows, columns = packed_shape[1], packed_shape[2], packed_shape[-2]
    planes = np.full((n, groups * 4, rows, phases, columns), zero_point, np.uint8)
    for p in range(phases):
        for w in range(columns):
            source = w * phases + p - left
            if 0 <= source < width:
                planes[:, :channels, top:top + height, p, w] = x[:, :, :rows - top, source]
    packed = planes.reshape(n, groups, 4, rows, phases, columns).transpose(0, 1, 3, 4, 5, 2)
    return packed.reshape(packed_shape)


@pytest.mark.parametrize("shape, packed_shape, top_left", [
    ((1, 16, 128, 128), (1, 4, 129, 2, 65, 4), (1, 1)),  # a stride-2 pixel kernel's column phases (resnet6)
    ((1, 32, 64, 64), (1, 8, 65, 66, 4), (1, 1)),  # the channel kernel's plain rows, zero-point border
    ((2, 6, 9, 37), (2, 3, 11, 2, 30, 4), (1, 2)),  # batch, 6 channels in 3 groups, odd width, past the row
    ((1, 3, 5, 40), (1, 1, 6, 1, 48, 4), (0, 0)),  # RGB: a zero-point fourth channel; whole tiles past the input
    ((1, 4, 3, 2), (1, 1, 5, 2, 4), (1, 3)),  # a row narrower than the left padding: all zero point
])
def test_pack_kernel_writes_the_direct_kernels_layout(shape, packed_shape, top_left, host_target):
    """Byte for byte the packed layout: 4 channels side by side, a row's column phases apart, and the
    zero point where the input ends (columns, rows, channels and groups past it)."""
    x = np.random.default_rng(1).integers(0, 256, shape, dtype=np.uint8)
    library = tvm.compile(tvm.IRModule({"main": pack_input(shape, packed_shape, 7, top_left)
                                        .with_attr("global_symbol", "main")}), host_target).mod
    packed = tvm.runtime.tensor(np.full(packed_shape, 99, np.uint8))
    library["main"](tvm.runtime.tensor(x), packed)
    np.testing.assert_array_equal(packed.numpy(), reference_packing(x, packed_shape, 7, *top_left))


def test_avx512_vnni_level_compiles_to_vpdpbusd():
    rng = np.random.default_rng(5)
    conv = make_conv(rng, 32, 32, (3, 3), padding=(1, 1, 1, 1), requantize=True, multiplier=1e-3)
    plan = plan_kernel(conv, (1, 32, 8, 8), VNNI)
    assert (plan.intrinsic, plan.lanes, plan.layout) == (VNNI_DOT_16X4, 16, "channels")
    kernel = build_kernel(conv, (1, 32, 8, 8), plan).func.with_attr("global_symbol", "main")
    assembly = tvm.compile(tvm.IRModule({"main": kernel}), VNNI).mod.inspect_source("asm")
    assert "vpdpbusd" in assembly and "vpmaddubsw" not in assembly
    rgb = make_conv(rng, 16, 3, (7, 7), requantize=True, multiplier=1e-3)  # fewer channels than lanes
    plan = plan_kernel(rgb, (1, 16, 14, 38), VNNI)
    assert (plan.intrinsic, plan.layout) == (VNNI_PIXELS_16X4, "pixels")
    kernel = build_kernel(rgb, (1, 16, 14, 38), plan).func.with_attr("global_symbol", "main")
    assembly = tvm.compile(tvm.IRModule({"main": kernel}), VNNI).mod.inspect_source("asm")
    assert "vpdpbusd" in assembly and "vpmaddubsw" not in assembly


AMX_SHAPES = [  # (C, OC, kernel, strides, padding, H, W, kernel columns folded into channels)
    (64, 64, (3, 3), (1, 1), (1, 1, 1, 1), 10, 12, False),  # residual conv: one 64-channel block, 12-pixel tiles
    (96, 32, (3, 3), (1, 1), (0, 0, 0, 0), 6, 34, False),  # 2 channel blocks (one part-filled), 2x2 output tiles
    (3, 16, (7, 7), (1, 1), (3, 3, 3, 3), 13, 16, True),  # stem: 3 channels x 7 columns fill 24 of 64 bytes
    (16, 32, (3, 3), (2, 2), (1, 1, 1, 1), 9, 32, True),  # strided downsampling
    (32, 16, (3, 3), (2, 2), (1, 1, 1, 1), 5, 96, True),  # 96 folded channels in 2 blocks; 16-column packing steps
    (128, 32, (2, 2), (1, 1), (1, 0, 0, 1), 8, 8, False),  # sub-pixel phase conv: asymmetric padding
]


TESTS = Path(__file__).resolve().parent


def _emulated_instruction(name: str, *args) -> None:
    T.evaluate(T.call_extern("void", f"lwgan_emulated_{name}", *args))


@pytest.fixture(params=[
    pytest.param("emulated", marks=pytest.mark.skipif(not HOST_HAS_VNNI, reason="this CPU has no AVX-512 VNNI to "
                                                                                 "run the amx level's other code")),
    pytest.param("tiles", marks=pytest.mark.skipif(not HOST_HAS_AMX, reason="this CPU has no AMX tiles to run the "
                                                                             "kernels")),
])
def amx_build(request, monkeypatch, tmp_path):
    """build(mod, target) -> runtime module, for the AMX kernels of compile/int8/amx.py: on the tiles
    where this CPU has them, and "emulated" on any CPU with AVX-512 VNNI (the rest of the amx level's
    code): the kernels are built with each tile instruction a call into tests/amx_calls.c (Intel's
    pseudo-code in C, exact like the tiles) and no request for tile state, and that file is linked in."""
    if request.param == "tiles":
        return compiled
    monkeypatch.setattr(int8_amx, "_llvm", _emulated_instruction)
    monkeypatch.setattr(int8_amx, "tile_state_granted", contextlib.nullcontext)
    calls = tmp_path / "amx_calls.o"
    subprocess.run(["gcc", "-O2", "-fPIC", "-c", f"-I{TESTS}", str(TESTS / "amx_calls.c"), "-o", str(calls)], check=True)
    libraries = itertools.count()

    def build(mod: tvm.IRModule, target: tvm.target.Target) -> tvm.runtime.Module:
        path = tmp_path / f"emulated{next(libraries)}.so"
        tvm.compile(mod, target).export_library(str(path), options=[str(calls)])
        return tvm.runtime.load_module(str(path))

    return build


@pytest.mark.parametrize("channels, out_channels, kernel, strides, padding, height, width, folded", AMX_SHAPES)
def test_amx_kernels_accumulate_exactly_in_int32(channels, out_channels, kernel, strides, padding, height, width,
                                                 folded, amx_build):
    rng = np.random.default_rng(channels * 100 + out_channels)
    conv = make_conv(rng, channels, out_channels, kernel, strides, padding, weight_limit=127)
    x = rng.integers(0, 256, (1, channels, height, width), dtype=np.uint8)
    plan = run_exactly(conv, x, AMX, "tdpbsud" if amx_build is compiled else None, amx_build)
    assert (plan.layout, plan.intrinsic) == ("amx", int8_amx.INTRINSIC)
    assert int8_amx.folds_columns(conv) == folded


def test_amx_requantizing_epilogue_matches_quantize_linear(amx_build):
    rng = np.random.default_rng(11)
    conv = make_conv(rng, 64, 32, (3, 3), padding=(1, 1, 1, 1), requantize=True, multiplier=2.0**-10, offset=128.0)
    x = rng.integers(0, 256, (1, 64, 8, 16), dtype=np.uint8)
    got, plan, _ = run_kernel(conv, x, AMX, amx_build)
    assert plan.layout == "amx" and got.dtype == np.uint8
    value = (exact_accumulators(x, conv) + conv.correction[None, :, None, None]) * 2.0**-10 + 128.0
    expected = np.clip(np.rint(value), 0, 255).astype(np.uint8)
    assert 0 < (expected == 0).sum() and 0 < (expected == 255).sum()
    np.testing.assert_array_equal(got, expected)


def test_amx_level_plans_tiles_only_where_they_fit():
    """Compiles anywhere (no AMX needed to build): tile kernels for whole 16-channel blocks and rows
    of tiles of at least 8 pixels; VNNI for the rest."""
    rng = np.random.default_rng(2)
    trunk = make_conv(rng, 64, 64, (3, 3), padding=(1, 1, 1, 1), requantize=True, multiplier=1e-3)
    plan = plan_kernel(trunk, (1, 64, 32, 32), AMX)
    assert (plan.layout, plan.intrinsic) == ("amx", int8_amx.INTRINSIC)
    kernel = build_kernel(trunk, (1, 64, 32, 32), plan).func.with_attr("global_symbol", "main")
    assembly = tvm.compile(tvm.IRModule({"main": kernel}), AMX).mod.inspect_source("asm")
    assert "tdpbsud" in assembly and "ldtilecfg" in assembly and "tilerelease" in assembly
    rgb = make_conv(rng, 16, 3, (7, 7), requantize=True, multiplier=1e-3)  # 3 output channels
    assert plan_kernel(rgb, (1, 16, 14, 38), AMX).layout == "pixels"
    odd = make_conv(rng, 64, 64, (3, 3), padding=(1, 1, 1, 1))  # a 17-pixel row: tiles of 1 pixel
    assert plan_kernel(odd, (1, 64, 17, 17), AMX).layout == "channels"
    assert not int8_amx.available(VNNI) and int8_amx.available(AMX)


class TinyGenerator(nn.Module):
    """Every construct the shipped generators quantize: reflection pad, stem, strided conv,
    transposed conv (exported as sub-pixel convs), instance norm, residual add, tanh."""

    def __init__(self) -> None:
        super().__init__()
        self.stem = nn.Sequential(nn.ReflectionPad2d(2), nn.Conv2d(3, 8, 5), nn.InstanceNorm2d(8, affine=True),
                                  nn.ReLU())
        self.down = nn.Sequential(nn.Conv2d(8, 64, 3, stride=2, padding=1), nn.InstanceNorm2d(64), nn.ReLU())
        self.block = nn.Sequential(nn.ReflectionPad2d(1), nn.Conv2d(64, 64, 3), nn.InstanceNorm2d(64))
        self.up = nn.Sequential(nn.ConvTranspose2d(64, 8, 3, stride=2, padding=1, output_padding=1),
                                nn.InstanceNorm2d(8), nn.ReLU(), nn.Conv2d(8, 3, 3, padding=1), nn.Tanh())

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = self.down(self.stem(x))
        return self.up(y + self.block(y))


@pytest.fixture(scope="module")
def qdq_file(tmp_path_factory):
    torch.manual_seed(0)
    net = TinyGenerator().eval()
    shape = (1, 3, 16, 16)
    calibration = [torch.rand(shape) * 2 - 1 for _ in range(3)]
    prepared = quantize.calibrate(quantize.prepare(net, calibration[0]), calibration)
    return quantize.export_qdq(prepared, shape, tmp_path_factory.mktemp("int8") / "tiny+ptq.onnx")


def psnr_against_qdq_reference(qdq_file, lowered: tvm.IRModule, target: tvm.target.Target, seed: int,
                               build=compiled) -> float:
    """PSNR of the lowered model built for `target` (by `build`) against the QDQ file run by ONNX
    Runtime's reference kernels (graph optimisations off), on a seeded input."""
    x = (np.random.default_rng(seed).random((1, 3, 16, 16), np.float32) * 2 - 1).astype(np.float32)
    got = relax.VirtualMachine(build(lowered, target), tvm.cpu())["main"](tvm.runtime.tensor(x)).numpy()
    options = ort.SessionOptions()
    options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_DISABLE_ALL
    reference = ort.InferenceSession(str(qdq_file), options, providers=["CPUExecutionProvider"]).run(None, {"x": x})[0]
    return psnr_db(torch.from_numpy(got), torch.from_numpy(reference))


def ops_in(mod: tvm.IRModule) -> set[str]:
    found = set()
    for _, func in mod.functions_items():
        if isinstance(func, relax.Function):
            relax.analysis.post_order_visit(
                func, lambda e: found.add(e.op.name) if isinstance(e, relax.Call) and isinstance(e.op, tvm.ir.Op)
                else None)
    return found


@pytest.mark.skipif(not HOST_HAS_AVX2, reason="this CPU has no AVX2 to run the tensorized kernels")
def test_qdq_model_runs_every_conv_as_an_integer_kernel_and_matches_the_qdq_reference(qdq_file):
    convs = sum(node.op_type == "Conv" for node in onnx.load(str(qdq_file)).graph.node)
    lowered, summary = lower_quantized_convs(onnx_to_relax(qdq_file), AVX2)
    assert (summary.integer_convs, summary.tensorized, summary.winograd) == (convs, convs, 1)
    assert summary.intrinsics == tuple(sorted(INTRINSIC_OF.values())) and summary.instance_norms == 4
    # No float convolution is left, and every conv output's DequantizeLinear went into its kernel.
    assert not {"relax.nn.conv2d", "relax.dequantize"} & ops_in(lowered)
    assert psnr_against_qdq_reference(qdq_file, lowered, AVX2, seed=0) >= 30.0


def assert_same_outputs(first: tvm.IRModule, second: tvm.IRModule, seed: int, target: tvm.target.Target = AVX2,
                        build=compiled, shape: tuple[int, ...] = (1, 3, 16, 16)) -> None:
    """Both modules, built for `target` by `build`, give bit for bit the same output on a seeded input,
    and a real spread of values, not one constant."""
    x = tvm.runtime.tensor((np.random.default_rng(seed).random(shape, np.float32) * 2 - 1).astype(np.float32))
    outputs = [relax.VirtualMachine(build(mod, target), tvm.cpu())["main"](x).numpy() for mod in (first, second)]
    np.testing.assert_array_equal(*outputs)
    assert outputs[0].std() > 0.05


def tir_calls(mod: tvm.IRModule) -> dict[relax.Var, relax.Call]:
    """Binding var -> kernel call, of `mod`'s main."""
    return {binding.var: binding.value for block in mod["main"].body.blocks for binding in block.bindings
            if isinstance(binding.value, relax.Call) and binding.value.op.name == "relax.call_tir"}


def packed_pads(mod: tvm.IRModule) -> dict[relax.Var, str]:
    """The vars of `mod`'s main a reflection pad writes as a uint8 tensor of more than 4 axes (a conv's
    packed input), with the kernel's name."""
    return {var: call.args[0].name_hint for var, call in tir_calls(mod).items()
            if len(call.ty.shape) > 4 and call.ty.dtype == "uint8" and call.args[0].name_hint.startswith("reflection_pad")}


def assert_pads_write_packed_inputs_and_no_output_changes(qdq_file, target, build, monkeypatch) -> list[tirx.PrimFunc]:
    """Both reflection pads (before the RGB stem and the residual conv) store the conv's packed layout,
    which the conv reads as is; the model's output is bit for bit the one of convs whose input a pack
    kernel (or an AMX kernel itself) packs. Returns the kernels that read a packed input."""
    lowered, _ = lower_quantized_convs(onnx_to_relax(qdq_file), target)
    pads = packed_pads(lowered)
    assert len(pads) == 2
    readers = [call.args[0] for call in tir_calls(lowered).values() if call.args[1].fields[0] in pads]
    assert len(readers) == 2 and all(gvar.name_hint.startswith("int8_conv2d") for gvar in readers)
    with monkeypatch.context() as patched:
        patched.setattr(lowering, "prepackable", lambda conv, plan: False)
        self_packing, _ = lower_quantized_convs(onnx_to_relax(qdq_file), target)
    assert not packed_pads(self_packing)
    assert_same_outputs(lowered, self_packing, seed=3, target=target, build=build)
    return [lowered[gvar] for gvar in readers]


@pytest.mark.skipif(not HOST_HAS_VNNI, reason="this CPU has no AVX-512 VNNI to run the kernels")
def test_reflection_pads_write_the_vnni_convs_packed_input_and_no_output_changes(qdq_file, monkeypatch):
    """The RGB stem's pixel kernel and the residual conv's channel kernel."""
    assert_pads_write_packed_inputs_and_no_output_changes(qdq_file, VNNI, compiled, monkeypatch)


@pytest.mark.skipif(not HOST_HAS_VNNI, reason="this CPU has no AVX-512 VNNI to run the VNNI kernels beside the tiles")
def test_reflection_pad_writes_the_amx_convs_packed_input_and_no_output_changes(qdq_file, amx_build, monkeypatch):
    """The residual conv on tiles (64 channels: unfolded) reads its pad's bytes as its B tiles' rows."""
    readers = assert_pads_write_packed_inputs_and_no_output_changes(qdq_file, AMX, amx_build, monkeypatch)
    assert sorted(str(kernel.attrs.get(TILES_ATTR)) for kernel in readers) == ["None", "int8"]


def test_instance_norms_read_the_convs_bytes_and_no_output_changes(qdq_file, monkeypatch):
    """An instance norm after a requantized conv reads the conv's uint8 output, dequantizing as it reads,
    where the conv would otherwise write its output dequantized to float32: the stem's, the strided
    conv's and the residual conv's norms; the output is bit for bit the same."""
    def uint8_norms(mod: tvm.IRModule) -> int:
        return sum(call.args[0].name_hint.startswith("fused_instance_norm") and call.args[1].fields[0].ty.dtype == "uint8"
                   for call in tir_calls(mod).values())

    lowered, _ = lower_quantized_convs(onnx_to_relax(qdq_file), AVX2)
    with monkeypatch.context() as patched:
        patched.setattr(lowering, "_sole_instance_norm", lambda *args: None)
        float_norms, _ = lower_quantized_convs(onnx_to_relax(qdq_file), AVX2)
    assert (uint8_norms(lowered), uint8_norms(float_norms)) == (3, 0)
    assert_same_outputs(lowered, float_norms, seed=4)


def test_a_pad_read_only_by_its_conv_copies_the_bytes_its_norm_quantized_and_no_output_changes(tmp_path, monkeypatch):
    """Between instance norm + ReLU and the next conv's reflection pad, the quantize moves into the norm's
    kernel, which then stores bytes that the pad copies into the conv's packed input; the stem's pad of the
    model's input still quantizes itself. Bit for bit the output of the pad quantizing floats."""
    torch.manual_seed(1)
    net = nn.Sequential(nn.ReflectionPad2d(1), nn.Conv2d(3, 8, 3), nn.InstanceNorm2d(8), nn.ReLU(),
                        nn.ReflectionPad2d(1), nn.Conv2d(8, 3, 3), nn.Tanh()).eval()
    shape = (1, 3, 16, 16)
    calibration = [torch.rand(shape) * 2 - 1 for _ in range(3)]
    qdq = quantize.export_qdq(quantize.calibrate(quantize.prepare(net, calibration[0]), calibration), shape,
                              tmp_path / "pair+ptq.onnx")

    def pad_inputs(mod: tvm.IRModule) -> list[str]:
        return sorted(str(call.args[1].fields[0].ty.dtype) for call in tir_calls(mod).values()
                      if call.args[0].name_hint.startswith("reflection_pad"))

    lowered, _ = lower_quantized_convs(onnx_to_relax(qdq), AVX2)
    with monkeypatch.context() as patched:
        patched.setattr(lowering, "_quantizes_before_pad", lambda *args: False)
        float_pads, _ = lower_quantized_convs(onnx_to_relax(qdq), AVX2)
    assert (pad_inputs(lowered), pad_inputs(float_pads)) == (["float32", "uint8"], ["float32", "float32"])
    assert_same_outputs(lowered, float_pads, seed=5, shape=shape)


def test_sub_pixel_phases_share_one_packing_and_no_output_changes(qdq_file, monkeypatch):
    """The transposed conv's four phase convs read one packed input (laid out for the 2x2 phase, the
    largest), where each had its own packing kernel; bit for bit the same output."""
    def readers_per_packing(mod: tvm.IRModule) -> list[int]:
        calls = tir_calls(mod)
        packings = [var for var, call in calls.items() if call.args[0].name_hint.startswith("int8_pack")]
        return sorted(sum(c.args[0].name_hint.startswith("int8_conv2d") and c.args[1].fields[0].same_as(var)
                          for c in calls.values()) for var in packings)

    lowered, _ = lower_quantized_convs(onnx_to_relax(qdq_file), AVX2)
    with monkeypatch.context() as patched:
        patched.setattr(lowering, "_shared_packings", lambda *args: {})
        apart, _ = lower_quantized_convs(onnx_to_relax(qdq_file), AVX2)
    # the strided conv's and the output conv's own packings; the phases': one, or one each
    assert (readers_per_packing(lowered), readers_per_packing(apart)) == ([1, 1, 4], [1] * 6)
    assert_same_outputs(lowered, apart, seed=6)


def test_qdq_model_on_a_cpu_without_dot_product_instructions_builds_and_matches_the_qdq_reference(qdq_file):
    """The portable integer kernels (any LLVM CPU: plain x86-64, a Cortex-A72). Their output conv was
    fused with the tanh after it and FuseTIR refused the pair; the kernels are opaque to fusion now."""
    portable = tvm.target.Target({"kind": "llvm", "mcpu": "x86-64", "num-cores": 2})
    lowered, summary = lower_quantized_convs(onnx_to_relax(qdq_file), portable)
    assert summary.integer_convs > 0 and summary.tensorized == 0
    assert psnr_against_qdq_reference(qdq_file, lowered, portable, seed=2) >= 30.0


@pytest.mark.skipif(not HOST_HAS_VNNI, reason="this CPU has no AVX-512 VNNI to run the VNNI kernels beside the tiles")
def test_qdq_model_on_amx_matches_the_qdq_reference(qdq_file, amx_build):
    lowered, summary = lower_quantized_convs(onnx_to_relax(qdq_file), AMX)
    # 64-channel convs (the strided one and the residual one) on tiles; 8- and 3-channel ones, fewer
    # than a tile's 16, with VNNI's pixel lanes
    assert summary.intrinsics == tuple(sorted((int8_amx.INTRINSIC, VNNI_PIXELS_16X4)))
    assert psnr_against_qdq_reference(qdq_file, lowered, AMX, seed=1, build=amx_build) >= 30.0


@pytest.mark.skipif(not HOST_HAS_VNNI, reason="this CPU has no AVX-512 VNNI to run the VNNI kernels beside the tiles")
def test_shipped_int8_variant_on_amx_matches_its_vnni_build_bit_for_bit(amx_build):
    """cyclegan-resnet6-ngf16+ptq as the pipeline builds it for the amx level (its stem and strided convs
    folded, the trunk reading its pads' packed input) and for avx512vnni: the same integer sums and
    epilogues, so the same output."""
    model = models_under_test("cyclegan-resnet6-ngf16+ptq", None, None, None, False)[0]
    x = tvm.runtime.tensor(np.random.default_rng(0).uniform(-1, 1, model.input_shape).astype(np.float32))
    outputs = {}
    for level, build in (("amx", amx_build), ("avx512vnni", compiled)):
        target = resolve(load_target("host"), isa_level=level)
        mod = relax_for_target(model, target)()
        tiled = [f for f in mod.functions.values() if isinstance(f, tirx.PrimFunc) and f.attrs.get(TILES_ATTR) == "int8"]
        assert (len(tiled) >= 5) == (level == "amx")  # stem, 2 strided, trunk, sub-pixel phases
        outputs[level] = relax.VirtualMachine(build(mod, target.tvm_target), tvm.cpu())["main"](x).numpy()
    np.testing.assert_array_equal(outputs["amx"], outputs["avx512vnni"])
    assert outputs["amx"].std() > 0.1


def test_pipeline_routes_int8_models_through_the_lowering_and_fp32_ones_past_it(qdq_file, tmp_path):
    host = resolve(load_target("host"))
    model = from_onnx_file(qdq_file)
    assert model.precision == "int8"
    assert "relax.nn.conv2d" not in ops_in(relax_for_target(model, host)())

    fp32_path = tmp_path / "fp32.onnx"
    torch.onnx.export(nn.Conv2d(3, 4, 3), (torch.rand(1, 3, 8, 8),), str(fp32_path), input_names=["x"], dynamo=False)
    fp32 = from_onnx_file(fp32_path)
    assert fp32.precision == "fp32" and "relax.nn.conv2d" in ops_in(relax_for_target(fp32, host)())
