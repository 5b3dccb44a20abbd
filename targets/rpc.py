"""Remote boards over TVM RPC: the tracker that brokers them, and sessions to a board by key.

Boards (real ones, or the emulated one in targets/emulated.py) run TVM's RPC server and register
with a tracker under a key such as "rpi4"; the host asks the tracker for a free board with that
key. TVM RPC has no authentication (anyone who reaches a server can run code on it), so the
tracker binds 127.0.0.1 unless told otherwise.

Background processes (tracker, emulated boards) are started in their own process group with a
state file under build/rpc/; stopping one signals exactly that group, never processes by name.
"""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

from errors import UserError
from targets.config import TargetConfig

REPO_ROOT = Path(__file__).resolve().parent.parent
STATE_DIR = Path(os.environ.get("LWGAN_RPC_STATE", REPO_ROOT / "build" / "rpc"))
DEFAULT_HOST = "127.0.0.1"
DEFAULT_PORT = 9190
LOCAL_HOSTS = ("127.0.0.1", "localhost", "::1")
TRACKER_STATE = "tracker.json"
TRACKER_MODULE = "tvm.exec.rpc_tracker"
START_TIMEOUT_S = 60.0
STOP_TIMEOUT_S = 10.0
CONNECT_TIMEOUT_S = 60.0

# Processes this Python process started: reaped on stop, so a stopped group leaves no zombie behind.
_children: dict[int, subprocess.Popen] = {}


# ---- process groups --------------------------------------------------------------------------------


@dataclass(frozen=True)
class Background:
    """A process group started by this suite, as recorded in its state file."""

    pid: int  # the group leader; its pid is the group id
    signature: list[str]  # arguments the leader's command line keeps (a reused pid lacks them)
    log: Path
    started: float
    extra: dict

    @classmethod
    def read(cls, state_file: Path) -> Background | None:
        if not state_file.exists():
            return None
        data = json.loads(state_file.read_text(encoding="utf-8"))
        return cls(data["pid"], data["signature"], Path(data["log"]), data["started"], data.get("extra", {}))

    def alive(self) -> bool:
        """The leader still runs and is still ours."""
        if self.pid in _children:  # started here: right after fork its command line is still ours
            return _children[self.pid].poll() is None
        try:
            cmdline = Path(f"/proc/{self.pid}/cmdline").read_bytes().decode(errors="replace").split("\0")
        except OSError:
            return False
        if _state(self.pid) in ("Z", "X", None):
            return False
        n = len(self.signature)
        return any(cmdline[i : i + n] == self.signature for i in range(len(cmdline) - n + 1))


def group_members(pgid: int) -> list[int]:
    """Live (non-zombie) processes in a process group, read from /proc."""
    members = []
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            fields = (entry / "stat").read_text().rsplit(")", 1)[1].split()
        except (OSError, IndexError):
            continue
        if int(fields[2]) == pgid and fields[0] not in ("Z", "X"):
            members.append(int(entry.name))
    return members


def _state(pid: int) -> str | None:
    try:
        return Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
    except (OSError, IndexError):
        return None


def spawn_group(command: list[str], signature: list[str], state_file: Path, log: Path, extra: dict | None = None,
                env: dict[str, str] | None = None) -> Background:
    """Start `command` as the leader of a new session and process group; record it in `state_file`.

    `signature`: arguments that stay in the leader's command line (chroot and qemu replace the
    program, not its arguments), so a pid reused by another program is never taken for ours.
    """
    state_file.parent.mkdir(parents=True, exist_ok=True)
    with open(log, "ab") as out:
        process = subprocess.Popen(command, stdout=out, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL,
                                   start_new_session=True, env=env)
    _children[process.pid] = process
    background = Background(process.pid, signature, log, time.time(), extra or {})
    state_file.write_text(json.dumps({"pid": background.pid, "signature": signature, "log": str(log),
                                      "started": background.started, "extra": background.extra}), encoding="utf-8")
    return background


def stop_group(state_file: Path, timeout_s: float = STOP_TIMEOUT_S) -> bool:
    """SIGTERM the recorded process group, SIGKILL what outlives `timeout_s`; False if none was running."""
    background = Background.read(state_file)
    if background is None:
        return False
    was_running = background.alive()
    # A live leader that is not ours means its pid was reused, which Linux does only once the old
    # group is empty: then the group under that id belongs to someone else and is left alone.
    reused = not was_running and _state(background.pid) not in ("Z", "X", None)
    if was_running or (not reused and group_members(background.pid)):
        _signal_group(background.pid, signal.SIGTERM)
        deadline = time.time() + timeout_s
        while group_members(background.pid) and time.time() < deadline:
            _reap(background.pid)
            time.sleep(0.1)
        if group_members(background.pid):
            _signal_group(background.pid, signal.SIGKILL)
            deadline = time.time() + timeout_s
            while group_members(background.pid) and time.time() < deadline:
                _reap(background.pid)
                time.sleep(0.1)
    _reap(background.pid)
    state_file.unlink(missing_ok=True)
    return was_running


def _signal_group(pgid: int, sig: signal.Signals) -> None:
    try:
        os.killpg(pgid, sig)
    except ProcessLookupError:
        pass


def _reap(pid: int) -> None:
    process = _children.get(pid)
    if process is not None and process.poll() is not None:
        del _children[pid]


def log_tail(log: Path, lines: int = 15) -> str:
    try:
        return "\n".join(log.read_text(encoding="utf-8", errors="replace").splitlines()[-lines:])
    except OSError:
        return ""


# ---- tracker ---------------------------------------------------------------------------------------


def tracker_reachable(host: str, port: int, timeout_s: float = 2.0) -> bool:
    """A TCP connect, without TVM's 60 s retry loop for refused connections."""
    try:
        with socket.create_connection((host, port), timeout=timeout_s):
            return True
    except OSError:
        return False


def start_tracker(host: str = DEFAULT_HOST, port: int = DEFAULT_PORT, state_dir: Path = STATE_DIR,
                  report: Callable[[str], None] = print) -> Background:
    """Start `python -m tvm.exec.rpc_tracker` in the background; a running one started here is reused."""
    state_file = state_dir / TRACKER_STATE
    running = Background.read(state_file)
    if running is not None and running.alive():
        report(f"tracker already running at {running.extra['host']}:{running.extra['port']} (pid {running.pid})")
        return running
    if running is not None:
        stop_group(state_file)  # stale: its leader died; clear any children it left
    if tracker_reachable(host, port):
        raise UserError(f"something already listens on {host}:{port}; stop it or choose another --port")
    if host not in LOCAL_HOSTS:
        report(f"warning: the tracker listens on {host}:{port}. TVM RPC has no authentication: anyone who "
               "reaches the tracker or a board's server can run code on that board. Use a trusted network.")
    arguments = ["-m", TRACKER_MODULE, "--host", host, "--port", str(port), "--port-end", str(port + 1)]
    background = spawn_group([sys.executable, *arguments], arguments, state_file, state_dir / "tracker.log",
                             {"host": host, "port": port})
    deadline = time.time() + START_TIMEOUT_S
    probe_host = DEFAULT_HOST if host in ("0.0.0.0", "") else host
    while not tracker_reachable(probe_host, port, timeout_s=1.0):
        if not background.alive() or time.time() > deadline:
            stop_group(state_file)
            raise UserError(f"the tracker did not start on {host}:{port} (log {background.log}):\n"
                            f"{log_tail(background.log)}")
        time.sleep(0.2)
    report(f"tracker listening on {host}:{port} (pid {background.pid}, log {background.log})")
    return background


def stop_tracker(state_dir: Path = STATE_DIR, report: Callable[[str], None] = print) -> bool:
    state_file = state_dir / TRACKER_STATE
    background = Background.read(state_file)
    if background is None:
        report("no tracker started by this suite is running")
        return False
    stop_group(state_file)
    report(f"tracker (pid {background.pid}) stopped")
    return True


def tracker_summary(host: str = DEFAULT_HOST, port: int = DEFAULT_PORT) -> dict:
    """The tracker's {"server_info": [...], "queue_info": {key: {"free", "pending"}}}."""
    from tvm import rpc as tvm_rpc

    if not tracker_reachable(host, port):
        raise UserError(f"no RPC tracker answers at {host}:{port}; start one with `invoke tracker.start`")
    try:
        tracker = tvm_rpc.connect_tracker(host, port)
        try:
            return tracker.summary()
        finally:
            tracker.close()
    except (OSError, RuntimeError) as exc:
        raise UserError(f"{host}:{port} is not a TVM RPC tracker ({exc})") from exc


def tracker_status(host: str = DEFAULT_HOST, port: int = DEFAULT_PORT, state_dir: Path = STATE_DIR) -> str:
    """What `python -m tvm.exec.query_rpc_tracker` prints, plus which process serves it."""
    from tvm import rpc as tvm_rpc

    summary = tracker_summary(host, port)
    started = Background.read(state_dir / TRACKER_STATE)
    owner = (f"started by this suite, pid {started.pid}, log {started.log}"
             if started is not None and started.alive() else "not started by this suite")
    tracker = tvm_rpc.connect_tracker(host, port)
    try:
        text = tracker.text_summary()
    finally:
        tracker.close()
    boards = len(summary["server_info"])
    return f"tracker {host}:{port} ({owner}); {boards} board(s) registered\n\n{text}"


def free_boards(summary: dict, key: str) -> tuple[int, int]:
    """(registered, free) boards with `key` in a tracker summary."""
    registered = sum(1 for info in summary["server_info"] if info["key"] == f"server:{key}")
    free = summary["queue_info"].get(key, {}).get("free", 0)
    return registered, free


def wait_for_board(host: str, port: int, key: str, timeout_s: float, alive: Callable[[], bool] = lambda: True) -> bool:
    """Whether a board with `key` registers within `timeout_s` (stops early once `alive()` is False)."""
    deadline = time.time() + timeout_s
    while time.time() < deadline and alive():
        if tracker_reachable(host, port) and free_boards(tracker_summary(host, port), key)[1] > 0:
            return True
        time.sleep(1.0)
    return False


# ---- sessions --------------------------------------------------------------------------------------


def tracker_address(config: TargetConfig) -> tuple[str, int, str]:
    if config.place != "board" or not config.rpc:
        raise UserError(f"target {config.name!r} is not an RPC board (connection {config.connection!r}, "
                        "needs connection = \"rpc\" and an [rpc] table)")
    return config.rpc["tracker_host"], config.rpc["tracker_port"], config.rpc["key"]


def require_board(config: TargetConfig) -> int:
    """How many boards with the target's key are registered; fails at once (saying how to start one) when none is."""
    host, port, key = tracker_address(config)
    if not tracker_reachable(host, port):
        raise UserError(f"target {config.name!r}: no RPC tracker answers at {host}:{port}; "
                        "start one with `invoke tracker.start`")
    registered, free = free_boards(tracker_summary(host, port), key)
    if registered == 0 and free == 0:
        raise UserError(
            f"target {config.name!r}: no board with key {key!r} is registered at the tracker {host}:{port}; "
            f"start the emulated one with `invoke board.emulate --target {config.name}`, or on the board run "
            f"`python -m tvm.exec.rpc_server --tracker {host}:{port} --key {key}`"
        )
    return max(registered, free)


def connect(config: TargetConfig, timeout_s: float = CONNECT_TIMEOUT_S, session_timeout_s: float = 0):
    """A session to a free board with the target's key, through its tracker.

    Waits up to `timeout_s` while every board with the key is busy; fails at once when the tracker
    is down or no board with the key is registered at all, naming how to start one.
    """
    from tvm import rpc as tvm_rpc

    host, port, key = tracker_address(config)
    registered = require_board(config)
    deadline = time.time() + timeout_s
    while free_boards(tracker_summary(host, port), key)[1] == 0:
        if time.time() > deadline:
            raise UserError(f"target {config.name!r}: all {registered} board(s) with key {key!r} stayed busy "
                            f"for {timeout_s:.0f} s")
        time.sleep(1.0)
    try:
        tracker = tvm_rpc.connect_tracker(host, port)
        tracker._sock.settimeout(max(1.0, deadline - time.time()))  # TVM's request otherwise waits forever
        try:
            return tracker.request(key, priority=1, session_timeout=session_timeout_s, max_retry=1)
        finally:
            tracker.close()
    except (OSError, RuntimeError) as exc:
        raise UserError(f"target {config.name!r}: could not get a session to a {key!r} board from "
                        f"{host}:{port} within {timeout_s:.0f} s ({exc})") from exc


def board_fingerprint(session) -> dict:
    """The board's environment, read on the board.

    A board running targets/board_server.py answers in full; a plain `tvm.exec.rpc_server` only
    through LLVM's view of its cpu, and the fingerprint says so.
    """
    from targets.board_server import FINGERPRINT_FUNC

    try:
        return json.loads(session.get_function(FINGERPRINT_FUNC)())
    except (AttributeError, RuntimeError, ValueError):  # the function is not registered on that server
        pass
    return {
        "llvm_cpu": session.get_function("tvm.codegen.llvm.GetHostCPUName")(),
        "machine": session.get_function("target.llvm_get_system_triple")(),
        "partial": "board runs a plain tvm.exec.rpc_server; start it with targets/board_server.py for cores, os, tvm",
    }
