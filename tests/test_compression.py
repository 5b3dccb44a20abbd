"""lwgan_models.compression: int8 QDQ numerics, every method end to end on a tiny trained CycleGAN, variant loading."""

from __future__ import annotations

import dataclasses
import json

import numpy as np
import onnx
import onnxruntime as ort
import pytest
import torch
from onnx import numpy_helper
from torch import nn

from errors import UserError
from lwgan_models import registry
from lwgan_models.compression import (
    METHODS,
    CompressConfig,
    compress,
    evaluate,
    quantize,
)
from lwgan_models.cyclegan_recipe import CycleGANConfig, train_cyclegan
from lwgan_models.registry import ModelSpec
from lwgan_models.standin_data import REPO_DATASET

TINY_ARCH = {"family": "cyclegan", "netG": "resnet_6blocks", "ngf": 4}
TINY_SHAPE = (1, 3, 32, 32)
QUICK = CompressConfig(steps=3, crop_size=32, batch_size=1, calibration_batches=2, perceptual_weight=0.1,
                       log_every=1, checkpoint_every=2)


pytestmark = pytest.mark.usefixtures("one_torch_thread")


@pytest.fixture(scope="module")
def tiny_base(tmp_path_factory, one_torch_thread):
    """A registry spec for a tiny CycleGAN and a checkpoint trained by the real recipe (one short epoch)."""
    root = tmp_path_factory.mktemp("tiny-cyclegan")
    config = CycleGANConfig(ngf=4, ndf=4, load_size=36, crop_size=32, n_epochs=1, n_epochs_decay=0, log_every=16)
    checkpoint = train_cyclegan(config, root / "tiny-cyclegan.pt", root / "work")
    spec = ModelSpec("tiny-cyclegan", "cyclegan", TINY_ARCH, TINY_SHAPE, None, "test only", False)
    return spec, checkpoint


def read_ort(path, x: np.ndarray, optimised: bool = False) -> np.ndarray:
    options = ort.SessionOptions()
    if not optimised:
        options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_DISABLE_ALL
    session = ort.InferenceSession(str(path), options, providers=["CPUExecutionProvider"])
    return session.run(None, {session.get_inputs()[0].name: x})[0]


# --- int8 scheme and QDQ export ----------------------------------------------------------------


@pytest.mark.parametrize("bits", [7, 8])
def test_qdq_file_computes_what_the_fake_quant_model_computes(bits, tmp_path):
    torch.manual_seed(0)
    net = nn.Sequential(nn.Conv2d(3, 8, 3, padding=1), nn.ReLU(), nn.Conv2d(8, 4, 3, stride=2, padding=1))
    x = torch.rand(1, 3, 16, 16) * 2 - 1
    prepared = quantize.calibrate(quantize.prepare(net, x, weight_bits=bits), [x, -x])
    path = quantize.export_qdq(prepared, (1, 3, 16, 16), tmp_path / "q.onnx")
    int8_weights = [numpy_helper.to_array(i) for i in onnx.load(str(path)).graph.initializer if i.data_type == 3]
    assert max(int(np.abs(w).max()) for w in int8_weights) == 2 ** (bits - 1) - 1
    with torch.no_grad():
        fake_quant = prepared(x).numpy()
        fp32 = net(x).numpy()
    np.testing.assert_allclose(read_ort(path, x.numpy()), fake_quant, atol=1e-6)
    assert 0 < np.abs(fake_quant - fp32).max() < 0.05  # quantized, and close


def test_export_stores_int8_weights_int32_biases_and_quantizes_every_conv_input_and_output(tmp_path):
    torch.manual_seed(0)
    net = registry.build_generator(TINY_ARCH)
    for module in net.modules():  # trained nets have biases; the exporter drops all-zero ones
        if isinstance(module, (nn.Conv2d, nn.ConvTranspose2d)) and module.bias is not None:
            nn.init.uniform_(module.bias, -0.1, 0.1)
    x = torch.rand(TINY_SHAPE) * 2 - 1
    prepared = quantize.calibrate(quantize.prepare(net, x), [x])
    model = onnx.load(str(quantize.export_qdq(prepared, TINY_SHAPE, tmp_path / "q.onnx")))
    producers = {out: node for node in model.graph.node for out in node.output}
    consumers = {}
    for node in model.graph.node:
        for name in node.input:
            consumers.setdefault(name, []).append(node)
    initializers = {i.name: numpy_helper.to_array(i) for i in model.graph.initializer}
    convs = [n for n in model.graph.node if n.op_type == "Conv"]
    # 2 transposed convs became 4 sub-pixel convs each
    assert len(convs) == len(quantize.quant_convs(prepared)) == 1 + 2 + 12 + 8 + 1
    for conv in convs:
        data, weight, bias = (producers[name] for name in conv.input)
        assert data.op_type == "DequantizeLinear" and producers[data.input[0]].op_type == "QuantizeLinear"
        assert initializers[weight.input[0]].dtype == np.int8 and weight.attribute[0].i == 0  # axis 0: per channel
        assert initializers[bias.input[0]].dtype == np.int32
        (after,) = consumers[conv.output[0]]
        assert after.op_type == "QuantizeLinear"
    float_weights = [i for i in initializers.values() if i.dtype == np.float32 and i.size > 64]
    assert not float_weights  # only per-channel scales stay float


def test_prepare_rewrites_transposed_convs_exactly_before_quantizing():
    torch.manual_seed(0)
    net = registry.build_generator(TINY_ARCH).eval()
    x = torch.rand(TINY_SHAPE) * 2 - 1
    prepared = quantize.prepare(net, x)
    with torch.no_grad():  # "observe" mode runs float
        np.testing.assert_allclose(prepared(x).numpy(), net(x).numpy(), atol=1e-5)
    assert not any(isinstance(m, nn.ConvTranspose2d) for m in prepared.modules())


def test_quantizing_without_calibration_or_with_no_images_is_a_clear_error():
    net = nn.Sequential(nn.Conv2d(3, 4, 3))
    x = torch.zeros(1, 3, 8, 8)
    with pytest.raises(UserError, match="no images"):
        quantize.calibrate(quantize.prepare(net, x), [])
    uncalibrated = quantize.set_mode(quantize.prepare(net, x), "quantize")
    with pytest.raises(UserError, match="calibrat"):
        uncalibrated(x)


def test_qat_moves_ranges_and_trains_through_the_rounding():
    torch.manual_seed(0)
    net = nn.Sequential(nn.Conv2d(3, 4, 3, padding=1))
    x = torch.rand(2, 3, 8, 8)
    prepared = quantize.calibrate(quantize.prepare(net, x), [x])
    quantize.set_mode(prepared, "train")
    before = prepared[0].input_range.high.clone()
    loss = prepared(x * 3).sum()
    loss.backward()
    assert prepared[0].input_range.high > before  # moving average follows the larger inputs
    assert prepared[0].conv.weight.grad is not None and prepared[0].conv.weight.grad.abs().sum() > 0


# --- quality metrics --------------------------------------------------------------------------


def test_psnr_and_ssim_are_perfect_for_identical_images_and_drop_with_noise():
    images = evaluate.heldout_images(REPO_DATASET / "testA", 32)
    assert images.shape == (8, 3, 32, 32) and images.min() >= -1 and images.max() <= 1
    noisy = (images + 0.1 * torch.randn_like(images)).clamp(-1, 1)
    assert evaluate.psnr_db(images, images) == float("inf")
    assert evaluate.ssim(images, images) == pytest.approx(1.0)
    assert 15 < evaluate.psnr_db(noisy, images) < 30
    assert evaluate.ssim(noisy, images) < 0.95


def test_missing_heldout_folder_names_it(tmp_path):
    with pytest.raises(UserError, match="nowhere"):
        evaluate.heldout_images(tmp_path / "nowhere", 32)


# --- every method end to end ------------------------------------------------------------------


@pytest.mark.parametrize("method", METHODS)
def test_each_method_writes_a_variant_with_a_card_that_loads(method, tiny_base, tmp_path, monkeypatch):
    spec, checkpoint = tiny_base
    base = registry.load(spec, checkpoint)
    card_path = compress(base, method, QUICK, out_dir=tmp_path / "variants", work_dir=tmp_path / "work")
    card = json.loads(card_path.read_text())
    assert card["method"] == method and card["base"] == "tiny-cyclegan"
    assert card["base_weights"] == base.weights
    assert card["quality"]["images"] == 8 and np.isfinite(card["quality"]["psnr_db"])
    assert -1 <= card["quality"]["ssim"] <= 1
    assert card["seed_metric"]["name"] == "generator_loss" and np.isfinite(card["seed_metric"]["value"])
    int8 = method in ("ptq", "qat", "prune+kd+ptq")
    assert card["format"] == ("onnx-qdq" if int8 else "torch")
    if method == "kd":
        assert card["arch"]["ngf"] == 1 and card["macs"] * 5 < base.macs  # >= 10x at real sizes: test_prune_distill
    if "prune" in method:
        assert card["arch"]["ngf"] == round(4 * QUICK.keep) and card["params"] < base.params
    if int8:
        assert card["onnx_bytes"] * 2 < card["teacher_onnx_bytes"]  # per-channel scales weigh on 8k params

    monkeypatch.setitem(registry._REGISTRY, "tiny-cyclegan", spec)
    variant = registry.find_variant(f"tiny-cyclegan+{method}", tmp_path / "variants")
    assert variant.path.is_file() and variant.card == card
    if not int8:  # a torch variant is the official class at its smaller size
        module = registry.build_generator(card["arch"])
        module.load_state_dict(torch.load(variant.path, weights_only=True))

    with pytest.raises(UserError, match="already holds"):
        compress(base, method, QUICK, out_dir=tmp_path / "variants", work_dir=tmp_path / "work2")


def test_ptq_quality_is_measured_on_the_exact_int8_file(tiny_base, tmp_path):
    """The card's PSNR is the QDQ file's, run with reference kernels, against the fp32 teacher."""
    spec, checkpoint = tiny_base
    base = registry.load(spec, checkpoint)
    card = json.loads(compress(base, "ptq", QUICK, out_dir=tmp_path, work_dir=tmp_path / "w").read_text())
    images = evaluate.heldout_images(REPO_DATASET / "testA", 32)
    outputs = torch.cat([torch.from_numpy(read_ort(tmp_path / "tiny-cyclegan+ptq.onnx", i[None].numpy()))
                         for i in images])
    with torch.no_grad():
        teacher = base.module(images)
    psnr = np.mean([evaluate.psnr_db(o[None], t[None]) for o, t in zip(outputs, teacher)])
    assert card["quality"]["psnr_db"] == pytest.approx(psnr, abs=1e-2)


def test_bad_requests_fail_before_any_work(tiny_base, tmp_path):
    spec, checkpoint = tiny_base
    with pytest.raises(UserError, match="unknown"):
        compress(registry.load(spec, checkpoint), "int4", QUICK, out_dir=tmp_path)
    with pytest.raises(UserError, match="random weights"):
        compress(registry.load(spec), "ptq", QUICK, out_dir=tmp_path)
    with pytest.raises(UserError, match="weight bits 9"):
        compress(registry.load(spec, checkpoint), "prune+kd+ptq", dataclasses.replace(QUICK, weight_bits=9),
                 out_dir=tmp_path, work_dir=tmp_path / "never")
    assert not (tmp_path / "never").exists()
    with pytest.raises(UserError, match="not been made"):
        registry.find_variant("cyclegan-resnet6-ngf16+qat", tmp_path)
    unet = dataclasses.replace(spec, arch={"family": "cyclegan", "netG": "unet_128", "ngf": 4}, input_shape=(1, 3, 128, 128))
    torch.save(registry.build_generator(unet.arch).state_dict(), tmp_path / "unet.pt")
    with pytest.raises(UserError, match="unet_128"):
        compress(registry.load(unet, tmp_path / "unet.pt"), "prune", QUICK, out_dir=tmp_path)
    assert not list(tmp_path.glob("*+*"))


def test_a_failure_while_measuring_leaves_nothing_that_blocks_a_rerun(tiny_base, tmp_path, monkeypatch):
    spec, checkpoint = tiny_base
    base = registry.load(spec, checkpoint)

    def broken(*args):
        raise UserError("held-out images vanished")

    monkeypatch.setattr(evaluate, "fidelity", broken)
    with pytest.raises(UserError, match="vanished"):
        compress(base, "ptq", QUICK, out_dir=tmp_path, work_dir=tmp_path / "w")
    assert not list(tmp_path.glob("tiny-cyclegan+ptq*"))
    monkeypatch.undo()
    card = compress(base, "ptq", QUICK, out_dir=tmp_path, work_dir=tmp_path / "w")
    assert card.is_file() and (tmp_path / "tiny-cyclegan+ptq.onnx").is_file()
