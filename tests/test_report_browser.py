"""The report as a person sees it: headless Chromium opens it from disk with no network.

Checks that the page loads without console messages (it has no scripts, so any is an error), that the rendered tables
(the DOM after Chromium parsed it) show every record's p50 as the report formats it and the compression table its
ratios, and saves a screenshot.
"""

from __future__ import annotations

import shutil
import subprocess
from pathlib import Path

from bench.record import append_records, load_records
from reports import render_report
from reports.html import format_ms
from tests.test_report import BASE_ONNX_BYTES, COMPRESSION_RECORDS, RECORDS

CHROMIUM_FLAGS = [
    "--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
    "--disable-background-networking", "--disable-component-update", "--disable-sync",
]


def chromium(tmp_path: Path, *args: str) -> subprocess.CompletedProcess:
    binary = shutil.which("chromium") or shutil.which("chromium-browser")
    assert binary, "chromium is not installed; install.sh installs Debian's chromium"
    return subprocess.run(
        [binary, *CHROMIUM_FLAGS, f"--user-data-dir={tmp_path / 'profile'}", *args],
        capture_output=True, text=True, timeout=120,
    )


def test_report_in_headless_chromium(tmp_path):
    append_records(RECORDS + COMPRESSION_RECORDS, tmp_path / "results" / "run.jsonl")
    records = load_records(tmp_path / "results")
    page = render_report(records, tmp_path / "index.html")
    [device_page] = (tmp_path / "index-devices").glob("*.html")

    def dom_of(path: Path) -> str:
        dom = chromium(tmp_path, "--enable-logging=stderr", "--v=0", "--dump-dom", path.as_uri())
        assert dom.returncode == 0, dom.stderr[-2000:]
        console = [line for line in dom.stderr.splitlines() if ":CONSOLE" in line]  # the pages have no scripts
        assert not console, console
        return dom.stdout.replace(" ", "")

    index, device = dom_of(page), dom_of(device_page)
    assert f'href="index-devices/{device_page.name}"' in index
    for value in records.latency_p50_ms:
        assert f">{format_ms(value)}<" in device
    for cells in (index, device):
        assert "Compression:sizeandqualitypervariant" in cells
        assert f">{BASE_ONNX_BYTES / 600_000:.2f}×<" in cells  # the int8 variant's "× smaller"

    screenshot = tmp_path / "report.png"
    shot = chromium(tmp_path, "--window-size=1400,1600", f"--screenshot={screenshot}", device_page.as_uri())
    assert shot.returncode == 0, shot.stderr[-2000:]
    assert screenshot.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n" and screenshot.stat().st_size > 10_000
