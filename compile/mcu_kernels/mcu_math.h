/* Float helpers the exported kernels call instead of libm where libm is slow on a microcontroller. */
#ifndef LWGAN_MCU_MATH_H
#define LWGAN_MCU_MATH_H

#include <math.h>

/* nearbyintf in the default rounding mode (to nearest, ties to even), inline: newlib's saves and
 * restores the FPU's exception flags around rintf, ~25 instructions per quantized value. Adding and
 * subtracting 2^23 leaves no fraction bits, so the FPU itself rounds; from 2^23 on floats are integers. */
static inline float lwgan_nearbyintf(float x) {
  const float no_fraction = 8388608.0f;
  const float magnitude = fabsf(x);
  if (!(magnitude < no_fraction)) return x; /* integral already, or NaN */
  return copysignf((magnitude + no_fraction) - no_fraction, x);
}

#endif
