"""Graph preparation: the Relax passes every build and every tuning run apply before task extraction.

They must be the same on both sides: a database is looked up by the kernels tuning extracted, so
the module it is applied to must be prepared the same way.
"""

from __future__ import annotations

import tvm
from tvm import relax

from compile import BF16_ATTR, BF16_WIDE_ATTR, bf16
from compile.rewrites import fuse_friendly
from compile.schedules.bf16_conv import bf16_direct_convs
from compile.schedules.norm import schedule_instance_norms
from compile.schedules.pad import reflection_pads
from compile.schedules.winograd import winograd_convs


def float_lanes(target: tvm.target.Target) -> int:
    """float32 lanes of the target CPU's vectors (16 on AVX-512, 8 on AVX2, 4 on NEON), at least 4."""
    return max(tvm.target.codegen.llvm_get_vector_width(target) // 32, 4)


def prepare(mod: tvm.IRModule, target: tvm.target.Target) -> tvm.IRModule:
    """The passes before task extraction; the same ones must run before applying a database.

    On CPUs the large 3x3 convolutions become hand-scheduled Winograd kernels (compile/schedules/winograd.py);
    in a module marked for bf16 (`compile.BF16_ATTR`) their products (of the wide ones, those its
    calibration chose: `compile.BF16_WIDE_ATTR`) and the other convolutions
    multiply in bf16 (compile/bf16.py, compile/schedules/bf16_conv.py), on AMX tiles where the target
    has them and the shapes fit. First, zero pads and an output tanh join the convolutions next to them and
    takes of constants fold (compile/rewrites.py): a pad that is a conv's padding is written by the
    kernel that packs its input (a bf16 block's, a Winograd transform's). Reflection pads the importer
    wrote as gathers become one vectorized kernel (compile/schedules/pad.py) before the bf16 rewrite
    folds constants: folded there, gathers and takes printed TOPI's out-of-bounds warning dozens of
    times a build. tanh becomes TVM's fast rational
    approximation: LLVM otherwise calls libm's scalar expf per element (0.45 ms of a U-Net's RGB
    output, 49k values), and the approximation is ~1e-7 from libm. After legalization and fusion the
    instance norms get their hand schedule (compile/schedules/norm.py)."""
    if target.kind.name == "llvm":
        in_bf16 = bool(mod.attrs is not None and mod.attrs.get(BF16_ATTR))
        wide_in_bf16 = {str(d) for d in mod.attrs.get(BF16_WIDE_ATTR, [])} if in_bf16 else set()
        mod = fuse_friendly(mod)[0]  # first: a conv's zero pad becomes its padding, which its packing writes
        mod = winograd_convs(mod, float_lanes(target), in_bf16, wide_in_bf16, bf16.tiles_available(target))[0]
        mod = reflection_pads(mod)[0]
        if in_bf16:
            mod = bf16_direct_convs(mod, bf16.tiles_available(target))[0]
        mod = relax.transform.FastMathTransform()(mod)
    with target:
        mod = tvm.transform.Sequential(
            [
                relax.transform.DecomposeOpsForInference(),
                relax.transform.CanonicalizeBindings(),
                relax.get_pipeline("zero"),
            ]
        )(mod)
    return schedule_instance_norms(mod, float_lanes(target)) if target.kind.name == "llvm" else mod
