"""The compile stage's public interface: a model under test -> tuned, built artifact for a target.

A model under test is either a registry generator (torch, imported through torch.export) or a
user's ONNX file (imported through the ONNX frontend after shape folding). Everything downstream
(tuning, building, benchmarking) sees only `ModelUnderTest`. Artifacts are keyed by a digest of the
name, weights and input shape, so changed weights never reuse a stale build or export.
"""

from __future__ import annotations

import hashlib
import tempfile
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Callable

import numpy as np
import psutil
import torch
import tvm

from compile.build import CACHE_DIR, CompiledModel, compile_model
from compile.database import TuningDatabase, database_for
from compile.int8 import lower_quantized_convs
from compile.onnx_import import graph_inputs, load_onnx, onnx_macs, onnx_peak_activation_bytes, onnx_to_relax
from compile.qdq_integer import onnx_at_input_shape
from compile.torch_import import torch_to_relax
from compile.tuning import cross_compiler, tune
from errors import UserError
from lwgan_models import LoadedModel
from lwgan_models.onnx_export import export_onnx as lwgan_export_onnx
from lwgan_models.registry import Variant, trace_on_meta
from lwgan_models.registry import load as registry_load
from targets import ResolvedTarget


@dataclass(frozen=True)
class ModelUnderTest:
    name: str
    family: str
    variant: str  # "fp32" for a base model, else the compression method ("ptq", "kd", ...)
    precision: str  # "fp32" | "int8" (an ONNX file with QuantizeLinear/DequantizeLinear)
    weights: str  # "random" or "<path>@sha256:<hex>"
    params: int
    macs: int
    size_fp32_bytes: int
    input_shape: tuple[int, ...]
    digest: str
    make_relax: Callable[..., tvm.IRModule]  # (fused_subpixel=False): see torch_to_relax
    onnx_file: Callable[[], Path]
    torch_module: torch.nn.Module | None = None  # None for ONNX files: no torch baseline
    base_model: str = ""  # the registry model a variant was made from ("" for a user's ONNX file)
    quality: dict = field(default_factory=dict)  # from the checkpoint card: psnr_db, ssim, seed_metric(_name)


def from_registry(loaded: LoadedModel, input_shape: tuple[int, ...] | None = None) -> ModelUnderTest:
    shape = tuple(input_shape or loaded.spec.input_shape)
    channels = loaded.spec.input_shape[1]
    if len(shape) != 4 or shape[1] != channels:
        raise UserError(f"{loaded.spec.name}: input shape {shape} is not N×{channels}×H×W (NCHW)")
    try:  # a shape-only forward on the meta device: cheap, and it proves the shape fits
        macs, peak_bytes = trace_on_meta(loaded.spec, shape)
    except (RuntimeError, ValueError) as exc:
        reason = str(exc).strip().splitlines()[0]
        raise UserError(f"{loaded.spec.name}: input shape {shape} does not fit the model ({reason})") from exc
    require_memory(loaded.spec.name, shape, peak_bytes)
    digest = source_digest(loaded.spec.name, loaded.module, shape)
    return ModelUnderTest(
        name=loaded.spec.name,
        family=loaded.spec.family,
        variant=loaded.card.get("method", "fp32"),
        precision="fp32",
        base_model=loaded.card.get("base", loaded.spec.name),
        quality=quality_of(loaded.card),
        weights=loaded.weights,
        params=loaded.params,
        macs=macs,
        size_fp32_bytes=loaded.size_fp32_bytes,
        input_shape=shape,
        digest=digest,
        make_relax=lambda fused_subpixel=False: torch_to_relax(loaded.module, shape, loaded.spec.name, fused_subpixel),
        onnx_file=lambda: export_onnx(loaded.module, shape, digest),
        torch_module=loaded.module,
    )


def from_onnx_file(path: str | Path, input_shape: tuple[int, ...] | None = None) -> ModelUnderTest:
    """A user's ONNX generator with one image input, at its declared or the given static shape."""
    path = Path(path)
    model = load_onnx(path)
    inputs = graph_inputs(model)
    if len(inputs) != 1:
        raise UserError(f"{path}: expected one image input, found {len(inputs)} ({', '.join(v.name for v in inputs)})")
    shapes = {inputs[0].name: tuple(input_shape)} if input_shape else None
    if shapes:  # before the import, which would allocate constants at this size
        require_memory(path.name, tuple(input_shape), onnx_peak_activation_bytes(model, shapes))
    mod = onnx_to_relax(model, shapes)  # fails early, with the operator named, if it cannot be imported
    shape = tuple(int(d) for d in mod["main"].params[0].ty.shape)
    raw = path.read_bytes()
    sha = hashlib.sha256(raw).hexdigest()
    weights = sum(int(np.prod(t.dims)) for t in model.graph.initializer)
    quantized = any(n.op_type in ("QuantizeLinear", "DequantizeLinear") for n in model.graph.node)
    return ModelUnderTest(
        name=path.stem,
        family="onnx",
        variant="int8-qdq" if quantized else "fp32",
        precision="int8" if quantized else "fp32",
        weights=f"{path}@sha256:{sha}",
        params=weights,
        macs=onnx_macs(model, {inputs[0].name: shape}),
        size_fp32_bytes=4 * weights,
        input_shape=shape,
        digest=hashlib.sha256(f"{sha}|{shape}".encode()).hexdigest()[:24],
        make_relax=lambda fused_subpixel=False: mod,
        onnx_file=lambda: path,
    )


def from_variant(variant: Variant, input_shape: tuple[int, ...] | None = None) -> ModelUnderTest:
    """A compressed variant: torch variants load through the registry, int8 ones as their ONNX QDQ file.

    A QDQ file exported at another size is re-pinned to `input_shape` first (`onnx_at_input_shape`);
    the record's weights keep naming the shipped file and its hash.
    """
    if variant.format == "torch":
        return from_registry(registry_load(variant.name), input_shape)
    path = variant.path
    if input_shape is not None:
        path = onnx_at_input_shape(variant.path, tuple(input_shape), CACHE_DIR / "repinned")
    model = from_onnx_file(path, input_shape)
    shipped_sha = hashlib.sha256(variant.path.read_bytes()).hexdigest()
    return replace(
        model,
        name=variant.name,
        family=variant.base.family,
        variant=variant.method,
        base_model=variant.base.name,
        weights=f"{variant.spec().checkpoint}@sha256:{shipped_sha}",
        params=variant.card["params"],
        macs=variant.card["macs"] if path == variant.path else model.macs,
        quality=quality_of(variant.card),
    )


def require_memory(name: str, input_shape: tuple[int, ...], needed_bytes: int) -> None:
    """Refuse an input shape whose activations cannot fit in this machine's available memory, before
    anything of that size is allocated (a 20000x20000 image otherwise ends in an allocator traceback)."""
    available = psutil.virtual_memory().available
    if needed_bytes > available:
        raise UserError(f"{name}: input shape {tuple(input_shape)} needs at least {needed_bytes / 2**30:.1f} GiB "
                        f"for one layer's activations; this machine has {available / 2**30:.1f} GiB available")


def quality_of(card: dict) -> dict:
    """The quality figures a checkpoint card holds, flattened for records (absent ones are left out)."""
    quality = {key: card["quality"][key] for key in ("psnr_db", "ssim") if key in card.get("quality", {})}
    if "seed_metric" in card:
        quality.update(seed_metric_name=card["seed_metric"]["name"], seed_metric=card["seed_metric"]["value"])
    return quality


def source_digest(name: str, module: torch.nn.Module, input_shape: tuple[int, ...]) -> str:
    h = hashlib.sha256(f"{name}|{tuple(input_shape)}".encode())
    for key, tensor in module.state_dict().items():
        h.update(key.encode())
        h.update(tensor.detach().contiguous().numpy().tobytes())
    return h.hexdigest()[:24]


def database_of(model: ModelUnderTest, target: ResolvedTarget) -> TuningDatabase:
    """The database tuning appends to: always the machine's own ISA level."""
    return database_for(target.db_key, model.name)


def database_to_apply(model: ModelUnderTest, target: ResolvedTarget) -> TuningDatabase:
    """The best existing database for this machine: its own level's, else a lower level's."""
    for key in target.db_keys:
        database = database_for(key, model.name)
        if database.exists():
            return database
    return database_of(model, target)


def relax_for_target(model: ModelUnderTest, target: ResolvedTarget) -> Callable[[], tvm.IRModule]:
    """The module to tune and build: int8 QDQ models get integer conv kernels (compile/int8.py).

    On CPUs (LLVM targets) a transposed convolution whose one wide 3x3 convolution form
    compile/winograd.py runs as Winograd is imported in that form; others, and every transposed
    convolution on other targets, as the cheaper sub-pixel phases."""
    if model.precision != "int8":
        fused_subpixel = target.tvm_target.kind.name == "llvm"
        return lambda: model.make_relax(fused_subpixel=fused_subpixel)
    return lambda: lower_quantized_convs(model.make_relax(), target.tvm_target)[0]


def compile_for_target(model: ModelUnderTest, target: ResolvedTarget) -> CompiledModel:
    """Build from the committed database (no tuning); a cache hit skips import and codegen."""
    database = database_to_apply(model, target)
    fcompile = cross_compiler(target.config) if target.config.cross else None  # a board's library
    return compile_model(relax_for_target(model, target), target.tvm_target, database, model.digest, model.input_shape,
                         fcompile=fcompile)


def tune_for_target(
    model: ModelUnderTest,
    target: ResolvedTarget,
    trials: int,
    trials_per_task: int,
    report: Callable[[str], None] = print,
    focus: int | None = None,
) -> int:
    return tune(
        relax_for_target(model, target)(),
        target.tvm_target,
        database_of(model, target),
        trials,
        trials_per_task,
        report,
        population=target.config.tuning_population,
        board=target.config if target.config.link.tuning_runner == "rpc" else None,
        focus=focus,
    )


def export_onnx(module: torch.nn.Module, input_shape: tuple[int, ...], digest: str, cache_dir: Path = CACHE_DIR) -> Path:
    """The ONNX file ONNX Runtime runs as a baseline and whose size records report (cached: export takes seconds)."""
    path = cache_dir / f"{digest}.stripped.onnx"  # exported without debug metadata
    if path.exists():
        return path
    cache_dir.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(dir=cache_dir) as scratch:
        partial = Path(scratch) / "model.onnx"
        lwgan_export_onnx(module, input_shape, partial)
        partial.replace(path)
    return path
