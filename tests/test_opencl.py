"""compile/backends/opencl.py: generators built for the Mali board (rock5b) as OpenCL.

Every kernel of the generated source must build with pocl (a real OpenCL C compiler), the library
for the board and the .cl file are written, and the kernels run on pocl in TVM's launch order match
torch. The smallest shipped generator runs by default; the full-width demo generators are slow
(about a minute of TVM compilation each on this machine) and run with `-m slow`.
"""

from __future__ import annotations

import dataclasses
import re
import shutil

import numpy as np
import pytest
import torch
import tvm
from tvm import relax

import targets
from compile.backends import opencl
from compile.pipeline import from_registry, from_variant
from errors import UserError
from lwgan_models import load
from lwgan_models.registry import find_variant

pytest.importorskip("pyopencl", reason="pyopencl with pocl (pip install 'pyopencl[pocl]') checks the kernels")
CROSS_CC = "aarch64-linux-gnu-g++"
needs_cross = pytest.mark.skipif(shutil.which(CROSS_CC) is None, reason=f"{CROSS_CC} (apt g++-aarch64-linux-gnu) links the board's library")

# name -> input shape: small images keep the kernels' run on pocl short; the U-Net's 7 downsamplings need 128 px.
DEMO_MODELS = {
    "cyclegan-resnet6-ngf16+kd": (1, 3, 32, 32),
    "cyclegan-resnet6-ngf16": (1, 3, 32, 32),
    "cyclegan-unet128-ngf16": (1, 3, 128, 128),
    "nst-cin4-w16": (1, 3, 32, 32),
}
DEFAULT_MODEL = "cyclegan-resnet6-ngf16+kd"
EM_AARCH64 = 183  # ELF e_machine


def model_under_test(name: str, shape: tuple[int, ...]):
    return from_variant(find_variant(name), shape) if "+" in name else from_registry(load(name), shape)


@pytest.fixture(scope="module")
def rock5b():
    return targets.resolve(targets.load_target("rock5b"))


@pytest.fixture(
    scope="module",
    params=[pytest.param(name, marks=() if name == DEFAULT_MODEL else pytest.mark.slow) for name in DEMO_MODELS],
)
def built(request, rock5b, tmp_path_factory):
    if shutil.which(CROSS_CC) is None:
        pytest.skip(f"{CROSS_CC} (apt g++-aarch64-linux-gnu) links the board's library")
    model = model_under_test(request.param, DEMO_MODELS[request.param])
    artifact = opencl.build_opencl(model, rock5b, tmp_path_factory.mktemp("opencl"))
    return model, artifact, opencl.build_kernels(artifact.source_file)


def test_every_kernel_is_written_embedded_and_builds_with_pocl(built):
    model, artifact, kernels = built
    shape = "x".join(map(str, model.input_shape))
    assert artifact.library.name == f"{model.name}-{shape}.so" and artifact.source_file.name == f"{model.name}-{shape}.cl"
    library = artifact.library.read_bytes()
    assert library[:4] == b"\x7fELF" and int.from_bytes(library[18:20], "little") == EM_AARCH64
    source = artifact.source_file.read_text(encoding="utf-8")
    defined = re.findall(r"^__kernel void (\w+)\([^;]*\{$", source, flags=re.MULTILINE)
    assert len(defined) == len(set(defined)) == len(artifact.kernels) > 10
    assert set(defined) == set(artifact.kernels) == set(kernels)
    assert library.count(opencl.KERNEL_MARKER.encode()) == len(artifact.kernels)  # the board gets this source
    # Every launch has its kernel. Not every kernel is launched: TVM turns a call to a PrimFunc that only
    # copies (a zero-width pad) into a view of its input, yet still compiles the PrimFunc.
    assert {launch.kernel for launch in artifact.plan.launches} <= set(artifact.kernels)


def test_kernels_run_on_pocl_in_launch_order_match_torch(built, one_torch_thread):
    model, artifact, kernels = built
    x = np.random.default_rng(0).uniform(-1, 1, model.input_shape).astype(np.float32)
    with torch.no_grad():
        expected = model.torch_module(torch.from_numpy(x)).numpy()
    got = opencl.run_on_pocl(artifact, x, kernels)
    assert got.shape == expected.shape
    assert np.abs(got - expected).max() <= 2e-3  # the suite's fp32 rule on [-1, 1] images
    assert np.abs(expected).max() > 0.1  # a real image, not a constant that any kernel could produce


def test_wrong_input_for_the_pocl_run_is_a_user_error(built):
    model, artifact, kernels = built
    with pytest.raises(UserError, match=re.escape(f"the build takes {model.input_shape} float32")):
        opencl.run_on_pocl(artifact, np.zeros((1, 3, 8, 8), np.float32), kernels)


def test_launching_a_kernel_the_source_lacks_is_named(built):
    model, artifact, kernels = built
    first = artifact.plan.launches[0].kernel
    fewer = {name: kernel for name, kernel in kernels.items() if name != first}
    with pytest.raises(opencl.LaunchPlanError, match=f"launches kernels it lacks: {first}$"):
        opencl.run_on_pocl(artifact, np.zeros(model.input_shape, np.float32), fewer)


def test_without_the_compilation_states_there_is_no_plan_but_a_clear_error(built):
    _, artifact, _ = built
    bare = dataclasses.replace(artifact, graph=None)
    assert bare == artifact  # the compilation states are not part of the artifact's identity
    with pytest.raises(opencl.LaunchPlanError, match="no longer runs RewriteDataflowReshape and tirx.SplitHostDevice"):
        _ = bare.plan


def test_a_kernel_that_does_not_build_is_named(tmp_path):
    good = "__kernel void fine_kernel(__global float* restrict a) {\n  a[get_global_id(0)] = 1.0f;\n}\n"
    bad = "__kernel void broken_kernel(__global float* restrict a) {\n  a[get_global_id(0)] = undeclared_value;\n}\n"
    path = tmp_path / "model.cl"
    path.write_text(f"{opencl.KERNEL_MARKER}fine_kernel\n{good}\n{opencl.KERNEL_MARKER}broken_kernel\n{bad}")
    with pytest.raises(opencl.KernelBuildError) as info:
        opencl.build_kernels(path)
    message = str(info.value)
    assert message.startswith(f"{path}: kernel 'broken_kernel' does not build with pocl: ")
    assert "undeclared_value" in message and "\n" not in message
    path.write_text(f"{opencl.KERNEL_MARKER}fine_kernel\n{good}")
    assert list(opencl.build_kernels(path)) == ["fine_kernel"]


@pytest.fixture(scope="module")
def uncompiled():
    """A model whose compilation fails the test: errors must come before minutes of compiling."""
    model = model_under_test(DEFAULT_MODEL, DEMO_MODELS[DEFAULT_MODEL])
    return dataclasses.replace(model, make_relax=lambda: pytest.fail("compiled before the target was checked"))


def test_cpu_target_is_refused(uncompiled, tmp_path):
    host = targets.resolve(targets.load_target("host"))
    with pytest.raises(UserError, match="target 'host' is of kind 'llvm'; an OpenCL build needs an opencl target"):
        opencl.build_opencl(uncompiled, host, tmp_path)
    assert not list(tmp_path.iterdir())


def test_missing_cross_compiler_is_named(uncompiled, tmp_path):
    path = tmp_path / "gpu-board.toml"
    text = (targets.config.TARGETS_DIR / "rock5b.toml").read_text(encoding="utf-8")
    path.write_text(text.replace(f'cc = "{CROSS_CC}"', 'cc = "no-such-aarch64-g++"'), encoding="utf-8")
    board = targets.resolve(targets.load_target(path))
    with pytest.raises(UserError, match=r"cross compiler 'no-such-aarch64-g\+\+' not found"):
        opencl.build_opencl(uncompiled, board, tmp_path / "out")
    assert not (tmp_path / "out").exists()


def _graph(inputs: int, body) -> tvm.IRModule:
    builder = relax.BlockBuilder()
    params = [relax.Var(f"x{i}", relax.TensorType((1, 4), "float32")) for i in range(inputs)]
    with builder.function("main", params):
        builder.emit_func_output(body(builder, *params))
    return builder.get()


def _add_in_dataflow(builder, x):
    with builder.dataflow():
        doubled = builder.emit_output(relax.op.add(x, x))
    return doubled


UNFOLLOWABLE_GRAPHS = {
    "op-not-lowered": (lambda: _graph(1, _add_in_dataflow), r"= relax.add is not a PrimFunc call or reshape"),
    "two-inputs": (lambda: _graph(2, lambda builder, x, y: x), r"expected one model input, found 2"),
    "tuple-output": (lambda: _graph(1, lambda builder, x: relax.Tuple([x, x])), r"the model returns Tuple, not one tensor"),
}


@pytest.mark.parametrize("case", sorted(UNFOLLOWABLE_GRAPHS))
def test_graph_the_runner_cannot_follow_is_named(case):
    make, message = UNFOLLOWABLE_GRAPHS[case]
    with pytest.raises(opencl.LaunchPlanError, match=message):
        opencl.launch_plan(make(), tvm.IRModule())


def test_missing_pocl_platform_says_how_to_install_it(monkeypatch):
    import pyopencl

    monkeypatch.setattr(pyopencl, "get_platforms", list)
    with pytest.raises(UserError, match=r"no Portable Computing Language \(pocl\) OpenCL platform \(found: none\); pip install"):
        opencl.pocl_context.__wrapped__()


def test_a_graph_without_computation_has_an_empty_source(rock5b):
    builder = relax.BlockBuilder()
    x = relax.Var("x", relax.TensorType((1, 4), "float32"))
    with builder.function("main", [x]):
        builder.emit_func_output(x)
    executable = tvm.compile(builder.get(), rock5b.tvm_target)
    assert opencl.opencl_source(executable.mod) == "" and opencl.kernel_sources("") == {}
