"""Integer convolutions on Intel AMX tiles (`tdpbsud`) for the CPUs that have them (Sapphire Rapids on).

Why: an AVX-512 VNNI `vpdpbusd` retires 64 u8 x s8 multiply-adds, 4x an fp32 FMA, so a direct int8
3x3 convolution can at best match the fp32 one that runs as Winograd (4x fewer multiplies), and a
residual trunk gains nothing from int8. One AMX `tdpbsud` multiplies a 16 x 64 int8 tile by a
64 x 16 uint8 tile into 16 x 16 int32 sums: 16384 multiply-adds, 1024 a cycle on one core.

The kernel is a direct convolution as a sum of matrix products, one per kernel tap and block of
up to 64 input channels:
- A tile (int8): 16 output channels x the block's input channels, from weights packed at compile
  time as [OC/16, C/64, KH, KW, 16, 64];
- B tile (uint8): the block's input channels x 16 output pixels of a row, in the VNNI layout AMX
  wants (rows of 4 channels x 16 pixels), which is the NCHW[4c] packing compile/int8/lowering.py makes for
  VNNI: row r of the tile is channel group r, 16 consecutive pixels of 4 bytes;
- C tiles (int32): 16 channels x 16 pixels, four of them (2 channel blocks x 2 pixel blocks)
  accumulated in tile registers over the whole reduction, then stored to a small buffer whose rows
  the requantizing epilogue reads as vectors of pixels.
A row of B is 16 consecutive output pixels, so a conv strided along the width, and one with few
input channels (a 3-channel stem would fill 4 of a product's 64 bytes), first folds its kernel
columns into input channels (`folds_columns`). Convolutions without whole 16-channel output blocks
(an RGB output layer) or with rows that split only into narrow tiles keep the VNNI kernels.

Linux hands out AMX's 8 KB of tile state per process on request (arch_prctl ARCH_REQ_XCOMP_PERM);
without it the first tile instruction kills the process with SIGILL. Each kernel asks first (a
cheap system call when already granted) and raises a TVM error if refused, so any process that
loads the library can run it.
"""

from __future__ import annotations

import numpy as np
import tvm
from tvm import tirx
from tvm.script.ir_builder import IRBuilder
from tvm.script.ir_builder import tirx as T
from tvm.target.codegen import target_has_features

from compile.int8.intrinsics import REDUCTION

CHANNELS = 16  # output channels per tile (the A tile's rows)
PIXELS = 16  # output pixels per tile (the C tile's 64-byte rows of int32)
MIN_PIXELS = 8  # narrower tiles (rows of odd widths) do too little per tile load: VNNI runs them
BLOCK_BYTES = 64  # input channels per product: the A tile's row, in bytes
# tile registers: 4 accumulators (2 channel blocks x 2 pixel blocks), 2 weight tiles, 2 input tiles
ACCUMULATORS, WEIGHTS, INPUTS = (0, 1, 2, 3), (4, 5), (6, 7)
SYS_ARCH_PRCTL, ARCH_REQ_XCOMP_PERM, XFEATURE_XTILEDATA = 158, 0x1023, 18
INTRINSIC = "amx_tdpbsud"  # the name lowering summaries list
# Parallel chunks of a kernel call's tile rows: each configures the tiles once (configuring them per
# row cost 10-15% of a 64-channel 3x3 conv); 8 keep up to 8 threads busy.
CHUNKS = 8
PACK_VECTOR = 16  # output columns a step of the folded packing


def available(target: tvm.target.Target) -> bool:
    return target.kind.name == "llvm" and target_has_features(["amx-tile", "amx-int8"], target)


def applies(conv, input_shape: tuple[int, ...]) -> bool:
    """Whole 16-channel output blocks, and rows that split into tiles of at least `MIN_PIXELS`
    pixels (or are one narrower tile)."""
    _, out_channels, _, out_w = conv.output_shape(input_shape)
    pixels = _tile_pixels(out_w)
    return out_channels % CHANNELS == 0 and (pixels >= MIN_PIXELS or pixels == out_w)


def _tile_pixels(out_w: int) -> int:
    """Output pixels per tile: the widest that divides the row, so no tile runs past its end."""
    return max(p for p in range(1, PIXELS + 1) if out_w % p == 0)


def folds_columns(conv) -> bool:
    """Whether the kernel's columns become input channels (C x KW of them, one kernel column):
    for a conv strided along the width, and for fewer than 64 input channels (a 7x7 stem's 3
    become 21, filling 24 of a product's 64 bytes instead of 4, in 7 products instead of 49)."""
    return conv.strides[1] > 1 or conv.weight.shape[1] < BLOCK_BYTES


def _block_channels(channels: int) -> int:
    """Input channels per product: up to 64, whole 4-channel groups."""
    return min(BLOCK_BYTES, -(-channels // REDUCTION) * REDUCTION)


def pack_weight(conv) -> np.ndarray:
    """OIHW int8 -> [OC/16, C/K, KH, KW, 16, K] (K = `_block_channels`), input channels
    zero-filled; folded (`folds_columns`), input channel rx * C + c is column rx of channel c."""
    weight = conv.weight
    if folds_columns(conv):
        oc, c, kh, kw = weight.shape
        weight = weight.transpose(0, 3, 1, 2).reshape(oc, kw * c, kh, 1)
    oc, c, kh, kw = weight.shape
    block = _block_channels(c)
    blocks = -(-c // block)
    padded = np.zeros((oc, blocks * block, kh, kw), np.int8)
    padded[:, :c] = weight
    tiled = padded.reshape(oc // CHANNELS, CHANNELS, blocks, block, kh, kw)
    return np.ascontiguousarray(tiled.transpose(0, 2, 4, 5, 1, 3))


def _llvm(name: str, *args) -> None:
    T.evaluate(T.call_llvm_intrin("void", f"llvm.x86.{name}", *args))


def _tile(index: int):
    return tirx.const(index, "uint8")


def _products(conv, channels: int) -> tuple[int, int, int, int]:
    """(lanes, columns, block, blocks): the packed input's channels (C, or C x KW folded), the kernel
    columns the products still step over, input channels per product, and products per tap."""
    kw = conv.weight.shape[3]
    lanes, columns = (channels * kw, 1) if folds_columns(conv) else (channels, kw)
    block = _block_channels(lanes)
    return lanes, columns, block, -(-lanes // block)


def packed_input_shape(conv, input_shape: tuple[int, ...]) -> tuple[int, int, int, int, int]:
    """The layout the kernel reads its input in, NCHW[4c] as bytes: (N, groups of 4 channels, rows,
    columns, 4), the channels zero-point-filled to whole product blocks and the rows and columns
    padded (for a folded conv, its channels are the C x KW folded ones and its columns the outputs')."""
    n, channels = (int(d) for d in input_shape[:2])
    _, _, out_h, out_w = conv.output_shape(input_shape)
    _, columns, block, blocks = _products(conv, channels)
    rows = (out_h - 1) * conv.strides[0] + conv.weight.shape[2]
    return n, blocks * block // REDUCTION, rows, out_w + columns - 1, REDUCTION


def amx_kernel(conv, input_shape: tuple[int, ...], prepacked: bool = False) -> tirx.PrimFunc:
    """The PrimFunc (data, packed weight, correction, multiplier, offset) -> NCHW output for an
    `IntegerConv` (compile/int8/lowering.py) that `applies`. With `prepacked` (an unfolded conv of
    stride 1 whose input arrives padded) `data` is already in `packed_input_shape`, written by the
    kernel before it (a reflection pad: compile/schedules/pad.py), and the kernel packs nothing."""
    n, channels, height, width = (int(d) for d in input_shape)
    _, out_channels, out_h, out_w = conv.output_shape(input_shape)
    kh = conv.weight.shape[2]
    top, left = conv.padding[:2]
    stride_h, stride_w = conv.strides
    folded = folds_columns(conv)
    if prepacked and (folded or conv.strides != (1, 1) or any(conv.padding)):
        raise ValueError("only an unfolded conv of stride 1 without padding of its own reads a packed input")
    lanes, columns, block, blocks = _products(conv, channels)
    _, groups, packed_h, packed_w, _ = packed_input_shape(conv, input_shape)
    pixels = _tile_pixels(out_w)
    pixel_tiles = 2 if out_w % (2 * pixels) == 0 else 1
    row_block = pixels * pixel_tiles
    channel_tiles = 2 if out_channels % (2 * CHANNELS) == 0 else 1
    channel_pairs = out_channels // (CHANNELS * channel_tiles)

    with IRBuilder() as ib, T.prim_func(private=True):
        T.func_attr({"tirx.noalias": True, "tirx.is_scheduled": True})
        data = T.arg("data", T.buffer((n, groups, packed_h, packed_w, REDUCTION) if prepacked
                                      else (n, channels, height, width), "uint8"))
        weight = T.arg("weight", T.buffer((out_channels // CHANNELS, blocks, kh, columns, CHANNELS, block), "int8"))
        correction = T.arg("correction", T.buffer((out_channels,), "int32"))
        multiplier = T.arg("multiplier", T.buffer((out_channels,), "float32"))
        offset = T.arg("offset", T.buffer((out_channels,), "float32"))
        out = T.arg("out", T.buffer((n, out_channels, out_h, out_w), conv.out_dtype))
        with T.sblock("root"):
            with tile_state_granted():
                if prepacked:
                    def input_row(b, group, y, x):  # the address of a B tile's first row
                        return T.address_of(data[b, group, y, x, 0])
                else:
                    # NCHW -> NCHW[4c] as one 32-bit word per 4 channels of a pixel, the zero point
                    # around the image and in missing channels
                    packed = T.alloc_buffer((n, groups, packed_h, packed_w), "uint32")
                    if folded:
                        _pack_folded(data, packed, conv.input_zero_point, (top, left), stride_w, lanes)
                    else:
                        _pack(data, packed, conv.input_zero_point, (top, left))

                    def input_row(b, group, y, x):
                        return T.address_of(packed[b, group, y, x])
                config = T.alloc_buffer((64,), "uint8")
                _fill_config(config, pixels, block)
                tasks = n * channel_pairs * out_h  # rows of output tiles, per channel pair
                chunks = min(CHUNKS, tasks)
                per_chunk = -(-tasks // chunks)
                with T.parallel(0, chunks) as chunk:
                    _llvm("ldtilecfg", T.address_of(config[0]))
                    with T.serial(0, per_chunk) as step, T.If(chunk * per_chunk + step < tasks), T.Then():
                        task = chunk * per_chunk + step
                        b, pair, y = task // (channel_pairs * out_h), (task // out_h) % channel_pairs, task % out_h
                        sums = T.alloc_buffer((channel_tiles * CHANNELS, row_block), "int32", scope="local")
                        with T.serial(0, out_w // row_block) as column_block:
                            x0 = column_block * row_block
                            for index in ACCUMULATORS[: channel_tiles * pixel_tiles]:
                                _llvm("tilezero", _tile(index))
                            with T.serial(0, blocks) as cb, T.serial(0, kh) as ry, T.serial(0, columns) as rx:
                                for i in range(channel_tiles):
                                    tile = weight[pair * channel_tiles + i, cb, ry, rx, 0, 0]
                                    _llvm("tileloadd64", _tile(WEIGHTS[i]), T.address_of(tile), tirx.const(block, "int64"))
                                group = cb * (block // REDUCTION)
                                for j in range(pixel_tiles):
                                    row = input_row(b, group, y * stride_h + ry, x0 + j * pixels + rx)
                                    _llvm("tileloadd64", _tile(INPUTS[j]), row,
                                          tirx.const(packed_h * packed_w * REDUCTION, "int64"))
                                for i in range(channel_tiles):
                                    for j in range(pixel_tiles):
                                        _llvm("tdpbsud", _tile(ACCUMULATORS[i * pixel_tiles + j]), _tile(WEIGHTS[i]),
                                              _tile(INPUTS[j]))
                            for i in range(channel_tiles):
                                for j in range(pixel_tiles):
                                    _llvm("tilestored64", _tile(ACCUMULATORS[i * pixel_tiles + j]),
                                          T.address_of(sums[i * CHANNELS, j * pixels]), tirx.const(row_block * 4, "int64"))
                            _epilogue(conv, sums, out, (correction, multiplier, offset), b, pair * channel_tiles * CHANNELS,
                                      y, x0)
                    _llvm("tilerelease")
    return ib.get()


def tile_state_granted():
    """A TIR assert frame: Linux grants this process AMX tile state (a cheap system call once it has),
    else the kernel raises a TVM error; tile instructions go inside it."""
    granted = T.call_extern("int64", "syscall", tirx.const(SYS_ARCH_PRCTL, "int64"),
                            tirx.const(ARCH_REQ_XCOMP_PERM, "int64"), tirx.const(XFEATURE_XTILEDATA, "int64"))
    return T.Assert(granted == tirx.const(0, "int64"), ["Linux refused this process AMX tile state"])


def _word(values) -> tirx.PrimExpr:
    """Four uint8 values as one little-endian uint32: the 4 channels of a pixel in NCHW[4c]."""
    word = None
    for i, value in enumerate(values):
        part = value.astype("uint32") if i == 0 else tirx.shift_left(value.astype("uint32"), tirx.const(8 * i, "uint32"))
        word = part if word is None else tirx.bitwise_or(word, part)
    return word


def _pack(data, packed, zero_point: int, padding) -> None:
    """Unfolded packing, vectorized along each row: border columns and rows are the zero point,
    inner columns combine 4 channel rows into words (a byte at a time it took 24 of a 64-channel
    3x3 conv's 62 us, measured alone; 5 us this way)."""
    n, channels, height, width = (int(d) for d in data.shape)
    _, groups, packed_h, packed_w = (int(d) for d in packed.shape)
    top, left = padding
    border = tirx.const(zero_point * 0x01010101, "uint32")
    vector = max(v for v in range(1, 17) if width % v == 0)
    with T.parallel(0, n * groups) as bg, T.serial(0, packed_h) as y:
        b, group = bg // groups, bg % groups
        with T.If(tirx.all(y >= top, y < top + height)):
            with T.Then():
                for x in [*range(left), *range(left + width, packed_w)]:
                    T.buffer_store(packed, border, [b, group, y, x])
                with T.serial(0, width // vector) as chunk, T.vectorized(0, vector) as lane:
                    x = chunk * vector + lane
                    values = []
                    for i in range(REDUCTION):
                        c = group * REDUCTION + i
                        values.append(tirx.if_then_else(c < channels, data[b, tirx.min(c, channels - 1), y - top, x],
                                                        tirx.const(zero_point, "uint8")))
                    T.buffer_store(packed, _word(values), [b, group, y, left + x])
            with T.Else(), T.vectorized(0, packed_w) as x:
                T.buffer_store(packed, border, [b, group, y, x])


def _pack_folded(data, packed, zero_point: int, padding, stride_w: int, lanes: int) -> None:
    """Folded packing (`folds_columns`): lane rx * C + c of output column x is input column
    x * stride + rx of channel c. The columns whose every lane reads inside the row go
    `PACK_VECTOR` at a time (a strided vector load per lane), the rest one word at a time. Packed
    a byte at a time, a strided conv's input took longer than its tile products (16 -> 32 channels
    at 128x128: 0.039 ms against about 0.032; 0.028 ms this way)."""
    n, channels, height, width = (int(d) for d in data.shape)
    _, groups, packed_h, packed_w = (int(d) for d in packed.shape)
    top, left = padding
    columns = lanes // channels  # the kernel columns folded into channels
    first = -(-left // stride_w)  # the first output column whose lanes all read inside the row
    end = max(first, min(packed_w, (width - columns + left) // stride_w + 1))  # one past the last
    vectors = (end - first) // PACK_VECTOR
    zero = tirx.const(zero_point, "uint8")
    with T.parallel(0, n * groups) as bg, T.serial(0, packed_h) as y:
        b, group, sy = bg // groups, bg % groups, y - top

        def word(x, inside_row: bool):
            """The word of output column x; `inside_row`: every lane's column is inside the row."""
            values = []
            for i in range(REDUCTION):
                lane = group * REDUCTION + i
                c, rx = lane % channels, tirx.min(lane // channels, columns - 1)  # rx of spare lanes: any
                sx = x * stride_w + rx - left
                inside = lane < lanes if inside_row else tirx.all(lane < lanes, sx >= 0, sx < width)
                value = data[b, c, sy, sx if inside_row else tirx.max(tirx.min(sx, width - 1), 0)]
                values.append(tirx.if_then_else(inside, value, zero))
            return _word(values)

        with T.If(tirx.all(sy >= 0, sy < height)):
            with T.Then():
                for x in [*range(first), *range(end, packed_w)]:
                    T.buffer_store(packed, word(x, False), [b, group, y, x])
                with T.serial(0, vectors) as chunk, T.vectorized(0, PACK_VECTOR) as lane:
                    x = first + chunk * PACK_VECTOR + lane
                    T.buffer_store(packed, word(x, True), [b, group, y, x])
                with T.serial(first + vectors * PACK_VECTOR, end) as x:
                    T.buffer_store(packed, word(x, True), [b, group, y, x])
            with T.Else(), T.vectorized(0, packed_w) as x:
                T.buffer_store(packed, tirx.const(zero_point * 0x01010101, "uint32"), [b, group, y, x])


def _fill_config(config, pixels: int, block: int) -> None:
    """The 64-byte tile configuration (palette 1): rows and bytes per row of each tile register."""
    with T.serial(0, 64) as i:
        T.buffer_store(config, tirx.const(0, "uint8"), [i])
    T.buffer_store(config, tirx.const(1, "uint8"), [0])
    shapes = {index: (CHANNELS, pixels * 4) for index in ACCUMULATORS}
    shapes.update({index: (CHANNELS, block) for index in WEIGHTS})
    shapes.update({index: (block // REDUCTION, pixels * REDUCTION) for index in INPUTS})
    for index, (rows, row_bytes) in shapes.items():
        T.buffer_store(config, tirx.const(row_bytes, "uint8"), [16 + 2 * index])  # little-endian uint16, < 256
        T.buffer_store(config, tirx.const(rows, "uint8"), [48 + index])


def _epilogue(conv, sums, out, per_channel, b, channel0, y, x0) -> None:
    """Requantize (or dequantize) the tile's sums into the NCHW output, a vector of pixels at a time."""
    correction, multiplier, offset = per_channel
    rows, row_block = (int(d) for d in sums.shape)
    with T.serial(0, rows) as i, T.vectorized(0, row_block) as px:
        channel = channel0 + i
        value = conv.finish(sums[i, px] + correction[channel], channel, multiplier, offset)
        T.buffer_store(out, value, [b, channel, y, x0 + px])
