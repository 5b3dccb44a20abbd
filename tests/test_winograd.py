"""compile/schedules/winograd.py: Winograd F(4x4, 3x3) agrees with torch's direct convolution; only eligible convs change."""

from __future__ import annotations

import numpy as np
import pytest
import torch
import tvm
from tvm import relax
from tvm.s_tir import meta_schedule as ms

from compile.passes import float_lanes, prepare
from compile.schedules.winograd import winograd_convs
from compile.torch_import import torch_to_relax
from compile.tuning import hand_scheduled

# F(4x4, 3x3) in float32 with TOPI's points: ~1e-6 relative error; the tolerance is relative to the output's range.
RELATIVE_TOLERANCE = 2e-5


def _op_count(mod: tvm.IRModule, op: str) -> int:
    return sum(
        1
        for func in mod.functions.values()
        if isinstance(func, relax.Function)
        for binding in func.body.blocks[0].bindings
        if isinstance(binding.value, relax.Call) and getattr(binding.value.op, "name", "") == op
    )


@pytest.mark.parametrize(
    "batch, channels, out_channels, height, width, padding",
    [
        (1, 64, 64, 66, 18, 0),  # a trunk conv after its reflection pad; 4 tiles a row, 64 tiles
        (2, 32, 48, 20, 64, 1),  # batch, unequal channels, zero padding; 16 tiles a row: one 16-wide vector
        (1, 40, 32, 34, 34, 0),  # 8 tiles a row: two rows a 16-wide step (stacked)
        (1, 32, 32, 38, 34, 0),  # 8 tiles a row, 9 rows: an 8-wide step a row
        (1, 32, 32, 54, 22, 0),  # 5 tiles a row: scalar
    ],
)
def test_winograd_conv_matches_torch(batch, channels, out_channels, height, width, padding, host_target):
    torch.manual_seed(0)
    net = torch.nn.Sequential(torch.nn.Conv2d(channels, out_channels, 3, padding=padding), torch.nn.ReLU()).eval()
    shape = (batch, channels, height, width)
    mod, rewritten = winograd_convs(torch_to_relax(net, shape, "conv"), float_lanes(host_target))
    assert rewritten == 1 and _op_count(mod, "relax.nn.conv2d") == 0
    assert _op_count(mod, "relax.add") == 0  # the bias is added by the inverse transform
    x = np.random.default_rng(1).standard_normal(shape).astype("float32")
    vm = relax.VirtualMachine(tvm.compile(mod, host_target), tvm.cpu())
    got = vm["main"](tvm.runtime.tensor(x)).numpy()
    with torch.inference_mode():
        expected = net(torch.from_numpy(x)).numpy()
    assert got.shape == expected.shape
    assert np.abs(got - expected).max() <= RELATIVE_TOLERANCE * np.abs(expected).max()


@pytest.mark.parametrize("height, width, reads_pad", [
    (32, 32, True),  # a residual trunk at 128x128 input: 8 tiles a row, one vector step
    (16, 64, True),  # 16 tiles a row; taller than wide
    (32, 40, False),  # 10 tiles a row: several steps, so the pad stays a kernel of its own
])
def test_reflection_pad_is_read_by_the_data_transform(height, width, reads_pad, host_target):
    torch.manual_seed(0)
    net = torch.nn.Sequential(torch.nn.ReflectionPad2d(1), torch.nn.Conv2d(64, 48, 3), torch.nn.ReLU()).eval()
    shape = (1, 64, height, width)
    mod, rewritten = winograd_convs(torch_to_relax(net, shape, "conv"), float_lanes(host_target))
    assert rewritten == 1 and _op_count(mod, "relax.take") == (0 if reads_pad else 2)
    x = np.random.default_rng(1).standard_normal(shape).astype("float32")
    got = relax.VirtualMachine(tvm.compile(mod, host_target), tvm.cpu())["main"](tvm.runtime.tensor(x)).numpy()
    with torch.inference_mode():
        expected = net(torch.from_numpy(x)).numpy()
    assert np.abs(got - expected).max() <= RELATIVE_TOLERANCE * np.abs(expected).max()


@pytest.mark.parametrize(
    "conv, shape",
    [
        (torch.nn.Conv2d(64, 64, 3, stride=2, padding=1), (1, 64, 16, 16)),  # strided
        (torch.nn.Conv2d(16, 16, 3, padding=1), (1, 16, 32, 32)),  # too few channels to pay off
        (torch.nn.Conv2d(64, 64, 3, padding=1), (1, 64, 16, 16)),  # 16 tiles: too few uses of each weight
        (torch.nn.Conv2d(64, 64, 3), (1, 64, 16, 16)),  # 14x14 output: not whole 4x4 tiles
        (torch.nn.Conv2d(64, 64, 1), (1, 64, 16, 16)),  # not 3x3
        (torch.nn.Conv2d(64, 64, 3, padding=2, dilation=2), (1, 64, 16, 16)),  # dilated
        (torch.nn.Conv2d(64, 64, 3, padding=1, groups=2), (1, 64, 16, 16)),  # grouped
    ],
)
def test_ineligible_convs_stay_direct(conv, shape, host_target):
    mod, rewritten = winograd_convs(torch_to_relax(conv.eval(), shape, "conv"), float_lanes(host_target))
    assert rewritten == 0 and _op_count(mod, "relax.nn.conv2d") == 1


def test_winograd_kernels_arrive_scheduled_and_are_not_tuned(host_target):
    net = torch.nn.Sequential(
        torch.nn.Conv2d(64, 64, 3, padding=1), torch.nn.ReLU(), torch.nn.Conv2d(64, 64, 3, padding=1)
    ).eval()
    tasks = ms.relax_integration.extract_tasks(prepare(torch_to_relax(net, (1, 64, 32, 32), "conv"), host_target), host_target)
    assert not any("conv2d" in t.task_name or "winograd" in t.task_name for t in tasks if not hand_scheduled(t))
    scheduled = [t.task_name for t in tasks if hand_scheduled(t)]
    for kernel in ("winograd_data_transform", "winograd_products", "winograd_inverse_transform"):
        assert any(name.startswith(kernel) for name in scheduled)
