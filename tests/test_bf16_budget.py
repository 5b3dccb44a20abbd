"""compile/bf16_budget.py: the torch simulation of a bf16 build is what the build computes, and the
calibration gives wide Winograd convs bf16 products only within the model's error budget."""

from __future__ import annotations

import numpy as np
import pytest
import torch
import tvm
from tvm import relax

import targets
from compile import BF16_WIDE_ATTR, bf16, bf16_budget
from compile.passes import float_lanes, prepare
from compile.pipeline import relax_for_target
from compile.schedules.winograd import winograd_convs
from compile.torch_import import torch_to_relax
from conftest import model_under_test
from lwgan_models.compression.evaluate import psnr_db
from test_bf16 import library, needs_bf16

WIDE = bf16.WINOGRAD_MAX_CHANNELS + 8  # even, and over the limit: calibrated


@pytest.fixture(scope="module")
def bf16_host():
    return targets.resolve(targets.load_target("host"), isa_level="avx512bf16")


class WideTrunk(torch.nn.Module):
    """Three residual blocks of wide 3x3 convs at 32x32 (64 Winograd tiles), as the ngf64 teacher's trunk."""

    def __init__(self, blocks: int = 3) -> None:
        super().__init__()
        self.stem = torch.nn.Conv2d(3, WIDE, 3, padding=1)
        self.blocks = torch.nn.ModuleList(
            torch.nn.Sequential(torch.nn.ReflectionPad2d(1), torch.nn.Conv2d(WIDE, WIDE, 3), torch.nn.InstanceNorm2d(WIDE),
                                torch.nn.ReLU(), torch.nn.ReflectionPad2d(1), torch.nn.Conv2d(WIDE, WIDE, 3),
                                torch.nn.InstanceNorm2d(WIDE))
            for _ in range(blocks))
        self.head = torch.nn.Conv2d(WIDE, 3, 3, padding=1)

    def forward(self, x):
        y = self.stem(x)
        for block in self.blocks:
            y = y + block(y)
        return torch.tanh(self.head(y))


def wide_trunk() -> WideTrunk:
    torch.manual_seed(0)
    return WideTrunk().eval()


@needs_bf16
def test_simulated_winograd_conv_is_the_built_kernel(bf16_host, tmp_path):
    """The simulation rounds what the build rounds: it sits 100x closer to the built conv than either to torch."""
    torch.manual_seed(0)
    conv = torch.nn.Conv2d(64, 48, 3, padding=1).eval()
    shape = (2, 64, 32, 32)
    target = bf16_host.tvm_target
    mod, rewritten = winograd_convs(torch_to_relax(torch.nn.Sequential(conv), shape, "conv"), float_lanes(target),
                                    bf16_products=True)
    assert rewritten == 1
    x = np.random.default_rng(1).standard_normal(shape).astype("float32")
    built = relax.VirtualMachine(library(mod, target, tmp_path), tvm.cpu())["main"](tvm.runtime.tensor(x)).numpy()
    with torch.inference_mode():
        simulated = bf16_budget.winograd_bf16(conv, torch.from_numpy(x)).numpy()
        exact = conv(torch.from_numpy(x)).numpy()
    rounding = np.abs(built - exact).max()
    assert rounding > 1e-3 * np.abs(exact).max()  # bf16 products, not float32 ones
    assert np.abs(simulated - built).max() < 1e-2 * rounding


def test_calibration_chooses_the_least_harmful_wide_convs_within_the_budget(monkeypatch):
    model = wide_trunk()
    shape = (1, 3, 32, 32)
    lenient = bf16_budget.calibrate(model, shape)
    assert lenient.wide == 6 and lenient.simulated_psnr_db >= bf16_budget.TARGET_PSNR_DB
    # A budget between "none" and "all": a strict, non-empty subset, and the simulated build keeps it.
    monkeypatch.setattr(bf16_budget, "TARGET_PSNR_DB", lenient.simulated_psnr_db + 6.0)
    strict = bf16_budget.calibrate(model, shape)
    assert len(strict.chosen) < len(lenient.chosen)
    assert strict.simulated_psnr_db >= bf16_budget.TARGET_PSNR_DB
    assert f"{len(strict.chosen)} of 6 Winograd convs" in strict.describe()
    monkeypatch.setattr(bf16_budget, "TARGET_PSNR_DB", 200.0)  # beyond even float32 Winograd: none
    assert bf16_budget.calibrate(model, shape).chosen == frozenset()


def test_a_model_without_wide_convs_or_rgb_input_needs_no_calibration():
    narrow = torch.nn.Sequential(torch.nn.Conv2d(3, 64, 3, padding=1), torch.nn.Conv2d(64, 64, 3, padding=1)).eval()
    assert bf16_budget.calibrate(narrow, (1, 3, 32, 32)).wide == 0
    grey = torch.nn.Sequential(torch.nn.Conv2d(1, WIDE, 3, padding=1), torch.nn.Conv2d(WIDE, WIDE, 3, padding=1)).eval()
    budget = bf16_budget.calibrate(grey, (1, 1, 32, 32))
    assert budget.wide == 1 and budget.chosen == frozenset() and "not" in budget.describe()


@needs_bf16
def test_bf16_build_multiplies_exactly_the_calibrated_wide_convs_in_bf16(bf16_host, monkeypatch, tmp_path):
    model = model_under_test(wide_trunk(), (1, 3, 32, 32), "wide-trunk", cache=tmp_path)
    images = bf16_budget.calibration_images(model.input_shape)
    monkeypatch.setattr(bf16_budget, "TARGET_PSNR_DB", 0.0)
    everything = bf16_budget.calibrate(model.torch_module, model.input_shape)
    monkeypatch.setattr(bf16_budget, "TARGET_PSNR_DB", everything.simulated_psnr_db + 6.0)
    mod = relax_for_target(model, bf16_host, "bf16")()
    chosen = {str(d) for d in mod.attrs[BF16_WIDE_ATTR]}
    assert 0 < len(chosen) < 6
    prepared = prepare(mod, bf16_host.tvm_target)
    calls = [b.value.args[0].name_hint for f in prepared.functions.values() if isinstance(f, relax.Function)
             for block in f.body.blocks for b in block.bindings
             if isinstance(b.value, relax.Call) and b.value.op.name == "relax.call_tir"]
    assert sum(name.startswith("winograd_products_bf16") for name in calls) == len(chosen)
    assert sum(name.startswith("winograd_products") and "bf16" not in name for name in calls) == 6 - len(chosen)
    # The built model's error on the calibration photos is the one the simulation predicted.
    lib = library(prepared, bf16_host.tvm_target, tmp_path)
    vm = relax.VirtualMachine(lib, tvm.cpu())
    with torch.inference_mode():
        reference = model.torch_module(images)
    built = torch.cat([torch.from_numpy(vm["main"](tvm.runtime.tensor(image[None].numpy())).numpy()) for image in images])
    predicted = bf16_budget.calibrate(model.torch_module, model.input_shape).simulated_psnr_db
    measured = psnr_db(built, reference)
    assert abs(measured - predicted) < 1.0


def test_a_calibration_is_kept_and_an_unreadable_one_redone(monkeypatch, tmp_path):
    model, shape = wide_trunk(), (1, 3, 32, 32)
    runs = []
    real = bf16_budget.calibrate
    monkeypatch.setattr(bf16_budget, "calibrate", lambda *args: runs.append(args) or real(*args))
    first = bf16_budget.calibrated(model, shape, "wide-trunk|1", tmp_path)
    assert bf16_budget.calibrated(model, shape, "wide-trunk|1", tmp_path) == first and len(runs) == 1
    (entry,) = tmp_path.glob("bf16-budget-*.json")
    entry.write_text('{"chosen": [')  # cut short
    assert bf16_budget.calibrated(model, shape, "wide-trunk|1", tmp_path) == first and len(runs) == 2
    bf16_budget.calibrated(model, shape, "wide-trunk|2", tmp_path)  # another build version: its own entry
    assert len(runs) == 3 and len(list(tmp_path.glob("bf16-budget-*.json"))) == 2
