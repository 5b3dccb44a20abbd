"""Render benchmark records as a self-contained HTML report: an index comparing devices, a page per device.

The report is a pure function of the records (bench/record.py): it measures nothing and embeds
its plots, so it can be regenerated from `reports/results/` at any time and opened from disk
with no network. Device pages live in a folder beside the index (`<index stem>-devices/`).
"""

from __future__ import annotations

import base64
import json
import math
import re
import statistics
from pathlib import Path

import jinja2
import pandas as pd

from bench.record import SAME_ROBUSTNESS_DB, outside_tolerance, robustness_records, robustness_verdict
from errors import UserError
from reports.charts import (
    QualityPoint,
    grouped_bars,
    pareto_chart,
    robustness_chart,
    size_quality_chart,
    tuning_curves_chart,
)

TEMPLATES_DIR = Path(__file__).resolve().parent / "templates"
NOISY_COV = 0.1  # coefficient of variation above which a timing is flagged as noisy
COMPILER = "tvm"  # the runtime under study; every other runtime in a record is a peer
# Output PSNR against the reference above which two runtimes count as equally exact: fp32 reorderings
# land at 120-140 dB, bf16 at 45-67 dB, int8 at 30-55 dB.
EXACT_DB = 100.0
# Below that, two outputs within this many dB count as the same quality: int8 runtimes rounding the
# same QDQ model differ by a fraction of a dB from one rounding step to another.
SAME_QUALITY_DB = 1.0
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
    if is_missing(value):
        return "—"
    return f"{value:.3f}" if abs(value) < 1 else f"{value:.2f}"


def format_ratio(ratio: float) -> str:
    """TVM p50 over a baseline's p50 (below 1× TVM is faster); a third decimal keeps big wins apart."""
    return f"{ratio:.3f}×" if ratio < 0.1 else f"{ratio:.2f}×"


def ratio_cell(value: float | None, base: float | None) -> str:
    """value ÷ base as format_ratio shows it; "—" unless both are known (a missing baseline, say)."""
    if is_missing(value) or is_missing(base) or base <= 0:
        return "—"
    return format_ratio(value / base)


def format_gmac(macs: int | None) -> str:
    """Billions of MACs: three significant digits below 1, so distilled and pruned students stay readable."""
    if is_missing(macs):
        return "—"
    gmac = macs / 1e9
    return f"{gmac:.3g}" if gmac < 1 else f"{gmac:.2f}"


def format_times(base_value: float | None, value: float | None) -> str:
    """How many times the base's value is the variant's ("× smaller"); "—" unless both are known."""
    if is_missing(base_value) or is_missing(value) or value <= 0:
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
    """Write the index to `out_path` and one page per device beside it; `source` names where records came from."""
    if records.empty:
        raise UserError(f"no benchmark records in {source}; run `invoke bench` first")
    skipped = [{"kind": "skipped line", "where": line.split(": skipped, ", 1)[0],
                "detail": line.split(": skipped, ", 1)[-1]} for line in records.attrs.get("skipped", [])]
    everything = records.sort_values(["timestamp", "model", "variant", "runtime"], kind="stable")
    # robustness probes time nothing: they get their own section, and no timing table sees them
    probes, records = everything[robustness_records(everything)], everything[~robustness_records(everything)]
    runtimes = sorted(records["runtime"].unique())  # fixes each runtime's colour across charts
    out_path = Path(out_path)
    pages_dir = out_path.with_name(f"{out_path.stem}-devices")
    compression = _compression(records, Path(source))
    shared = {"source": str(source), "noisy_cov": NOISY_COV, "exact_db": EXACT_DB, "same_quality_db": SAME_QUALITY_DB,
              "same_robustness_db": SAME_ROBUSTNESS_DB,
              "compression": compression,
              "seed_rows": _seed_rows(), "seed_source": SEED_REPORT_SOURCE}
    devices = []
    for (target, isa_level), group in records.groupby(["target", "isa_level"], sort=True):
        device = _device_summary(group, target, isa_level, f"{pages_dir.name}/{_slug(target, isa_level)}.html")
        devices.append(device)
        # models whose output is no image (an embedding, logits) get a table of their own, apart from generators'
        others, generators = group[group["kind"] == "other"], group[group["kind"] != "other"]
        page = load_template("device.html.j2").render(
            **shared,
            index_href=f"../{out_path.name}",
            device=device,
            record_count=len(group),
            runs=_runs(group),
            environments=_environments(group),
            sections=_sections(generators, runtimes),
            other_models=_sections(others, runtimes),
            device_compression=_device_compression(generators),
            warnings=[w for r in group.to_dict("records") for w in _warnings(r)],
            pareto=_pareto_charts(generators),
            tuning_chart=_tuning_chart(group, device["label"]),
            roofline=_roofline_tables(group),
            firmware=bool(group["flash_bytes"].notna().any()),
            toolchains=sorted({t for t in group["toolchain"] if not is_missing(t)}),
        )
        write_page(pages_dir / f"{_slug(target, isa_level)}.html", page)
    page = load_template("index.html.j2").render(
        **shared,
        record_count=len(everything),
        runs=_runs(everything),
        devices=devices,
        device_chart=_device_chart(records),
        firmware=_firmware_tables(records),
        robustness=_robustness(probes),
        environments=_environments(everything),
        warnings=skipped + [w for r in everything.to_dict("records") for w in _warnings(r)],
    )
    return write_page(out_path, page)


def load_template(name: str) -> jinja2.Template:
    return jinja2.Environment(
        loader=jinja2.FileSystemLoader(TEMPLATES_DIR),
        autoescape=True,
        undefined=jinja2.StrictUndefined,
        trim_blocks=True,
        lstrip_blocks=True,
    ).get_template(name)


def write_page(path: Path, page: str) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(page, encoding="utf-8")
    return path


def _slug(target: str, isa_level: str) -> str:
    return re.sub(r"[^A-Za-z0-9_.-]", "-", f"{target}-{isa_level}" if isa_level else target)


def _device_summary(group: pd.DataFrame, target: str, isa_level: str, href: str) -> dict:
    """One device's line in the index: what was measured there, its power source, TVM against ORT."""
    latest_run = group[group["timestamp"] == group["timestamp"].max()]["run_id"].iloc[0]
    latest = {(r["model"], r["variant"], r["runtime"]): r
              for r in group[group["run_id"] == latest_run].to_dict("records") if r["valid"]}
    ratios = [r["latency_p50_ms"] / peer["latency_p50_ms"] for (m, v, rt), r in latest.items()
              if is_compiler(rt) and (peer := best_peer(r, latest.values()))]
    return {
        "label": group["device"].iloc[-1],
        "target": target,
        "isa_level": isa_level,
        "href": href,
        "runs": group["run_id"].nunique(),
        "records": len(group),
        "models": group["model"].nunique(),
        "power": _power_summary(group),
        "tvm_vs_best_peer": format_ratio(statistics.median(ratios)) if ratios else "—",
        "latest_run": latest_run,
    }


def _power_summary(group: pd.DataFrame) -> str:
    """The power sources a device's records name; older records without one say "not recorded"."""
    sources = sorted({s for s in group["power_source"] if not is_missing(s)})
    labels = {"none": "no sensor", "estimate": "estimate (stated constants, not measured)"}
    return ", ".join(labels.get(s, s) for s in sources) or "not recorded"


def is_missing(value) -> bool:
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
    """One table and chart per run on a device: speed-ups only compare records measured together."""
    sections = []
    for run_id, group in records.groupby("run_id", sort=False):
        rows = group.sort_values(["model", "variant", "runtime", "threads"], kind="stable").to_dict("records")
        latest = {(r["model"], r["variant"], r["runtime"]): r for r in group.to_dict("records") if r["valid"]}
        sections.append({"run_id": run_id, "rows": [_row(r, latest) for r in rows],
                         "chart": _latency_chart(latest, runtimes)})
    return sections


def _latency_chart(latest: dict, runtimes: list[str]) -> str | None:
    """Grouped p50 bars per model and variant, one per runtime (records with a latency only)."""
    timed = {key: r for key, r in latest.items() if r["latency_p50_ms"] > 0}
    groups = sorted({(model, variant) for model, variant, _ in timed})
    series = {
        runtime: {f"{m}\n{v}": (r["latency_p50_ms"], r["latency_p90_ms"])
                  for (m, v, rt), r in timed.items() if rt == runtime}
        for runtime in runtimes if any(key[2] == runtime for key in timed)
    }
    colours = {runtime: f"C{runtimes.index(runtime)}" for runtime in runtimes}
    return grouped_bars([f"{m}\n{v}" for m, v in groups], series, colours, "latency p50 (ms), bar to p90")


def _device_chart(records: pd.DataFrame) -> str | None:
    """Per model, each device's fastest valid runtime in the latest run that timed it: where does it run best?"""
    series: dict[str, dict[str, tuple[float, float]]] = {}
    timed = records[records["valid"] & (records["latency_p50_ms"] > 0)]
    for (_, _), group in timed.groupby(["target", "isa_level"], sort=True):
        best = {}
        for model, runs in group.groupby("model"):
            latest = runs[runs["run_id"] == runs.loc[runs["timestamp"].idxmax(), "run_id"]]
            fastest = latest.loc[latest["latency_p50_ms"].idxmin()]
            best[model] = (fastest["latency_p50_ms"], fastest["latency_p90_ms"])
        series[group["device"].iloc[-1]] = best
    groups = sorted({model for values in series.values() for model in values})
    colours = {device: f"C{slot}" for slot, device in enumerate(series)}
    return grouped_bars(groups, series, colours, "fastest runtime p50 (ms), bar to p90")


def _firmware_tables(records: pd.DataFrame) -> dict | None:
    """Microcontroller firmware side by side: per model, each core's latest valid flash, RAM, arena
    and instructions; and each int8 model against the fp32 network it quantizes (same base model,
    MACs and input) on the same core, as int8 ÷ fp32."""
    firmware = records[records["valid"] & records["instructions"].notna()]
    if firmware.empty:
        return None
    latest: dict[tuple[str, str], dict] = {}
    for r in firmware.sort_values("timestamp", kind="stable").to_dict("records"):
        latest[(r["target"], r["model"])] = r
    cores = {target: r["device"] for (target, _), r in sorted(latest.items())}
    models = sorted({r["model"]: r for r in latest.values()}.values(),
                    key=lambda r: (str(r["base_model"]), r["precision"] != "fp32", r["macs"], r["model"]))

    def cell(r: dict | None) -> dict:
        if r is None:
            return {"flash": "—", "ram": "—", "arena": "—", "instructions": "—", "cycles": "—", "macs_per_cycle": "—"}
        cycles = None if is_missing(r.get("cycles_estimate")) else r["cycles_estimate"]
        return {"flash": _kilobytes(r["flash_bytes"]), "ram": _kilobytes(r["ram_bytes"]),
                "arena": _kilobytes(r["arena_bytes"]), "instructions": f"{r['instructions'] / 1e6:.2f}",
                "cycles": "—" if cycles is None else f"{cycles / 1e6:.2f}",
                "macs_per_cycle": "—" if cycles is None else f"{r['macs'] / cycles:.2f}"}

    rows = [{"model": m["model"], "precision": m["precision"], "input": "x".join(map(str, m["input_shape"][-2:])),
             "cores": [cell(latest.get((target, m["model"]))) for target in cores]} for m in models]
    gains = []
    for target in cores:
        for r in latest.values():
            if r["target"] != target or r["precision"] != "int8":
                continue
            for f in latest.values():
                if (f["target"] == target and f["precision"] == "fp32" and f["base_model"] == r["base_model"]
                        and f["macs"] == r["macs"] and list(f["input_shape"]) == list(r["input_shape"])):
                    gains.append({"core": cores[target], "int8": r["model"], "fp32": f["model"], **{
                        key: ratio_cell(r.get(key), f.get(key)) for key in (
                            "flash_bytes", "ram_bytes", "arena_bytes", "instructions", "cycles_estimate")}})
    tables = {cores[r["target"]]: r["cycle_table"] for r in latest.values() if isinstance(r.get("cycle_table"), dict)}
    classes = sorted({kind for table in tables.values() for kind in table})
    return {"cores": list(cores.values()), "rows": rows, "gains": gains,
            "cycle_tables": {"classes": classes, "cores": [{"core": core, "cycles": [table.get(k, "—") for k in classes]}
                                                           for core, table in tables.items()]} if tables else None}


def _robustness(probes: pd.DataFrame) -> list[dict]:
    """Per base model: the latest probe of each (model, attack, ε, steps) as a table, and per attack a chart
    of perturbed-vs-clean output PSNR against ε, one line per variant."""
    latest: dict[tuple, dict] = {}
    for r in probes.to_dict("records"):  # in time order: a later probe replaces an earlier one
        latest[(r["model"], r["attack"], r["epsilon"], r["attack_steps"])] = r
    by_base: dict[str, list[dict]] = {}
    for r in latest.values():
        by_base.setdefault(r["model"] if is_missing(r["base_model"]) else r["base_model"], []).append(r)
    sections = []
    for base_model, rows in sorted(by_base.items()):
        rows.sort(key=lambda r: (_variant_rank(r, base_model), r["attack"], r["attack_steps"], r["epsilon"]))
        charts = []
        for attack in sorted({r["attack"] for r in rows}):
            series: dict[str, list[tuple[float, float]]] = {}
            for r in rows:
                if r["attack"] == attack and not is_missing(r["adversarial_psnr_db"]):
                    label = f"{r['variant']}" + ("" if r["attack"] == "fgsm" else f" ({int(r['attack_steps'])} steps)")
                    series.setdefault(label, []).append((r["epsilon"], r["adversarial_psnr_db"]))
            charts.append(robustness_chart(f"{base_model}: {attack.upper()}", series))
        sections.append({"base_model": base_model, "rows": [_robustness_row(r) for r in rows],
                         "charts": [chart for chart in charts if chart]})
    return sections


def _robustness_row(record: dict) -> dict:
    verdict, delta = robustness_verdict(record)

    def db(value) -> str:
        return "∞" if is_missing(value) else f"{value:.2f}"

    return {
        "model": record["model"],
        "variant": record["variant"],
        "precision": record["precision"],
        "attack": record["attack"].upper(),
        "steps": int(record["attack_steps"]),
        "epsilon": f"{record['epsilon']:g}/255",
        "input": "x".join(map(str, record["input_shape"][-2:])),
        "images": "—" if is_missing(record["attack_images"]) else int(record["attack_images"]),
        "torch": db(record["adversarial_psnr_db"]),
        "tvm": db(record["tvm_adversarial_psnr_db"]),
        "teacher": db(record["teacher_adversarial_psnr_db"]),
        "delta": "—" if delta is None else f"{delta:+.2f}",
        "verdict": verdict,
        "check": f"{record['max_abs_err']:.1e}" + _psnr_suffix(record),
        "err_high": _over_tolerance(record),
    }


def _pareto_charts(records: pd.DataFrame) -> list[dict]:
    """Per base model on one device: latency-PSNR and size-PSNR fronts (see `quality_points`)."""
    charts = []
    for base_model, (latency, size) in sorted(quality_points(records).items()):
        charts.append({
            "base_model": base_model,
            "latency": pareto_chart(latency, base_model, "latency p50 (ms, log scale)"),
            "size": pareto_chart(size, base_model, "ONNX size (MB, log scale)") if len(size) >= 2 else None,
        })
    return charts


def quality_points(records: pd.DataFrame) -> dict[str, tuple[list[QualityPoint], list[QualityPoint]]]:
    """Per base model with two or more rated points: (latency points, size points).

    Every (variant, runtime) pair is a latency point from its latest valid record, peers included. Its
    quality is the variant's PSNR to the fp32 teacher (the card; the base is the reference, infinite)
    combined with the runtime's own output error against the reference (bf16 and int8 runtimes add
    theirs). Size belongs to the model, so each variant is one size point.
    """
    latest: dict[tuple[str, str], dict] = {}
    for r in records.to_dict("records"):
        if r["valid"] and not is_missing(r["base_model"]) and r["latency_p50_ms"] > 0:
            known = latest.get((r["model"], r["runtime"]))
            if known is None or known["timestamp"] <= r["timestamp"]:
                latest[(r["model"], r["runtime"])] = r
    by_base: dict[str, list[dict]] = {}
    for r in latest.values():
        by_base.setdefault(r["base_model"], []).append(r)
    points = {}
    for base_model, candidates in by_base.items():
        def card_psnr(r: dict) -> float | None:
            return float("inf") if r["model"] == base_model else (None if is_missing(r["psnr_db"]) else r["psnr_db"])

        rated = [r for r in candidates if card_psnr(r) is not None]
        if len(rated) < 2:
            continue
        latency = [QualityPoint(f"{r['variant']} ({r['runtime']})", r["latency_p50_ms"],
                                combined_psnr(card_psnr(r), r.get("output_psnr_db"))) for r in rated]
        per_model = {r["model"]: r for r in rated}
        size = [QualityPoint(r["variant"], r["onnx_bytes"] / 1e6, card_psnr(r)) for r in per_model.values()
                if not is_missing(r["onnx_bytes"])]
        points[base_model] = (latency, size)
    return points


def combined_psnr(model_db: float, runtime_db: float | None) -> float:
    """PSNR of a model's output as a runtime computes it: the model's and the runtime's errors added in MSE.
    A runtime at EXACT_DB or above adds nothing (fp32 reordering)."""
    runtime_db = None if is_missing(runtime_db) or runtime_db >= EXACT_DB else runtime_db
    mse = sum(10 ** (-db / 10) for db in (model_db, runtime_db) if db is not None and db != float("inf"))
    return float("inf") if mse == 0 else -10 * math.log10(mse)


ROOFLINE_KERNELS = 8  # the slowest kernels shown per model


# a fraction not of the FMA peak says whose
PEAK_SUFFIX = {"bf16": " of bf16", "integer": " of int8", "amx-bf16": " of AMX bf16", "amx-int8": " of AMX int8"}


def _roofline_tables(records: pd.DataFrame) -> list[dict]:
    """Per model and TVM build (fp32, bf16), the latest kernel profile: where the time goes and how close
    each kernel runs to the peak of what it multiplies on (FMA, vdpbf16ps for bf16 products, vpdpbusd for
    int8 convs on VNNI, tdpbf16ps and tdpbusd for kernels on AMX tiles)."""
    latest = {}
    for r in records[records["runtime"].map(is_compiler)].to_dict("records"):
        if isinstance(r.get("kernel_profile"), list) and r["kernel_profile"]:
            latest[(r["model"], r["runtime"])] = r
    tables = []
    for (model, runtime), r in sorted(latest.items()):
        kernels = r["kernel_profile"]
        total_ms = sum(k["ms"] for k in kernels)
        peaks = {field: None if is_missing(r.get(field)) else f"{r[field]:.1f}" for field in
                 ("bf16_peak_gflops", "amx_bf16_peak_gflops", "int8_peak_gops", "amx_int8_peak_gops")}
        tables.append({
            "model": model,
            "runtime": runtime,
            "peak": f"{r['fma_peak_gflops']:.1f}",
            "bf16_peak": peaks["bf16_peak_gflops"],
            "amx_bf16_peak": peaks["amx_bf16_peak_gflops"],
            "int8_peak": peaks["int8_peak_gops"],
            "amx_int8_peak": peaks["amx_int8_peak_gops"],
            "total_ms": format_ms(total_ms),
            "rows": [{
                "kernel": k["kernel"],
                "calls": f"{k['calls']:g}",
                "ms": format_ms(k["ms"]),
                "share": f"{100 * k['ms'] / total_ms:.0f}%" if total_ms else "—",
                "gflop": f"{k['gflop']:.3f}",
                "gflops": f"{k['gflops']:.1f}",
                "peak_fraction": "—" if is_missing(k.get("peak_fraction")) or not k["gflop"]
                else f"{100 * k['peak_fraction']:.0f}%" + PEAK_SUFFIX.get(k.get("peak"), ""),
            } for k in kernels[:ROOFLINE_KERNELS]],
        })
    return tables


def _tuning_chart(records: pd.DataFrame, device: str) -> str | None:
    """The latest tuning curve of each model's applied database on this device."""
    curves = {}
    for r in records[records["runtime"] == COMPILER].to_dict("records"):
        curve = r.get("tuning_curve")
        if isinstance(curve, list) and curve:
            within = r.get("trials_to_10pct")
            curves[r["model"]] = (curve, None if is_missing(within) else int(within))
    return tuning_curves_chart(curves, f"tuning curves on {device}")


def _row(record: dict, latest: dict) -> dict:
    """One table row, every value already formatted; the template only lays them out."""
    err = record["max_abs_err"]
    untimed = not is_missing(record.get("instructions"))  # firmware under qemu: instructions, no latency
    return {
        "model": record["model"],
        "inputs": _inputs(record),
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
        "p50": "—" if untimed else format_ms(record["latency_p50_ms"]),
        "p90": "—" if untimed else format_ms(record["latency_p90_ms"]),
        "p99": "—" if untimed else format_ms(record["latency_p99_ms"]),
        "mean": "—" if untimed else format_ms(record["latency_mean_ms"]),
        "cov": "—" if untimed else f"{record['latency_cov']:.3f}",
        "noisy": record["latency_cov"] > NOISY_COV,
        "err": "—" if is_missing(err) else f"{err:.1e}" + _psnr_suffix(record),
        "tol": _tolerance(record),
        "err_high": _over_tolerance(record),
        "vs_best_peer": _vs_best_peer(record, latest),
        "ran": _executed_precision(record),
        "energy": _energy(record),
        "estimated": bool(record.get("power_estimated")) and not is_missing(record.get("energy_mj")),
        "active_w": "—" if is_missing(record.get("active_w")) else f"{record['active_w']:.2f}",
        "rss": _megabytes(record.get("peak_rss_bytes")),
        "psnr": "—" if is_missing(record.get("psnr_db")) else f"{record['psnr_db']:.2f}",
        "ssim": "—" if is_missing(record.get("ssim")) else f"{record['ssim']:.3f}",
        "flash_kb": _kilobytes(record.get("flash_bytes")),
        "ram_kb": _kilobytes(record.get("ram_bytes")),
        "arena_kb": _kilobytes(record.get("arena_bytes")),
        "instructions": "—" if is_missing(record.get("instructions")) else f"{int(record['instructions']):,}",
        "valid": record["valid"],
        "reason": record["invalid_reason"],
    }


def _inputs(record: dict) -> str:
    """An ONNX file's inputs as the run fed them: name, shape and fill; "—" for a registry generator's one image."""
    inputs = record.get("inputs")
    if not isinstance(inputs, list):
        return "—"
    return "; ".join(f"{i['name']} {'x'.join(map(str, i['shape']))} {i['fill']}" for i in inputs)


def _executed_precision(record: dict) -> str:
    """The precision the runtime executed; older records did not say, and ran the model's."""
    ran = record.get("executed_precision")
    return record["precision"] if is_missing(ran) else ran


def _energy(record: dict) -> str:
    """mJ per inference ± spread; "no sensor" where the target has none, never a zero."""
    source = record.get("power_source")
    if is_missing(source):
        return "—"
    if source == "none":
        return "no sensor"
    if not is_missing(record.get("power_error")) or is_missing(record.get("energy_mj")):
        return "sensor failed"
    spread = record.get("energy_mj_std")
    return f"{record['energy_mj']:.3g}" + ("" if is_missing(spread) else f" ± {spread:.2g}")


def _kilobytes(size: int | None) -> str:
    return "—" if is_missing(size) else f"{size / 1024:.1f}"


def _megabytes(size: int | None) -> str:
    return "—" if is_missing(size) else f"{size / 1e6:.2f}"


def _tuned(record: dict) -> str:
    """Tuning applies to TVM only; an empty database builds the same code as none."""
    if not is_compiler(record["runtime"]):
        return "—"
    trials = record["tuned_trials"]
    if is_missing(trials) or trials == 0:
        return "untuned"
    tasks = record.get("tuned_tasks")
    return f"{int(trials)} trials" + ("" if is_missing(tasks) else f", {tasks} tasks")


def _psnr_suffix(record: dict) -> str:
    """int8 rows are judged by output PSNR against the reference; show it beside the max error."""
    psnr = record.get("output_psnr_db")
    return "" if is_missing(record.get("min_output_psnr_db")) or is_missing(psnr) else f" ({psnr:.1f} dB)"


def _tolerance(record: dict) -> str:
    if not is_missing(record["tolerance"]):
        return f"{record['tolerance']:.0e}"
    floor = record.get("min_output_psnr_db")
    return "—" if is_missing(floor) else f"PSNR ≥ {floor:.0f} dB"


def _over_tolerance(record: dict) -> bool:
    return outside_tolerance(record)


def is_compiler(runtime: str) -> bool:
    """TVM's own rows: its default build ("tvm") and its builds at another precision ("tvm-bf16")."""
    return runtime == COMPILER or runtime.startswith(f"{COMPILER}-")


def best_peer(record: dict, candidates) -> dict | None:
    """The fastest valid peer record of the same model and variant at the same or better output quality.

    Quality is the output's PSNR against the reference, capped at EXACT_DB (fp32 runtimes differ only
    by reordering there), with SAME_QUALITY_DB of slack: a bf16 peer is no match for an fp32 TVM row,
    an fp32 peer is for a bf16 one, and int8 runtimes of one QDQ model match each other.
    """
    def quality(r: dict) -> float:
        psnr = r.get("output_psnr_db")
        return EXACT_DB if is_missing(psnr) else min(psnr, EXACT_DB)

    peers = [r for r in candidates if not is_compiler(r["runtime"]) and r["valid"] and r["latency_p50_ms"] > 0
             and r["model"] == record["model"] and r["variant"] == record["variant"]
             and quality(r) >= quality(record) - SAME_QUALITY_DB]
    return min(peers, key=lambda r: r["latency_p50_ms"], default=None)


def _vs_best_peer(record: dict, latest: dict) -> str:
    """A valid TVM row's p50 ÷ its best peer's in the same run, naming the peer; "—" without one.
    Other rows get an empty cell: the ratio is TVM's."""
    if not is_compiler(record["runtime"]) or not record["valid"]:
        return ""
    peer = best_peer(record, latest.values())
    return "—" if peer is None else f"{ratio_cell(record['latency_p50_ms'], peer['latency_p50_ms'])} {peer['runtime']}"


def _device_compression(records: pd.DataFrame) -> list[dict]:
    """Each compressed variant timed on TVM in the same run as its fp32 base, on one device: TVM p50, that
    ÷ the base's TVM p50 and ÷ its best peer's on the variant's own artifact (for int8 the same QDQ file), and
    the card's PSNR against the fp32 teacher. Ratios never cross runs: timings here are noisy, so only
    records measured side by side are divided, and the base's p50 is the one timed in the variant's own
    interleaved rounds where the record carries it. Variants without their base in the run are left out."""
    rows = []
    for run_id, run in records.groupby("run_id", sort=False):
        timed = {(r["model"], r["runtime"]): r for r in run.to_dict("records")
                 if r["valid"] and r["latency_p50_ms"] > 0}
        variants = [r for (model, runtime), r in timed.items()
                    if runtime == COMPILER and not is_missing(r["base_model"]) and model != r["base_model"]
                    and (r["base_model"], COMPILER) in timed]
        for r in sorted(variants, key=lambda r: (r["base_model"], _variant_rank(r, r["base_model"]))):
            peer = best_peer(r, timed.values())
            rows.append({
                "run_id": run_id,
                "base_model": r["base_model"],
                "model": r["model"],
                "variant": r["variant"],
                "precision": r["precision"],
                "p50": format_ms(r["latency_p50_ms"]),
                "vs_base": ratio_cell(r["latency_p50_ms"], _base_p50(r, timed[(r["base_model"], COMPILER)])),
                "vs_peer": "—" if peer is None else
                f"{ratio_cell(r['latency_p50_ms'], peer['latency_p50_ms'])} {peer['runtime']}",
                "psnr": "—" if is_missing(r["psnr_db"]) else f"{r['psnr_db']:.2f}",
            })
    return rows


def _base_p50(variant: dict, base: dict) -> float:
    """The base's TVM p50 timed in the variant's own rounds where the record has it (older records: the
    base's record in the same run)."""
    same_rounds = variant.get("base_latency_p50_ms")
    return base["latency_p50_ms"] if is_missing(same_rounds) else same_rounds


def _warnings(record: dict) -> list[dict]:
    where = f"{record['run_id']} · {record['device']} · {record['model']} {record['variant']} on {record['runtime']}"
    warnings = []
    if not record["valid"]:
        warnings.append({"kind": "invalid", "where": where, "detail": record["invalid_reason"]})
    if record["latency_cov"] > NOISY_COV:
        warnings.append({"kind": "noisy", "where": where, "detail": f"CoV {record['latency_cov']:.3f} > {NOISY_COV}"})
    if _over_tolerance(record):
        detail = (f"max abs error {record['max_abs_err']:.1e} > tolerance {record['tolerance']:.0e}"
                  if not is_missing(record["tolerance"]) else
                  f"output PSNR {record['output_psnr_db']:.1f} dB < {record['min_output_psnr_db']:.0f} dB")
        warnings.append({"kind": "error above tolerance", "where": where, "detail": detail})
    if not is_missing(record.get("power_error")):
        warnings.append({"kind": "power sensor failed", "where": where, "detail": record["power_error"]})
    if record.get("power_estimated") and not is_missing(record.get("energy_mj")):
        warnings.append({"kind": "estimated power", "where": where,
                         "detail": f"energy from stated constants ({record['power_source']}), not measured"})
    return warnings


def _compression(records: pd.DataFrame, results_dir: Path) -> list[dict]:
    """One table and size-vs-PSNR chart per base model: what each compression method saves and what it costs.

    Size and quality belong to the model, not to the runtime that timed it, so each model contributes
    its most recent record; records without a base model (old records, a user's ONNX file) are left out.
    """
    latest = {}
    for record in records.to_dict("records"):  # in time order: a later record replaces an earlier one
        if not is_missing(record["base_model"]):
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
        names = sorted({m["seed_metric_name"] for m in models if not is_missing(m["seed_metric_name"])})
        tables.append(
            {
                "base_model": base_model,
                "anchor": re.sub(r"[^A-Za-z0-9_.+-]", "-", base_model),
                "has_base": base is not None,
                "seed_metric": " / ".join(SEED_METRIC_LABELS.get(name, name) for name in names) or "seed metric",
                "rows": [_compression_row(m, base, results_dir) for m in models],
                "chart": size_quality_chart(
                    base_model,
                    [(m["onnx_bytes"] / 1e6, m["psnr_db"], m["variant"]) for m in models
                     if not (is_missing(m["onnx_bytes"]) or is_missing(m["psnr_db"]))],
                    None if base is None or is_missing(base["onnx_bytes"]) else base["onnx_bytes"] / 1e6,
                ),
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
    sample_path = None if is_missing(sample) else results_dir / sample
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
        "psnr": "—" if is_missing(psnr) else f"{psnr:.2f}",
        "ssim": "—" if is_missing(ssim) else f"{ssim:.3f}",
        "seed_metric": "—" if is_missing(metric) else f"{metric:.4g}",
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


