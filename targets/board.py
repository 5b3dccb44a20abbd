"""Bring a real board up as a TVM RPC server registered at the tracker, over SSH, and down again.

`bring_up` checks the board's Python and CPU against the target, installs the host's exact TVM
runtime and peer runtimes (ONNX Runtime, LiteRT) into a venv on the board when the board lacks them,
copies targets/board_server.py and the runtime plug-ins there (over the SSH command channel), and
starts that server detached (its own session, a pid file on the board), so it outlives the SSH
connection. A tracker on this machine's loopback is reached through a reverse SSH tunnel: the
board dials its own 127.0.0.1:<forwarded port> and nothing listens on a public port here. That
tunnel lives as long as the SSH connection, so `invoke board.up` then stays in the foreground
holding it, like the tracker itself: Ctrl-C stops the board's server and closes the tunnel, and
`invoke board.down` (from another terminal) makes it return. With a tracker the board can reach
directly, board.up returns once the board is registered. `bring_down` stops exactly the server the
pid file names, by its process group.

The tracker hands clients the board's SSH host as the server's address (`--custom-addr`), so a
session goes straight to the board: the board must be reachable there on its server port.
"""

from __future__ import annotations

import ipaddress
import json
import platform
import re
import shlex
import time
from collections import deque
from dataclasses import dataclass
from importlib import metadata
from pathlib import Path
from typing import Callable

from packaging.specifiers import SpecifierSet
from packaging.version import Version

from errors import UserError
from targets import rpc, ssh
from targets.board_server import PEER_RUNTIME_PACKAGES, board_side_files, peer_versions
from targets.config import TargetConfig

REPO_ROOT = Path(__file__).resolve().parent.parent

SERVER_DIR = "server"  # under the board's folder: board_server.py and the plug-ins it imports
SERVER_SCRIPT = "board_server.py"
DEFAULT_BOARD_DIR = "~/.cache/lwgan-board"
PID_FILE = "server.pid"
LOG_FILE = "server.log"
# TVM is imported twice before the server registers (the launcher and its worker): ~10 s each on a Pi 4.
REGISTER_TIMEOUT_S = 180.0
STOP_WAIT_S = 5.0

# Prints what board.up needs to know about a Python on the board, without importing TVM (slow on a board).
_FACTS = (
    "import json, platform, sys\n"
    "from importlib import metadata\n"
    "def version(name):\n"
    "    try:\n"
    "        return metadata.version(name)\n"
    "    except metadata.PackageNotFoundError:\n"
    "        return None\n"
    "print(json.dumps({'machine': platform.machine(), 'python': '%d.%d.%d' % sys.version_info[:3],\n"
    "                  'executable': sys.executable, 'tvm': version('apache-tvm'), 'tvm_ffi': version('apache-tvm-ffi'),\n"
    f"                  'peers': {{name: version(name) for name in {PEER_RUNTIME_PACKAGES!r}}}}}))\n"
)


@dataclass(frozen=True)
class RuntimeVersions:
    """The host's TVM and peer runtimes: the board must run exactly these TVM versions, or RPC calls fail
    in confusing ways, and the same peers, so a board's ORT or LiteRT record compares with the host's."""

    tvm: str
    tvm_ffi: str
    requires_python: str
    peers: tuple[tuple[str, str], ...] = ()  # (package, version)

    @classmethod
    def of_host(cls) -> RuntimeVersions:
        return cls(metadata.version("apache-tvm"), metadata.version("apache-tvm-ffi"),
                   metadata.metadata("apache-tvm")["Requires-Python"] or "", tuple(peer_versions().items()))


@dataclass(frozen=True)
class BoardPython:
    executable: str
    machine: str
    python: str
    tvm: str | None
    tvm_ffi: str | None
    peers: tuple[tuple[str, str | None], ...] = ()

    def runs(self, versions: RuntimeVersions) -> bool:
        return (self.tvm, self.tvm_ffi) == (versions.tvm, versions.tvm_ffi) and set(versions.peers) <= set(self.peers)


def board_python(session: ssh.SshSession, python: str) -> BoardPython | None:
    """What `python` on the board is (None when there is no such program)."""
    result = session.run(f"{shlex.quote(python)} -c {shlex.quote(_FACTS)}")
    if result.exit_status == 127:
        return None
    if result.exit_status != 0:
        detail = result.stderr.strip().splitlines()
        raise UserError(f"ssh {session.destination}: `{python}` cannot run the version check "
                        f"({detail[-1] if detail else f'exit {result.exit_status}'}); set [ssh] python to a Python 3")
    facts = json.loads(result.stdout)
    return BoardPython(facts["executable"], facts["machine"], facts["python"], facts["tvm"], facts["tvm_ffi"],
                       tuple(facts.get("peers", {}).items()))


def normal_arch(name: str) -> str:
    """One name per instruction set: `uname -m` and LLVM triples spell them differently."""
    name = name.lower()
    if name == "arm" or name.startswith(("armv", "thumbv")):  # armv7l, armv8l (32-bit on a 64-bit core), thumbv7
        return "arm"
    return {"arm64": "aarch64", "amd64": "x86_64", "i386": "x86", "i686": "x86"}.get(name, name)


def target_arch(config: TargetConfig) -> str:
    """The instruction set the target's code is built for: its triple, or this machine's without one."""
    triple = config.tvm.get("mtriple") or config.tvm.get("host", {}).get("mtriple")
    return normal_arch(triple.split("-", 1)[0] if triple else platform.machine())


def check_board(config: TargetConfig, found: BoardPython, versions: RuntimeVersions, destination: str) -> None:
    if normal_arch(found.machine) != target_arch(config):
        raise UserError(f"ssh {destination}: the board is {found.machine}, but target {config.name!r} builds "
                        f"{target_arch(config)} code ({config.path}); wrong board or wrong --target?")
    if versions.requires_python and Version(found.python) not in SpecifierSet(versions.requires_python):
        raise UserError(f"ssh {destination}: {found.executable} is Python {found.python}, apache-tvm {versions.tvm} "
                        f"needs {versions.requires_python}; set [ssh] python to a newer one on the board")


def install_command(base_python: str, venv: str, versions: RuntimeVersions) -> str:
    """Shell command making `venv` on the board and installing the host's TVM runtime and peers into it.

    The venv sees the board's system packages, so distribution builds (apt's numpy on boards PyPI
    has no wheel for) stay usable, while the pins install into the venv whatever the system has.
    Only wheels: building TVM from source on a board takes hours and fails without LLVM.
    """
    q = shlex.quote
    return (
        f"{q(base_python)} -m venv --system-site-packages {q(venv)} && "
        f"{q(venv + '/bin/python')} -m pip install --disable-pip-version-check --progress-bar off "
        f"--only-binary {','.join(['apache-tvm', 'apache-tvm-ffi', *(package for package, _ in versions.peers)])} "
        f"{q(f'apache-tvm[rpc]=={versions.tvm}')} {q(f'apache-tvm-ffi=={versions.tvm_ffi}')} "
        + " ".join(q(f"{package}=={version}") for package, version in versions.peers)
    )


def install_runtime(session: ssh.SshSession, base_python: str, venv: str, versions: RuntimeVersions,
                    report: Callable[[str], None]) -> BoardPython:
    """Run `install_command` on the board, showing pip's output, and check the result."""
    last_lines: deque[str] = deque(maxlen=5)
    try:
        for line in session.stream(install_command(base_python, venv, versions)):
            last_lines.append(line)
            report(f"    {line}")
    except UserError:
        hint = " (install python3-venv on the board)" if any("ensurepip" in line for line in last_lines) else ""
        raise UserError(f"ssh {session.destination}: installing apache-tvm {versions.tvm} into {venv} failed{hint}: "
                        f"{' | '.join(last_lines) or 'no output'}") from None
    installed = board_python(session, f"{venv}/bin/python")
    if installed is None or not installed.runs(versions):
        raise UserError(f"ssh {session.destination}: {venv} still lacks apache-tvm {versions.tvm} or the peer "
                        "runtimes after installing")
    return installed


def ensure_runtime(session: ssh.SshSession, config: TargetConfig, board_dir: str, versions: RuntimeVersions,
                   report: Callable[[str], None]) -> BoardPython:
    """A Python on the board that runs the host's TVM: `[ssh] python` as is, board.up's venv, or a new venv."""
    base = session.settings.python or "python3"
    found = board_python(session, base)
    if found is None:
        raise UserError(f"ssh {session.destination}: no `{base}` on the board; install Python 3 or set [ssh] python")
    check_board(config, found, versions, session.destination)
    if found.runs(versions):
        return found
    venv = f"{board_dir}/tvm-{versions.tvm}"
    in_venv = board_python(session, f"{venv}/bin/python")
    if in_venv is not None and in_venv.runs(versions):
        return in_venv
    have = f"apache-tvm {found.tvm}" if found.tvm else "no apache-tvm"
    report(f"board: {found.executable} (Python {found.python}, {found.machine}) has {have}; installing "
           f"apache-tvm {versions.tvm} with apache-tvm-ffi {versions.tvm_ffi} and "
           f"{', '.join(f'{package} {version}' for package, version in versions.peers)} into {venv}")
    return install_runtime(session, base, venv, versions, report)


def resolve_board_dir(session: ssh.SshSession, raw: str | None, create: bool) -> str | None:
    """board.up's folder on the board as an absolute path (None when absent and not created)."""
    raw = raw or DEFAULT_BOARD_DIR
    quoted = '"$HOME"/' + shlex.quote(raw[2:]) if raw.startswith("~/") else shlex.quote(raw)
    make = f"mkdir -p {quoted} && " if create else f"[ -d {quoted} ] || exit 3; "
    result = session.run(f"{make}cd {quoted} && pwd")
    if result.exit_status == 3 and not create:
        return None
    if result.exit_status != 0:
        raise UserError(f"ssh {session.destination}: cannot use {raw} on the board ({result.stderr.strip()})")
    return result.stdout.strip()


def server_command(python: str, board_dir: str, tracker: str, key: str, listen: str, advertise: str) -> str:
    """Start the RPC server in its own session (it survives the SSH connection) and print its pid.

    The pid is written by the session's first process, which then becomes the server (`exec`), so
    the pid file names the process group board.down signals.
    """
    q = shlex.quote
    server = (f"exec {q(python)} {SERVER_DIR}/{SERVER_SCRIPT} --tracker {q(tracker)} --key {q(key)} "
              f"--host {q(listen)} --custom-addr {q(advertise)}")
    return (
        f"cd {q(board_dir)} || exit 1\n"
        f"rm -f {PID_FILE}\n"
        f"setsid sh -c {q(f'echo $$ > {PID_FILE}; {server}')} > {LOG_FILE} 2>&1 < /dev/null &\n"
        f"i=0; while [ ! -s {PID_FILE} ] && [ $i -lt 100 ]; do sleep 0.1; i=$((i+1)); done\n"
        f"cat {PID_FILE}\n"
    )


def stop_command(board_dir: str) -> str:
    """Stop the server the pid file names (its whole process group), if that pid is still an RPC server.

    Prints `stopped <pid>`, `stale <pid>` (the pid is gone or another program's) or `none`.
    """
    wait_tenths = int(STOP_WAIT_S * 10)
    return (
        f"cd {shlex.quote(board_dir)} 2>/dev/null || {{ echo none; exit 0; }}\n"
        f"[ -s {PID_FILE} ] || {{ echo none; exit 0; }}\n"
        f"pid=$(cat {PID_FILE})\n"
        f"if tr '\\0' ' ' < /proc/$pid/cmdline 2>/dev/null | grep -q {SERVER_SCRIPT}; then\n"
        f"  kill -TERM -$pid\n"
        f"  i=0; while kill -0 -$pid 2>/dev/null && [ $i -lt {wait_tenths} ]; do sleep 0.1; i=$((i+1)); done\n"
        f"  kill -KILL -$pid 2>/dev/null\n"
        f"  echo stopped $pid\n"
        f"else\n"
        f"  echo stale $pid\n"
        f"fi\n"
        f"rm -f {PID_FILE}\n"
    )


def stop_server(session: ssh.SshSession, board_dir: str) -> tuple[str, int | None]:
    """('stopped' | 'stale' | 'none', pid)."""
    words = session.check(stop_command(board_dir), "stopping the RPC server").split()
    return words[0], int(words[1]) if len(words) > 1 else None


def is_loopback(host: str) -> bool:
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


@dataclass
class RunningBoard:
    """A board registered at the tracker; holds the SSH connection (and the tunnel, if any)."""

    config: TargetConfig
    session: ssh.SshSession
    tunnel: ssh.ReverseTunnel | None
    board_dir: str
    pid: int
    address: tuple[str, int]  # where the tracker sends clients
    seconds: float  # from connecting to registered

    def hold(self, poll_s: float = 1.0) -> None:
        """Keep the tunnel up while the server runs; return once board.down (or a newer board.up) replaced it.

        A lost SSH connection, or a server that died on its own, is a UserError.
        """
        pid_file = shlex.quote(f"{self.board_dir}/{PID_FILE}")
        while True:
            try:
                answer = self.session.run(f"kill -0 {self.pid} 2>/dev/null && echo alive || cat {pid_file} 2>/dev/null")
            except UserError:
                if self.session.is_active():
                    raise
                raise UserError(
                    f"ssh {self.session.destination}: connection lost, and with it the tunnel to the tracker; the "
                    "board's server gives up on the tracker within a minute (run board.up again, or board.down)"
                ) from None
            state = answer.stdout.strip()
            if state == str(self.pid):  # dead, yet still the recorded server: it crashed
                log = self.session.run(f"tail -n 4 {shlex.quote(f'{self.board_dir}/{LOG_FILE}')}").stdout
                raise UserError(f"ssh {self.session.destination}: the board's RPC server (pid {self.pid}) exited: "
                                + " | ".join(log.strip().splitlines()))
            if state != "alive":
                return
            time.sleep(poll_s)

    def stop(self) -> tuple[str, int | None]:
        """Stop the server this bring-up started (when the SSH connection is still up)."""
        return stop_server(self.session, self.board_dir)

    def close(self) -> None:
        if self.tunnel is not None:
            self.tunnel.close()
        self.session.close()


def bring_up(config: TargetConfig, destination: str | None = None, report: Callable[[str], None] = print,
             timeout_s: float = REGISTER_TIMEOUT_S) -> RunningBoard:
    """Start the board's RPC server and return once the tracker lists it (a previous one is restarted)."""
    started = time.monotonic()
    tracker_host, tracker_port, key = rpc.tracker_address(config)
    if not rpc.tracker_reachable(tracker_host, tracker_port):
        raise UserError(f"target {config.name!r}: no RPC tracker answers at {tracker_host}:{tracker_port}; "
                        "start one with `invoke tracker.start`")
    settings = ssh.settings_for(config.ssh, destination, base_dir=config.path.parent)
    versions = RuntimeVersions.of_host()
    session = ssh.connect(settings)
    tunnel = None
    try:
        board_dir = resolve_board_dir(session, settings.board_dir, create=True)
        python = ensure_runtime(session, config, board_dir, versions, report)
        report(f"board: {python.executable} (Python {python.python}, {python.machine}, apache-tvm {python.tvm})")
        session.put_files(board_side_files(REPO_ROOT), f"{board_dir}/{SERVER_DIR}")
        state, old_pid = stop_server(session, board_dir)
        if state == "stopped":
            report(f"board: stopped the previous RPC server (pid {old_pid})")
        if is_loopback(tracker_host):
            tunnel = session.reverse_tunnel(tracker_host, tracker_port)
            board_tracker = f"127.0.0.1:{tunnel.remote_port}"
            report(f"board: tracker {tracker_host}:{tracker_port} reached from the board at {board_tracker} "
                   "(reverse SSH tunnel)")
        else:
            board_tracker = f"{tracker_host}:{tracker_port}"
        # A board addressed by loopback is this machine (or a forwarded port): keep its server off other interfaces.
        listen = "127.0.0.1" if is_loopback(settings.host) else "0.0.0.0"
        if listen == "0.0.0.0":
            report("board: its RPC server listens on all the board's interfaces; TVM RPC has no authentication, "
                   "so keep the board on a trusted network")
        pid = int(session.check(
            server_command(python.executable, board_dir, board_tracker, key, listen, settings.host),
            "starting the RPC server").strip())
        port = _wait_registered(session, board_dir, pid, tracker_host, tracker_port, key, settings.host,
                                started + timeout_s)
    except BaseException:
        if tunnel is not None:
            tunnel.close()
        session.close()
        raise
    return RunningBoard(config, session, tunnel, board_dir, pid, (settings.host, port), time.monotonic() - started)


_BOUND = re.compile(r"bind to \S+:(\d+)")


def _wait_registered(session: ssh.SshSession, board_dir: str, pid: int, tracker_host: str, tracker_port: int,
                     key: str, advertised: str, deadline: float) -> int:
    """The server's port once the tracker lists it; on death or timeout, stop it and show its log."""
    log = shlex.quote(f"{board_dir}/{LOG_FILE}")
    while True:
        status = session.run(f"kill -0 {pid} 2>/dev/null && echo alive || echo dead; tail -n 40 {log}")
        alive, _, log_text = status.stdout.partition("\n")
        bound = _BOUND.findall(log_text)
        if bound:
            port = int(bound[-1])
            servers = rpc.tracker_summary(tracker_host, tracker_port)["server_info"]
            if any(s["key"] == f"server:{key}" and list(s["addr"]) == [advertised, port] for s in servers):
                return port
        if alive != "alive" or time.monotonic() > deadline:
            stop_server(session, board_dir)
            why = "exited" if alive != "alive" else "did not register in time"
            tail = " | ".join(log_text.strip().splitlines()[-4:]) or "empty log"
            raise UserError(f"ssh {session.destination}: the RPC server (pid {pid}) {why}; "
                            f"{board_dir}/{LOG_FILE}: {tail}")
        time.sleep(1.0)


def bring_down(config: TargetConfig, destination: str | None = None) -> tuple[str, int | None]:
    """Stop the server board.up started on the board: ('stopped' | 'stale' | 'none', pid)."""
    settings = ssh.settings_for(config.ssh, destination, base_dir=config.path.parent)
    with ssh.connect(settings) as session:
        board_dir = resolve_board_dir(session, settings.board_dir, create=False)
        if board_dir is None:
            return "none", None
        return stop_server(session, board_dir)
