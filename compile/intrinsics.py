"""Register only the CPU tensor intrinsics MetaSchedule can use for our targets.

`import tvm.s_tir.tensor_intrin` parses every intrinsic TVM ships as TVMScript; on this 2-core
machine that took 65 s per process, 55 s of it for CUDA, ROCm and Hexagon intrinsics no target of
ours (x86, Arm Cortex-A, Mali via OpenCL, Cortex-M) can use. MetaSchedule imports the package in
every TuneContext and in every builder worker pool (one per batch), which made a 64-trial batch
spend minutes importing. Marking those submodules as already imported skips them; the x86 (VNNI)
and Arm (dotprod) intrinsics are registered as usual.
"""

import sys
import types

GPU_ONLY = ("cuda", "rocm", "hexagon", "metal")


def register_cpu_tensor_intrinsics() -> None:
    if "tvm.s_tir.tensor_intrin" in sys.modules:
        return
    for name in GPU_ONLY:
        full = f"tvm.s_tir.tensor_intrin.{name}"
        sys.modules.setdefault(full, types.ModuleType(full, "skipped: GPU-only intrinsics (see compile/intrinsics.py)"))
    import tvm.s_tir.tensor_intrin  # noqa: F401  (registers x86, arm_cpu, riscv_cpu)
