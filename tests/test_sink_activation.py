"""compile/sink_activation.py: an output tanh moves ahead of the interleave feeding it, exactly."""

from __future__ import annotations

import numpy as np
import pytest
import torch
import torch.nn.functional as F
import tvm
from torch import nn
from tvm import relax

import targets
from compile.build import with_default_schedules
from compile.sink_activation import sink_activations
from compile.torch_import import torch_to_relax
from compile.tuning import prepare

pytestmark = pytest.mark.usefixtures("one_torch_thread")


class PhasesThenTanh(nn.Module):
    """Two convolutions stacked and pixel-shuffled, then tanh: a sub-pixel output layer's shape."""

    def __init__(self, also_return_interleaved: bool = False) -> None:
        super().__init__()
        self.convs = nn.ModuleList(nn.Conv2d(8, 3, 2) for _ in range(4))
        self.also_return_interleaved = also_return_interleaved

    def forward(self, x):
        phases = torch.stack([conv(x) for conv in self.convs], dim=2).reshape(1, 12, 15, 15)
        interleaved = F.pixel_shuffle(phases, 2)
        return (torch.tanh(interleaved), interleaved) if self.also_return_interleaved else torch.tanh(interleaved)


@pytest.fixture(scope="module")
def host():
    return targets.resolve(targets.load_target("host")).tvm_target


def _kernel_names(mod: tvm.IRModule) -> list[str]:
    return [gvar.name_hint for gvar, func in mod.functions_items() if isinstance(func, tvm.tirx.PrimFunc)]


def test_tanh_joins_the_convolutions_and_the_output_is_unchanged(host):
    torch.manual_seed(0)
    net = PhasesThenTanh().eval()
    moved = sink_activations(torch_to_relax(net, (1, 8, 16, 16), "phases"))[1]
    assert moved == 1
    prepared = prepare(torch_to_relax(net, (1, 8, 16, 16), "phases"), host)
    names = _kernel_names(prepared)
    assert any("conv2d" in name and "tanh" in name for name in names)  # the four phases share one kernel
    assert not any("transpose" in name and "tanh" in name for name in names)
    x = np.random.default_rng(0).uniform(-2, 2, (1, 8, 16, 16)).astype("float32")
    vm = relax.VirtualMachine(tvm.compile(with_default_schedules(prepared, host), host), tvm.cpu())
    with torch.inference_mode():
        expected = net(torch.from_numpy(x)).numpy()
    assert np.abs(vm["main"](tvm.runtime.tensor(x)).numpy() - expected).max() < 1e-5


def test_a_rearrangement_read_elsewhere_stays_where_it_is():
    net = PhasesThenTanh(also_return_interleaved=True).eval()
    assert sink_activations(torch_to_relax(net, (1, 8, 16, 16), "phases"))[1] == 0
