"""Runtime adapters for the harness: torch eager, ONNX Runtime and a TVM Relax VM.

Each sets its thread count explicitly (recorded with the result) and times inferences on an input
prepared once, so only inference is measured.
"""

from __future__ import annotations

import contextlib
import os
import time
from pathlib import Path

import numpy as np
import onnxruntime as ort
import torch
import tvm

from errors import UserError
from targets.threads import ENV, size_tvm_thread_pool, usable_cpus


class TorchRuntime:
    name = "torch"

    def __init__(self, module: torch.nn.Module, threads: int) -> None:
        self.module = module.eval()
        self.threads = threads
        torch.set_num_threads(threads)

    def prepare(self, x: np.ndarray) -> None:
        self.x = torch.from_numpy(x)

    def run(self, x: np.ndarray) -> np.ndarray:
        with torch.inference_mode():
            return self.module(torch.from_numpy(x)).numpy()

    def measure(self, n: int) -> list[float]:
        samples = []
        with torch.inference_mode():
            for _ in range(n):
                start = time.perf_counter()
                self.module(self.x)
                samples.append(time.perf_counter() - start)
        return samples


class OnnxRuntime:
    name = "onnxruntime"

    def __init__(self, onnx_path: Path, threads: int) -> None:
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


@contextlib.contextmanager
def kept_cpu_affinity():
    """Undo TVM's pinning of the calling thread to core 0 (its `config_threadpool` does that).

    Every thread created later inherits the pin: ONNX Runtime's and torch's pools started after
    it ran on one core (the process's affinity read {0} after TVM's thread pool was set up), so a
    side-by-side comparison handicapped them. TVM's own workers keep their cores.
    """
    cores = os.sched_getaffinity(0)
    try:
        yield
    finally:
        os.sched_setaffinity(0, cores)


class TvmRuntime:
    """A compiled Relax VM; timed by TVM's own evaluator, which also works over RPC."""

    name = "tvm"

    def __init__(self, vm: tvm.relax.VirtualMachine, device: tvm.runtime.Device, threads: int,
                 runtime_function=None) -> None:
        """`runtime_function` looks up the runtime's own functions (a board's, over RPC); default this process's.

        A pool that cannot run `threads` threads is an error, not a slower record.
        """
        if runtime_function is None:
            size_tvm_thread_pool()
            with kept_cpu_affinity():
                tvm.get_global_func("runtime.config_threadpool")(1, threads)
            running = tvm.get_global_func("runtime.NumThreads")()
        else:
            runtime_function("runtime.config_threadpool")(1, threads)
            running = runtime_function("runtime.NumThreads")()
        if running != threads:
            raise UserError(f"TVM's thread pool runs {running} threads where the target asks for {threads} "
                            f"(this process may use {usable_cpus()} CPUs; {ENV}="
                            f"{os.environ.get(ENV, 'unset')})")
        self.vm = vm
        self.device = device
        self.threads = threads

    def prepare(self, x: np.ndarray) -> None:
        self.x = tvm.runtime.tensor(x, self.device)

    def run(self, x: np.ndarray) -> np.ndarray:
        return self.vm["main"](tvm.runtime.tensor(x, self.device)).numpy()

    def measure(self, n: int) -> list[float]:
        if n <= 0:
            return []
        evaluator = self.vm.time_evaluator("main", self.device, number=1, repeat=n)
        return [float(s) for s in evaluator(self.x).results]
