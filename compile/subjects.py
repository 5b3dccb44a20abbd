"""The models a command names, as models under test: registry models and variants by name, or ONNX
files, with the input shapes and input files its flags give (`--shape`, `--input`, `--image`)."""

from __future__ import annotations

import lwgan_models
from compile.pipeline import ModelUnderTest, from_onnx_files, from_registry, from_variant
from errors import UserError
from lwgan_models.registry import VARIANT_SEPARATOR, find_variant, variants


def models_under_test(model: str | None, onnx: str | None, shape: str | list[str] | None, checkpoint: str | None,
                      demo_only: bool, inputs: list[str] | None = None, image: str | None = None) -> list[ModelUnderTest]:
    """Registry models and variants by name (default: the demo set and its compressed variants) or one
    ONNX file, all checked before any work. int8 QDQ variants are re-pinned to any --shape; an ONNX
    file's inputs are pinned by name (--shape NAME=SHAPE) and fed from .npy files (--input NAME=FILE)."""
    input_shape, shapes = _shapes(shape)
    values = dict(_named(item, "--input", "NAME=FILE.npy") for item in _items(inputs))
    if onnx:
        if model or checkpoint:
            raise UserError("--onnx benchmarks one file; it takes no --model or --checkpoint")
        return [from_onnx_files(onnx.split(","), input_shape, shapes, values, image)]
    if shapes or values or image:
        raise UserError("--shape NAME=SHAPE, --input and --image name the inputs of an --onnx file; "
                        "a registry model takes --shape NxCxHxW")
    if model:
        names = [m.strip() for m in model.split(",") if m.strip()]
    else:
        bases = [n for n in lwgan_models.names() if lwgan_models.get(n).demo or not demo_only]
        names = [name for base in bases for name in (base, *variants(base))]
    chosen = {name: find_variant(name) if VARIANT_SEPARATOR in name else lwgan_models.get(name) for name in names}
    if checkpoint and (len(names) != 1 or VARIANT_SEPARATOR in names[0]):
        raise UserError(f"--checkpoint {checkpoint} needs exactly one base --model, got {', '.join(names)}")
    return [
        from_variant(found, input_shape) if VARIANT_SEPARATOR in name
        else from_registry(lwgan_models.load(name, checkpoint), input_shape)
        for name, found in chosen.items()
    ]


def _shape(text: str) -> tuple[int, ...]:
    try:
        return tuple(int(d) for d in text.lower().split("x"))
    except ValueError:
        raise UserError(f"--shape {text!r}: expected NxCxHxW, e.g. 1x3x256x256") from None


def _items(values: str | list[str] | None) -> list[str]:
    """A repeatable flag's values, each of which may also list several, separated by commas or semicolons."""
    texts = [values] if isinstance(values, str) else list(values or [])
    return [item.strip() for text in texts for item in text.replace(";", ",").split(",") if item.strip()]


def _named(item: str, flag: str, form: str) -> tuple[str, str]:
    name, equals, value = item.rpartition("=")
    if not (equals and name and value):
        raise UserError(f"{flag} {item!r}: expected {form}")
    return name, value


def _shapes(values: str | list[str] | None) -> tuple[tuple[int, ...] | None, dict[str, tuple[int, ...]]]:
    """--shape: one NxCxHxW (the image input's), and/or NAME=SHAPE pins of an ONNX file's inputs."""
    items = _items(values)
    unnamed = [_shape(item) for item in items if "=" not in item]
    if len(unnamed) > 1:
        raise UserError(f"--shape {', '.join(items)}: one shape without a name (the image input's); name the others")
    named = dict(_named(item, "--shape", "NAME=NxCxHxW") for item in items if "=" in item)
    return (unnamed[0] if unnamed else None), {name: _shape(text) for name, text in named.items()}
