/* Float helpers the exported kernels call instead of libm where libm is slow on a microcontroller. */
#ifndef LWGAN_MCU_MATH_H
#define LWGAN_MCU_MATH_H

#include <math.h>

/* nearbyintf in the default rounding mode (to nearest, ties to even), inline: newlib's saves and
 * restores the FPU's exception flags around rintf, ~25 instructions per quantized value. From 2^23
 * on floats are integers already. TVM calls it only to round before a quantize's cast to an
 * integer, where the sign of a zero result does not matter. */
static inline float lwgan_nearbyintf(float x) {
  const float no_fraction = 8388608.0f;
  if (!(fabsf(x) < no_fraction)) return x; /* integral already, or NaN */
#if defined(__ARM_FP) && (__ARM_FP & 4)
  float rounded; /* VCVTR rounds by the FPSCR mode: to nearest, ties to even */
  __asm__("vcvtr.s32.f32 %0, %1\n\tvcvt.f32.s32 %0, %0" : "=t"(rounded) : "t"(x));
  return rounded;
#else
  /* Adding and subtracting 2^23 leaves no fraction bits, so the FPU itself rounds. */
  return copysignf((fabsf(x) + no_fraction) - no_fraction, x);
#endif
}

#endif
