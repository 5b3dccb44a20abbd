"""The files runtimes load, built from a model under test and cached by its digest.

Each runtime plug-in (bench/runtimes/) names the kind of artifact it loads; this module builds
that kind for a model and a target. A runtime that cannot run a model (no torch module to convert,
say) gets `NotBuildable` with the reason, which its record carries.
"""

from __future__ import annotations

import subprocess
import sys
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import torch

from compile import bf16
from compile.backends import compile_for_target
from compile.build import CACHE_DIR, CompiledModel
from compile.pipeline import ModelUnderTest
from errors import UserError
from lwgan_models.tflite_export import convertible_program
from targets import ResolvedTarget

REPO_ROOT = Path(__file__).resolve().parent.parent
TFLITE_TIMEOUT_S = 900


class NotBuildable(UserError):
    """This model has no artifact of the kind a runtime needs; the message says why."""


@dataclass(frozen=True)
class Artifact:
    path: Path
    build: CompiledModel | None = None  # a TVM library's tuning provenance


BUILDERS: dict[str, Callable[[ModelUnderTest, ResolvedTarget], Artifact]] = {}


def artifact_kind(kind: str):
    """Register a builder for one kind of artifact (a decorator)."""
    def register(builder: Callable[[ModelUnderTest, ResolvedTarget], Artifact]):
        BUILDERS[kind] = builder
        return builder
    return register


def build_artifact(kind: str, model: ModelUnderTest, target: ResolvedTarget) -> Artifact:
    if kind not in BUILDERS:
        raise UserError(f"no builder for artifact kind {kind!r}; known: {', '.join(BUILDERS)}")
    return BUILDERS[kind](model, target)


@artifact_kind("tvm")
def tvm_library(model: ModelUnderTest, target: ResolvedTarget) -> Artifact:
    """The library compile's backend for the target's kind builds (a CPU's carries its tuning provenance)."""
    built = compile_for_target(model, target)
    return Artifact(built.library, built if isinstance(built, CompiledModel) else None)


@artifact_kind("tvm-bf16")
def tvm_bf16_library(model: ModelUnderTest, target: ResolvedTarget) -> Artifact:
    """The float model built to multiply in bf16 (compile/bf16.py); not buildable for an int8 model or
    on a CPU without a bf16 level, which the record then says."""
    if model.precision != "fp32":
        raise NotBuildable(f"{model.name} is {model.precision}: it runs integer kernels, not a bf16 build")
    if not bf16.available(target.tvm_target):
        raise NotBuildable(f"isa level {target.isa_level or 'none'} has no AVX-512 BF16 or AMX-BF16: "
                           "bf16 falls back to the fp32 build")
    compiled = compile_for_target(model, target, precision="bf16")
    return Artifact(compiled.library, compiled)


@artifact_kind("onnx")
def onnx_file(model: ModelUnderTest, target: ResolvedTarget) -> Artifact:
    return Artifact(model.onnx_file())


@artifact_kind("torch")
def pickled_module(model: ModelUnderTest, target: ResolvedTarget) -> Artifact:
    """The torch module pickled into the cache: a runtime process (or the peak-memory child) loads it."""
    path = CACHE_DIR / f"{model.digest}.module.pt"
    if not path.exists():
        _require_torch_module(model, "torch eager")
        _write_atomically(path, lambda partial: torch.save(model.torch_module, partial))
    return Artifact(path)


@artifact_kind("tflite")
def tflite_file(model: ModelUnderTest, target: ResolvedTarget) -> Artifact:
    """litert-torch's conversion of the torch module (lwgan_models/tflite_export.py), in a child process."""
    path = CACHE_DIR / f"{model.digest}.tflite"
    if path.exists():
        return Artifact(path)
    _require_torch_module(model, "litert-torch")

    def convert(partial: Path) -> None:
        try:
            program = convertible_program(model.torch_module, model.input_shape, partial.with_suffix(".pt2"))
        except Exception as exc:  # noqa: BLE001 - torch.export's many error types: the record carries the message
            detail = (str(exc).strip().splitlines() or [type(exc).__name__])[0]
            raise NotBuildable(f"torch.export could not trace {model.name} for litert-torch: {detail}") from exc
        shape = "x".join(str(d) for d in model.input_shape)
        try:
            child = subprocess.run([sys.executable, "-m", "lwgan_models.tflite_export", str(program), shape,
                                    str(partial)], capture_output=True, text=True, cwd=REPO_ROOT, timeout=TFLITE_TIMEOUT_S)
        except subprocess.TimeoutExpired as exc:
            raise NotBuildable(f"litert-torch did not convert {model.name} within {TFLITE_TIMEOUT_S} s") from exc
        if child.returncode != 0 or not partial.exists():
            lines = [line for line in child.stderr.splitlines() if "Error" in line] or child.stderr.splitlines()
            raise NotBuildable(f"litert-torch could not convert {model.name}: {(lines or ['no output'])[-1].strip()}")

    _write_atomically(path, convert)
    return Artifact(path)


def _require_torch_module(model: ModelUnderTest, needs: str) -> None:
    if model.torch_module is None:
        what = "an int8 QDQ ONNX file" if model.precision == "int8" else "an ONNX file"
        raise NotBuildable(f"{needs} needs the torch module; {model.name} is {what}")


def _write_atomically(path: Path, write: Callable[[Path], None]) -> None:
    """Write through a scratch file in the same folder, so an interrupted build never leaves a partial artifact."""
    path.parent.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(dir=path.parent) as scratch:
        partial = Path(scratch) / path.name
        write(partial)
        partial.replace(path)
