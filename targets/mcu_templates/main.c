/* Benchmark harness: read the input over semihosting, run the model once, write the output, and
 * report the instructions it took.
 *
 * qemu runs with -icount shift=0: every instruction advances virtual time by exactly 1 ns, and
 * SysTick counts that time at the machine's clock. A calibration loop of a known instruction count
 * converts ticks to instructions, so the figures are instructions (not cycles) and deterministic. */
#include <stdint.h>

#include "model.h"
#include "semihosting.h"

void systick_start(void);
uint64_t systick_now(void);
uint32_t stack_used_bytes(void);

#define CALIBRATION_LOOPS 1000000u /* two instructions each (subs, bne) */

static model_input_t input[MODEL_INPUT_ELEMENTS];
static model_output_t output[MODEL_OUTPUT_ELEMENTS];

static void spin(uint32_t loops) {
  __asm__ volatile("1: subs %0, %0, #1\n bne 1b" : "+r"(loops) : : "cc");
}

static int transfer(const char* path, int mode, void* buffer, uint32_t nbytes) {
  int fd = sh_open(path, mode);
  if (fd < 0) return 0;
  uint32_t done = (uint32_t)(mode == SH_READ_BINARY ? sh_read(fd, buffer, nbytes) : sh_write(fd, buffer, nbytes));
  sh_close(fd);
  return done == nbytes;
}

int main(void) {
  if (!transfer("input.bin", SH_READ_BINARY, input, sizeof input)) {
    sh_print("error: cannot read input.bin (expected the model's input bytes)\n");
    return 1;
  }
  systick_start();
  uint64_t start = systick_now();
  spin(CALIBRATION_LOOPS);
  uint64_t calibration = systick_now() - start;
  start = systick_now();
  int status = model_run(input, output);
  uint64_t inference = systick_now() - start;
  if (status != 0) {
    sh_print_u64("error: kernel call failed:", (uint64_t)status);
    sh_print(model_last_error());
    sh_print("\n");
    return 1;
  }
  if (!transfer("output.bin", SH_WRITE_BINARY, output, sizeof output)) {
    sh_print("error: cannot write output.bin\n");
    return 1;
  }
  sh_print_u64("calibration_instructions", 2ull * CALIBRATION_LOOPS);
  sh_print_u64("calibration_ticks", calibration);
  sh_print_u64("inference_ticks", inference);
  sh_print_u64("stack_used_bytes", stack_used_bytes());
  return 0;
}
