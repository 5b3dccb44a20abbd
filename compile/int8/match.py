"""The one matcher of QDQ convolutions, which both integer lowerings start from.

    quantize(conv2d(dequantize(x_q), dequantize(w_q)) [+ bias], s_out, z_out)

as TVM's ONNX frontend imports it from a QDQ file: `match_conv` finds the convolution of a
dequantized input and dequantized constant weights, `match_bias` a per-channel bias added to it (a
dequantized int32 constant, or a float one), `match_quantized_conv` the whole pattern up to the
quantize of its output. A match holds what the graph says, checked only as far as the pattern
goes; each lowering decides which matches it covers and derives its own kernel from them
(compile/int8/lowering.py: `IntegerConv` for CPU kernels; compile/int8/fixed_point.py:
`FixedPointConv` for microcontrollers).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable

import numpy as np
import tvm
from tvm import relax, tirx
from tvm.ir import GenericConst


def constant(expr: relax.Expr, var2val) -> np.ndarray | None:
    """The value of a constant, looked up through the bindings that name it; None if it is not one."""
    while isinstance(expr, relax.Var) and expr in var2val:
        expr = var2val[expr]
    return expr.value.numpy() if isinstance(expr, GenericConst) else None


def call_to(expr: relax.Expr, op_name: str, var2val) -> relax.Call | None:
    """The call of operator `op_name` that `expr` is (or is bound to); None if it is another expression."""
    if isinstance(expr, relax.Var):
        expr = var2val.get(expr)
    if isinstance(expr, relax.Call) and isinstance(expr.op, tvm.ir.Op) and expr.op.name == op_name:
        return expr
    return None


def scalar(array: np.ndarray | None) -> float | None:
    return float(array.reshape(-1)[0]) if array is not None and array.size == 1 else None


@dataclass(frozen=True)
class QuantizedInput:
    data: relax.Var  # the quantized tensor
    scale: float
    zero_point: int


@dataclass(frozen=True)
class ConvMatch:
    """conv2d(dequantize(x_q), dequantize(w_q)): a quantized input and quantized constant weights."""

    conv: relax.Call  # the conv2d: its attributes (layouts, strides, padding, dilation, groups) and output type
    input: QuantizedInput
    weight: np.ndarray  # as stored, (OC, C / groups, KH, KW)
    weight_scale: np.ndarray  # as the dequantize gives it: one scale, or one per output channel
    weight_zero: np.ndarray
    weight_axis: int  # the weight dequantize's channel axis

    @property
    def strides(self) -> tuple[int, int]:
        return int(self.conv.attrs.strides[0]), int(self.conv.attrs.strides[1])

    @property
    def padding(self) -> tuple[int, int, int, int]:
        """top, left, bottom, right"""
        top, left, bottom, right = (int(p) for p in self.conv.attrs.padding)
        return top, left, bottom, right

    @property
    def depthwise(self) -> bool:
        """One input channel per output channel (groups = channels) of a static NCHW input."""
        out_channels = self.weight.shape[0]
        return int(self.conv.attrs.groups) == out_channels == int(self.input.data.ty.shape[1]) and self.weight.shape[1] == 1

    def channel_scales(self, dtype) -> np.ndarray:
        """The weight scale of each output channel."""
        return np.broadcast_to(self.weight_scale.reshape(-1).astype(dtype), (self.weight.shape[0],))


def match_conv(expr: relax.Expr, var2val) -> ConvMatch | None:
    """conv2d(dequantize(tensor, scalar scale, scalar zero point), dequantize(4-D constant weights))."""
    conv = call_to(expr, "relax.nn.conv2d", var2val)
    if conv is None:
        return None
    data_dq = call_to(conv.args[0], "relax.dequantize", var2val)
    weight_dq = call_to(conv.args[1], "relax.dequantize", var2val)
    if data_dq is None or weight_dq is None:
        return None
    source = data_dq.args[0]
    scale, zero_point = (scalar(constant(a, var2val)) for a in data_dq.args[1:3])
    if not isinstance(source, relax.Var) or scale is None or zero_point is None:
        return None
    weight, weight_scale, weight_zero = (constant(a, var2val) for a in weight_dq.args[:3])
    if weight is None or weight.ndim != 4 or weight_scale is None or weight_zero is None:
        return None
    return ConvMatch(conv, QuantizedInput(source, scale, int(zero_point)), weight, weight_scale, weight_zero,
                     int(weight_dq.attrs.axis))


def conv_matches(var2val, covered: Callable[[ConvMatch], bool] = lambda match: True) -> dict[relax.Var, ConvMatch]:
    """Binding var -> its QDQ convolution, for each one that `covered` accepts."""
    return {var: m for var in var2val if (m := match_conv(var, var2val)) is not None and covered(m)}


@dataclass(frozen=True)
class Bias:
    conv: relax.Var
    quantized: np.ndarray | None  # int32 (OC,) when the bias is a dequantized int32 constant
    scale: np.ndarray | None  # its float32 scale (OC,)
    values: np.ndarray  # float32 (OC,): the bias as the float graph adds it


def _is_channel_vector(expr: relax.Expr, out_channels: int) -> bool:
    """Whether `expr` broadcasts along NCHW's channel axis: shape (..., OC, 1, 1), leading dims 1."""
    shape = getattr(expr.ty, "shape", None)
    if shape is None or not all(isinstance(d, tirx.IntImm) for d in shape):
        return False
    dims = [int(d) for d in shape]
    return len(dims) >= 3 and dims[-3:] == [out_channels, 1, 1] and all(d == 1 for d in dims[:-3])


def match_bias(expr: relax.Expr, convs: dict[relax.Var, ConvMatch], var2val) -> Bias | None:
    """add(conv, bias), one of `convs` with a per-channel bias: a (reshaped) dequantize of an int32
    constant with zero point 0, or a float constant."""
    add = call_to(expr, "relax.add", var2val)
    if add is None:
        return None
    for conv, bias in (add.args, add.args[::-1]):
        match = convs.get(conv) if isinstance(conv, relax.Var) else None
        out_channels = None if match is None else match.weight.shape[0]
        if out_channels is None or not _is_channel_vector(bias, out_channels):
            continue
        reshape = call_to(bias, "relax.reshape", var2val)
        dq = call_to(reshape.args[0] if reshape is not None else bias, "relax.dequantize", var2val)
        if dq is not None:
            quantized, scale, zero = (constant(a, var2val) for a in dq.args[:3])
            if quantized is None or scale is None or zero is None or np.any(zero != 0) or quantized.size != out_channels:
                continue
            quantized = quantized.reshape(-1).astype(np.int64)
            scale = np.broadcast_to(scale.reshape(-1).astype(np.float32), (out_channels,))
            return Bias(conv, quantized, scale, (quantized.astype(np.float32) * scale).astype(np.float32))
        values = constant(bias, var2val)
        if values is not None and values.dtype == np.float32:
            return Bias(conv, None, None, values.reshape(-1))
    return None


@dataclass(frozen=True)
class QuantizedConv:
    """quantize(conv [+ bias], scale, zero point): the whole pattern."""

    quantize: relax.Call
    scale: float
    zero_point: int
    conv_var: relax.Var
    conv: ConvMatch
    bias: Bias | None


def match_quantized_conv(expr: relax.Expr, convs: dict[relax.Var, ConvMatch], var2val) -> QuantizedConv | None:
    """quantize(conv [+ bias]) with a scalar constant scale and zero point, the conv one of `convs`."""
    quantize = call_to(expr, "relax.quantize", var2val)
    if quantize is None:
        return None
    scale, zero_point = (scalar(constant(a, var2val)) for a in quantize.args[1:3])
    if scale is None or zero_point is None:
        return None
    bias = match_bias(quantize.args[0], convs, var2val)
    conv_var = bias.conv if bias is not None else quantize.args[0]
    match = convs.get(conv_var) if isinstance(conv_var, relax.Var) else None
    if match is None:
        return None
    return QuantizedConv(quantize, scale, int(zero_point), conv_var, match, bias)
