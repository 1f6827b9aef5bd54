/* y = x W^T + b in float32 for a few rows of x: the shape of a decode step.
 *
 * With 1-8 rows a linear layer is bound by reading W. BLAS kernels are built for many rows: MKL's
 * sgemm copies W into a packed layout on every call, oneDNN's small-M kernel reaches about half of
 * the memory bandwidth. Here every output element is one dot product over W's row-major rows, read
 * once: a tile of 3 weight rows is held against up to 4 input rows (12 of the 16 AVX2 registers
 * accumulate), and more input rows reuse the same tile from cache. Columns are split between
 * OpenMP threads; the summation order of an element does not depend on the thread count or on how
 * many rows come along, so a row's result is the same alone or in a batch.
 *
 * Built with -O3 -mavx2 -mfma -fopenmp by blip2.native on first use; in_features must be a multiple
 * of 8 (the caller checks).
 */
#include <immintrin.h>
#include <omp.h>

#define WEIGHT_ROWS 3 /* weight rows per tile */
#define INPUT_ROWS 4  /* input rows per tile */

static inline float horizontal_sum(__m256 v) {
    __m128 s = _mm_add_ps(_mm256_castps256_ps128(v), _mm256_extractf128_ps(v, 1));
    s = _mm_add_ps(s, _mm_movehl_ps(s, s));
    s = _mm_add_ss(s, _mm_shuffle_ps(s, s, 1));
    return _mm_cvtss_f32(s);
}

/* y[i, j] (+)= x[i, :] . w[j, :] for MR input rows and NR weight rows. */
#define DEFINE_TILE(MR, NR)                                                                         \
    static void tile_##MR##_##NR(const float *x, long in_features, const float *w, const float *bias, \
                                 float *y, long out_features) {                                      \
        __m256 acc[MR][NR];                                                                          \
        _Pragma("GCC unroll 4") for (int i = 0; i < MR; i++)                                        \
            _Pragma("GCC unroll 4") for (int j = 0; j < NR; j++) acc[i][j] = _mm256_setzero_ps();   \
        for (long k = 0; k < in_features; k += 8) {                                                  \
            __m256 wk[NR];                                                                           \
            _Pragma("GCC unroll 4") for (int j = 0; j < NR; j++)                                    \
                wk[j] = _mm256_loadu_ps(w + j * in_features + k);                                    \
            _Pragma("GCC unroll 4") for (int i = 0; i < MR; i++) {                                  \
                __m256 xk = _mm256_loadu_ps(x + i * in_features + k);                               \
                _Pragma("GCC unroll 4") for (int j = 0; j < NR; j++)                                \
                    acc[i][j] = _mm256_fmadd_ps(xk, wk[j], acc[i][j]);                               \
            }                                                                                        \
        }                                                                                            \
        _Pragma("GCC unroll 4") for (int i = 0; i < MR; i++)                                        \
            _Pragma("GCC unroll 4") for (int j = 0; j < NR; j++) {                                  \
                float v = horizontal_sum(acc[i][j]);                                                 \
                y[i * out_features + j] = bias ? v + bias[j] : v;                                    \
            }                                                                                        \
    }

DEFINE_TILE(1, 1) DEFINE_TILE(1, 2) DEFINE_TILE(1, 3)
DEFINE_TILE(2, 1) DEFINE_TILE(2, 2) DEFINE_TILE(2, 3)
DEFINE_TILE(3, 1) DEFINE_TILE(3, 2) DEFINE_TILE(3, 3)
DEFINE_TILE(4, 1) DEFINE_TILE(4, 2) DEFINE_TILE(4, 3)

typedef void (*tile_fn)(const float *, long, const float *, const float *, float *, long);

static const tile_fn TILES[INPUT_ROWS][WEIGHT_ROWS] = {
    {tile_1_1, tile_1_2, tile_1_3},
    {tile_2_1, tile_2_2, tile_2_3},
    {tile_3_1, tile_3_2, tile_3_3},
    {tile_4_1, tile_4_2, tile_4_3},
};

/* Output columns [first, last) for all rows. */
static void columns(const float *x, long rows, long in_features, const float *weight, const float *bias,
                    float *y, long out_features, long first, long last) {
    for (long n = first; n < last; n += WEIGHT_ROWS) {
        long nr = last - n < WEIGHT_ROWS ? last - n : WEIGHT_ROWS;
        for (long r = 0; r < rows; r += INPUT_ROWS) {
            long mr = rows - r < INPUT_ROWS ? rows - r : INPUT_ROWS;
            TILES[mr - 1][nr - 1](x + r * in_features, in_features, weight + n * in_features,
                                  bias ? bias + n : 0, y + r * out_features + n, out_features);
        }
    }
}

/* x: rows x in_features, weight: out_features x in_features, bias: out_features or NULL,
 * y: rows x out_features; all contiguous. Returns 0, or -1 if in_features is not a multiple of 8. */
int blip2_skinny_linear(const float *x, long rows, long in_features, const float *weight, const float *bias,
                        long out_features, float *y, int threads) {
    if (in_features % 8 != 0 || rows < 0 || out_features < 0) return -1;
    long tiles = (out_features + WEIGHT_ROWS - 1) / WEIGHT_ROWS;
    if (threads < 1) threads = 1;
    if (threads > tiles) threads = (int)(tiles > 0 ? tiles : 1);
#pragma omp parallel num_threads(threads)
    {
        int thread = omp_get_thread_num(), team = omp_get_num_threads();
        long per_thread = (tiles + team - 1) / team * WEIGHT_ROWS;
        long first = thread * per_thread;
        long last = first + per_thread < out_features ? first + per_thread : out_features;
        if (first < last) columns(x, rows, in_features, weight, bias, y, out_features, first, last);
    }
    return 0;
}
