"""Third-party ONNX generator -> Relax, at one static input shape.

TVM's ONNX frontend rejects Pad/Resize/Reshape operands computed at run time (typically
`Shape -> Gather -> arithmetic`). At a fixed input shape those operands are constants, so we pin
the inputs, fold the shape arithmetic with ONNX's reference evaluator and only then import.

A fully convolutional file exported at one size runs at another once its Reshape targets are
re-pinned (`onnx_at_input_shape`); `quantize_before_padding` reorders a QDQ file's pads so that
they move quantized codes.
"""

from __future__ import annotations

import contextlib
import hashlib
import io
import os
from pathlib import Path

import numpy as np
import onnx
import tvm
from google.protobuf.message import DecodeError
from onnx import compose, numpy_helper, version_converter
from onnx.reference import ReferenceEvaluator
from tvm.relax.frontend.onnx import from_onnx
from tvm.relax.frontend.onnx.onnx_frontend import _get_convert_map

from compile.int8.qoperator import qdq_from_qoperator
from errors import UserError

# Folding QDQ pairs on weights would turn int8 weights back into float ones; the importer
# maps them to relax quantize/dequantize instead.
_NEVER_FOLD = {"QuantizeLinear", "DequantizeLinear"}
# Folding these would freeze one random draw into the model.
_NONDETERMINISTIC = {"RandomNormal", "RandomUniform", "RandomNormalLike", "RandomUniformLike", "Multinomial", "Bernoulli"}
# Ops the frontend converts without a converter-map entry (see `_check_for_unsupported_ops`).
_FRONTEND_BUILTIN_OPS = {"Constant", "If"}


def load_onnx(path: str | os.PathLike) -> onnx.ModelProto:
    """Read an ONNX file (with external data), turning unreadable input into a `UserError`."""
    path = Path(path)
    if not path.is_file():
        raise UserError(f"{path}: no such ONNX file")
    try:
        model = onnx.load(path)
    except DecodeError as exc:
        raise UserError(f"{path}: not an ONNX model (protobuf parse failed: {exc})") from exc
    except OSError as exc:
        raise UserError(f"{path}: cannot load the model's external data ({exc})") from exc
    # An empty or lucky byte string parses as a ModelProto with nothing in it.
    if model.ir_version == 0 or not model.graph.output:
        raise UserError(f"{path}: not an ONNX model (no IR version or no graph outputs)")
    return model


def graph_inputs(model: onnx.ModelProto) -> list[onnx.ValueInfoProto]:
    """The real inputs: old exporters also list initializers in `graph.input`."""
    initializers = {t.name for t in model.graph.initializer}
    return [v for v in model.graph.input if v.name not in initializers]


def declared_shape(value: onnx.ValueInfoProto) -> tuple[int | str, ...] | None:
    """The declared shape with symbolic or unknown dims as strings ("?" if unnamed); None if the rank is unknown."""
    tensor_type = value.type.tensor_type
    if not tensor_type.HasField("shape"):
        return None
    return tuple(d.dim_value if d.HasField("dim_value") else (d.dim_param or "?") for d in tensor_type.shape.dim)


def _graph_input(model: onnx.ModelProto, name: str) -> onnx.ValueInfoProto:
    inputs = {v.name: v for v in graph_inputs(model)}
    if name not in inputs:
        raise UserError(f"input {name!r} is not a graph input; the model's inputs are {sorted(inputs)}")
    return inputs[name]


def _pin_inputs(model: onnx.ModelProto, input_shapes: dict[str, tuple[int, ...]]) -> None:
    for name, shape in input_shapes.items():
        value = _graph_input(model, name)
        expected = declared_shape(value)
        shape = tuple(int(d) for d in shape)
        if expected is not None and (
            len(expected) != len(shape) or any(isinstance(e, int) and e != g for e, g in zip(expected, shape))
        ):
            raise UserError(f"input {name!r}: model declares shape {expected}, given {shape}")
        dims = value.type.tensor_type.shape.dim
        del dims[:]
        for d in shape:
            dims.add().dim_value = d


def chain_onnx(first: Path, second: Path) -> onnx.ModelProto:
    """One model running `first`, then `second` on its outputs: each output of `first` feeds the input of
    `second` of the same name (a style predictor's embedding into a transformer network). The inputs are
    both stages' other inputs, the outputs `second`'s; internal names get a stage prefix so they cannot clash."""
    models = [load_onnx(first), load_onnx(second)]
    inputs = [{v.name for v in graph_inputs(model)} for model in models]
    wired = [o.name for o in models[0].graph.output if o.name in inputs[1]]
    if not wired:
        raise UserError(f"{second}: no input is named like an output of {first} "
                        f"({', '.join(o.name for o in models[0].graph.output)})")
    shared = (inputs[0] & inputs[1]) - set(wired)
    if shared:
        raise UserError(f"{first} and {second} both take input(s) {', '.join(sorted(shared))}; rename one")
    opset = max(next((o.version for o in m.opset_import if o.domain in ("", "ai.onnx")), 1) for m in models)
    stages = []
    for stage, model in enumerate(models):
        if next((o.version for o in model.opset_import if o.domain in ("", "ai.onnx")), 1) != opset:
            model = version_converter.convert_version(model, opset)
        model.ir_version = max(m.ir_version for m in models)
        stages.append(compose.add_prefix(model, f"stage{stage}/", rename_inputs=False, rename_outputs=False))
    try:
        return compose.merge_models(*stages, io_map=[(name, name) for name in wired],
                                         outputs=[o.name for o in models[1].graph.output])
    except (ValueError, onnx.checker.ValidationError) as exc:
        raise UserError(f"{first} then {second}: cannot chain them ({str(exc).strip().splitlines()[0]})") from exc


def _known_shapes(model: onnx.ModelProto) -> dict[str, tuple[int, ...]]:
    """Fully static shapes of every value that shape inference could resolve."""
    shapes = {}
    for value in [*model.graph.input, *model.graph.value_info, *model.graph.output]:
        shape = declared_shape(value)
        if shape is not None and all(isinstance(d, int) for d in shape):
            shapes[value.name] = shape
    for tensor in model.graph.initializer:
        shapes[tensor.name] = tuple(tensor.dims)
    return shapes


def _shape_constant(node: onnx.NodeProto, shapes: dict[str, tuple[int, ...]]) -> np.ndarray | None:
    """The value of a Shape/Size node whose input shape is static, else None."""
    shape = shapes.get(node.input[0])
    if shape is None:
        return None
    if node.op_type == "Size":
        return np.array(np.prod(shape, dtype=np.int64), dtype=np.int64)
    attrs = {a.name: onnx.helper.get_attribute_value(a) for a in node.attribute}
    # Python slicing clamps and wraps exactly like Shape-15's start/end.
    return np.array(shape[attrs.get("start", 0) : attrs.get("end", len(shape))], dtype=np.int64)


def _is_foldable(node: onnx.NodeProto, constants: dict[str, np.ndarray]) -> bool:
    return (
        node.domain in ("", "ai.onnx")
        and node.op_type not in _NEVER_FOLD | _NONDETERMINISTIC
        and not any(a.type in (onnx.AttributeProto.GRAPH, onnx.AttributeProto.GRAPHS) for a in node.attribute)
        and all(name == "" or name in constants for name in node.input)
    )


def _evaluate(node: onnx.NodeProto, constants: dict[str, np.ndarray], opset: int) -> list[np.ndarray] | None:
    """Run one node on constant inputs; None if the reference evaluator cannot, or yields non-tensors."""
    feeds = {name: constants[name] for name in node.input if name}
    try:
        results = ReferenceEvaluator(node, opsets={"": opset}).run(None, feeds)
    except Exception:  # the reference lacks some ops and attribute combinations: leave those to TVM
        return None
    if not all(isinstance(r, (np.ndarray, np.generic)) for r in results):
        return None
    return [np.asarray(r) for r in results]


def _used_names(graph: onnx.GraphProto) -> set[str]:
    """Every value name read in `graph`, including outer-scope reads from subgraphs."""
    used = {o.name for o in graph.output}
    for node in graph.node:
        used.update(node.input)
        for attr in node.attribute:
            for sub in [attr.g] if attr.type == onnx.AttributeProto.GRAPH else attr.graphs:
                used |= _used_names(sub)
    return used


def _remove_dead(graph: onnx.GraphProto) -> None:
    """Drop nodes whose outputs nobody reads, repeating until chains are gone, then unused initializers."""
    changed = True
    while changed:
        used = _used_names(graph)
        alive = [n for n in graph.node if any(o in used for o in n.output if o)]
        changed = len(alive) != len(graph.node)
        del graph.node[:]
        graph.node.extend(alive)
    used = _used_names(graph)
    dead = {t.name for t in graph.initializer if t.name not in used}
    kept = [t for t in graph.initializer if t.name not in dead]
    del graph.initializer[:]
    graph.initializer.extend(kept)
    inputs = [v for v in graph.input if v.name not in dead]
    del graph.input[:]
    graph.input.extend(inputs)


def fold_shapes(model: onnx.ModelProto, input_shapes: dict[str, tuple[int, ...]]) -> onnx.ModelProto:
    """A copy of `model` with inputs pinned to `input_shapes` and all shape arithmetic folded to initializers."""
    folded = onnx.ModelProto()
    folded.CopyFrom(model)
    _pin_inputs(folded, input_shapes)
    graph = folded.graph
    opset = next((o.version for o in folded.opset_import if o.domain in ("", "ai.onnx")), 1)
    # The exporter's value_info/output shapes were derived from the unpinned inputs and may clash.
    del graph.value_info[:]
    for output in graph.output:
        output.type.tensor_type.ClearField("shape")

    constants = {t.name: numpy_helper.to_array(t) for t in graph.initializer}
    changed = True
    while changed:
        try:
            folded = onnx.shape_inference.infer_shapes(folded, data_prop=True)
        except onnx.shape_inference.InferenceError as exc:
            first_line = str(exc).strip().splitlines()[0]
            raise UserError(f"input shapes {dict(input_shapes)} do not fit the model ({first_line})") from exc
        graph = folded.graph
        shapes = _known_shapes(folded)
        changed = False
        for node in list(graph.node):
            if node.op_type in ("Shape", "Size"):
                value = _shape_constant(node, shapes)
                values = None if value is None else [value]
            elif _is_foldable(node, constants):
                values = _evaluate(node, constants, opset)
            else:
                continue
            if values is None:
                continue
            for name, array in zip(node.output, values):
                if name:
                    constants[name] = array
                    graph.initializer.append(numpy_helper.from_array(array, name))
            graph.node.remove(node)
            changed = True
    _remove_dead(graph)
    return folded


def _unsupported_ops(graph: onnx.GraphProto, supported: set[str]) -> list[str]:
    """`op (node 'name')` for every node, also inside subgraphs, the frontend has no converter for."""
    found = []
    for node in graph.node:
        if node.op_type not in supported:
            found.append(f"{node.op_type} (node {node.name!r})")
        for attr in node.attribute:
            for sub in [attr.g] if attr.type == onnx.AttributeProto.GRAPH else attr.graphs:
                found += _unsupported_ops(sub, supported)
    return found


def _failing_node(exc: BaseException) -> onnx.NodeProto | None:
    """The node the frontend was converting when it raised, read from its `_construct_nodes` frame."""
    tb = exc.__traceback__
    node = None
    while tb is not None:
        candidate = tb.tb_frame.f_locals.get("node")
        if isinstance(candidate, onnx.NodeProto):
            node = candidate
        tb = tb.tb_next
    return node


def static_input_shapes(model: onnx.ModelProto, input_shapes: dict[str, tuple[int, ...]] | None
                        ) -> dict[str, tuple[int, ...]]:
    """Given shapes, completed with the declared shapes of inputs that are already static, in the graph's input order."""
    shapes = dict(input_shapes or {})
    for name in shapes:  # an unknown name explains a missing shape better than "pass input_shapes"
        _graph_input(model, name)
    for value in graph_inputs(model):
        if value.name in shapes:
            continue
        declared = declared_shape(value)
        if declared is None or not all(isinstance(d, int) for d in declared):
            shown = "unknown rank" if declared is None else f"shape {declared}"
            raise UserError(f"input {value.name!r} has {shown}; give it a static shape "
                            f"(--shape {value.name}=..., or input_shapes in Python)")
        shapes[value.name] = declared
    return {value.name: tuple(shapes[value.name]) for value in graph_inputs(model)}


def onnx_to_relax(
    path_or_model: str | os.PathLike | onnx.ModelProto, input_shapes: dict[str, tuple[int, ...]] | None = None
) -> tvm.IRModule:
    """Import an ONNX generator at static input shapes; `main` takes the inputs only, weights are constants.

    `input_shapes` defaults to the declared shapes, which must then be static.
    """
    if isinstance(path_or_model, onnx.ModelProto):
        model, label = path_or_model, f"ONNX model {path_or_model.graph.name or '<unnamed>'!r}"
    else:
        model, label = load_onnx(path_or_model), str(path_or_model)
    try:
        folded = fold_shapes(qdq_from_qoperator(model), static_input_shapes(model, input_shapes))
    except UserError as exc:
        raise UserError(f"{label}: {exc}") from exc

    unsupported = _unsupported_ops(folded.graph, set(_get_convert_map()) | _FRONTEND_BUILTIN_OPS)
    if unsupported:
        raise UserError(f"{label}: operator(s) not supported by TVM's ONNX frontend: {', '.join(unsupported)}")

    shape_dict = {v.name: list(declared_shape(v)) for v in graph_inputs(folded)}
    try:
        # The frontend prints whole Relax expressions to stdout on failure; the UserError says it in one line.
        with contextlib.redirect_stdout(io.StringIO()):
            return from_onnx(folded, shape_dict=shape_dict, keep_params_in_input=False)
    except Exception as exc:  # the frontend raises anything from ValueError to TVMError
        node = _failing_node(exc)
        where = f" at {node.op_type} node {node.name!r}" if node is not None else ""
        reason = (str(exc).strip().splitlines() or [type(exc).__name__])[0]
        raise UserError(f"{label}: TVM's ONNX frontend failed{where}: {reason}") from exc


def _inferred_shapes(model: onnx.ModelProto, input_shapes: dict[str, tuple[int, ...]]
                     ) -> tuple[onnx.ModelProto, dict[str, tuple[int, ...]]]:
    """The model with Shape-computed values folded and shapes inferred at `input_shapes`, and its static shapes."""
    folded = onnx.shape_inference.infer_shapes(fold_shapes(model, input_shapes))
    return folded, _known_shapes(folded)


def onnx_peak_activation_bytes(model: onnx.ModelProto, input_shapes: dict[str, tuple[int, ...]]) -> int:
    """A lower bound on the memory one inference needs: the largest inputs + outputs of any node, by
    shape inference at the given input shapes (4 bytes per element where the type is not known)."""
    folded, shapes = _inferred_shapes(model, input_shapes)
    weights = {tensor.name for tensor in folded.graph.initializer}
    return max((4 * sum(int(np.prod(shapes[name])) for name in (*node.input, *node.output)
                        if name in shapes and name not in weights)
                for node in folded.graph.node), default=0)


def onnx_macs(model: onnx.ModelProto, input_shapes: dict[str, tuple[int, ...]]) -> int:
    """Multiply-accumulates of Conv, ConvTranspose, MatMul and Gemm at the given input shapes.

    Counted as the direct algorithm does them: a transposed conv costs C_in*C_out/groups*k^2 per
    *input* pixel, not per output pixel.
    """
    folded, shapes = _inferred_shapes(model, input_shapes)
    total = 0
    for node in folded.graph.node:
        if node.op_type not in ("Conv", "ConvTranspose", "MatMul", "Gemm"):
            continue
        operands = [shapes.get(name) for name in node.input[:2]]
        out = shapes.get(node.output[0])
        if any(s is None for s in operands) or out is None:
            continue
        x, w = operands
        if node.op_type == "Conv":  # w: (C_out, C_in/groups, k...) ; out: (N, C_out, ...)
            total += int(np.prod(out)) * int(np.prod(w[1:]))
        elif node.op_type == "ConvTranspose":  # w: (C_in, C_out/groups, k...) ; x: (N, C_in, ...)
            total += int(np.prod(x)) * int(np.prod(w[1:]))
        else:  # (..., M, K) x (K, N): one MAC per output element and K
            total += int(np.prod(out)) * int(x[-1])
    return total


def quantize_before_padding(model: onnx.ModelProto) -> onnx.ModelProto:
    """A copy where each reflect/edge `Pad -> QuantizeLinear` is `QuantizeLinear -> Pad` (same values).

    Such a pad only copies elements and quantization is elementwise, so the order does not change
    a single value; but quantizing first lets instance norm + relu + quantize end in one kernel
    writing uint8, and the pad of those uint8 codes is then computed inside the convolution
    reading it, instead of materialising the padded float tensor (4x the bytes).
    """
    swapped = onnx.ModelProto()
    swapped.CopyFrom(model)
    graph = swapped.graph
    readers: dict[str, list[onnx.NodeProto]] = {}
    for node in graph.node:
        for name in node.input:
            readers.setdefault(name, []).append(node)
    outputs = {o.name for o in graph.output}
    order = list(graph.node)
    for pad in list(order):
        mode = next((onnx.helper.get_attribute_value(a) for a in pad.attribute if a.name == "mode"), b"constant")
        users = readers.get(pad.output[0], [])
        if pad.op_type != "Pad" or mode not in (b"reflect", b"edge") or pad.output[0] in outputs:
            continue
        if len(users) != 1 or users[0].op_type != "QuantizeLinear":
            continue
        quantize = users[0]
        quantized = quantize.output[0]
        quantize.input[0] = pad.input[0]
        quantize.output[0] = f"{quantized}_unpadded"
        pad.input[0] = quantize.output[0]
        pad.output[0] = quantized
        order.remove(quantize)
        order.insert(order.index(pad), quantize)
    del graph.node[:]
    graph.node.extend(order)
    del graph.value_info[:]  # intermediate types changed (the pad now carries uint8)
    return swapped


def onnx_at_input_shape(path: Path, shape: tuple[int, ...], cache_dir: Path) -> Path:
    """A copy of a fully convolutional ONNX file whose input is pinned to `shape` (cached by content).

    Exporters bake the traced spatial size into Reshape targets (here the sub-pixel shuffle's
    `[1, 4C, H, W]`), so a file exported at 128x128 cannot run at 32x32 as is. For every Reshape
    with a constant target, the trailing dims it shares with its input at the exported size are
    replaced by that input's dims at the new size; anything else is refused.
    """
    model = load_onnx(path)
    inputs = graph_inputs(model)
    if len(inputs) != 1:
        raise UserError(f"{path}: expected one image input, found {len(inputs)}")
    old_shape = declared_shape(inputs[0])
    shape = tuple(int(d) for d in shape)
    if old_shape == shape:
        return path
    if old_shape is None or len(old_shape) != len(shape) or old_shape[:2] != shape[:2]:
        raise UserError(f"{path}: input is declared {old_shape}; only the spatial size can change, got {shape}")
    digest = hashlib.sha256(path.read_bytes() + repr(shape).encode()).hexdigest()[:16]
    out = cache_dir / f"{path.stem}-{'x'.join(map(str, shape))}-{digest}.onnx"
    if out.exists():
        return out

    old_shapes = _positive_shapes(model)
    repinned = onnx.ModelProto()
    repinned.CopyFrom(model)
    dims = repinned.graph.input[[v.name for v in repinned.graph.input].index(inputs[0].name)].type.tensor_type.shape.dim
    for dim, size in zip(dims, shape):
        dim.Clear()
        dim.dim_value = size
    del repinned.graph.value_info[:]
    for output in repinned.graph.output:
        output.type.tensor_type.ClearField("shape")
    initializers = {t.name: t for t in repinned.graph.initializer}
    for node in repinned.graph.node:
        if node.op_type != "Reshape" or node.input[1] not in initializers:
            continue
        new_shapes = _positive_shapes(repinned)  # after the Reshapes already fixed upstream
        target = numpy_helper.to_array(initializers[node.input[1]]).astype(np.int64)
        before, after = old_shapes.get(node.input[0]), new_shapes.get(node.input[0])
        if before is None or after is None:
            raise UserError(f"{path}: cannot infer the input shape of Reshape {node.name!r} to re-pin it")
        fixed = _repin_target(tuple(int(d) for d in target), before, after)
        if fixed is None:
            raise UserError(f"{path}: Reshape {node.name!r} to {target.tolist()} does not scale with the input size")
        initializers[node.input[1]].CopyFrom(numpy_helper.from_array(np.array(fixed, np.int64), node.input[1]))
    try:
        onnx.checker.check_model(onnx.shape_inference.infer_shapes(repinned, strict_mode=True))
    except (onnx.checker.ValidationError, onnx.shape_inference.InferenceError) as exc:
        raise UserError(f"{path}: does not run at input {shape} ({str(exc).strip().splitlines()[0]})") from exc
    cache_dir.mkdir(parents=True, exist_ok=True)
    partial = out.with_suffix(".partial")
    onnx.save(repinned, str(partial))
    partial.replace(out)
    return out


def _positive_shapes(model: onnx.ModelProto) -> dict[str, tuple[int, ...]]:
    """Inferred shapes of the values whose every dim is a known positive size."""
    inferred = onnx.shape_inference.infer_shapes(model)
    shapes = {}
    for value in [*inferred.graph.input, *inferred.graph.value_info, *inferred.graph.output]:
        dims = declared_shape(value)
        if dims is not None and all(isinstance(d, int) and d > 0 for d in dims):
            shapes[value.name] = dims
    return shapes


def _repin_target(target: tuple[int, ...], before: tuple[int, ...], after: tuple[int, ...]) -> tuple[int, ...] | None:
    """The Reshape target at the new input size, if it keeps a common trailing block of dims."""
    common = 0
    while common < min(len(target), len(before)) and target[-1 - common] == before[-1 - common]:
        common += 1
    if common == 0:
        return None
    fixed = target[: len(target) - common] + after[len(after) - common :]
    if int(np.prod(fixed)) != int(np.prod(after)) or before[: len(before) - common] != after[: len(after) - common]:
        return None
    return fixed
