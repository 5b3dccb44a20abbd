"""The HTML report: a pure function of the benchmark records."""

from reports.compare import render_comparison
from reports.html import render_report

__all__ = ["render_comparison", "render_report"]
