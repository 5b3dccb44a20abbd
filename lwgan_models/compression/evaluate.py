"""What a compressed variant costs in quality, measured on held-out images against its fp32 teacher.

Two kinds of number per variant: fidelity to the teacher (PSNR and SSIM of outputs, the image
range [-1, 1] taken as the data range) and the seed report's own metric (CycleGAN generator loss,
style-transfer TV loss), so our table sits beside the seed's. int8 variants are evaluated as their
ONNX QDQ file run by ONNX Runtime with graph optimisations off: the exact quantized arithmetic the
file specifies, independent of which int8 kernels a runtime picks.
"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

import numpy as np
import onnxruntime as ort
import torch
from skimage.metrics import structural_similarity

from errors import UserError
from lwgan_models.data import list_images, load_rgb, resize_and_crop, to_tensor

Generator = Callable[[torch.Tensor], torch.Tensor]


def heldout_images(folder: Path, size: int) -> torch.Tensor:
    """Every image in `folder`, shorter side resized to `size` and centre-cropped: (N, 3, size, size) in [-1, 1]."""
    paths = list_images(Path(folder)) if Path(folder).is_dir() else []
    if not paths:
        raise UserError(f"held-out image folder {folder} is missing or holds no images")
    return torch.stack([to_tensor(resize_and_crop(load_rgb(path), size, None)) for path in paths])


def onnx_generator(path: Path) -> Generator:
    """Run an ONNX generator image by image with the reference (unoptimised) CPU kernels."""
    options = ort.SessionOptions()
    options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_DISABLE_ALL
    session = ort.InferenceSession(str(path), options, providers=["CPUExecutionProvider"])
    name = session.get_inputs()[0].name

    def run(images: torch.Tensor) -> torch.Tensor:
        return torch.cat([torch.from_numpy(session.run(None, {name: image[None].numpy()})[0]) for image in images])

    return run


def torch_generator(module: torch.nn.Module) -> Generator:
    module.eval()

    @torch.no_grad()
    def run(images: torch.Tensor) -> torch.Tensor:
        return torch.cat([module(image[None]) for image in images])

    return run


def psnr_db(output: torch.Tensor, reference: torch.Tensor) -> float:
    """Peak signal-to-noise ratio for images in [-1, 1] (peak-to-peak 2)."""
    return psnr_from_mse(float(torch.mean((output.double() - reference.double()) ** 2)))


PEAK_SQUARED = 4.0  # images in [-1, 1]: peak-to-peak 2


def psnr_from_mse(mse: float) -> float:
    """The PSNR of a mean squared error on [-1, 1] images (errors of independent roundings add as MSEs)."""
    return float("inf") if mse == 0 else float(10 * np.log10(PEAK_SQUARED / mse))


def ssim(output: torch.Tensor, reference: torch.Tensor) -> float:
    """Mean SSIM over the batch (Wang et al.; Gaussian window as in their reference code)."""
    return float(np.mean([
        structural_similarity(o.numpy(), r.numpy(), channel_axis=0, data_range=2.0, gaussian_weights=True,
                              sigma=1.5, use_sample_covariance=False)
        for o, r in zip(output.float(), reference.float())
    ]))


def fidelity(variant: Generator, teacher: Generator, images: torch.Tensor) -> dict:
    """PSNR and SSIM of the variant's outputs against the teacher's on the same images."""
    ours, theirs = variant(images), teacher(images)
    per_image = [psnr_db(o[None], t[None]) for o, t in zip(ours, theirs)]
    return {"psnr_db": round(float(np.mean(per_image)), 3), "ssim": round(ssim(ours, theirs), 5),
            "images": len(images)}
