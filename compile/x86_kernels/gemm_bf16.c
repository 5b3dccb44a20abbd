/* bf16 matrix products with fp32 accumulation for x86 CPUs with AVX-512 BF16 (vdpbf16ps).
 *
 * Why C: TVM 0.27 legalizes every bfloat16 vector to float32 or uint16 before LLVM codegen
 * (BF16ComputeLegalize / BF16StorageLegalize run for every non-CUDA target), and its LLVM codegen
 * has no bfloat type, so `llvm.x86.avx512bf16.dpbf16ps.512` (declared on <32 x bfloat> since LLVM
 * 17) cannot be called from TIR. TVM's TIR keeps the loops around this block (parallel over
 * blocks, the transforms before and after); this file is one register-tiled block, called through
 * `T.call_extern` and linked into the model's library.
 *
 * One call computes, for one batch item b and one block of ROWS output rows starting at row0,
 *
 *     m[b][k][t] = sum over c of u[b][k][c] * v[b][c][t]      (k in block, every t)
 *
 * with both operands bf16 stored as 32-bit words of a reduction pair:
 *     u: uint32 [batch][rows_padded][pairs]   word = (bf16 of c = 2i, bf16 of c = 2i + 1)
 *     v: uint32 [batch][pairs][columns]       word = (bf16 of c = 2i, bf16 of c = 2i + 1) at column t
 *     m: float  [batch][rows][columns]
 * `rows_padded` is `rows` rounded up to ROWS with zero rows, so the register tile never needs a
 * row tail; only rows < `rows` are stored. Columns run in chunks of 2 x 16 with a masked tail.
 */
#include <immintrin.h>
#include <stdint.h>

#define ROWS 8  /* output rows per block: 8 x 2 accumulators = 16 of the 32 zmm registers */
#define LANES 16

static inline __mmask16 tail_mask(int64_t remaining) {
    return remaining >= LANES ? (__mmask16)0xFFFF : (__mmask16)((1u << remaining) - 1u);
}

int32_t lwgan_gemm_bf16_block(const uint32_t *u, const uint32_t *v, float *m, int64_t batch_item, int64_t row0,
                              int64_t rows, int64_t rows_padded, int64_t pairs, int64_t columns) {
    const uint32_t *u_block = u + (batch_item * rows_padded + row0) * pairs;
    const uint32_t *v_item = v + batch_item * pairs * columns;
    float *m_block = m + (batch_item * rows + row0) * columns;
    const int64_t stored_rows = rows - row0 < ROWS ? rows - row0 : ROWS;
    for (int64_t t = 0; t < columns; t += 2 * LANES) {
        const __mmask16 mask0 = tail_mask(columns - t);
        const __mmask16 mask1 = columns - t > LANES ? tail_mask(columns - t - LANES) : 0;
        __m512 acc0[ROWS], acc1[ROWS];
        for (int r = 0; r < ROWS; ++r) {
            acc0[r] = _mm512_setzero_ps();
            acc1[r] = _mm512_setzero_ps();
        }
        for (int64_t i = 0; i < pairs; ++i) {
            const uint32_t *v_row = v_item + i * columns + t;
            const __m512bh v0 = (__m512bh)_mm512_maskz_loadu_epi32(mask0, v_row);
            const __m512bh v1 = (__m512bh)_mm512_maskz_loadu_epi32(mask1, v_row + LANES);
            for (int r = 0; r < ROWS; ++r) {
                const __m512bh w = (__m512bh)_mm512_set1_epi32((int)u_block[r * pairs + i]);
                acc0[r] = _mm512_dpbf16_ps(acc0[r], w, v0);
                acc1[r] = _mm512_dpbf16_ps(acc1[r], w, v1);
            }
        }
        for (int r = 0; r < ROWS; ++r) {
            if (r < stored_rows) {
                _mm512_mask_storeu_ps(m_block + r * columns + t, mask0, acc0[r]);
                _mm512_mask_storeu_ps(m_block + r * columns + t + LANES, mask1, acc1[r]);
            }
        }
    }
    return 0;
}
