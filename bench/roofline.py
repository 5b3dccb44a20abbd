"""Where TVM's time goes, against what the CPU can do: per-kernel GFLOP/s as a fraction of measured FMA peak.

The peak comes from a small C microbenchmark built with the host compiler in the same run (many
independent vector FMA chains per thread, so latency never limits it); so do the peaks of what bf16
and int8 kernels multiply on (vdpbf16ps, vpdpbusd, and AMX's tdpbf16ps and tdpbusd on CPUs with
tiles). Per-kernel times come from the Relax VM's instrument hook around each call; FLOPs from TVM's
own estimate on the kernels before code generation, matched by name (FuseOps names them the same way
for tuning and build).
"""

from __future__ import annotations

import functools
import string
import subprocess
import tempfile
from pathlib import Path

import tvm
from tvm import relax
from tvm.s_tir.analysis import estimate_tir_flops

from bench.runtimes.tvm_vm import kernel_times
from errors import UserError

PEAK_SOURCE = r"""
#include <omp.h>
#include <stdio.h>
#ifdef __AVX512F__
#define LANES 16
#else
#define LANES 8
#endif
typedef float vec __attribute__((vector_size(LANES * 4)));
#define ITERATIONS 4000000L
#define STEP(x) x = x * b + a
int main(void) {
  double start = omp_get_wtime();
  float sink = 0;
  #pragma omp parallel reduction(+:sink)
  {
    vec a, b, x0, x1, x2, x3, x4, x5, x6, x7, x8, x9;
    for (int i = 0; i < LANES; i++) { a[i] = 1e-3f * i; b[i] = 0.999999f; }
    x0 = a + 0; x1 = a + 1; x2 = a + 2; x3 = a + 3; x4 = a + 4; x5 = a + 5; x6 = a + 6; x7 = a + 7;
    x8 = a + 8; x9 = a + 9;
    for (long n = 0; n < ITERATIONS; n++) {  /* 10 independent chains hide the FMA latency */
      STEP(x0); STEP(x1); STEP(x2); STEP(x3); STEP(x4); STEP(x5); STEP(x6); STEP(x7); STEP(x8); STEP(x9);
    }
    vec total = x0 + x1 + x2 + x3 + x4 + x5 + x6 + x7 + x8 + x9;
    for (int i = 0; i < LANES; i++) sink += total[i];
  }
  double seconds = omp_get_wtime() - start;
  printf("%.3f %g\n", 2.0 * LANES * 10 * ITERATIONS * omp_get_max_threads() / seconds / 1e9, sink);
  return 0;
}
"""
# The same for an AVX-512 dot-product instruction: `accumulator` chains of `step` on operands `a`, `b`,
# each step `ops` operations (a multiply-add is two), summed with `reduce` at the end.
DOT_PEAK_TEMPLATE = string.Template(r"""
#include <immintrin.h>
#include <omp.h>
#include <stdio.h>
#define ITERATIONS 4000000L
#define STEP(x) x = $step(x, a, b)
#define START(k) $start(k)
int main(void) {
  double start = omp_get_wtime();
  double sink = 0;
  #pragma omp parallel reduction(+:sink)
  {
    $operands
    /* distinct starting values: equal chains would be merged into one by the compiler */
    $accumulator x0 = START(0), x1 = START(1), x2 = START(2), x3 = START(3), x4 = START(4), x5 = START(5),
                 x6 = START(6), x7 = START(7), x8 = START(8), x9 = START(9);
    for (long n = 0; n < ITERATIONS; n++) {  /* 10 independent chains hide the latency */
      STEP(x0); STEP(x1); STEP(x2); STEP(x3); STEP(x4); STEP(x5); STEP(x6); STEP(x7); STEP(x8); STEP(x9);
    }
    $accumulator total = x0 + x1 + x2 + x3 + x4 + x5 + x6 + x7 + x8 + x9;
    sink += $reduce(total);
  }
  double seconds = omp_get_wtime() - start;
  printf("%.3f %g\n", $ops * 10.0 * ITERATIONS * omp_get_max_threads() / seconds / 1e9, sink);
  return 0;
}
""")
# AVX-512 BF16's vdpbf16ps: 32 bf16 products summed pairwise into 16 float32 lanes, 64 FLOP each.
BF16_PEAK_SOURCE = DOT_PEAK_TEMPLATE.substitute(
    step="_mm512_dpbf16_ps", start="_mm512_set1_ps", accumulator="__m512", reduce="_mm512_reduce_add_ps", ops=64,
    operands="__m512bh a = (__m512bh)_mm512_set1_epi32(0x3f803f80), b = (__m512bh)_mm512_set1_epi32(0x3f7f3f7f);")
# AVX-512 VNNI's vpdpbusd: 64 u8 x s8 products summed in fours into 16 int32 lanes, 128 ops each.
INT8_PEAK_SOURCE = DOT_PEAK_TEMPLATE.substitute(
    step="_mm512_dpbusd_epi32", start="_mm512_set1_epi32", accumulator="__m512i", reduce="_mm512_reduce_add_epi32",
    ops=128, operands="__m512i a = _mm512_set1_epi32(0x01020304), b = _mm512_set1_epi32(0x01010101);")
# AMX: four independent tile products a step (the kernels' 2 x 2 accumulators), each 16 x 16 sums of
# `depth` products: tdpbf16ps 16 x 16 x 32 (16384 FLOP), tdpbusd 16 x 16 x 64 (32768 ops). Each thread
# asks Linux for the tile state first, as the kernels do.
AMX_PEAK_TEMPLATE = string.Template(r"""
#include <immintrin.h>
#include <omp.h>
#include <stdio.h>
#include <string.h>
#include <sys/syscall.h>
#include <unistd.h>
#define ITERATIONS 2000000L
struct tile_config { unsigned char palette, start_row, reserved[14]; unsigned short bytes_per_row[16]; unsigned char rows[16]; };
int main(void) {
  if (syscall(SYS_arch_prctl, 0x1023, 18) != 0) { fprintf(stderr, "Linux refused AMX tile state\n"); return 1; }
  double start = omp_get_wtime();
  double sink = 0;
  #pragma omp parallel reduction(+:sink)
  {
    struct tile_config config;
    memset(&config, 0, sizeof config);
    config.palette = 1;
    for (int t = 0; t < 8; t++) { config.rows[t] = 16; config.bytes_per_row[t] = 64; }
    _tile_loadconfig(&config);
    unsigned short operands[16 * 32];
    int sums[16 * 16];
    for (int i = 0; i < 16 * 32; i++) operands[i] = $element;
    _tile_loadd(4, operands, 64); _tile_loadd(5, operands, 64); _tile_loadd(6, operands, 64); _tile_loadd(7, operands, 64);
    _tile_zero(0); _tile_zero(1); _tile_zero(2); _tile_zero(3);
    for (long n = 0; n < ITERATIONS; n++) {
      $instruction(0, 4, 6); $instruction(1, 4, 7); $instruction(2, 5, 6); $instruction(3, 5, 7);
    }
    _tile_stored(0, sums, 64);
    sink += sums[0];
    _tile_release();
  }
  double seconds = omp_get_wtime() - start;
  printf("%.3f %g\n", $ops * 4.0 * ITERATIONS * omp_get_max_threads() / seconds / 1e9, sink);
  return 0;
}
""")
AMX_FLAGS = ["-mamx-tile", "-mamx-bf16", "-mamx-int8"]
AMX_BF16_PEAK_SOURCE = AMX_PEAK_TEMPLATE.substitute(instruction="_tile_dpbf16ps", element="0x3f80", ops=2 * 16 * 16 * 32)
AMX_INT8_PEAK_SOURCE = AMX_PEAK_TEMPLATE.substitute(instruction="_tile_dpbusd", element="0x0101", ops=2 * 16 * 16 * 64)
PROFILE_RUNS = 5


@functools.cache
def fma_peak_gflops(threads: int, repeats: int = 5) -> float:
    """Best of `repeats` runs of the float32 FMA microbenchmark on `threads` threads, in GFLOP/s."""
    return _peak_gflops("FMA", PEAK_SOURCE, ["-march=native", "-ffp-contract=fast"], threads, repeats)


@functools.cache
def bf16_peak_gflops(threads: int, repeats: int = 5) -> float:
    """Best of `repeats` runs of the vdpbf16ps microbenchmark (AVX-512 BF16) on `threads` threads, in GFLOP/s."""
    return _peak_gflops("bf16 dot-product", BF16_PEAK_SOURCE, ["-mavx512f", "-mavx512bf16"], threads, repeats)


@functools.cache
def int8_peak_gops(threads: int, repeats: int = 5) -> float:
    """Best of `repeats` runs of the vpdpbusd microbenchmark (AVX-512 VNNI) on `threads` threads, in GOP/s
    (a multiply-add is two ops, as a FLOP count has it)."""
    return _peak_gflops("int8 dot-product", INT8_PEAK_SOURCE, ["-mavx512f", "-mavx512vnni"], threads, repeats)


@functools.cache
def amx_bf16_peak_gflops(threads: int, repeats: int = 5) -> float:
    """Best of `repeats` runs of the tdpbf16ps microbenchmark (AMX-BF16 tiles) on `threads` threads, in GFLOP/s."""
    return _peak_gflops("AMX bf16", AMX_BF16_PEAK_SOURCE, AMX_FLAGS, threads, repeats)


@functools.cache
def amx_int8_peak_gops(threads: int, repeats: int = 5) -> float:
    """Best of `repeats` runs of the tdpbusd microbenchmark (AMX-INT8 tiles) on `threads` threads, in GOP/s."""
    return _peak_gflops("AMX int8", AMX_INT8_PEAK_SOURCE, AMX_FLAGS, threads, repeats)


def _peak_gflops(name: str, source_text: str, flags: list[str], threads: int, repeats: int) -> float:
    with tempfile.TemporaryDirectory() as folder:
        source, binary = Path(folder) / "peak.c", Path(folder) / "peak"
        source.write_text(source_text)
        build = subprocess.run(["gcc", "-O2", *flags, "-fopenmp", str(source), "-o", str(binary)],
                               capture_output=True, text=True)
        if build.returncode != 0:
            raise UserError(f"{name} peak microbenchmark did not build with gcc: {build.stderr.strip()[-200:]}")
        best = 0.0
        for _ in range(repeats):
            run = subprocess.run([str(binary)], capture_output=True, text=True,
                                 env={"OMP_NUM_THREADS": str(threads), "OMP_PROC_BIND": "spread"})
            if run.returncode != 0:
                raise UserError(f"{name} peak microbenchmark failed: {(run.stderr or run.stdout).strip()[-200:]}")
            best = max(best, float(run.stdout.split()[0]))
    return best


def kernel_flops(lowered: tvm.IRModule) -> dict[str, float]:
    """FLOPs of every kernel (PrimFunc) of a module after operator fusion, by name."""
    flops = {}
    for gv, func in lowered.functions.items():
        if isinstance(func, tvm.tirx.PrimFunc):
            flops[gv.name_hint] = float(estimate_tir_flops(tvm.IRModule({gv.name_hint: func})))
    return flops


def kernel_profile(vm: relax.VirtualMachine, args: list[tvm.runtime.Tensor], flops: dict[str, float],
                   peaks: dict[str, float], peak_of: dict[str, str], runs: int = PROFILE_RUNS) -> list[dict]:
    """Per kernel with a FLOP count (`args`: `main`'s inputs): calls and milliseconds per inference, GFLOP/s and
    fraction of the peak of what it multiplies on (`peak_of[kernel]`, "fma" where absent; a kernel whose peak
    is not in `peaks`, an integer one, gets none), slowest first."""
    totals = kernel_times(vm, args, runs, keep=lambda name: name in flops)
    rows = []
    for name, seconds in totals.items():
        calls = len(seconds) / runs
        ms = 1e3 * sum(seconds) / runs
        gflops = flops[name] * calls / (ms / 1e3) / 1e9 if ms > 0 else 0.0
        peak = peak_of.get(name, "fma")
        rows.append({"kernel": name, "calls": calls, "ms": ms, "gflop": flops[name] * calls / 1e9, "gflops": gflops,
                     "peak": peak, "peak_fraction": gflops / peaks[peak] if peaks.get(peak) else None})
    return sorted(rows, key=lambda row: -row["ms"])
