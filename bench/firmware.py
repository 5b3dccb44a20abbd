"""Benchmark a model as microcontroller firmware: export to C, build, run once under qemu, record.

The firmware path has no TVM runtime: compile's "c" backend writes the model as C, targets/mcu.py
builds it with arm-none-eabi-gcc against the part's flash and RAM budgets and runs it under
qemu-system-arm. What is measured is deterministic (image sizes, the planned arena, executed
instructions), so one run suffices and there is no latency: qemu does not model a core's timing.

Correctness uses the suite's rules (bench/run.py `check_output`): fp32 against torch within
max abs error 2e-3; int8 against its QDQ file run by ONNX Runtime with graph optimisations off,
by whole-image PSNR >= 30 dB (integer requantization may flip single rounding steps).
"""

from __future__ import annotations

import dataclasses
import datetime
import os
import shutil
from pathlib import Path
from typing import Callable

import numpy as np

from bench.fingerprint import host_fingerprint
from bench.record import Record
from bench.run import (
    check_output,
    model_fields,
    reference_output,
    save_sample,
    target_fields,
    test_image,
)
from compile.backends import compile_for_target
from compile.build import CACHE_DIR
from compile.pipeline import ModelUnderTest
from targets import ResolvedTarget
from targets.mcu import (
    CExport,
    Firmware,
    FirmwareTooLarge,
    McuPart,
    build_firmware,
    mcu_part,
    plugin_library,
    run_firmware,
)

RUNTIME = "c-firmware"
FIRMWARE_DIR = CACHE_DIR / "firmware"


def export_dir(model: ModelUnderTest, ram_lean: bool) -> Path:
    """Where a model's C export is kept: it does not depend on the target, so every target reuses it."""
    return FIRMWARE_DIR / "exports" / f"{model.name}-{model.digest}{'-ram-lean' if ram_lean else ''}"


def firmware_dir(model: ModelUnderTest, target: ResolvedTarget) -> Path:
    """Where the export plus a target's harness, linker script and firmware are built (kept for inspection)."""
    return FIRMWARE_DIR / target.config.name / f"{model.name}-{model.digest}"


def export_and_build(model: ModelUnderTest, target: ResolvedTarget, project_dir: Path,
                     report: Callable[[str], None] = print, export_dir: Callable[[bool], Path] | None = None,
                     part: McuPart | None = None) -> tuple[CExport, Firmware]:
    """Export `model` as C into `project_dir` (compile's backend of the target's kind) and build its
    firmware for `part` (default: the target's part).

    The first export keeps paddings as buffers (fewer instructions); if that overflows the part's
    RAM, the model is exported again computing paddings inside the convolutions (less RAM).
    With `export_dir(ram_lean)`, exports are kept there (reusable across targets) and copied.
    """
    part = part or mcu_part(target.config)
    ram_lean = False
    while True:
        where = export_dir(ram_lean) if export_dir else project_dir
        export = compile_for_target(model, target, out_dir=where, report=report, ram_lean=ram_lean)
        if where != project_dir:
            shutil.copytree(where, project_dir, dirs_exist_ok=True)
            export = dataclasses.replace(export, directory=project_dir)
        try:
            return export, build_firmware(export, part, report=report)
        except FirmwareTooLarge as exc:
            if ram_lean or "RAM" not in exc.overflow:
                raise
            report(f"  {model.name}: {exc}; exporting again with paddings computed inside the convolutions")
            ram_lean = True


def bench_firmware(
    model: ModelUnderTest,
    target: ResolvedTarget,
    run_id: str,
    report: Callable[[str], None] = print,
    samples_dir: Path | None = None,
) -> list[Record]:
    """Export, build and run `model` on a qemu-system target; one Record (runtime "c-firmware")."""
    part = mcu_part(target.config)
    x = test_image(model.input_shape)
    reference = reference_output(model, x)
    sample = save_sample(reference, samples_dir / f"{model.name}.png") if samples_dir else None

    report(f"  {model.name}: exporting C for {part.target} ({model.precision}, input {'x'.join(map(str, model.input_shape))})")
    export, firmware = export_and_build(model, target, firmware_dir(model, target), report,
                                        export_dir=lambda ram_lean: export_dir(model, ram_lean), part=part)
    report(f"  {model.name}: running under qemu-system-arm -M {part.machine}")
    run = run_firmware(firmware, part, x.astype(export.input.dtype).tobytes(), export.output.nbytes,
                       plugin=plugin_library(FIRMWARE_DIR / "tools") if part.cycles else None)
    cycles = run.cycles_estimate(part.cycles)
    output = np.frombuffer(run.output, dtype=export.output.dtype).reshape(export.output.shape).copy()
    check = check_output(model, RUNTIME, output, reference)
    reasons = check.violations

    record = Record(
        run_id=run_id,
        **model_fields(model),
        **target_fields(target),
        runtime=RUNTIME,
        threads=1,
        artifact_bytes=firmware.flash_bytes,  # the image written to flash
        samples=1,
        valid=not reasons,
        invalid_reason="; ".join(reasons),
        **check.fields(),
        sample_png=sample and sample.relative_to(samples_dir.parent).as_posix(),
        power_source=target.config.power_source,
        flash_bytes=firmware.flash_bytes,
        ram_bytes=firmware.ram_bytes,
        arena_bytes=export.arena_bytes,
        instructions=run.instructions,
        instruction_mix=run.instruction_mix,
        cycle_table=part.cycles or None,
        cycles_estimate=cycles,
        toolchain=firmware.toolchain,
        env={**host_fingerprint(), "load_1m_at_start": round(os.getloadavg()[0], 2)},
        timestamp=datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
    )
    report(
        f"  {model.name:28s} {RUNTIME:12s} {run.instructions / 1e6:9.2f} M instructions"
        + (f" ~{cycles / 1e6:.2f} M cycles (estimate, {model.macs / cycles:.2f} MACs/cycle)" if cycles else "")
        + f"  flash {firmware.flash_bytes} B  "
        f"RAM {firmware.ram_bytes} B (arena {export.arena_bytes} B)  err {check.max_abs_err:.1e}  {check.psnr_db:.1f} dB"
        + ("" if not reasons else "  INVALID: " + record.invalid_reason)
    )
    return [record]
