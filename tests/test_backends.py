"""compile/backends/: one backend per TVM target kind behind `compile_for_target`; a new kind is a plug-in."""

from __future__ import annotations

import dataclasses

import pytest

import targets
from compile import backends
from compile.backends import compile_for_target
from errors import UserError
from targets.config import TVM_KINDS


@pytest.fixture
def fake_target():
    """The host's config, but of a TVM target kind no backend builds."""
    host = targets.resolve(targets.load_target("host"))
    config = dataclasses.replace(host.config, name="fake-device", tvm={**host.config.tvm, "kind": "fake"})
    return dataclasses.replace(host, config=config)


def test_every_target_kind_has_a_backend():
    assert set(TVM_KINDS) <= set(backends.registered())


def test_a_registered_backend_builds_for_targets_of_its_kind(fake_target):
    calls = []

    @backends.register("fake")
    def build_fake(model, target, **options):
        calls.append((model, target, options))
        return f"{model} built for {target.config.name}"

    try:
        assert compile_for_target("a model", fake_target, out_dir="somewhere") == "a model built for fake-device"
        assert calls == [("a model", fake_target, {"out_dir": "somewhere"})]
    finally:
        backends.unregister("fake")
    assert "fake" not in backends.registered()


def test_a_kind_without_a_backend_is_a_one_line_error(fake_target):
    with pytest.raises(UserError) as info:
        compile_for_target("a model", fake_target)
    message = str(info.value)
    assert "\n" not in message and "'fake-device'" in message and "'fake'" in message
    assert all(kind in message for kind in TVM_KINDS)
