"""Microcontroller targets: build a C export of a model (`CExport`) into firmware, check it fits, run it under qemu.

A target with `connection = "qemu-system"` names a real part's budgets (flash, RAM) in its [mcu]
table and the qemu-system-arm machine that emulates its core. The firmware links with the part's
budgets as memory regions, placed where the qemu machine maps RAM, so an image that would not fit
the part fails to link (reported as a `UserError` with the numbers) and one that fits runs as is.

qemu runs with `-icount shift=0`: each instruction advances virtual time by exactly 1 ns, which
SysTick counts; the firmware calibrates ticks against a loop of known length, so the reported
figure is executed instructions (deterministic, not cycles: qemu models no pipeline or caches).

Cycles are estimated, never measured: a qemu plugin of ours (mcu_templates/pc_counts.c) counts
executions per instruction address; the firmware's disassembly turns the counts of everything
`model_run` can reach into an instruction mix by class, and the target's [mcu.cycles] table (the
core's published cycles per class) weighs it.
"""

from __future__ import annotations

import collections
import dataclasses
import hashlib
import re
import shutil
import subprocess
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import Callable


from errors import UserError
from targets.config import TargetConfig
from targets.tensors import TensorInfo

MiB = 1 << 20
TEMPLATES_DIR = Path(__file__).resolve().parent / "mcu_templates"
MODEL_SOURCES = ("kernels.c", "model.c", "tvm_shim.c", "conv2d_s8.c")  # what a firmware project compiles (plus include/)
# RAM-backed regions of the qemu machines (from `info mtree` of qemu 7.2) and the core each emulates.
QEMU_MACHINES = {
    "mps2-an385": ("cortex-m3", ((0x00000000, 4 * MiB), (0x20000000, 4 * MiB))),
    "mps2-an386": ("cortex-m4", ((0x00000000, 4 * MiB), (0x20000000, 4 * MiB))),
    "mps2-an500": ("cortex-m7", ((0x00000000, 4 * MiB), (0x20000000, 4 * MiB))),
    # TrustZone machine: the core starts secure, so the secure aliases of the SSRAMs
    "mps2-an505": ("cortex-m33", ((0x10000000, 4 * MiB), (0x38000000, 4 * MiB))),
}
STACK_BYTES = 4096
# Instruction classes of the mix, matched on the mnemonic without width/type suffixes (".w", ".f32");
# IT-block condition codes are allowed. What matches nothing is "alu".
_CONDITION = r"(eq|ne|cs|hs|cc|lo|mi|pl|vs|vc|hi|ls|ge|lt|gt|le|al)?"
INSTRUCTION_CLASSES = {
    "branch": rf"^(b|bl|blx|bx){_CONDITION}$|^(cbz|cbnz|tbb|tbh)$",
    "multiply": rf"^(mul|mla|mls|smul\w*|smla\w*|smls\w*|smuad\w*|smusd\w*|smmul\w*|smmla\w*|smmls\w*|"
                rf"umull|umlal|umaal|smull|smlal\w*){_CONDITION}$",
    "divide": r"^(sdiv|udiv)$",
    "load_pair": rf"^ldrd{_CONDITION}$",
    "store_pair": rf"^strd{_CONDITION}$",
    "load": rf"^(ldr|ldrb|ldrh|ldrsb|ldrsh|ldrex\w*){_CONDITION}$",
    "store": rf"^(str|strb|strh|strex\w*){_CONDITION}$",
    "load_store_multiple": r"^(ldm\w*|stm\w*|push|pop)$",
    "fp_multiply_accumulate": r"^(vmla|vmls|vnmla|vnmls|vfma|vfms|vfnma|vfnms)$",
    "fp_divide": r"^(vdiv|vsqrt)$",
    "fp_load_store": r"^(vldr|vstr|vldm\w*|vstm\w*|vpush|vpop)$",
    "fp_alu": r"^v\w+$",
    "alu": r"",
}
PLUGIN_SOURCE = "pc_counts.c"
FIRMWARE_SOURCES = ("startup.c", "semihosting.c", "semihosting.h", "main.c")
QEMU = "qemu-system-arm"
CC = "arm-none-eabi-gcc"


@dataclass(frozen=True)
class CExport:
    """A model exported as a C project, what firmware is built from (compile's "c" backend writes them):
the folder and the numbers that describe it."""

    directory: Path
    model: str
    precision: str
    input: TensorInfo
    output: TensorInfo
    weights_bytes: int  # const arrays (flash)
    arena_bytes: int  # planned activations (RAM)
    peak_live_bytes: int  # lower bound for any arena
    workspace_bytes: int  # kernels' scratch pool (RAM)
    kernel_calls: int
    ram_lean: bool = False  # paddings computed inside the convolutions reading them

    @property
    def sources(self) -> list[Path]:
        return [self.directory / name for name in MODEL_SOURCES]


@dataclass(frozen=True)
class McuPart:
    """A target's microcontroller: compiler flags, qemu machine and the real part's memory budgets."""

    target: str
    label: str
    cpu: str
    cflags: tuple[str, ...]
    machine: str
    flash_origin: int
    flash_bytes: int
    ram_origin: int
    ram_bytes: int
    cycles: dict[str, float] = dataclasses.field(default_factory=dict)  # per instruction class; {} = no estimate


def mcu_part(config: TargetConfig) -> McuPart:
    """The [mcu] table of a qemu-system target, checked against the qemu machine it names."""
    if config.place != "mcu" or not config.mcu:
        raise UserError(f"{config.path}: target {config.name!r} is not a microcontroller "
                        "(expected connection = \"qemu-system\" and an [mcu] table)")
    mcu = config.mcu
    machine = mcu["qemu_machine"]
    if machine not in QEMU_MACHINES:
        raise UserError(f"{config.path}: qemu_machine {machine!r} is not supported; "
                        f"supported: {', '.join(QEMU_MACHINES)}")
    core, regions = QEMU_MACHINES[machine]
    if mcu["cpu"] != core:
        raise UserError(f"{config.path}: cpu {mcu['cpu']!r} does not match {machine}, which emulates a {core}")
    for kind in ("flash", "ram"):
        origin, size = mcu[f"{kind}_origin"], mcu[f"{kind}_bytes"]
        if size <= 0 or not any(start <= origin and origin + size <= start + length for start, length in regions):
            raise UserError(f"{config.path}: {kind} {size} bytes at {origin:#x} is not inside {machine}'s memory "
                            f"({', '.join(f'{s:#x}+{n // MiB} MiB' for s, n in regions)})")
    cycles = dict(mcu.get("cycles", {}))
    if cycles and set(cycles) != set(INSTRUCTION_CLASSES):
        raise UserError(f"{config.path}: [mcu.cycles] must give cycles for exactly these instruction classes: "
                        f"{', '.join(INSTRUCTION_CLASSES)} (missing: {', '.join(sorted(set(INSTRUCTION_CLASSES) - set(cycles))) or 'none'}; "
                        f"unknown: {', '.join(sorted(set(cycles) - set(INSTRUCTION_CLASSES))) or 'none'})")
    if any(not isinstance(v, (int, float)) or v <= 0 for v in cycles.values()):
        raise UserError(f"{config.path}: [mcu.cycles] values must be positive numbers of cycles")
    return McuPart(target=config.name, label=config.label, cpu=core, cflags=tuple(mcu["cflags"]), machine=machine,
                   flash_origin=mcu["flash_origin"], flash_bytes=mcu["flash_bytes"],
                   ram_origin=mcu["ram_origin"], ram_bytes=mcu["ram_bytes"], cycles=cycles)


@dataclass(frozen=True)
class Firmware:
    elf: Path
    flash_bytes: int  # everything stored in flash: vectors, code, constants, .data's initial values
    ram_bytes: int  # .data + .bss (arena, workspace pool, input/output buffers) + stack
    stack_bytes: int
    toolchain: str


def _require(tool: str, package: str) -> str:
    path = shutil.which(tool)
    if path is None:
        raise UserError(f"{tool} not found on PATH; install the Debian package {package}")
    return path


def toolchain_versions() -> str:
    """`arm-none-eabi-gcc <version>, qemu-system-arm <version>` for records."""
    gcc = subprocess.run([_require(CC, "gcc-arm-none-eabi"), "-dumpfullversion"], capture_output=True,
                         text=True, check=True).stdout.strip()
    qemu = subprocess.run([_require(QEMU, "qemu-system-arm"), "--version"], capture_output=True, text=True,
                          check=True).stdout.split("\n")[0]
    version = re.search(r"version (\S+)", qemu)
    return f"{CC} {gcc}, {QEMU} {version.group(1) if version else qemu}"


def _fill(template: str, values: dict[str, object]) -> str:
    text = (TEMPLATES_DIR / template).read_text()
    for key, value in values.items():
        text = text.replace(f"@{key}@", str(value))
    left = re.findall(r"@([a-z_]+)@", text)
    if left:
        raise ValueError(f"{template}: placeholders {left} not filled")
    return text


def write_firmware_project(export: CExport, part: McuPart, stack_bytes: int = STACK_BYTES) -> None:
    """Add the harness (startup, semihosting, main), linker script and Makefile to an exported model."""
    directory = export.directory
    for name in FIRMWARE_SOURCES:
        shutil.copy(TEMPLATES_DIR / name, directory / name)
    values = dict(part=part.label, machine=part.machine, cpu=part.cpu, cflags=" ".join(part.cflags),
                  flash_origin=f"{part.flash_origin:#010x}", flash_bytes=part.flash_bytes,
                  ram_origin=f"{part.ram_origin:#010x}", ram_bytes=part.ram_bytes, stack_bytes=stack_bytes)
    (directory / "linker.ld").write_text(_fill("linker.ld.in", values))
    (directory / "Makefile").write_text(_fill("Makefile.in", values))


class FirmwareTooLarge(UserError):
    """The model does not fit the part; `overflow` maps "FLASH"/"RAM" to the missing bytes."""

    def __init__(self, message: str, overflow: dict[str, int]):
        super().__init__(message)
        self.overflow = overflow


def build_firmware(export: CExport, part: McuPart, stack_bytes: int = STACK_BYTES,
                   report: Callable[[str], None] = print) -> Firmware:
    """Build firmware.elf with the project's Makefile; a model that does not fit the part is a UserError."""
    _require(CC, "gcc-arm-none-eabi")
    _require("make", "make")
    write_firmware_project(export, part, stack_bytes)
    elf = export.directory / "firmware.elf"
    elf.unlink(missing_ok=True)
    built = subprocess.run(["make", "-s", "-C", str(export.directory), "firmware.elf"], capture_output=True, text=True)
    if built.returncode != 0:
        overflow = {region: int(n) for region, n in re.findall(r"region `(\w+)' overflowed by (\d+) bytes?", built.stderr)}
        if overflow:
            raise FirmwareTooLarge(_budget_message(export, part, stack_bytes, overflow), overflow)
        raise RuntimeError(f"firmware build failed in {export.directory}:\n{built.stderr[-4000:]}")
    flash, ram = _region_usage(elf, part)
    report(f"  firmware: flash {flash} / {part.flash_bytes} bytes, RAM {ram} / {part.ram_bytes} bytes "
           f"(arena {export.arena_bytes}, stack {stack_bytes})")
    return Firmware(elf=elf, flash_bytes=flash, ram_bytes=ram, stack_bytes=stack_bytes, toolchain=toolchain_versions())


def _budget_message(export: CExport, part: McuPart, stack_bytes: int, overflow: dict[str, int]) -> str:
    parts = []
    if "FLASH" in overflow:
        parts.append(f"flash {part.flash_bytes + overflow['FLASH']} bytes > {part.flash_bytes} "
                     f"(weights {export.weights_bytes} + code)")
    if "RAM" in overflow:
        io = export.input.nbytes + export.output.nbytes
        parts.append(f"RAM {part.ram_bytes + overflow['RAM']} bytes > {part.ram_bytes} (activation arena "
                     f"{export.arena_bytes} + workspace {export.workspace_bytes} + input/output {io} + stack {stack_bytes})")
    shape = "x".join(map(str, export.input.shape))
    return f"{export.model} at {shape} does not fit {part.target} ({part.label}): {'; '.join(parts)}"


def _region_usage(elf: Path, part: McuPart) -> tuple[int, int]:
    """Bytes the image occupies in flash (by load address) and in RAM (by run address)."""
    headers = subprocess.run(["arm-none-eabi-objdump", "-h", str(elf)], capture_output=True, text=True,
                             check=True).stdout
    flash = ram = 0
    rows = re.findall(r"^\s*\d+\s+(\S+)\s+([0-9a-f]+)\s+([0-9a-f]+)\s+([0-9a-f]+)\s+[0-9a-f]+\s+\S+\n\s+(.*)$",
                      headers, re.M)
    for _name, size, vma, lma, flags in rows:
        size, vma, lma = int(size, 16), int(vma, 16), int(lma, 16)
        if "ALLOC" not in flags:
            continue
        if "LOAD" in flags and part.flash_origin <= lma < part.flash_origin + part.flash_bytes:
            flash += size
        if part.ram_origin <= vma < part.ram_origin + part.ram_bytes:
            ram += size
    return flash, ram


@dataclass(frozen=True)
class FirmwareRun:
    output: bytes
    instructions: int  # executed by one model_run, from qemu's instruction-counted clock
    stack_used_bytes: int
    instruction_mix: dict[str, int] | None = None  # executed instructions of model_run per class

    def cycles_estimate(self, cycles: dict[str, float]) -> int | None:
        """Cycles of one inference from the mix and a core's cycles per class (an estimate)."""
        if not self.instruction_mix or not cycles:
            return None
        return round(sum(count * cycles[kind] for kind, count in self.instruction_mix.items()))


def plugin_library(cache_dir: Path) -> Path:
    """The pc_counts qemu plugin, built for this machine with the host C compiler (cached by source)."""
    source = TEMPLATES_DIR / PLUGIN_SOURCE
    digest = hashlib.sha256(source.read_bytes()).hexdigest()[:12]
    library = cache_dir / f"pc_counts-{digest}.so"
    if not library.exists():
        compiler = shutil.which("cc") or shutil.which("gcc")
        if compiler is None:
            raise UserError("no host C compiler (cc) to build the qemu instruction-counting plugin; install gcc")
        cache_dir.mkdir(parents=True, exist_ok=True)
        partial = library.with_suffix(".partial")
        subprocess.run([compiler, "-shared", "-fPIC", "-O2", "-fvisibility=hidden", "-o", str(partial), str(source)],
                       check=True, capture_output=True, text=True)
        partial.replace(library)
    return library


def classify(mnemonic: str) -> str:
    """The instruction class of a disassembled mnemonic (suffixes such as ".w" or ".f32" dropped)."""
    base = mnemonic.split(".")[0]
    return next(kind for kind, pattern in INSTRUCTION_CLASSES.items() if re.match(pattern, base))


def instruction_mix(elf: Path, counts: dict[int, int], root: str = "model_run") -> dict[str, int]:
    """Executed instructions per class in `root` and every function it can reach (direct calls and tail calls).

    The harness around model_run (input, calibration loop, output) is left out, so the mix covers
    what qemu's clock measured as the inference.
    """
    disassembly = subprocess.run(["arm-none-eabi-objdump", "-d", "--no-show-raw-insn", str(elf)], capture_output=True,
                                 text=True, check=True).stdout
    functions: dict[str, list[tuple[int, str]]] = {}  # name -> (address, instruction class) of each instruction
    callees: dict[str, set[str]] = collections.defaultdict(set)
    current = None
    for line in disassembly.splitlines():
        start = re.match(r"^[0-9a-f]+ <(.+)>:$", line)
        if start:
            current = start.group(1)
            functions[current] = []
            continue
        instruction = re.match(r"^\s*([0-9a-f]+):\s+(\S+)(.*)$", line)  # 8-digit addresses come unindented
        if instruction and current is not None:
            kind = classify(instruction.group(2))
            functions[current].append((int(instruction.group(1), 16), kind))
            target = re.search(r"<([^+>]+)(\+0x[0-9a-f]+)?>", instruction.group(3))
            if target and kind == "branch" and target.group(1) != current:
                callees[current].add(target.group(1))
    if root not in functions:
        raise RuntimeError(f"{elf}: no function {root!r} in the disassembly")
    reached, pending = set(), [root]
    while pending:
        name = pending.pop()
        if name in reached or name not in functions:
            continue
        reached.add(name)
        pending.extend(callees[name])
    mix = dict.fromkeys(INSTRUCTION_CLASSES, 0)
    for name in reached:
        for address, kind in functions[name]:
            mix[kind] += counts.get(address, 0)
    return mix


def _read_counts(path: Path) -> dict[int, int]:
    return {int(address, 16): int(count) for address, count in (line.split() for line in path.read_text().splitlines())}


def run_firmware(firmware: Firmware, part: McuPart, input_bytes: bytes, output_nbytes: int,
                 timeout_s: float = 900.0, plugin: Path | None = None) -> FirmwareRun:
    """Run the firmware once under qemu-system-arm: input.bin in, output.bin and instruction count out.

    With `plugin` (`plugin_library`), the run also counts executions per address and the result
    carries model_run's instruction mix.
    """
    qemu = _require(QEMU, "qemu-system-arm")
    with tempfile.TemporaryDirectory(prefix="lwgan-qemu-") as scratch:
        work = Path(scratch)
        (work / "input.bin").write_bytes(input_bytes)
        command = [qemu, "-M", part.machine, "-nographic", "-monitor", "none", "-serial", "null",
                   "-icount", "shift=0", "-semihosting-config", "enable=on,target=native",
                   "-kernel", str(firmware.elf.resolve())]
        if plugin is not None:
            command += ["-plugin", f"{plugin},out={work / 'pc_counts.txt'}"]
        try:
            done = subprocess.run(command, cwd=work, capture_output=True, text=True, timeout=timeout_s)
        except subprocess.TimeoutExpired:
            raise UserError(f"{firmware.elf} did not finish within {timeout_s:.0f} s under {QEMU} -M {part.machine}") from None
        console = done.stdout + done.stderr  # qemu sends semihosting text to stderr when not on a tty
        values = dict(re.findall(r"^(\w+) (\d+)\r?$", console, re.M))
        if done.returncode != 0 or "inference_ticks" not in values:
            message = console.strip().splitlines()
            raise RuntimeError(f"firmware failed under {QEMU} -M {part.machine} (exit {done.returncode}): "
                               + " | ".join(message[-5:]))
        output = (work / "output.bin").read_bytes()
        mix = instruction_mix(firmware.elf, _read_counts(work / "pc_counts.txt")) if plugin is not None else None
    if len(output) != output_nbytes:
        raise RuntimeError(f"firmware wrote {len(output)} output bytes, expected {output_nbytes}")
    ticks_per_instruction = int(values["calibration_ticks"]) / int(values["calibration_instructions"])
    stack_used = int(values["stack_used_bytes"])
    if stack_used >= firmware.stack_bytes - 256:  # the paint reaches only so close to the top
        raise RuntimeError(f"firmware used {stack_used} of its {firmware.stack_bytes} stack bytes; give it more")
    return FirmwareRun(output=output, instructions=round(int(values["inference_ticks"]) / ticks_per_instruction),
                       stack_used_bytes=stack_used, instruction_mix=mix)
