"""Channel pruning into the official classes, and fitting a student generator to a teacher."""

from __future__ import annotations

import dataclasses
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from errors import UserError
from lwgan_models import StyleTransferNet, define_G, get
from lwgan_models.compression.distill import fit_to_teacher, image_batches, student_arch
from lwgan_models.compression.prune import prune_generator
from lwgan_models.registry import build_generator, count_macs
from lwgan_models.training import TrainingRun

STANDIN = Path(__file__).resolve().parent.parent / "lwgan_models" / "data" / "standin_apple2orange"
RESNET6 = {"family": "cyclegan", "netG": "resnet_6blocks", "ngf": 8}
RESNET9 = {"family": "cyclegan", "netG": "resnet_9blocks", "ngf": 4}
NST = {"family": "nst", "n_styles": 3, "width": 8}


pytestmark = pytest.mark.usefixtures("one_torch_thread")


def seeded_generator(arch: dict, seed: int = 0) -> torch.nn.Module:
    torch.manual_seed(seed)
    return build_generator(arch).eval()


def run_net(net: torch.nn.Module, arch: dict, images: torch.Tensor) -> torch.Tensor:
    with torch.no_grad():
        return net(images, 1) if arch["family"] == "nst" else net(images)


def official_class(arch: dict) -> torch.nn.Module:
    if arch["family"] == "nst":
        return StyleTransferNet(n_styles=arch["n_styles"], width=arch["width"])
    return define_G(3, 3, arch["ngf"], arch["netG"])


def param_count(net: torch.nn.Module) -> int:
    return sum(p.numel() for p in net.parameters())


# --- pruning ----------------------------------------------------------------------------------


@pytest.mark.parametrize("arch", [RESNET6, RESNET9, NST], ids=["resnet6", "resnet9", "nst"])
def test_keeping_every_channel_reproduces_the_original(arch):
    original = seeded_generator(arch)
    pruned, pruned_arch = prune_generator(original, arch, keep=1.0)
    images = torch.rand(2, 3, 32, 32) * 2 - 1
    assert pruned_arch == arch
    assert torch.allclose(run_net(pruned, arch, images), run_net(original, arch, images), atol=1e-6)


@pytest.mark.parametrize("arch, keep, width_key, new_width", [
    (RESNET6, 0.5, "ngf", 4),
    (RESNET9, 0.3, "ngf", 1),
    (NST, 0.75, "width", 6),
], ids=["resnet6", "resnet9", "nst"])
def test_pruned_model_is_the_official_class_at_the_smaller_width(arch, keep, width_key, new_width):
    pruned, pruned_arch = prune_generator(seeded_generator(arch), arch, keep)
    assert pruned_arch == {**arch, width_key: new_width}
    assert param_count(pruned) == param_count(build_generator(pruned_arch)) < param_count(build_generator(arch))
    official = official_class(pruned_arch)
    official.load_state_dict(pruned.state_dict(), strict=True)
    images = torch.rand(1, 3, 32, 32) * 2 - 1
    assert run_net(official.eval(), arch, images).shape == (1, 3, 32, 32)
    assert torch.equal(run_net(official, arch, images), run_net(pruned, arch, images))


def randomise_biases_and_styles(net: torch.nn.Module) -> None:
    """Biases start at 0 and gammas at 1; distinct values show which channels were kept."""
    with torch.no_grad():
        for name, param in net.named_parameters():
            if not name.endswith("weight"):
                param.uniform_(-1, 1)


def test_resnet_pruning_keeps_the_channels_with_the_largest_filters_in_each_group():
    net = seeded_generator(RESNET6)  # ngf 8: trunk 32 channels, block inner 32, first up 16; keep half
    randomise_biases_and_styles(net)
    trunk_kept, inner_kept, up_kept = torch.arange(1, 32, 2), torch.arange(8, 24), torch.arange(0, 16, 2)
    with torch.no_grad():
        net.model[7].weight[trunk_kept] = 0  # the first trunk producer alone would keep the even channels,
        for block in net.model[10:16]:  # but the six residual outputs outweigh it in the sum
            block.conv_block[5].weight[torch.arange(0, 32, 2)] = 0
        net.model[10].conv_block[1].weight[torch.cat([torch.arange(8), torch.arange(24, 32)])] = 0
        net.model[16].weight[:, 1::2] = 0  # transposed conv weight is (in, out, k, k)
    pruned, _ = prune_generator(net, RESNET6, keep=0.5)
    first_block, pruned_block = net.model[10].conv_block, pruned.model[10].conv_block
    assert torch.equal(pruned.model[7].bias, net.model[7].bias[trunk_kept])
    assert torch.equal(pruned.model[13].conv_block[5].bias, net.model[13].conv_block[5].bias[trunk_kept])
    assert torch.equal(pruned_block[1].weight, first_block[1].weight[inner_kept][:, trunk_kept])
    assert torch.equal(pruned_block[1].bias, first_block[1].bias[inner_kept])
    assert torch.equal(pruned_block[5].weight, first_block[5].weight[trunk_kept][:, inner_kept])
    assert torch.equal(pruned.model[16].weight, net.model[16].weight[trunk_kept][:, up_kept])
    assert torch.equal(pruned.model[16].bias, net.model[16].bias[up_kept])
    assert torch.equal(pruned.model[23].bias, net.model[23].bias)  # the RGB output is never pruned


def test_style_transfer_pruning_slices_every_styles_scale_and_shift_with_the_channels():
    net = seeded_generator(NST)  # width 8: trunk 32 channels, keep half
    randomise_biases_and_styles(net)
    trunk_kept, inner_kept = torch.arange(16, 32), torch.arange(1, 32, 2)
    with torch.no_grad():
        net.encoder[2].conv.weight[:16] = 0
        for block in net.residuals:
            block.conv2.conv.weight[:16] = 0
        net.residuals[0].conv1.conv.weight[0::2] = 0
    pruned, _ = prune_generator(net, NST, keep=0.5)
    assert torch.equal(pruned.encoder[2].norm.gamma, net.encoder[2].norm.gamma[:, trunk_kept])
    assert torch.equal(pruned.residuals[4].conv2.norm.beta, net.residuals[4].conv2.norm.beta[:, trunk_kept])
    first = net.residuals[0]
    assert torch.equal(pruned.residuals[0].conv1.conv.weight, first.conv1.conv.weight[inner_kept][:, trunk_kept])
    assert torch.equal(pruned.residuals[0].conv1.norm.gamma, first.conv1.norm.gamma[:, inner_kept])
    assert torch.equal(pruned.residuals[0].conv2.conv.weight, first.conv2.conv.weight[trunk_kept][:, inner_kept])


@pytest.mark.parametrize("arch, keep, expected_in_message", [
    ({"family": "cyclegan", "netG": "unet_128", "ngf": 8}, 0.5, "unet_128"),
    (RESNET6, 0.0, "keep=0.0"),
    (RESNET6, 1.5, "keep=1.5"),
    ({**RESNET6, "ngf": 16}, 0.5, "do not match"),
])
def test_unsupported_architectures_and_fractions_are_refused(arch, keep, expected_in_message):
    net = seeded_generator({**arch, "ngf": 8})
    with pytest.raises(UserError, match=expected_in_message):
        prune_generator(net, arch, keep)


# --- distillation -----------------------------------------------------------------------------


@pytest.mark.parametrize("name", [
    "cyclegan-resnet6-ngf16", "cyclegan-resnet9-ngf64", "cyclegan-unet128-ngf16", "nst-cin4-w16",
])
def test_student_has_at_least_ten_times_fewer_macs(name):
    teacher = get(name)
    student = dataclasses.replace(teacher, arch=student_arch(teacher.arch))
    assert {k: v for k, v in student.arch.items() if k not in ("ngf", "width")} == \
        {k: v for k, v in teacher.arch.items() if k not in ("ngf", "width")}
    assert count_macs(teacher) >= 10 * count_macs(student)


def test_student_arch_refuses_an_unknown_family():
    with pytest.raises(UserError, match="pix2pixhd"):
        student_arch({"family": "pix2pixhd", "ngf": 64})


def test_image_batches_are_seeded_random_crops_from_all_folders(tmp_path):
    small = tmp_path / "small"
    small.mkdir()
    Image.fromarray(np.full((12, 20, 3), 255, np.uint8)).save(small / "white.png")  # smaller than the crop
    batches = iter(image_batches([STANDIN / "trainA", small], crop_size=16, batch_size=3, seed=7))
    first = [next(batches) for _ in range(30)]
    again = iter(image_batches([STANDIN / "trainA", small], crop_size=16, batch_size=3, seed=7))
    assert all(torch.equal(batch, next(again)) for batch in first)
    assert first[0].shape == (3, 3, 16, 16)
    stacked = torch.cat(first)
    assert stacked.min() >= -1 and stacked.max() <= 1
    assert any(bool((crop == 1).all()) for crop in stacked)  # the enlarged white image was drawn
    assert not torch.equal(first[0], first[1])


@pytest.mark.parametrize("folders, expected_in_message", [
    (["missing"], "does not exist"),
    (["empty"], "holds no images"),
    ([], "no image folders"),
])
def test_image_batches_refuse_missing_and_empty_folders(tmp_path, folders, expected_in_message):
    (tmp_path / "empty").mkdir()
    with pytest.raises(UserError, match=expected_in_message):
        image_batches([tmp_path / f for f in folders], crop_size=16, batch_size=1, seed=0)


def make_run(tmp_path: Path, name: str) -> TrainingRun:
    return TrainingRun(name, {"test": name}, tmp_path / f"{name}.pth", work_dir=tmp_path / name)


def test_student_loss_decreases_with_pixel_and_perceptual_terms(tmp_path):
    teacher = seeded_generator({**RESNET6, "ngf": 4}, seed=1)
    torch.manual_seed(2)
    student = build_generator({**RESNET6, "ngf": 2})
    crops = iter(image_batches(STANDIN / "trainA", crop_size=32, batch_size=1, seed=0))
    images = [next(crops), next(crops)]  # a re-iterable list: the loop cycles it
    run = make_run(tmp_path, "kd")
    fit_to_teacher(student, teacher, images, steps=20, lr=5e-3, pixel_weight=1.0, perceptual_weight=0.5,
                   run=run, log_every=1, checkpoint_every=10)
    history = run.history()
    assert [entry["step"] for entry in history] == list(range(1, 21))
    assert {"pixel", "perceptual", "total"} <= set(history[0])
    for loss in ("pixel", "perceptual", "total"):
        assert np.mean([e[loss] for e in history[-4:]]) < 0.7 * np.mean([e[loss] for e in history[:4]])
    assert student.training and not teacher.training


def test_interrupted_style_transfer_distillation_resumes_where_it_stopped(tmp_path):
    teacher_arch = {**NST, "width": 4}
    teacher = seeded_generator(teacher_arch, seed=1)

    def distil(run: TrainingRun, stop_after: int | None) -> torch.nn.Module:
        torch.manual_seed(3)
        student = build_generator(student_arch(teacher_arch))  # width 1
        images = image_batches(STANDIN / "trainB", crop_size=16, batch_size=2, seed=0)
        return fit_to_teacher(student, teacher, images, steps=8, lr=1e-2, pixel_weight=1.0,
                              perceptual_weight=0.0, run=run, log_every=1, checkpoint_every=3,
                              n_styles=NST["n_styles"], stop_after=stop_after)

    whole_run, split_run = make_run(tmp_path, "whole"), make_run(tmp_path, "split")
    uninterrupted = distil(whole_run, stop_after=None)
    distil(split_run, stop_after=5)
    assert torch.load(split_run.state_path, weights_only=False)["step"] == 5
    resumed = distil(make_run(tmp_path, "split"), stop_after=None)  # a new process would build a new run
    assert [entry["step"] for entry in split_run.history()] == list(range(1, 9))
    assert [e["pixel"] for e in split_run.history()] == pytest.approx([e["pixel"] for e in whole_run.history()])
    for name, value in uninterrupted.state_dict().items():
        assert torch.allclose(resumed.state_dict()[name], value, atol=1e-6), name


def test_an_empty_image_source_is_refused(tmp_path):
    with pytest.raises(UserError, match="no batches"):
        fit_to_teacher(build_generator({**RESNET6, "ngf": 1}), seeded_generator({**RESNET6, "ngf": 2}), [],
                       steps=2, lr=1e-3, pixel_weight=1.0, perceptual_weight=0.0,
                       run=make_run(tmp_path, "empty"), log_every=1, checkpoint_every=1)
