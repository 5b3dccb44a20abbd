"""Compressed variants of trained generators (int8 PTQ/QAT, distillation, pruning) and their quality cost."""

from lwgan_models.compression.compress import (
    INT8_METHODS,
    METHODS,
    CompressConfig,
    compress,
    variant_name,
)

__all__ = ["INT8_METHODS", "METHODS", "CompressConfig", "compress", "variant_name"]
