"""bench/record.py: records round-trip through JSON lines and pandas; files are append-only."""

from __future__ import annotations

import dataclasses

import pytest

from bench.record import Record, append_records, load_records, read_records
from errors import UserError


def make_record(runtime: str, p50: float, run_id: str = "run-1") -> Record:
    return Record(
        run_id=run_id, model="cyclegan-resnet6-ngf16", family="cyclegan", variant="fp32", weights="random",
        input_shape=[1, 3, 128, 128], params=489_000, macs=610_000_000, size_fp32_bytes=1_990_000, target="host",
        device="x86-64 host", isa_level="avx2", runtime=runtime, threads=2, artifact_bytes=2_000_000,
        tuned_trials=362 if runtime == "tvm" else None, samples=30, warmup=5, duration_s=1.5,
        latency_mean_ms=p50 * 1.01, latency_std_ms=0.5, latency_cov=0.5 / p50, latency_min_ms=p50 * 0.9,
        latency_p50_ms=p50, latency_p90_ms=p50 * 1.1, latency_p99_ms=p50 * 1.2, latency_max_ms=p50 * 1.3,
        max_abs_err=1e-6, tolerance=2e-3, env={"cpu": "test cpu", "cores": 2}, timestamp="2026-11-25T07:00:00+00:00",
    )


def test_round_trip_and_append_only(tmp_path):
    path = tmp_path / "results" / "run-1.jsonl"
    first = [make_record("tvm", 50.0), make_record("torch", 40.0)]
    append_records(first, path)
    written = path.read_bytes()
    second = [make_record("onnxruntime", 45.0, run_id="run-2")]
    append_records(second, path)
    assert path.read_bytes().startswith(written)
    assert read_records(path) == first + second


def test_pandas_reads_every_record_as_one_flat_table(tmp_path):
    append_records([make_record("tvm", 50.0), make_record("torch", 40.0)], tmp_path / "a.jsonl")
    append_records([make_record("onnxruntime", 45.0, run_id="run-2")], tmp_path / "b.jsonl")
    frame = load_records(tmp_path)
    assert list(frame.columns) == [f.name for f in dataclasses.fields(Record)]
    assert len(frame) == 3
    assert sorted(frame.runtime) == ["onnxruntime", "torch", "tvm"]
    assert frame.latency_p50_ms.dtype.kind == "f" and frame.macs.dtype.kind == "i"
    assert frame.loc[frame.runtime == "tvm", "latency_p50_ms"].item() == 50.0


def test_empty_folder_gives_empty_table_with_the_schema(tmp_path):
    frame = load_records(tmp_path)
    assert frame.empty and list(frame.columns) == [f.name for f in dataclasses.fields(Record)]


@pytest.mark.parametrize("bad_line, expected", [("{oops\n", "not a benchmark record"), ('{"bogus": 1}\n', "unknown fields")])
def test_bad_lines_name_file_and_line(tmp_path, bad_line, expected):
    path = tmp_path / "r.jsonl"
    append_records([make_record("tvm", 50.0)], path)
    with open(path, "a") as f:
        f.write(bad_line)
    with pytest.raises(UserError, match=expected) as info:
        read_records(path)
    assert f"{path}:2" in str(info.value)
