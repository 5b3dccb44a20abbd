"""Device configs: one TOML file per device under targets/, validated on load.

A config is data; everything device-specific (TVM target, ISA levels, tuning budget, benchmark
rules, connection, power source) is read from it, so adding a device means adding a file.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import tomllib
from dataclasses import dataclass, field
from pathlib import Path

import tvm

from errors import UserError
from targets.connections import CONNECTIONS, Connection
from targets.power import POWER_SOURCES

TARGETS_DIR = Path(__file__).resolve().parent

TVM_KINDS = ("llvm", "c", "opencl")
# [tvm] device of an opencl target: the GPUs this suite builds and checks kernels for (TVM takes any name).
OPENCL_DEVICES = ("mali",)

# Allowed keys per table: name -> (type, required). Unknown keys are errors, so typos surface.
SCHEMA = {
    "": {
        "label": (str, True),
        "inherits": (str, False),  # another config's name: its tables, with this file's keys on top
        "connection": (str, True),
        "tvm": (dict, True),
        "isa_levels": (list, False),
        "tuning": (dict, True),
        "bench": (dict, True),
        "power": (dict, True),
        "rpc": (dict, False),
        "ssh": (dict, False),
        "cross": (dict, False),
        "mcu": (dict, False),
    },
    "tvm": {
        "kind": (str, True),
        "mtriple": (str, False),
        "mcpu": (str, False),
        "mattr": (list, False),
        "num-cores": (int, True),
        "device": (str, False),  # opencl: e.g. "mali"
        "host": (dict, False),  # opencl: the llvm target of the board's CPU, which runs the host code
    },
    # A board at the RPC tracker: where the tracker is and the key the board registers under.
    "rpc": {"tracker_host": (str, True), "tracker_port": (int, True), "key": (str, True)},
    # SSH bring-up and remote power sensors; host keys are checked against known_hosts.
    "ssh": {"host": (str, False), "user": (str, False), "port": (int, False), "key_file": (str, False),
            "known_hosts": (str, False), "python": (str, False),
            "board_dir": (str, False)},  # board.up's folder on the board: TVM venv, server pid and log
    # Cross compiler for libraries exported to the board.
    "cross": {"cc": (str, True), "options": (list, False)},
    # Microcontroller part: compiler flags, qemu machine, and the real part's memory budgets.
    "mcu": {
        "cpu": (str, True),
        "cflags": (list, True),
        "qemu_machine": (str, True),
        "flash_origin": (int, True),
        "flash_bytes": (int, True),
        "ram_origin": (int, True),
        "ram_bytes": (int, True),
        "cycles": (dict, False),  # cycles per instruction class, for the cycle estimate (targets/mcu.py)
    },
    "isa_levels": {
        "name": (str, True),
        "mcpu": (str, True),
        "mattr": (list, False),
        "cpu_flags": (list, True),
        # A level that changes only hand-scheduled kernels shares a lower level's tuning databases.
        "databases": (str, False),
    },
    "tuning": {"trials": (int, True), "trials_per_task": (int, True), "population": (int, True)},
    "bench": {
        "threads": (int, True),
        "warmup": (int, True),
        "samples": (int, True),
        "min_duration_s": (float, True),
        # What `invoke bench` runs on this device when no --model/--shape is given (default: the demo set
        # at each model's own size); a microcontroller names generators small enough for its memory.
        "models": (list, False),
        "input_shape": (list, False),
    },
    "power": {"source": (str, True), "options": (dict, False)},  # options: keyword arguments of the probe
}
CHOICES = {
    ("", "connection"): tuple(CONNECTIONS),
    ("power", "source"): POWER_SOURCES,
    ("tvm", "kind"): TVM_KINDS,
    ("tvm", "device"): OPENCL_DEVICES,
}


@dataclass(frozen=True)
class IsaLevel:
    name: str
    mcpu: str
    cpu_flags: tuple[str, ...]
    mattr: tuple[str, ...] = ()
    databases: str = ""  # the level whose tuning databases this one uses ("": its own)


@dataclass(frozen=True)
class BenchRules:
    """Validity rules every runtime's timing loop follows (MLPerf-style: a run short of them is marked invalid)."""

    threads: int
    warmup: int
    samples: int
    min_duration_s: float


@dataclass(frozen=True)
class TargetConfig:
    name: str
    path: Path
    label: str
    connection: str
    tvm: dict
    tuning_trials: int
    tuning_trials_per_task: int
    tuning_population: int
    bench: BenchRules
    power_source: str
    isa_levels: tuple[IsaLevel, ...] = field(default=())
    power_options: dict = field(default_factory=dict)
    rpc: dict = field(default_factory=dict)
    ssh: dict = field(default_factory=dict)
    cross: dict = field(default_factory=dict)
    mcu: dict = field(default_factory=dict)
    default_models: tuple[str, ...] = ()
    default_input_shape: tuple[int, ...] | None = None

    @property
    def link(self) -> Connection:
        """What the `connection` name means (targets/connections.py): place, power, tuning runner."""
        return CONNECTIONS[self.connection]

    @property
    def place(self) -> str:
        """Where this device runs models: "host", "board" or "mcu"."""
        return self.link.place


@dataclass(frozen=True)
class ResolvedTarget:
    """A config bound to the machine at hand: the chosen ISA level and the TVM Target object."""

    config: TargetConfig
    isa_level: str
    tvm_target: tvm.target.Target
    lower_levels: tuple[str, ...] = ()  # levels this machine can also run, best first
    database_level: str = ""  # whose tuning databases this level uses, if not its own

    @property
    def db_key(self) -> str:
        """Folder name under autotune_logs/: databases are shared by every machine of one level."""
        return self._key(self.database_level or self.isa_level)

    @property
    def db_keys(self) -> tuple[str, ...]:
        """Where to look for a database: this level's, then those tuned for lower levels.

        A schedule tuned at a lower level is valid (if not ideal) code at a higher one, which beats
        running untuned on a machine nobody has tuned for yet.
        """
        databases = {level.name: level.databases or level.name for level in self.config.isa_levels}
        keys = (self.db_key, *(self._key(databases.get(level, level)) for level in self.lower_levels))
        return tuple(dict.fromkeys(keys))

    def _key(self, level: str) -> str:
        return f"{self.config.name}-{level}" if level else self.config.name

    @property
    def digest(self) -> str:
        """sha256 (16 hex digits) of everything the config resolved to: its values (inherited ones
        included), the ISA level and the TVM target. Records carry it, so a record file names the exact
        configuration it was measured under."""
        values = {key: value for key, value in dataclasses.asdict(self.config).items() if key != "path"}
        text = json.dumps({"config": values, "isa_level": self.isa_level, "tvm_target": str(self.tvm_target)},
                          sort_keys=True, default=str)
        return hashlib.sha256(text.encode()).hexdigest()[:16]


def available() -> list[str]:
    return sorted(p.stem for p in TARGETS_DIR.glob("*.toml"))


def load_target(name_or_path: str | Path) -> TargetConfig:
    path = Path(name_or_path)
    if path.suffix != ".toml":
        path = TARGETS_DIR / f"{name_or_path}.toml"
        if not path.exists():
            raise UserError(f"unknown target {str(name_or_path)!r}; known targets: {', '.join(available())}")
    if not path.exists():
        raise UserError(f"{path}: target config not found")
    data = _read_with_parents(path, seen=())
    _check_table(path, "", data)
    for table in ("tvm", "tuning", "bench", "power", "rpc", "ssh", "cross", "mcu"):
        if table in data:
            _check_table(path, table, data[table])
    levels = data.get("isa_levels", [])
    for position, level in enumerate(levels):
        _check_table(path, "isa_levels", level)
        lower = [lv.get("name") for lv in levels[position + 1 :]]
        if "databases" in level and level["databases"] not in lower:
            raise UserError(f"{path}: isa level {level['name']!r} takes databases {level['databases']!r}, "
                            f"which is not a level below it ({', '.join(lower) or 'none'})")
    bench = data["bench"]
    return TargetConfig(
        name=path.stem,
        path=path,
        label=data["label"],
        connection=data["connection"],
        tvm=dict(data["tvm"]),
        tuning_trials=data["tuning"]["trials"],
        tuning_trials_per_task=data["tuning"]["trials_per_task"],
        tuning_population=data["tuning"]["population"],
        bench=BenchRules(
            threads=bench["threads"],
            warmup=bench["warmup"],
            samples=bench["samples"],
            min_duration_s=float(bench["min_duration_s"]),
        ),
        power_source=data["power"]["source"],
        power_options=dict(data["power"].get("options", {})),
        rpc=dict(data.get("rpc", {})),
        ssh=dict(data.get("ssh", {})),
        cross=dict(data.get("cross", {})),
        mcu=dict(data.get("mcu", {})),
        default_models=tuple(bench.get("models", ())),
        default_input_shape=tuple(bench["input_shape"]) if "input_shape" in bench else None,
        isa_levels=tuple(
            IsaLevel(
                name=lv["name"],
                mcpu=lv["mcpu"],
                cpu_flags=tuple(lv["cpu_flags"]),
                mattr=tuple(lv.get("mattr", ())),
                databases=lv.get("databases", ""),
            )
            for lv in data.get("isa_levels", [])
        ),
    )


def _read_with_parents(path: Path, seen: tuple[Path, ...]) -> dict:
    """The file's tables merged over those of the config it `inherits` (key by key, one level deep)."""
    try:
        data = tomllib.loads(path.read_text(encoding="utf-8"))
    except tomllib.TOMLDecodeError as exc:
        raise UserError(f"{path}: not valid TOML ({exc})") from exc
    parent_name = data.pop("inherits", None)
    if parent_name is None:
        return data
    if not isinstance(parent_name, str):
        raise UserError(f"{path}: key 'inherits' must be a target name, got {parent_name!r}")
    parent_path = path.parent / f"{parent_name}.toml"
    if parent_path in seen or parent_path == path:
        raise UserError(f"{path}: 'inherits' forms a cycle through {parent_name!r}")
    if not parent_path.exists():
        raise UserError(f"{path}: inherits unknown target {parent_name!r}")
    merged = _read_with_parents(parent_path, (*seen, path))
    for key, value in data.items():
        if isinstance(value, dict) and isinstance(merged.get(key), dict):
            merged[key] = {**merged[key], **value}
        else:
            merged[key] = value
    return merged


def _check_table(path: Path, table: str, values: dict) -> None:
    schema = SCHEMA[table]
    where = f"[{table}]" if table else "top level"
    if not isinstance(values, dict):
        raise UserError(f"{path}: each entry of {where} must be a table, got {values!r}")
    for key in values:
        if key not in schema:
            raise UserError(f"{path}: unknown key {key!r} in {where}; allowed: {', '.join(schema)}")
    for key, (kind, required) in schema.items():
        if key not in values:
            if required:
                raise UserError(f"{path}: missing key {key!r} in {where}")
            continue
        value = values[key]
        ok = isinstance(value, (int, float)) if kind is float else isinstance(value, kind)
        if not ok or (kind in (int, float) and isinstance(value, bool)):
            raise UserError(f"{path}: key {key!r} in {where} must be {kind.__name__}, got {value!r}")
        choices = CHOICES.get((table, key))
        if choices and value not in choices:
            raise UserError(f"{path}: key {key!r} in {where} is {value!r}; allowed: {', '.join(choices)}")


def host_cpu_flags() -> set[str]:
    """CPU feature flags the kernel exposes (what really runs, unlike LLVM's model of the cpu name)."""
    try:
        text = Path("/proc/cpuinfo").read_text()
    except OSError:
        return set()
    for line in text.splitlines():
        if line.startswith("flags"):
            return set(line.split(":", 1)[1].split())
    return set()


def resolve(config: TargetConfig, isa_level: str | None = None, cpu_flags: set[str] | None = None) -> ResolvedTarget:
    """Pick the ISA level (explicit, or the first the cpu supports) and build the TVM Target.

    Levels are listed best first, each a superset of the ones after it.
    """
    attrs = dict(config.tvm)
    chosen = database_level = ""
    lower: tuple[str, ...] = ()
    if config.isa_levels:
        names = [lv.name for lv in config.isa_levels]
        if isa_level is not None:
            if isa_level not in names:
                raise UserError(f"{config.path}: unknown isa level {isa_level!r}; allowed: {', '.join(names)}")
            level = config.isa_levels[names.index(isa_level)]
        else:
            flags = host_cpu_flags() if cpu_flags is None else cpu_flags
            supported = [lv for lv in config.isa_levels if set(lv.cpu_flags) <= flags]
            if not supported:
                raise UserError(
                    f"{config.path}: this cpu has none of the isa levels {', '.join(names)} "
                    "(add a level for it to the config)"
                )
            level = supported[0]
        attrs["mcpu"] = level.mcpu
        if level.mattr:
            attrs["mattr"] = list(level.mattr)
        chosen, database_level = level.name, level.databases
        lower = tuple(names[names.index(chosen) + 1 :])
    return ResolvedTarget(config=config, isa_level=chosen, tvm_target=_tvm_target(config, attrs), lower_levels=lower,
                          database_level=database_level)


def _tvm_target(config: TargetConfig, attrs: dict) -> tvm.target.Target:
    """The TVM Target of [tvm]. An opencl target also compiles host code, for the board's CPU ([tvm] host).

    `num-cores` counts that CPU's cores, so for opencl it goes to the host target (unless host sets it).
    """
    host = attrs.pop("host", None)
    if attrs["kind"] == "c":  # generated C for a microcontroller: single-threaded, TVM's C target has no num-cores
        attrs.pop("num-cores")
    if attrs["kind"] == "opencl":
        if host is None:
            raise UserError(
                f"{config.path}: [tvm] of kind 'opencl' needs a 'host' table "
                "(the llvm target of the board's CPU, which launches the kernels)"
            )
        host = {"num-cores": attrs.pop("num-cores"), **host}
    elif host is not None:
        raise UserError(f"{config.path}: key 'host' in [tvm] is only for kind 'opencl', not {attrs['kind']!r}")
    try:
        return tvm.target.Target(attrs, host=tvm.target.Target(host)) if host else tvm.target.Target(attrs)
    except ValueError as exc:
        reason = str(exc).strip().splitlines()[0]
        raise UserError(f"{config.path}: [tvm] is not a valid TVM target ({reason})") from exc
