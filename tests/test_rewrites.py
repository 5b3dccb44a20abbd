"""compile/rewrites.py: an output tanh moves ahead of the interleave feeding it, pads join convolutions; exactly."""

from __future__ import annotations

import numpy as np
import pytest
import torch
import torch.nn.functional as F
import tvm
from torch import nn
from tvm import relax

from compile.build import with_default_schedules
from compile.onnx_import import onnx_to_relax
from compile.passes import prepare
from compile.rewrites import fuse_friendly, subpixel_transposed_convs
from compile.torch_import import torch_to_relax

pytestmark = pytest.mark.usefixtures("one_torch_thread")


class PhasesThenTanh(nn.Module):
    """Four padded 2x2 convolutions stacked and pixel-shuffled, then tanh: a sub-pixel output layer."""

    def __init__(self, also_return_interleaved: bool = False) -> None:
        super().__init__()
        self.convs = nn.ModuleList(nn.Conv2d(8, 3, 2) for _ in range(4))
        self.also_return_interleaved = also_return_interleaved

    def forward(self, x):
        pads = [(1, 0, 1, 0), (0, 1, 1, 0), (1, 0, 0, 1), (0, 1, 0, 1)]  # (left, right, top, bottom) per phase
        phases = torch.stack([conv(F.pad(x, pad)) for conv, pad in zip(self.convs, pads)], dim=2)
        phases = phases.reshape(1, 12, 16, 16)
        interleaved = F.pixel_shuffle(phases, 2)
        return (torch.tanh(interleaved), interleaved) if self.also_return_interleaved else torch.tanh(interleaved)


def _kernel_names(mod: tvm.IRModule) -> list[str]:
    return [gvar.name_hint for gvar, func in mod.functions_items() if isinstance(func, tvm.tirx.PrimFunc)]


def test_tanh_joins_the_convolutions_and_the_output_is_unchanged(host_target):
    torch.manual_seed(0)
    net = PhasesThenTanh().eval()
    moved = fuse_friendly(torch_to_relax(net, (1, 8, 16, 16), "phases"))[1]
    assert moved == 1
    prepared = prepare(torch_to_relax(net, (1, 8, 16, 16), "phases"), host_target)
    names = _kernel_names(prepared)
    assert sum("conv2d" in name and "tanh" in name for name in names) == 4  # a kernel per phase padding
    assert not any("transpose" in name and "tanh" in name for name in names)
    assert not any(name.startswith("pad") for name in names)  # each phase's pad is its conv's padding
    x = np.random.default_rng(0).uniform(-2, 2, (1, 8, 16, 16)).astype("float32")
    vm = relax.VirtualMachine(tvm.compile(with_default_schedules(prepared, host_target), host_target), tvm.cpu())
    with torch.inference_mode():
        expected = net(torch.from_numpy(x)).numpy()
    assert np.abs(vm["main"](tvm.runtime.tensor(x)).numpy() - expected).max() < 1e-5


def test_a_rearrangement_read_elsewhere_stays_where_it_is():
    net = PhasesThenTanh(also_return_interleaved=True).eval()
    assert fuse_friendly(torch_to_relax(net, (1, 8, 16, 16), "phases"))[1] == 0


@pytest.mark.parametrize("pad, folded", [((1, 0, 2, 0), 1), ((1, 1, 1, 1), 1), ((-1, 0, 0, 0), 0)])
def test_zero_pads_become_conv_padding(pad, folded, host_target):
    """Any non-negative zero pad folds (asymmetric too); a crop (negative pad) stays."""
    torch.manual_seed(0)
    conv = nn.Conv2d(4, 8, 3).eval()

    class PadThenConv(nn.Module):
        def forward(self, x):
            return conv(F.pad(x, pad))

    mod = torch_to_relax(PadThenConv(), (1, 4, 9, 9), "pad")
    assert fuse_friendly(mod)[2] == folded
    x = np.random.default_rng(0).uniform(-1, 1, (1, 4, 9, 9)).astype("float32")
    vm = relax.VirtualMachine(tvm.compile(with_default_schedules(prepare(mod, host_target), host_target), host_target), tvm.cpu())
    with torch.inference_mode():
        expected = PadThenConv()(torch.from_numpy(x)).numpy()
    assert np.abs(vm["main"](tvm.runtime.tensor(x)).numpy() - expected).max() < 1e-5


@pytest.mark.parametrize("convt, shape", [
    (nn.ConvTranspose2d(8, 4, 3, stride=2, padding=1, output_padding=1), (1, 8, 6, 7)),  # CycleGAN's decoder
    (nn.ConvTranspose2d(8, 4, 4, stride=2, padding=1), (1, 8, 5, 5)),  # U-Net's
    (nn.ConvTranspose2d(6, 3, 3, stride=3, bias=False), (1, 6, 4, 4)),  # stride 3, no bias
])
def test_onnx_transposed_convolutions_become_exact_subpixel_phases(convt, shape, tmp_path, host_target):
    torch.manual_seed(0)
    net = nn.Sequential(convt, nn.Tanh()).eval()
    path = tmp_path / "convt.onnx"
    torch.onnx.export(net, (torch.zeros(shape),), str(path), input_names=["x"], opset_version=17, dynamo=False)
    mod, rewritten, phases = subpixel_transposed_convs(onnx_to_relax(path))
    stride = convt.stride[0]
    assert (rewritten, phases) == (1, stride * stride)
    script = mod["main"].script()
    assert "conv2d_transpose" not in script
    assert script.count("R.add(") == (phases if convt.bias is not None else 0)  # the bias on each phase
    x = np.random.default_rng(0).uniform(-1, 1, shape).astype("float32")
    vm = relax.VirtualMachine(tvm.compile(prepare(mod, host_target), host_target), tvm.cpu())
    with torch.inference_mode():
        expected = net(torch.from_numpy(x)).numpy()
    assert np.abs(vm["main"](tvm.runtime.tensor(x)).numpy() - expected).max() < 1e-5


def test_grouped_transposed_convolutions_stay_as_they_are(tmp_path):
    path = tmp_path / "grouped.onnx"
    torch.onnx.export(nn.ConvTranspose2d(4, 4, 3, stride=2, groups=2).eval(), (torch.zeros(1, 4, 5, 5),), str(path),
                      input_names=["x"], opset_version=17, dynamo=False)
    assert subpixel_transposed_convs(onnx_to_relax(path))[1:] == (0, 0)


@pytest.mark.parametrize("index, folded", [(2, True), (7, False)])  # 7: out of bounds, left to fail as it would
def test_a_take_of_constants_becomes_the_row_it_selects(index, folded):
    """A conditional instance norm's scale for its style: folded, so legalization never meets a take
    in TOPI's "fast" mode (which printed a segfault warning per take on every style-transfer build)."""
    table = np.arange(12, dtype=np.float32).reshape(4, 3)
    builder = relax.BlockBuilder()
    x = relax.Var("x", relax.TensorType((3,), "float32"))
    with builder.function("main", [x]):
        with builder.dataflow():
            row = builder.emit(relax.op.take(relax.const(table), relax.const(index, "int64"), axis=0))
            out = builder.emit_output(relax.op.add(x, row))
        builder.emit_func_output(out)
    rewritten = fuse_friendly(builder.get())[0]
    values = [b.value for block in rewritten["main"].body.blocks for b in block.bindings]
    takes = [v for v in values if isinstance(v, relax.Call) and v.op == tvm.ir.Op.get("relax.take")]
    constants = [v.value.numpy() for v in values if isinstance(v, tvm.ir.GenericConst)]
    assert bool(takes) != folded and bool(constants) == folded
    if folded:
        np.testing.assert_array_equal(constants[0], table[index])
