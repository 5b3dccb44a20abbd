"""SSH to boards: commands, streamed output and a reverse tunnel, over one paramiko connection.

Host keys are always checked against a known_hosts file and unknown ones rejected (paramiko's
RejectPolicy): a board's SSH session carries code and benchmark numbers, so a spoofed board must
fail loudly rather than be trusted on first use. Every failure a user can fix (no route, refused
port, unknown or changed host key, rejected key) is a one-line `UserError` naming the destination.
"""

from __future__ import annotations

import getpass
import re
import select
import shlex
import socket
import threading
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Iterator

import paramiko

from errors import UserError

DEFAULT_KNOWN_HOSTS = Path("~/.ssh/known_hosts")
CONNECT_TIMEOUT_S = 10.0
COMMAND_TIMEOUT_S = 60.0
KEEPALIVE_S = 15
_DESTINATION = re.compile(r"(?:(?P<user>[^@\s]+)@)?(?:\[(?P<v6>[^\]\s]+)\]|(?P<host>[^@:\[\]\s]+))(?::(?P<port>\S*))?")


@dataclass(frozen=True)
class SshSettings:
    """Where a board is and how to log in; `python` and `board_dir` say what to use once there."""

    host: str
    user: str
    port: int = 22
    key_file: Path | None = None  # None: ssh-agent and ~/.ssh/id_* keys, as `ssh` does
    known_hosts: Path = DEFAULT_KNOWN_HOSTS
    python: str | None = None  # the board's interpreter; None: `python3` (and a venv board.up installs)
    board_dir: str | None = None  # board.up's folder on the board; None: its default
    timeout_s: float = CONNECT_TIMEOUT_S

    @property
    def destination(self) -> str:
        return f"{self.user}@{self.host}:{self.port}"


def settings_for(table: dict, destination: str | None = None, base_dir: Path | None = None) -> SshSettings:
    """Settings from a target's [ssh] table, with `user@host[:port]` (e.g. from --ssh) taking precedence.

    Relative key and known_hosts paths are read from `base_dir` (the target file's folder), so a
    config means the same thing from any working directory.
    """
    values = dict(table)
    if destination:
        m = _DESTINATION.fullmatch(destination)
        if not m:
            raise UserError(f"ssh destination {destination!r}: expected user@host[:port] (an IPv6 host in brackets)")
        if m["port"] is not None and not m["port"].isdigit():
            raise UserError(f"ssh destination {destination!r}: port {m['port']!r} is not a number")
        values["host"] = m["v6"] or m["host"]
        if m["user"]:
            values["user"] = m["user"]
        if m["port"]:
            values["port"] = int(m["port"])
    if not values.get("host"):
        raise UserError("no SSH host: give --ssh user@host or a `host` in the target's [ssh] table")

    def path(key: str, default: Path | None) -> Path | None:
        raw = values.get(key)
        if raw is None:
            return default.expanduser() if default else None
        expanded = Path(raw).expanduser()
        return expanded if expanded.is_absolute() or base_dir is None else base_dir / expanded

    return SshSettings(
        host=values["host"],
        user=values.get("user") or getpass.getuser(),
        port=int(values.get("port", 22)),
        key_file=path("key_file", None),
        known_hosts=path("known_hosts", DEFAULT_KNOWN_HOSTS),
        python=values.get("python"),
        board_dir=values.get("board_dir"),
    )


class _RejectUnknownHost(paramiko.RejectPolicy):
    """paramiko's RejectPolicy, with a message that says how to trust the board on purpose."""

    def __init__(self, settings: SshSettings):
        self._settings = settings

    def missing_host_key(self, client, hostname, key) -> None:
        s = self._settings
        raise UserError(
            f"ssh {s.destination}: host key {key.get_name()} {key.fingerprint} is not in {s.known_hosts}; "
            f"check that fingerprint on the board (ssh-keygen -lf /etc/ssh/ssh_host_*.pub), then add it with "
            f"`ssh-keyscan -p {s.port} {s.host} >> {s.known_hosts}`"
        )


@dataclass(frozen=True)
class CommandResult:
    exit_status: int
    stdout: str
    stderr: str


class RemoteProcess:
    """A command running on the board, on its own channel: write to its stdin, read its output lines."""

    def __init__(self, channel: paramiko.Channel, command: str, destination: str):
        self.channel = channel
        self.command = command
        self._destination = destination
        self._stdout = channel.makefile("rb")
        self._stdin = channel.makefile_stdin("wb")

    def write(self, text: str) -> None:
        self._stdin.write(text.encode())
        self._stdin.flush()

    def readline(self, timeout_s: float | None = None) -> str:
        """The next output line without its line ending; '' once the command's output ends."""
        self.channel.settimeout(timeout_s)
        try:
            line = self._stdout.readline()
        except socket.timeout:
            raise UserError(
                f"ssh {self._destination}: `{self.command}` printed nothing for {timeout_s:.0f} s"
            ) from None
        return line.decode(errors="replace").rstrip("\r\n")

    def lines(self) -> Iterator[str]:
        """Output lines as they arrive, until the command ends (a progress bar's `\\r` keeps its last state)."""
        while True:
            raw = self._stdout.readline()
            if not raw:
                return
            yield raw.decode(errors="replace").rstrip("\r\n").rsplit("\r", 1)[-1]

    def poll(self) -> int | None:
        """The exit status once the command has ended, else None."""
        return self.channel.recv_exit_status() if self.channel.exit_status_ready() else None

    def wait(self, timeout_s: float) -> int:
        if not self.channel.status_event.wait(timeout_s):
            raise UserError(f"ssh {self._destination}: `{self.command}` still running after {timeout_s:.0f} s")
        return self.channel.recv_exit_status()

    def close(self) -> None:
        """Close the channel; a command started with a terminal gets SIGHUP, as after closing `ssh -t`."""
        self.channel.close()


class ReverseTunnel:
    """The board's `remote_host:remote_port` forwarded, over SSH, to `local_host:local_port` here.

    The board end listens on the board's loopback only (sshd's default `GatewayPorts no`), and the
    local end is a plain connect from this machine, so a tracker bound to 127.0.0.1 here serves the
    board without listening on any public port.
    """

    def __init__(self, transport: paramiko.Transport, local_host: str, local_port: int, remote_host: str,
                 remote_port: int, destination: str):
        self.local_host, self.local_port = local_host, local_port
        self.remote_host = remote_host
        self._transport = transport
        self._destination = destination
        self._open: set[socket.socket] = set()
        self._lock = threading.Lock()
        try:
            self.remote_port = transport.request_port_forward(remote_host, remote_port, handler=self._accept)
        except paramiko.SSHException as exc:
            raise UserError(
                f"ssh {destination}: the board refused to forward {remote_host}:{remote_port} ({exc}); "
                "is AllowTcpForwarding disabled in its sshd_config?"
            ) from None

    def _accept(self, channel: paramiko.Channel, origin, server) -> None:
        # Called on paramiko's transport thread, which must not block: the pumping gets its own thread.
        threading.Thread(target=self._pump, args=(channel,), daemon=True, name="reverse-tunnel").start()

    def _pump(self, channel: paramiko.Channel) -> None:
        try:
            local = socket.create_connection((self.local_host, self.local_port), timeout=CONNECT_TIMEOUT_S)
        except OSError:
            channel.close()  # the board's client sees the connection closed, as if refused
            return
        local.settimeout(None)
        with self._lock:
            self._open.add(local)
        # One thread per direction: a peer that writes while the other end is not reading blocks only its own side.
        upstream = threading.Thread(target=_copy, args=(channel.recv, local.sendall, lambda: local.shutdown(socket.SHUT_WR)),
                                    daemon=True, name="reverse-tunnel-up")
        upstream.start()
        _copy(local.recv, channel.sendall, channel.shutdown_write)
        upstream.join()
        with self._lock:
            self._open.discard(local)
        local.close()
        channel.close()

    def close(self) -> None:
        """Stop listening on the board and drop the connections carried so far."""
        if self._transport.is_active():
            try:
                self._transport.cancel_port_forward(self.remote_host, self.remote_port)
            except paramiko.SSHException:
                pass  # the connection ended meanwhile: nothing listens any more
        with self._lock:
            for local in self._open:
                try:
                    local.shutdown(socket.SHUT_RDWR)
                except OSError:
                    pass  # its pump is closing it already


def _copy(read: Callable[[int], bytes], write: Callable[[bytes], None], end: Callable[[], None]) -> None:
    """Copy until end of input, then pass the end on (a half close), so each side sees the other finish."""
    try:
        while data := read(65536):
            write(data)
    except OSError:
        pass  # either end went away; the caller closes both
    try:
        end()
    except OSError:
        pass


class SshSession:
    """One authenticated connection to a board; commands, streams and tunnels share it."""

    def __init__(self, settings: SshSettings):
        self.settings = settings
        self.destination = settings.destination
        self._client = _connect(settings)
        self._client.get_transport().set_keepalive(KEEPALIVE_S)  # a held tunnel notices a dead link, and NATs keep it

    @property
    def transport(self) -> paramiko.Transport:
        return self._client.get_transport()

    def is_active(self) -> bool:
        transport = self._client.get_transport()
        return transport is not None and transport.is_active()

    def start(self, command: str, pty: bool = False) -> RemoteProcess:
        """Run `command` on the board without waiting; with `pty`, its stderr joins stdout and closing hangs it up."""
        try:
            channel = self.transport.open_session(timeout=self.settings.timeout_s)
            if pty:
                channel.get_pty(width=200)
            channel.exec_command(command)
        except (paramiko.SSHException, OSError, AttributeError) as exc:  # AttributeError: no transport any more
            raise UserError(f"ssh {self.destination}: cannot start `{command}` ({exc or 'connection closed'})") from None
        return RemoteProcess(channel, command, self.destination)

    def run(self, command: str, timeout_s: float = COMMAND_TIMEOUT_S, stdin: str | None = None) -> CommandResult:
        """Run `command` to its end; stdout and stderr are read together so neither can fill up and stall it.

        The end is the channel's EOF after its exit status: sshd may send the status before it has
        forwarded the last of stderr (a check's error message once arrived as "ls:" alone)."""
        process = self.start(command)
        channel = process.channel
        if stdin is not None:
            process.write(stdin)
        channel.shutdown_write()
        out, err = bytearray(), bytearray()
        deadline = time.monotonic() + timeout_s
        while not (channel.exit_status_ready() and (channel.eof_received or channel.closed) and
                   not channel.recv_ready() and not channel.recv_stderr_ready()):
            left = deadline - time.monotonic()
            if left <= 0:
                channel.close()
                raise UserError(f"ssh {self.destination}: `{command}` did not finish within {timeout_s:.0f} s")
            select.select([channel], [], [], min(left, 1.0))
            while channel.recv_ready():
                out += channel.recv(65536)
            while channel.recv_stderr_ready():
                err += channel.recv_stderr(65536)
        status = channel.recv_exit_status()
        channel.close()
        if status == -1 and not self.is_active():  # paramiko's status for a channel cut before the command ended
            raise UserError(f"ssh {self.destination}: connection lost while running `{command}`")
        return CommandResult(status, out.decode(errors="replace"), err.decode(errors="replace"))

    def check(self, command: str, what: str, timeout_s: float = COMMAND_TIMEOUT_S) -> str:
        """stdout of a command that must succeed; otherwise a UserError saying `what` failed and why."""
        result = self.run(command, timeout_s)
        if result.exit_status != 0:
            detail = (result.stderr.strip() or result.stdout.strip()).splitlines()
            raise UserError(
                f"ssh {self.destination}: {what} failed (exit {result.exit_status}): "
                f"{detail[-1] if detail else 'no output'}"
            )
        return result.stdout

    def stream(self, command: str) -> Iterator[str]:
        """Output lines of a long-running command as they come (stderr included); ends when it ends.

        A non-zero exit is a UserError; leaving the loop early hangs the command up.
        """
        process = self.start(command, pty=True)
        try:
            yield from process.lines()
            status = process.wait(self.settings.timeout_s)
            if status != 0:
                raise UserError(f"ssh {self.destination}: `{command}` exited with status {status}")
        finally:
            process.close()

    def put_files(self, files: list[tuple[Path, str]], remote_dir: str) -> None:
        """Copy (local text file, path relative to `remote_dir`) pairs to the board, making folders.

        Through `cat` on the command channel rather than SFTP: a board's SSH server may have no SFTP
        subsystem (dropbear, minimal images), but every one runs commands.
        """
        for local, relative in files:
            target = shlex.quote(f"{remote_dir}/{relative}")
            result = self.run(f"mkdir -p \"$(dirname {target})\" && cat > {target}",
                              stdin=Path(local).read_text(encoding="utf-8"))
            if result.exit_status != 0:
                raise UserError(f"ssh {self.destination}: copying {relative} to {remote_dir} failed: "
                                f"{result.stderr.strip() or f'exit {result.exit_status}'}")

    def reverse_tunnel(self, local_host: str, local_port: int, remote_port: int = 0,
                       remote_host: str = "127.0.0.1") -> ReverseTunnel:
        """Forward the board's `remote_host:remote_port` (0: a free port, see `.remote_port`) to here."""
        return ReverseTunnel(self.transport, local_host, local_port, remote_host, remote_port, self.destination)

    def close(self) -> None:
        self._client.close()

    def __enter__(self) -> SshSession:
        return self

    def __exit__(self, *exc) -> None:
        self.close()


def connect(settings: SshSettings) -> SshSession:
    return SshSession(settings)


def _connect(s: SshSettings) -> paramiko.SSHClient:
    where = f"ssh {s.destination}"
    if not s.known_hosts.is_file():
        raise UserError(
            f"{where}: known_hosts file {s.known_hosts} not found; host keys are always checked. Add the "
            f"board's key after checking its fingerprint: `ssh-keyscan -p {s.port} {s.host} >> {s.known_hosts}`"
        )
    if s.key_file is not None and not s.key_file.is_file():
        raise UserError(f"{where}: key file {s.key_file} not found")
    client = paramiko.SSHClient()
    try:
        client.load_system_host_keys(str(s.known_hosts))  # read-only: nothing is ever written back
    except (OSError, paramiko.SSHException) as exc:
        raise UserError(f"{where}: cannot read known_hosts {s.known_hosts} ({exc})") from None
    client.set_missing_host_key_policy(_RejectUnknownHost(s))
    key_hint = f"key {s.key_file}" if s.key_file else "ssh-agent or ~/.ssh/id_* keys"
    try:
        client.connect(
            s.host,
            port=s.port,
            username=s.user,
            key_filename=str(s.key_file) if s.key_file else None,
            allow_agent=s.key_file is None,
            look_for_keys=s.key_file is None,
            timeout=s.timeout_s,
            banner_timeout=s.timeout_s,
            auth_timeout=s.timeout_s,
            channel_timeout=s.timeout_s,
        )
    except UserError:
        client.close()
        raise
    except paramiko.BadHostKeyException as exc:
        client.close()
        raise UserError(
            f"{where}: host key {exc.key.get_name()} {exc.key.fingerprint} does not match the one in "
            f"{s.known_hosts} ({exc.expected_key.fingerprint}): the board was reinstalled, or this is not the "
            "board; check the fingerprint on the board before replacing the entry"
        ) from None
    except paramiko.PasswordRequiredException:
        client.close()
        raise UserError(f"{where}: key file {s.key_file} is encrypted; load it into ssh-agent and leave key_file unset") from None
    except paramiko.AuthenticationException:
        client.close()
        raise UserError(f"{where}: authentication failed with {key_hint} (is the public key in the board's "
                        "~/.ssh/authorized_keys?)") from None
    except socket.gaierror as exc:
        client.close()
        raise UserError(f"{where}: unknown host name {s.host!r} ({exc.strerror})") from None
    except (socket.timeout, TimeoutError):
        client.close()
        raise UserError(f"{where}: no answer within {s.timeout_s:.0f} s (board off, or wrong address?)") from None
    except paramiko.ssh_exception.NoValidConnectionsError as exc:
        client.close()
        reasons = "; ".join(sorted({e.strerror or str(e) for e in exc.errors.values()}))
        raise UserError(f"{where}: cannot connect ({reasons}; is sshd running on port {s.port}?)") from None
    except OSError as exc:
        client.close()
        raise UserError(f"{where}: cannot connect ({exc.strerror or exc})") from None
    except paramiko.SSHException as exc:
        client.close()
        raise UserError(f"{where}: SSH handshake failed ({exc}); is it an SSH server?") from None
    return client
