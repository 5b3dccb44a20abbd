"""Fixtures shared by the test modules."""

from __future__ import annotations

import shutil
from dataclasses import dataclass
from pathlib import Path

import pytest
import torch

import targets
from compile.build import CACHE_DIR
from compile.database import TuningDatabase
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


# A small evolutionary-search population: the tests check what tuning writes, not how well it searches.
SEARCH_POPULATION = 16
TINY_SHAPE = (1, 3, 16, 16)


def tiny_generator() -> torch.nn.Module:
    """A generator's layer kinds (reflection pad, conv, instance norm, tanh) at a size tuning takes seconds on."""
    torch.manual_seed(0)
    return torch.nn.Sequential(
        torch.nn.ReflectionPad2d(1), torch.nn.Conv2d(3, 8, 3), torch.nn.InstanceNorm2d(8), torch.nn.ReLU(),
        torch.nn.Conv2d(8, 3, 1), torch.nn.Tanh(),
    ).eval()


@dataclass(frozen=True)
class TunedDatabase:
    path: Path  # never written by a test: `copy` gives each test its own
    trials: int  # how many the tuning ran

    def copy(self, to: Path) -> TuningDatabase:
        shutil.copytree(self.path, to)
        return TuningDatabase(to)


@pytest.fixture(scope="session")
def tuned_tiny(tmp_path_factory) -> TunedDatabase:
    """`tiny_generator` tuned once on the host (each tuning starts builder and runner pools: ~30 s), so
    the tests of what tuning leaves behind share it."""
    from compile.tuning import tune

    database = TuningDatabase(tmp_path_factory.mktemp("tuned") / "db")
    trials = tune(torch_to_relax(tiny_generator(), TINY_SHAPE), targets.resolve(targets.load_target("host")).tvm_target,
                  database, trials=12, trials_per_task=4, report=lambda _: None, population=SEARCH_POPULATION)
    return TunedDatabase(database.path, trials)
