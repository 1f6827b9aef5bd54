/* y = x W^T + b in float32, for any number of rows of x: every linear layer of float32 inference.
 *
 * Every output element is one dot product of an input row with a row of the row-major weight: VEC
 * lanes of partial sums over in_features (lane l takes the k = l (mod LANES), k ascending, one fused
 * multiply-add each, a zero-filled masked load for the tail), then one fixed reduction tree. Nothing
 * of that depends on the row count, the tile an element falls in, or the thread count, so a row's
 * result is the same bits alone or in any batch; BLAS kernels pick their blocking (and so their
 * summation order) by the shape of the whole call.
 *
 * A tile holds WEIGHT_ROWS weight rows against up to INPUT_ROWS input rows in registers: with a few
 * rows (a decode step) every weight element is loaded once and used for all of them, at nearly the
 * memory bandwidth. With many rows (image encoder, prefill) output columns go in blocks whose weight
 * rows stay in the L2 cache while all input rows pass by, INPUT_ROWS at a time (held in L1). Columns
 * are split between OpenMP threads.
 *
 * Built by blip2.native either with -mavx2 -mfma (8 lanes, 3 x 4 tiles in 16 registers) or with
 * -mavx512f (16 lanes, 4 x 6 tiles in 32 registers): one kind per process, chosen by the CPU.
 */
#include <immintrin.h>
#include <omp.h>

#ifdef __AVX512F__
#define LANES 16
#define WEIGHT_ROWS 4
#define INPUT_ROWS 6
typedef __m512 vec;
typedef __mmask16 tail_mask;
#define vzero() _mm512_setzero_ps()
#define vload(p) _mm512_loadu_ps(p)
#define vload_tail(p, mask) _mm512_maskz_loadu_ps(mask, p)
#define vfma(a, b, c) _mm512_fmadd_ps(a, b, c)
static inline tail_mask make_tail_mask(long tail) { return (tail_mask)((1u << tail) - 1u); }
#else
#define LANES 8
#define WEIGHT_ROWS 3
#define INPUT_ROWS 4
typedef __m256 vec;
typedef __m256i tail_mask;
#define vzero() _mm256_setzero_ps()
#define vload(p) _mm256_loadu_ps(p)
#define vload_tail(p, mask) _mm256_maskload_ps(p, mask)
#define vfma(a, b, c) _mm256_fmadd_ps(a, b, c)
static inline tail_mask make_tail_mask(long tail) {
    return _mm256_cmpgt_epi32(_mm256_set1_epi32((int)tail), _mm256_setr_epi32(0, 1, 2, 3, 4, 5, 6, 7));
}
#endif

/* in_features is summed in chunks of CHUNK (a multiple of LANES): an input tile's chunk stays in L1
 * while weight tiles pass. Each chunk's partial sum is reduced and added to y in chunk order. */
#ifndef CHUNK
#define CHUNK 1024
#endif
/* With more than INPUT_ROWS rows, output columns go in blocks of this many bytes of weight per chunk,
 * kept in L2 while every input row passes by. */
#ifndef BLOCK_BYTES
#define BLOCK_BYTES (512 * 1024)
#endif

/* The lane sums of 4 accumulators, each by the same tree (v[l] + v[l + LANES/2], halving again). */
static inline __m128 reduce4(vec a, vec b, vec c, vec d) {
#ifdef __AVX512F__
    /* 128-bit quarters: ab = [a0+a2, a1+a3, b0+b2, b1+b3], then s = [a, b, c, d] summed to 4 lanes each */
    vec ab = _mm512_add_ps(_mm512_shuffle_f32x4(a, b, 0x44), _mm512_shuffle_f32x4(a, b, 0xEE));
    vec cd = _mm512_add_ps(_mm512_shuffle_f32x4(c, d, 0x44), _mm512_shuffle_f32x4(c, d, 0xEE));
    vec s = _mm512_add_ps(_mm512_shuffle_f32x4(ab, cd, 0x88), _mm512_shuffle_f32x4(ab, cd, 0xDD));
    s = _mm512_add_ps(s, _mm512_permute_ps(s, 0x4E)); /* lanes 0, 1 of each quarter: q0+q2, q1+q3 */
    s = _mm512_add_ps(s, _mm512_permute_ps(s, 0xB1)); /* lane 0: (q0+q2) + (q1+q3) */
    return _mm512_castps512_ps128(_mm512_permutexvar_ps(_mm512_setr_epi32(0, 4, 8, 12, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0), s));
#else
    __m256 ab = _mm256_add_ps(_mm256_permute2f128_ps(a, b, 0x20), _mm256_permute2f128_ps(a, b, 0x31));
    __m256 cd = _mm256_add_ps(_mm256_permute2f128_ps(c, d, 0x20), _mm256_permute2f128_ps(c, d, 0x31));
    /* ab = [a_l + a_(l+4) | b_l + b_(l+4)]; then l + 2, then l + 1 */
    __m256 s = _mm256_add_ps(_mm256_shuffle_ps(ab, cd, 0x44), _mm256_shuffle_ps(ab, cd, 0xEE));
    s = _mm256_add_ps(_mm256_shuffle_ps(s, s, 0x88), _mm256_shuffle_ps(s, s, 0xDD));
    /* s = [a, c, a, c | b, d, b, d] */
    __m128 lo = _mm256_castps256_ps128(s), hi = _mm256_extractf128_ps(s, 1);
    return _mm_unpacklo_ps(lo, hi);
#endif
}

/* The first n (1-4) floats at p, and back. */
static inline __m128 load4(const float *p, int n) {
    return n == 4 ? _mm_loadu_ps(p) : _mm_maskload_ps(p, _mm_cmpgt_epi32(_mm_set1_epi32(n), _mm_setr_epi32(0, 1, 2, 3)));
}
static inline void store4(float *p, __m128 v, int n) {
    if (n == 4)
        _mm_storeu_ps(p, v);
    else
        _mm_maskstore_ps(p, _mm_cmpgt_epi32(_mm_set1_epi32(n), _mm_setr_epi32(0, 1, 2, 3)), v);
}

/* y[i, j] (+)= x[i, k0:k1] . w[j, k0:k1] for MR input rows and NR weight rows; y = the first chunk's
 * sum, later chunks add theirs; bias (non-NULL with the last chunk only) is added last. */
#define DEFINE_TILE(MR, NR)                                                                           \
    static void tile_##MR##_##NR(const float *x, const float *w, long in_features, long k0, long k1,  \
                                 tail_mask mask, const float *bias, float *y, long out_features) {     \
        vec acc[MR][NR];                                                                               \
        _Pragma("GCC unroll 8") for (int i = 0; i < MR; i++)                                          \
            _Pragma("GCC unroll 8") for (int j = 0; j < NR; j++) acc[i][j] = vzero();                 \
        long k = k0;                                                                                   \
        for (; k + LANES <= k1; k += LANES) {                                                          \
            vec wk[NR];                                                                                \
            _Pragma("GCC unroll 8") for (int j = 0; j < NR; j++) wk[j] = vload(w + j * in_features + k); \
            _Pragma("GCC unroll 8") for (int i = 0; i < MR; i++) {                                    \
                vec xk = vload(x + i * in_features + k);                                               \
                _Pragma("GCC unroll 8") for (int j = 0; j < NR; j++) acc[i][j] = vfma(xk, wk[j], acc[i][j]); \
            }                                                                                          \
        }                                                                                              \
        if (k < k1) {                                                                                  \
            vec wk[NR];                                                                                \
            _Pragma("GCC unroll 8") for (int j = 0; j < NR; j++)                                      \
                wk[j] = vload_tail(w + j * in_features + k, mask);                                     \
            _Pragma("GCC unroll 8") for (int i = 0; i < MR; i++) {                                    \
                vec xk = vload_tail(x + i * in_features + k, mask);                                    \
                _Pragma("GCC unroll 8") for (int j = 0; j < NR; j++) acc[i][j] = vfma(xk, wk[j], acc[i][j]); \
            }                                                                                          \
        }                                                                                              \
        _Pragma("GCC unroll 8") for (int i = 0; i < MR; i++) {                                        \
            vec g[4];                                                                                  \
            _Pragma("GCC unroll 4") for (int j = 0; j < 4; j++) g[j] = j < NR ? acc[i][j % NR] : vzero(); \
            __m128 v = reduce4(g[0], g[1], g[2], g[3]);                                                \
            float *row = y + i * out_features;                                                         \
            if (k0) v = _mm_add_ps(load4(row, NR), v);                                                 \
            if (bias) v = _mm_add_ps(v, load4(bias, NR));                                              \
            store4(row, v, NR);                                                                        \
        }                                                                                              \
    }

#define DEFINE_TILES_OF(MR) DEFINE_TILE(MR, 1) DEFINE_TILE(MR, 2) DEFINE_TILE(MR, 3)
DEFINE_TILES_OF(1) DEFINE_TILES_OF(2) DEFINE_TILES_OF(3) DEFINE_TILES_OF(4)
#if WEIGHT_ROWS == 4
DEFINE_TILE(1, 4) DEFINE_TILE(2, 4) DEFINE_TILE(3, 4) DEFINE_TILE(4, 4)
#define ROW_OF_4(MR) , tile_##MR##_4
#else
#define ROW_OF_4(MR)
#endif
#if INPUT_ROWS == 6
DEFINE_TILES_OF(5) DEFINE_TILES_OF(6)
#if WEIGHT_ROWS == 4
DEFINE_TILE(5, 4) DEFINE_TILE(6, 4)
#endif
#endif

typedef void (*tile_fn)(const float *, const float *, long, long, long, tail_mask, const float *, float *, long);

#define TILE_ROW(MR) {tile_##MR##_1, tile_##MR##_2, tile_##MR##_3 ROW_OF_4(MR)}
static const tile_fn TILES[INPUT_ROWS][WEIGHT_ROWS] = {
    TILE_ROW(1), TILE_ROW(2), TILE_ROW(3), TILE_ROW(4),
#if INPUT_ROWS == 6
    TILE_ROW(5), TILE_ROW(6),
#endif
};

static inline long min_long(long a, long b) { return a < b ? a : b; }

/* Output columns [first, last) for all rows. The loop order only schedules: every element gets the
 * same chunks in the same order whatever it is. */
static void columns(const float *x, long rows, long in_features, const float *weight, const float *bias,
                    float *y, long out_features, long first, long last) {
    tail_mask mask = make_tail_mask(in_features % LANES);
    /* A few rows: one weight tile at a time, read once from memory. More: a block of weight tiles
     * per chunk stays in L2 while all rows pass. */
    long block = WEIGHT_ROWS;
    if (rows > INPUT_ROWS) {
        block = BLOCK_BYTES / ((long)sizeof(float) * min_long(in_features, CHUNK)) / WEIGHT_ROWS * WEIGHT_ROWS;
        if (block < WEIGHT_ROWS) block = WEIGHT_ROWS;
    }
    for (long start = first; start < last; start += block) {
        long end = min_long(start + block, last);
        for (long k0 = 0; k0 < in_features; k0 += CHUNK) {
            long k1 = min_long(k0 + CHUNK, in_features);
            const float *chunk_bias = k1 == in_features && bias ? bias : 0;
            for (long r = 0; r < rows; r += INPUT_ROWS) {
                long mr = min_long(rows - r, INPUT_ROWS);
                for (long n = start; n < end; n += WEIGHT_ROWS) {
                    long nr = min_long(end - n, WEIGHT_ROWS);
                    TILES[mr - 1][nr - 1](x + r * in_features, weight + n * in_features, in_features, k0, k1,
                                          mask, chunk_bias ? chunk_bias + n : 0, y + r * out_features + n,
                                          out_features);
                }
            }
        }
    }
}

/* x: rows x in_features, weight: out_features x in_features, bias: out_features or NULL,
 * y: rows x out_features; all contiguous. Returns 0, or -1 for a negative or zero size. */
int blip2_skinny_linear(const float *x, long rows, long in_features, const float *weight, const float *bias,
                        long out_features, float *y, int threads) {
    if (in_features < 1 || rows < 0 || out_features < 0) return -1;
    long tiles = (out_features + WEIGHT_ROWS - 1) / WEIGHT_ROWS;
    if (threads < 1) threads = 1;
    if (threads > tiles) threads = (int)(tiles > 0 ? tiles : 1);
#pragma omp parallel num_threads(threads)
    {
        int thread = omp_get_thread_num(), team = omp_get_num_threads();
        long per_thread = (tiles + team - 1) / team * WEIGHT_ROWS;
        long first = thread * per_thread;
        long last = min_long(first + per_thread, out_features);
        if (first < last) columns(x, rows, in_features, weight, bias, y, out_features, first, last);
    }
    return 0;
}
