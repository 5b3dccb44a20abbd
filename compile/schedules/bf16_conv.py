"""A bf16 build's direct convolutions: every float32 conv that Winograd did not take runs as
compile/bf16.py's `vdpbf16ps` block on bf16 pairs of channels, its bias added in the block.

Which convs: constant weights, ungrouped, undilated, stride 1 or 2, NCHW, and output rows at least
as wide as the block's columns (`bf16.conv_block`: 32, or 64 for the 4-channel block RGB outputs get).
"""

from __future__ import annotations

import numpy as np
import tvm
from tvm import relax

from compile import bf16
from compile.schedules.winograd import channel_bias, constant_of, conv_weight, static_shape


def applies(call: relax.Call, weight: np.ndarray | None) -> bool:
    attrs = call.attrs
    if weight is None or weight.dtype != np.float32 or weight.ndim != 4:
        return False
    if (attrs.data_layout, attrs.kernel_layout, attrs.out_layout) != ("NCHW", "OIHW", "NCHW"):
        return False
    strides = {int(s) for s in attrs.strides}
    if int(attrs.groups) != 1 or [int(d) for d in attrs.dilation] != [1, 1] or len(strides) != 1:
        return False
    out_shape = static_shape(call)
    return strides <= set(bf16.CONV_STRIDES) and attrs.out_dtype in ("", "float32") and \
        static_shape(call.args[0]) is not None and out_shape is not None and \
        bf16.conv_block(weight.shape[0], out_shape[3]) is not None


@relax.expr_functor.mutator
class _DirectRewriter(relax.PyExprMutator):
    def __init__(self, mod: tvm.IRModule) -> None:
        super().__init__(mod)
        self.rewritten = 0
        self.kernels: set[relax.GlobalVar] = set()  # the bf16 conv kernels (several convs may share one)

    def visit_call_(self, call: relax.Call) -> relax.Expr:
        call = super().visit_call_(call)
        if isinstance(call.op, tvm.ir.Op) and call.op.name == "relax.add":
            return self._fold_bias(call)
        weight = conv_weight(call, self)
        if not applies(call, weight):
            return call
        self.rewritten += 1
        shape = static_shape(call.args[0])
        padding = tuple(int(p) for p in call.attrs.padding)
        pack = self.builder_.add_func(bf16.pack_input(shape, padding), "bf16_pack_input")
        packed_shape = (shape[0], -(-shape[1] // 2), shape[2] + padding[0] + padding[2], shape[3] + padding[1] + padding[3])
        packed = self.builder_.emit(relax.call_tir(pack, [call.args[0]], relax.TensorType(packed_shape, "uint32")))
        out_shape = static_shape(call)
        block = bf16.conv_block(weight.shape[0], out_shape[3])
        conv = self.builder_.add_func(
            bf16.direct_conv(packed_shape, weight.shape, int(call.attrs.strides[0]), out_shape[2:], block), "bf16_conv2d")
        self.kernels.add(conv)
        args = [packed, relax.const(bf16.pack_conv_weight(weight, block.rows)),
                relax.const(np.zeros(weight.shape[0], np.float32))]
        return relax.call_tir(conv, args, relax.TensorType(out_shape, "float32"))

    def _fold_bias(self, call: relax.Call) -> relax.Expr:
        """add(bf16 conv, constant [1, K, 1, 1]) -> the conv starting its sums from the bias."""
        found = channel_bias(call, self, self.kernels)
        if found is None:
            return call
        conv, bias = found
        packed, weight, folded = conv.args[1].fields
        if np.any(constant_of(folded, self)):  # a second add: leave it
            return call
        return relax.call_tir(conv.args[0], [packed, weight, relax.const(bias)], conv.ty)


def bf16_direct_convs(mod: tvm.IRModule) -> tuple[tvm.IRModule, int]:
    """Rewrite every eligible float32 convolution of `mod`'s Relax functions; returns (module, how many).

    Constants are folded first: a transposed conv's sub-pixel phases slice their weights out of its
    weight in the graph, and only constant weights can be packed for the block."""
    mod = relax.transform.FoldConstant()(mod)
    rewriter = _DirectRewriter(mod)
    for gvar, func in mod.functions_items():
        if isinstance(func, relax.Function):
            rewriter.builder_.update_func(gvar, relax.analysis.remove_all_unused(rewriter.visit_expr(func)))
    return rewriter.builder_.get(), rewriter.rewritten
