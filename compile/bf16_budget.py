"""Which wide Winograd convolutions of a bf16 build multiply in bf16: an error budget, calibrated per model.

bf16 Winograd products run twice as fast as float32 ones, but F(4x4, 3x3)'s transforms amplify bf16's
rounding: one conv's output error is about 1e-2 of its RMS, against 2.4e-3 for a direct bf16 conv.
The shipped generators' 64-channel trunks keep 57-63 dB with every Winograd conv in bf16; the 9-block
ngf64 CycleGAN falls to 39 dB (below the bf16 rule's 40) with all eighteen 256-channel trunk convs in
bf16, and keeps 48 dB with none. So each Winograd conv wider than `bf16.WINOGRAD_MAX_CHANNELS` is
chosen per model, the way a quantizer calibrates its ranges: the bf16 build is simulated in torch on
calibration photos (the stand-in dataset's held-out domain-B images, not the benchmark's photo), each
wide conv's extra error is measured alone, and the least harmful join while the simulated output keeps
`TARGET_PSNR_DB` against float32. The Relax rewrite (compile/schedules/winograd.py) knows the chosen
convs by their weights' digest (`bf16.weight_digest`). `calibrated` keeps each model's outcome in the
build cache: a build, its roofline profile and `invoke profile` each import the model again, and the
teacher's calibration takes about 40 s.
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from compile import bf16
from compile.schedules.winograd import ALPHA, TILE, A, B, eligible, transform_weight
from lwgan_models.compression.evaluate import PEAK_SQUARED, heldout_images, psnr_from_mse
from lwgan_models.hooks import forward_hooks
from lwgan_models.standin_data import REPO_DATASET

# The bf16 rule (bench/run.py MIN_OUTPUT_PSNR_DB: 40 dB against float32), with 2 dB to spare for
# inputs other than the calibration photos and for the simulation's approximations.
TARGET_PSNR_DB = 42.0
CALIBRATION_IMAGES = ("066_chelsea.jpg", "067_coffee.jpg")  # of REPO_DATASET / "testB": a cat, a cup


@dataclass(frozen=True)
class Budget:
    """The calibration's outcome: the wide convs that multiply in bf16 (by `bf16.weight_digest`), of how many."""

    chosen: frozenset[str]
    wide: int
    simulated_psnr_db: float | None  # the simulated build with them, against float32 on the calibration photos

    def to_json(self) -> str:
        return json.dumps({"chosen": sorted(self.chosen), "wide": self.wide, "simulated_psnr_db": self.simulated_psnr_db})

    @classmethod
    def from_json(cls, text: str) -> "Budget":
        data = json.loads(text)
        psnr = data["simulated_psnr_db"]
        return cls(frozenset(str(d) for d in data["chosen"]), int(data["wide"]), None if psnr is None else float(psnr))

    def describe(self) -> str:
        if self.simulated_psnr_db is None:
            return (f"bf16: {self.wide} Winograd convs wider than {bf16.WINOGRAD_MAX_CHANNELS} channels multiply in "
                    "float32 (the calibration photos are RGB; this model's input is not)")
        return (f"bf16: {len(self.chosen)} of {self.wide} Winograd convs wider than {bf16.WINOGRAD_MAX_CHANNELS} "
                f"channels multiply in bf16, the rest in float32 (calibrated: {self.simulated_psnr_db:.1f} dB "
                f"simulated against float32, budget {TARGET_PSNR_DB:.0f} dB)")


def calibrate(module: nn.Module, input_shape: tuple[int, ...]) -> Budget:
    """The wide Winograd convs of `module` at `input_shape` that may multiply in bf16 within the budget."""
    module = module.eval()
    with torch.no_grad():
        winograd = _winograd_convs(module, torch.zeros(1, *input_shape[1:]))
        wide = [conv for conv in winograd if conv.in_channels > bf16.WINOGRAD_MAX_CHANNELS and
                bf16.winograd_products_apply(conv.in_channels, calibrated=True)]
        if not wide or input_shape[1] != 3:
            return Budget(frozenset(), len(wide), None)
        images = calibration_images(input_shape)
        reference = module(images)
        narrow = [conv for conv in winograd if bf16.winograd_products_apply(conv.in_channels)]

        def error(chosen: list[nn.Conv2d]) -> float:  # mean squared error of the simulated build's output
            with _simulated_bf16(module, winograd, set(narrow + chosen)):
                return float(torch.mean((module(images).double() - reference.double()) ** 2))

        base = error([])
        extra = {conv: error([conv]) - base for conv in wide}
        budget = PEAK_SQUARED / 10 ** (TARGET_PSNR_DB / 10)
        chosen = []
        for conv in sorted(wide, key=extra.get):  # errors of independent roundings add
            if base + sum(extra[c] for c in chosen) + extra[conv] > budget:
                break
            chosen.append(conv)
        simulated = psnr_from_mse(error(chosen))
        while chosen and simulated < TARGET_PSNR_DB:  # the sum was optimistic
            chosen.pop()
            simulated = psnr_from_mse(error(chosen))
    return Budget(frozenset(bf16.weight_digest(c.weight.detach().numpy()) for c in chosen), len(wide), simulated)


def calibrated(module: nn.Module, input_shape: tuple[int, ...], key: str, cache_dir: Path) -> Budget:
    """`calibrate`'s outcome for the model `key` names (its digest and the build's version), from
    `cache_dir` when an earlier import calibrated it; an unreadable entry is calibrated again."""
    named = json.dumps([key, list(input_shape), TARGET_PSNR_DB, CALIBRATION_IMAGES])
    path = cache_dir / f"bf16-budget-{hashlib.sha256(named.encode()).hexdigest()[:24]}.json"
    try:
        return Budget.from_json(path.read_text())
    except (OSError, ValueError, KeyError, TypeError):  # none yet, or a truncated or foreign file
        pass
    budget = calibrate(module, input_shape)
    cache_dir.mkdir(parents=True, exist_ok=True)
    partial = path.with_suffix(".partial")
    partial.write_text(budget.to_json())
    partial.replace(path)  # never a half-written entry
    return budget


def calibration_images(input_shape: tuple[int, ...]) -> torch.Tensor:
    """The calibration photos at an RGB model's height and width (cropped from squares), in [-1, 1]."""
    _, _, height, width = input_shape
    photos = heldout_images(REPO_DATASET / "testB", max(height, width))
    names = sorted(p.name for p in (REPO_DATASET / "testB").iterdir())
    picked = photos[[names.index(name) for name in CALIBRATION_IMAGES]]
    return picked[:, :, :height, :width].contiguous()


def _winograd_convs(module: nn.Module, example: torch.Tensor) -> list[nn.Conv2d]:
    """The convs compile/schedules/winograd.py rewrites at this input: 3x3, stride 1, ungrouped, an eligible size."""
    found = []

    def record(conv, inputs, output):
        shape_ok = conv.kernel_size == (3, 3) and conv.stride == (1, 1) and conv.dilation == (1, 1)
        if shape_ok and conv.groups == 1 and not isinstance(conv.padding, str) and \
                eligible(conv.in_channels, conv.out_channels, *output.shape[2:]) and conv not in found:
            found.append(conv)

    with forward_hooks(module, record, lambda m: type(m) is nn.Conv2d):
        module(example)
    return found


def _rounded(t: torch.Tensor) -> torch.Tensor:
    return t.to(torch.bfloat16).to(t.dtype)


def winograd_bf16(conv: nn.Conv2d, x: torch.Tensor) -> torch.Tensor:
    """`conv(x)` as the bf16 build computes it: F(4x4, 3x3), transformed operands rounded to bf16."""
    if conv.padding_mode != "zeros":
        x = F.pad(x, conv._reversed_padding_repeated_twice, mode=conv.padding_mode)
    else:
        x = F.pad(x, (conv.padding[1], conv.padding[1], conv.padding[0], conv.padding[0]))
    a, b = (torch.tensor(np.asarray(m, np.float32)) for m in (A, B))
    tiles = x.unfold(2, ALPHA, TILE).unfold(3, ALPHA, TILE)  # N, C, tile rows, tile columns, 6, 6
    v = _rounded(torch.einsum("ki,ncrwkl,lj->ijncrw", b, tiles, b))
    u = torch.from_numpy(transform_weight(conv.weight.detach().numpy())).reshape(ALPHA, ALPHA, *conv.weight.shape[:2])
    m = torch.einsum("ijoc,ijncrw->ijnorw", _rounded(u), v)
    y = torch.einsum("ik,ijnorw,jl->norkwl", a, m, a)
    n, o, rows, _, cols, _ = y.shape
    y = y.reshape(n, o, rows * TILE, cols * TILE)
    return y if conv.bias is None else y + conv.bias[:, None, None]


def _simulated_bf16(module: nn.Module, winograd: list[nn.Conv2d], in_bf16: set[nn.Conv2d]):
    """Forward hooks that replace each conv's output by the bf16 build's: the Winograd ones in `in_bf16`
    through rounded transforms, the other Winograd ones in float32, every other conv on bf16 operands
    (approximations the margin covers: a few of those stay float32 in the build, and a fused transposed
    conv runs as Winograd)."""
    def replace(conv, inputs, output):
        (x,) = inputs
        if conv in in_bf16:
            return winograd_bf16(conv, x)
        if conv in winograd:
            return output  # float32 products: within 1e-6 of the direct conv
        if isinstance(conv, nn.ConvTranspose2d):
            return F.conv_transpose2d(_rounded(x), _rounded(conv.weight), conv.bias, conv.stride, conv.padding,
                                      conv.output_padding, conv.groups, conv.dilation)
        return conv._conv_forward(_rounded(x), _rounded(conv.weight), conv.bias)

    return forward_hooks(module, replace, lambda m: type(m) in (nn.Conv2d, nn.ConvTranspose2d))
