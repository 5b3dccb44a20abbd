"""A default CPU schedule for direct fp32 2-D convolutions that no tuning record covers.

Left to TVM's default loops, an untuned convolution runs serially, one scalar multiply-add at a
time (1-2 GFLOP/s): an untuned 9-block CycleGAN generator took ~8 s per 256x256 image, mostly in
its convolutions. This is the classic direct-convolution micro-kernel instead: a register tile of
outputs accumulated over the reduction (input channels x kernel rows x kernel columns), the bias,
activation and other elementwise blocks fused into its write-back, tiles split over the cores.

A tile's vectors run along one of two axes (`choose_tile` weighs them):
- "pixels": consecutive output pixels of a row, which read contiguous inputs when the stride along
  the width is 1, times a few output channels whose weights are broadcast;
- "channels": consecutive output channels, whose weights are repacked at the start of the kernel
  so that they are contiguous, times a few output pixels whose inputs are broadcast. It fits any
  stride and width, and many input channels (see `_input_channel_chunk`).
"""

from __future__ import annotations

from dataclasses import dataclass

import tvm
from tvm import relax, tirx
from tvm.ir.expr import TensorLoad
from tvm.s_tir import Schedule
from tvm.s_tir.schedule import ScheduleError

# Accumulators in registers: 3/4 of the vector registers, the rest for loaded inputs and weights.
ACCUMULATOR_SHARE = 0.75
MAX_CHANNEL_VECTORS = 4  # weight vectors loaded per reduction step in a "channels" tile
MIN_VECTOR = 4  # narrowest vector of pixels tried when the width is not a multiple of the lanes
LATENCY_HIDING = 8  # independent accumulators that keep both FMA units busy despite their latency
# FMAs (kernel columns x tile channels) that a vector of input pixels should feed in a "pixels"
# tile: each reduction step loads it from another channel plane, a stride the hardware prefetcher
# does not follow. With fewer, the loads wait on L2: a 1x1 conv from 256 channels ran at 30
# GFLOP/s per core along the pixels and at 60 along the channels.
MIN_INPUT_REUSE = 16
# Block annotation MetaSchedule gives a weight layout rewrite; TVM's passes split such blocks off.
LAYOUT_REWRITE = "meta_schedule.layout_rewrite_preproc"
PREPACKED = "_prepacked"  # the suffix TVM's split gives a kernel that now reads packed weights
L1_BYTES = 32 * 1024  # L1 data cache that a pass of a "channels" tile should stay in (`_input_channel_chunk`)


@dataclass(frozen=True)
class Tile:
    """The register tile: `channels` output channels x `rows` output rows x `columns` output
    columns, in vectors of `vector` lanes along the channels or along the columns (`axis`)."""

    axis: str  # "pixels" or "channels"
    channels: int
    rows: int
    columns: int
    vector: int

    @property
    def accumulators(self) -> int:
        return self.channels * self.rows * self.columns // self.vector

    def rate(self, lanes: int, kernel_width: int) -> float:
        """Relative multiply-add throughput: the share of the lanes used, over the loads (vectors
        and broadcasts) per vector FMA of a reduction step; less when too few accumulators hide
        the FMA latency, or a "pixels" tile reuses its input vectors too little."""
        if self.axis == "pixels":
            loads = self.channels + self.rows * self.columns // self.vector
            reuse = min(1.0, kernel_width * self.channels / MIN_INPUT_REUSE)
        else:
            loads = self.channels // self.vector + self.rows * self.columns
            reuse = 1.0
        latency = min(1.0, self.accumulators / LATENCY_HIDING)
        return self.vector / lanes * latency * reuse * self.accumulators / loads


@dataclass(frozen=True)
class _Conv:
    block: object  # SBlockRV of the reduction
    out_channels: int
    height: int
    width: int
    in_channels: int
    kernel_height: int
    kernel_width: int
    stride_height: int
    stride_width: int  # 1: a vector of output pixels reads a contiguous vector of input
    input_width: int
    data: tirx.Var  # the buffers read
    weight: tirx.Var


def _divisors(n: int, at_most: int) -> list[int]:
    return [d for d in range(1, min(n, at_most) + 1) if n % d == 0]


def choose_tile(
    out_channels: int, height: int, width: int, kernel_width: int, unit_stride: bool, lanes: int
) -> Tile:
    """The tile with the best `Tile.rate` among those that divide the output and fit the
    accumulator budget (3/4 of 32 registers with 16 lanes, of 16 with 8). Vectors of pixels need
    a unit stride and a width that some vector of `MIN_VECTOR` to `lanes` pixels divides; vectors
    of channels always fit, `lanes` wide or as wide as the largest divisor of the channels below
    it (3 for an RGB output). A tile never straddles the end of a row: without partitioning the
    row (TVM 0.27 drops `pragma_loop_partition_hint` when it narrows loop indices to int32), a
    partial tile would make every tile check its bounds, and a vector of pixels would go scalar."""
    budget = int((32 if lanes >= 16 else 16) * ACCUMULATOR_SHARE)
    candidates = []
    vectors = [v for v in (lanes, lanes // 2, lanes // 4) if v >= MIN_VECTOR and width % v == 0] if unit_stride else []
    for vector in vectors:
        for channels in _divisors(out_channels, budget):
            for rows in _divisors(height, budget // channels):
                for per_row in _divisors(width // vector, budget // (channels * rows)):
                    candidates.append(Tile("pixels", channels, rows, per_row * vector, vector))
    vector = max(_divisors(out_channels, lanes))
    for channel_vectors in _divisors(out_channels // vector, MAX_CHANNEL_VECTORS):
        for rows in _divisors(height, budget // channel_vectors):
            for columns in _divisors(width, budget // (channel_vectors * rows)):
                candidates.append(Tile("channels", channel_vectors * vector, rows, columns, vector))
    return max(candidates, key=lambda tile: tile.rate(lanes, kernel_width))


def _int(expr) -> int | None:
    return int(expr) if isinstance(expr, tirx.IntImm) else None


def _match_conv(sch: Schedule, block) -> _Conv | None:
    """`out[n, f, y, x] += data[n, c, y*sh + ry*dh, x*sw + rx*dw] * weight[f, c, ry, rx]` in
    float32 over (c, ry, rx), loops in that order with static extents, else None."""
    stmt = sch.get(block)
    kinds = "".join("S" if iv.iter_type == tirx.IterVar.DataPar else "R" for iv in stmt.iter_vars)
    store = stmt.body
    if kinds != "SSSSRRR" or not isinstance(store, tirx.BufferStore) or stmt.init is None:
        return None
    n, f, y, x, c, ry, rx = (iv.var for iv in stmt.iter_vars)
    value = store.value
    if not (isinstance(value, tirx.Add) and isinstance(value.b, tirx.Mul)):
        return None
    loads = (value.a, value.b.a, value.b.b)
    if not all(isinstance(load, TensorLoad) for load in loads):
        return None
    if any(b.dtype != "float32" for b in (store.buffer, *(load.source for load in loads))):
        return None

    def indexed_by(indices, expected) -> bool:
        return len(indices) == len(expected) and all(i.same_as(v) for i, v in zip(indices, expected))

    accumulated, first, second = loads
    if not (accumulated.source.same_as(store.buffer) and indexed_by(store.indices, (n, f, y, x))
            and indexed_by(accumulated.indices, (n, f, y, x))):
        return None
    data, weight = (first, second) if indexed_by(second.indices, (f, c, ry, rx)) else (second, first)
    if not indexed_by(weight.indices, (f, c, ry, rx)):
        return None
    if len(data.indices) != 4 or not indexed_by(data.indices[:2], (n, c)):
        return None
    # [stride, dilation, offset] of the input row and column read
    strides = [tvm.sym.detect_linear_equation(data.indices[2], [y, ry]),
               tvm.sym.detect_linear_equation(data.indices[3], [x, rx])]
    if any(len(coefficients) != 3 or _int(coefficients[0]) is None for coefficients in strides):
        return None
    loops = sch.get_loops(block)
    extents = [_int(sch.get(loop).extent) for loop in loops]
    input_width = _int(data.source.shape[3])
    if len(loops) != 7 or None in (*extents, input_width) or extents != [_int(iv.dom.extent) for iv in stmt.iter_vars]:
        return None
    _, out_channels, height, width, in_channels, kernel_height, kernel_width = extents
    stride_height, stride_width = (_int(coefficients[0]) for coefficients in strides)
    return _Conv(block, out_channels, height, width, in_channels, kernel_height, kernel_width,
                 stride_height, stride_width, input_width, data.source, weight.source)


def _same_shape_epilogue(sch: Schedule, conv_block, epilogue: list) -> bool:
    """Whether every block after the convolution writes a tensor of its output's shape, so it can fuse
    into the write-back. A broadcast (a squeeze-and-excitation gate times the feature map it gates)
    writes a larger one: TVM's reverse_compute_inline fails on it with an internal error."""
    shape = [_int(d) for d in sch.get(conv_block).writes[0].source.shape]
    return all([_int(d) for d in sch.get(block).writes[0].source.shape] == shape for block in epilogue)


def _is_reduction(sch: Schedule, block) -> bool:
    return any(iv.iter_type == tirx.IterVar.CommReduce for iv in sch.get(block).iter_vars)


def schedule_direct_conv(func: tirx.PrimFunc, lanes: int) -> tirx.PrimFunc | None:
    """Schedule a float32 NCHW/OIHW convolution kernel with what FuseOps joined to it: at most
    one block before it that writes its input (padding), elementwise blocks after it (bias,
    activation), fused into the write-back. None for any other kernel (integer, grouped, not a
    convolution) or when an epilogue does not fuse: TVM's default loops then stay."""
    sch = direct_conv_schedule(tvm.IRModule({"main": func}), lanes)
    if sch is None:
        return None
    scheduled = sch.mod["main"]
    # A dequantize fused before the convolution (a QDQ file's float fallback) came out of the tiling
    # ill-formed (an intermediate buffer without its declaration); such a kernel keeps TVM's loops.
    try:
        Schedule(scheduled)  # checks that the kernel is well formed
    except tvm.error.InternalError:
        return None
    return scheduled


def direct_conv_schedule(mod: tvm.IRModule, lanes: int) -> Schedule | None:
    """`schedule_direct_conv` as a traced schedule of `mod`'s "main" (a tuning task's workload),
    which a tuning database can store and replay."""
    sch = Schedule(mod)
    try:
        blocks = sch.get_child_blocks(sch.get_sblock("root"))
    except ScheduleError:  # no root block: not a kernel as the Relax legalization writes them
        return None
    reductions = [i for i, block in enumerate(blocks) if _is_reduction(sch, block)]
    if len(reductions) != 1 or reductions[0] > 1:
        return None
    position = reductions[0]
    conv = _match_conv(sch, blocks[position])
    if conv is None or (position == 1 and not _writes(sch, blocks[0], conv.data)):
        return None
    if not _same_shape_epilogue(sch, blocks[position], blocks[position + 1:]):
        return None
    unit_stride = conv.stride_width == 1
    tile = choose_tile(conv.out_channels, conv.height, conv.width, conv.kernel_width, unit_stride, lanes)
    try:
        if position == 1:
            _schedule_padding(sch, blocks[0])
        _schedule_tiles(sch, conv, tile, blocks[position + 1:])
    except ScheduleError:
        return None
    return sch


def prepack_weights(mod: tvm.IRModule) -> tvm.IRModule:
    """Split each kernel's weight packing (`_pack_weights`) into a kernel of its own, and run it at
    build time where the weights are constants: the built convolution reads packed weights."""
    packing = [gvar for gvar, func in mod.functions_items() if isinstance(func, tirx.PrimFunc) and _packs_weights(func)]
    if not packing:
        return mod
    # TVM's split rejects kernels without blocks (the hand-written Winograd transforms): it sees
    # only the Relax functions and the packing kernels, the others go back in after it.
    others = {gvar: func for gvar, func in mod.functions_items()
              if isinstance(func, tirx.PrimFunc) and gvar not in packing}
    split = relax.transform.SplitLayoutRewritePreproc()(
        tvm.IRModule({gvar: func for gvar, func in mod.functions_items() if gvar not in others}, attrs=mod.attrs)
    )
    for gvar, func in others.items():
        split[gvar] = func
    return relax.transform.FoldConstant()(split)


def _packs_weights(func: tirx.PrimFunc) -> bool:
    """Whether a block at the kernel's top level is marked as a weight layout rewrite."""
    try:
        sch = Schedule(func)
        blocks = sch.get_child_blocks(sch.get_sblock("root"))
    except ScheduleError:
        return False
    return any(LAYOUT_REWRITE in sch.get(block).annotations for block in blocks)


def _writes(sch: Schedule, block, buffer: tirx.Var) -> bool:
    writes = sch.get(block).writes
    return len(writes) == 1 and writes[0].source.same_as(buffer)


def _schedule_padding(sch: Schedule, block) -> None:
    """A plain copy (padding done by an earlier kernel) is read in place; zero padding is written
    out first, rows in parallel, so that the tiles read it without bounds checks."""
    if isinstance(getattr(sch.get(block).body, "value", None), TensorLoad):
        sch.compute_inline(block)
        return
    loops = sch.get_loops(block)
    sch.parallel(sch.fuse(*loops[:-1]))


def _pack_weights(sch: Schedule, conv: _Conv, channels: int) -> None:
    """OIHW -> [O / channels, I, H, W, channels]: the weight vectors of a reduction step contiguous.

    The packing block is marked as a layout rewrite: a build splits it into a kernel of its own
    that constant folding runs once on the constant weights (`prepack_weights`), and tuning
    measures the convolution without it. Packed per call, 1 MB of weights took 0.3 ms of a 4x4
    output's 0.45."""
    reads = sch.get(conv.block).reads
    index = next(i for i, region in enumerate(reads) if region.source.same_as(conv.weight))
    packed = sch.cache_read(conv.block, index, "global")
    sch.transform_layout(packed, ("write", 0), lambda f, c, r, s: (f // channels, c, r, s, f % channels))
    sch.annotate(packed, LAYOUT_REWRITE, True)
    out_channels, in_channels, *_ = sch.get_loops(packed)
    sch.parallel(sch.fuse(out_channels, in_channels))


def _schedule_tiles(sch: Schedule, conv: _Conv, tile: Tile, epilogue: list) -> None:
    """Tiles over the reduction with their accumulators in registers, the epilogue fused into
    their write-back, (image, channel block, row block) in parallel. See `_input_channel_chunk`
    for the passes over a row that a "channels" tile may make."""
    block = conv.block
    n, f, y, x, c, ry, rx = sch.get_loops(block)
    y_outer, y_inner = sch.split(y, [None, tile.rows])
    if tile.axis == "channels":
        _pack_weights(sch, conv, tile.channels)
        f_outer, f_vectors, f_lanes = sch.split(f, [None, tile.channels // tile.vector, tile.vector])
        x_outer, x_inner = sch.split(x, [None, tile.columns])
        tile_loops = (y_inner, x_inner, f_vectors, f_lanes)
    else:
        f_outer, f_inner = sch.split(f, [None, tile.channels])
        x_outer, x_vectors, x_lanes = sch.split(x, [None, tile.columns // tile.vector, tile.vector])
        tile_loops = (f_inner, y_inner, x_vectors, x_lanes)
    chunk = _input_channel_chunk(conv, tile)
    passes = None
    if chunk < conv.in_channels:
        passes, c = sch.split(c, [None, chunk])
        sch.reorder(n, f_outer, y_outer, passes, x_outer, c, ry, rx, *tile_loops)
    else:
        sch.reorder(n, f_outer, y_outer, x_outer, c, ry, rx, *tile_loops)
    accumulators = sch.cache_write(block, 0, "local")
    if tile.axis == "channels":  # the vector axis innermost, so that LLVM keeps whole vectors in registers
        sch.transform_layout(block, ("write", 0), lambda n, f, y, x: (n, y, x, f))
    for consumer in epilogue:
        sch.reverse_compute_inline(consumer)
    rows = sch.fuse(n, f_outer, y_outer)
    sch.parallel(rows)
    for loop in tile_loops[:-1]:
        sch.unroll(loop)
    sch.vectorize(tile_loops[-1])
    if passes is None:  # each tile writes back right away, its values still in registers
        sch.reverse_compute_at(accumulators, x_outer, preserve_unit_loops=True)
        *outer, columns = sch.get_loops(accumulators)[-4:]
        if tile.axis == "pixels":
            columns, lanes = sch.split(columns, [None, tile.vector])
            sch.vectorize(lanes)
        for loop in (*outer, columns):
            sch.unroll(loop)
        sch.decompose_reduction(block, c)
    else:  # the row buffer is written back after the last pass, in vectors of output columns
        sch.reverse_compute_at(accumulators, rows, preserve_unit_loops=True)
        columns = sch.get_loops(accumulators)[-1]
        if conv.width % tile.vector == 0:
            sch.vectorize(sch.split(columns, [None, tile.vector])[1])
        sch.decompose_reduction(block, passes)


def _input_channel_chunk(conv: _Conv, tile: Tile) -> int:
    """Input channels per pass over a row of tiles. A "channels" tile reads a stream of weight
    vectors that can outgrow L1 (64 channels x 256 inputs x 4 bytes for a 1x1 conv); it then
    sweeps the row once per chunk of input channels whose weights and input rows fit in
    `L1_BYTES`, reloading its accumulators from a row buffer on each pass (a 1x1 conv from 256
    channels: 57 -> 95 GFLOP/s per core). A "pixels" tile broadcasts its few weights: one pass."""
    if tile.axis != "channels":
        return conv.in_channels
    input_rows = tile.rows * conv.stride_height + conv.kernel_height - 1
    weights = tile.channels * conv.kernel_height * conv.kernel_width
    per_channel = 4 * (weights + input_rows * conv.input_width)
    return max(_divisors(conv.in_channels, max(1, L1_BYTES // per_channel)))
