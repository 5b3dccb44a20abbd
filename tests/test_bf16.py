"""compile/bf16.py: bf16 Winograd products on AVX-512 BF16 agree with torch at bf16's accuracy, build
only where the CPU has them, and reach a benchmark record as the `tvm-bf16` runtime."""

from __future__ import annotations

import contextlib
import ctypes
import subprocess
from pathlib import Path

import numpy as np
import pytest
import torch
import tvm
from tvm import relax

import targets
from bench.run import bench_model
from compile import TILES_ATTR, bf16
from compile.artifacts import NotBuildable, build_artifact
from compile.int8 import amx as int8_amx
from compile.pipeline import relax_for_target
from compile.torch_import import torch_to_relax
from compile.passes import float_lanes, prepare
from compile.schedules.bf16_conv import bf16_direct_convs
from compile.schedules.winograd import ALPHA, data_transform, winograd_convs
from conftest import model_under_test
from errors import UserError
from targets.config import host_cpu_flags

HOST_HAS_BF16 = {"avx512f", "avx512_bf16"} <= host_cpu_flags()
HOST_HAS_AMX_BF16 = {"amx_tile", "amx_bf16"} <= host_cpu_flags()
needs_bf16 = pytest.mark.skipif(not HOST_HAS_BF16, reason="this CPU has no AVX-512 BF16 to run the kernels")
RULES = targets.BenchRules(threads=1, warmup=1, samples=3, min_duration_s=0.0)
# bf16 keeps 8 mantissa bits (2^-9 relative rounding), and F(4x4, 3x3)'s output transform multiplies
# by up to 8 per side: one conv lands within ~3% of its output range, 10x a direct bf16 conv's error.
WINOGRAD_BF16_TOLERANCE = 0.05


def bf16_values(bits: np.ndarray) -> np.ndarray:
    return (bits.astype(np.uint32) << 16).view(np.float32)


def pair_words(values: np.ndarray, axis: int) -> np.ndarray:
    """float32 -> uint32 words of bf16 pairs of adjacent entries along `axis` (the even one in the low
    half), as the blocks read their operands."""
    bits = np.ascontiguousarray(np.moveaxis(bf16.bf16_bits(values), axis, -1))
    return np.ascontiguousarray(np.moveaxis(bits.view(np.uint32), -1, axis))


def library(mod: tvm.IRModule, target: tvm.target.Target, tmp_path) -> tvm.runtime.Module:
    path = tmp_path / "lib.so"
    tvm.compile(mod, target).export_library(str(path), options=[str(bf16.kernel_object(tmp_path))])
    return tvm.runtime.load_module(str(path))


@pytest.fixture(scope="module")
def bf16_target():
    return targets.resolve(targets.load_target("host"), isa_level="avx512bf16").tvm_target


def test_rounding_is_to_nearest_even_like_torch():
    rng = np.random.default_rng(0)
    values = np.concatenate([rng.standard_normal(10_000).astype(np.float32) * 10 ** rng.uniform(-8, 8, 10_000),
                             bf16_values(np.arange(0, 0x7F00, 7, dtype=np.uint16)) * np.float32(1 + 2 ** -8)])  # ties
    expected = torch.from_numpy(values).bfloat16().view(torch.int16).numpy().view(np.uint16)
    np.testing.assert_array_equal(bf16.bf16_bits(values), expected)


@needs_bf16
@pytest.mark.parametrize("batch, rows, channels, columns", [(36, 64, 64, 64), (3, 13, 18, 37), (1, 8, 2, 5)])
def test_products_block_multiplies_bf16_pairs_in_float32(batch, rows, channels, columns, bf16_target, tmp_path):
    """Rows that are not whole blocks of 8 and columns that are not whole vectors of 16 (masked tails)."""
    rng = np.random.default_rng(1)
    u = rng.standard_normal((batch, rows, channels)).astype(np.float32)
    v = rng.standard_normal((batch, channels, columns)).astype(np.float32)
    func = bf16.products(batch, rows, channels, columns).with_attr("global_symbol", "products")
    m = tvm.runtime.tensor(np.full((batch, rows, columns), np.nan, np.float32))
    library(tvm.IRModule({"products": func}), bf16_target, tmp_path)["products"](
        tvm.runtime.tensor(bf16.pack_rows(u)), tvm.runtime.tensor(pair_words(v, axis=1)), m)
    expected = np.einsum("bkc,bct->bkt", bf16_values(bf16.bf16_bits(u)).astype(np.float64),
                         bf16_values(bf16.bf16_bits(v)).astype(np.float64))
    np.testing.assert_allclose(m.numpy(), expected, rtol=0, atol=1e-4 * np.abs(expected).max())


def _emulated_amx_block(tmp_path, name: str, pointers: int, scalars: int) -> ctypes.CDLL:
    """A block of gemm_bf16.c built with its tile instructions in C (tests/amx_emulation.h): the AMX
    blocks' layouts, chunks and tails checked on any CPU with AVX-512 BF16 (the products' column tail)."""
    library_path = tmp_path / "gemm_bf16_emulated.so"
    if not library_path.exists():
        subprocess.run(["gcc", "-O2", "-mavx512f", "-mavx512bf16", "-fPIC", "-shared", "-DLWGAN_AMX_EMULATED",
                        f"-I{Path(__file__).parent}", str(bf16.KERNEL_SOURCE), "-o", str(library_path)], check=True)
    block = getattr(ctypes.CDLL(str(library_path)), name)
    block.restype = ctypes.c_int32
    block.argtypes = [ctypes.c_void_p] * pointers + [ctypes.c_int64] * scalars
    return block


@needs_bf16
@pytest.mark.parametrize("batch, rows, channels, columns", [
    (2, 64, 64, 64),  # whole blocks: sums stored straight into m
    (3, 40, 96, 77),  # 3 tile products per chunk; a last block of 8 rows (through its buffer); a 13-column tail
    (1, 16, 32, 20),  # fewer columns than a chunk: all on the AVX-512 block
])
def test_amx_products_block_in_emulation_multiplies_bf16_pairs_in_float32(batch, rows, channels, columns, tmp_path):
    block = _emulated_amx_block(tmp_path, bf16.AMX_BLOCK_FUNCTION, 3, 6)
    rng = np.random.default_rng(4)
    u = rng.standard_normal((batch, rows, channels)).astype(np.float32)
    v = rng.standard_normal((batch, channels, columns)).astype(np.float32)
    u_words = bf16.pack_rows(u, on_tiles=True)
    v_words = pair_words(v, axis=1)
    m = np.full((batch, rows, columns), np.nan, np.float32)
    rows_padded = u_words.shape[1]
    assert rows_padded % bf16.AMX_BLOCK_ROWS == 0
    for item in range(batch):
        for row0 in range(0, rows, bf16.AMX_BLOCK_ROWS):
            assert block(u_words.ctypes.data, v_words.ctypes.data, m.ctypes.data, item, row0, rows, rows_padded,
                         channels // 2, columns) == 0
    expected = np.einsum("bkc,bct->bkt", bf16_values(bf16.bf16_bits(u)).astype(np.float64),
                         bf16_values(bf16.bf16_bits(v)).astype(np.float64))
    np.testing.assert_allclose(m, expected, rtol=0, atol=1e-5 * np.abs(expected).max())


@needs_bf16
@pytest.mark.parametrize("channels, out_channels, kernel, height, width", [
    (64, 64, 3, 5, 50),  # 2 pair blocks, 2 channel blocks; 48 columns: a chunk of two tiles, then one of one
    (32, 32, 1, 2, 16),  # a 1x1 conv: one pair block, one channel block, one 16-column tile
])
def test_amx_conv_block_in_emulation_is_a_conv_of_bf16_operands(channels, out_channels, kernel, height, width,
                                                                tmp_path):
    block = _emulated_amx_block(tmp_path, bf16.AMX_CONV_BLOCK.function, 4, 11)
    rng = np.random.default_rng(5)
    x = rng.standard_normal((channels, height, width)).astype(np.float32)  # already padded (packing pads)
    weight = rng.standard_normal((out_channels, channels, kernel, kernel)).astype(np.float32)
    bias = rng.standard_normal(out_channels).astype(np.float32)
    out_h, out_w = height - kernel + 1, width - kernel + 1
    assert bf16.conv_block(out_channels, out_h, out_w, channels, 1, on_tiles=True) == bf16.AMX_CONV_BLOCK
    x_words = pair_words(x, axis=0)
    w_words = bf16.packed_conv_weight(weight, bf16.AMX_CONV_BLOCK)
    out = np.full((out_channels, out_h, out_w), np.nan, np.float32)
    for k_block in range(out_channels // bf16.AMX_BLOCK_ROWS):
        for oy in range(out_h):
            assert block(x_words.ctypes.data, w_words.ctypes.data, bias.ctypes.data, out.ctypes.data, k_block, oy,
                         out_channels, channels // 2, kernel, kernel, 1, height, width, out_h, out_w) == 0
    expected = torch.nn.functional.conv2d(
        torch.from_numpy(bf16_values(bf16.bf16_bits(x))[None].astype(np.float64)),
        torch.from_numpy(bf16_values(bf16.bf16_bits(weight)).astype(np.float64)),
        torch.from_numpy(bias.astype(np.float64)))[0].numpy()
    np.testing.assert_allclose(out, expected, rtol=0, atol=1e-5 * np.abs(expected).max())


@pytest.mark.parametrize("channels, stride, on_tiles", [(64, 1, True), (48, 1, False), (64, 2, False)])
def test_an_amx_bf16_build_runs_stride_1_direct_convs_on_tiles_where_channels_fill_them(channels, stride, on_tiles,
                                                                                       amx_bf16_error):
    """Built for the amx level on any x86 host; run against torch where the CPU has the tiles or
    AVX-512 BF16 (emulated tiles)."""
    amx_target = targets.resolve(targets.load_target("host"), isa_level="amx").tvm_target
    torch.manual_seed(0)
    net = torch.nn.Conv2d(channels, 32, 2, stride=stride).eval()  # 2x2: a sub-pixel phase, not Winograd's
    shape = (1, channels, 17, 65 if stride == 1 else 66)  # 64-wide (stride 1) or 32-wide output rows
    mod, rewritten = bf16_direct_convs(torch_to_relax(net, shape, "conv"), on_tiles=bf16.tiles_available(amx_target))
    kernels = [f for f in mod.functions.values() if isinstance(f, tvm.tirx.PrimFunc) and
               f.attrs is not None and f.attrs.get("global_symbol") is None and "lwgan.bf16" in f.attrs]
    assert rewritten == 1 and [f.attrs.get(TILES_ATTR) == "bf16" for f in kernels if "lwgan.conv_macs" in f.attrs] == \
        [on_tiles]
    error = amx_bf16_error(mod, amx_target, net, shape)
    assert error is None or error < 0.02


@pytest.mark.parametrize("channels, on_tiles", [(64, True), (48, False)])
def test_an_amx_bf16_build_multiplies_winograd_products_on_tiles_where_channels_fill_them(channels, on_tiles,
                                                                                          amx_bf16_error):
    """Built for the amx level on any x86 host (the library links); run and checked against torch where
    the CPU has the tiles or AVX-512 BF16 (emulated tiles)."""
    amx_target = targets.resolve(targets.load_target("host"), isa_level="amx").tvm_target
    torch.manual_seed(0)
    net = torch.nn.Sequential(torch.nn.Conv2d(channels, 32, 3), torch.nn.ReLU()).eval()
    shape = (1, channels, 34, 66)  # 8 x 16 tiles: 4 chunks of 32 columns
    mod, _ = winograd_convs(torch_to_relax(net, shape, "conv"), float_lanes(amx_target), bf16_products=True,
                            bf16_tiles=bf16.tiles_available(amx_target))
    names = [gv.name_hint for gv in mod.get_global_vars()]
    assert ("winograd_products_amx_bf16" in names) == on_tiles and ("winograd_products_bf16" in names) != on_tiles
    error = amx_bf16_error(mod, amx_target, net, shape)
    assert error is None or 1e-4 < error < WINOGRAD_BF16_TOLERANCE


@pytest.fixture
def amx_bf16_error(monkeypatch, tmp_path):
    """error(mod, target, net, shape): a module built for the amx level (after this fixture) linked and
    run, its largest error against torch over the output's range. On the tiles where this CPU has
    AMX-BF16; on a CPU with AVX-512 BF16 only, with gemm_bf16.c's tile instructions in C
    (tests/amx_emulation.h) and no request for tile state. None on other CPUs, where building and
    linking the library is what a test checks."""
    kernels = None
    if not HOST_HAS_AMX_BF16 and HOST_HAS_BF16:
        monkeypatch.setattr(int8_amx, "tile_state_granted", contextlib.nullcontext)
        kernels = tmp_path / "gemm_bf16_emulated.o"
        subprocess.run(["gcc", *bf16.COMPILER_FLAGS, "-DLWGAN_AMX_EMULATED", f"-I{Path(__file__).parent}",
                        str(bf16.KERNEL_SOURCE), "-o", str(kernels)], check=True)

    def error(mod: tvm.IRModule, target: tvm.target.Target, net: torch.nn.Module, shape: tuple[int, ...]):
        if kernels is None:
            lib = library(mod, target, tmp_path)
        else:
            path = tmp_path / "emulated.so"
            tvm.compile(mod, target).export_library(str(path), options=[str(kernels)])
            lib = tvm.runtime.load_module(str(path))
        if not (HOST_HAS_AMX_BF16 or HOST_HAS_BF16):
            return None
        x = np.random.default_rng(1).standard_normal(shape).astype("float32")
        got = relax.VirtualMachine(lib, tvm.cpu())["main"](tvm.runtime.tensor(x)).numpy()
        with torch.inference_mode():
            expected = net(torch.from_numpy(x)).numpy()
        return float(np.abs(got - expected).max() / np.abs(expected).max())

    return error


def test_reflected_data_transform_is_the_transform_of_the_padded_input(bf16_target):
    shape = (2, 4, 16, 32)  # 8 tiles a row; 2 channel pairs
    x = np.random.default_rng(3).standard_normal(shape).astype(np.float32)
    padded = np.pad(x, ((0, 0), (0, 0), (1, 1), (1, 1)), mode="reflect")
    tiles = 2 * 4 * 8
    for paired, dtype, channels in ((False, "float32", 4), (True, "uint32", 2)):
        outputs = []
        for source, reflected in ((padded, False), (x, True)):
            func = data_transform(*source.shape, bf16_pairs=paired, reflected=reflected)
            out = tvm.runtime.tensor(np.zeros((ALPHA * ALPHA, channels, tiles), dtype))
            tvm.compile(tvm.IRModule({"transform": func.with_attr("global_symbol", "transform")}), bf16_target)[
                "transform"](tvm.runtime.tensor(source), out)
            outputs.append(out.numpy())
        np.testing.assert_array_equal(outputs[1], outputs[0])


def test_bf16_data_transform_is_the_float_transform_rounded_and_paired(bf16_target):
    shape = (2, 6, 18, 34)  # 4 x 8 tiles per item; 3 channel pairs
    x = np.random.default_rng(2).standard_normal(shape).astype(np.float32)
    tiles = 2 * 4 * 8
    outputs = {}
    for paired, dtype, channels in ((False, "float32", 6), (True, "uint32", 3)):
        func = data_transform(*shape, bf16_pairs=paired).with_attr("global_symbol", "transform")
        out = tvm.runtime.tensor(np.zeros((ALPHA * ALPHA, channels, tiles), dtype))
        tvm.compile(tvm.IRModule({"transform": func}), bf16_target)["transform"](tvm.runtime.tensor(x), out)
        outputs[paired] = out.numpy()
    halves = outputs[True].view(np.uint16).reshape(ALPHA * ALPHA, 3, tiles, 2).transpose(0, 1, 3, 2)
    np.testing.assert_array_equal(halves.reshape(ALPHA * ALPHA, 6, tiles), bf16.bf16_bits(outputs[False]))


@needs_bf16
@pytest.mark.parametrize("batch, channels, out_channels, height, width, padding", [
    (1, 64, 64, 66, 18, 0),  # a trunk conv after its reflection pad
    (2, 32, 44, 20, 64, 1),  # batch, zero padding, output channels not whole blocks of 8
])
def test_winograd_conv_with_bf16_products_matches_torch(batch, channels, out_channels, height, width, padding,
                                                       bf16_target, tmp_path):
    torch.manual_seed(0)
    net = torch.nn.Sequential(torch.nn.Conv2d(channels, out_channels, 3, padding=padding), torch.nn.ReLU()).eval()
    shape = (batch, channels, height, width)
    mod, rewritten = winograd_convs(torch_to_relax(net, shape, "conv"), float_lanes(bf16_target), bf16_products=True)
    assert rewritten == 1 and "winograd_products_bf16" in [gv.name_hint for gv in mod.get_global_vars()]
    x = np.random.default_rng(1).standard_normal(shape).astype("float32")
    got = relax.VirtualMachine(library(mod, bf16_target, tmp_path), tvm.cpu())["main"](tvm.runtime.tensor(x)).numpy()
    with torch.inference_mode():
        expected = net(torch.from_numpy(x)).numpy()
    error = np.abs(got - expected).max() / np.abs(expected).max()
    assert 1e-4 < error < WINOGRAD_BF16_TOLERANCE  # rounded to bf16 (an fp32 build is ~1e-6), and not wrong


@pytest.mark.parametrize("channels", [33, 256])  # odd: no whole pairs; wide: the teacher's trunk lost 21 dB
def test_odd_and_wide_convs_keep_float32_products(channels):
    net = torch.nn.Conv2d(channels, 32, 3, padding=1).eval()
    mod, rewritten = winograd_convs(torch_to_relax(net, (1, channels, 32, 32), "conv"), 16, bf16_products=True)
    names = [gv.name_hint for gv in mod.get_global_vars()]
    assert rewritten == 1 and "winograd_products" in names and "winograd_products_bf16" not in names


def _op_names(mod: tvm.IRModule) -> list[str]:
    return [binding.value.op.name for func in mod.functions.values() if isinstance(func, relax.Function)
            for block in func.body.blocks for binding in block.bindings
            if isinstance(binding.value, relax.Call) and isinstance(binding.value.op, tvm.ir.Op)]


@needs_bf16
@pytest.mark.parametrize("channels, out_channels, kernel, stride, padding, height, width, bias", [
    (3, 16, 7, 1, 3, 32, 40, True),  # a generator's RGB stem; 40 columns: one whole vector of 32 and a tail
    (16, 32, 3, 2, 1, 64, 64, True),  # a downsampling conv
    (33, 20, 3, 2, 1, 17, 70, False),  # odd channels (a zero channel pads the last pair), 20 = 2.5 blocks, odd sizes
    (64, 64, 1, 1, 0, 8, 40, True),  # 1x1
    (16, 3, 7, 1, 3, 16, 70, True),  # an RGB output layer: the 4-channel block, 64 columns and a tail
    (64, 32, 4, 2, 1, 32, 32, True),  # a U-Net's downsampling to 16-column rows, one a vector
    (16, 16, 3, 1, 1, 16, 16, True),  # 16 columns, stride 1
    (40, 16, 2, 1, 0, 9, 9, True),  # a sub-pixel phase's 2x2 conv to 8 columns: two rows in each vector
    (32, 20, 3, 2, 1, 16, 16, False),  # 8 columns at stride 2; 20 channels = 2.5 blocks
    (128, 128, 4, 2, 1, 8, 8, True),  # a U-Net's inner downsampling to 4x4: channels in the lanes, 8 pixels a call
    (256, 64, 2, 1, 0, 3, 3, True),  # a sub-pixel phase to 2x2: 4 pixels a call
    (128, 128, 4, 2, 1, 2, 2, False),  # the innermost layer: one pixel
    (96, 32, 3, 1, 1, 3, 5, True),  # 3x5 outputs: 15 pixels, one a call
])
def test_direct_bf16_conv_is_torch_on_bf16_operands(channels, out_channels, kernel, stride, padding, height, width,
                                                   bias, bf16_target, tmp_path):
    """Products of bf16 values are exact in float32, so the block equals torch's conv of the operands
    rounded to bf16, up to the order of the float32 sums; the bias add joins the conv."""
    torch.manual_seed(0)
    conv = torch.nn.Conv2d(channels, out_channels, kernel, stride=stride, padding=padding, bias=bias)
    net = torch.nn.Sequential(conv, torch.nn.ReLU()).eval()
    shape = (2, channels, height, width)
    mod, rewritten = bf16_direct_convs(torch_to_relax(net, shape, "conv"))
    assert rewritten == 1 and "relax.nn.conv2d" not in _op_names(mod) and "relax.add" not in _op_names(mod)
    x = np.random.default_rng(1).standard_normal(shape).astype("float32")
    got = relax.VirtualMachine(library(mod, bf16_target, tmp_path), tvm.cpu())["main"](tvm.runtime.tensor(x)).numpy()
    with torch.inference_mode():
        expected = torch.relu(torch.nn.functional.conv2d(
            torch.from_numpy(x).bfloat16().float(), conv.weight.bfloat16().float(), conv.bias, stride=stride,
            padding=padding)).numpy()
    assert np.abs(got - expected).max() <= 1e-6 * np.abs(expected).max()


@needs_bf16
def test_sub_pixel_phases_of_a_transposed_conv_run_as_bf16_blocks(bf16_target, tmp_path):
    """A transposed conv's four 64-wide RGB phases, their weights constants of their own, run on the bf16
    block (and agree with torch)."""
    torch.manual_seed(0)
    net = torch.nn.Sequential(torch.nn.ConvTranspose2d(32, 3, 4, stride=2, padding=1), torch.nn.Tanh()).eval()
    model = model_under_test(net, (1, 32, 64, 64), "bf16-phases", cache=tmp_path)  # phases 64 wide
    host = targets.resolve(targets.load_target("host"), isa_level="avx512bf16")
    mod, rewritten = bf16_direct_convs(relax_for_target(model, host)())
    assert rewritten == 4 and "relax.nn.conv2d" not in _op_names(mod)
    x = np.random.default_rng(3).standard_normal(model.input_shape).astype("float32")
    got = relax.VirtualMachine(library(mod, bf16_target, tmp_path), tvm.cpu())["main"](tvm.runtime.tensor(x)).numpy()
    with torch.inference_mode():
        expected = net(torch.from_numpy(x)).numpy()
    assert 1e-4 < np.abs(got - expected).max() < 2e-2  # rounded to bf16, and right


@needs_bf16
@pytest.mark.parametrize("kernel, output_padding, fused_in_bf16", [(3, 1, False), (4, 0, True)])
def test_bf16_builds_fuse_transposed_convs_only_where_winograd_multiplies_less(kernel, output_padding, fused_in_bf16):
    """A CycleGAN's 3x3 stride-2 layer costs the same products fused (Winograd) as in phases, so a bf16
    build runs its phases as direct blocks; a U-Net's 4x4 one stays fused. fp32 builds fuse both."""
    net = torch.nn.Sequential(torch.nn.ConvTranspose2d(32, 16, kernel, stride=2, padding=1,
                                                   output_padding=output_padding)).eval()
    model = model_under_test(net, (1, 32, 32, 32), f"convt{kernel}")
    host = targets.resolve(targets.load_target("host"), isa_level="avx512bf16")
    convs = {precision: _op_names(relax_for_target(model, host, precision)()).count("relax.nn.conv2d")
             for precision in ("fp32", "bf16")}
    assert convs == {"fp32": 1, "bf16": 1 if fused_in_bf16 else 4}


def test_a_bf16_build_writes_the_zero_pads_of_sub_pixel_phases_in_their_packing():
    """A phase's zero pad becomes its conv's padding before the bf16 rewrite, so the block's input
    packing writes it: no pad kernel of its own (a U-Net bf16 build ran 0.85-0.91x the time)."""
    net = torch.nn.Sequential(torch.nn.ConvTranspose2d(32, 16, 3, stride=2, padding=1, output_padding=1)).eval()
    model = model_under_test(net, (1, 32, 32, 32), "convt3")
    host = targets.resolve(targets.load_target("host"), isa_level="avx512bf16")
    kernels = [gv.name_hint for gv in prepare(relax_for_target(model, host, "bf16")(), host.tvm_target).get_global_vars()]
    assert sum(name.startswith("bf16_conv2d") for name in kernels) >= 2  # the phases are bf16 blocks (shared)
    assert not [name for name in kernels if name.startswith("pad")]


def test_narrow_grouped_dilated_and_stride_3_convs_stay_float32():
    """Rows narrower than a block's columns would leave lanes idle (32; 64 for RGB outputs' block), unless
    whole rows fill its vectors (16 or 8 columns, as many rows as a block takes) or, in rows of fewer than
    8 columns, output channels in 32s do."""
    for conv, shape in [(torch.nn.Conv2d(16, 3, 7, padding=3), (1, 16, 32, 32)),
                        (torch.nn.Conv2d(16, 16, 3, padding=1), (1, 16, 12, 12)),
                        (torch.nn.Conv2d(16, 16, 3, padding=1), (1, 16, 6, 8)),
                        (torch.nn.Conv2d(16, 48, 3, padding=1), (1, 16, 4, 4)),
                        (torch.nn.Conv2d(16, 16, 3, padding=1, groups=2), (1, 16, 32, 32)),
                        (torch.nn.Conv2d(16, 16, 3, padding=2, dilation=2), (1, 16, 32, 32)),
                        (torch.nn.Conv2d(16, 16, 3, stride=3), (1, 16, 33, 33))]:
        mod, rewritten = bf16_direct_convs(torch_to_relax(conv.eval(), shape, "conv"))
        assert rewritten == 0 and "relax.nn.conv2d" in _op_names(mod)


class Trunk(torch.nn.Module):
    """A generator's shape in small: 7x7 in, two residual 3x3 convs at 32x32 (64 Winograd tiles), 7x7 out."""

    def __init__(self) -> None:
        super().__init__()
        self.stem = torch.nn.Conv2d(3, 32, 7, padding=3)
        self.blocks = torch.nn.Sequential(*(torch.nn.Sequential(torch.nn.ReflectionPad2d(1), torch.nn.Conv2d(32, 32, 3),
                                                                torch.nn.InstanceNorm2d(32), torch.nn.ReLU())
                                            for _ in range(2)))
        self.head = torch.nn.Conv2d(32, 3, 7, padding=3)

    def forward(self, x):
        y = torch.relu(self.stem(x))
        return torch.tanh(self.head(y + self.blocks(y)))


@needs_bf16
def test_bench_records_the_bf16_build_beside_fp32_with_its_psnr(tmp_path):
    torch.manual_seed(0)
    model = model_under_test(Trunk().eval(), (1, 3, 32, 32), "bf16-trunk", cache=tmp_path)
    host = targets.resolve(targets.load_target("host"), isa_level="avx512bf16")
    records = {r.runtime: r for r in bench_model(model, host, "bf16", ("tvm", "tvm-bf16"), RULES,
                                                  report=lambda _: None, roofline=True)}
    fp32, rounded = records["tvm"], records["tvm-bf16"]
    assert (fp32.executed_precision, rounded.executed_precision) == ("fp32", "bf16")
    assert rounded.valid and rounded.min_output_psnr_db == 40.0
    assert 40.0 <= rounded.output_psnr_db < fp32.output_psnr_db  # rounded, within the bf16 rule
    assert rounded.db_hash == fp32.db_hash and rounded.artifact_bytes > 0
    # The roofline judges the bf16 products against the vdpbf16ps peak measured beside the FMA one.
    assert rounded.bf16_peak_gflops > 0 and fp32.bf16_peak_gflops is None
    products = [k for k in rounded.kernel_profile if k["kernel"].startswith("winograd_products_bf16")]
    assert products and all(k["peak"] == "bf16" and k["gflop"] > 0 for k in products)
    assert products[0]["peak_fraction"] == pytest.approx(products[0]["gflops"] / rounded.bf16_peak_gflops)
    assert not any(k["kernel"].startswith("winograd_products_bf16") for k in fp32.kernel_profile)


def test_without_a_bf16_level_the_record_says_so_and_the_build_refuses(tmp_path):
    model = model_under_test(Trunk().eval(), (1, 3, 32, 32), "bf16-trunk", cache=tmp_path)
    vnni = targets.resolve(targets.load_target("host"), isa_level="avx512vnni")
    with pytest.raises(NotBuildable, match="isa level avx512vnni has no AVX-512 BF16 or AMX-BF16"):
        build_artifact("tvm-bf16", model, vnni)
    with pytest.raises(UserError, match="bf16 needs AVX-512 BF16"):
        relax_for_target(model, vnni, "bf16")
    with pytest.raises(UserError, match="unknown build precision 'fp8'"):
        relax_for_target(model, vnni, "fp8")
    records = bench_model(model, vnni, "no-bf16", ("tvm-bf16",), RULES, report=lambda _: None)
    assert not records[0].valid and "has no AVX-512 BF16" in records[0].invalid_reason
