"""Export a generator to ONNX the one way every stage uses (dynamo exporter, static shape).

The exporter annotates every node with its Python stack and FX node (tens of KB for a small
generator); those are dropped so a file's size on disk is the model, not the debug info.
"""

from __future__ import annotations

import contextlib
import io
import logging
from pathlib import Path

import onnx
import torch
from torch import nn

# The exporter warns on every call that torchvision (which no generator uses) is not installed.
logging.getLogger("torch.onnx._internal.exporter._registration").setLevel(logging.ERROR)


def export_onnx(module: nn.Module, input_shape: tuple[int, ...], path: Path) -> onnx.ModelProto:
    """Write `module` at `input_shape` to `path` and return the checked model."""
    with contextlib.redirect_stdout(io.StringIO()), torch.no_grad():  # the exporter narrates every step
        program = torch.onnx.export(module.eval(), (torch.zeros(*input_shape),), dynamo=True, external_data=False)
    model = program.model_proto
    strip_debug_info(model)
    onnx.checker.check_model(model)
    Path(path).parent.mkdir(parents=True, exist_ok=True)
    onnx.save(model, str(path))
    return model


def strip_debug_info(model: onnx.ModelProto) -> None:
    for node in model.graph.node:
        del node.metadata_props[:]
        node.doc_string = ""
    del model.graph.value_info[:]
