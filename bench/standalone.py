"""Builds for devices whose code is not timed here (`invoke build`): a microcontroller's standalone C
project and firmware, which `make run` runs under qemu on the test image; a GPU board's library, whose
OpenCL kernels are built and run with pocl in TVM's launch order and checked against the reference,
since there is no GPU here."""

from __future__ import annotations

from pathlib import Path
from typing import Callable

import numpy as np

from bench.firmware import export_and_build
from bench.run import OutputCheck, check_output, reference_output, test_image
from compile.backends import compile_for_target
from compile.backends.opencl import build_kernels, run_on_pocl
from compile.pipeline import ModelUnderTest
from targets import ResolvedTarget
from targets.mcu import mcu_part

BUILD_DIR = Path(__file__).resolve().parent.parent / "build"


def build_standalone(model: ModelUnderTest, target: ResolvedTarget, out: Path | None = None,
                     report: Callable[[str], None] = print) -> OutputCheck | None:
    """Build `model` for `target` into `out` (default build/firmware/<target>-<model> or build/opencl/<target>);
    returns the pocl run's check of an OpenCL board's build (None for a microcontroller's)."""
    if target.config.tvm["kind"] == "opencl":
        return _opencl_checked(model, target, out, report)
    _firmware_project(model, target, out, report)
    return None


def _firmware_project(model: ModelUnderTest, target: ResolvedTarget, out: Path | None,
                      report: Callable[[str], None]) -> None:
    part = mcu_part(target.config)
    directory = out or BUILD_DIR / "firmware" / f"{part.target}-{model.name}"
    export, firmware = export_and_build(model, target, directory, report=report, part=part)
    test_image(model.input_shape).astype(np.dtype(export.input.dtype)).tofile(directory / "input.bin")
    report(f"{directory}: model.h declares model_run(input, output); drop model.c, model.h, kernels.c, tvm_shim.c "
           f"and include/ into a firmware. Weights {export.weights_bytes} B (flash), activation arena "
           f"{export.arena_bytes} B; this build: flash {firmware.flash_bytes} B, RAM {firmware.ram_bytes} B. "
           f"`make -C {directory} run` runs it under qemu on input.bin (the test image).")


def _opencl_checked(model: ModelUnderTest, target: ResolvedTarget, out: Path | None,
                    report: Callable[[str], None]) -> OutputCheck:
    """The board's library and OpenCL C; every kernel compiled by pocl, then run in TVM's launch order and the
    output checked against the reference."""
    report(f"{model.name}: compiling for {target.config.label}")
    artifact = compile_for_target(model, target, out_dir=out)
    kernels = build_kernels(artifact.source_file)
    report(f"{artifact.library} ({artifact.library.stat().st_size} B) and {artifact.source_file}: "
           f"{len(kernels)} kernels, all built by pocl's OpenCL C compiler ({artifact.compile_s:.0f} s to compile)")
    x = test_image(model.input_shape)
    check = check_output(model, "opencl-pocl", run_on_pocl(artifact, x, kernels), reference_output(model, x))
    report(f"run on pocl (CPU) in TVM's launch order: max abs error {check.max_abs_err:.1e}, {check.psnr_db:.1f} dB "
           "against the reference" + ("" if not check.violations else "; " + "; ".join(check.violations)))
    return check
