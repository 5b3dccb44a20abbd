"""compile/schedules/conv.py: the default schedule of untuned fp32 convolutions agrees with torch, and
leaves every other kernel to the rules after it."""

from __future__ import annotations

import numpy as np
import pytest
import torch
import tvm
from torch import nn
from tvm import relax, te, tirx, topi

from compile.build import with_default_schedules
from compile.passes import prepare
from compile.schedules.conv import PREPACKED, choose_tile, schedule_direct_conv
from compile.schedules.default import default_cpu_schedules
from compile.torch_import import torch_to_relax

TOLERANCE = 1e-5  # float32 sums of at most a few thousand products, in another order than torch's

pytestmark = pytest.mark.usefixtures("one_torch_thread")


def _conv_kernels(mod: tvm.IRModule) -> list[tvm.ir.GlobalVar]:
    return [gvar for gvar, func in mod.functions_items()
            if isinstance(func, tirx.PrimFunc) and "conv2d" in gvar.name_hint]


@pytest.mark.parametrize("lanes", [8, 16])  # AVX2, AVX-512: both compile for any x86-64 host
@pytest.mark.parametrize(
    "net, shape",
    [
        (nn.Conv2d(3, 16, 7), (1, 3, 22, 22)),  # a stem after its reflection pad: the padding block is a copy
        (nn.Sequential(nn.Conv2d(16, 3, 7, padding=3), nn.Tanh()), (1, 16, 16, 16)),  # RGB output, tanh epilogue
        (nn.Sequential(nn.Conv2d(16, 32, 3, stride=2, padding=1), nn.ReLU()), (1, 16, 32, 32)),  # downsampling
        (nn.Conv2d(8, 16, 4, stride=2, padding=1), (2, 8, 16, 16)),  # U-Net encoder conv, batch 2
        (nn.Conv2d(512, 32, 1), (1, 512, 8, 8)),  # many input channels: passes over a row buffer
        (nn.Conv2d(16, 16, 3, padding=1), (1, 16, 33, 33)),  # odd width: tiles of 11 (or 3) columns
        (nn.Conv2d(8, 3, 3, padding=1), (1, 8, 25, 25)),  # odd width, 3 channels: 3-lane channel vectors
        (nn.Conv2d(8, 8, (2, 1)), (1, 8, 9, 8)),  # a sub-pixel phase of a transposed conv
    ],
)
def test_scheduled_convs_match_torch(net, shape, lanes, host_target):
    torch.manual_seed(0)
    net = net.eval()
    for module in net.modules():
        if isinstance(module, nn.Conv2d):
            module.reset_parameters()
    prepared = prepare(torch_to_relax(net, shape, "conv"), host_target)
    (kernel,) = _conv_kernels(prepared)
    scheduled = schedule_direct_conv(prepared[kernel], lanes)
    assert scheduled is not None
    prepared[kernel] = scheduled.with_attr("tirx.is_scheduled", True)
    x = np.random.default_rng(0).uniform(-1, 1, shape).astype("float32")
    vm = relax.VirtualMachine(tvm.compile(prepared, host_target), tvm.cpu())
    got = vm["main"](tvm.runtime.tensor(x)).numpy()
    with torch.inference_mode():
        expected = net(torch.from_numpy(x)).numpy()
    assert np.abs(got - expected).max() < TOLERANCE


def test_tiles_follow_the_output_shape():
    """Wide RGB outputs vectorize pixels; many output channels vectorize channels; 3 channels of an
    odd width fall back to 3-lane channel vectors rather than a scalar tail."""
    assert choose_tile(3, 256, 256, 7, True, 16).axis == "pixels"
    assert choose_tile(128, 64, 64, 1, True, 16).axis == "channels"
    assert choose_tile(64, 128, 128, 3, False, 16).axis == "channels"  # stride 2: no contiguous pixel vectors
    assert choose_tile(3, 25, 25, 3, True, 16).vector == 3


def _te_conv(dtype: str, out_dtype: str) -> tirx.PrimFunc:
    data = te.placeholder((1, 8, 16, 16), dtype, "data")
    weight = te.placeholder((16, 8, 3, 3), dtype, "weight")
    return te.create_prim_func([data, weight, topi.nn.conv2d_nchw(data, weight, 1, 1, 1, out_dtype=out_dtype)])


def test_te_float_conv_is_scheduled():
    """The same computation written by TOPI directly: what the two rejections below differ from."""
    assert schedule_direct_conv(_te_conv("float32", "float32"), 16) is not None


def test_integer_and_non_conv_kernels_are_left_alone(host_target):
    """int8 convs belong to compile/int8/lowering.py's kernels; a matmul or a grouped conv is not this loop nest."""
    assert schedule_direct_conv(_te_conv("int8", "int32"), 16) is None
    a, b = te.placeholder((64, 32), "float32", "a"), te.placeholder((32, 48), "float32", "b")
    assert schedule_direct_conv(te.create_prim_func([a, b, topi.matmul(a, b)]), 16) is None
    grouped = prepare(torch_to_relax(nn.Conv2d(8, 8, 3, groups=2).eval(), (1, 8, 10, 10), "conv"), host_target)
    (kernel,) = _conv_kernels(grouped)
    assert schedule_direct_conv(grouped[kernel], 16) is None


class SqueezeExcite(nn.Module):
    """A MobileNetV3 gate: a 1x1 conv on the pooled features, hard-sigmoid, times the feature map."""

    def __init__(self):
        super().__init__()
        self.gate = nn.Conv2d(8, 8, 1)

    def forward(self, x):
        return x * nn.functional.hardsigmoid(self.gate(x.mean((2, 3), keepdim=True)))


def test_a_broadcasting_epilogue_keeps_tvms_loops_and_the_model_still_builds(host_target):
    torch.manual_seed(0)
    net, shape = SqueezeExcite().eval(), (1, 8, 6, 6)
    prepared = prepare(torch_to_relax(net, shape, "se"), host_target)
    (kernel,) = _conv_kernels(prepared)
    assert schedule_direct_conv(prepared[kernel], 16) is None  # the gate's multiply writes 8x6x6, the conv 8x1x1
    x = np.random.default_rng(0).uniform(-1, 1, shape).astype("float32")
    vm = relax.VirtualMachine(tvm.compile(with_default_schedules(prepared, host_target), host_target), tvm.cpu())
    with torch.inference_mode():
        expected = net(torch.from_numpy(x)).numpy()
    assert np.abs(vm["main"](tvm.runtime.tensor(x)).numpy() - expected).max() < TOLERANCE


def test_weights_are_packed_once_at_build_time(host_target):
    """A tile along the channels reads packed weights: the build packs the constant weights, and
    the kernel that runs per inference no longer does."""
    torch.manual_seed(0)
    net = nn.Conv2d(64, 64, 4, stride=2, padding=1).eval()  # an 8x8 output: vectors of channels
    built = with_default_schedules(prepare(torch_to_relax(net, (1, 64, 16, 16), "conv"), host_target), host_target)
    kernels = [gvar.name_hint for gvar, func in built.functions_items() if isinstance(func, tirx.PrimFunc)]
    assert any(name.endswith(PREPACKED) for name in kernels)
    assert "weight_prepack" not in built["main"].script()  # folded into a constant
    x = np.random.default_rng(0).uniform(-1, 1, (1, 64, 16, 16)).astype("float32")
    vm = relax.VirtualMachine(tvm.compile(built, host_target), tvm.cpu())
    with torch.inference_mode():
        expected = net(torch.from_numpy(x)).numpy()
    assert np.abs(vm["main"](tvm.runtime.tensor(x)).numpy() - expected).max() < TOLERANCE


def test_instance_norm_schedule_runs_its_channels_in_parallel_and_matches_torch(host_target):
    """Legalized at batch 1, the norm's statistics drop the batch axis: the schedule still splits the
    channels over the cores (not the unit batch loop) and computes the same values."""
    norm = torch.nn.Sequential(torch.nn.InstanceNorm2d(32, affine=True), torch.nn.ReLU()).eval()
    with torch.no_grad():
        norm[0].weight.uniform_(0.5, 1.5), norm[0].bias.uniform_(-0.5, 0.5)
    shape = (1, 32, 64, 64)
    prepared = prepare(torch_to_relax(norm, shape, "norm"), host_target)
    [(gvar, func)] = [(g, f) for g, f in prepared.functions_items() if "instance_norm" in g.name_hint]
    scheduled = default_cpu_schedules(prepared, host_target)[gvar]
    assert _parallel_loops(scheduled) == {32}
    x = np.random.default_rng(0).standard_normal(shape).astype(np.float32)
    out = relax.VirtualMachine(tvm.compile(default_cpu_schedules(prepared, host_target), host_target), tvm.cpu())
    with torch.no_grad():
        expected = norm(torch.from_numpy(x)).numpy()
    np.testing.assert_allclose(out["main"](tvm.runtime.tensor(x)).numpy(), expected, atol=1e-4)


def _parallel_loops(func) -> set[int]:
    """Extents of the parallel loops around any block of `func`."""
    sch = tvm.s_tir.Schedule(func)
    blocks = sch.get_child_blocks(sch.get_sblock("root"))
    return {int(sch.get(loop).extent) for block in blocks for loop in sch.get_loops(block)
            if sch.get(loop).kind == tvm.tirx.ForKind.PARALLEL}


@pytest.mark.parametrize("batch_in_statistics", [True, False])
def test_channel_statistics_run_in_parallel_whichever_axes_they_keep(batch_in_statistics):
    """A norm's statistics of shape (N, C) (ONNX's instance norm) or (C,) (torch's, legalized at batch 1):
    either way the output's batch and channel loops are the parallel ones, and the values are right."""
    from compile.schedules.norm import schedule_channel_reduction

    shape = (1, 16, 32, 32)
    data = te.placeholder(shape, "float32", name="data")
    h, w = te.reduce_axis((0, 32), "h"), te.reduce_axis((0, 32), "w")
    if batch_in_statistics:
        sums = te.compute((1, 16), lambda n, c: te.sum(data[n, c, h, w], axis=[h, w]), name="sums")
        mean = lambda n, c: sums[n, c]
    else:
        n_axis = te.reduce_axis((0, 1), "n")
        sums = te.compute((16,), lambda c: te.sum(data[n_axis, c, h, w], axis=[n_axis, h, w]), name="sums")
        mean = lambda n, c: sums[c]
    out = te.compute(shape, lambda n, c, y, x: data[n, c, y, x] - mean(n, c) / 1024.0, name="out")
    scheduled = schedule_channel_reduction(te.create_prim_func([data, out]), 16)
    assert scheduled is not None and _parallel_loops(scheduled) == {16}
    x = np.random.default_rng(0).standard_normal(shape).astype(np.float32)
    result = tvm.runtime.tensor(np.zeros(shape, np.float32))
    tvm.compile(tvm.IRModule({"main": scheduled.with_attr("global_symbol", "main")}), "llvm")["main"](
        tvm.runtime.tensor(x), result)
    np.testing.assert_allclose(result.numpy(), x - x.mean(axis=(2, 3), keepdims=True), atol=1e-5)
