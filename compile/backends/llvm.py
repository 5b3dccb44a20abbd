"""The "llvm" backend: a CPU's shared library for the Relax VM, on this machine or a board."""

from __future__ import annotations

from compile.backends import register
from compile.build import CompiledModel, compile_model
from compile.pipeline import ModelUnderTest, database_to_apply, relax_for_target
from compile.tuning import cross_compiler
from targets import ResolvedTarget


@register("llvm")
def build_library(model: ModelUnderTest, target: ResolvedTarget, precision: str = "fp32") -> CompiledModel:
    """Build from the committed database (no tuning); a cache hit skips import and codegen. `precision`
    "bf16" multiplies a float model's convolutions in bf16 where the CPU has AVX-512 BF16 (compile/bf16.py)."""
    database = database_to_apply(model, target)
    fcompile = cross_compiler(target.config) if target.config.cross else None  # a board's library
    digest = model.digest if precision == "fp32" else f"{model.digest}+{precision}"
    return compile_model(relax_for_target(model, target, precision), target.tvm_target, database, digest,
                         model.input_shape, fcompile=fcompile)
