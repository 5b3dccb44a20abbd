"""Default CPU schedules for the kernels of a prepared module that no database record covers.

Left alone, such a kernel runs TVM's default loops: serial and scalar. Here instance norms get a
parallel, vectorized reduction, other reductions dlight's CPU rule, direct fp32 convolutions the
register-tiled kernel of compile/schedules/conv.py, and elementwise and data-movement kernels
parallel, vectorized loops.
"""

from __future__ import annotations

import tvm
from tvm import tirx
from tvm.s_tir import Schedule, dlight
from tvm.s_tir.dlight.analysis import normalize_prim_func
from tvm.s_tir.schedule import ScheduleError

from compile.passes import float_lanes, prepare
from compile.schedules.conv import schedule_direct_conv

# Float glue: 8 float32 lanes (one AVX2 register). 16 lanes, what LLVM reports even for
# x86-64-v3, ran the padding kernels 2-5x slower; rows shorter than SHORT_ROW vectors are
# vectorized with a predicated tail (see _schedule_injective).
INJECTIVE_LANES = 8
SHORT_ROW = 8


def _schedule_injective(func: tirx.PrimFunc, vector_lanes: int = INJECTIVE_LANES) -> tirx.PrimFunc | None:
    """Elementwise/layout kernels (quantize, padding, pixel shuffle, tanh): intermediate blocks
    inlined, the outer loops split over the cores, the innermost vectorized in whole vectors, or
    with one predicated tail when the row is short. A long row with a tail stays scalar: padding
    and resizing read through non-affine indices, and measured on 130-136 wide rows the
    predicated vector loop ran 1.3-3x slower than scalar code. None if it does not apply."""
    sch = Schedule(func)
    infos = normalize_prim_func(sch)
    if not infos or not all(info.is_injective() for info in infos):
        return None
    for info in reversed(infos[:-1]):
        try:
            sch.compute_inline(info.block_rv)
        except ScheduleError:  # e.g. read by more than one block: keep it as its own loop nest
            pass
    for block in sch.get_child_blocks(sch.get_sblock("root")):
        loops = sch.get_loops(block)
        if len(loops) > 1:
            sch.parallel(sch.fuse(*loops[:-1]))
            inner = loops[-1]
            extent = int(sch.get(inner).extent)
            if extent >= 2 * vector_lanes and (extent % vector_lanes == 0 or extent < SHORT_ROW * vector_lanes):
                sch.vectorize(sch.split(inner, [None, vector_lanes])[1])
        else:
            sch.parallel(loops[0])
    return sch.mod["main"]


def _is_reduction(sch: Schedule, block) -> bool:
    return any(iv.iter_type == tirx.IterVar.CommReduce for iv in sch.get(block).iter_vars)


def _extent(sch: Schedule, loop) -> int | None:
    extent = sch.get(loop).extent
    return int(extent) if isinstance(extent, tirx.IntImm) else None


def _schedule_channel_reduction(func: tirx.PrimFunc, vector_lanes: int) -> tirx.PrimFunc | None:
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
        per_channel = _leading_loops(sch, loops, kept)
        if len(loops) <= per_channel:
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


def _leading_loops(sch: Schedule, loops: list, kept: int) -> int:
    """How many leading output loops index the `kept` axes a norm's statistics keep: `kept` loops
    and the unit loops among them. Legalized for batch 1, an instance norm reduces over the batch
    axis too (statistics of shape (C,)), and the output's first loop, of extent 1, is then no
    channel loop: parallel over it, a 128x128x128 norm ran on one core in 7 ms."""
    count = taken = 0
    for loop in loops:
        if taken == kept:
            break
        count += 1
        taken += _extent(sch, loop) != 1
    return count


def schedule_float_ops(mod: tvm.IRModule, target: tvm.target.Target) -> tvm.IRModule:
    """Legalize and fuse `mod`, then give every float kernel a CPU schedule.

    After the lowering a QDQ model's convolutions are hand-scheduled integer kernels; what is
    left is memory-bound float glue (instance norm, ReLU, padding, quantize, tanh) whose default
    TVM loops are serial and scalar. Scheduled here (instance norms by
    `_schedule_channel_reduction`, other reductions by dlight's CPU rule, parallel and vectorized
    loops for the rest), the model needs no MetaSchedule run, which on a 2-core machine costs
    hours for these 40-odd small tasks. `prepare` makes tanh TVM's fast rational approximation
    (about 1e-7 from libm's, far below one quantization step) rather than a scalar libm call per
    element.
    """
    return default_cpu_schedules(prepare(mod, target), target)


def default_cpu_schedules(prepared: tvm.IRModule, target: tvm.target.Target) -> tvm.IRModule:
    """Schedule every kernel of a prepared module that has no schedule yet, for a CPU.

    Instance norms get `_schedule_channel_reduction`, other reductions dlight's CPU rule, and
    elementwise and data-movement kernels parallel, vectorized loops. Left alone, such a kernel
    runs TVM's default loops: serial and scalar. That is the case for the kernels a database does not
    cover, such as the gathers of reflection padding (never tuned), or tasks a budget did not reach.
    float32 direct convolutions get `schedule_direct_conv`'s register-tiled kernel, their padding
    and elementwise epilogue included; a convolution of another form (grouped, integer) keeps
    TVM's loops.
    """
    lanes = float_lanes(target)
    for gvar, func in prepared.functions_items():
        if isinstance(func, tirx.PrimFunc) and not _is_scheduled(func):
            scheduled = _schedule_channel_reduction(func, lanes)
            if scheduled is None:
                scheduled = schedule_direct_conv(func, lanes)
            if scheduled is not None:
                prepared[gvar] = scheduled.with_attr("tirx.is_scheduled", True)
    with target:
        prepared = dlight.ApplyDefaultSchedule(dlight.cpu.Reduction())(prepared)
    for gvar, func in prepared.functions_items():
        if isinstance(func, tirx.PrimFunc) and not _is_scheduled(func):
            scheduled = _schedule_injective(func)
            if scheduled is not None:
                prepared[gvar] = scheduled.with_attr("tirx.is_scheduled", True)
    return prepared


def _is_scheduled(func: tirx.PrimFunc) -> bool:
    return bool(func.attrs and func.attrs.get("tirx.is_scheduled", False))
