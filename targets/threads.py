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


def usable_cpus() -> int:
    """The CPUs this process may run on (its affinity mask, not the machine's count)."""
    return len(os.sched_getaffinity(0))


def size_tvm_thread_pool() -> int:
    """Set TVM_NUM_THREADS to this process's CPUs unless the user set it; returns the pool size.

    Call before TVM first starts its pool (the first `config_threadpool` or parallel kernel on a
    machine where TVM's guess is more than one thread). Child processes, such as MetaSchedule's
    measuring workers and the peak-memory probe, inherit it.
    """
    value = os.environ.setdefault(ENV, str(usable_cpus()))
    if not value.isdigit() or int(value) < 1:
        raise UserError(f"{ENV}={value!r}: expected a positive whole number of threads")
    return int(value)
