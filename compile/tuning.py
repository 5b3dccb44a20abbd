"""MetaSchedule tuning of a Relax module into a committed JSON database.

The XGBoost cost model and evolutionary search are MetaSchedule's; this module adds what a user of a
benchmarking suite needs around them: progress, a resumable database in a path that says what it
holds, and the tuning curve (estimated model latency against trials) kept next to the database.
"""

from __future__ import annotations

import functools
import json
import logging
import os
import shutil
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import tvm
import tvm_ffi
from tvm.ir.utils import derived_object
from tvm.s_tir import meta_schedule as ms
from tvm.s_tir.analysis import estimate_tir_flops

from compile.database import CURVE_FILE, TuningDatabase
from compile.intrinsics import register_cpu_tensor_intrinsics
from compile.passes import float_lanes, prepare
from compile.schedules import is_scheduled
from compile.schedules.conv import direct_conv_schedule
from errors import UserError
from targets.config import TargetConfig
from targets.threads import size_tvm_thread_pool

REPO_ROOT = Path(__file__).resolve().parent.parent
LOG_DIR = REPO_ROOT / "build" / "tune-logs"
BUILD_TIMEOUT_S = 120.0
# One candidate on a board: session, upload, load, run. Generous: an emulated board runs under qemu.
RPC_SESSION_TIMEOUT_S = 120.0


def build_candidate(mod: tvm.IRModule, target: tvm.target.Target, _params) -> tvm.runtime.Module:
    """MetaSchedule's default build without its import of every tensor intrinsic.

    That import took 65 s in each builder pool, and MetaSchedule starts a pool per batch. A
    candidate arrives already scheduled (tensorized blocks carry their implementation), so building
    it needs no intrinsic registry.
    """
    from tvm.s_tir.transform import RemoveWeightLayoutRewriteBlock

    return tvm.tirx.build(RemoveWeightLayoutRewriteBlock(skip_tensor_rewrite=True)(mod), target, "default")


def local_builder(f_export: Callable[[tvm.runtime.Module], str] | None = None) -> ms.builder.LocalBuilder:
    """Builder workers are fresh processes: they find this package through PYTHONPATH."""
    paths = os.environ.get("PYTHONPATH", "").split(os.pathsep)
    if str(REPO_ROOT) not in paths:
        os.environ["PYTHONPATH"] = os.pathsep.join([str(REPO_ROOT), *filter(None, paths)])
    return ms.builder.LocalBuilder(f_build=build_candidate, f_export=f_export, timeout_sec=BUILD_TIMEOUT_S)


def cross_compiler(config: TargetConfig):
    """The `fcompile` linking libraries for the board with the target's [cross] compiler."""
    if not config.cross:
        raise UserError(f"{config.path}: a board's libraries need a cross compiler: add a [cross] table (cc = ...)")
    cc = config.cross["cc"]
    if shutil.which(cc) is None:
        raise UserError(f"{config.path}: cross compiler {cc!r} not found on PATH "
                        "(Debian: apt-get install g++-aarch64-linux-gnu)")
    return tvm.support.cc.cross_compiler(cc, options=config.cross.get("options"))


def export_for_board(mod: tvm.runtime.Module, cc: str, options: list[str] | None) -> str:
    """A candidate as a shared library for the board, in a folder of its own (MetaSchedule deletes it)."""
    path = os.path.join(tempfile.mkdtemp(prefix="lwgan-candidate-"), "candidate.so")
    mod.export_library(path, fcompile=tvm.support.cc.cross_compiler(cc, options=options))
    return path


def board_measurement(config: TargetConfig) -> tuple[ms.builder.Builder, ms.runner.Runner]:
    """Candidates cross-compiled here, measured on the boards registered under the target's key."""
    from targets import rpc

    cross_compiler(config)  # fails now, naming the missing compiler, rather than in every builder worker
    host, port, key = rpc.tracker_address(config)
    boards = rpc.require_board(config)
    builder = local_builder(functools.partial(export_for_board, cc=config.cross["cc"],
                                              options=config.cross.get("options")))
    runner = ms.runner.RPCRunner(
        ms.runner.RPCConfig(tracker_host=host, tracker_port=port, tracker_key=key,
                            session_timeout_sec=RPC_SESSION_TIMEOUT_S),
        max_workers=boards,
    )
    return builder, runner


@dataclass
class TuningProgress:
    """Best measured latency per task; the model estimate is their weighted sum."""

    task_names: list[str]
    task_weights: list[float]
    curve_path: Path
    report: Callable[[str], None]
    trials_done: int = 0
    started: float = 0.0

    def __post_init__(self) -> None:
        self.best_s: list[float | None] = [None] * len(self.task_names)
        self.started = time.time()

    def estimated_latency_ms(self) -> float | None:
        """Weighted sum over the tasks measured so far (a lower bound until every task has a result)."""
        measured = [(w, b) for w, b in zip(self.task_weights, self.best_s) if b is not None]
        return 1e3 * sum(w * b for w, b in measured) if measured else None

    def update(self, task_id: int, run_secs: list[list[float]]) -> None:
        self.trials_done += len(run_secs)
        measured = [sum(s) / len(s) for s in run_secs if s]
        if measured:
            best = min(measured)
            if self.best_s[task_id] is None or best < self.best_s[task_id]:
                self.best_s[task_id] = best
        estimate = self.estimated_latency_ms()
        covered = sum(b is not None for b in self.best_s)
        point = {
            "session": time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(self.started)),  # a resumed tune counts anew
            "trials": self.trials_done,
            "elapsed_s": round(time.time() - self.started, 1),
            "task": self.task_names[task_id],
            "estimated_latency_ms": estimate,
            "tasks_measured": f"{covered}/{len(self.best_s)}",
        }
        with open(self.curve_path, "a", encoding="utf-8") as f:
            f.write(json.dumps(point) + "\n")
        shown = f"{estimate:.2f} ms over {covered}/{len(self.best_s)} tasks" if estimate is not None else "pending"
        best = self.best_s[task_id]
        self.report(
            f"  trials {self.trials_done:5d}  {point['elapsed_s']:7.0f}s  "
            f"task {task_id + 1}/{len(self.task_names)} {self.task_names[task_id][:40]:40s} "
            f"best {1e3 * best if best else float('nan'):8.3f} ms   model est. {shown}"
        )


def task_weights(extracted) -> dict[str, int]:
    """Calls per inference of each extracted task, keyed as the database keys workloads (structural hash)."""
    return {str(tvm_ffi.structural_hash(task.dispatched[0])): int(task.weight) for task in extracted}


def _takes_indices(task) -> bool:
    """Gathers (reflection padding becomes `take`) read integer index tensors, which the runner
    fills with random values: measuring them crashes or times garbage, so they keep TVM's default.
    Quantized (8-bit) tensors are data, not indices: those tasks are tuned."""
    args = ms.arg_info.ArgInfo.from_prim_func(task.dispatched[0]["main"])
    return any(str(arg.dtype) in ("int32", "int64") for arg in args)


def hand_scheduled(task) -> bool:
    """Kernels that arrive scheduled (compile/int8/lowering.py's tensorized integer convs) are not searched."""
    return is_scheduled(task.dispatched[0]["main"])


@derived_object
class _ProgressCallback(ms.measure_callback.PyMeasureCallback):
    def __init__(self, progress: TuningProgress) -> None:
        self.progress = progress

    def apply(self, task_scheduler, task_id, measure_candidates, builder_results, runner_results) -> None:
        secs = [[float(s) for s in r.run_secs] if r.error_msg is None and r.run_secs else [] for r in runner_results]
        self.progress.update(task_id, secs)


@derived_object
class _ReportingRunner(ms.runner.PyRunner):
    """Says when each batch goes out to be measured.

    MetaSchedule joins a batch's results (and so runs the measure callbacks) only when it returns to
    that task, so without this the first round over all tasks would pass in silence.
    """

    def __init__(self, inner: ms.runner.Runner, budget: int, report: Callable[[str], None]) -> None:
        self.inner = inner
        self.budget = budget
        self.report = report
        self.sent = 0
        self.started = time.time()

    def run(self, runner_inputs):
        self.sent += len(runner_inputs)
        self.report(
            f"  measuring {len(runner_inputs):3d} candidates   ({self.sent}/{self.budget} trials sent, "
            f"{time.time() - self.started:.0f} s)"
        )
        return self.inner.run(runner_inputs)


def heaviest_tasks(extracted: list, db: ms.database.Database, count: int) -> list:
    """The `count` tasks with the largest share of model time: calls x best measured latency.

    Tasks without a measurement come first (they run untuned), the most work (calls x FLOPs) first.
    """
    def share(task) -> tuple[bool, float]:
        workload = task.dispatched[0]
        best = db.get_top_k(db.commit_workload(workload), 1) if db.has_workload(workload) else []
        if not best:
            return True, task.weight * float(estimate_tir_flops(workload))
        seconds = [float(s) for s in best[0].run_secs]
        return False, task.weight * sum(seconds) / len(seconds)

    return sorted(extracted, key=share, reverse=True)[:count]


def seed_default_schedules(
    tasks: list, db: ms.database.Database, target: tvm.target.Target, builder: ms.builder.Builder,
    runner: ms.runner.Runner,
) -> int:
    """Measure each conv task's default schedule (compile/schedules/conv.py) with the tuning runner
    and commit it as a record. The database then keeps whichever the runner measured faster, it or
    the search's best, and the search starts from it. Without this the U-Net's tuned database ran
    10.4 ms where the default schedules ran 9.0 ms. Returns how many records were committed."""
    lanes = float_lanes(target)
    seeds = []
    for task in tasks:
        sch = direct_conv_schedule(task.dispatched[0], lanes)
        if sch is not None and not _has_trace(db, task.dispatched[0], sch.trace):  # a rerun adds no duplicate
            seeds.append((task, sch, ms.arg_info.ArgInfo.from_entry_func(sch.mod, remove_preproc=True)))
    built = builder.build([ms.builder.BuilderInput(sch.mod, target) for _, sch, _ in seeds]) if seeds else []
    ready = [(build, seed) for build, seed in zip(built, seeds) if build.error_msg is None]
    futures = runner.run([ms.runner.RunnerInput(build.artifact_path, "cpu", args) for build, (_, _, args) in ready])
    committed = 0
    for (build, (task, sch, args)), future in zip(ready, futures):
        result = future.result()
        shutil.rmtree(Path(build.artifact_path).parent, ignore_errors=True)  # the builder's fresh temporary dir
        if result.error_msg or not result.run_secs:
            continue
        run_secs = [float(s) for s in result.run_secs]
        workload = db.commit_workload(task.dispatched[0])
        db.commit_tuning_record(ms.database.TuningRecord(sch.trace, workload, run_secs, target, args))
        committed += 1
    return committed


def _has_trace(db: ms.database.Database, mod: tvm.IRModule, trace) -> bool:
    """Whether `db` already holds a record of `trace` on the workload `mod`."""
    if not db.has_workload(mod):
        return False
    wanted = tvm.ir.save_json(trace.as_json(remove_postproc=True))
    records = db.get_top_k(db.commit_workload(mod), 1 << 30)
    return any(tvm.ir.save_json(record.trace.as_json(remove_postproc=True)) == wanted for record in records)


def tune(
    mod: tvm.IRModule,
    target: tvm.target.Target,
    database: TuningDatabase,
    trials: int,
    trials_per_task: int,
    report: Callable[[str], None] = print,
    runner: ms.runner.Runner | None = None,
    seed: int | None = None,
    population: int = 512,
    board: TargetConfig | None = None,
    focus: int | None = None,
) -> int:
    """Tune the tasks of `mod`, appending to `database`. Returns how many trials ran.

    A rerun continues: the database's records seed the search and new records are appended.
    `population` is the evolutionary search's population; MetaSchedule's 512 spends minutes per
    batch on cost-model search on a 2-core machine, so small machines use less. With `board` (an
    RPC target's config), candidates are cross-compiled here and measured on that board. With
    `focus`, only that many tasks are tuned: those where the tuned model spends most time
    (`heaviest_tasks`), so a rerun's budget is not spread evenly over dozens of finished tasks.
    """
    if trials <= 0:
        raise UserError(f"--trials must be positive, got {trials}")
    if focus is not None and focus <= 0:
        raise UserError(f"--focus must be positive, got {focus}")
    with database.locked():  # one writer at a time, from the thread claim to the last appended record
        database.drop_torn_tails(report)
        builder = local_builder()
        if board is not None:
            builder, runner = board_measurement(board)
        else:  # the local runner's workers measure on every CPU, as the benchmark runs
            database.claim_threads(size_tvm_thread_pool())
        register_cpu_tensor_intrinsics()
        prepared = prepare(mod, target)
        extracted = [t for t in ms.relax_integration.extract_tasks(prepared, target)
                     if not (_takes_indices(t) or hand_scheduled(t))]
        if not extracted:
            raise UserError("the model has no tunable operators")
        database.write_task_weights(task_weights(extracted))
        with database.open_for_tuning() as (db, left_out):
            if left_out:
                report(f"{database.path}: {left_out} records no longer replay; tuning continues without them "
                       "(the files keep them)")
            if focus is not None:
                extracted = heaviest_tasks(extracted, db, focus)
                report(f"focusing on {len(extracted)} tasks: {', '.join(t.task_name for t in extracted)}")
            if target.kind.name == "llvm":
                seeded = seed_default_schedules(extracted, db, target, builder, runner or ms.runner.LocalRunner())
                report(f"measured {seeded} default conv schedules as the records to beat")
            # MetaSchedule's per-task logs go to files; the console gets our one-line progress instead.
            logging.getLogger("tvm.s_tir.meta_schedule").setLevel(logging.WARNING)
            work_dir = LOG_DIR / database.path.parent.name / database.path.name
            work_dir.mkdir(parents=True, exist_ok=True)
            contexts, weights = ms.relax_integration.extracted_tasks_to_tune_contexts(
                extracted_tasks=extracted,
                work_dir=str(work_dir),
                seed=seed,
                strategy=ms.search_strategy.EvolutionarySearch(
                    population_size=population, init_min_unmeasured=min(50, population // 4)
                ),
            )
            progress = TuningProgress(
                task_names=[t.task_name for t in extracted],
                task_weights=[float(w) for w in weights],
                curve_path=database.path / CURVE_FILE,
                report=report,
            )
            # MetaSchedule's first round gives every task one batch; keep it within half the budget so
            # every task gets measured and the rest goes where the gradient scheduler sees gains.
            per_iter = max(8, min(64, trials // (2 * len(extracted))))
            report(
                f"tuning {len(extracted)} tasks, {trials} trials (≤ {trials_per_task} per task) into {database.path}; "
                f"MetaSchedule logs in {work_dir}"
            )
            ms.tune_tasks(
                tasks=contexts,
                task_weights=weights,
                work_dir=str(work_dir),
                max_trials_global=trials,
                max_trials_per_task=trials_per_task,
                num_trials_per_iter=per_iter,
                database=db,
                cost_model="xgb",
                builder=builder,
                runner=_ReportingRunner(runner or ms.runner.LocalRunner(), trials, report),
                measure_callbacks=[*ms.measure_callback.MeasureCallback.create("default"), _ProgressCallback(progress)],
            )
        return progress.trials_done
