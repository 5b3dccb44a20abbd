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
"""

from __future__ import annotations

import tvm
from tvm import relax

ACTIVATIONS = ("relax.tanh",)
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
        if name not in ACTIVATIONS or self._rearranged(call.args[0]) is None:
            return call
        self.moved += 1
        return self._apply_before_moves(call.args[0], call.op)

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

    def _apply_before_moves(self, expr: relax.Expr, activation: tvm.ir.Op) -> relax.Expr:
        move = self._rearranged(expr)
        if move is None:
            return self.builder_.emit(relax.Call(activation, [expr]))
        source = move.args[0]
        if _op_name(move) == "relax.concat":
            moved = relax.Tuple([self._apply_before_moves(part, activation) for part in self._tuple(source).fields])
        else:
            moved = self._apply_before_moves(source, activation)
        return self.builder_.emit(relax.Call(move.op, [moved, *move.args[1:]], move.attrs))


def fuse_friendly(mod: tvm.IRModule) -> tuple[tvm.IRModule, int, int]:
    """`mod` with each tanh applied before the reshapes, transposes and concatenations that feed
    it (where nothing else reads them), and zero pads folded into the convolutions they feed;
    returns (module, activations moved, pads folded)."""
    moved = folded = 0
    for gvar, func in mod.functions_items():
        if isinstance(func, relax.Function):
            counter = _UseCounter()
            counter.visit_expr(func)
            rewriter = _Rewriter(mod, counter.uses)
            rewritten = relax.analysis.remove_all_unused(rewriter.visit_expr(func))
            rewriter.builder_.update_func(gvar, rewritten)
            mod = rewriter.builder_.get()
            moved, folded = moved + rewriter.moved, folded + rewriter.folded_pads
    return mod, moved, folded
