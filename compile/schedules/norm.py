"""Instance norms (and what FuseOps joined to them) as hand-scheduled kernels, before any database.

Per (image, channel), in parallel: the spatial sums in vector-wide partial sums (rfactor,
vectorized), then one vectorized pass writing the output with the elementwise ops inlined. dlight's
CPU rule summed serially and materialised every elementwise intermediate, 6x slower on a 64x32x32
norm, and MetaSchedule's records for these kernels ran as fast as this schedule or up to 3x slower
on the shipped generators' norms; so `prepare` schedules them and tuning leaves them alone.
"""

from __future__ import annotations

import tvm
from tvm import te, tirx, topi
from tvm.s_tir import Schedule
from tvm.s_tir.schedule import ScheduleError

from compile.schedules import is_scheduled


def schedule_instance_norms(mod: tvm.IRModule, vector_lanes: int) -> tvm.IRModule:
    """Every unscheduled kernel of `mod` of the channel-reduction form, scheduled and marked so."""
    for gvar, func in mod.functions_items():
        if isinstance(func, tirx.PrimFunc) and not is_scheduled(func):
            scheduled = schedule_channel_reduction(func, vector_lanes)
            if scheduled is not None:
                mod[gvar] = scheduled.with_attr("tirx.is_scheduled", True)
    return mod


# relax's OpPatternKind.kOutEWiseFusable, what LegalizeOps gives an instance norm: FuseOps joins the
# elementwise ops after it (affine, ReLU, residual add, quantize) into its kernel
OUT_ELEMWISE_FUSABLE = 4


def dequantizing_instance_norm(shape: tuple[int, ...], dequantize: tuple[float, int], epsilon: float) -> tirx.PrimFunc:
    """(uint8 x, gamma, beta) -> float32 instance norm of x dequantized with (scale, zero point), as
    relax.dequantize then relax.nn.instance_norm compute it, over every axis after the channels. As one
    kernel it reads the bytes an integer conv wrote (compile/int8/lowering.py); as two ops, FuseOps kept
    the dequantize apart (it joins no producer to a norm) and the conv wrote float32 instead."""
    scale, zero_point = dequantize
    shape = [tirx.IntImm("int64", d) for d in shape]  # as legalized ops write theirs: FuseTIR matches the buffers
    data = te.placeholder(shape, "uint8", name="data")
    gamma = te.placeholder((shape[1],), "float32", name="gamma")
    beta = te.placeholder((shape[1],), "float32", name="beta")
    zero, step = tirx.const(zero_point, "float32"), tirx.const(scale, "float32")
    dequantized = te.compute(shape, lambda *i: (data(*i).astype("float32") - zero) * step, name="dequantize")
    norm = topi.nn.instance_norm(dequantized, gamma, beta, channel_axis=1, axis=list(range(2, len(shape))),
                                 epsilon=epsilon)
    func = te.create_prim_func([data, gamma, beta, norm]).without_attr("global_symbol")
    return func.with_attr("op_pattern", OUT_ELEMWISE_FUSABLE)


def _is_reduction(sch: Schedule, block) -> bool:
    return any(iv.iter_type == tirx.IterVar.CommReduce for iv in sch.get(block).iter_vars)


def _extent(sch: Schedule, loop) -> int | None:
    extent = sch.get(loop).extent
    return int(extent) if isinstance(extent, tirx.IntImm) else None


def schedule_channel_reduction(func: tirx.PrimFunc, vector_lanes: int) -> tirx.PrimFunc | None:
    """Instance norm with what FuseOps joined to it (dequantize before; affine, ReLU, residual add,
    quantize after): per (image, channel), in parallel, the spatial sums in `vector_lanes`
    partial sums (rfactor, vectorized), then one vectorized pass writing the output, the
    elementwise ops inlined into it. dlight's CPU rule summed serially and materialised every
    elementwise intermediate, 6x slower on a 64x32x32 norm. None if the kernel is not of this form.
    """
    sch = Schedule(func)
    blocks = sch.get_child_blocks(sch.get_sblock("root"))
    reductions = [b for b in blocks if _is_reduction(sch, b)]
    spatial = [b for b in blocks if not _is_reduction(sch, b)]
    if not reductions or not spatial or sch.get(spatial[-1]).name_hint != sch.get(blocks[-1]).name_hint:
        return None
    kept = sum(iv.iter_type == tirx.IterVar.DataPar for iv in sch.get(reductions[0]).iter_vars)
    try:
        for block in spatial[:-1]:
            sch.compute_inline(block)
        last = spatial[-1]
        loops = sch.get_loops(last)
        per_channel = _statistics_loops(sch, last, reductions)
        if not 0 < per_channel < len(loops):
            return None
        outer = sch.fuse(*loops[:per_channel]) if per_channel > 1 else loops[0]
        sch.parallel(outer)  # first: once the reductions are decomposed under it, it no longer can be
        inner = sch.fuse(*loops[per_channel:]) if len(loops) > per_channel + 1 else loops[per_channel]
        if (_extent(sch, inner) or 1) % vector_lanes:
            return None
        sch.vectorize(sch.split(inner, [None, vector_lanes])[1])
        for block in reductions:
            block_loops = sch.get_loops(block)
            reduce_loops = block_loops[kept:]
            if not reduce_loops or len(sch.get(block).iter_vars) != len(block_loops):
                return None
            reduced = sch.fuse(*reduce_loops) if len(reduce_loops) > 1 else reduce_loops[0]
            if (_extent(sch, reduced) or 1) % vector_lanes:
                return None
            partial = sch.rfactor(sch.split(reduced, [None, vector_lanes])[1], kept)
            sch.compute_at(block, outer)
            sch.compute_at(partial, outer)
            lanes, steps = sch.get_loops(partial)[-2:]
            sch.reorder(steps, lanes)
            sch.vectorize(lanes)
            sch.decompose_reduction(partial, steps)
    except ScheduleError:  # another shape of kernel: the generic rules take it
        return None
    return sch.mod["main"]


def _statistics_loops(sch: Schedule, last, reductions: list) -> int:
    """How many leading loops of the output block index the norm's statistics (the reductions' outputs):
    the loops over batch and channel, which then run in parallel. Legalized for batch 1, an instance norm
    may reduce over the batch axis too (statistics of shape (C,), read at [c]) or keep it (shape (N, C),
    read at [n, c]); the output's loops are (n, c, h, w) either way. Taking only as many loops as the
    statistics have axes ran a 128x128x128 norm of the first kind on one core in 7 ms."""
    statistics = [region.source for block in reductions for region in sch.get(block).writes]
    output = sch.get(last)
    indexed = [index.min for region in output.reads if any(region.source.same_as(s) for s in statistics)
               for index in region.region]
    positions = [i for i, iv in enumerate(output.iter_vars) if any(iv.var.same_as(v) for v in indexed)]
    return max(positions) + 1 if positions else 0
