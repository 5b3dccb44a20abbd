"""targets/: TOML configs are validated with one-line errors; ISA levels are chosen from cpu flags."""

from __future__ import annotations

import tomllib

import pytest

import targets
from errors import UserError
from targets.config import TARGETS_DIR

AVX2 = {"avx2", "fma", "bmi2", "movbe", "f16c", "sse4_2"}
AVX512_VNNI = AVX2 | {"avx512f", "avx512bw", "avx512cd", "avx512dq", "avx512vl", "avx512_vnni"}


def test_host_config_matches_its_file():
    config = targets.load_target("host")
    data = tomllib.loads((TARGETS_DIR / "host.toml").read_text())
    assert config.label == data["label"] and config.connection == "local"
    assert config.bench.samples == data["bench"]["samples"] and config.bench.threads == data["bench"]["threads"]
    assert [lv.name for lv in config.isa_levels] == [lv["name"] for lv in data["isa_levels"]]


def test_unknown_target_lists_known_ones():
    with pytest.raises(UserError, match="unknown target 'toaster'; known targets: .*host"):
        targets.load_target("toaster")


GOOD = (TARGETS_DIR / "host.toml").read_text()


@pytest.mark.parametrize(
    "edit, fragments",
    [
        (lambda t: t + "\n[[[broken\n", ["not valid TOML"]),
        (lambda t: t.replace('connection = "local"', 'connection = "local"\ncolour = "blue"'), ["'colour'", "allowed: label"]),
        (lambda t: t.replace('label = "x86-64 host (this machine)"\n', ""), ["missing key 'label'"]),
        (lambda t: t.replace("samples = 30", 'samples = "thirty"'), ["'samples'", "must be int"]),
        (lambda t: t.replace('connection = "local"', 'connection = "carrier-pigeon"'), ["'connection'", "allowed: local"]),
    ],
)
def test_bad_config_names_file_and_key(tmp_path, edit, fragments):
    path = tmp_path / "board.toml"
    path.write_text(edit(GOOD))
    with pytest.raises(UserError) as info:
        targets.load_target(path)
    message = str(info.value)
    assert str(path) in message and "\n" not in message
    for fragment in fragments:
        assert fragment in message


def test_isa_level_follows_the_cpu():
    config = targets.load_target("host")
    wide = targets.resolve(config, cpu_flags=AVX512_VNNI)
    assert wide.isa_level == "avx512vnni" and wide.db_keys == ("host-avx512vnni", "host-avx2")
    assert wide.tvm_target.attrs["mcpu"] == "x86-64-v4" and int(wide.tvm_target.attrs["num-cores"]) == 2
    narrow = targets.resolve(config, cpu_flags=AVX2)
    assert narrow.isa_level == "avx2" and narrow.db_keys == ("host-avx2",)
    assert narrow.tvm_target.attrs["mcpu"] == "x86-64-v3"


def test_no_supported_or_unknown_level_is_an_error():
    config = targets.load_target("host")
    with pytest.raises(UserError, match="none of the isa levels"):
        targets.resolve(config, cpu_flags={"sse2"})
    with pytest.raises(UserError, match="unknown isa level 'avx9'; allowed: avx512vnni, avx2"):
        targets.resolve(config, isa_level="avx9")
