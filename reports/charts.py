"""The report's plots: matplotlib figures rendered to base64 PNG, so every page opens from disk alone.

Each function takes plain values (already chosen from the records by reports/html.py) and returns
the PNG as base64 text, or None when there is nothing to draw.
"""

from __future__ import annotations

import base64
import io
from dataclasses import dataclass

from matplotlib.figure import Figure  # no pyplot: leaves the process-wide backend alone
from matplotlib.ticker import FuncFormatter, LogLocator, NullFormatter

LOG_SCALE_SPAN = 20  # a chart switches to a log axis when its values span more than this factor
REFERENCE_HEADROOM_DB = 4.0  # the fp32 reference (infinite PSNR to itself) is drawn this far above the best variant


@dataclass(frozen=True)
class QualityPoint:
    """One model variant on a Pareto chart: lower cost (latency, size) and higher PSNR are better."""

    label: str
    cost: float
    psnr_db: float  # float("inf") for the fp32 reference itself


def pareto_front(points: list[QualityPoint]) -> list[QualityPoint]:
    """The points no other point beats on both cost and quality, cheapest first."""
    front: list[QualityPoint] = []
    for point in sorted(points, key=lambda p: (p.cost, -p.psnr_db)):
        if not front or point.psnr_db > front[-1].psnr_db:
            front.append(point)
    return front


LABEL_ALL_UP_TO = 8


def pareto_chart(points: list[QualityPoint], title: str, cost_label: str) -> str | None:
    """Cost (log x) against PSNR to the fp32 teacher, the Pareto front drawn and highlighted."""
    if not points:
        return None
    finite = [p.psnr_db for p in points if p.psnr_db != float("inf")]
    reference_y = (max(finite) if finite else 30.0) + REFERENCE_HEADROOM_DB

    def y(point: QualityPoint) -> float:
        return reference_y if point.psnr_db == float("inf") else point.psnr_db

    front = pareto_front(points)
    fig = Figure(figsize=(5.0, 3.4), dpi=100)
    ax = fig.subplots()
    others = [p for p in points if p not in front]
    ax.scatter([p.cost for p in others], [y(p) for p in others], color="0.6", zorder=3, label="dominated")
    ax.plot([p.cost for p in front], [y(p) for p in front], color="C3", marker="o", zorder=4, label="Pareto front")
    # With every runtime's points on the chart, labels of dominated points would cover each other:
    # past LABEL_ALL_UP_TO points only the front is named (the table names the rest).
    for point in points if len(points) <= LABEL_ALL_UP_TO else front:
        ax.annotate(point.label, (point.cost, y(point)), textcoords="offset points", xytext=(5, 4), fontsize=8)
    if any(p.psnr_db == float("inf") for p in points):
        ax.axhline(reference_y, color="0.5", linestyle=":", linewidth=1)
        ax.text(0.01, reference_y, " fp32 = reference (PSNR ∞)", transform=ax.get_yaxis_transform(),
                va="bottom", fontsize=8, color="0.4")
    _log_x(ax)
    ax.margins(x=0.25, y=0.2)
    ax.set_title(title, fontsize=10)
    ax.set_xlabel(cost_label)
    ax.set_ylabel("PSNR to fp32 teacher (dB)")
    ax.grid(alpha=0.3)
    ax.legend(frameon=False, loc="lower right", fontsize=8)
    return png_base64(fig)


def size_quality_chart(title: str, points: list[tuple[float, float, str]], base_mb: float | None) -> str | None:
    """ONNX size (log x) against PSNR to the fp32 teacher, one labelled point per variant."""
    if not points:
        return None
    fig = Figure(figsize=(5.0, 3.4), dpi=100)
    ax = fig.subplots()
    ax.scatter([size for size, _, _ in points], [psnr for _, psnr, _ in points], color="C0", zorder=3)
    for size, psnr, variant in points:
        ax.annotate(variant, (size, psnr), textcoords="offset points", xytext=(5, 4), fontsize=9)
    if base_mb is not None:
        ax.axvline(base_mb, color="0.5", linestyle="--", linewidth=1, label=f"fp32 base, {base_mb:.2f} MB")
        ax.legend(frameon=False, loc="lower right", fontsize=9)
    _log_x(ax)
    ax.margins(x=0.25, y=0.2)
    ax.set_title(title, fontsize=10)
    ax.set_xlabel("ONNX size (MB, log scale)")
    ax.set_ylabel("PSNR to fp32 teacher (dB)")
    ax.grid(alpha=0.3)
    return png_base64(fig)


def grouped_bars(groups: list[str], series: dict[str, dict[str, tuple[float, float]]], colours: dict[str, str],
                 y_label: str) -> str | None:
    """Bars per group, one per series (runtime or device): (p50, p90) each, error bar up to p90."""
    if not series:
        return None
    width = 0.8 / len(series)
    fig = Figure(figsize=(max(5.0, 1.0 + 0.5 * len(groups) * len(series)), 3.4), dpi=100)
    ax = fig.subplots()
    for slot, (name, values) in enumerate(series.items()):
        offset = (slot - (len(series) - 1) / 2) * width
        bars = [(x + offset, values[g]) for x, g in enumerate(groups) if g in values]
        ax.bar([x for x, _ in bars], [p50 for _, (p50, _) in bars], width,
               yerr=[[0] * len(bars), [p90 - p50 for _, (p50, p90) in bars]], capsize=3, label=name,
               color=colours[name])
    p50s = [p50 for values in series.values() for p50, _ in values.values()]
    if min(p50s) > 0 and max(p50s) > LOG_SCALE_SPAN * min(p50s):
        ax.set_yscale("log")
    ax.set_xticks(range(len(groups)), groups)
    if len(groups) > 4:  # long model names would overlap
        ax.tick_params(axis="x", labelrotation=35)
        for label in ax.get_xticklabels():
            label.set_horizontalalignment("right")
    ax.set_ylabel(y_label)
    ax.grid(axis="y", alpha=0.3)
    ax.legend(frameon=False, loc="upper left", bbox_to_anchor=(1, 1))
    return png_base64(fig)


def tuning_curves_chart(curves: dict[str, tuple[list[list[float]], int | None]], title: str) -> str | None:
    """Best estimated latency against trials per model, each with a marker where it came within 10% of its end."""
    if not curves:
        return None
    fig = Figure(figsize=(6.0, 3.6), dpi=100)
    ax = fig.subplots()
    for slot, (model, (curve, within_10pct)) in enumerate(sorted(curves.items())):
        trials, latency = zip(*curve)
        ax.step(trials, latency, where="post", color=f"C{slot}", label=model)
        if within_10pct is not None:
            ax.plot([within_10pct], [latency[trials.index(within_10pct)]], marker="v", color=f"C{slot}")
    all_latency = [ms for curve, _ in curves.values() for _, ms in curve]
    if max(all_latency) > LOG_SCALE_SPAN * min(all_latency):
        ax.set_yscale("log")
    return _labelled(fig, ax, title, "MetaSchedule trials (▼ within 10% of the final latency)",
                     "best model latency estimate (ms)")


def robustness_chart(title: str, series: dict[str, list[tuple[float, float]]]) -> str | None:
    """Output PSNR (perturbed vs clean) against the attack budget ε, one line per variant: lower is more fragile."""
    if not series:
        return None
    fig = Figure(figsize=(5.0, 3.4), dpi=100)
    ax = fig.subplots()
    for slot, (label, points) in enumerate(series.items()):
        points = sorted(points)
        ax.plot([eps for eps, _ in points], [psnr for _, psnr in points], marker="o", color=f"C{slot}", label=label)
    ax.set_xscale("log", base=2)
    epsilons = sorted({eps for points in series.values() for eps, _ in points})
    ax.set_xticks(epsilons, [f"{eps:g}" for eps in epsilons])
    ax.xaxis.set_minor_formatter(NullFormatter())
    return _labelled(fig, ax, title, "ε (8-bit levels, /255)", "PSNR perturbed vs clean output (dB)")


def _labelled(fig: Figure, ax, title: str, x_label: str, y_label: str) -> str:
    """A line chart's title, axis labels, grid and legend (outside the axes, right), embedded."""
    ax.set_title(title, fontsize=10)
    ax.set_xlabel(x_label)
    ax.set_ylabel(y_label)
    ax.grid(alpha=0.3)
    ax.legend(frameon=False, loc="upper left", bbox_to_anchor=(1, 1), fontsize=8)
    return png_base64(fig)


def _log_x(ax) -> None:
    ax.set_xscale("log")
    ax.xaxis.set_major_locator(LogLocator(subs=(1.0, 2.0, 5.0)))  # values rarely span many decades
    ax.xaxis.set_major_formatter(FuncFormatter(lambda value, _: f"{value:g}"))  # "0.5", not "5×10⁻¹"
    ax.xaxis.set_minor_formatter(NullFormatter())


def png_base64(fig: Figure) -> str:
    """Charts are embedded in the page, so it opens from disk with no other files."""
    buffer = io.BytesIO()
    fig.savefig(buffer, format="png", bbox_inches="tight")
    return base64.b64encode(buffer.getvalue()).decode("ascii")
