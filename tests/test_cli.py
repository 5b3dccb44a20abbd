"""The invoke CLI end to end: bad input gives one line and exit 1; bench -> records -> report."""

from __future__ import annotations

import contextlib
import io
import json
import os
import subprocess
import sys
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from unittest import mock

import pandas as pd
import pytest
from invoke import Collection, Program

import tasks
from bench.record import load_records
from bench.runtimes import installed

REPO = Path(__file__).resolve().parent.parent
SMALLEST_DEMO_MODEL = "cyclegan-unet128-ngf16"


def invoke(*args: str) -> subprocess.CompletedProcess:
    """`python -m invoke ARGS` run in this process, as the shell sees it: exit code, stdout and stderr.

    A new interpreter per command spent seconds importing torch and TVM again. The command runs on a thread
    of its own and its environment is restored after, so the TVM thread pool bench sizes (TVM keeps one per
    OS thread) and the TVM_NUM_THREADS it sets do not carry over to later tests in this process.
    """
    def run() -> int:
        try:
            Program(namespace=Collection.from_module(tasks)).run(["invoke", *args])
        except SystemExit as exit:  # invoke ends a task's Exit with sys.exit(code)
            return exit.code
        return 0

    stdout, stderr = io.StringIO(), io.StringIO()
    with (mock.patch.dict(os.environ), contextlib.chdir(REPO), contextlib.redirect_stdout(stdout),
          contextlib.redirect_stderr(stderr), ThreadPoolExecutor(max_workers=1) as thread):
        code = thread.submit(run).result()
    return subprocess.CompletedProcess(["invoke", *args], code, stdout.getvalue(), stderr.getvalue())


def assert_one_line_error(result: subprocess.CompletedProcess, *fragments: str) -> None:
    assert result.returncode == 1, result.stdout + result.stderr
    lines = [line for line in result.stderr.splitlines() if line.startswith("error: ")]
    assert len(lines) == 1, result.stderr
    assert "Traceback" not in result.stderr
    for fragment in fragments:
        assert fragment in lines[0]


def test_unknown_model():
    assert_one_line_error(invoke("bench", "--model", "no-such-gan"), "is unknown", "no-such-gan", "cyclegan-resnet6-ngf16",
                          "or a variant: cyclegan-resnet6-ngf16+kd")


def test_unknown_runtime_lists_the_registry():
    assert_one_line_error(invoke("bench", "--runtimes", "tvm,tensorrt"), "unknown runtime 'tensorrt'",
                          "registered: tvm, tvm-bf16, torch, onnxruntime, openvino, openvino-f32, litert")


def test_unknown_target():
    assert_one_line_error(invoke("bench", "--target", "toaster"), "unknown target", "toaster", "host")


def test_a_microcontroller_target_is_not_tuned():
    assert_one_line_error(invoke("tune", "--target", "cortex-m4", "--model", "cyclegan-resnet6-ngf16"),
                          "cortex-m4", "is not tuned")


def test_missing_checkpoint(tmp_path):
    missing = tmp_path / "latest_net_G_A.pth"
    assert_one_line_error(
        invoke("bench", "--model", SMALLEST_DEMO_MODEL, "--checkpoint", str(missing), "--results", str(tmp_path)),
        str(missing),
    )


def test_corrupt_checkpoint(tmp_path):
    corrupt = tmp_path / "latest_net_G_A.pth"
    corrupt.write_bytes(os.urandom(256))
    assert_one_line_error(
        invoke("bench", "--model", SMALLEST_DEMO_MODEL, "--checkpoint", str(corrupt), "--results", str(tmp_path)),
        str(corrupt),
    )


def test_wrong_input_shape(tmp_path):
    assert_one_line_error(
        invoke("bench", "--model", SMALLEST_DEMO_MODEL, "--shape", "1x3x100x100", "--results", str(tmp_path)),
        SMALLEST_DEMO_MODEL,
        "(1, 3, 100, 100)",
    )


def test_corrupt_database_names_the_file(tmp_path):
    """In a new process: the database folder comes from LWGAN_AUTOTUNE_DIR, read once at import. This test
    also runs the real entry point, `python -m invoke` finding tasks.py."""
    level_dirs = [tmp_path / key / SMALLEST_DEMO_MODEL for key in ("host-avx512vnni", "host-avx2")]
    for path in level_dirs:
        path.mkdir(parents=True)
        (path / "database_workload.json").write_text('["ok", 1]\n{broken\n')
        (path / "database_tuning_record.json").write_text("")
    result = subprocess.run(
        [sys.executable, "-m", "invoke", "bench", "--model", SMALLEST_DEMO_MODEL, "--results",
         str(tmp_path / "results")],
        cwd=REPO, capture_output=True, text=True, timeout=900, env={**os.environ, "LWGAN_AUTOTUNE_DIR": str(tmp_path)},
    )
    assert_one_line_error(result, "database_workload.json:2", "corrupt tuning database line")


def test_debug_shows_the_traceback():
    result = invoke("bench", "--model", "no-such-gan", "--debug")
    assert result.returncode == 1 and "Traceback" in result.stderr


def test_report_without_records(tmp_path):
    assert_one_line_error(invoke("report", "--results", str(tmp_path), "--out", str(tmp_path / "r.html")), str(tmp_path))


def test_bench_then_report(tmp_path):
    results = tmp_path / "results"
    results.mkdir()
    earlier = results / "earlier-run.jsonl"
    earlier_text = (REPO / "tests" / "data" / "earlier_record.jsonl").read_text()
    earlier.write_text(earlier_text)

    bench = invoke("bench", "--model", SMALLEST_DEMO_MODEL, "--samples", "5", "--results", str(results))
    assert bench.returncode == 0, bench.stdout + bench.stderr
    assert earlier.read_text() == earlier_text  # earlier results are never touched

    frame = load_records(results)
    run = frame[frame.run_id != "earlier"]
    assert set(run.runtime) == {spec.name for spec in installed("host")}  # the default: every installed runtime
    assert run.valid.all() and (run.samples >= 5).all() and (run.threads == 2).all()
    fp32 = run[run.executed_precision == "fp32"]
    assert (fp32.max_abs_err < fp32.tolerance).all() and {"tvm", "torch", "onnxruntime"} <= set(fp32.runtime)
    assert set(run.weights) == {"random"}
    (sample,) = set(run.sample_png)
    from PIL import Image

    assert Image.open(results / sample).size == (128, 128)

    out = tmp_path / "index.html"
    report = invoke("report", "--results", str(results), "--out", str(out))
    assert report.returncode == 0, report.stderr
    html = out.read_text()
    (isa_level,) = set(run.isa_level)  # the earlier record may come from another machine's level: its own page
    device_page = tmp_path / "index-devices" / f"host-{isa_level}.html"
    assert f"index-devices/{device_page.name}" in html
    from reports.html import format_ms

    for value in run.latency_p50_ms:
        assert format_ms(value) in device_page.read_text()
    assert "earlier" in html
    assert (run.power_source == "none").all()  # this host has no sensor, and the records say so
    assert "no sensor" in device_page.read_text()


def _nhwc_onnx_generator(path: Path) -> Path:
    """A tiny third-party-style generator: NHWC input with a symbolic batch, conv, tanh."""
    import numpy as np
    import onnx
    from onnx import TensorProto, helper, numpy_helper

    weight = numpy_helper.from_array(np.random.default_rng(0).normal(0, 0.3, (3, 3, 3, 3)).astype("float32"), "w")
    graph = helper.make_graph(
        [
            helper.make_node("Transpose", ["image"], ["nchw"], perm=[0, 3, 1, 2]),
            helper.make_node("Conv", ["nchw", "w"], ["conv"], pads=[1, 1, 1, 1]),
            helper.make_node("Tanh", ["conv"], ["styled"]),
        ],
        "third_party_generator",
        [helper.make_tensor_value_info("image", TensorProto.FLOAT, ["batch", 32, 32, 3])],
        [helper.make_tensor_value_info("styled", TensorProto.FLOAT, None)],
        [weight],
    )
    onnx.save(helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)]), path)
    return path


def test_bench_onnx_file(tmp_path):
    model = _nhwc_onnx_generator(tmp_path / "third_party.onnx")
    result = invoke("bench", "--onnx", str(model), "--shape", "1x32x32x3", "--samples", "3", "--results", str(tmp_path))
    assert result.returncode == 0, result.stdout + result.stderr
    frame = load_records(tmp_path)
    # a user's ONNX file has no torch module: torch eager and litert-torch cannot run it, and say so
    skipped = frame.invalid_reason.str.startswith("not run: ")
    assert set(frame[skipped].runtime) == {"torch", "litert"} and not frame[skipped].valid.any()
    ran = frame[~skipped]
    assert {"tvm", "onnxruntime", "openvino-f32"} <= set(ran.runtime)
    assert (frame.family == "onnx").all() and (frame.model == "third_party").all()
    assert (frame.macs == 32 * 32 * 3 * 27).all()
    fp32 = ran[ran.executed_precision == "fp32"]
    assert (fp32.max_abs_err < fp32.tolerance).all()
    assert frame.weights.iloc[0].startswith(f"{model}@sha256:")


def test_onnx_file_that_is_not_a_model(tmp_path):
    bogus = tmp_path / "generator.onnx"
    bogus.write_bytes(os.urandom(300))
    assert_one_line_error(invoke("bench", "--onnx", str(bogus), "--results", str(tmp_path)), str(bogus), "not an ONNX model")


def test_counts_must_be_positive_numbers():
    assert_one_line_error(invoke("bench", "--samples", "abc"), "--samples 'abc'", "positive whole number")
    assert_one_line_error(invoke("tune", "--model", SMALLEST_DEMO_MODEL, "--trials", "0"), "--trials '0'")


def test_compress_rejects_an_unknown_method_and_untrained_weights(tmp_path):
    assert_one_line_error(invoke("compress", "--model", "cyclegan-resnet9-ngf64", "--method", "int4", "--out",
                                 str(tmp_path)), "int4", "ptq")
    assert_one_line_error(invoke("compress", "--model", "cyclegan-resnet9-ngf64", "--method", "ptq", "--out",
                                 str(tmp_path)), "random weights")
    assert not list(tmp_path.iterdir())


def test_train_and_bench_name_what_is_missing(tmp_path):
    assert_one_line_error(invoke("train", "--model", "no-such-gan"), "no-such-gan")
    assert_one_line_error(invoke("train", "--model", "cyclegan-resnet6-ngf16", "--dataroot", str(tmp_path / "none"),
                                 "--out", str(tmp_path / "g.pt")), str(tmp_path / "none"))
    assert_one_line_error(invoke("bench", "--model", "cyclegan-resnet6-ngf16+qat4", "--results", str(tmp_path)),
                          "cyclegan-resnet6-ngf16+qat4", "invoke compress")


def test_bench_a_shipped_int8_variant_carries_its_card(tmp_path):
    """A compressed variant benchmarks by name; its record carries precision, base model and quality."""
    variant = "cyclegan-resnet6-ngf16+ptq"
    card = json.loads((REPO / "lwgan_models" / "checkpoints" / f"{variant}.json").read_text())
    result = invoke("bench", "--model", variant, "--runtimes", "onnxruntime", "--samples", "3", "--results",
                    str(tmp_path))
    assert result.returncode == 0, result.stdout + result.stderr
    (row,) = load_records(tmp_path).to_dict("records")
    assert (row["model"], row["base_model"], row["variant"], row["precision"]) == (
        variant, "cyclegan-resnet6-ngf16", "ptq", "int8")
    assert row["weights"] == f"lwgan_models/checkpoints/{variant}.onnx@sha256:{card['sha256']}"
    assert row["psnr_db"] == card["quality"]["psnr_db"] and row["seed_metric"] == card["seed_metric"]["value"]
    assert row["onnx_bytes"] == card["onnx_bytes"] and row["output_psnr_db"] >= row["min_output_psnr_db"]


def test_a_variant_is_timed_in_the_same_rounds_as_its_base(tmp_path):
    """With its fp32 base in the run, a compressed variant's TVM record carries the base's p50 from the
    variant's own interleaved rounds; the base's record does not."""
    base, variant = "cyclegan-resnet6-ngf16", "cyclegan-resnet6-ngf16+kd"
    result = invoke("bench", "--model", f"{base},{variant}", "--runtimes", "tvm", "--shape", "1x3x32x32",
                    "--samples", "3", "--results", str(tmp_path))
    assert result.returncode == 0, result.stdout + result.stderr
    assert f"timing tvm and {base} on tvm" in result.stdout
    rows = {r["model"]: r for r in load_records(tmp_path).to_dict("records")}
    assert rows[variant]["base_latency_p50_ms"] > 0
    assert pd.isna(rows[base]["base_latency_p50_ms"])


@pytest.mark.slow
def test_build_for_a_mali_board_checks_its_kernels_on_pocl(tmp_path):
    built = invoke("build", "--model", "cyclegan-resnet6-ngf16+kd", "--target", "rock5b", "--shape", "1x3x32x32",
                   "--out", str(tmp_path))
    assert built.returncode == 0, built.stdout + built.stderr
    assert "all built by pocl" in built.stdout and "dB against the reference" in built.stdout
    assert {p.suffix for p in tmp_path.iterdir()} == {".so", ".cl"}
