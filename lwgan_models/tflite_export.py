"""Export a generator to a .tflite file with litert-torch, the converter LiteRT's own docs name.

LiteRT's converter cannot legalise a strided transposed convolution with padding (it fails on
the CycleGAN decoder's `mhlo.convolution` with input dilation), so those layers are first
rewritten as sub-pixel convolutions (lwgan_models/subpixel.py: exact, same weights). The converter
imports jax and transformers and narrates every pass, so it runs in a child process, handed the
rewritten model as a torch.export program (a file that needs none of the model's Python classes):

    python -m lwgan_models.tflite_export PROGRAM.pt2 NxCxHxW OUT.tflite
"""

from __future__ import annotations

import sys
from pathlib import Path

import torch
from torch import nn

from lwgan_models.subpixel import decompose_transposed_convs


def convertible_program(module: nn.Module, input_shape: tuple[int, ...], path: Path) -> Path:
    """Save `module` at `input_shape`, transposed convs as sub-pixel convs, as an exported program."""
    example = torch.zeros(*input_shape)
    with torch.no_grad():
        program = torch.export.export(decompose_transposed_convs(module.eval(), example), (example,))
    torch.export.save(program, str(path))
    return Path(path)


def export_tflite(program_path: Path, input_shape: tuple[int, ...], path: Path) -> Path:
    """Convert a saved exported program to `path` (NCHW input and output, as the torch model)."""
    import litert_torch

    program = torch.export.load(str(program_path))
    litert_torch.convert(program.module(), (torch.zeros(*input_shape),)).export(str(path))
    return Path(path)


if __name__ == "__main__":
    export_tflite(Path(sys.argv[1]), tuple(int(d) for d in sys.argv[2].split("x")), Path(sys.argv[3]))
