"""TVM's CPU thread pool, sized to every CPU this process may use, as ONNX Runtime's and torch's are.

TVM sizes its pool once per OS thread, from TVM_NUM_THREADS if set, else from half the logical CPUs
on x86 (it assumes two hyper-threads per core), and `runtime.config_threadpool` can only narrow it.
On a VM whose vCPUs are whole cores that halves the machine: on this 2-vCPU host every TVM kernel
ran on one thread while ONNX Runtime used two.
"""

from __future__ import annotations

import os

from errors import UserError

ENV = "TVM_NUM_THREADS"
# TVM pins each worker thread to a core unless this is "0". With another process busy on one of this
# machine's 2 cores, a worker pinned there made every kernel wait for it: TVM bf16 resnet6 ran 2.05x
# as long in 4 of 9 runs (the pin's luck), unpinned 1.0-1.07x in 6 of 6; unloaded, the same.
BIND_ENV = "TVM_BIND_THREADS"


def usable_cpus() -> int:
    """The CPUs this process may run on (its affinity mask, not the machine's count)."""
    return len(os.sched_getaffinity(0))


def size_tvm_thread_pool() -> int:
    """Set TVM_NUM_THREADS to this process's CPUs and leave TVM's threads unpinned (`BIND_ENV`), each
    unless the user set it; returns the pool size.

    Call before TVM first starts its pool (the first `config_threadpool` or parallel kernel on a
    machine where TVM's guess is more than one thread). Child processes, such as MetaSchedule's
    measuring workers and the peak-memory probe, inherit both.
    """
    os.environ.setdefault(BIND_ENV, "0")
    value = os.environ.setdefault(ENV, str(usable_cpus()))
    if not value.isdigit() or int(value) < 1:
        raise UserError(f"{ENV}={value!r}: expected a positive whole number of threads")
    return int(value)
