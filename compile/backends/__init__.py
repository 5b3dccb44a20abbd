"""Compile backends, one per TVM target kind, behind one entry: `compile_for_target(model, target)`.

A backend turns a model under test into what a device of its kind runs: "llvm" a shared library
for the Relax VM, built from the target's tuning database and cached (`llvm.py`); "c" a plain C
project for a microcontroller, with no TVM runtime (`c.py`); "opencl" a GPU board's library with
its OpenCL C beside it (`opencl.py`). The target config's [tvm] kind selects the backend, so
callers never choose one. A backend is a function `(model, target, **options) -> artifact`
registered under its kind (`register`, a decorator); its module registers it when imported, so
adding a kind is one module and needs no change elsewhere.
"""

from __future__ import annotations

import importlib
from typing import Any, Callable

from errors import UserError

Backend = Callable[..., Any]  # (model, target, **options) -> the artifact of its kind

_BACKENDS: dict[str, Backend] = {}


def register(kind: str) -> Callable[[Backend], Backend]:
    """Register the backend of TVM target kind `kind` (a decorator); a second one for a kind replaces the first."""
    def add(backend: Backend) -> Backend:
        _BACKENDS[kind] = backend
        return backend
    return add


def unregister(kind: str) -> None:
    _BACKENDS.pop(kind, None)


def registered() -> tuple[str, ...]:
    """The target kinds that have a backend, in registration order."""
    return tuple(_BACKENDS)


def compile_for_target(model, target, **options):
    """`model` compiled for `target` (a `targets.ResolvedTarget`) by the backend of the target's kind,
    with that backend's `options` (an output folder, a report callback, ...); returns its artifact:
    `CompiledModel` (llvm), `CExport` (c), `OpenCLArtifact` (opencl)."""
    kind = target.config.tvm["kind"]
    if kind not in _BACKENDS:
        raise UserError(f"target {target.config.name!r} is of kind {kind!r}, which no compile backend builds; "
                        f"backends: {', '.join(_BACKENDS)}")
    return _BACKENDS[kind](model, target, **options)


BUILT_IN = ("llvm", "c", "opencl")
for _module in BUILT_IN:
    importlib.import_module(f"{__name__}.{_module}")
