"""The "llvm" backend: a CPU's shared library for the Relax VM, on this machine or a board."""

from __future__ import annotations

from compile.backends import register
from compile.build import CompiledModel, compile_model
from compile.pipeline import ModelUnderTest, database_to_apply, relax_for_target
from compile.tuning import cross_compiler
from targets import ResolvedTarget


@register("llvm")
def build_library(model: ModelUnderTest, target: ResolvedTarget) -> CompiledModel:
    """Build from the committed database (no tuning); a cache hit skips import and codegen."""
    database = database_to_apply(model, target)
    fcompile = cross_compiler(target.config) if target.config.cross else None  # a board's library
    return compile_model(relax_for_target(model, target), target.tvm_target, database, model.digest, model.input_shape,
                         fcompile=fcompile)
