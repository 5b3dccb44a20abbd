"""The benchmarked models by name, and loading them with their weights' provenance and cost.

Every stage resolves a model through `load`, so a record's `weights`, `params`, `macs` and
`size_fp32_bytes` mean the same thing everywhere. Without a checkpoint the weights are drawn
from a fixed seed: two runs of the same model then compile and compare the same network.
"""

from __future__ import annotations

import hashlib
import importlib
import io
import json
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import torch
from torch import nn
from torch.utils.flop_counter import FlopCounterMode

from errors import UserError
from lwgan_models.cyclegan import define_G
from lwgan_models.hooks import forward_hooks
from lwgan_models.style_transfer import StyleTransferNet

REPO_ROOT = Path(__file__).resolve().parent.parent
CHECKPOINT_DIR = REPO_ROOT / "lwgan_models" / "checkpoints"
RANDOM_WEIGHTS_SEED = 0
VARIANT_SEPARATOR = "+"  # "<base model>+<compression method>", e.g. cyclegan-resnet6-ngf16+kd


def _deferred(module: str, function: str) -> Callable:
    """`module.function`, imported when first called: those modules import this one."""
    def call(*args, **kwargs):
        return getattr(importlib.import_module(module), function)(*args, **kwargs)
    return call


@dataclass(frozen=True)
class SeedMetric:
    name: str  # as cards and records name it, e.g. "generator_loss"
    # (base LoadedModel, generator, held-out A images, held-out B folder) -> {"value": ..., more}
    measure: Callable[..., dict]


# An architecture is data ({"family": ..., plus that family's size knobs}): checkpoint cards store it,
# so a distilled or pruned generator rebuilds as the official class at its smaller size.
@dataclass(frozen=True)
class Family:
    """What the stages need to know about a kind of generator, so none of them compares family names."""

    name: str  # the "family" of an arch dict
    build: Callable[[dict], nn.Module]  # arch -> the official network at that size
    width_key: str  # the arch knob that scales every hidden layer (pruning, distillation)
    styles_key: str | None  # the arch knob counting conditional styles; None: one style
    seed_metric: SeedMetric
    prune_plan: Callable  # (module, arch) -> prune.SlicePlan
    # `invoke train`: (arch, checkpoint, work_dir, epochs, steps, crop_size, dataroot); refuses flags it does not take
    train: Callable[..., None]


_FAMILIES: dict[str, Family] = {}


def register_family(family: Family) -> Family:
    """A new kind of generator plugs in here; every stage then finds it through `arch_family`."""
    _FAMILIES[family.name] = family
    return family


def arch_family(arch: dict) -> Family:
    name = arch.get("family")
    if name not in _FAMILIES:
        raise UserError(f"architecture family {name!r} is unknown; expected one of {', '.join(_FAMILIES)}")
    return _FAMILIES[name]


CYCLEGAN = register_family(Family(
    name="cyclegan",
    build=lambda arch: define_G(3, 3, arch["ngf"], arch["netG"]),
    width_key="ngf",
    styles_key=None,
    seed_metric=SeedMetric("generator_loss", _deferred("lwgan_models.compression.compress", "cyclegan_loss")),
    prune_plan=_deferred("lwgan_models.compression.prune", "resnet_generator_plan"),
    train=_deferred("lwgan_models.cyclegan_recipe", "train_registry_model"),
))
NST = register_family(Family(
    name="nst",
    build=lambda arch: StyleTransferNet(n_styles=arch["n_styles"], width=arch["width"]),
    width_key="width",
    styles_key="n_styles",
    seed_metric=SeedMetric("tv_loss", _deferred("lwgan_models.compression.compress", "style_tv_loss")),
    prune_plan=_deferred("lwgan_models.compression.prune", "style_transfer_plan"),
    train=_deferred("lwgan_models.nst_recipes", "train_registry_model"),
))


def build_generator(arch: dict) -> nn.Module:
    family = arch_family(arch)
    try:
        return family.build(arch)
    except KeyError as exc:
        raise UserError(f"architecture {arch} lacks {exc.args[0]!r}") from None


@dataclass(frozen=True)
class ModelSpec:
    name: str  # e.g. "cyclegan-resnet6-ngf16"
    family: str  # a registered Family's name: "cyclegan" | "nst"
    arch: dict  # see Family
    input_shape: tuple[int, ...]  # NCHW default benchmark shape
    checkpoint: str | None  # path relative to repo root, None = no shipped checkpoint yet
    description: str
    demo: bool  # part of the default `invoke demo` set (light-weight, fast)

    def builder(self) -> nn.Module:
        return build_generator(self.arch)


@dataclass(frozen=True)
class LoadedModel:
    spec: ModelSpec
    module: nn.Module  # eval mode, CPU, fp32
    weights: str  # "random" or "<path>@sha256:<hex>"
    params: int
    macs: int  # multiply-accumulates of one forward at spec.input_shape
    size_fp32_bytes: int  # the fp32 state_dict as torch.save writes it
    card: dict  # the checkpoint's card (how it was made, what it measured); {} for random weights


@dataclass(frozen=True)
class Variant:
    """A compressed variant made by `invoke compress`: a torch checkpoint or an int8 ONNX file, with its card."""

    name: str
    base: ModelSpec
    method: str
    path: Path  # <name>.pt (format "torch") or <name>.onnx (format "onnx-qdq")
    card: dict

    @property
    def format(self) -> str:
        return self.card["format"]

    def spec(self) -> ModelSpec:
        """The torch variant as a model spec (its own, smaller architecture)."""
        return ModelSpec(
            name=self.name,
            family=self.base.family,
            arch=self.card["arch"],
            input_shape=self.base.input_shape,
            checkpoint=repo_relative(self.path),
            description=f"{self.base.name} compressed by {self.method}",
            demo=False,
        )


_SPECS = (
    ModelSpec(
        name="cyclegan-resnet9-ngf64",
        family="cyclegan",
        arch={"family": "cyclegan", "netG": "resnet_9blocks", "ngf": 64},
        input_shape=(1, 3, 256, 256),
        checkpoint=None,
        description="Official full-size CycleGAN generator (ResNet, 9 blocks, ngf=64)",
        demo=False,
    ),
    ModelSpec(
        name="cyclegan-resnet6-ngf16",
        family="cyclegan",
        arch={"family": "cyclegan", "netG": "resnet_6blocks", "ngf": 16},
        input_shape=(1, 3, 128, 128),
        checkpoint="lwgan_models/checkpoints/cyclegan-resnet6-ngf16.pt",
        description="Slim CycleGAN ResNet generator (6 blocks, ngf=16)",
        demo=True,
    ),
    ModelSpec(
        name="cyclegan-unet128-ngf16",
        family="cyclegan",
        arch={"family": "cyclegan", "netG": "unet_128", "ngf": 16},
        input_shape=(1, 3, 128, 128),
        checkpoint=None,
        description="Slim U-Net generator (7 downsamplings, ngf=16)",
        demo=True,
    ),
    ModelSpec(
        name="nst-cin4-w16",
        family="nst",
        arch={"family": "nst", "n_styles": 4, "width": 16},
        input_shape=(1, 3, 128, 128),
        checkpoint="lwgan_models/checkpoints/nst-cin4-w16.pt",
        description="Half-width Johnson style-transfer net, 4 conditional-instance-norm styles",
        demo=True,
    ),
    ModelSpec(
        name="nst-cin4-w32",
        family="nst",
        arch={"family": "nst", "n_styles": 4, "width": 32},
        input_shape=(1, 3, 256, 256),
        checkpoint=None,
        description="Johnson style-transfer net at the original widths, 4 conditional-instance-norm styles",
        demo=False,
    ),
)
_REGISTRY = {spec.name: spec for spec in _SPECS}


def names() -> list[str]:
    return list(_REGISTRY)


def get(name: str) -> ModelSpec:
    if name not in _REGISTRY:
        shipped = [variant for base in _REGISTRY for variant in variants(base)]
        raise UserError(f"model {name!r} is unknown; expected one of {', '.join(_REGISTRY)}"
                        + (f", or a variant: {', '.join(shipped)}" if shipped else ""))
    return _REGISTRY[name]


def variants(base: str, checkpoint_dir: Path | None = None) -> list[str]:
    """Names of the compressed variants of `base` that exist (have a card) in the checkpoint folder."""
    folder = checkpoint_dir or CHECKPOINT_DIR
    return sorted(p.stem for p in folder.glob(f"{base}{VARIANT_SEPARATOR}*.json"))


def find_variant(name: str, checkpoint_dir: Path | None = None) -> Variant:
    """The variant `<base>+<method>`; its artifact and card must exist."""
    base_name, _, method = name.partition(VARIANT_SEPARATOR)
    base = get(base_name)
    folder = checkpoint_dir or CHECKPOINT_DIR
    card_file = folder / f"{name}.json"
    if not card_file.is_file():
        raise UserError(f"variant {name!r} has not been made (no {repo_relative(card_file)}); "
                        f"run `invoke compress --model {base_name} --method {method}`")
    try:
        card = json.loads(card_file.read_text(encoding="utf-8"))
    except json.JSONDecodeError as exc:
        raise UserError(f"variant card {card_file} is not valid JSON ({exc})") from exc
    path = folder / f"{name}{'.onnx' if card.get('format') == 'onnx-qdq' else '.pt'}"
    if not path.is_file():
        raise UserError(f"variant {name!r}: {repo_relative(path)} is missing beside its card")
    return Variant(name=name, base=base, method=method, path=path, card=card)


def load(name_or_spec: str | ModelSpec, checkpoint: str | Path | None = None) -> LoadedModel:
    """Build the model, load its weights, and measure it.

    `checkpoint` overrides the spec's (which is relative to the repo root); a relative explicit
    path is taken from the current directory.
    """
    if isinstance(name_or_spec, ModelSpec):
        spec = name_or_spec
    elif VARIANT_SEPARATOR in name_or_spec:
        variant = find_variant(name_or_spec)
        if variant.format != "torch":
            raise UserError(f"variant {variant.name!r} is an int8 ONNX file, not a torch model; "
                            "benchmark it with `invoke bench --model` (TVM and ONNX Runtime)")
        spec = variant.spec()
    else:
        spec = get(name_or_spec)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(RANDOM_WEIGHTS_SEED)
        module = spec.builder()
    if checkpoint is not None:
        path = Path(checkpoint)
    elif spec.checkpoint is not None:
        path = REPO_ROOT / spec.checkpoint
    else:
        path = None
    weights = "random" if path is None else _load_checkpoint(module, path, spec.name)
    card_file = path.with_suffix(".json") if path is not None else None
    card = json.loads(card_file.read_text(encoding="utf-8")) if card_file and card_file.is_file() else {}
    module.eval()
    return LoadedModel(
        spec=spec,
        module=module,
        weights=weights,
        params=sum(p.numel() for p in module.parameters()),
        macs=count_macs(spec),
        size_fp32_bytes=_serialized_size(module),
        card=card,
    )


def _load_checkpoint(module: nn.Module, path: Path, model_name: str) -> str:
    """Load `path` into `module` strictly; returns the provenance string for the record."""
    if not path.is_file():
        raise UserError(f"checkpoint {path} does not exist or is not a file; expected a torch state_dict")
    with open(path, "rb") as f:
        digest = hashlib.file_digest(f, "sha256").hexdigest()
    try:
        loaded = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as exc:  # a damaged file fails anywhere in unpickling, with many exception types
        reason = (str(exc).splitlines() or [""])[0][:120]
        raise UserError(
            f"checkpoint {path} is not a readable torch file ({type(exc).__name__}: {reason})"
        ) from exc
    state = loaded.get("state_dict", loaded) if isinstance(loaded, dict) else loaded
    if not isinstance(state, dict) or not all(isinstance(v, torch.Tensor) for v in state.values()):
        raise UserError(
            f"checkpoint {path} holds a {type(loaded).__name__}; expected a state_dict of tensors "
            "or a dict with a 'state_dict' key"
        )
    _drop_stale_instance_norm_stats(module, state)
    mismatch = _state_dict_mismatch(module.state_dict(), state)
    if mismatch:
        raise UserError(f"checkpoint {path} does not fit model {model_name}: {mismatch}")
    module.load_state_dict(state, strict=True)
    return f"{repo_relative(path)}@sha256:{digest}"


def _drop_stale_instance_norm_stats(module: nn.Module, state: dict) -> None:
    """Remove InstanceNorm running statistics that the network does not keep.

    PyTorch < 0.4 saved them for every InstanceNorm, so the published pretrained CycleGAN
    generators carry them; the official loader drops them the same way.
    """
    for prefix, submodule in module.named_modules():
        if isinstance(submodule, nn.InstanceNorm2d) and not submodule.track_running_stats:
            for buffer in ("running_mean", "running_var", "num_batches_tracked"):
                state.pop(f"{prefix}.{buffer}" if prefix else buffer, None)


def _state_dict_mismatch(expected: dict, found: dict) -> str:
    """'' when keys and shapes agree, else the first few offending keys of each kind."""
    missing = [k for k in expected if k not in found]
    unexpected = [k for k in found if k not in expected]
    wrong_shape = [
        f"{k} {tuple(found[k].shape)} != {tuple(v.shape)}"
        for k, v in expected.items()
        if k in found and found[k].shape != v.shape
    ]
    labelled = (("missing keys", missing), ("unexpected keys", unexpected), ("wrong shapes", wrong_shape))
    parts = [f"{label} {_first_few(keys)}" for label, keys in labelled if keys]
    return "; ".join(parts)


def _first_few(items: list[str], limit: int = 3) -> str:
    more = f" (+{len(items) - limit} more)" if len(items) > limit else ""
    return "[" + ", ".join(items[:limit]) + "]" + more


def repo_relative(path: str | Path) -> str:
    """Repo-relative when inside the repo, so records do not depend on the checkout location."""
    resolved = Path(path).resolve()
    try:
        return resolved.relative_to(REPO_ROOT).as_posix()
    except ValueError:
        return str(resolved)


def count_macs(spec: ModelSpec, input_shape: tuple[int, ...] | None = None) -> int:
    """MACs of one forward at `input_shape` (default: the spec's), traced on the meta device (shapes only, no math)."""
    return trace_on_meta(spec, input_shape)[0]


def trace_on_meta(spec: ModelSpec, input_shape: tuple[int, ...] | None = None) -> tuple[int, int]:
    """(MACs, peak activation bytes) of one forward at `input_shape`, traced on the meta device: nothing
    is allocated. The peak is a lower bound on the memory a forward needs: the largest input + output
    of any layer, which every runtime holds at once."""
    peak = 0

    def record(layer, inputs, output) -> None:
        nonlocal peak
        tensors = [t for t in (*inputs, output) if isinstance(t, torch.Tensor)]
        peak = max(peak, sum(t.numel() * t.element_size() for t in tensors))

    with torch.device("meta"):
        module = spec.builder().eval()
        image = torch.empty(input_shape or spec.input_shape)
    with forward_hooks(module, record, lambda m: not list(m.children())), FlopCounterMode(display=False) as counter, \
            torch.no_grad():
        module(image)
    return counter.get_total_flops() // 2, peak


def _serialized_size(module: nn.Module) -> int:
    """Bytes torch.save writes for the state_dict; the module is fp32, so this is the fp32 size."""
    buffer = io.BytesIO()
    torch.save(module.state_dict(), buffer)
    return buffer.getbuffer().nbytes
