"""The HTML report shows exactly what the records say, and opens from disk with no network."""

from __future__ import annotations

import base64
import math
import re
import statistics
from html.parser import HTMLParser
from pathlib import Path

import pytest

from bench.record import Record, append_records, load_records
from errors import UserError
from reports import render_report
from reports.charts import pareto_front
from reports.html import VARIANT_ORDER, format_ms, format_ratio, quality_points

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


BASE = "cyclegan-resnet6-ngf16"
BASE_ONNX_BYTES = 2_400_000
BASE_MACS = 3_210_000_000
NST_BASE = "nst-cin4-w16"  # only a variant of it was benchmarked: its table has no base row
SUPERSEDED = "2025-11-24T06:00:00+00:00"  # an earlier record of a model, replaced by a later one


def variant_record(method: str, runtime: str = "onnxruntime", base: str = BASE, p50: float = 5.0,
                   **overrides) -> Record:
    """A benchmarked model with compression fields; quality defaults to an int8 variant of BASE."""
    fields = dict(
        base_model=base,
        variant=method,
        precision="int8",
        onnx_bytes=600_000,
        psnr_db=31.5,
        ssim=0.9345,
        seed_metric_name="generator_loss",
        seed_metric=3.9,
    )
    return record(base if method == "fp32" else f"{base}+{method}", runtime, p50, **(fields | overrides))


COMPRESSION_RECORDS = [  # deliberately not in table order
    variant_record("kd", precision="fp32", params=120_000, macs=300_000_000, onnx_bytes=1_200_000,
                   psnr_db=27.3456, ssim=0.8123, seed_metric=4.2),
    variant_record("ptq", "tvm"),
    variant_record("ptq", "onnxruntime"),
    variant_record("ptq", onnx_bytes=900_000, psnr_db=20.0, timestamp=SUPERSEDED),
    variant_record("sparsify", precision="fp32", onnx_bytes=2_000_000, psnr_db=35.0),  # a method unknown to the report
    variant_record("fp32", "tvm", precision="fp32", onnx_bytes=BASE_ONNX_BYTES, psnr_db=None, ssim=None,
                   seed_metric=3.572),
    variant_record("fp32", "torch", precision="fp32", onnx_bytes=BASE_ONNX_BYTES, psnr_db=None, ssim=None,
                   seed_metric=3.572),
    variant_record("prune", precision="fp32", macs=1_000_000_000, onnx_bytes=800_000, psnr_db=None, ssim=None,
                   seed_metric=None),
    variant_record("prune+kd+ptq", macs=250_000_000, onnx_bytes=None),
    variant_record("ptq", base=NST_BASE, family="nst", seed_metric_name="tv_loss", seed_metric=12.1),
    record("my-generator", "onnxruntime", 3.0, variant="int8-qdq", precision="int8", onnx_bytes=500_000),  # no base
]


class ReportParser(HTMLParser):
    """Collects table rows (cell texts, keyed by table id, else class), list items and every src/href of the page."""

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
            self._table = self.tables.setdefault(attrs.get("id") or attrs.get("class", ""), [])
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


def device_pages(index: Path) -> list[Path]:
    return sorted(index.with_name(f"{index.stem}-devices").glob("*.html"))


@pytest.fixture(scope="module")
def report(tmp_path_factory) -> tuple[Path, ReportParser]:
    """The index and its device pages parsed together (one device here, so each table appears once)."""
    results = tmp_path_factory.mktemp("results")
    append_records(RECORDS, results / "run-1.jsonl")
    path = render_report(load_records(results), results.parent / "report.html", source=results)
    parser = ReportParser()
    for page in (path, *device_pages(path)):
        parser.feed(page.read_text(encoding="utf-8"))
    return path, parser


@pytest.fixture(scope="module")
def compression_report(tmp_path_factory) -> tuple[str, ReportParser]:
    results = tmp_path_factory.mktemp("compression-results")
    append_records(RECORDS + COMPRESSION_RECORDS, results / "run-1.jsonl")
    path = render_report(load_records(results), results.parent / "compression-report.html", source=results)
    page = path.read_text(encoding="utf-8")
    parser = ReportParser()
    parser.feed(page)
    return page, parser


def table_rows(parser: ReportParser, table_id: str) -> list[dict[str, str]]:
    header, *rows = parser.tables[table_id]
    return [dict(zip(header, row)) for row in rows]


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
    pages = [link for link in parser.links if link.endswith(".html")]
    assert pages and all((path.parent / link).resolve().is_file() for link in pages if not link.startswith(".."))
    assert all((device_pages(path)[0].parent / link).resolve() == path for link in pages if link.startswith(".."))


def test_index_lists_each_device_with_its_page(report):
    path, parser = report
    [row] = table_rows(parser, "devices")
    assert row["device"] == DEVICE and row["target"] == "host" and row["ISA level"] == "avx2"
    assert row["records"] == str(len(RECORDS)) and row["models"] == "2"
    # best peers: ORT for cyclegan-mobile, torch for nst-tiny (its ORT record is invalid)
    assert row["TVM ÷ best peer (median, latest run)"] == format_ratio(statistics.median([12.3456 / 17.5,
                                                                                         0.8123 / 2.5]))
    assert [p.name for p in device_pages(path)] == ["host-avx2.html"]


def test_table_shows_every_record_p50(report):
    rows = record_rows(report[1])
    assert len(rows) == len(RECORDS)
    for r in RECORDS:
        assert rows[(r.model, r.runtime)]["p50 ms"] == format_ms(r.latency_p50_ms)


def test_tvm_divided_by_its_fastest_valid_peer_per_model(report):
    rows = record_rows(report[1])
    assert rows[("cyclegan-mobile", "tvm")]["TVM ÷ best peer"] == f"{format_ratio(12.3456 / 17.5)} onnxruntime"
    # The only ORT record of nst-tiny is invalid, so torch is its best peer.
    assert rows[("nst-tiny", "tvm")]["TVM ÷ best peer"] == f"{format_ratio(0.8123 / 2.5)} torch"
    assert rows[("cyclegan-mobile", "onnxruntime")]["TVM ÷ best peer"] == ""  # the ratios are TVM's


def test_a_faster_peer_of_lower_quality_is_not_the_best_peer(tmp_path):
    """OpenVINO's bf16 default beats fp32 TVM on time but not on output quality: fp32 TVM is measured
    against the fastest fp32 peer, and the bf16 run appears on the latency-quality front."""
    runs = [
        record("cyclegan-mobile", "tvm", 10.0, output_psnr_db=135.0, base_model="cyclegan-mobile"),
        record("cyclegan-mobile", "openvino", 5.0, output_psnr_db=45.0, min_output_psnr_db=40.0, tolerance=None,
               executed_precision="bf16", base_model="cyclegan-mobile"),
        record("cyclegan-mobile", "openvino-f32", 12.5, output_psnr_db=131.0, base_model="cyclegan-mobile"),
    ]
    _, pages = render_with_pages(runs, tmp_path)
    rows = {(r["model"], r["runtime"]): r for r in table_rows(parsed(pages["host-avx2.html"]), "records")}
    assert rows[("cyclegan-mobile", "tvm")]["TVM ÷ best peer"] == f"{format_ratio(10.0 / 12.5)} openvino-f32"
    assert rows[("cyclegan-mobile", "openvino")]["ran"] == "bf16" and rows[("cyclegan-mobile", "tvm")]["ran"] == "fp32"
    [(base, (latency, _))] = quality_points(load_records(tmp_path / "results")).items()
    assert base == "cyclegan-mobile"
    assert {(p.label, p.psnr_db) for p in pareto_front(latency)} == {("fp32 (openvino)", 45.0), ("fp32 (tvm)", math.inf)}


def test_tvm_bf16_is_a_tvm_row_measured_against_peers_of_its_quality(tmp_path):
    """TVM's bf16 build meets OpenVINO's bf16 default and the fp32 peers, never TVM's own fp32 build."""
    runs = [
        record("cyclegan-mobile", "tvm", 10.0, output_psnr_db=135.0),
        record("cyclegan-mobile", "tvm-bf16", 4.0, output_psnr_db=61.0, min_output_psnr_db=40.0, tolerance=None,
               executed_precision="bf16"),
        record("cyclegan-mobile", "openvino", 5.0, output_psnr_db=62.0, min_output_psnr_db=40.0, tolerance=None,
               executed_precision="bf16"),
        record("cyclegan-mobile", "openvino-f32", 12.5, output_psnr_db=131.0),
    ]
    _, pages = render_with_pages(runs, tmp_path)
    rows = {(r["model"], r["runtime"]): r for r in table_rows(parsed(pages["host-avx2.html"]), "records")}
    assert rows[("cyclegan-mobile", "tvm-bf16")]["TVM ÷ best peer"] == f"{format_ratio(4.0 / 5.0)} openvino"
    assert rows[("cyclegan-mobile", "tvm")]["TVM ÷ best peer"] == f"{format_ratio(10.0 / 12.5)} openvino-f32"
    assert rows[("cyclegan-mobile", "tvm-bf16")]["ran"] == "bf16"


def test_combined_psnr_adds_model_and_runtime_errors():
    from reports.html import EXACT_DB, combined_psnr

    assert combined_psnr(float("inf"), EXACT_DB + 70) == float("inf")  # an fp32 runtime adds nothing
    assert combined_psnr(30.0, 30.0) == pytest.approx(30.0 - 10 * math.log10(2))
    assert combined_psnr(float("inf"), 45.0) == 45.0 and combined_psnr(27.0, None) == 27.0


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


def number(cell: str) -> float:
    return float(cell.rstrip("×").replace(",", ""))


def test_compression_rows_base_first_then_method_order(compression_report):
    rows = table_rows(compression_report[1], f"compression-{BASE}")
    assert [row["variant"] for row in rows] == ["fp32", "ptq", "kd", "prune", "prune+kd+ptq", "sparsify"]
    assert [row["precision"] for row in rows] == ["fp32", "int8", "fp32", "fp32", "int8", "fp32"]


def test_compression_values_and_ratios_match_records(compression_report):
    rows = {row["variant"]: row for row in table_rows(compression_report[1], f"compression-{BASE}")}
    latest = {r.variant: r for r in COMPRESSION_RECORDS if r.base_model == BASE and r.timestamp != SUPERSEDED}
    for variant, r in latest.items():
        row = rows[variant]
        assert number(row["params"]) == r.params
        assert number(row["GMAC"]) == pytest.approx(r.macs / 1e9, rel=5e-3)
        assert number(row["× fewer MACs"]) == pytest.approx(BASE_MACS / r.macs, abs=5e-3)
        if r.onnx_bytes is not None:
            assert number(row["ONNX MB"]) == pytest.approx(r.onnx_bytes / 1e6, abs=5e-3)
            assert number(row["× smaller"]) == pytest.approx(BASE_ONNX_BYTES / r.onnx_bytes, abs=5e-3)
        if r.psnr_db is not None:
            assert number(row["PSNR dB"]) == pytest.approx(r.psnr_db, abs=5e-3)
            assert number(row["SSIM"]) == pytest.approx(r.ssim, abs=5e-4)
        if r.seed_metric is not None:
            assert number(row["generator loss"]) == pytest.approx(r.seed_metric, rel=1e-3)
    assert rows["fp32"]["× smaller"] == rows["fp32"]["× fewer MACs"] == "1.00×"
    assert rows["ptq"]["× smaller"] == "4.00×" and rows["kd"]["× fewer MACs"] == "10.70×"


def test_compression_uses_each_models_latest_record(compression_report):
    ptq = table_rows(compression_report[1], f"compression-{BASE}")[1]
    assert (ptq["ONNX MB"], ptq["PSNR dB"]) == ("0.60", "31.50")  # not the superseded 0.90 MB / 20.00 dB record


def test_compression_missing_values_are_dashes(compression_report):
    rows = {row["variant"]: row for row in table_rows(compression_report[1], f"compression-{BASE}")}
    assert rows["fp32"]["PSNR dB"] == rows["fp32"]["SSIM"] == "—"  # the teacher is not compared with itself
    assert rows["prune"]["PSNR dB"] == rows["prune"]["SSIM"] == rows["prune"]["generator loss"] == "—"
    assert rows["prune+kd+ptq"]["ONNX MB"] == rows["prune+kd+ptq"]["× smaller"] == "—"
    assert rows["prune+kd+ptq"]["× fewer MACs"] == f"{BASE_MACS / 250_000_000:.2f}×"


def test_compression_without_base_row_has_no_ratios(compression_report):
    page, parser = compression_report
    [row] = table_rows(parser, f"compression-{NST_BASE}")
    assert row["variant"] == "ptq" and row["TV loss"] == "12.1"
    assert row["× smaller"] == row["× fewer MACs"] == "—"
    assert f"no record of {NST_BASE} itself" in page


def test_compression_tables_only_for_records_with_a_base(compression_report):
    tables = [key for key in compression_report[1].tables if key.startswith("compression-")]
    assert sorted(tables) == [f"compression-{BASE}", f"compression-{NST_BASE}"]
    compressed = [row["variant"] for key in tables for row in table_rows(compression_report[1], key)]
    assert "int8-qdq" not in compressed


def test_seed_report_table_with_its_numbers(compression_report):
    page, parser = compression_report
    assert "the seed report, lwgan-report.txt results table" in page
    rows = [(r["family"], r["variant"], r["ONNX MB"], r["× smaller"], r["metric"], r["value"])
            for r in table_rows(parser, "seed-compression")]
    assert rows == [
        ("CycleGAN", "base", "64", "1.00×", "generator loss", "3.572"),
        ("CycleGAN", "int8", "19", f"{64 / 19:.2f}×", "generator loss", "4.754"),
        ("CycleGAN", "KD", "45", f"{64 / 45:.2f}×", "generator loss", "4.542"),
        ("CycleGAN", "QAT", "51", f"{64 / 51:.2f}×", "generator loss", "6.52"),
        ("NST", "base", "61", "1.00×", "TV loss", "6.6684"),
        ("NST", "int8", "15", f"{61 / 15:.2f}×", "TV loss", "12.1024"),
        ("NST", "KD", "25", f"{61 / 25:.2f}×", "TV loss", "29.0122"),
    ]


def test_compression_section_after_devices_and_warnings_with_charts(compression_report):
    page = compression_report[0]
    devices, warnings, compression = (page.index(f">{title}</h2>") for title in (
        "Devices", "Warnings", "Compression: size and quality per variant"))
    assert devices < warnings < compression
    charts = re.findall(r'<img src="data:image/png;base64,([^"]+)" alt="ONNX size against PSNR', page)
    assert len(charts) == 2  # one per base model
    assert all(base64.b64decode(chart).startswith(b"\x89PNG\r\n\x1a\n") for chart in charts)


def test_report_without_compression_data_has_no_compression_section(report):
    path, parser = report
    page = path.read_text(encoding="utf-8")
    assert "Compression: size and quality" not in page and "seed-compression" not in page
    assert not [key for key in parser.tables if key.startswith("compression")]
    assert record_rows(parser)  # the latency tables are still there


def test_variant_order_follows_compression_methods():
    from lwgan_models.compression import METHODS  # imports torch, so only here

    assert VARIANT_ORDER == ("fp32", *METHODS)


def test_compression_rows_embed_each_variants_sample_output(tmp_path):
    """The sample PNG a bench run saved beside its records is embedded; a missing one shows a dash."""
    from PIL import Image

    results = tmp_path / "results"
    (results / "run-1.samples").mkdir(parents=True)
    Image.new("RGB", (8, 8), (200, 120, 40)).save(results / "run-1.samples" / f"{BASE}+ptq.png")
    append_records([
        variant_record("fp32", precision="fp32", onnx_bytes=BASE_ONNX_BYTES, psnr_db=None, ssim=None),
        variant_record("ptq", sample_png=f"run-1.samples/{BASE}+ptq.png"),
        variant_record("kd", precision="fp32", sample_png="run-1.samples/deleted.png"),
    ], results / "run-1.jsonl")
    page = render_report(load_records(results), tmp_path / "r.html", source=results).read_text(encoding="utf-8")
    embedded = base64.b64encode((results / "run-1.samples" / f"{BASE}+ptq.png").read_bytes()).decode("ascii")
    assert page.count('class="sample"') == 1 and embedded in page
    parser = ReportParser()
    parser.feed(page)
    rows = {row["variant"]: row for row in table_rows(parser, f"compression-{BASE}")}
    assert rows["kd"]["output on the test image"] == "—"


def test_a_base_model_without_variants_gets_no_compression_table(tmp_path):
    append_records([variant_record("fp32", precision="fp32", psnr_db=None, ssim=None)], tmp_path / "r.jsonl")
    page = render_report(load_records(tmp_path), tmp_path / "r.html", source=tmp_path).read_text(encoding="utf-8")
    assert "Compression: size and quality per variant" not in page


def render_with_pages(records: list[Record], tmp_path: Path) -> tuple[Path, dict[str, str]]:
    """Render `records`; the index path and each device page's text by file name."""
    append_records(records, tmp_path / "results" / "run.jsonl")
    index = render_report(load_records(tmp_path / "results"), tmp_path / "index.html", source=tmp_path / "results")
    return index, {page.name: page.read_text(encoding="utf-8") for page in device_pages(index)}


def parsed(page: str) -> ReportParser:
    parser = ReportParser()
    parser.feed(page)
    return parser


def test_energy_cells_say_measured_estimated_or_no_sensor(tmp_path):
    rapl = dict(target="board", device="Board with RAPL", isa_level="", power_source="rapl", idle_w=3.1,
                active_w=9.87, energy_mj=12.34, energy_mj_std=0.41, power_samples=40)
    index, pages = render_with_pages([
        record("gen-measured", "tvm", 5.0, **rapl),
        record("gen-estimated", "tvm", 5.0, **(rapl | {"power_source": "estimate", "power_estimated": True})),
        record("gen-failed", "tvm", 5.0, **(rapl | {"energy_mj": None, "power_error": "energy_uj: cannot read"})),
        record("gen-host", "tvm", 5.0, power_source="none"),
    ], tmp_path)
    assert sorted(pages) == ["board.html", "host-avx2.html"]
    board = {(r["model"]): r for r in table_rows(parsed(pages["board.html"]), "records")}
    assert board["gen-measured"]["energy mJ"] == "12.3 ± 0.41" and board["gen-measured"]["active W"] == "9.87"
    assert board["gen-estimated"]["energy mJ"] == "12.3 ± 0.41 estimate"
    assert board["gen-failed"]["energy mJ"] == "sensor failed"
    [host] = table_rows(parsed(pages["host-avx2.html"]), "records")
    assert host["energy mJ"] == "no sensor"
    items = parsed(pages["board.html"]).items
    assert any(i.startswith("estimated power") and "gen-estimated" in i for i in items)
    assert any(i.startswith("power sensor failed") and "energy_uj: cannot read" in i for i in items)
    devices = {r["target"]: r for r in table_rows(parsed(index.read_text(encoding="utf-8")), "devices")}
    assert devices["host"]["power"] == "no sensor"
    assert devices["board"]["power"] == "estimate (stated constants, not measured), rapl"


def test_firmware_columns_only_where_firmware_was_measured(tmp_path):
    firmware = record("gen-tiny", "c-firmware", 0.0, target="cortex-m4", device="Cortex-M4 (qemu)", isa_level="",
                      flash_bytes=200_704, ram_bytes=81_920, arena_bytes=65_536, instructions=123_456_789)
    _, pages = render_with_pages([firmware, record("gen-tiny", "tvm", 5.0)], tmp_path)
    [row] = table_rows(parsed(pages["cortex-m4.html"]), "records")
    assert (row["flash KB"], row["RAM KB"], row["arena KB"], row["instructions"]) == (
        "196.0", "80.0", "64.0", "123,456,789")
    assert "instructions" not in table_rows(parsed(pages["host-avx2.html"]), "records")[0]
    assert "No valid timed records to chart" in pages["cortex-m4.html"]  # firmware has no latency to plot


def test_pareto_front_keeps_only_undominated_points():
    from reports.charts import QualityPoint, pareto_front

    points = [QualityPoint("fp32", 40.0, float("inf")), QualityPoint("kd", 5.0, 23.0),
              QualityPoint("prune", 10.0, 25.0), QualityPoint("slow-bad", 20.0, 24.0), QualityPoint("ptq", 60.0, 37.0)]
    assert [p.label for p in pareto_front(points)] == ["kd", "prune", "fp32"]


def test_device_page_has_pareto_fronts_and_tuning_curves(tmp_path):
    curve = [[10, 9.0], [20, 6.0], [40, 5.2], [80, 5.0]]
    _, pages = render_with_pages(COMPRESSION_RECORDS + [
        variant_record("fp32", "tvm", precision="fp32", psnr_db=None, timestamp="2025-11-26T06:00:00+00:00",
                       tuning_curve=curve, trials_to_10pct=40),
    ], tmp_path)
    page = pages["host-avx2.html"]
    assert f'alt="latency against PSNR, Pareto front, {BASE}"' in page
    assert f'alt="size against PSNR, Pareto front, {BASE}"' in page
    assert 'alt="tuning curves on' in page


def test_compare_flags_changes_beyond_noise_only(tmp_path):
    from reports.compare import compare_runs, render_comparison

    def timed(run, model, p50, cov=0.01, **extra):
        return record(model, "tvm", p50, run_id=run, latency_cov=cov, samples=30, **extra)

    records = [
        timed("A", "slower", 10.0), timed("B", "slower", 11.0),  # +10% with tight spread: a regression
        timed("A", "noisy", 10.0, cov=0.5), timed("B", "noisy", 12.0, cov=0.5),  # +20% inside its noise
        timed("A", "faster", 10.0), timed("B", "faster", 8.0),
        timed("A", "drift", 10.0), timed("B", "drift", 10.3),  # +3%: below the drift floor
        timed("A", "broke", 10.0), timed("B", "broke", 10.0, valid=False, invalid_reason="error"),
        timed("B", "new", 1.0),
    ]
    append_records(records, tmp_path / "results" / "r.jsonl")
    frame = load_records(tmp_path / "results")
    verdicts = {c.key["model"]: c.verdict for c in compare_runs(frame, "A", "B")}
    assert verdicts == {"slower": "regression", "noisy": "same", "faster": "improvement", "drift": "same",
                        "broke": "became invalid", "new": "only in B"}
    path, _ = render_comparison(frame, "A", "B", tmp_path / "compare.html")
    rows = {r["model"]: r for r in table_rows(parsed(path.read_text(encoding="utf-8")), "changes")}
    assert rows["slower"]["change"] == "+10.0%" and rows["slower"]["verdict"] == "regression"
    assert rows["new"]["p50 A ms"] == "—"
    with pytest.raises(UserError, match="no records of run 'C'"):
        compare_runs(frame, "A", "C")


def test_roofline_table_shows_the_slowest_kernels_against_the_peak(tmp_path):
    kernels = [{"kernel": "fused_conv2d3_add2", "calls": 12.0, "ms": 20.0, "gflop": 0.907, "gflops": 45.35,
                "peak_fraction": 45.35 / 60.0},
               {"kernel": "take3", "calls": 12.0, "ms": 1.0, "gflop": 0.0, "gflops": 0.0, "peak_fraction": 0.0}]
    _, pages = render_with_pages([record("gen", "tvm", 21.0, fma_peak_gflops=60.0, kernel_profile=kernels)], tmp_path)
    rows = table_rows(parsed(pages["host-avx2.html"]), "roofline-gen")
    assert rows[0] == {"kernel": "fused_conv2d3_add2", "calls": "12", "ms": "20.00", "share": "95%",
                       "GFLOP": "0.907", "GFLOP/s": "45.4", "of peak": "76%"}
    assert rows[1]["of peak"] == "—"  # a gather does no arithmetic: no fraction of peak to speak of
    assert "FMA peak 60.0 GFLOP/s" in pages["host-avx2.html"]


def test_a_bf16_build_gets_its_own_roofline_with_products_against_the_bf16_peak(tmp_path):
    kernels = [{"kernel": "winograd_products_bf16", "calls": 12.0, "ms": 10.0, "gflop": 2.0, "gflops": 200.0,
                "peak": "bf16", "peak_fraction": 200.0 / 250.0},
               {"kernel": "winograd_data_transform_bf16", "calls": 12.0, "ms": 2.0, "gflop": 0.1, "gflops": 50.0,
                "peak": "fma", "peak_fraction": 50.0 / 125.0}]
    runs = [record("gen", "tvm-bf16", 12.0, executed_precision="bf16", fma_peak_gflops=125.0, bf16_peak_gflops=250.0,
                   kernel_profile=kernels)]
    _, pages = render_with_pages(runs, tmp_path)
    rows = table_rows(parsed(pages["host-avx2.html"]), "roofline-gen-tvm-bf16")
    assert [row["of peak"] for row in rows] == ["80% of bf16", "40%"]
    assert "gen · tvm-bf16 · FMA peak 125.0 GFLOP/s · bf16 peak 250.0 GFLOP/s" in pages["host-avx2.html"]


def test_an_int8_roofline_judges_integer_convs_against_the_int8_peak(tmp_path):
    kernels = [{"kernel": "int8_conv2d", "calls": 1.0, "ms": 1.0, "gflop": 0.3, "gflops": 300.0, "peak": "integer",
                "peak_fraction": 300.0 / 900.0},
               {"kernel": "fused_instance_norm", "calls": 1.0, "ms": 0.5, "gflop": 0.0, "gflops": 0.0, "peak": "fma",
                "peak_fraction": 0.0}]
    runs = [record("gen", "tvm", 1.5, fma_peak_gflops=200.0, int8_peak_gops=900.0, kernel_profile=kernels)]
    _, pages = render_with_pages(runs, tmp_path)
    rows = table_rows(parsed(pages["host-avx2.html"]), "roofline-gen")
    assert [row["of peak"] for row in rows] == ["33% of int8", "—"]
    assert "FMA peak 200.0 GFLOP/s · int8 peak 900.0 GOP/s" in pages["host-avx2.html"]


def test_kernels_on_amx_tiles_are_judged_against_the_measured_tile_peaks(tmp_path):
    kernels = [{"kernel": "winograd_products_amx_bf16", "calls": 12.0, "ms": 4.0, "gflop": 2.0, "gflops": 500.0,
                "peak": "amx-bf16", "peak_fraction": 500.0 / 2000.0},
               {"kernel": "bf16_conv2d", "calls": 1.0, "ms": 1.0, "gflop": 0.2, "gflops": 200.0, "peak": "bf16",
                "peak_fraction": 200.0 / 250.0}]
    runs = [record("gen", "tvm-bf16", 6.0, executed_precision="bf16", fma_peak_gflops=125.0, bf16_peak_gflops=250.0,
                   amx_bf16_peak_gflops=2000.0, kernel_profile=kernels)]
    _, pages = render_with_pages(runs, tmp_path)
    rows = table_rows(parsed(pages["host-avx2.html"]), "roofline-gen-tvm-bf16")
    assert [row["of peak"] for row in rows] == ["25% of AMX bf16", "80% of bf16"]
    assert "bf16 peak 250.0 GFLOP/s · AMX bf16 peak 2000.0 GFLOP/s" in pages["host-avx2.html"]


def timed_variant(method: str, runtime: str, p50: float, run_id: str, **overrides) -> Record:
    """A variant of BASE (int8 unless told), or for "fp32" BASE itself, timed at `p50` in `run_id`."""
    base = {"precision": "fp32", "psnr_db": None, "ssim": None} if method == "fp32" else {}
    return variant_record(method, runtime, run_id=run_id, p50=p50, **(base | overrides))


DEVICE_RUNS = [
    timed_variant("fp32", "tvm", 10.1234, "run-A"),
    timed_variant("fp32", "onnxruntime", 12.5, "run-A"),
    timed_variant("ptq", "tvm", 4.0321, "run-A"),
    timed_variant("ptq", "onnxruntime", 6.75, "run-A"),  # ONNX Runtime on the same QDQ file
    timed_variant("kd", "tvm", 0.4567, "run-A", precision="fp32", psnr_db=27.3456),  # no ORT record: missing marker
    timed_variant("ptq", "tvm", 3.0, "run-B"),  # its base was not timed in run-B: left out
    timed_variant("qat", "tvm", 3.5, "run-B"),
    timed_variant("fp32", "torch", 30.0, "run-B"),  # the base, but not on TVM
]


def test_device_page_sets_each_variant_beside_its_base_in_the_same_run(tmp_path):
    _, pages = render_with_pages(DEVICE_RUNS, tmp_path)
    parser = parsed(pages["host-avx2.html"])
    rows = table_rows(parser, "device-compression")
    by_key = {(r.run_id, r.model, r.runtime): r for r in DEVICE_RUNS}
    base = by_key[("run-A", BASE, "tvm")]
    assert [(row["run"], row["variant"]) for row in rows] == [("run-A", "ptq"), ("run-A", "kd")]  # method order
    for row in rows:
        tvm = by_key[("run-A", f"{BASE}+{row['variant']}", "tvm")]
        assert row["base model"] == BASE and row["precision"] == tvm.precision
        assert row["TVM p50 ms"] == format_ms(tvm.latency_p50_ms)
        assert row["÷ fp32 TVM"] == format_ratio(tvm.latency_p50_ms / base.latency_p50_ms)
        assert number(row["PSNR to fp32 dB"]) == pytest.approx(tvm.psnr_db, abs=5e-3)
    ptq_ort = by_key[("run-A", f"{BASE}+ptq", "onnxruntime")]
    assert rows[0]["TVM ÷ best peer"] == format_ratio(by_key[("run-A", f"{BASE}+ptq", "tvm")].latency_p50_ms
                                                     / ptq_ort.latency_p50_ms) + " onnxruntime"
    assert rows[1]["TVM ÷ best peer"] == "—"
    # the base model's own TVM ÷ best peer is on its row of the run's main table
    main = {(r["model"], r["runtime"]): r for r in table_rows(parser, "records") if r["TVM ÷ best peer"]}
    assert main[(BASE, "tvm")]["TVM ÷ best peer"] == format_ratio(base.latency_p50_ms / by_key[
        ("run-A", BASE, "onnxruntime")].latency_p50_ms) + " onnxruntime"


def test_device_compression_divides_by_the_base_timed_in_the_variants_own_rounds(tmp_path):
    """A variant's record that carries its base's p50 from the same interleaved rounds is divided by
    that, not by the base's own record (timed in another window of the run)."""
    variant = timed_variant("ptq", "tvm", 4.0, "run-A", base_latency_p50_ms=8.0)
    _, pages = render_with_pages([timed_variant("fp32", "tvm", 10.0, "run-A"), variant], tmp_path)
    [row] = table_rows(parsed(pages["host-avx2.html"]), "device-compression")
    assert row["÷ fp32 TVM"] == format_ratio(4.0 / 8.0) != format_ratio(4.0 / 10.0)


def test_device_compression_leaves_out_invalid_bases(tmp_path):
    _, pages = render_with_pages([
        timed_variant("fp32", "tvm", 10.0, "run-A", valid=False, invalid_reason=INVALID_REASON),
        timed_variant("ptq", "tvm", 4.0, "run-A"),
    ], tmp_path)
    assert "device-compression" not in parsed(pages["host-avx2.html"]).tables
