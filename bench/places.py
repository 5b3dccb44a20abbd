"""Where runtimes run: this process ("host") or a board over TVM RPC ("board").

A place loads a runtime plug-in's artifact into an adapter the harness times, and says which
environment its records describe. On a board, TVM runs through the RPC session's Relax VM; every
other runtime through the functions targets/board_server.py registers on the board (the artifact is
uploaded, loaded there by the same plug-in module, and timed there; only samples come back).
"""

from __future__ import annotations

import json
import os
from pathlib import Path

import numpy as np

from bench.fingerprint import host_fingerprint
from bench.runtimes import Runtime, RuntimeSpec
from bench.runtimes.tvm_vm import RemoteTvmRuntime, board_lost
from targets import ResolvedTarget, rpc
from targets.board_server import LOAD_FUNC, MEASURE_FUNC, RUN_FUNC


# How long to wait for the board to come free. An emulated board took over a minute to register again
# after a session that loaded an int8 model, its base and ONNX Runtime (qemu-user on a busy host).
BOARD_FREE_TIMEOUT_S = 300.0


class HostPlace:
    name = "host"
    measures_memory = True  # a child process of this machine can run the artifact alone

    def __init__(self, target: ResolvedTarget) -> None:
        self.target = target

    def load(self, spec: RuntimeSpec, artifact: Path, threads: int) -> Runtime:
        return spec.load(artifact, threads)

    def environment(self) -> dict:
        return {**host_fingerprint(), "load_1m_at_start": round(os.getloadavg()[0], 2)}

    def close(self) -> None:
        pass


class BoardPlace:
    """One RPC session to the target's board for the whole model: every runtime is loaded through it."""

    name = "board"
    measures_memory = False

    def __init__(self, target: ResolvedTarget) -> None:
        self.target = target
        rpc.require_board(target.config)  # before minutes of compiling, fail if there is no board to run on
        self.address = rpc.tracker_address(target.config)
        self.session = rpc.connect(target.config, timeout_s=BOARD_FREE_TIMEOUT_S)
        self.fingerprint = rpc.board_fingerprint(self.session)

    def load(self, spec: RuntimeSpec, artifact: Path, threads: int) -> Runtime:
        if spec.name == "tvm":
            return RemoteTvmRuntime(self.session, artifact, threads, self.target.config.name)
        return BoardRuntime(self.session, self.target.config.name, spec.name, artifact, threads)

    def environment(self) -> dict:
        host, port, key = self.address
        return {**self.fingerprint, "connection": f"rpc {host}:{port} key {key}",
                "git_sha": host_fingerprint()["git_sha"]}

    def close(self) -> None:
        self.session = None  # frees the board for the next client


class BoardRuntime:
    """A runtime plug-in running on the board: loaded, run and timed there by the board server's functions."""

    def __init__(self, session, board: str, name: str, artifact: Path, threads: int) -> None:
        self.session, self.board, self.name, self.threads = session, board, name, threads
        self.device = session.cpu()
        session.upload(str(artifact), artifact.name)
        # not through _call: a peer that cannot load the model is that model's record, not the run's end
        reply = json.loads(session.get_function(LOAD_FUNC)(name, artifact.name, threads))
        self.precision = reply["precision"]

    def _call(self, function: str, *args):
        try:
            return self.session.get_function(function)(*args)
        except (AttributeError, RuntimeError) as exc:  # a board server without the function, or one that died
            raise board_lost(self.board, self.name, exc) from exc

    def prepare(self, x: np.ndarray) -> None:
        import tvm

        self.x = tvm.runtime.tensor(x, self.device)

    def run(self, x: np.ndarray) -> np.ndarray:
        import tvm

        return self._call(RUN_FUNC, self.name, tvm.runtime.tensor(x, self.device)).numpy()

    def measure(self, n: int) -> list[float]:
        if n <= 0:
            return []
        return [float(s) for s in json.loads(self._call(MEASURE_FUNC, self.name, self.x, n))]


PLACES = {"host": HostPlace, "board": BoardPlace}
