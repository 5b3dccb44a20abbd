/* bf16 blocks with fp32 accumulation for x86 CPUs with AVX-512 BF16 (vdpbf16ps): the Winograd point
 * products (a matrix product, below) and direct convolutions (further down).
 *
 * Why C: TVM 0.27 legalizes every bfloat16 vector to float32 or uint16 before LLVM codegen
 * (BF16ComputeLegalize / BF16StorageLegalize run for every non-CUDA target), and its LLVM codegen
 * has no bfloat type, so `llvm.x86.avx512bf16.dpbf16ps.512` (declared on <32 x bfloat> since LLVM
 * 17) cannot be called from TIR. TVM's TIR keeps the loops around these blocks (parallel over
 * blocks, the transforms and packing before and after); each function here is one register-tiled
 * block, called through `T.call_extern` and linked into the model's library.
 *
 * The products block computes, for one batch item b and one block of ROWS output rows from row0,
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

/* ROWS rows of a products block (u_rows, m_rows: the block's first row) from column t_begin on. */
static inline void products_rows(const uint32_t *u_rows, const uint32_t *v_item, float *m_rows, int64_t stored_rows,
                                 int64_t pairs, int64_t columns, int64_t t_begin) {
    for (int64_t t = t_begin; t < columns; t += 2 * LANES) {
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
                const __m512bh w = (__m512bh)_mm512_set1_epi32((int)u_rows[r * pairs + i]);
                acc0[r] = _mm512_dpbf16_ps(acc0[r], w, v0);
                acc1[r] = _mm512_dpbf16_ps(acc1[r], w, v1);
            }
        }
        for (int r = 0; r < ROWS; ++r) {
            if (r < stored_rows) {
                _mm512_mask_storeu_ps(m_rows + r * columns + t, mask0, acc0[r]);
                _mm512_mask_storeu_ps(m_rows + r * columns + t + LANES, mask1, acc1[r]);
            }
        }
    }
}

int32_t lwgan_gemm_bf16_block(const uint32_t *u, const uint32_t *v, float *m, int64_t batch_item, int64_t row0,
                              int64_t rows, int64_t rows_padded, int64_t pairs, int64_t columns) {
    const int64_t stored_rows = rows - row0 < ROWS ? rows - row0 : ROWS;
    products_rows(u + (batch_item * rows_padded + row0) * pairs, v + batch_item * pairs * columns,
                  m + (batch_item * rows + row0) * columns, stored_rows, pairs, columns, 0);
    return 0;
}

/* The products block on AMX tiles (Sapphire Rapids on): `tdpbf16ps` multiplies a 16-row A tile of
 * 16 bf16 pairs by a B tile of 16 pair rows x 16 columns into 16 x 16 float32 sums, 8192
 * multiply-adds, where vdpbf16ps does 32. The operands' layouts are already the tiles' own: a row of
 * u holds a row's pairs (A rows), a row of v one pair's columns (B rows, "VNNI" layout).
 *
 * One call computes AMX_ROWS rows (two A tiles) from row0, over every column in chunks of two
 * 16-column tiles, the four 16 x 16 sums accumulated in tile registers over every pair; `pairs` is a
 * multiple of 16 and `rows_padded` of AMX_ROWS (compile/bf16.py picks this block only then). Columns
 * past the last whole chunk run on the AVX-512 block above. The caller has asked Linux for the tile
 * state (arch_prctl), as the int8 AMX kernels do. Tile instructions are macros: the tests run this
 * block on CPUs without AMX by defining them in C (tests/amx_emulation.h, with LWGAN_AMX_EMULATED). */
#define AMX_ROWS 32
#define AMX_PAIRS 16
#define AMX_COLUMNS 32
#define TILE 16

#ifdef LWGAN_AMX_EMULATED
#include "amx_emulation.h"
#else
#define TILE_CONFIG(config) _tile_loadconfig(config)
#define TILE_ZERO(tile) _tile_zero(tile)
#define TILE_LOAD(tile, base, stride) _tile_loadd(tile, base, stride)
#define TILE_STORE(tile, base, stride) _tile_stored(tile, base, stride)
#define TILE_DPBF16PS(sums, a, b) _tile_dpbf16ps(sums, a, b)
#define TILE_RELEASE() _tile_release()
#endif

struct tile_config {  /* palette 1's 64-byte layout */
    uint8_t palette, start_row, reserved[14];
    uint16_t bytes_per_row[16];
    uint8_t rows[16];
};

/* Tiles 0-7 as 16 rows of 64 bytes each, the shape both AMX blocks use (per thread: each call sets it). */
static void configure_tiles(void) {
    struct tile_config config = {.palette = 1};
    for (int t = 0; t < 8; ++t) {
        config.rows[t] = TILE;
        config.bytes_per_row[t] = 64;
    }
    TILE_CONFIG(&config);
}

int32_t lwgan_gemm_amx_bf16_block(const uint32_t *u, const uint32_t *v, float *m, int64_t batch_item, int64_t row0,
                                  int64_t rows, int64_t rows_padded, int64_t pairs, int64_t columns) {
    const uint32_t *u_block = u + (batch_item * rows_padded + row0) * pairs;
    const uint32_t *v_item = v + batch_item * pairs * columns;
    float *m_block = m + (batch_item * rows + row0) * columns;
    const int64_t stored_rows = rows - row0 < AMX_ROWS ? rows - row0 : AMX_ROWS;
    const int64_t whole = columns / AMX_COLUMNS * AMX_COLUMNS;
    if (whole > 0) {
        /* tiles 0-3: sums (row tile i, column tile j) at 2i + j; 4-5: u rows 0-15, 16-31; 6-7: v columns */
        configure_tiles();
        float sums[AMX_ROWS][AMX_COLUMNS];  /* a block whose last rows are padding stores through here */
        for (int64_t t = 0; t < whole; t += AMX_COLUMNS) {
            TILE_ZERO(0);
            TILE_ZERO(1);
            TILE_ZERO(2);
            TILE_ZERO(3);
            for (int64_t i = 0; i < pairs; i += AMX_PAIRS) {
                TILE_LOAD(4, u_block + i, pairs * 4);
                TILE_LOAD(5, u_block + TILE * pairs + i, pairs * 4);
                TILE_LOAD(6, v_item + i * columns + t, columns * 4);
                TILE_LOAD(7, v_item + i * columns + t + TILE, columns * 4);
                TILE_DPBF16PS(0, 4, 6);
                TILE_DPBF16PS(1, 4, 7);
                TILE_DPBF16PS(2, 5, 6);
                TILE_DPBF16PS(3, 5, 7);
            }
            const int direct = stored_rows == AMX_ROWS;
            float *target = direct ? m_block + t : &sums[0][0];
            const int64_t stride = direct ? columns : AMX_COLUMNS;
            TILE_STORE(0, target, stride * 4);
            TILE_STORE(1, target + TILE, stride * 4);
            TILE_STORE(2, target + TILE * stride, stride * 4);
            TILE_STORE(3, target + TILE * stride + TILE, stride * 4);
            for (int64_t r = 0; !direct && r < stored_rows; ++r)
                for (int c = 0; c < AMX_COLUMNS; ++c) m_block[r * columns + t + c] = sums[r][c];
        }
        TILE_RELEASE();
    }
    for (int64_t r = 0; whole < columns && r < stored_rows; r += ROWS)
        products_rows(u_block + r * pairs, v_item, m_block + r * columns, stored_rows - r < ROWS ? stored_rows - r : ROWS,
                      pairs, columns, whole);
    return 0;
}

/* A direct convolution's block: `rows` output channels (from k_block * rows) x one output image row
 * oy, over every output column in chunks of `vecs` x 16, with bf16 operands and float32 accumulation.
 *
 *     x:    uint32 [pairs][padded_h][padded_w]    bf16 pairs of adjacent input channels (zero padded)
 *     w:    uint32 [blocks][pairs][kh][kw][rows]  the same pairs of the weights, `rows` channels together
 *     bias: float  [channels]
 *     out:  float  [channels][out_h][out_w]
 * The pointers are one batch item's. A stride of 2 loads twice the words and keeps the even ones.
 * `rows` x `vecs` accumulators: 8 x 2 for wide layers, 4 x 4 for an RGB output (3 channels would
 * leave 5 of 8 rows idle). The loops over them are unrolled so that they stay in registers (rolled,
 * gcc kept them in memory: one load and one store per vdpbf16ps, 3x slower).
 */
#define MAX_ROWS 8
#define MAX_VECS 4

/* Each accumulator of a block's `rows` channels starts from its channel's bias (rows past the
 * conv's channels from zero). */
static inline __attribute__((always_inline)) void start_from_bias(
        const int rows, const int vecs, __m512 acc[MAX_ROWS][MAX_VECS], const float *bias, int64_t stored_rows) {
    _Pragma("GCC unroll 8")
    for (int r = 0; r < rows; ++r) {
        const __m512 start = r < stored_rows ? _mm512_set1_ps(bias[r]) : _mm512_setzero_ps();
        _Pragma("GCC unroll 8")
        for (int j = 0; j < vecs; ++j) acc[r][j] = start;
    }
}

/* One tap: each channel's weight pair, broadcast, times the `vecs` vectors of input pairs. */
static inline __attribute__((always_inline)) void multiply_tap(
        const int rows, const int vecs, __m512 acc[MAX_ROWS][MAX_VECS], const uint32_t *taps, const __m512i *v) {
    _Pragma("GCC unroll 8")
    for (int r = 0; r < rows; ++r) {
        const __m512bh weight = (__m512bh)_mm512_set1_epi32((int)taps[r]);
        _Pragma("GCC unroll 8")
        for (int j = 0; j < vecs; ++j) acc[r][j] = _mm512_dpbf16_ps(acc[r][j], weight, (__m512bh)v[j]);
    }
}

/* One chunk's sums over every input pair and tap. `rows`, `vecs`, `stride` and `masked` are constants
 * where it is inlined: only chunks that reach the end of a row need masked loads. */
static inline __attribute__((always_inline)) void accumulate_chunk(
        const int rows, const int vecs, const int stride, const int masked, __m512 acc[MAX_ROWS][MAX_VECS],
        const uint32_t *x, const uint32_t *w_block, int64_t ox, int64_t oy, int64_t pairs, int64_t kh, int64_t kw,
        int64_t padded_h, int64_t padded_w) {
    const __m512i even = _mm512_setr_epi32(0, 2, 4, 6, 8, 10, 12, 14, 16, 18, 20, 22, 24, 26, 28, 30);
    for (int64_t i = 0; i < pairs; ++i) {
        for (int64_t ky = 0; ky < kh; ++ky) {
            const uint32_t *row = x + (i * padded_h + oy * stride + ky) * padded_w;
            for (int64_t kx = 0; kx < kw; ++kx) {
                const int64_t first = ox * stride + kx;  /* the row's word under output column ox */
                const int64_t words = padded_w - first;  /* what the row still holds from there */
                __m512i loaded[2 * MAX_VECS], v[MAX_VECS];
                _Pragma("GCC unroll 8")
                for (int j = 0; j < stride * vecs; ++j) {
                    const __mmask16 mask = !masked ? (__mmask16)0xFFFF
                                                   : words > j * LANES ? tail_mask(words - j * LANES) : 0;
                    loaded[j] = _mm512_maskz_loadu_epi32(mask, row + first + j * LANES);
                }
                _Pragma("GCC unroll 8")
                for (int j = 0; j < vecs; ++j)  /* stride 2: the even words of two loads */
                    v[j] = stride == 1 ? loaded[j] : _mm512_permutex2var_epi32(loaded[2 * j], even, loaded[2 * j + 1]);
                multiply_tap(rows, vecs, acc, w_block + ((i * kh + ky) * kw + kx) * rows, v);
            }
        }
    }
}

static inline __attribute__((always_inline)) int32_t conv_block(
        const int rows, const int vecs, const uint32_t *x, const uint32_t *w, const float *bias, float *out,
        int64_t k_block, int64_t oy, int64_t channels, int64_t pairs, int64_t kh, int64_t kw, int64_t stride,
        int64_t padded_h, int64_t padded_w, int64_t out_h, int64_t out_w) {
    const int64_t k0 = k_block * rows;
    const int64_t stored_rows = channels - k0 < rows ? channels - k0 : rows;
    const uint32_t *w_block = w + k_block * pairs * kh * kw * rows;
    for (int64_t ox = 0; ox < out_w; ox += vecs * LANES) {
        __m512 acc[MAX_ROWS][MAX_VECS];  /* fixed sizes: a variable-length array would stay in memory */
        start_from_bias(rows, vecs, acc, bias + k0, stored_rows);
        /* whole loads for every tap: the last word any of them reads is inside the padded row */
        const int whole = ox * stride + kw - 1 + stride * vecs * LANES <= padded_w;
        if (stride == 1 && whole)
            accumulate_chunk(rows, vecs, 1, 0, acc, x, w_block, ox, oy, pairs, kh, kw, padded_h, padded_w);
        else if (stride == 1)
            accumulate_chunk(rows, vecs, 1, 1, acc, x, w_block, ox, oy, pairs, kh, kw, padded_h, padded_w);
        else if (whole)
            accumulate_chunk(rows, vecs, 2, 0, acc, x, w_block, ox, oy, pairs, kh, kw, padded_h, padded_w);
        else
            accumulate_chunk(rows, vecs, 2, 1, acc, x, w_block, ox, oy, pairs, kh, kw, padded_h, padded_w);
        _Pragma("GCC unroll 8")
        for (int r = 0; r < rows; ++r) {
            if (r < stored_rows) {
                float *target = out + ((k0 + r) * out_h + oy) * out_w + ox;
                _Pragma("GCC unroll 8")
                for (int j = 0; j < vecs; ++j) {
                    const __mmask16 store = out_w - ox > j * LANES ? tail_mask(out_w - ox - j * LANES) : 0;
                    _mm512_mask_storeu_ps(target + j * LANES, store, acc[r][j]);
                }
            }
        }
    }
    return 0;
}

#define CONV_BLOCK(name, rows, vecs)                                                                                \
    int32_t name(const uint32_t *x, const uint32_t *w, const float *bias, float *out, int64_t k_block, int64_t oy,  \
                 int64_t channels, int64_t pairs, int64_t kh, int64_t kw, int64_t stride, int64_t padded_h,         \
                 int64_t padded_w, int64_t out_h, int64_t out_w) {                                                  \
        return conv_block(rows, vecs, x, w, bias, out, k_block, oy, channels, pairs, kh, kw, stride, padded_h,    \
                          padded_w, out_h, out_w);                                                                  \
    }

CONV_BLOCK(lwgan_conv_bf16_block, 8, 2)
CONV_BLOCK(lwgan_conv_bf16_block_narrow, 4, 4)

/* The same block for output rows narrower than a vector (16 or 8 columns, a U-Net's inner layers):
 * each of the `vecs` vectors holds `segs` = 16 / out_w whole output rows, so one call computes `rows`
 * channels x vecs x segs output rows from oy0 = group x vecs x segs, every lane busy. A row's input
 * words are contiguous (stride 1) or the even words of 32 (stride 2); with segs = 2 the second row's
 * go to lanes 8-15 (a masked load, or the second half of the permute). Masked loads keep every read
 * inside the padded row. */
static inline __attribute__((always_inline)) void accumulate_rows(
        const int rows, const int vecs, const int segs, const int stride, __m512 acc[MAX_ROWS][MAX_VECS],
        const uint32_t *x, const uint32_t *w_block, int64_t oy0, int64_t pairs, int64_t kh, int64_t kw,
        int64_t padded_h, int64_t padded_w) {
    const __m512i even = _mm512_setr_epi32(0, 2, 4, 6, 8, 10, 12, 14, 16, 18, 20, 22, 24, 26, 28, 30);
    for (int64_t i = 0; i < pairs; ++i) {
        for (int64_t ky = 0; ky < kh; ++ky) {
            for (int64_t kx = 0; kx < kw; ++kx) {
                const int64_t words = padded_w - kx;  /* what each row holds from its first word on */
                const __mmask16 first_half = tail_mask(words);
                const __mmask16 second_half = words > LANES ? tail_mask(words - LANES) : 0;
                __m512i v[MAX_VECS];
                _Pragma("GCC unroll 8")
                for (int j = 0; j < vecs; ++j) {
                    const int64_t oy = oy0 + j * segs;
                    const uint32_t *a = x + (i * padded_h + oy * stride + ky) * padded_w + kx;
                    const uint32_t *b = a + stride * padded_w;  /* the next output row's words */
                    if (segs == 1 && stride == 1)
                        v[j] = _mm512_maskz_loadu_epi32(first_half, a);
                    else if (segs == 1)
                        v[j] = _mm512_permutex2var_epi32(_mm512_maskz_loadu_epi32(first_half, a), even,
                                                         _mm512_maskz_loadu_epi32(second_half, a + LANES));
                    else if (stride == 1)
                        v[j] = _mm512_mask_loadu_epi32(_mm512_maskz_loadu_epi32(0x00FF, a), 0xFF00, b - LANES / 2);
                    else
                        v[j] = _mm512_permutex2var_epi32(_mm512_maskz_loadu_epi32(first_half, a), even,
                                                         _mm512_maskz_loadu_epi32(first_half, b));
                }
                multiply_tap(rows, vecs, acc, w_block + ((i * kh + ky) * kw + kx) * rows, v);
            }
        }
    }
}

static inline __attribute__((always_inline)) int32_t conv_rows_block(
        const int rows, const int vecs, const int segs, const uint32_t *x, const uint32_t *w, const float *bias,
        float *out, int64_t k_block, int64_t group, int64_t channels, int64_t pairs, int64_t kh, int64_t kw,
        int64_t stride, int64_t padded_h, int64_t padded_w, int64_t out_h, int64_t out_w) {
    const int64_t k0 = k_block * rows, oy0 = group * vecs * segs;
    const int64_t stored_rows = channels - k0 < rows ? channels - k0 : rows;
    const uint32_t *w_block = w + k_block * pairs * kh * kw * rows;
    __m512 acc[MAX_ROWS][MAX_VECS];
    start_from_bias(rows, vecs, acc, bias + k0, stored_rows);
    if (stride == 1)
        accumulate_rows(rows, vecs, segs, 1, acc, x, w_block, oy0, pairs, kh, kw, padded_h, padded_w);
    else
        accumulate_rows(rows, vecs, segs, 2, acc, x, w_block, oy0, pairs, kh, kw, padded_h, padded_w);
    _Pragma("GCC unroll 8")
    for (int r = 0; r < rows; ++r) {
        if (r < stored_rows) {
            float *target = out + ((k0 + r) * out_h + oy0) * out_w;  /* out_w x segs = 16: vectors are contiguous */
            _Pragma("GCC unroll 8")
            for (int j = 0; j < vecs; ++j) _mm512_storeu_ps(target + j * LANES, acc[r][j]);
        }
    }
    return 0;
}

#define CONV_ROWS_BLOCK(name, rows, vecs, segs)                                                                    \
    int32_t name(const uint32_t *x, const uint32_t *w, const float *bias, float *out, int64_t k_block,              \
                 int64_t group, int64_t channels, int64_t pairs, int64_t kh, int64_t kw, int64_t stride,            \
                 int64_t padded_h, int64_t padded_w, int64_t out_h, int64_t out_w) {                                \
        return conv_rows_block(rows, vecs, segs, x, w, bias, out, k_block, group, channels, pairs, kh, kw, stride, \
                               padded_h, padded_w, out_h, out_w);                                                   \
    }

CONV_ROWS_BLOCK(lwgan_conv_bf16_rows16, 8, 2, 1)
CONV_ROWS_BLOCK(lwgan_conv_bf16_rows8, 8, 2, 2)

/* Output channels in the lanes, for outputs too small to fill a vector with columns or rows (a
 * U-Net's innermost layers: 4x4 down to 1x1 pixels of 128-256 channels, their weights far larger than
 * their activations, so the halved bytes of bf16 weights count most). A call computes `vecs` vectors
 * of 16 output channels (rows = 16 x vecs, from k_block x rows) at `pixels` consecutive output pixels
 * (row-major, from group x pixels), each pixel's input pair broadcast against the channels' weight
 * pairs; the weights are packed as the other blocks' with rows = 16 x vecs. compile/bf16.py picks a
 * `pixels` that divides out_h x out_w and output channels in whole blocks, so no lane is a tail. */
#define MAX_PIXELS 8

static inline __attribute__((always_inline)) int32_t conv_channels_block(
        const int vecs, const int pixels, const uint32_t *x, const uint32_t *w, const float *bias, float *out,
        int64_t k_block, int64_t group, int64_t pairs, int64_t kh, int64_t kw, int64_t stride, int64_t padded_h,
        int64_t padded_w, int64_t out_h, int64_t out_w) {
    const int64_t rows = vecs * LANES, k0 = k_block * rows, out_hw = out_h * out_w, p0 = group * pixels;
    const uint32_t *w_block = w + k_block * pairs * kh * kw * rows;
    int64_t first[MAX_PIXELS];  /* each pixel's input word at pair 0, tap (0, 0) */
    _Pragma("GCC unroll 8")
    for (int p = 0; p < pixels; ++p)
        first[p] = (p0 + p) / out_w * stride * padded_w + (p0 + p) % out_w * stride;
    __m512 acc[MAX_PIXELS][MAX_VECS];
    _Pragma("GCC unroll 8")
    for (int p = 0; p < pixels; ++p) {
        _Pragma("GCC unroll 8")
        for (int j = 0; j < vecs; ++j) acc[p][j] = _mm512_loadu_ps(bias + k0 + j * LANES);
    }
    for (int64_t i = 0; i < pairs; ++i) {
        for (int64_t ky = 0; ky < kh; ++ky) {
            for (int64_t kx = 0; kx < kw; ++kx) {
                const uint32_t *tap = x + (i * padded_h + ky) * padded_w + kx;
                const uint32_t *weights = w_block + ((i * kh + ky) * kw + kx) * rows;
                __m512bh weight[MAX_VECS];
                _Pragma("GCC unroll 8")
                for (int j = 0; j < vecs; ++j) weight[j] = (__m512bh)_mm512_loadu_si512(weights + j * LANES);
                _Pragma("GCC unroll 8")
                for (int p = 0; p < pixels; ++p) {
                    const __m512bh pair = (__m512bh)_mm512_set1_epi32((int)tap[first[p]]);
                    _Pragma("GCC unroll 8")
                    for (int j = 0; j < vecs; ++j) acc[p][j] = _mm512_dpbf16_ps(acc[p][j], weight[j], pair);
                }
            }
        }
    }
    const __m512i planes = _mm512_mullo_epi32(_mm512_setr_epi32(0, 1, 2, 3, 4, 5, 6, 7, 8, 9, 10, 11, 12, 13, 14, 15),
                                              _mm512_set1_epi32((int)out_hw));
    _Pragma("GCC unroll 8")
    for (int p = 0; p < pixels; ++p) {  /* a vector's 16 channels go to 16 planes of the NCHW output */
        _Pragma("GCC unroll 8")
        for (int j = 0; j < vecs; ++j)
            _mm512_i32scatter_ps(out + (k0 + j * LANES) * out_hw + p0 + p, planes, acc[p][j], 4);
    }
    return 0;
}

#define CONV_CHANNELS_BLOCK(name, vecs, pixels)                                                                    \
    int32_t name(const uint32_t *x, const uint32_t *w, const float *bias, float *out, int64_t k_block,              \
                 int64_t group, int64_t channels, int64_t pairs, int64_t kh, int64_t kw, int64_t stride,            \
                 int64_t padded_h, int64_t padded_w, int64_t out_h, int64_t out_w) {                                \
        (void)channels;                                                                                            \
        return conv_channels_block(vecs, pixels, x, w, bias, out, k_block, group, pairs, kh, kw, stride, padded_h, \
                                   padded_w, out_h, out_w);                                                         \
    }

CONV_CHANNELS_BLOCK(lwgan_conv_bf16_channels8, 2, 8)
CONV_CHANNELS_BLOCK(lwgan_conv_bf16_channels4, 2, 4)
CONV_CHANNELS_BLOCK(lwgan_conv_bf16_channels2, 2, 2)
CONV_CHANNELS_BLOCK(lwgan_conv_bf16_channels1, 2, 1)

/* A stride-1 direct convolution's block on AMX tiles: AMX_ROWS output channels from k_block x 32 and
 * one output row oy, over every output column in chunks of two 16-column tiles (a last chunk of one
 * where out_w is an odd number of 16s). Per input pair block of 16, kernel row and column:
 *   A tiles: the weights of 16 output channels x 16 pairs, packed [OC/32][pairs/16][kh][kw][32][16];
 *   B tiles: 16 pairs x 16 input columns of the packed input [pairs][padded_h][padded_w], one row a
 *            pair, so consecutive columns are one 64-byte row (stride 1 only);
 *   C tiles: 16 channels x 16 columns of float32 sums, started from the bias, stored straight into
 *            the NCHW output (a channel's row is one tile row).
 * compile/bf16.py picks this block only where output channels come in 32s, input channels in 32s and
 * output columns in 16s, so no tile reads or writes past a row. */
int32_t lwgan_conv_amx_bf16_block(const uint32_t *x, const uint32_t *w, const float *bias, float *out,
                                  int64_t k_block, int64_t oy, int64_t channels, int64_t pairs, int64_t kh, int64_t kw,
                                  int64_t stride, int64_t padded_h, int64_t padded_w, int64_t out_h, int64_t out_w) {
    (void)channels;
    (void)stride;
    const int64_t k0 = k_block * AMX_ROWS, pair_blocks = pairs / AMX_PAIRS;
    const int64_t plane = padded_h * padded_w, out_plane = out_h * out_w;
    const uint32_t *w_block = w + k_block * pair_blocks * kh * kw * AMX_ROWS * AMX_PAIRS;
    float starts[AMX_ROWS][TILE];  /* each channel's bias across a tile row */
    for (int r = 0; r < AMX_ROWS; ++r)
        for (int c = 0; c < TILE; ++c) starts[r][c] = bias[k0 + r];
    configure_tiles();
    float *row_out = out + k0 * out_plane + oy * out_w;
    for (int64_t ox = 0; ox < out_w; ox += AMX_COLUMNS) {
        const int two = ox + AMX_COLUMNS <= out_w;  /* else one last 16-column tile */
        TILE_LOAD(0, &starts[0][0], TILE * 4);
        TILE_LOAD(2, &starts[TILE][0], TILE * 4);
        if (two) {
            TILE_LOAD(1, &starts[0][0], TILE * 4);
            TILE_LOAD(3, &starts[TILE][0], TILE * 4);
        }
        for (int64_t pb = 0; pb < pair_blocks; ++pb) {
            for (int64_t ky = 0; ky < kh; ++ky) {
                for (int64_t kx = 0; kx < kw; ++kx) {
                    const uint32_t *a = w_block + ((pb * kh + ky) * kw + kx) * AMX_ROWS * AMX_PAIRS;
                    const uint32_t *b = x + pb * AMX_PAIRS * plane + (oy + ky) * padded_w + ox + kx;
                    TILE_LOAD(4, a, AMX_PAIRS * 4);
                    TILE_LOAD(5, a + TILE * AMX_PAIRS, AMX_PAIRS * 4);
                    TILE_LOAD(6, b, plane * 4);
                    TILE_DPBF16PS(0, 4, 6);
                    TILE_DPBF16PS(2, 5, 6);
                    if (two) {
                        TILE_LOAD(7, b + TILE, plane * 4);
                        TILE_DPBF16PS(1, 4, 7);
                        TILE_DPBF16PS(3, 5, 7);
                    }
                }
            }
        }
        TILE_STORE(0, row_out + ox, out_plane * 4);
        TILE_STORE(2, row_out + TILE * out_plane + ox, out_plane * 4);
        if (two) {
            TILE_STORE(1, row_out + ox + TILE, out_plane * 4);
            TILE_STORE(3, row_out + TILE * out_plane + ox + TILE, out_plane * 4);
        }
    }
    TILE_RELEASE();
    return 0;
}
