/* qemu TCG plugin: how many times each guest instruction address executed.
 *
 * Built for the host by targets/mcu.py and loaded with `-plugin pc_counts.so,out=FILE`. Every
 * translated instruction gets an inline counter keyed by its address (retranslations of the same
 * address share it); at exit the non-zero counters are written as "address count" lines. The
 * firmware's disassembly then says what each address is, so counts become an instruction mix.
 *
 * Only the few plugin API entry points used are declared here (QEMU_PLUGIN_VERSION 1, qemu 7.x). */
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

typedef uint64_t qemu_plugin_id_t;
struct qemu_plugin_tb;
struct qemu_plugin_insn;
typedef struct {
  const char* target_name;
  struct { int min, cur; } version;
  int system_emulation; /* bool in qemu's header; only read for its value */
} qemu_info_t;
enum qemu_plugin_op { QEMU_PLUGIN_INLINE_ADD_U64 };

void qemu_plugin_register_vcpu_tb_trans_cb(qemu_plugin_id_t id, void (*cb)(qemu_plugin_id_t, struct qemu_plugin_tb*));
void qemu_plugin_register_atexit_cb(qemu_plugin_id_t id, void (*cb)(qemu_plugin_id_t, void*), void* userdata);
size_t qemu_plugin_tb_n_insns(const struct qemu_plugin_tb* tb);
struct qemu_plugin_insn* qemu_plugin_tb_get_insn(const struct qemu_plugin_tb* tb, size_t index);
uint64_t qemu_plugin_insn_vaddr(const struct qemu_plugin_insn* insn);
void qemu_plugin_register_vcpu_insn_exec_inline(struct qemu_plugin_insn* insn, enum qemu_plugin_op op, void* ptr,
                                                uint64_t imm);

__attribute__((visibility("default"))) int qemu_plugin_version = 1;

#define SLOTS (1u << 21) /* open addressing; firmware images hold far fewer instructions */

typedef struct {
  uint64_t address;
  uint64_t count;
  int used;
} Slot;

static Slot* slots;
static const char* out_path;

static Slot* slot_for(uint64_t address) {
  uint64_t index = (address >> 1) * 0x9E3779B97F4A7C15ull >> 43;
  for (uint32_t probe = 0; probe < SLOTS; ++probe) {
    Slot* slot = &slots[(index + probe) & (SLOTS - 1)];
    if (!slot->used) {
      slot->used = 1;
      slot->address = address;
      return slot;
    }
    if (slot->address == address) return slot;
  }
  fprintf(stderr, "pc_counts: more than %u distinct instruction addresses\n", SLOTS);
  abort();
}

static void on_translate(qemu_plugin_id_t id, struct qemu_plugin_tb* tb) {
  (void)id;
  size_t n = qemu_plugin_tb_n_insns(tb);
  for (size_t i = 0; i < n; ++i) {
    struct qemu_plugin_insn* insn = qemu_plugin_tb_get_insn(tb, i);
    Slot* slot = slot_for(qemu_plugin_insn_vaddr(insn));
    qemu_plugin_register_vcpu_insn_exec_inline(insn, QEMU_PLUGIN_INLINE_ADD_U64, &slot->count, 1);
  }
}

static void write_counts(qemu_plugin_id_t id, void* userdata) {
  (void)id;
  (void)userdata;
  FILE* out = fopen(out_path, "w");
  if (out == NULL) {
    perror(out_path);
    return;
  }
  for (uint32_t i = 0; i < SLOTS; ++i)
    if (slots[i].used && slots[i].count) fprintf(out, "%llx %llu\n", (unsigned long long)slots[i].address,
                                                 (unsigned long long)slots[i].count);
  fclose(out);
}

__attribute__((visibility("default"))) int qemu_plugin_install(qemu_plugin_id_t id, const qemu_info_t* info, int argc,
                                                               char** argv) {
  (void)info;
  for (int i = 0; i < argc; ++i)
    if (strncmp(argv[i], "out=", 4) == 0) out_path = argv[i] + 4;
  if (out_path == NULL) {
    fprintf(stderr, "pc_counts: usage -plugin pc_counts.so,out=FILE\n");
    return 1;
  }
  slots = calloc(SLOTS, sizeof *slots);
  if (slots == NULL) return 1;
  qemu_plugin_register_vcpu_tb_trans_cb(id, on_translate);
  qemu_plugin_register_atexit_cb(id, write_counts, NULL);
  return 0;
}
