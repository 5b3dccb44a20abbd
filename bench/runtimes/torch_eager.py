"""torch eager: the model as written, the reference every generator's output is checked against."""

from __future__ import annotations

from pathlib import Path

import numpy as np

from bench.runtimes import Inputs, RuntimeSpec, only_input, register, time_calls


class TorchRuntime:
    name = "torch"
    precision = "fp32"

    def __init__(self, module, threads: int) -> None:
        import torch

        self.module = module.eval()
        self.threads = threads
        torch.set_num_threads(threads)

    def prepare(self, x: Inputs) -> None:
        import torch

        self.x = torch.from_numpy(only_input(x, self.name))

    def run(self, x: Inputs) -> np.ndarray:
        import torch

        with torch.inference_mode():
            return self.module(torch.from_numpy(only_input(x, self.name))).numpy()

    def measure(self, n: int) -> list[float]:
        import torch

        with torch.inference_mode():
            return time_calls(lambda: self.module(self.x), n)


    def op_profile(self, runs: int) -> list[dict]:
        """torch.profiler's per-operator CPU time (self time, so nested ops are not counted twice)."""
        import torch

        with torch.inference_mode():
            self.module(self.x)  # warm-up
            with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CPU]) as profiler:
                for _ in range(runs):
                    self.module(self.x)
        return [{"op": event.key, "type": "aten op", "calls": event.count / runs,
                 "ms": event.self_cpu_time_total / 1e3 / runs}
                for event in profiler.key_averages() if event.self_cpu_time_total > 0]


def load(pickled_module: Path, threads: int) -> TorchRuntime:
    """The suite's own pickle of the module (compile/artifacts.py writes it), never a user's file."""
    import torch

    return TorchRuntime(torch.load(pickled_module, weights_only=False), threads)


SPEC = register(RuntimeSpec(name="torch", label="torch", artifact="torch", load=load, package="torch"))
