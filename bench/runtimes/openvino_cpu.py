"""OpenVINO on the CPU: its default setting, and its inference precision forced to f32.

OpenVINO's default inference precision follows the CPU: bf16 where the CPU has AMX or AVX-512
BF16, f32 elsewhere, without saying so. `openvino` keeps that default (what a user who installs
it gets) and reports the precision the compiled model actually uses; `openvino-f32` forces f32
for a like-for-like comparison with fp32 TVM. QDQ int8 files run OpenVINO's int8 path (its
low-precision transformations fold the QuantizeLinear/DequantizeLinear pairs into int8 kernels).
Threads are set explicitly and the latency hint keeps one stream, as every other runtime here.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np

from bench.runtimes import Inputs, RuntimeSpec, named_inputs, register, time_calls

PRECISIONS = {"f32": "fp32", "bf16": "bf16", "f16": "fp16"}  # OpenVINO's element type names -> the suite's


class OpenVinoRuntime:
    def __init__(self, onnx_path: Path, threads: int, name: str, inference_precision: str | None,
                 profile: bool = False) -> None:
        self.onnx_path, self.inference_precision = onnx_path, inference_precision
        import openvino as ov

        config = {"PERFORMANCE_HINT": "LATENCY", "NUM_STREAMS": 1, "INFERENCE_NUM_THREADS": threads,
                  "PERF_COUNT": profile}
        if inference_precision:
            config["INFERENCE_PRECISION_HINT"] = inference_precision
        self.compiled = ov.Core().compile_model(str(onnx_path), "CPU", config)
        self.request = self.compiled.create_infer_request()
        self.name = name
        self.threads = int(self.compiled.get_property("INFERENCE_NUM_THREADS"))
        used = self.compiled.get_property("INFERENCE_PRECISION_HINT").get_type_name()
        self.precision = PRECISIONS.get(used, used)

    def prepare(self, x: Inputs) -> None:
        import openvino as ov

        for name, array in self._feeds(x).items():
            self.request.set_tensor(name, ov.Tensor(array))

    def run(self, x: Inputs) -> np.ndarray:
        return self.compiled(self._feeds(x))[0].copy()

    def _feeds(self, x: Inputs) -> dict[str, np.ndarray]:
        feeds = named_inputs(x, self.compiled.inputs[0].get_any_name())
        return {name: np.ascontiguousarray(array) for name, array in feeds.items()}

    def measure(self, n: int) -> list[float]:
        return time_calls(self.request.infer, n)

    def op_profile(self, runs: int) -> list[dict]:
        """OpenVINO's own per-node counters (what benchmark_app's -report_type prints), its kernel as the type."""
        profiled = OpenVinoRuntime(self.onnx_path, self.threads, self.name, self.inference_precision, profile=True)
        for port in self.compiled.inputs:
            profiled.request.set_tensor(port.get_any_name(), self.request.get_tensor(port.get_any_name()))
        profiled.request.infer()  # warm-up
        totals: dict[str, dict] = {}
        for _ in range(runs):
            profiled.request.infer()
            for node in profiled.request.get_profiling_info():
                if node.status.name != "EXECUTED":
                    continue
                row = totals.setdefault(node.node_name, {"op": node.node_name, "type": f"{node.node_type} "
                                                         f"({node.exec_type})", "calls": 0.0, "ms": 0.0})
                row["calls"] += 1 / runs
                row["ms"] += node.real_time.total_seconds() * 1e3 / runs
        return list(totals.values())


SPEC = register(RuntimeSpec(
    name="openvino", label="OpenVINO", artifact="onnx", package="openvino",
    load=lambda onnx_path, threads: OpenVinoRuntime(onnx_path, threads, "openvino", None)))
SPEC_F32 = register(RuntimeSpec(
    name="openvino-f32", label="OpenVINO f32", artifact="onnx", package="openvino",
    load=lambda onnx_path, threads: OpenVinoRuntime(onnx_path, threads, "openvino-f32", "f32")))
