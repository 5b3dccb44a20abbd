"""A runtime plug-in whose first inference kills its process with SIGILL, as a kernel the CPU rejects
would (an AMX tile configuration it does not accept). tests/test_runtimes.py benchmarks it beside TVM."""

from __future__ import annotations

import os
import signal
from pathlib import Path

import numpy as np

from bench.runtimes import RuntimeSpec, register


class Crashing:
    name = "crashing"
    precision = "fp32"

    def __init__(self, onnx_path: Path, threads: int) -> None:
        self.threads = threads

    def prepare(self, x: np.ndarray) -> None:
        pass

    def run(self, x: np.ndarray) -> np.ndarray:
        os.kill(os.getpid(), signal.SIGILL)
        raise AssertionError("SIGILL did not end the process")

    def measure(self, n: int) -> list[float]:
        return [self.run(None)]


SPEC = register(RuntimeSpec(name="crashing", label="Crashing", artifact="onnx", load=Crashing, package="onnx"))
