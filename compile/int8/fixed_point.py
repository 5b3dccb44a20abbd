"""Integer convolutions for ONNX QDQ generators.

TVM's ONNX frontend imports a QDQ file as the float graph it describes: every convolution reads a
dequantized input and dequantized weights and its float output is quantized again (fake quant).
A microcontroller should instead multiply int8 by int8 into int32 and requantize with integers,
so `integer_convolutions` rewrites each `quantize(conv2d(dequantize(x_q), dequantize(w_q)) + bias)`
(as compile/int8/match.py finds it) into exactly that (the qnn-style lowering that Relay once had):
int8 weights, int32 accumulators and bias, and a per-channel fixed-point multiplier (31-bit mantissa,
right shift, round half up) in place of the float scale. Everything between convolutions (instance norm, relu, add, reflection
pad, sub-pixel shuffle, tanh) stays as the float ops the file specifies, reading and writing the
quantized tensors around it; `quantize_before_padding` (compile/onnx_import.py) makes the pads move
uint8 codes instead of floats.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np
import tvm
from tvm import relax
from compile import NATIVE_CONV
from compile.int8.match import QuantizedConv, conv_matches, match_quantized_conv
from errors import UserError

# Requantization multiplies by an integer mantissa of this many bits, then shifts right.
MULTIPLIER_BITS = 31
QUANT_RANGE = {"uint8": (0, 255), "int8": (-128, 127)}
HIGH_HALF_BITS = 32  # the native kernel requantizes from the high word of a 32 x 32-bit product
NATIVE_DEPTH_MULTIPLE = 8  # the kernel consumes taps eight at a time


def fixed_point(multipliers: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Per-channel real multipliers as (mantissa, shift): m ≈ mantissa * 2**-shift, mantissa < 2**31."""
    mantissas, shifts = [], []
    for value in np.asarray(multipliers, dtype=np.float64).ravel():
        if not 0 < value < 2 ** 16:
            raise UserError(f"requantization multiplier {value!r} is outside (0, 65536); the QDQ scales are corrupt")
        fraction, exponent = math.frexp(value)  # value = fraction * 2**exponent, fraction in [0.5, 1)
        mantissa = round(fraction * (1 << MULTIPLIER_BITS))
        if mantissa == 1 << MULTIPLIER_BITS:
            mantissa //= 2
            exponent += 1
        shift = MULTIPLIER_BITS - exponent
        while shift > 62:  # tiny multipliers: drop mantissa bits rather than shift past int64
            mantissa = (mantissa + 1) // 2
            shift -= 1
        mantissas.append(mantissa)
        shifts.append(shift)
    return np.array(mantissas, dtype=np.int64), np.array(shifts, dtype=np.int64)


@dataclass(frozen=True)
class FixedPointConv:
    """One QDQ convolution in integers: what both the TVM lowering and the native MCU kernel compute.

    output = clamp(out_zero + requantize(bias + conv(input codes padded with in_zero, weights))),
    requantize(a) = (a * mantissa + 2**(shift - 1)) >> shift (rounding half up). For the usual
    multipliers (< 0.25, shift > 32) a 32-bit core gets the same value from the high word of the
    32 x 32-bit product (SMMUL) and a 32-bit rounding shift by shift - 32: the low word cannot
    carry into the result (see compile/mcu_kernels/conv2d_s8.c).
    """

    weights: np.ndarray  # int8 OIHW
    bias: np.ndarray  # int64 per output channel, the input zero point folded in
    mantissa: np.ndarray  # int64 per output channel, < 2**31
    shift: np.ndarray  # int64 per output channel
    in_zero: int
    in_dtype: str
    out_zero: int
    out_dtype: str
    padding: tuple[int, int, int, int]  # top, left, bottom, right
    strides: tuple[int, int]
    dilation: tuple[int, int]
    groups: int
    in_shape: tuple[int, ...]
    out_shape: tuple[int, ...]


def _fixed_point_conv(found: QuantizedConv) -> FixedPointConv:
    """The integer form of a matched QDQ convolution, from its constants."""
    match = found.conv
    attrs = match.conv.attrs
    if attrs.data_layout != "NCHW" or attrs.kernel_layout != "OIHW":
        raise UserError(f"integer conv: layout {attrs.data_layout}/{attrs.kernel_layout}; expected NCHW/OIHW")
    if np.any(match.weight_zero != 0):  # (a bias with another zero point is not matched)
        raise UserError("integer conv: weight and bias zero points must be 0 (symmetric int8 weights)")
    s_in = match.input.scale
    z_in = match.input.zero_point
    weights = match.weight.astype(np.int64)
    channels = weights.shape[0]
    w_scale = match.channel_scales(np.float64)
    acc_scale = s_in * w_scale  # one accumulator step in real units
    if found.bias is None:  # a convolution exported without bias
        bias = np.zeros(channels, dtype=np.int64)
    else:
        b_scale = found.bias.scale.astype(np.float64)
        bias = np.round(found.bias.quantized.astype(np.float64) * b_scale / acc_scale).astype(np.int64)
    # The conv reads raw codes: subtract zero point * sum(weights) once per channel instead of per tap;
    # explicit padding with the zero point keeps the border exact.
    bias -= z_in * weights.sum(axis=(1, 2, 3))
    if np.abs(bias).max(initial=0) >= 2 ** 31:
        raise UserError("integer conv: bias does not fit int32 after zero-point folding")
    out_dtype = str(found.quantize.attrs.out_dtype)
    if out_dtype not in QUANT_RANGE:
        raise UserError(f"integer conv: quantized output type {out_dtype}; expected uint8 or int8")
    mantissa, shift = fixed_point(acc_scale / found.scale)
    data = match.input.data
    return FixedPointConv(
        weights=weights.astype(np.int8), bias=bias, mantissa=mantissa, shift=shift, in_zero=z_in,
        in_dtype=str(data.ty.dtype), out_zero=found.zero_point, out_dtype=out_dtype,
        padding=match.padding, strides=match.strides,
        dilation=tuple(int(d) for d in attrs.dilation), groups=int(attrs.groups),
        in_shape=tuple(int(d) for d in data.ty.shape.values),
        out_shape=tuple(int(d) for d in match.conv.ty.shape.values))


def _relax_conv(conv: FixedPointConv, data: relax.Expr) -> relax.Expr:
    """The integer convolution as Relax operators (int64 requantization), for TVM to lower."""
    top, left, bottom, right = conv.padding
    if top or left or bottom or right:
        data = relax.op.nn.pad(data, [0, 0, 0, 0, top, bottom, left, right], pad_value=float(conv.in_zero))
    per_channel = (1, conv.weights.shape[0], 1, 1)

    def channel_const(values: np.ndarray) -> relax.Expr:
        return relax.const(np.asarray(values, np.int64).reshape(per_channel), "int64")

    acc = relax.op.nn.conv2d(data, relax.const(conv.weights, "int8"), strides=conv.strides, padding=0,
                             dilation=conv.dilation, groups=conv.groups, out_dtype="int32")
    acc = relax.op.add(acc, relax.const(conv.bias.astype(np.int32).reshape(per_channel), "int32"))
    scaled = relax.op.multiply(relax.op.astype(acc, "int64"), channel_const(conv.mantissa))
    half = np.int64(1) << (conv.shift - 1)
    scaled = relax.op.right_shift(relax.op.add(scaled, channel_const(half)), channel_const(conv.shift))
    lo, hi = QUANT_RANGE[conv.out_dtype]
    scaled = relax.op.add(scaled, relax.const(conv.out_zero, "int64"))
    scaled = relax.op.minimum(relax.op.maximum(scaled, relax.const(lo, "int64")), relax.const(hi, "int64"))
    return relax.op.astype(scaled, conv.out_dtype)


def native_kernel_applies(conv: FixedPointConv) -> bool:
    """Whether NATIVE_CONV computes `conv`: plain (ungrouped, undilated) and multipliers below 0.25."""
    return conv.groups == 1 and conv.dilation == (1, 1) and bool(np.all(conv.shift > HIGH_HALF_BITS))


def native_arguments(conv: FixedPointConv) -> dict[str, np.ndarray]:
    """The constant arrays NATIVE_CONV reads, in its argument order (compile/mcu_kernels/conv2d_s8.h)."""
    out_c, in_c, k_h, k_w = conv.weights.shape
    depth = in_c * k_h * k_w
    depth_padded = -(-depth // NATIVE_DEPTH_MULTIPLE) * NATIVE_DEPTH_MULTIPLE
    rows = np.zeros((out_c + out_c % 2, depth_padded), np.int8)  # an odd last channel pairs with zeros
    rows[:out_c, :depth] = conv.weights.reshape(out_c, depth)
    groups = rows.reshape(-1, 2, depth_padded // 4, 4)[..., [0, 2, 1, 3]]  # w0 w2 w1 w3: SXTB16 gives pairs
    packed = groups.transpose(0, 2, 1, 3).reshape(-1)  # per channel pair: group k of the first, then the second
    top, left, _, _ = conv.padding
    geometry = [in_c, conv.in_shape[2], conv.in_shape[3], out_c, conv.out_shape[2], conv.out_shape[3], k_h, k_w,
                *conv.strides, top, left, conv.in_zero, int(conv.in_dtype == "int8"), conv.out_zero,
                int(conv.out_dtype == "int8"), depth_padded]
    shift = conv.shift - HIGH_HALF_BITS
    requant = np.stack([conv.mantissa, np.int64(1) << (shift - 1), shift], axis=1)
    return {"geometry": np.array(geometry, np.int32), "weights": packed, "bias": conv.bias.astype(np.int32),
            "requant": requant.astype(np.int32).reshape(-1)}


def _native_conv(conv: FixedPointConv, data: relax.Expr) -> relax.Expr:
    arrays = {name: relax.const(a, str(a.dtype)) for name, a in native_arguments(conv).items()}
    args = [arrays["geometry"], data, arrays["weights"], arrays["bias"], arrays["requant"]]
    return relax.op.call_dps_packed(NATIVE_CONV, relax.Tuple(args), relax.TensorType(conv.out_shape, conv.out_dtype))


def integer_convolutions(mod: tvm.IRModule, native_kernels: bool = False) -> tuple[tvm.IRModule, int, int]:
    """`mod` with every QDQ convolution in `main` made an integer one.

    With `native_kernels`, each convolution the hand-written Cortex-M kernel covers becomes a call
    to it (`call_dps_packed(NATIVE_CONV, ...)`) instead of Relax operators. Also returns how many
    convolutions were rewritten and how many of those call the native kernel.
    """
    main = mod["main"]
    var2val = relax.analysis.get_var2val(main)
    convs = conv_matches(var2val)
    plans = {}
    for var, value in var2val.items():
        found = match_quantized_conv(value, convs, var2val)
        if found is not None and (found.bias is None or found.bias.quantized is not None):  # a float bias stays float
            plans[var] = _fixed_point_conv(found), found.conv.input.data
    rewriter = _FixedPointRewriter(mod, plans, native_kernels)
    rewriter.builder_.update_func(mod.get_global_var("main"), rewriter.visit_expr(main))
    # One op for each repeated one: the frontend reshapes a constant once per reader, exporters quantize a
    # tensor once per reading convolution.
    merged = relax.transform.EliminateCommonSubexpr()(rewriter.builder_.get())
    return relax.transform.DeadCodeElimination()(merged), len(plans), rewriter.native


@relax.expr_functor.mutator
class _FixedPointRewriter(relax.PyExprMutator):
    """Each planned binding (a QDQ convolution's quantize) computed by its integer convolution instead."""

    def __init__(self, mod: tvm.IRModule, plans: dict[relax.Var, tuple[FixedPointConv, relax.Var]],
                 native_kernels: bool) -> None:
        super().__init__(mod)
        self.plans = plans
        self.native_kernels = native_kernels
        self.native = 0

    def visit_var_binding_(self, binding: relax.VarBinding) -> None:
        if binding.var not in self.plans:
            super().visit_var_binding_(binding)
            return
        conv, data = self.plans[binding.var]
        if self.native_kernels and native_kernel_applies(conv):
            self.native += 1
            value = _native_conv(conv, self.visit_expr(data))
        else:
            value = _relax_conv(conv, self.visit_expr(data))
        emit = self.builder_.emit if isinstance(binding.var, relax.DataflowVar) else self.builder_.emit_output
        self.set_var_remap(binding.var, emit(value, binding.var.name))
