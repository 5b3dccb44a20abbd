"""TVM's RPC server plus functions that tell the host what the board is and run the peer runtimes there.

Runs *on the board* (copied into the emulated board's rootfs with the runtime plug-ins,
bench/runtimes/, beside it; a real board can run it the same way instead of `python -m
tvm.exec.rpc_server`), so it imports only what a board has: TVM, numpy, the standard library and
the peer runtimes installed there. The fingerprint is read where the code runs, so records describe
the board, never the host that drives it.
"""

from __future__ import annotations

import argparse
import logging
from pathlib import Path

# What runs on the board, relative to the repository: this script and the runtime plug-ins it loads.
BOARD_SIDE_SOURCES = ("targets/board_server.py", "errors.py", "bench/runtimes/*.py")
# The peer runtimes' packages a board needs (bench/runtimes/ plug-ins whose places include "board").
PEER_RUNTIME_PACKAGES = ("onnxruntime", "ai-edge-litert")
FINGERPRINT_FUNC = "lwgan.board.fingerprint"
LOAD_FUNC = "lwgan.runtime.load"  # (runtime, uploaded file, threads) -> {"precision": ...} as JSON
RUN_FUNC = "lwgan.runtime.run"  # (runtime, input tensor) -> output tensor
MEASURE_FUNC = "lwgan.runtime.measure"  # (runtime, input tensor, n) -> n inference times in seconds, JSON


def board_side_files(repo_root: Path) -> list[tuple[Path, str]]:
    """(source, path on the board relative to the server's folder): the script at the top, plug-ins beneath."""
    files = []
    for pattern in BOARD_SIDE_SOURCES:
        for source in sorted(repo_root.glob(pattern)):
            relative = source.relative_to(repo_root)
            files.append((source, source.name if source.name == "board_server.py" else relative.as_posix()))
    return files


def peer_versions() -> dict[str, str]:
    """The host's versions of the peers: a board installs exactly these, so both sides run the same."""
    from importlib import metadata

    return {package: metadata.version(package) for package in PEER_RUNTIME_PACKAGES}


def register_fingerprint() -> None:
    """Registered before serving: each session runs in a process forked from this one."""
    import json
    import os
    import platform

    import tvm
    import tvm_ffi

    def cpuinfo() -> dict[str, str]:
        fields: dict[str, str] = {}
        try:
            with open("/proc/cpuinfo", encoding="utf-8") as f:
                for line in f:
                    key, _, value = line.partition(":")
                    fields.setdefault(key.strip(), value.strip())
        except OSError:
            pass
        return fields

    def os_release() -> str:
        try:
            with open("/etc/os-release", encoding="utf-8") as f:
                pairs = dict(line.rstrip("\n").split("=", 1) for line in f if "=" in line)
            return pairs.get("PRETTY_NAME", "").strip('"')
        except OSError:
            return ""

    @tvm_ffi.register_global_func(FINGERPRINT_FUNC, override=True)
    def fingerprint() -> str:
        info = cpuinfo()
        cpu = info.get("model name") or info.get("Hardware") or (
            f"implementer {info['CPU implementer']} part {info['CPU part']}" if "CPU part" in info else "unknown"
        )
        numpy_version = ""
        try:
            import numpy

            numpy_version = numpy.__version__
        except ImportError:
            pass
        try:  # the runtime plug-ins copied beside this script: the peers' versions on this board
            from bench.runtimes import installed

            runtimes = {spec.package: spec.version() for spec in installed("board")}
        except ImportError:
            runtimes = {}
        return json.dumps({
            **runtimes,
            "cpu": cpu,
            "llvm_cpu": tvm.get_global_func("tvm.codegen.llvm.GetHostCPUName")(),
            "cores": os.cpu_count(),
            "os": f"{os_release() or platform.system()} (kernel {platform.release()})",
            "machine": platform.machine(),
            "python": platform.python_version(),
            "numpy": numpy_version,
            "tvm": tvm.__version__,
            # Set by whoever starts an emulated board (targets/emulated.py); absent on real hardware.
            "emulator": os.environ.get("LWGAN_BOARD_EMULATOR", ""),
        })


def register_runtimes() -> None:
    """A peer runtime on the board, loaded by the same plug-in module the host uses; one loaded model per runtime."""
    import json

    import tvm
    import tvm_ffi

    loaded: dict = {}

    @tvm_ffi.register_global_func(LOAD_FUNC, override=True)
    def load(name: str, file_name: str, threads: int) -> str:
        from pathlib import Path

        from bench.runtimes import get

        spec = get(name)
        path = Path(tvm.get_global_func("tvm.rpc.server.workpath")(file_name))
        loaded[name] = spec.load(path, threads)
        return json.dumps({"precision": loaded[name].precision})

    @tvm_ffi.register_global_func(RUN_FUNC, override=True)
    def run(name: str, x):
        return tvm.runtime.tensor(loaded[name].run(x.numpy()))

    @tvm_ffi.register_global_func(MEASURE_FUNC, override=True)
    def measure(name: str, x, n: int) -> str:
        loaded[name].prepare(x.numpy())
        return json.dumps(loaded[name].measure(n))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--tracker", required=True, help="tracker address host:port")
    parser.add_argument("--key", required=True, help="the key the board registers under")
    parser.add_argument("--host", default="127.0.0.1", help="address the server listens on")
    parser.add_argument("--port", type=int, default=9090)
    parser.add_argument("--port-end", type=int, default=9189)
    parser.add_argument("--custom-addr", help="address the tracker gives clients (default: the one it sees)")
    args = parser.parse_args()
    logging.basicConfig(level=logging.INFO)

    # `tvm.rpc.Server` runs this same server state in a child interpreter that imports TVM again;
    # under qemu-user each import costs about a minute, so the state runs in this process instead.
    from tvm.rpc.server import PopenRPCServerState

    register_fingerprint()
    register_runtimes()
    tracker_host, tracker_port = args.tracker.rsplit(":", 1)
    server = PopenRPCServerState(
        args.host, args.port, args.port_end, tracker_addr=(tracker_host, int(tracker_port)), key=args.key,
        custom_addr=args.custom_addr,
    )
    server.thread.join()


if __name__ == "__main__":
    main()
