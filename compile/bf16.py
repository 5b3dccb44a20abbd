"""bf16 as a precision of the suite on x86: a float32 model whose Winograd products run on bf16.

Where the CPU has AVX-512 BF16 (`vdpbf16ps`: 32 bf16 products summed pairwise into 16 float32
lanes, twice the float32 FMA rate), a bf16 build rounds both operands of each Winograd point
product to bf16 and accumulates in float32: the transformed weights once at compile time, the
transformed activations in the data transform's epilogue (compile/schedules/winograd.py). Everything else
(the transforms themselves, instance norm, padding, the convs Winograd does not take) stays float32.
OpenVINO's bf16 rounds every conv's operands, so this is no less accurate than the peer it meets.

The block that multiplies is C (compile/x86_kernels/gemm_bf16.c, which says why), compiled here
with the host compiler, cached by its source, and linked into the model's library; TIR calls it
once per (point, block of 8 output channels) inside a parallel loop, so TVM's thread pool runs it.
"""

from __future__ import annotations

import hashlib
import shutil
import subprocess
from pathlib import Path

import numpy as np
import tvm
from tvm import tirx
from tvm.script.ir_builder import IRBuilder
from tvm.script.ir_builder import tirx as T
from tvm.target.codegen import target_has_features

from compile import BF16_ATTR, MACS_ATTR
from errors import UserError

KERNEL_SOURCE = Path(__file__).resolve().parent / "x86_kernels" / "gemm_bf16.c"
BLOCK_FUNCTION = "lwgan_gemm_bf16_block"
BLOCK_ROWS = 8  # output rows per call: ROWS in gemm_bf16.c
COMPILER_FLAGS = ["-O3", "-mavx512f", "-mavx512bf16", "-fPIC", "-c"]
OPAQUE_PATTERN = 8  # relax's OpPatternKind.kOpaque: an extern call fuses with nothing


def available(target: tvm.target.Target) -> bool:
    """Whether `target` is an x86 CPU with AVX-512 BF16."""
    return target.kind.name == "llvm" and target_has_features(["avx512f", "avx512bf16"], target)


def require(target: tvm.target.Target) -> None:
    """A one-line error where bf16 has no level to run at (the suite falls back to fp32 there)."""
    if not available(target):
        cpu = target.attrs.get("mcpu", target.kind.name)
        raise UserError(f"bf16 needs AVX-512 BF16 (vdpbf16ps) or AMX-BF16; target cpu {cpu} has neither")


def kernel_object(cache_dir: Path) -> Path:
    """gemm_bf16.c compiled for this machine by the host C compiler, cached by its source."""
    source = KERNEL_SOURCE.read_bytes()
    digest = hashlib.sha256(source + " ".join(COMPILER_FLAGS).encode()).hexdigest()[:12]
    obj = cache_dir / f"gemm_bf16-{digest}.o"
    if obj.exists():
        return obj
    compiler = shutil.which("cc") or shutil.which("gcc")
    if compiler is None:
        raise UserError("no host C compiler (cc) to build the bf16 kernels; install gcc")
    cache_dir.mkdir(parents=True, exist_ok=True)
    partial = obj.with_suffix(".partial.o")
    built = subprocess.run([compiler, *COMPILER_FLAGS, str(KERNEL_SOURCE), "-o", str(partial)],
                           capture_output=True, text=True)
    if built.returncode != 0:
        raise UserError(f"{KERNEL_SOURCE.name} did not compile with {compiler}: {built.stderr.strip()[-300:]}")
    partial.replace(obj)
    return obj


def link_options(mod: tvm.IRModule, cache_dir: Path) -> list[str]:
    """The objects a module's library links: the bf16 block where the module calls it."""
    return [str(kernel_object(cache_dir))] if mod.attrs is not None and mod.attrs.get(BF16_ATTR) else []


def bf16_bits(values: np.ndarray) -> np.ndarray:
    """float32 -> bf16 bit patterns (uint16), rounded to nearest even as the data transform rounds."""
    bits = np.ascontiguousarray(values, np.float32).view(np.uint32).astype(np.uint64)
    return ((bits + 0x7FFF + ((bits >> 16) & 1)) >> 16).astype(np.uint16)


def pack_rows(u: np.ndarray) -> np.ndarray:
    """[batch, rows, channels] float32 -> uint32 [batch, rows rounded up to 8, channels / 2]: bf16
    pairs of adjacent channels (the even one in the low half), zero rows to whole blocks."""
    batch, rows, channels = u.shape
    padded = np.zeros((batch, -(-rows // BLOCK_ROWS) * BLOCK_ROWS, channels), np.uint16)
    padded[:, :rows] = bf16_bits(u)
    return np.ascontiguousarray(padded).view(np.uint32)


def products(batch: int, rows: int, channels: int, columns: int) -> tirx.PrimFunc:
    """(u from `pack_rows`, v uint32 [batch, channels / 2, columns]) -> m float32 [batch, rows, columns],
    m[b] = u[b] v[b] with bf16 operands: one parallel task per (batch item, block of 8 rows)."""
    pairs, blocks = channels // 2, -(-rows // BLOCK_ROWS)
    with IRBuilder() as ib, T.prim_func(private=True):
        T.func_attr({"tirx.noalias": True, "tirx.is_scheduled": True, "op_pattern": OPAQUE_PATTERN,
                     BF16_ATTR: True, MACS_ATTR: batch * rows * channels * columns})
        u = T.arg("u", T.buffer((batch, blocks * BLOCK_ROWS, pairs), "uint32"))
        v = T.arg("v", T.buffer((batch, pairs, columns), "uint32"))
        m = T.arg("m", T.buffer((batch, rows, columns), "float32"))
        with T.sblock("root"), T.parallel(0, batch * blocks) as task:
            T.evaluate(tirx.call_extern(
                "int32", BLOCK_FUNCTION, u.data, v.data, m.data,
                *(tirx.Cast("int64", value) for value in (task // blocks, task % blocks * BLOCK_ROWS)),
                *(tirx.const(value, "int64") for value in (rows, blocks * BLOCK_ROWS, pairs, columns)),
            ))
    return ib.get()
