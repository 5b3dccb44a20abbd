/* Integer convolution for Cortex-M: 8-bit codes x int8 weights -> int32 -> requantized 8-bit codes.
 * Emitted by compile/backends/c.py for the QDQ convolutions of int8 models; see conv2d_s8.c. */
#ifndef LWGAN_CONV2D_S8_H
#define LWGAN_CONV2D_S8_H

#include <stdint.h>

/* The int32 geometry array written beside each convolution's weights, in this order. */
enum {
  CONV_IN_C, CONV_IN_H, CONV_IN_W, CONV_OUT_C, CONV_OUT_H, CONV_OUT_W, CONV_K_H, CONV_K_W,
  CONV_STRIDE_H, CONV_STRIDE_W, CONV_PAD_TOP, CONV_PAD_LEFT,
  CONV_IN_ZERO,   /* the input code that padding stands for (its zero point) */
  CONV_IN_SIGNED, /* 1: input codes are int8, 0: uint8 */
  CONV_OUT_ZERO,
  CONV_OUT_SIGNED, /* 1: output codes are int8, 0: uint8 */
  CONV_DEPTH_PADDED, /* in_c * k_h * k_w rounded up to a multiple of 8 (the weight rows' length) */
  CONV_GEOMETRY_SIZE
};

/* output[oc, y, x] = clamp(zero_out + requantize(bias[oc] + sum input[c, y*s+i-pad, x*s+j-pad] * w[oc, c, i, j]))
 * with requantize(a) = round(a * multiplier / 2^(32 + shift)), rounding half up, and per output channel
 * requant[3 oc ..] = multiplier, 2^(shift - 1), shift (shift >= 1).
 * weights: output channels in pairs (an odd last one with a zero row); per pair, for each group of
 * four taps in (c, i, j) order, four bytes of the first channel then four of the second, each group
 * stored as w0 w2 w1 w3 (so that sign-extending bytes 0,2 and 1,3 yields the pairs (w0,w1), (w2,w3)).
 * scratch: (5 + out_c rounded up to even) * depth_padded int16 (columns, tap offsets, tap rows and
 * columns, the weights as 16-bit pairs). Returns 0. */
int32_t lwgan_conv2d_s8(const int32_t* geometry, const void* input, const int8_t* weights, const int32_t* bias,
                        const int32_t* requant, void* output, int16_t* scratch);

#endif
