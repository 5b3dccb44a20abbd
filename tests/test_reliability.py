"""Faults a user meets: a process killed mid-write, two writers on one database, torn lines, a planted
resume state, Ctrl-C. Each case checks that nothing earlier is lost and that the next command works."""

from __future__ import annotations

import json
import os
import pickle
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from bench.record import load_records, read_records
from compile.database import RECORD_FILE, TuningDatabase
from compile.torch_import import torch_to_relax
from compile.tuning import tune
from errors import UserError
from lwgan_models.training import TrainingRun
from reports import render_report

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO / "tests"))
from test_cli import invoke  # noqa: E402  (runs a CLI command in this process)
from test_records import make_record  # noqa: E402  (the record factory the record tests use)

from conftest import SEARCH_POPULATION, TINY_SHAPE, tiny_generator  # noqa: E402

APPENDER = """
import sys
sys.path[:0] = [{repo!r}, {tests!r}]
from pathlib import Path
from test_records import make_record
from bench.record import append_records
print("ready", flush=True)
for i in range(100000):
    append_records([make_record("tvm", i + 1.0, run_id="killed")], Path(sys.argv[1]))
"""


def start_python(code: str, *args: str) -> subprocess.Popen:
    process = subprocess.Popen([sys.executable, "-c", code, *args], stdout=subprocess.PIPE, text=True, cwd=REPO)
    assert process.stdout.readline().strip() == "ready"
    return process


def test_a_writer_killed_mid_append_loses_no_earlier_record_and_the_report_still_renders(tmp_path):
    results = tmp_path / "results"
    path = results / "run.jsonl"
    writer = start_python(APPENDER.format(repo=str(REPO), tests=str(REPO / "tests")), str(path))
    time.sleep(1.0)
    writer.send_signal(signal.SIGKILL)
    writer.wait(30)
    with open(path, "a", encoding="utf-8") as f:
        f.write('{"run_id": "torn", "mod')  # what a kill between two write calls would have left
    skipped = []
    records = read_records(path, skipped)
    assert len(records) > 10 and all(r.run_id == "killed" for r in records)
    assert [s.line for s in skipped] == [len(records) + 1]  # only the torn tail
    frame = load_records(results)
    index = render_report(frame, tmp_path / "index.html", source=results)
    assert f"{path}:{len(records) + 1}" in index.read_text(encoding="utf-8")  # the warning names file:line
    from bench.record import append_records

    append_records([make_record("torch", 1.0, run_id="next")], path)  # the next command works
    assert read_records(path, [])[-1].run_id == "next"


def test_a_second_tuner_is_refused_naming_the_holder_and_a_killed_one_frees_the_database(tmp_path):
    database = TuningDatabase(tmp_path / "db")
    holder = start_python(
        "import sys, time; sys.path.insert(0, '.'); from pathlib import Path\n"
        "from compile.database import TuningDatabase\n"
        "with TuningDatabase(Path(sys.argv[1])).locked():\n"
        "    print('ready', flush=True); time.sleep(600)\n", str(database.path))
    import torch

    module = torch.nn.Sequential(torch.nn.Conv2d(3, 4, 3), torch.nn.ReLU())
    from targets import load_target, resolve

    target = resolve(load_target("host")).tvm_target
    with pytest.raises(UserError, match=rf"{database.path}: another process \(pid {holder.pid}\) is appending"):
        tune(torch_to_relax(module, (1, 3, 8, 8)), target, database, trials=2, trials_per_task=2,
             report=lambda _: None)
    assert not database.record_file.exists()  # refused before anything was written
    holder.send_signal(signal.SIGKILL)  # killed while holding it: the kernel drops the lock with the process
    holder.wait(30)
    with database.locked():
        assert (database.path / ".lock").read_text().strip() == str(os.getpid())


def test_db_check_names_every_unusable_line(tmp_path):
    from compile.database import WORKLOAD_FILE

    shipped = REPO / "autotune_logs" / "host-avx2" / "cyclegan-resnet6-ngf16+kd"
    database = TuningDatabase(tmp_path / "db")
    database.path.mkdir()
    workloads = (shipped / WORKLOAD_FILE).read_text().splitlines()
    records = (shipped / RECORD_FILE).read_text().splitlines()[:5]
    (database.path / WORKLOAD_FILE).write_text("\n".join(workloads) + "\n")
    broken_trace = json.loads(records[2])
    broken_trace[1][0] = [["not-an-instruction"]]
    (database.path / RECORD_FILE).write_text("\n".join([
        records[0], records[1], json.dumps(broken_trace), '[9999, [[], []]]', records[3][:40], "{}", records[4],
    ]) + "\n")
    problems = database.check()
    assert [p.split(": ", 1)[0] for p in problems] == [f"{database.record_file}:{n}" for n in (3, 4, 5, 6)]
    assert "trace does not replay on workload" in problems[0] and "names workload 9999" in problems[1]
    assert "not JSON" in problems[2] and "not a MetaSchedule database row" in problems[3]
    assert TuningDatabase(shipped).check() == []
    result = invoke("db.check", "--path", str(database.path))
    assert result.returncode == 1 and "4 unusable line(s)" in result.stdout, result.stdout + result.stderr


class _Planted:
    """A pickle that would run code when unpickled without weights_only."""

    def __reduce__(self):
        return (os.system, (f"touch {os.environ['PLANTED_MARKER']}",))


def test_a_planted_resume_state_is_refused_without_running_it(tmp_path, monkeypatch):
    marker = tmp_path / "code-ran"
    monkeypatch.setenv("PLANTED_MARKER", str(marker))
    run = TrainingRun("planted", {"steps": 1}, tmp_path / "out.pt", work_dir=tmp_path / "run")
    run.start()  # a fresh run writes its config
    run.state_path.write_bytes(pickle.dumps({"step": _Planted()}))
    with pytest.raises(UserError, match=r"state\.pt is unreadable or not a training state"):
        TrainingRun("planted", {"steps": 1}, tmp_path / "out.pt", work_dir=tmp_path / "run").start()
    assert not marker.exists()


def test_ctrl_c_during_bench_says_what_was_kept_exits_130_and_leaves_no_orphan_files(tmp_path):
    results = tmp_path / "results"
    bench = subprocess.Popen(
        [sys.executable, "-m", "invoke", "bench", "--model", "cyclegan-resnet6-ngf16+kd,nst-cin4-w16+kd,"
         "cyclegan-resnet6-ngf16+prune", "--runtimes", "onnxruntime", "--samples", "3", "--shape", "1x3x32x32",
         "--results", str(results)], cwd=REPO, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    deadline = time.monotonic() + 240
    while not any(results.glob("*.jsonl")) or not next(results.glob("*.jsonl")).read_text().strip():
        assert bench.poll() is None and time.monotonic() < deadline, bench.communicate()
        time.sleep(0.05)
    bench.send_signal(signal.SIGINT)
    out, err = bench.communicate(timeout=120)
    assert bench.returncode == 130, out + err
    [records_file] = results.glob("*.jsonl")
    kept = read_records(records_file)
    assert f"interrupted; {len(kept)} records kept in {records_file}" in err and 1 <= len(kept) <= 2
    samples = {p.name for p in results.glob("*.samples/*")}
    assert samples == {Path(r.sample_png).name for r in kept}  # every PNG left belongs to a kept record


def test_a_tuner_killed_mid_append_leaves_a_database_that_builds_and_tunes_on(tuned_tiny, tmp_path):
    """A torn last line (what a kill during MetaSchedule's append leaves) is skipped by readers, named by
    db.check, and dropped by the next tune, whose records then follow on whole lines."""
    from targets import load_target, resolve

    database = tuned_tiny.copy(tmp_path / "db")
    whole = database.record_count()
    with open(database.record_file, "a", encoding="utf-8") as f:
        f.write('[0, [[["SampleCategorical", [], [')  # killed mid-line
    assert database.open_for_reading()[1] == 0  # readers skip the torn line: nothing else is left out
    [problem] = database.check()
    assert problem.startswith(f"{database.record_file}:{whole + 1}: torn last line")
    messages = []
    tune(torch_to_relax(tiny_generator(), TINY_SHAPE), resolve(load_target("host")).tvm_target, database, trials=2,
         trials_per_task=2, report=messages.append, population=SEARCH_POPULATION)
    assert any("dropped a torn last line" in m for m in messages)
    assert database.check() == [] and database.record_count() > whole
    earlier = (tuned_tiny.path / RECORD_FILE).read_text().splitlines()
    assert database.record_file.read_text().splitlines()[:whole] == earlier  # nothing earlier lost
