"""The CycleGAN training recipe: losses, pool, schedule, resume, checkpoint files and the generator-loss metric."""

from __future__ import annotations

import json
import math
import shutil
from dataclasses import replace
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from errors import UserError
from lwgan_models.cyclegan import define_D, define_G
from lwgan_models.cyclegan_recipe import (
    COMPANIONS,
    CycleGANConfig,
    ImagePool,
    companion_path,
    evaluate_generator_loss,
    generator_loss,
    linear_decay_factor,
    load_companions,
    train_cyclegan,
)
from lwgan_models.data import UnpairedImageFolder
from lwgan_models.registry import build_generator

N_EPOCHS, N_EPOCHS_DECAY, IMAGES_PER_DOMAIN = 6, 4, 4
TOTAL_STEPS = (N_EPOCHS + N_EPOCHS_DECAY) * IMAGES_PER_DOMAIN


pytestmark = pytest.mark.usefixtures("one_torch_thread")


def _write_domain(folder: Path, count: int, tint: tuple[float, float, float], seed: int) -> None:
    """Smooth gradients tinted per domain, with a little noise: two unpaired, easily told-apart domains."""
    rng = np.random.default_rng(seed)
    folder.mkdir(parents=True, exist_ok=True)
    ramp = np.linspace(0.0, 1.0, 40)
    for index in range(count):
        angle = rng.uniform(0, np.pi)
        field = np.cos(angle) * ramp[None, :] + np.sin(angle) * ramp[:, None]
        pixels = field[..., None] * np.array(tint) * 200 + rng.normal(0, 8, (40, 40, 3)) + 20
        Image.fromarray(pixels.clip(0, 255).astype(np.uint8)).save(folder / f"{index}.png")


def _make_dataset(root: Path) -> Path:
    for phase, count, seed in (("train", IMAGES_PER_DOMAIN, 0), ("test", 2, 10)):
        _write_domain(root / f"{phase}A", count, (0.3, 0.5, 1.0), seed)
        _write_domain(root / f"{phase}B", count, (1.0, 0.6, 0.2), seed + 1)
    return root


def _tiny_config(dataroot: Path, **overrides) -> CycleGANConfig:
    settings = {"dataroot": dataroot, "ngf": 4, "ndf": 4, "load_size": 36, "crop_size": 32, "seed": 3,
                "n_epochs": N_EPOCHS, "n_epochs_decay": N_EPOCHS_DECAY, "log_every": 1, "checkpoint_every": 3}
    return CycleGANConfig(**{**settings, **overrides})


@pytest.fixture(scope="module")
def dataset_root(tmp_path_factory) -> Path:
    return _make_dataset(tmp_path_factory.mktemp("unpaired"))


@pytest.fixture(scope="module")
def finished(dataset_root: Path, tmp_path_factory) -> tuple[CycleGANConfig, Path, Path]:
    """One uninterrupted tiny run: (config, checkpoint, work_dir)."""
    config = _tiny_config(dataset_root)
    out = tmp_path_factory.mktemp("out")
    checkpoint = train_cyclegan(config, out / "tiny.pt", out / "work")
    return config, checkpoint, out / "work"


def _card(checkpoint: Path) -> dict:
    return json.loads(checkpoint.with_suffix(".json").read_text())


def _history(work_dir: Path) -> list[dict]:
    return [json.loads(line) for line in (work_dir / "log.jsonl").read_text().splitlines()]


def _losses_by_step(work_dir: Path) -> list[dict]:
    return [{k: v for k, v in entry.items() if k != "wall_time_s"} for entry in _history(work_dir)]


def _all_weights(checkpoint: Path) -> dict[str, dict[str, torch.Tensor]]:
    """G_A and its companions, by upstream name."""
    paths = {"G_A": checkpoint, **{name: companion_path(checkpoint, name) for name in COMPANIONS}}
    return {name: torch.load(path, weights_only=True) for name, path in paths.items()}


def test_losses_go_down(finished):
    _, _, work_dir = finished
    history = _history(work_dir)
    assert [entry["step"] for entry in history] == list(range(1, TOTAL_STEPS + 1))

    def mean(entries: list[dict], keys: tuple[str, ...]) -> float:
        return sum(sum(entry[k] for k in keys) for entry in entries) / len(entries)

    cycle, generator = ("cycle_A", "cycle_B"), ("G_A", "G_B", "cycle_A", "cycle_B", "idt_A", "idt_B")
    first, last = history[:8], history[-8:]
    assert mean(last, cycle) < 0.85 * mean(first, cycle)  # 0.57-0.69 over seeds 0-4
    assert mean(last, generator) < 0.85 * mean(first, generator)


def test_finished_run_writes_checkpoint_companions_and_card(finished):
    config, checkpoint, work_dir = finished
    generator = define_G(3, 3, 4, "resnet_6blocks")
    generator.load_state_dict(torch.load(checkpoint, weights_only=True), strict=True)
    build_generator(_card(checkpoint)["arch"]).load_state_dict(torch.load(checkpoint, weights_only=True))
    for name in ("G_B", "D_A", "D_B"):
        net = define_G(3, 3, 4, "resnet_6blocks") if name == "G_B" else define_D(3, 4, "basic")
        net.load_state_dict(torch.load(companion_path(checkpoint, name), weights_only=True), strict=True)

    card = _card(checkpoint)
    assert card["arch"] == {"family": "cyclegan", "netG": "resnet_6blocks", "ngf": 4}
    assert (card["ndf"], card["seed"], card["steps"], card["epochs"]) == (4, 3, TOTAL_STEPS, 10)
    assert card["companions"] == {name: f"tiny.{name}.pt" for name in COMPANIONS}
    assert set(card["final_losses"]) == {"D_A", "G_A", "cycle_A", "idt_A", "D_B", "G_B", "cycle_B", "idt_B"}
    assert card["config"] == config.to_dict()
    assert card["generator_loss_images"] == 2
    assert set(card["generator_loss"]) == {"adversarial", "cycle", "identity", "total"}
    assert all(math.isfinite(v) for v in card["generator_loss"].values())
    assert not (work_dir / "state.pt").exists()


def test_finished_run_refuses_to_overwrite(finished, tmp_path):
    config, checkpoint, _ = finished
    digest = checkpoint.read_bytes()
    with pytest.raises(UserError, match="already holds a finished run"):
        train_cyclegan(config, checkpoint, tmp_path / "other_work")
    assert checkpoint.read_bytes() == digest


def test_companions_reproduce_the_cards_generator_loss(finished, dataset_root):
    _, checkpoint, _ = finished
    g_a = build_generator(_card(checkpoint)["arch"]).eval()
    g_a.load_state_dict(torch.load(checkpoint, weights_only=True))
    g_b, d_a = load_companions(checkpoint)
    test_set = UnpairedImageFolder(dataset_root, "test", 36, 32, flip=False)
    # A plain function stands in for G_A, as a wrapped ONNX or compiled model would.
    measured = evaluate_generator_loss(lambda image: g_a(image), g_b, d_a, test_set)
    assert measured == pytest.approx(_card(checkpoint)["generator_loss"], abs=1e-5)


def test_missing_companion_is_named(finished, tmp_path):
    _, checkpoint, _ = finished
    lonely = tmp_path / checkpoint.name
    shutil.copy(checkpoint, lonely)
    shutil.copy(checkpoint.with_suffix(".json"), lonely.with_suffix(".json"))
    shutil.copy(companion_path(checkpoint, "D_A"), companion_path(lonely, "D_A"))
    with pytest.raises(UserError, match=r"tiny\.G_B\.pt"):
        load_companions(lonely)


def test_interrupted_run_resumes_to_the_same_weights(finished, dataset_root, tmp_path):
    config, reference, reference_work = finished
    checkpoint, work_dir = tmp_path / "tiny.pt", tmp_path / "work"
    assert train_cyclegan(config, checkpoint, work_dir, stop_after=6) is None  # mid-epoch
    assert not checkpoint.exists()
    assert torch.load(work_dir / "state.pt", weights_only=False)["step"] == 6

    assert train_cyclegan(config, checkpoint, work_dir, stop_after=28) is None  # end of epoch 7
    state = torch.load(work_dir / "state.pt", weights_only=False)
    assert (state["epoch"], state["step"]) == (7, 28)
    # After 7 epochs: 6 at full lr, then the first decay epoch done; official rule gives 1 - 2/5.
    for optimizer in ("optimizer_G", "optimizer_D"):
        assert state["model"][optimizer]["param_groups"][0]["lr"] == pytest.approx(config.lr * 0.6)

    assert train_cyclegan(config, checkpoint, work_dir) == checkpoint
    resumed, uninterrupted = _all_weights(checkpoint), _all_weights(reference)
    for name, weights in resumed.items():
        assert weights.keys() == uninterrupted[name].keys()
        assert all(torch.equal(weights[k], uninterrupted[name][k]) for k in weights), name
    assert _losses_by_step(work_dir) == _losses_by_step(reference_work)
    assert _card(checkpoint)["generator_loss"] == _card(reference)["generator_loss"]


def test_linear_decay_follows_the_official_rule():
    # n_epochs=2, n_epochs_decay=3: two epochs at full lr, then 3/4, 2/4, 1/4 of it.
    assert [linear_decay_factor(done, 2, 3) for done in range(5)] == [1.0, 1.0, 0.75, 0.5, 0.25]
    assert linear_decay_factor(0, 1, 0) == 1.0


def test_image_pool_passes_through_when_empty():
    images = torch.randn(2, 3, 8, 8)
    assert ImagePool(0).query(images) is images


def test_image_pool_fills_then_swaps_with_probability_half():
    pool = ImagePool(3, seed=0)
    first = torch.randn(4, 3, 2, 2)
    returned = pool.query(first[:3])
    assert torch.equal(returned, first[:3]) and len(pool.images) == 3  # filling: stored and returned as is

    stored_before = torch.cat(pool.images)
    swapped = 0
    for _ in range(60):
        new = torch.randn(1, 3, 2, 2)
        before = torch.cat(pool.images)
        out = pool.query(new)
        assert len(pool.images) == 3
        if torch.equal(out, new):
            assert torch.equal(torch.cat(pool.images), before)
        else:
            swapped += 1
            assert any(torch.equal(out[0], old) for old in before)
            assert any(torch.equal(new[0], image[0]) for image in pool.images)
    assert 15 < swapped < 45
    assert not torch.equal(torch.cat(pool.images), stored_before)

    twin = ImagePool(3)
    twin.load_state_dict(pool.state_dict())
    probe = torch.randn(5, 3, 2, 2)
    assert torch.equal(twin.query(probe), pool.query(probe))


def test_generator_loss_of_identity_maps_has_no_cycle_or_identity_term():
    torch.manual_seed(0)
    real_a, real_b = torch.rand(2, 3, 32, 32) * 2 - 1, torch.rand(2, 3, 32, 32) * 2 - 1
    d_a = define_D(3, 4, "basic")
    losses = generator_loss(lambda x: x, lambda x: x, d_a, real_a, real_b)
    assert losses["cycle"] == 0.0 and losses["identity"] == 0.0
    assert math.isfinite(losses["adversarial"]) and losses["total"] == pytest.approx(losses["adversarial"])
    expected = torch.mean((d_a(real_a) - 1) ** 2).item()
    assert losses["adversarial"] == pytest.approx(expected, rel=1e-5)

    g = define_G(3, 3, 4, "resnet_6blocks")
    losses = generator_loss(g, g, d_a, real_a, real_b, lambda_cycle=10, lambda_identity=0.5)
    expected_identity = 10 * 0.5 * torch.mean(torch.abs(g(real_b) - real_b)).item()
    assert losses["identity"] == pytest.approx(expected_identity, rel=1e-5) and losses["cycle"] > 0


def test_standin_dataset_short_run(tmp_path):
    config = CycleGANConfig(ngf=4, ndf=4, load_size=36, crop_size=32, n_epochs=1, n_epochs_decay=0,
                            log_every=16, checkpoint_every=1000)
    checkpoint = train_cyclegan(config, tmp_path / "standin.pt", tmp_path / "work")
    card = _card(checkpoint)
    assert card["config"]["dataroot"] == "lwgan_models/data/standin_apple2orange"
    assert card["steps"] == 64 and card["generator_loss_images"] == 8
    assert [entry["step"] for entry in _history(tmp_path / "work")] == [16, 32, 48, 64]
    assert all(math.isfinite(v) for v in card["generator_loss"].values())
    saved = _all_weights(checkpoint)
    for net, name in zip(load_companions(checkpoint), ("G_B", "D_A")):
        assert all(torch.equal(tensor, saved[name][key]) for key, tensor in net.state_dict().items())


def test_defaults_are_the_papers():
    config = CycleGANConfig()
    assert (config.lr, config.beta1, config.pool_size, config.batch_size) == (2e-4, 0.5, 50, 1)
    assert (config.lambda_A, config.lambda_B, config.lambda_identity) == (10, 10, 0.5)
    assert (config.netG, config.ngf, config.ndf, config.crop_size) == ("resnet_6blocks", 16, 16, 128)
    assert config.dataroot.is_dir()


@pytest.mark.parametrize("breakage, message", [
    (lambda root: shutil.rmtree(root), "is not a directory"),
    (lambda root: [p.unlink() for p in (root / "trainB").iterdir()], "holds no images"),
    (lambda root: shutil.rmtree(root / "testA"), "testA is missing"),
])
def test_bad_dataset_fails_before_any_training(tmp_path, breakage, message):
    root = _make_dataset(tmp_path / "data")
    breakage(root)
    with pytest.raises(UserError, match=message):
        train_cyclegan(_tiny_config(root), tmp_path / "out.pt", tmp_path / "work")
    assert not (tmp_path / "work").exists() and not (tmp_path / "out.pt").exists()


@pytest.mark.parametrize("override, message", [
    ({"netG": "resnet_12blocks"}, "generator 'resnet_12blocks' is unknown"),
    ({"crop_size": 30, "load_size": 36}, "crop_size=30"),
    ({"netG": "unet_128"}, "multiple of 128"),
    ({"n_epochs": 0, "n_epochs_decay": 0}, "at least one epoch"),
])
def test_bad_config_is_a_user_error(dataset_root, tmp_path, override, message):
    with pytest.raises(UserError, match=message):
        train_cyclegan(replace(_tiny_config(dataset_root), **override), tmp_path / "out.pt", tmp_path / "work")
    assert not (tmp_path / "work").exists()
