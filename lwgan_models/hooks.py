"""Forward hooks held only for the length of a `with` block, so a failing forward never leaves one behind."""

from __future__ import annotations

from collections.abc import Callable, Iterator
from contextlib import contextmanager

from torch import nn


@contextmanager
def forward_hooks(module: nn.Module, hook: Callable, select: Callable[[nn.Module], bool]) -> Iterator[None]:
    """`hook(layer, inputs, output)` on every submodule of `module` for which `select(submodule)` holds."""
    handles = [m.register_forward_hook(hook) for m in module.modules() if select(m)]
    try:
        yield
    finally:
        for handle in handles:
            handle.remove()
