"""ONNX Runtime, CPU execution provider: the ONNX file as exported (QDQ int8 files through its int8 kernels)."""

from __future__ import annotations

from pathlib import Path

import numpy as np

from bench.runtimes import Inputs, RuntimeSpec, named_inputs, register, time_calls


class OnnxRuntime:
    name = "onnxruntime"
    precision = "fp32"

    def __init__(self, onnx_path: Path, threads: int, profile_prefix: str | None = None) -> None:
        import onnxruntime as ort

        self.onnx_path = onnx_path
        options = ort.SessionOptions()
        if profile_prefix:
            options.enable_profiling, options.profile_file_prefix = True, profile_prefix
        options.intra_op_num_threads = threads
        options.inter_op_num_threads = 1
        # Spinning threads would steal the cores from the runtimes timed after this one.
        options.add_session_config_entry("session.intra_op.allow_spinning", "0")
        self.session = ort.InferenceSession(str(onnx_path), options, providers=["CPUExecutionProvider"])
        self.input_name = self.session.get_inputs()[0].name
        self.threads = threads

    def prepare(self, x: Inputs) -> None:
        self.feed = named_inputs(x, self.input_name)

    def run(self, x: Inputs) -> np.ndarray:
        return self.session.run(None, named_inputs(x, self.input_name))[0]

    def measure(self, n: int) -> list[float]:
        return time_calls(lambda: self.session.run(None, self.feed), n)

    def op_profile(self, runs: int) -> list[dict]:
        """ONNX Runtime's profiler trace (SessionOptions.enable_profiling): each node's kernel time."""
        import json
        import tempfile

        with tempfile.TemporaryDirectory() as folder:
            profiled = OnnxRuntime(self.onnx_path, self.threads, profile_prefix=str(Path(folder) / "ort"))
            profiled.session.run(None, self.feed)  # warm-up: each node's first event, dropped below
            for _ in range(runs):
                profiled.session.run(None, self.feed)
            events = json.loads(Path(profiled.session.end_profiling()).read_text())
        totals: dict[str, dict] = {}
        for event in events:
            if event.get("cat") == "Node" and event["name"].endswith("_kernel_time"):
                node = event["name"][: -len("_kernel_time")]
                row = totals.setdefault(node, {"op": node, "type": event["args"].get("op_name", ""), "samples": []})
                row["samples"].append(event["dur"] / 1e3)
        return [{"op": row["op"], "type": row["type"], "calls": len(row["samples"][1:]) / runs,
                 "ms": sum(row["samples"][1:]) / runs} for row in totals.values()]


SPEC = register(RuntimeSpec(name="onnxruntime", label="ORT", artifact="onnx", load=OnnxRuntime,
                            package="onnxruntime", places=("host", "board")))
