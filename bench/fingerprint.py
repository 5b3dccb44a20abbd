"""The environment a measurement was taken in, stored with every record."""

from __future__ import annotations

import functools
import os
import platform
import subprocess
from pathlib import Path

REPO_ROOT = Path(__file__).resolve().parent.parent


def _cpu_model() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def _git_sha() -> str:
    try:
        sha = subprocess.run(
            ["git", "rev-parse", "--short=12", "HEAD"], cwd=REPO_ROOT, capture_output=True, text=True, check=True
        ).stdout.strip()
        dirty = subprocess.run(["git", "status", "--porcelain", "--untracked-files=no"], cwd=REPO_ROOT,
                               capture_output=True, text=True).stdout.strip()
        return sha + ("-dirty" if dirty else "")
    except (OSError, subprocess.CalledProcessError):
        return "unknown"


@functools.cache
def host_fingerprint() -> dict:
    """This machine and the version of every installed runtime package (bench/runtimes/)."""
    import numpy
    import tvm

    from bench.runtimes import installed

    return {
        "cpu": _cpu_model(),
        "llvm_cpu": tvm.target.codegen.llvm_get_system_cpu(),
        "cores": os.cpu_count(),
        "os": f"{platform.system()} {platform.release()}",
        "machine": platform.machine(),
        "python": platform.python_version(),
        "numpy": numpy.__version__,
        **{spec.package: spec.version() for spec in installed()},
        "git_sha": _git_sha(),
    }
