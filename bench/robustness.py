"""Adversarial robustness of a generator and its compressed variants: how far a small input perturbation
moves the output, and whether compression left a generator more fragile than its fp32 teacher.

The attacker maximises the distance (MSE) between the output on the perturbed input and the clean
output, white-box on each model's own gradients: fp32 models through their torch module, int8 variants
through the fake-quant torch form of their QDQ file (`quantize.load_qdq`; rounding passes gradients
straight through). ε counts 8-bit pixel levels, ε/255 of the [0, 1] pixel range; the generators read
[-1, 1], where one level is 2/255, so a budget of ε is 2ε/255 in model units. Perturbed inputs stay in
[-1, 1] and are not rounded back to the 8-bit grid.

- FGSM: the clean input is a minimum of this loss (zero distance, zero gradient), so a signed gradient
  step from it goes nowhere. FGSM starts from a random signed step of ε/2 and takes its gradient-sign
  step of ε/2 from there (R+FGSM, Tramèr et al. 2018).
- PGD (Madry et al. 2018): a uniform random start in the ε-ball, then `steps` signed steps of
  α = 2.5 ε / steps, each projected back into the ε-ball and the input range.

Random starts come from one seed, the same for every model, so the teacher and its variants start
from the same points. The perturbed inputs then run through the model compiled by TVM for the host
(the build `invoke bench` times): TVM's output on each adversarial input is checked against torch's by
the bench's rule for the model's precision, and the PSNR is measured on TVM's outputs as well.
"""

from __future__ import annotations

import dataclasses
import datetime
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import numpy as np
import torch
from torch import nn

from bench import runtimes as runtime_registry
from bench.places import HostPlace
from bench.record import Record, append_records, robustness_verdict
from bench.run import check_output, executed_precision, model_fields, target_fields
from compile.artifacts import build_artifact
from compile.pipeline import ModelUnderTest
from errors import UserError
from lwgan_models.compression.compress import CompressConfig
from lwgan_models.compression.evaluate import heldout_images, psnr_db
from lwgan_models.compression.quantize import load_qdq
from lwgan_models.registry import VARIANT_SEPARATOR, build_generator, find_variant, get, variants
from targets import ResolvedTarget

ATTACKS = ("fgsm", "pgd")
EPSILONS = (1, 2, 4, 8)  # 8-bit pixel levels: ε/255
PGD_STEPS = 10
SEED = 0


@dataclass(frozen=True)
class Probe:
    attack: str  # "fgsm" | "pgd"
    epsilon: float  # 8-bit pixel levels
    steps: int  # gradient steps (FGSM: 1)


def plan(epsilons: tuple[float, ...] = EPSILONS, pgd_steps: int = PGD_STEPS) -> list[Probe]:
    """Every attack at every budget; a budget outside (0, 255] levels is refused."""
    for epsilon in epsilons:
        if not 0 < epsilon <= 255:
            raise UserError(f"epsilon {epsilon:g}: expected 8-bit pixel levels in (0, 255], e.g. 1,2,4,8")
    if pgd_steps < 1:
        raise UserError(f"PGD steps {pgd_steps}: expected at least 1")
    return [Probe(attack, epsilon, 1 if attack == "fgsm" else pgd_steps) for attack in ATTACKS for epsilon in epsilons]


def teacher_and_variants(base: str, methods: list[str] | None = None) -> list[str]:
    """The fp32 teacher `base` first, then its shipped variants (those made by `methods`, default all)."""
    if VARIANT_SEPARATOR in base:
        raise UserError(f"model {base!r} is a variant; name its base model (the fp32 teacher) and choose variants by method")
    shipped = {name.partition(VARIANT_SEPARATOR)[2]: name for name in variants(get(base).name)}
    unknown = sorted(set(methods or ()) - set(shipped))
    if unknown:
        raise UserError(f"{base} has no {', '.join(unknown)} variant; shipped: {', '.join(shipped) or 'none'}")
    return [base, *(name for method, name in shipped.items() if methods is None or method in methods)]


def budget(levels: float) -> float:
    """ε in model units: inputs span [-1, 1], so one 8-bit level is 2/255."""
    return 2.0 * levels / 255.0


def output_distance(module: nn.Module, images: torch.Tensor, clean: torch.Tensor) -> torch.Tensor:
    """Per image, the MSE between the output on `images` and the clean output: the loss the attacker maximises."""
    return ((module(images) - clean) ** 2).flatten(1).mean(1)


def attack(module: nn.Module, images: torch.Tensor, clean: torch.Tensor, probe: Probe, seed: int = SEED) -> torch.Tensor:
    """`images` perturbed within the probe's ε-ball (and [-1, 1]) to move `module`'s output away from `clean`."""
    epsilon = budget(probe.epsilon)
    generator = torch.Generator().manual_seed(seed)
    if probe.attack == "fgsm":
        start = epsilon / 2 * torch.randn(images.shape, generator=generator).sign()
        step = epsilon / 2
    elif probe.attack == "pgd":
        start = epsilon * (2 * torch.rand(images.shape, generator=generator) - 1)
        step = 2.5 * epsilon / probe.steps
    else:
        raise UserError(f"attack {probe.attack!r} is unknown; expected one of {', '.join(ATTACKS)}")

    def project(x: torch.Tensor) -> torch.Tensor:
        return torch.minimum(torch.maximum(x, images - epsilon), images + epsilon).clamp(-1.0, 1.0)

    x = project(images + start)
    with torch.enable_grad():
        for _ in range(probe.steps):
            x.requires_grad_(True)
            (gradient,) = torch.autograd.grad(output_distance(module, x, clean).sum(), x)
            x = project(x.detach() + step * gradient.sign())
    return x.detach()


def attacked_module(model: ModelUnderTest) -> nn.Module:
    """What the attacker differentiates: the torch module, or an int8 variant's fake-quant form at its input shape."""
    if model.torch_module is not None:
        return model.torch_module.eval()
    variant = find_variant(model.name)
    return load_qdq(build_generator(variant.card["arch"]), variant.path, torch.zeros(model.input_shape))


def heldout(size: int, count: int | None = None) -> torch.Tensor:
    """The held-out images quality is measured on (`invoke compress`'s protocol), the first `count` of them."""
    images = heldout_images(Path(CompressConfig().heldout_dir), size)
    if count is not None and not 1 <= count <= len(images):
        raise UserError(f"--images {count}: expected 1..{len(images)} (the held-out images)")
    return images[:count]


def set_psnr(output: torch.Tensor | np.ndarray, reference: torch.Tensor | np.ndarray) -> float | None:
    """PSNR over every pixel of every image; None where nothing moved (infinite)."""
    value = psnr_db(torch.as_tensor(output), torch.as_tensor(reference))
    return None if value == float("inf") else round(value, 3)


def probe_model(model: ModelUnderTest, target: ResolvedTarget, run_id: str, images: torch.Tensor, probes: list[Probe],
                teacher: dict[Probe, float | None] | None = None, report: Callable[[str], None] = print) -> list[Record]:
    """One record per probe for `model` (its teacher's PSNRs by probe, None for the teacher itself)."""
    module = attacked_module(model)
    threads = target.config.bench.threads
    artifact = build_artifact("tvm", model, target)
    compiled = runtime_registry.get("tvm").load(artifact.path, threads)

    def on_tvm(batch: torch.Tensor) -> np.ndarray:
        return np.concatenate([compiled.run(image[None].numpy()) for image in batch])

    with torch.no_grad():
        clean = module(images)
    tvm_clean = on_tvm(images)
    common = {"run_id": run_id, **model_fields(model), **target_fields(target), "env": HostPlace(target).environment(),
              "runtime": compiled.name, "threads": threads, "executed_precision": executed_precision(model, compiled),
              "artifact_bytes": artifact.path.stat().st_size, "attack_images": len(images)}
    records = []
    for probe in probes:
        adversarial = attack(module, images, clean, probe)
        with torch.no_grad():
            moved = module(adversarial)
        tvm_moved = on_tvm(adversarial)
        check = check_output(model, compiled.name, tvm_moved, moved.numpy())
        psnr = set_psnr(moved, clean)
        records.append(Record(
            **common,
            attack=probe.attack,
            epsilon=probe.epsilon,
            attack_steps=probe.steps,
            adversarial_psnr_db=psnr,
            tvm_adversarial_psnr_db=set_psnr(tvm_moved, tvm_clean),
            teacher_adversarial_psnr_db=psnr if teacher is None else teacher[probe],
            **check.fields(),
            valid=not check.violations,
            invalid_reason="; ".join(check.violations),
            timestamp=datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        ))
        report("  " + table_line(dataclasses.asdict(records[-1])))
    return records


def by_probe(records: list[Record]) -> dict[Probe, float | None]:
    """A teacher's torch PSNRs, keyed by probe, for its variants' records."""
    return {Probe(r.attack, r.epsilon, r.attack_steps): r.adversarial_psnr_db for r in records}


def probe_models(models: list[ModelUnderTest], target: ResolvedTarget, run_id: str, images: torch.Tensor,
                 probes: list[Probe], out: Path, report: Callable[[str], None] = print) -> None:
    """`probe_model` of the teacher (the first model), then of each variant against it; each model's
    records are appended to `out` as soon as it is probed (an interruption keeps them)."""
    teacher = None
    for index, model in enumerate(models, 1):
        report(f"[{index}/{len(models)}] {model.name}")
        records = probe_model(model, target, run_id, images, probes, teacher, report)
        append_records(records, out)
        teacher = teacher or by_probe(records)


TABLE_HEADER = (f"{'model':38s} {'attack':6s} {'steps':>5s} {'eps':>4s} {'torch dB':>9s} {'TVM dB':>8s} "
                f"{'teacher':>8s} {'delta':>6s}  {'verdict':12s} TVM vs torch")


def table_line(record: dict) -> str:
    """One probe as a line of the table `invoke robustness` prints."""
    def db(value) -> str:
        return "inf" if value is None else f"{value:.2f}"

    verdict, delta = robustness_verdict(record)
    check = (f"{record['output_psnr_db']:.1f} dB" if record.get("min_output_psnr_db") is not None
             else f"err {record['max_abs_err']:.1e}")
    return (f"{record['model']:38s} {record['attack']:6s} {record['attack_steps']:5d} {record['epsilon']:4g} "
            f"{db(record['adversarial_psnr_db']):>9s} {db(record['tvm_adversarial_psnr_db']):>8s} "
            f"{db(record['teacher_adversarial_psnr_db']):>8s} {'—' if delta is None else f'{delta:+.2f}':>6s}  "
            f"{verdict:12s} {check}" + ("" if record["valid"] else "  INVALID: " + record["invalid_reason"]))
