"""Run ONNX QDQ convolutions as integer kernels instead of dequantize -> float conv -> quantize.

TVM's ONNX frontend keeps QuantizeLinear/DequantizeLinear as `relax.quantize`/`relax.dequantize`,
so a QDQ model compiled as is runs every convolution in float on fake-quantized values (and
slower than the fp32 model, for the extra rounding passes). This pass finds (compile/int8/match.py)

    quantize(conv2d(dequantize(x_u8), dequantize(w_i8)) [+ dequantize(b_i32)], s_out, z_out)

and replaces it with one hand-scheduled TIR kernel: u8 x s8 products summed exactly in int32,
tensorized with a dot-product intrinsic (compile/int8/intrinsics.py: AVX2 `vpmaddubsw` or AVX-512
VNNI `vpdpbusd`) or run on AMX tiles (compile/int8/amx.py), with the requantization to uint8
fused into its epilogue. A conv whose output stays float (no quantize after it) gets the same
kernel with a dequantizing epilogue. The float ops between convolutions (instance norm, ReLU,
padding, tanh) stay float and fuse with the dequantize/quantize around them; the frontend's
decomposed instance norm is first put back into one op so that it can (`fold_instance_norms`), and
a norm of a conv's output reads the conv's uint8 bytes, dequantizing as it reads
(compile/schedules/norm.py `dequantizing_instance_norm`) rather than the float32 the conv would
write dequantized (a quarter of the bytes stored and read: resnet6+ptq 0.97x, nst+ptq 0.96x the time).

Integer arithmetic, per output channel c (x: uint8 input with zero point z_x and scale s_x;
w: int8 weights, symmetric, scale s_w[c]; b: int32 bias with scale s_b[c]):

    acc[c]  = sum x * w                                   (exact, int32)
    real[c] = s_x * s_w[c] * (acc[c] - z_x * sum w[c]) + s_b[c] * b[c]

so with `correction` = b - z_x * sum w (when s_b = s_x * s_w, as QDQ exporters write it) the
kernel computes `(acc + correction) * multiplier + offset` once in float32 and, when requantizing,
rounds half to even and clamps to [0, 255] like QuantizeLinear. Spatial zero padding of the
float input is the zero point in the integer domain (dequantize(z_x) = 0), so padding is exact.

Kernels (`plan_kernel` picks one per conv and target):
- "channels": the uint8 NCHW input is packed into NCHW[4c] (zero point in the padding) by its own kernel
  (compile/int8/packing.py) or by the reflection pad before the conv, the int8
  weights are pre-packed at compile time as OIHW[lanes o][4 i] constants (`lanes` = the
  intrinsic's int32 vector width), accumulators are NCHW[lanes c] in registers per tile of 8
  output pixels, and the epilogue writes NCHW again.
- "pixels": for fewer output channels than lanes (an RGB output layer), the lanes are output
  pixels of one channel (8 on AVX2, 16 on VNNI) and the weights are broadcast, so no lane is wasted;
  on VNNI also for wide layers of stride 1 or 2 (the input packed by column phase), whose broadcast
  weights vpdpbusd reads from memory itself.
- "winograd": 3x3 stride-1 convs with >= 64 channels on AVX2 run as exact integer Winograd
  F(2x2, 3x3) (compile/int8/winograd.py), since there an integer multiply costs as much as a float one.
- "amx": on CPUs with Intel AMX, convs with whole 16-channel output blocks run as int8 matrix
  products on its tiles (compile/int8/amx.py), up to 3x a VNNI kernel's rate.
Without a usable intrinsic (another ISA, or 8-bit weights whose int16 pair sums could saturate
`vpmaddubsw`) the "channels" kernel runs as portable integer code that LLVM vectorizes.
"""

from __future__ import annotations

import functools
from dataclasses import dataclass

import numpy as np
import tvm
from tvm import relax, te, tirx
from tvm.s_tir import Schedule

from compile import INTEGER_CONV, MACS_ATTR, OPAQUE_PATTERN, TILES_ATTR
from compile.int8 import amx, winograd
from compile.int8.packing import pack_input
from compile.int8.intrinsics import (
    AVX2_DOT_8X2_I16,
    AVX2_DOT_8X4,
    INTRINSICS,
    PIXELS_INTRINSIC,
    REDUCTION,
    VNNI_DOT_16X4,
    intrinsic_for,
    pairs_fit_int16,
    register_int8_intrinsics,
)
from compile.int8.match import (
    Bias,
    ConvMatch,
    call_to,
    conv_matches,
    constant,
    match_bias,
    match_quantized_conv,
    scalar,
)
from compile.schedules.default import schedule_float_ops
from compile.schedules.norm import dequantizing_instance_norm
from compile.schedules.graph import bound_call, is_op, static_shape, users_of
from compile.schedules.pad import packed_reflection_pad, reflection_padding, uint8_quantization

PORTABLE_LANES = 8  # int32 lanes of the untensorized kernel (LLVM vectorizes it for any CPU)
OUTPUT_TILE = 8  # output pixels per micro-kernel: 8 accumulators + weights fit 16 AVX2 registers
# With 16 channels per block, a tile's epilogue writes 16 channel planes. Where a plane is a multiple
# of 4 KiB they all fall in one L1 set (more lines than its ways), and each 8-pixel tile evicted the
# lines the next one writes: a 16->64 1x1 conv at 64x64 ran at 6 GMAC/s, at 22 with 32-pixel tiles.
# Only 1x1 convs take the wider tile: with a longer reduction its 32 accumulators spill (a CycleGAN's
# int8 3x3 and 7x7 convs at 256x256 got 40% slower).
ALIASED_PLANE_BYTES = 4096
ALIASED_TILE = 32
# Pixels as lanes for wide layers too, on VNNI: the broadcast weight group is vpdpbusd's own memory
# operand ({1to16}), where the channels kernel broadcasts activations into registers first. A block
# of 8 output channels x 2 vectors of 16 pixels: a 64 -> 64 3x3 conv at 64x64 ran 1.28 -> 0.77 ms,
# 32 -> 32 at 64x64 0.49 -> 0.22 ms; rows of 32 ran as fast as before, narrower ones slower.
PIXEL_CHANNEL_BLOCK = 8
PIXEL_VECTORS = 2
# parallel tasks of a pixel-lane kernel, at least (`_rows_per_task`): TVM hands each thread an equal
# share of them, so enough that 2, 3, 4 or 6 threads get even shares (16 ran the same on 2 threads)
PARALLEL_TASKS = 24
# Strided convs too: their packing puts each column phase apart (even columns, then odd ones), so a
# tap's 16 pixels are again one contiguous load. Measured against channels in the lanes (time ratio):
# 16 -> 32 3x3 to 64x64 outputs 0.72, a 32 -> 64 4x4 to 64x64 0.58; to rows of one block (32x32
# outputs) 1.11, so strided rows take pixel blocks only from two blocks a row on.
PIXEL_STRIDES = ((1, 1), (2, 2))
STRIDED_PIXEL_BLOCKS = 2


@dataclass(frozen=True)
class IntegerConv:
    """One convolution in integer form: u8 input (with zero point) x s8 weights -> int32 -> epilogue.

    The epilogue computes `(acc + correction) * multiplier + offset` per output channel in
    float32; with `requantize` the result is rounded half to even and clamped to uint8,
    otherwise it is the float output. With `dequantize` = (scale, zero point) as well, the
    uint8 value is written dequantized, (q - zero point) * scale: the QDQ graph's
    DequantizeLinear after the conv's QuantizeLinear, fused.
    """

    weight: np.ndarray  # int8 (OC, C, KH, KW)
    strides: tuple[int, int]
    padding: tuple[int, int, int, int]  # top, left, bottom, right
    input_zero_point: int
    correction: np.ndarray  # int32 (OC,)
    multiplier: np.ndarray  # float32 (OC,)
    offset: np.ndarray  # float32 (OC,)
    requantize: bool
    dequantize: tuple[float, int] | None = None
    depthwise: bool = False  # one input channel per output channel (groups = channels): weight (C, 1, KH, KW)

    @property
    def out_dtype(self) -> str:
        return "uint8" if self.requantize and self.dequantize is None else "float32"

    def finish(self, total, channel, multiplier, offset):
        """The epilogue on `total` = acc + correction (int32) of output `channel`."""
        value = total.astype("float32") * multiplier[channel] + offset[channel]
        if not self.requantize:
            return value
        quantized = tirx.max(tirx.min(tirx.nearbyint(value), tirx.const(255.0, "float32")), tirx.const(0.0, "float32"))
        if self.dequantize is None:
            return quantized.astype("uint8")
        scale, zero_point = self.dequantize
        return (quantized - tirx.const(zero_point, "float32")) * tirx.const(scale, "float32")

    def macs(self, input_shape: tuple[int, ...]) -> int:
        """Multiply-adds of the convolution (whatever transform or layout its kernel uses)."""
        _, channels, kh, kw = self.weight.shape
        return int(np.prod(self.output_shape(input_shape))) * channels * kh * kw

    def output_shape(self, input_shape: tuple[int, ...]) -> tuple[int, int, int, int]:
        n, _, h, w = input_shape
        oc, _, kh, kw = self.weight.shape
        top, left, bottom, right = self.padding
        return (
            n,
            oc,
            (h + top + bottom - kh) // self.strides[0] + 1,
            (w + left + right - kw) // self.strides[1] + 1,
        )


@dataclass(frozen=True)
class KernelPlan:
    """How a conv runs on a target.

    `layout` "channels": `lanes` output channels per vector, the activations broadcast;
    "pixels": `lanes` output pixels of one channel per vector, the weights broadcast (for
    fewer channels than lanes); "winograd": exact integer Winograd (compile/int8/winograd.py);
    "amx": matrix products on AMX tiles of `lanes` channels (compile/int8/amx.py);
    "depthwise": one channel's pixels per vector (`_depthwise_kernel`).
    `intrinsic` None is portable integer code that LLVM vectorizes.
    """

    intrinsic: str | None
    lanes: int
    layout: str = "channels"


def plan_kernel(conv: IntegerConv, input_shape: tuple[int, ...], target: tvm.target.Target) -> KernelPlan:
    """AMX tiles where the target has them and the conv fits them; else tensorize when the target
    has a dot-product intrinsic that is exact on these weights.

    AVX2's `vpmaddubsw` saturates int16 pair sums; 7-bit weights never reach that, full-range
    8-bit ones can, and then the conv runs as portable integer code rather than wrongly. On AVX2
    an integer multiply costs what a float one does, so 3x3 convs take Winograd's 2.25x fewer.
    """
    if conv.depthwise:  # a dot product over input channels has nothing to sum here
        return KernelPlan(None, 1, "depthwise")
    if amx.available(target) and amx.applies(conv, input_shape):
        return KernelPlan(amx.INTRINSIC, amx.CHANNELS, "amx")
    intrinsic = intrinsic_for(target)
    if intrinsic is None:
        return KernelPlan(None, PORTABLE_LANES)
    lanes, saturates = INTRINSICS[intrinsic]
    if intrinsic == AVX2_DOT_8X4 and winograd.applies(conv, input_shape):
        return KernelPlan(AVX2_DOT_8X2_I16, winograd.LANES, "winograd")
    if saturates and not pairs_fit_int16(pack_weight(conv.weight, lanes)):
        return KernelPlan(None, PORTABLE_LANES)
    few_channels = conv.strides == (1, 1) and conv.weight.shape[0] < lanes
    if few_channels or conv.strides in PIXEL_STRIDES and _wide_rows(conv, input_shape, intrinsic):
        return KernelPlan(PIXELS_INTRINSIC[intrinsic], lanes, "pixels")
    return KernelPlan(intrinsic, lanes)


def _wide_rows(conv: IntegerConv, input_shape: tuple[int, ...], intrinsic: str) -> bool:
    """Whether a VNNI conv's output fills whole pixel blocks, at least two a row where it is strided."""
    out_channels, out_w = conv.weight.shape[0], conv.output_shape(input_shape)[3]
    per_row = STRIDED_PIXEL_BLOCKS if conv.strides != (1, 1) else 1
    return intrinsic == VNNI_DOT_16X4 and _fills_pixel_blocks(out_channels, out_w, INTRINSICS[intrinsic][0], per_row)


def _fills_pixel_blocks(out_channels: int, out_w: int, lanes: int, per_row: int = 1) -> bool:
    """Whether output channels and rows come in whole blocks of `PIXEL_CHANNEL_BLOCK` x `PIXEL_VECTORS`
    vectors, `per_row` or a multiple of it a row."""
    return out_channels % PIXEL_CHANNEL_BLOCK == 0 and out_w % (per_row * PIXEL_VECTORS * lanes) == 0


def runs_on_vnni(target: tvm.target.Target) -> bool:
    """Whether an int8 build's conv kernels multiply with VNNI's vpdpbusd (a VNNI level without AMX tiles)."""
    return intrinsic_for(target) == VNNI_DOT_16X4 and not amx.available(target)


def pack_weight(weight: np.ndarray, lanes: int) -> np.ndarray:
    """OIHW int8 -> [OC/lanes, C/4, KH, KW, lanes, 4], zero-filled to whole blocks."""
    oc, c, kh, kw = weight.shape
    oc_blocks, c_blocks = -(-oc // lanes), -(-c // REDUCTION)
    padded = np.zeros((oc_blocks * lanes, c_blocks * REDUCTION, kh, kw), np.int8)
    padded[:oc, :c] = weight
    blocked = padded.reshape(oc_blocks, lanes, c_blocks, REDUCTION, kh, kw)
    return np.ascontiguousarray(blocked.transpose(0, 2, 4, 5, 1, 3))


def _per_channel(values: np.ndarray, lanes: int, dtype: str) -> np.ndarray:
    padded = np.zeros(-(-len(values) // lanes) * lanes, dtype)
    padded[: len(values)] = values
    return padded


@dataclass(frozen=True)
class Kernel:
    """A scheduled kernel: call it with (data, *constants, output) (NCHW, `IntegerConv.out_dtype`); where
    `pack` is given, `data` is what `pack` makes of the NCHW input: call pack(input, data) first."""

    func: tirx.PrimFunc
    constants: list[np.ndarray]
    pack: tirx.PrimFunc | None = None


def build_kernel(conv: IntegerConv, input_shape: tuple[int, ...], plan: KernelPlan, prepacked: bool = False,
                 packed_shape: tuple[int, ...] | None = None) -> Kernel:
    """The scheduled kernel for `conv` at `input_shape`, with its weights in the kernel's layout. A direct
    kernel reads its input packed (`packed_input_shape`, or the larger `packed_shape` that other convs of
    the same input share): by the kernel's `pack`, or with `prepacked` as a kernel before it wrote it (a
    reflection pad where `prepackable`); an AMX kernel packs it itself unless `prepacked`."""
    register_int8_intrinsics()
    pack = None
    lanes = plan.lanes if plan.layout != "pixels" else 1
    per_channel = [
        _per_channel(conv.correction, lanes, "int32"),
        _per_channel(conv.multiplier, lanes, "float32"),
        _per_channel(conv.offset, lanes, "float32"),
    ]
    if plan.layout == "amx":
        func, weights = amx.amx_kernel(conv, input_shape, prepacked), amx.pack_weight(conv)
    elif plan.layout == "winograd":
        func, weights = winograd.winograd_kernel(conv, input_shape), winograd.transform_weight(conv.weight)
    elif plan.layout == "depthwise":
        func, weights = _depthwise_kernel(conv, input_shape), conv.weight[:, 0]
    else:
        packed_shape = packed_shape or packed_input_shape(conv, input_shape, plan)
        func = _direct_kernel(conv, input_shape, plan, packed_shape)
        pixels = plan.layout == "pixels"
        weights = _pack_weight_for_pixels(conv.weight) if pixels else pack_weight(conv.weight, plan.lanes)
        if not prepacked:
            pack = pack_input(input_shape, packed_shape, conv.input_zero_point, conv.padding[:2])
    # Private (no global symbol): the module gives each kernel its own name. Opaque to operator fusion,
    # as the tensorized kernels already are: a scheduled kernel cannot take in the ops after it, and
    # fusing the portable one with a tanh failed in FuseTIR (its int32 shapes against the tanh's int64).
    func = func.without_attr("global_symbol").with_attr(
        {"tirx.is_scheduled": True, MACS_ATTR: conv.macs(input_shape), "op_pattern": OPAQUE_PATTERN,
         **({TILES_ATTR: "int8"} if plan.layout == "amx" else {})})
    return Kernel(func, [weights, *per_channel], pack)


def _pack_weight_for_pixels(weight: np.ndarray) -> np.ndarray:
    """OIHW int8 -> [OC, C/4, KH, KW, 4], input channels zero-filled to whole groups."""
    oc, c, kh, kw = weight.shape
    c_blocks = -(-c // REDUCTION)
    padded = np.zeros((oc, c_blocks * REDUCTION, kh, kw), np.int8)
    padded[:, :c] = weight
    return np.ascontiguousarray(padded.reshape(oc, c_blocks, REDUCTION, kh, kw).transpose(0, 1, 3, 4, 2))


def prepackable(conv: IntegerConv, plan: KernelPlan) -> bool:
    """Whether the kernel for `conv` can read its input already packed (`packed_input_shape`): a direct
    or AMX kernel of stride 1 whose input arrives padded (a reflection pad's output), so its packing
    only interleaves (an AMX kernel's, unless it folds kernel columns into channels)."""
    unpadded = conv.strides == (1, 1) and not any(conv.padding)
    return unpadded and (plan.layout in ("channels", "pixels") or plan.layout == "amx" and not amx.folds_columns(conv))


def packed_input_shape(conv: IntegerConv, input_shape: tuple[int, ...], plan: KernelPlan) -> tuple[int, ...]:
    """The layout a direct kernel packs its uint8 input into: groups of 4 channels interleaved,
    NC[4]HW -> (N, C/4, rows, [column phases,] columns, 4); the pixels layout has the phase axis, an
    AMX kernel's channels come in whole product blocks (`amx.packed_input_shape`). Channels past C
    and columns past the input's (whole tiles) hold the zero point."""
    if plan.layout == "amx":
        return amx.packed_input_shape(conv, input_shape)
    n, channels = input_shape[:2]
    _, _, out_h, out_w = conv.output_shape(input_shape)
    _, _, kh, kw = conv.weight.shape
    stride_h, stride_w = conv.strides
    padded_w = _padded_width(conv, input_shape, plan)
    c_blocks, rows = -(-channels // REDUCTION), (out_h - 1) * stride_h + kh
    if plan.layout == "pixels":  # column phase p of the padded input, column w: its column w * stride + p
        return (n, c_blocks, rows, stride_w, padded_w + (kw - 1) // stride_w, REDUCTION)
    return (n, c_blocks, rows, (padded_w - 1) * stride_w + kw, REDUCTION)


def _tile(conv: IntegerConv, input_shape: tuple[int, ...], plan: KernelPlan) -> int:
    """Output pixels per micro-kernel: 8 (channel lanes) or, with pixel lanes, `PIXEL_VECTORS` vectors
    of a block of channels, or for fewer channels as many vectors as keep about 12 accumulators in
    the 16 AVX2 registers."""
    _, out_channels, out_h, out_w = conv.output_shape(input_shape)
    _, _, kh, kw = conv.weight.shape
    lanes = plan.lanes
    if plan.layout != "pixels":
        aliased = lanes >= 16 and kh == kw == 1 and (out_h * out_w) % ALIASED_PLANE_BYTES == 0
        return min(ALIASED_TILE if aliased else OUTPUT_TILE, out_w)
    if _fills_pixel_blocks(out_channels, out_w, lanes):
        return PIXEL_VECTORS * lanes
    return lanes * max(1, min(4, 12 // out_channels))


def _padded_width(conv: IntegerConv, input_shape: tuple[int, ...], plan: KernelPlan) -> int:
    """Output columns computed: whole tiles (the extra columns are computed and dropped)."""
    out_w, tile = conv.output_shape(input_shape)[3], _tile(conv, input_shape, plan)
    return -(-out_w // tile) * tile


def _direct_kernel(conv: IntegerConv, input_shape: tuple[int, ...], plan: KernelPlan,
                   packed_shape: tuple[int, ...]) -> tirx.PrimFunc:
    """Direct convolution (packed input, packed weight, correction, multiplier, offset) -> NCHW output;
    the input in `packed_shape` (`packed_input_shape`, or more rows and columns), written by the kernel
    before it (compile/int8/packing.py, or a reflection pad: compile/schedules/pad.py)."""
    n, channels = input_shape[:2]
    _, out_channels, out_h, out_w = conv.output_shape(input_shape)
    _, _, kh, kw = conv.weight.shape
    pixels = plan.layout == "pixels"
    lanes = plan.lanes
    oc_blocks, c_blocks = -(-out_channels // lanes), -(-channels // REDUCTION)
    tile, padded_w = _tile(conv, input_shape, plan), _padded_width(conv, input_shape, plan)
    stride_h, stride_w = conv.strides

    if pixels:
        weight = te.placeholder((out_channels, c_blocks, kh, kw, REDUCTION), "int8", name="weight")
        channel_count = out_channels
    else:
        weight = te.placeholder((oc_blocks, c_blocks, kh, kw, lanes, REDUCTION), "int8", name="weight")
        channel_count = oc_blocks * lanes
    correction = te.placeholder((channel_count,), "int32", name="correction")
    multiplier = te.placeholder((channel_count,), "float32", name="multiplier")
    offset = te.placeholder((channel_count,), "float32", name="offset")

    packed = te.placeholder(packed_shape, "uint8", name="packed")
    rc = te.reduce_axis((0, c_blocks), "rc")
    ry = te.reduce_axis((0, kh), "ry")
    rx = te.reduce_axis((0, kw), "rx")
    ri = te.reduce_axis((0, REDUCTION), "ri")
    if pixels:
        acc = te.compute(
            (n, out_channels, out_h, padded_w),
            lambda b, oc, y, x: te.sum(
                packed[b, rc, y * stride_h + ry, rx % stride_w, x + rx // stride_w, ri].astype("int32")
                * weight[oc, rc, ry, rx, ri].astype("int32"),
                axis=[rc, ry, rx, ri],
            ),
            name="acc",
        )
        accumulator = lambda b, c, y, x: acc[b, c, y, x]
    else:
        acc = te.compute(
            (n, oc_blocks, out_h, padded_w, lanes),
            lambda b, ob, y, x, lane: te.sum(
                packed[b, rc, y * stride_h + ry, x * stride_w + rx, ri].astype("int32")
                * weight[ob, rc, ry, rx, lane, ri].astype("int32"),
                axis=[rc, ry, rx, ri],
            ),
            name="acc",
        )
        accumulator = lambda b, c, y, x: acc[b, c // lanes, y, x, c % lanes]

    def epilogue(b, c, y, x):
        return conv.finish(accumulator(b, c, y, x) + correction[c], c, multiplier, offset)

    out = te.compute((n, out_channels, out_h, out_w), epilogue, name="epilogue")
    func = te.create_prim_func([packed, weight, correction, multiplier, offset, out])
    return (_schedule_pixels if pixels else _schedule_channels)(func, plan, tile)


def _depthwise_kernel(conv: IntegerConv, input_shape: tuple[int, ...]) -> tirx.PrimFunc:
    """Depthwise convolution (data, weight (C, KH, KW), correction, multiplier, offset) -> NCHW output.

    Each core takes whole channels: the channel's padded plane (zero point at the border) is
    written once, then each vector of output pixels sums its window in int32 registers and runs
    the epilogue. Products are u8 x s8 widened to int32: with one input channel there is no
    channel sum for a dot-product instruction to take.
    """
    n, channels, height, width = (int(d) for d in input_shape)
    _, _, out_h, out_w = conv.output_shape(input_shape)
    _, _, kh, kw = conv.weight.shape
    stride_h, stride_w = conv.strides
    top, left = conv.padding[:2]
    zero_point = tirx.const(conv.input_zero_point, "uint8")
    data = te.placeholder((n, channels, height, width), "uint8", name="data")
    weight = te.placeholder((channels, kh, kw), "int8", name="weight")
    correction = te.placeholder((channels,), "int32", name="correction")
    multiplier = te.placeholder((channels,), "float32", name="multiplier")
    offset = te.placeholder((channels,), "float32", name="offset")

    def pad(b, c, y, x):
        inside = tirx.all(y >= top, y < top + height, x >= left, x < left + width)
        clamped = data[b, c, tirx.max(tirx.min(y - top, height - 1), 0), tirx.max(tirx.min(x - left, width - 1), 0)]
        return tirx.if_then_else(inside, clamped, zero_point)

    padded = te.compute((n, channels, (out_h - 1) * stride_h + kh, (out_w - 1) * stride_w + kw), pad, name="padded")

    def window_sum(b, c, y, x):  # written out tap by tap: a spatial block, so it inlines and vectorizes
        taps = [padded[b, c, y * stride_h + i, x * stride_w + j].astype("int32") * weight[c, i, j].astype("int32")
                for i in range(kh) for j in range(kw)]
        return functools.reduce(lambda total, tap: total + tap, taps)

    out = te.compute((n, channels, out_h, out_w),
                     lambda b, c, y, x: conv.finish(window_sum(b, c, y, x) + correction[c], c, multiplier, offset),
                     name="epilogue")
    sch = Schedule(te.create_prim_func([data, weight, correction, multiplier, offset, out]))
    b, c, y, x = sch.get_loops(sch.get_sblock("epilogue"))
    planes = sch.fuse(b, c)
    sch.parallel(planes)
    sch.compute_at(sch.get_sblock("padded"), planes)
    vector = next((v for v in (16, 8, 4) if out_w % v == 0), 1)  # whole vectors: no tail predicate
    if vector > 1:
        sch.vectorize(sch.split(x, [None, vector])[1])
    return sch.mod["main"]


def _schedule_channels(func: tirx.PrimFunc, plan: KernelPlan, tile: int) -> tirx.PrimFunc:
    """Micro-kernel: `tile` output pixels x one block of `lanes` channels held in registers, over
    the whole reduction (C/4 x KH x KW steps of the intrinsic); epilogue fused per tile; rows
    of channel blocks split over the cores."""
    sch = Schedule(func)
    conv = sch.get_sblock("acc")
    b, ob, y, x, lane, rc, ry, rx, ri = sch.get_loops(conv)
    x_outer, x_inner = sch.split(x, [None, tile])
    sch.reorder(b, ob, y, x_outer, rc, ry, rx, x_inner, lane, ri)
    _fuse_epilogue(sch, conv, x_outer)
    sch.parallel(sch.fuse(b, ob, y))
    if plan.intrinsic is None:  # portable: LLVM vectorizes the int32 lanes
        sch.reorder(ri, lane)
        sch.vectorize(lane)
    init = sch.decompose_reduction(conv, rc)
    if plan.intrinsic is not None:
        sch.tensorize(lane, plan.intrinsic)
    sch.unroll(x_inner)
    sch.vectorize(sch.get_loops(init)[-1])
    return sch.mod["main"]


def _schedule_pixels(func: tirx.PrimFunc, plan: KernelPlan, tile: int) -> tirx.PrimFunc:
    """Micro-kernel: a block of output channels (`PIXEL_CHANNEL_BLOCK`, or all of them where fewer or
    not whole blocks) x `tile` pixels of a row (`tile / lanes` vectors), accumulators in registers
    over the whole reduction; rows and channel blocks split over the cores."""
    sch = Schedule(func)
    conv = sch.get_sblock("acc")
    b, oc, y, x, rc, ry, rx, ri = sch.get_loops(conv)
    out_channels = sch.get(oc).extent.value
    block = PIXEL_CHANNEL_BLOCK if out_channels % PIXEL_CHANNEL_BLOCK == 0 else out_channels
    oc_outer, oc_inner = sch.split(oc, [None, block])
    x_outer, x_vector, x_lane = sch.split(x, [None, tile // plan.lanes, plan.lanes])
    y_outer, y_inner = sch.split(y, [None, _rows_per_task(sch, (b, oc_outer), y)])
    sch.reorder(b, oc_outer, y_outer, y_inner, x_outer, rc, ry, rx, oc_inner, x_vector, x_lane, ri)
    _fuse_epilogue(sch, conv, x_outer)
    sch.parallel(sch.fuse(b, oc_outer, y_outer))
    init = sch.decompose_reduction(conv, rc)
    sch.tensorize(x_lane, plan.intrinsic)
    sch.unroll(x_vector)
    sch.unroll(oc_inner)
    sch.vectorize(sch.get_loops(init)[-1])
    epilogue_x = sch.get_loops(sch.get_sblock("epilogue"))[-1]
    sch.vectorize(sch.split(epilogue_x, [None, plan.lanes])[1])
    return sch.mod["main"]


def _rows_per_task(sch: Schedule, outer_loops, rows) -> int:
    """Output rows a parallel task runs: the most that still leave `PARALLEL_TASKS` tasks. TVM
    allocates a kernel's 1 KB accumulator tile from its workspace pool once per task (a call, and
    a free), so fewer, longer tasks spend less there (resnet6+ptq: 4.6K calls an inference at a row
    a task)."""
    outer = int(np.prod([sch.get(loop).extent.value for loop in outer_loops]))
    extent = sch.get(rows).extent.value
    return max(d for d in range(1, extent + 1) if extent % d == 0 and (outer * extent // d >= PARALLEL_TASKS or d == 1))


def _fuse_epilogue(sch: Schedule, conv, tile_loop) -> None:
    """Accumulate a tile in a small buffer LLVM keeps in registers; requantize it right there."""
    accumulators = sch.cache_write(conv, 0, "global")
    sch.reverse_compute_at(accumulators, tile_loop)
    sch.compute_inline(accumulators)  # the epilogue reads the tile's accumulators directly
    sch.reverse_compute_at(sch.get_sblock("epilogue"), tile_loop)


# ---------------------------------------------------------------------------------------------
# Relax: find QDQ convolutions and replace them by kernel calls


def _covered(match: ConvMatch) -> bool:
    """The convs the integer kernels compute: a uint8 input of static NCHW shape, symmetric int8 weights
    (one scale, or one per output channel), NCHW/OIHW, undilated, ungrouped or depthwise."""
    attrs = match.conv.attrs
    ty = match.input.data.ty
    if (
        any(int(d) != 1 for d in attrs.dilation)
        or (attrs.data_layout, attrs.kernel_layout, attrs.out_layout) != ("NCHW", "OIHW", "NCHW")
        or ty.dtype != "uint8"
        or ty.shape is None
        or len(ty.shape) != 4
        or not all(isinstance(d, tirx.IntImm) for d in ty.shape)
        or match.weight.dtype != np.int8
    ):
        return False
    out_channels = match.weight.shape[0]
    if int(attrs.groups) != 1 and not match.depthwise:
        return False
    scale = match.weight_scale
    per_channel = scale.size == out_channels and (scale.size == 1 or match.weight_axis == 0)
    return not (scale.size != 1 and not per_channel or np.any(match.weight_zero != 0))


def integer_conv(
    match: ConvMatch, bias: Bias | None, output: tuple[float, int] | None, dequantized: bool = False
) -> IntegerConv:
    """The integer form of a matched conv; `output` = (scale, zero point) when it is requantized,
    `dequantized` when the uint8 result is only ever dequantized again with the same parameters."""
    weight_scale = match.channel_scales(np.float32)
    weight_sum = match.weight.astype(np.int64).sum(axis=(1, 2, 3))
    correction = -match.input.zero_point * weight_sum
    real_scale = np.float64(np.float32(match.input.scale)) * weight_scale.astype(np.float64)
    float_bias = np.zeros_like(real_scale)
    if bias is not None:
        exact = bias.quantized is not None and np.array_equal(
            bias.scale, (np.float32(match.input.scale) * weight_scale).astype(np.float32)
        )
        if exact:  # the bias lives on the accumulator's grid: fold it into the integer correction
            correction = correction + bias.quantized
        else:
            float_bias = bias.values.astype(np.float64)
    if output is None:
        multiplier, offset = real_scale, float_bias
    else:
        scale, zero_point = output
        multiplier, offset = real_scale / scale, float_bias / scale + zero_point
    return IntegerConv(
        weight=match.weight,
        strides=match.strides,
        padding=match.padding,
        input_zero_point=match.input.zero_point,
        correction=correction.astype(np.int32),
        multiplier=multiplier.astype(np.float32),
        offset=offset.astype(np.float32),
        requantize=output is not None,
        dequantize=output if dequantized else None,
        depthwise=match.depthwise,
    )


@dataclass(frozen=True)
class _Replacement:
    conv: IntegerConv
    data: relax.Var
    input_shape: tuple[int, ...]
    sole_reader: bool  # the conv is all that reads `data` (through its one dequantize)


@dataclass(frozen=True)
class _DequantizingNorm:
    """What an instance norm of a requantized conv's output reads instead of the floats it dequantizes."""

    data: relax.Var  # the uint8 tensor (an integer conv's) that the norm reads through a dequantize
    dequantize: tuple[float, int]  # its (scale, zero point)


def _plan_replacements(func: relax.Function
                       ) -> tuple[dict[relax.Var, _Replacement], dict[relax.Var, _DequantizingNorm]]:
    """Binding var -> the integer conv that computes it. A requantized conv replaces the quantize
    binding; a conv without output quantize replaces its bias add (or the conv itself). Also binding
    var -> the dequantizing norm that computes it: an instance norm of a requantized conv's output
    reads its bytes (`dequantizing_instance_norm`) instead of floats the conv wrote dequantized."""
    var2val = relax.analysis.get_var2val(func)
    convs = conv_matches(var2val, _covered)

    users = users_of(func, var2val)

    def replacement(match, bias, output, dequantized=False):
        shape = tuple(int(d) for d in match.input.data.ty.shape)
        readers = users.get(match.input.data, [])
        sole_reader = len(readers) == 1 and readers[0] is not None and len(users.get(readers[0], [])) == 1
        return _Replacement(integer_conv(match, bias, output, dequantized), match.input.data, shape, sole_reader)

    # A dequantize that an integer conv reads through keeps its uint8 input alive: the conv before it
    # must then write uint8 (requantize), not its dequantized float.
    read_by_convs = {var2val[conv].args[0] for conv in convs}

    plans, norms, claimed = {}, {}, set()
    for var, value in var2val.items():
        found = match_quantized_conv(value, convs, var2val)
        if found is None or found.quantize.attrs.out_dtype != "uint8":
            continue
        match, bias, conv_var = found.conv, found.bias, found.conv_var
        output = (found.scale, found.zero_point)
        dequantized = users[var][0] if len(users[var]) == 1 else None
        dequantize = call_to(dequantized, "relax.dequantize", var2val) if dequantized is not None else None
        if (dequantize is not None and dequantized not in read_by_convs
                and _dequantizes_with(dequantize, output, var2val)):
            norm = _sole_instance_norm(dequantized, users, var2val)
            if norm is not None:
                norms[norm] = _DequantizingNorm(var, output)
                plans[var] = replacement(match, bias, output)
            else:
                plans[dequantized] = replacement(match, bias, output, dequantized=True)
            claimed.add(var)
        else:
            plans[var] = replacement(match, bias, output)
        claimed.update({conv_var, found.quantize.args[0]})
    for var, value in var2val.items():
        if var in claimed or var in plans:
            continue
        bias = match_bias(value, convs, var2val)
        if bias is not None and bias.conv not in claimed:
            plans[var] = replacement(convs[bias.conv], bias, None)
            claimed.add(bias.conv)
    for var, match in convs.items():
        if var not in claimed:
            plans[var] = replacement(match, None, None)
    return plans, norms


def _sole_instance_norm(dequantized: relax.Var, users, var2val) -> relax.Var | None:
    """The binding var of the instance norm that is all that reads `dequantized`, over NCHW's spatial
    axes with float32 gamma and beta; else None."""
    readers = users.get(dequantized, [])
    if len(readers) != 1 or readers[0] is None:
        return None
    norm = call_to(readers[0], "relax.nn.instance_norm", var2val)
    if norm is None or not norm.args[0].same_as(dequantized) or int(norm.attrs.channel_axis) != 1:
        return None
    spatial = list(range(2, len(dequantized.ty.shape)))
    if [int(a) for a in norm.attrs.axes] != spatial or any(str(a.ty.dtype) != "float32" for a in norm.args[1:]):
        return None
    return readers[0]


def _dequantizes_with(dequantize: relax.Call, output: tuple[float, int], var2val) -> bool:
    scale, zero_point = (scalar(constant(a, var2val)) for a in dequantize.args[1:3])
    return scale is not None and zero_point is not None and (scale, int(zero_point)) == output


@relax.expr_functor.mutator
class _IntegerConvRewriter(relax.PyExprMutator):
    def __init__(self, mod: tvm.IRModule, target: tvm.target.Target) -> None:
        super().__init__(mod)
        self.target = target
        self.plans: dict[relax.Var, _Replacement] = {}
        self.norms: dict[relax.Var, _DequantizingNorm] = {}
        self.users: dict[relax.Var, list] = {}  # of the function being rewritten, before the rewrite
        self.shared_packings: dict[tuple, tuple[int, ...]] = {}  # see `_shared_packings`
        self.packed_inputs: dict[tuple, relax.Var] = {}  # a shared packing, once emitted
        self.kernels: dict[str, KernelPlan] = {}  # kernel name -> its plan (identical convs share one kernel)

    def visit_var_binding_(self, binding: relax.VarBinding) -> None:
        norm = self.norms.get(binding.var)
        if norm is not None:
            self._emit(binding, self._dequantizing_norm(binding.value, norm))
            return
        replacement = self.plans.get(binding.var)
        if replacement is None:
            super().visit_var_binding_(binding)
            return
        conv, shape = replacement.conv, replacement.input_shape
        plan = plan_kernel(conv, shape, self.target)
        data = self.visit_expr(replacement.data)
        padding = (self._quantized_reflection_padding(data) if replacement.sole_reader and prepackable(conv, plan)
                   else None)
        key = _packing_key(replacement, plan)
        shared = self.shared_packings.get(key) if padding is None else None  # one packing for convs of one input
        packed_shape = shared or packed_input_shape(conv, shape, plan)
        kernel = build_kernel(conv, shape, plan, prepacked=padding is not None or key in self.packed_inputs,
                              packed_shape=packed_shape)
        if padding is not None:  # the pad writes the conv's packed input
            source, pad, scale, quantize, quantize_to = padding
            quantized_input = _quantizes_before_pad(source, self, self.users)
            if quantized_input:
                axis = int(quantize.attrs.axis)
                source = self.builder_.emit(relax.op.quantize(source, *quantize.args[1:], axis, "uint8"))
            pad_kernel = packed_reflection_pad(static_shape(source), pad, scale, quantize_to, packed_shape,
                                               quantized_input)
            data = self._packed(pad_kernel, "reflection_pad", source, packed_shape)
        elif kernel.pack is not None:
            data = self._packed(kernel.pack, "int8_pack", data, packed_shape)
            if shared is not None:
                self.packed_inputs[key] = data
        elif shared is not None:
            data = self.packed_inputs[key]
        args = [data, *(relax.const(c) for c in kernel.constants)]
        out_ty = relax.TensorType(conv.output_shape(shape), conv.out_dtype)
        gvar = self.builder_.add_func(kernel.func, INTEGER_CONV)
        self.kernels[gvar.name_hint] = plan
        self._emit(binding, relax.call_tir(gvar, args, out_ty))

    def _emit(self, binding: relax.VarBinding, value: relax.Expr) -> None:
        emit = self.builder_.emit if isinstance(binding.var, relax.DataflowVar) else self.builder_.emit_output
        self.set_var_remap(binding.var, emit(value, binding.var.name))

    def _dequantizing_norm(self, norm: relax.Call, plan: _DequantizingNorm) -> relax.Expr:
        shape = tuple(int(d) for d in norm.ty.shape)
        kernel = dequantizing_instance_norm(shape, plan.dequantize, float(norm.attrs.epsilon))
        args = [self.visit_expr(plan.data), self.visit_expr(norm.args[1]), self.visit_expr(norm.args[2])]
        return relax.call_tir(self.builder_.add_func(kernel, "instance_norm"), args, relax.TensorType(shape, "float32"))

    def _packed(self, kernel: tirx.PrimFunc, name: str, source: relax.Expr,
                packed_shape: tuple[int, ...]) -> relax.Expr:
        """The conv's packed input, as `kernel` writes it from `source`."""
        return self.builder_.emit(relax.call_tir(self.builder_.add_func(kernel, name), [source],
                                                 relax.TensorType(packed_shape, "uint8")))

    def _quantized_reflection_padding(self, data: relax.Expr
                                      ) -> tuple[relax.Expr, int, int, relax.Call, tuple[float, float]] | None:
        """(x, p, s, quantize, (scale, zero point)) where `data` is x (upsampled s times) reflection-padded
        by p and quantized to uint8 with one scale and zero point, as an int8 file's Pad before a conv is
        imported; None for anything else."""
        quantize = bound_call(data, self, "relax.quantize")
        quantize_to = uint8_quantization(quantize, self) if quantize is not None else None
        padded = bound_call(quantize.args[0], self, "relax.call_tir") if quantize_to is not None else None
        padding = reflection_padding(padded, self) if padded is not None else None
        return None if padding is None else (*padding, quantize, quantize_to)


def _packing_key(replacement: _Replacement, plan: KernelPlan) -> tuple:
    """What decides a direct conv's packed input but its rows and columns: the input, the layout (with
    the pixel kernel's column phases), the zero point and where the padding starts."""
    conv = replacement.conv
    phases = conv.strides[1] if plan.layout == "pixels" else 1
    return replacement.data, plan.layout, phases, conv.input_zero_point, conv.padding[:2]


def _shared_packings(plans: dict[relax.Var, _Replacement], target: tvm.target.Target) -> dict[tuple, tuple[int, ...]]:
    """One packing for the direct convs that read one input alike (`_packing_key`: a sub-pixel transposed
    conv's phases, which differ only in kernel size and bottom and right padding): key -> the layout with
    the most rows and columns any of them reads. 4 pack kernels became 1 for each of resnet6+ptq's two."""
    shapes: dict[tuple, list] = {}
    for replacement in plans.values():
        plan = plan_kernel(replacement.conv, replacement.input_shape, target)
        if plan.layout in ("channels", "pixels"):
            shape = packed_input_shape(replacement.conv, replacement.input_shape, plan)
            shapes.setdefault(_packing_key(replacement, plan), []).append(shape)
    return {key: tuple(max(dims) for dims in zip(*group)) for key, group in shapes.items() if len(group) > 1}


def _quantizes_before_pad(source: relax.Expr, mutator: relax.PyExprMutator, users: dict) -> bool:
    """Whether the quantize after a reflection pad moves before it, and so into the kernel computing the
    pad's float input (a norm's), which then stores a byte a value for the pad to copy: where the pad is
    all that reads that input, an op's result (not a kernel's, nor a parameter, which would take a
    quantize kernel of their own)."""
    producer = mutator.lookup_binding(source) if isinstance(source, relax.Var) else None
    computed = isinstance(producer, relax.Call) and isinstance(producer.op, tvm.ir.Op)
    return computed and not is_op(producer, "relax.call_tir") and len(users.get(source, [])) == 1


def _instance_norm_of(expr: relax.Expr, var2val) -> tuple[relax.Expr, float] | None:
    """(x, epsilon) when `expr` is the ONNX frontend's InstanceNormalization without its affine part:
    divide(subtract(x, mean(x)), sqrt(add(variance(x), eps))) over every axis after the channels."""
    divide = call_to(expr, "relax.divide", var2val)
    if divide is None:
        return None
    subtract = call_to(divide.args[0], "relax.subtract", var2val)
    sqrt = call_to(divide.args[1], "relax.sqrt", var2val)
    if subtract is None or sqrt is None:
        return None
    x = subtract.args[0]
    mean = call_to(subtract.args[1], "relax.mean", var2val)
    shifted = call_to(sqrt.args[0], "relax.add", var2val)
    variance = call_to(shifted.args[0], "relax.variance", var2val) if shifted is not None else None
    epsilon = scalar(constant(shifted.args[1], var2val)) if shifted is not None else None
    shape = getattr(x.ty, "shape", None)
    if mean is None or variance is None or epsilon is None or shape is None or len(shape) < 3:
        return None
    spatial = list(range(2, len(shape)))
    for reduction in (mean, variance):
        if not reduction.args[0].same_as(x) or [int(a) for a in reduction.attrs.axis] != spatial:
            return None
        if not reduction.attrs.keepdims:
            return None
    return x, epsilon


@relax.expr_functor.mutator
class _InstanceNormFolder(relax.PyExprMutator):
    """Put the frontend's decomposed instance norm back into one `relax.nn.instance_norm`.

    Decomposed, it is a mean, a variance and an elementwise pass that FuseOps cannot join, so a
    dequantized conv output went through memory four times; as one op the dequantize before and
    the ReLU/quantize after fuse into it.
    """

    def __init__(self, mod: tvm.IRModule) -> None:
        super().__init__(mod)
        self.var2val: dict = {}
        self.folded = 0

    def visit_var_binding_(self, binding: relax.VarBinding) -> None:
        found = _instance_norm_of(binding.value, self.var2val)
        if found is None:
            super().visit_var_binding_(binding)
            return
        x, epsilon = found
        channels = int(x.ty.shape[1])
        dtype = str(x.ty.dtype)
        norm = relax.op.nn.instance_norm(
            self.visit_expr(x), relax.const(np.ones(channels, dtype)), relax.const(np.zeros(channels, dtype)),
            channel_axis=1, axes=list(range(2, len(x.ty.shape))), epsilon=epsilon,
        )
        emit = self.builder_.emit if isinstance(binding.var, relax.DataflowVar) else self.builder_.emit_output
        self.set_var_remap(binding.var, emit(norm, binding.var.name))
        self.folded += 1


def fold_instance_norms(mod: tvm.IRModule) -> tuple[tvm.IRModule, int]:
    """Every decomposed instance norm of `mod` as one op; returns the module and how many were folded."""
    folder = _InstanceNormFolder(mod)
    for gvar, func in mod.functions_items():
        if isinstance(func, relax.Function):
            folder.var2val = relax.analysis.get_var2val(func)
            folder.builder_.update_func(gvar, relax.analysis.remove_all_unused(folder.visit_expr(func)))
    return folder.builder_.get(), folder.folded


QDQ_OPS = ("QuantizeLinear", "DequantizeLinear", "Constant")


@dataclass(frozen=True)
class LoweringSummary:
    """What the pass did: integer convs emitted, how many of them tensorized, and with what."""

    integer_convs: int
    tensorized: int
    intrinsics: tuple[str, ...]
    winograd: int  # of the integer convs, those run as exact integer Winograd
    depthwise: int  # of the integer convs, the depthwise ones (`_depthwise_kernel`)
    instance_norms: int  # decomposed instance norms put back together (see _InstanceNormFolder)

    def describe(self, graph_ops: dict[str, int], transposed: int = 0, phases: int = 0) -> str:
        """One line for the user: which of the file's convolutions run as integer kernels and how, and
        which ops (`graph_ops`: ONNX op type -> count, in QDQ form) run in float between the (de)quantizes.
        `transposed` ConvTranspose ops were imported as `phases` sub-pixel convolutions."""
        convs = graph_ops.get("Conv", 0) + phases
        how = ", ".join(self.intrinsics) or "portable integer code"
        if self.winograd:
            how += f"; {self.winograd} as integer Winograd"
        if self.depthwise:
            how += f"; {self.depthwise} depthwise"
        if phases:
            how += f"; {phases} sub-pixel phases of {transposed} ConvTranspose"
        floats = {op: n for op, n in graph_ops.items() if op not in ("Conv", *QDQ_OPS)}
        floats["ConvTranspose"] = floats.get("ConvTranspose", 0) - transposed
        floats["Conv"] = convs - self.integer_convs
        listed = ", ".join(op if n == 1 else f"{op} x{n}" for op, n in sorted(floats.items()) if n > 0)
        return (f"int8 lowering: {self.integer_convs}/{convs} convolutions as integer kernels ({how}); "
                f"float between dequantize and quantize: {listed or 'nothing'}")


def lower_quantized_convs(mod: tvm.IRModule, target: tvm.target.Target) -> tuple[tvm.IRModule, LoweringSummary]:
    """Replace every QDQ convolution of `mod`'s Relax functions by an integer kernel for `target`.

    Identical quantizes are merged first: exporters quantize a tensor once per reading conv (the
    four sub-pixel phases of a transposed conv), and as one op it fuses into the norm before it.
    """
    mod, instance_norms = fold_instance_norms(relax.transform.EliminateCommonSubexpr()(mod))
    rewriter = _IntegerConvRewriter(mod, target)
    for gvar, func in mod.functions_items():
        if isinstance(func, relax.Function):
            rewriter.plans, rewriter.norms = _plan_replacements(func)
            rewriter.users = users_of(func, relax.analysis.get_var2val(func))
            rewriter.shared_packings, rewriter.packed_inputs = _shared_packings(rewriter.plans, target), {}
            if rewriter.plans:
                rewritten = relax.analysis.remove_all_unused(rewriter.visit_expr(func))
                rewriter.builder_.update_func(gvar, rewritten)
    lowered = relax.transform.DeadCodeElimination()(rewriter.builder_.get())
    # What runs: one plan per call left (a kernel whose result nothing read is gone; identical convs share one).
    kernels = [rewriter.kernels[call.args[0].name_hint] for func in lowered.functions.values() if isinstance(func, relax.Function)
               for block in func.body.blocks for call in (b.value for b in block.bindings)
               if isinstance(call, relax.Call) and call.op.same_as(tvm.ir.Op.get("relax.call_tir"))
               and call.args[0].name_hint in rewriter.kernels]
    summary = LoweringSummary(
        integer_convs=len(kernels),
        tensorized=sum(k.intrinsic is not None for k in kernels),
        intrinsics=tuple(sorted({k.intrinsic for k in kernels if k.intrinsic})),
        winograd=sum(k.layout == "winograd" for k in kernels),
        depthwise=sum(k.layout == "depthwise" for k in kernels),
        instance_norms=instance_norms,
    )
    return schedule_float_ops(lowered, target), summary
