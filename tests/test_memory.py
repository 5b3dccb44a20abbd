"""bench/memory.py: each runtime's peak resident memory, measured in a process of its own."""

from __future__ import annotations

import pytest
import torch

from bench.memory import peak_rss_bytes
from errors import UserError


def tiny_onnx(tmp_path):
    path = tmp_path / "tiny.onnx"
    module = torch.nn.Sequential(torch.nn.Conv2d(3, 3, 3, padding=1), torch.nn.Tanh()).eval()
    torch.onnx.export(module, (torch.zeros(1, 3, 16, 16),), str(path), dynamo=False, input_names=["x"],
                      dynamic_axes={"x": {2: "height", 3: "width"}})
    return path


def test_a_bigger_input_needs_more_memory(tmp_path):
    """1x3x16x16 against 1x3x1024x1024 (12 MB per activation): the child really runs the model."""
    path = tiny_onnx(tmp_path)
    small = peak_rss_bytes("onnxruntime", path, (1, 3, 16, 16), threads=1)
    large = peak_rss_bytes("onnxruntime", path, (1, 3, 1024, 1024), threads=1)
    assert 10e6 < small < 2e9
    assert large - small > 20e6


def test_a_failing_child_is_one_clear_error(tmp_path):
    with pytest.raises(UserError, match="peak memory of onnxruntime on missing.onnx: the measuring process failed"):
        peak_rss_bytes("onnxruntime", tmp_path / "missing.onnx", (1, 3, 16, 16), threads=1)
