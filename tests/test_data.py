"""Unpaired image folders (CycleGAN layout) and the shipped apple2orange stand-in."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from errors import UserError
from lwgan_models import standin_data
from lwgan_models.data import UnpairedImageFolder, load_rgb, make_loader, to_tensor

LOAD, CROP = 24, 16


def _save(path: Path, mode: str, size: tuple[int, int], seed: int, **save_args) -> Path:
    """A noise image in `mode`, so crops and flips are visible in the pixels."""
    rng = np.random.default_rng(seed)
    pixels = rng.integers(0, 256, (size[1], size[0], 3), dtype=np.uint8)
    image = Image.fromarray(pixels)
    image = image.convert("P", palette=Image.Palette.ADAPTIVE) if mode == "P" else image.convert(mode)
    path.parent.mkdir(parents=True, exist_ok=True)
    image.save(path, **save_args)
    return path


@pytest.fixture
def tree(tmp_path: Path) -> Path:
    """Mixed sizes, modes and extension cases, plus files the dataset must ignore."""
    root = tmp_path / "ds"
    _save(root / "trainA" / "a0.PNG", "RGB", (40, 30), 0)
    _save(root / "trainA" / "a1.jpg", "L", (50, 70), 1)
    _save(root / "trainA" / "sub" / "a2.png", "RGBA", (33, 33), 2)
    _save(root / "trainB" / "b0.png", "P", (64, 24), 3)
    _save(root / "trainB" / "b1.JPEG", "CMYK", (24, 24), 4)
    _save(root / "trainB" / "b2.bmp", "RGB", (30, 90), 5)
    _save(root / "trainB" / "b3.TIFF", "L", (25, 26), 6)
    _save(root / "trainB" / "b4.webp", "RGB", (48, 36), 7)
    (root / "trainB" / "notes.txt").write_text("not an image")
    (root / "trainB" / "._b0.png").write_bytes(b"macOS metadata, not an image")
    _save(root / "testA" / "t0.jpg", "RGB", (40, 30), 8)
    _save(root / "testA" / "t1.png", "LA", (30, 40), 9)
    _save(root / "testB" / "u0.png", "RGB", (36, 24), 10)
    return root


def test_lengths_paths_and_pairing(tree: Path):
    dataset = UnpairedImageFolder(tree, load_size=LOAD, crop_size=CROP, seed=0)
    assert len(dataset.A_paths) == 3 and len(dataset.B_paths) == 5
    assert len(dataset) == 5
    assert dataset.A_paths == sorted(dataset.A_paths)
    assert {p.name for p in dataset.B_paths} == {"b0.png", "b1.JPEG", "b2.bmp", "b3.TIFF", "b4.webp"}
    for index in range(len(dataset)):
        item = dataset[index]
        assert item["A_path"] == str(dataset.A_paths[index % 3])
        assert item["B_path"] in {str(p) for p in dataset.B_paths}
    assert len(UnpairedImageFolder(tree, phase="test", load_size=LOAD, crop_size=CROP)) == 2


def test_items_are_chw_float_in_range(tree: Path):
    for phase in ("train", "test"):
        dataset = UnpairedImageFolder(tree, phase=phase, load_size=LOAD, crop_size=CROP, seed=1)
        for index in range(len(dataset)):
            item = dataset[index]
            for domain in "AB":
                tensor = item[domain]
                assert tensor.shape == (3, CROP, CROP) and tensor.dtype == torch.float32
                assert tensor.min() >= -1.0 and tensor.max() <= 1.0
            assert isinstance(item["A_path"], str) and isinstance(item["B_path"], str)


def test_to_tensor_maps_black_and_white_to_the_ends():
    image = Image.fromarray(np.array([[[0, 255, 0]]], dtype=np.uint8))
    assert to_tensor(image).flatten().tolist() == [-1.0, 1.0, -1.0]


def test_sixteen_bit_greyscale_keeps_its_tones(tmp_path: Path):
    path = tmp_path / "deep.png"
    Image.fromarray(np.full((8, 8), 32768, dtype=np.uint16)).save(path)
    assert np.asarray(load_rgb(path)).mean() == pytest.approx(128, abs=1)


def test_seeded_train_items_are_reproducible(tree: Path):
    def items(seed, epoch=0):
        dataset = UnpairedImageFolder(tree, load_size=LOAD, crop_size=CROP, seed=seed)
        dataset.set_epoch(epoch)
        return [dataset[i] for i in reversed(range(len(dataset)))]  # order must not matter

    def same(xs, ys):
        return all(torch.equal(x[d], y[d]) and x["B_path"] == y["B_path"] for x, y in zip(xs, ys) for d in "AB")

    first = items(seed=0)
    assert same(first, items(seed=0))
    assert not same(first, items(seed=1))
    assert not same(first, items(seed=0, epoch=1))


def test_test_phase_is_a_deterministic_centre_crop(tree: Path):
    dataset = UnpairedImageFolder(tree, phase="test", load_size=LOAD, crop_size=CROP)
    item = dataset[0]
    assert torch.equal(item["A"], dataset[0]["A"])
    assert [dataset[i]["B_path"] for i in range(2)] == [str(dataset.B_paths[0])] * 2
    # testA/t0.jpg is 40x30: shorter side 30 -> 24 makes it 32x24, centre crop starts at (8, 4).
    expected = load_rgb(tree / "testA" / "t0.jpg").resize((32, 24), Image.Resampling.BICUBIC).crop((8, 4, 24, 20))
    assert torch.equal(item["A"], to_tensor(expected))


def test_flip_is_random_in_train_and_can_be_turned_off(tree: Path):
    """With crop = load = the image's size the crop is the whole image, so only a flip changes it."""
    root = tree.parent / "square"
    for folder in ("trainA", "trainB"):
        _save(root / folder / "x.png", "RGB", (8, 8), 11)
    original = to_tensor(load_rgb(root / "trainA" / "x.png"))
    mirrored = original.flip(-1)

    def first_a(flip, seed):
        return UnpairedImageFolder(root, load_size=8, crop_size=8, flip=flip, seed=seed)[0]["A"]

    assert all(torch.equal(first_a(False, seed), original) for seed in range(8))
    outcomes = [first_a(True, seed) for seed in range(16)]
    assert all(torch.equal(a, original) or torch.equal(a, mirrored) for a in outcomes)
    assert any(torch.equal(a, mirrored) for a in outcomes) and any(torch.equal(a, original) for a in outcomes)


def test_loader_batches_and_seeded_order(tree: Path):
    dataset = UnpairedImageFolder(tree, load_size=LOAD, crop_size=CROP, seed=0)
    batches = list(make_loader(dataset, batch_size=2, shuffle=True, seed=3))
    assert [b["A"].shape[0] for b in batches] == [2, 2, 1]
    assert batches[0]["A"].shape == (2, 3, CROP, CROP)
    again = list(make_loader(dataset, batch_size=2, shuffle=True, seed=3))
    assert [b["A_path"] for b in batches] == [b["A_path"] for b in again]


def _raises_one_line(expected_path: Path, build):
    with pytest.raises(UserError) as info:
        build()
    message = str(info.value)
    assert str(expected_path) in message and "\n" not in message
    return message


def test_bad_roots_and_folders_name_the_path(tree: Path, tmp_path: Path):
    missing = tmp_path / "nowhere"
    _raises_one_line(missing, lambda: UnpairedImageFolder(missing))
    a_file = tree / "trainA" / "a1.jpg"
    _raises_one_line(a_file, lambda: UnpairedImageFolder(a_file))

    (tree / "trainB").rename(tree / "trainB_old")
    message = _raises_one_line(tree / "trainB", lambda: UnpairedImageFolder(tree))
    assert "missing" in message

    (tree / "trainB").mkdir()
    (tree / "trainB" / "readme.txt").write_text("no images here")
    message = _raises_one_line(tree / "trainB", lambda: UnpairedImageFolder(tree))
    assert "no images" in message


def test_bad_sizes_and_phase(tree: Path):
    with pytest.raises(UserError, match="crop size 64"):
        UnpairedImageFolder(tree, load_size=32, crop_size=64)
    with pytest.raises(UserError, match="'val'"):
        UnpairedImageFolder(tree, phase="val")


@pytest.mark.parametrize("content", [b"", b"definitely not a jpeg", None])
def test_undecodable_file_fails_when_loaded_naming_it(tree: Path, content: bytes | None):
    broken = tree / "trainA" / "zz_broken.jpg"
    if content is None:  # a truncated real JPEG
        _save(broken, "RGB", (64, 64), 12)
        broken.write_bytes(broken.read_bytes()[:200])
    else:
        broken.write_bytes(content)
    dataset = UnpairedImageFolder(tree, load_size=LOAD, crop_size=CROP, seed=0)  # listing does not decode
    index = dataset.A_paths.index(broken)
    message = _raises_one_line(broken, lambda: dataset[index])
    assert "cannot be decoded" in message


@pytest.fixture(scope="module")
def standin(tmp_path_factory) -> Path:
    return standin_data.build(tmp_path_factory.mktemp("standin") / "a2o", seed=0)


def _red_minus_blue(folder: Path) -> float:
    pixels = np.stack([np.asarray(Image.open(p).convert("RGB"), dtype=np.float64) for p in sorted(folder.iterdir())])
    return float(pixels[..., 0].mean() - pixels[..., 2].mean())


def test_standin_has_the_layout_and_counts(standin: Path):
    counts = {name: len(list((standin / name).iterdir())) for name in ("trainA", "trainB", "testA", "testB")}
    assert counts == {"trainA": 64, "trainB": 64, "testA": 8, "testB": 8}
    assert "apple2orange" in (standin / "README.txt").read_text()
    with Image.open(next((standin / "trainA").iterdir())) as image:
        assert image.size == (standin_data.IMAGE_SIZE, standin_data.IMAGE_SIZE)


def test_standin_domains_are_unpaired_and_b_is_warmer(standin: Path):
    sources = {domain: {p.stem.split("_", 1)[1] for p in (standin / f"train{domain}").iterdir()} for domain in "AB"}
    assert sources["A"] and sources["B"] and not sources["A"] & sources["B"]
    assert _red_minus_blue(standin / "trainB") > _red_minus_blue(standin / "trainA") + 30


def test_warm_grade_itself_warms_a_photo():
    """The grade, not just the choice of photos, moves colour towards orange."""
    photo = Image.fromarray(standin_data.load_source("astronaut"))
    before, after = (np.asarray(im, dtype=np.float64) for im in (photo, standin_data.warm_grade(photo)))
    assert after[..., 0].mean() - after[..., 2].mean() > before[..., 0].mean() - before[..., 2].mean() + 30


def test_standin_is_deterministic_and_refuses_to_overwrite(standin: Path, tmp_path: Path, capsys):
    again = standin_data.build(tmp_path / "again", seed=0)
    for path in sorted(standin.rglob("*.jpg")):
        assert path.read_bytes() == (again / path.relative_to(standin)).read_bytes()
    assert standin_data.main([str(again)]) == 1
    error = capsys.readouterr().err
    assert str(again / "trainA") in error and error.count("\n") == 1


def test_committed_standin_loads():
    root = standin_data.REPO_DATASET
    train = UnpairedImageFolder(root, seed=0)
    assert len(train) == 64
    assert train[0]["A"].shape == (3, 128, 128) and train[0]["B"].shape == (3, 128, 128)
    test = UnpairedImageFolder(root, phase="test")
    assert len(test) == 8 and test[7]["B"].shape == (3, 128, 128)
