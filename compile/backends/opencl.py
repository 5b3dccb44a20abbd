"""The "opencl" backend: a model for an OpenCL GPU board (Mali), and its kernels checked on this machine.

TVM's default GPU pipeline legalizes the Relax graph and schedules every PrimFunc with dlight's
rules (Matmul, GEMV, Reduction, GeneralReduction, and Fallback for the convolutions), which bind
every loop nest to work-groups. The board gets a shared library (host code cross-compiled for its
CPU, the OpenCL C source embedded and compiled by the board's driver at load); the source is also
written beside it as a .cl file.

There is no GPU here and TVM's wheel has no OpenCL runtime, so the kernels are checked with pocl,
a real OpenCL C compiler for the CPU: every kernel must build, and the whole model can run kernel
by kernel in the order, with the arguments and launch sizes TVM's host code uses (`LaunchPlan`,
read from the same compilation), for an output check against torch.
"""

from __future__ import annotations

import functools
import re
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import tvm
from tvm import relax, tirx

from compile.backends import register
from compile.pipeline import ModelUnderTest
from compile.tuning import cross_compiler
from errors import UserError
from targets import ResolvedTarget
from targets.tensors import TensorInfo

OUT_DIR = Path(__file__).resolve().parents[2] / "build" / "opencl"
# TVM's OpenCL runtime splits the module's source at these markers and builds each kernel as its own
# program (one section: declarations of all kernels, then one kernel's definition).
KERNEL_MARKER = "// Function: "
POCL_PLATFORM = "Portable Computing Language"
# The pipeline states the launch plan is read from: the graph of PrimFunc calls once reshapes became
# views, and each PrimFunc's host side (kernel launches) once device code was split off.
_GRAPH_PASS = "RewriteDataflowReshape"
_HOST_PASS = "tirx.SplitHostDevice"


class KernelBuildError(RuntimeError):
    """Generated OpenCL C that a real OpenCL compiler rejects: a code generation bug, not bad input."""


class LaunchPlanError(RuntimeError):
    """A construct in TVM's output the pocl runner does not interpret (the build itself is still valid)."""


@dataclass(frozen=True)
class KernelLaunch:
    kernel: str
    buffers: tuple[int, ...]  # buffer ids, in the kernel's parameter order
    global_size: tuple[int, ...]  # work-items per dimension (work-groups × work-group size)
    local_size: tuple[int, ...]


@dataclass(frozen=True)
class LaunchPlan:
    """The model as TVM's host code runs it: device buffers and the kernel launches, in order."""

    buffers: tuple[TensorInfo, ...]  # a reshape shares its input's buffer, so an id may carry several views
    constants: dict[int, np.ndarray]  # buffer id -> weights uploaded before the first launch
    input: tuple[int, TensorInfo]
    output: tuple[int, TensorInfo]
    launches: tuple[KernelLaunch, ...]


@dataclass(frozen=True)
class OpenCLArtifact:
    library: Path  # for the board's TVM runtime (built with USE_OPENCL): host code + embedded OpenCL C
    source_file: Path  # the OpenCL C, one `// Function:` section per kernel
    kernels: tuple[str, ...]
    compile_s: float  # Relax pipeline + TIR lowering + code generation
    # The compilation's states the launch plan is read from (None if TVM no longer runs that pass).
    graph: tvm.IRModule | None = field(default=None, repr=False, compare=False)
    host_code: tvm.IRModule | None = field(default=None, repr=False, compare=False)

    @functools.cached_property
    def plan(self) -> LaunchPlan:
        """Read on demand: a construct the pocl runner cannot follow never fails the build itself."""
        if self.graph is None or self.host_code is None:
            raise LaunchPlanError(f"TVM {tvm.__version__} no longer runs {_GRAPH_PASS} and {_HOST_PASS}; "
                                  "update compile/backends/opencl.py")
        return launch_plan(self.graph, self.host_code)


@register("opencl")
def build_opencl(model: ModelUnderTest, target: ResolvedTarget, out_dir: Path | None = None) -> OpenCLArtifact:
    """Compile `model` for the target's GPU; write `<name>-<shape>.so` and `.cl` into `out_dir`
    (default build/opencl/<target>/)."""
    out_dir = out_dir or OUT_DIR / target.config.name
    tvm_target = target.tvm_target
    if tvm_target.kind.name != "opencl":
        raise UserError(f"target {target.config.name!r} is of kind {tvm_target.kind.name!r}; "
                        "an OpenCL build needs an opencl target (e.g. rock5b)")
    fcompile = cross_compiler(target.config)  # before minutes of compiling, fail on a missing compiler
    captured: dict[str, tvm.IRModule] = {}

    @tvm.instrument.pass_instrument
    class Capture:
        def run_after_pass(self, mod: tvm.IRModule, info: tvm.transform.PassInfo) -> None:
            if info.name in (_GRAPH_PASS, _HOST_PASS):
                captured[info.name] = mod

    relax_module = model.make_relax()
    started = time.perf_counter()
    with tvm.transform.PassContext(instruments=[Capture()]):
        executable = tvm.compile(relax_module, tvm_target)
    compile_s = time.perf_counter() - started
    source = opencl_source(executable.mod)

    out_dir.mkdir(parents=True, exist_ok=True)
    stem = f"{model.name}-{'x'.join(map(str, model.input_shape))}"
    library, source_file = out_dir / f"{stem}.so", out_dir / f"{stem}.cl"
    with tempfile.TemporaryDirectory(dir=out_dir) as scratch:  # renamed into place only once complete
        partial = Path(scratch) / library.name
        executable.export_library(str(partial), fcompile=fcompile)
        partial.replace(library)
    source_file.write_text(source, encoding="utf-8")
    return OpenCLArtifact(library, source_file, tuple(kernel_sources(source)), compile_s,
                          captured.get(_GRAPH_PASS), captured.get(_HOST_PASS))


def opencl_source(module: tvm.runtime.Module) -> str:
    """The OpenCL C of a compiled module: its imported module of kind "opencl" (nested under the host code).

    A graph without computation (one returning its input) has no kernel: then the source is empty.
    """
    pending = [module]
    while pending:
        current = pending.pop()
        if current.kind == "opencl":
            return current.inspect_source()
        pending.extend(current.imports)
    return ""


def kernel_sources(source: str) -> dict[str, str]:
    """Kernel name -> its program, split like TVM's OpenCL runtime does at load."""
    sections = {}
    for section in source.split(KERNEL_MARKER)[1:]:
        name = section.split("\n", 1)[0].strip()
        sections[name] = KERNEL_MARKER + section
    return sections


@functools.cache
def pocl_context():
    """An OpenCL context on pocl's CPU device (pyopencl[pocl] bundles it)."""
    try:
        import pyopencl as cl
    except ImportError as exc:
        raise UserError("checking OpenCL kernels needs pyopencl with pocl: pip install 'pyopencl[pocl]'") from exc
    platforms = [p for p in cl.get_platforms() if p.name == POCL_PLATFORM]
    if not platforms:
        found = ", ".join(p.name for p in cl.get_platforms()) or "none"
        raise UserError(f"no {POCL_PLATFORM} (pocl) OpenCL platform (found: {found}); pip install 'pyopencl[pocl]'")
    return cl.Context(platforms[0].get_devices())


def build_kernels(source_file: Path) -> dict:
    """Build every kernel of a .cl file with pocl, each as its own program; kernel name -> pyopencl Kernel.

    Raises KernelBuildError naming the first kernel the compiler rejects and its first error.
    """
    import pyopencl as cl

    context = pocl_context()
    built = {}
    for name, program_source in kernel_sources(source_file.read_text(encoding="utf-8")).items():
        try:
            program = cl.Program(context, program_source).build()
        except cl.Error as exc:
            raise KernelBuildError(f"{source_file}: kernel {name!r} does not build with pocl: {_first_error(str(exc))}") from exc
        built[name] = cl.Kernel(program, name)
    return built


def _first_error(log: str) -> str:
    """The compiler's first diagnostic ("<source>:3:5: error: ..."), else the log's first line."""
    lines = [line.strip() for line in log.strip().splitlines() if line.strip()]
    return next((line for line in lines if "error:" in line), lines[0] if lines else "no build log")


def run_on_pocl(artifact: OpenCLArtifact, x: np.ndarray, kernels: dict | None = None) -> np.ndarray:
    """Run the model's kernels (from the .cl file, or `kernels` already built from it) on pocl; returns the output."""
    import pyopencl as cl

    plan = artifact.plan
    input_id, input_tensor = plan.input
    if x.shape != input_tensor.shape or x.dtype != np.dtype(input_tensor.dtype):
        raise UserError(f"input of shape {x.shape} {x.dtype} given; the build takes {input_tensor.shape} {input_tensor.dtype}")
    kernels = kernels or build_kernels(artifact.source_file)
    unknown = sorted({launch.kernel for launch in plan.launches} - set(kernels))
    if unknown:
        raise LaunchPlanError(f"{artifact.source_file}: the host code launches kernels it lacks: {', '.join(unknown)}")
    context = pocl_context()
    queue = cl.CommandQueue(context)
    flags = cl.mem_flags
    buffers = [
        cl.Buffer(context, flags.READ_WRITE | flags.COPY_HOST_PTR, hostbuf=np.ascontiguousarray(plan.constants[i]))
        if i in plan.constants else cl.Buffer(context, flags.READ_WRITE, max(tensor.nbytes, 1))
        for i, tensor in enumerate(plan.buffers)
    ]
    cl.enqueue_copy(queue, buffers[input_id], np.ascontiguousarray(x))
    for launch in plan.launches:
        kernels[launch.kernel](queue, launch.global_size, launch.local_size, *(buffers[i] for i in launch.buffers))
    output_id, output_tensor = plan.output
    out = np.empty(output_tensor.shape, output_tensor.dtype)
    cl.enqueue_copy(queue, out, buffers[output_id])
    queue.finish()
    return out


def launch_plan(graph: tvm.IRModule, host: tvm.IRModule) -> LaunchPlan:
    """Read the launches from the Relax graph (PrimFunc calls in order) and each PrimFunc's host side."""
    main = graph["main"]
    if len(main.params) != 1:
        raise LaunchPlanError(f"expected one model input, found {len(main.params)}")
    tensors: list[TensorInfo] = []
    constants: dict[int, np.ndarray] = {}
    where: dict[relax.Var, int] = {}

    def new_buffer(tensor: TensorInfo) -> int:
        tensors.append(tensor)
        return len(tensors) - 1

    def buffer_of(expr: relax.Expr) -> int:
        if isinstance(expr, tvm.ir.GenericConst):
            value = expr.value.numpy()
            constants[new_buffer(TensorInfo(value.shape, str(value.dtype)))] = value
            return len(tensors) - 1
        if expr in where:
            return where[expr]
        raise LaunchPlanError(f"argument {expr} is neither a constant nor an earlier result")

    where[main.params[0]] = new_buffer(_tensor_of(main.params[0]))
    launches: list[KernelLaunch] = []
    for block in main.body.blocks:
        for binding in block.bindings:
            call = binding.value
            op = getattr(getattr(call, "op", None), "name", None)
            if op == "relax.call_tir":
                callee, args = call.args[0], call.args[1].fields
                ids = [buffer_of(arg) for arg in args]
                where[binding.var] = new_buffer(_tensor_of(binding.var))
                launches += _host_launches(host, callee.name_hint, [*ids, where[binding.var]])
            elif op == "relax.reshape":  # a view: same buffer, new shape
                where[binding.var] = buffer_of(call.args[0])
            else:
                raise LaunchPlanError(f"graph binding {binding.var.name} = {op or type(call).__name__} "
                                      "is not a PrimFunc call or reshape")
    result = main.body.body
    if result not in where:
        raise LaunchPlanError(f"the model returns {type(result).__name__}, not one tensor")
    return LaunchPlan(tuple(tensors), constants, (where[main.params[0]], _tensor_of(main.params[0])),
                      (where[result], _tensor_of(result)), tuple(launches))


def _tensor_of(var: relax.Var) -> TensorInfo:
    ty = var.ty
    if not isinstance(ty, relax.TensorType):
        raise LaunchPlanError(f"{var.name} is a {type(ty).__name__}, not a tensor")
    return TensorInfo(tuple(int(d) for d in ty.shape.values), str(ty.dtype))


def _host_launches(host: tvm.IRModule, name: str, buffer_ids: list[int]) -> list[KernelLaunch]:
    """The kernel launches of one PrimFunc's host side: buffer declarations, then call_ffi_kernel calls."""
    func = host[name]
    if len(func.params) != len(buffer_ids):
        raise LaunchPlanError(f"{name}: {len(func.params)} parameters, {len(buffer_ids)} arguments")
    where = {param: buffer for param, buffer in zip(func.params, buffer_ids)}
    launches = []
    for stmt in func.body.seq if isinstance(func.body, tirx.SeqStmt) else [func.body]:
        if isinstance(stmt, tirx.DeclBuffer):  # a flattened view of a parameter
            where[stmt.buffer] = _buffer_arg(stmt.data, where, name)
        elif isinstance(stmt, tirx.Evaluate) and getattr(stmt.value.op, "name", "") == "tirx.call_ffi_kernel":
            launches.append(_launch(stmt.value, where, name))
        else:
            raise LaunchPlanError(f"{name}: host statement {type(stmt).__name__} is not a buffer view or kernel launch")
    return launches


def _buffer_arg(expr: tirx.PrimExpr, where: dict, func: str) -> int:
    if getattr(getattr(expr, "op", None), "name", "") == "tirx.buffer_data" and expr.args[0] in where:
        return where[expr.args[0]]
    raise LaunchPlanError(f"{func}: kernel argument {expr} is not the data of a parameter")


def _launch(call: tirx.Call, where: dict, func: str) -> KernelLaunch:
    tags = [str(tag) for tag in call.attrs.launch_params]
    values = call.args[len(call.args) - len(tags):]
    groups, group_size = [1, 1, 1], [1, 1, 1]
    for tag, value in zip(tags, values):
        match = re.fullmatch(r"(blockIdx|threadIdx)\.([xyz])", tag)
        if match is None or not isinstance(value, tirx.IntImm):
            raise LaunchPlanError(f"{func}: launch parameter {tag} = {value} is not a static work size")
        sizes = groups if match.group(1) == "blockIdx" else group_size
        sizes["xyz".index(match.group(2))] = int(value.value)
    dims = max(("xyz".index(tag[-1]) + 1 for tag in tags), default=1)
    buffers = tuple(_buffer_arg(arg, where, func) for arg in call.args[1 : len(call.args) - len(tags)])
    return KernelLaunch(
        kernel=str(call.args[0].value),
        buffers=buffers,
        global_size=tuple(groups[d] * group_size[d] for d in range(dims)),
        local_size=tuple(group_size[:dims]),
    )
