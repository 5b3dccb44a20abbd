"""LiteRT (TensorFlow Lite) with its default XNNPACK delegate: what Android and ARM Linux apps ship.

The .tflite file is converted from the torch generator by litert-torch (compile/artifacts.py).
The interpreter's default op resolver applies XNNPACK to every op it supports; the thread count
is given to the interpreter, which hands it to XNNPACK's pool. fp32 models run fp32 (XNNPACK only
drops to fp16 when a model asks for it).
"""

from __future__ import annotations

from pathlib import Path

import numpy as np

from bench.runtimes import Inputs, RuntimeSpec, only_input, register, time_calls


class LiteRtRuntime:
    name = "litert"
    precision = "fp32"

    def __init__(self, tflite_path: Path, threads: int) -> None:
        from ai_edge_litert.interpreter import Interpreter

        self.interpreter = Interpreter(model_path=str(tflite_path), num_threads=threads)
        self.interpreter.allocate_tensors()
        self.input_index = self.interpreter.get_input_details()[0]["index"]
        self.output_index = self.interpreter.get_output_details()[0]["index"]
        self.threads = threads

    def prepare(self, x: Inputs) -> None:
        self.interpreter.set_tensor(self.input_index, only_input(x, self.name))

    def run(self, x: Inputs) -> np.ndarray:
        self.prepare(x)
        self.interpreter.invoke()
        return self.interpreter.get_tensor(self.output_index).copy()

    def measure(self, n: int) -> list[float]:
        return time_calls(self.interpreter.invoke, n)


SPEC = register(RuntimeSpec(name="litert", label="LiteRT", artifact="tflite", load=LiteRtRuntime,
                            package="ai-edge-litert", places=("host", "board")))
