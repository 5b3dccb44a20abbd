"""torch.nn.Module -> Relax, through torch.export at one static input shape."""

from __future__ import annotations

import torch
import tvm
from tvm.relax.frontend.torch import from_exported_program

from compile.schedules import winograd
from errors import UserError
from lwgan_models.subpixel import decompose_transposed_convs


def fused_form_pays(precision: str):
    """For a build at `precision`, whether a transposed conv (at its input size) is imported as its
    fused form, a 3x3 conv at the input size with stride^2 x the output channels, run as Winograd.

    fp32: wherever Winograd takes that conv; its products run faster than the phases' small convs.
    bf16: only where Winograd also multiplies less than the phases, whose taps are the kernel's
    (kh kw / s^2 per output pixel, against Winograd's (ALPHA / TILE)^2): the phases run as direct
    bf16 blocks, with no transforms and a quarter of bf16 Winograd's rounding error. A CycleGAN's
    3x3 stride-2 layers cost 9/4 products per output pixel either way and run as phases; a U-Net's
    4x4 ones cost 16/4 as phases and stay fused."""
    def pays(convt: torch.nn.ConvTranspose2d, in_size: tuple[int, int]) -> bool:
        stride = convt.stride[0]
        if not winograd.eligible(convt.in_channels, convt.out_channels * stride**2, *in_size):
            return False
        phase_taps = convt.kernel_size[0] * convt.kernel_size[1] / stride**2
        return precision != "bf16" or phase_taps > (winograd.ALPHA / winograd.TILE) ** 2
    return pays


def torch_to_relax(
    module: torch.nn.Module, input_shape: tuple[int, ...], name: str = "model", fused_for: str | None = None
) -> tvm.IRModule:
    """Export `module` at `input_shape` and import it with weights as constants.

    Strided transposed convolutions are first rewritten as exact sub-pixel convolutions (see
    lwgan_models/subpixel.py; with `fused_for` a build precision, those whose one-convolution form
    pays at that precision are imported in that form: `fused_form_pays`). `unwrap_unit_return_tuple`
    makes `main` return a tensor rather than a 1-tuple, which a remote VM could not index.
    """
    example = torch.zeros(*input_shape)
    try:
        # runs the model once at this shape
        rewritten = decompose_transposed_convs(module, example, fused_form_pays(fused_for) if fused_for else None)
    except (RuntimeError, ValueError) as exc:
        first_line = str(exc).strip().splitlines()[0]
        raise UserError(f"{name}: input shape {tuple(input_shape)} does not fit the model ({first_line})") from exc
    exported = torch.export.export(rewritten.eval(), (example,))
    return from_exported_program(exported, keep_params_as_input=False, unwrap_unit_return_tuple=True)
