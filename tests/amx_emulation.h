/* The AMX tile instructions the suite's kernels use, in C, so that they run (and are checked against
 * numpy and torch) on CPUs without AMX: compile/x86_kernels/gemm_bf16.c's AMX blocks compiled with
 * -DLWGAN_AMX_EMULATED -I tests, and compile/int8/amx.py's kernels calling them through
 * tests/amx_calls.c.
 *
 * Each follows the pseudo-code of Intel's instruction set reference (LDTILECFG, TILEZERO, TILELOADD,
 * TILESTORED, TDPBF16PS, TDPBSUD, TILERELEASE), with the checks the hardware makes: an instruction on
 * an unconfigured state or tiles whose shapes do not chain (#UD on a CPU) aborts with a message. bf16
 * to float32 is exact (the top 16 bits); each pair is added to the float32 sum one product at a time,
 * as the reference's two `+=` lines do. Integer sums wrap around in 32 bits, as the reference's do. */
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

struct emulated_tile {
    int rows, bytes_per_row;
    unsigned char data[16][64];
};

static __thread struct emulated_tile emulated_tiles[8];
static __thread int emulated_configured;

static void emulated_fault(const char *what) {
    fprintf(stderr, "AMX emulation: %s\n", what);
    abort();
}

static void emulated_config(const void *config) {
    const unsigned char *bytes = config;
    if (bytes[0] != 1) emulated_fault("ldtilecfg: palette is not 1");
    for (int t = 0; t < 8; ++t) {
        const int row_bytes = bytes[16 + 2 * t] | bytes[17 + 2 * t] << 8, rows = bytes[48 + t];
        if (row_bytes > 64 || rows > 16 || row_bytes % 4) emulated_fault("ldtilecfg: a tile larger than 16 x 64 bytes");
        emulated_tiles[t].rows = rows;
        emulated_tiles[t].bytes_per_row = row_bytes;
        memset(emulated_tiles[t].data, 0, sizeof emulated_tiles[t].data);
    }
    emulated_configured = 1;
}

static struct emulated_tile *emulated_tile(int index) {
    if (!emulated_configured) emulated_fault("tile instruction before ldtilecfg");
    if (emulated_tiles[index].rows == 0) emulated_fault("tile instruction on an unconfigured tile");
    return &emulated_tiles[index];
}

static void emulated_zero(int index) {
    memset(emulated_tile(index)->data, 0, sizeof emulated_tiles[index].data);
}

static void emulated_load(int index, const void *base, long stride) {
    struct emulated_tile *tile = emulated_tile(index);
    for (int r = 0; r < tile->rows; ++r) memcpy(tile->data[r], (const char *)base + r * stride, tile->bytes_per_row);
}

static void emulated_store(int index, void *base, long stride) {
    struct emulated_tile *tile = emulated_tile(index);
    for (int r = 0; r < tile->rows; ++r) memcpy((char *)base + r * stride, tile->data[r], tile->bytes_per_row);
}

static float emulated_bf16(const unsigned char *pair, int half) {
    unsigned int bits = (unsigned int)(pair[2 * half] | pair[2 * half + 1] << 8) << 16;
    float value;
    memcpy(&value, &bits, sizeof value);
    return value;
}

/* The tiles of `what`'s C += A B, checked as the hardware checks them: A rows = C rows, A's 4-byte
 * groups = B rows, B columns = C columns. Returns the 4-byte groups each sum adds up. */
static int emulated_product(const char *what, int dst, int a, int b, struct emulated_tile **c,
                            struct emulated_tile **ta, struct emulated_tile **tb) {
    *c = emulated_tile(dst), *ta = emulated_tile(a), *tb = emulated_tile(b);
    const int groups = (*ta)->bytes_per_row / 4;
    if ((*ta)->rows != (*c)->rows || (*tb)->rows != groups || (*tb)->bytes_per_row != (*c)->bytes_per_row) {
        char message[160];
        snprintf(message, sizeof message, "%s: tile shapes do not chain (A rows = C rows, A groups of 4 bytes = "
                 "B rows, B columns = C columns)", what);
        emulated_fault(message);
    }
    return groups;
}

static void emulated_dpbf16ps(int dst, int a, int b) {
    struct emulated_tile *c, *ta, *tb;
    const int k_pairs = emulated_product("tdpbf16ps", dst, a, b, &c, &ta, &tb), n = c->bytes_per_row / 4;
    for (int row = 0; row < c->rows; ++row) {
        float *sums = (float *)c->data[row];
        for (int k = 0; k < k_pairs; ++k)
            for (int col = 0; col < n; ++col) {
                const unsigned char *x = &ta->data[row][4 * k], *y = &tb->data[k][4 * col];
                sums[col] += emulated_bf16(x, 0) * emulated_bf16(y, 0);
                sums[col] += emulated_bf16(x, 1) * emulated_bf16(y, 1);
            }
    }
}

static void emulated_dpbsud(int dst, int a, int b) {
    struct emulated_tile *c, *ta, *tb;
    const int k_words = emulated_product("tdpbsud", dst, a, b, &c, &ta, &tb), n = c->bytes_per_row / 4;
    for (int row = 0; row < c->rows; ++row) {
        uint32_t *sums = (uint32_t *)c->data[row];
        for (int k = 0; k < k_words; ++k)
            for (int col = 0; col < n; ++col) {
                const int8_t *x = (const int8_t *)&ta->data[row][4 * k];  /* signed A */
                const uint8_t *y = &tb->data[k][4 * col];  /* unsigned B */
                sums[col] += (uint32_t)(x[0] * y[0] + x[1] * y[1] + x[2] * y[2] + x[3] * y[3]);
            }
    }
}

static void emulated_release(void) {
    memset(emulated_tiles, 0, sizeof emulated_tiles);
    emulated_configured = 0;
}

#define TILE_CONFIG(config) emulated_config(config)
#define TILE_ZERO(tile) emulated_zero(tile)
#define TILE_LOAD(tile, base, stride) emulated_load(tile, base, stride)
#define TILE_STORE(tile, base, stride) emulated_store(tile, base, stride)
#define TILE_DPBF16PS(sums, a, b) emulated_dpbf16ps(sums, a, b)
#define TILE_RELEASE() emulated_release()
