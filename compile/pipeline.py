"""The compile stage's public interface: registry model -> tuned, built artifact for a target.

Everything is keyed by a digest of the model's name and weights, so changed weights never reuse a
stale build or ONNX export.
"""

from __future__ import annotations

import contextlib
import hashlib
import io
import tempfile
from pathlib import Path
from typing import Callable

import torch

from compile.build import CACHE_DIR, CompiledModel, compile_model
from compile.database import TuningDatabase, database_for
from compile.torch_import import torch_to_relax
from compile.tuning import tune
from lwgan_models import LoadedModel
from targets import ResolvedTarget


def source_digest(name: str, module: torch.nn.Module, input_shape: tuple[int, ...]) -> str:
    h = hashlib.sha256(f"{name}|{tuple(input_shape)}".encode())
    for key, tensor in module.state_dict().items():
        h.update(key.encode())
        h.update(tensor.detach().contiguous().numpy().tobytes())
    return h.hexdigest()[:24]


def database_of(loaded: LoadedModel, target: ResolvedTarget) -> TuningDatabase:
    """The database tuning appends to: always the machine's own ISA level."""
    return database_for(target.db_key, loaded.spec.name)


def database_to_apply(loaded: LoadedModel, target: ResolvedTarget) -> TuningDatabase:
    """The best existing database for this machine: its own level's, else a lower level's."""
    for key in target.db_keys:
        database = database_for(key, loaded.spec.name)
        if database.exists():
            return database
    return database_of(loaded, target)


def compile_for_target(loaded: LoadedModel, target: ResolvedTarget, input_shape: tuple[int, ...] | None = None) -> CompiledModel:
    """Build from the committed database (no tuning); a cache hit skips import and codegen."""
    shape = tuple(input_shape or loaded.spec.input_shape)
    digest = source_digest(loaded.spec.name, loaded.module, shape)
    database = database_to_apply(loaded, target)
    database.validate()
    return compile_model(
        lambda: torch_to_relax(loaded.module, shape, loaded.spec.name),
        target.tvm_target,
        database,
        digest,
        shape,
    )


def tune_for_target(
    loaded: LoadedModel,
    target: ResolvedTarget,
    trials: int,
    trials_per_task: int,
    report: Callable[[str], None] = print,
) -> int:
    mod = torch_to_relax(loaded.module, loaded.spec.input_shape, loaded.spec.name)
    return tune(
        mod, target.tvm_target, database_of(loaded, target), trials, trials_per_task, report,
        population=target.config.tuning_population,
    )


def export_onnx(loaded: LoadedModel, input_shape: tuple[int, ...] | None = None, cache_dir: Path = CACHE_DIR) -> Path:
    """The ONNX file ONNX Runtime runs as a baseline (cached: the dynamo exporter takes seconds)."""
    shape = tuple(input_shape or loaded.spec.input_shape)
    path = cache_dir / f"{source_digest(loaded.spec.name, loaded.module, shape)}.onnx"
    if path.exists():
        return path
    cache_dir.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(dir=cache_dir) as scratch:
        partial = Path(scratch) / "model.onnx"
        with contextlib.redirect_stdout(io.StringIO()):  # the exporter narrates every step
            torch.onnx.export(loaded.module, (torch.zeros(*shape),), str(partial), dynamo=True, external_data=False)
        partial.replace(path)
    return path
