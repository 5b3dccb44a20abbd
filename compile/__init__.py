"""Model import, compilation, tuning and the tuning database.

The names under which compiled code reaches the rest of the suite (bench's profiles, the tests):
"""

INTEGER_CONV = "int8_conv2d"  # the integer conv kernels of an int8 CPU build (the module numbers those after the first)
MACS_ATTR = "lwgan.conv_macs"  # each integer conv or bf16 products kernel's multiply-adds, for the roofline profile
OPAQUE_PATTERN = 8  # relax's OpPatternKind.kOpaque, as a hand-scheduled kernel's "op_pattern": FuseOps leaves it alone
BF16_ATTR = "lwgan.bf16"  # on a Relax module: run its Winograd products in bf16; on a kernel: it multiplies in bf16
TILES_ATTR = "lwgan.amx_tiles"  # on a kernel that multiplies on AMX tiles: "bf16" or "int8" (the roofline's peak)
BF16_WIDE_ATTR = "lwgan.bf16_wide"  # on a bf16 Relax module: digests of the wide Winograd convs calibrated into bf16
LOWERING_ATTR = "lwgan.int8_lowering"  # on an IRModule: an int8 build's `LoweringSummary.describe`, a bf16 one's `Budget.describe`
NATIVE_CONV = "lwgan_conv2d_s8"  # the hand-written Cortex-M kernel in compile/mcu_kernels/conv2d_s8.c
