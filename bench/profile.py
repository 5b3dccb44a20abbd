"""Per-op profiles: where each runtime spends an inference, exported as CSV or JSON.

Each runtime plug-in that has a profiler offers `op_profile(runs)` (TVM's VM instrument, OpenVINO's
performance counters as benchmark_app's `-report_type` reads them, ONNX Runtime's profiler trace,
torch.profiler); a runtime without one (LiteRT's Python interpreter: its profiler is the
benchmark_model tool's `--enable_op_profiling`) is named in the result instead. Profiles run on
the host only, after the same warm-up as a benchmark; instrumented times are inflated, so the
profile says where time goes, and `invoke bench` says how much there is.
"""

from __future__ import annotations

import csv
import json
from pathlib import Path
from typing import Callable

from bench import runtimes as runtime_registry
from bench.run import model_inputs
from compile.artifacts import build_artifact
from compile.pipeline import ModelUnderTest
from errors import UserError
from targets import ResolvedTarget

PROFILE_RUNS = 10
COLUMNS = ("model", "runtime", "executed_precision", "op", "type", "calls", "ms", "share")


def profile_model(model: ModelUnderTest, target: ResolvedTarget, runtimes: tuple[str, ...], threads: int,
                  runs: int = PROFILE_RUNS, report: Callable[[str], None] = print) -> tuple[list[dict], dict[str, str]]:
    """Rows (COLUMNS) per op for each runtime that can profile, slowest first; and the runtimes that cannot, with why."""
    if target.config.place != "host":
        raise UserError(f"per-op profiles run on the host; target {target.config.name!r} runs models on a "
                        f"{target.config.place}")
    x = model_inputs(model)
    rows, skipped = [], {}
    for spec in runtime_registry.parse(runtimes, "host"):
        adapter = spec.load(build_artifact(spec.artifact, model, target).path, threads)
        if not hasattr(adapter, "op_profile"):
            skipped[spec.name] = "its Python API has no per-op profiler"
            report(f"  {model.name}: {spec.name}: not profiled ({skipped[spec.name]})")
            continue
        adapter.prepare(x)
        ops = sorted(adapter.op_profile(runs), key=lambda op: -op["ms"])
        total = sum(op["ms"] for op in ops) or 1.0
        precision = "int8" if model.precision == "int8" else adapter.precision
        rows += [{"model": model.name, "runtime": spec.name, "executed_precision": precision, **op,
                  "share": op["ms"] / total} for op in ops]
        report(f"  {model.name}: {spec.name}: {len(ops)} ops, {total:.3f} ms per inference instrumented; slowest "
               + ", ".join(f"{op['op']} {op['ms']:.3f} ms" for op in ops[:3]))
    return rows, skipped


def write_profile(rows: list[dict], skipped: dict[str, str], path: Path) -> Path:
    """CSV (one row per op) or JSON ({"ops": [...], "not_profiled": {...}}), by the file's suffix."""
    path = Path(path)
    if path.suffix not in (".csv", ".json"):
        raise UserError(f"{path}: a profile is written as .csv or .json")
    path.parent.mkdir(parents=True, exist_ok=True)
    if path.suffix == ".json":
        path.write_text(json.dumps({"ops": rows, "not_profiled": skipped}, indent=1), encoding="utf-8")
        return path
    with open(path, "w", newline="", encoding="utf-8") as f:
        writer = csv.DictWriter(f, fieldnames=COLUMNS)
        writer.writeheader()
        writer.writerows(rows)
    return path
