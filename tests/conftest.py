"""Fixtures shared by the test modules."""

from __future__ import annotations

import pytest
import torch

import targets


@pytest.fixture(scope="module")
def one_torch_thread():
    """Tiny nets gain nothing from threads, and on a busy shared CPU OpenMP spinning slows them ~10x."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture(scope="session")
def sshd(tmp_path_factory):
    """A real OpenSSH server on 127.0.0.1 with temporary keys (tests/sshd.py); the "board" is this machine."""
    from sshd import SSHD, start_sshd

    if not SSHD.exists():
        pytest.skip(f"{SSHD} not installed (apt-get install openssh-server)")
    server = start_sshd(tmp_path_factory.mktemp("sshd"))
    yield server
    server.stop()


@pytest.fixture(scope="module")
def host_target():
    """The host's TVM target at the best ISA level this machine runs."""
    return targets.resolve(targets.load_target("host")).tvm_target
