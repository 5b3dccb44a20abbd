"""Tuning databases: MetaSchedule JSON databases committed under autotune_logs/<target-level>/<model>/.

Records are append-only: tuning adds lines, nothing here rewrites or deletes them.
"""

from __future__ import annotations

import hashlib
import json
import os
from dataclasses import dataclass
from pathlib import Path

from tvm.s_tir import meta_schedule as ms

from errors import UserError

AUTOTUNE_DIR = Path(os.environ.get("LWGAN_AUTOTUNE_DIR", Path(__file__).resolve().parent.parent / "autotune_logs"))
WORKLOAD_FILE = "database_workload.json"
RECORD_FILE = "database_tuning_record.json"


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

    def validate(self) -> None:
        """Fail with the offending file and line before MetaSchedule meets a corrupt file."""
        for file in (self.workload_file, self.record_file):
            if not file.exists():
                continue
            with open(file, encoding="utf-8", errors="replace") as f:
                for number, line in enumerate(f, 1):
                    if not line.strip():
                        continue
                    try:
                        row = json.loads(line)
                    except json.JSONDecodeError as exc:
                        raise UserError(f"{file}:{number}: corrupt tuning database line ({exc.msg})") from exc
                    if not isinstance(row, list) or len(row) < 2:
                        raise UserError(f"{file}:{number}: not a MetaSchedule database row (expected a JSON list)")

    def open(self) -> ms.database.JSONDatabase:
        """The database for tuning: new records are appended to its files."""
        self.validate()
        self.path.mkdir(parents=True, exist_ok=True)
        try:
            return self._json_database()
        except Exception as exc:  # the C++ parser's message is long; the file is what the user needs
            skipped = len(self.unreplayable_records())
            reason = f"{skipped} records no longer replay" if skipped else type(exc).__name__
            raise UserError(f"{self.path}: tuning database could not be opened for tuning ({reason})") from exc

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

    def _replayed_records(self):
        """(line number, workload, record or None where the trace fails to replay) for every record."""
        with open(self.workload_file, encoding="utf-8") as f:
            workloads = [ms.database.Workload.from_json(json.loads(line)) for line in f if line.strip()]
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
        with open(self.record_file, encoding="utf-8") as f:
            for line in f:
                if line.strip():
                    workload_index, trace = json.loads(line)[:2]
                    yield workload_index, trace


def database_for(db_key: str, model: str) -> TuningDatabase:
    return TuningDatabase(AUTOTUNE_DIR / db_key / model)
