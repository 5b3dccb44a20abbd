"""bench/roofline.py: the FMA peak microbenchmark and per-kernel profiles of a real TVM build."""

from __future__ import annotations

import collections

import pytest

import targets
from bench.roofline import (
    amx_bf16_peak_gflops,
    amx_int8_peak_gops,
    bf16_peak_gflops,
    fma_peak_gflops,
    int8_peak_gops,
)
from bench.run import bench_model
from compile.pipeline import from_variant
from errors import UserError
from lwgan_models.registry import find_variant
from targets import BenchRules
from targets.config import host_cpu_flags

HOST_HAS_VNNI = {"avx512_vnni", "avx512bw"} <= host_cpu_flags()
HOST_HAS_AMX = {"amx_tile", "amx_bf16", "amx_int8"} <= host_cpu_flags()

pytestmark = pytest.mark.usefixtures("one_torch_thread")


def test_fma_peak_is_a_plausible_vector_rate():
    peak = fma_peak_gflops(1)
    assert 1.0 < peak < 500.0  # one core of any x86-64 with FMA; far above scalar code's ~1 GFLOP/s at best


def test_bench_roofline_profiles_every_conv_kernel_of_the_model():
    model = from_variant(find_variant("cyclegan-resnet6-ngf16+kd"), (1, 3, 32, 32))
    rules = BenchRules(threads=1, warmup=1, samples=3, min_duration_s=0.01)
    [record] = bench_model(model, targets.resolve(targets.load_target("host")), "t", ("tvm",), rules,
                           report=lambda _: None, roofline=True)
    kernels = {k["kernel"]: k for k in record.kernel_profile}
    convs = [k for name, k in kernels.items() if "conv2d" in name]
    assert len(convs) >= 5 and all(k["gflop"] > 0 and k["gflops"] > 0 for k in convs)
    # the profiled convs do the model's MACs (padding rows aside, FLOPs = 2 x MACs)
    assert sum(k["gflop"] for k in convs) * 1e9 == pytest.approx(2 * record.macs, rel=0.1)
    assert record.fma_peak_gflops > 0
    assert [k["ms"] for k in record.kernel_profile] == sorted((k["ms"] for k in record.kernel_profile), reverse=True)


@pytest.mark.skipif(not HOST_HAS_VNNI, reason="this CPU has no AVX-512 VNNI")
def test_int8_peak_is_a_dot_product_rate_above_the_fma_peak():
    # vpdpbusd does 64 multiply-adds where an FMA does 16: whatever its issue rate, well above
    assert 2 * fma_peak_gflops(1) < int8_peak_gops(1) < 4000.0


@pytest.mark.skipif(not HOST_HAS_VNNI, reason="this CPU has no AVX-512 VNNI")
def test_an_int8_build_on_vnni_judges_its_conv_kernels_against_the_int8_peak():
    model = from_variant(find_variant("cyclegan-resnet6-ngf16+ptq"), (1, 3, 32, 32))
    rules = BenchRules(threads=1, warmup=1, samples=3, min_duration_s=0.01)
    host = targets.resolve(targets.load_target("host"), isa_level="avx512vnni")
    [record] = bench_model(model, host, "t", ("tvm",), rules, report=lambda _: None, roofline=True)
    convs = [k for k in record.kernel_profile if k["peak"] == "integer"]
    assert record.int8_peak_gops > record.fma_peak_gflops and len(convs) >= 5
    assert all(k["peak_fraction"] == pytest.approx(k["gflops"] / record.int8_peak_gops) for k in convs)


@pytest.mark.parametrize("isa_level", ["amx", "avx512vnni"])
def test_int8_build_counts_integer_conv_kernels_from_their_shapes(isa_level):
    """The profile's FLOPs come from the module the int8 build lowers (integer conv kernels), not the
    fake-quant graph; the estimator cannot read tensorized kernels, and AMX kernels fold kernel columns
    into channels, so every integer conv carries its MACs. Builds only: no AMX or VNNI needed."""
    import tvm

    from bench.run import _kernel_flops
    from compile import INTEGER_CONV, MACS_ATTR
    from compile.pipeline import prepared_kernels

    model = from_variant(find_variant("cyclegan-resnet6-ngf16+ptq"))
    target = targets.resolve(targets.load_target("host"), isa_level=isa_level)
    built = prepared_kernels(model, target)
    flops, peak_of = _kernel_flops(built)
    integer = {name for name, peak in peak_of.items() if peak in ("integer", "amx-int8")}
    kernels = {gv.name_hint: f for gv, f in built.functions_items() if isinstance(f, tvm.tirx.PrimFunc)}
    convs = {name for name in kernels if name.startswith(INTEGER_CONV)}
    assert convs and integer == convs and convs <= set(flops)
    on_tiles = {name for name in convs if peak_of[name] == "amx-int8"}  # judged against tdpbusd's peak
    assert bool(on_tiles) == (isa_level == "amx") and on_tiles != convs  # the RGB output layer stays on VNNI
    calls = collections.Counter(binding.value.args[0].name_hint for block in built["main"].body.blocks
                                for binding in block.bindings if isinstance(binding.value, tvm.relax.Call)
                                and binding.value.op.same_as(tvm.ir.Op.get("relax.call_tir")))
    # every MAC of the network, exactly once (identical convs, as the trunk's, share one kernel)
    assert sum(flops[name] * calls[name] for name in convs) == 2 * model.macs
    assert len(convs) < sum(calls[name] for name in convs)
    assert any(flops[name] > 0 for name in set(flops) - convs)  # the float glue keeps TVM's estimate
    if isa_level == "avx512vnni":  # every integer conv is VNNI-tensorized, which the estimator cannot read:
        # without the MACs it carries, such a kernel is left out, not fatal
        tensorized = kernels[sorted(convs)[0]].without_attr(MACS_ATTR)
        assert _kernel_flops(tvm.IRModule({"tensorized": tensorized})) == ({}, {})


def test_a_bf16_build_at_the_amx_level_judges_its_tile_products_against_the_amx_peak():
    """Build only: the Winograd products on tiles are "amx-bf16" kernels; of the direct convs, the stride-1
    ones with channels in 32s (the 64 -> 32 transposed conv's phases) too, the others "bf16" ones."""
    from bench.run import _kernel_flops
    import lwgan_models
    from compile.pipeline import from_registry, prepared_kernels

    model = from_registry(lwgan_models.load("cyclegan-resnet6-ngf16"), (1, 3, 128, 128))  # a 32x32 trunk: Winograd
    target = targets.resolve(targets.load_target("host"), isa_level="amx")
    flops, peak_of = _kernel_flops(prepared_kernels(model, target, "bf16"))
    assert {peak for name, peak in peak_of.items() if "winograd_products" in name} == {"amx-bf16"}
    assert {peak for name, peak in peak_of.items() if name.startswith("bf16_conv2d")} == {"bf16", "amx-bf16"}
    assert all(flops[name] > 0 for name in peak_of)


@pytest.mark.skipif(not HOST_HAS_AMX, reason="this CPU has no AMX tiles")
def test_amx_peaks_are_tile_rates_above_the_vector_dot_products():
    # a tile product does 16 x 16 x 32 (bf16) or x 64 (int8) multiply-adds: well above the vector rates
    assert amx_bf16_peak_gflops(1) > 2 * bf16_peak_gflops(1)
    assert amx_int8_peak_gops(1) > 2 * int8_peak_gops(1)


@pytest.mark.skipif(HOST_HAS_AMX, reason="this CPU has AMX tiles")
def test_an_amx_peak_on_a_cpu_without_tiles_is_a_one_line_error():
    with pytest.raises(UserError, match=r"^AMX bf16 peak microbenchmark failed: .*AMX") as info:
        amx_bf16_peak_gflops(1, repeats=1)
    assert "\n" not in str(info.value)
