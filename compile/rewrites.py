"""Relax rewrites before fusion, so that FuseOps makes fewer kernels, and vectorized ones.

- An output activation (tanh) moves ahead of the data movement before it. A U-Net's last
  transposed convolution is imported as sub-pixel phase convolutions whose outputs are
  concatenated and interleaved (reshape, permute_dims, reshape), and only then comes tanh. FuseOps
  joined tanh to the interleave, whose gathers keep the kernel scalar: 0.7 ms for the 3x128x128
  output, 14 ns a value. tanh of a rearrangement is the rearrangement of tanh, so applied to the
  phase outputs it becomes each convolution's vectorized epilogue instead.
- A zero pad feeding an unpadded convolution becomes the convolution's own (possibly asymmetric)
  padding. Sub-pixel phases pad each side differently, which torch's conv2d cannot say; as separate
  pads they were 16 kernels of a U-Net, 10-35 us each, and a copy of each input.
- A per-tensor quantize moves ahead of the same data movement as tanh: it is elementwise too.
- A take of a constant table at a constant index (a conditional instance norm's style row) becomes
  the constant it selects.

`subpixel_transposed_convs` turns the strided transposed convolutions of an imported ONNX file into
their s*s sub-pixel phase convolutions, interleaved (the torch import does the same with
lwgan_models/subpixel.py): TVM lowers conv2d_transpose as a convolution over a zero-dilated input
and runs it with default loops, 179 ms for an ONNX CycleGAN that ONNX Runtime ran in 10 ms. A
dequantized int8 weight stays int8 per phase, so each phase is a QDQ convolution compile/int8/lowering.py
lowers to an integer kernel. A bias add (per output channel) goes onto each phase, and a per-tensor
quantize after the interleave moves onto each phase too (`fuse_friendly`), so the phases requantize
to uint8 in their epilogues.
"""

from __future__ import annotations

import numpy as np
import tvm
from tvm import relax
from tvm.ir import GenericConst

from lwgan_models.subpixel import subpixel_phase

ACTIVATIONS = ("relax.tanh", "relax.quantize")
MOVES = ("relax.reshape", "relax.permute_dims", "relax.concat")  # values rearranged, none computed


def _op_name(expr: relax.Expr) -> str | None:
    return expr.op.name if isinstance(expr, relax.Call) and isinstance(expr.op, tvm.ir.Op) else None


@relax.expr_functor.visitor
class _UseCounter(relax.PyExprVisitor):
    def __init__(self) -> None:
        super().__init__()
        self.uses: dict[relax.Var, int] = {}

    def visit_var_(self, var: relax.Var) -> None:
        self.uses[var] = self.uses.get(var, 0) + 1

    def visit_dataflow_var_(self, var: relax.DataflowVar) -> None:
        self.uses[var] = self.uses.get(var, 0) + 1


@relax.expr_functor.mutator
class _Rewriter(relax.PyExprMutator):
    def __init__(self, mod: tvm.IRModule, uses: dict[relax.Var, int]) -> None:
        super().__init__(mod)
        self.uses = uses
        self.moved = 0
        self.folded_pads = 0

    def visit_call_(self, call: relax.Call) -> relax.Expr:
        call = super().visit_call_(call)
        name = _op_name(call)
        if name == "relax.nn.conv2d":
            return self._pad_in_conv(call)
        if name == "relax.take":
            return _constant_take(call)
        if name not in ACTIVATIONS or self._rearranged(call.args[0]) is None or not _elementwise(call):
            return call
        self.moved += 1
        return self._apply_before_moves(call.args[0], call)

    def _pad_in_conv(self, conv: relax.Call) -> relax.Expr:
        """conv2d(pad(x)) -> conv2d(x) padding the same rows and columns with zeros."""
        data = conv.args[0]
        pad = self.lookup_binding(data) if isinstance(data, relax.Var) else None
        attrs = conv.attrs
        if _op_name(pad) != "relax.nn.pad" or attrs.data_layout != "NCHW" or any(int(p) for p in attrs.padding):
            return conv
        widths = [int(w) for w in pad.attrs.pad_width]
        if pad.attrs.pad_mode != "constant" or float(pad.attrs.pad_value) != 0.0 or any(widths[:4]) or min(widths) < 0:
            return conv
        top, bottom, left, right = widths[4:]
        self.folded_pads += 1
        return relax.op.nn.conv2d(
            pad.args[0], conv.args[1], attrs.strides, (top, left, bottom, right), attrs.dilation, attrs.groups,
            attrs.data_layout, attrs.kernel_layout, attrs.out_layout, attrs.out_dtype,
        )

    def _rearranged(self, expr: relax.Expr) -> relax.Call | None:
        """The data movement bound to `expr` if nothing else reads its result."""
        if not isinstance(expr, relax.Var) or self.uses.get(expr, 0) != 1:
            return None
        bound = self.lookup_binding(expr)
        if _op_name(bound) == "relax.concat" and not isinstance(self._tuple(bound.args[0]), relax.Tuple):
            return None  # parts it cannot see: left as it is
        return bound if _op_name(bound) in MOVES else None

    def _tuple(self, expr: relax.Expr) -> relax.Expr | None:
        return self.lookup_binding(expr) if isinstance(expr, relax.Var) else expr

    def _apply_before_moves(self, expr: relax.Expr, activation: relax.Call) -> relax.Expr:
        move = self._rearranged(expr)
        if move is None:
            return self.builder_.emit(relax.Call(activation.op, [expr, *activation.args[1:]], activation.attrs))
        source = move.args[0]
        if _op_name(move) == "relax.concat":
            moved = relax.Tuple([self._apply_before_moves(part, activation) for part in self._tuple(source).fields])
        else:
            moved = self._apply_before_moves(source, activation)
        return self.builder_.emit(relax.Call(move.op, [moved, *move.args[1:]], move.attrs))


def _constant_take(take: relax.Call) -> relax.Expr:
    """take(table, index) of two constants -> the constant it selects (a conditional instance norm's
    scale and shift for its style). Left to legalization, each printed TOPI's warning that its "fast"
    mode segfaults on out-of-bounds indices: 30 lines on every build of a style-transfer net."""
    table, index = take.args
    if not (isinstance(table, GenericConst) and isinstance(index, GenericConst)):
        return take
    axis = take.attrs.axis
    try:
        return relax.const(np.take(table.value.numpy(), index.value.numpy(), axis=None if axis is None else int(axis)))
    except IndexError:  # out of bounds: left as it is
        return take


def _elementwise(call: relax.Call) -> bool:
    """tanh, or a quantize with one scale and zero point for the whole tensor."""
    return all(isinstance(arg, GenericConst) and arg.value.numpy().size == 1 for arg in call.args[1:])


def fuse_friendly(mod: tvm.IRModule) -> tuple[tvm.IRModule, int, int]:
    """`mod` with each tanh applied before the reshapes, transposes and concatenations that feed
    it (where nothing else reads them), zero pads folded into the convolutions they feed, and takes
    of constants folded; returns (module, activations moved, pads folded)."""
    mod, rewriters = _rewrite_functions(mod, _Rewriter)
    return mod, sum(r.moved for r in rewriters), sum(r.folded_pads for r in rewriters)


def _rewrite_functions(mod: tvm.IRModule, make_rewriter) -> tuple[tvm.IRModule, list]:
    """`mod` with each Relax function rewritten by `make_rewriter(mod, uses)` (uses: var -> reads);
    also returns the rewriters, which count what they did."""
    rewriters = []
    for gvar, func in mod.functions_items():
        if isinstance(func, relax.Function):
            counter = _UseCounter()
            counter.visit_expr(func)
            rewriter = make_rewriter(mod, counter.uses)
            rewritten = relax.analysis.remove_all_unused(rewriter.visit_expr(func))
            rewriter.builder_.update_func(gvar, rewritten)
            mod = rewriter.builder_.get()
            rewriters.append(rewriter)
    return mod, rewriters


@relax.expr_functor.mutator
class _SubPixel(relax.PyExprMutator):
    def __init__(self, mod: tvm.IRModule, uses: dict[relax.Var, int]) -> None:
        super().__init__(mod)
        self.uses = uses
        self.rewritten = 0
        self.phases = 0
        # bias add var -> (the transposed conv only it reads, that conv's phase plan)
        self.biased: dict[relax.Var, tuple[relax.Call, tuple]] = {}
        self.held: set[relax.Var] = set()  # those transposed convs: emitted with their bias add

    def visit_function_(self, func: relax.Function) -> relax.Expr:
        bindings = relax.analysis.get_var2val(func)
        for var, value in bindings.items():
            source = value.args[0] if _op_name(value) == "relax.add" else None
            convt = bindings.get(source) if isinstance(source, relax.Var) and self.uses.get(source, 0) == 1 else None
            plan = _phase_plan(convt, bindings.get) if _op_name(convt) == "relax.nn.conv2d_transpose" else None
            if plan is not None:
                out_channels = int(convt.ty.shape.values[1])
                bias_shape = [int(d) for d in value.args[1].ty.shape.values] if value.args[1].ty.shape is not None else []
                if bias_shape == [1, out_channels, 1, 1]:
                    self.biased[var] = (convt, plan)  # the plan's weights are constants: valid after remapping
                    self.held.add(source)
        return super().visit_function_(func)

    def visit_var_binding_(self, binding: relax.VarBinding) -> None:
        if binding.var in self.held:
            return  # emitted phase by phase where its bias add is
        if binding.var not in self.biased:
            super().visit_var_binding_(binding)
            return
        convt, plan = self.biased[binding.var]
        phased = self._interleave(plan, convt, self.visit_expr(convt.args[0]), self.visit_expr(binding.value.args[1]))
        emit = self.builder_.emit if isinstance(binding.var, relax.DataflowVar) else self.builder_.emit_output
        self.set_var_remap(binding.var, emit(phased, binding.var.name))

    def visit_call_(self, call: relax.Call) -> relax.Expr:
        call = super().visit_call_(call)
        if _op_name(call) != "relax.nn.conv2d_transpose":
            return call
        plan = _phase_plan(call, self.lookup_binding)
        return call if plan is None else self._interleave(plan, call, call.args[0], None)

    def _interleave(self, plan, convt: relax.Call, data: relax.Expr, bias: relax.Expr | None) -> relax.Expr:
        """The phase convolutions (each with the bias, when given) and their interleave."""
        phases, kernel_weight, dequantize = plan
        stride = int(convt.attrs.strides[0])
        outputs = []
        for (rows, pad_top, pad_bottom), (cols, pad_left, pad_right) in phases:
            phase_weight = np.ascontiguousarray(kernel_weight[:, :, rows][:, :, :, cols].transpose(1, 0, 2, 3))
            conv = relax.op.nn.conv2d(data, dequantize(phase_weight), (1, 1), (pad_top, pad_left, pad_bottom, pad_right),
                                      out_dtype=convt.attrs.out_dtype)
            outputs.append(self.builder_.emit(conv if bias is None else relax.op.add(conv, bias)))
        n, out_channels, height, width = (int(d) for d in convt.ty.shape.values)
        rows_out, cols_out = height // stride, width // stride
        stacked = relax.op.reshape(relax.op.concat(outputs, axis=1), (n, stride, stride, out_channels, rows_out, cols_out))
        interleaved = relax.op.permute_dims(stacked, [0, 3, 4, 1, 5, 2])
        self.rewritten += 1
        self.phases += len(phases)
        return relax.op.reshape(interleaved, (n, out_channels, height, width))


def _phase_plan(convt: relax.Call, lookup) -> tuple[list, np.ndarray, object] | None:
    """(phases, IOHW weight values, phase weight -> expression) of a stride-s transposed convolution of
    constant (or dequantized int8) weights, or None where the sub-pixel form does not apply."""
    attrs = convt.attrs
    data, weight = convt.args
    if (attrs.data_layout, attrs.kernel_layout, attrs.out_layout) != ("NCHW", "IOHW", "NCHW") or int(attrs.groups) != 1 \
            or any(int(d) != 1 for d in attrs.dilation) or len({int(s) for s in attrs.strides}) != 1:
        return None
    stride = int(attrs.strides[0])
    kernel_weight, dequantize = _constant_weight(weight, lookup)
    shape_in = [int(d) for d in data.ty.shape.values]
    shape_out = [int(d) for d in convt.ty.shape.values]
    if stride < 2 or kernel_weight is None or any(d % stride for d in shape_out[2:]):
        return None
    _, _, kh, kw = kernel_weight.shape
    top, left = int(attrs.padding[0]), int(attrs.padding[1])
    phases = [(subpixel_phase(kh, stride, top, ry, shape_in[2], shape_out[2]),
               subpixel_phase(kw, stride, left, rx, shape_in[3], shape_out[3]))
              for ry in range(stride) for rx in range(stride)]
    if any(not rows or not cols or min(a, b, c, d) < 0 for (rows, a, b), (cols, c, d) in phases):
        return None
    return phases, kernel_weight, dequantize


def _constant_weight(weight: relax.Expr, lookup) -> tuple[np.ndarray | None, object]:
    """The IOHW weight values (int8 when dequantized) and how to make a phase weight an expression again."""
    bound = lookup(weight) if isinstance(weight, relax.Var) else weight
    if isinstance(bound, GenericConst):
        return bound.value.numpy(), lambda phase: relax.const(phase)
    if _op_name(bound) == "relax.dequantize" and isinstance(bound.args[0], GenericConst) \
            and all(isinstance(a, GenericConst) for a in bound.args[1:]):
        scale, zero = bound.args[1:]
        per_channel = scale.value.numpy().size > 1
        if per_channel and int(bound.attrs.axis) != 1:  # an IOHW weight's output channels are axis 1
            return None, None
        return bound.args[0].value.numpy(), lambda phase: relax.op.dequantize(
            relax.const(phase), scale, zero, axis=0 if per_channel else int(bound.attrs.axis),
            out_dtype=str(bound.attrs.out_dtype))
    return None, None


def subpixel_transposed_convs(mod: tvm.IRModule) -> tuple[tvm.IRModule, int, int]:
    """`mod` with every stride-s conv2d_transpose as s*s phase convolutions interleaved;
    also returns how many were rewritten and into how many phases. Grouped, dilated or unevenly strided
    ones stay as they are."""
    rewritten_mod, rewriters = _rewrite_functions(mod, _SubPixel)
    rewritten = sum(r.rewritten for r in rewriters)
    # nothing to rewrite (every registry model): the module as it was, so tuning tasks keep their hashes
    return (rewritten_mod if rewritten else mod), rewritten, sum(r.phases for r in rewriters)
