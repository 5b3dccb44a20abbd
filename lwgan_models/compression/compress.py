"""`invoke compress`: turn a trained generator into a variant a user would ship, and measure what it cost.

Methods:
- ptq: int8 post-training quantization, activation ranges calibrated on training-split crops
  (never on the held-out images quality is measured on).
- qat: the same int8 scheme, then fine-tuned with fake quantization against the fp32 teacher.
- kd: a student with a quarter of the channels (>= 10x fewer MACs), distilled from the teacher
  with pixel + VGG perceptual losses (GAN Compression).
- prune: structured L1 channel pruning to `keep` of the width, fine-tuned on the teacher's outputs (pixel loss).
- prune+kd+ptq: prune, distill with pixel + perceptual losses, then int8 PTQ.

Torch variants ship as a state_dict (`<variant>.pt`, official layout at the smaller size);
int8 variants ship as the ONNX QDQ file (`<variant>.onnx`). Either way a card (`<variant>.json`)
says how it was made and what it measures: params, MACs, ONNX size, PSNR/SSIM against the
teacher on held-out images, and the seed report's metric.
"""

from __future__ import annotations

import dataclasses
import shutil
import tempfile
from dataclasses import dataclass
from pathlib import Path

import torch

from errors import UserError
from lwgan_models import registry
from lwgan_models.compression import evaluate, quantize
from lwgan_models.compression.distill import fit_to_teacher, image_batches, student_arch
from lwgan_models.compression.prune import prune_generator
from lwgan_models.cyclegan_recipe import generator_loss, load_companions
from lwgan_models.onnx_export import export_onnx
from lwgan_models.perceptual import total_variation
from lwgan_models.registry import CHECKPOINT_DIR, LoadedModel
from lwgan_models.standin_data import REPO_DATASET as STANDIN_DATASET
from lwgan_models.training import (
    RUNS_DIR,
    TrainingRun,
    card_path,
    file_sha256,
    read_card,
    write_json,
)

METHODS = ("ptq", "qat", "kd", "prune", "prune+kd+ptq")
INT8_METHODS = ("ptq", "qat", "prune+kd+ptq")


@dataclass(frozen=True)
class CompressConfig:
    """Everything that shapes a compressed variant (saved in its card)."""

    steps: int = 600  # fine-tuning / distillation steps for qat, kd, prune (batch 4: 2400 crops)
    lr: float = 1e-3
    qat_lr: float = 1e-5  # QAT only nudges the fp32 weights
    crop_size: int = 64
    batch_size: int = 4
    keep: float = 0.375  # prune: fraction of channels kept (16 -> 6 for ngf=16)
    perceptual_weight: float = 1.0
    calibration_batches: int = 16
    weight_bits: int = quantize.DEFAULT_WEIGHT_BITS
    seed: int = 0
    log_every: int = 50
    checkpoint_every: int = 250
    train_dirs: tuple[str, ...] = (str(STANDIN_DATASET / "trainA"),)
    heldout_dir: str = str(STANDIN_DATASET / "testA")
    heldout_b_dir: str = str(STANDIN_DATASET / "testB")  # CycleGAN's identity term needs domain B

    def to_dict(self) -> dict:
        data = dataclasses.asdict(self)
        for key in ("train_dirs",):
            data[key] = [registry.repo_relative(p) for p in data[key]]
        for key in ("heldout_dir", "heldout_b_dir"):
            data[key] = registry.repo_relative(data[key])
        return data


def variant_name(base: str, method: str) -> str:
    return f"{base}+{method}"


def compress(base: LoadedModel, method: str, config: CompressConfig = CompressConfig(),
             out_dir: Path = CHECKPOINT_DIR, work_dir: Path | None = None) -> Path:
    """Make the `method` variant of `base` (a trained registry model); returns the variant's card path."""
    if method not in METHODS:
        raise UserError(f"compression method {method!r} is unknown; expected one of {', '.join(METHODS)}")
    if base.weights == "random":
        raise UserError(f"{base.spec.name} has random weights; compress a trained checkpoint "
                        "(invoke train first, or pass --checkpoint)")
    if method in INT8_METHODS:
        quantize.weight_limit(config.weight_bits)  # a bad bit width fails now, not after fine-tuning
    name = variant_name(base.spec.name, method)
    artifact = Path(out_dir) / f"{name}{'.onnx' if method in INT8_METHODS else '.pt'}"
    if artifact.exists():
        raise UserError(f"{artifact} already holds a finished variant; remove it or choose another output folder")
    work_dir = Path(work_dir) if work_dir is not None else RUNS_DIR / name
    teacher = base.module.eval()
    arch = base.spec.arch
    shape = tuple(base.spec.input_shape)
    heldout = evaluate.heldout_images(Path(config.heldout_dir), shape[-1])
    styles_key = registry.arch_family(arch).styles_key
    n_styles = arch[styles_key] if styles_key else None  # a student learns every style its teacher knows

    def fit(student: torch.nn.Module, stage: str, perceptual_weight: float, lr: float, styles: bool) -> None:
        run = TrainingRun(f"{name}:{stage}", {"base": base.weights, "stage": stage, **config.to_dict()},
                          work_dir / f"{stage}.done", work_dir / stage)
        batches = image_batches(config.train_dirs, config.crop_size, config.batch_size, config.seed)
        fit_to_teacher(student, teacher, batches, config.steps, lr, 1.0, perceptual_weight, run,
                       config.log_every, config.checkpoint_every, n_styles=n_styles if styles else None)

    def int8(model: torch.nn.Module, qat: bool) -> torch.nn.Module:
        prepared = quantize.prepare(model, torch.zeros(shape), config.weight_bits)
        calibration = iter(image_batches(config.train_dirs, config.crop_size, 1, config.seed + 1))
        quantize.calibrate(prepared, [next(calibration) for _ in range(config.calibration_batches)])
        if qat:  # single style: the int8 artifact is exported for the network's active style
            quantize.set_mode(prepared, "train")
            fit(prepared, "qat", 0.0, config.qat_lr, styles=False)
            quantize.set_mode(prepared, "quantize")
        return prepared

    if method in ("ptq", "qat"):
        variant_arch, student = arch, None
        model = int8(teacher, qat=method == "qat")
    elif method == "kd":
        variant_arch = student_arch(arch)
        torch.manual_seed(config.seed)
        student = registry.build_generator(variant_arch)
        fit(student, "kd", config.perceptual_weight, config.lr, styles=True)
        model = student
    else:  # prune, prune+kd+ptq
        student, variant_arch = prune_generator(teacher, arch, config.keep)
        kd = method == "prune+kd+ptq"
        fit(student, "prune+kd" if kd else "prune", config.perceptual_weight if kd else 0.0, config.lr,
            styles=True)
        model = int8(student, qat=False) if kd else student

    # The artifact is written aside and moved into place after its card, so a failure while
    # measuring never leaves an artifact without a card (which would block a rerun).
    with tempfile.TemporaryDirectory() as scratch:
        staged = Path(scratch) / artifact.name
        if method in INT8_METHODS:
            quantize.export_qdq(model, shape, staged)
            onnx_path = staged
            variant = evaluate.onnx_generator(staged)
        else:
            torch.save(model.state_dict(), staged)
            onnx_path = Path(scratch) / "variant.onnx"
            export_onnx(model, shape, onnx_path)
            variant = evaluate.torch_generator(model)
        teacher_onnx = Path(scratch) / "teacher.onnx"
        export_onnx(teacher, shape, teacher_onnx)
        card = {
            "method": method,
            "base": base.spec.name,
            "base_weights": base.weights,
            "config": config.to_dict(),
            "format": "onnx-qdq" if method in INT8_METHODS else "torch",
            "arch": variant_arch,
            "input_shape": list(shape),
            "params": sum(p.numel() for p in (student or teacher).parameters()),
            "macs": registry.count_macs(dataclasses.replace(base.spec, arch=variant_arch)),
            "onnx_bytes": onnx_path.stat().st_size,
            "teacher_onnx_bytes": teacher_onnx.stat().st_size,
            "sha256": file_sha256(staged),
            "quality": evaluate.fidelity(variant, evaluate.torch_generator(teacher), heldout),
            "seed_metric": seed_metric(base, variant, heldout, Path(config.heldout_b_dir)),
        }
        write_json(card_path(artifact), card)
        shutil.move(staged, artifact)
    print(f"[{name}] wrote {artifact}: PSNR {card['quality']['psnr_db']:.2f} dB, SSIM {card['quality']['ssim']:.4f}, "
          f"ONNX {card['onnx_bytes'] / 1e6:.2f} MB ({card['teacher_onnx_bytes'] / card['onnx_bytes']:.2f}x smaller)")
    return card_path(artifact)


def evaluate_base(base: LoadedModel, config: CompressConfig = CompressConfig()) -> dict:
    """Add the seed report's metric for the trained fp32 model to its card, under the variants' protocol."""
    if base.weights == "random":
        raise UserError(f"{base.spec.name} has random weights; there is no trained model to evaluate")
    heldout = evaluate.heldout_images(Path(config.heldout_dir), base.spec.input_shape[-1])
    metric = seed_metric(base, evaluate.torch_generator(base.module), heldout, Path(config.heldout_b_dir))
    checkpoint = _checkpoint_path(base)
    write_json(card_path(checkpoint), {**read_card(checkpoint), "seed_metric": metric})
    return metric


def _checkpoint_path(base: LoadedModel) -> Path:
    path = Path(base.weights.split("@sha256:")[0])
    return path if path.is_absolute() else registry.REPO_ROOT / path


def seed_metric(base: LoadedModel, generator: evaluate.Generator, images_a: torch.Tensor,
                heldout_b: Path) -> dict:
    """The seed report's metric for `generator`, the one its family names."""
    metric = registry.arch_family(base.spec.arch).seed_metric
    return {"name": metric.name, **metric.measure(base, generator, images_a, heldout_b)}


def style_tv_loss(base: LoadedModel, generator: evaluate.Generator, images_a: torch.Tensor, heldout_b: Path) -> dict:
    """Total variation of the stylised held-out images."""
    return {"value": round(float(total_variation(generator(images_a))), 6)}


def cyclegan_loss(base: LoadedModel, generator: evaluate.Generator, images_a: torch.Tensor, heldout_b: Path) -> dict:
    """CycleGAN's generator loss A->B, with the G_B and D_A trained beside the base."""
    g_b, d_a = load_companions(_checkpoint_path(base))
    images_b = evaluate.heldout_images(heldout_b, images_a.shape[-1])
    count = min(len(images_a), len(images_b))
    losses = generator_loss(generator, g_b, d_a, images_a[:count], images_b[:count])
    return {"value": round(losses["total"], 6), "terms": losses}
