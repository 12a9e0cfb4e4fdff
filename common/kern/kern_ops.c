/* kern_ops: runtime choice of the kernel table (ref, avx2, avx512vnni).
 *
 * The level is decided once per process (pthread_once) from CPUID plus the OS's XCR0 state
 * (xgetbv), like ggml's cpu-feats: AVX-512 F/BW/VL/VNNI > AVX2+FMA+F16C > ref. STP_KERNELS=
 * ref|avx2|avx512 forces a level; a level the CPU lacks falls back to the best one it has.
 * The cached pointer is the module's only mutable static: it is written once under
 * pthread_once and points at a static const table. See README.md ("dispatch"). */
#include <pthread.h>
#include <stdlib.h>
#include <string.h>

#include "kern/kern_internal.h"

#if defined(__x86_64__) || defined(__i386__)
#include <cpuid.h>
#define STP_KERN_X86 1
#endif

const kern_ops kern_ops_ref_table = {
    .level = "ref",
    .quantize_act = kern_quantize_act_ref,
    .vec_dot = kern_vec_dot_ref,
    .matvec = kern_matvec_ref,
    .dequantize_row = kern_dequantize_row_ref,
    .matmat = kern_matmat_ref,
    .axpy_row = kern_axpy_row_ref,
    .matvec_sparse = kern_matvec_sparse_ref,
    .matvec_rows = kern_matvec_rows_ref,
    .matvec_q4_0x16 = kern_matvec_q4_0x16_ref,
    .matmat_q4_0x16 = kern_matmat_q4_0x16_ref,
    .down_t_matvec = kern_down_t_matvec_ref,
    .pack_q4_0x16 = kern_q4_0x16_pack,
};

enum { LEVEL_REF = 0, LEVEL_AVX2 = 1, LEVEL_AVX512 = 2 };

#ifdef STP_KERN_X86
static uint64_t s_xgetbv0(void) {
    uint32_t lo, hi;
    __asm__ volatile("xgetbv" : "=a"(lo), "=d"(hi) : "c"(0));
    return ((uint64_t)hi << 32) | lo;
}
#endif

/* Highest level this CPU and OS support. */
static int s_cpu_level(void) {
#ifdef STP_KERN_X86
    unsigned a, b, c, d;
    if (!__get_cpuid(1, &a, &b, &c, &d)) return LEVEL_REF;
    const int osxsave = (c >> 27) & 1, fma = (c >> 12) & 1, f16c = (c >> 29) & 1;
    if (!osxsave) return LEVEL_REF;
    const uint64_t xcr0 = s_xgetbv0();
    if ((xcr0 & 0x6) != 0x6) return LEVEL_REF; /* XMM and YMM state */
    if (__get_cpuid_max(0, NULL) < 7) return LEVEL_REF;
    __cpuid_count(7, 0, a, b, c, d);
    const int avx2 = (b >> 5) & 1;
    if (!(avx2 && fma && f16c)) return LEVEL_REF;
    const int avx512f = (b >> 16) & 1, avx512bw = (b >> 30) & 1, avx512vl = (b >> 31) & 1;
    const int avx512dq = (b >> 17) & 1, vnni = (c >> 11) & 1;
    if (avx512f && avx512bw && avx512vl && avx512dq && vnni && (xcr0 & 0xE0) == 0xE0)
        return LEVEL_AVX512;
    return LEVEL_AVX2;
#else
    return LEVEL_REF;
#endif
}

static const kern_ops *s_table(int level) {
#ifdef STP_KERN_X86
    if (level == LEVEL_AVX512) return &kern_ops_avx512_table;
    if (level == LEVEL_AVX2) return &kern_ops_avx2_table;
#endif
    (void)level;
    return &kern_ops_ref_table;
}

static pthread_once_t s_once = PTHREAD_ONCE_INIT;
static const kern_ops *s_chosen;

static void s_choose(void) {
    int level = s_cpu_level();
    const char *env = getenv("STP_KERNELS");
    if (env) {
        int want = level;
        if (!strcmp(env, "ref"))
            want = LEVEL_REF;
        else if (!strcmp(env, "avx2"))
            want = LEVEL_AVX2;
        else if (!strcmp(env, "avx512") || !strcmp(env, "avx512vnni"))
            want = LEVEL_AVX512;
        if (want < level) level = want;
    }
    s_chosen = s_table(level);
}

const kern_ops *kern_ops_get(void) {
    pthread_once(&s_once, s_choose);
    return s_chosen;
}

int kern_ops_all(const kern_ops **out, int cap) {
    int level = s_cpu_level(), k = 0;
    for (int l = LEVEL_REF; l <= level && k < cap; l++)
        out[k++] = s_table(l);
    return k;
}
