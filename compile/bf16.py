"""bf16 as a precision of the suite on x86: a float32 model whose convolutions multiply in bf16.

Where the CPU has AVX-512 BF16 (`vdpbf16ps`: 32 bf16 products summed pairwise into 16 float32
lanes), a bf16 build rounds both operands of its convolutions to bf16 and accumulates in float32:
- Winograd convs (compile/schedules/winograd.py): the point products, on the transformed weights
  (rounded once, at compile time) and the transformed activations (rounded in the data transform);
- every other conv of stride 1 or 2 whose output rows fill a block (compile/schedules/bf16_conv.py):
  a direct block on bf16 pairs of input channels, its input packed (and zero padded) once per conv.
Transforms, instance norm, padding and activations stay float32. Every build is judged against the
fp32 reference by the bf16 rule (output PSNR >= 40 dB): Winograd's transforms amplify the rounding
about tenfold, which a 9-block 256-channel network feels (`WINOGRAD_MAX_CHANNELS`).

Where the CPU has AMX-BF16 tiles as well (Sapphire Rapids on), the Winograd products and the stride-1
direct convs whose channels come in whole tile rows (32) run on them (`tdpbf16ps`: 16 x 16 x 32
products an instruction, 256x vdpbf16ps's); other convs keep the AVX-512 blocks.

The blocks that multiply are C (compile/x86_kernels/gemm_bf16.c, which says why), compiled here
with the host compiler, cached by their source, and linked into the model's library; TIR calls them
inside parallel loops, so TVM's thread pool runs them.
"""

from __future__ import annotations

import contextlib
import hashlib
import shutil
import subprocess
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import tvm
from tvm import te, tirx
from tvm.s_tir import Schedule
from tvm.script.ir_builder import IRBuilder
from tvm.script.ir_builder import tirx as T
from tvm.target.codegen import target_has_features

from compile import BF16_ATTR, MACS_ATTR, OPAQUE_PATTERN, TILES_ATTR
from compile.int8 import amx
from errors import UserError

KERNEL_SOURCE = Path(__file__).resolve().parent / "x86_kernels" / "gemm_bf16.c"
BLOCK_FUNCTION = "lwgan_gemm_bf16_block"
BLOCK_ROWS = 8  # output rows per products call: ROWS in gemm_bf16.c
AMX_BLOCK_FUNCTION = "lwgan_gemm_amx_bf16_block"
AMX_BLOCK_ROWS = 32  # AMX_ROWS in gemm_bf16.c: two 16-row tiles
AMX_PAIRS = 16  # bf16 pairs in a tile row (64 bytes): the AMX block takes whole ones
# The AMX block compiles on any x86 host (gcc 11 on); it runs only where the target has the tiles.
COMPILER_FLAGS = ["-O3", "-mavx512f", "-mavx512bf16", "-mamx-tile", "-mamx-bf16", "-fPIC", "-c"]


# F(4x4, 3x3)'s transforms amplify bf16's rounding about tenfold. The shipped generators' 64-channel
# trunks keep 57-63 dB against fp32 with bf16 products; the 9-block, 256-channel teacher fell to
# 39 dB (below the bf16 rule's 40), all of it from its trunk, so wider convs keep float32 products.
WINOGRAD_MAX_CHANNELS = 128


def winograd_products_apply(channels: int, calibrated: bool = False) -> bool:
    """Whether a Winograd conv with `channels` input channels multiplies in bf16 in a bf16 build; a wider
    one only where the model's calibrated error budget chose it (compile/bf16_budget.py)."""
    return channels % 2 == 0 and (channels <= WINOGRAD_MAX_CHANNELS or calibrated)


def weight_digest(weight: np.ndarray) -> str:
    """A conv's identity across torch and Relax (compile/bf16_budget.py): its float32 OIHW weights."""
    return hashlib.sha256(np.ascontiguousarray(weight, np.float32).tobytes()).hexdigest()[:16]


def available(target: tvm.target.Target) -> bool:
    """Whether `target` is an x86 CPU with AVX-512 BF16."""
    return target.kind.name == "llvm" and target_has_features(["avx512f", "avx512bf16"], target)


def tiles_available(target: tvm.target.Target) -> bool:
    """Whether `target` is an x86 CPU with AMX-BF16 tiles."""
    return target.kind.name == "llvm" and target_has_features(["amx-tile", "amx-bf16"], target)


def fills_tiles(channels: int) -> bool:
    """Whether `channels` input channels fill whole tile rows (16 bf16 pairs), as the AMX blocks need."""
    return channels % (2 * AMX_PAIRS) == 0


def require(target: tvm.target.Target) -> None:
    """A one-line error where bf16 has no level to run at (the suite falls back to fp32 there)."""
    if not available(target):
        cpu = target.attrs.get("mcpu", target.kind.name)
        raise UserError(f"bf16 needs AVX-512 BF16 (vdpbf16ps) or AMX-BF16; target cpu {cpu} has neither")


def kernel_object(cache_dir: Path) -> Path:
    """gemm_bf16.c compiled for this machine by the host C compiler, cached by its source."""
    source = KERNEL_SOURCE.read_bytes()
    digest = hashlib.sha256(source + " ".join(COMPILER_FLAGS).encode()).hexdigest()[:12]
    obj = cache_dir / f"gemm_bf16-{digest}.o"
    if obj.exists():
        return obj
    compiler = shutil.which("cc") or shutil.which("gcc")
    if compiler is None:
        raise UserError("no host C compiler (cc) to build the bf16 kernels; install gcc")
    cache_dir.mkdir(parents=True, exist_ok=True)
    partial = obj.with_suffix(".partial.o")
    built = subprocess.run([compiler, *COMPILER_FLAGS, str(KERNEL_SOURCE), "-o", str(partial)],
                           capture_output=True, text=True)
    if built.returncode != 0:
        raise UserError(f"{KERNEL_SOURCE.name} did not compile with {compiler}: {built.stderr.strip()[-300:]}")
    partial.replace(obj)
    return obj


def link_options(mod: tvm.IRModule, cache_dir: Path) -> list[str]:
    """The objects a module's library links: the bf16 block where the module calls it."""
    return [str(kernel_object(cache_dir))] if mod.attrs is not None and mod.attrs.get(BF16_ATTR) else []


def bf16_bits(values: np.ndarray) -> np.ndarray:
    """float32 -> bf16 bit patterns (uint16), rounded to nearest even as the data transform rounds."""
    bits = np.ascontiguousarray(values, np.float32).view(np.uint32).astype(np.uint64)
    return ((bits + 0x7FFF + ((bits >> 16) & 1)) >> 16).astype(np.uint16)


def pack_rows(u: np.ndarray, on_tiles: bool = False) -> np.ndarray:
    """[batch, rows, channels] float32 -> uint32 [batch, rows rounded up to a block, channels / 2]: bf16
    pairs of adjacent channels (the even one in the low half), zero rows to whole blocks (of 8, or of
    32 `on_tiles`)."""
    batch, rows, channels = u.shape
    block = AMX_BLOCK_ROWS if on_tiles else BLOCK_ROWS
    padded = np.zeros((batch, -(-rows // block) * block, channels), np.uint16)
    padded[:, :rows] = bf16_bits(u)
    return np.ascontiguousarray(padded).view(np.uint32)


def bf16_pair(low, high, lanes: int):
    """Two float32 expressions of `lanes` lanes rounded to bf16 (to nearest even) and packed in one
    uint32, `low` in bits 0-15: integer arithmetic on their bits, because TVM lowers bf16 vectors
    to float32."""

    def word(value: int):
        scalar = tirx.const(value, "uint32")
        return scalar if lanes == 1 else tirx.Broadcast(scalar, lanes)

    def rounded(value):  # the bf16 in the top 16 bits, the bottom 16 cleared
        bits = tirx.reinterpret("uint32" if lanes == 1 else f"uint32x{lanes}", value)
        return (bits + word(0x7FFF) + ((bits >> word(16)) & word(1))) & word(0xFFFF0000)

    return rounded(high) | (rounded(low) >> word(16))


def _tile_state(on_tiles: bool):
    """The TIR frame a kernel's parallel loop runs in: Linux's grant of AMX tile state where it runs on
    tiles (`amx.tile_state_granted`), else nothing."""
    return amx.tile_state_granted() if on_tiles else contextlib.nullcontext()


def products(batch: int, rows: int, channels: int, columns: int, on_tiles: bool = False) -> tirx.PrimFunc:
    """(u from `pack_rows`, v uint32 [batch, channels / 2, columns]) -> m float32 [batch, rows, columns],
    m[b] = u[b] v[b] with bf16 operands: one parallel task per (batch item, block of 8 rows), or
    `on_tiles` (`fills_tiles`) of 32 rows on AMX, once Linux has granted the tile state."""
    block, function = (AMX_BLOCK_ROWS, AMX_BLOCK_FUNCTION) if on_tiles else (BLOCK_ROWS, BLOCK_FUNCTION)
    pairs, blocks = channels // 2, -(-rows // block)
    with IRBuilder() as ib, T.prim_func(private=True):
        T.func_attr({"tirx.noalias": True, "tirx.is_scheduled": True, "op_pattern": OPAQUE_PATTERN,
                     BF16_ATTR: True, MACS_ATTR: batch * rows * channels * columns,
                     **({TILES_ATTR: "bf16"} if on_tiles else {})})
        u = T.arg("u", T.buffer((batch, blocks * block, pairs), "uint32"))
        v = T.arg("v", T.buffer((batch, pairs, columns), "uint32"))
        m = T.arg("m", T.buffer((batch, rows, columns), "float32"))
        with T.sblock("root"), _tile_state(on_tiles), \
                T.parallel(0, batch * blocks) as task:
            T.evaluate(tirx.call_extern(
                "int32", function, u.data, v.data, m.data,
                *(tirx.Cast("int64", value) for value in (task // blocks, task % blocks * block)),
                *(tirx.const(value, "int64") for value in (rows, blocks * block, pairs, columns)),
            ))
    return ib.get()


CONV_STRIDES = (1, 2)  # what the direct block loads (stride 2: twice the words, the even ones kept)
LANES = 16  # float32 lanes of a zmm register: output columns per vector


@dataclass(frozen=True)
class ConvBlock:
    """One of gemm_bf16.c's direct conv blocks: `rows` output channels x `vecs` vectors of columns; a
    block for narrow rows fills each vector with whole output rows, `image_rows` of them per call. A
    block with `pixels` has the output channels in its vectors instead (`rows` = 16 x `vecs`), and
    computes that many output pixels per call."""

    function: str
    rows: int
    vecs: int
    image_rows: int = 1
    pixels: int = 0

    def calls_per_image(self, out_h: int, out_w: int) -> int:
        """Calls per image and block of output channels: one per output row, or per `image_rows` rows,
        or per `pixels` pixels."""
        return out_h * out_w // self.pixels if self.pixels else out_h // self.image_rows

    @property
    def columns(self) -> int:
        return self.vecs * LANES


WIDE_BLOCK = ConvBlock("lwgan_conv_bf16_block", 8, 2)
NARROW_BLOCK = ConvBlock("lwgan_conv_bf16_block_narrow", 4, 4)  # RGB outputs: 3 of 4 rows busy, not 3 of 8
ROW_BLOCKS = {16: ConvBlock("lwgan_conv_bf16_rows16", 8, 2, 2), 8: ConvBlock("lwgan_conv_bf16_rows8", 8, 2, 4)}
# Outputs smaller still (a U-Net's 4x4 to 1x1 layers): 32 output channels in two vectors x 8, 4, 2 or 1 pixels.
CHANNEL_BLOCKS = {pixels: ConvBlock(f"lwgan_conv_bf16_channels{pixels}", 2 * LANES, 2, pixels=pixels)
                  for pixels in (8, 4, 2, 1)}
# AMX tiles: 32 output channels (two 16-row tiles) x 32 columns (two 16-column tiles), stride 1.
AMX_CONV_BLOCK = ConvBlock("lwgan_conv_amx_bf16_block", AMX_BLOCK_ROWS, 2)


def conv_block(out_channels: int, out_height: int, out_width: int, channels: int = 0, stride: int = 1,
               on_tiles: bool = False) -> ConvBlock | None:
    """The block for a conv's output, or None where bf16 would not pay: rows of 16 or 8 columns take
    whole rows per vector; outputs narrower still take the output channels in the vectors where they
    come in 32s (`CHANNEL_BLOCKS`); other rows narrower than the block's columns would leave lanes idle.
    `on_tiles` (the target has AMX-BF16), a stride-1 conv whose input and output channels come in 32s
    and output rows in 16s runs on the tiles."""
    if on_tiles and stride == 1 and out_channels % AMX_BLOCK_ROWS == 0 and fills_tiles(channels) and \
            out_width % LANES == 0:
        return AMX_CONV_BLOCK
    block = NARROW_BLOCK if out_channels <= NARROW_BLOCK.rows else WIDE_BLOCK
    if out_width >= block.columns:
        return block
    rows_block = ROW_BLOCKS.get(out_width)
    if rows_block is not None and out_channels > NARROW_BLOCK.rows and out_height % rows_block.image_rows == 0:
        return rows_block
    if out_width < min(ROW_BLOCKS) and out_channels % (2 * LANES) == 0:
        return CHANNEL_BLOCKS[next(p for p in CHANNEL_BLOCKS if (out_height * out_width) % p == 0)]
    return None


def pack_conv_weight(weight: np.ndarray, rows: int) -> np.ndarray:
    """OIHW float32 -> uint32 [OC/rows][C/2][KH][KW][rows]: bf16 pairs of adjacent input channels,
    `rows` output channels side by side (one cache line per tap), zero-filled to whole pairs and blocks."""
    out_channels, channels, kh, kw = weight.shape
    blocks, pairs = -(-out_channels // rows), -(-channels // 2)
    padded = np.zeros((blocks * rows, pairs * 2, kh, kw), np.float32)
    padded[:out_channels, :channels] = weight
    bits = bf16_bits(padded).reshape(blocks, rows, pairs, 2, kh, kw)
    return np.ascontiguousarray(bits.transpose(0, 2, 4, 5, 1, 3)).view(np.uint32)[..., 0]


def pack_conv_weight_for_tiles(weight: np.ndarray) -> np.ndarray:
    """OIHW float32 -> uint32 [OC/32][C/32][KH][KW][32][16] for `AMX_CONV_BLOCK`: per tap, two A tiles
    of 16 output channels x 16 bf16 pairs of input channels (channels in 32s: `conv_block`)."""
    out_channels, channels, kh, kw = weight.shape
    bits = bf16_bits(weight).reshape(out_channels // AMX_BLOCK_ROWS, AMX_BLOCK_ROWS, channels // (2 * AMX_PAIRS),
                                     AMX_PAIRS, 2, kh, kw)
    return np.ascontiguousarray(bits.transpose(0, 2, 5, 6, 1, 3, 4)).view(np.uint32)[..., 0]


def packed_conv_weight(weight: np.ndarray, block: ConvBlock) -> np.ndarray:
    """A conv's weights in the layout `block` reads."""
    return pack_conv_weight_for_tiles(weight) if block == AMX_CONV_BLOCK else pack_conv_weight(weight, block.rows)


def pack_input(shape: tuple[int, ...], padding: tuple[int, int, int, int]) -> tirx.PrimFunc:
    """NCHW float32 -> uint32 [N][C/2][H + pads][W + pads]: bf16 pairs of adjacent channels, the
    conv's zero padding (and a zero odd channel) written in, so the block never tests a border."""
    n, channels, height, width = shape
    top, left, bottom, right = padding
    pairs = -(-channels // 2)
    data = te.placeholder(shape, "float32", name="data")

    def value(b, c, y, x):
        inside = tirx.all(c < channels, y >= top, y < top + height, x >= left, x < left + width)
        clamped = data[b, tirx.min(c, channels - 1), tirx.max(tirx.min(y - top, height - 1), 0),
                       tirx.max(tirx.min(x - left, width - 1), 0)]
        return tirx.if_then_else(inside, clamped, tirx.const(0.0, "float32"))

    packed = te.compute((n, pairs, height + top + bottom, width + left + right),
                        lambda b, i, y, x: bf16_pair(value(b, 2 * i, y, x), value(b, 2 * i + 1, y, x), 1),
                        name="packed")
    sch = Schedule(te.create_prim_func([data, packed]))
    b, i, y, x = sch.get_loops(sch.get_sblock("packed"))
    sch.parallel(sch.fuse(b, i, y))
    lanes = next((v for v in (16, 8, 4) if (width + left + right) % v == 0), 1)
    if lanes > 1:
        sch.vectorize(sch.split(x, [None, lanes])[1])
    scheduled = sch.mod["main"].without_attr("global_symbol")
    return scheduled.with_attr({"tirx.noalias": True, "tirx.is_scheduled": True, "op_pattern": OPAQUE_PATTERN})


def direct_conv(packed_shape: tuple[int, ...], weight_shape: tuple[int, ...], stride: int,
                out_hw: tuple[int, int], block: ConvBlock) -> tirx.PrimFunc:
    """(packed input from `pack_input`, weight from `packed_conv_weight`, bias [OC]) -> NCHW float32:
    one parallel task per (batch item, call of the block, block of output channels): a call takes an
    output row, or several (`ConvBlock.calls_per_image`)."""
    n, pairs, padded_h, padded_w = packed_shape
    out_channels, channels, kh, kw = weight_shape
    out_h, out_w = out_hw
    blocks = -(-out_channels // block.rows)
    macs = n * out_channels * out_h * out_w * channels * kh * kw  # the conv's own, not the zero channel's
    on_tiles = block == AMX_CONV_BLOCK
    with IRBuilder() as ib, T.prim_func(private=True):
        T.func_attr({"tirx.noalias": True, "tirx.is_scheduled": True, "op_pattern": OPAQUE_PATTERN,
                     BF16_ATTR: True, MACS_ATTR: macs, **({TILES_ATTR: "bf16"} if on_tiles else {})})
        x = T.arg("x", T.buffer(packed_shape, "uint32"))
        w_shape = (blocks, pairs // AMX_PAIRS, kh, kw, block.rows, AMX_PAIRS) if on_tiles else \
            (blocks, pairs, kh, kw, block.rows)
        w = T.arg("w", T.buffer(w_shape, "uint32"))
        b = T.arg("bias", T.buffer((out_channels,), "float32"))
        out = T.arg("out", T.buffer((n, out_channels, out_h, out_w), "float32"))
        groups = block.calls_per_image(out_h, out_w)
        with T.sblock("root"), _tile_state(on_tiles), \
                T.parallel(0, n * groups * blocks) as task:
            item, row, k_block = task // (groups * blocks), task // blocks % groups, task % blocks
            T.evaluate(tirx.call_extern(
                "int32", block.function, T.address_of(x[item, 0, 0, 0]), w.data, b.data,
                T.address_of(out[item, 0, 0, 0]),
                *(tirx.Cast("int64", value) for value in (k_block, row)),
                *(tirx.const(value, "int64") for value in (out_channels, pairs, kh, kw, stride, padded_h, padded_w,
                                                           out_h, out_w)),
            ))
    return ib.get()
