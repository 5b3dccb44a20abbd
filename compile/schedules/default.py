"""Default CPU schedules for the kernels of a prepared module that no database record covers.

Left alone, such a kernel runs TVM's default loops: serial and scalar. Here (instance norms come
scheduled from `prepare`, compile/schedules/norm.py) other reductions get dlight's CPU rule, direct fp32 convolutions the
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
from compile.schedules import is_scheduled
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


def schedule_float_ops(mod: tvm.IRModule, target: tvm.target.Target) -> tvm.IRModule:
    """Legalize and fuse `mod`, then give every float kernel a CPU schedule.

    After the lowering a QDQ model's convolutions are hand-scheduled integer kernels; what is
    left is memory-bound float glue (instance norm, ReLU, padding, quantize, tanh) whose default
    TVM loops are serial and scalar. Scheduled here (instance norms by `prepare`, other reductions by
    dlight's CPU rule, parallel and vectorized loops for the rest), the model needs no MetaSchedule run, which on a 2-core machine costs
    hours for these 40-odd small tasks. `prepare` makes tanh TVM's fast rational approximation
    (about 1e-7 from libm's, far below one quantization step) rather than a scalar libm call per
    element.
    """
    return default_cpu_schedules(prepare(mod, target), target)


def default_cpu_schedules(prepared: tvm.IRModule, target: tvm.target.Target) -> tvm.IRModule:
    """Schedule every kernel of a prepared module that has no schedule yet, for a CPU.

    Instance norms arrive scheduled (`prepare`: compile/schedules/norm.py), other reductions get dlight's CPU rule, and
    elementwise and data-movement kernels parallel, vectorized loops. Left alone, such a kernel
    runs TVM's default loops: serial and scalar. That is the case for the kernels a database does not
    cover, such as the gathers of reflection padding (never tuned), or tasks a budget did not reach.
    float32 direct convolutions get `schedule_direct_conv`'s register-tiled kernel, their padding
    and elementwise epilogue included; a convolution of another form (grouped, integer) keeps
    TVM's loops.
    """
    lanes = float_lanes(target)
    for gvar, func in prepared.functions_items():
        if isinstance(func, tirx.PrimFunc) and not is_scheduled(func):
            scheduled = schedule_direct_conv(func, lanes)
            if scheduled is not None:
                prepared[gvar] = scheduled.with_attr("tirx.is_scheduled", True)
    with target:
        prepared = dlight.ApplyDefaultSchedule(dlight.cpu.Reduction())(prepared)
    for gvar, func in prepared.functions_items():
        if isinstance(func, tirx.PrimFunc) and not is_scheduled(func):
            scheduled = _schedule_injective(func)
            if scheduled is not None:
                prepared[gvar] = scheduled.with_attr("tirx.is_scheduled", True)
    return prepared


