"""Fitting a student generator to a frozen teacher's outputs: one loop for three compressions.

Knowledge distillation (a narrower student), fine-tuning after pruning (the pruned network as
student) and quantization-aware training (a fake-quantized copy as student) all minimise the
same thing: how far the student's image is from the teacher's on real inputs. The teacher's
output is the target, so no discriminator or paired data is needed (GAN-Compression, Li et al.
2020, uses the same pixel + perceptual reconstruction terms).
"""

from __future__ import annotations

from collections.abc import Iterable, Iterator, Sequence
from pathlib import Path
from typing import Protocol, runtime_checkable

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image
from torch import nn

from errors import UserError
from lwgan_models.data import IMAGE_EXTENSIONS, list_images, load_rgb, to_tensor
from lwgan_models.perceptual import PerceptualLoss
from lwgan_models.registry import arch_family
from lwgan_models.training import TrainingRun

STUDENT_WIDTH_DIVISOR = 4
ADAM_BETAS = (0.5, 0.999)  # the CycleGAN / GAN-Compression setting


@runtime_checkable
class ResumableBatches(Protocol):
    """An image source whose position can be saved, so a resumed run sees the batches it would have seen."""

    def __iter__(self) -> Iterator[torch.Tensor]: ...
    def state_dict(self) -> dict: ...
    def load_state_dict(self, state: dict) -> None: ...


class RandomCrops:
    """Endless batches of random square crops (with random horizontal flips) of the given images.

    Crops are taken at the image's own resolution (images smaller than the crop are enlarged
    first), so the student learns on the pixel scale it will see. All randomness comes from one
    seeded generator whose state is the whole iteration position.
    """

    def __init__(self, paths: Sequence[Path], crop_size: int, batch_size: int, seed: int):
        self.paths = list(paths)
        self.crop_size = crop_size
        self.batch_size = batch_size
        self.rng = np.random.default_rng(seed)

    def __iter__(self) -> Iterator[torch.Tensor]:
        while True:
            yield torch.stack([self._random_crop() for _ in range(self.batch_size)])

    def _random_crop(self) -> torch.Tensor:
        image = load_rgb(self.paths[int(self.rng.integers(len(self.paths)))])
        scale = max(1.0, self.crop_size / min(image.size))
        if scale > 1:
            width, height = (max(self.crop_size, round(side * scale)) for side in image.size)
            image = image.resize((width, height), Image.Resampling.BICUBIC)
        left = int(self.rng.integers(image.width - self.crop_size + 1))
        top = int(self.rng.integers(image.height - self.crop_size + 1))
        image = image.crop((left, top, left + self.crop_size, top + self.crop_size))
        if self.rng.random() < 0.5:
            image = image.transpose(Image.Transpose.FLIP_LEFT_RIGHT)
        return to_tensor(image)

    def state_dict(self) -> dict:
        return {"rng": self.rng.bit_generator.state}

    def load_state_dict(self, state: dict) -> None:
        self.rng.bit_generator.state = state["rng"]


def image_batches(folders: str | Path | Sequence[str | Path], crop_size: int, batch_size: int,
                  seed: int) -> RandomCrops:
    """Endless [-1, 1] batches (B, 3, crop, crop) of random crops from the images in one or more folders."""
    if crop_size < 1 or batch_size < 1:
        raise UserError(f"crop size {crop_size}, batch size {batch_size}; expected both >= 1")
    folders = [folders] if isinstance(folders, (str, Path)) else list(folders)
    if not folders:
        raise UserError("no image folders given; expected at least one folder of training images")
    paths: list[Path] = []
    for folder in map(Path, folders):
        if not folder.is_dir():
            raise UserError(f"image folder {folder} does not exist or is not a directory; expected a folder of images")
        found = list_images(folder)
        if not found:
            raise UserError(f"image folder {folder} holds no images; expected files ending in "
                            f"{', '.join(IMAGE_EXTENSIONS)}")
        paths += found
    return RandomCrops(paths, crop_size, batch_size, seed)


def student_arch(teacher_arch: dict) -> dict:
    """The distillation student: the teacher's architecture with a quarter of its channels.

    As in GAN-Compression the student is the same network, narrower, so it stays the official
    class. A quarter of the width divides the inner layers' MACs by 16; the 3-channel stem and
    output convs shrink only 4x, leaving >= 10x fewer MACs overall for the registry's models.
    """
    width_key = arch_family(teacher_arch).width_key
    if width_key not in teacher_arch:
        raise UserError(f"cannot derive a student for architecture {teacher_arch}; expected its width {width_key!r}")
    return {**teacher_arch, width_key: max(1, teacher_arch[width_key] // STUDENT_WIDTH_DIVISOR)}


def fit_to_teacher(
    student: nn.Module,
    teacher: nn.Module,
    images: Iterable[torch.Tensor],
    steps: int,
    lr: float,
    pixel_weight: float,
    perceptual_weight: float,
    run: TrainingRun,
    log_every: int,
    checkpoint_every: int,
    n_styles: int | None = None,
    stop_after: int | None = None,
) -> nn.Module:
    """Train `student` (in place, with Adam) until its outputs match the frozen `teacher`'s; returns it.

    Loss per step: pixel_weight * L1 + perceptual_weight * VGG19 feature MSE (`PerceptualLoss`,
    skipped when its weight is 0) between student(x) and teacher(x). `images` is re-iterated
    when it runs out. With `n_styles`, each step draws a style index and runs both nets with it.
    Resumes from `run`'s saved state (student, optimizer, step, torch RNG, and the image
    position of a `ResumableBatches` source such as `image_batches`); `stop_after` ends early
    at that step, as an interruption would. The caller finishes the run (writes the card).
    """
    _check_settings(steps, lr, pixel_weight, perceptual_weight, log_every, checkpoint_every, n_styles, stop_after)
    teacher.eval()
    student.train()
    optimizer = torch.optim.Adam(student.parameters(), lr=lr, betas=ADAM_BETAS)
    step = 0
    state = run.start()
    if state is not None:
        student.load_state_dict(state["student"])
        optimizer.load_state_dict(state["optimizer"])
        torch.set_rng_state(state["torch_rng"])
        if isinstance(images, ResumableBatches):
            images.load_state_dict(state["images"])
        step = state["step"]
    perceptual = PerceptualLoss() if perceptual_weight > 0 else None
    device = next(student.parameters()).device
    batches = _endless(images)
    end = steps if stop_after is None else min(steps, stop_after)
    while step < end:
        inputs = next(batches).to(device)
        style = () if n_styles is None else (int(torch.randint(n_styles, ())),)
        with torch.no_grad():
            target = teacher(inputs, *style)
        output = student(inputs, *style)
        losses = {"pixel": F.l1_loss(output, target)}
        total = pixel_weight * losses["pixel"]
        if perceptual is not None:
            losses["perceptual"] = perceptual(output, target)
            total = total + perceptual_weight * losses["perceptual"]
        optimizer.zero_grad(set_to_none=True)
        total.backward()
        optimizer.step()
        step += 1
        if step % log_every == 0 or step == steps:
            run.log(step, steps, {**{name: loss.item() for name, loss in losses.items()}, "total": total.item()})
        if step % checkpoint_every == 0 or step == end:
            run.save_state({
                "step": step,
                "student": student.state_dict(),
                "optimizer": optimizer.state_dict(),
                "torch_rng": torch.get_rng_state(),
                **({"images": images.state_dict()} if isinstance(images, ResumableBatches) else {}),
            })
    return student


def _check_settings(steps: int, lr: float, pixel_weight: float, perceptual_weight: float, log_every: int,
                    checkpoint_every: int, n_styles: int | None, stop_after: int | None) -> None:
    if steps < 1 or log_every < 1 or checkpoint_every < 1:
        raise UserError(f"steps={steps}, log_every={log_every}, checkpoint_every={checkpoint_every}; "
                        "expected all >= 1")
    if not lr > 0:
        raise UserError(f"learning rate {lr}; expected a value > 0")
    if not (pixel_weight >= 0 and perceptual_weight >= 0 and pixel_weight + perceptual_weight > 0):
        raise UserError(f"loss weights pixel={pixel_weight}, perceptual={perceptual_weight}; "
                        "expected both >= 0 and at least one > 0")
    if n_styles is not None and n_styles < 1:
        raise UserError(f"n_styles={n_styles}; expected None (no styles) or a count >= 1")
    if stop_after is not None and stop_after < 1:
        raise UserError(f"stop_after={stop_after}; expected None or a step >= 1")


def _endless(images: Iterable[torch.Tensor]) -> Iterator[torch.Tensor]:
    """Batches from `images`, starting over whenever it is exhausted."""
    while True:
        empty = True
        for batch in images:
            empty = False
            yield batch
        if empty:
            raise UserError("the image source yielded no batches; expected an endless iterator "
                            "or a collection that can be iterated again")
