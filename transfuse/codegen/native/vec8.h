/* Shared by the native kernel files: 8-lane fp32 vectors (gcc/clang vector extensions; the
 * compiler picks AVX2/AVX-512 instructions with -march=native), loads/stores, select, sums,
 * and a ~2 ulp vector exp. Included by kernels.c and cached_attention.c; part of the build key
 * (native/__init__.py HEADERS). */
#ifndef TRANSFUSE_VEC8_H
#define TRANSFUSE_VEC8_H

#include <math.h>
#include <stdint.h>
#include <string.h>

typedef float v8 __attribute__((vector_size(32)));
typedef int32_t v8i __attribute__((vector_size(32)));
typedef float v8u __attribute__((vector_size(32), aligned(4), may_alias));



static inline v8 vload(const float *p) { return *(const v8u *)p; }
static inline void vstore(float *p, v8 v) { *(v8u *)p = v; }
static inline v8 vset(float x) { return (v8){x, x, x, x, x, x, x, x}; }
static inline v8 vselect(v8i mask, v8 a, v8 b) { return (v8)(((v8i)a & mask) | ((v8i)b & ~mask)); }
static inline float hsum(v8 v) { return ((v[0] + v[4]) + (v[1] + v[5])) + ((v[2] + v[6]) + (v[3] + v[7])); }
static inline float hmax(v8 v) {
    float m = v[0];
    for (int i = 1; i < 8; i++) m = v[i] > m ? v[i] : m;
    return m;
}

/* exp(x), relative error ~2 ulp: n = round(x / ln2), r = x - n ln2 (Cody-Waite, two
 * parts), e^r by its Taylor series to degree 7 (|r| <= ln2/2: truncation < 6e-9), times
 * 2^n built in the exponent bits. Below -87.33 the result is 0 (fp32 would be
 * subnormal there), above 88.72 it is +inf; NaN stays NaN. */
static inline v8 vexp(v8 x) {
    const v8 lo = vset(-87.33654f), hi = vset(88.72283f);
    v8i under = x < lo, over = x > hi;
    v8 xc = vselect(under, lo, vselect(over, hi, x));
    v8 n = xc * vset(1.44269504088896341f);
    n = (n + vset(12582912.0f)) - vset(12582912.0f); /* round to nearest, |n| < 2^22 */
    v8 r = xc - n * vset(0.693145751953125f);
    r = r - n * vset(1.42860682030941723212e-6f);
    v8 p = vset(1.0f / 5040);
    p = p * r + vset(1.0f / 720);
    p = p * r + vset(1.0f / 120);
    p = p * r + vset(1.0f / 24);
    p = p * r + vset(1.0f / 6);
    p = p * r + vset(0.5f);
    p = p * r + vset(1.0f);
    p = p * r + vset(1.0f);
    /* 2^n in two halves so n = 128 (x near 88.72) does not overflow the exponent field */
    v8i ni = __builtin_convertvector(n, v8i);
    v8i n1 = ni >> 1, n2 = ni - n1;
    v8i b1 = (n1 + 127) << 23, b2 = (n2 + 127) << 23;
    v8 s1, s2;
    memcpy(&s1, &b1, 32);
    memcpy(&s2, &b2, 32);
    v8 res = p * s1 * s2;
    res = vselect(over, vset(INFINITY), res);
    return (v8)((v8i)res & ~under);
}

#endif
