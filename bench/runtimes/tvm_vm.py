"""TVM: a compiled Relax VM, in this process or on a board over RPC, timed by TVM's own evaluator."""

from __future__ import annotations

import contextlib
import os
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np

from bench.runtimes import Inputs, RuntimeSpec, input_arrays, register
from errors import UserError

if TYPE_CHECKING:
    import tvm


@contextlib.contextmanager
def kept_cpu_affinity():
    """Undo TVM's pinning of the calling thread to core 0 (its `config_threadpool` does that where a
    user pins TVM's threads, `TVM_BIND_THREADS=1`; targets/threads.py leaves them unpinned).

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
    precision = "fp32"  # int8 models run integer kernels; the record takes that from the model

    def __init__(self, vm: "tvm.relax.VirtualMachine", device: "tvm.runtime.Device", threads: int,
                 runtime_function=None) -> None:
        """`runtime_function` looks up the runtime's own functions (a board's, over RPC); default this process's.

        A pool that cannot run `threads` threads is an error, not a slower record.
        """
        import tvm

        from targets.threads import ENV, size_tvm_thread_pool, usable_cpus

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

    def prepare(self, x: Inputs) -> None:
        self.args = self._tensors(x)

    def run(self, x: Inputs) -> np.ndarray:
        return self.vm["main"](*self._tensors(x)).numpy()

    def _tensors(self, x: Inputs) -> list:
        """`main`'s arguments: the inputs in the graph's order, which is its parameter order."""
        import tvm

        return [tvm.runtime.tensor(array, self.device) for array in input_arrays(x)]

    def measure(self, n: int) -> list[float]:
        if n <= 0:
            return []
        evaluator = self.vm.time_evaluator("main", self.device, number=1, repeat=n)
        return [float(s) for s in evaluator(*self.args).results]

    def op_profile(self, runs: int) -> list[dict]:
        """Per kernel the VM calls: calls and ms per inference (the inputs given to `prepare`)."""
        return [{"op": name, "type": "tir kernel", "calls": len(seconds) / runs, "ms": 1e3 * sum(seconds) / runs}
                for name, seconds in kernel_times(self.vm, self.args, runs).items()]


def kernel_times(vm, args: list, runs: int, keep=lambda name: True) -> dict[str, list[float]]:
    """Seconds of every call of each kernel `keep` accepts over `runs` inferences, after one warm-up.

    Each call is timed on the host around the VM's call instruction; CPU kernels run synchronously,
    so that is the kernel's time (plus a few microseconds of hook overhead).
    """
    import time

    totals: dict[str, list[float]] = {}
    started: dict[str, float] = {}

    def instrument(func, name, before_run, ret_value, *args):
        if not keep(name):
            return 0
        if before_run:
            started[name] = time.perf_counter()
        else:
            totals.setdefault(name, []).append(time.perf_counter() - started.pop(name))
        return 0

    vm.set_instrument(instrument)
    try:
        vm["main"](*args)  # warm-up
        totals.clear()
        for _ in range(runs):
            vm["main"](*args)
    finally:
        vm.set_instrument(lambda *args: 0)
    return totals


class RemoteTvmRuntime(TvmRuntime):
    """A Relax VM on a board: the library uploaded through an RPC session, the board's thread pool.

    A board that goes away mid-run (killed, rebooted, unplugged) is a one-line error naming it."""

    def __init__(self, session, library: Path, threads: int, board: str) -> None:
        from tvm import relax

        self.session = session  # keeps the board's session (and what it loaded) open
        self.board = board
        session.upload(str(library), library.name)
        device = session.cpu()
        super().__init__(relax.VirtualMachine(session.load_module(library.name), device), device, threads,
                         runtime_function=session.get_function)

    def run(self, x: Inputs) -> np.ndarray:
        try:
            return super().run(x)
        except RuntimeError as exc:
            raise board_lost(self.board, self.name, exc) from exc

    def measure(self, n: int) -> list[float]:
        try:
            return super().measure(n)
        except RuntimeError as exc:
            raise board_lost(self.board, self.name, exc) from exc


def board_lost(board: str, runtime: str, exc: Exception) -> UserError:
    detail = str(exc).strip().splitlines()
    return UserError(f"board {board!r}: {runtime} failed on the board ({detail[-1] if detail else type(exc).__name__})")


BUILD_PRECISION = {"tvm": "fp32", "tvm-bf16": "bf16"}  # TVM's runtimes: the precision each build runs a float model in


def load(library: Path, threads: int, name: str = "tvm") -> TvmRuntime:
    """The library in the Relax VM of TVM's runtime (`tvm.runtime.vm`: no compiler needed, so it also loads
    in a process that has only libtvm_runtime, as a device serving the model would)."""
    import tvm
    from tvm.runtime.vm import VirtualMachine

    runtime = TvmRuntime(VirtualMachine(tvm.runtime.load_module(str(library)), tvm.cpu()), tvm.cpu(), threads)
    runtime.name, runtime.precision = name, BUILD_PRECISION[name]
    return runtime


# A device serving a TVM library loads libtvm_runtime alone (TVM_USE_RUNTIME_LIB=1: 3 MB, where the
# compiler's library is 260 MB), and has no torch, which tvm_ffi imports whenever it is installed:
# with both, the peak-memory child read 445 MB for a U-Net that needs 131.
SERVING_ENV = (("TVM_USE_RUNTIME_LIB", "1"),)
SERVING_WITHOUT = ("torch",)
SPEC = register(RuntimeSpec(name="tvm", label="TVM", artifact="tvm", load=load, package="apache-tvm",
                            places=("host", "board"), peer=False, serving_env=SERVING_ENV,
                            serving_without=SERVING_WITHOUT))
# The same model built to multiply in bf16 (compile/bf16.py), on hosts with AVX-512 BF16 (or AMX, which has it too).
SPEC_BF16 = register(RuntimeSpec(name="tvm-bf16", label="TVM bf16", artifact="tvm-bf16", package="apache-tvm",
                                 peer=False, load=lambda library, threads: load(library, threads, "tvm-bf16"),
                                 serving_env=SERVING_ENV, serving_without=SERVING_WITHOUT))
