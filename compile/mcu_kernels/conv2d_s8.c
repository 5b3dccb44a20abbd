/* Integer convolution for Cortex-M, written for the DSP extension (M4, M7, M33) and exact without it.
 *
 * The int8 weights (flash) are expanded once per call into 16-bit pairs in RAM: one 32-bit load of
 * four weights, sign-extended by SXTB16 into two pairs. For each pair of output pixels the receptive
 * fields are gathered once as int16 (padding with the input's zero-point code); each pair of output
 * channels then multiplies 16-bit pairs into both pixels' accumulators with SMLAD (two MACs per
 * instruction): 2 pixels x 2 channels share every load. The int32 result is requantized in
 * 32-bit arithmetic, exactly as the 64-bit reference (a * m + 2^(s-1)) >> s with s = 32 + shift,
 * shift >= 1: the low word of a * m cannot carry into the result, so it is the high word (SMMUL)
 * plus 2^(shift-1), shifted right by shift; then the zero point and a saturation (USAT/SSAT).
 *
 * Without __ARM_FEATURE_DSP the same arithmetic runs in plain C (the host tests use this). */
#include "conv2d_s8.h"

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
#define SATURATE_INT8(value) __ssat((value), 8)
#define SATURATE_UINT8(value) __usat((value), 8)
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
static inline int32_t clamp(int32_t value, int32_t lo, int32_t hi) { return value < lo ? lo : value > hi ? hi : value; }
#define SATURATE_INT8(value) clamp((value), -128, 127)
#define SATURATE_UINT8(value) clamp((value), 0, 255)
#endif

/* requant[3 oc .. 3 oc + 2] = multiplier, 2^(shift - 1), shift (shift >= 1). */
static inline uint8_t requantize(int32_t acc, const int32_t* requant, int32_t out_zero, int32_t out_signed) {
  const int32_t value = ((high_mul(acc, requant[0]) + requant[1]) >> requant[2]) + out_zero;
  return (uint8_t)(out_signed ? SATURATE_INT8(value) : SATURATE_UINT8(value)); /* int8: its two's complement byte */
}

/* Where tap k (in (channel, row, column) order) of a pixel's receptive field lies: its offset from
 * the field's top-left input element, and its row and column inside the window (for the borders).
 * Taps past in_c * k_h * k_w meet zero weights; they read the top-left element. */
static void window_taps(const int32_t* g, int32_t* offsets, uint8_t* rows, uint8_t* cols) {
  const int32_t in_h = g[CONV_IN_H], in_w = g[CONV_IN_W], k_h = g[CONV_K_H], k_w = g[CONV_K_W];
  int32_t k = 0;
  for (int32_t c = 0; c < g[CONV_IN_C]; ++c)
    for (int32_t i = 0; i < k_h; ++i)
      for (int32_t j = 0; j < k_w; ++j, ++k) {
        offsets[k] = (c * in_h + i) * in_w + j;
        rows[k] = (uint8_t)i;
        cols[k] = (uint8_t)j;
      }
  for (; k < g[CONV_DEPTH_PADDED]; ++k) offsets[k] = rows[k] = cols[k] = 0;
}

static int32_t window_top(const int32_t* g, int32_t pixel) {
  return pixel / g[CONV_OUT_W] * g[CONV_STRIDE_H] - g[CONV_PAD_TOP];
}

static int32_t window_left(const int32_t* g, int32_t pixel) {
  return pixel % g[CONV_OUT_W] * g[CONV_STRIDE_W] - g[CONV_PAD_LEFT];
}

static int window_inside(const int32_t* g, int32_t top, int32_t left) {
  return top >= 0 && left >= 0 && top + g[CONV_K_H] <= g[CONV_IN_H] && left + g[CONV_K_W] <= g[CONV_IN_W];
}

/* Both pixels' receptive fields as int16, interleaved four taps at a time (p0 k0..k3, p1 k0..k3,
 * p0 k4..k7, ...): the inner loop then walks one column pointer and one weight pointer, and its
 * live values fit the 13 registers. Windows inside the input read through the tap offsets alone. */
static inline __attribute__((always_inline)) void gather_inside(const int32_t* offsets, int32_t depth,
                                                               const uint8_t* first, const uint8_t* second,
                                                               int is_signed, int16_t* out) {
#define TAP(t, at)                                                         \
  out[at] = is_signed ? (int8_t)first[offsets[t]] : first[offsets[t]];     \
  out[(at) + 4] = is_signed ? (int8_t)second[offsets[t]] : second[offsets[t]]
  for (int32_t k = 0; k < depth; k += 8, offsets += 8, out += 16) { /* depth_padded % 8 == 0 */
    TAP(0, 0);
    TAP(1, 1);
    TAP(2, 2);
    TAP(3, 3);
    TAP(4, 8);
    TAP(5, 9);
    TAP(6, 10);
    TAP(7, 11);
  }
#undef TAP
}

static void gather_pair(const int32_t* g, const uint8_t* input, int32_t p, int32_t q, const int32_t* offsets,
                        const uint8_t* rows, const uint8_t* cols, int16_t* out) {
  const int32_t in_h = g[CONV_IN_H], in_w = g[CONV_IN_W], depth = g[CONV_DEPTH_PADDED];
  const int32_t is_signed = g[CONV_IN_SIGNED];
  const int32_t top[2] = {window_top(g, p), window_top(g, q)}, left[2] = {window_left(g, p), window_left(g, q)};
  if (window_inside(g, top[0], left[0]) && window_inside(g, top[1], left[1])) {
    const uint8_t* first = input + top[0] * in_w + left[0];
    const uint8_t* second = input + top[1] * in_w + left[1];
    if (is_signed) gather_inside(offsets, depth, first, second, 1, out);
    else gather_inside(offsets, depth, first, second, 0, out);
    return;
  }
  for (int32_t k = 0; k < depth; ++k)
    for (int32_t pixel = 0; pixel < 2; ++pixel) {
      const int32_t y = top[pixel] + rows[k], x = left[pixel] + cols[k];
      const uint8_t* corner = input + top[pixel] * in_w + left[pixel];
      int16_t value = (int16_t)g[CONV_IN_ZERO];
      if (y >= 0 && y < in_h && x >= 0 && x < in_w)
        value = is_signed ? (int8_t)corner[offsets[k]] : corner[offsets[k]];
      out[(k >> 2) * 8 + pixel * 4 + (k & 3)] = value;
    }
}

/* The inner loop: for each group of four taps, the two channels' weight pairs and the two pixels'
 * column pairs, 16 MACs. Eight taps per iteration (depth_padded % 8 == 0, never 0). */
#if defined(__ARM_FEATURE_DSP)
/* Written in assembly because the register allocation decides it: 4 accumulators, 2 pointers, the
 * end and 6 loaded words are 13 registers, and gcc spills two of them on some cores (Cortex-M33). */
#define GROUP                                                                                              \
  "ldrd %[w0], %[w1], [%[w]], #8\n\t" /* first channel: taps (0,1) (2,3) */                                \
  "ldrd %[w2], %[w3], [%[w]], #8\n\t" /* second channel */                                                 \
  "ldrd %[x0], %[x1], [%[c]], #8\n\t" /* first pixel */                                                    \
  "smlad %[a00], %[w0], %[x0], %[a00]\n\t"                                                                \
  "smlad %[a00], %[w1], %[x1], %[a00]\n\t"                                                                \
  "smlad %[a10], %[w2], %[x0], %[a10]\n\t"                                                                \
  "smlad %[a10], %[w3], %[x1], %[a10]\n\t"                                                                \
  "ldrd %[x0], %[x1], [%[c]], #8\n\t" /* second pixel */                                                   \
  "smlad %[a01], %[w0], %[x0], %[a01]\n\t"                                                                \
  "smlad %[a01], %[w1], %[x1], %[a01]\n\t"                                                                \
  "smlad %[a11], %[w2], %[x0], %[a11]\n\t"                                                                \
  "smlad %[a11], %[w3], %[x1], %[a11]\n\t"
static inline void multiply_accumulate(const uint32_t* w, const uint32_t* c, const uint32_t* end, int32_t* a00,
                                       int32_t* a01, int32_t* a10, int32_t* a11) {
  uint32_t w0, w1, w2, w3, x0, x1;
  __asm__ volatile("1:\n\t" GROUP GROUP
                   "cmp %[c], %[end]\n\t"
                   "bcc 1b"
                   : [a00] "+r"(*a00), [a01] "+r"(*a01), [a10] "+r"(*a10), [a11] "+r"(*a11), [w] "+r"(w), [c] "+r"(c),
                     [w0] "=&r"(w0), [w1] "=&r"(w1), [w2] "=&r"(w2), [w3] "=&r"(w3), [x0] "=&r"(x0), [x1] "=&r"(x1)
                   : [end] "r"(end)
                   : "cc", "memory");
}
#undef GROUP
#else
static inline void multiply_accumulate(const uint32_t* w, const uint32_t* c, const uint32_t* end, int32_t* a00,
                                       int32_t* a01, int32_t* a10, int32_t* a11) {
  for (; c < end; c += 4, w += 4) {
    *a00 = DOT2(w[0], c[0], DOT2(w[1], c[1], *a00));
    *a10 = DOT2(w[2], c[0], DOT2(w[3], c[1], *a10));
    *a01 = DOT2(w[0], c[2], DOT2(w[1], c[3], *a01));
    *a11 = DOT2(w[2], c[2], DOT2(w[3], c[3], *a11));
  }
}
#endif

/* The convolution for one output signedness (a constant once inlined: no branch per output). */
static inline __attribute__((always_inline)) void convolve(const int32_t* g, const void* input, const int8_t* weights,
                                                           const int32_t* bias, const int32_t* requant, void* output,
                                                           int16_t* scratch, const int32_t out_signed) {
  const int32_t out_c = g[CONV_OUT_C], out_w = g[CONV_OUT_W], pixels = g[CONV_OUT_H] * out_w;
  const int32_t out_zero = g[CONV_OUT_ZERO];
  const int32_t depth = g[CONV_DEPTH_PADDED];
  int16_t* pair_columns = scratch;
  int32_t* offsets = (int32_t*)(scratch + 2 * depth);
  uint8_t* rows = (uint8_t*)(offsets + depth);
  uint8_t* cols = rows + depth;
  uint8_t* out = output;
  uint32_t* expanded = (uint32_t*)(cols + depth); /* per channel pair and group: (w0,w1) (w2,w3) of each */
  const uint32_t* packed = (const uint32_t*)weights;
  for (int32_t i = 0, words = (out_c + (out_c & 1)) * depth / 4; i < words; ++i) {
    expanded[2 * i] = PAIRS_LOW(packed[i]);
    expanded[2 * i + 1] = PAIRS_HIGH(packed[i]);
  }
  window_taps(g, offsets, rows, cols);
  for (int32_t p = 0; p < pixels; p += 2) {
    const int32_t q = p + 1 < pixels ? p + 1 : p; /* an odd last pixel is computed twice */
    gather_pair(g, input, p, q, offsets, rows, cols, pair_columns);
    const uint32_t* w = expanded;
    const uint32_t* const columns_end = (const uint32_t*)pair_columns + depth;
    const int32_t next_pixel = q - p;
    uint8_t* o = out + p;
    for (int32_t oc = 0; oc < out_c; oc += 2, w += depth, o += 2 * pixels) { /* w: both channels' pairs */
      /* An odd last channel pairs with zero weights; its second results land on the first's and are overwritten. */
      const int32_t second = oc + 1 < out_c;
      int32_t a00 = bias[oc], a01 = a00, a10 = bias[oc + second], a11 = a10;
      multiply_accumulate(w, (const uint32_t*)pair_columns, columns_end, &a00, &a01, &a10, &a11);
      uint8_t* o_second = o + second * pixels;
      o_second[next_pixel] = requantize(a11, requant + 3 * (oc + second), out_zero, out_signed);
      o_second[0] = requantize(a10, requant + 3 * (oc + second), out_zero, out_signed);
      o[next_pixel] = requantize(a01, requant + 3 * oc, out_zero, out_signed);
      o[0] = requantize(a00, requant + 3 * oc, out_zero, out_signed);
    }
  }
}

int32_t lwgan_conv2d_s8(const int32_t* g, const void* input, const int8_t* weights, const int32_t* bias,
                        const int32_t* requant, void* output, int16_t* scratch) {
  if (g[CONV_OUT_SIGNED]) convolve(g, input, weights, bias, requant, output, scratch, 1);
  else convolve(g, input, weights, bias, requant, output, scratch, 0);
  return 0;
}
