"""The generator networks under benchmark and the registry that names them."""

from lwgan_models.cyclegan import (
    NLayerDiscriminator,
    ResnetBlock,
    ResnetGenerator,
    UnetGenerator,
    UnetSkipConnectionBlock,
    define_D,
    define_G,
    get_norm_layer,
    init_weights,
)
from lwgan_models.registry import LoadedModel, ModelSpec, count_macs, get, load, names
from lwgan_models.style_transfer import ConditionalInstanceNorm2d, StyleTransferNet

__all__ = [
    "ConditionalInstanceNorm2d",
    "LoadedModel",
    "ModelSpec",
    "NLayerDiscriminator",
    "ResnetBlock",
    "ResnetGenerator",
    "StyleTransferNet",
    "UnetGenerator",
    "UnetSkipConnectionBlock",
    "count_macs",
    "define_D",
    "define_G",
    "get",
    "get_norm_layer",
    "init_weights",
    "load",
    "names",
]
