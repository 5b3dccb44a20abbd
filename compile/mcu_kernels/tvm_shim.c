/* The only runtime the generated kernels need (no libtvm): scratch memory and an error hook.
 *
 * Kernels allocate workspaces LIFO within one call, so a stack-like bump allocator over a static
 * pool sized at export time (MODEL_WORKSPACE_BYTES, usually 0 after scheduling) is exact. */
#include <stddef.h>
#include <stdint.h>

#include "model.h"
#include "tvm/runtime/c_backend_api.h"

#define SHIM_ALIGNMENT 16u

#if MODEL_WORKSPACE_BYTES > 0
static uint8_t workspace_pool[MODEL_WORKSPACE_BYTES] __attribute__((aligned(SHIM_ALIGNMENT)));
static size_t workspace_used;

void* TVMBackendAllocWorkspace(int device_type, int device_id, uint64_t nbytes, int dtype_code_hint,
                               int dtype_bits_hint) {
  (void)device_type, (void)device_id, (void)dtype_code_hint, (void)dtype_bits_hint;
  uint64_t size = (nbytes + SHIM_ALIGNMENT - 1u) / SHIM_ALIGNMENT * SHIM_ALIGNMENT;
  if (size > MODEL_WORKSPACE_BYTES - workspace_used) return NULL;
  void* block = workspace_pool + workspace_used;
  workspace_used += (size_t)size;
  return block;
}

int TVMBackendFreeWorkspace(int device_type, int device_id, void* ptr) {
  (void)device_type, (void)device_id;
  if (ptr != NULL) workspace_used = (size_t)((uint8_t*)ptr - workspace_pool); /* LIFO */
  return 0;
}
#else
void* TVMBackendAllocWorkspace(int device_type, int device_id, uint64_t nbytes, int dtype_code_hint,
                               int dtype_bits_hint) {
  (void)device_type, (void)device_id, (void)nbytes, (void)dtype_code_hint, (void)dtype_bits_hint;
  return NULL;
}

int TVMBackendFreeWorkspace(int device_type, int device_id, void* ptr) {
  (void)device_type, (void)device_id, (void)ptr;
  return 0;
}
#endif

/* Kernels report a failure (a workspace that did not fit) here and return non-zero; model_run
 * then returns the failing call's index and model_last_error() says why. */
static const char* last_error = "";

void TVMFFIErrorSetRaisedFromCStr(const char* kind, const char* message) {
  (void)kind;
  last_error = message;
}

const char* model_last_error(void) { return last_error; }
