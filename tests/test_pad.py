"""compile/schedules/pad.py: torch's reflection pads become one kernel that pads exactly as torch does."""

from __future__ import annotations

import numpy as np
import pytest
import torch
import tvm
from tvm import relax

from compile.schedules.pad import reflection_pads
from compile.torch_import import torch_to_relax


def _ops(mod: tvm.IRModule) -> list[str]:
    return [binding.value.op.name for func in mod.functions.values() if isinstance(func, relax.Function)
            for block in func.body.blocks for binding in block.bindings
            if isinstance(binding.value, relax.Call) and isinstance(binding.value.op, tvm.ir.Op)]


@pytest.mark.parametrize("pad, shape", [
    (3, (1, 3, 20, 37)),  # a generator's first 7x7 conv: RGB, odd width
    (1, (2, 5, 8, 16)),  # batch; a residual block's pad
    (2, (1, 4, 3, 6)),  # a pad of nearly the whole height
])
def test_reflection_pad_kernel_matches_torch(pad, shape, host_target):
    net = torch.nn.ReflectionPad2d(pad).eval()
    mod, replaced = reflection_pads(torch_to_relax(net, shape, "pad"))
    assert replaced == 1 and "relax.take" not in _ops(mod)
    x = np.random.default_rng(0).standard_normal(shape).astype(np.float32)
    got = relax.VirtualMachine(tvm.compile(mod, host_target), tvm.cpu())["main"](tvm.runtime.tensor(x)).numpy()
    np.testing.assert_array_equal(got, net(torch.from_numpy(x)).numpy())


def test_other_gathers_are_left_alone():
    mod = torch_to_relax(torch.nn.ReplicationPad2d(1).eval(), (1, 2, 6, 6), "replicate")
    before = _ops(mod)
    assert before.count("relax.take") == 2  # a take along each axis, as for a reflection
    rewritten, replaced = reflection_pads(mod)
    assert replaced == 0 and _ops(rewritten) == before
