"""The one measurement record: every benchmark writes these, the report reads only these.

A record is one JSON line under `reports/results/<run_id>.jsonl`. Files are append-only: a run
never rewrites or truncates an earlier line, and each line is written whole under a lock and synced.
`load_records` gives pandas one flat table, skipping (and listing) any line that is not a record.
"""

from __future__ import annotations

import dataclasses
import errno
import fcntl
import json
import os
import typing
from dataclasses import dataclass, field
from pathlib import Path

import pandas as pd

from errors import UserError

SCHEMA_VERSION = 1
RESULTS_DIR = Path(__file__).resolve().parent.parent / "reports" / "results"


@dataclass
class Record:
    # What was measured.
    run_id: str
    model: str
    family: str  # "cyclegan" | "nst"
    variant: str  # "fp32" for a base model, else its compression method: "ptq", "qat", "kd", "prune", ...
    weights: str  # "random" or "<path>@sha256:<hex>"
    input_shape: list[int]  # the image input's
    params: int
    macs: int
    size_fp32_bytes: int  # fp32 weights as a state_dict on disk
    # Where and how.
    target: str  # target config name, e.g. "host"
    device: str  # human label from the target config
    isa_level: str  # e.g. "avx2"; "" where the target has no levels
    runtime: str  # a registered runtime (bench/runtimes/): "tvm", "torch", "onnxruntime", "openvino", ...
    threads: int
    artifact_bytes: int | None = None  # compiled library / ONNX file size
    base_model: str | None = None  # the registry model a compressed variant was made from
    # An ONNX file's every input in the graph's order, [{name, shape, dtype, fill}]: fill is how the run fed
    # it ("test-image", "file:<path>@sha256:<hex>", "seeded-uniform(seed=N)" in [-1, 1], "seeded-one-hot(seed=N)"
    # for a weights vector, "zeros" for integers; compile/pipeline.py InputSpec). None: a registry
    # generator's one image input.
    inputs: list | None = None
    # "generator" (an N×C×H×W image out) or "other" (an embedding, logits): the report lists those apart.
    kind: str = "generator"
    precision: str = "fp32"  # the model's: "fp32" | "int8"
    # What the runtime actually executed: "fp32", "bf16" (OpenVINO's default on CPUs with bf16 units),
    # "fp16", or "int8"; the output is judged by this precision's rule. None in older records (= precision).
    executed_precision: str | None = None
    onnx_bytes: int | None = None  # the model as an ONNX file (int8 weights for int8): its size on disk
    # Quality, from the checkpoint card: fidelity to the fp32 teacher on held-out images, and the
    # seed report's metric (CycleGAN generator loss, style-transfer TV loss) under one protocol.
    psnr_db: float | None = None
    ssim: float | None = None
    seed_metric_name: str | None = None
    seed_metric: float | None = None
    sample_png: str | None = None  # the reference output on the test image, relative to the results folder
    tuned_trials: int | None = None  # tuning records in the applied database; None = untuned
    db_hash: str | None = None
    tuning_db: str | None = None  # autotune_logs/<target-level>/<model>, relative to the repo
    tuned_tasks: str | None = None  # "tuned/total" tasks that found a database record
    int8_lowering: str | None = None  # an int8 build: which convolutions ran as integer kernels, which ops in float
    bf16_plan: str | None = None  # a bf16 build: which wide Winograd convs its calibrated error budget put in bf16
    tuning_curve: list | None = None  # [[trials, best estimated latency ms], ...] replayed from the database
    trials_to_10pct: int | None = None  # trials until the curve came within 10% of its final latency
    # Timing (milliseconds over the timed samples, after warm-up).
    warmup: int = 0
    samples: int = 0
    duration_s: float = 0.0
    latency_mean_ms: float = 0.0
    latency_std_ms: float = 0.0
    latency_cov: float = 0.0
    latency_min_ms: float = 0.0
    latency_p50_ms: float = 0.0
    latency_p90_ms: float = 0.0
    latency_p99_ms: float = 0.0
    latency_max_ms: float = 0.0
    # A compressed variant's TVM record: its fp32 base's TVM p50, timed in the same interleaved rounds
    # (so variant ÷ base is free of the drift between two models' timing windows).
    base_latency_p50_ms: float | None = None
    valid: bool = True
    invalid_reason: str = ""
    # Correctness against the torch fp32 reference on the same input.
    max_abs_err: float | None = None
    tolerance: float | None = None  # fp32 rule: max_abs_err <= tolerance
    output_psnr_db: float | None = None  # output vs reference over the whole image
    min_output_psnr_db: float | None = None  # bf16/fp16/int8 rule: a rounding step may flip anywhere, so judge the image
    # Roofline (`invoke bench --roofline`, TVM only): the FMA peak measured in the same run, and per
    # kernel [{kernel, calls, ms, gflop, gflops, peak, peak_fraction}] per inference, slowest first
    # (`peak`: "fma", "bf16", "integer", "amx-bf16" or "amx-int8", the peak its fraction is of).
    fma_peak_gflops: float | None = None
    bf16_peak_gflops: float | None = None  # vdpbf16ps, measured beside the FMA peak for a bf16 build's roofline
    amx_bf16_peak_gflops: float | None = None  # tdpbf16ps, for a bf16 build on a CPU with AMX tiles
    int8_peak_gops: float | None = None  # vpdpbusd, measured beside the FMA peak for an int8 build on VNNI
    amx_int8_peak_gops: float | None = None  # tdpbusd, for an int8 build at an AMX level
    kernel_profile: list | None = None
    # Memory: the runtime process's peak resident set while timing (host), or the firmware's static RAM.
    peak_rss_bytes: int | None = None
    # Power (targets/power.py): the probe named by the target; "none" means no sensor, nothing measured.
    power_source: str | None = None
    power_estimated: bool = False  # an estimate from stated constants, never mixed with measurements
    idle_w: float | None = None
    active_w: float | None = None
    energy_mj: float | None = None  # per inference, (active - idle) power x time
    energy_mj_std: float | None = None  # spread over sub-windows of the timed run
    power_samples: int | None = None
    power_error: str | None = None  # the sensor failed mid-run: timing kept, energy left out
    # Microcontroller firmware (connection "qemu-system"): sizes from the linked ELF and the
    # instructions qemu executed per inference (`-icount`: instructions, not cycles).
    flash_bytes: int | None = None  # text + rodata
    ram_bytes: int | None = None  # data + bss + stack
    arena_bytes: int | None = None  # the planned activation arena inside ram_bytes
    instructions: int | None = None
    # An estimate, not a measurement: executed instructions per class (qemu plugin, per-address counts
    # classified from the disassembly) times the core's published cycles per class (the target's
    # [mcu.cycles] table, carried here as used).
    instruction_mix: dict | None = None
    cycle_table: dict | None = None
    cycles_estimate: int | None = None
    toolchain: str | None = None
    # Adversarial robustness (`invoke robustness`, bench/robustness.py): the model's output on held-out
    # images perturbed by `attack` ("fgsm" | "pgd"; None in every other record) within `epsilon` 8-bit
    # levels (ε/255), against its clean output, as PSNR over all images (None: nothing moved). torch's
    # outputs, TVM's, and the fp32 teacher's torch PSNR under the same probe. max_abs_err/output_psnr_db
    # compare TVM with torch on the adversarial inputs; latency fields stay 0 (nothing is timed).
    attack: str | None = None
    epsilon: float | None = None
    attack_steps: int | None = None
    attack_images: int | None = None
    adversarial_psnr_db: float | None = None
    tvm_adversarial_psnr_db: float | None = None
    teacher_adversarial_psnr_db: float | None = None
    # What the run was measured under, so one record file reproduces it (as MLPerf LoadGen's log does):
    # the validity rules (threads, warm-up, minimum samples and duration) and a digest of the resolved
    # target config (targets/config.py ResolvedTarget.digest). None in older records.
    bench_rules: dict | None = None
    target_digest: str | None = None
    # Environment fingerprint and provenance.
    env: dict = field(default_factory=dict)
    timestamp: str = ""
    schema: int = SCHEMA_VERSION

    def beyond_tolerance(self) -> bool:
        return outside_tolerance(dataclasses.asdict(self))

    def to_json(self) -> str:
        return json.dumps(dataclasses.asdict(self), sort_keys=True)

    @classmethod
    def from_dict(cls, data: dict) -> "Record":
        names = {f.name for f in dataclasses.fields(cls)}
        unknown = set(data) - names
        if unknown:
            raise UserError(f"record has unknown fields {sorted(unknown)}; expected schema {SCHEMA_VERSION}")
        return cls(**data)


def outside_tolerance(record: dict) -> bool:
    """Whether a record's output broke its correctness rule (a dict, so pandas rows work too)."""
    def given(value) -> bool:
        return value is not None and value == value  # NaN from pandas means absent

    err, tol = record.get("max_abs_err"), record.get("tolerance")
    psnr, floor = record.get("output_psnr_db"), record.get("min_output_psnr_db")
    return (given(err) and given(tol) and err > tol) or (given(psnr) and given(floor) and psnr < floor)


# A variant whose perturbed-output PSNR is within this of its teacher's is called as robust as the teacher.
SAME_ROBUSTNESS_DB = 1.0


def robustness_verdict(record: dict) -> tuple[str, float | None]:
    """(verdict, variant - teacher PSNR in dB) of a robustness record: lower PSNR under the same attack
    means the output moved further, so a variant below its teacher is more fragile."""
    ours, teacher = record.get("adversarial_psnr_db"), record.get("teacher_adversarial_psnr_db")
    if ours is None or teacher is None or ours != ours or teacher != teacher:  # None, or NaN from pandas
        return "—", None
    delta = ours - teacher
    if abs(delta) <= SAME_ROBUSTNESS_DB:
        return "as robust", delta
    return ("more fragile" if delta < 0 else "less fragile"), delta


def robustness_records(records: pd.DataFrame) -> pd.Series:
    """Which rows are robustness probes: nothing timed, so every timing table leaves them out."""
    return records["attack"].notna()


def append_records(records: list[Record], path: Path) -> Path:
    """Append records as JSON lines; earlier lines are never touched.

    Each line goes out in one write under an exclusive advisory lock on the file, then is flushed
    to disk (fsync), so two writers never interleave and a crash leaves at most the line being written.
    A write that fails (a full disk) is cut back to where it started: the file keeps every earlier
    record and no torn line, and the error says how many records it holds. A torn last line left by
    a crash is ended first, so the next record is not glued onto it.
    """
    path.parent.mkdir(parents=True, exist_ok=True)
    fd = os.open(path, os.O_RDWR | os.O_APPEND | os.O_CREAT, 0o644)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX)
        size = os.fstat(fd).st_size
        if size and os.pread(fd, 1, size - 1) != b"\n":  # a line torn by an earlier crash: start a fresh one
            os.write(fd, b"\n")
        for record in records:
            line = (record.to_json() + "\n").encode("utf-8")
            start = os.fstat(fd).st_size
            try:
                written = os.write(fd, line)
                if written != len(line):
                    raise OSError(errno.ENOSPC, f"wrote {written} of {len(line)} bytes")
                os.fsync(fd)
            except OSError as exc:
                os.ftruncate(fd, start)
                kept = sum(1 for raw in path.read_bytes().splitlines() if raw.strip())
                raise UserError(f"{path}: could not append a record ({exc.strerror or exc}); "
                                f"the file keeps its {kept} earlier records") from exc
    finally:
        os.close(fd)  # releases the lock
    return path


def drop_unrecorded_samples(path: Path, samples_dir: Path) -> int:
    """After a failed or interrupted run: delete the sample PNGs no record in `path` points to (and the
    folder once empty), so a run leaves no orphan files; returns how many records `path` keeps."""
    records = read_records(path, skipped=[]) if path.exists() else []
    referenced = {path.parent / r.sample_png for r in records if r.sample_png}
    if samples_dir.is_dir():
        for png in samples_dir.glob("*.png"):
            if png not in referenced:
                png.unlink()
        if not any(samples_dir.iterdir()):
            samples_dir.rmdir()
    return len(records)


@dataclass(frozen=True)
class SkippedLine:
    """A line of a records file that is not a record (torn by a crash, edited, another tool's)."""

    path: Path
    line: int
    reason: str

    def __str__(self) -> str:
        return f"{self.path}:{self.line}: skipped, not a benchmark record ({self.reason})"


def read_records(path: Path, skipped: list[SkippedLine] | None = None) -> list[Record]:
    """Every record in `path`. A line that is not one is skipped and described in `skipped` (given a
    list), so one torn line never hides the rest; without a list it is an error naming file:line."""
    records = []
    with open(path, encoding="utf-8", errors="replace") as f:
        for number, line in enumerate(f, 1):
            if not line.strip():
                continue
            try:
                records.append(Record.from_dict(json.loads(line)))
            except (json.JSONDecodeError, TypeError, AttributeError, UserError) as exc:
                bad = SkippedLine(Path(path), number, str(exc))
                if skipped is None:
                    raise UserError(str(bad)) from exc
                skipped.append(bad)
    return records


def load_records(results_dir: Path = RESULTS_DIR) -> pd.DataFrame:
    """All records below `results_dir` as one DataFrame, one row per record.

    Lines that are not records are skipped; the frame's `attrs["skipped"]` lists them (file:line and
    why) for whoever shows the table: the report prints them as warnings.
    """
    paths = sorted(Path(results_dir).glob("*.jsonl"))
    skipped: list[SkippedLine] = []
    rows = [dataclasses.asdict(r) for p in paths for r in read_records(p, skipped)]
    columns = [f.name for f in dataclasses.fields(Record)]
    frame = pd.DataFrame(rows, columns=columns)
    for name in _OPTIONAL_NUMBERS:  # all-None columns would otherwise be object dtype
        frame[name] = pd.to_numeric(frame[name]).astype("Int64" if _OPTIONAL_NUMBERS[name] is int else "float64")
    frame.attrs["skipped"] = [str(line) for line in skipped]
    return frame


def _optional_numbers() -> dict[str, type]:
    hints = typing.get_type_hints(Record)
    return {name: kinds[0] for name, hint in hints.items()
            if len(kinds := [k for k in typing.get_args(hint) if k is not type(None)]) == 1
            and type(None) in typing.get_args(hint) and kinds[0] in (int, float)}


_OPTIONAL_NUMBERS = _optional_numbers()
