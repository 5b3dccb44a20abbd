"""bench/record.py: records round-trip through JSON lines and pandas; files are append-only."""

from __future__ import annotations

import dataclasses
import errno
import json
import os
import subprocess
import sys
import types
import typing
from pathlib import Path

import pandas as pd
import pytest

from bench.record import (
    Record,
    append_records,
    load_records,
    outside_tolerance,
    read_records,
)
from errors import UserError

REPO = Path(__file__).resolve().parent.parent

FIELDS = [f.name for f in dataclasses.fields(Record)]


def _numeric_fields() -> list[str]:
    """Fields typed int/float (or optional int/float), bools excluded."""
    numeric = []
    for name, hint in typing.get_type_hints(Record).items():
        is_union = typing.get_origin(hint) in (typing.Union, types.UnionType)
        kinds = set(typing.get_args(hint) if is_union else (hint,)) - {type(None)}
        if kinds and kinds <= {int, float}:
            numeric.append(name)
    return numeric


NUMERIC = _numeric_fields()


def make_record(runtime: str, p50: float, run_id: str = "run-1", tuned: bool = True) -> Record:
    return Record(
        run_id=run_id, model="cyclegan-resnet6-ngf16", family="cyclegan", variant="fp32", weights="random",
        input_shape=[1, 3, 128, 128], params=489_000, macs=610_000_000, size_fp32_bytes=1_990_000, target="host",
        device="x86-64 host", isa_level="avx2", runtime=runtime, threads=2, artifact_bytes=2_000_000,
        tuned_trials=362 if tuned else None, db_hash="abc123", tuning_db="autotune_logs/host-avx2/cyclegan",
        tuned_tasks="12/14", samples=30, warmup=5, duration_s=1.5,
        latency_mean_ms=p50 * 1.01, latency_std_ms=0.5, latency_cov=0.5 / p50, latency_min_ms=p50 * 0.9,
        latency_p50_ms=p50, latency_p90_ms=p50 * 1.1, latency_p99_ms=p50 * 1.2, latency_max_ms=p50 * 1.3,
        valid=runtime != "torch", invalid_reason="" if runtime != "torch" else "0.50 s timed < 1.0 s",
        max_abs_err=1e-6, tolerance=2e-3, env={"cpu": "test cpu", "cores": 2, "flags": ["avx2"]},
        timestamp="2026-11-25T07:00:00+00:00",
    )


def test_numeric_field_list_is_what_the_schema_says():
    # Guards _numeric_fields: if it found nothing, the dtype test below would pass vacuously.
    assert {"params", "macs", "threads", "samples", "latency_p50_ms", "tuned_trials", "max_abs_err"} <= set(NUMERIC)
    assert not {"valid", "run_id", "input_shape", "env"} & set(NUMERIC)


def test_round_trip_and_append_only(tmp_path):
    path = tmp_path / "results" / "run-1.jsonl"  # parent does not exist yet
    first = [make_record("tvm", 50.0), make_record("torch", 40.0, tuned=False)]
    assert append_records(first, path) == path
    written = path.read_bytes()
    assert written.count(b"\n") == 2
    second = [make_record("onnxruntime", 45.0, run_id="run-2")]
    append_records(second, path)
    after = path.read_bytes()
    assert after.startswith(written) and len(after) > len(written)
    lines = after.decode("utf-8").splitlines()
    assert len(lines) == 3
    assert [json.loads(line)["runtime"] for line in lines] == ["tvm", "torch", "onnxruntime"]

    back = read_records(path)
    assert back == first + second
    assert isinstance(back[0].input_shape, list) and back[0].env == {"cpu": "test cpu", "cores": 2, "flags": ["avx2"]}
    assert back[1].tuned_trials is None and back[1].valid is False


def test_pandas_reads_every_record_as_one_flat_table(tmp_path):
    append_records([make_record("tvm", 50.0), make_record("torch", 40.0, tuned=False)], tmp_path / "a.jsonl")
    append_records([make_record("onnxruntime", 45.0, run_id="run-2")], tmp_path / "b.jsonl")
    frame = load_records(tmp_path)
    assert isinstance(frame, pd.DataFrame)
    assert list(frame.columns) == FIELDS
    assert len(frame) == 3
    assert sorted(frame.runtime) == ["onnxruntime", "torch", "tvm"]
    for column in NUMERIC:
        dtype = frame[column].dtype
        assert pd.api.types.is_numeric_dtype(dtype) and not pd.api.types.is_bool_dtype(dtype), (column, dtype)
    assert frame.macs.dtype.kind == "i" and frame.latency_p50_ms.dtype.kind == "f"
    assert frame.valid.dtype.kind == "b"
    by_runtime = frame.set_index("runtime")
    assert by_runtime.loc["tvm", "latency_p50_ms"] == 50.0
    assert by_runtime.loc["onnxruntime", "run_id"] == "run-2"
    assert pd.isna(by_runtime.loc["torch", "tuned_trials"]) and by_runtime.loc["tvm", "tuned_trials"] == 362
    assert by_runtime.loc["tvm", "input_shape"] == [1, 3, 128, 128]


def test_empty_folder_gives_empty_table_with_the_schema(tmp_path):
    frame = load_records(tmp_path)
    assert isinstance(frame, pd.DataFrame)
    assert len(frame) == 0 and list(frame.columns) == FIELDS


def _valid_dict() -> dict:
    return dataclasses.asdict(make_record("tvm", 50.0))


@pytest.mark.parametrize(
    "bad_line, expected",
    [
        ("{oops\n", "Expecting property name"),
        ("not json at all\n", "Expecting value"),
        ('{"run_id": "torn", "model": "cyc', "Unterminated string"),  # a crash mid-line: no newline either
        (json.dumps({**_valid_dict(), "bogus": 1}) + "\n", "unknown fields ['bogus']"),
        ("\udcff\x00binary\n", "Expecting value"),
    ],
    ids=["broken-json", "plain-text", "torn-line", "unknown-field", "binary"],
)
def test_a_bad_line_is_skipped_with_file_and_line_and_the_rest_is_read(tmp_path, bad_line, expected):
    path = tmp_path / "r.jsonl"
    append_records([make_record("tvm", 50.0)], path)
    with open(path, "a", encoding="utf-8", errors="surrogateescape") as f:
        f.write("\n")  # blank lines are skipped but still counted
        f.write(bad_line)
    append_records([make_record("onnxruntime", 45.0)], tmp_path / "other.jsonl")
    skipped = []
    assert [r.runtime for r in read_records(path, skipped)] == ["tvm"]
    [line] = skipped
    assert str(line).startswith(f"{path}:3: skipped, not a benchmark record (") and expected in str(line)
    with pytest.raises(UserError, match=f"^{path}:3: skipped"):  # asked for records only, it is an error
        read_records(path)
    frame = load_records(tmp_path)  # whoever loads the folder gets every record and the list of skipped lines
    assert sorted(frame.runtime) == ["onnxruntime", "tvm"] and frame.attrs["skipped"] == [str(line)]


def test_records_are_appended_whole_under_a_lock_by_concurrent_writers(tmp_path):
    """Four processes appending 50 records each to one file: every line parses, none is lost."""
    path = tmp_path / "shared.jsonl"
    script = ("import sys; sys.path.insert(0, '.'); from tests.test_records import make_record; "
              "from bench.record import append_records; from pathlib import Path\n"
              "for i in range(50): append_records([make_record('tvm', i + 1.0, run_id=sys.argv[1])], Path(sys.argv[2]))")
    writers = [subprocess.Popen([sys.executable, "-c", script, f"writer-{n}", str(path)], cwd=REPO) for n in range(4)]
    assert [w.wait(120) for w in writers] == [0, 0, 0, 0]
    skipped = []
    records = read_records(path, skipped)
    assert skipped == [] and len(records) == 200
    assert {r.run_id for r in records} == {f"writer-{n}" for n in range(4)}


def test_a_full_disk_keeps_every_earlier_record_and_no_torn_line(tmp_path, monkeypatch):
    path = append_records([make_record("tvm", 1.0), make_record("torch", 2.0)], tmp_path / "r.jsonl")
    real_write = os.write

    def disk_full_after_a_few_bytes(fd, data):
        real_write(fd, data[:10])  # what a full disk lets through before ENOSPC
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(os, "write", disk_full_after_a_few_bytes)
    with pytest.raises(UserError, match=r"r\.jsonl: could not append a record \(No space left on device\); "
                                        r"the file keeps its 2 earlier records"):
        append_records([make_record("onnxruntime", 3.0)], path)
    monkeypatch.undo()
    skipped = []
    assert [r.runtime for r in read_records(path, skipped)] == ["tvm", "torch"] and skipped == []
    append_records([make_record("onnxruntime", 3.0)], path)  # the next command works
    assert len(read_records(path)) == 3


def test_fp32_records_are_judged_by_max_error_and_int8_by_output_psnr(tmp_path):
    fp32 = make_record("tvm", 50.0)
    assert not fp32.beyond_tolerance()
    assert dataclasses.replace(fp32, max_abs_err=3e-3).beyond_tolerance()
    int8 = dataclasses.replace(fp32, precision="int8", variant="ptq", max_abs_err=0.17, tolerance=None,
                               output_psnr_db=37.9, min_output_psnr_db=30.0)
    assert not int8.beyond_tolerance()  # one flipped rounding step is not a failure
    assert dataclasses.replace(int8, output_psnr_db=21.0).beyond_tolerance()  # saturating kernels are
    append_records([int8, dataclasses.replace(int8, output_psnr_db=None)], tmp_path / "r.jsonl")
    frame = load_records(tmp_path)
    assert [outside_tolerance(row) for row in frame.to_dict("records")] == [False, False]
