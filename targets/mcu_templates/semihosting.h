/* ARM semihosting: the firmware's only I/O under qemu-system-arm (-semihosting-config enable=on).
 * Files are opened relative to qemu's working directory on the host. */
#ifndef LWGAN_SEMIHOSTING_H
#define LWGAN_SEMIHOSTING_H

#include <stddef.h>
#include <stdint.h>

int sh_open(const char* path, int mode); /* mode: SH_READ_BINARY or SH_WRITE_BINARY; returns -1 on failure */
size_t sh_read(int fd, void* buffer, size_t nbytes); /* bytes actually read */
size_t sh_write(int fd, const void* buffer, size_t nbytes); /* bytes actually written */
void sh_close(int fd);
void sh_print(const char* text);
void sh_print_u64(const char* label, uint64_t value); /* "<label> <value>\n" */
void sh_exit(int success) __attribute__((noreturn));

#define SH_READ_BINARY 1
#define SH_WRITE_BINARY 5

#endif
