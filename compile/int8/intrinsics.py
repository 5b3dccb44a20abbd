"""u8 x s8 -> s32 dot-product tensor intrinsics for x86, one per ISA level of targets/host.toml.

Both compute C[i] += sum_k u8(A[k]) * s8(B[i, k]) for `lanes` output channels i and a 4-wide
reduction k: one broadcast 32-bit group of 4 activations against a [lanes x 4] weight block.

- AVX-512 VNNI (`vpdpbusd`, 16 lanes): the description and implementation of TVM's
  `dot_16x4_vnni`, defined here because importing `tvm.s_tir.tensor_intrin` to get it costs
  ~30-65 s per process (see compile/intrinsics.py), and because LLVM 22 changed the operand
  types of `llvm.x86.avx512.vpdpbusd.512`, which TVM's version does not follow.
- AVX2 (`vpmaddubsw` + `vpmaddwd`, 8 lanes) for CPUs without VNNI (AMD Zen 1-3, Intel before
  Ice Lake): u8 x s8 products are added in pairs into int16 *with saturation*, then the int16
  pairs are widened and added into int32. Exact only while every pair sum stays within int16,
  which `pairs_fit_int16` checks for a concrete weight tensor (7-bit weights always fit).
- AVX2 and VNNI with pixels as lanes (same instructions, the weights broadcast instead of the
  activations) for convolutions with fewer output channels than lanes (an RGB output layer).
- AVX2 int16 (`vpmaddwd`, 8 lanes x 2): C[i] += sum_k A[k] * B[i, k] on int16, for the exact
  integer Winograd convolution (compile/int8/winograd.py); int16 pair sums cannot overflow int32.

The implementations write their operands inline: TVM 0.27 turns each named intermediate into a
buffer taken from its workspace pool every time the enclosing parallel task runs (a call and a free:
15K of them per resnet6+ptq inference, 4-9% of its time).
"""

from __future__ import annotations

import numpy as np
import tvm
from tvm.s_tir import TensorIntrin
from tvm.script import tirx as T
from tvm.target.codegen import llvm_version_major, target_has_features

AVX2_DOT_8X4 = "lwgan_dot_8x4_u8i8i32_avx2"
AVX2_PIXELS_8X4 = "lwgan_dot_pixels_8x4_u8i8i32_avx2"  # 8 output pixels of one channel: for few channels
AVX2_DOT_8X2_I16 = "lwgan_dot_8x2_i16i16i32_avx2"  # Winograd's transform domain (compile/int8/winograd.py)
VNNI_DOT_16X4 = "lwgan_dot_16x4_u8i8i32_vnni"
VNNI_PIXELS_16X4 = "lwgan_dot_pixels_16x4_u8i8i32_vnni"  # 16 output pixels of one channel: for few channels
REDUCTION = 4  # activations per 32-bit group: the k extent of every intrinsic here
INT16_MAX = 32767
UINT8_MAX = 255


def _description(lanes: int):
    @T.prim_func(s_tir=True)
    def dot_desc(
        A: T.Buffer((4,), "uint8", offset_factor=1),
        B: T.Buffer((lanes, 4), "int8", offset_factor=1),
        C: T.Buffer((lanes,), "int32", offset_factor=1),
    ) -> None:
        with T.sblock("root"):
            T.reads(C[0:lanes], A[0:4], B[0:lanes, 0:4])
            T.writes(C[0:lanes])
            for i in T.serial(0, lanes):
                for k in T.serial(0, 4):
                    with T.sblock("update"):
                        vi, vk = T.axis.remap("SR", [i, k])
                        C[vi] = C[vi] + T.cast(A[vk], "int32") * T.cast(B[vi, vk], "int32")

    return dot_desc


@T.prim_func(s_tir=True)
def _dot_8x4_avx2(
    A: T.Buffer((4,), "uint8", offset_factor=1),
    B: T.Buffer((8, 4), "int8", offset_factor=1),
    C: T.Buffer((8,), "int32", offset_factor=1),
) -> None:
    with T.sblock("root"):
        T.reads(C[0:8], A[0:4], B[0:8, 0:4])
        T.writes(C[0:8])
        C[T.ramp(T.int32(0), 1, 8)] += T.call_llvm_pure_intrin(
            T.llvm_lookup_intrinsic_id("llvm.x86.avx2.pmadd.wd"),
            T.call_llvm_pure_intrin(
                T.llvm_lookup_intrinsic_id("llvm.x86.avx2.pmadd.ub.sw"),
                T.reinterpret(T.broadcast(T.reinterpret(A.vload([0], "uint8x4"), dtype="int32"), 8), dtype="uint8x32"),
                B.vload([0, 0], dtype="int8x32"), dtype="int16x16",
            ),
            T.int16x16(1), dtype="int32x8",
        )


def _pixels_description(lanes: int):
    @T.prim_func(s_tir=True)
    def pixels_desc(
        A: T.Buffer((lanes, 4), "uint8", offset_factor=1),
        B: T.Buffer((4,), "int8", offset_factor=1),
        C: T.Buffer((lanes,), "int32", offset_factor=1),
    ) -> None:
        with T.sblock("root"):
            T.reads(C[0:lanes], A[0:lanes, 0:4], B[0:4])
            T.writes(C[0:lanes])
            for i in T.serial(0, lanes):
                for k in T.serial(0, 4):
                    with T.sblock("update"):
                        vi, vk = T.axis.remap("SR", [i, k])
                        C[vi] = C[vi] + T.cast(A[vi, vk], "int32") * T.cast(B[vk], "int32")

    return pixels_desc


@T.prim_func(s_tir=True)
def _dot_pixels_8x4_avx2(
    A: T.Buffer((8, 4), "uint8", offset_factor=1),
    B: T.Buffer((4,), "int8", offset_factor=1),
    C: T.Buffer((8,), "int32", offset_factor=1),
) -> None:
    with T.sblock("root"):
        T.reads(C[0:8], A[0:8, 0:4], B[0:4])
        T.writes(C[0:8])
        C[T.ramp(T.int32(0), 1, 8)] += T.call_llvm_pure_intrin(
            T.llvm_lookup_intrinsic_id("llvm.x86.avx2.pmadd.wd"),
            T.call_llvm_pure_intrin(
                T.llvm_lookup_intrinsic_id("llvm.x86.avx2.pmadd.ub.sw"), A.vload([0, 0], dtype="uint8x32"),
                T.reinterpret(T.broadcast(T.reinterpret(B.vload([0], "int8x4"), dtype="int32"), 8), dtype="int8x32"),
                dtype="int16x16",
            ),
            T.int16x16(1), dtype="int32x8",
        )


@T.prim_func(s_tir=True)
def _dot_16x4_vnni(
    A: T.Buffer((4,), "uint8", offset_factor=1),
    B: T.Buffer((16, 4), "int8", offset_factor=1),
    C: T.Buffer((16,), "int32", offset_factor=1),
) -> None:
    """LLVM >= 22 declares vpdpbusd on byte vectors (<64 x i8>); TVM's own `dot_16x4_vnni` still
    passes <16 x i32> and fails LLVM's verifier there."""
    with T.sblock("root"):
        T.reads(C[0:16], A[0:4], B[0:16, 0:4])
        T.writes(C[0:16])
        C[T.ramp(T.int32(0), 1, 16)] = T.call_llvm_pure_intrin(
            T.llvm_lookup_intrinsic_id("llvm.x86.avx512.vpdpbusd.512"), C.vload([0], dtype="int32x16"),
            T.reinterpret(T.broadcast(T.reinterpret(A.vload([0], "uint8x4"), dtype="int32"), 16), dtype="uint8x64"),
            B.vload([0, 0], dtype="int8x64"), dtype="int32x16",
        )


@T.prim_func(s_tir=True)
def _dot_16x4_vnni_i32_operands(
    A: T.Buffer((4,), "uint8", offset_factor=1),
    B: T.Buffer((16, 4), "int8", offset_factor=1),
    C: T.Buffer((16,), "int32", offset_factor=1),
) -> None:
    """The same for LLVM < 22, which declares vpdpbusd on <16 x i32> (TVM's `dot_16x4_vnni`)."""
    with T.sblock("root"):
        T.reads(C[0:16], A[0:4], B[0:16, 0:4])
        T.writes(C[0:16])
        C[T.ramp(T.int32(0), 1, 16)] = T.call_llvm_pure_intrin(
            T.llvm_lookup_intrinsic_id("llvm.x86.avx512.vpdpbusd.512"), C.vload([0], dtype="int32x16"),
            T.broadcast(T.reinterpret(A.vload([0], "uint8x4"), dtype="int32"), 16),
            T.reinterpret(B.vload([0, 0], dtype="int8x64"), dtype="int32x16"), dtype="int32x16",
        )


@T.prim_func(s_tir=True)
def _dot_pixels_16x4_vnni(
    A: T.Buffer((16, 4), "uint8", offset_factor=1),
    B: T.Buffer((4,), "int8", offset_factor=1),
    C: T.Buffer((16,), "int32", offset_factor=1),
) -> None:
    """16 output pixels of one channel: the pixels' 4-channel groups against one broadcast weight group."""
    with T.sblock("root"):
        T.reads(C[0:16], A[0:16, 0:4], B[0:4])
        T.writes(C[0:16])
        C[T.ramp(T.int32(0), 1, 16)] = T.call_llvm_pure_intrin(
            T.llvm_lookup_intrinsic_id("llvm.x86.avx512.vpdpbusd.512"), C.vload([0], dtype="int32x16"),
            A.vload([0, 0], dtype="uint8x64"),
            T.reinterpret(T.broadcast(T.reinterpret(B.vload([0], "int8x4"), dtype="int32"), 16), dtype="int8x64"),
            dtype="int32x16",
        )


@T.prim_func(s_tir=True)
def _dot_pixels_16x4_vnni_i32_operands(
    A: T.Buffer((16, 4), "uint8", offset_factor=1),
    B: T.Buffer((4,), "int8", offset_factor=1),
    C: T.Buffer((16,), "int32", offset_factor=1),
) -> None:
    """The same for LLVM < 22 (vpdpbusd on <16 x i32>)."""
    with T.sblock("root"):
        T.reads(C[0:16], A[0:16, 0:4], B[0:4])
        T.writes(C[0:16])
        C[T.ramp(T.int32(0), 1, 16)] = T.call_llvm_pure_intrin(
            T.llvm_lookup_intrinsic_id("llvm.x86.avx512.vpdpbusd.512"), C.vload([0], dtype="int32x16"),
            T.reinterpret(A.vload([0, 0], dtype="uint8x64"), dtype="int32x16"),
            T.broadcast(T.reinterpret(B.vload([0], "int8x4"), dtype="int32"), 16), dtype="int32x16",
        )


@T.prim_func(s_tir=True)
def _dot_8x2_i16_desc(
    A: T.Buffer((2,), "int16", offset_factor=1),
    B: T.Buffer((8, 2), "int16", offset_factor=1),
    C: T.Buffer((8,), "int32", offset_factor=1),
) -> None:
    with T.sblock("root"):
        T.reads(C[0:8], A[0:2], B[0:8, 0:2])
        T.writes(C[0:8])
        for i in T.serial(0, 8):
            for k in T.serial(0, 2):
                with T.sblock("update"):
                    vi, vk = T.axis.remap("SR", [i, k])
                    C[vi] = C[vi] + T.cast(A[vk], "int32") * T.cast(B[vi, vk], "int32")


@T.prim_func(s_tir=True)
def _dot_8x2_i16_avx2(
    A: T.Buffer((2,), "int16", offset_factor=1),
    B: T.Buffer((8, 2), "int16", offset_factor=1),
    C: T.Buffer((8,), "int32", offset_factor=1),
) -> None:
    with T.sblock("root"):
        T.reads(C[0:8], A[0:2], B[0:8, 0:2])
        T.writes(C[0:8])
        C[T.ramp(T.int32(0), 1, 8)] += T.call_llvm_pure_intrin(
            T.llvm_lookup_intrinsic_id("llvm.x86.avx2.pmadd.wd"),
            T.reinterpret(T.broadcast(T.reinterpret(A.vload([0], "int16x2"), dtype="int32"), 8), dtype="int16x16"),
            B.vload([0, 0], dtype="int16x16"), dtype="int32x8",
        )


# name -> (lanes, whether int16 pair sums saturate)
INTRINSICS = {AVX2_DOT_8X4: (8, True), VNNI_DOT_16X4: (16, False)}
# channel-lane intrinsic -> its pixel-lane twin (same instructions, the weights broadcast instead)
PIXELS_INTRINSIC = {AVX2_DOT_8X4: AVX2_PIXELS_8X4, VNNI_DOT_16X4: VNNI_PIXELS_16X4}


def register_int8_intrinsics() -> None:
    """Register the intrinsics once per process (cheap: two small TVMScript functions each)."""
    if TensorIntrin.get(AVX2_DOT_8X4, allow_missing=True) is not None:
        return
    TensorIntrin.register(AVX2_DOT_8X4, _description(8), _dot_8x4_avx2)
    TensorIntrin.register(AVX2_PIXELS_8X4, _pixels_description(8), _dot_pixels_8x4_avx2)
    TensorIntrin.register(AVX2_DOT_8X2_I16, _dot_8x2_i16_desc, _dot_8x2_i16_avx2)
    byte_operands = (llvm_version_major(allow_none=True) or 0) >= 22
    TensorIntrin.register(VNNI_DOT_16X4, _description(16), _dot_16x4_vnni if byte_operands else _dot_16x4_vnni_i32_operands)
    TensorIntrin.register(VNNI_PIXELS_16X4, _pixels_description(16),
                          _dot_pixels_16x4_vnni if byte_operands else _dot_pixels_16x4_vnni_i32_operands)


def intrinsic_for(target: tvm.target.Target) -> str | None:
    """The dot-product intrinsic `target` can run: VNNI where it has AVX-512 VNNI, else AVX2, else None."""
    if target.kind.name != "llvm":
        return None
    if target_has_features(["avx512vnni", "avx512bw"], target):
        return VNNI_DOT_16X4
    if target_has_features("avx2", target):
        return AVX2_DOT_8X4
    return None


def pairs_fit_int16(packed_weight: np.ndarray) -> bool:
    """Whether `vpmaddubsw` is exact on these weights: every adjacent pair along the 4-wide reduction
    axis (last) satisfies 255 * (|w0| + |w1|) <= 32767, so no u8 activations can saturate it."""
    pair_sums = np.abs(packed_weight.astype(np.int32)).reshape(*packed_weight.shape[:-1], REDUCTION // 2, 2).sum(-1)
    return int(pair_sums.max(initial=0)) * UINT8_MAX <= INT16_MAX
