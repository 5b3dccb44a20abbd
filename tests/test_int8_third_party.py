"""int8 networks quantized by ONNX Runtime's own tools (not the suite's PTQ), in both of its formats.

A MobileNet-style network (depthwise and grouped convolutions, squeeze-and-excitation gates with
hard-sigmoid, hard-swish, a nearest-neighbour resize and a concat, per-channel weight scales) is
quantized with `onnxruntime.quantization.quantize_static` as QDQ and as QOperator. Both import,
build for the host and agree with ONNX Runtime running the same file by the int8 rule.
"""

from __future__ import annotations

import numpy as np
import onnx
import onnxruntime as ort
import pytest
import torch
import tvm
from onnx import helper
from tvm import relax
from onnxruntime.quantization import CalibrationDataReader, QuantFormat, QuantType, quantize_static
from torch import nn

import targets
from bench.run import MIN_OUTPUT_PSNR_DB
from compile import LOWERING_ATTR
from compile.build import with_default_schedules
from compile.int8.qoperator import is_qoperator, qdq_from_qoperator
from compile.passes import prepare
from compile.pipeline import from_onnx_file, relax_for_target
from errors import UserError

SHAPE = (1, 3, 32, 32)
pytestmark = pytest.mark.usefixtures("one_torch_thread")


class InvertedResidual(nn.Module):
    def __init__(self, channels: int, expanded: int, out: int, stride: int = 1):
        super().__init__()
        self.expand = nn.Sequential(nn.Conv2d(channels, expanded, 1), nn.ReLU6())
        self.depthwise = nn.Sequential(nn.Conv2d(expanded, expanded, 3, stride, 1, groups=expanded), nn.ReLU6())
        self.squeeze, self.excite = nn.Conv2d(expanded, expanded // 4, 1), nn.Conv2d(expanded // 4, expanded, 1)
        self.project = nn.Conv2d(expanded, out, 1)
        self.residual = stride == 1 and channels == out

    def forward(self, x):
        y = self.depthwise(self.expand(x))
        gate = nn.functional.hardsigmoid(self.excite(torch.relu(self.squeeze(y.mean((2, 3), keepdim=True)))))
        y = self.project(y * gate)
        return x + y if self.residual else y


class MobileStyle(nn.Module):
    def __init__(self):
        super().__init__()
        self.stem = nn.Sequential(nn.Conv2d(3, 16, 3, 2, 1), nn.Hardswish())
        self.down = InvertedResidual(16, 32, 24, stride=2)
        self.same = InvertedResidual(24, 48, 24)
        self.grouped = nn.Sequential(nn.Conv2d(24, 24, 3, 1, 1, groups=4), nn.ReLU())
        self.up = nn.Upsample(scale_factor=2, mode="nearest")
        self.head = nn.Conv2d(24 + 16, 3, 3, 1, 1)

    def forward(self, x):
        stem = self.stem(x)
        y = self.grouped(self.same(self.down(stem)))
        return torch.sigmoid(self.head(torch.cat([self.up(y), stem], 1)))


class Photos(CalibrationDataReader):
    def __init__(self):
        self.batches = iter([{"x": np.random.default_rng(i).uniform(-1, 1, SHAPE).astype(np.float32)} for i in range(4)])

    def get_next(self):
        return next(self.batches, None)


@pytest.fixture(scope="module")
def quantized(tmp_path_factory):
    """{format name: path} of the network quantized by ONNX Runtime, per-channel int8 weights, uint8 activations."""
    root = tmp_path_factory.mktemp("third-party")
    torch.manual_seed(0)
    float_path = root / "mobile.onnx"
    torch.onnx.export(MobileStyle().eval(), (torch.zeros(SHAPE),), str(float_path), input_names=["x"],
                      output_names=["y"], opset_version=17, dynamo=False)
    paths = {}
    for quant_format in (QuantFormat.QDQ, QuantFormat.QOperator):
        paths[quant_format.name] = root / f"mobile-{quant_format.name.lower()}.onnx"
        quantize_static(str(float_path), str(paths[quant_format.name]), Photos(), quant_format=quant_format,
                        per_channel=True, activation_type=QuantType.QUInt8, weight_type=QuantType.QInt8)
    # per-tensor, asymmetric uint8 weights: no integer kernel covers them, so every conv runs in float
    paths["asymmetric"] = root / "mobile-asymmetric.onnx"
    quantize_static(str(float_path), str(paths["asymmetric"]), Photos(), quant_format=QuantFormat.QDQ,
                    per_channel=False, activation_type=QuantType.QUInt8, weight_type=QuantType.QUInt8)
    return paths


def psnr_db(output: np.ndarray, reference: np.ndarray) -> float:
    """PSNR of a sigmoid output (range 1) against the reference."""
    mse = float(np.mean((output.astype(np.float64) - reference) ** 2))
    return float("inf") if mse == 0 else 10 * np.log10(1.0 / mse)


def ort_output(model: onnx.ModelProto | str, x: np.ndarray) -> np.ndarray:
    source = model.SerializeToString() if isinstance(model, onnx.ModelProto) else model
    return ort.InferenceSession(source, providers=["CPUExecutionProvider"]).run(None, {"x": x})[0]


def test_qoperator_rewrites_to_the_qdq_graph_it_computes(quantized):
    original = onnx.load(quantized["QOperator"])
    assert is_qoperator(original)
    rewritten = qdq_from_qoperator(original)
    assert not is_qoperator(rewritten)
    onnx.checker.check_model(rewritten)
    ops = {node.op_type for node in rewritten.graph.node}
    assert {"Conv", "Mul", "Add", "Concat", "Sigmoid", "QuantizeLinear", "DequantizeLinear"} <= ops
    x = np.random.default_rng(7).uniform(-1, 1, SHAPE).astype(np.float32)
    # ONNX Runtime's QLinear kernels requantize in their own arithmetic: at most a rounding step apart
    assert psnr_db(ort_output(rewritten, x), ort_output(str(quantized["QOperator"]), x)) >= 40


@pytest.mark.parametrize("quant_format", ["QDQ", "QOperator"])
def test_tvm_runs_onnxruntimes_int8_files_and_says_which_ops_ran_how(quantized, quant_format):
    model = from_onnx_file(quantized[quant_format])
    assert model.precision == "int8"
    host = targets.resolve(targets.load_target("host"))
    target = host.tvm_target
    lowered = relax_for_target(model, host)()  # built here, not taken from the shared build cache
    lowering = str(lowered.attrs[LOWERING_ATTR])
    convs = sum(node.op_type == "Conv" for node in onnx.load(quantized["QDQ"]).graph.node)
    # every conv but the 4-group one runs as an integer kernel, those whose uint8 output the next
    # integer conv reads included (they once ran in float while their integer kernel went unused)
    assert lowering.startswith(f"int8 lowering: {convs - 1}/{convs} convolutions as integer kernels")
    assert "; 2 depthwise)" in lowering  # the inverted residuals' depthwise convs
    floats = lowering.partition("float between dequantize and quantize: ")[2].split(", ")
    assert "Conv" in floats and "HardSigmoid x2" in floats
    library = tvm.compile(with_default_schedules(prepare(lowered, target), target), target)
    x = np.random.default_rng(3).uniform(-1, 1, SHAPE).astype(np.float32)
    got = relax.VirtualMachine(library, tvm.cpu())["main"](tvm.runtime.tensor(x)).numpy()
    assert psnr_db(got, ort_output(str(quantized[quant_format]), x)) >= MIN_OUTPUT_PSNR_DB["int8"]


def test_an_unknown_qlinear_op_is_named_in_one_line():
    node = helper.make_node("QLinearSoftmax", ["x", "s", "z", "s", "z"], ["y"], "softmax", domain="com.microsoft")
    graph = helper.make_graph([node], "g", [helper.make_tensor_value_info("x", onnx.TensorProto.UINT8, [1, 4])],
                              [helper.make_tensor_value_info("y", onnx.TensorProto.UINT8, [1, 4])])
    with pytest.raises(UserError, match="'softmax': QLinearSoftmax .* QDQ format"):
        qdq_from_qoperator(helper.make_model(graph))


def test_weights_no_integer_kernel_covers_run_in_float_and_the_line_says_so(quantized):
    host = targets.resolve(targets.load_target("host"))
    lowered = relax_for_target(from_onnx_file(quantized["asymmetric"]), host)()
    convs = sum(node.op_type == "Conv" for node in onnx.load(quantized["asymmetric"]).graph.node)
    lowering = str(lowered.attrs[LOWERING_ATTR])
    assert lowering.startswith(f"int8 lowering: 0/{convs} convolutions") and f"Conv x{convs}" in lowering
    library = tvm.compile(with_default_schedules(prepare(lowered, host.tvm_target), host.tvm_target), host.tvm_target)
    x = np.random.default_rng(4).uniform(-1, 1, SHAPE).astype(np.float32)
    got = relax.VirtualMachine(library, tvm.cpu())["main"](tvm.runtime.tensor(x)).numpy()
    assert psnr_db(got, ort_output(str(quantized["asymmetric"]), x)) >= MIN_OUTPUT_PSNR_DB["int8"]


def test_unnamed_qlinear_nodes_get_distinct_names(quantized):
    model = onnx.load(quantized["QOperator"])
    for node in model.graph.node:
        node.name = ""  # allowed by ONNX, and written by some exporters
    rewritten = qdq_from_qoperator(model)
    onnx.checker.check_model(rewritten)
    outputs = [name for node in rewritten.graph.node for name in node.output]
    assert len(outputs) == len(set(outputs))
    x = np.random.default_rng(8).uniform(-1, 1, SHAPE).astype(np.float32)
    assert psnr_db(ort_output(rewritten, x), ort_output(str(quantized["QOperator"]), x)) >= 40
