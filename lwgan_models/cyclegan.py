"""CycleGAN / pix2pix networks, layer for layer as in junyanz/pytorch-CycleGAN-and-pix2pix.

The `nn.Sequential` indices and module names are what the official checkpoints are keyed by
(`model.10.conv_block.1.weight`, ...), so every layer, including parameter-free pads and
activations, sits at the same position as upstream. Published `latest_net_G_A.pth` files then
load with `load_state_dict(strict=True)` (files from PyTorch < 0.4 also carry InstanceNorm running
stats; `registry.load` drops those as the official loader does).

Differences from upstream that do not touch the state_dict: no GPU / DataParallel handling, no
`opt` namespace, bad names raise `UserError`, and the classes default to instance norm (the
CycleGAN setting) instead of upstream's BatchNorm default.
"""

from __future__ import annotations

import functools
from typing import Callable

import torch
from torch import nn
from torch.nn import init

from errors import UserError

NormLayer = Callable[[int], nn.Module]


def get_norm_layer(norm_type: str = "instance") -> NormLayer:
    """A constructor `norm(num_features)`; instance norm keeps no statistics, as upstream."""
    if norm_type == "batch":
        return functools.partial(nn.BatchNorm2d, affine=True, track_running_stats=True)
    if norm_type == "instance":
        return functools.partial(nn.InstanceNorm2d, affine=False, track_running_stats=False)
    if norm_type == "none":
        return lambda num_features: nn.Identity()
    raise UserError(f"norm type {norm_type!r} is unknown; expected one of batch, instance, none")


INSTANCE_NORM = get_norm_layer("instance")


def _convs_use_bias(norm_layer: NormLayer) -> bool:
    """Upstream rule: only instance norm keeps conv biases (BatchNorm's shift makes them redundant).

    `norm="none"` therefore has no biases either; kept so its checkpoints still match.
    """
    return getattr(norm_layer, "func", norm_layer) is nn.InstanceNorm2d


def _padding(padding_type: str) -> tuple[list[nn.Module], int]:
    """The explicit pad layer (if any) and the conv's own padding for a 3x3 conv."""
    if padding_type == "reflect":
        return [nn.ReflectionPad2d(1)], 0
    if padding_type == "replicate":
        return [nn.ReplicationPad2d(1)], 0
    if padding_type == "zero":
        return [], 1
    raise UserError(f"padding type {padding_type!r} is unknown; expected one of reflect, replicate, zero")


class ResnetBlock(nn.Module):
    """Two 3x3 convs with a skip connection; the optional dropout sits between them."""

    def __init__(self, dim: int, padding_type: str, norm_layer: NormLayer, use_dropout: bool, use_bias: bool):
        super().__init__()
        pad, conv_padding = _padding(padding_type)
        layers = [
            *pad,
            nn.Conv2d(dim, dim, 3, padding=conv_padding, bias=use_bias),
            norm_layer(dim),
            nn.ReLU(True),
        ]
        if use_dropout:
            layers.append(nn.Dropout(0.5))
        pad, conv_padding = _padding(padding_type)
        layers += [*pad, nn.Conv2d(dim, dim, 3, padding=conv_padding, bias=use_bias), norm_layer(dim)]
        self.conv_block = nn.Sequential(*layers)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x + self.conv_block(x)


class ResnetGenerator(nn.Module):
    """Johnson-style generator: 7x7 stem, two stride-2 downs, residual blocks, two transposed-conv ups.

    Input and output images are in [-1, 1] (tanh output); H and W should be multiples of 4.
    """

    def __init__(
        self,
        input_nc: int,
        output_nc: int,
        ngf: int = 64,
        norm_layer: NormLayer = INSTANCE_NORM,
        use_dropout: bool = False,
        n_blocks: int = 6,
        padding_type: str = "reflect",
    ):
        super().__init__()
        if n_blocks < 0:
            raise UserError(f"n_blocks={n_blocks}; expected a count >= 0")
        use_bias = _convs_use_bias(norm_layer)
        n_downsampling = 2
        layers = [
            nn.ReflectionPad2d(3),
            nn.Conv2d(input_nc, ngf, 7, padding=0, bias=use_bias),
            norm_layer(ngf),
            nn.ReLU(True),
        ]
        for i in range(n_downsampling):
            channels = ngf * 2**i
            layers += [
                nn.Conv2d(channels, channels * 2, 3, stride=2, padding=1, bias=use_bias),
                norm_layer(channels * 2),
                nn.ReLU(True),
            ]
        bottleneck = ngf * 2**n_downsampling
        layers += [
            ResnetBlock(bottleneck, padding_type, norm_layer, use_dropout, use_bias) for _ in range(n_blocks)
        ]
        for i in range(n_downsampling):
            channels = ngf * 2 ** (n_downsampling - i)
            layers += [
                nn.ConvTranspose2d(
                    channels, channels // 2, 3, stride=2, padding=1, output_padding=1, bias=use_bias
                ),
                norm_layer(channels // 2),
                nn.ReLU(True),
            ]
        layers += [nn.ReflectionPad2d(3), nn.Conv2d(ngf, output_nc, 7, padding=0), nn.Tanh()]
        self.model = nn.Sequential(*layers)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.model(x)


class UnetSkipConnectionBlock(nn.Module):
    """One U-Net level: down conv, the inner levels (`submodule`), up conv, concatenated with its input.

    The outermost level returns the image instead of concatenating; the innermost has no submodule.
    """

    def __init__(
        self,
        outer_nc: int,
        inner_nc: int,
        input_nc: int | None = None,
        submodule: nn.Module | None = None,
        outermost: bool = False,
        innermost: bool = False,
        norm_layer: NormLayer = INSTANCE_NORM,
        use_dropout: bool = False,
    ):
        super().__init__()
        self.outermost = outermost
        use_bias = _convs_use_bias(norm_layer)
        in_channels = outer_nc if input_nc is None else input_nc
        down_conv = nn.Conv2d(in_channels, inner_nc, 4, stride=2, padding=1, bias=use_bias)
        if outermost:
            up_conv = nn.ConvTranspose2d(inner_nc * 2, outer_nc, 4, stride=2, padding=1)
            layers = [down_conv, submodule, nn.ReLU(True), up_conv, nn.Tanh()]
        elif innermost:
            up_conv = nn.ConvTranspose2d(inner_nc, outer_nc, 4, stride=2, padding=1, bias=use_bias)
            layers = [nn.LeakyReLU(0.2, True), down_conv, nn.ReLU(True), up_conv, norm_layer(outer_nc)]
        else:
            up_conv = nn.ConvTranspose2d(inner_nc * 2, outer_nc, 4, stride=2, padding=1, bias=use_bias)
            layers = [
                nn.LeakyReLU(0.2, True),
                down_conv,
                norm_layer(inner_nc),
                submodule,
                nn.ReLU(True),
                up_conv,
                norm_layer(outer_nc),
            ]
            if use_dropout:
                layers.append(nn.Dropout(0.5))
        self.model = nn.Sequential(*layers)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.outermost:
            return self.model(x)
        return torch.cat([x, self.model(x)], 1)


class UnetGenerator(nn.Module):
    """U-Net with `num_downs` stride-2 levels: H and W must be multiples of 2**num_downs.

    Input and output images are in [-1, 1] (tanh output).
    """

    def __init__(
        self,
        input_nc: int,
        output_nc: int,
        num_downs: int,
        ngf: int = 64,
        norm_layer: NormLayer = INSTANCE_NORM,
        use_dropout: bool = False,
    ):
        super().__init__()
        if num_downs < 5:
            raise UserError(f"num_downs={num_downs}; expected at least 5 (the fixed outer levels)")
        block = UnetSkipConnectionBlock(ngf * 8, ngf * 8, norm_layer=norm_layer, innermost=True)
        for _ in range(num_downs - 5):
            block = UnetSkipConnectionBlock(
                ngf * 8, ngf * 8, submodule=block, norm_layer=norm_layer, use_dropout=use_dropout
            )
        block = UnetSkipConnectionBlock(ngf * 4, ngf * 8, submodule=block, norm_layer=norm_layer)
        block = UnetSkipConnectionBlock(ngf * 2, ngf * 4, submodule=block, norm_layer=norm_layer)
        block = UnetSkipConnectionBlock(ngf, ngf * 2, submodule=block, norm_layer=norm_layer)
        self.model = UnetSkipConnectionBlock(
            output_nc, ngf, input_nc=input_nc, submodule=block, outermost=True, norm_layer=norm_layer
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.model(x)


class NLayerDiscriminator(nn.Module):
    """PatchGAN discriminator: one logit per overlapping 70x70 patch (for n_layers=3)."""

    def __init__(
        self, input_nc: int, ndf: int = 64, n_layers: int = 3, norm_layer: NormLayer = INSTANCE_NORM
    ):
        super().__init__()
        use_bias = _convs_use_bias(norm_layer)

        def conv_norm_act(in_mult: int, out_mult: int, stride: int) -> list[nn.Module]:
            conv = nn.Conv2d(ndf * in_mult, ndf * out_mult, 4, stride=stride, padding=1, bias=use_bias)
            return [conv, norm_layer(ndf * out_mult), nn.LeakyReLU(0.2, True)]

        layers = [nn.Conv2d(input_nc, ndf, 4, stride=2, padding=1), nn.LeakyReLU(0.2, True)]
        mult = 1
        for n in range(1, n_layers):
            layers += conv_norm_act(mult, min(2**n, 8), stride=2)
            mult = min(2**n, 8)
        last_mult = min(2**n_layers, 8)
        layers += conv_norm_act(mult, last_mult, stride=1)
        layers.append(nn.Conv2d(ndf * last_mult, 1, 4, stride=1, padding=1))
        self.model = nn.Sequential(*layers)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.model(x)


def init_weights(net: nn.Module, init_type: str = "normal", init_gain: float = 0.02) -> nn.Module:
    """Upstream initialisation (N(0, 0.02) by default); the random-weight benchmarks use it too."""
    initialisers = {
        "normal": lambda w: init.normal_(w, 0.0, init_gain),
        "xavier": lambda w: init.xavier_normal_(w, gain=init_gain),
        "kaiming": lambda w: init.kaiming_normal_(w, a=0, mode="fan_in"),
        "orthogonal": lambda w: init.orthogonal_(w, gain=init_gain),
    }
    if init_type not in initialisers:
        raise UserError(f"init type {init_type!r} is unknown; expected one of {', '.join(initialisers)}")

    def init_module(module: nn.Module) -> None:
        if isinstance(module, (nn.Conv2d, nn.ConvTranspose2d, nn.Linear)):
            initialisers[init_type](module.weight.data)
            if module.bias is not None:
                init.constant_(module.bias.data, 0.0)
        elif isinstance(module, nn.BatchNorm2d):
            init.normal_(module.weight.data, 1.0, init_gain)
            init.constant_(module.bias.data, 0.0)

    net.apply(init_module)
    return net


GENERATORS = ("resnet_9blocks", "resnet_6blocks", "unet_128", "unet_256")
DISCRIMINATORS = ("basic", "n_layers")


def define_G(
    input_nc: int,
    output_nc: int,
    ngf: int,
    netG: str,
    norm: str = "instance",
    use_dropout: bool = False,
    init_type: str = "normal",
    init_gain: float = 0.02,
) -> nn.Module:
    """An initialised generator by upstream name (`--netG`)."""
    norm_layer = get_norm_layer(norm)
    if netG in ("resnet_9blocks", "resnet_6blocks"):
        n_blocks = 9 if netG == "resnet_9blocks" else 6
        net = ResnetGenerator(input_nc, output_nc, ngf, norm_layer, use_dropout, n_blocks=n_blocks)
    elif netG in ("unet_128", "unet_256"):
        num_downs = 7 if netG == "unet_128" else 8
        net = UnetGenerator(input_nc, output_nc, num_downs, ngf, norm_layer, use_dropout)
    else:
        raise UserError(f"generator {netG!r} is unknown; expected one of {', '.join(GENERATORS)}")
    return init_weights(net, init_type, init_gain)


def define_D(
    input_nc: int,
    ndf: int,
    netD: str = "basic",
    n_layers_D: int = 3,
    norm: str = "instance",
    init_type: str = "normal",
    init_gain: float = 0.02,
) -> nn.Module:
    """An initialised PatchGAN discriminator by upstream name (`--netD`); "basic" is n_layers=3."""
    if netD not in DISCRIMINATORS:
        raise UserError(f"discriminator {netD!r} is unknown; expected one of {', '.join(DISCRIMINATORS)}")
    n_layers = 3 if netD == "basic" else n_layers_D
    net = NLayerDiscriminator(input_nc, ndf, n_layers, get_norm_layer(norm))
    return init_weights(net, init_type, init_gain)
