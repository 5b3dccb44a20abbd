"""Benchmark a model under test on a target: TVM beside every peer runtime, in one run.

Every runtime (bench/runtimes/, a registry of plug-ins) gets the same input (a real photo that
ships with scikit-image; an ONNX model's other inputs a file's values or a seeded fill, each named in
the record), the same thread count and the same timing rules, in the same
interleaved rounds, wherever it runs: in this process on the host, or on an RPC board
(bench/places.py). Every result, valid or not, becomes a `Record`; a runtime that cannot run the
model gets a record that says why. Outputs are checked against the reference (torch for registry
generators, ONNX Runtime with graph optimisations off, the ONNX semantics, for an ONNX file) by
the rule of the precision the runtime actually executed.
"""

from __future__ import annotations

import dataclasses
import datetime
import uuid
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import numpy as np
import onnxruntime as ort
import torch
import tvm
from PIL import Image
from skimage import data as skimage_data

from bench import runtimes as runtime_registry
from bench.energy import measure_energy
from bench.harness import Timing, time_runtimes, wait_for_idle_threads
from bench.memory import Crashed, peak_rss_bytes
from bench.places import PLACES
from bench.record import Record, append_records
from bench.roofline import (
    amx_bf16_peak_gflops,
    amx_int8_peak_gops,
    bf16_peak_gflops,
    fma_peak_gflops,
    int8_peak_gops,
    kernel_flops,
    kernel_profile,
)
from bench.runtimes import Inputs, Runtime, RuntimeSpec, named_inputs
from bench.runtimes.tvm_vm import BUILD_PRECISION, TvmRuntime
from compile import BF16_ATTR, MACS_ATTR, TILES_ATTR, bf16
from compile.artifacts import Artifact, NotBuildable, build_artifact
from compile.build import CompiledModel
from compile.database import TuningDatabase, trials_to_within
from compile.int8 import amx
from compile.int8.lowering import runs_on_vnni
from compile.pipeline import IMAGE_CHANNELS, ModelUnderTest, prepared_kernels
from compile.schedules.conv import PREPACKED
from errors import UserError
from lwgan_models.compression.evaluate import psnr_db
from lwgan_models.registry import repo_relative
from targets import BenchRules, ResolvedTarget
from targets.power import PowerProbe, open_target_probe

# Generators end in tanh, so outputs lie in [-1, 1]; fp32 reorderings stay far below 2e-3.
TOLERANCE = {"fp32": 2e-3}
# Reduced precisions are judged on the whole image. bf16 keeps 8 mantissa bits, so single values
# move by ~1e-2 and instance norm spreads that: a bound on the worst pixel would reject every bf16
# build, while the image's PSNR against fp32 says what a viewer sees (OpenVINO's bf16: 45-67 dB).
# int8 kernels requantize in integer arithmetic, the QDQ reference in float: single rounding steps
# differ and instance norm spreads them (ONNX Runtime's int8 vs its reference: 0.17 max, 38 dB PSNR).
MIN_OUTPUT_PSNR_DB = {"bf16": 40.0, "fp16": 40.0, "int8": 30.0}


def new_run_id() -> str:
    return datetime.datetime.now(datetime.timezone.utc).strftime("%Y%m%dT%H%M%SZ-") + uuid.uuid4().hex[:6]


def test_image(shape: tuple[int, ...]) -> np.ndarray:
    """scikit-image's astronaut photo at `shape` (NCHW, or NHWC when the last dim is the channel and the
    second is not), in [-1, 1]; a fourth channel is opaque alpha (1)."""
    nhwc = shape[1] not in IMAGE_CHANNELS and shape[-1] in IMAGE_CHANNELS
    batch, channels, height, width = (shape[0], shape[3], shape[1], shape[2]) if nhwc else shape
    image = torch.from_numpy(skimage_data.astronaut()).permute(2, 0, 1).float().unsqueeze(0) / 127.5 - 1.0
    image = torch.nn.functional.interpolate(image, size=(height, width), mode="bilinear", antialias=True)
    image = torch.cat([image, torch.ones_like(image[:, :1])], dim=1)[:, :channels]
    image = image.expand(batch, channels, height, width)
    return (image.permute(0, 2, 3, 1) if nhwc else image).contiguous().numpy()


def model_inputs(model: ModelUnderTest) -> Inputs:
    """What every runtime is fed: the test image for a one-input model (an array, as plug-ins always got),
    else each input by name in the graph's order, the image input the test image (see `InputSpec`)."""
    if len(model.inputs) <= 1:
        return test_image(model.input_shape)
    return {spec.name: test_image(spec.shape) if spec.fill == "image" else spec.filled() for spec in model.inputs}


def reference_output(model: ModelUnderTest, x: Inputs) -> np.ndarray:
    """torch's output for a registry generator; ONNX Runtime's, graph optimisations off, for an ONNX file."""
    if model.torch_module is not None:
        with torch.inference_mode():
            return model.torch_module(torch.from_numpy(x)).numpy()
    options = ort.SessionOptions()
    options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_DISABLE_ALL
    session = ort.InferenceSession(str(model.onnx_file()), options, providers=["CPUExecutionProvider"])
    return session.run(None, named_inputs(x, session.get_inputs()[0].name))[0]


def default_runtimes(target: ResolvedTarget) -> tuple[str, ...]:
    """Every installed runtime that can run where the target's connection runs models."""
    return tuple(spec.name for spec in runtime_registry.installed(target.config.place))


def bench_model(
    model: ModelUnderTest,
    target: ResolvedTarget,
    run_id: str,
    runtimes: tuple[str, ...] | None = None,
    rules: BenchRules | None = None,
    report: Callable[[str], None] = print,
    samples_dir: Path | None = None,
    roofline: bool = False,
    base: ModelUnderTest | None = None,
) -> list[Record]:
    """Time `model` on every runtime (default: every installed one the target's place runs; a
    microcontroller runs the model as firmware, bench/firmware.py); with
    `samples_dir`, also save its reference output there as a PNG; with `roofline`, profile TVM's
    kernels against the measured FMA peak; with `base` (the fp32 model a compressed variant was made
    from), time the base on TVM in the same rounds as the variant."""
    place_name = target.config.place
    if place_name == "mcu":  # generated C firmware under qemu: no runtime to time, one deterministic run
        from bench.firmware import bench_firmware

        return bench_firmware(model, target, run_id, report, samples_dir)
    specs = runtime_registry.parse(runtimes or default_runtimes(target), place_name)
    if place_name == "board" and len(model.inputs) > 1:
        raise UserError(f"{model.name}: boards run one-input models; this one has inputs "
                        f"{', '.join(spec.name for spec in model.inputs)}")
    place = PLACES[place_name](target)
    try:
        with open_target_probe(target.config) as probe:  # a board's probe holds an SSH connection
            return _bench_at(model, target, run_id, specs, rules or target.config.bench, report, samples_dir,
                             probe, roofline, base, place)
    finally:
        place.close()


def bench_models(models: list[ModelUnderTest], target: ResolvedTarget, run_id: str, out: Path,
                 report: Callable[[str], None] = print, **options) -> list[Record]:
    """`bench_model` of each model in turn (with `options`: runtimes, rules, samples_dir, roofline), its
    records appended to `out` as soon as it is measured (an interruption keeps them); a compressed variant
    is timed beside its fp32 base (same input shape) where `models` holds it. Returns every record."""
    bases = {(m.name, m.input_shape): m for m in models if m.variant == "fp32"}
    records = []
    for index, model in enumerate(models, 1):
        report(f"[{index}/{len(models)}] {model.name}")
        base = bases.get((model.base_model, model.input_shape)) if model.variant != "fp32" else None
        measured = bench_model(model, target, run_id, report=report, base=base, **options)
        append_records(measured, out)
        records += measured
    return records


def _bench_at(
    model: ModelUnderTest,
    target: ResolvedTarget,
    run_id: str,
    specs: tuple[RuntimeSpec, ...],
    rules: BenchRules,
    report: Callable[[str], None],
    samples_dir: Path | None,
    probe: PowerProbe,
    roofline: bool,
    base: ModelUnderTest | None,
    place,
) -> list[Record]:
    x = model_inputs(model)
    reference = reference_output(model, x)
    sample = save_sample(reference, samples_dir / f"{model.name}.png") if samples_dir else None
    common = {"run_id": run_id, **model_fields(model), **target_fields(target), "env": place.environment(),
              "bench_rules": dataclasses.asdict(rules),
              "sample_png": sample and sample.relative_to(samples_dir.parent).as_posix()}

    adapters: list[Runtime] = []
    artifacts: dict[str, Artifact] = {}
    peak_rss: dict[str, int | None] = {}
    records = []
    for spec in specs:
        try:
            artifact, adapter, peak_rss[spec.name] = _load(spec, model, target, place, x, rules.threads, report)
        except NotBuildable as exc:
            records.append(not_run_record(common, spec, rules.threads, str(exc)))
            report(f"  {model.name:28s} {spec.name:12s} not run: {exc}")
            continue
        artifacts[spec.name] = artifact
        adapters.append(adapter)

    precisions = {adapter.name: executed_precision(model, adapter) for adapter in adapters}
    checks = {}
    for adapter in adapters:
        checks[adapter.name] = check_output(model, adapter.name, adapter.run(x), reference, precisions[adapter.name])
        adapter.prepare(x)
    timed, alongside = list(adapters), ""
    if base is not None and "tvm" in artifacts:  # the base in the same rounds: variant ÷ base without drift
        timed.append(place.load(runtime_registry.get("tvm"), build_artifact("tvm", base, target).path, rules.threads))
        timed[-1].prepare(x)
        alongside = f" and {base.name} on tvm"
    peaks = (_machine_peaks(model, target, {precisions[a.name] for a in adapters if a.name in BUILD_PRECISION},
                            rules.threads) if roofline and place.name == "host" else {})
    report(f"  {model.name}: timing {', '.join(a.name for a in adapters)}{alongside} on the {place.name} "
           f"({rules.samples}+ samples each, interleaved)")
    timings = time_runtimes(timed, rules)
    base_p50 = timings.pop().stats_ms()["latency_p50_ms"] if alongside else None

    stamp = datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds")
    for adapter, timing in zip(adapters, timings):
        artifact = artifacts[adapter.name]
        power = measure_energy(adapter, probe, rules)
        kernels = _roofline(model, target, adapter, peaks) if peaks and adapter.name in BUILD_PRECISION else {}
        if power.get("power_error"):
            report(f"  {model.name}: {adapter.name}: power not measured: {power['power_error']}")
        check = checks[adapter.name]
        records.append(Record(
            **common,
            runtime=adapter.name,
            threads=adapter.threads,
            executed_precision=precisions[adapter.name],
            artifact_bytes=artifact.path.stat().st_size,
            peak_rss_bytes=peak_rss[adapter.name],
            **(tvm_build_fields(artifact.build, precisions[adapter.name]) if artifact.build else {}),
            **measurement_fields(timing, check),
            base_latency_p50_ms=base_p50 if adapter.name == "tvm" else None,
            timestamp=stamp,
            **power,
            **kernels,
        ))
        record = records[-1]
        report(
            f"  {model.name:28s} {adapter.name:12s} p50 {record.latency_p50_ms:9.3f} ms  "
            f"cov {record.latency_cov:5.3f}  {record.executed_precision:4s} err {check.max_abs_err:.1e}  "
            f"{check.psnr_db:.1f} dB" + ("" if record.peak_rss_bytes is None
                                         else f"  peak RSS {record.peak_rss_bytes / 1e6:.0f} MB")
            + ("" if record.valid else "  INVALID: " + record.invalid_reason)
        )
    order = [spec.name for spec in specs]
    return sorted(records, key=lambda record: order.index(record.runtime))


def _load(spec: RuntimeSpec, model: ModelUnderTest, target: ResolvedTarget, place, x: Inputs, threads: int,
          report: Callable[[str], None]) -> tuple[Artifact, Runtime, int | None]:
    """Build the runtime's artifact, measure its peak memory where the place can (bench/memory.py) and
    load it at the place; returns the peak resident bytes too. The memory child runs the model first:
    a runtime that kills it (`Crashed`) never runs in this process and is `NotBuildable`, as is a peer
    that fails to run the model (its record says why); TVM failing otherwise is the suite's own bug."""
    if spec.name == "tvm":
        report(f"  {model.name}: building for {target.config.name} ({target.isa_level or 'no isa level'})")
    artifact = build_artifact(spec.artifact, model, target)
    if artifact.build is not None:
        report_tuning(model, target, artifact.build, report)
    try:
        peak_rss = peak_rss_bytes(spec.name, artifact.path, x, threads) if place.measures_memory else None
    except UserError as exc:
        if spec.peer or isinstance(exc, Crashed):
            raise NotBuildable(str(exc)) from exc
        raise
    try:
        return artifact, place.load(spec, artifact.path, threads), peak_rss
    except UserError:
        raise
    except Exception as exc:  # noqa: BLE001 - any peer's own error type: the record carries its message
        if not spec.peer:
            raise
        detail = (str(exc).strip().splitlines() or [type(exc).__name__])[-1]
        raise NotBuildable(f"{spec.label} could not load {artifact.path.name}: {detail}") from exc


def executed_precision(model: ModelUnderTest, adapter: Runtime) -> str:
    """What the runtime ran: an int8 model's integer path, else the float precision the runtime reports."""
    return "int8" if model.precision == "int8" else adapter.precision


def not_run_record(common: dict, spec: RuntimeSpec, threads: int, why: str) -> Record:
    return Record(**common, runtime=spec.name, threads=threads, valid=False, invalid_reason=f"not run: {why}",
                  timestamp=datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"))


@dataclass(frozen=True)
class OutputCheck:
    """One runtime's output against the reference, judged by the rule of the model's precision."""

    max_abs_err: float
    psnr_db: float
    tolerance: float | None
    min_psnr_db: float | None

    @property
    def violations(self) -> list[str]:
        reasons = []
        if self.tolerance is not None and self.max_abs_err > self.tolerance:
            reasons.append(f"max abs error {self.max_abs_err:.2e} > tolerance {self.tolerance:.0e}")
        if self.min_psnr_db is not None and self.psnr_db < self.min_psnr_db:
            reasons.append(f"output PSNR {self.psnr_db:.1f} dB < {self.min_psnr_db:.0f} dB against the reference")
        return reasons

    def fields(self) -> dict:
        return {
            "max_abs_err": self.max_abs_err,
            "tolerance": self.tolerance,
            "output_psnr_db": round(self.psnr_db, 2) if np.isfinite(self.psnr_db) else None,
            "min_output_psnr_db": self.min_psnr_db,
        }


def check_output(model: ModelUnderTest, runtime: str, output: np.ndarray, reference: np.ndarray,
                 precision: str | None = None) -> OutputCheck:
    """`output` against `reference` by the rule of `precision` (default: the model's)."""
    if output.shape != reference.shape:
        raise UserError(f"{model.name}: {runtime} output shape {output.shape} != reference {reference.shape}")
    precision = precision or model.precision
    return OutputCheck(
        max_abs_err=float(np.abs(output - reference).max()),
        psnr_db=psnr_db(torch.from_numpy(output), torch.from_numpy(reference)),
        tolerance=TOLERANCE.get(precision),
        min_psnr_db=MIN_OUTPUT_PSNR_DB.get(precision),
    )


def model_fields(model: ModelUnderTest) -> dict:
    """The Record fields that describe the model under test, the same on every target and runtime."""
    return {
        "model": model.name,
        "family": model.family,
        "variant": model.variant,
        "base_model": model.base_model or None,
        "precision": model.precision,
        "onnx_bytes": model.onnx_file().stat().st_size,
        **model.quality,
        "weights": model.weights,
        "input_shape": list(model.input_shape),
        "inputs": [spec.record() for spec in model.inputs] or None,
        "kind": model.kind,
        "params": model.params,
        "macs": model.macs,
        "size_fp32_bytes": model.size_fp32_bytes,
    }


def target_fields(target: ResolvedTarget) -> dict:
    """The Record fields that name where a measurement ran."""
    return {"target": target.config.name, "device": target.config.label, "isa_level": target.isa_level,
            "target_digest": target.digest}


def _machine_peaks(model: ModelUnderTest, target: ResolvedTarget, precisions: set[str], threads: int) -> dict:
    """The peaks a roofline of these TVM builds is judged against: the FMA's, vdpbf16ps's for a bf16
    build (and tdpbf16ps's where it has AMX tiles), vpdpbusd's for an int8 build at a VNNI level,
    tdpbusd's at an AMX one. Each is measured once per run, before any timing: measured after one, a
    runtime's thread pool still spinning halved a peak."""
    wait_for_idle_threads()
    peaks = {"fma": fma_peak_gflops(threads)}
    if "bf16" in precisions:
        peaks["bf16"] = bf16_peak_gflops(threads)
        if bf16.tiles_available(target.tvm_target):
            peaks["amx-bf16"] = amx_bf16_peak_gflops(threads)
    if model.precision == "int8" and runs_on_vnni(target.tvm_target):
        peaks["integer"] = int8_peak_gops(threads)
    if model.precision == "int8" and amx.available(target.tvm_target):
        peaks["amx-int8"] = amx_int8_peak_gops(threads)
    return peaks


def _roofline(model: ModelUnderTest, target: ResolvedTarget, adapter: TvmRuntime, peaks: dict) -> dict:
    """Record fields: the peaks (`_machine_peaks`) and each TVM kernel's share of the peak of what it
    multiplies on.

    Kernels are those compile_for_target builds, under the library's names (`prepared_kernels`).
    Integer kernels count integer ops (GOP/s), against the int8 peak where there is one.
    """
    precision = BUILD_PRECISION[adapter.name]
    wait_for_idle_threads()  # TVM's workers spin after the timing; the profile would share their cores
    flops, peak_of = _kernel_flops(prepared_kernels(model, target, precision))
    profile = kernel_profile(adapter.vm, adapter.args, flops, peaks, peak_of)
    in_bf16 = precision == "bf16"
    return {"fma_peak_gflops": peaks["fma"], "bf16_peak_gflops": peaks.get("bf16") if in_bf16 else None,
            "amx_bf16_peak_gflops": peaks.get("amx-bf16") if in_bf16 else None, "int8_peak_gops": peaks.get("integer"),
            "amx_int8_peak_gops": peaks.get("amx-int8"), "kernel_profile": profile}


def _kernel_flops(built: tvm.IRModule) -> tuple[dict[str, float], dict[str, str]]:
    """FLOPs per kernel by TVM's estimate, hand-scheduled convs' ops from their shapes; and which peak
    judges a kernel where it is not the FMA's ("bf16", or "integer").

    The estimator cannot read the hand-scheduled integer kernels (tensorized dot-product intrinsics,
    AMX tiles) or the bf16 products (a call into compile/x86_kernels), which carry their MACs instead
    (`compile.MACS_ATTR`); a kernel it cannot read otherwise is left out of the profile rather than
    failing the run. Kernels whose weights the build packs (compile/schedules/conv.py) run under a
    suffixed name.
    """
    flops: dict[str, float] = {}
    peak_of: dict[str, str] = {}
    for gvar, func in built.functions_items():
        if not isinstance(func, tvm.tirx.PrimFunc):
            continue
        name = gvar.name_hint
        if func.attrs is not None and MACS_ATTR in func.attrs:
            flops[name] = 2.0 * int(func.attrs[MACS_ATTR])
            tiles = func.attrs.get(TILES_ATTR)
            peak_of[name] = f"amx-{tiles}" if tiles else "bf16" if func.attrs.get(BF16_ATTR) else "integer"
            continue
        try:
            flops.update(kernel_flops(tvm.IRModule({name: func})))
        except RuntimeError:  # tvm.error.InternalError: an op the estimator has no rule for
            continue
        flops[name + PREPACKED] = flops[name]  # the same kernel once the build packed its weights
    return flops, peak_of


def measurement_fields(timing: Timing, check: OutputCheck) -> dict:
    """A record's timing statistics and output check; invalid when either rule was broken."""
    reasons = ([timing.invalid_reason] if timing.invalid_reason else []) + check.violations
    return {"warmup": timing.warmup, "samples": len(timing.samples_s), "duration_s": timing.duration_s,
            "valid": not reasons, "invalid_reason": "; ".join(reasons), **check.fields(), **timing.stats_ms()}


def report_tuning(model: ModelUnderTest, target: ResolvedTarget, compiled: CompiledModel,
                  report: Callable[[str], None]) -> None:
    """Say which database the build applied, or why none: a user must know whether TVM ran tuned; and for
    an int8 file, which of its ops ran as integer kernels; for a bf16 build, its calibrated plan."""
    if compiled.lowering:
        report(f"  {model.name}: {compiled.lowering}")
    if compiled.total_tasks == 0:
        report(f"  {model.name}: every kernel is hand-scheduled (integer lowering); no tuning database applies")
    elif compiled.db_records == 0:
        report(f"  {model.name}: no tuning database in autotune_logs/{{{','.join(target.db_keys)}}}/{model.name}; "
               f"TVM runs untuned (run `invoke tune --target {target.config.name} --model {model.name}`)")
    else:
        report(f"  {model.name}: applied {compiled.database} ({compiled.tuned_tasks}/{compiled.total_tasks} tasks tuned)")
        if compiled.db_skipped:
            report(f"  {model.name}: warning: {compiled.db_skipped} database records no longer replay "
                   "in this TVM and were left out")


def tvm_build_fields(build: CompiledModel, precision: str) -> dict:
    """What a TVM record says of its build: the database applied, how much of the model it tuned, its cost,
    and how it lowered its precision (an int8 file's integer kernels, a bf16 build's calibrated plan)."""
    fields = {"db_hash": build.db_hash, "tuned_tasks": f"{build.tuned_tasks}/{build.total_tasks}",
              "bf16_plan" if precision == "bf16" else "int8_lowering": build.lowering}
    if build.db_records:
        fields.update(tuned_trials=build.db_records, tuning_db=repo_relative(build.database),
                      **tuning_cost(build.database))
    return fields


def tuning_cost(database: Path) -> dict:
    """The database's tuning curve and the trials it took to come within 10% of the end, for the record."""
    curve = TuningDatabase(database).curve()
    return {"tuning_curve": [list(point) for point in curve] or None, "trials_to_10pct": trials_to_within(curve, 0.1)}


def save_sample(output: np.ndarray, path: Path) -> Path | None:
    """The first image of an NCHW RGB output in [-1, 1] as a PNG (None for other layouts)."""
    if output.ndim != 4 or output.shape[1] != 3:
        return None
    pixels = ((output[0].transpose(1, 2, 0) + 1.0) * 127.5).round().clip(0, 255).astype(np.uint8)
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(pixels).save(path)
    return path

