"""Reading an imported Relax graph while rewriting it: constant values, static shapes, op calls."""

from __future__ import annotations

import numpy as np
import tvm
from tvm import relax, tirx
from tvm.ir import GenericConst


def is_op(call: relax.Expr, name: str) -> bool:
    return isinstance(call, relax.Call) and isinstance(call.op, tvm.ir.Op) and call.op.name == name


def bound_call(expr: relax.Expr, mutator: relax.PyExprMutator, name: str) -> relax.Call | None:
    """The call of op `name` bound to the variable `expr`, or None."""
    bound = mutator.lookup_binding(expr) if isinstance(expr, relax.Var) else None
    return bound if is_op(bound, name) else None


def constant_of(expr: relax.Expr, mutator: relax.PyExprMutator) -> np.ndarray | None:
    """The values of a constant, looking through bindings and reshapes (the importer reshapes a
    bias to [1, C, 1, 1]); their shape may differ from `expr`'s."""
    while True:
        if isinstance(expr, relax.Var):
            expr = mutator.lookup_binding(expr)
        elif is_op(expr, "relax.reshape"):
            expr = expr.args[0]
        else:
            return expr.value.numpy() if isinstance(expr, GenericConst) else None


def static_shape(expr: relax.Expr) -> tuple[int, ...] | None:
    ty = expr.ty
    if not isinstance(ty, relax.TensorType) or ty.shape is None:
        return None
    dims = list(ty.shape)
    return tuple(int(d) for d in dims) if all(isinstance(d, tirx.IntImm) for d in dims) else None


_INDEX_ARITHMETIC = {"relax.abs": np.abs, "relax.add": np.add, "relax.subtract": np.subtract}


def index_values(expr: relax.Expr, mutator: relax.PyExprMutator) -> np.ndarray | None:
    """The values of an index tensor computed from constants and aranges by abs, add and subtract
    (how torch.export writes a reflection pad's indices); None for anything else."""
    value = constant_of(expr, mutator)
    if value is not None or not isinstance(expr, relax.Var):
        return value
    bound = mutator.lookup_binding(expr)
    if not isinstance(bound, relax.Call) or not isinstance(bound.op, tvm.ir.Op):
        return None
    if bound.op.name == "relax.arange":
        bounds = list(bound.args)
        return np.arange(*(b.value for b in bounds)) if all(isinstance(b, tirx.IntImm) for b in bounds) else None
    operation = _INDEX_ARITHMETIC.get(bound.op.name)
    operands = [index_values(arg, mutator) for arg in bound.args] if operation else [None]
    return None if any(o is None for o in operands) else operation(*operands)


def users_of(func: relax.Function, var2val) -> dict[relax.Var, list]:
    """Var -> the binding vars whose values read it; a var the function returns gets a None user."""
    users: dict[relax.Var, list] = {var: [] for var in var2val}
    for var, value in var2val.items():
        for used in relax.analysis.free_vars(value) if not isinstance(value, relax.Var) else [value]:
            users.setdefault(used, []).append(var)
    for used in relax.analysis.free_vars(func.body.body):
        users.setdefault(used, []).append(None)
    return users


def rewrite_functions(mutator: relax.PyExprMutator, mod: tvm.IRModule) -> tvm.IRModule:
    """`mod` with each of its Relax functions rewritten by `mutator` (made on `mod`), dead bindings dropped."""
    for gvar, func in mod.functions_items():
        if isinstance(func, relax.Function):
            mutator.builder_.update_func(gvar, relax.analysis.remove_all_unused(mutator.visit_expr(func)))
    return mutator.builder_.get()
