"""Render benchmark records as one self-contained HTML page.

The report is a pure function of the records (bench/record.py): it measures nothing and embeds
its plots, so it can be regenerated from `reports/results/` at any time and opened from disk
with no network.
"""

from __future__ import annotations

import base64
import io
import json
import math
import re
from pathlib import Path

import jinja2
import pandas as pd
from matplotlib.figure import Figure  # no pyplot: leaves the process-wide backend alone
from matplotlib.ticker import FuncFormatter, LogLocator, NullFormatter

from bench.record import outside_tolerance
from errors import UserError

TEMPLATES_DIR = Path(__file__).resolve().parent / "templates"
NOISY_COV = 0.1  # coefficient of variation above which a timing is flagged as noisy
LOG_SCALE_SPAN = 20  # a chart switches to a log axis when its p50s span more than this factor
BASELINES = {"onnxruntime": "ORT", "torch": "torch"}  # runtimes TVM's speed-up is measured against
# Row order of a compression table: the base, then lwgan_models.compression.METHODS (not imported: it pulls in torch).
VARIANT_ORDER = ("fp32", "ptq", "qat", "kd", "prune", "prune+kd+ptq")
SEED_METRIC_LABELS = {"generator_loss": "generator loss", "tv_loss": "TV loss"}  # as the seed report names them
SEED_REPORT_SOURCE = "the seed report, lwgan-report.txt results table"
# (family, seed metric) -> (variant, ONNX MB, metric value) rows, the base first: the numbers to beat.
SEED_REPORT_RESULTS = {
    ("CycleGAN", "generator loss"): (("base", 64, 3.572), ("int8", 19, 4.754), ("KD", 45, 4.542), ("QAT", 51, 6.52)),
    ("NST", "TV loss"): (("base", 61, 6.6684), ("int8", 15, 12.1024), ("KD", 25, 29.0122)),
}


def format_ms(value: float | None) -> str:
    """Latency in ms: three decimals below 1 ms, two above, so sub-millisecond models stay readable."""
    if _missing(value):
        return "—"
    return f"{value:.3f}" if abs(value) < 1 else f"{value:.2f}"


def format_ratio(ratio: float) -> str:
    """TVM p50 over a baseline's p50 (below 1× TVM is faster); a third decimal keeps big wins apart."""
    return f"{ratio:.3f}×" if ratio < 0.1 else f"{ratio:.2f}×"


def format_gmac(macs: int | None) -> str:
    """Billions of MACs: three significant digits below 1, so distilled and pruned students stay readable."""
    if _missing(macs):
        return "—"
    gmac = macs / 1e9
    return f"{gmac:.3g}" if gmac < 1 else f"{gmac:.2f}"


def format_times(base_value: float | None, value: float | None) -> str:
    """How many times the base's value is the variant's ("× smaller"); "—" unless both are known."""
    if _missing(base_value) or _missing(value) or value <= 0:
        return "—"
    return f"{base_value / value:.2f}×"


def short_weights(weights: str) -> str:
    """`<path>@sha256:<hex>` as `<file name>@sha256:<first 12 hex>`; enough to tell checkpoints apart."""
    path, at, digest = weights.rpartition("@")
    if not at:
        return weights
    algorithm, _, hexdigest = digest.partition(":")
    return f"{Path(path).name}@{algorithm}:{hexdigest[:12]}"


def render_report(records: pd.DataFrame, out_path: Path, source: str | Path = "reports/results") -> Path:
    """Write the report for `records` to `out_path`; `source` names where they were loaded from."""
    if records.empty:
        raise UserError(f"no benchmark records in {source}; run `invoke bench` first")
    records = records.sort_values(["timestamp", "model", "variant", "runtime"], kind="stable")
    runtimes = sorted(records["runtime"].unique())  # fixes each runtime's colour across charts
    template = jinja2.Environment(
        loader=jinja2.FileSystemLoader(TEMPLATES_DIR),
        autoescape=True,
        undefined=jinja2.StrictUndefined,
        trim_blocks=True,
        lstrip_blocks=True,
    ).get_template("report.html.j2")
    page = template.render(
        source=str(source),
        record_count=len(records),
        runs=_runs(records),
        environments=_environments(records),
        sections=_sections(records, runtimes),
        warnings=[w for r in records.to_dict("records") for w in _warnings(r)],
        noisy_cov=NOISY_COV,
        compression=_compression(records, Path(source)),
        seed_rows=_seed_rows(),
        seed_source=SEED_REPORT_SOURCE,
    )
    out_path = Path(out_path)
    out_path.parent.mkdir(parents=True, exist_ok=True)
    out_path.write_text(page, encoding="utf-8")
    return out_path


def _missing(value) -> bool:
    """pandas turns a missing optional number into NaN, a missing object into None."""
    return value is None or (isinstance(value, float) and math.isnan(value))


def _runs(records: pd.DataFrame) -> list[dict]:
    return [
        {
            "run_id": run_id,
            "first": group["timestamp"].min(),
            "last": group["timestamp"].max(),
            "records": len(group),
            "devices": ", ".join(sorted(group["device"].unique())),
        }
        for run_id, group in records.groupby("run_id", sort=False)
    ]


VOLATILE_ENV = "load_1m_at_start"  # measured per model: shown as a range, not part of the fingerprint


def _environments(records: pd.DataFrame) -> list[dict]:
    """One block per distinct fingerprint, so a run on a different machine or stack stands out."""
    stable = records["env"].map(lambda env: {k: v for k, v in env.items() if k != VOLATILE_ENV})
    fingerprints = stable.map(lambda env: json.dumps(env, sort_keys=True))
    blocks = []
    for _, group in records.groupby(fingerprints, sort=False):
        env = dict(stable[group.index[0]])
        loads = [e[VOLATILE_ENV] for e in group["env"] if VOLATILE_ENV in e]
        if loads:
            env["load average at start"] = f"{min(loads):.2f}–{max(loads):.2f}"
        blocks.append({"env": env, "runs": sorted(group["run_id"].unique())})
    return blocks


def _sections(records: pd.DataFrame, runtimes: list[str]) -> list[dict]:
    """One table and chart per device and run: speed-ups only compare records measured together."""
    sections = []
    keys = ["device", "target", "isa_level", "run_id"]
    for (device, target, isa_level, run_id), group in records.groupby(keys, sort=False):
        rows = group.sort_values(["model", "variant", "runtime", "threads"], kind="stable").to_dict("records")
        latest = {(r["model"], r["variant"], r["runtime"]): r for r in group.to_dict("records") if r["valid"]}
        sections.append(
            {
                "device": device,
                "target": target,
                "isa_level": isa_level,
                "run_id": run_id,
                "rows": [_row(r, latest) for r in rows],
                "chart": _latency_chart(latest, runtimes),
            }
        )
    return sorted(sections, key=lambda s: (s["device"], s["target"], s["isa_level"]))


def _row(record: dict, latest: dict) -> dict:
    """One table row, every value already formatted; the template only lays them out."""
    err = record["max_abs_err"]
    return {
        "model": record["model"],
        "variant": record["variant"],
        "weights": short_weights(record["weights"]),
        "weights_full": record["weights"],
        "untrained": record["weights"] == "random",
        "params": f"{record['params'] / 1e6:.2f} M",
        "gmac": f"{record['macs'] / 1e9:.2f}",
        "size_fp32": _megabytes(record["size_fp32_bytes"]),
        "artifact": _megabytes(record["artifact_bytes"]),
        "runtime": record["runtime"],
        "threads": record["threads"],
        "tuned": _tuned(record),
        "p50": format_ms(record["latency_p50_ms"]),
        "p90": format_ms(record["latency_p90_ms"]),
        "p99": format_ms(record["latency_p99_ms"]),
        "mean": format_ms(record["latency_mean_ms"]),
        "cov": f"{record['latency_cov']:.3f}",
        "noisy": record["latency_cov"] > NOISY_COV,
        "err": "—" if _missing(err) else f"{err:.1e}" + _psnr_suffix(record),
        "tol": _tolerance(record),
        "err_high": _over_tolerance(record),
        "speedups": _speedups(record, latest),
        "valid": record["valid"],
        "reason": record["invalid_reason"],
    }


def _megabytes(size: int | None) -> str:
    return "—" if _missing(size) else f"{size / 1e6:.2f}"


def _tuned(record: dict) -> str:
    """Tuning applies to TVM only; an empty database builds the same code as none."""
    if record["runtime"] != "tvm":
        return "—"
    trials = record["tuned_trials"]
    if _missing(trials) or trials == 0:
        return "untuned"
    tasks = record.get("tuned_tasks")
    return f"{int(trials)} trials" + ("" if _missing(tasks) else f", {tasks} tasks")


def _psnr_suffix(record: dict) -> str:
    """int8 rows are judged by output PSNR against the reference; show it beside the max error."""
    psnr = record.get("output_psnr_db")
    return "" if _missing(record.get("min_output_psnr_db")) or _missing(psnr) else f" ({psnr:.1f} dB)"


def _tolerance(record: dict) -> str:
    if not _missing(record["tolerance"]):
        return f"{record['tolerance']:.0e}"
    floor = record.get("min_output_psnr_db")
    return "—" if _missing(floor) else f"PSNR ≥ {floor:.0f} dB"


def _over_tolerance(record: dict) -> bool:
    return outside_tolerance(record)


def _speedups(record: dict, latest: dict) -> list[str]:
    """A valid TVM row against the latest valid baseline of the same model and variant."""
    if record["runtime"] != "tvm" or not record["valid"]:
        return []
    speedups = []
    for runtime, label in BASELINES.items():
        baseline = latest.get((record["model"], record["variant"], runtime))
        if baseline is not None and baseline["latency_p50_ms"] > 0:
            ratio = record["latency_p50_ms"] / baseline["latency_p50_ms"]
            speedups.append(f"{format_ratio(ratio)} {label}")
    return speedups


def _warnings(record: dict) -> list[dict]:
    where = f"{record['run_id']} · {record['device']} · {record['model']} {record['variant']} on {record['runtime']}"
    warnings = []
    if not record["valid"]:
        warnings.append({"kind": "invalid", "where": where, "detail": record["invalid_reason"]})
    if record["latency_cov"] > NOISY_COV:
        warnings.append({"kind": "noisy", "where": where, "detail": f"CoV {record['latency_cov']:.3f} > {NOISY_COV}"})
    if _over_tolerance(record):
        detail = (f"max abs error {record['max_abs_err']:.1e} > tolerance {record['tolerance']:.0e}"
                  if not _missing(record["tolerance"]) else
                  f"output PSNR {record['output_psnr_db']:.1f} dB < {record['min_output_psnr_db']:.0f} dB")
        warnings.append({"kind": "error above tolerance", "where": where, "detail": detail})
    return warnings


def _compression(records: pd.DataFrame, results_dir: Path) -> list[dict]:
    """One table and size-vs-PSNR chart per base model: what each compression method saves and what it costs.

    Size and quality belong to the model, not to the runtime that timed it, so each model contributes
    its most recent record; records without a base model (old records, a user's ONNX file) are left out.
    """
    latest = {}
    for record in records.to_dict("records"):  # in time order: a later record replaces an earlier one
        if not _missing(record["base_model"]):
            latest[record["model"]] = record
    by_base: dict[str, list[dict]] = {}
    for record in latest.values():
        by_base.setdefault(record["base_model"], []).append(record)
    tables = []
    for base_model, models in sorted(by_base.items()):
        base = next((m for m in models if m["model"] == base_model), None)
        if models == [base]:  # a model without variants has nothing to compare
            continue
        models = sorted(models, key=lambda m: _variant_rank(m, base_model))
        names = sorted({m["seed_metric_name"] for m in models if not _missing(m["seed_metric_name"])})
        tables.append(
            {
                "base_model": base_model,
                "anchor": re.sub(r"[^A-Za-z0-9_.+-]", "-", base_model),
                "has_base": base is not None,
                "seed_metric": " / ".join(SEED_METRIC_LABELS.get(name, name) for name in names) or "seed metric",
                "rows": [_compression_row(m, base, results_dir) for m in models],
                "chart": _size_quality_chart(base_model, models, base),
            }
        )
    return tables


def _variant_rank(record: dict, base_model: str) -> tuple:
    """The base first, then the methods in VARIANT_ORDER, then unknown methods by name."""
    variant = record["variant"]
    order = VARIANT_ORDER.index(variant) if variant in VARIANT_ORDER else len(VARIANT_ORDER)
    return record["model"] != base_model, order, variant, record["model"]


def _compression_row(record: dict, base: dict | None, results_dir: Path) -> dict:
    """Ratios are against the base model's record; without one they are "—"."""
    base = base or {}
    sample = record.get("sample_png")
    sample_path = None if _missing(sample) else results_dir / sample
    psnr, ssim, metric = record["psnr_db"], record["ssim"], record["seed_metric"]
    return {
        "model": record["model"],
        "variant": record["variant"],
        "precision": record["precision"],
        "params": f"{record['params']:,}",
        "gmac": format_gmac(record["macs"]),
        "onnx_mb": _megabytes(record["onnx_bytes"]),
        "smaller": format_times(base.get("onnx_bytes"), record["onnx_bytes"]),
        "fewer_macs": format_times(base.get("macs"), record["macs"]),
        "psnr": "—" if _missing(psnr) else f"{psnr:.2f}",
        "ssim": "—" if _missing(ssim) else f"{ssim:.3f}",
        "seed_metric": "—" if _missing(metric) else f"{metric:.4g}",
        # the output on the shared test image, embedded so the page stays one file
        "sample": base64.b64encode(sample_path.read_bytes()).decode("ascii")
        if sample_path is not None and sample_path.is_file() else None,
    }


def _seed_rows() -> list[dict]:
    """The seed report's table with its own "× smaller", so its trade-offs read like ours."""
    rows = []
    for (family, metric), variants in SEED_REPORT_RESULTS.items():
        base_mb = variants[0][1]
        for variant, onnx_mb, value in variants:
            rows.append(
                {
                    "family": family,
                    "variant": variant,
                    "onnx_mb": f"{onnx_mb}",
                    "smaller": format_times(base_mb, onnx_mb),
                    "metric": metric,
                    "value": f"{value:g}",
                }
            )
    return rows


def _size_quality_chart(base_model: str, models: list[dict], base: dict | None) -> str | None:
    """ONNX size (log x) against PSNR to the fp32 teacher, one labelled point per variant; base64 PNG."""
    points = [
        (m["onnx_bytes"] / 1e6, m["psnr_db"], m["variant"])
        for m in models
        if not (_missing(m["onnx_bytes"]) or _missing(m["psnr_db"]))
    ]
    if not points:
        return None
    fig = Figure(figsize=(5.0, 3.4), dpi=100)
    ax = fig.subplots()
    ax.scatter([size for size, _, _ in points], [psnr for _, psnr, _ in points], color="C0", zorder=3)
    for size, psnr, variant in points:
        ax.annotate(variant, (size, psnr), textcoords="offset points", xytext=(5, 4), fontsize=9)
    if base is not None and not _missing(base["onnx_bytes"]):
        base_mb = base["onnx_bytes"] / 1e6
        ax.axvline(base_mb, color="0.5", linestyle="--", linewidth=1, label=f"fp32 base, {base_mb:.2f} MB")
        ax.legend(frameon=False, loc="lower right", fontsize=9)
    ax.set_xscale("log")
    ax.xaxis.set_major_locator(LogLocator(subs=(1.0, 2.0, 5.0)))  # sizes rarely span many decades
    ax.xaxis.set_major_formatter(FuncFormatter(lambda megabytes, _: f"{megabytes:g}"))  # "0.5", not "5×10⁻¹"
    ax.xaxis.set_minor_formatter(NullFormatter())
    ax.margins(x=0.25, y=0.2)
    ax.set_title(base_model, fontsize=10)
    ax.set_xlabel("ONNX size (MB, log scale)")
    ax.set_ylabel("PSNR to fp32 teacher (dB)")
    ax.grid(alpha=0.3)
    return _png_base64(fig)


def _latency_chart(latest: dict, runtimes: list[str]) -> str | None:
    """Grouped p50 bars per model and variant, one per runtime, error bars up to p90; base64 PNG."""
    if not latest:
        return None
    groups = sorted({(model, variant) for model, variant, _ in latest})
    present = [rt for rt in runtimes if any(key[2] == rt for key in latest)]
    width = 0.8 / len(present)
    fig = Figure(figsize=(max(5.0, 1.0 + 0.5 * len(groups) * len(present)), 3.4), dpi=100)
    ax = fig.subplots()
    for slot, runtime in enumerate(present):
        offset = (slot - (len(present) - 1) / 2) * width
        bars = [(x + offset, latest[(m, v, runtime)]) for x, (m, v) in enumerate(groups) if (m, v, runtime) in latest]
        p50 = [r["latency_p50_ms"] for _, r in bars]
        spread = [r["latency_p90_ms"] - r["latency_p50_ms"] for _, r in bars]
        ax.bar(
            [x for x, _ in bars],
            p50,
            width,
            yerr=[[0] * len(bars), spread],
            capsize=3,
            label=runtime,
            color=f"C{runtimes.index(runtime)}",
        )
    p50s = [r["latency_p50_ms"] for r in latest.values()]
    if min(p50s) > 0 and max(p50s) > LOG_SCALE_SPAN * min(p50s):
        ax.set_yscale("log")
    ax.set_xticks(range(len(groups)), [f"{m}\n{v}" for m, v in groups])
    ax.set_ylabel("latency p50 (ms), bar to p90")
    ax.grid(axis="y", alpha=0.3)
    ax.legend(frameon=False, loc="upper left", bbox_to_anchor=(1, 1))
    return _png_base64(fig)


def _png_base64(fig: Figure) -> str:
    """Charts are embedded in the page, so it opens from disk with no other files."""
    buffer = io.BytesIO()
    fig.savefig(buffer, format="png", bbox_inches="tight")
    return base64.b64encode(buffer.getvalue()).decode("ascii")
