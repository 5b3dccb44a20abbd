/* Integer convolution for Cortex-M, written for the DSP extension (M4, M7, M33) and exact without it.
 *
 * For each pair of output pixels, the receptive fields are gathered once into `columns` as int16
 * (padding with the input's zero-point code). Each pair of output channels then walks its int8
 * weight rows four taps at a time: one 32-bit load per row, sign-extended into two 16-bit pairs
 * (SXTB16), and each pair multiplied into both pixels' accumulators with SMLAD (two MACs per
 * instruction): 2 pixels x 2 channels share every load. The int32 result is requantized in
 * 32-bit arithmetic, exactly as the 64-bit reference (a * m + 2^(s-1)) >> s with s = 32 + shift:
 * for shift >= 1 the low word of a * m cannot carry into the result, so it is the high word (SMMUL)
 * plus 2^(shift-1), shifted right by shift; for shift = 0 it is the rounding high word (SMMULR).
 *
 * Without __ARM_FEATURE_DSP the same arithmetic runs in plain C (the host tests use this). */
#include "conv2d_s8.h"

#include <string.h>

#if defined(__ARM_FEATURE_DSP)
#include <arm_acle.h>
#define PAIRS_LOW(word) __sxtb16(word)
static inline uint32_t pairs_high(uint32_t word) {
  uint32_t pairs;
  __asm__("sxtb16 %0, %1, ror #8" : "=r"(pairs) : "r"(word)); /* gcc does not fold the rotation itself */
  return pairs;
}
#define PAIRS_HIGH(word) pairs_high(word)
#define DOT2(a, b, acc) __smlad((a), (b), (acc))
static inline int32_t high_mul(int32_t a, int32_t b) {
  int32_t high;
  __asm__("smmul %0, %1, %2" : "=r"(high) : "r"(a), "r"(b));
  return high;
}
static inline int32_t high_mul_round(int32_t a, int32_t b) {
  int32_t high;
  __asm__("smmulr %0, %1, %2" : "=r"(high) : "r"(a), "r"(b));
  return high;
}
#else
static inline uint32_t sign_extend_bytes_0_2(uint32_t word) {
  return (uint32_t)(uint16_t)(int16_t)(int8_t)(word & 0xffu) | (uint32_t)(uint16_t)(int16_t)(int8_t)(word >> 16) << 16;
}
static inline int32_t dot2(uint32_t a, uint32_t b, int32_t acc) {
  int32_t low = (int32_t)(int16_t)a * (int16_t)b, high = (int32_t)(int16_t)(a >> 16) * (int16_t)(b >> 16);
  return (int32_t)((uint32_t)acc + (uint32_t)low + (uint32_t)high); /* wraps like SMLAD */
}
#define PAIRS_LOW(word) sign_extend_bytes_0_2(word)
#define PAIRS_HIGH(word) sign_extend_bytes_0_2((word) >> 8)
#define DOT2(a, b, acc) dot2((a), (b), (acc))
static inline int32_t high_mul(int32_t a, int32_t b) { return (int32_t)(((int64_t)a * b) >> 32); }
static inline int32_t high_mul_round(int32_t a, int32_t b) {
  return (int32_t)(((int64_t)a * b + (INT64_C(1) << 31)) >> 32);
}
#endif

static inline uint32_t load32(const void* p) {
  uint32_t word;
  memcpy(&word, p, sizeof word); /* one LDR: Armv7-M/v8-M allow unaligned word loads */
  return word;
}

static inline uint8_t requantize(int32_t acc, int32_t multiplier, int32_t shift, const int32_t* g) {
  int32_t value = shift > 0 ? (high_mul(acc, multiplier) + (1 << (shift - 1))) >> shift : high_mul_round(acc, multiplier);
  value += g[CONV_OUT_ZERO];
  value = value < g[CONV_OUT_MIN] ? g[CONV_OUT_MIN] : value > g[CONV_OUT_MAX] ? g[CONV_OUT_MAX] : value;
  return (uint8_t)value; /* int8 outputs are stored as their two's complement byte */
}

/* The receptive field of output pixel (y, x) as depth_padded int16, in (channel, row, column) order. */
static void gather(const int32_t* g, const uint8_t* input, int32_t y, int32_t x, int16_t* column) {
  const int32_t in_h = g[CONV_IN_H], in_w = g[CONV_IN_W], k_h = g[CONV_K_H], k_w = g[CONV_K_W];
  const int32_t top = y * g[CONV_STRIDE_H] - g[CONV_PAD_TOP], left = x * g[CONV_STRIDE_W] - g[CONV_PAD_LEFT];
  const int32_t is_signed = g[CONV_IN_SIGNED];
  const int16_t zero = (int16_t)g[CONV_IN_ZERO];
  const int inside = top >= 0 && left >= 0 && top + k_h <= in_h && left + k_w <= in_w;
  int16_t* out = column;
  for (int32_t c = 0; c < g[CONV_IN_C]; ++c) {
    const uint8_t* plane = input + c * in_h * in_w;
    for (int32_t i = 0; i < k_h; ++i) {
      const int32_t row_y = top + i;
      const uint8_t* row = plane + row_y * in_w + left;
      if (inside && !is_signed) {
        for (int32_t j = 0; j < k_w; ++j) *out++ = row[j];
      } else if (inside) {
        for (int32_t j = 0; j < k_w; ++j) *out++ = (int8_t)row[j];
      } else {
        for (int32_t j = 0; j < k_w; ++j) {
          const int32_t col_x = left + j;
          if (row_y < 0 || row_y >= in_h || col_x < 0 || col_x >= in_w) *out++ = zero;
          else *out++ = is_signed ? (int16_t)(int8_t)row[j] : (int16_t)row[j];
        }
      }
    }
  }
  while (out < column + g[CONV_DEPTH_PADDED]) *out++ = 0; /* meets zero weights */
}

/* Both pixels' columns interleaved four taps at a time (p0 k0..k3, p1 k0..k3, p0 k4..k7, ...), so the
 * inner loop walks one column pointer and one weight pointer: its live values fit the 13 registers. */
static void interleave(const int16_t* first, const int16_t* second, int32_t depth, int16_t* out) {
  for (int32_t k = 0; k < depth; k += 4, out += 8) {
    memcpy(out, first + k, 4 * sizeof *out);
    memcpy(out + 4, second + k, 4 * sizeof *out);
  }
}

int32_t lwgan_conv2d_s8(const int32_t* g, const void* input, const int8_t* weights, const int32_t* bias,
                        const int32_t* multiplier, const int32_t* shift, void* output, int16_t* columns) {
  const int32_t out_c = g[CONV_OUT_C], out_w = g[CONV_OUT_W], pixels = g[CONV_OUT_H] * out_w;
  const int32_t depth = g[CONV_DEPTH_PADDED];
  int16_t* pair_columns = columns + 2 * depth;
  uint8_t* out = output;
  for (int32_t p = 0; p < pixels; p += 2) {
    const int two = p + 1 < pixels; /* an odd last pixel is computed twice, stored once */
    const int32_t q = two ? p + 1 : p;
    gather(g, input, p / out_w, p % out_w, columns);
    gather(g, input, q / out_w, q % out_w, columns + depth);
    interleave(columns, columns + depth, depth, pair_columns);
    const uint32_t* w = (const uint32_t*)weights; /* per pair of channels, a word of each per group */
    for (int32_t oc = 0; oc < out_c; oc += 2) {
      const int32_t od = oc + 1 < out_c ? oc + 1 : oc; /* an odd last channel pairs with zero weights */
      const uint32_t* c = (const uint32_t*)pair_columns; /* 16-bit pairs, two words per pixel per group */
      const uint32_t* const end = c + depth;
      int32_t a00 = bias[oc], a01 = bias[oc], a10 = bias[od], a11 = bias[od];
      for (; c < end; c += 4, w += 2) {
        const uint32_t wa = w[0], wb = w[1];
        const uint32_t wa_low = PAIRS_LOW(wa), wa_high = PAIRS_HIGH(wa);
        const uint32_t wb_low = PAIRS_LOW(wb), wb_high = PAIRS_HIGH(wb);
        a00 = DOT2(wa_low, c[0], a00);
        a00 = DOT2(wa_high, c[1], a00);
        a10 = DOT2(wb_low, c[0], a10);
        a10 = DOT2(wb_high, c[1], a10);
        a01 = DOT2(wa_low, c[2], a01);
        a01 = DOT2(wa_high, c[3], a01);
        a11 = DOT2(wb_low, c[2], a11);
        a11 = DOT2(wb_high, c[3], a11);
      }
      out[oc * pixels + p] = requantize(a00, multiplier[oc], shift[oc], g);
      if (two) out[oc * pixels + q] = requantize(a01, multiplier[oc], shift[oc], g);
      if (od != oc) {
        out[od * pixels + p] = requantize(a10, multiplier[od], shift[od], g);
        if (two) out[od * pixels + q] = requantize(a11, multiplier[od], shift[od], g);
      }
    }
  }
  return 0;
}
