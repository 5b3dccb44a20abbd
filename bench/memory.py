"""Peak resident memory of one runtime, measured in a process of its own.

Every runtime of a benchmark shares one Python process, so their memory cannot be told apart
there. Here a fresh interpreter imports only the runtime at hand, loads the artifact its plug-in
names (bench/runtimes/: a TVM library, an ONNX or .tflite file, a pickled torch module) the way the
plug-in loads it, runs a few inferences and reports its peak resident set (VmHWM): what a process
serving that model on the device would need, in the environment its plug-in says such a process
has (`RuntimeSpec.serving_env`, `serving_without`). The benchmark runs this child before it runs the
runtime itself, so a runtime that kills its process (`Crashed`: say, a tile configuration an AMX
CPU rejects, SIGILL) takes down only the child.

    python -m bench.memory RUNTIME ARTIFACT INPUTS THREADS PLUGIN_FILE [MODULE,...]

The last argument names modules the child must not import (an import of them fails).

INPUTS is a one-input model's shape (NxCxHxW, filled uniform in [-1, 1]) or an .npz of a
multi-input model's inputs by name, in the graph's order: the values the benchmark fed it.
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import tempfile
from collections.abc import Mapping
from pathlib import Path

from errors import UserError

REPO_ROOT = Path(__file__).resolve().parent.parent
INFERENCES = 3
TIMEOUT_S = 600


class Crashed(UserError):
    """The child was killed by a signal: the runtime would have killed the benchmark's process too."""


def peak_rss_bytes(runtime: str, artifact: Path, inputs, threads: int) -> int:
    """Run the child below on `inputs` (a shape, an array, or arrays by name) and return its VmHWM in bytes;
    a failing child is a UserError with its last line, one killed by a signal `Crashed`."""
    import numpy as np

    from bench.runtimes import get

    with tempfile.TemporaryDirectory() as scratch:
        if isinstance(inputs, Mapping):
            given = str(Path(scratch) / "inputs.npz")
            np.savez(given, **inputs)
        else:
            given = "x".join(str(d) for d in (inputs if isinstance(inputs, tuple) else inputs.shape))
        spec = get(runtime)
        child = subprocess.run(
            [sys.executable, "-m", "bench.memory", runtime, str(artifact), given, str(threads), spec.source,
             ",".join(spec.serving_without)],
            capture_output=True, text=True, cwd=REPO_ROOT, timeout=TIMEOUT_S,
            env={**os.environ, **dict(spec.serving_env)},
        )
    lines = child.stdout.strip().splitlines()
    if child.returncode < 0:
        raise Crashed(f"{runtime} on {artifact.name} was killed by {signal.Signals(-child.returncode).name} "
                      "in a process of its own")
    if child.returncode != 0 or not lines or not lines[-1].isdigit():
        detail = (child.stderr.strip().splitlines() or ["no output"])[-1]
        raise UserError(f"peak memory of {runtime} on {artifact.name}: the measuring process failed ({detail})")
    return int(lines[-1])


def _vm_hwm_bytes() -> int:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("VmHWM:"):
            return int(line.split()[1]) * 1024  # reported in kB
    raise RuntimeError("/proc/self/status has no VmHWM")


def _run(runtime: str, artifact: str, inputs: str, threads: int, plugin: str) -> None:
    import numpy as np

    from bench.runtimes import get, load_plugin, registered

    if runtime not in {spec.name for spec in registered()}:  # a plug-in from outside bench/runtimes/
        load_plugin(plugin)

    if inputs.endswith(".npz"):
        with np.load(inputs) as saved:
            x = {name: saved[name] for name in saved.files}
    else:
        x = np.random.default_rng(0).uniform(-1, 1, tuple(int(d) for d in inputs.split("x"))).astype("float32")
    adapter = get(runtime).load(Path(artifact), threads)
    for _ in range(INFERENCES):
        adapter.run(x)


if __name__ == "__main__":
    runtime_name, artifact_path, input_text, thread_count, plugin_file, absent = sys.argv[1:7]
    for module in filter(None, absent.split(",")):
        sys.modules[module] = None  # `import module` now raises ImportError
    _run(runtime_name, artifact_path, input_text, int(thread_count), plugin_file)
    print(_vm_hwm_bytes())
