"""bench/roofline.py: the FMA peak microbenchmark and per-kernel profiles of a real TVM build."""

from __future__ import annotations

import pytest

import targets
from bench.roofline import fma_peak_gflops
from bench.run import bench_model
from compile.pipeline import from_variant
from lwgan_models.registry import find_variant
from targets import BenchRules

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
