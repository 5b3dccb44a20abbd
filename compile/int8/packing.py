"""The packed input of an int8 direct conv, written by its own vectorized kernel.

A direct conv (compile/int8/lowering.py) reads its uint8 input as groups of 4 channels side by side,
NC[4]HW, with the zero point where the conv pads; a pixel-lane kernel also splits each row by column
phase (even columns, then odd ones, for stride 2) so that a tap's pixels are one contiguous load.
Where a reflection pad comes first, the pad stores this layout (compile/schedules/pad.py); elsewhere
`pack_input` does. Written as a TE stage of the conv, the packing ran a byte at a time behind a bounds
check: in cyclegan-resnet6-ngf16+ptq the stride-2 16 -> 32 conv at 128x128 took 0.120 ms, of which its
products 0.056; this kernel packs its input in 0.011 ms.
"""

from __future__ import annotations

import numpy as np
from tvm import tirx
from tvm.script.ir_builder import IRBuilder
from tvm.script.ir_builder import tirx as T

from compile import OPAQUE_PATTERN
from compile.int8.intrinsics import REDUCTION

CHUNK = 16  # columns a vector step: 4 loads of a channel row each, one 64-byte store


def interleaved(groups: list, chunk: int):
    """The `REDUCTION` channel vectors of `chunk` columns, each column's channels side by side."""
    return tirx.Shuffle(groups, [ci * chunk + k for k in range(chunk) for ci in range(REDUCTION)])


def pack_input(input_shape: tuple[int, ...], packed_shape: tuple[int, ...], zero_point: int,
               top_left: tuple[int, int]) -> tirx.PrimFunc:
    """uint8 NCHW -> `packed_shape`, (N, C/4, rows, [phases,] columns, 4): column w of phase p is input
    column w * phases + p - left, row h input row h - top; the zero point outside the input and in
    channels past C. Per row of a group of 4 channels, in parallel: the columns inside the input
    `CHUNK` at a time (a phase's every other byte picked by a shuffle), the rest one word at a time,
    and rows outside the input in 64-byte stores of the zero point."""
    n, channels, height, width = (int(d) for d in input_shape)
    c_blocks, rows, columns = packed_shape[1], packed_shape[2], packed_shape[-2]
    phases = packed_shape[3] if len(packed_shape) == 6 else 1
    top, left = top_left
    row_bytes = phases * columns * REDUCTION
    zero = tirx.const(zero_point, "uint8")

    def inside_columns(p: int, spare: int = 0) -> tuple[int, int]:
        """[first, end): the columns of phase p whose input column, and `spare` columns after it, lie
        inside the row."""
        first = min(columns, max(0, -(-(left - p) // phases)))
        return first, max(first, min(columns, (width - 1 - spare - p + left) // phases + 1))

    with IRBuilder() as ib, T.prim_func(private=True):
        T.func_attr({"tirx.noalias": True, "tirx.is_scheduled": True, "op_pattern": OPAQUE_PATTERN})
        data = T.arg("data", T.buffer((n, channels, height, width), "uint8"))
        out = T.arg("packed", T.buffer(packed_shape, "uint8"))
        with T.sblock("root"):
            flat = T.decl_buffer((int(np.prod(packed_shape)),), "uint8", data=out.data)  # each row one span
            with T.parallel(0, n * c_blocks * rows) as task:
                b, cb, y = task // (c_blocks * rows), task // rows % c_blocks, task % rows
                sy, row_start = y - top, task * row_bytes

                def fill(start: int | tirx.PrimExpr, count: int) -> None:
                    """`count` bytes of the zero point from `start` on: whole vectors, then the rest."""
                    vector = REDUCTION * CHUNK
                    if count >= vector:
                        with T.serial(0, count // vector) as k:
                            T.buffer_store(flat, tirx.Broadcast(zero, vector),
                                           [tirx.Ramp(start + k * vector, 1, vector)])
                    if count % vector:
                        tail = count % vector
                        T.buffer_store(flat, tirx.Broadcast(zero, tail),
                                       [tirx.Ramp(start + count - tail, 1, tail)])

                def channel(ci: int, column, lanes: int = 1):
                    """Input channel cb * 4 + ci at `column` (`lanes` columns, `phases` apart, from there)."""
                    c = cb * REDUCTION + ci
                    index = column if lanes == 1 else tirx.Ramp(column, 1, lanes * phases)
                    values = tirx.BufferLoad(data, [b, tirx.min(c, channels - 1), sy, index])
                    if lanes > 1 and phases > 1:  # every phases-th byte of one contiguous load
                        values = tirx.Shuffle([values], [k * phases for k in range(lanes)])
                    if c_blocks * REDUCTION == channels:
                        return values
                    return tirx.Select(c < channels, values, zero if lanes == 1 else tirx.Broadcast(zero, lanes))

                with T.If(tirx.all(sy >= 0, sy < height)):
                    with T.Then():
                        for p in range(phases):
                            phase_start = row_start + p * columns * REDUCTION
                            first, end = inside_columns(p)
                            vectors = (inside_columns(p, phases - 1)[1] - first) // CHUNK  # whole loads in the row
                            fill(phase_start, first * REDUCTION)
                            with T.serial(0, vectors) as j:
                                w = first + j * CHUNK
                                groups = [channel(ci, w * phases + p - left, CHUNK) for ci in range(REDUCTION)]
                                T.buffer_store(flat, interleaved(groups, CHUNK),
                                               [tirx.Ramp(phase_start + w * REDUCTION, 1, CHUNK * REDUCTION)])
                            for w in range(first + vectors * CHUNK, end):
                                for ci in range(REDUCTION):
                                    T.buffer_store(flat, channel(ci, w * phases + p - left),
                                                   [phase_start + w * REDUCTION + ci])
                            fill(phase_start + end * REDUCTION, (columns - end) * REDUCTION)
                    with T.Else():
                        fill(row_start, row_bytes)
    return ib.get()
