"""compile/: torch -> Relax -> built library agrees with torch; databases are tuned, reused and validated."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch
import tvm
from tvm.s_tir import meta_schedule as ms

import lwgan_models
import targets
from compile.build import compile_model
from compile.database import CURVE_FILE, THREADS_FILE, TuningDatabase, trials_to_within
from compile.passes import prepare
from compile.pipeline import source_digest
from compile.torch_import import torch_to_relax
from compile.tuning import local_builder, seed_default_schedules, tune
from errors import UserError
from targets.threads import size_tvm_thread_pool

from conftest import SEARCH_POPULATION, TINY_SHAPE, tiny_generator

# Small spatial sizes keep untuned builds quick; every generator is fully convolutional, except
# the 7-level U-Net, which needs 128 pixels to reach its 1x1 bottleneck.
TEST_SIZE = {"cyclegan-unet128-ngf16": 128}
FP32_TOLERANCE = 2e-3


@pytest.fixture(scope="module")
def host():
    return targets.resolve(targets.load_target("host"))


def _build(module, shape, target, database, cache_dir, name="tiny"):
    """Imported as for the host (compile.pipeline.relax_for_target): transposed convs as one wide conv."""
    digest = source_digest(name, module, shape)
    return compile_model(
        lambda: torch_to_relax(module, shape, name, fused_for="fp32"), target.tvm_target, database, digest, shape,
        cache_dir,
    )


def _run(compiled, x: np.ndarray) -> np.ndarray:
    return compiled.load()["main"](tvm.runtime.tensor(x)).numpy()


@pytest.mark.parametrize("name", lwgan_models.names())
def test_every_registered_generator_matches_torch(name, host, tmp_path):
    loaded = lwgan_models.load(name)
    size = TEST_SIZE.get(name, 32)
    shape = (1, 3, size, size)
    x = np.random.default_rng(0).uniform(-1, 1, shape).astype("float32")
    compiled = _build(loaded.module, shape, host, TuningDatabase(tmp_path / "no-database"), tmp_path / "cache", name)
    assert compiled.db_records == 0 and compiled.tuned_tasks == 0
    with torch.inference_mode():
        expected = loaded.module(torch.from_numpy(x)).numpy()
    got = _run(compiled, x)
    assert got.shape == expected.shape
    assert np.abs(got - expected).max() < FP32_TOLERANCE


def test_curve_replays_records_in_order_weighted_by_calls(tmp_path):
    """Two workloads, the second called 3 times: points start once both are measured, failures are skipped."""
    database = TuningDatabase(tmp_path / "db")
    database.path.mkdir()
    database.workload_file.write_text('["111", "mod-a"]\n["222", "mod-b"]\n')
    runs = [(0, [0.004]), (0, [0.003]), (1, [1e10]), (1, [0.002, 0.002]), (0, [0.001]), (1, [0.0015])]
    database.record_file.write_text("".join(json.dumps([w, [[], secs, {}, []]]) + "\n" for w, secs in runs))
    assert database.curve() == []  # no task weights: no curve rather than a wrong one
    database.write_task_weights({"111": 1, "222": 3})
    trials, latency_ms = zip(*database.curve())
    assert trials == (4, 5, 6)
    assert latency_ms == pytest.approx((3 + 3 * 2, 1 + 3 * 2, 1 + 3 * 1.5))
    assert trials_to_within(database.curve(), 0.1) == 6
    assert trials_to_within(database.curve(), 0.6) == 5
    # A weighted task no record measured (every candidate failed, or never committed) does not hold
    # the curve back: the committed resnet6 and U-Net databases had lost their curves to one.
    curve = database.curve()
    database.write_task_weights({"111": 1, "222": 3, "333": 12})
    assert database.curve() == curve


def test_tune_then_compile_from_database_without_tuning(host, tuned_tiny, tmp_path, monkeypatch):
    module, shape = tiny_generator(), TINY_SHAPE
    database = tuned_tiny.copy(tmp_path / "db")
    assert tuned_tiny.trials > 0 and database.record_count() > 0
    log = (database.path / CURVE_FILE).read_text().splitlines()
    assert len(log) >= 1 and '"trials"' in log[0]
    curve = database.curve()  # the tasks' weights were written, so the records replay into a curve
    assert curve and curve[-1][0] <= database.record_count()
    assert all(later <= earlier for (_, earlier), (_, later) in zip(curve, curve[1:]))
    before = (database.workload_file.read_bytes(), database.record_file.read_bytes())

    # Compiling must only read the database: no tuning entry point may run.
    def no_tuning(*args, **kwargs):
        raise AssertionError("compile tuned again")

    monkeypatch.setattr("compile.tuning.tune", no_tuning)
    monkeypatch.setattr("tvm.s_tir.meta_schedule.tune_tasks", no_tuning)
    first = _build(module, shape, host, database, tmp_path / "cache")
    assert first.tuned_tasks > 0 and first.db_records == database.record_count() and not first.cache_hit
    second = _build(module, shape, host, database, tmp_path / "cache")
    assert second.cache_hit and second.library == first.library
    assert (database.workload_file.read_bytes(), database.record_file.read_bytes()) == before

    x = np.random.default_rng(1).uniform(-1, 1, shape).astype("float32")
    with torch.inference_mode():
        expected = module(torch.from_numpy(x)).numpy()
    assert np.abs(_run(second, x) - expected).max() < FP32_TOLERANCE


def test_default_conv_schedules_are_measured_into_the_database(host, tmp_path):
    """Tuning starts by committing each conv's default schedule as a measured record, which replays."""
    module, shape = tiny_generator(), TINY_SHAPE
    prepared = prepare(torch_to_relax(module, shape), host.tvm_target)
    convs = [t for t in ms.relax_integration.extract_tasks(prepared, host.tvm_target) if "conv2d" in t.task_name]
    assert len(convs) == 2
    database = TuningDatabase(tmp_path / "db")
    with database.open_for_tuning() as (db, _):
        assert seed_default_schedules(convs, db, host.tvm_target, local_builder(), ms.runner.LocalRunner()) == 2
        for task in convs:
            record = db.query_tuning_record(task.dispatched[0], host.tvm_target, task.task_name)
            assert record is not None and min(record.run_secs) > 0
    with database.open_for_tuning() as (db, _):  # a rerun finds them there and adds no duplicates
        assert seed_default_schedules(convs, db, host.tvm_target, local_builder(), ms.runner.LocalRunner()) == 0
    assert database.record_count() == 2
    compiled = _build(module, shape, host, database, tmp_path / "cache")
    assert compiled.tuned_tasks == 2
    x = np.random.default_rng(2).uniform(-1, 1, shape).astype("float32")
    with torch.inference_mode():
        expected = module(torch.from_numpy(x)).numpy()
    assert np.abs(_run(compiled, x) - expected).max() < FP32_TOLERANCE


def test_tuning_appends_and_changed_database_misses_cache(host, tuned_tiny, tmp_path):
    module, shape = tiny_generator(), TINY_SHAPE
    database = tuned_tiny.copy(tmp_path / "db")
    earlier = database.record_file.read_bytes()
    workloads = _line_count(database.workload_file)
    first = _build(module, shape, host, database, tmp_path / "cache")
    messages = []  # the rerun focuses on the one task where the model spends most time
    tune(torch_to_relax(module, shape), host.tvm_target, database, trials=2, trials_per_task=2, report=messages.append,
         focus=1, population=SEARCH_POPULATION)
    assert database.record_file.read_bytes().startswith(earlier)  # append-only
    new_records = database.record_file.read_bytes()[len(earlier):].decode().splitlines()
    assert new_records and len({json.loads(line)[0] for line in new_records}) == 1
    assert any(m.startswith("focusing on 1 tasks") for m in messages)
    assert _line_count(database.workload_file) == workloads  # that task's workload was already there
    rebuilt = _build(module, shape, host, database, tmp_path / "cache")
    assert not rebuilt.cache_hit and rebuilt.db_hash != first.db_hash


def test_changed_weights_miss_the_cache(host, tmp_path):
    module, shape = tiny_generator(), TINY_SHAPE
    database = TuningDatabase(tmp_path / "none")
    first = _build(module, shape, host, database, tmp_path / "cache")
    with torch.no_grad():
        module[1].weight.add_(0.5)
    second = _build(module, shape, host, database, tmp_path / "cache")
    assert not second.cache_hit and second.library != first.library


@pytest.mark.parametrize(
    "content, expected",
    [("{not json\n", "corrupt tuning database line"), ('{"a": 1}\n', "not a MetaSchedule database row")],
)
def test_corrupt_database_is_a_one_line_error(tmp_path, content, expected):
    database = TuningDatabase(tmp_path / "db")
    database.path.mkdir()
    database.workload_file.write_text(content)
    database.record_file.write_text("")
    with pytest.raises(UserError) as info:
        database.open_for_reading()
    message = str(info.value)
    assert expected in message and str(database.workload_file) + ":1" in message and "\n" not in message


def test_wrong_input_shape_names_the_model(tmp_path):
    with pytest.raises(UserError, match=r"tiny: input shape \(1, 4, 16, 16\) does not fit"):
        torch_to_relax(tiny_generator(), (1, 4, 16, 16), "tiny")


def _unreplayable_database(tmp_path) -> TuningDatabase:
    """Real MetaSchedule output: 2 good records and 8 RFactor traces that fail to replay on reload."""
    database = TuningDatabase(tmp_path / "db")
    shutil.copytree(Path(__file__).parent / "data" / "unreplayable_db", database.path)
    # The fixture's records do not say their thread count; they stand for records measured on this machine.
    (database.path / THREADS_FILE).write_text(json.dumps({"threads": size_tvm_thread_pool()}))
    return database


def test_records_that_no_longer_replay_are_skipped_when_applying(tmp_path):
    database = _unreplayable_database(tmp_path)
    before = database.record_file.read_bytes()
    assert database.unreplayable_records() == list(range(3, 11))
    reader, skipped = database.open_for_reading()
    assert skipped == 8 and len(reader.get_all_tuning_records()) == 2
    assert database.record_file.read_bytes() == before  # the files are never rewritten


def test_tuning_into_a_database_with_unreplayable_records_appends(host, tmp_path):
    database = _unreplayable_database(tmp_path)
    workloads, records = database.workload_file.read_bytes(), database.record_file.read_bytes()
    module, shape = tiny_generator(), TINY_SHAPE
    ran = tune(torch_to_relax(module, shape), host.tvm_target, database, trials=4, trials_per_task=2,
               report=lambda _: None, population=SEARCH_POPULATION)
    assert ran > 0
    assert database.workload_file.read_bytes().startswith(workloads)
    assert database.record_file.read_bytes().startswith(records)
    assert database.record_count() > 10 and database.unreplayable_records() == list(range(3, 11))
    compiled = _build(module, shape, host, database, tmp_path / "cache")
    assert compiled.tuned_tasks > 0 and compiled.db_skipped == 8


def test_tuning_records_its_thread_count_and_refuses_to_mix_counts(host, tuned_tiny, tmp_path):
    """Records measured on 1 thread would lose to any measured on 2, whatever their schedules are worth."""
    module, shape = tiny_generator(), TINY_SHAPE
    database = tuned_tiny.copy(tmp_path / "db")
    threads_file = database.path / THREADS_FILE
    assert json.loads(threads_file.read_text()) == {"threads": size_tvm_thread_pool()}
    records = database.record_file.read_bytes()
    threads_file.write_text(json.dumps({"threads": size_tvm_thread_pool() + 1}))
    with pytest.raises(UserError, match=r"measured on \d+ thread\(s\) and tuning here measures on \d+; tune into a fresh"):
        tune(torch_to_relax(module, shape), host.tvm_target, database, trials=2, trials_per_task=2,
             report=lambda _: None, population=SEARCH_POPULATION)
    threads_file.unlink()
    with pytest.raises(UserError, match="do not say how many threads measured them"):
        database.claim_threads(2)
    assert database.record_file.read_bytes() == records


def test_focus_must_be_positive(host, tmp_path):
    module, shape = tiny_generator(), TINY_SHAPE
    with pytest.raises(UserError, match="--focus"):
        tune(torch_to_relax(module, shape), host.tvm_target, TuningDatabase(tmp_path / "db"), trials=4, trials_per_task=2,
             report=lambda _: None, focus=0)


def _line_count(path: Path) -> int:
    return len(path.read_text().splitlines())
