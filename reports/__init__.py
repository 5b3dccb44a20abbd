"""The HTML report: a pure function of the benchmark records."""

from reports.html import render_report

__all__ = ["render_report"]
