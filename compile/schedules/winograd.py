"""Float Winograd F(4x4, 3x3) for the 3x3 stride-1 convolutions of the residual trunks.

Why: those convolutions are most of a CycleGAN or style-transfer generator's work, and tuned
direct kernels already run them near this machine's FMA peak, so only fewer multiplies go faster.
Winograd computes a 4x4 output tile from 36 products per channel pair instead of 144.

A convolution becomes three kernels:
- the data transform V = B^T d B of every 6x6 input tile, written out as the few adds and
  multiplies B's nonzero entries need, vectorized along a tile row (hand-scheduled here);
- 36 matrix products M[point] = U[point] V[point] over the channels, register-tiled
  (U = G w G^T is computed once, here, from the constant weights);
- the inverse transform A^T m A of every tile into the NCHW output, adding the conv's bias when
  one follows (hand-scheduled here).
None of them is tuned: the products' fixed register tile ran faster than 64 MetaSchedule trials.

TOPI has a one-task NCHW Winograd compute, but MetaSchedule 0.27's CPU Winograd rules crash on it
during the search ("The block no longer exists in the IRModule"), and its transforms multiply by
every zero of B and A.

Numerics: TOPI's interpolation points (0, -1, 1, 1/2, -2) keep F(4x4, 3x3)'s float error near
3e-7 relative (Barabasz et al. 2018); every build is still checked against torch.
"""

from __future__ import annotations

import numpy as np
import tvm
from tvm import relax, te, tirx
from tvm.s_tir import Schedule
from tvm.script.ir_builder import IRBuilder
from tvm.script.ir_builder import tirx as T
from tvm.topi.nn.winograd_util import _cook_toom_convolution, _interpolation_points

from compile import bf16
from compile.schedules.graph import bound_call, constant_of, is_op, rewrite_functions, static_shape
from compile.schedules.pad import nearest_upsampled, reflect, reflection_padded, zero_pad

TILE = 4  # output pixels per tile side
KERNEL = 3
ALPHA = TILE + KERNEL - 1  # 6x6 transform-domain points per tile
# The transforms cost per channel, the products saved per channel pair: narrow convs stay direct
# (the threshold is a judgement, not a measured crossover; every shipped trunk has >= 64).
MIN_CHANNELS = 32
# Each transformed weight (36/9 = 4x the direct conv's) is used once per tile: with 16 tiles (a 16x16
# output) the products ran at 28 GFLOP/s, bound on those weights, and a U-Net built 0.3 ms faster
# (4.35 against 4.67 ms) leaving such convs direct. 64 tiles is a 32x32 output, a residual trunk's.
MIN_TILES = 64
VECTOR_TILES = (16, 8, 4)  # tiles per vector along a tile row: the first that divides the row is used

# A (ALPHA x TILE), B (ALPHA x ALPHA), G (ALPHA x KERNEL): out = A^T [(G w G^T) . (B^T d B)] A
A, B, G = _cook_toom_convolution(_interpolation_points(TILE + KERNEL - 2), TILE, KERNEL)


def transform_weight(weight: np.ndarray) -> np.ndarray:
    """OIHW 3x3 -> U = G w G^T as [ALPHA * ALPHA points, out channels, in channels]."""
    u = np.einsum("ik,ockl,jl->ijoc", G, weight.astype(np.float64), G)
    return np.ascontiguousarray(u.reshape(ALPHA * ALPHA, *weight.shape[:2]), dtype=weight.dtype)


def _combine(coefficients, values):
    """sum(c * v) over the nonzero coefficients, with +-1 as adds and subtracts."""
    total = None
    for c, v in zip(coefficients, values):
        if c == 0:
            continue
        term = v if abs(c) == 1 else v * tirx.const(abs(float(c)), "float32")
        if total is None:
            total = term if c > 0 else tirx.const(0.0, "float32") - term
        else:
            total = total + term if c > 0 else total - term
    return total


def _vector_tiles(tiles_per_row: int) -> int:
    return next((v for v in VECTOR_TILES if tiles_per_row % v == 0), 1)


def _row_columns(buffer, index: list, start, lanes: int) -> list:
    """The TILE column phases of `lanes` consecutive tiles of one row, as `lanes`-wide vectors:
    one contiguous load of TILE x lanes floats, deinterleaved by shuffles (strided loads would
    become one scalar load per lane)."""
    if lanes == 1:
        return [tirx.BufferLoad(buffer, [*index, start + phase]) for phase in range(TILE)]
    row = tirx.BufferLoad(buffer, [*index, tirx.Ramp(start, 1, TILE * lanes)])
    return [tirx.Shuffle([row], [phase + TILE * t for t in range(lanes)]) for phase in range(TILE)]


def data_transform(batch: int, channels: int, height: int, width: int, bf16_pairs: bool = False,
                   reflected: bool = False) -> tirx.PrimFunc:
    """[N, C, H, W] (already padded) -> V [36, C, P] float32, P = N x tile rows x tile columns; with
    `bf16_pairs`, V [36, C/2, P] uint32, each word two adjacent channels' values rounded to bf16
    (compile/bf16.py's operand layout: channel 2i in the low half). With `reflected`, the input is
    unpadded and the transform reads it reflection-padded by one pixel (`reflection_fits` says where).

    Each step transforms `lanes` tiles of a tile row at once: column s of tile t is input column
    TILE t + s; columns 0-3 come from a load at the tiles' start, 4-5 from one two columns later
    (as its columns 2-3), which ends inside the padded row.
    """
    pad = 2 if reflected else 0
    rows, cols = (height + pad - KERNEL + 1) // TILE, (width + pad - KERNEL + 1) // TILE
    lanes = _vector_tiles(cols)
    stacked = _stacked_rows(rows, cols, lanes)
    step = lanes * stacked  # tiles a step
    group = 2 if bf16_pairs else 1  # channels per stored value
    with IRBuilder() as ib, T.prim_func(private=True):
        T.func_attr({"tirx.noalias": True, "tirx.is_scheduled": True})
        x = T.arg("x", T.buffer((batch, channels, height, width), "float32"))
        v = T.arg("v", T.buffer((ALPHA * ALPHA, channels // group, batch * rows * cols),
                                "uint32" if bf16_pairs else "float32"))
        with T.sblock("root"), T.parallel(0, batch * (channels // group)) as bc, \
                T.serial(0, rows // stacked) as row_step, T.serial(0, cols // lanes) as chunk:
            n, c, col, row = bc // (channels // group), bc % (channels // group), chunk * lanes, row_step * stacked
            points = []
            for member in range(group):
                inputs = [_reflected_inputs(x, [n, c * group + member, (row + r) * TILE], height, width, lanes)
                          if reflected else _padded_inputs(x, [n, c * group + member, (row + r) * TILE], col * TILE, lanes)
                          for r in range(stacked)]
                points.append(_transform_rows(_stacked(inputs, lanes)))
            tile = (n * rows + row) * cols + col
            tiles = tirx.Ramp(tile, 1, step) if step > 1 else tile
            for point in range(ALPHA * ALPHA):
                value = bf16.bf16_pair(points[0][point], points[1][point], step) if bf16_pairs else points[0][point]
                T.buffer_store(v, value, [point, c, tiles])
    return ib.get()


def _stacked(inputs: list, lanes: int) -> list:
    """The 6 x 6 input values of consecutive tile rows (each `lanes` tiles wide) side by side."""
    if len(inputs) == 1:
        return inputs[0]
    return [[tirx.Shuffle([d[r][s] for d in inputs], list(range(lanes * len(inputs)))) for s in range(ALPHA)]
            for r in range(ALPHA)]


def reflection_fits(width: int) -> bool:
    """Whether `data_transform` can read a `width`-wide input reflection-padded: its tile row is one
    vector step (up to 16 tiles, 64 columns), so both borders are known when the code is written."""
    cols = width // TILE
    return width % TILE == 0 and cols > 1 and _vector_tiles(cols) == cols


def _transform_rows(d: list) -> list:
    """B^T d B from the 6 x 6 input values `d[r][s]` (each `lanes` tiles wide), as 36 expressions
    (point e * ALPHA + f): 2 x 6 short sums per point instead of 36 products."""
    left = [[T.bind(_combine(B[:, e], [d[r][s] for r in range(ALPHA)])) for s in range(ALPHA)] for e in range(ALPHA)]
    return [_combine(B[:, f], left[e]) for e in range(ALPHA) for f in range(ALPHA)]


def _padded_inputs(x, row_index: list, start, lanes: int) -> list:
    """The 6 x 6 input values of `lanes` tiles of one channel's tile row of a padded input."""
    d = []
    for r in range(ALPHA):
        index = [*row_index[:2], row_index[2] + r]
        first = _row_columns(x, index, start, lanes)
        shifted = _row_columns(x, index, start + 2, lanes)
        d.append(first + shifted[2:])
    return d


def _reflected_inputs(x, row_index: list, height: int, width: int, lanes: int) -> list:
    """The same for a whole tile row of the unpadded input read reflection-padded: each input row is
    one load, its six column phases (border columns reflected) picked out by shuffles."""
    d = []
    for r in range(ALPHA):
        row = tirx.BufferLoad(x, [*row_index[:2], reflect(row_index[2] + r, height), tirx.Ramp(0, 1, width)])
        d.append([tirx.Shuffle([row], [reflect(TILE * t + s, width) for t in range(lanes)]) for s in range(ALPHA)])
    return d


def inverse_transform(batch: int, channels: int, out_height: int, out_width: int, bias: bool) -> tirx.PrimFunc:
    """M [36, K, P] (+ a bias [K]) -> the NCHW output [N, K, H, W], `lanes` tiles of a tile row at a
    time; each output row of them is interleaved by a shuffle into one contiguous store."""
    rows, cols = out_height // TILE, out_width // TILE
    lanes = _vector_tiles(cols)
    stacked = _stacked_rows(rows, cols, lanes)
    width = lanes * stacked  # tiles a step
    with IRBuilder() as ib, T.prim_func(private=True):
        T.func_attr({"tirx.noalias": True, "tirx.is_scheduled": True})
        m = T.arg("m", T.buffer((ALPHA * ALPHA, channels, batch * rows * cols), "float32"))
        offsets = T.arg("bias", T.buffer((channels,), "float32")) if bias else None
        out = T.arg("out", T.buffer((batch, channels, out_height, out_width), "float32"))
        with T.sblock("root"), T.parallel(0, batch * channels) as bk, T.serial(0, rows // stacked) as row_step, \
                T.serial(0, cols // lanes) as chunk:
            n, k, col, row = bk // channels, bk % channels, chunk * lanes, row_step * stacked
            tile = (n * rows + row) * cols + col
            tiles = tirx.Ramp(tile, 1, width) if width > 1 else tile
            points = [[m[e * ALPHA + f, k, tiles] for f in range(ALPHA)] for e in range(ALPHA)]
            right = [[T.bind(_combine(A[:, j], points[e])) for j in range(TILE)] for e in range(ALPHA)]
            for i in range(TILE):
                phases = [_combine(A[:, i], [right[e][j] for e in range(ALPHA)]) for j in range(TILE)]
                if offsets is not None:
                    offset = offsets[k] if width == 1 else tirx.Broadcast(offsets[k], width)
                    phases = [phase + offset for phase in phases]
                for member in range(stacked):  # each tile row's output row: its tiles' lanes, interleaved
                    index = [n, k, (row + member) * TILE + i]
                    if width == 1:
                        for j, value in enumerate(phases):
                            T.buffer_store(out, value, [*index, col * TILE + j])
                    else:
                        order = [j * width + member * lanes + t for t in range(lanes) for j in range(TILE)]
                        T.buffer_store(out, tirx.Shuffle(phases, order), [*index, tirx.Ramp(col * TILE, 1, TILE * lanes)])
    return ib.get()


def _stacked_rows(rows: int, cols: int, lanes: int) -> int:
    """Tile rows a transform step takes: a row narrower than a vector (8 tiles: a 32-wide trunk) takes
    the next row's tiles too, which follow it in V and M, so a step is one full vector, not two halves
    (the data transform ran 0.52-0.76x the time)."""
    return 2 if lanes == cols and 2 * lanes <= VECTOR_TILES[0] and rows % 2 == 0 else 1


def _conv_weight(call: relax.Call, mutator: relax.PyExprMutator) -> np.ndarray | None:
    """The constant weight of a conv2d call; None for another call or a weight computed at run time."""
    return constant_of(call.args[1], mutator) if is_op(call, "relax.nn.conv2d") else None


def _channel_bias(add: relax.Call, mutator: relax.PyExprMutator, kernels: set) -> tuple[relax.Call, np.ndarray] | None:
    """Where `add` adds a float32 constant of one value per channel ([1, K, 1, 1] or [K, 1, 1]) to the
    output of a call_tir of one of `kernels`: (that call, the K values), for the kernel to add instead."""
    kernel_out, bias = add.args
    bound = bound_call(kernel_out, mutator, "relax.call_tir")
    if bound is None or bound.args[0] not in kernels:
        return None
    shape, values = static_shape(bound), constant_of(bias, mutator)
    if values is None or values.dtype != np.float32 or static_shape(bias) not in ((1, shape[1], 1, 1), (shape[1], 1, 1)):
        return None
    return bound, values.reshape(-1)


def eligible(in_channels: int, out_channels: int, out_height: int, out_width: int) -> bool:
    """Shapes where Winograd pays: enough channels both ways, and whole 4x4 tiles, enough of them."""
    whole_tiles = out_height % TILE == 0 and out_width % TILE == 0
    tiles = (out_height // TILE) * (out_width // TILE)
    return min(in_channels, out_channels) >= MIN_CHANNELS and whole_tiles and tiles >= MIN_TILES


def applies(call: relax.Call, weight: np.ndarray | None) -> bool:
    """float32 NCHW/OIHW 3x3 convolution, stride and dilation 1, ungrouped, constant weights,
    static shapes, and an `eligible` size."""
    attrs = call.attrs
    if weight is None or weight.dtype != np.float32 or weight.shape[2:] != (KERNEL, KERNEL):
        return False
    if (attrs.data_layout, attrs.kernel_layout, attrs.out_layout) != ("NCHW", "OIHW", "NCHW"):
        return False
    if int(attrs.groups) != 1 or [int(s) for s in attrs.strides] != [1, 1] or [int(d) for d in attrs.dilation] != [1, 1]:
        return False
    if attrs.out_dtype not in ("", "float32"):
        return False
    in_shape, out_shape = static_shape(call.args[0]), static_shape(call)
    if in_shape is None or out_shape is None:
        return False
    return eligible(weight.shape[1], weight.shape[0], out_shape[2], out_shape[3])


class ConvRewriter(relax.PyExprMutator):
    """Replaces each conv2d call with constant weights that `accepts` by what `rewrite` returns, and an
    add of a constant per-channel bias to the output of one of the `kernels` it emitted by what
    `with_bias` returns. Subclasses, decorated with `relax.expr_functor.mutator`, supply the three;
    `rewrite_convs` runs one over a module."""

    def __init__(self, mod: tvm.IRModule) -> None:
        super().__init__(mod)
        self.rewritten = 0
        self.kernels: set[relax.GlobalVar] = set()  # kernels a following bias add may fold into

    def visit_call_(self, call: relax.Call) -> relax.Expr:
        call = super().visit_call_(call)
        if is_op(call, "relax.add"):
            found = _channel_bias(call, self, self.kernels)
            return call if found is None else self.with_bias(call, *found)
        weight = _conv_weight(call, self)
        if not self.accepts(call, weight):
            return call
        self.rewritten += 1
        return self.rewrite(call, weight)


def rewrite_convs(rewriter: ConvRewriter, mod: tvm.IRModule) -> tuple[tvm.IRModule, int]:
    """`rewriter` run over every Relax function of `mod`; returns (module, how many convs it rewrote)."""
    return rewrite_functions(rewriter, mod), rewriter.rewritten


@relax.expr_functor.mutator
class _WinogradRewriter(ConvRewriter):
    def __init__(self, mod: tvm.IRModule, lanes: int, bf16: bool, wide_in_bf16: set[str], bf16_tiles: bool) -> None:
        super().__init__(mod)
        self.lanes = lanes
        self.bf16 = bf16
        self.wide_in_bf16 = wide_in_bf16
        self.bf16_tiles = bf16_tiles

    def accepts(self, call: relax.Call, weight: np.ndarray | None) -> bool:
        return applies(call, weight)

    def rewrite(self, call: relax.Call, weight: np.ndarray) -> relax.Expr:
        data, reflected = call.args[0], False
        top, left, bottom, right = (int(p) for p in call.attrs.padding)
        if top or left or bottom or right:
            n, c, h, w = static_shape(data)
            pad = self.builder_.add_func(zero_pad((n, c, h, w), (top, left, bottom, right)), "winograd_zero_pad")
            padded = relax.TensorType((n, c, h + top + bottom, w + left + right), "float32")
            data = self.builder_.emit(relax.call_tir(pad, [data], padded))
        else:
            found = reflection_padded(data, self)
            # an upsampled input stays padded: one kernel upsamples and pads it (compile/schedules/pad.py)
            if found is not None and found[1] == 1 and reflection_fits(static_shape(found[0])[3]) and \
                    nearest_upsampled(found[0], self) is None:
                data, reflected = found[0], True
        batch, channels, height, width = static_shape(data)
        _, out_channels, out_height, out_width = static_shape(call)
        tiles = batch * (out_height // TILE) * (out_width // TILE)
        points = ALPHA * ALPHA
        m_type = relax.TensorType((points, out_channels, tiles), "float32")
        u = transform_weight(weight)
        # hashed only where a calibration chose convs (not in fp32 builds: 2.4 MB per teacher trunk conv)
        calibrated = bool(self.wide_in_bf16) and bf16.weight_digest(weight) in self.wide_in_bf16
        paired = self.bf16 and bf16.winograd_products_apply(channels, calibrated)  # bf16 pairs of adjacent channels
        transform = self.builder_.add_func(data_transform(batch, channels, height, width, paired, reflected),
                                           "winograd_data_transform_bf16" if paired else "winograd_data_transform")
        v_type = relax.TensorType((points, channels // 2, tiles), "uint32") if paired else \
            relax.TensorType((points, channels, tiles), "float32")
        v = self.builder_.emit(relax.call_tir(transform, [data], v_type))
        if paired:
            on_tiles = self.bf16_tiles and bf16.fills_tiles(channels)
            products = self.builder_.add_func(bf16.products(points, out_channels, channels, tiles, on_tiles),
                                              "winograd_products_amx_bf16" if on_tiles else "winograd_products_bf16")
            m = self.builder_.emit(relax.call_tir(products, [relax.const(bf16.pack_rows(u, on_tiles)), v], m_type))
        else:
            products = self.builder_.add_func(point_products(out_channels, channels, tiles, self.lanes),
                                              "winograd_products")
            m = self.builder_.emit(relax.call_tir(products, [relax.const(u), v], m_type))
        return self._inverse(m, (batch, out_channels, out_height, out_width), None)

    def _inverse(self, m: relax.Expr, shape: tuple[int, ...], bias: np.ndarray | None) -> relax.Call:
        inverse = self.builder_.add_func(inverse_transform(*shape, bias is not None), "winograd_inverse_transform")
        if bias is None:
            self.kernels.add(inverse)
        args = [m] if bias is None else [m, relax.const(bias)]
        return relax.call_tir(inverse, args, relax.TensorType(shape, "float32"))

    def with_bias(self, add: relax.Call, inverse: relax.Call, bias: np.ndarray) -> relax.Expr:
        """The inverse transform adding the bias: one pass over the output instead of two."""
        return self._inverse(inverse.args[1].fields[0], static_shape(inverse), bias)


def winograd_convs(mod: tvm.IRModule, lanes: int, bf16_products: bool = False,
                   wide_in_bf16: set[str] = frozenset(), bf16_tiles: bool = False) -> tuple[tvm.IRModule, int]:
    """Rewrite every eligible convolution of `mod`'s Relax functions for a CPU with `lanes`-float
    vectors, with `bf16_products` on bf16 operands (compile/bf16.py; of the convs wider than
    `bf16.WINOGRAD_MAX_CHANNELS`, those whose weight digest is in `wide_in_bf16`), on AMX tiles with
    `bf16_tiles` where the channels fill them; returns (module, how many)."""
    return rewrite_convs(_WinogradRewriter(mod, lanes, bf16_products, wide_in_bf16, bf16_tiles), mod)


def point_products(out_channels: int, channels: int, tiles: int, lanes: int) -> tirx.PrimFunc:
    """M[point] = U[point] V[point] for the 36 points, scheduled for a CPU with `lanes`-float vectors.

    Register tile: 8 output channels x 2 vectors of tiles, accumulated over the input channels in
    registers; the (point, channel block) loop across cores. Hand-scheduled rather than tuned:
    on 64 -> 64 channels at 32x32 it ran 0.16 ms where 64 MetaSchedule trials reached 0.23 ms.
    """
    u = te.placeholder((ALPHA * ALPHA, out_channels, channels), "float32", name="u")
    v = te.placeholder((ALPHA * ALPHA, channels, tiles), "float32", name="v")
    c = te.reduce_axis((0, channels), name="c")
    m = te.compute(
        (ALPHA * ALPHA, out_channels, tiles), lambda p, k, t: te.sum(u[p, k, c] * v[p, c, t], axis=c), name="products"
    )
    sch = Schedule(te.create_prim_func([u, v, m]))
    block = sch.get_sblock("products")
    batch, rows, cols, reduction = sch.get_loops(block)
    row_tile = next(t for t in (8, 4, 2, 1) if out_channels % t == 0)
    col_tile = next(t for t in (2 * lanes, lanes, 4, 2, 1) if tiles % t == 0)
    row_outer, row_inner = sch.split(rows, [None, row_tile])
    col_outer, col_inner = sch.split(cols, [None, col_tile])
    sch.reorder(batch, row_outer, col_outer, reduction, row_inner, col_inner)
    accumulators = sch.cache_write(block, 0, "local")
    sch.reverse_compute_at(accumulators, col_outer)
    sch.parallel(sch.fuse(batch, row_outer))
    for stage in (block, accumulators):  # the zeroing split off next keeps these loop kinds
        *_, row_loop, col_loop = sch.get_loops(stage)
        sch.unroll(row_loop)
        sch.vectorize(col_loop)
    sch.decompose_reduction(block, reduction)
    scheduled = sch.mod["main"].without_attr("global_symbol")  # private: one per shape in a module
    return scheduled.with_attr({"tirx.noalias": True, "tirx.is_scheduled": True})
