"""Benchmark registry models on a target: TVM beside torch eager and ONNX Runtime, in one run.

Every runtime gets the same input (a real photo that ships with scikit-image), the same thread
count and the same timing rules; every result, valid or not, becomes a `Record`.
"""

from __future__ import annotations

import datetime
import uuid
from typing import Callable

import numpy as np
import torch
import tvm
from skimage import data as skimage_data

import lwgan_models
from bench.fingerprint import REPO_ROOT, host_fingerprint
from bench.harness import Runtime, time_runtimes
from bench.record import Record
from bench.runtimes import OnnxRuntime, TorchRuntime, TvmRuntime
from compile.pipeline import compile_for_target, export_onnx
from errors import UserError
from targets import BenchRules, ResolvedTarget

RUNTIMES = ("tvm", "torch", "onnxruntime")
# Generators end in tanh, so outputs lie in [-1, 1]; fp32 reorderings stay far below this.
FP32_TOLERANCE = 2e-3


def new_run_id() -> str:
    return datetime.datetime.now(datetime.timezone.utc).strftime("%Y%m%dT%H%M%SZ-") + uuid.uuid4().hex[:6]


def test_image(shape: tuple[int, ...]) -> np.ndarray:
    """scikit-image's astronaut photo, resized to NCHW `shape` and scaled to [-1, 1]."""
    batch, channels, height, width = shape
    image = torch.from_numpy(skimage_data.astronaut()).permute(2, 0, 1).float().unsqueeze(0) / 127.5 - 1.0
    image = torch.nn.functional.interpolate(image, size=(height, width), mode="bilinear", antialias=True)
    return image[:, :channels].expand(batch, channels, height, width).contiguous().numpy()


def bench_model(
    name: str,
    target: ResolvedTarget,
    run_id: str,
    runtimes: tuple[str, ...] = RUNTIMES,
    rules: BenchRules | None = None,
    report: Callable[[str], None] = print,
    input_shape: tuple[int, ...] | None = None,
    checkpoint: str | None = None,
) -> list[Record]:
    unknown = set(runtimes) - set(RUNTIMES)
    if unknown:
        raise UserError(f"unknown runtime(s) {sorted(unknown)}; allowed: {', '.join(RUNTIMES)}")
    rules = rules or target.config.bench
    loaded = lwgan_models.load(name, checkpoint)
    shape = tuple(input_shape or loaded.spec.input_shape)
    if len(shape) != 4 or shape[1] != loaded.spec.input_shape[1]:
        raise UserError(f"{name}: input shape {shape} is not N×{loaded.spec.input_shape[1]}×H×W (NCHW)")
    x = test_image(shape)
    try:
        with torch.inference_mode():
            reference = loaded.module(torch.from_numpy(x)).numpy()
    except (RuntimeError, ValueError) as exc:
        raise UserError(f"{name}: input shape {shape} does not fit the model ({str(exc).splitlines()[0]})") from exc

    adapters: list[Runtime] = []
    artifact_bytes: dict[str, int | None] = {}
    compiled = None
    for runtime in runtimes:
        if runtime == "tvm":
            report(f"  {name}: building for {target.config.name} ({target.isa_level or 'no isa level'})")
            compiled = compile_for_target(loaded, target, shape)
            if compiled.db_records == 0:
                report(f"  {name}: no tuning database in autotune_logs/{{{','.join(target.db_keys)}}}/{name}; "
                       "TVM runs untuned (run `invoke tune`)")
            else:
                report(f"  {name}: applied {compiled.database} ({compiled.tuned_tasks}/{compiled.total_tasks} tasks tuned)")
            adapters.append(TvmRuntime(compiled.load(), tvm.cpu(), rules.threads))
            artifact_bytes["tvm"] = compiled.library.stat().st_size
        elif runtime == "torch":
            adapters.append(TorchRuntime(loaded.module, rules.threads))
            artifact_bytes["torch"] = None
        else:
            onnx_path = export_onnx(loaded, shape)
            adapters.append(OnnxRuntime(onnx_path, rules.threads))
            artifact_bytes["onnxruntime"] = onnx_path.stat().st_size

    errors = {}
    for adapter in adapters:
        output = adapter.run(x)
        if output.shape != reference.shape:
            raise UserError(f"{name}: {adapter.name} output shape {output.shape} != torch {reference.shape}")
        errors[adapter.name] = float(np.abs(output - reference).max())
        adapter.prepare(x)
    report(f"  {name}: timing {', '.join(a.name for a in adapters)} ({rules.samples}+ samples each, interleaved)")
    timings = time_runtimes(adapters, rules)

    stamp = datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds")
    records = []
    for adapter, timing in zip(adapters, timings):
        err = errors[adapter.name]
        reasons = [timing.invalid_reason] if timing.invalid_reason else []
        if err > FP32_TOLERANCE:
            reasons.append(f"max abs error {err:.2e} > tolerance {FP32_TOLERANCE:.0e}")
        is_tvm = adapter.name == "tvm"
        records.append(
            Record(
                run_id=run_id,
                model=name,
                family=loaded.spec.family,
                variant="fp32",
                weights=loaded.weights,
                input_shape=list(shape),
                params=loaded.params,
                macs=loaded.macs,
                size_fp32_bytes=loaded.size_fp32_bytes,
                target=target.config.name,
                device=target.config.label,
                isa_level=target.isa_level,
                runtime=adapter.name,
                threads=adapter.threads,
                artifact_bytes=artifact_bytes[adapter.name],
                tuned_trials=compiled.db_records if is_tvm and compiled.db_records else None,
                db_hash=compiled.db_hash if is_tvm else None,
                tuning_db=str(compiled.database.relative_to(REPO_ROOT)) if is_tvm and compiled.db_records else None,
                tuned_tasks=f"{compiled.tuned_tasks}/{compiled.total_tasks}" if is_tvm else None,
                warmup=timing.warmup,
                samples=len(timing.samples_s),
                duration_s=timing.duration_s,
                valid=not reasons,
                invalid_reason="; ".join(reasons),
                max_abs_err=err,
                tolerance=FP32_TOLERANCE,
                env=host_fingerprint(),
                timestamp=stamp,
                **timing.stats_ms(),
            )
        )
        report(
            f"  {name:28s} {adapter.name:12s} p50 {records[-1].latency_p50_ms:9.3f} ms  "
            f"cov {records[-1].latency_cov:5.3f}  err {err:.1e}{'' if not reasons else '  INVALID: ' + records[-1].invalid_reason}"
        )
    return records
