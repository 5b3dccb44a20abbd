"""Generator families: a new one plugs in through `registry.register_family` alone, an unknown one is one line."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from torch import nn

from errors import UserError
from lwgan_models import registry
from lwgan_models.compression.compress import seed_metric
from lwgan_models.compression.distill import student_arch
from lwgan_models.compression.prune import IMAGE, SlicePlan, prune_generator

TWO_CONVS = {"family": "two-convs", "channels": 8}


def build_two_convs(arch: dict) -> nn.Module:
    return nn.Sequential(nn.Conv2d(3, arch["channels"], 3, padding=1), nn.ReLU(),
                         nn.Conv2d(arch["channels"], 3, 3, padding=1))


def two_convs_plan(net: nn.Module, arch: dict) -> SlicePlan:
    plan = SlicePlan()
    plan.add_conv("0", net[0], IMAGE, "hidden")
    plan.add_conv("2", net[2], "hidden", IMAGE)
    return plan


def refuse_training(*args) -> None:
    raise AssertionError("not trained in these tests")


FAKE = registry.Family(
    name="two-convs",
    build=build_two_convs,
    width_key="channels",
    styles_key=None,
    seed_metric=registry.SeedMetric("mean_output", lambda base, generator, images_a, heldout_b:
                                    {"value": float(generator(images_a).mean())}),
    prune_plan=two_convs_plan,
    train=refuse_training,
)


@pytest.fixture
def fake_family(monkeypatch):
    monkeypatch.setattr(registry, "_FAMILIES", dict(registry._FAMILIES))  # the registration ends with the test
    return registry.register_family(FAKE)


@pytest.fixture
def fake_model(fake_family):
    spec = registry.ModelSpec("two-convs-c8", "two-convs", TWO_CONVS, (1, 3, 16, 16), None, "test only", False)
    return registry.load(spec)


def test_a_registered_family_is_found_and_builds(fake_family, fake_model):
    assert registry.arch_family(TWO_CONVS) is fake_family
    assert fake_model.params == (3 * 8 * 9 + 8) + (8 * 3 * 9 + 3)
    assert fake_model.macs == 2 * 16 * 16 * 3 * 8 * 9


def test_its_seed_metric_lands_under_its_name(fake_model):
    images = torch.rand(2, 3, 16, 16)
    with torch.no_grad():
        expected = float(fake_model.module(images).mean())
        metric = seed_metric(fake_model, fake_model.module, images, Path("unused"))
    assert metric == {"name": "mean_output", "value": pytest.approx(expected)}


def test_distillation_and_pruning_narrow_its_width_knob(fake_model):
    assert student_arch(TWO_CONVS) == {"family": "two-convs", "channels": 2}
    pruned, arch = prune_generator(fake_model.module, TWO_CONVS, keep=0.5)
    assert arch == {"family": "two-convs", "channels": 4}
    assert pruned[0].weight.shape == (4, 3, 3, 3) and pruned[2].weight.shape == (3, 4, 3, 3)


@pytest.mark.parametrize("use", [
    registry.build_generator,
    student_arch,
    lambda arch: prune_generator(nn.Identity(), arch, keep=0.5),
])
def test_an_unknown_family_is_one_line_naming_the_known_ones(use):
    with pytest.raises(UserError) as caught:
        use({"family": "pix2pixhd", "ngf": 64})
    message = str(caught.value)
    assert "\n" not in message
    assert "'pix2pixhd'" in message and "cyclegan, nst" in message
