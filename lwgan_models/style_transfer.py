"""Fast feed-forward style transfer (Johnson et al. 2016) holding several styles in one network.

The layout follows the `TransformerNet` of pytorch/examples fast_neural_style: reflection-padded
9x9/3x3/3x3 convs with strides 1/2/2, five residual blocks, two nearest-upsample + 3x3 conv
decoder stages and a final 9x9 conv. Every instance norm is conditional (Dumoulin et al. 2017):
each style owns only a per-channel scale and shift, so N styles cost N * 2 * C extra parameters.

Images in and out are in [-1, 1] like the CycleGAN generators (the output passes a tanh);
H and W should be multiples of 4 so the output has the input's size.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from errors import UserError

Style = int | torch.Tensor


class ConditionalInstanceNorm2d(nn.Module):
    """Instance norm without affine, then the scale/shift of the chosen style (or a weighted mix).

    `style` is an int index, or a (B, n_styles) tensor of weights that mixes the styles' scales
    and shifts linearly (one-hot weights give exactly that style).
    """

    def __init__(self, num_features: int, n_styles: int):
        super().__init__()
        self.n_styles = n_styles
        self.norm = nn.InstanceNorm2d(num_features, affine=False, track_running_stats=False)
        self.gamma = nn.Parameter(torch.ones(n_styles, num_features))
        self.beta = nn.Parameter(torch.zeros(n_styles, num_features))

    def forward(self, x: torch.Tensor, style: Style) -> torch.Tensor:
        if isinstance(style, torch.Tensor):
            if tuple(style.shape) != (x.shape[0], self.n_styles):
                raise UserError(
                    f"style weights have shape {tuple(style.shape)}; expected (batch, n_styles) = "
                    f"({x.shape[0]}, {self.n_styles})"
                )
            gamma, beta = style @ self.gamma, style @ self.beta  # (B, C)
        elif isinstance(style, int) and 0 <= style < self.n_styles:
            gamma, beta = self.gamma[style], self.beta[style]  # (C,)
        else:
            raise UserError(
                f"style {style!r} is invalid; expected an int in 0..{self.n_styles - 1} or a weight tensor"
            )
        return self.norm(x) * gamma[..., None, None] + beta[..., None, None]


class ConvNormReLU(nn.Module):
    """Reflection-padded conv, conditional instance norm, optional ReLU.

    With `upsample`, the input is first enlarged 2x by nearest neighbour: Johnson's decoder uses
    this instead of transposed convs to avoid checkerboard artefacts.
    """

    def __init__(
        self,
        in_channels: int,
        out_channels: int,
        kernel_size: int,
        stride: int,
        n_styles: int,
        upsample: bool = False,
        relu: bool = True,
    ):
        super().__init__()
        self.upsample = upsample
        self.relu = relu
        self.pad = nn.ReflectionPad2d(kernel_size // 2)
        self.conv = nn.Conv2d(in_channels, out_channels, kernel_size, stride)
        self.norm = ConditionalInstanceNorm2d(out_channels, n_styles)

    def forward(self, x: torch.Tensor, style: Style) -> torch.Tensor:
        if self.upsample:
            x = F.interpolate(x, scale_factor=2, mode="nearest")
        x = self.norm(self.conv(self.pad(x)), style)
        return F.relu(x) if self.relu else x


class ResidualBlock(nn.Module):
    def __init__(self, channels: int, n_styles: int):
        super().__init__()
        self.conv1 = ConvNormReLU(channels, channels, 3, 1, n_styles)
        self.conv2 = ConvNormReLU(channels, channels, 3, 1, n_styles, relu=False)

    def forward(self, x: torch.Tensor, style: Style) -> torch.Tensor:
        return x + self.conv2(self.conv1(x, style), style)


class StyleTransferNet(nn.Module):
    """Johnson's transformer network with `n_styles` conditional styles.

    `width` is the first stage's channel count (the original is 32, giving 32/64/128).
    `forward(x)` without a style uses `active_style`, so `torch.export.export(net, (x,))` traces a
    single-input graph for one chosen style.
    """

    def __init__(self, n_styles: int = 4, width: int = 32):
        super().__init__()
        if n_styles < 1 or width < 1:
            raise UserError(f"n_styles={n_styles}, width={width}; expected both >= 1")
        self.n_styles = n_styles
        self.active_style = 0
        self.encoder = nn.ModuleList(
            [
                ConvNormReLU(3, width, 9, 1, n_styles),
                ConvNormReLU(width, width * 2, 3, 2, n_styles),
                ConvNormReLU(width * 2, width * 4, 3, 2, n_styles),
            ]
        )
        self.residuals = nn.ModuleList([ResidualBlock(width * 4, n_styles) for _ in range(5)])
        self.decoder = nn.ModuleList(
            [
                ConvNormReLU(width * 4, width * 2, 3, 1, n_styles, upsample=True),
                ConvNormReLU(width * 2, width, 3, 1, n_styles, upsample=True),
            ]
        )
        self.output = nn.Sequential(nn.ReflectionPad2d(4), nn.Conv2d(width, 3, 9, 1))

    def forward(self, x: torch.Tensor, style: Style | None = None) -> torch.Tensor:
        style = self.active_style if style is None else style
        for layer in (*self.encoder, *self.residuals, *self.decoder):
            x = layer(x, style)
        return torch.tanh(self.output(x))
