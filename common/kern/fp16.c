/* fp16: IEEE half and bfloat16 <-> float32 conversions, bit-exact with ggml on x86.
 *
 * f32 -> fp16 rounds to nearest even (as F16C's vcvtps2ph with imm 0, which ggml-cpu uses),
 * overflows to inf, keeps subnormals, and turns NaN into a quiet NaN carrying the top payload
 * bits. f32 -> bf16 is ggml_compute_fp32_to_bf16: round to nearest even, NaN forced quiet.
 * Integer-only so the result never depends on the FPU rounding mode. See README.md. */
#include <string.h>

#include "kern/kern.h"

static uint32_t s_bits(float f) {
    uint32_t u;
    memcpy(&u, &f, 4);
    return u;
}

static float s_float(uint32_t u) {
    float f;
    memcpy(&f, &u, 4);
    return f;
}

float kern_fp16_to_f32(stp_fp16 h) {
    uint32_t sign = (uint32_t)(h & 0x8000) << 16;
    uint32_t exp = (h >> 10) & 0x1F;
    uint32_t mant = h & 0x3FF;
    if (exp == 0x1F) return s_float(sign | 0x7F800000 | (mant << 13)); /* inf / NaN */
    if (exp == 0) {
        if (mant == 0) return s_float(sign);
        /* subnormal: mant * 2^-24, exact in float */
        float v = (float)mant * (1.0f / 16777216.0f);
        return sign ? -v : v;
    }
    return s_float(sign | ((exp + 112) << 23) | (mant << 13));
}

stp_fp16 kern_f32_to_fp16(float f) {
    uint32_t x = s_bits(f);
    uint32_t sign = (x >> 16) & 0x8000;
    uint32_t ax = x & 0x7FFFFFFF;
    if (ax > 0x7F800000) /* NaN: quiet, top payload bits kept */
        return (stp_fp16)(sign | 0x7E00 | ((ax >> 13) & 0x3FF));
    if (ax < 0x38800000) { /* below 2^-14: half subnormal or zero */
        uint32_t e = ax >> 23;
        if (e < 102) return (stp_fp16)sign; /* < 2^-25 (ties at 2^-25 go to even 0) */
        uint32_t mant = (ax & 0x7FFFFF) | 0x800000;
        uint32_t shift = 126 - e; /* 14..24 */
        uint32_t q = mant >> shift;
        uint32_t rem = mant & ((1u << shift) - 1);
        uint32_t half = 1u << (shift - 1);
        if (rem > half || (rem == half && (q & 1))) q++;
        return (stp_fp16)(sign | q);
    }
    uint32_t r = ax + 0xFFF + ((ax >> 13) & 1); /* round the 13 dropped bits to nearest even */
    r -= 112u << 23;                            /* rebias exponent 127 -> 15 */
    uint32_t h = r >> 13;
    if (h > 0x7C00) h = 0x7C00; /* overflow (and inf) */
    return (stp_fp16)(sign | h);
}

float kern_bf16_to_f32(stp_bf16 h) {
    return s_float((uint32_t)h << 16);
}

stp_bf16 kern_f32_to_bf16(float f) {
    uint32_t u = s_bits(f);
    if ((u & 0x7FFFFFFF) > 0x7F800000) return (stp_bf16)((u >> 16) | 64); /* NaN: force quiet */
    return (stp_bf16)((u + (0x7FFF + ((u >> 16) & 1))) >> 16);
}
