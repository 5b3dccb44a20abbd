"""torch.nn.Module -> Relax, through torch.export at one static input shape."""

from __future__ import annotations

import torch
import tvm
from tvm.relax.frontend.torch import from_exported_program

from compile.schedules import winograd
from errors import UserError
from lwgan_models.subpixel import decompose_transposed_convs


def _as_winograd(convt: torch.nn.ConvTranspose2d, in_size: tuple[int, int]) -> bool:
    """The fused form is a 3x3 conv at the input size with stride^2 x the output channels."""
    return winograd.eligible(convt.in_channels, convt.out_channels * convt.stride[0] ** 2, *in_size)


def torch_to_relax(
    module: torch.nn.Module, input_shape: tuple[int, ...], name: str = "model", fused_subpixel: bool = False
) -> tvm.IRModule:
    """Export `module` at `input_shape` and import it with weights as constants.

    Strided transposed convolutions are first rewritten as exact sub-pixel convolutions (see
    lwgan_models/subpixel.py; with `fused_subpixel`, those whose one-convolution form compile/schedules/winograd.py
    runs as Winograd are imported in that form). `unwrap_unit_return_tuple` makes `main` return a
    tensor rather than a 1-tuple, which a remote VM could not index.
    """
    example = torch.zeros(*input_shape)
    try:
        # runs the model once at this shape
        rewritten = decompose_transposed_convs(module, example, _as_winograd if fused_subpixel else None)
    except (RuntimeError, ValueError) as exc:
        first_line = str(exc).strip().splitlines()[0]
        raise UserError(f"{name}: input shape {tuple(input_shape)} does not fit the model ({first_line})") from exc
    exported = torch.export.export(rewritten.eval(), (example,))
    return from_exported_program(exported, keep_params_as_input=False, unwrap_unit_return_tuple=True)
