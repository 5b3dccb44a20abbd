/* The AMX instructions of compile/int8/amx.py's kernels as C functions (on tests/amx_emulation.h),
 * for tests that build those kernels with calls instead of tile instructions (tests/test_int8.py's
 * `amx_build`) and link this file: the kernels then run, exactly, on CPUs without AMX. */
#include "amx_emulation.h"

void lwgan_emulated_ldtilecfg(const void *config) { emulated_config(config); }
void lwgan_emulated_tilezero(uint8_t tile) { emulated_zero(tile); }
void lwgan_emulated_tileloadd64(uint8_t tile, const void *base, int64_t stride) { emulated_load(tile, base, stride); }
void lwgan_emulated_tilestored64(uint8_t tile, void *base, int64_t stride) { emulated_store(tile, base, stride); }
void lwgan_emulated_tdpbsud(uint8_t sums, uint8_t a, uint8_t b) { emulated_dpbsud(sums, a, b); }
void lwgan_emulated_tilerelease(void) { emulated_release(); }
