"""ONNX import at a fixed shape: TVM's output must match onnxruntime on the same model and input."""

from __future__ import annotations

import numpy as np
import onnx
import onnxruntime as ort
import pytest
import torch
import tvm
from onnx import TensorProto, helper, numpy_helper
from tvm.relax.frontend.onnx import from_onnx

from compile.onnx_import import fold_shapes, load_onnx, onnx_to_relax
from errors import UserError

TARGET = tvm.target.Target({"kind": "llvm", "mcpu": "x86-64-v3", "num-cores": 2})


class ConvNet(torch.nn.Module):
    """The layer mix of a light-weight image-to-image generator, shrunk."""

    def __init__(self):
        super().__init__()
        self.body = torch.nn.Sequential(
            torch.nn.ReflectionPad2d(1),
            torch.nn.Conv2d(3, 8, 3, stride=2),
            torch.nn.InstanceNorm2d(8, affine=True),
            torch.nn.ReLU(),
            torch.nn.ConvTranspose2d(8, 3, 4, stride=2, padding=1),
            torch.nn.Tanh(),
        )

    def forward(self, x):
        return self.body(x)


@pytest.fixture(scope="module")
def conv_net_onnx(tmp_path_factory):
    """Exported once: the dynamo exporter takes several seconds."""
    torch.manual_seed(0)
    path = tmp_path_factory.mktemp("convnet") / "convnet.onnx"
    torch.onnx.export(ConvNet().eval(), (torch.randn(1, 3, 32, 32),), path, dynamo=True, input_names=["image"])
    return path


def run_tvm(mod: tvm.IRModule, x: np.ndarray) -> np.ndarray:
    vm = tvm.relax.VirtualMachine(tvm.compile(mod, TARGET), tvm.cpu())
    return vm["main"](tvm.runtime.tensor(x)).numpy()


def run_ort(path, x: np.ndarray, **session_options) -> np.ndarray:
    options = ort.SessionOptions()
    for key, value in session_options.items():
        setattr(options, key, value)
    session = ort.InferenceSession(str(path), options, providers=["CPUExecutionProvider"])
    return session.run(None, {session.get_inputs()[0].name: x})[0]


def random_input(shape) -> np.ndarray:
    return np.random.default_rng(1).standard_normal(shape, dtype=np.float32)


def const(name: str, value) -> TensorProto:
    return numpy_helper.from_array(np.asarray(value), name)


def save(graph: onnx.GraphProto, path, opset: int = 18):
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", opset)])
    onnx.checker.check_model(model, full_check=True)
    onnx.save(model, path)
    return path


def test_torch_conv_net_matches_ort(conv_net_onnx):
    mod = onnx_to_relax(conv_net_onnx)
    main = mod["main"]
    assert [p.name for p in main.params] == ["image"], "weights must be constants, not parameters"
    assert isinstance(main.ret_ty, tvm.relax.TensorType), "one output must not come back as a 1-tuple"
    x = random_input((1, 3, 32, 32))
    np.testing.assert_allclose(run_tvm(mod, x), run_ort(conv_net_onnx, x), atol=1e-4)


def dynamic_pads_model(path):
    """Reflect-pad H and W to 24 with pads computed from Shape, then Resize to twice the size from Shape."""
    nodes = [
        helper.make_node("Shape", ["x"], ["shape"]),
        *[
            node
            for axis, dim in ((2, "h"), (3, "w"))
            for node in (
                helper.make_node("Gather", ["shape", f"axis{axis}"], [f"{dim}_int"]),
                helper.make_node("Cast", [f"{dim}_int"], [f"{dim}"], to=TensorProto.FLOAT),
                helper.make_node("Sub", ["target", dim], [f"{dim}_missing"]),
                helper.make_node("Div", [f"{dim}_missing", "two"], [f"{dim}_pad"]),
                helper.make_node("Unsqueeze", [f"{dim}_pad", "axis0"], [f"{dim}_pad1"]),
            )
        ],
        helper.make_node("Concat", ["zeros", "h_pad1", "w_pad1", "zeros", "h_pad1", "w_pad1"], ["pads_f"], axis=0),
        helper.make_node("Cast", ["pads_f"], ["pads"], to=TensorProto.INT64),
        helper.make_node("Pad", ["x", "pads"], ["padded"], mode="reflect"),
        helper.make_node("Conv", ["padded", "weight"], ["conv"], pads=[1, 1, 1, 1]),
        helper.make_node("Shape", ["conv"], ["conv_shape"]),
        helper.make_node("Mul", ["conv_shape", "scale"], ["sizes"]),
        helper.make_node("Resize", ["conv", "", "", "sizes"], ["y"], mode="nearest"),
    ]
    initializers = [
        const("axis0", np.array([0], np.int64)),
        const("axis2", np.array(2, np.int64)),
        const("axis3", np.array(3, np.int64)),
        const("target", np.array(24, np.float32)),
        const("two", np.array(2, np.float32)),
        const("zeros", np.zeros(2, np.float32)),
        const("scale", np.array([1, 1, 2, 2], np.int64)),
        const("weight", random_input((4, 3, 3, 3))),
    ]
    graph = helper.make_graph(
        nodes,
        "dynamic_pads",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, 3, "H", "W"])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, [1, 4, "OH", "OW"])],
        initializers,
    )
    return save(graph, path)


def test_dynamic_pads_and_resize_sizes_are_folded(tmp_path):
    path = dynamic_pads_model(tmp_path / "dynamic_pads.onnx")
    shape = (1, 3, 20, 16)
    with pytest.raises(Exception):
        from_onnx(onnx.load(path), shape_dict={"x": list(shape)})

    folded = fold_shapes(onnx.load(path), {"x": shape})
    assert [n.op_type for n in folded.graph.node] == ["Pad", "Conv", "Resize"]
    initializers = {t.name: numpy_helper.to_array(t) for t in folded.graph.initializer}
    assert initializers["pads"].tolist() == [0, 0, 2, 4, 0, 0, 2, 4]
    assert initializers["sizes"].tolist() == [1, 4, 48, 48]

    mod = onnx_to_relax(path, {"x": shape})
    x = random_input(shape)
    out, expected = run_tvm(mod, x), run_ort(path, x)
    assert out.shape == expected.shape == (1, 4, 48, 48)
    np.testing.assert_allclose(out, expected, atol=1e-4)


def nhwc_model(path):
    """NHWC in and out with symbolic batch and spatial dims; the final Reshape's shape comes from Shape(end=3)."""
    nodes = [
        helper.make_node("Transpose", ["x"], ["nchw"], perm=[0, 3, 1, 2]),
        helper.make_node("Conv", ["nchw", "weight", "bias"], ["conv"], pads=[1, 1, 1, 1]),
        helper.make_node("Relu", ["conv"], ["relu"]),
        helper.make_node("Transpose", ["relu"], ["nhwc"], perm=[0, 2, 3, 1]),
        helper.make_node("Shape", ["x"], ["nhw"], end=3),
        helper.make_node("Concat", ["nhw", "minus_one"], ["out_shape"], axis=0),
        helper.make_node("Reshape", ["nhwc", "out_shape"], ["y"]),
    ]
    initializers = [
        const("weight", random_input((4, 3, 3, 3))),
        const("bias", random_input((4,))),
        const("minus_one", np.array([-1], np.int64)),
    ]
    graph = helper.make_graph(
        nodes,
        "nhwc",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["N", "H", "W", 3])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["N", "H", "W", 4])],
        initializers,
    )
    return save(graph, path)


def test_nhwc_input_with_symbolic_dims(tmp_path):
    path = nhwc_model(tmp_path / "nhwc.onnx")
    with pytest.raises(UserError, match=r"input 'x' has shape \('N', 'H', 'W', 3\).*input_shapes"):
        onnx_to_relax(path)
    shape = (2, 12, 10, 3)
    mod = onnx_to_relax(path, {"x": shape})
    x = random_input(shape)
    np.testing.assert_allclose(run_tvm(mod, x), run_ort(path, x), atol=1e-4)


def test_qdq_model_matches_ort(conv_net_onnx, tmp_path):
    """Tolerance: QDQ rounds activations to int8 steps (~0.01 here). TVM and ORT do the float math in
    different orders, so a value landing on a rounding boundary can flip one step on one side, and the
    InstanceNorm after the first conv scales that flip up. So: almost all values agree to 1e-4, none
    disagrees by more than a few steps.

    `reduce_range` (7-bit weights) is ORT's advice for AVX2 machines without VNNI: with 8-bit weights
    ORT's fused QLinearConv saturates its int16 intermediate sums and drifts ~0.2 from its own
    unfused QDQ execution (and from TVM).
    """
    from onnxruntime.quantization import (
        CalibrationDataReader,
        QuantFormat,
        QuantType,
        quantize_static,
    )

    class RandomImages(CalibrationDataReader):
        def __init__(self):
            rng = np.random.default_rng(0)
            self.batches = iter([{"image": rng.standard_normal((1, 3, 32, 32), dtype=np.float32)} for _ in range(4)])

        def get_next(self):
            return next(self.batches, None)

    path = tmp_path / "convnet_qdq.onnx"
    quantize_static(
        conv_net_onnx,
        path,
        RandomImages(),
        quant_format=QuantFormat.QDQ,
        per_channel=True,
        reduce_range=True,
        activation_type=QuantType.QInt8,
        weight_type=QuantType.QInt8,
    )
    assert {"QuantizeLinear", "DequantizeLinear"} <= {n.op_type for n in onnx.load(path).graph.node}

    mod = onnx_to_relax(path)
    x = random_input((1, 3, 32, 32))
    diff = np.abs(run_tvm(mod, x) - run_ort(path, x))
    assert np.mean(diff > 1e-4) < 0.01
    assert diff.max() < 0.05


@pytest.mark.parametrize(
    "content",
    [b"", np.random.default_rng(0).bytes(256), b"a text file, not a model\n", "torch"],
    ids=["empty", "random-bytes", "text", "torch-checkpoint"],
)
def test_load_rejects_non_onnx_files(tmp_path, content):
    path = tmp_path / "generator.onnx"
    if content == "torch":
        torch.save(ConvNet().state_dict(), path)
    else:
        path.write_bytes(content)
    with pytest.raises(UserError, match="not an ONNX model") as info:
        load_onnx(path)
    assert str(path) in str(info.value) and "\n" not in str(info.value)


def test_missing_file(tmp_path):
    path = tmp_path / "missing.onnx"
    with pytest.raises(UserError, match="no such ONNX file") as info:
        onnx_to_relax(path)
    assert str(path) in str(info.value)


@pytest.mark.parametrize(
    ("input_shapes", "pattern"),
    [
        ({"image": (1, 3, 12, 10)}, r"input 'image' is not a graph input.*\['x'\]"),
        ({"x": (12, 10, 3)}, r"input 'x': model declares shape \('N', 'H', 'W', 3\), given \(12, 10, 3\)"),
        ({"x": (1, 12, 10, 4)}, r"input 'x': model declares shape \('N', 'H', 'W', 3\), given \(1, 12, 10, 4\)"),
    ],
    ids=["unknown-input", "wrong-rank", "wrong-static-dim"],
)
def test_bad_input_shapes(tmp_path, input_shapes, pattern):
    path = nhwc_model(tmp_path / "nhwc.onnx")
    with pytest.raises(UserError, match=pattern) as info:
        onnx_to_relax(path, input_shapes)
    assert str(info.value).startswith(str(path)) and "\n" not in str(info.value)


def test_unsupported_operator_is_named(tmp_path):
    """Celu is in ONNX but not in the Relax frontend's converter map."""
    graph = helper.make_graph(
        [helper.make_node("Celu", ["x"], ["y"], name="activation_7")],
        "celu",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, 3, 8, 8])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, [1, 3, 8, 8])],
    )
    path = save(graph, tmp_path / "celu.onnx")
    with pytest.raises(UserError, match=r"not supported by TVM's ONNX frontend: Celu \(node 'activation_7'\)") as info:
        onnx_to_relax(path)
    assert str(info.value).startswith(str(path)) and "\n" not in str(info.value)


def test_frontend_failure_names_the_node(tmp_path):
    """Blocked (opset-21) DequantizeLinear is in the converter map but the converter rejects it."""
    graph = helper.make_graph(
        [
            helper.make_node("DequantizeLinear", ["w_int8", "w_scale"], ["w"], axis=1, block_size=2, name="dq_weight"),
            helper.make_node("MatMul", ["x", "w"], ["y"]),
        ],
        "blocked_dq",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, 4])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, [1, 4])],
        [const("w_int8", np.ones((4, 4), np.int8)), const("w_scale", np.ones((4, 2), np.float32))],
    )
    path = save(graph, tmp_path / "blocked_dq.onnx", opset=21)
    with pytest.raises(UserError, match=r"frontend failed at DequantizeLinear node 'dq_weight': .*blocked") as info:
        onnx_to_relax(path)
    assert str(info.value).startswith(str(path)) and "\n" not in str(info.value)


def test_an_input_too_large_for_memory_is_refused_before_anything_is_allocated(tmp_path):
    """1x40000x40000x3 through the NHWC model: the estimate and the limit in one line, and this process
    never grew by the gigabytes the activations would take."""
    import psutil

    from compile.pipeline import from_onnx_file, from_registry
    from lwgan_models.registry import load

    path = nhwc_model(tmp_path / "nhwc.onnx")
    before = psutil.Process().memory_info().rss
    with pytest.raises(UserError, match=r"nhwc\.onnx: input shape \(1, 40000, 40000, 3\) needs at least \d+\.\d GiB "
                                        r"for one layer's activations; this machine has \d+\.\d GiB available"):
        from_onnx_file(path, (1, 40000, 40000, 3))
    with pytest.raises(UserError, match=r"cyclegan-resnet6-ngf16: input shape \(1, 3, 20000, 20000\) needs at least"):
        from_registry(load("cyclegan-resnet6-ngf16"), (1, 3, 20000, 20000))
    assert psutil.Process().memory_info().rss - before < 1 << 30
    from_onnx_file(path, (1, 64, 64, 3))  # a shape that fits still imports
