"""A real OpenSSH server on 127.0.0.1 for tests: temporary host and user keys, its own config and pid.

The "board" it serves is this machine, logged into as the current user with a key made here; the
known_hosts file lists only its temporary host key, so nothing outside the temp folder is trusted.
"""

from __future__ import annotations

import getpass
import os
import shutil
import signal
import socket
import subprocess
import time
from dataclasses import dataclass
from pathlib import Path

SSHD = Path("/usr/sbin/sshd")


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def keygen(path: Path) -> Path:
    subprocess.run(["ssh-keygen", "-q", "-t", "ed25519", "-N", "", "-C", path.name, "-f", str(path)], check=True)
    return path


@dataclass
class Sshd:
    """A running sshd: where it listens and the files a client needs (`wrong_key` is not authorized)."""

    port: int
    user: str
    key_file: Path
    wrong_key: Path
    known_hosts: Path
    process: subprocess.Popen
    log: Path

    host: str = "127.0.0.1"

    @property
    def destination(self) -> str:
        return f"{self.user}@{self.host}:{self.port}"

    def ssh_table(self, **extra) -> dict:
        return {"host": self.host, "user": self.user, "port": self.port, "key_file": str(self.key_file),
                "known_hosts": str(self.known_hosts), **extra}

    def stop(self) -> None:
        if self.process.poll() is None:
            os.killpg(self.process.pid, signal.SIGTERM)  # sshd -D leads its own group: its sessions go too
            self.process.wait(10)


def start_sshd(folder: Path) -> Sshd:
    """Start `sshd -D -e` with a config in `folder`, listening on a free loopback port."""
    if not SSHD.exists() or shutil.which("ssh-keygen") is None:
        raise FileNotFoundError(f"{SSHD} or ssh-keygen missing (apt-get install openssh-server)")
    folder.mkdir(parents=True, exist_ok=True)
    host_key = keygen(folder / "host_ed25519")
    user_key = keygen(folder / "user_ed25519")
    wrong_key = keygen(folder / "wrong_ed25519")
    authorized = folder / "authorized_keys"
    authorized.write_text(Path(f"{user_key}.pub").read_text())
    port = free_port()
    known_hosts = folder / "known_hosts"
    key_type, key_base64 = Path(f"{host_key}.pub").read_text().split()[:2]
    known_hosts.write_text(f"[127.0.0.1]:{port} {key_type} {key_base64}\n")
    config = folder / "sshd_config"
    config.write_text(
        f"ListenAddress 127.0.0.1\nPort {port}\nHostKey {host_key}\nAuthorizedKeysFile {authorized}\n"
        f"PasswordAuthentication no\nKbdInteractiveAuthentication no\nPubkeyAuthentication yes\n"
        f"PermitRootLogin prohibit-password\nStrictModes no\nUsePAM no\nPidFile {folder / 'sshd.pid'}\n"
        "AllowTcpForwarding yes\nGatewayPorts no\nLogLevel VERBOSE\n"
    )
    # sshd insists on its privilege separation folder, which the Debian package only makes at boot.
    Path("/run/sshd").mkdir(mode=0o755, exist_ok=True)
    log = folder / "sshd.log"
    with open(log, "wb") as out:
        process = subprocess.Popen([str(SSHD), "-D", "-f", str(config), "-e"], stdout=out, stderr=subprocess.STDOUT,
                                   stdin=subprocess.DEVNULL, start_new_session=True)
    server = Sshd(port, getpass.getuser(), user_key, wrong_key, known_hosts, process, log)
    deadline = time.monotonic() + 10
    while True:
        try:
            socket.create_connection(("127.0.0.1", port), timeout=1).close()
            return server
        except OSError:
            if process.poll() is not None or time.monotonic() > deadline:
                server.stop()
                raise RuntimeError(f"sshd did not start: {log.read_text()}") from None
            time.sleep(0.05)
