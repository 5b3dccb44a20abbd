"""Rewrite strided ConvTranspose2d as s*s small convolutions and a pixel shuffle (exact).

TVM legalises a stride-s transposed convolution as a convolution over the input dilated with
zeros, so s*s - 1 of every s*s multiply-adds hit a zero, and MetaSchedule cannot tune the zeros
away: on this machine the U-Net generator's decoder took 4x ONNX Runtime's time. Output pixel
(s*m + r) of a transposed convolution only meets kernel taps k = s*j + c with c = (r + p) mod s, so
each output phase r is an ordinary convolution of the input with that phase's sub-kernel (flipped).
The phases interleave back with `pixel_shuffle`. Weights are shared with the original module, so a
checkpoint's numbers are used unchanged.

`fused=True` runs the s*s phases as one convolution instead: each phase kernel sits at its offset in
a window covering all of them (at least 3x3, zeros elsewhere), with s*s x the output channels in
pixel_shuffle's order. That costs more multiply-adds (a 4x4 stride-2 layer: 9 per output pixel and
channel pair instead of 4), but it is one wide 3x3 convolution, which CPU compilers run as
Winograd (compile/schedules/winograd.py: 4x fewer products) and at a far higher rate than four small ones.
"""

from __future__ import annotations

import copy
from collections.abc import Callable

import torch
import torch.nn.functional as F
from torch import nn

from lwgan_models.hooks import forward_hooks


def subpixel_phase(kernel: int, stride: int, padding: int, phase: int, in_size: int, out_size: int):
    """Taps, their order, and the (left, right) padding that give output phase `phase` as a plain conv."""
    offset = (phase + padding) % stride
    shift = (phase + padding) // stride
    taps = list(range(offset, kernel, stride))
    count = len(taps)
    outputs = out_size // stride
    left = count - 1 - shift
    right = outputs - in_size - left + count - 1
    return taps[::-1], left, right


class SubPixelConvTranspose2d(nn.Module):
    """Computes `convt(x)` exactly, as stride² convolutions whose outputs are interleaved."""

    def __init__(self, convt: nn.ConvTranspose2d, in_size: tuple[int, int], fused: bool = False) -> None:
        super().__init__()
        self.convt = convt  # keeps weight/bias (and the state_dict layout) where the original had them
        self.stride = convt.stride[0]
        self.fused = fused
        out_size = [
            (n - 1) * s - 2 * p + k + op
            for n, s, p, k, op in zip(in_size, convt.stride, convt.padding, convt.kernel_size, convt.output_padding)
        ]
        self.phases = [
            (
                subpixel_phase(convt.kernel_size[0], self.stride, convt.padding[0], ry, in_size[0], out_size[0]),
                subpixel_phase(convt.kernel_size[1], self.stride, convt.padding[1], rx, in_size[1], out_size[1]),
            )
            for ry in range(self.stride)
            for rx in range(self.stride)
        ]
        # Built once: in forward, an exported graph would slice or rebuild them on every call (and a
        # compiler's constant folding evaluate those gathers at each import).
        with torch.no_grad():
            if fused:
                kernel, bias, self.padding = self.fused_conv()
                self.register_buffer("kernel", kernel, persistent=False)
                self.register_buffer("bias", bias, persistent=False)
            else:
                for index, kernel in enumerate(self.phase_kernels()):
                    self.register_buffer(f"phase_kernel{index}", kernel.contiguous(), persistent=False)

    def phase_kernels(self) -> list[torch.Tensor]:
        weight = self.convt.weight.transpose(0, 1)  # (C_in, C_out, kh, kw) -> (C_out, C_in, kh, kw)
        return [weight[:, :, rows][:, :, :, cols] for (rows, _, _), (cols, _, _) in self.phases]

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.fused:
            left, right, top, bottom = self.padding
            if left == right >= 0 and top == bottom >= 0:  # the conv pads: one op, no separate pad kernel
                return F.pixel_shuffle(F.conv2d(x, self.kernel, self.bias, padding=(top, left)), self.stride)
            return F.pixel_shuffle(F.conv2d(_pad_or_crop(x, *self.padding), self.kernel, self.bias), self.stride)
        kernels = [getattr(self, f"phase_kernel{index}") for index in range(len(self.phases))]
        outputs = [
            F.conv2d(_pad_or_crop(x, left, right, top, bottom), kernel, self.convt.bias)
            for ((_, top, bottom), (_, left, right)), kernel in zip(self.phases, kernels)
        ]
        return _interleave(outputs, self.stride)

    def fused_conv(self) -> tuple[torch.Tensor, torch.Tensor | None, tuple[int, int, int, int]]:
        """(kernel, bias, (left, right, top, bottom) padding) of the one-convolution form.

        Phase p reads input offsets t - before_p for its taps t; the window spans all phases'
        offsets (widened to 3), and output channel c * s^2 + p is phase p of channel c.
        """
        (top, rows, bottom), (left, cols, right) = (_window([phase[axis] for phase in self.phases]) for axis in (0, 1))
        out_channels, phases = self.convt.out_channels, self.stride**2
        kernel = self.convt.weight.new_zeros(out_channels, phases, self.convt.in_channels, rows, cols)
        for index, (((_, before_y, _), (_, before_x, _)), phase_kernel) in enumerate(
            zip(self.phases, self.phase_kernels())
        ):
            y, x = top - before_y, left - before_x
            kernel[:, index, :, y : y + phase_kernel.shape[2], x : x + phase_kernel.shape[3]] = phase_kernel
        kernel = kernel.reshape(out_channels * phases, self.convt.in_channels, rows, cols)
        bias = None if self.convt.bias is None else self.convt.bias.repeat_interleave(phases)
        return kernel, bias, (left, right, top, bottom)

    def materialize(self) -> "SubPixelConvs":
        """The same computation with each phase as its own nn.Conv2d (copied weights).

        Quantization needs this: every phase kernel becomes a parameter of its own, so it gets
        per-channel scales and appears in an exported graph as one Conv with a constant weight.
        """
        return SubPixelConvs(self)


class SubPixelConvs(nn.Module):
    """A materialized `SubPixelConvTranspose2d`: stride² independent convs, then a pixel shuffle."""

    def __init__(self, source: SubPixelConvTranspose2d) -> None:
        super().__init__()
        self.stride = source.stride
        self.paddings = [(left, right, top, bottom) for (_, top, bottom), (_, left, right) in source.phases]
        self.convs = nn.ModuleList()
        for kernel in source.phase_kernels():
            conv = nn.Conv2d(kernel.shape[1], kernel.shape[0], tuple(kernel.shape[2:]), bias=source.convt.bias is not None)
            with torch.no_grad():
                conv.weight.copy_(kernel)
                if conv.bias is not None:
                    conv.bias.copy_(source.convt.bias)
            self.convs.append(conv)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        outputs = [conv(_pad_or_crop(x, *padding)) for conv, padding in zip(self.convs, self.paddings)]
        return _interleave(outputs, self.stride)


def _window(phases: list[tuple[list[int], int, int]]) -> tuple[int, int, int]:
    """(padding before, window size, padding after) along one axis for the fused convolution.

    Phase p's tap t reads input offset t - before_p from its output position; the window spans
    every phase's offsets, at least 3 wide, and keeps the phases' output size.
    """
    first = min(-before for _, before, _ in phases)
    last = max(len(taps) - 1 - before for taps, before, _ in phases)
    if last - first + 1 < 3:  # widened on the left first: (3, 2, 1, 1) layers get symmetric padding 1
        first = last - 2
    size = last - first + 1
    taps, before, after = phases[0]
    outputs_minus_inputs = after + before - len(taps) + 1
    return -first, size, outputs_minus_inputs + first + size - 1


def _interleave(outputs: list[torch.Tensor], stride: int) -> torch.Tensor:
    """(N, C, H, W) per phase, phase-major -> (N, C, s*H, s*W) via pixel_shuffle's channel-major order."""
    n, c, h, w = outputs[0].shape
    stacked = torch.stack(outputs, dim=2).reshape(n, c * stride * stride, h, w)
    return F.pixel_shuffle(stacked, stride)


def _pad_or_crop(x: torch.Tensor, left: int, right: int, top: int, bottom: int) -> torch.Tensor:
    x = F.pad(x, (max(left, 0), max(right, 0), max(top, 0), max(bottom, 0)))
    h, w = x.shape[-2:]
    return x[..., max(-top, 0) : h - max(-bottom, 0), max(-left, 0) : w - max(-right, 0)]


def decomposable(convt: nn.ConvTranspose2d, out_size: tuple[int, int]) -> bool:
    s = convt.stride
    return (
        s[0] == s[1] > 1
        and convt.groups == 1
        and convt.dilation == (1, 1)
        and convt.padding_mode == "zeros"
        and all(size % s[0] == 0 for size in out_size)
    )


def decompose_transposed_convs(
    module: nn.Module, example: torch.Tensor, fuse: Callable[[nn.ConvTranspose2d, tuple[int, int]], bool] | None = None
) -> nn.Module:
    """A copy of `module` whose strided transposed convs run as sub-pixel convolutions; those for
    which `fuse(layer, input size)` holds as one convolution (see the module docstring)."""
    shapes: dict[nn.Module, tuple[tuple[int, int], tuple[int, int]]] = {}

    def record(layer, inputs, output):
        shapes[layer] = (tuple(inputs[0].shape[-2:]), tuple(output.shape[-2:]))

    with forward_hooks(module, record, lambda m: isinstance(m, nn.ConvTranspose2d)), torch.no_grad():
        module(example)
    rewritten = copy.deepcopy(module)
    originals = dict(module.named_modules())
    for name, layer in list(rewritten.named_modules()):
        if isinstance(layer, nn.ConvTranspose2d) and decomposable(layer, shapes[originals[name]][1]):
            parent_name, _, child = name.rpartition(".")
            parent = rewritten.get_submodule(parent_name) if parent_name else rewritten
            in_size = shapes[originals[name]][0]
            fused = fuse is not None and fuse(layer, in_size)
            setattr(parent, child, SubPixelConvTranspose2d(layer, in_size, fused))
    return rewritten
