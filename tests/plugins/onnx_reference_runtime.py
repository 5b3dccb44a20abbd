"""A runtime plug-in from outside bench/runtimes/: ONNX's own reference evaluator (pure numpy).

tests/test_runtimes.py registers it by importing this file, and shows that it reaches the bench
records, the peak-memory child and the report with no other module edited.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np

from bench.runtimes import RuntimeSpec, register, time_calls


class OnnxReference:
    name = "onnx-reference"
    precision = "fp32"

    def __init__(self, onnx_path: Path, threads: int) -> None:
        from onnx.reference import ReferenceEvaluator

        self.evaluator = ReferenceEvaluator(str(onnx_path))
        self.input_name = self.evaluator.input_names[0]
        self.threads = threads

    def prepare(self, x: np.ndarray) -> None:
        self.x = x

    def run(self, x: np.ndarray) -> np.ndarray:
        return self.evaluator.run(None, {self.input_name: x})[0]

    def measure(self, n: int) -> list[float]:
        return time_calls(lambda: self.evaluator.run(None, {self.input_name: self.x}), n)


SPEC = register(RuntimeSpec(name="onnx-reference", label="ONNX reference", artifact="onnx", load=OnnxReference,
                            package="onnx"))
