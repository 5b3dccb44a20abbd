"""Build a Relax module for a target from its tuning database, with a content-addressed cache.

The cache key covers everything that changes the machine code: the model's weights and graph
(`source_digest`), the input shape, the target, the database contents and the TVM version. A hit
skips all of it: import, applying the database, LLVM codegen and linking.
"""

from __future__ import annotations

import hashlib
import json
import os
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import tvm
from tvm import relax
from tvm.s_tir import meta_schedule as ms

from compile import LOWERING_ATTR, bf16
from compile.database import TuningDatabase
from compile.passes import prepare
from compile.schedules.conv import prepack_weights
from compile.schedules.default import default_cpu_schedules
from compile.tuning import hand_scheduled

CACHE_DIR = Path(os.environ.get("LWGAN_CACHE", Path(__file__).resolve().parent.parent / "build" / "cache"))
PIPELINE_VERSION = "57"  # bump when the import or build changes the code emitted


@dataclass(frozen=True)
class CompiledModel:
    library: Path  # shared library for relax.VirtualMachine
    tuned_tasks: int  # tasks that found a record in the database
    total_tasks: int
    db_records: int  # tuning records in the applied database (0 = untuned)
    db_hash: str | None
    database: Path  # the database applied (or looked for, when db_records == 0)
    db_skipped: int  # records that no longer replay and were left out (see TuningDatabase.open_for_reading)
    cache_hit: bool
    lowering: str | None = None  # an int8 model's integer kernels (compile/int8/lowering.py), a bf16 one's plan (bf16_budget)

    def load(self, device: tvm.runtime.Device | None = None) -> relax.VirtualMachine:
        return relax.VirtualMachine(tvm.runtime.load_module(str(self.library)), device or tvm.cpu())


def cache_key(source_digest: str, input_shape: tuple[int, ...], target: tvm.target.Target, db_hash: str | None) -> str:
    parts = {
        "source": source_digest,
        "shape": list(input_shape),
        "target": str(target),
        "database": db_hash,
        "tvm": tvm.__version__,
        "pipeline": PIPELINE_VERSION,
    }
    return hashlib.sha256(json.dumps(parts, sort_keys=True).encode()).hexdigest()[:24]


def apply_database(
    mod: tvm.IRModule, target: tvm.target.Target, database: TuningDatabase
) -> tuple[tvm.IRModule, int, int, int]:
    """Replace each tunable PrimFunc by its best tuned schedule; returns (module, tuned, total, skipped records)."""
    prepared = prepare(mod, target)
    tasks = [t for t in ms.relax_integration.extract_tasks(prepared, target) if not hand_scheduled(t)]
    if not database.exists():
        database.validate()  # a lone file may still be corrupt: say so rather than run untuned
        return with_default_schedules(prepared, target), 0, len(tasks), 0
    db, skipped = database.open_for_reading()
    tuned = sum(1 for task in tasks if db.query_tuning_record(task.dispatched[0], target, task.task_name) is not None)
    with target, db:
        applied = relax.transform.MetaScheduleApplyDatabase()(prepared)
    return with_default_schedules(applied, target), tuned, len(tasks), skipped


def with_default_schedules(mod: tvm.IRModule, target: tvm.target.Target) -> tvm.IRModule:
    """On a CPU, the kernels no database record covers get default parallel, vectorized schedules
    (`default_cpu_schedules`), and the convolutions' weights are packed at build time. GPU targets
    get dlight's rules in `tvm.compile` instead."""
    if target.kind.name != "llvm":
        return mod
    return prepack_weights(default_cpu_schedules(mod, target))


def compile_model(
    make_module: Callable[[], tvm.IRModule],
    target: tvm.target.Target,
    database: TuningDatabase,
    source_digest: str,
    input_shape: tuple[int, ...],
    cache_dir: Path = CACHE_DIR,
    fcompile=None,
) -> CompiledModel:
    """Build from the database (no tuning) into the cache; `fcompile` links for another machine (a board)."""
    db_hash = database.digest()
    key = cache_key(source_digest, input_shape, target, db_hash)
    library = cache_dir / f"{key}.so"
    meta_path = cache_dir / f"{key}.json"
    if library.exists() and meta_path.exists():
        meta = json.loads(meta_path.read_text())
        return CompiledModel(
            library, meta["tuned_tasks"], meta["total_tasks"], meta["db_records"], db_hash, database.path,
            meta["db_skipped"], True, meta.get("lowering"),
        )
    mod = make_module()
    lowering = mod.attrs.get(LOWERING_ATTR) if mod.attrs is not None else None
    applied, tuned, total, skipped = apply_database(mod, target, database)
    executable = tvm.compile(applied, target)
    cache_dir.mkdir(parents=True, exist_ok=True)
    # Write to a temporary name first so an interrupted build never leaves a truncated library.
    with tempfile.NamedTemporaryFile(dir=cache_dir, suffix=".so", delete=False) as tmp:
        partial = Path(tmp.name)
    link = {"fcompile": fcompile} if fcompile else {}
    if objects := bf16.link_options(mod, cache_dir):  # the bf16 products block (compile/bf16.py)
        link["options"] = objects
    executable.export_library(str(partial), **link)
    partial.replace(library)
    meta = {"tuned_tasks": tuned, "total_tasks": total, "db_records": database.record_count(), "db_skipped": skipped,
            "lowering": None if lowering is None else str(lowering)}
    meta_path.write_text(json.dumps(meta))
    return CompiledModel(library, tuned, total, meta["db_records"], db_hash, database.path, skipped, False,
                         meta["lowering"])
