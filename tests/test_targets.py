"""targets/: TOML configs are validated with one-line errors; ISA levels are chosen from cpu flags."""

from __future__ import annotations

import re
import tomllib

import pytest

import targets
from errors import UserError
from targets import config as config_module
from targets.config import SCHEMA, TARGETS_DIR
from targets.power import POWER_SOURCES

HOST_TOML = TARGETS_DIR / "host.toml"
GOOD = HOST_TOML.read_text(encoding="utf-8")

AVX2 = {"sse2", "sse4_2", "avx", "avx2", "fma", "bmi2", "movbe", "f16c"}
AVX512_NO_VNNI = AVX2 | {"avx512f", "avx512bw", "avx512cd", "avx512dq", "avx512vl"}
AVX512_VNNI = AVX512_NO_VNNI | {"avx512_vnni"}
AVX512_BF16 = AVX512_VNNI | {"avx512_bf16"}  # AMD Zen 4
AMX = AVX512_BF16 | {"amx_tile", "amx_int8", "amx_bf16"}


def test_host_config_matches_its_file():
    config = targets.load_target("host")
    data = tomllib.loads(GOOD)
    assert config.name == "host"
    assert config.path == HOST_TOML
    assert config.label == data["label"]
    assert config.connection == data["connection"]
    assert config.tvm == data["tvm"]
    assert config.tuning_trials == data["tuning"]["trials"]
    assert config.tuning_trials_per_task == data["tuning"]["trials_per_task"]
    assert config.tuning_population == data["tuning"]["population"]
    assert config.bench == targets.BenchRules(
        threads=data["bench"]["threads"],
        warmup=data["bench"]["warmup"],
        samples=data["bench"]["samples"],
        min_duration_s=float(data["bench"]["min_duration_s"]),
    )
    assert config.power_source == data["power"]["source"]
    assert len(config.isa_levels) == len(data["isa_levels"])
    for level, raw in zip(config.isa_levels, data["isa_levels"]):
        assert level.name == raw["name"]
        assert level.mcpu == raw["mcpu"]
        assert level.cpu_flags == tuple(raw["cpu_flags"])
        assert level.mattr == tuple(raw.get("mattr", ()))


def test_loading_by_path_equals_loading_by_name():
    assert targets.load_target(HOST_TOML) == targets.load_target("host")
    assert targets.load_target(str(HOST_TOML)) == targets.load_target("host")


def test_unknown_target_lists_known_ones():
    known = targets.available()
    assert "host" in known
    with pytest.raises(UserError) as info:
        targets.load_target("toaster")
    message = str(info.value)
    assert "\n" not in message
    assert "'toaster'" in message
    assert message.endswith("known targets: " + ", ".join(known))


def test_missing_config_file_is_a_user_error(tmp_path):
    path = tmp_path / "nowhere.toml"
    with pytest.raises(UserError, match=re.escape(str(path))):
        targets.load_target(path)


def _replace(old: str, new: str):
    def edit(text: str) -> str:
        assert old in text, f"host.toml no longer contains {old!r}; update the test"
        return text.replace(old, new, 1)

    return edit


BAD_CONFIGS = {
    # name: (edit of host.toml, fragments the message must contain besides the path)
    "invalid-toml": (_replace("samples = 30", "samples = "), ["not valid TOML"]),
    "unknown-top-level-key": (
        _replace('connection = "local"', 'connection = "local"\ncolour = "blue"'),
        ["unknown key 'colour'", "top level", "allowed: " + ", ".join(SCHEMA[""])],
    ),
    "unknown-key-in-table": (
        _replace("samples = 30", "samples = 30\nsampels = 31"),
        ["unknown key 'sampels'", "[bench]", "allowed: " + ", ".join(SCHEMA["bench"])],
    ),
    "unknown-key-in-isa-level": (
        _replace('name = "avx2"', 'name = "avx2"\nflags = ["avx2"]'),
        ["unknown key 'flags'", "[isa_levels]", "allowed: " + ", ".join(SCHEMA["isa_levels"])],
    ),
    "missing-top-level-key": (_replace('label = "x86-64 host (this machine)"\n', ""), ["missing key 'label'"]),
    "missing-table": (_replace("[power]\nsource = \"none\"", ""), ["missing key 'power'"]),
    "missing-key-in-table": (_replace("samples = 30\n", ""), ["missing key 'samples'", "[bench]"]),
    "string-for-int": (_replace("samples = 30", 'samples = "thirty"'), ["'samples'", "must be int", "'thirty'"]),
    "float-for-int": (_replace("num-cores = 2", "num-cores = 2.0"), ["'num-cores'", "[tvm]", "must be int"]),
    "bool-for-int": (_replace("warmup = 5", "warmup = true"), ["'warmup'", "must be int"]),
    "bool-for-float": (_replace("min_duration_s = 1.0", "min_duration_s = true"), ["'min_duration_s'", "must be float"]),
    "string-for-list": (_replace('cpu_flags = ["avx2"', 'cpu_flags = "avx2" #'), ["'cpu_flags'", "must be list"]),
    "connection-choice": (
        _replace('connection = "local"', 'connection = "carrier-pigeon"'),
        ["'connection'", "'carrier-pigeon'", "allowed: local"],
    ),
    "power-source-choice": (
        _replace('source = "none"', 'source = "hamster-wheel"'),
        ["'source'", "[power]", "allowed: " + ", ".join(POWER_SOURCES)],
    ),
    "tvm-kind-choice": (_replace('kind = "llvm"', 'kind = "verilog"'), ["'kind'", "allowed: llvm, c, opencl"]),
    # A level shares the databases of a level below it, never its own name or one above.
    "databases-not-below": (
        _replace('databases = "avx512vnni"', 'databases = "amx"'),
        ["isa level 'amx' takes databases 'amx'", "not a level below it (avx512bf16, avx512vnni, avx2)"],
    ),
}
# A table given as a scalar: append it at top level (before any table header).
BAD_CONFIGS["scalar-for-table"] = (
    lambda t: 'power = "none"\n' + _replace('[power]\nsource = "none"', "")(t),
    ["'power'", "must be dict"],
)
# isa_levels entries that are not tables must be rejected like any other wrong type.
BAD_CONFIGS["isa-level-not-a-table"] = (
    lambda t: "isa_levels = [1, 2]\n" + re.sub(r"\[\[isa_levels\]\].*?(?=\[tuning\])", "", t, flags=re.S),
    ["isa_levels", "must be a table", "got 1"],
)


@pytest.mark.parametrize("case", sorted(BAD_CONFIGS))
def test_bad_config_is_a_one_line_error_naming_file_and_key(tmp_path, case):
    edit, fragments = BAD_CONFIGS[case]
    path = tmp_path / "board.toml"
    path.write_text(edit(GOOD), encoding="utf-8")
    with pytest.raises(UserError) as info:
        targets.load_target(path)
    message = str(info.value)
    assert "\n" not in message
    assert message.startswith(f"{path}: ")
    for fragment in fragments:
        assert fragment in message


def test_good_copy_in_tmp_path_loads(tmp_path):
    """Guards the edits above: the unedited file loads from any path, named after its stem."""
    path = tmp_path / "board.toml"
    path.write_text(GOOD, encoding="utf-8")
    config = targets.load_target(path)
    assert config.name == "board" and config.path == path
    assert config.bench == targets.load_target("host").bench


@pytest.fixture
def host():
    return targets.load_target("host")


def test_avx512_vnni_cpu_without_amx_chooses_avx512vnni(host, monkeypatch):
    monkeypatch.setattr(config_module, "host_cpu_flags", lambda: pytest.fail("must not read /proc/cpuinfo"))
    tvm_before = dict(host.tvm)
    resolved = targets.resolve(host, cpu_flags=AVX512_VNNI)
    assert resolved.isa_level == "avx512vnni"
    assert resolved.lower_levels == ("avx2",)
    assert resolved.db_key == "host-avx512vnni"
    assert resolved.db_keys == ("host-avx512vnni", "host-avx2")
    attrs = resolved.tvm_target.attrs
    assert resolved.tvm_target.kind.name == "llvm"
    assert str(attrs["mcpu"]) == "x86-64-v4"
    assert int(attrs["num-cores"]) == host.tvm["num-cores"] == 2
    assert [str(a) for a in attrs["mattr"]] == ["+avx512vnni"]
    assert '"mcpu":"x86-64-v4"' in str(resolved.tvm_target).replace(" ", "")
    assert host.tvm == tvm_before  # resolving never edits the config


def test_amx_cpu_chooses_amx_and_shares_the_avx512vnni_databases(host):
    resolved = targets.resolve(host, cpu_flags=AMX)
    assert resolved.isa_level == "amx"
    assert [str(a) for a in resolved.tvm_target.attrs["mattr"]] == [
        "+avx512vnni", "+avx512bf16", "+amx-tile", "+amx-int8", "+amx-bf16"]
    # Only hand-scheduled kernels differ (int8 on tiles, bf16), so the tuned databases are avx512vnni's, listed once.
    assert resolved.db_key == "host-avx512vnni"
    assert resolved.db_keys == ("host-avx512vnni", "host-avx2")


def test_avx512_bf16_cpu_without_amx_chooses_avx512bf16_and_shares_the_avx512vnni_databases(host):
    resolved = targets.resolve(host, cpu_flags=AVX512_BF16)
    assert resolved.isa_level == "avx512bf16"
    assert [str(a) for a in resolved.tvm_target.attrs["mattr"]] == ["+avx512vnni", "+avx512bf16"]
    assert resolved.db_keys == ("host-avx512vnni", "host-avx2")


def test_avx2_only_cpu_chooses_avx2(host):
    resolved = targets.resolve(host, cpu_flags=AVX2)
    assert resolved.isa_level == "avx2"
    assert resolved.lower_levels == ()
    assert resolved.db_keys == ("host-avx2",)
    attrs = resolved.tvm_target.attrs
    assert str(attrs["mcpu"]) == "x86-64-v3"
    assert int(attrs["num-cores"]) == 2
    assert "+avx512vnni" not in [str(a) for a in attrs.get("mattr", [])]


def test_a_level_needs_all_its_flags(host):
    """AVX-512 without VNNI is not the avx512vnni level."""
    assert targets.resolve(host, cpu_flags=AVX512_NO_VNNI).isa_level == "avx2"


def test_without_injected_flags_the_kernel_flags_are_used(host, monkeypatch):
    monkeypatch.setattr(config_module, "host_cpu_flags", lambda: set(AVX2))
    assert targets.resolve(host).isa_level == "avx2"
    monkeypatch.setattr(config_module, "host_cpu_flags", lambda: set(AVX512_VNNI))
    assert targets.resolve(host).isa_level == "avx512vnni"


def test_cpu_with_no_supported_level_is_an_error(host):
    with pytest.raises(UserError) as info:
        targets.resolve(host, cpu_flags={"sse2", "avx"})
    message = str(info.value)
    assert str(host.path) in message and "\n" not in message
    assert "none of the isa levels amx, avx512bf16, avx512vnni, avx2" in message


def test_explicit_level_overrides_the_cpu(host):
    resolved = targets.resolve(host, isa_level="avx2", cpu_flags=AVX512_VNNI)
    assert resolved.isa_level == "avx2" and resolved.db_keys == ("host-avx2",)
    assert str(resolved.tvm_target.attrs["mcpu"]) == "x86-64-v3"


def test_explicit_unknown_level_lists_allowed_ones(host):
    with pytest.raises(UserError) as info:
        targets.resolve(host, isa_level="avx9", cpu_flags=AVX512_VNNI)
    message = str(info.value)
    assert str(host.path) in message and "\n" not in message
    assert "unknown isa level 'avx9'; allowed: amx, avx512bf16, avx512vnni, avx2" in message


def test_config_without_levels_uses_its_tvm_table(tmp_path):
    text = re.sub(r"\[\[isa_levels\]\].*?(?=\[tuning\])", "", GOOD, flags=re.S)
    text = text.replace("num-cores = 2", 'num-cores = 4\nmcpu = "cortex-a72"\nmtriple = "aarch64-linux-gnu"')
    path = tmp_path / "board.toml"
    path.write_text(text, encoding="utf-8")
    config = targets.load_target(path)
    assert config.isa_levels == ()
    resolved = targets.resolve(config, cpu_flags=set())
    assert resolved.isa_level == "" and resolved.db_keys == ("board",)
    attrs = resolved.tvm_target.attrs
    assert str(attrs["mcpu"]) == "cortex-a72" and int(attrs["num-cores"]) == 4
    assert str(attrs["mtriple"]) == "aarch64-linux-gnu"


ROCK5B_TOML = TARGETS_DIR / "rock5b.toml"


def test_opencl_board_resolves_to_a_gpu_target_with_the_boards_cpu_as_host():
    config = targets.load_target("rock5b")
    data = tomllib.loads(ROCK5B_TOML.read_text(encoding="utf-8"))
    assert config.connection == "rpc" and config.rpc["key"] == "rock5b" and config.cross == data["cross"]
    resolved = targets.resolve(config, cpu_flags=set())
    assert resolved.db_keys == ("rock5b",)
    gpu, cpu = resolved.tvm_target, resolved.tvm_target.host
    assert gpu.kind.name == "opencl" and str(gpu.attrs["device"]) == "mali"
    assert {"mali", "opencl", "gpu"} <= {str(key) for key in gpu.keys}
    assert "num-cores" not in gpu.attrs  # the GPU target has no such option: it describes the host CPU
    assert cpu.kind.name == "llvm"
    for key in ("mtriple", "mcpu"):
        assert str(cpu.attrs[key]) == data["tvm"]["host"][key]
    assert int(cpu.attrs["num-cores"]) == data["tvm"]["num-cores"]
    assert config.tvm == {**data["tvm"]}  # resolving never edits the config


def _edited_rock5b(tmp_path, old: str, new: str):
    text = ROCK5B_TOML.read_text(encoding="utf-8")
    assert old in text, f"rock5b.toml no longer contains {old!r}; update the test"
    path = tmp_path / "gpu-board.toml"
    path.write_text(text.replace(old, new, 1), encoding="utf-8")
    return path


def test_host_num_cores_wins_over_the_tvm_table(tmp_path):
    path = _edited_rock5b(tmp_path, 'mcpu = "cortex-a76"', 'mcpu = "cortex-a76"\nnum-cores = 8')
    assert int(targets.resolve(targets.load_target(path)).tvm_target.host.attrs["num-cores"]) == 8


def test_opencl_target_without_host_is_an_error(tmp_path):
    path = _edited_rock5b(tmp_path, "[tvm.host]", "[unused]")
    path.write_text(re.sub(r"\[unused\].*?(?=\[rpc\])", "", path.read_text(), flags=re.DOTALL))
    config = targets.load_target(path)
    with pytest.raises(UserError) as info:
        targets.resolve(config)
    message = str(info.value)
    assert message.startswith(f"{path}: ") and "\n" not in message
    assert "kind 'opencl' needs a 'host' table" in message


def test_unknown_opencl_device_lists_the_known_ones(tmp_path):
    path = _edited_rock5b(tmp_path, 'device = "mali"', 'device = "toaster"')
    with pytest.raises(UserError) as info:
        targets.load_target(path)
    message = str(info.value)
    assert message.startswith(f"{path}: ") and "\n" not in message
    assert "'device' in [tvm] is 'toaster'; allowed: mali" in message


def test_host_table_on_a_cpu_target_is_an_error(tmp_path):
    path = tmp_path / "board.toml"
    path.write_text(GOOD.replace("num-cores = 2", 'num-cores = 2\nhost = {kind = "llvm"}'), encoding="utf-8")
    with pytest.raises(UserError, match=r"'host' in \[tvm\] is only for kind 'opencl', not 'llvm'"):
        targets.resolve(targets.load_target(path), cpu_flags=AVX2)


def test_tvm_rejecting_the_host_target_is_a_one_line_error(tmp_path):
    path = _edited_rock5b(tmp_path, 'mcpu = "cortex-a76"', 'mcpu = "cortex-a76"\nwarp-drive = 9')
    with pytest.raises(UserError) as info:
        targets.resolve(targets.load_target(path))
    message = str(info.value)
    assert message.startswith(f"{path}: [tvm] is not a valid TVM target") and "\n" not in message
    assert "warp-drive" in message


def test_a_resolved_target_digest_names_every_value_it_resolved_to():
    import dataclasses

    config = targets.load_target("host")
    resolved = targets.resolve(config)
    assert resolved.digest == targets.resolve(targets.load_target("host")).digest  # stable across loads
    fewer_samples = dataclasses.replace(config, bench=dataclasses.replace(config.bench, samples=3))
    assert targets.resolve(fewer_samples, resolved.isa_level).digest != resolved.digest
    other_level = next(level.name for level in config.isa_levels if level.name != resolved.isa_level)
    assert targets.resolve(config, other_level).digest != resolved.digest
