"""Structured channel pruning that ends in the official architecture at a smaller width.

Pruning whole channels (rather than single weights) is what makes a generator faster on a
compiler stack: the result is an ordinary dense network, so `prune_generator` returns exactly
the class `registry.build_generator` makes for the smaller `ngf`/`width`, filled with the kept
channels of the original. Its state_dict then loads into the official code, and every stage
(compile, benchmark, report) treats it like any other model.

Channels are ranked by the L1 norm of the filters that produce them (Li et al. 2017, "Pruning
Filters for Efficient ConvNets"); where several convs write into one channel set (the residual
trunk, joined by the skip connections) their norms are summed. The top channels are kept in
their original order, so `keep=1.0` reproduces the original network exactly.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch
from torch import nn

from errors import UserError
from lwgan_models.cyclegan import ResnetBlock, ResnetGenerator
from lwgan_models.registry import arch_family, build_generator
from lwgan_models.style_transfer import ConvNormReLU, StyleTransferNet

IMAGE = None  # the fixed RGB channels at either end of a generator: never pruned
RESNET_GENERATORS = ("resnet_6blocks", "resnet_9blocks")
Group = str | None  # channel sets are named after the layer that produces them


@dataclass
class SlicePlan:
    """Which channel group each parameter dim belongs to, and which weights produce each group."""

    dims: dict[str, dict[int, Group]] = field(default_factory=dict)  # parameter name -> {dim: group}
    producers: list[tuple[str, int, Group]] = field(default_factory=list)  # (weight name, output dim, group)

    def add_conv(self, name: str, conv: nn.Conv2d | nn.ConvTranspose2d, in_group: Group, out_group: Group) -> None:
        in_dim, out_dim = (0, 1) if isinstance(conv, nn.ConvTranspose2d) else (1, 0)  # ConvTranspose2d: (in, out, k, k)
        self.dims[f"{name}.weight"] = {in_dim: in_group, out_dim: out_group}
        self.producers.append((f"{name}.weight", out_dim, out_group))
        if conv.bias is not None:
            self.dims[f"{name}.bias"] = {0: out_group}


def prune_generator(module: nn.Module, arch: dict, keep: float) -> tuple[nn.Module, dict]:
    """The generator at width max(1, round(keep * ngf or width)), holding its most important channels.

    Supports CycleGAN ResNet generators and StyleTransferNet. Returns the pruned module (in the
    training mode of `module`) and its architecture dict (`arch` with the new width).
    """
    if not 0 < keep <= 1:
        raise UserError(f"keep={keep}; expected a fraction of channels in (0, 1]")
    family = arch_family(arch)
    plan = family.prune_plan(module, arch)
    state = module.state_dict()
    if _meta_shapes(arch) != {name: tensor.shape for name, tensor in state.items()}:
        raise UserError(f"the module's parameters do not match architecture {arch}; expected the module built from it")
    width_key = family.width_key
    new_arch = {**arch, width_key: max(1, round(keep * arch[width_key]))}
    kept = _kept_channels(state, plan, _group_sizes(new_arch, plan))
    pruned_state = {name: _select(tensor, plan.dims.get(name, {}), kept) for name, tensor in state.items()}
    with torch.device("meta"):  # no wasted random initialisation: every tensor is replaced below
        pruned = build_generator(new_arch)
    pruned.load_state_dict(pruned_state, strict=True, assign=True)
    if isinstance(module, StyleTransferNet):
        pruned.active_style = module.active_style  # not in the state_dict, but it selects what forward(x) does
    return pruned.train(module.training), new_arch


def _unprunable(module: nn.Module, arch: dict) -> UserError:
    return UserError(
        f"cannot prune architecture {arch} ({type(module).__name__}); expected a CycleGAN ResnetGenerator "
        f"(netG {' or '.join(RESNET_GENERATORS)}) or a StyleTransferNet (family nst)"
    )


def _meta_shapes(arch: dict) -> dict[str, torch.Size]:
    """Parameter shapes of the official model for `arch`, without allocating or initialising it."""
    with torch.device("meta"):
        return {name: t.shape for name, t in build_generator(arch).state_dict().items()}


def resnet_generator_plan(net: nn.Module, arch: dict) -> SlicePlan:
    """Walk `net.model` in order: each conv reads the current group and starts a new one.

    The residual blocks read and write the group current when the first block starts (the last
    downsampling conv's outputs), which makes the trunk one shared channel set. A U-Net's skips
    are not walked, so it is refused.
    """
    if arch.get("netG") not in RESNET_GENERATORS or not isinstance(net, ResnetGenerator):
        raise _unprunable(net, arch)
    plan = SlicePlan()
    layers = list(net.model.named_children())
    last_conv = max(i for i, (_, layer) in enumerate(layers) if isinstance(layer, nn.Conv2d))
    current: Group = IMAGE
    for position, (index, layer) in enumerate(layers):
        if isinstance(layer, (nn.Conv2d, nn.ConvTranspose2d)):
            output = IMAGE if position == last_conv else f"model.{index}"
            plan.add_conv(f"model.{index}", layer, current, output)
            current = output
        elif isinstance(layer, ResnetBlock):
            (first, conv1), (second, conv2) = [
                (i, c) for i, c in layer.conv_block.named_children() if isinstance(c, nn.Conv2d)
            ]
            inner = f"model.{index}.inner"
            plan.add_conv(f"model.{index}.conv_block.{first}", conv1, current, inner)
            plan.add_conv(f"model.{index}.conv_block.{second}", conv2, inner, current)
    return plan


def style_transfer_plan(net: nn.Module, arch: dict) -> SlicePlan:
    """Same walk as for ResNet; each conditional norm's (n_styles, C) gamma/beta follow its conv's outputs."""
    if not isinstance(net, StyleTransferNet):
        raise _unprunable(net, arch)
    plan = SlicePlan()

    def add_conv_norm(name: str, layer: ConvNormReLU, in_group: Group, out_group: Group) -> None:
        plan.add_conv(f"{name}.conv", layer.conv, in_group, out_group)
        plan.dims[f"{name}.norm.gamma"] = plan.dims[f"{name}.norm.beta"] = {1: out_group}

    current: Group = IMAGE
    for index, layer in enumerate(net.encoder):
        add_conv_norm(f"encoder.{index}", layer, current, f"encoder.{index}")
        current = f"encoder.{index}"
    for index, block in enumerate(net.residuals):
        inner = f"residuals.{index}.inner"
        add_conv_norm(f"residuals.{index}.conv1", block.conv1, current, inner)
        add_conv_norm(f"residuals.{index}.conv2", block.conv2, inner, current)
    for index, layer in enumerate(net.decoder):
        add_conv_norm(f"decoder.{index}", layer, current, f"decoder.{index}")
        current = f"decoder.{index}"
    plan.add_conv("output.1", net.output[1], current, IMAGE)
    return plan


def _group_sizes(new_arch: dict, plan: SlicePlan) -> dict[str, int]:
    """How many channels each group keeps, read off the official model at the new width."""
    shapes = _meta_shapes(new_arch)
    return {group: shapes[name][dim] for name, dims in plan.dims.items() for dim, group in dims.items() if group}


def _kept_channels(state: dict[str, torch.Tensor], plan: SlicePlan, sizes: dict[str, int]) -> dict[str, torch.Tensor]:
    """Per group, the ascending indices of the channels whose producing filters have the largest summed L1 norm."""
    importance: dict[str, torch.Tensor] = {}
    for name, out_dim, group in plan.producers:
        if group is IMAGE:
            continue
        filters = state[name].detach().transpose(0, out_dim)
        norms = filters.abs().reshape(filters.shape[0], -1).sum(dim=1)
        importance[group] = importance[group] + norms if group in importance else norms
    return {
        group: torch.topk(scores, sizes[group], sorted=False).indices.sort().values
        for group, scores in importance.items()
    }


def _select(tensor: torch.Tensor, dims: dict[int, Group], kept: dict[str, torch.Tensor]) -> torch.Tensor:
    """`tensor` restricted to the kept channels along each of its grouped dims (a fresh copy)."""
    selected = tensor.detach()
    for dim, group in dims.items():
        if group is not IMAGE:
            selected = selected.index_select(dim, kept[group])
    return selected.clone()
