"""A bf16 build's direct convolutions: every float32 conv that Winograd did not take runs as
compile/bf16.py's `vdpbf16ps` block on bf16 pairs of channels, its bias added in the block.

Which convs: constant weights, ungrouped, undilated, stride 1 or 2, NCHW, and output rows at least
as wide as the block's columns (`bf16.conv_block`: 32, or 64 for the 4-channel block RGB outputs get),
or rows of 16 or 8 columns, which a block takes several at a time, or narrower outputs of output
channels in 32s, which a block takes in its vectors. On CPUs with AMX-BF16, stride-1
convs with channels in 32s and rows in 16s run on its tiles instead.
"""

from __future__ import annotations

import numpy as np
import tvm
from tvm import relax

from compile import bf16
from compile.schedules.graph import constant_of, static_shape
from compile.schedules.winograd import ConvRewriter, rewrite_convs


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
        bf16.conv_block(weight.shape[0], *out_shape[2:]) is not None


@relax.expr_functor.mutator
class _DirectRewriter(ConvRewriter):
    def __init__(self, mod: tvm.IRModule, on_tiles: bool) -> None:
        super().__init__(mod)
        self.on_tiles = on_tiles

    def accepts(self, call: relax.Call, weight: np.ndarray | None) -> bool:
        return applies(call, weight)

    def rewrite(self, call: relax.Call, weight: np.ndarray) -> relax.Expr:
        shape = static_shape(call.args[0])
        padding = tuple(int(p) for p in call.attrs.padding)
        pack = self.builder_.add_func(bf16.pack_input(shape, padding), "bf16_pack_input")
        packed_shape = (shape[0], -(-shape[1] // 2), shape[2] + padding[0] + padding[2], shape[3] + padding[1] + padding[3])
        packed = self.builder_.emit(relax.call_tir(pack, [call.args[0]], relax.TensorType(packed_shape, "uint32")))
        out_shape = static_shape(call)
        block = bf16.conv_block(weight.shape[0], *out_shape[2:], channels=weight.shape[1],
                                stride=int(call.attrs.strides[0]), on_tiles=self.on_tiles)
        conv = self.builder_.add_func(
            bf16.direct_conv(packed_shape, weight.shape, int(call.attrs.strides[0]), out_shape[2:], block), "bf16_conv2d")
        self.kernels.add(conv)  # several convs may share one kernel: the bias is an argument
        args = [packed, relax.const(bf16.packed_conv_weight(weight, block)),
                relax.const(np.zeros(weight.shape[0], np.float32))]
        return relax.call_tir(conv, args, relax.TensorType(out_shape, "float32"))

    def with_bias(self, add: relax.Call, conv: relax.Call, bias: np.ndarray) -> relax.Expr:
        """The conv starting its sums from the bias."""
        packed, weight, folded = conv.args[1].fields
        if np.any(constant_of(folded, self)):  # a second add: leave it
            return add
        return relax.call_tir(conv.args[0], [packed, weight, relax.const(bias)], conv.ty)


def bf16_direct_convs(mod: tvm.IRModule, on_tiles: bool = False) -> tuple[tvm.IRModule, int]:
    """Rewrite every eligible float32 convolution of `mod`'s Relax functions, `on_tiles` (the target
    has AMX-BF16) on AMX where the conv fits them; returns (module, how many).

    Constants are folded first: only constant weights can be packed for the block, and an imported
    graph may compute a weight from constants (a reshape or transpose of a parameter)."""
    mod = relax.transform.FoldConstant()(mod)
    return rewrite_convs(_DirectRewriter(mod, on_tiles), mod)
