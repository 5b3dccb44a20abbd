"""Model zoo: upstream CycleGAN checkpoint compatibility, conditional styles, and the registry."""

from __future__ import annotations

import dataclasses
import hashlib
import json
import os
import re
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from errors import UserError
from lwgan_models import (
    ConditionalInstanceNorm2d,
    ModelSpec,
    StyleTransferNet,
    define_D,
    define_G,
    get,
    get_norm_layer,
    load,
    names,
    registry,
)

OFFICIAL_KEYS = json.loads((Path(__file__).parent / "data" / "official_cyclegan_keys.json").read_text())
SMALL_MODEL = "cyclegan-resnet6-ngf16"
UNTRAINED_MODEL = "nst-cin4-w32"  # no shipped checkpoint: random weights from a fixed seed


def spec_for(builder, input_shape, checkpoint=None) -> ModelSpec:
    """A spec for any module: its builder is registered as an architecture family of its own."""
    family = registry.register_family(
        dataclasses.replace(registry.CYCLEGAN, name=f"test-{id(builder)}", build=lambda arch: builder()))
    return ModelSpec(
        name="test-model",
        family="cyclegan",
        arch={"family": family.name},
        input_shape=input_shape,
        checkpoint=checkpoint,
        description="test only",
        demo=False,
    )


def save_state_dict(module: nn.Module, path: Path) -> Path:
    torch.save(module.state_dict(), path)
    return path


def seeded(seed: int, build):
    torch.manual_seed(seed)
    return build().eval()


# --- upstream compatibility -------------------------------------------------------------------


@pytest.mark.parametrize(
    "official_name, build",
    [
        ("resnet_9blocks_ngf64", lambda: define_G(3, 3, 64, "resnet_9blocks")),
        ("unet_256_ngf64", lambda: define_G(3, 3, 64, "unet_256")),
        ("nlayer_d_basic_ndf64", lambda: define_D(3, 64, "basic")),
    ],
)
def test_state_dict_keys_and_shapes_match_official(official_name, build):
    with torch.device("meta"):
        ours = [[key, list(value.shape)] for key, value in build().state_dict().items()]
    assert ours == OFFICIAL_KEYS[official_name]


@pytest.mark.parametrize(
    "build, bad_value",
    [
        (lambda: get_norm_layer("group"), "group"),
        (lambda: define_G(3, 3, 16, "resnet_7blocks"), "resnet_7blocks"),
        (lambda: define_D(3, 16, "pixel"), "pixel"),
        (lambda: define_G(3, 3, 16, "unet_128", init_type="uniform"), "uniform"),
    ],
)
def test_unknown_builder_options_raise_user_error(build, bad_value):
    with pytest.raises(UserError, match=bad_value):
        build()


def test_official_format_checkpoint_loads_strictly_and_reproduces_outputs(tmp_path):
    trained = seeded(1, lambda: define_G(3, 3, 16, "resnet_6blocks"))
    path = save_state_dict(trained, tmp_path / "latest_net_G_A.pth")

    fresh = define_G(3, 3, 16, "resnet_6blocks").eval()
    fresh.load_state_dict(torch.load(path, map_location="cpu", weights_only=True), strict=True)
    loaded = load(SMALL_MODEL, checkpoint=path)

    image = torch.rand(1, 3, 32, 32) * 2 - 1
    with torch.no_grad():
        expected = trained(image)
        assert torch.equal(fresh(image), expected)
        assert torch.equal(loaded.module(image), expected)
        assert not torch.equal(load(SMALL_MODEL).module(image), expected)


def test_pre_0_4_checkpoint_with_instance_norm_statistics_loads(tmp_path):
    """The published pretrained generators carry InstanceNorm running stats from PyTorch < 0.4."""
    trained = seeded(1, lambda: define_G(3, 3, 16, "resnet_6blocks"))
    state = trained.state_dict()
    state["model.2.running_mean"] = torch.zeros(16)
    state["model.2.running_var"] = torch.ones(16)
    state["model.10.conv_block.2.num_batches_tracked"] = torch.tensor(0)
    torch.save(state, tmp_path / "legacy.pth")

    loaded = load(SMALL_MODEL, checkpoint=tmp_path / "legacy.pth")

    image = torch.rand(1, 3, 16, 16) * 2 - 1
    with torch.no_grad():
        assert torch.equal(loaded.module(image), trained(image))


@pytest.mark.parametrize("name", names())
def test_every_entry_maps_an_image_to_an_image_in_range(name):
    loaded = load(name)
    batch, channels, height, width = loaded.spec.input_shape
    side = 64 if height > 128 else height  # the full-size entries also run at 64x64
    image = torch.rand(batch, channels, side, side) * 2 - 1
    with torch.no_grad():
        output = loaded.module(image)
    assert output.shape == image.shape
    assert output.min() >= -1 and output.max() <= 1
    assert output.std() > 0
    assert not loaded.module.training


# --- conditional style transfer ------------------------------------------------------------------


def randomise_styles(net: StyleTransferNet) -> StyleTransferNet:
    with torch.no_grad():
        for module in net.modules():
            if isinstance(module, ConditionalInstanceNorm2d):
                module.gamma.normal_(1.0, 0.5)
                module.beta.normal_(0.0, 0.5)
    return net


def tiny_style_net(seed: int = 0) -> StyleTransferNet:
    return seeded(seed, lambda: StyleTransferNet(n_styles=3, width=4))


def test_styles_differ_once_their_gammas_differ():
    net = tiny_style_net()
    image = torch.rand(1, 3, 16, 16) * 2 - 1
    with torch.no_grad():
        assert torch.equal(net(image, 0), net(image, 1))  # fresh: every style is the identity affine
        for module in net.modules():
            if isinstance(module, ConditionalInstanceNorm2d):
                module.gamma[1].mul_(2.0)
        assert not torch.allclose(net(image, 0), net(image, 1), atol=1e-3)
        assert torch.equal(net(image, 0), net(image, 2))


def test_active_style_is_used_without_a_style_argument():
    net = randomise_styles(tiny_style_net())
    image = torch.rand(1, 3, 16, 16) * 2 - 1
    with torch.no_grad():
        assert torch.equal(net(image), net(image, 0))
        net.active_style = 2
        assert torch.equal(net(image), net(image, 2))
        assert not torch.allclose(net(image), net(image, 0), atol=1e-3)


def test_one_hot_style_weights_equal_the_index_and_mixes_differ():
    net = randomise_styles(tiny_style_net())
    image = torch.rand(2, 3, 16, 16) * 2 - 1
    with torch.no_grad():
        one_hot = F.one_hot(torch.tensor([2, 2]), 3).float()
        torch.testing.assert_close(net(image, one_hot), net(image, 2))
        mix = torch.tensor([[0.5, 0.5, 0.0], [0.5, 0.5, 0.0]])
        assert not torch.allclose(net(image, mix), net(image, 0), atol=1e-3)
        assert not torch.allclose(net(image, mix), net(image, 1), atol=1e-3)


@pytest.mark.parametrize("style", [3, -1, torch.ones(1, 3), torch.ones(2, 2)])
def test_invalid_style_raises_user_error(style):
    net = tiny_style_net()
    with pytest.raises(UserError, match="style"):
        net(torch.zeros(2, 3, 8, 8), style)


def test_style_net_exports_with_a_single_image_input():
    net = randomise_styles(tiny_style_net())
    net.active_style = 1
    image = torch.rand(1, 3, 16, 16) * 2 - 1
    exported = torch.export.export(net, (image,))
    assert len(exported.graph_signature.user_inputs) == 1
    with torch.no_grad():
        torch.testing.assert_close(exported.module()(image), net(image, 1))


# --- registry -----------------------------------------------------------------------------------


def test_registry_has_exactly_the_planned_entries():
    assert names() == [
        "cyclegan-resnet9-ngf64",
        "cyclegan-resnet6-ngf16",
        "cyclegan-unet128-ngf16",
        "nst-cin4-w16",
        "nst-cin4-w32",
    ]
    assert [name for name in names() if get(name).demo] == [
        "cyclegan-resnet6-ngf16",
        "cyclegan-unet128-ngf16",
        "nst-cin4-w16",
    ]


def test_unknown_name_lists_known_names():
    with pytest.raises(UserError) as error:
        get("cyclegan-resnet7")
    assert "cyclegan-resnet7" in str(error.value)
    assert all(name in str(error.value) for name in names())


def test_random_loads_are_identical_and_leave_global_rng_alone():
    torch.manual_seed(123)
    expected_draw = torch.rand(4)
    torch.manual_seed(123)
    first, second = load(UNTRAINED_MODEL), load(UNTRAINED_MODEL)
    assert torch.equal(torch.rand(4), expected_draw)

    assert first.weights == second.weights == "random"
    first_state, second_state = first.module.state_dict(), second.module.state_dict()
    assert list(first_state) == list(second_state)
    assert all(torch.equal(first_state[key], second_state[key]) for key in first_state)


def test_missing_checkpoint_names_the_path(tmp_path):
    path = tmp_path / "absent.pth"
    with pytest.raises(UserError, match=re.escape(str(path))):
        load(SMALL_MODEL, checkpoint=path)


def test_corrupt_checkpoint_names_the_path(tmp_path):
    path = tmp_path / "corrupt.pth"
    path.write_bytes(os.urandom(4096))
    with pytest.raises(UserError, match=re.escape(str(path))) as error:
        load(SMALL_MODEL, checkpoint=path)
    assert "\n" not in str(error.value)


def test_non_state_dict_checkpoint_names_the_path(tmp_path):
    path = tmp_path / "list.pth"
    torch.save([torch.zeros(1)], path)
    with pytest.raises(UserError, match=re.escape(str(path))):
        load(SMALL_MODEL, checkpoint=path)


def test_wrong_key_names_the_path_and_the_key(tmp_path):
    state = seeded(1, lambda: define_G(3, 3, 16, "resnet_6blocks")).state_dict()
    state["model.1.kernel"] = state.pop("model.1.weight")
    path = tmp_path / "renamed.pth"
    torch.save(state, path)
    with pytest.raises(UserError) as error:
        load(SMALL_MODEL, checkpoint=path)
    message = str(error.value)
    assert str(path) in message
    assert "model.1.weight" in message and "model.1.kernel" in message


def test_wrong_shape_names_the_key(tmp_path):
    path = save_state_dict(define_G(3, 3, 8, "resnet_6blocks"), tmp_path / "ngf8.pth")
    with pytest.raises(UserError, match=r"wrong shapes \[model\.1\.weight \(8, 3, 7, 7\) != \(16, 3, 7, 7\)"):
        load(SMALL_MODEL, checkpoint=path)


@pytest.mark.parametrize("wrap", [lambda state: state, lambda state: {"state_dict": state, "epoch": 200}])
def test_saved_checkpoint_records_path_and_sha256(tmp_path, wrap):
    path = tmp_path / "trained.pth"
    torch.save(wrap(seeded(1, lambda: define_G(3, 3, 16, "resnet_6blocks")).state_dict()), path)

    loaded = load(SMALL_MODEL, checkpoint=str(path))

    digest = hashlib.sha256(path.read_bytes()).hexdigest()
    assert re.fullmatch(r".+@sha256:[0-9a-f]{64}", loaded.weights)
    assert loaded.weights == f"{path.resolve()}@sha256:{digest}"


def test_spec_checkpoint_is_repo_relative_and_an_explicit_one_overrides_it(tmp_path, monkeypatch):
    monkeypatch.setattr(registry, "REPO_ROOT", tmp_path)
    (tmp_path / "checkpoints").mkdir()
    shipped = save_state_dict(nn.Conv2d(3, 4, 3), tmp_path / "checkpoints" / "conv.pth")
    spec = spec_for(lambda: nn.Conv2d(3, 4, 3), (1, 3, 8, 8), checkpoint="checkpoints/conv.pth")

    assert load(spec).weights.startswith("checkpoints/conv.pth@sha256:")

    missing_spec = spec_for(spec.builder, spec.input_shape, checkpoint="checkpoints/absent.pth")
    with pytest.raises(UserError, match="absent.pth"):
        load(missing_spec)
    assert load(missing_spec, checkpoint=shipped).weights.startswith("checkpoints/conv.pth@sha256:")


@pytest.mark.parametrize(
    "build, input_shape, expected_macs",
    [
        # Conv2d: C_in * C_out * k * k per output pixel; 16x16 -> 8x8 at stride 2.
        (lambda: nn.Conv2d(3, 8, 3, stride=2, padding=1), (1, 3, 16, 16), 3 * 8 * 3 * 3 * 8 * 8),
        # ConvTranspose2d: every input pixel scatters a C_out x k x k kernel per input channel.
        (lambda: nn.ConvTranspose2d(8, 4, 4, stride=2, padding=1), (1, 8, 8, 8), 8 * 4 * 4 * 4 * 8 * 8),
        # batch scales linearly
        (lambda: nn.Conv2d(3, 8, 3, padding=1), (2, 3, 5, 5), 2 * 3 * 8 * 3 * 3 * 5 * 5),
    ],
)
def test_macs_match_hand_count(build, input_shape, expected_macs):
    assert load(spec_for(build, input_shape)).macs == expected_macs


def test_params_and_fp32_size():
    loaded = load(SMALL_MODEL)
    expected_params = sum(p.numel() for p in define_G(3, 3, 16, "resnet_6blocks").parameters())
    assert loaded.params == expected_params
    assert 4 * expected_params <= loaded.size_fp32_bytes <= 4 * expected_params + 64 * 1024


def test_shipped_checkpoints_load_with_their_cards():
    """Every registry checkpoint is committed, matches its card's digest, and records its recipe."""
    shipped = [get(name) for name in names() if get(name).checkpoint]
    assert shipped, "no model ships a trained checkpoint"
    for spec in shipped:
        loaded = load(spec.name)
        assert loaded.weights == f"{spec.checkpoint}@sha256:{loaded.card['sha256']}"
        assert loaded.card["arch"] == spec.arch
        assert loaded.card["steps"] > 0 and loaded.card["final_losses"]
        assert loaded.card["seed_metric"]["name"] in ("generator_loss", "tv_loss")
