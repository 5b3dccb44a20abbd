"""int8 quantization of generators: calibration (PTQ), fake-quant training (QAT), and ONNX QDQ export.

Scheme, chosen for the kernels that run it (x86 VNNI and ONNX Runtime's QLinearConv take u8 x s8):
every convolution gets uint8 per-tensor affine activations on its input and output, int8
symmetric per-output-channel weights, and an int32 bias on the grid input_scale * weight_scale.
Everything between convolutions (instance norm, ReLU, tanh, padding, upsampling) stays float.
The torch fake-quant model and the exported QDQ graph specify the same arithmetic (bit-identical
through a conv stack, tested); through a deep generator, float reordering flips single rounding
steps. The QDQ file run by ONNX Runtime's reference kernels is what int8 builds are checked against.

Strided transposed convolutions are first rewritten as sub-pixel convolutions (exact), so every
quantized op is an ordinary Conv with a constant weight.
"""

from __future__ import annotations

import copy
import tempfile
from collections.abc import Iterable
from pathlib import Path

import numpy as np
import onnx
import torch
import torch.nn.functional as F
from onnx import helper, numpy_helper
from torch import nn

from errors import UserError
from lwgan_models.hooks import forward_hooks
from lwgan_models.onnx_export import export_onnx
from lwgan_models.style_transfer import ConditionalInstanceNorm2d
from lwgan_models.subpixel import SubPixelConvTranspose2d, decompose_transposed_convs

ACTIVATION_RANGE = (0, 255)  # uint8
# Weights are int8 symmetric with zero point 0. With 7 bits ([-63, 63], ONNX Runtime's
# "reduce_range") the u8 x s8 pair sums of x86 CPUs without VNNI (vpmaddubsw, int16) cannot
# saturate: 2 * 255 * 127 overflows int16, and ORT's kernels then differ from the QDQ
# semantics by up to 0.7 on a [-1, 1] output (measured here on AVX2). Full 8 bits suit VNNI/ARM.
DEFAULT_WEIGHT_BITS = 7
BIAS_RANGE = (-(2**31), 2**31 - 1)
QAT_MOMENTUM = 0.01  # EMA of activation ranges while training


class RangeObserver(nn.Module):
    """Tracks a tensor's range: running min/max (calibration) or their moving average (QAT); or holds the
    scale and zero point a QDQ file gives (`pinned`, see `load_qdq`)."""

    def __init__(self):
        super().__init__()
        self.register_buffer("low", torch.tensor(float("inf")))
        self.register_buffer("high", torch.tensor(float("-inf")))
        self.pinned: tuple[float, int] | None = None

    @property
    def observed(self) -> bool:
        return self.pinned is not None or bool(torch.isfinite(self.low))

    @torch.no_grad()
    def observe(self, x: torch.Tensor, momentum: float | None) -> None:
        low, high = x.min(), x.max()
        if momentum is None or not self.observed:
            self.low.copy_(torch.minimum(self.low, low))
            self.high.copy_(torch.maximum(self.high, high))
        else:
            self.low.lerp_(low, momentum)
            self.high.lerp_(high, momentum)

    def qparams(self) -> tuple[float, int]:
        """uint8 scale and zero point; the range always holds 0 so zero padding stays exact."""
        if self.pinned is not None:
            return self.pinned
        if not self.observed:
            raise UserError("a quantized convolution saw no calibration data; calibrate before quantizing")
        low, high = min(float(self.low), 0.0), max(float(self.high), 0.0)
        qmin, qmax = ACTIVATION_RANGE
        scale = float(np.float32(max(high - low, 1e-8) / (qmax - qmin)))  # what an ONNX graph stores
        zero_point = int(np.clip(round(qmin - low / scale), qmin, qmax))
        return scale, zero_point


def weight_limit(bits: int) -> int:
    if not 2 <= bits <= 8:
        raise UserError(f"weight bits {bits}; expected 2..8 (int8 storage)")
    return 2 ** (bits - 1) - 1


def weight_scales(weight: torch.Tensor, limit: int) -> torch.Tensor:
    """Per-output-channel symmetric scales (max |w| maps to `limit`)."""
    return weight.detach().abs().amax(dim=(1, 2, 3)).clamp(min=1e-12) / limit


class QuantConv2d(nn.Module):
    """A Conv2d with quantized input, weight, bias and output.

    Modes: "observe" runs float and records activation ranges (calibration); "quantize" runs
    the int8 arithmetic as fake-quant; "train" does both with moving-average ranges (QAT; the
    rounding passes gradients straight through).
    """

    def __init__(self, conv: nn.Conv2d, weight_bits: int = DEFAULT_WEIGHT_BITS):
        super().__init__()
        self.conv = conv
        self.weight_limit = weight_limit(weight_bits)
        self.input_range = RangeObserver()
        self.output_range = RangeObserver()
        self.mode = "observe"

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.mode == "observe":
            self.input_range.observe(x, None)
            y = self.conv(x)
            self.output_range.observe(y, None)
            return y
        if self.mode == "train":
            self.input_range.observe(x, QAT_MOMENTUM)
        in_scale, in_zero = self.input_range.qparams()
        x = torch.fake_quantize_per_tensor_affine(x, in_scale, in_zero, *ACTIVATION_RANGE)
        w_scales = weight_scales(self.conv.weight, self.weight_limit)
        weight = torch.fake_quantize_per_channel_affine(
            self.conv.weight, w_scales, torch.zeros_like(w_scales, dtype=torch.int32), 0,
            -self.weight_limit, self.weight_limit,
        )
        bias = self.conv.bias
        if bias is not None:
            step = in_scale * w_scales
            bias = bias + ((bias / step).round().clamp(*BIAS_RANGE) * step - bias).detach()
        y = F.conv2d(x, weight, bias, self.conv.stride, self.conv.padding, self.conv.dilation, self.conv.groups)
        if self.mode == "train":
            self.output_range.observe(y, QAT_MOMENTUM)
        out_scale, out_zero = self.output_range.qparams()
        return torch.fake_quantize_per_tensor_affine(y, out_scale, out_zero, *ACTIVATION_RANGE)


def prepare(module: nn.Module, example: torch.Tensor, weight_bits: int = DEFAULT_WEIGHT_BITS) -> nn.Module:
    """A copy of `module` with every convolution quantizable (in "observe" mode)."""
    prepared = decompose_transposed_convs(module, example)
    _replace(prepared, SubPixelConvTranspose2d, lambda layer: layer.materialize())
    if any(isinstance(m, nn.ConvTranspose2d) for m in prepared.modules()):
        raise UserError("the model has a transposed convolution that cannot be rewritten as sub-pixel convolutions "
                        "(non-square stride or output size not a multiple of it); it cannot be quantized")
    _replace(prepared, nn.Conv2d, lambda conv: QuantConv2d(conv, weight_bits))
    return prepared


def _replace(module: nn.Module, kind: type, make) -> None:
    for name, layer in list(module.named_modules()):
        if isinstance(layer, kind) and name:
            parent_name, _, child = name.rpartition(".")
            parent = module.get_submodule(parent_name) if parent_name else module
            setattr(parent, child, make(layer))


def quant_convs(module: nn.Module) -> dict[str, QuantConv2d]:
    return {name: m for name, m in module.named_modules() if isinstance(m, QuantConv2d)}


def set_mode(module: nn.Module, mode: str) -> nn.Module:
    for conv in quant_convs(module).values():
        conv.mode = mode
    return module


@torch.no_grad()
def calibrate(prepared: nn.Module, batches: Iterable[torch.Tensor], call=None) -> nn.Module:
    """Record activation ranges over `batches`, then switch to quantized arithmetic.

    `call(model, batch)` runs one batch (default `model(batch)`); a multi-style network passes
    one that visits each style, so every style's ranges are seen.
    """
    set_mode(prepared, "observe").eval()
    seen = 0
    for batch in batches:
        (call or (lambda model, x: model(x)))(prepared, batch)
        seen += 1
    if not seen:
        raise UserError("calibration got no images; expected at least one batch of held-out images")
    return set_mode(prepared, "quantize")


def export_qdq(prepared: nn.Module, input_shape: tuple[int, ...], path: Path) -> Path:
    """Write the quantized model as an ONNX QDQ graph with int8 weights and int32 biases.

    The float graph is exported first (conv weights keep their parameter names), then each Conv
    gets QuantizeLinear/DequantizeLinear on its input and output and dequantized constant
    weights and bias, using the scales the torch model computes with.
    """
    convs = quant_convs(prepared)
    float_model = copy.deepcopy(prepared).eval()
    _replace(float_model, QuantConv2d, lambda q: q.conv)
    with tempfile.TemporaryDirectory() as scratch:
        model = export_onnx(float_model, input_shape, Path(scratch) / "float.onnx")
    _insert_qdq(model, {f"{name}.weight": conv for name, conv in convs.items()})
    onnx.checker.check_model(model)
    path.parent.mkdir(parents=True, exist_ok=True)
    onnx.save(model, str(path))
    return path


def _insert_qdq(model: onnx.ModelProto, convs_by_weight: dict[str, QuantConv2d]) -> None:
    graph = model.graph
    initializers = {init.name: init for init in graph.initializer}
    new_nodes, new_inits = [], []

    def const(name: str, array: np.ndarray) -> str:
        new_inits.append(numpy_helper.from_array(array, name))
        return name

    def qdq(tensor: str, scale: float, zero: int, tag: str, output: str | None = None) -> str:
        """tensor -> QuantizeLinear -> DequantizeLinear; returns the dequantized name."""
        s = const(f"{tag}s", np.array(scale, np.float32))
        z = const(f"{tag}z", np.array(zero, np.uint8))
        output = output or f"{tag}d"
        new_nodes.append(helper.make_node("QuantizeLinear", [tensor, s, z], [f"{tag}q"]))
        new_nodes.append(helper.make_node("DequantizeLinear", [f"{tag}q", s, z], [output]))
        return output

    matched = set()
    for node in list(graph.node):
        if node.op_type != "Conv":
            new_nodes.append(node)
            continue
        weight_name = node.input[1]
        conv = convs_by_weight.get(weight_name)
        if conv is None or weight_name not in initializers:
            raise UserError(f"ONNX Conv {node.name} has weight {weight_name!r} that matches no quantized convolution")
        matched.add(weight_name)
        tag = f"c{len(matched)}"  # short names: on a small generator long ones cost several % of the file
        in_scale, in_zero = conv.input_range.qparams()
        out_scale, out_zero = conv.output_range.qparams()
        weight = numpy_helper.to_array(initializers[weight_name])
        limit = conv.weight_limit
        w_scales = weight_scales(torch.from_numpy(weight.copy()), limit).numpy().astype(np.float32)
        q_weight = np.clip(np.round(weight / w_scales[:, None, None, None]), -limit, limit)
        inputs = [qdq(node.input[0], in_scale, in_zero, f"{tag}i"), f"{tag}w"]
        # Weight and bias zero points are 0, the default when the input is omitted.
        new_nodes.append(helper.make_node("DequantizeLinear", [const(f"{tag}wq", q_weight.astype(np.int8)),
                                                               const(f"{tag}ws", w_scales)], [f"{tag}w"], axis=0))
        if len(node.input) > 2 and node.input[2]:
            bias = numpy_helper.to_array(initializers[node.input[2]])
            b_scales = (np.float32(in_scale) * w_scales).astype(np.float32)
            q_bias = np.clip(np.round(bias / b_scales), *BIAS_RANGE).astype(np.int32)
            new_nodes.append(helper.make_node("DequantizeLinear", [const(f"{tag}bq", q_bias),
                                                                   const(f"{tag}bs", b_scales)], [f"{tag}b"], axis=0))
            inputs.append(f"{tag}b")
        new_nodes.append(helper.make_node("Conv", inputs, [f"{tag}y"], name=node.name, **{
            a.name: helper.get_attribute_value(a) for a in node.attribute}))
        qdq(f"{tag}y", out_scale, out_zero, f"{tag}o", output=node.output[0])
    unmatched = set(convs_by_weight) - matched
    if unmatched:
        raise UserError(f"quantized convolutions {sorted(unmatched)[:3]} were not found in the exported graph")
    consumed = {name for node in new_nodes for name in node.input}
    kept = [init for init in graph.initializer if init.name in consumed]
    del graph.node[:]
    graph.node.extend(new_nodes)
    del graph.initializer[:]
    graph.initializer.extend(kept + new_inits)


def load_qdq(module: nn.Module, path: Path, example: torch.Tensor) -> nn.Module:
    """The fake-quant torch form of a QDQ file `export_qdq` wrote from a network shaped like `module`.

    The inverse of `export_qdq`: the int8 variants ship only as QDQ files, yet an attack needs their
    gradients (rounding passes them straight through). Conv weights, biases and activation scales come
    from the file's `c<i>` constants in graph order, which is the convolutions' execution order; the
    weight limit (bits) from the largest integer weight, since each channel's largest maps to it; a
    conditional instance norm's scale and shift (folded for the exported style) from the constants its
    InstanceNormalization feeds. Every float parameter starts as NaN, so one the file does not set
    makes the check forward at `example` fail instead of computing with stale weights.
    """
    model = onnx.load(str(path))
    constants = {init.name: numpy_helper.to_array(init) for init in model.graph.initializer}
    module = copy.deepcopy(module).eval()
    with torch.no_grad():
        for parameter in module.parameters():
            parameter.fill_(float("nan"))
    prepared = prepare(module, example)
    layers = _in_execution_order(prepared, example, (QuantConv2d, ConditionalInstanceNorm2d))
    convs = [layer for layer in layers if isinstance(layer, QuantConv2d)]
    found = sum(node.op_type == "Conv" for node in model.graph.node)
    if found != len(convs):
        raise UserError(f"{path}: {found} convolutions, the network has {len(convs)}; it is not this network's QDQ file")
    with torch.no_grad():
        for index, conv in enumerate(convs, 1):
            tag = f"c{index}"
            weight = torch.from_numpy(constants[f"{tag}wq"].astype(np.float32) * constants[f"{tag}ws"][:, None, None, None])
            if weight.shape != conv.conv.weight.shape:
                raise UserError(f"{path}: convolution {index} has weight {tuple(weight.shape)}, "
                                f"the network {tuple(conv.conv.weight.shape)}")
            conv.conv.weight.copy_(weight)
            conv.weight_limit = int(np.abs(constants[f"{tag}wq"]).max()) or conv.weight_limit
            if conv.conv.bias is not None:
                conv.conv.bias.copy_(torch.from_numpy(constants[f"{tag}bq"] * constants[f"{tag}bs"].astype(np.float64)))
            for observer, side in ((conv.input_range, "i"), (conv.output_range, "o")):
                observer.pinned = float(constants[f"{tag}{side}s"]), int(constants[f"{tag}{side}z"])
        _load_style_affines(prepared, [layer for layer in layers if isinstance(layer, ConditionalInstanceNorm2d)],
                            model, constants, path)
    set_mode(prepared, "quantize")
    with torch.no_grad():
        if not torch.isfinite(prepared(example)).all():
            raise UserError(f"{path} leaves parameters of the network unset; it is not this network's QDQ file")
    return prepared


def _in_execution_order(module: nn.Module, example: torch.Tensor, kinds: tuple[type, ...]) -> list[nn.Module]:
    """The layers of `kinds` in `module` in the order a forward at `example` calls them."""
    order: list[nn.Module] = []
    with forward_hooks(module, lambda layer, *_: order.append(layer), lambda m: isinstance(m, kinds)), torch.no_grad():
        module(example)
    return order


def _load_style_affines(prepared: nn.Module, norms: list[nn.Module], model: onnx.ModelProto, constants: dict,
                        path: Path) -> None:
    """A style network's conditional instance norms (in execution order): the exported style's scale and
    shift are the constants of the Mul and Add that follow each InstanceNormalization."""
    if not norms:
        return
    consumers = {name: node for node in model.graph.node for name in node.input}
    exported = [node for node in model.graph.node if node.op_type == "InstanceNormalization"]
    if len(exported) != len(norms):
        raise UserError(f"{path}: {len(exported)} instance norms, the network has {len(norms)}")
    style = prepared.active_style
    for norm, node in zip(norms, exported):
        scale = consumers.get(node.output[0])
        shift = consumers.get(scale.output[0]) if scale is not None else None
        if scale is None or shift is None or (scale.op_type, shift.op_type) != ("Mul", "Add"):
            raise UserError(f"{path}: instance norm {node.name or node.output[0]} is not followed by a scale and shift")
        norm.gamma[style] = torch.tensor(_constant_of(scale, constants).reshape(-1))
        norm.beta[style] = torch.tensor(_constant_of(shift, constants).reshape(-1))


def _constant_of(node: onnx.NodeProto, constants: dict) -> np.ndarray:
    known = [constants[name] for name in node.input if name in constants]
    if len(known) != 1:
        raise UserError(f"ONNX {node.op_type} {node.name or node.output[0]} has no single constant operand")
    return known[0]
