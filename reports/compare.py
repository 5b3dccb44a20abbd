"""`invoke report --compare RUN_A RUN_B`: what changed between two runs, with regressions beyond noise flagged.

Records are matched by what was measured (target, ISA level, model, variant, runtime, threads). A
latency change counts only when it exceeds both a floor (drift between runs on a shared machine) and
three standard errors of the two means, taken from each record's CoV and sample count.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from pathlib import Path

import pandas as pd

from bench.record import robustness_records
from errors import UserError
from reports.html import format_ms, is_missing, load_template, write_page

MATCH_KEYS = ["target", "isa_level", "model", "variant", "runtime", "threads"]
DRIFT_FLOOR = 0.05  # relative change below which two runs on this kind of machine are the same
STANDARD_ERRORS = 3.0


@dataclass(frozen=True)
class Change:
    key: dict
    p50_a: float
    p50_b: float
    threshold: float  # the relative change that counts as real for this pair
    verdict: str  # "regression" | "improvement" | "same" | "became invalid" | "became valid" | "only in A" | "only in B"
    energy_a: float | None = None
    energy_b: float | None = None
    psnr_a: float | None = None
    psnr_b: float | None = None

    @property
    def relative(self) -> float | None:
        return self.p50_b / self.p50_a - 1 if self.p50_a > 0 and self.p50_b > 0 else None


def noise_threshold(a: dict, b: dict) -> float:
    """Relative latency change that exceeds noise: max(drift floor, 3 standard errors of the mean ratio)."""
    def relative_se(record: dict) -> float:
        return record["latency_cov"] / math.sqrt(max(1, record["samples"]))

    return max(DRIFT_FLOOR, STANDARD_ERRORS * math.hypot(relative_se(a), relative_se(b)))


def compare_runs(records: pd.DataFrame, run_a: str, run_b: str) -> list[Change]:
    """Every measurement of run A beside the same measurement in run B (the later record where repeated).
    Robustness probes time nothing, so they are left out."""
    known = set(records["run_id"])
    records = records[~robustness_records(records)]
    for run in (run_a, run_b):
        if run not in known:
            raise UserError(f"no records of run {run!r}; runs on record: {', '.join(sorted(known)) or 'none'}")
    side = {run: {tuple(r[k] for k in MATCH_KEYS): r for r in
                  records[records["run_id"] == run].sort_values("timestamp", kind="stable").to_dict("records")}
            for run in (run_a, run_b)}
    changes = []
    for key in sorted(side[run_a].keys() | side[run_b].keys(), key=str):
        a, b = side[run_a].get(key), side[run_b].get(key)
        fields = dict(zip(MATCH_KEYS, key))
        if a is None or b is None:
            only = a or b
            changes.append(Change(fields, only["latency_p50_ms"] if a else 0.0, only["latency_p50_ms"] if b else 0.0,
                                  0.0, "only in A" if a else "only in B"))
            continue
        threshold = noise_threshold(a, b)
        if a["valid"] != b["valid"]:
            verdict = "became valid" if b["valid"] else "became invalid"
        elif a["latency_p50_ms"] <= 0 or b["latency_p50_ms"] <= 0:
            verdict = "same"
        else:
            relative = b["latency_p50_ms"] / a["latency_p50_ms"] - 1
            verdict = "regression" if relative > threshold else "improvement" if relative < -threshold else "same"
        changes.append(Change(
            fields, a["latency_p50_ms"], b["latency_p50_ms"], threshold, verdict,
            energy_a=_number(a.get("energy_mj")), energy_b=_number(b.get("energy_mj")),
            psnr_a=_number(a.get("output_psnr_db")), psnr_b=_number(b.get("output_psnr_db")),
        ))
    return changes


def render_comparison(records: pd.DataFrame, run_a: str, run_b: str, out_path: Path) -> tuple[Path, list[Change]]:
    changes = compare_runs(records, run_a, run_b)
    rows = [
        {
            **change.key,
            "p50_a": format_ms(change.p50_a) if change.verdict != "only in B" else "—",
            "p50_b": format_ms(change.p50_b) if change.verdict != "only in A" else "—",
            "change": "—" if change.relative is None or change.verdict.startswith("only")
            else f"{100 * change.relative:+.1f}%",
            "threshold": f"±{100 * change.threshold:.1f}%" if change.threshold else "—",
            "verdict": change.verdict,
            "energy": _pair(change.energy_a, change.energy_b, "{:.3g}"),
            "psnr": _pair(change.psnr_a, change.psnr_b, "{:.1f}"),
        }
        for change in changes
    ]
    counts = {verdict: sum(c.verdict == verdict for c in changes)
              for verdict in ("regression", "improvement", "same", "became invalid", "became valid",
                              "only in A", "only in B")}
    page = load_template("compare.html.j2").render(
        run_a=run_a, run_b=run_b, rows=rows, counts=counts, floor=f"{100 * DRIFT_FLOOR:.0f}%",
        standard_errors=f"{STANDARD_ERRORS:g}",
    )
    return write_page(Path(out_path), page), changes


def _number(value) -> float | None:
    return None if is_missing(value) else float(value)


def _pair(a: float | None, b: float | None, fmt: str) -> str:
    if a is None and b is None:
        return "—"
    return f"{'—' if a is None else fmt.format(a)} → {'—' if b is None else fmt.format(b)}"
