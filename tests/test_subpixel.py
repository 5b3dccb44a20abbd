"""lwgan_models/subpixel.py: the sub-pixel rewrite of transposed convolutions is exact."""

from __future__ import annotations

import pytest
import torch
from torch import nn

import lwgan_models
from lwgan_models.subpixel import SubPixelConvTranspose2d, decompose_transposed_convs


@pytest.mark.parametrize(
    "kernel, stride, padding, output_padding, height",
    [(3, 2, 1, 1, 16), (4, 2, 1, 0, 8), (4, 2, 1, 0, 1), (3, 2, 1, 1, 5), (5, 2, 2, 1, 7), (2, 2, 0, 0, 6), (6, 3, 2, 1, 5)],
)
@pytest.mark.parametrize("fused", [False, True])
def test_matches_conv_transpose(kernel, stride, padding, output_padding, height, fused):
    torch.manual_seed(0)
    convt = nn.Sequential(nn.ConvTranspose2d(5, 4, kernel, stride, padding, output_padding)).eval()
    x = torch.randn(2, 5, height, height + 1)
    rewritten = decompose_transposed_convs(convt, x, lambda layer, size: fused)
    assert isinstance(rewritten[0], SubPixelConvTranspose2d)
    with torch.no_grad():
        assert torch.allclose(rewritten(x), convt(x), atol=1e-5)


@pytest.mark.parametrize("kernel, padding, output_padding", [(3, 1, 1), (4, 1, 0)])
def test_fused_form_is_one_3x3_conv_with_stride_squared_outputs(kernel, padding, output_padding):
    convt = nn.Sequential(nn.ConvTranspose2d(8, 6, kernel, 2, padding, output_padding)).eval()
    layer = decompose_transposed_convs(convt, torch.randn(1, 8, 8, 8), lambda layer, size: True)[0]
    weight, bias, _ = layer.fused_conv()
    assert tuple(weight.shape) == (6 * 4, 8, 3, 3) and tuple(bias.shape) == (6 * 4,)


def test_leaves_what_it_cannot_decompose():
    convt = nn.Sequential(nn.ConvTranspose2d(4, 4, 3, stride=2, padding=1, groups=2)).eval()
    rewritten = decompose_transposed_convs(convt, torch.randn(1, 4, 8, 8))
    assert isinstance(rewritten[0], nn.ConvTranspose2d)


@pytest.mark.parametrize("name, expected", [("cyclegan-unet128-ngf16", 7), ("cyclegan-resnet6-ngf16", 2)])
def test_generators_rewrite_every_decoder_layer_exactly(name, expected):
    loaded = lwgan_models.load(name)
    x = torch.randn(loaded.spec.input_shape)
    rewritten = decompose_transposed_convs(loaded.module, x)
    assert sum(isinstance(m, SubPixelConvTranspose2d) for m in rewritten.modules()) == expected
    assert all(isinstance(m, nn.ConvTranspose2d) for m in loaded.module.modules() if "ConvTranspose" in type(m).__name__)
    with torch.no_grad():
        assert torch.allclose(rewritten(x), loaded.module(x), atol=1e-5)
