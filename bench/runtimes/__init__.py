"""The runtimes a model is timed on, as plug-ins: one module each, registered by name.

A runtime declares the artifact it loads (a kind compile/artifacts.py builds: a pickled torch
module, an ONNX file, a .tflite file, a TVM library), how it loads that file with a thread count
into an adapter the harness can time, its version, and where it can run ("host": in the process
driving the benchmark; "board": on an RPC board, through the functions targets/board_server.py
registers). Everything else (the bench loop, the peak-memory child, the fingerprint, the report,
`--runtimes`) iterates over this registry, so adding a runtime is one module plus its requirement.

This package imports only the standard library and numpy at module level, because a board imports
it too: each plug-in imports its runtime when it loads a model.
"""

from __future__ import annotations

import dataclasses
import importlib
import importlib.metadata
import importlib.util
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Iterable, Mapping, Protocol, Union

import numpy as np

from errors import UserError


# A model's inputs: one array for a one-input model (what every plug-in has always been given), else
# each input by name, in the order of the model's graph (the order TVM's `main` takes them in).
Inputs = Union[np.ndarray, Mapping[str, np.ndarray]]


class Runtime(Protocol):
    """What the harness times: `run` for the correctness check, `measure` for n timed inferences
    of the inputs given to `prepare`."""

    name: str
    threads: int
    precision: str  # the float precision it actually executes: "fp32", "bf16", "fp16"

    def prepare(self, x: Inputs) -> None: ...

    def run(self, x: Inputs) -> np.ndarray: ...

    def measure(self, n: int) -> list[float]: ...


@dataclass(frozen=True)
class RuntimeSpec:
    name: str  # what `--runtimes` and records call it
    label: str  # how the report names it
    artifact: str  # the kind of file it loads (compile/artifacts.py)
    load: Callable[[Path, int], Runtime]  # (artifact, threads) -> adapter
    package: str  # the distribution whose version the fingerprint records
    places: tuple[str, ...] = ("host",)  # "host" and/or "board"
    peer: bool = True  # a baseline TVM is measured against
    source: str = ""  # the plug-in's file (`register` fills it in), so another process can load it too
    # How a process serving the artifact on a device runs, which the peak-memory child copies
    # (bench/memory.py): environment variables it sets, and installed modules it would not have.
    serving_env: tuple[tuple[str, str], ...] = ()
    serving_without: tuple[str, ...] = ()

    def version(self) -> str | None:
        """The installed version of its package, or None where it is not installed."""
        try:
            return importlib.metadata.version(self.package)
        except importlib.metadata.PackageNotFoundError:
            return None


def named_inputs(x: Inputs, first_name: str) -> dict[str, np.ndarray]:
    """Feeds by name (ONNX Runtime, OpenVINO): a lone array is the model's first input."""
    return dict(x) if isinstance(x, Mapping) else {first_name: x}


def input_arrays(x: Inputs) -> list[np.ndarray]:
    """The arrays in the model's input order (TVM's positional `main` arguments)."""
    return list(x.values()) if isinstance(x, Mapping) else [x]


def only_input(x: Inputs, runtime: str) -> np.ndarray:
    """The array of a one-input model, for runtimes that only ever run registry generators (one image)."""
    arrays = input_arrays(x)
    if len(arrays) != 1:
        raise UserError(f"{runtime} runs one-input models; this one has inputs {', '.join(x)}")
    return arrays[0]


def time_calls(call: Callable[[], object], n: int) -> list[float]:
    """Seconds of each of `n` calls: the timing loop of every runtime driven through its Python API."""
    samples = []
    for _ in range(n):
        start = time.perf_counter()
        call()
        samples.append(time.perf_counter() - start)
    return samples


_REGISTRY: dict[str, RuntimeSpec] = {}


def register(spec: RuntimeSpec) -> RuntimeSpec:
    """Add a runtime (a plug-in module calls this when imported); a second spec under one name replaces the first.

    The calling module's file becomes the spec's `source`: the peak-memory child (bench/memory.py)
    imports it from there, so a plug-in living outside this package works in that process too.
    """
    if not spec.source:
        spec = dataclasses.replace(spec, source=sys._getframe(1).f_globals.get("__file__", ""))
    _REGISTRY[spec.name] = spec
    return spec


def unregister(name: str) -> None:
    _REGISTRY.pop(name, None)


def get(name: str) -> RuntimeSpec:
    try:
        return _REGISTRY[name]
    except KeyError:
        raise UserError(f"unknown runtime {name!r}; registered: {', '.join(_REGISTRY)}") from None


def registered(place: str | None = None) -> list[RuntimeSpec]:
    """Every registered runtime, in registration order; with `place`, those that can run there."""
    return [spec for spec in _REGISTRY.values() if place is None or place in spec.places]


def installed(place: str | None = None) -> list[RuntimeSpec]:
    """The registered runtimes whose package is installed here (the default set of a run)."""
    return [spec for spec in registered(place) if spec.version() is not None]


def load_plugin(path: str | Path) -> None:
    """Import a plug-in module from its file (one outside this package: a user's, a test's)."""
    spec = importlib.util.spec_from_file_location(f"lwgan_runtime_plugin_{Path(path).stem}", path)
    if spec is None or spec.loader is None:
        raise UserError(f"{path}: not a Python runtime plug-in")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)


def parse(names: Iterable[str], place: str) -> tuple[RuntimeSpec, ...]:
    """Runtime names (`--runtimes a,b` split) as specs; an unknown name, or one that cannot run at `place`,
    is a one-line error."""
    specs = tuple(get(name.strip()) for name in names if name.strip())
    elsewhere = [spec.name for spec in specs if place not in spec.places]
    if elsewhere:
        raise UserError(f"runtime(s) {', '.join(elsewhere)} cannot run on a {place}; there: "
                        f"{', '.join(spec.name for spec in registered(place))}")
    return specs


BUILT_IN = ("tvm_vm", "torch_eager", "onnxruntime_cpu", "openvino_cpu", "litert_xnnpack")
for _module in BUILT_IN:
    importlib.import_module(f"{__name__}.{_module}")
