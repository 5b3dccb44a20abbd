"""The "c" backend: Relax -> a plain C project for microcontrollers, TVM-generated kernels plus a static driver.

microTVM and TVM's AOT executor are gone upstream, so the suite lowers the model itself. Relax's
legalised, fused `main` is a fixed sequence of kernel calls at static shapes; this module turns it
into C with no TVM runtime underneath:

- kernels.c: the fused PrimFuncs compiled by TVM's C backend. They keep TVM's packed calling
  convention (an array of TVMFFIAny holding DLTensor pointers), which needs nothing but the
  header definitions of those structs and, for kernels that still want scratch memory, a LIFO
  workspace allocator (tvm_shim.c).
- model.c: weights as `const` arrays (flash), one static activation arena laid out by a
  lifetime-based planner (a buffer's bytes are reused once it is dead), DLTensor descriptors and
  argument arrays (const), and `model_run(input, output)` calling the kernels in order.

Legalised kernels materialise every intermediate (padded inputs, un-fused conv accumulators,
instance-norm temporaries) as a workspace as large as the tensor. `schedule_for_mcu` inlines the
elementwise ones and computes reductions where their consumers need them, so those shrink to a
scalar or a per-channel vector; `merge_into_consumers` does the same across kernels for data
movement (gathers, shuffles) and dequantization.

int8 QDQ models are imported from their ONNX file and rewritten to integer convolutions first
(compile/int8/fixed_point.py).
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import re
import shutil
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import numpy as np
import tvm
import tvm_ffi
from tvm import relax, s_tir, tirx

from compile import NATIVE_CONV, OPAQUE_PATTERN
from compile.backends import register
from compile.int8 import fixed_point, match
from compile.int8.fixed_point import integer_convolutions
from compile.onnx_import import graph_inputs, load_onnx, onnx_to_relax, quantize_before_padding
from compile.pipeline import ModelUnderTest
from errors import UserError
from targets import ResolvedTarget
from targets.mcu import MODEL_SOURCES, CExport
from targets.tensors import TensorInfo

ALIGNMENT = 16  # bytes; every arena buffer starts on this boundary (vector loads, DMA)
C_TYPES = {"float32": "float", "int8": "int8_t", "uint8": "uint8_t", "int16": "int16_t", "int32": "int32_t",
           "int64": "int64_t", "bool": "uint8_t"}
DL_CODES = {"int": "kDLInt", "uint": "kDLUInt", "float": "kDLFloat", "bool": "kDLBool"}
# The headers the generated kernels include, copied into the project so it builds without TVM.
KERNEL_HEADERS = {
    "tvm/ffi/c_api.h": ("tvm_ffi", "include/tvm/ffi/c_api.h"),
    "tvm/ffi/extra/c_env_api.h": ("tvm_ffi", "include/tvm/ffi/extra/c_env_api.h"),
    "dlpack/dlpack.h": ("tvm_ffi", "include/dlpack/dlpack.h"),
    "tvm/runtime/base.h": ("tvm", "include/tvm/runtime/base.h"),
    "tvm/runtime/c_backend_api.h": ("tvm", "include/tvm/runtime/c_backend_api.h"),
}
# Hand-written C copied into exports: the kernels, and the shim that is all the runtime TVM's kernels need.
NATIVE_KERNELS_DIR = Path(__file__).resolve().parent.parent / "mcu_kernels"
NATIVE_SOURCES = ("conv2d_s8.c", "conv2d_s8.h", "mcu_math.h", "tvm_shim.c")
EXPORT_MANIFEST = "export.json"  # what the export holds and the key it was made under


# ----------------------------------------------------------------------------- memory planning


@dataclass(frozen=True)
class Lifetime:
    """An intermediate tensor: written by step `first`, last read by step `last` (inclusive)."""

    name: str
    nbytes: int
    first: int
    last: int


@dataclass(frozen=True)
class MemoryPlan:
    offsets: dict[str, int]
    arena_bytes: int
    peak_live_bytes: int  # the most bytes alive at one step: no plan can use less

    def overlaps(self, a: Lifetime, b: Lifetime) -> bool:
        """Whether two planned buffers share arena bytes."""
        return self.offsets[a.name] < self.offsets[b.name] + b.nbytes and self.offsets[b.name] < self.offsets[a.name] + a.nbytes


def aligned(nbytes: int, alignment: int = ALIGNMENT) -> int:
    return -(-nbytes // alignment) * alignment


def plan_memory(buffers: list[Lifetime], alignment: int = ALIGNMENT) -> MemoryPlan:
    """Lay buffers out in one arena so that buffers alive at the same step never share bytes.

    Greedy placement (each buffer at the lowest offset free for its whole lifetime, a step's
    inputs and output count as alive together), tried in a few orders (largest first, largest
    size x lifetime first, longest-lived first); the smallest arena wins. Dead buffers' bytes are
    reused, so the arena tracks the peak of live bytes rather than their sum.
    """
    for buffer in buffers:
        if buffer.first > buffer.last or buffer.nbytes < 0:
            raise ValueError(f"buffer {buffer.name}: invalid lifetime [{buffer.first}, {buffer.last}] or size")
    orders = (
        lambda b: (-b.nbytes, b.first, b.name),
        lambda b: (-b.nbytes * (b.last - b.first + 1), b.first, b.name),
        lambda b: (b.first - b.last, -b.nbytes, b.name),
    )
    offsets = min((_place(sorted(buffers, key=order), alignment) for order in orders),
                  key=lambda placed: _arena_of(buffers, placed, alignment))
    steps = {step for b in buffers for step in (b.first, b.last)}
    peak = max((sum(aligned(b.nbytes, alignment) for b in buffers if b.first <= step <= b.last) for step in steps),
               default=0)
    return MemoryPlan(offsets=offsets, arena_bytes=_arena_of(buffers, offsets, alignment), peak_live_bytes=peak)


def _place(ordered: list[Lifetime], alignment: int) -> dict[str, int]:
    placed: list[tuple[Lifetime, int]] = []
    offsets: dict[str, int] = {}
    for buffer in ordered:
        busy = sorted((offset, offset + aligned(other.nbytes, alignment)) for other, offset in placed
                      if other.first <= buffer.last and buffer.first <= other.last)
        offset = 0
        for start, end in busy:
            if offset + buffer.nbytes <= start:
                break
            offset = max(offset, end)
        offsets[buffer.name] = offset
        placed.append((buffer, offset))
    return offsets


def _arena_of(buffers: list[Lifetime], offsets: dict[str, int], alignment: int) -> int:
    return max((offsets[b.name] + aligned(b.nbytes, alignment) for b in buffers), default=0)


# ----------------------------------------------------------------------------- lowering


def fold_constants(mod: tvm.IRModule) -> tvm.IRModule:
    """Evaluate every kernel call whose inputs are all constants, in one LLVM build.

    Relax's FoldConstant builds each foldable call separately, which on the reflection-pad index
    arithmetic torch.export emits (~150 tiny calls) takes ~30 s; one build of all of them takes seconds.
    """
    main = mod["main"]
    bindings = [b for block in main.body.blocks for b in block.bindings]
    constant_vars: set = set()
    foldable = []
    for binding in bindings:
        value = binding.value
        if (_is_constant(value, constant_vars) or _is_call_tir(value)
                and all(_is_constant(arg, constant_vars) for arg in value.args[1].fields)):
            foldable.append(binding)
            constant_vars.add(binding.var)
    if not foldable:
        return mod
    used_later = set()
    for binding in bindings:
        if binding.var not in constant_vars:
            used_later.update(v for v in relax.analysis.free_vars(binding.value) if v in constant_vars)
    used_later.update(v for v in relax.analysis.free_vars(main.body.body) if v in constant_vars)
    needed = [b.var for b in foldable if b.var in used_later]
    if not needed:
        return mod
    result = relax.Var("folded", relax.TupleType([v.ty for v in needed]))
    block = relax.DataflowBlock([*foldable, relax.VarBinding(result, relax.Tuple(needed))])
    evaluate = relax.Function([], relax.SeqExpr([block], result), ret_ty=result.ty, is_pure=True)
    kernels = {b.value.args[0] for b in foldable if _is_call_tir(b.value)}
    evaluator = tvm.IRModule({gvar: mod[gvar] for gvar in kernels})  # only what folding runs: codegen is the cost
    evaluator["main"] = evaluate
    executable = tvm.compile(evaluator, tvm.target.Target({"kind": "llvm"}),
                             relax_pipeline=relax.pipeline.default_build_pipeline())
    values = relax.VirtualMachine(executable, tvm.cpu())["main"]()
    substitution = {var: relax.const(values[i].numpy(), var.ty.dtype) for i, var in enumerate(needed)}
    folded = mod.clone()
    folded["main"] = _Substitute(substitution).visit_expr(main)
    return relax.transform.DeadCodeElimination()(folded)


INLINE_ATTR = "mcu_inline_into_consumers"
MAX_UNROLLED_TAPS = 49  # a 7x7 window: unrolled, each tap's index arithmetic folds into constants


def keep_dequantize_unfused(mod: tvm.IRModule) -> tvm.IRModule:
    """Mark integer-code -> float kernels (dequantize) opaque so FuseOps leaves them standalone.

    Otherwise FuseOps makes dequantize the epilogue of the integer conv before it, and the conv
    writes its output as float (4 bytes per element) instead of uint8. `merge_into_consumers`
    later computes the dequantize inside each consumer instead.
    """
    mod = mod.clone()
    for gvar, func in list(mod.functions_items()):
        if isinstance(func, tirx.PrimFunc) and _dequantizes(func):
            mod[gvar] = func.with_attr("op_pattern", OPAQUE_PATTERN).with_attr(INLINE_ATTR, True)
    return mod


def _dequantizes(func: tirx.PrimFunc) -> bool:
    buffers = [p.ty for p in func.params if isinstance(p.ty, tirx.BufferType)]
    if len(buffers) < 2 or str(buffers[-1].dtype) != "float32" or str(buffers[0].dtype) not in ("int8", "uint8"):
        return False
    pattern = func.attrs.get("op_pattern") if func.attrs is not None else None
    return pattern is not None and int(pattern) <= 1 and _spatial_stores(func) is not None


def _spatial_stores(func: tirx.PrimFunc) -> list | None:
    """The stored values of a kernel made only of spatial blocks, or None if it reduces or nests blocks."""
    sch = s_tir.Schedule(func)
    values = []
    for block_rv in sch.get_child_blocks(sch.get_sblock("root")):
        block = sch.get(block_rv)
        if any(iv.iter_type != 0 for iv in block.iter_vars) or not isinstance(block.body, tirx.BufferStore):
            return None
        values.append(block.body.value)
    return values


def _moves_data(func: tirx.PrimFunc) -> bool:
    """A kernel that only copies, gathers or pads (values are loads, selected by index conditions)."""
    def movement(expr) -> bool:
        if isinstance(expr, (tvm.ir.expr.TensorLoad, tirx.IntImm, tirx.FloatImm)):
            return True
        if isinstance(expr, tirx.Select):
            return movement(expr.true_value) and movement(expr.false_value)
        if isinstance(expr, tvm.ir.Call) and getattr(expr.op, "name", "").endswith(".if_then_else"):
            return movement(expr.args[1]) and movement(expr.args[2])
        return False

    values = _spatial_stores(func)
    return values is not None and all(movement(v) for v in values)


def merge_into_consumers(mod: tvm.IRModule, pads_into_reductions: bool = False) -> tvm.IRModule:
    """After FuseOps: compute cheap kernels inside their consumers, so their outputs never exist in RAM.

    A kernel that only moves data (gathers, the sub-pixel shuffle) or dequantizes (marked by
    `keep_dequantize_unfused`) and is read only by kernels is grouped into each consumer's
    primitive function; FuseTIR then makes one kernel of both and `schedule_for_mcu` inlines the
    cheap part. Repeating it costs next to nothing, except for padding read by a convolution:
    every tap then recomputes the (reflection) index, about 1.2x (fp32) to 1.8x (int8) the
    instructions, for one activation-sized buffer less. Padding goes into reductions only with
    `pads_into_reductions`, the choice for a model that would not fit in RAM otherwise.
    """
    known: dict = {}  # (question, PrimFunc name) -> answer: a Schedule per query is slow
    while True:
        main = mod["main"]
        if len(main.body.blocks) != 1:
            return mod
        bindings = list(main.body.blocks[0].bindings)
        readers: dict = {}
        for index, binding in enumerate(bindings):
            for var in relax.analysis.free_vars(binding.value):
                readers.setdefault(var, []).append(index)
        merged = None
        for index, binding in enumerate(bindings):
            consumers = readers.get(binding.var, [])
            if not consumers or any(_kernel_function(mod, bindings[c].value) is None for c in consumers):
                continue
            if _cheap(mod, binding.value, known) and (pads_into_reductions or not _pads(mod, binding.value, known)
                                                      or all(_spatial(mod, bindings[c].value, known) for c in consumers)):
                merged = index, consumers
                break
        if merged is None:
            return mod
        index, consumers = merged
        builder = relax.BlockBuilder(mod)
        producer_func, producer_args = _kernel_function(mod, bindings[index].value)
        new_bindings = []
        for position, binding in enumerate(bindings):
            if position == index:
                continue
            if position in consumers:
                consumer_func, consumer_args = _kernel_function(mod, binding.value)
                func, args = _compose(producer_func, producer_args, consumer_func, consumer_args, bindings[index].var)
                binding = relax.VarBinding(binding.var, relax.Call(builder.add_func(func, "merged"), args))
            new_bindings.append(binding)
        block = relax.DataflowBlock(new_bindings)
        builder.update_func(builder.get().get_global_var("main"), relax.Function(
            main.params, relax.SeqExpr([block], main.body.body), main.ret_ty, main.is_pure, main.attrs))
        mod = builder.get()


def _inner_kernels(mod: tvm.IRModule, value) -> list[tuple[str, tirx.PrimFunc]]:
    kernels = _kernel_function(mod, value)
    if kernels is None:
        return []
    return [(b.value.args[0].name_hint, mod[b.value.args[0]]) for b in kernels[0].body.blocks[0].bindings]


def _every_kernel(mod: tvm.IRModule, value, known: dict, question: str, answer: Callable[[tirx.PrimFunc], bool]) -> bool:
    prims = _inner_kernels(mod, value)
    for name, prim in prims:
        if (question, name) not in known:
            known[question, name] = answer(prim)
    return bool(prims) and all(known[question, name] for name, _ in prims)


def _cheap(mod: tvm.IRModule, value, known: dict) -> bool:
    """Data movement or dequantize: worth repeating inside every consumer."""
    return _every_kernel(mod, value, known, "cheap", lambda prim: bool(
        prim.attrs is not None and prim.attrs.get(INLINE_ATTR)) or _moves_data(prim))


def _spatial(mod: tvm.IRModule, value, known: dict) -> bool:
    """No reduction anywhere: each output element reads its inputs a bounded number of times."""
    return _every_kernel(mod, value, known, "spatial", lambda prim: _spatial_stores(prim) is not None)


def _pads(mod: tvm.IRModule, value, known: dict) -> bool:
    """Writes more elements than it reads (a padding), rather than as many (a copy, gather or shuffle)."""
    def elements(buffer) -> int:
        return int(np.prod([int(d) for d in buffer.shape]))

    def pads(prim: tirx.PrimFunc) -> bool:
        buffers = [p.ty for p in prim.params if isinstance(p.ty, tirx.BufferType)]
        return elements(buffers[-1]) > sum(elements(b) for b in buffers[:-1])

    return not _every_kernel(mod, value, known, "copies", lambda prim: not pads(prim))


def _kernel_function(mod: tvm.IRModule, value) -> tuple[relax.Function, list] | None:
    """A kernel call as (primitive function of call_tir bindings, call arguments), else None."""
    if _is_call_tir(value):
        if len(value.args) > 2:
            return None
        args = list(value.args[1].fields)
        params = [relax.Var(f"p{i}", arg.ty) for i, arg in enumerate(args)]
        out = relax.Var("out", value.ty)
        body = relax.SeqExpr([relax.DataflowBlock([relax.VarBinding(
            out, relax.op.call_tir(value.args[0], relax.Tuple(params), value.ty))])], out)
        return relax.Function(params, body, value.ty, True).with_attr("Primitive", True), args
    if isinstance(value, relax.Call) and isinstance(value.op, tvm.ir.GlobalVar):
        func = mod[value.op]
        if isinstance(func, relax.Function) and func.attrs is not None and func.attrs.get("Primitive"):
            if len(func.body.blocks) == 1 and all(_is_call_tir(b.value) for b in func.body.blocks[0].bindings):
                return func, list(value.args)
    return None


def _compose(producer: relax.Function, producer_args: list, consumer: relax.Function, consumer_args: list,
             produced) -> tuple[relax.Function, list]:
    """One primitive function computing the producer, then the consumer reading its result."""
    producer = relax.utils.copy_with_new_vars(producer)
    consumer = relax.utils.copy_with_new_vars(consumer)
    inner = list(producer.body.blocks[0].bindings)
    replaced = {param: producer.body.body for param, arg in zip(consumer.params, consumer_args) if arg.same_as(produced)}
    kept = [(param, arg) for param, arg in zip(consumer.params, consumer_args) if not arg.same_as(produced)]
    body = _Substitute(replaced).visit_expr(consumer.body)
    seq = relax.SeqExpr([relax.DataflowBlock([*inner, *body.blocks[0].bindings])], body.body)
    params = [*producer.params, *(param for param, _ in kept)]
    func = relax.Function(params, seq, consumer.ret_ty, True).with_attr("Primitive", True)
    return func, [*producer_args, *(arg for _, arg in kept)]


@relax.expr_functor.mutator
class _Substitute(relax.PyExprMutator):
    def __init__(self, values: dict):
        super().__init__()
        self.values = values

    def visit_dataflow_var_(self, var):
        return self.values.get(var, var)

    def visit_var_(self, var):
        return self.values.get(var, var)


def _is_native_call(expr) -> bool:
    """A call of the hand-written MCU convolution (compile/int8/fixed_point.py's `call_dps_packed(NATIVE_CONV, ...)`)."""
    return (isinstance(expr, relax.Call) and isinstance(expr.op, tvm.ir.Op) and expr.op.name == "relax.call_dps_packed"
            and isinstance(expr.args[0], relax.ExternFunc) and expr.args[0].global_symbol == NATIVE_CONV)


def _is_call_tir(expr) -> bool:
    return isinstance(expr, relax.Call) and isinstance(expr.op, tvm.ir.Op) and expr.op.name == "relax.call_tir"


def _is_constant(expr, constant_vars: set) -> bool:
    return isinstance(expr, tvm.ir.GenericConst) or (isinstance(expr, relax.Var) and expr in constant_vars)


def schedule_for_mcu(func: tirx.PrimFunc) -> tirx.PrimFunc:
    """Shrink a legalised kernel's intermediates, then unroll convolution windows.

    Elementwise blocks are inlined. A reduction feeding one consumer is moved under the
    consumer's deepest loop whose variable its read depends on: a conv accumulator (read per
    pixel) becomes a scalar, instance-norm statistics (read per channel) a value per channel,
    without recomputation. Small constant reduction loops (the kernel window, up to 7x7) are
    unrolled: each tap's index arithmetic then folds to constants, ~2.8x fewer instructions.
    """
    sch = s_tir.Schedule(func)
    root = sch.get_sblock("root")
    inlined = True
    while inlined:
        inlined = False
        outputs = {sch.get(b).name_hint for b in sch.get_output_blocks(root)}
        for block_rv in sch.get_child_blocks(root):
            block = sch.get(block_rv)
            if block.name_hint in outputs or any(iv.iter_type != 0 for iv in block.iter_vars):
                continue
            try:
                sch.compute_inline(block_rv)
            except tvm.error.TVMError:
                continue  # e.g. several writes: keep it materialised
            inlined = True
            break
    outputs = {sch.get(b).name_hint for b in sch.get_output_blocks(root)}
    for block_rv in sch.get_child_blocks(root):
        block = sch.get(block_rv)
        consumers = sch.get_consumers(block_rv)
        if block.name_hint in outputs or len(consumers) != 1:
            continue
        loops = sch.get_loops(consumers[0])
        try:
            sch.compute_at(block_rv, loops[_deepest_dependent_loop(sch, block, consumers[0], loops)])
        except tvm.error.TVMError:
            continue  # stays a full-size workspace; `workspace_bytes` accounts for it
    for block_rv in sch.get_child_blocks(root):
        unrolled = 1
        for loop in _window_loops(sch, block_rv):
            extent = sch.get(loop).extent
            if not isinstance(extent, tirx.IntImm) or unrolled * int(extent) > MAX_UNROLLED_TAPS:
                break
            sch.unroll(loop)
            unrolled *= int(extent)
    return sch.mod["main"]


def _window_loops(sch, block_rv) -> list:
    """The block's innermost loops that drive only its reduction axes, innermost first: safe to unroll.

    Only those: TVM's C backend prints min/max operands once per scope and reuses them by their text
    (CodeGenCHost::PrintTernaryCondExpr -> SSAGetID), so in unrolled pixels the requantize clamp of
    the first pixel's accumulator was stored for every pixel (a reused `conv[0]` reads stale). For
    the same reason a max/min reduction (pooling) is never unrolled.
    """
    block = sch.get(block_rv)
    loops = sch.get_loops(block_rv)
    realize = sch.get(loops[-1]).body if loops else None
    if (not isinstance(realize, s_tir.SBlockRealize) or not realize.block.same_as(block)
            or not isinstance(block.body, tirx.BufferStore) or isinstance(block.body.value, (tirx.Min, tirx.Max))):
        return []
    spatial, reduction = set(), set()
    for iv, value in zip(block.iter_vars, realize.iter_values):
        (reduction if iv.iter_type != 0 else spatial).update(tirx.analysis.undefined_vars(value))
    window = []
    for loop in reversed(loops):
        var = sch.get(loop).loop_var
        if var not in reduction or var in spatial:
            break
        window.append(loop)
    return window


def _deepest_dependent_loop(sch, producer, consumer_rv, loops) -> int:
    """Index of the consumer loop to compute `producer` under (innermost if bindings are not a plain grid)."""
    consumer = sch.get(consumer_rv)
    realize = sch.get(loops[-1]).body
    loop_vars = [sch.get(loop).loop_var for loop in loops]
    plain = (isinstance(realize, s_tir.SBlockRealize) and len(realize.iter_values) == len(loops)
             and all(value.same_as(var) for value, var in zip(realize.iter_values, loop_vars)))
    if not plain:
        return len(loops) - 1
    written = [region.source for region in producer.writes]
    used = set()
    for region in consumer.reads:
        if any(region.source.same_as(buffer) for buffer in written):
            for dim in region.region:
                used.update(tirx.analysis.undefined_vars(dim.min))
    depths = [i for i, iv in enumerate(consumer.iter_vars) if iv.var in used]
    return max(depths, default=0)


@dataclass(frozen=True)
class Step:
    kernel: str
    args: tuple[str, ...]  # tensor names: "input", "c<k>" constants, "t<k>" intermediates, "output"
    native: bool = False  # a hand-written kernel (compile/mcu_kernels/) called with data pointers

# The native convolution's scratch, int16 per tap of its padded depth (geometry's last entry): two
# pixels' columns, the tap's int32 input offset, its window row and column bytes; and the weights
# expanded to int16, one per tap per output channel (geometry[3], rounded up to even).
NATIVE_SCRATCH_PER_TAP = 5


@dataclass
class LoweredModel:
    """Everything model.c needs: the call sequence, the tensors it touches and the kernels' C."""

    steps: list[Step]
    tensors: dict[str, TensorInfo]
    constants: dict[str, np.ndarray]
    kernels_c: str
    workspace_bytes: int

    @property
    def native_scratch_elements(self) -> int:
        """int16 elements of the one scratch buffer the native convolutions share (they run one at a time)."""
        def elements(geometry: np.ndarray) -> int:
            out_c, depth = int(geometry[3]), int(geometry[-1])
            return (NATIVE_SCRATCH_PER_TAP + out_c + out_c % 2) * depth

        return max((elements(self.constants[s.args[0]]) for s in self.steps if s.native), default=0)


def lower(mod: tvm.IRModule, report: Callable[[str], None] = print, ram_lean: bool = False) -> LoweredModel:
    """Legalise, fold, fuse, schedule and compile a static-shape Relax module to C kernels.

    `ram_lean` computes paddings inside the convolutions reading them (see `merge_into_consumers`).
    """
    mod = relax.transform.LegalizeOps()(mod)
    mod = fold_constants(mod)
    mod = relax.transform.AnnotateTIROpPattern()(mod)
    mod = keep_dequantize_unfused(mod)
    mod = relax.transform.FuseOps()(mod)
    mod = merge_into_consumers(mod, pads_into_reductions=ram_lean)
    mod = relax.transform.FuseTIR()(mod)
    mod = relax.transform.DeadCodeElimination()(mod)
    main = mod["main"]
    if len(main.params) != 1:
        raise UserError(f"the model takes {len(main.params)} inputs; microcontroller export supports one image input")

    names: dict = {main.params[0]: "input"}
    tensors = {"input": _tensor_info(main.params[0].ty)}
    constants: dict[str, np.ndarray] = {}
    by_content: dict[bytes, str] = {}
    steps: list[Step] = []
    aliases: dict = {}

    def name_of(expr) -> str:
        if isinstance(expr, tvm.ir.GenericConst):
            array = expr.value.numpy()
            key = hashlib.sha256(f"{array.dtype}{array.shape}".encode() + array.tobytes()).digest()
            if key not in by_content:  # identical weights (shared norm parameters) are stored once
                by_content[key] = f"c{len(constants)}"
                constants[by_content[key]] = array
                tensors[by_content[key]] = TensorInfo(tuple(array.shape), str(array.dtype))
            return by_content[key]
        expr = aliases.get(expr, expr)
        if expr not in names:
            raise UserError(f"unsupported Relax value in the lowered model: {type(expr).__name__}")
        return names[expr]

    for block in main.body.blocks:
        for binding in block.bindings:
            value = binding.value
            if isinstance(value, relax.Var):
                aliases[binding.var] = aliases.get(value, value)
                continue
            native = _is_native_call(value)
            if not native and (not _is_call_tir(value) or len(value.args) > 2):
                raise UserError(f"unsupported operation in the lowered model: {value.op if hasattr(value, 'op') else value}")
            args = tuple(name_of(arg) for arg in value.args[1].fields)
            out = f"t{len(steps)}"
            names[binding.var] = out
            tensors[out] = _tensor_info(binding.var.ty)
            kernel = value.args[0].global_symbol if native else value.args[0].name_hint
            steps.append(Step(kernel=kernel, args=(*args, out), native=native))
    result = aliases.get(main.body.body, main.body.body)
    if result not in names or names[result] == "input":
        raise UserError("the model's output must be computed by a kernel (a single tensor, not a tuple)")
    final = names[result]
    steps = [dataclasses.replace(s, args=tuple("output" if a == final else a for a in s.args)) for s in steps]
    tensors["output"] = tensors.pop(final)

    used_kernels = sorted({s.kernel for s in steps if not s.native})
    native_calls = sum(s.native for s in steps)
    report(f"  lowering: {len(steps)} kernel calls ({native_calls} to hand-written kernels), "
           f"{len(used_kernels)} distinct TVM kernels, {len(constants)} constants")
    kernels = {name: schedule_for_mcu(mod[name]).with_attr("global_symbol", name) for name in used_kernels}
    source = ""
    if kernels:
        with tvm.transform.PassContext(config={"tirx.disable_assert": True}):
            source = tvm.tirx.build(tvm.IRModule(kernels), target=tvm.target.Target({"kind": "c"})).inspect_source()
        source = with_inline_rounding(source)
    return LoweredModel(steps=steps, tensors=tensors, constants=constants, kernels_c=source,
                        workspace_bytes=workspace_bytes(source))


def _tensor_info(ty) -> TensorInfo:
    if not isinstance(ty, relax.TensorType) or ty.shape is None:
        raise UserError(f"expected a tensor of static shape, got {ty}")
    try:
        shape = tuple(int(d) for d in ty.shape.values)
    except TypeError:
        raise UserError(f"tensor shape {ty.shape} is not static; export at a fixed input shape") from None
    return TensorInfo(shape, str(ty.dtype))


_KERNEL_START = re.compile(r"^TVM_DLL int32_t (\w+)\(void\* self_handle.*\{$", re.M)
_WORKSPACE_CALL = re.compile(r"TVMBackendAllocWorkspace\(\d+, \w+, \(uint64_t\)(\d+)")


def with_inline_rounding(kernels_c: str) -> str:
    """The kernels calling mcu_math.h's inline `lwgan_nearbyintf` (same values) instead of libm's.

    Every quantize rounds with nearbyintf; newlib's costs more instructions than the rest of a
    quantize. The declarations TVM prints for it go too, so nothing links against libm's.
    """
    if "nearbyintf(" not in kernels_c:
        return kernels_c
    kernels_c = re.sub(r"^TVM_DLL float nearbyintf\(float\);\n", "", kernels_c, flags=re.M)
    kernels_c = kernels_c.replace("nearbyintf(", "lwgan_nearbyintf(")
    return kernels_c.replace("#include <math.h>\n", '#include <math.h>\n#include "mcu_math.h"\n', 1)


def workspace_bytes(kernels_c: str) -> int:
    """The scratch pool the kernels need: per kernel the sum of its workspaces (LIFO), max over kernels."""
    starts = [m.start() for m in _KERNEL_START.finditer(kernels_c)] + [len(kernels_c)]
    need = 0
    for begin, end in zip(starts, starts[1:]):
        sizes = [aligned(int(n)) for n in _WORKSPACE_CALL.findall(kernels_c, begin, end)]
        need = max(need, sum(sizes))
    return need


# ----------------------------------------------------------------------------- C generation


def export_c(model: ModelUnderTest, out_dir: Path, report: Callable[[str], None] = print,
             ram_lean: bool = False) -> CExport:
    """Write `model` as a C project (kernels.c, model.c, model.h, tvm_shim.c, include/) into `out_dir`.

    `ram_lean` trades instructions for RAM (see `merge_into_consumers`). A folder already holding
    this export by this exporter and TVM version is reused: lowering takes tens of seconds, and the
    result depends on nothing else.
    """
    key = _export_key(model, ram_lean)
    reused = _reuse_export(out_dir, key)
    if reused is not None:
        report(f"  {model.name}: reusing the C export in {out_dir}")
        return reused
    if model.precision == "int8":
        qdq = quantize_before_padding(load_onnx(model.onnx_file()))
        mod = onnx_to_relax(qdq, {graph_inputs(qdq)[0].name: tuple(model.input_shape)})
        mod, count, native = integer_convolutions(mod, native_kernels=True)
        report(f"  {model.name}: {count} QDQ convolutions rewritten as int8 x int8 -> int32 with integer requantization, "
               f"{native} of them by the SMLAD kernel")
        if count == 0:
            raise UserError(f"{model.name}: int8 model without QDQ convolutions; nothing to lower to integer kernels")
    else:
        mod = model.make_relax()
    lowered = lower(mod, report, ram_lean)
    buffers = _lifetimes(lowered)
    plan = plan_memory(buffers)
    out_dir.mkdir(parents=True, exist_ok=True)
    (out_dir / "kernels.c").write_text(lowered.kernels_c)
    (out_dir / "model.h").write_text(_model_h(model, lowered, plan))
    (out_dir / "model.c").write_text(_model_c(model, lowered, plan))
    for name in NATIVE_SOURCES:
        shutil.copy(NATIVE_KERNELS_DIR / name, out_dir / name)
    _copy_headers(out_dir / "include")
    weights = sum(a.nbytes for a in lowered.constants.values())
    export = CExport(directory=out_dir, model=model.name, precision=model.precision,
                     input=lowered.tensors["input"], output=lowered.tensors["output"], weights_bytes=weights,
                     arena_bytes=plan.arena_bytes, peak_live_bytes=plan.peak_live_bytes,
                     workspace_bytes=lowered.workspace_bytes, kernel_calls=len(lowered.steps), ram_lean=ram_lean)
    fields = {f.name: getattr(export, f.name) for f in dataclasses.fields(export) if f.name != "directory"}
    fields["input"], fields["output"] = dataclasses.asdict(export.input), dataclasses.asdict(export.output)
    (out_dir / EXPORT_MANIFEST).write_text(json.dumps({"key": key, **fields}, indent=1))
    return export


@register("c")
def c_project(model: ModelUnderTest, target: ResolvedTarget, out_dir: Path, report: Callable[[str], None] = print,
              ram_lean: bool = False) -> CExport:
    """The "c" backend: `export_c` into `out_dir` (the same project for every part: the part's budgets
    are the firmware's, targets/mcu.py)."""
    return export_c(model, out_dir, report, ram_lean)


def _export_key(model: ModelUnderTest, ram_lean: bool) -> str:
    """What an export depends on: the model (name, weights, shape, precision), the options, this code, TVM."""
    h = hashlib.sha256(f"{model.name}|{model.digest}|{model.precision}|{tuple(model.input_shape)}|{ram_lean}|"
                       f"{tvm.__version__}".encode())
    for source in (Path(__file__), Path(fixed_point.__file__), Path(match.__file__),
                   *(NATIVE_KERNELS_DIR / name for name in NATIVE_SOURCES)):
        h.update(source.read_bytes())
    return h.hexdigest()


def _reuse_export(out_dir: Path, key: str) -> CExport | None:
    manifest = out_dir / EXPORT_MANIFEST
    if not manifest.is_file() or not all((out_dir / name).is_file() for name in (*MODEL_SOURCES, "model.h")):
        return None
    try:
        fields = json.loads(manifest.read_text())
    except json.JSONDecodeError:
        return None
    if fields.pop("key", None) != key:
        return None
    fields["input"], fields["output"] = (TensorInfo(tuple(t["shape"]), t["dtype"]) for t in (fields["input"], fields["output"]))
    return CExport(directory=out_dir, **fields)


def _lifetimes(lowered: LoweredModel) -> list[Lifetime]:
    first: dict[str, int] = {}
    last: dict[str, int] = {}
    for index, step in enumerate(lowered.steps):
        for name in step.args:
            if name.startswith("t"):
                first.setdefault(name, index)
                last[name] = index
    return [Lifetime(name, lowered.tensors[name].nbytes, first[name], last[name]) for name in first]


def _copy_headers(include_dir: Path) -> None:
    packages = {"tvm": Path(tvm.__file__).parent, "tvm_ffi": Path(tvm_ffi.__file__).parent}
    for relative, (package, source) in KERNEL_HEADERS.items():
        target = include_dir / relative
        target.parent.mkdir(parents=True, exist_ok=True)
        shutil.copy(packages[package] / source, target)


def _c_identifier(text: str) -> str:
    return re.sub(r"\W", "_", text)


def _model_h(model: ModelUnderTest, lowered: LoweredModel, plan: MemoryPlan) -> str:
    inp, out = lowered.tensors["input"], lowered.tensors["output"]
    return f"""/* Generated by compile/backends/c.py for {model.name} ({model.precision}); do not edit. */
#ifndef LWGAN_MODEL_H
#define LWGAN_MODEL_H

#include <stdint.h>

#define MODEL_NAME "{model.name}"
#define MODEL_INPUT_ELEMENTS {int(np.prod(inp.shape))} /* NCHW {'x'.join(map(str, inp.shape))} */
#define MODEL_OUTPUT_ELEMENTS {int(np.prod(out.shape))} /* NCHW {'x'.join(map(str, out.shape))} */
#define MODEL_ARENA_BYTES {plan.arena_bytes}
#define MODEL_WORKSPACE_BYTES {lowered.workspace_bytes}

typedef {C_TYPES[inp.dtype]} model_input_t;
typedef {C_TYPES[out.dtype]} model_output_t;

/* One inference. Activations live in one static arena, so calls must not overlap (not reentrant).
 * Returns 0, or the 1-based index of the kernel call that failed. */
int model_run(const model_input_t* input, model_output_t* output);

/* Why the last failing kernel failed (empty if none did). */
const char* model_last_error(void);

#endif
"""


def _model_c(model: ModelUnderTest, lowered: LoweredModel, plan: MemoryPlan) -> str:
    lines = [
        f"/* Generated by compile/backends/c.py for {model.name} ({model.precision}); do not edit.",
        f" * {len(lowered.steps)} kernel calls; weights {sum(a.nbytes for a in lowered.constants.values())} bytes (flash);",
        f" * activation arena {plan.arena_bytes} bytes (lower bound {plan.peak_live_bytes}). */",
        "#include <stddef.h>",
        "#include <stdint.h>",
        '#include "tvm/ffi/c_api.h"',
        '#include "conv2d_s8.h"',
        '#include "model.h"',
        "",
    ]
    for kernel in sorted({s.kernel for s in lowered.steps if not s.native}):
        lines.append(f"int32_t __tvm_ffi_{kernel}(void* self, void* args, int32_t num_args, void* result);")
    lines += ["", f"static uint8_t model_arena[{max(plan.arena_bytes, ALIGNMENT)}] __attribute__((aligned({ALIGNMENT})));"]
    if lowered.native_scratch_elements:
        lines.append(f"static int16_t native_scratch[{lowered.native_scratch_elements}] __attribute__((aligned({ALIGNMENT})));")
    lines.append("")
    for name, array in lowered.constants.items():
        lines.append(_c_array(name, array))
    lines.append("")
    used = {a for s in lowered.steps if not s.native for a in s.args} | {"input", "output"}
    for name in sorted(used, key=_tensor_order):
        info = lowered.tensors[name]
        lines.append(f"static const int64_t shape_{name}[] = {{{', '.join(map(str, info.shape)) or '1'}}};")
    lines.append("")
    for name in sorted(used, key=_tensor_order):
        info = lowered.tensors[name]
        dtype = tvm.DataType(info.dtype)
        code = DL_CODES["bool" if info.dtype == "bool" else re.match(r"[a-z]+", info.dtype).group()]
        if name in ("input", "output"):
            qualifier, data = "static", "NULL"  # set by model_run
        elif name.startswith("c"):
            qualifier, data = "static const", f"(void*){name}"
        else:
            qualifier, data = "static const", f"(void*)(model_arena + {plan.offsets[name]})"
        lines.append(
            f"{qualifier} DLTensor tensor_{name} = {{.data = {data}, .device = {{kDLCPU, 0}}, .ndim = {len(info.shape)}, "
            f".dtype = {{{code}, {dtype.bits}, 1}}, .shape = (int64_t*)shape_{name}, .strides = NULL, .byte_offset = 0}};")
    lines.append("")
    for index, step in enumerate(lowered.steps):
        if step.native:
            continue
        entries = ", ".join(f"{{.type_index = kTVMFFIDLTensorPtr, .v_ptr = (void*)&tensor_{a}}}" for a in step.args)
        lines.append(f"static const TVMFFIAny args_{index}[] = {{{entries}}};")
    lines += ["", "int model_run(const model_input_t* input, model_output_t* output) {",
              "  tensor_input.data = (void*)input;", "  tensor_output.data = (void*)output;"]
    for index, step in enumerate(lowered.steps):
        if step.native:
            pointers = ", ".join(a if a.startswith("c") else f"tensor_{a}.data" if a in ("input", "output")
                                 else f"(void*)(model_arena + {plan.offsets[a]})" for a in step.args)
            lines.append(f"  if ({step.kernel}({pointers}, native_scratch) != 0) return {index + 1};")
        else:
            lines.append(f"  if (__tvm_ffi_{step.kernel}(NULL, (void*)args_{index}, {len(step.args)}, NULL) != 0) return {index + 1};")
    lines += ["  return 0;", "}", ""]
    return "\n".join(lines)


def _tensor_order(name: str) -> tuple[int, int]:
    if name in ("input", "output"):
        return (0 if name == "input" else 3, 0)
    return (1 if name.startswith("c") else 2, int(name[1:]))


def _c_array(name: str, array: np.ndarray) -> str:
    """A const array in flash; floats as exact C99 hex literals."""
    flat = array.ravel()
    if array.dtype == np.float32:
        if not np.all(np.isfinite(flat)):
            raise UserError(f"constant {name} holds non-finite values; the model's weights are corrupt")
        values = [float(v).hex() + "f" for v in flat.astype(np.float64)]
    elif array.dtype == np.bool_:
        values = [str(int(v)) for v in flat]
    elif array.dtype == np.int64:
        values = [f"INT64_C({int(v)})" for v in flat]
    elif str(array.dtype) in C_TYPES:
        values = [str(int(v)) for v in flat]
    else:
        raise UserError(f"constant {name} has dtype {array.dtype}; supported: {', '.join(C_TYPES)}")
    body = ",\n  ".join(", ".join(values[i:i + 8]) for i in range(0, len(values), 8)) or "0"
    return (f"static const {C_TYPES[str(array.dtype)]} {name}[{max(flat.size, 1)}] "
            f"__attribute__((aligned({ALIGNMENT}))) = {{\n  {body}\n}};")
