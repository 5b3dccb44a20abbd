"""A small offline stand-in for apple2orange, built from the photos that ship with scikit-image.

Domain A holds plain crops of one set of photos; domain B holds crops of *other* photos given a
warm, orange colour grade. The domains are unpaired and differ in colour statistics, which is
what a CycleGAN training smoke test needs without downloading the real dataset.

Usage: `python -m lwgan_models.standin_data OUT_DIR [--seed N]`
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import numpy as np
from PIL import Image
from skimage import color, data

from errors import UserError

# Only images bundled in the scikit-image wheel: the others need a pooch download.
SOURCES_A = ("astronaut", "rocket", "stereo_motorcycle", "hubble_deep_field", "camera", "grass")
SOURCES_B = ("chelsea", "coffee", "immunohistochemistry", "moon", "brick", "gravel")
TRAIN_PER_DOMAIN = 64
TEST_PER_DOMAIN = 8
IMAGE_SIZE = 128
CROP_FRACTION = (0.35, 0.8)  # crop side as a fraction of the photo's shorter side
JPEG_QUALITY = 90
DEFAULT_SEED = 0
REPO_DATASET = Path(__file__).resolve().parent / "data" / "standin_apple2orange"

README = """\
Stand-in for the CycleGAN apple2orange dataset
==============================================

This folder is NOT apple2orange. It is a tiny unpaired dataset generated offline so that
training and benchmarking code can run without downloading anything.

- trainA ({train} images), testA ({test}): random square crops of scikit-image sample photos,
  resized to {size}x{size} JPEG. Photos: {sources_a}.
- trainB ({train} images), testB ({test}): random crops of DIFFERENT scikit-image photos with a
  warm "orange" grade (per-channel tone curves that lift red and pull blue down, then a
  saturation boost in HSV). Photos: {sources_b}.
- Train and test crops come from the same photos; the split only separates the crops.

Generated with: python -m lwgan_models.standin_data OUT_DIR --seed {seed}

For real results, download apple2orange (pytorch-CycleGAN-and-pix2pix,
./datasets/download_cyclegan_dataset.sh apple2orange) and point the training at that folder
instead; it has the same trainA/trainB/testA/testB layout.
"""


def load_source(name: str) -> np.ndarray:
    """A scikit-image sample photo as HxWx3 uint8 (greyscale photos are repeated over RGB)."""
    image = data.stereo_motorcycle()[0] if name == "stereo_motorcycle" else getattr(data, name)()
    if image.ndim == 2:
        image = np.repeat(image[..., None], 3, axis=2)
    return np.ascontiguousarray(image[..., :3], dtype=np.uint8)


def random_crop(photo: np.ndarray, rng: np.random.Generator) -> Image.Image:
    """A random square crop of `photo`, resized to IMAGE_SIZE."""
    height, width = photo.shape[:2]
    side = int(rng.uniform(*CROP_FRACTION) * min(height, width))
    top, left = int(rng.integers(height - side + 1)), int(rng.integers(width - side + 1))
    crop = Image.fromarray(photo[top:top + side, left:left + side])
    return crop.resize((IMAGE_SIZE, IMAGE_SIZE), Image.Resampling.LANCZOS)


def warm_grade(image: Image.Image) -> Image.Image:
    """An orange look: gamma < 1 lifts red, gamma > 1 pulls blue down, then saturation x1.4."""
    rgb = np.asarray(image, dtype=np.float64) / 255.0
    rgb = rgb ** np.array([0.65, 1.0, 1.7])
    hsv = color.rgb2hsv(rgb)
    hsv[..., 1] = np.clip(hsv[..., 1] * 1.4, 0.0, 1.0)
    return Image.fromarray(np.round(color.hsv2rgb(hsv) * 255.0).astype(np.uint8))


def build(out_dir: str | Path, seed: int = DEFAULT_SEED) -> Path:
    """Write trainA/trainB/testA/testB and README.txt under `out_dir`; same seed, same images."""
    out_dir = Path(out_dir)
    folders = [out_dir / f"{phase}{domain}" for phase in ("train", "test") for domain in "AB"]
    for folder in folders:
        if folder.exists() and any(folder.iterdir()):
            raise UserError(f"{folder} is not empty; expected a new or empty folder (delete it to regenerate)")
    rng = np.random.default_rng(seed)
    for domain, sources, grade in (("A", SOURCES_A, None), ("B", SOURCES_B, warm_grade)):
        photos = {name: load_source(name) for name in sources}
        for index in range(TRAIN_PER_DOMAIN + TEST_PER_DOMAIN):
            name = sources[index % len(sources)]  # round-robin keeps every photo represented
            image = random_crop(photos[name], rng)
            if grade is not None:
                image = grade(image)
            phase = "train" if index < TRAIN_PER_DOMAIN else "test"
            folder = out_dir / f"{phase}{domain}"
            folder.mkdir(parents=True, exist_ok=True)
            image.save(folder / f"{index:03d}_{name}.jpg", quality=JPEG_QUALITY)
    (out_dir / "README.txt").write_text(README.format(
        train=TRAIN_PER_DOMAIN, test=TEST_PER_DOMAIN, size=IMAGE_SIZE, seed=seed,
        sources_a=", ".join(SOURCES_A), sources_b=", ".join(SOURCES_B),
    ))
    return out_dir


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m lwgan_models.standin_data", description=__doc__.splitlines()[0])
    parser.add_argument("out_dir", help=f"where to write the dataset (the repo's copy is {REPO_DATASET})")
    parser.add_argument("--seed", type=int, default=DEFAULT_SEED)
    args = parser.parse_args(argv)
    try:
        out_dir = build(args.out_dir, args.seed)
    except UserError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 1
    print(f"wrote stand-in apple2orange to {out_dir}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
