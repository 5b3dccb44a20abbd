/* Cortex-M startup: vector table, RAM initialisation, FPU enable, SysTick time base, fault report.
 * Symbols come from linker.ld; no vendor CMSIS headers are needed. */
#include <stdint.h>

#include "semihosting.h"

extern uint32_t _sidata, _sdata, _edata, _sbss, _ebss, _sstack, _estack;
int main(void);

#define REG(address) (*(volatile uint32_t*)(address))
#define CPACR 0xE000ED88u
#define SYST_CSR 0xE000E010u
#define SYST_RVR 0xE000E014u
#define SYST_CVR 0xE000E018u
#define ICSR 0xE000ED04u
#define ICSR_PENDSTSET (1u << 26)
#define SYSTICK_RELOAD 0xFFFFFFu
#define STACK_PAINT 0xC0FFEE11u

static volatile uint32_t systick_wraps;

void SysTick_Handler(void) { systick_wraps++; }

void systick_start(void) {
  REG(SYST_RVR) = SYSTICK_RELOAD;
  REG(SYST_CVR) = 0;
  REG(SYST_CSR) = 0x7u; /* enable, interrupt on wrap, processor clock */
  while (REG(SYST_CVR) == 0u) {
  } /* the counter holds 0 until its first reload, which would read as a full period */
  systick_wraps = 0;
}

/* Ticks since systick_start, wraps included: 24 bits from the counter, the rest from the handler. */
uint64_t systick_now(void) {
  uint32_t wraps, value, pending;
  do {
    wraps = systick_wraps;
    value = REG(SYST_CVR);
    pending = REG(ICSR) & ICSR_PENDSTSET;
  } while (wraps != systick_wraps);
  if (pending && value > SYSTICK_RELOAD / 2u) wraps++; /* wrapped, handler not run yet */
  return (uint64_t)wraps * (SYSTICK_RELOAD + 1u) + (SYSTICK_RELOAD - value);
}

/* Deepest stack use so far: the painted words below the stack top that were overwritten. */
uint32_t stack_used_bytes(void) {
  const uint32_t* word = &_sstack;
  while (word < &_estack && *word == STACK_PAINT) word++;
  return (uint32_t)((uintptr_t)&_estack - (uintptr_t)word);
}

void Reset_Handler(void) {
#if defined(__ARM_FP)
  REG(CPACR) |= 0xFu << 20; /* full access to CP10/CP11 before any floating-point instruction */
  __asm__ volatile("dsb\n isb" ::: "memory");
#endif
  for (uint32_t *src = &_sidata, *dst = &_sdata; dst < &_edata;) *dst++ = *src++;
  for (uint32_t* dst = &_sbss; dst < &_ebss;) *dst++ = 0u;
  uint32_t* sp;
  __asm__ volatile("mov %0, sp" : "=r"(sp));
  for (uint32_t* word = &_sstack; word < sp - 16; word++) *word = STACK_PAINT;
  sh_exit(main() == 0);
}

static void fault(void) {
  sh_print("error: processor fault\n");
  sh_exit(0);
}

void Default_Handler(void) { fault(); }

__attribute__((section(".isr_vector"), used)) static void (*const vectors[16])(void) = {
    (void (*)(void))&_estack, /* initial stack pointer */
    Reset_Handler,
    Default_Handler, /* NMI */
    Default_Handler, /* HardFault */
    Default_Handler, /* MemManage */
    Default_Handler, /* BusFault */
    Default_Handler, /* UsageFault */
    Default_Handler, /* SecureFault (ARMv8-M) */
    0,
    0,
    0,
    Default_Handler, /* SVCall */
    Default_Handler, /* DebugMonitor */
    0,
    Default_Handler, /* PendSV */
    SysTick_Handler,
};
