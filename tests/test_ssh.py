"""targets/ssh.py and board.up/board.down against a real OpenSSH server on 127.0.0.1 (the "board" is this machine)."""

from __future__ import annotations

import os
import platform
import queue
import re
import shlex
import signal
import socket
import subprocess
import sys
import threading
import time
from importlib import metadata
from pathlib import Path

import numpy as np
import pytest
from sshd import free_port

from errors import UserError
from targets import load_target, rpc
from targets.board import (
    RuntimeVersions,
    bring_down,
    ensure_runtime,
    install_command,
    install_runtime,
    normal_arch,
    resolve_board_dir,
    target_arch,
)
from targets.ssh import connect, settings_for


@pytest.fixture(scope="module", autouse=True)
def tracker(tmp_path_factory):
    """A real TVM tracker on a free loopback port, started first: importing TVM takes a while, so it
    comes up while the SSH tests run. Stopped by its process group."""
    port = free_port()
    log = tmp_path_factory.mktemp("tracker") / "tracker.log"
    with open(log, "wb") as out:
        process = subprocess.Popen(
            [sys.executable, "-m", "tvm.exec.rpc_tracker", "--host", "127.0.0.1", "--port", str(port),
             "--port-end", str(port + 1)],
            stdout=out, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL, start_new_session=True,
        )
    yield port, process, log
    os.killpg(process.pid, signal.SIGTERM)
    process.wait(10)


def session_for(sshd, **changes):
    return connect(settings_for({**sshd.ssh_table(), **changes}))


def test_command_status_stdout_stderr_and_stdin(sshd):
    with session_for(sshd) as session:
        result = session.run("echo out; echo err >&2; exit 3")
        assert (result.exit_status, result.stdout, result.stderr) == (3, "out\n", "err\n")
        assert session.run("tr a-z A-Z", stdin="board").stdout == "BOARD"
        with pytest.raises(UserError, match="listing /no/such failed \\(exit 2\\).*No such file"):
            session.check("ls /no/such", "listing /no/such")
        with pytest.raises(UserError, match="did not finish within 1 s"):
            session.run("sleep 5", timeout_s=1)


def test_stream_delivers_lines_while_the_command_runs(sshd):
    with session_for(sshd) as session:
        arrivals = [(line, time.monotonic()) for line in session.stream("echo first; sleep 2; echo second >&2")]
        assert [line for line, _ in arrivals] == ["first", "second"]
        assert arrivals[1][1] - arrivals[0][1] > 1.0  # the first line came while the command still ran
        with pytest.raises(UserError, match="exited with status 4"):
            list(session.stream("echo x; exit 4"))


def test_unknown_host_key_is_rejected_with_its_fingerprint(sshd, tmp_path):
    other = tmp_path / "known_hosts"
    other.write_text(sshd.known_hosts.read_text().replace("[127.0.0.1]", "[10.9.9.9]"))
    fingerprint = subprocess.run(["ssh-keygen", "-lf", str(sshd.known_hosts)], capture_output=True, text=True,
                                 check=True).stdout.split()[1]
    with pytest.raises(UserError) as raised:
        session_for(sshd, known_hosts=str(other))
    message = str(raised.value)
    assert f"host key ssh-ed25519 {fingerprint} is not in {other}" in message
    assert f"ssh-keyscan -p {sshd.port} 127.0.0.1" in message and "\n" not in message
    with pytest.raises(UserError, match=f"known_hosts file {tmp_path / 'none'} not found"):
        session_for(sshd, known_hosts=str(tmp_path / "none"))


def test_changed_host_key_is_refused(sshd, tmp_path):
    impostor = tmp_path / "known_hosts"
    key_type, key = Path(f"{sshd.wrong_key}.pub").read_text().split()[:2]
    impostor.write_text(f"[127.0.0.1]:{sshd.port} {key_type} {key}\n")
    with pytest.raises(UserError, match="does not match the one in .*reinstalled"):
        session_for(sshd, known_hosts=str(impostor))


def test_wrong_key_is_an_authentication_error(sshd):
    with pytest.raises(UserError, match=f"ssh .*:{sshd.port}: authentication failed with key {sshd.wrong_key}"):
        session_for(sshd, key_file=str(sshd.wrong_key))


def test_unreachable_board_is_a_one_line_error(sshd):
    port = free_port()
    with pytest.raises(UserError, match=f"ssh .*:{port}: cannot connect \\(.*refused.*is sshd running on port {port}"):
        session_for(sshd, port=port)


def test_settings_from_table_and_destination(tmp_path):
    table = {"host": "rpi4.local", "user": "pi", "key_file": "keys/id_ed25519", "known_hosts": "~/kh"}
    settings = settings_for(table, base_dir=tmp_path)
    assert (settings.host, settings.user, settings.port) == ("rpi4.local", "pi", 22)
    assert settings.key_file == tmp_path / "keys" / "id_ed25519"
    assert settings.known_hosts == Path("~/kh").expanduser()
    override = settings_for(table, "root@10.0.0.7:2222")
    assert (override.user, override.host, override.port, override.destination) == ("root", "10.0.0.7", 2222,
                                                                                  "root@10.0.0.7:2222")
    assert settings_for({}, "10.0.0.7").host == "10.0.0.7"
    assert (settings_for({}, "pi@[fe80::1]:2200").host, settings_for({}, "pi@[fe80::1]:2200").port) == ("fe80::1", 2200)
    with pytest.raises(UserError, match="expected user@host\\[:port\\]"):
        settings_for({}, "a@b@c")
    with pytest.raises(UserError, match="port 'x' is not a number"):
        settings_for({}, "pi@host:x")
    with pytest.raises(UserError, match="no SSH host: give --ssh"):
        settings_for({"user": "pi"})


def test_reverse_tunnel_carries_bytes_both_ways(sshd):
    """A loopback-only echo server here, reached from the board side through the board's forwarded port."""
    listener = socket.create_server(("127.0.0.1", 0))
    local_port = listener.getsockname()[1]

    def echo():
        connection, _ = listener.accept()
        with connection:
            while data := connection.recv(65536):
                connection.sendall(data)

    threading.Thread(target=echo, daemon=True).start()
    payload = np.random.default_rng(0).bytes(1 << 20)
    with session_for(sshd) as session:
        tunnel = session.reverse_tunnel("127.0.0.1", local_port)
        # The board's side of the tunnel, used the way a board's program would: a client in a command there.
        client = (f"import socket, sys, threading\ns = socket.create_connection(('127.0.0.1', {tunnel.remote_port}))\n"
                  "data = sys.stdin.buffer.read()\n"
                  "threading.Thread(target=lambda: (s.sendall(data), s.shutdown(socket.SHUT_WR))).start()\n"
                  "got = b''\nwhile chunk := s.recv(65536):\n    got += chunk\nprint(got == data, len(got))")
        result = session.run(f"python3 -c {shlex.quote(client)}", stdin=payload.hex())
        assert result.stdout.split() == ["True", str(2 << 20)], result.stderr
        tunnel.close()
        time.sleep(0.2)
        with pytest.raises(ConnectionRefusedError):
            socket.create_connection(("127.0.0.1", tunnel.remote_port), timeout=2)
    listener.close()


def board_toml(tmp_path: Path, sshd, tracker_port: int, machine: str = platform.machine(), **ssh) -> Path:
    table = sshd.ssh_table(board_dir=str(tmp_path / "board"), **ssh)
    ssh_lines = "\n".join(f"{k} = {v!r}" if isinstance(v, int) else f'{k} = "{v}"' for k, v in table.items())
    path = tmp_path / "sshboard.toml"
    path.write_text(
        'label = "this machine over SSH (test board)"\nconnection = "rpc"\n'
        f'[tvm]\nkind = "llvm"\nmtriple = "{machine}-linux-gnu"\nnum-cores = 1\n'
        "[tuning]\ntrials = 1\ntrials_per_task = 1\npopulation = 2\n"
        "[bench]\nthreads = 1\nwarmup = 1\nsamples = 1\nmin_duration_s = 0.1\n"
        '[power]\nsource = "none"\n'
        f'[rpc]\ntracker_host = "127.0.0.1"\ntracker_port = {tracker_port}\nkey = "sshboard"\n'
        f"[ssh]\n{ssh_lines}\n"
    )
    return path


def test_architecture_names_agree_between_uname_and_triples():
    assert normal_arch("aarch64") == normal_arch("arm64") == "aarch64"
    assert normal_arch("armv7l") == normal_arch("armv7a") == normal_arch("thumbv7em") == "arm"
    assert normal_arch("x86_64") == normal_arch("AMD64") == "x86_64"


def test_board_of_another_architecture_is_refused_before_installing(sshd, tmp_path, tracker):
    config = load_target(board_toml(tmp_path, sshd, tracker[0], machine="aarch64"))
    assert target_arch(config) == "aarch64"
    with session_for(sshd) as session:
        with pytest.raises(UserError, match=f"the board is {platform.machine()}, but target 'sshboard' builds "
                                            "aarch64 code"):
            ensure_runtime(session, config, str(tmp_path), RuntimeVersions.of_host(), report=print)
        assert not any(tmp_path.glob("tvm-*"))


def test_install_command_pins_the_host_runtime_and_peers():
    versions = RuntimeVersions("0.27.0.post1", "0.1.14.post0", ">=3.10",
                               (("onnxruntime", "1.32.0"), ("ai-edge-litert", "2.3.0")))
    command = install_command("/usr/bin/python3", "/home/pi/.cache/lwgan board/tvm-0.27.0.post1", versions)
    assert shlex.split(command) == [
        "/usr/bin/python3", "-m", "venv", "--system-site-packages", "/home/pi/.cache/lwgan board/tvm-0.27.0.post1",
        "&&", "/home/pi/.cache/lwgan board/tvm-0.27.0.post1/bin/python", "-m", "pip", "install",
        "--disable-pip-version-check", "--progress-bar", "off", "--only-binary",
        "apache-tvm,apache-tvm-ffi,onnxruntime,ai-edge-litert",
        "apache-tvm[rpc]==0.27.0.post1", "apache-tvm-ffi==0.1.14.post0", "onnxruntime==1.32.0", "ai-edge-litert==2.3.0",
    ]
    subprocess.run(["sh", "-n", "-c", command], check=True)


@pytest.mark.slow
def test_install_runtime_makes_a_venv_running_the_host_tvm(sshd, tmp_path):
    """The real install path over SSH (20-40 s here: venv + pip). This machine's Python already has the
    pins, so the venv (which sees system packages) is made and pip resolves every pin without downloading."""
    lines = []
    with session_for(sshd) as session:
        venv = f"{resolve_board_dir(session, str(tmp_path / 'board'), create=True)}/tvm-venv"
        installed = install_runtime(session, sys.executable, venv, RuntimeVersions.of_host(), report=lines.append)
    assert installed.executable == f"{venv}/bin/python" and Path(installed.executable).exists()
    assert installed.runs(RuntimeVersions.of_host())
    assert any("apache-tvm" in line and "satisfied" in line for line in lines), lines


def test_hold_tells_board_down_from_a_crash_and_a_lost_connection(sshd, tmp_path):
    """What ends `board.up`'s foreground: the pid file gone (board.down) returns; a server that died
    while still recorded, or a dropped connection, is an error."""
    from targets.board import LOG_FILE, PID_FILE, RunningBoard

    config = load_target(board_toml(tmp_path, sshd, free_port()))
    (tmp_path / LOG_FILE).write_text("boom: the server crashed\n")
    for ending, expected in [("board.down", None), ("crash", "RPC server \\(pid \\d+\\) exited: boom"),
                             ("lost", "connection lost")]:
        server = subprocess.Popen(["sleep", "60"], start_new_session=True)
        (tmp_path / PID_FILE).write_text(f"{server.pid}\n")
        running = RunningBoard(config, session_for(sshd), None, str(tmp_path), server.pid, ("127.0.0.1", 9090), 0.0)
        held = queue.Queue()
        holder = threading.Thread(target=lambda: held.put(_outcome(lambda: running.hold(poll_s=0.1))))
        holder.start()
        time.sleep(0.3)
        assert holder.is_alive()  # holding while the server runs
        if ending == "board.down":
            (tmp_path / PID_FILE).unlink()
        if ending == "lost":
            running.session.close()
        server.kill()
        server.wait()
        holder.join(10)
        outcome = held.get_nowait()
        assert outcome is None if expected is None else re.search(expected, str(outcome)), outcome
        running.close()


def _outcome(function):
    """None when `function` returns; its UserError, or the Exit the CLI wrapper makes of one."""
    from invoke import Exit

    try:
        function()
    except (UserError, Exit) as exc:
        return exc
    return None


def test_board_up_registers_at_the_tracker_and_board_down_removes_it(sshd, tmp_path, tracker, monkeypatch):
    """The board.up task over SSH with a real tracker on this machine's loopback (so through the reverse
    tunnel); a session through the tracker reaches the board's server; board.down stops it, and
    board.up, holding the tunnel in the foreground, then ends by itself. The task runs in a thread of
    this process (the same code as `invoke board.up`, without a second TVM import)."""
    from invoke import Context

    import tasks

    tracker_port, tracker_process, tracker_log = tracker
    target = board_toml(tmp_path, sshd, tracker_port, python=sys.executable)
    config = load_target(target)
    deadline = time.monotonic() + 60
    while not rpc.tracker_reachable("127.0.0.1", tracker_port):
        assert tracker_process.poll() is None and time.monotonic() < deadline, tracker_log.read_text()
        time.sleep(0.2)

    seen: list[str] = []
    monkeypatch.setattr(tasks, "say", seen.append)
    ended = queue.Queue()
    up = threading.Thread(target=lambda: ended.put(_outcome(lambda: tasks.board_up(Context(), target=str(target)))))
    up.start()
    try:
        deadline = time.monotonic() + 150
        while not any("holding the SSH tunnel" in line for line in seen):
            assert up.is_alive() and time.monotonic() < deadline, "board.up did not register:\n" + "\n".join(seen)
            time.sleep(0.2)
        output = "\n".join(seen)
        assert "reverse SSH tunnel" in output and "registered at tracker 127.0.0.1" in output, output

        summary = rpc.tracker_summary("127.0.0.1", tracker_port)
        entries = [s for s in summary["server_info"] if s["key"] == "server:sshboard"]
        assert len(entries) == 1 and entries[0]["addr"][0] == "127.0.0.1", summary
        pid = int((tmp_path / "board" / "server.pid").read_text())
        assert os.getsid(pid) == pid  # its own session: it outlives the SSH connection that started it

        remote = rpc.connect(config, timeout_s=30)
        on_board = np.arange(6, dtype="float32")
        import tvm

        assert (tvm.runtime.tensor(on_board, remote.cpu(0)).numpy() == on_board).all()
        # the board runs board_server.py, copied over SFTP with the plug-ins: the peers answer there
        assert (tmp_path / "board" / "server" / "bench" / "runtimes" / "litert_xnnpack.py").exists()
        assert rpc.board_fingerprint(remote)["onnxruntime"] == metadata.version("onnxruntime")
        del remote

        assert bring_down(config) == ("stopped", pid)
        assert not Path(f"/proc/{pid}").exists() or _state(pid) == "Z"
        wait_until = time.monotonic() + 15
        while rpc.free_boards(rpc.tracker_summary("127.0.0.1", tracker_port), "sshboard") != (0, 0):
            assert time.monotonic() < wait_until, "the tracker still lists the stopped board"
            time.sleep(0.2)
        up.join(20)
        assert ended.get_nowait() is None
        assert "was stopped or replaced; tunnel closed" in seen[-1], "\n".join(seen)
    finally:
        bring_down(config)  # whatever happened above, no server outlives the test
        up.join(20)
    assert bring_down(config) == ("none", None)


def _state(pid: int) -> str:
    return Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
