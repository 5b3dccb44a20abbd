"""ONNX Runtime, CPU execution provider: the ONNX file as exported (QDQ int8 files through its int8 kernels)."""

from __future__ import annotations

import time
from pathlib import Path

import numpy as np

from bench.runtimes import RuntimeSpec, register


class OnnxRuntime:
    name = "onnxruntime"
    precision = "fp32"

    def __init__(self, onnx_path: Path, threads: int) -> None:
        import onnxruntime as ort

        options = ort.SessionOptions()
        options.intra_op_num_threads = threads
        options.inter_op_num_threads = 1
        # Spinning threads would steal the cores from the runtimes timed after this one.
        options.add_session_config_entry("session.intra_op.allow_spinning", "0")
        self.session = ort.InferenceSession(str(onnx_path), options, providers=["CPUExecutionProvider"])
        self.input_name = self.session.get_inputs()[0].name
        self.threads = threads

    def prepare(self, x: np.ndarray) -> None:
        self.feed = {self.input_name: x}

    def run(self, x: np.ndarray) -> np.ndarray:
        return self.session.run(None, {self.input_name: x})[0]

    def measure(self, n: int) -> list[float]:
        samples = []
        for _ in range(n):
            start = time.perf_counter()
            self.session.run(None, self.feed)
            samples.append(time.perf_counter() - start)
        return samples


SPEC = register(RuntimeSpec(name="onnxruntime", label="ORT", artifact="onnx", load=OnnxRuntime,
                            package="onnxruntime", places=("host", "board")))
