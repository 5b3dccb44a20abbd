"""ONNX Runtime's QOperator int8 format rewritten as the QDQ format the rest of compile/ reads.

`onnxruntime.quantization` writes an int8 model in one of two formats. QDQ keeps float operators
between DequantizeLinear/QuantizeLinear pairs; QOperator fuses them into QLinearConv,
QLinearMatMul and contrib ops (com.microsoft QLinearAdd, QLinearMul, QLinearSigmoid, ...), which
TVM's ONNX frontend does not import. Each such op computes exactly "dequantize the inputs, run the
float op, quantize the result", so it is rewritten as that: the integer convolution lowering
(compile/int8/lowering.py, compile/int8/fixed_point.py) then finds the same patterns in both formats.
"""

from __future__ import annotations

import numpy as np
import onnx
from onnx import helper, numpy_helper

from errors import UserError

MICROSOFT = "com.microsoft"
# QLinear op -> (float op, positions of its quantized inputs as (value, scale, zero point) triples,
# position of the output's (scale, zero point)). Inputs not in a triple pass through (a conv's bias).
_ELEMENTWISE = {
    "QLinearAdd": ("Add", ((0, 1, 2), (3, 4, 5)), (6, 7)),
    "QLinearMul": ("Mul", ((0, 1, 2), (3, 4, 5)), (6, 7)),
    "QLinearSigmoid": ("Sigmoid", ((0, 1, 2),), (3, 4)),
    "QLinearLeakyRelu": ("LeakyRelu", ((0, 1, 2),), (3, 4)),
    "QLinearAveragePool": ("AveragePool", ((0, 1, 2),), (3, 4)),
    "QLinearReduceMean": ("ReduceMean", ((0, 1, 2),), (3, 4)),
    "QLinearMatMul": ("MatMul", ((0, 1, 2), (3, 4, 5)), (6, 7)),
}
# Attributes of contrib ops that the standard op does not take.
_CONTRIB_ONLY_ATTRIBUTES = {"channels_last"}


def is_qoperator(model: onnx.ModelProto) -> bool:
    return any(node.op_type.startswith("QLinear") for node in model.graph.node)


def qdq_from_qoperator(model: onnx.ModelProto) -> onnx.ModelProto:
    """A copy of `model` with every QLinear* op replaced by DequantizeLinear -> float op -> QuantizeLinear.

    A QLinear op this does not know, or a channels-last pooling, is a one-line UserError naming it.
    """
    if not is_qoperator(model):
        return model
    rewritten = onnx.ModelProto()
    rewritten.CopyFrom(model)
    graph = rewritten.graph
    constants = {t.name: t for t in graph.initializer}
    nodes: list[onnx.NodeProto] = []
    for node in graph.node:
        if not node.op_type.startswith("QLinear"):
            nodes.append(node)
            continue
        if node.op_type == "QLinearConv":
            nodes.extend(_conv(node, constants, graph))
        elif node.op_type == "QLinearConcat":
            nodes.extend(_concat(node))
        elif node.op_type == "QLinearGlobalAveragePool":
            nodes.extend(_global_average_pool(node))
        elif node.op_type in _ELEMENTWISE:
            op, triples, (out_scale, out_zero) = _ELEMENTWISE[node.op_type]
            floats, dequantizing = _dequantize_all(node, [node.input[i] for triple in triples for i in triple])
            attributes = {a.name: helper.get_attribute_value(a) for a in node.attribute
                          if a.name not in _CONTRIB_ONLY_ATTRIBUTES}
            nodes += [*dequantizing, helper.make_node(op, floats, [f"{node.output[0]}_float"], f"{node.output[0]}_float",
                                                      **attributes),
                      _quantize(node, node.input[out_scale], node.input[out_zero])]
        else:
            raise UserError(f"ONNX node {node.name!r}: {node.op_type} (QOperator int8) is not supported; "
                            "quantize the model in the QDQ format instead (quant_format=QuantFormat.QDQ)")
    del graph.node[:]
    graph.node.extend(nodes)
    del graph.value_info[:]  # the float intermediates are new; shapes are inferred again on import
    opsets = {o.domain: o for o in rewritten.opset_import}
    if opsets.get("", None) is not None and opsets[""].version < 13:
        opsets[""].version = 13  # per-axis DequantizeLinear
    return rewritten


def _dequantize_all(node: onnx.NodeProto, inputs: list[str]) -> tuple[list[str], list[onnx.NodeProto]]:
    """DequantizeLinear for each (value, scale, zero point) triple in `inputs`: the float names and the nodes.

    New names derive from the node's output, which is unique in a graph (node names may be empty)."""
    floats, nodes = [], []
    for position in range(0, len(inputs), 3):
        value, scale, zero = inputs[position:position + 3]
        name = f"{node.output[0]}_dequantized{position // 3}"
        nodes.append(helper.make_node("DequantizeLinear", [value, scale, zero], [name], name))
        floats.append(name)
    return floats, nodes


def _quantize(node: onnx.NodeProto, scale: str, zero: str) -> onnx.NodeProto:
    return helper.make_node("QuantizeLinear", [f"{node.output[0]}_float", scale, zero], [node.output[0]],
                            f"{node.output[0]}_quantize")


def _conv(node: onnx.NodeProto, constants: dict, graph: onnx.GraphProto) -> list[onnx.NodeProto]:
    """QLinearConv: input and (per-channel) weight dequantized, the int32 bias at scale x_scale * w_scale."""
    x, x_scale, x_zero, w, w_scale, w_zero, y_scale, y_zero = node.input[:8]
    nodes = [helper.make_node("DequantizeLinear", [x, x_scale, x_zero], [f"{node.output[0]}_x"], f"{node.output[0]}_x"),
             helper.make_node("DequantizeLinear", [w, w_scale, w_zero], [f"{node.output[0]}_w"], f"{node.output[0]}_w",
                              axis=0)]
    conv_inputs = [f"{node.output[0]}_x", f"{node.output[0]}_w"]
    if len(node.input) > 8 and node.input[8]:
        if x_scale not in constants or w_scale not in constants:
            raise UserError(f"ONNX node {node.name!r}: QLinearConv with a bias needs constant input and weight scales")
        bias_scale = (numpy_helper.to_array(constants[x_scale]).astype(np.float32)
                      * numpy_helper.to_array(constants[w_scale]).astype(np.float32)).reshape(-1)
        scale_name, zero_name = f"{node.output[0]}_bias_scale", f"{node.output[0]}_bias_zero"
        graph.initializer.extend([numpy_helper.from_array(bias_scale, scale_name),
                                  numpy_helper.from_array(np.zeros(bias_scale.shape, np.int32), zero_name)])
        nodes.append(helper.make_node("DequantizeLinear", [node.input[8], scale_name, zero_name], [f"{node.output[0]}_b"],
                                      f"{node.output[0]}_b", axis=0))
        conv_inputs.append(f"{node.output[0]}_b")
    attributes = {a.name: helper.get_attribute_value(a) for a in node.attribute}
    nodes += [helper.make_node("Conv", conv_inputs, [f"{node.output[0]}_float"], f"{node.output[0]}_float", **attributes),
              _quantize(node, y_scale, y_zero)]
    return nodes


def _concat(node: onnx.NodeProto) -> list[onnx.NodeProto]:
    """QLinearConcat(y_scale, y_zero, x0, s0, z0, x1, s1, z1, ...)."""
    floats, nodes = _dequantize_all(node, list(node.input[2:]))
    axis = next(helper.get_attribute_value(a) for a in node.attribute if a.name == "axis")
    return [*nodes, helper.make_node("Concat", floats, [f"{node.output[0]}_float"], f"{node.output[0]}_float", axis=axis),
            _quantize(node, node.input[0], node.input[1])]


def _global_average_pool(node: onnx.NodeProto) -> list[onnx.NodeProto]:
    if any(a.name == "channels_last" and helper.get_attribute_value(a) for a in node.attribute):
        raise UserError(f"ONNX node {node.name!r}: channels-last QLinearGlobalAveragePool is not supported")
    floats, nodes = _dequantize_all(node, list(node.input[:3]))
    return [*nodes, helper.make_node("GlobalAveragePool", floats, [f"{node.output[0]}_float"], f"{node.output[0]}_float"),
            _quantize(node, node.input[3], node.input[4])]
