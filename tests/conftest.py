"""Fixtures shared by the test modules."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

import targets
from compile.build import CACHE_DIR
from compile.pipeline import ModelUnderTest, export_onnx, source_digest
from compile.torch_import import torch_to_relax


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


def model_under_test(module: torch.nn.Module, shape: tuple[int, ...], name: str = "tiny",
                     cache: Path = CACHE_DIR) -> ModelUnderTest:
    """A test's own torch generator as the stages see a registry model (fp32, random weights)."""
    digest = source_digest(name, module, shape)
    params = sum(p.numel() for p in module.parameters())
    return ModelUnderTest(name=name, family="cyclegan", variant="fp32", precision="fp32", weights="random",
                          params=params, macs=0, size_fp32_bytes=4 * params, input_shape=shape, digest=digest,
                          make_relax=lambda fused_for=None: torch_to_relax(module, shape, name, fused_for),
                          onnx_file=lambda: export_onnx(module, shape, digest, cache), torch_module=module)
