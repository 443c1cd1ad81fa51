/* transfuse native kernel: the read side of cached_attention, fp32, straight from the cache.
 *
 * One generation step (GEN_DESIGN.md) brings N tokens of B sequences on one flattened
 * axis. Token t of sequence s = sot[t] at position p = pos[t] attends over the entries
 * j of s's cache with lo(p) <= j <= p, lo(p) = max(0, p - window + 1) (window 0: 0).
 * The K/V rows are read where they lie, no gathered copy:
 *
 *   contiguous (block_size 0): row j of s is  cache + table[s] * c0 + j * c1 + g * c2
 *   paged:                     row j of s is  cache + table[s * tw + j / bs] * c0
 *                                                   + (j % bs) * c1 + g * c2
 *
 * with (c0, c1, c2) the strides of the token-major view [A, L|bs, Hkv, D] of the cache,
 * so token-major and head-major caches are two sets of strides. Blocks past a sequence's
 * length (-1 padding) are never read; an index out of the cache is refused (code 3).
 *
 * Work unit u in [u0, u1): u = r * groups + c, the tokens [runs[r], runs[r + 1]) (at most
 * QMAX tokens of one sequence, from the caller) and the query heads of kv heads
 * [c * HG, (c + 1) * HG) (groups = ceil(Hkv / HG); the caller takes HG = Hkv unless the
 * threads need more units: then each cache row, the Hkv heads of a position side by side,
 * is read from start to end by one unit, 0.65-0.85x the time of a unit per kv head). A
 * unit walks the keys its tokens can see in tiles of KT keys; each tile's K and V rows of
 * a kv head are loaded from memory once and then read from L1 by every (token, query
 * head) pair of that kv head. Per pair: the tile's scores (8 keys at a time: 8 dot
 * products reduced by a shuffle tree; scale, softcap, ALiBi), an online softmax in fp32
 * (running max m, running sum l, accumulator rescaled when m grows) and P V; at the end
 * out = acc / l. Each (token, head) is computed on its own, the same way whatever the
 * batch or the thread split.
 *
 * Glossary: N step tokens, B step sequences, H query heads, Hkv kv heads (H % Hkv == 0,
 * R = H / Hkv query heads per kv head: query head h reads kv head h / R), D key head dim,
 * Dv value head dim (both multiples of 8), A slots or blocks of the cache, L slot length,
 * bs block size, tw block-table width, KT keys per tile, QMAX tokens per unit at most,
 * HG kv heads per unit. The vector helpers and the exp are vec8.h's (shared with kernels.c).
 */

#include <math.h>
#include <stdint.h>
#include <stdlib.h>
#include <string.h>

#include "vec8.h"

#define KT 32
#define QMAX 8

/* (x0 + x1, x2 + x3, y0 + y1, y2 + y3, x4 + x5, x6 + x7, y4 + y5, y6 + y7) */
static inline v8 hadd(v8 x, v8 y) {
    return __builtin_shufflevector(x, y, 0, 2, 8, 10, 4, 6, 12, 14) +
           __builtin_shufflevector(x, y, 1, 3, 9, 11, 5, 7, 13, 15);
}

/* lane i = q . (k[i] + off)[0:D] (D a multiple of 8) for 8 key rows */
static inline v8 dot8(const float *q, const float *const *k, long off, int D) {
    v8 a0 = vset(0), a1 = vset(0), a2 = vset(0), a3 = vset(0);
    v8 a4 = vset(0), a5 = vset(0), a6 = vset(0), a7 = vset(0);
    const float *k0 = k[0] + off, *k1 = k[1] + off, *k2 = k[2] + off, *k3 = k[3] + off;
    const float *k4 = k[4] + off, *k5 = k[5] + off, *k6 = k[6] + off, *k7 = k[7] + off;
    for (int d = 0; d < D; d += 8) {
        v8 x = vload(q + d);
        a0 += x * vload(k0 + d); a1 += x * vload(k1 + d);
        a2 += x * vload(k2 + d); a3 += x * vload(k3 + d);
        a4 += x * vload(k4 + d); a5 += x * vload(k5 + d);
        a6 += x * vload(k6 + d); a7 += x * vload(k7 + d);
    }
    v8 t0 = hadd(hadd(a0, a1), hadd(a2, a3)), t1 = hadd(hadd(a4, a5), hadd(a6, a7));
    return __builtin_shufflevector(t0, t1, 0, 1, 2, 3, 8, 9, 10, 11) +
           __builtin_shufflevector(t0, t1, 4, 5, 6, 7, 12, 13, 14, 15);
}

/* acc[0:Dv] = acc * corr + sum_{j in [a, b]} p[j] * (v[j] + off)[0:Dv] */
static inline void pv_update(float *acc, float corr, const float *p, const float *const *v,
                             long off, int a, int b, int Dv) {
    int d = 0;
    for (; d + 32 <= Dv; d += 32) {
        v8 c = vset(corr);
        v8 x0 = vload(acc + d) * c, x1 = vload(acc + d + 8) * c;
        v8 x2 = vload(acc + d + 16) * c, x3 = vload(acc + d + 24) * c;
        for (int j = a; j <= b; j++) {
            v8 w = vset(p[j]);
            const float *vr = v[j] + off + d;
            x0 += w * vload(vr); x1 += w * vload(vr + 8);
            x2 += w * vload(vr + 16); x3 += w * vload(vr + 24);
        }
        vstore(acc + d, x0); vstore(acc + d + 8, x1);
        vstore(acc + d + 16, x2); vstore(acc + d + 24, x3);
    }
    for (; d < Dv; d += 8) {
        v8 x = vload(acc + d) * vset(corr);
        for (int j = a; j <= b; j++) x += vset(p[j]) * vload(v[j] + off + d);
        vstore(acc + d, x);
    }
}

/* where one layer's caches lie: token-major strides, slot or block table */
struct cache_view {
    const float *k, *v;
    long k0, k1, k2, v0, v1, v2, A, tw;
    const int64_t *table;
    int bs;
};

/* kp[jj], vp[jj] = rows j0 + jj (jj < cnt) of sequence s (slot: contiguous), kv head 0;
 * 3 when a block id is outside the pool */
static inline int tile_rows(const struct cache_view *c, long s, long slot, long j0, int cnt,
                            const float **kp, const float **vp) {
    for (int jj = 0; jj < cnt; jj++) {
        long j = j0 + jj, base, row;
        if (c->bs) {
            base = c->table[s * c->tw + j / c->bs];
            row = j % c->bs;
            if (base < 0 || base >= c->A) return 3;
        } else {
            base = slot;
            row = j;
        }
        kp[jj] = c->k + base * c->k0 + row * c->k1;
        vp[jj] = c->v + base * c->v0 + row * c->v1;
    }
    return 0;
}

int tf_cached_attention_f32(int N, int H, int Hkv, int D, int Dv, float scale, int window,
                            float softcap, const float *alibi,
                            const float *q, long qn, long qh,
                            const float *kc, long k0, long k1, long k2,
                            const float *vc, long v0, long v1, long v2,
                            long A, long L, const int64_t *pos, const int64_t *sot, int B,
                            const int64_t *table, long tw, int bs,
                            const int64_t *runs, int nruns, int HG,
                            float *out, long on, long oh, int u0, int u1) {
    int groups = HG > 0 ? (Hkv + HG - 1) / HG : 0;
    if (N < 1 || H < 1 || Hkv < 1 || H % Hkv || D < 8 || D % 8 || Dv < 8 || Dv % 8 ||
        window < 0 || softcap < 0 || A < 1 || L < 1 || B < 1 || bs < 0 || (bs && tw < 1) ||
        nruns < 1 || HG < 1 || HG > Hkv || u0 < 0 || u1 > nruns * groups || u0 > u1)
        return 1;
    int R = H / Hkv, rc = 0;
    /* per (token, query head) of a unit: accumulator [Dv], running max, running sum */
    size_t states = (size_t)QMAX * HG * R;
    float *acc = malloc(states * Dv * sizeof(float));
    float *mx = malloc(states * 2 * sizeof(float));
    if (!acc || !mx) { free(acc); free(mx); return 2; }
    float *sum = mx + states;
    const struct cache_view cv = {kc, vc, k0, k1, k2, v0, v1, v2, A, tw, table, bs};
    const float *kp[KT + 8], *vp[KT + 8];
    float sc[KT + 8] __attribute__((aligned(32)));
    for (int u = u0; u < u1 && !rc; u++) {
        int r = u / groups, ga = u % groups * HG, gb = ga + HG < Hkv ? ga + HG : Hkv;
        long ta = runs[r], tb = runs[r + 1];
        if (ta < 0 || tb > N || tb <= ta || tb - ta > QMAX) { rc = 1; break; }
        int nq = (int)(tb - ta), nh = (gb - ga) * R;  /* query heads of the unit: ga * R.. */
        long s = sot[ta], jlo = -1, jhi = -1;
        long lo[QMAX], hi[QMAX];
        if (s < 0 || s >= B) { rc = 3; break; }
        for (int i = 0; i < nq; i++) {
            long p = pos[ta + i];
            if (sot[ta + i] != s || p < 0 || (!bs && p >= L) || (bs && p / bs >= tw)) {
                rc = 3;
                break;
            }
            lo[i] = window && p - window + 1 > 0 ? p - window + 1 : 0;
            hi[i] = p;
            jlo = i == 0 || lo[i] < jlo ? lo[i] : jlo;
            jhi = i == 0 || p > jhi ? p : jhi;
        }
        if (rc) break;
        long slot = bs ? 0 : table[s];
        if (!bs && (slot < 0 || slot >= A)) { rc = 3; break; }
        for (int i = 0; i < nq * nh; i++) { mx[i] = -INFINITY; sum[i] = 0.0f; }
        memset(acc, 0, (size_t)nq * nh * Dv * sizeof(float));
        for (long j0 = jlo; j0 <= jhi; j0 += KT) {
            /* -- this tile's rows of K and V, read in place (every head of a row is
             *    adjacent: the unit's heads walk the same memory) -- */
            int cnt = jhi + 1 - j0 < KT ? (int)(jhi + 1 - j0) : KT;
            rc = tile_rows(&cv, s, slot, j0, cnt, kp, vp);
            if (rc) break;
            int c8 = (cnt + 7) / 8 * 8;
            for (int jj = cnt; jj < c8; jj++) kp[jj] = kp[0];  /* lanes past the end: masked */
            for (int g = ga; g < gb; g++)
                for (int i = 0; i < nq; i++) {
                    /* keys [a, b] of this tile are visible to token i */
                    int a = lo[i] > j0 ? (int)(lo[i] - j0) : 0;
                    int b = hi[i] < j0 + cnt - 1 ? (int)(hi[i] - j0) : cnt - 1;
                    if (a > b) continue;
                    long p = hi[i];
                    for (int hr = 0; hr < R; hr++) {
                        int h = g * R + hr, st = i * nh + (h - ga * R);
                        const float *qr = q + (ta + i) * qn + h * qh;
                        /* -- scores of the visible keys, in 8-key groups -- */
                        int g0 = a / 8 * 8;
                        float tmax = -INFINITY;
                        for (int jj = g0; jj <= b; jj += 8) {
                            v8 x = dot8(qr, kp + jj, g * k2, D) * vset(scale);
                            if (softcap > 0) {
                                v8 e = vexp(x * vset(2.0f / softcap));
                                x = vset(softcap) * (vset(1.0f) - vset(2.0f) / (e + vset(1.0f)));
                            }
                            if (alibi) {
                                v8 rel;
                                for (int l = 0; l < 8; l++) rel[l] = (float)(j0 + jj + l - p);
                                x += vset(alibi[h]) * rel;
                            }
                            vstore(sc + jj, x);
                        }
                        for (int jj = a; jj <= b; jj++) tmax = sc[jj] > tmax ? sc[jj] : tmax;
                        /* -- online softmax: rescale by exp(m - m'), add this tile -- */
                        float mnew = tmax > mx[st] ? tmax : mx[st];
                        float corr = mx[st] == -INFINITY ? 0.0f : expf(mx[st] - mnew);
                        mx[st] = mnew;
                        for (int jj = g0; jj < a; jj++) sc[jj] = -INFINITY;
                        for (int jj = b + 1; jj < (b + 8) / 8 * 8; jj++) sc[jj] = -INFINITY;
                        v8 tot = vset(0);
                        for (int jj = g0; jj <= b; jj += 8) {
                            v8 e = vexp(vload(sc + jj) - vset(mnew));
                            vstore(sc + jj, e);
                            tot += e;
                        }
                        sum[st] = sum[st] * corr + hsum(tot);
                        pv_update(acc + (long)st * Dv, corr, sc, vp, g * v2, a, b, Dv);
                    }
                }
        }
        if (rc) break;
        for (int i = 0; i < nq; i++)
            for (int x = 0; x < nh; x++) {
                int st = i * nh + x;
                float f = 1.0f / sum[st];
                float *o = out + (ta + i) * on + (ga * R + x) * oh;
                const float *a = acc + (long)st * Dv;
                for (int d = 0; d < Dv; d += 8) vstore(o + d, vload(a + d) * vset(f));
            }
    }
    free(acc);
    free(mx);
    return rc;
}
