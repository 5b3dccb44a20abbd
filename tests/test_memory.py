"""bench/memory.py: each runtime's peak resident memory, measured in a process of its own."""

from __future__ import annotations

import dataclasses

import pytest
import torch

import targets
from bench import runtimes
from bench.memory import peak_rss_bytes
from compile.artifacts import build_artifact
from conftest import TINY_SHAPE, model_under_test, tiny_generator
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


def test_tvms_child_serves_the_library_as_a_device_would(tmp_path):
    """With only libtvm_runtime and no torch (what its plug-in declares a serving process has), the
    child of a tiny TVM library needs hundreds of MB less than a Python process that imported TVM's
    compiler and torch: those are not the model's memory."""
    library = build_artifact("tvm", model_under_test(tiny_generator(), TINY_SHAPE, "tiny-memory", tmp_path),
                             targets.resolve(targets.load_target("host"))).path
    spec = runtimes.get("tvm")
    assert dict(spec.serving_env) == {"TVM_USE_RUNTIME_LIB": "1"} and spec.serving_without == ("torch",)
    serving = peak_rss_bytes("tvm", library, TINY_SHAPE, threads=1)
    runtimes.register(dataclasses.replace(spec, serving_env=(), serving_without=()))
    try:
        developing = peak_rss_bytes("tvm", library, TINY_SHAPE, threads=1)
    finally:
        runtimes.register(spec)
    assert 10e6 < serving < 200e6 and developing - serving > 100e6
