#include "semihosting.h"

#include <string.h>

enum {
  SYS_OPEN = 0x01,
  SYS_CLOSE = 0x02,
  SYS_WRITE0 = 0x04,
  SYS_WRITE = 0x05,
  SYS_READ = 0x06,
  SYS_EXIT = 0x18,
  ADP_STOPPED_APPLICATION_EXIT = 0x20026, /* qemu exits with status 0 */
  ADP_STOPPED_RUN_TIME_ERROR = 0x20023,   /* qemu exits with status 1 */
};

static int semihost(int operation, void* argument) {
  register int r0 __asm__("r0") = operation;
  register void* r1 __asm__("r1") = argument;
  __asm__ volatile("bkpt 0xAB" : "+r"(r0) : "r"(r1) : "memory");
  return r0;
}

int sh_open(const char* path, int mode) {
  uint32_t block[3] = {(uint32_t)path, (uint32_t)mode, (uint32_t)strlen(path)};
  return semihost(SYS_OPEN, block);
}

size_t sh_read(int fd, void* buffer, size_t nbytes) {
  uint32_t block[3] = {(uint32_t)fd, (uint32_t)buffer, (uint32_t)nbytes};
  return nbytes - (size_t)semihost(SYS_READ, block); /* the call returns the bytes NOT read */
}

size_t sh_write(int fd, const void* buffer, size_t nbytes) {
  uint32_t block[3] = {(uint32_t)fd, (uint32_t)buffer, (uint32_t)nbytes};
  return nbytes - (size_t)semihost(SYS_WRITE, block);
}

void sh_close(int fd) {
  uint32_t block[1] = {(uint32_t)fd};
  semihost(SYS_CLOSE, block);
}

void sh_print(const char* text) { semihost(SYS_WRITE0, (void*)text); }

void sh_print_u64(const char* label, uint64_t value) {
  char digits[21];
  char* cursor = digits + sizeof digits - 1;
  *cursor = '\0';
  do {
    *--cursor = (char)('0' + value % 10u);
    value /= 10u;
  } while (value != 0u);
  sh_print(label);
  sh_print(" ");
  sh_print(cursor);
  sh_print("\n");
}

void sh_exit(int success) {
  semihost(SYS_EXIT, (void*)(success ? ADP_STOPPED_APPLICATION_EXIT : ADP_STOPPED_RUN_TIME_ERROR));
  for (;;) {
  }
}
