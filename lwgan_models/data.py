"""Unpaired image folders in the official CycleGAN layout (`trainA`, `trainB`, `testA`, `testB`).

Mirrors the unaligned dataset of junyanz/pytorch-CycleGAN-and-pix2pix: item i pairs the i-th A
image with a random B image, and the length is that of the larger domain. Differences:

- Resizing keeps the aspect ratio (shorter side -> `load_size`) instead of upstream's
  `resize_and_crop` square stretch, so mixed-size photos are not squashed; for square images
  (apple2orange is 256x256) the two are the same.
- The test phase is deterministic: centre crop, no flip, B = B_paths[i % len(B)].
- Each item draws its randomness from (seed, epoch, index), not a shared global generator, so a
  seeded run yields the same crops whatever the access order or number of loader workers.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import torch
from PIL import Image
from torch.utils.data import DataLoader, Dataset

from errors import UserError

IMAGE_EXTENSIONS = (".jpg", ".jpeg", ".png", ".bmp", ".tif", ".tiff", ".webp")
PHASES = ("train", "test")


def list_images(folder: Path) -> list[Path]:
    """Image files under `folder` (recursively, as upstream), sorted.

    Dotfiles are skipped: macOS archives carry `._name.jpg` metadata twins that are no images.
    """
    return sorted(
        path for path in folder.rglob("*")
        if path.is_file() and path.suffix.lower() in IMAGE_EXTENSIONS and not path.name.startswith(".")
    )


def load_rgb(path: Path) -> Image.Image:
    """The image at `path` as 8-bit RGB, whatever its mode; undecodable files raise `UserError`."""
    try:
        with Image.open(path) as image:
            image.load()
            if image.mode in ("I", "I;16", "I;16B", "I;16L", "I;16N"):
                # 16-bit greyscale: Pillow's convert("RGB") would clip it to white; keep the top byte.
                image = Image.fromarray((np.asarray(image, dtype=np.uint32) >> 8).clip(0, 255).astype(np.uint8))
            return image.convert("RGB")
    except (OSError, SyntaxError, ValueError, Image.DecompressionBombError) as exc:
        reason = (str(exc).splitlines() or [type(exc).__name__])[0]
        raise UserError(
            f"{path} cannot be decoded as an image ({reason}); expected a readable "
            f"{'/'.join(ext[1:] for ext in IMAGE_EXTENSIONS)} file"
        ) from None


def to_tensor(image: Image.Image) -> torch.Tensor:
    """CHW float32 in [-1, 1], the range the generators' tanh output lives in."""
    pixels = torch.from_numpy(np.array(image, dtype=np.uint8))
    return pixels.permute(2, 0, 1).contiguous().float().div_(127.5).sub_(1.0)


def resize_and_crop(image: Image.Image, size: int, rng: np.random.Generator | None) -> Image.Image:
    """Shorter side to `size`, then a square crop: centred without `rng`, else random with a random flip."""
    width, height = image.size
    scale = size / min(width, height)
    width, height = max(size, round(width * scale)), max(size, round(height * scale))
    image = image.resize((width, height), Image.Resampling.BICUBIC)
    if rng is None:
        left, top = (width - size) // 2, (height - size) // 2
    else:
        left, top = int(rng.integers(width - size + 1)), int(rng.integers(height - size + 1))
    image = image.crop((left, top, left + size, top + size))
    if rng is not None and rng.random() < 0.5:
        image = image.transpose(Image.Transpose.FLIP_LEFT_RIGHT)
    return image


class UnpairedImageFolder(Dataset):
    """Two unpaired image domains `root/{phase}A` and `root/{phase}B` as `{"A", "B", "A_path", "B_path"}`."""

    def __init__(self, root: str | Path, phase: str = "train", load_size: int = 143, crop_size: int = 128,
                 flip: bool = True, seed: int | None = None):
        if phase not in PHASES:
            raise UserError(f"dataset phase {phase!r} is unknown; expected one of {', '.join(PHASES)}")
        if not 0 < crop_size <= load_size:
            raise UserError(f"crop size {crop_size} with load size {load_size} is invalid; "
                            f"expected 0 < crop_size <= load_size")
        self.root = Path(root)
        if not self.root.is_dir():
            raise UserError(f"dataset root {self.root} is not a directory; expected a folder holding "
                            f"trainA, trainB, testA, testB (the CycleGAN layout)")
        self.phase = phase
        self.load_size = load_size
        self.crop_size = crop_size
        self.flip = flip
        self.seed = seed
        self.epoch = 0
        self.A_paths = self._domain_paths("A")
        self.B_paths = self._domain_paths("B")

    def _domain_paths(self, domain: str) -> list[Path]:
        folder = self.root / f"{self.phase}{domain}"
        if not folder.is_dir():
            raise UserError(f"dataset folder {folder} is missing; expected {self.phase}A and {self.phase}B "
                            f"under {self.root}")
        paths = list_images(folder)
        if not paths:
            raise UserError(f"dataset folder {folder} holds no images; expected files ending in "
                            f"{', '.join(IMAGE_EXTENSIONS)}")
        return paths

    def set_epoch(self, epoch: int) -> None:
        """Call once per epoch so a seeded run draws new crops each epoch, reproducibly."""
        self.epoch = epoch

    def __len__(self) -> int:
        return max(len(self.A_paths), len(self.B_paths))

    def __getitem__(self, index: int) -> dict:
        train = self.phase == "train"
        rng = self._item_rng(index) if train else None
        a_path = self.A_paths[index % len(self.A_paths)]
        b_index = int(rng.integers(len(self.B_paths))) if train else index % len(self.B_paths)
        b_path = self.B_paths[b_index]
        return {
            "A": to_tensor(self._transform(load_rgb(a_path), rng)),
            "B": to_tensor(self._transform(load_rgb(b_path), rng)),
            "A_path": str(a_path),
            "B_path": str(b_path),
        }

    def _item_rng(self, index: int) -> np.random.Generator:
        """Seeded per (seed, epoch, index); unseeded draws fresh OS entropy, so workers never repeat."""
        if self.seed is None:
            return np.random.default_rng()
        return np.random.default_rng((self.seed, self.epoch, index))

    def _transform(self, image: Image.Image, rng: np.random.Generator | None) -> Image.Image:
        """Shorter side to `load_size`, then a random (train) or centre (test) crop and optional flip."""
        width, height = image.size
        scale = self.load_size / min(width, height)
        width, height = round(width * scale), round(height * scale)
        image = image.resize((width, height), Image.Resampling.BICUBIC)
        crop = self.crop_size
        if rng is None:
            left, top = (width - crop) // 2, (height - crop) // 2
        else:
            left, top = int(rng.integers(width - crop + 1)), int(rng.integers(height - crop + 1))
        image = image.crop((left, top, left + crop, top + crop))
        if rng is not None and self.flip and rng.random() < 0.5:
            image = image.transpose(Image.Transpose.FLIP_LEFT_RIGHT)
        return image


def make_loader(dataset: Dataset, batch_size: int, shuffle: bool, seed: int | None,
                num_workers: int = 0) -> DataLoader:
    """A loader whose shuffle order follows `seed`, so a seeded run visits items in the same order."""
    generator = None if seed is None else torch.Generator().manual_seed(seed)
    return DataLoader(dataset, batch_size=batch_size, shuffle=shuffle, generator=generator,
                      num_workers=num_workers)
