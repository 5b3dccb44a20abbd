"""Third-party style-transfer models with more than an image input, built here as users' exporters write them:
a conditional style net (a style-weights vector, Shape-computed reflection pads, dynamic H/W), an NHWC
transformer fed a style embedding, and the style predictor making that embedding (not an image: kind
"other"), and the last two chained as one model. Each benches on TVM and ONNX Runtime with matching
outputs; records name every input and how it was filled."""

from __future__ import annotations

import numpy as np
import pytest
import torch
import torch.nn.functional as F

import targets
from bench.record import append_records, load_records
from bench.run import TOLERANCE, bench_model, model_inputs, reference_output
from bench.run import test_image as photo  # (not a test)
from compile.pipeline import InputSpec, from_onnx_file
from compile.subjects import models_under_test
from errors import UserError
from reports import render_report

STYLES, EMBEDDING = 4, 16
RULES = targets.BenchRules(threads=1, warmup=1, samples=3, min_duration_s=0.0)
RUNTIMES = ("tvm", "onnxruntime")
QUIET = {"report": lambda _: None}
pytestmark = pytest.mark.usefixtures("one_torch_thread")


class ConditionalStyleNet(torch.nn.Module):
    """Dumoulin et al.'s conditional instance norm: per-style scale and shift, mixed by a weights vector.
    Pads H and W up to a multiple of 4 by amounts computed from the input's shape, and crops back."""

    def __init__(self, width: int = 8) -> None:
        super().__init__()
        self.down = torch.nn.Conv2d(3, width, 3, stride=2)
        self.gamma = torch.nn.Parameter(1 + 0.3 * torch.randn(STYLES, width))
        self.beta = torch.nn.Parameter(0.3 * torch.randn(STYLES, width))
        self.up = torch.nn.ConvTranspose2d(width, 3, 4, stride=2, padding=1)

    def forward(self, image, style_weights):
        height, width = image.shape[2], image.shape[3]
        x = F.pad(image, (1, 1 + (4 - width % 4) % 4, 1, 1 + (4 - height % 4) % 4), mode="reflect")
        x = F.instance_norm(self.down(x))
        scale, shift = style_weights @ self.gamma, style_weights @ self.beta
        x = torch.relu(x * scale[:, :, None, None] + shift[:, :, None, None])
        return torch.tanh(self.up(x))[:, :, :height, :width]


class EmbeddingTransformer(torch.nn.Module):
    """Ghiasi et al.'s arbitrary style transfer network, shrunk: an NHWC photo styled by an embedding."""

    def __init__(self, width: int = 8) -> None:
        super().__init__()
        self.conv = torch.nn.Conv2d(3, width, 3, padding=1, padding_mode="reflect")
        self.affine = torch.nn.Linear(EMBEDDING, 2 * width)
        self.out = torch.nn.Conv2d(width, 3, 3, padding=1)

    def forward(self, content, style_embedding):
        x = F.instance_norm(self.conv(content.permute(0, 3, 1, 2)))
        scale, shift = self.affine(style_embedding).chunk(2, dim=1)
        x = torch.relu(x * (1 + scale[:, :, None, None]) + shift[:, :, None, None])
        return torch.tanh(self.out(x)).permute(0, 2, 3, 1)


class StylePredictor(torch.nn.Module):
    """The style image to its embedding: a vector, not an image."""

    def __init__(self, width: int = 8) -> None:
        super().__init__()
        self.conv = torch.nn.Conv2d(3, width, 3, stride=2)
        self.project = torch.nn.Linear(width, EMBEDDING)

    def forward(self, style_image):
        return self.project(torch.relu(self.conv(style_image)).mean(dim=(2, 3)))


def export(module: torch.nn.Module, args: tuple, path, names: list[str], dynamic: dict) -> str:
    torch.onnx.export(module.eval(), args, str(path), dynamo=False, input_names=names, output_names=["out"],
                      dynamic_axes=dynamic)
    return str(path)


@pytest.fixture(scope="module")
def models(tmp_path_factory):
    torch.manual_seed(0)
    folder = tmp_path_factory.mktemp("third_party")
    predictor_args = (torch.zeros(1, 3, 32, 32),)
    predictor = folder / "style_predictor.onnx"
    torch.onnx.export(StylePredictor().eval(), predictor_args, str(predictor), dynamo=False,
                      input_names=["style_image"], output_names=["style_embedding"],
                      dynamic_axes={"style_image": {2: "height", 3: "width"}})
    return {
        "conditional": export(ConditionalStyleNet(), (torch.zeros(1, 3, 32, 32), torch.zeros(1, STYLES)),
                              folder / "conditional_style.onnx", ["image", "style_weights"],
                              {"image": {2: "height", 3: "width"}}),
        "transformer": export(EmbeddingTransformer(), (torch.zeros(1, 32, 32, 3), torch.zeros(1, EMBEDDING)),
                              folder / "transformer.onnx", ["content", "style_embedding"],
                              {"content": {1: "height", 2: "width"}}),
        "predictor": str(predictor),
        "folder": folder,
    }


def bench(model, host):
    records = bench_model(model, host, "multi-input", RUNTIMES, RULES, **QUIET)
    assert [r.runtime for r in records] == list(RUNTIMES)
    for record in records:
        assert record.valid, (record.runtime, record.invalid_reason)
        assert record.tolerance == TOLERANCE["fp32"] and record.max_abs_err <= TOLERANCE["fp32"]
        assert record.latency_p50_ms > 0 and record.peak_rss_bytes > 0  # the memory child ran every input
    return records


@pytest.fixture(scope="module")
def host():
    return targets.resolve(targets.load_target("host"))


def test_a_conditional_style_net_with_shape_computed_pads_benches_on_tvm_and_ort(models, host):
    """Pinned through the CLI's parsing (names, separated by a semicolon); 30x22 is no multiple of 4."""
    graph_ops = {node.op_type for node in __import__("onnx").load(models["conditional"]).graph.node}
    assert {"Shape", "Pad"} <= graph_ops  # the pads really are computed from the shape
    (model,) = models_under_test(None, models["conditional"], ["image=1x3x30x22;style_weights=1x4"], None, False)
    assert model.kind == "generator" and model.input_shape == (1, 3, 30, 22)
    records = bench(model, host)
    assert records[0].inputs == [
        {"name": "image", "shape": [1, 3, 30, 22], "dtype": "float32", "fill": "test-image"},
        {"name": "style_weights", "shape": [1, STYLES], "dtype": "float32",
         "fill": f"seeded-one-hot(seed={InputSpec('style_weights', (1, STYLES), 'float32', 'one-hot').seed})"},
    ]
    weights = model_inputs(model)["style_weights"]
    assert weights.sum() == 1 and weights.max() == 1  # one style, the same on every run
    np.testing.assert_array_equal(weights, model_inputs(model)["style_weights"])


def test_an_nhwc_transformer_fed_an_embedding_file(models, host, tmp_path):
    """The unnamed shape pins the image input (NHWC: channels last); the embedding comes from a .npy file."""
    embedding = tmp_path / "embedding.npy"
    np.save(embedding, np.random.default_rng(3).normal(size=(1, EMBEDDING)))  # float64: cast to the input's float32
    model = from_onnx_file(models["transformer"], (1, 24, 20, 3), values={"style_embedding": embedding})
    assert model.kind == "generator" and [spec.fill for spec in model.inputs] == ["image", "file"]
    x = model_inputs(model)
    np.testing.assert_array_equal(x["content"], photo((1, 3, 24, 20)).transpose(0, 2, 3, 1))  # the photo, NHWC
    fill = bench(model, host)[1].inputs[1]["fill"]
    assert fill.startswith(f"file:{embedding}@sha256:") and len(fill.rpartition(":")[2]) == 64


def test_a_style_predictor_is_kind_other_checked_against_ort_and_reported_apart(models, host, tmp_path):
    model = from_onnx_file(models["predictor"], (1, 3, 32, 32))
    assert model.kind == "other" and model.torch_module is None
    x = model_inputs(model)
    assert isinstance(x, np.ndarray)  # one input: plug-ins get the array, as they always did
    assert reference_output(model, x).shape == (1, EMBEDDING)
    records = bench(model, host)
    assert all(r.kind == "other" and r.sample_png is None for r in records)
    append_records(records, tmp_path / "results" / "other.jsonl")
    render_report(load_records(tmp_path / "results"), tmp_path / "report.html")
    page = next((tmp_path / "report-devices").glob("*.html")).read_text(encoding="utf-8")
    others = page.split('id="other-models"', 1)
    assert len(others) == 2 and "style_predictor" in others[1] and "style_predictor" not in others[0]


def test_a_style_predictor_chained_into_its_transformer_benches_as_one_model(models, host):
    """--onnx A,B: the predictor's embedding feeds the transformer's input of that name; two photo-like
    inputs remain, so --image says which one is the content (the style image gets a seeded fill)."""
    (model,) = models_under_test(None, f"{models['predictor']},{models['transformer']}",
                                 "style_image=1x3x32x32,1x16x16x3", None, False, image="content")
    assert model.name == "style_predictor+transformer" and model.kind == "generator"
    assert [(spec.name, spec.fill) for spec in model.inputs] == [("style_image", "uniform"), ("content", "image")]
    assert model.weights.startswith(f"{models['predictor']}@sha256:") and f" + {models['transformer']}@" in model.weights
    bench(model, host)
    with pytest.raises(UserError, match=r"conditional_style\.onnx: no input is named like an output of "
                                        r".*style_predictor\.onnx \(style_embedding\)"):
        models_under_test(None, f"{models['predictor']},{models['conditional']}", None, None, False)


def test_fills_are_deterministic_and_fit_the_dtype():
    rng_fill = InputSpec("noise", (1, 1, 4, 4), "float32", "uniform").filled()
    assert rng_fill.dtype == np.float32 and -1 <= rng_fill.min() and rng_fill.max() <= 1
    np.testing.assert_array_equal(rng_fill, InputSpec("noise", (1, 1, 4, 4), "float32", "uniform").filled())
    assert not np.array_equal(rng_fill, InputSpec("latent", (1, 1, 4, 4), "float32", "uniform").filled())
    index = InputSpec("style_index", (1,), "int64", "zeros")
    assert index.describe() == "zeros" and index.filled().dtype == np.int64 and not index.filled().any()


@pytest.mark.parametrize(("shapes", "values", "pattern"), [
    ({"styles": (1, 4)}, {}, r"--shape styles: no input named 'styles'; the model's inputs are image, style_weights"),
    ({}, {"noise": "x.npy"}, r"--input noise: no input named 'noise'"),
    ({}, {"style_weights": "missing.npy"}, r"--input style_weights: no such file .*missing\.npy"),
    ({}, {"style_weights": "wrong.npy"}, r"--input style_weights: .*wrong\.npy holds shape \(1, 3\), the input takes "
                                          r"\(1, 4\)"),
    ({"style_weights": (1, 4)}, {}, r"input 'image' has shape \(1, 3, 'height', 'width'\); give it a static shape "
                                    r"\(--shape image=\.\.\."),
], ids=["unknown-shape-name", "unknown-input-name", "missing-file", "wrong-npy-shape", "dynamic-not-pinned"])
def test_bad_inputs_are_one_line_errors_naming_the_input(models, tmp_path, monkeypatch, shapes, values, pattern):
    monkeypatch.chdir(tmp_path)
    np.save(tmp_path / "wrong.npy", np.zeros((1, 3), np.float32))
    with pytest.raises(UserError, match=pattern) as info:
        from_onnx_file(models["conditional"], shapes=shapes, values=values)
    assert str(info.value).startswith(models["conditional"]) and "\n" not in str(info.value)


def test_cli_parsing_of_shapes_and_inputs(models):
    (model,) = models_under_test(None, models["conditional"], ["1x3x16x16", "style_weights=1x4"], None, False)
    assert [spec.shape for spec in model.inputs] == [(1, 3, 16, 16), (1, STYLES)]  # unnamed: the image input's
    with pytest.raises(UserError, match=r"--shape 'image=': expected NAME=NxCxHxW"):
        models_under_test(None, models["conditional"], ["image="], None, False)
    with pytest.raises(UserError, match="name the inputs of an --onnx file"):
        models_under_test("nst-cin4-w16", None, ["image=1x3x32x32"], None, False)
    with pytest.raises(UserError, match=r"--image content: no input named 'content'"):
        models_under_test(None, models["conditional"], "1x3x16x16", None, False, image="content")


def test_boards_refuse_multi_input_models_before_connecting(models):
    board = targets.resolve(targets.load_target("aarch64-emu"))
    model = from_onnx_file(models["conditional"], shapes={"image": (1, 3, 16, 16)})
    with pytest.raises(UserError, match=r"^conditional_style: boards run one-input models; this one has inputs "
                                        r"image, style_weights$"):
        bench_model(model, board, "board", ("tvm",), RULES, **QUIET)
