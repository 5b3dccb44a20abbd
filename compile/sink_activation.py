"""Move an output activation (tanh) ahead of the data movement that precedes it.

A U-Net's last transposed convolution is imported as sub-pixel phase convolutions whose outputs
are concatenated and interleaved (reshape, permute_dims, reshape), and only then comes tanh.
FuseOps joins tanh to the interleave, whose gathers keep the kernel scalar: 0.7 ms for the
3x128x128 output, 14 ns a value. tanh of a rearrangement is the rearrangement of tanh, so applied
to the phase outputs it becomes each convolution's vectorized epilogue instead.
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
class _ActivationSinker(relax.PyExprMutator):
    def __init__(self, mod: tvm.IRModule, uses: dict[relax.Var, int]) -> None:
        super().__init__(mod)
        self.uses = uses
        self.moved = 0

    def visit_call_(self, call: relax.Call) -> relax.Expr:
        call = super().visit_call_(call)
        name = _op_name(call)
        if name not in ACTIVATIONS or self._rearranged(call.args[0]) is None:
            return call
        self.moved += 1
        return self._apply_before_moves(call.args[0], call.op)

    def _rearranged(self, expr: relax.Expr) -> relax.Call | None:
        """The data movement bound to `expr` if nothing else reads its result."""
        if not isinstance(expr, relax.Var) or self.uses.get(expr, 0) != 1:
            return None
        bound = self.lookup_binding(expr)
        return bound if _op_name(bound) in MOVES else None

    def _apply_before_moves(self, expr: relax.Expr, activation: tvm.ir.Op) -> relax.Expr:
        move = self._rearranged(expr)
        if move is None:
            return self.builder_.emit(relax.Call(activation, [expr]))
        source = move.args[0]
        if _op_name(move) == "relax.concat":
            parts = self.lookup_binding(source) if isinstance(source, relax.Var) else source
            moved = relax.Tuple([self._apply_before_moves(part, activation) for part in parts.fields])
        else:
            moved = self._apply_before_moves(source, activation)
        return self.builder_.emit(relax.Call(move.op, [moved, *move.args[1:]], move.attrs))


def sink_activations(mod: tvm.IRModule) -> tuple[tvm.IRModule, int]:
    """`mod` with each tanh applied before the reshapes, transposes and concatenations that feed
    it (where nothing else reads them); returns (module, how many activations moved)."""
    moved = 0
    for gvar, func in mod.functions_items():
        if isinstance(func, relax.Function):
            counter = _UseCounter()
            counter.visit_expr(func)
            sinker = _ActivationSinker(mod, counter.uses)
            rewritten = relax.analysis.remove_all_unused(sinker.visit_expr(func))
            sinker.builder_.update_func(gvar, rewritten)
            mod = sinker.builder_.get()
            moved += sinker.moved
    return mod, moved
