"""torch.nn.Module -> Relax, through torch.export at one static input shape."""

from __future__ import annotations

import torch
import tvm
from tvm.relax.frontend.torch import from_exported_program

from errors import UserError
from lwgan_models.subpixel import decompose_transposed_convs


def torch_to_relax(
    module: torch.nn.Module, input_shape: tuple[int, ...], name: str = "model", fused_subpixel: bool = False
) -> tvm.IRModule:
    """Export `module` at `input_shape` and import it with weights as constants.

    Strided transposed convolutions are first rewritten as exact sub-pixel convolutions (see
    lwgan_models/subpixel.py; `fused_subpixel`: one wide convolution each, for CPUs that run it as
    Winograd). `unwrap_unit_return_tuple` makes `main` return a tensor rather than a 1-tuple, which a
    remote VM could not index.
    """
    example = torch.zeros(*input_shape)
    try:
        rewritten = decompose_transposed_convs(module, example, fused_subpixel)  # runs the model once at this shape
    except (RuntimeError, ValueError) as exc:
        first_line = str(exc).strip().splitlines()[0]
        raise UserError(f"{name}: input shape {tuple(input_shape)} does not fit the model ({first_line})") from exc
    exported = torch.export.export(rewritten.eval(), (example,))
    return from_exported_program(exported, keep_params_as_input=False, unwrap_unit_return_tuple=True)
