"""Exact integer Winograd F(2x2, 3x3) for 3x3 stride-1 quantized convolutions on AVX2.

Why: on CPUs without VNNI (this project's AMD EPYC is Zen 1) an int8 multiply-accumulate costs the
same as an fp32 one: `vpmaddubsw` + `vpmaddwd` retire 32 u8 x s8 products where one FMA retires 8
floats, but both integer multiplies are twice as slow to issue. So a direct int8 convolution runs
no faster than the fp32 one, and the 3x3 convolutions of the residual trunk are three quarters of
a CycleGAN generator's work. Winograd's F(2x2, 3x3) needs 16 products per 2x2 output tile
instead of 36, and in integers it is exact:

    with 2G (integer) instead of G, U = (2G) w (2G)^T = 4 G w G^T   |U| <= 9 * 127
    V = B^T x B on the uint8 input (zero point included)            |V| <= 4 * 255
    4 * acc = A^T (sum over channels of U . V) A                     (int32, no rounding)

so |U|, |V| fit int16 and every product pair fits int32 (`vpmaddwd`, tensorized with the
compile/int8/intrinsics.py int16 intrinsic); the kernel checks the int32 bound for the whole
channel sum before it is chosen. The result is bit-identical to the direct integer convolution,
and the requantizing epilogue is the same as compile/int8/lowering.py's.
"""

from __future__ import annotations

import numpy as np
from tvm import te, tirx
from tvm.s_tir import Schedule

from compile.int8.intrinsics import AVX2_DOT_8X2_I16, UINT8_MAX

B_T = np.array([[1, 0, -1, 0], [0, 1, 1, 0], [0, -1, 1, 0], [0, 1, 0, -1]])
G2 = np.array([[2, 0, 0], [1, 1, 1], [1, -1, 1], [0, 0, 2]])  # 2 * G: integer
A_T = np.array([[1, 1, 1, 0], [0, 1, -1, -1]])
POINTS = 16  # 4x4 transform-domain points per tile
LANES = 8  # output channels per vector of int32 accumulators
PAIR = 2  # input channels per `vpmaddwd` pair
TILE_BLOCK = 8  # tiles along a row computed together: their accumulators fill 8 registers
INT32_MAX = 2**31 - 1
# The transforms cost per channel, the products per channel pair: with fewer channels than this
# the direct AVX2 kernel was faster (measured on an AVX-512 Xeon running AVX2 code: 32->16
# channels at 128x128 2x slower as Winograd, 64->32 at 64x64 1.2x; 64->64 at 32x32 even).
MIN_CHANNELS = 64


def transform_weight(weight: np.ndarray) -> np.ndarray:
    """OIHW int8 3x3 -> U = (2G) w (2G)^T as int16 [16 points, OC/8, C/2, 8, 2], zero-filled."""
    out_channels, channels = weight.shape[:2]
    u = np.einsum("ik,ockl,jl->ijoc", G2, weight.astype(np.int64), G2).reshape(POINTS, out_channels, channels)
    oc_blocks, c_pairs = -(-out_channels // LANES), -(-channels // PAIR)
    padded = np.zeros((POINTS, oc_blocks * LANES, c_pairs * PAIR), np.int64)
    padded[:, :out_channels, :channels] = u
    blocked = padded.reshape(POINTS, oc_blocks, LANES, c_pairs, PAIR).transpose(0, 1, 3, 2, 4)
    return np.ascontiguousarray(blocked).astype(np.int16)


def applies(conv, input_shape: tuple[int, ...]) -> bool:
    """3x3, stride 1, at least MIN_CHANNELS channels in and out in whole 8-channel blocks, even
    output size, and the transform-domain channel sums provably within int32."""
    _, out_channels, out_h, out_w = conv.output_shape(input_shape)
    weight = conv.weight
    if weight.shape[2:] != (3, 3) or tuple(conv.strides) != (1, 1) or out_channels % LANES or out_h % 2 or out_w % 2:
        return False
    if min(weight.shape[0], weight.shape[1]) < MIN_CHANNELS:
        return False
    u = np.abs(np.einsum("ik,ockl,jl->ijoc", G2, weight.astype(np.int64), G2))
    # An output sums 9 transform points (A^T has 3 nonzeros a row), each a channel sum of U * V.
    worst = 9 * 4 * UINT8_MAX * int(u.reshape(POINTS, *u.shape[2:]).max(axis=0).sum(axis=1).max())
    return worst <= INT32_MAX


def _input_transform(pixel, i: int, j: int):
    """V[i][j] = sum_rs B^T[i][r] B^T[j][s] x[r][s] as explicit adds (B^T is 0/+-1)."""
    total = None
    for r in range(4):
        for s in range(4):
            coefficient = int(B_T[i, r] * B_T[j, s])
            if coefficient:
                term = pixel(r, s) if coefficient > 0 else -pixel(r, s)
                total = term if total is None else total + term
    return total


def _output_transform(point, i: int, j: int):
    """Y[i][j] = sum_pq A^T[i][p] A^T[j][q] M[p][q] as explicit adds."""
    total = None
    for p in range(4):
        for q in range(4):
            coefficient = int(A_T[i, p] * A_T[j, q])
            if coefficient:
                term = point(p * 4 + q) if coefficient > 0 else -point(p * 4 + q)
                total = term if total is None else total + term
    return total


def _by_index(index, cases: list):
    """cases[index] for an index that unrolling makes constant (the selects then fold away)."""
    chosen = cases[-1]
    for position in range(len(cases) - 2, -1, -1):
        chosen = tirx.Select(index == position, cases[position], chosen)
    return chosen


def winograd_kernel(conv, input_shape: tuple[int, ...]):
    """The scheduled PrimFunc (data, U, correction, multiplier, offset) -> NCHW output for an
    `IntegerConv` (compile/int8/lowering.py) with whole 8-channel blocks and an even output size."""
    n, channels, height, width = (int(d) for d in input_shape)
    _, out_channels, out_h, out_w = conv.output_shape(input_shape)
    tiles_h, tiles_w = out_h // 2, out_w // 2
    c_pairs = -(-channels // PAIR)
    top, left = conv.padding[:2]
    zero_point = tirx.const(conv.input_zero_point, "uint8")

    data = te.placeholder((n, channels, height, width), "uint8", name="data")
    weight = te.placeholder((POINTS, out_channels // LANES, c_pairs, LANES, PAIR), "int16", name="weight")
    correction = te.placeholder((out_channels,), "int32", name="correction")
    multiplier = te.placeholder((out_channels,), "float32", name="multiplier")
    offset = te.placeholder((out_channels,), "float32", name="offset")

    def pad(b, c, y, x):
        y, x = y - top, x - left
        inside = tirx.all(c < channels, y >= 0, y < height, x >= 0, x < width)
        value = data[b, tirx.min(c, channels - 1), tirx.max(tirx.min(y, height - 1), 0),
                     tirx.max(tirx.min(x, width - 1), 0)]
        return tirx.if_then_else(inside, value, zero_point).astype("int16")

    # The input as int16 with the zero point around it (and in missing channels of the last pair).
    padded = te.compute((n, c_pairs * PAIR, out_h + 2, out_w + 2), pad, name="padded")

    def transformed(b, th, tw, point, cp, k):
        c, y0, x0 = cp * PAIR + k, th * 2, tw * 2
        cases = [_input_transform(lambda r, s: padded[b, c, y0 + r, x0 + s], i, j) for i in range(4) for j in range(4)]
        return _by_index(point, cases)

    v = te.compute((n, tiles_h, tiles_w, POINTS, c_pairs, PAIR), transformed, name="V")
    rc = te.reduce_axis((0, c_pairs), "rc")
    rk = te.reduce_axis((0, PAIR), "rk")
    m = te.compute(
        (n, tiles_h, tiles_w, POINTS, out_channels),
        lambda b, th, tw, point, oc: te.sum(
            v[b, th, tw, point, rc, rk].astype("int32") * weight[point, oc // LANES, rc, oc % LANES, rk].astype("int32"),
            axis=[rc, rk],
        ),
        name="M",
    )

    def epilogue(b, c, y, x):
        tile = lambda point: m[b, y // 2, x // 2, point, c]
        four_acc = _by_index((y % 2) * 2 + x % 2, [_output_transform(tile, i, j) for i in range(2) for j in range(2)])
        acc = tirx.shift_right(four_acc, tirx.const(2, "int32"))  # exact: U carries a factor of 4
        return conv.finish(acc + correction[c], c, multiplier, offset)

    out = te.compute((n, out_channels, out_h, out_w), epilogue, name="epilogue")
    return _schedule(te.create_prim_func([data, weight, correction, multiplier, offset, out]))


def _schedule(func: tirx.PrimFunc) -> tirx.PrimFunc:
    """Per block of 8 tiles (in parallel): transform their input, multiply in the transform domain
    (8 tiles x 8 channels of accumulators in registers, tensorized `vpmaddwd`), transform back and
    run the epilogue, all while the block is in cache. Scheduled from the epilogue outwards
    (compute_at covers its reads of M; reverse_compute_at cannot solve tile indices)."""
    sch = Schedule(func)
    epilogue = sch.get_sblock("epilogue")
    b, c, y, x = sch.get_loops(epilogue)
    th, i = sch.split(y, [None, 2])
    tw, j = sch.split(x, [None, 2])
    tb, t = sch.split(tw, [None, TILE_BLOCK])
    sch.reorder(b, th, tb, c, t, i, j)
    sch.unroll(i)  # the position inside a tile picks the output transform: unrolled, it folds
    sch.unroll(j)
    gemm = sch.get_sblock("M")
    sch.compute_at(gemm, tb)
    sch.compute_at(sch.get_sblock("V"), tb)
    sch.compute_at(sch.get_sblock("padded"), tb)
    sch.parallel(sch.fuse(b, th, tb))

    m_tile, m_point, m_oc, rc, rk = sch.get_loops(gemm)[-5:]
    ob, lane = sch.split(m_oc, [None, LANES])
    sch.reorder(m_point, ob, rc, m_tile, lane, rk)
    # Accumulate in a per-(point, channel block) buffer LLVM keeps in registers; write M once.
    sch.reverse_compute_at(sch.cache_write(gemm, 0, "global"), ob)
    init = sch.decompose_reduction(gemm, rc)
    sch.tensorize(lane, AVX2_DOT_8X2_I16)
    sch.unroll(m_tile)
    sch.vectorize(sch.get_loops(init)[-1])
    # Input transform: all 16 points from the same 16 loads, so the point loop is innermost, unrolled.
    v_tile, v_point, v_pair, v_k = sch.get_loops(sch.get_sblock("V"))[-4:]
    sch.reorder(v_pair, v_k, v_tile, v_point)
    sch.unroll(v_point)
    return sch.mod["main"]
