"""Tuning databases: MetaSchedule JSON databases committed under autotune_logs/<target-level>/<model>/.

Records are append-only: tuning adds lines, nothing here rewrites or deletes them.
"""

from __future__ import annotations

import contextlib
import fcntl
import hashlib
import json
import os
import shutil
import tempfile
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

from tvm.s_tir import meta_schedule as ms

from errors import UserError

AUTOTUNE_DIR = Path(os.environ.get("LWGAN_AUTOTUNE_DIR", Path(__file__).resolve().parent.parent / "autotune_logs"))
WORKLOAD_FILE = "database_workload.json"
RECORD_FILE = "database_tuning_record.json"
CURVE_FILE = "tuning_curve.jsonl"  # the tuning log: one line per measured batch (compile.tuning.TuningProgress)
FAILED_RUN_S = 1e9  # MetaSchedule stores a failed measurement as 1e10 s
WEIGHTS_FILE = "task_weights.json"  # workload structural hash -> calls per inference, written by tuning
CURVE_POINTS = 60  # a record keeps this many points of the curve, enough to plot it
THREADS_FILE = "measured_threads.json"  # {"threads": N}: the thread count every record was measured with
LOCK_FILE = ".lock"  # held (flock) by the one process appending; holds its pid (not committed)


@dataclass(frozen=True)
class TuningDatabase:
    path: Path

    @property
    def workload_file(self) -> Path:
        return self.path / WORKLOAD_FILE

    @property
    def record_file(self) -> Path:
        return self.path / RECORD_FILE

    def exists(self) -> bool:
        return self.workload_file.exists() and self.record_file.exists()

    def record_count(self) -> int:
        if not self.exists():
            return 0
        with open(self.record_file, encoding="utf-8") as f:
            return sum(1 for line in f if line.strip())

    def digest(self) -> str | None:
        """Content hash of both files: part of the compiled-artifact cache key and of every record."""
        if not self.exists():
            return None
        h = hashlib.sha256()
        for file in (self.workload_file, self.record_file):
            h.update(file.read_bytes())
        return h.hexdigest()[:16]

    @property
    def weights_file(self) -> Path:
        return self.path / WEIGHTS_FILE

    def write_task_weights(self, weights: dict[str, int]) -> None:
        """Remember how often the model calls each tuned workload (by structural hash), for `curve`."""
        known = json.loads(self.weights_file.read_text(encoding="utf-8")) if self.weights_file.exists() else {}
        self.path.mkdir(parents=True, exist_ok=True)
        self.weights_file.write_text(json.dumps({**known, **weights}, indent=1, sort_keys=True) + "\n", encoding="utf-8")

    def claim_threads(self, threads: int) -> None:
        """Record that new measurements run `threads` threads; refuse to mix them with records of another count.

        A record's time is only comparable with others measured on as many threads: MetaSchedule applies
        the fastest record per workload, so records from a 1-thread pool would lose to any 2-thread one.
        """
        file = self.path / THREADS_FILE
        if file.exists():
            try:
                measured = int(json.loads(file.read_text(encoding="utf-8"))["threads"])
            except (ValueError, KeyError, TypeError) as exc:
                raise UserError(f"{file}: corrupt ({exc}); expected {{\"threads\": N}}") from exc
            if measured != threads:
                raise UserError(f"{self.path}: its records were measured on {measured} thread(s) and tuning here "
                                f"measures on {threads}; tune into a fresh database (move this one away)")
            return
        if self.record_count():
            raise UserError(f"{self.path}: its records do not say how many threads measured them ({THREADS_FILE} "
                            f"is missing); tune into a fresh database (move this one away)")
        self.path.mkdir(parents=True, exist_ok=True)
        file.write_text(json.dumps({"threads": threads}) + "\n", encoding="utf-8")

    def curve(self) -> list[tuple[int, float]]:
        """Best model latency estimate (ms) against trials, replayed from the records in the order tuning
        appended them: each workload's best mean run time so far, weighted by its calls in the model.

        Points start once every weighted workload has a measurement (before that the sum is only a lower
        bound), and are thinned to about CURVE_POINTS. A weighted workload that no record ever measured
        (every candidate failed, or the search never committed it) is left out of the sum: it would
        hold the curve back forever, and it runs the same default code at every trial. Empty without
        records or task weights.
        """
        if not (self.exists() and self.weights_file.exists()):
            return []
        weights = json.loads(self.weights_file.read_text(encoding="utf-8"))
        hashes = [json.loads(line)[0] for line in self.workload_file.read_text(encoding="utf-8").splitlines()
                  if line.strip()]
        measured = []  # (trials, workload hash, mean run seconds) of the successful records, in order
        for trials, (workload, (_, run_secs, *_)) in enumerate(self._record_rows(), 1):
            shash = hashes[workload] if workload < len(hashes) else None
            if shash in weights and run_secs and max(run_secs) < FAILED_RUN_S:
                measured.append((trials, shash, sum(run_secs) / len(run_secs)))
        measured_hashes = {shash for _, shash, _ in measured}
        weights = {shash: weight for shash, weight in weights.items() if shash in measured_hashes}
        best: dict[str, float] = {}
        curve = []
        for trials, shash, seconds in measured:
            best[shash] = min(best.get(shash, float("inf")), seconds)
            if len(best) == len(weights):
                curve.append((trials, 1e3 * sum(weights[h] * best[h] for h in weights)))
        step = max(1, -(-len(curve) // CURVE_POINTS))
        thinned = curve[::step]
        return thinned + curve[-1:] if curve and thinned[-1] != curve[-1] else thinned

    @contextlib.contextmanager
    def locked(self) -> Iterator[None]:
        """Hold the database's advisory lock for a whole append: a second writer is refused, naming the holder.

        Two `invoke tune` runs appending workloads to one database would interleave the workload file,
        and a record's workload index could then point into the other run's view of it.
        """
        self.path.mkdir(parents=True, exist_ok=True)
        fd = os.open(self.path / LOCK_FILE, os.O_RDWR | os.O_CREAT, 0o644)
        try:
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except BlockingIOError:
                holder = os.pread(fd, 32, 0).decode(errors="replace").strip() or "unknown"
                raise UserError(f"{self.path}: another process (pid {holder}) is appending to this tuning "
                                "database; wait for it to finish or stop it") from None
            os.ftruncate(fd, 0)
            os.pwrite(fd, f"{os.getpid()}\n".encode(), 0)
            yield
        finally:
            os.close(fd)  # releases the lock

    def check(self) -> list[str]:
        """Every unusable line of the two files, as "file:line: why"; empty when the database is sound.

        A line is unusable when it is not JSON, not a MetaSchedule row, names a workload that does
        not exist or does not parse, or holds a trace that no longer replays on its workload.
        """
        if not self.exists():
            return [f"{self.path}: no tuning database ({WORKLOAD_FILE} and {RECORD_FILE} expected)"]
        problems = []
        workloads = []  # by index, None where the line is unusable
        for number, row in _json_rows(self.workload_file, problems):
            if row is None:
                workloads.append(None)
                continue
            try:
                workloads.append(ms.database.Workload.from_json(row))
            except Exception as exc:  # noqa: BLE001  (TVM's parser raises several types)
                workloads.append(None)
                problems.append(f"{self.workload_file}:{number}: workload does not parse ({_first_line(exc)})")
        for file in (self.workload_file, self.record_file):
            if (torn := torn_tail(file)) is not None:
                problems.append(f"{file}:{torn}: torn last line (an interrupted append); readers skip it and "
                                "the next `invoke tune` drops it")
        for number, row in _json_rows(self.record_file, problems):
            if row is None:
                continue
            index = row[0]
            if not isinstance(index, int) or not 0 <= index < len(workloads) or workloads[index] is None:
                problems.append(f"{self.record_file}:{number}: names workload {index!r}, which is not a usable line "
                                f"of {WORKLOAD_FILE}")
                continue
            try:
                ms.database.TuningRecord.from_json(row[1], workloads[index])
            except Exception as exc:  # noqa: BLE001
                problems.append(f"{self.record_file}:{number}: trace does not replay on workload {index} "
                                f"({_first_line(exc)})")
        return problems

    def validate(self) -> None:
        """Fail with the offending file and line before MetaSchedule meets a corrupt file."""
        for file in (self.workload_file, self.record_file):
            if not file.exists():
                continue
            problems: list[str] = []
            for _ in _json_rows(file, problems):
                if problems:
                    raise UserError(problems[0])

    @contextlib.contextmanager
    def open_for_tuning(self) -> Iterator[tuple[ms.database.JSONDatabase, int]]:
        """The database to tune into, and how many records it left out; new records land in our files.

        When some records no longer replay (see `open_for_reading`), MetaSchedule's loader refuses
        the files, so tuning runs on a copy without those records and what it adds is appended to
        the real files afterwards, even if tuning is interrupted. Nothing is ever removed.
        """
        self.validate()
        self.path.mkdir(parents=True, exist_ok=True)
        try:
            database = self._json_database()
        except Exception:  # noqa: BLE001  (the loader's error names no record)
            database = None
        if database is not None:
            yield database, 0
            return
        bad = set(self.unreplayable_records())
        with tempfile.TemporaryDirectory(prefix="lwgan-db-") as scratch:
            copy = TuningDatabase(Path(scratch))
            shutil.copyfile(self.workload_file, copy.workload_file)
            with open(self.record_file, encoding="utf-8") as f:
                kept = [line for number, line in enumerate((l for l in f if l.strip()), 1) if number not in bad]
            copy.record_file.write_text("".join(kept), encoding="utf-8")
            workloads_before = _line_count(copy.workload_file)
            try:
                yield copy._json_database(), len(bad)
            finally:
                _append_lines_after(copy.workload_file, workloads_before, self.workload_file)
                _append_lines_after(copy.record_file, len(kept), self.record_file)

    def open_for_reading(self) -> tuple[ms.database.Database, int]:
        """The database for applying, and how many records it had to skip.

        MetaSchedule occasionally commits a record whose trace does not replay when the file is
        loaded again (seen here: RFactor traces on reductions); its JSON loader then refuses the
        whole file. Reading record by record keeps every schedule that does replay; the files stay
        untouched.
        """
        self.validate()
        try:
            return self._json_database(), 0
        except Exception:  # noqa: BLE001  (the loader's error names no record; replay them one by one)
            pass
        memory = ms.database.MemoryDatabase()
        skipped = 0
        for _, workload, record in self._replayed_records():
            if record is None:
                skipped += 1
                continue
            committed = memory.commit_workload(workload.mod)
            memory.commit_tuning_record(
                ms.database.TuningRecord(
                    record.trace, committed, record.run_secs, target=record.target, args_info=record.args_info
                )
            )
        return memory, skipped

    def unreplayable_records(self) -> list[int]:
        """Line numbers (1-based) of records whose trace no longer replays on its workload."""
        return [number for number, _, record in self._replayed_records() if record is None]

    def drop_torn_tails(self, report: Callable[[str], None]) -> None:
        """Cut a torn last line (an append interrupted by a crash) off both files before appending, so the
        next line is not glued onto it; it was never a record. Call with the database locked."""
        for file in (self.workload_file, self.record_file):
            if file.exists() and torn_tail(file) is not None:
                data = file.read_bytes()
                with open(file, "r+b") as f:
                    f.truncate(data.rfind(b"\n") + 1)
                report(f"{file}: dropped a torn last line left by an interrupted append")

    def _replayed_records(self):
        """(line number, workload, record or None where the trace fails to replay) for every record."""
        torn = torn_tail(self.workload_file)
        with open(self.workload_file, encoding="utf-8") as f:
            workloads = [ms.database.Workload.from_json(json.loads(line)) for number, line in enumerate(f, 1)
                         if line.strip() and number != torn]
        for number, (workload_index, trace) in enumerate(self._record_rows(), 1):
            workload = workloads[workload_index]
            try:
                record = ms.database.TuningRecord.from_json(trace, workload)
            except Exception:  # noqa: BLE001  (a trace that fails to replay, whatever the error)
                record = None
            yield number, workload, record

    def _json_database(self) -> ms.database.JSONDatabase:
        return ms.database.JSONDatabase(path_workload=str(self.workload_file), path_tuning_record=str(self.record_file))

    def _record_rows(self):
        torn = torn_tail(self.record_file)
        with open(self.record_file, encoding="utf-8") as f:
            for number, line in enumerate(f, 1):
                if line.strip() and number != torn:
                    workload_index, trace = json.loads(line)[:2]
                    yield workload_index, trace


def trials_to_within(curve: list[tuple[int, float]], fraction: float = 0.1) -> int | None:
    """Trials until the curve first came within `fraction` of its final latency: what tuning really costs."""
    if not curve:
        return None
    final = curve[-1][1]
    return next(trials for trials, latency in curve if latency <= final * (1 + fraction))


def _json_rows(path: Path, problems: list[str]) -> Iterator[tuple[int, list | None]]:
    """(file line number, row) for every non-blank line but a torn last one (`torn_tail`: an interrupted
    append, never a record); a line that is not a JSON list of two or more is described in `problems`
    and comes as None (a workload line keeps its index even so)."""
    torn = torn_tail(path)
    with open(path, encoding="utf-8", errors="replace") as f:
        for number, line in enumerate(f, 1):
            if not line.strip() or number == torn:
                continue
            try:
                row = json.loads(line)
            except json.JSONDecodeError as exc:
                problems.append(f"{path}:{number}: corrupt tuning database line, not JSON ({exc.msg})")
                row = None
            if row is not None and not (isinstance(row, list) and len(row) >= 2):
                problems.append(f"{path}:{number}: not a MetaSchedule database row (expected a JSON list)")
                row = None
            yield number, row


def torn_tail(path: Path) -> int | None:
    """The line number of `path`'s last line when an interrupted append left it unfinished (no newline, not
    JSON), else None. MetaSchedule ends every line it writes with a newline."""
    if not path.exists():
        return None
    with open(path, "rb") as f:  # readers call this on every build: the last byte first, the file only if torn
        size = f.seek(0, 2)
        if size == 0:
            return None
        f.seek(size - 1)
        if f.read(1) == b"\n":
            return None
    data = path.read_bytes()
    try:
        json.loads(data[data.rfind(b"\n") + 1:])
        return None
    except ValueError:
        return data.count(b"\n") + 1


def _first_line(exc: Exception) -> str:
    lines = [line.strip() for line in str(exc).splitlines() if line.strip()]
    return lines[-1][:200] if lines else type(exc).__name__


def _line_count(path: Path) -> int:
    with open(path, encoding="utf-8") as f:
        return sum(1 for line in f if line.strip())


def _append_lines_after(source: Path, skip: int, destination: Path) -> None:
    """Append the non-blank lines of `source` past its first `skip` to `destination`."""
    with open(source, encoding="utf-8") as f:
        new = [line for line in f if line.strip()][skip:]
    with open(destination, "a", encoding="utf-8") as f:
        f.writelines(line if line.endswith("\n") else line + "\n" for line in new)


def database_for(db_key: str, model: str) -> TuningDatabase:
    return TuningDatabase(AUTOTUNE_DIR / db_key / model)
