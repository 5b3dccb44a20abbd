"""An emulated aarch64 board: a Debian arm64 rootfs run under qemu-user, serving TVM RPC.

Every remote flow (cross-compile, upload, run, time, tune over the tracker) then runs on this
machine exactly as it would against a Raspberry Pi: the board side is the real TVM RPC server in an
aarch64 userland, executed instruction by instruction by qemu. Timings are qemu's, not a board's.

The rootfs (debootstrap + a venv with the host's TVM version) is built once and cached; the
server runs in its own process group, so stopping it ends exactly what was started.
"""

from __future__ import annotations

import importlib.metadata
import json
import os
import shutil
import subprocess
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

from errors import UserError
from targets import rpc
from targets.board_server import board_side_files, peer_versions
from targets.config import TargetConfig

REPO_ROOT = Path(__file__).resolve().parent.parent
ROOTFS_DIR = Path(os.environ.get("LWGAN_BOARD_ROOTFS", REPO_ROOT / "build" / "boards" / "aarch64-bookworm"))
SUITE = "bookworm"
DEFAULT_MIRROR = "http://deb.debian.org/debian"
DEBIAN_PACKAGES = ("python3", "python3-venv", "python3-pip", "ca-certificates")
VENV = "/opt/tvm"  # inside the rootfs
SERVER_SCRIPT = "/opt/lwgan/board_server.py"  # inside the rootfs
MARKER = ".lwgan-board.json"  # written last: its presence means the rootfs is complete
# Host settings the board needs to reach the package registries the host reaches (same path inside).
HOST_SETTINGS = ("/etc/resolv.conf", "/etc/ssl/certs/ca-certificates.crt", "/etc/pip.conf", "/etc/xdg/pip",
                 str(Path.home() / ".config" / "pip"))
BINFMT_DIR = Path("/proc/sys/fs/binfmt_misc")
BINFMT_ENTRY = BINFMT_DIR / "qemu-aarch64"
# Start to registration took 43 s here (mostly TVM's import under qemu) on a busy 2-core machine.
REGISTER_TIMEOUT_S = 180.0
# debootstrap prints a line per package retrieved, validated and extracted; progress shows the rest.
QUIET_STEPS = ("I: Retrieving", "I: Validating", "I: Extracting")


def board_python_packages() -> tuple[str, ...]:
    """The board runs the host's exact TVM: the RPC protocol and the exported library ABI must match."""
    return (
        f"apache-tvm=={importlib.metadata.version('apache-tvm')}",
        f"apache-tvm-ffi=={importlib.metadata.version('apache-tvm-ffi')}",
        "numpy",
        "psutil",
        "cloudpickle",
        "tornado",
        # the peers timed beside TVM on the board, at the host's versions so both machines run the same
        *(f"{package}=={version}" for package, version in peer_versions().items()),
    )



def rootfs_ready(root: Path = ROOTFS_DIR) -> bool:
    marker = root / MARKER
    if not marker.exists():
        return False
    return json.loads(marker.read_text()).get("packages") == list(board_python_packages())


def _require_tools(tools: tuple[str, ...] = ("debootstrap", "qemu-aarch64-static", "update-binfmts", "chroot")) -> None:
    missing = [tool for tool in tools if shutil.which(tool) is None]
    if missing:
        raise UserError(f"the emulated board needs {', '.join(missing)}: apt-get install qemu-user-static "
                        "binfmt-support debootstrap (install.sh installs them)")
    if os.geteuid() != 0:
        raise UserError("the emulated board runs in a chroot, which needs root (run as root or with sudo)")


def ensure_binfmt(report: Callable[[str], None] = print) -> None:
    """Let the kernel run aarch64 binaries through qemu-aarch64-static (lost at every reboot)."""
    if BINFMT_ENTRY.exists() and BINFMT_ENTRY.read_text().startswith("enabled"):
        return
    _require_tools(("qemu-aarch64-static", "update-binfmts"))
    if not (BINFMT_DIR / "register").exists():
        report(f"mounting binfmt_misc on {BINFMT_DIR}")
        _run(["mount", "-t", "binfmt_misc", "binfmt_misc", str(BINFMT_DIR)], "mount binfmt_misc")
    report("enabling qemu-aarch64 in binfmt_misc")
    _run(["update-binfmts", "--enable", "qemu-aarch64"], "update-binfmts --enable qemu-aarch64")
    if not BINFMT_ENTRY.exists():
        raise UserError(f"{BINFMT_ENTRY} is missing after update-binfmts: is qemu-user-static installed?")


def debian_mirror(sources: Path = Path("/etc/apt")) -> str:
    """The Debian mirror apt already uses here (it is reachable), else deb.debian.org."""
    files = sorted(sources.glob("sources.list.d/*.sources")) + sorted(sources.glob("sources.list.d/*.list"))
    if (sources / "sources.list").exists():
        files.insert(0, sources / "sources.list")
    for file in files:
        text = file.read_text(encoding="utf-8", errors="replace")
        if file.suffix == ".sources":
            for stanza in text.split("\n\n"):
                fields = dict(line.split(":", 1) for line in stanza.splitlines()
                              if ":" in line and not line.startswith(("#", " ")))
                suites = fields.get("Suites", "").split()
                if SUITE in suites and "deb" in fields.get("Types", "").split():
                    return fields["URIs"].split()[0]
        else:
            for line in text.splitlines():
                words = [w for w in line.split() if not w.startswith("[")]
                if len(words) >= 3 and words[0] == "deb" and words[2] == SUITE:
                    return words[1]
    return DEFAULT_MIRROR


def ensure_rootfs(root: Path = ROOTFS_DIR, mirror: str | None = None, report: Callable[[str], None] = print) -> Path:
    """Build the board's rootfs once: Debian arm64 (debootstrap) and a venv with TVM. Reruns are no-ops."""
    if rootfs_ready(root):
        return root
    _require_tools()
    ensure_binfmt(report)
    root = root.resolve()
    if not (root / "usr" / "bin" / "python3").exists():
        partial = root.with_name(root.name + ".partial")
        _remove_tree(partial)
        partial.parent.mkdir(parents=True, exist_ok=True)
        source = mirror or debian_mirror()
        report(f"debootstrap {SUITE} arm64 into {partial} from {source} (4 to 15 minutes: packages configure under qemu)")
        started = time.time()
        _run(["debootstrap", "--arch=arm64", "--variant=minbase", f"--include={','.join(DEBIAN_PACKAGES)}",
              SUITE, str(partial), source], "debootstrap", log=root.with_name(root.name + ".debootstrap.log"),
             report=report)
        _remove_tree(root)
        partial.rename(root)
        report(f"  rootfs ready in {time.time() - started:.0f} s")
    _copy_host_settings(root)
    started = time.time()
    if not (root / VENV.lstrip("/") / "bin" / "python").exists():
        report(f"creating the board's venv {VENV}")
        _run(["chroot", str(root), "/usr/bin/python3", "-m", "venv", VENV], "python3 -m venv")
    packages = board_python_packages()
    report(f"installing {' '.join(packages)} in the board's venv (aarch64 wheels)")
    _run(["chroot", str(root), f"{VENV}/bin/python", "-m", "pip", "install", "--no-input", "--progress-bar", "off",
          *packages], "pip install", env=_chroot_env())
    report(f"  venv ready in {time.time() - started:.0f} s")
    (root / MARKER).write_text(json.dumps({"suite": SUITE, "packages": list(packages),
                                           "built": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())}))
    return root


def _copy_host_settings(root: Path) -> None:
    """DNS, CA bundle and pip settings, so the board reaches registries the way the host does."""
    for setting in map(Path, HOST_SETTINGS):
        if not setting.exists():
            continue
        inside = root / setting.relative_to("/")
        inside.parent.mkdir(parents=True, exist_ok=True)
        if setting.is_dir():
            shutil.copytree(setting, inside, dirs_exist_ok=True)
        else:
            if inside.is_symlink():  # e.g. resolv.conf linked to a path that exists only on the host
                inside.unlink()
            shutil.copyfile(setting, inside)


def _chroot_env() -> dict[str, str]:
    """The host's environment minus paths that mean nothing inside the rootfs."""
    env = {k: v for k, v in os.environ.items() if not k.startswith(("PYTHON", "VIRTUAL_ENV", "LD_"))}
    env["PATH"] = f"{VENV}/bin:/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin"
    env["HOME"] = "/root"
    return env


def _run(command: list[str], what: str, env: dict[str, str] | None = None, log: Path | None = None,
         report: Callable[[str], None] = print) -> None:
    """Run a setup step; its output goes to the console, or to `log` with its milestones reported."""
    if log is None:
        returncode = subprocess.run(command, env=env, check=False).returncode
    else:
        with open(log, "w", encoding="utf-8") as out, subprocess.Popen(
            command, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True
        ) as process:
            for line in process.stdout:
                out.write(line)
                if not line.startswith(QUIET_STEPS):
                    report(f"  {line.rstrip()}")
        returncode = process.returncode
    if returncode != 0:
        where = f" (log: {log})" if log else ""
        raise UserError(f"{what} failed with exit code {returncode}{where}")


def _mounts_under(path: Path) -> list[str]:
    prefix = str(path.resolve()) + "/"
    with open("/proc/mounts", encoding="utf-8") as f:
        points = [line.split()[1] for line in f]
    return sorted((p for p in points if p.startswith(prefix)), key=len, reverse=True)


def _remove_tree(path: Path) -> None:
    """Remove a (partial) rootfs without ever descending into a filesystem mounted inside it."""
    if not path.exists():
        return
    for point in _mounts_under(path):
        subprocess.run(["umount", "-l", point], check=False)
    subprocess.run(["rm", "-rf", "--one-file-system", str(path)], check=True)


# ---- the board's RPC server ------------------------------------------------------------------------


def board_state_file(key: str, state_dir: Path = rpc.STATE_DIR) -> Path:
    return state_dir / "boards" / f"{key}.json"


def qemu_version() -> str:
    result = subprocess.run(["qemu-aarch64-static", "--version"], capture_output=True, text=True, check=False)
    return result.stdout.splitlines()[0].strip() if result.returncode == 0 and result.stdout else "qemu-aarch64"


def install_board_sources(folder: Path) -> None:
    """Copy board_server.py and the runtime plug-ins it loads into `folder` on the board (fresh each start)."""
    for source, relative in board_side_files(REPO_ROOT):
        destination = folder / relative
        destination.parent.mkdir(parents=True, exist_ok=True)
        shutil.copyfile(source, destination)


def start_board(config: TargetConfig, root: Path = ROOTFS_DIR, state_dir: Path = rpc.STATE_DIR,
                report: Callable[[str], None] = print) -> dict:
    """Start TVM's RPC server in the rootfs under qemu-user, registered under the target's key.

    Returns the board's fingerprint, read from the board once it has registered.
    """
    host, port, key = rpc.tracker_address(config)
    if not rootfs_ready(root):
        raise UserError(f"{root}: the emulated board's rootfs is not built; `invoke board.emulate` builds it once "
                        "(debootstrap + TVM wheels, 5 to 20 minutes)")
    state_file = board_state_file(key, state_dir)
    running = rpc.Background.read(state_file)
    if running is not None and running.alive():
        report(f"emulated board {key!r} already running (pid {running.pid})")
        return running.extra.get("fingerprint", {})
    if running is not None:
        rpc.stop_group(state_file)  # stale: clear what its group left behind
    if not rpc.tracker_reachable(host, port):
        raise UserError(f"no RPC tracker answers at {host}:{port} for the board to register with; "
                        "start one with `invoke tracker.start`")
    _require_tools(("qemu-aarch64-static", "chroot"))
    ensure_binfmt(report)
    script = root / SERVER_SCRIPT.lstrip("/")
    install_board_sources(script.parent)
    arguments = [SERVER_SCRIPT, "--tracker", f"{host}:{port}", "--key", key, "--host", "127.0.0.1"]
    env = {**_chroot_env(), "LWGAN_BOARD_EMULATOR": f"{qemu_version()} (user mode, chroot {root})"}
    started = time.time()
    report(f"starting the emulated board {key!r} (TVM RPC server under qemu-user in {root})")
    background = rpc.spawn_group(["chroot", str(root), f"{VENV}/bin/python", *arguments], arguments, state_file,
                                 state_file.with_suffix(".log"), {"key": key, "root": str(root)}, env=env)
    if not rpc.wait_for_board(host, port, key, REGISTER_TIMEOUT_S, alive=background.alive):
        rpc.stop_group(state_file)
        raise UserError(f"the emulated board {key!r} did not register with {host}:{port} within "
                        f"{REGISTER_TIMEOUT_S:.0f} s (log {background.log}):\n{rpc.log_tail(background.log)}")
    session = rpc.connect(config)
    fingerprint = rpc.board_fingerprint(session)
    del session  # frees the board for the next client
    data = json.loads(state_file.read_text(encoding="utf-8"))
    data["extra"]["fingerprint"] = fingerprint
    state_file.write_text(json.dumps(data), encoding="utf-8")
    report(f"emulated board {key!r} registered with {host}:{port} in {time.time() - started:.0f} s: "
           f"{fingerprint.get('machine')} {fingerprint.get('cores')} cores, {fingerprint.get('os')}, "
           f"TVM {fingerprint.get('tvm')}")
    return fingerprint


def stop_board(config: TargetConfig, state_dir: Path = rpc.STATE_DIR, report: Callable[[str], None] = print) -> bool:
    _, _, key = rpc.tracker_address(config)
    state_file = board_state_file(key, state_dir)
    background = rpc.Background.read(state_file)
    if background is None:
        report(f"no emulated board {key!r} started by this suite is running")
        return False
    rpc.stop_group(state_file)
    report(f"emulated board {key!r} (pid {background.pid}) stopped")
    return True


@dataclass(frozen=True)
class BoardStatus:
    key: str
    running: bool
    pid: int | None
    registered: int | None  # boards with the key at the tracker; None when the tracker is down
    free: int | None
    fingerprint: dict
    log: Path | None
    rootfs: Path
    rootfs_ready: bool

    def describe(self) -> str:
        lines = [f"emulated board {self.key!r}: " + (f"running (pid {self.pid}, log {self.log})" if self.running
                                                      else "not running"),
                 f"  rootfs {self.rootfs}: {'ready' if self.rootfs_ready else 'not built'}"]
        if self.registered is None:
            lines.append("  tracker: not reachable")
        else:
            lines.append(f"  tracker: {self.registered} board(s) with this key, {self.free} free")
        if self.fingerprint:
            lines.append("  board: " + ", ".join(f"{k} {v}" for k, v in self.fingerprint.items() if v))
        return "\n".join(lines)


def board_status(config: TargetConfig, root: Path = ROOTFS_DIR, state_dir: Path = rpc.STATE_DIR) -> BoardStatus:
    host, port, key = rpc.tracker_address(config)
    background = rpc.Background.read(board_state_file(key, state_dir))
    running = background is not None and background.alive()
    registered = free = None
    if rpc.tracker_reachable(host, port):
        registered, free = rpc.free_boards(rpc.tracker_summary(host, port), key)
    return BoardStatus(
        key=key,
        running=running,
        pid=background.pid if running else None,
        registered=registered,
        free=free,
        fingerprint=background.extra.get("fingerprint", {}) if running else {},
        log=background.log if background else None,
        rootfs=root,
        rootfs_ready=rootfs_ready(root),
    )
