"""The HTML report shows exactly what the records say, and opens from disk with no network."""

from __future__ import annotations

import base64
import re
from html.parser import HTMLParser
from pathlib import Path

import pytest

from bench.record import Record, append_records, load_records
from errors import UserError
from reports import render_report
from reports.html import format_ms, format_ratio

DEVICE = "x86-64 host (this machine)"
ENV = {"cpu": "Test CPU", "cores": 2, "python": "3.11.7", "torch": "2.13.0", "tvm": "0.27.0", "git": "abc1234"}
INVALID_REASON = "only 3 samples in 0.2 s; rules ask for 30 samples and 1.0 s"


def record(model: str, runtime: str, p50: float, **overrides) -> Record:
    fields = dict(
        run_id="run-1",
        model=model,
        family="cyclegan",
        variant="fp32",
        weights="checkpoints/horse2zebra.pth@sha256:" + "ab" * 32,
        input_shape=[1, 3, 256, 256],
        params=1_234_567,
        macs=3_210_000_000,
        size_fp32_bytes=4_938_268,
        target="host",
        device=DEVICE,
        isa_level="avx2",
        runtime=runtime,
        threads=2,
        artifact_bytes=5_100_000,
        tuned_trials=640 if runtime == "tvm" else None,
        samples=30,
        latency_mean_ms=p50 * 1.01,
        latency_cov=0.02,
        latency_p50_ms=p50,
        latency_p90_ms=p50 * 1.1,
        latency_p99_ms=p50 * 1.2,
        max_abs_err=None if runtime == "torch" else 2e-5,
        tolerance=None if runtime == "torch" else 1e-4,
        env=ENV,
        timestamp="2025-11-25T06:00:00+00:00",
    )
    return Record(**(fields | overrides))


RECORDS = [
    record("cyclegan-mobile", "tvm", 12.3456),
    record("cyclegan-mobile", "onnxruntime", 17.5),
    record("cyclegan-mobile", "torch", 41.02),
    record("nst-tiny", "tvm", 0.8123, family="nst", weights="random", max_abs_err=3e-3),
    record("nst-tiny", "onnxruntime", 0.95, family="nst", weights="random", valid=False, invalid_reason=INVALID_REASON),
    record("nst-tiny", "torch", 2.5, family="nst", weights="random", latency_cov=0.25),
]


class ReportParser(HTMLParser):
    """Collects table rows (cell texts), list items and every src/href of the page."""

    def __init__(self):
        super().__init__()
        self.tables: dict[str, list[list[str]]] = {}
        self.items: list[str] = []
        self.links: list[str] = []
        self._table: list[list[str]] | None = None
        self._text: list[str] | None = None

    def handle_starttag(self, tag, attrs):
        attrs = dict(attrs)
        self.links += [attrs[name] for name in ("src", "href") if name in attrs]
        if tag == "table":
            self._table = self.tables.setdefault(attrs.get("class", ""), [])
        elif tag == "tr" and self._table is not None:
            self._table.append([])
        elif tag in ("td", "th", "li"):
            self._text = []

    def handle_data(self, data):
        if self._text is not None:
            self._text.append(data)

    def handle_endtag(self, tag):
        if tag in ("td", "th", "li") and self._text is not None:
            text = " ".join("".join(self._text).split())
            if tag == "li":
                self.items.append(text)
            else:
                self._table[-1].append(text)
            self._text = None
        elif tag == "table":
            self._table = None


@pytest.fixture(scope="module")
def report(tmp_path_factory) -> tuple[Path, ReportParser]:
    results = tmp_path_factory.mktemp("results")
    append_records(RECORDS, results / "run-1.jsonl")
    path = render_report(load_records(results), results.parent / "report.html", source=results)
    parser = ReportParser()
    parser.feed(path.read_text(encoding="utf-8"))
    return path, parser


def record_rows(parser: ReportParser) -> dict[tuple[str, str], dict[str, str]]:
    """Rows of the record tables keyed by (model, runtime), each as header -> cell text."""
    header, *rows = parser.tables["records"]
    cells = [dict(zip(header, row)) for row in rows]
    return {(c["model"], c["runtime"]): c for c in cells}


def test_report_is_self_contained(report):
    path, parser = report
    assert path.exists()
    assert not [link for link in parser.links if re.match(r"https?://", link)]
    images = [link for link in parser.links if link.startswith("data:image/png;base64,")]
    assert images
    assert base64.b64decode(images[0].split(",", 1)[1]).startswith(b"\x89PNG\r\n\x1a\n")


def test_table_shows_every_record_p50(report):
    rows = record_rows(report[1])
    assert len(rows) == len(RECORDS)
    for r in RECORDS:
        assert rows[(r.model, r.runtime)]["p50 ms"] == format_ms(r.latency_p50_ms)


def test_tvm_speedup_against_baselines(report):
    cell = record_rows(report[1])[("cyclegan-mobile", "tvm")]["speed-up"]
    assert f"{format_ratio(12.3456 / 17.5)} ORT" in cell
    assert f"{format_ratio(12.3456 / 41.02)} torch" in cell
    # The only ORT record of nst-tiny is invalid, so there is no ORT ratio to show.
    assert "ORT" not in record_rows(report[1])[("nst-tiny", "tvm")]["speed-up"]


def test_invalid_record_is_kept_with_reason(report):
    status = record_rows(report[1])[("nst-tiny", "onnxruntime")]["status"]
    assert status == f"invalid {INVALID_REASON}"
    assert any("invalid" in item and INVALID_REASON in item for item in report[1].items)


def test_warnings_for_noise_and_tolerance(report):
    items = report[1].items
    assert any(item.startswith("noisy") and "nst-tiny fp32 on torch" in item for item in items)
    assert any(item.startswith("error above tolerance") and "nst-tiny fp32 on tvm" in item for item in items)


def test_untrained_weights_are_labelled(report):
    rows = record_rows(report[1])
    assert rows[("nst-tiny", "tvm")]["weights"] == "untrained weights"
    assert rows[("cyclegan-mobile", "tvm")]["weights"] == "horse2zebra.pth@sha256:abababababab"


def test_environment_fingerprint_shown(report):
    env_rows = {row[0]: row[1] for row in report[1].tables[""] if len(row) == 2}
    assert env_rows["cpu"] == "Test CPU" and env_rows["git"] == "abc1234"


def test_empty_results_dir_names_it(tmp_path):
    empty = tmp_path / "results"
    empty.mkdir()
    with pytest.raises(UserError, match=re.escape(f"no benchmark records in {empty}")):
        render_report(load_records(empty), tmp_path / "report.html", source=empty)
