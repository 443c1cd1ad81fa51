/* transfuse native small-M linear, fp32: y[M, N] = x[M, K] @ W[N, K]^T (+ bias[N]).
 *
 * Compiled into the same library as kernels.c (see native/__init__.py, SOURCES). For
 * the few rows of a decode step (M = batch, or k + 1 rows of a speculative check) a
 * linear is a stream over its weight: MKL's sgemm reaches the memory's bandwidth at
 * M = 1 (GEMV) but takes 2-3.5x that time at M = 4..16. Here every weight element is
 * read from memory once whatever M is: the weight is walked in blocks of NB rows and
 * KC columns (4 KB, stays in L1, the next one prefetched meanwhile), and each block is used
 * by all M rows of x (register tiles of MB rows x NB columns) before
 * the next one is touched.
 *
 * Glossary: M rows of x and y, K the reduced dim, N output columns (weight rows),
 * NB weight rows per block, MB rows of x per register tile, KC columns per K chunk,
 * VL the vector width (16 fp32).
 *
 * Batch invariance: the value y[m, n] is a function of x[m, :], W[n, :] and bias[n]
 * only, computed the same way whatever M, m, n or the thread split are. Per (m, n) one
 * accumulator vector of VL lanes runs over K in order, lane l summing the products at
 * k = l, l + VL, ... by fused multiply-add (the tail past the last full vector is
 * zero-padded); the chunking over K and the tiling over M only decide when the
 * accumulator is parked in memory (exact) between steps. The VL lanes are then summed
 * by one fixed tree (lane j + lane j + 8, then + 4, + 2, + 1) that treats every slot
 * of the 4-wide transposed reduction alike, and the bias is added last. So row m of
 * the result is bitwise the same computed alone or among any other rows.
 *
 * Work units (for the caller's thread split): blocks of NB output columns; unit u is
 * columns [u * NB, min(N, (u + 1) * NB)).
 */

#include <stdint.h>
#include <string.h>

typedef float g16 __attribute__((vector_size(64)));
typedef float g16u __attribute__((vector_size(64), aligned(4), may_alias));
typedef float g8 __attribute__((vector_size(32)));
typedef float g4 __attribute__((vector_size(16)));

#define VL 16
#ifndef NB
#define NB 4 /* a multiple of 4 (the reduction's width) */
#endif
#ifndef MB
#if defined(__AVX512F__)
#define MB 4 /* 16 accumulators + 4 weight vectors: 20 of the 32 zmm registers */
#else
#define MB 2 /* a g16 is two registers without AVX-512 */
#endif
#endif
#ifndef KC
#define KC 256 /* 4 x 1 KB of weight and M x 1 KB of x per chunk: L1 */
#endif
#define MAXM 64 /* rows per pass over the weight block; larger M loops (same arithmetic) */

static inline g16 gload(const float *p) { return *(const g16u *)p; }

/* the 4 sums of the lanes of a0..a3, each by the same tree: j + (j + 8), + 4, + 2, + 1 */
static inline g4 reduce4(g16 a0, g16 a1, g16 a2, g16 a3) {
    g16 s01 = __builtin_shufflevector(a0, a1, 0, 1, 2, 3, 4, 5, 6, 7, 16, 17, 18, 19, 20, 21, 22, 23) +
              __builtin_shufflevector(a0, a1, 8, 9, 10, 11, 12, 13, 14, 15, 24, 25, 26, 27, 28, 29, 30, 31);
    g16 s23 = __builtin_shufflevector(a2, a3, 0, 1, 2, 3, 4, 5, 6, 7, 16, 17, 18, 19, 20, 21, 22, 23) +
              __builtin_shufflevector(a2, a3, 8, 9, 10, 11, 12, 13, 14, 15, 24, 25, 26, 27, 28, 29, 30, 31);
    /* slot s: lanes 8s'..: partial p[0..8) of accumulator s */
    g16 t = __builtin_shufflevector(s01, s23, 0, 1, 2, 3, 8, 9, 10, 11, 16, 17, 18, 19, 24, 25, 26, 27) +
            __builtin_shufflevector(s01, s23, 4, 5, 6, 7, 12, 13, 14, 15, 20, 21, 22, 23, 28, 29, 30, 31);
    /* lanes 4s..4s+3: q[0..4) of accumulator s */
    g8 u = __builtin_shufflevector(t, t, 0, 1, 4, 5, 8, 9, 12, 13) +
           __builtin_shufflevector(t, t, 2, 3, 6, 7, 10, 11, 14, 15);
    /* lanes 2s, 2s+1: r[0..2) of accumulator s */
    return __builtin_shufflevector(u, u, 0, 2, 4, 6) + __builtin_shufflevector(u, u, 1, 3, 5, 7);
}

/* One register tile: rows x[0..R) against weight rows w[0..NB) over kn columns (kn % VL
 * == 0), continuing the accumulators in acc[r * NB + j] (zeros when first). */
static inline __attribute__((always_inline)) void tile(const int R, int kn, const float *x, long ldx,
                                                       const float *const *w, g16 *acc, int first,
                                                       const float *const *pf) {
    g16 c[MB][NB];
    for (int r = 0; r < R; r++)
        for (int j = 0; j < NB; j++) c[r][j] = first ? (g16){0} : acc[r * NB + j];
    for (int k = 0; k < kn; k += VL) {
        g16 wv[NB];
        for (int j = 0; j < NB; j++) wv[j] = gload(w[j] + k);
        if (pf)
            for (int j = 0; j < NB; j++) __builtin_prefetch(pf[j] + k, 0, 3);
        for (int r = 0; r < R; r++) {
            g16 xv = gload(x + r * ldx + k);
            for (int j = 0; j < NB; j++) c[r][j] += xv * wv[j];
        }
    }
    for (int r = 0; r < R; r++)
        for (int j = 0; j < NB; j++) acc[r * NB + j] = c[r][j];
}

/* tile() for R = 1..MB rows; pf: the next weight block's rows, prefetched alongside (or NULL) */
static void tile_rows(int R, int kn, const float *x, long ldx, const float *const *w, g16 *acc,
                      int first, const float *const *pf) {
    switch (R) {
#if MB >= 4
    case 4: tile(4, kn, x, ldx, w, acc, first, pf); break;
#endif
#if MB >= 3
    case 3: tile(3, kn, x, ldx, w, acc, first, pf); break;
#endif
    case 2: tile(2, kn, x, ldx, w, acc, first, pf); break;
    default: tile(1, kn, x, ldx, w, acc, first, pf); break;
    }
}

/* y[m, n] for the column blocks [u0, u1) (see the header). Strides in elements; rows of
 * x, w and y are contiguous. bias may be NULL. */
int tf_linear_f32(int M, int N, int K, const float *x, long ldx, const float *w, long ldw,
                  const float *bias, float *y, long ldy, int u0, int u1) {
    int units = (N + NB - 1) / NB;
    if (M < 1 || N < 1 || K < 1 || u0 < 0 || u1 > units || u0 > u1) return 1;
    g16 acc[MAXM * NB] __attribute__((aligned(64)));
    int ktail = K % VL, kfull = K - ktail;
    for (int u = u0; u < u1; u++) {
        int n0 = u * NB, nb = N - n0 < NB ? N - n0 : NB;
        const float *wr[NB];
        for (int j = 0; j < NB; j++) wr[j] = w + (long)(n0 + (j < nb ? j : nb - 1)) * ldw;
        for (int m0 = 0; m0 < M; m0 += MAXM) {
            int mm = M - m0 < MAXM ? M - m0 : MAXM;
            const float *xm = x + (long)m0 * ldx;
            /* -- the full vectors of K, in chunks of KC: the weight block stays in L1 -- */
            for (int k0 = 0; k0 < kfull; k0 += KC) {
                int kn = kfull - k0 < KC ? kfull - k0 : KC;
                const float *wk[NB], *pf[NB];
                for (int j = 0; j < NB; j++) {
                    wk[j] = wr[j] + k0;
                    /* the next block: this one's next chunk, else the next column block's first */
                    pf[j] = k0 + KC < kfull ? wr[j] + k0 + KC
                                            : w + (long)(n0 + NB + j < N ? n0 + NB + j : N - 1) * ldw;
                }
                for (int r = 0; r < mm; r += MB)
                    tile_rows(mm - r < MB ? mm - r : MB, kn, xm + (long)r * ldx + k0, ldx, wk,
                              acc + r * NB, k0 == 0, r == 0 ? pf : NULL);
            }
            /* -- the last K % VL columns, zero-padded to one vector -- */
            if (ktail) {
                float wt[NB][VL] __attribute__((aligned(64))), xt[MB][VL] __attribute__((aligned(64)));
                const float *wk[NB];
                for (int j = 0; j < NB; j++) {
                    memset(wt[j], 0, sizeof wt[j]);
                    memcpy(wt[j], wr[j] + kfull, (size_t)ktail * sizeof(float));
                    wk[j] = wt[j];
                }
                for (int r = 0; r < mm; r += MB) {
                    int R = mm - r < MB ? mm - r : MB;
                    for (int i = 0; i < R; i++) {
                        memset(xt[i], 0, sizeof xt[i]);
                        memcpy(xt[i], xm + (long)(r + i) * ldx + kfull, (size_t)ktail * sizeof(float));
                    }
                    tile_rows(R, VL, xt[0], VL, wk, acc + r * NB, kfull == 0, NULL);
                }
            }
            /* -- lanes summed, bias added, nb columns stored per row -- */
            for (int r = 0; r < mm; r++) {
                g16 *a = acc + r * NB;
                float *yr = y + (long)(m0 + r) * ldy + n0;
                for (int j0 = 0; j0 < nb; j0 += 4) {
                    g4 s = reduce4(a[j0], a[j0 + 1], a[j0 + 2], a[j0 + 3]);
                    for (int j = j0; j < nb && j < j0 + 4; j++)
                        yr[j] = bias ? s[j - j0] + bias[n0 + j] : s[j - j0];
                }
            }
        }
    }
    return 0;
}

int tf_linear_units(int N) { return (N + NB - 1) / NB; }

/* -- the same product with the weight stored K-major: wt[K, N] (row stride ldw) -------------
 *
 * y[m, n] = sum_k x[m, k] * wt[k, n] (+ bias[n]): a matmul by a [K, N] weight (GPT-2's Conv1D,
 * a linear whose weight is kept transposed). Work units are blocks of NCB columns; a call
 * walks its columns KC2 rows of wt at a time (KC2 contiguous runs over the call's columns),
 * in [KC2, 64] tiles (8 KB, L1; the next one prefetched meanwhile) each used by every row
 * of x: register tiles of MB rows by 64 columns (4 vectors), x[m, k] broadcast. Each y[m, n] is one FMA chain over k in order,
 * parked in y between tiles, bias added last: batch invariant with no lane reduction. */

#define NCB 128
#ifndef KC2
#define KC2 32 /* rows of wt per chunk: 32 streams in flight (64 was ~10% slower at M = 1) */
#endif

static inline __attribute__((always_inline)) void tile_kn(const int R, int kn, const float *x, long ldx,
                                                          const float *wt, long ldw, float *y, long ldy,
                                                          int first, const float *pf) {
    g16 c[MB][4];
    for (int r = 0; r < R; r++)
        for (int j = 0; j < 4; j++) c[r][j] = first ? (g16){0} : gload(y + r * ldy + j * VL);
    for (int k = 0; k < kn; k++) {
        const float *wk = wt + (long)k * ldw;
        g16 w0 = gload(wk), w1 = gload(wk + VL), w2 = gload(wk + 2 * VL), w3 = gload(wk + 3 * VL);
        if (pf)
            for (int j = 0; j < 4; j++) __builtin_prefetch(pf + (long)k * ldw + j * VL, 0, 3);
        for (int r = 0; r < R; r++) {
            float xv = x[r * ldx + k];
            g16 xb = {xv, xv, xv, xv, xv, xv, xv, xv, xv, xv, xv, xv, xv, xv, xv, xv};
            c[r][0] += xb * w0; c[r][1] += xb * w1; c[r][2] += xb * w2; c[r][3] += xb * w3;
        }
    }
    for (int r = 0; r < R; r++)
        for (int j = 0; j < 4; j++) *(g16u *)(y + r * ldy + j * VL) = c[r][j];
}

static void tile_kn_rows(int R, int kn, const float *x, long ldx, const float *wt, long ldw,
                         float *y, long ldy, int first, const float *pf) {
    switch (R) {
#if MB >= 4
    case 4: tile_kn(4, kn, x, ldx, wt, ldw, y, ldy, first, pf); break;
#endif
#if MB >= 3
    case 3: tile_kn(3, kn, x, ldx, wt, ldw, y, ldy, first, pf); break;
#endif
    case 2: tile_kn(2, kn, x, ldx, wt, ldw, y, ldy, first, pf); break;
    default: tile_kn(1, kn, x, ldx, wt, ldw, y, ldy, first, pf); break;
    }
}

/* y[m, n] for the columns of blocks [u0, u1) (NCB columns each), walked row chunk by row
 * chunk of wt so that its rows are read as long contiguous runs; a partial last 64 columns
 * (N % 64) run through a zero-padded copy. */
int tf_linear_kn_f32(int M, int N, int K, const float *x, long ldx, const float *wt, long ldw,
                     const float *bias, float *y, long ldy, int u0, int u1) {
    int units = (N + NCB - 1) / NCB;
    if (M < 1 || N < 1 || K < 1 || u0 < 0 || u1 > units || u0 > u1) return 1;
    float wpad[KC2 * 64] __attribute__((aligned(64)));
    float ypad[MB * 64] __attribute__((aligned(64)));
    int c0 = u0 * NCB, c1 = u1 * NCB < N ? u1 * NCB : N;
    for (int k0 = 0; k0 < K; k0 += KC2) {
        int kn = K - k0 < KC2 ? K - k0 : KC2;
        for (int n0 = c0; n0 < c1; n0 += 64) {
            int nw = c1 - n0 < 64 ? c1 - n0 : 64;
            const float *wk = wt + (long)k0 * ldw + n0;
            /* prefetched meanwhile: the next 64 columns, else the next chunk's first */
            const float *pf = n0 + 64 < c1 ? wk + 64 : k0 + KC2 < K ? wt + (long)(k0 + KC2) * ldw + c0 : NULL;
            if (nw < 64) {
                for (int k = 0; k < kn; k++) {
                    memset(wpad + k * 64, 0, 64 * sizeof(float));
                    memcpy(wpad + k * 64, wk + (long)k * ldw, (size_t)nw * sizeof(float));
                }
                for (int r = 0; r < M; r += MB) {
                    int R = M - r < MB ? M - r : MB;
                    for (int i = 0; i < R; i++) {
                        memset(ypad + i * 64, 0, 64 * sizeof(float));
                        if (k0) memcpy(ypad + i * 64, y + (long)(r + i) * ldy + n0, (size_t)nw * sizeof(float));
                    }
                    tile_kn_rows(R, kn, x + (long)r * ldx + k0, ldx, wpad, 64, ypad, 64, k0 == 0, NULL);
                    for (int i = 0; i < R; i++)
                        memcpy(y + (long)(r + i) * ldy + n0, ypad + i * 64, (size_t)nw * sizeof(float));
                }
                continue;
            }
            for (int r = 0; r < M; r += MB)
                tile_kn_rows(M - r < MB ? M - r : MB, kn, x + (long)r * ldx + k0, ldx, wk, ldw,
                             y + (long)r * ldy + n0, ldy, k0 == 0, r == 0 ? pf : NULL);
        }
    }
    if (bias)
        for (int m = 0; m < M; m++)
            for (int n = c0; n < c1; n++) y[(long)m * ldy + n] += bias[n];
    return 0;
}

int tf_linear_kn_units(int N) { return (N + NCB - 1) / NCB; }
