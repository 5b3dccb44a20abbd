"""Models under test, their tuning databases and tuning, and the Relax module a target's build starts from
(the builds themselves: compile/backends/, `compile_for_target`).

A model under test is either a registry generator (torch, imported through torch.export) or a
user's ONNX file (imported through the ONNX frontend after shape folding). Everything downstream
(tuning, building, benchmarking) sees only `ModelUnderTest`. Artifacts are keyed by a digest of the
name, weights and input shape, so changed weights never reuse a stale build or export.
"""

from __future__ import annotations

import hashlib
import tempfile
from collections import Counter
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Callable, Mapping, Sequence

import numpy as np
import onnx
import psutil
import torch
import tvm
from tvm import relax

from compile import BF16_ATTR, BF16_WIDE_ATTR, LOWERING_ATTR, bf16, bf16_budget
from compile.build import CACHE_DIR, PIPELINE_VERSION
from compile.database import TuningDatabase, database_for
from compile.int8.lowering import lower_quantized_convs
from compile.passes import prepare
from compile.onnx_import import (chain_onnx, declared_shape, graph_inputs, load_onnx, onnx_at_input_shape, onnx_macs,
                                 onnx_peak_activation_bytes, onnx_to_relax, static_input_shapes)
from compile.int8.qoperator import qdq_from_qoperator
from compile.rewrites import fuse_friendly, subpixel_transposed_convs
from compile.torch_import import torch_to_relax
from compile.tuning import tune
from errors import UserError
from lwgan_models import LoadedModel
from lwgan_models.onnx_export import export_onnx as lwgan_export_onnx
from lwgan_models.registry import Variant, trace_on_meta
from lwgan_models.registry import load as registry_load
from targets import ResolvedTarget


IMAGE_CHANNELS = (1, 3, 4)  # grey, RGB, RGBA
PRECISIONS = ("fp32", "bf16")  # what a float model can be built to run in


@dataclass(frozen=True)
class InputSpec:
    """One graph input of an ONNX model at its static shape, and what the benchmark feeds it.

    `fill` says how: "image" (the test photo, bench/run.py `test_image`), "file" (`value`, a user's
    .npy), or a deterministic fill seeded by the input's name, so every run and runtime sees the same
    values: integer and bool inputs "zeros" (index 0 is valid for any embedding table), a float
    weights vector (a name holding "weight", at most 2-D: conditional instance norm's style mix)
    "one-hot" at a seeded position of its last axis (one style, as users pick them), any other float
    input "uniform" in [-1, 1] (a latent code, a noise map, an embedding).
    """

    name: str
    shape: tuple[int, ...]
    dtype: str  # numpy's name for it: "float32", "int64", ...
    fill: str  # "image" | "file" | "zeros" | "one-hot" | "uniform"
    source: str = ""  # a file's "<path>@sha256:<hex>"
    value: np.ndarray | None = field(default=None, compare=False, repr=False)  # a file's contents

    @property
    def seed(self) -> int:
        return int(hashlib.sha256(self.name.encode()).hexdigest()[:8], 16)

    def describe(self) -> str:
        """How the record says this input was filled."""
        if self.fill == "file":
            return f"file:{self.source}"
        if self.fill in ("one-hot", "uniform"):
            return f"seeded-{self.fill}(seed={self.seed})"
        return "test-image" if self.fill == "image" else self.fill

    def filled(self) -> np.ndarray:
        """The deterministic value of a filled input (not the image: the bench makes that one)."""
        if self.fill == "file":
            return self.value
        if self.fill == "zeros":
            return np.zeros(self.shape, self.dtype)
        rng = np.random.default_rng(self.seed)
        if self.fill == "uniform":
            return rng.uniform(-1.0, 1.0, self.shape).astype(self.dtype)
        value = np.zeros(self.shape, self.dtype)
        value[..., rng.integers(self.shape[-1])] = 1
        return value

    def record(self) -> dict:
        return {"name": self.name, "shape": list(self.shape), "dtype": self.dtype, "fill": self.describe()}


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
    input_shape: tuple[int, ...]  # the image input's (a model without one: its first input's)
    digest: str
    make_relax: Callable[..., tvm.IRModule]  # (fused_for=None): see torch_to_relax
    onnx_file: Callable[[], Path]
    torch_module: torch.nn.Module | None = None  # None for ONNX files: no torch baseline
    base_model: str = ""  # the registry model a variant was made from ("" for a user's ONNX file)
    quality: dict = field(default_factory=dict)  # from the checkpoint card: psnr_db, ssim, seed_metric(_name)
    # An ONNX file's inputs in the graph's order (= the Relax `main`'s parameters); () for a registry
    # generator, whose one input is the image at `input_shape`.
    inputs: tuple[InputSpec, ...] = ()
    kind: str = "generator"  # "other" when the output is not an N×C×H×W image (an embedding, logits)


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
        make_relax=lambda fused_for=None: torch_to_relax(loaded.module, shape, loaded.spec.name, fused_for),
        onnx_file=lambda: export_onnx(loaded.module, shape, digest),
        torch_module=loaded.module,
    )


def from_onnx_file(path: str | Path, input_shape: tuple[int, ...] | None = None,
                   shapes: Mapping[str, tuple[int, ...]] | None = None, values: Mapping[str, str | Path] | None = None,
                   image: str | None = None) -> ModelUnderTest:
    """A user's ONNX model at static input shapes: `input_shape` pins the image input (or a one-input
    model's input), `shapes` any input by name, `values` feeds inputs from .npy files (their shapes pin
    them too); `image` names the image input where the 4-D float one is ambiguous (see `InputSpec`)."""
    path = Path(path)
    model = load_onnx(path)
    declared = {v.name: v for v in graph_inputs(model)}
    for flag, names in (("--shape", shapes or {}), ("--input", values or {}), ("--image", [image] if image else [])):
        for name in names:
            if name not in declared:
                raise UserError(f"{path}: {flag} {name}: no input named {name!r}; the model's inputs are "
                                f"{', '.join(declared)}")
    pinned = {name: tuple(int(d) for d in shape) for name, shape in (shapes or {}).items()}
    files = {name: _input_file(path, name, Path(file), declared[name], pinned.get(name))
             for name, file in (values or {}).items()}
    pinned.update({name: array.shape for name, (array, _) in files.items()})
    image = _image_input(path, declared, pinned, image)
    if input_shape:
        if image is None and len(declared) > 1:
            raise UserError(f"{path}: a shape without a name pins the image input; this model has none among "
                            f"{', '.join(declared)}: give --shape NAME=SHAPE")
        pinned_name = image or next(iter(declared))
        if pinned.get(pinned_name, tuple(input_shape)) != tuple(input_shape):
            raise UserError(f"{path}: input {pinned_name!r} given two shapes, {tuple(input_shape)} and "
                            f"{pinned[pinned_name]}")
        pinned[pinned_name] = tuple(input_shape)
    try:
        pinned = static_input_shapes(model, pinned)
    except UserError as exc:
        raise UserError(f"{path}: {exc}") from exc
    # before the import, which would allocate constants at this size
    require_memory(path.name, pinned.get(image) or next(iter(pinned.values())), onnx_peak_activation_bytes(model, pinned))
    mod = onnx_to_relax(model, pinned)  # fails early, with the operator named, if it cannot be imported
    params = mod["main"].params
    if len(params) != len(declared):
        raise UserError(f"{path}: TVM's import kept {len(params)} of the model's {len(declared)} inputs")
    shapes = {name: tuple(int(d) for d in param.ty.shape) for name, param in zip(declared, params)}
    specs = tuple(_input_spec(declared[name], shape, name == image, files.get(name)) for name, shape in shapes.items())
    shape = shapes[image or next(iter(declared))]
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
        macs=onnx_macs(model, shapes),
        size_fp32_bytes=4 * weights,
        input_shape=shape,
        # one input: the key builds before several inputs were kept
        digest=hashlib.sha256(f"{sha}|{shape if len(shapes) == 1 else shapes}".encode()).hexdigest()[:24],
        make_relax=lambda fused_for=None: mod,
        onnx_file=lambda: path,
        inputs=specs,
        kind="generator" if _image_like(mod["main"].ret_ty) else "other",
    )


def from_onnx_files(paths: Sequence[str | Path], input_shape: tuple[int, ...] | None = None,
                    shapes: Mapping[str, tuple[int, ...]] | None = None, values: Mapping[str, str | Path] | None = None,
                    image: str | None = None) -> ModelUnderTest:
    """One ONNX file (`from_onnx_file`), or two benchmarked as a unit: the first's outputs feed the second's
    inputs of the same names (`chain_onnx`). The chained file is written to the cache; records name both."""
    if len(paths) == 1:
        return from_onnx_file(paths[0], input_shape, shapes, values, image)
    if len(paths) != 2:
        raise UserError(f"--onnx {','.join(map(str, paths))}: one file, or two to run one after the other")
    first, second = Path(paths[0]), Path(paths[1])
    chained = chain_onnx(first, second)
    stages = " + ".join(f"{p}@sha256:{hashlib.sha256(p.read_bytes()).hexdigest()}" for p in (first, second))
    path = CACHE_DIR / "chained" / hashlib.sha256(stages.encode()).hexdigest()[:24] / f"{first.stem}+{second.stem}.onnx"
    if not path.exists():
        path.parent.mkdir(parents=True, exist_ok=True)
        partial = path.with_suffix(".partial")
        onnx.save(chained, partial)
        partial.replace(path)
    return replace(from_onnx_file(path, input_shape, shapes, values, image), weights=stages)


def _dtype(value: onnx.ValueInfoProto) -> np.dtype:
    return np.dtype(onnx.helper.tensor_dtype_to_np_dtype(value.type.tensor_type.elem_type))


def _image_input(path: Path, declared: dict[str, onnx.ValueInfoProto], pinned: dict[str, tuple[int, ...]],
                 chosen: str | None) -> str | None:
    """`chosen` if it is 4-D float, else the 4-D float input; among several, the only one with 3 channels
    (NCHW or NHWC); None without one."""
    shapes = {name: pinned.get(name) or declared_shape(value) for name, value in declared.items()}
    candidates = [name for name, value in declared.items()
                  if _dtype(value).kind == "f" and shapes[name] is not None and len(shapes[name]) == 4]
    if chosen:
        if chosen not in candidates:
            raise UserError(f"{path}: --image {chosen}: the image input must be 4-D float, it is "
                            f"{_dtype(declared[chosen])} of shape {shapes[chosen]}")
        return chosen
    if len(candidates) > 1:
        candidates = [name for name in candidates if 3 in (shapes[name][1], shapes[name][3])] or candidates
    if len(candidates) > 1:
        raise UserError(f"{path}: several 4-D float inputs ({', '.join(candidates)}); name the image with --image NAME")
    return candidates[0] if candidates else None


def _input_file(path: Path, name: str, file: Path, value: onnx.ValueInfoProto,
                shape: tuple[int, ...] | None) -> tuple[np.ndarray, str]:
    """A .npy file's array for input `name`, checked against its declared (or given) shape and dtype."""
    if not file.is_file():
        raise UserError(f"{path}: --input {name}: no such file {file}")
    try:
        array = np.load(file, allow_pickle=False)
    except (ValueError, OSError) as exc:
        raise UserError(f"{path}: --input {name}: {file} is not a .npy array ({exc})") from exc
    expected = shape or declared_shape(value)
    if expected is not None and (len(expected) != array.ndim or any(
            isinstance(e, int) and e != a for e, a in zip(expected, array.shape))):
        raise UserError(f"{path}: --input {name}: {file} holds shape {array.shape}, the input takes {tuple(expected)}")
    dtype = _dtype(value)
    if not np.can_cast(array.dtype, dtype, casting="same_kind"):
        raise UserError(f"{path}: --input {name}: {file} holds {array.dtype}, the input takes {dtype}")
    return array.astype(dtype), f"{file}@sha256:{hashlib.sha256(file.read_bytes()).hexdigest()}"


def _input_spec(value: onnx.ValueInfoProto, shape: tuple[int, ...], image: bool,
                file: tuple[np.ndarray, str] | None) -> InputSpec:
    dtype = _dtype(value)
    if image:
        fill = "image"
    elif file is not None:
        return InputSpec(value.name, shape, dtype.name, "file", source=file[1], value=file[0])
    elif dtype.kind != "f":
        fill = "zeros"
    else:
        fill = "one-hot" if "weight" in value.name.lower() and len(shape) <= 2 else "uniform"
    return InputSpec(value.name, shape, dtype.name, fill)


def _image_like(output: relax.Type) -> bool:
    """Whether a model's (first) output is an N×C×H×W image with 1, 3 or 4 channels, first or last."""
    if isinstance(output, relax.TupleType):
        output = output.fields[0]
    if not isinstance(output, relax.TensorType) or output.shape is None or output.ndim != 4:
        return False
    shape = [int(d) for d in output.shape]
    height_width = shape[2:] if shape[1] in IMAGE_CHANNELS else shape[1:3] if shape[3] in IMAGE_CHANNELS else [1]
    return min(height_width) > 1


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


def relax_for_target(model: ModelUnderTest, target: ResolvedTarget, precision: str = "fp32"
                     ) -> Callable[[], tvm.IRModule]:
    """The module to tune and build: int8 QDQ models get integer conv kernels (compile/int8/lowering.py);
    with `precision` "bf16", a float model's convolutions multiply in bf16 (compile/bf16.py), its Winograd
    convs wider than `bf16.WINOGRAD_MAX_CHANNELS` only where its calibrated error budget allows
    (compile/bf16_budget.py; an ONNX file's keep float32 products).

    On CPUs (LLVM targets) a transposed convolution whose one wide 3x3 convolution form pays at the
    build's precision (compile/torch_import.py `fused_form_pays`) is imported in that form; others, and
    every transposed convolution on other targets, as the cheaper sub-pixel phases. An imported ONNX file's
    transposed convolutions become sub-pixel phases too (`subpixel_transposed_convs`); in an int8
    file each phase is then an integer convolution."""
    if precision not in PRECISIONS:
        raise UserError(f"unknown build precision {precision!r}; known: {', '.join(PRECISIONS)}")
    if precision == "bf16":
        if model.precision != "fp32":
            raise UserError(f"{model.name}: bf16 builds start from a float32 model, not an {model.precision} one")
        bf16.require(target.tvm_target)
    if model.precision != "int8":
        fused_for = precision if target.tvm_target.kind.name == "llvm" else None

        def imported() -> tvm.IRModule:
            mod = subpixel_transposed_convs(model.make_relax(fused_for=fused_for))[0]
            if precision != "bf16":
                return mod
            mod = mod.with_attr(BF16_ATTR, True)
            if model.torch_module is None:  # an ONNX file: its wide Winograd convs keep float32 products
                return mod
            budget = bf16_budget.calibrated(model.torch_module, model.input_shape, f"{model.digest}|{PIPELINE_VERSION}",
                                            CACHE_DIR)
            if not budget.wide:
                return mod
            return mod.with_attr(BF16_WIDE_ATTR, sorted(budget.chosen)).with_attr(LOWERING_ATTR, budget.describe())

        return imported

    def lowered() -> tvm.IRModule:
        mod, transposed, phases = subpixel_transposed_convs(model.make_relax())
        mod, summary = lower_quantized_convs(fuse_friendly(mod)[0] if transposed else mod, target.tvm_target)
        graph = qdq_from_qoperator(load_onnx(model.onnx_file())).graph
        ops = Counter(node.op_type for node in graph.node)
        return mod.with_attr(LOWERING_ATTR, summary.describe(ops, transposed, phases))

    return lowered


def prepared_kernels(model: ModelUnderTest, target: ResolvedTarget, precision: str = "fp32") -> tvm.IRModule:
    """The kernels `compile_for_target` builds for a CPU target, before scheduling, under the names the
    built library runs them by (a per-kernel profile's names): for an int8 model its integer conv
    kernels (`compile.INTEGER_CONV`, their MACs in `compile.MACS_ATTR`), not the fake-quant graph."""
    return prepare(relax_for_target(model, target, precision)(), target.tvm_target)


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
