"""The runtime registry (bench/runtimes/): every installed runtime against the reference under its
precision's rule, a plug-in from outside the package reaching records and report, clear errors."""

from __future__ import annotations

import csv
import dataclasses
import json
from pathlib import Path

import numpy as np
import pytest
import torch

import targets
from bench import runtimes
from bench.record import append_records, load_records
from bench.run import MIN_OUTPUT_PSNR_DB, TOLERANCE, bench_model
from compile.pipeline import from_variant
from conftest import model_under_test
from errors import UserError
from lwgan_models.cyclegan import ResnetGenerator, init_weights
from lwgan_models.registry import find_variant
from reports import render_report

SHAPE = (1, 3, 32, 32)
RULES = targets.BenchRules(threads=2, warmup=1, samples=3, min_duration_s=0.0)
QUIET = {"report": lambda _: None}
PLUGIN = Path(__file__).parent / "plugins" / "onnx_reference_runtime.py"
CRASHING_PLUGIN = Path(__file__).parent / "plugins" / "crashing_runtime.py"
pytestmark = pytest.mark.usefixtures("one_torch_thread")


@pytest.fixture(scope="module")
def host():
    return targets.resolve(targets.load_target("host"))


@pytest.fixture(scope="module")
def generator(tmp_path_factory):
    """The official ResNet generator layout, tiny: reflection pads, instance norm, transposed convs, tanh."""
    torch.manual_seed(0)
    module = init_weights(ResnetGenerator(3, 3, ngf=4, n_blocks=1), "normal", 0.3).eval()
    return model_under_test(module, SHAPE, "tiny-resnet", tmp_path_factory.mktemp("cache"))


@pytest.fixture(scope="module")
def every_runtime(generator, host):
    return bench_model(generator, host, "all-runtimes", rules=RULES, **QUIET)


def test_every_installed_runtime_matches_the_reference_under_its_precisions_rule(every_runtime, host):
    ran = {record.runtime: record for record in every_runtime}
    assert set(ran) == {spec.name for spec in runtimes.installed("host")}
    assert {"tvm", "torch", "onnxruntime", "openvino", "openvino-f32", "litert"} <= set(ran)
    for record in every_runtime:
        assert record.valid, (record.runtime, record.invalid_reason)
        precision = record.executed_precision
        assert record.tolerance == TOLERANCE.get(precision)
        assert record.min_output_psnr_db == MIN_OUTPUT_PSNR_DB.get(precision)
        if precision == "fp32":
            assert record.max_abs_err <= TOLERANCE["fp32"]
        else:
            assert record.output_psnr_db >= MIN_OUTPUT_PSNR_DB[precision]
        assert record.samples == 3 and record.latency_p50_ms > 0 and record.peak_rss_bytes > 0
        assert record.artifact_bytes > 0 and record.env[runtimes.get(record.runtime).package]
        # what the run was measured under travels with each record
        assert record.bench_rules == dataclasses.asdict(RULES) and record.target_digest == host.digest
    assert ran["openvino-f32"].executed_precision == "fp32"
    # OpenVINO's default follows the CPU: bf16 where it has bf16 units (AMX, AVX-512 BF16)
    cpu_flags = Path("/proc/cpuinfo").read_text().split()
    bf16_units = "amx_bf16" in cpu_flags or "avx512_bf16" in cpu_flags
    assert ran["openvino"].executed_precision == ("bf16" if bf16_units else "fp32")


def test_litert_runs_the_transposed_convs_as_sub_pixel_convs(generator, host):
    """LiteRT's converter rejects padded strided transposed convs; the exported file has none and agrees."""
    from ai_edge_litert.interpreter import Interpreter

    from compile.artifacts import build_artifact

    path = build_artifact("tflite", generator, host).path
    interpreter = Interpreter(model_path=str(path))
    ops = {op["op_name"] for op in interpreter._get_ops_details()}
    assert "TRANSPOSE_CONV" not in ops and "CONV_2D" in ops
    adapter = runtimes.get("litert").load(path, 1)
    x = np.random.default_rng(0).uniform(-1, 1, SHAPE).astype("float32")
    with torch.inference_mode():
        expected = generator.torch_module(torch.from_numpy(x)).numpy()
    np.testing.assert_allclose(adapter.run(x), expected, atol=TOLERANCE["fp32"])


def test_a_runtime_that_cannot_run_a_model_gets_a_record_saying_why(host):
    """An int8 variant ships as a QDQ ONNX file: litert-torch has no torch module to convert."""
    variant = from_variant(find_variant("cyclegan-resnet6-ngf16+ptq"), SHAPE)
    records = bench_model(variant, host, "not-run", ("onnxruntime", "litert"), RULES, **QUIET)
    by_runtime = {record.runtime: record for record in records}
    assert by_runtime["onnxruntime"].valid and by_runtime["onnxruntime"].executed_precision == "int8"
    litert = by_runtime["litert"]
    assert not litert.valid and litert.samples == 0
    assert litert.invalid_reason == ("not run: litert-torch needs the torch module; "
                                     "cyclegan-resnet6-ngf16+ptq is an int8 QDQ ONNX file")


@pytest.fixture
def fake_runtime():
    """tests/plugins/onnx_reference_runtime.py, registered by importing it, as a user's plug-in would be."""
    runtimes.load_plugin(PLUGIN)
    yield runtimes.get("onnx-reference")
    runtimes.unregister("onnx-reference")


def test_a_plugin_registered_outside_the_package_reaches_records_and_report(fake_runtime, generator, host, tmp_path):
    assert fake_runtime.source == str(PLUGIN)
    records = bench_model(generator, host, "plugin", ("tvm", "onnx-reference"), RULES, **QUIET)
    fake = records[1]
    assert fake.runtime == "onnx-reference" and fake.valid and fake.max_abs_err <= TOLERANCE["fp32"]
    assert fake.peak_rss_bytes > 0  # the peak-memory child loaded the plug-in from its file
    append_records(records, tmp_path / "results" / "plugin.jsonl")
    index = render_report(load_records(tmp_path / "results"), tmp_path / "report.html")
    page = next((tmp_path / "report-devices").glob("*.html")).read_text(encoding="utf-8")
    assert "<td>onnx-reference</td>" in page and index.exists()


def test_a_runtime_that_kills_its_process_gets_a_record_and_the_benchmark_goes_on(generator, host):
    """Its first inferences run in the peak-memory child, before it ever runs in this process: the child
    dies of SIGILL, this test's process (which would have died with it) writes the records."""
    runtimes.load_plugin(CRASHING_PLUGIN)
    try:
        records = bench_model(generator, host, "crash", ("crashing", "tvm"), RULES, **QUIET)
    finally:
        runtimes.unregister("crashing")
    crashed, tvm_record = records
    assert not crashed.valid and crashed.samples == 0
    assert crashed.invalid_reason.startswith("not run: crashing on ") and "killed by SIGILL" in crashed.invalid_reason
    assert tvm_record.runtime == "tvm" and tvm_record.valid and tvm_record.peak_rss_bytes > 0


def test_an_unknown_runtime_is_a_one_line_error_listing_the_registry():
    with pytest.raises(UserError, match=r"^unknown runtime 'tensorrt'; registered: tvm, tvm-bf16, torch, onnxruntime, "
                                        r"openvino, openvino-f32, litert$"):
        runtimes.parse("tvm,tensorrt".split(","), "host")
    with pytest.raises(UserError, match=r"runtime\(s\) torch, openvino cannot run on a board; there: tvm, "
                                        r"onnxruntime, litert"):
        runtimes.parse("tvm,torch,openvino".split(","), "board")


def test_per_op_profiles_export_as_csv_and_json(generator, host, tmp_path):
    from bench.profile import COLUMNS, profile_model, write_profile

    rows, skipped = profile_model(generator, host, ("tvm", "onnxruntime", "openvino-f32", "litert"), threads=1,
                                  runs=2, **QUIET)
    assert skipped == {"litert": "its Python API has no per-op profiler"}
    by_runtime = {}
    for row in rows:
        by_runtime.setdefault(row["runtime"], []).append(row)
    assert set(by_runtime) == {"tvm", "onnxruntime", "openvino-f32"}
    for ops in by_runtime.values():
        assert sum(op["share"] for op in ops) == pytest.approx(1.0) and all(op["ms"] >= 0 for op in ops)
        assert [op["ms"] for op in ops] == sorted((op["ms"] for op in ops), reverse=True)
    assert any(op["type"] == "Conv" for op in by_runtime["onnxruntime"])  # ONNX op types, from ORT's trace
    assert any(op["type"].startswith("Convolution") for op in by_runtime["openvino-f32"])
    with open(write_profile(rows, skipped, tmp_path / "p.csv"), encoding="utf-8") as f:
        read = list(csv.DictReader(f))
    assert len(read) == len(rows) and tuple(read[0]) == COLUMNS
    exported = json.loads(write_profile(rows, skipped, tmp_path / "p.json").read_text())
    assert exported["not_profiled"] == skipped and len(exported["ops"]) == len(rows)
    with pytest.raises(UserError, match=r"p\.txt: a profile is written as \.csv or \.json"):
        write_profile(rows, skipped, tmp_path / "p.txt")
