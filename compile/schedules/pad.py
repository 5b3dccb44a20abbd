"""Padding kernels for the float convolutions: zero padding, and reflection padding (a CycleGAN's and
a style-transfer net's every 3x3 and 7x7 conv reads a reflection-padded input).

torch.export writes ReflectionPad2d(p) as two gathers (`take` along the rows, then along the
columns, with index tensors computed from an arange): scalar loads through an index, 0.73 ms for
the teacher's 256x64x64 trunk activations. `reflection_pads` makes each such pair one kernel that
copies every row with one vector load and store and writes the 2p border columns. It takes in a
nearest-neighbour upsampling before the pad (a style-transfer net's decoder: TOPI's resize ran
scalar, 0.45 ms for 32x128x128 outputs). Where a Winograd conv reads the pad, its data transform
reads the unpadded input instead (compile/schedules/winograd.py). The ONNX importer writes a reflect
Pad as TOPI's mirror_pad, whose loops run scalar (0.13 ms for an int8 CycleGAN's 16x134x134 output
pad, fused with its quantize): those become the same kernel (`mirror_pad_width` reads their widths).
Before an int8 direct conv the pad quantizes and stores the conv's packed input itself
(`packed_reflection_pad`, called by compile/int8/lowering.py).
"""

from __future__ import annotations

import numpy as np
import tvm
from tvm import relax, te, tirx, topi
from tvm.s_tir import Schedule
from tvm.script.ir_builder import IRBuilder
from tvm.script.ir_builder import tirx as T

from compile import OPAQUE_PATTERN
from compile.int8.intrinsics import REDUCTION  # channels a packed int8 input interleaves per pixel
from compile.int8.packing import interleaved
from compile.schedules.graph import bound_call, constant_of, index_values, is_op, rewrite_functions, static_shape, users_of


def zero_pad(shape: tuple[int, ...], padding: tuple[int, int, int, int]) -> tirx.PrimFunc:
    """NCHW zero padding (top, left, bottom, right) as its own scheduled kernel: as a Relax pad,
    FuseOps joined it to the instance norm before it, whose channel-parallel schedule then no
    longer applied (0.6 ms instead of 0.05 for a 64x64x64 norm)."""
    top, left, bottom, right = padding
    data = te.placeholder(shape, "float32", name="data")
    padded = topi.nn.pad(data, [0, 0, top, left], [0, 0, bottom, right], name="padded")
    sch = Schedule(te.create_prim_func([data, padded]))
    batch, channel, *_ = sch.get_loops(sch.get_sblock("padded"))
    sch.parallel(sch.fuse(batch, channel))
    scheduled = sch.mod["main"].without_attr("global_symbol")
    # opaque: left injective, FuseOps would join it to its producer again
    return scheduled.with_attr({"tirx.noalias": True, "tirx.is_scheduled": True, "op_pattern": OPAQUE_PATTERN})


def reflect(index, size: int, pad: int = 1):
    """Index into a dimension of `size` of the position `index` of its reflection padding by `pad`
    (position 0 is the first padded one): 0 -> pad, pad -> 0, size + pad -> size - 2."""
    last, position = size - 1, index - pad
    if isinstance(position, int):
        return last - abs(last - abs(position))
    return last - tirx.abs(last - tirx.abs(position))


def mirror_pad_width(func: tirx.PrimFunc) -> int | None:
    """p where `func` reflection-pads an NCHW tensor by p on every side of both spatial axes in one
    block, as the ONNX importer writes a reflect Pad (`topi.nn.mirror_pad(..., "REFLECT")`): read off
    the input index each output position loads. None for any other function."""
    if len(func.params) != 2 or not all(isinstance(p.ty, tirx.BufferType) for p in func.params):
        return None
    source, target = func.params
    store = func.body
    while not isinstance(store, tirx.BufferStore):  # down the block and loop nest to its one store
        store = store.block.body if hasattr(store, "block") else getattr(store, "body", None)
        if store is None:
            return None
    load = store.value
    shapes = [tuple(int(d) for d in p.ty.shape) for p in func.params]
    if not (isinstance(load, tvm.ir.TensorLoad) and load.source.same_as(source) and store.buffer.same_as(target)
            and len(shapes[0]) == len(shapes[1]) == 4 and all(isinstance(i, tirx.Var) for i in store.indices)):
        return None
    analyzer = tvm.sym.Analyzer()
    pads = []
    for position, index, size, padded in zip(store.indices, load.indices, *shapes):
        pad = (padded - size) // 2
        loaded = []
        for p in range(padded):
            analyzer.bind(position, tirx.const(p, str(position.ty)), allow_override=True)
            loaded.append(analyzer.simplify(index))
        if not (0 <= pad < size and padded == size + 2 * pad and all(isinstance(v, tirx.IntImm) for v in loaded)
                and [int(v) for v in loaded] == [reflect(p, size, pad) for p in range(padded)]):
            return None
        pads.append(pad)
    return pads[2] if pads[0] == pads[1] == 0 < pads[2] == pads[3] else None


def reflection_padded(data: relax.Expr, mutator: relax.PyExprMutator) -> tuple[relax.Expr, int] | None:
    """(x, p) where `data` is x reflection-padded by p on each side of both spatial axes, as
    torch.export writes ReflectionPad2d(p); None for anything else."""
    outer = bound_call(data, mutator, "relax.take")
    return None if outer is None else _reflection_of(outer, mutator)


def _reflection_of(outer: relax.Call, mutator: relax.PyExprMutator) -> tuple[relax.Expr, int] | None:
    """(x, p) where the take `outer` and the take it reads reflection-pad x by p."""
    inner = bound_call(outer.args[0], mutator, "relax.take")
    if inner is None:
        return None
    data, shape = inner.args[0], static_shape(inner.args[0])
    if shape is None or len(shape) != 4 or {int(take.attrs.axis) for take in (outer, inner)} != {2, 3}:
        return None
    pads = set()
    for take in (outer, inner):
        size, indices = shape[int(take.attrs.axis)], index_values(take.args[1], mutator)
        pad = None if indices is None else (len(indices) - size) // 2
        if pad is None or not 0 < pad < size or indices.tolist() != [reflect(i, size, pad) for i in range(size + 2 * pad)]:
            return None
        pads.add(pad)
    return (data, pads.pop()) if len(pads) == 1 else None


def reflection_pad(shape: tuple[int, ...], pad: int, scale: int = 1,
                   quantize_to: tuple[float, float] | None = None) -> tirx.PrimFunc:
    """NCHW float32 reflection padding by `pad` on each side, of the input upsampled `scale` times by
    nearest neighbour first (a style-transfer net's upsampling layer): per row one vector load,
    its values repeated by a shuffle into one vector store, and 2 x `pad` border values; rows split
    over the cores. With `quantize_to` = (scale, zero point), each value is stored quantized to
    uint8 as relax.quantize computes it: round(x / scale) + zero point, clipped to [0, 255]."""
    n, channels, height, width = shape
    out_h, out_w = height * scale + 2 * pad, width * scale + 2 * pad

    def stored(value, lanes: int = 1):
        return value if quantize_to is None else _quantized(value, quantize_to, lanes)

    with IRBuilder() as ib, T.prim_func(private=True):
        T.func_attr({"tirx.noalias": True, "tirx.is_scheduled": True, "op_pattern": OPAQUE_PATTERN})
        x = T.arg("x", T.buffer(shape, "float32"))
        out = T.arg("out", T.buffer((n, channels, out_h, out_w), "float32" if quantize_to is None else "uint8"))
        with T.sblock("root"), T.parallel(0, n * channels * out_h) as task:
            b, c, y = task // (channels * out_h), task // out_h % channels, task % out_h
            source = [b, c, reflect(y, height * scale, pad) // scale]
            row = tirx.BufferLoad(x, [*source, tirx.Ramp(0, 1, width)])
            if scale > 1:
                row = tirx.Shuffle([row] * scale, [column // scale for column in range(width * scale)])
            T.buffer_store(out, stored(row, width * scale), [b, c, y, tirx.Ramp(pad, 1, width * scale)])
            for column in [*range(pad), *range(width * scale + pad, out_w)]:
                value = x[(*source, reflect(column, width * scale, pad) // scale)]
                T.buffer_store(out, stored(value), [b, c, y, column])
    return ib.get()


def _quantized(value, quantize_to: tuple[float, float], lanes: int = 1):
    """`value` (float32, `lanes` of them) quantized to uint8 as relax.quantize computes it: round(x / scale)
    + zero point, clipped to [0, 255]."""
    def const(v: float):
        return tirx.const(v, "float32") if lanes == 1 else tirx.Broadcast(tirx.const(v, "float32"), lanes)
    step, zero_point = quantize_to
    quantized = tirx.max(tirx.min(tirx.round(value / const(step)) + const(zero_point), const(255.0)), const(0.0))
    return quantized.astype("uint8" if lanes == 1 else f"uint8x{lanes}")


def packed_reflection_pad(shape: tuple[int, ...], pad: int, scale: int, quantize_to: tuple[float, float],
                          packed_shape: tuple[int, ...], quantized_input: bool = False) -> tirx.PrimFunc:
    """`reflection_pad` quantizing to uint8 and storing straight into an integer conv's packed input
    (compile/int8/lowering.py `packed_input_shape`): (N, C/4, rows, [1,] columns, 4), each pixel's 4
    channels side by side. Per row of a group of 4 channels: each chunk of up to 16 columns is 4
    vector loads (one per channel, repeated by a shuffle where upsampled), quantized, interleaved by
    one shuffle into a single store; the 2 x `pad` border columns are stored one value at a time.
    Channels past C (an RGB input's fourth) and columns past the padded row (the conv's whole
    tiles) get the zero point, which the conv reads as zero. With `quantized_input` the input holds
    the uint8 values already (quantized by the kernel before, as a pad commutes with the quantize):
    the pad only copies them."""
    n, channels, height, width = shape
    inner_w = width * scale
    out_h, out_w = height * scale + 2 * pad, inner_w + 2 * pad
    c_blocks, rows, columns = packed_shape[1], packed_shape[2], packed_shape[-2]
    if packed_shape[-1] != REDUCTION or rows != out_h or columns < out_w or c_blocks * REDUCTION < channels:
        raise ValueError(f"packed layout {packed_shape} does not hold a {shape} input reflection-padded by {pad}")
    # columns a step: whole chunks of the row, of whole upsampled pixels
    chunk = next((c for c in (16, 8, 4, 2) if inner_w % c == 0 and c % scale == 0), scale)
    zero = tirx.const(int(quantize_to[1]), "uint8")  # the conv reads it as zero
    row_bytes = columns * REDUCTION

    with IRBuilder() as ib, T.prim_func(private=True):
        T.func_attr({"tirx.noalias": True, "tirx.is_scheduled": True, "op_pattern": OPAQUE_PATTERN})
        x = T.arg("x", T.buffer(shape, "uint8" if quantized_input else "float32"))
        out = T.arg("out", T.buffer(packed_shape, "uint8"))
        with T.sblock("root"):
            flat = T.decl_buffer((int(np.prod(packed_shape)),), "uint8", data=out.data)  # each row one span
            with T.parallel(0, n * c_blocks * out_h) as task:
                b, cb, y = task // (c_blocks * out_h), task // out_h % c_blocks, task % out_h
                source_row = reflect(y, height * scale, pad) // scale
                row_start = task * row_bytes

                def channel_values(ci: int, column, lanes: int):
                    """Channel cb * 4 + ci quantized at `column` of the source row (`lanes` from there)."""
                    c = cb * REDUCTION + ci
                    loaded = tirx.BufferLoad(x, [b, tirx.min(c, channels - 1), source_row,
                                                column if lanes == 1 else tirx.Ramp(column, 1, lanes)])
                    values = loaded if quantized_input else _quantized(loaded, quantize_to, lanes)
                    if c_blocks * REDUCTION == channels:
                        return values
                    return tirx.Select(c < channels, values, zero if lanes == 1 else tirx.Broadcast(zero, lanes))

                with T.serial(0, inner_w // chunk) as j:
                    groups = [channel_values(ci, j * (chunk // scale), chunk // scale) for ci in range(REDUCTION)]
                    if scale > 1:
                        groups = [tirx.Shuffle([g] * scale, [k // scale for k in range(chunk)]) for g in groups]
                    T.buffer_store(flat, interleaved(groups, chunk),
                                   [tirx.Ramp(row_start + (pad + j * chunk) * REDUCTION, 1, chunk * REDUCTION)])
                for column in [*range(pad), *range(inner_w + pad, out_w)]:
                    source = reflect(column, inner_w, pad) // scale
                    for ci in range(REDUCTION):
                        T.buffer_store(flat, channel_values(ci, source, 1), [row_start + column * REDUCTION + ci])
                if columns > out_w:
                    tail = (columns - out_w) * REDUCTION
                    T.buffer_store(flat, tirx.Broadcast(zero, tail),
                                   [tirx.Ramp(row_start + out_w * REDUCTION, 1, tail)])
    return ib.get()


# Where nearest-neighbour resizing samples an input of size n at output positions 0..s*n-1, by its
# coordinate transformation: each must be position // s for `nearest_upsampled` to take it.
_SOURCE_POSITION = {
    "asymmetric": lambda dst, scale: dst / scale,
    "half_pixel": lambda dst, scale: (dst + 0.5) / scale - 0.5,
    "pytorch_half_pixel": lambda dst, scale: (dst + 0.5) / scale - 0.5,
}


def nearest_upsampled(data: relax.Expr, mutator: relax.PyExprMutator) -> tuple[relax.Expr, int] | None:
    """(x, s) where `data` is NCHW x resized by nearest neighbour to s times its height and width
    with every output pixel copying input pixel (y // s, x // s), as torch's Upsample(scale_factor=s)
    is imported; None for anything else."""
    resize = bound_call(data, mutator, "relax.image.resize2d")
    if resize is None:
        return None
    attrs, source, out_shape = resize.attrs, resize.args[0], static_shape(data)
    in_shape = static_shape(source)
    position = _SOURCE_POSITION.get(str(attrs.coordinate_transformation_mode))
    if in_shape is None or out_shape is None or attrs.method != "nearest_neighbor" or attrs.layout != "NCHW" \
            or position is None or out_shape[2] % in_shape[2] or out_shape[2] // in_shape[2] * in_shape[3] != out_shape[3]:
        return None
    scale = out_shape[2] // in_shape[2]
    dst = np.arange(max(out_shape[2:]), dtype=np.float64)
    exact = np.clip(position(dst, scale), 0, None)
    # every rounding mode agrees where no position falls halfway; halfway ones must round down
    rounded = np.floor(exact) if attrs.rounding_method == "floor" else np.ceil(exact - 0.5)
    halfway = np.any(exact - np.floor(exact) == 0.5) and attrs.rounding_method not in ("floor", "round_prefer_floor")
    return (source, scale) if scale > 1 and not halfway and np.array_equal(rounded, dst // scale) else None


@relax.expr_functor.mutator
class _ReflectionPads(relax.PyExprMutator):
    def __init__(self, mod: tvm.IRModule) -> None:
        super().__init__(mod)
        self.replaced = 0
        self.pads: dict[relax.GlobalVar, tuple] = {}  # each kernel made here: (its input, pad, upsampling)
        self.users = {var: users for func in mod.functions.values() if isinstance(func, relax.Function)
                      for var, users in users_of(func, relax.analysis.get_var2val(func)).items()}

    def visit_call_(self, call: relax.Call) -> relax.Expr:
        original, call = call, super().visit_call_(call)
        if is_op(call, "relax.quantize"):
            return self._quantized_pad(original, call)
        found = reflection_padding(call, self)
        if found is None:
            return call
        data, pad, scale = found
        kernel = self.builder_.add_func(reflection_pad(static_shape(data), pad, scale), "reflection_pad")
        self.pads[kernel] = (data, pad, scale)
        self.replaced += 1
        return relax.call_tir(kernel, [data], call.ty)

    def _quantized_pad(self, original: relax.Call, call: relax.Call) -> relax.Expr:
        """A uint8 quantize with one scale and zero point of a pad made here, and read by nothing else
        (an int8 file's QDQ pair before a conv): the pad kernel quantizes as it stores."""
        padded = bound_call(call.args[0], self, "relax.call_tir")
        found = self.pads.get(padded.args[0]) if padded is not None else None
        quantize_to = uint8_quantization(call, self)
        if found is None or len(self.users.get(original.args[0], [])) != 1 or quantize_to is None:
            return call
        data, pad, scale = found
        kernel = self.builder_.add_func(reflection_pad(static_shape(data), pad, scale, quantize_to), "reflection_pad")
        return relax.call_tir(kernel, [data], call.ty)


def reflection_padding(call: relax.Call, mutator: relax.PyExprMutator) -> tuple[relax.Expr, int, int] | None:
    """(x, p, s) where `call` reflection-pads x by p on each side of both spatial axes, x first
    upsampled s times by nearest neighbour (s = 1: not upsampled), as torch.export writes it (two
    takes) or the ONNX importer (TOPI's mirror_pad); None for anything else."""
    found = None
    if is_op(call, "relax.take"):
        found = _reflection_of(call, mutator)
    elif is_op(call, "relax.call_tir") and len(call.args[1].fields) == 1:
        callee = mutator.builder_.get()[call.args[0]]
        pad = mirror_pad_width(callee) if isinstance(callee, tirx.PrimFunc) else None
        found = None if pad is None else (call.args[1].fields[0], pad)
    if found is None:
        return None
    data, pad = found
    upsampled = nearest_upsampled(data, mutator)
    return (data, pad, 1) if upsampled is None else (upsampled[0], pad, upsampled[1])


def uint8_quantization(call: relax.Call, mutator: relax.PyExprMutator) -> tuple[float, float] | None:
    """(scale, zero point) of a quantize to uint8 with one of each; None for anything else."""
    step, zero_point = (constant_of(arg, mutator) for arg in call.args[1:3])
    if call.attrs.out_dtype != "uint8" or step is None or zero_point is None or step.size != 1 or zero_point.size != 1:
        return None
    return float(step.reshape(-1)[0]), float(zero_point.reshape(-1)[0])


def reflection_pads(mod: tvm.IRModule) -> tuple[tvm.IRModule, int]:
    """`mod` with each reflection pad its importer wrote as two takes (torch.export) or as TOPI's
    scalar mirror_pad (the ONNX importer) made one `reflection_pad` kernel; returns (module, how many)."""
    rewriter = _ReflectionPads(mod)
    return rewrite_functions(rewriter, mod), rewriter.replaced
