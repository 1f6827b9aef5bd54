/* Weight-only low-bit linear layers for CPU inference: y = x W^T + b, x and y float32.
 *
 * Weights (row-major, one row per output feature, the input padded with zeros to `padded` columns):
 *   int8: w[n, k] = q[n, k] * scale[n]                      q int8 in [-127, 127], scale float32,
 *         the input padded to a multiple of 128
 *   int4: w[n, k] = q[n, k] * scale[n, g] + min[n, g]       q in [0, 15], g = k / group, float16
 *         packed two to a byte in chunks of 128 inputs (64 bytes): byte i of a chunk holds input i
 *         in its low nibble and input 64 + i in its high nibble.
 * Activations are quantized per row and per block (for int8 a multiple of 128 inputs the caller
 * chooses, up to the whole row; for int4 the group) to int8 with a scale of max|x| / 127, and multiplied in integers: VNNI `vpdpbusd` (AVX-512) or
 * `vpmaddubsw` + `vpmaddwd` (AVX2). Each block's integer dot product is exact; it is scaled into a
 * float accumulator per block, so the result is the dot product of the dequantized activations and
 * weights up to float32 rounding.
 *
 * A row's result depends on that row alone: every (row, output) pair goes through the same
 * sequence of operations whatever the number of rows, the tile it falls in, or the thread count.
 *
 * Built by blip2.native with `cc -O3 -ffp-contract=off -fopenmp -shared -fPIC` (no fused
 * multiply-adds but the written ones: every tile instance rounds alike); the instruction sets are chosen per
 * function (target attributes) and the caller picks the kind the CPU has (blip2_lowbit_cpu_kinds).
 */
#include <immintrin.h>
#include <omp.h>
#include <stdint.h>
#include <stdlib.h>
#include <string.h>

#define AVX2 __attribute__((target("avx2,fma,f16c")))
#define AVX512 __attribute__((target("avx512f,avx512bw,avx512vl,avx512vnni,avx2,fma,f16c")))
#define INLINE static inline __attribute__((always_inline))

enum { KIND_AVX2 = 1, KIND_AVX512 = 2 };
enum { INT8_BLOCK = 128, INT4_CHUNK = 128, ROW_CHUNK = 64 };

/* Bit 0: the AVX2 kernels can run here; bit 1: the AVX-512 (VNNI) kernels can. */
int blip2_lowbit_cpu_kinds(void)
{
    __builtin_cpu_init();
    int kinds = 0;
    if (__builtin_cpu_supports("avx2") && __builtin_cpu_supports("fma"))
        kinds |= KIND_AVX2;
    if ((kinds & KIND_AVX2) && __builtin_cpu_supports("avx512f") && __builtin_cpu_supports("avx512bw") &&
        __builtin_cpu_supports("avx512vl") && __builtin_cpu_supports("avx512vnni"))
        kinds |= KIND_AVX512;
    return kinds;
}

/* ---- activations ------------------------------------------------------------------------------ */

typedef struct {
    int8_t *q;      /* (rows, padded) */
    float *scale;   /* (rows, blocks) */
    int32_t *sum;   /* (rows, blocks): sum of q over the block */
} Activations;

/* One row: blocks of `block` inputs (a multiple of 8) to int8, past `in_features` zeros. */
AVX2 static void quantize_row(const float *x, long in_features, long padded, long block, int8_t *q,
                              float *scale, int32_t *sum)
{
    const __m256 sign = _mm256_set1_ps(-0.0f);
    for (long b = 0; b * block < padded; b++) {
        long k0 = b * block, k1 = k0 + block < in_features ? k0 + block : in_features;
        long full = k0 + (k1 > k0 ? (k1 - k0) / 8 * 8 : 0);
        __m256 vmax = _mm256_setzero_ps();
        for (long k = k0; k < full; k += 8)
            vmax = _mm256_max_ps(vmax, _mm256_andnot_ps(sign, _mm256_loadu_ps(x + k)));
        float lanes[8];
        _mm256_storeu_ps(lanes, vmax);
        float amax = 0.0f;
        for (int i = 0; i < 8; i++)
            amax = lanes[i] > amax ? lanes[i] : amax;
        for (long k = full; k < k1; k++) {
            float a = x[k] < 0 ? -x[k] : x[k];
            amax = a > amax ? a : amax;
        }
        float inv = amax > 0.0f ? 127.0f / amax : 0.0f;
        scale[b] = amax / 127.0f;
        const __m256 vinv = _mm256_set1_ps(inv);
        const __m256i lo = _mm256_set1_epi32(-127), hi = _mm256_set1_epi32(127);
        __m256i vsum = _mm256_setzero_si256();
        for (long k = k0; k < full; k += 8) {
            __m256i v = _mm256_cvtps_epi32(_mm256_mul_ps(_mm256_loadu_ps(x + k), vinv)); /* nearest even */
            v = _mm256_min_epi32(_mm256_max_epi32(v, lo), hi);
            vsum = _mm256_add_epi32(vsum, v);
            int32_t ints[8];
            _mm256_storeu_si256((__m256i *)ints, v);
            for (int i = 0; i < 8; i++)
                q[k + i] = (int8_t)ints[i];
        }
        int32_t sums[8];
        _mm256_storeu_si256((__m256i *)sums, vsum);
        int32_t total = 0;
        for (int i = 0; i < 8; i++)
            total += sums[i];
        for (long k = full; k < k1; k++) {
            __m128 v = _mm_set_ss(x[k] * inv);
            int iv = _mm_cvtss_si32(v); /* nearest even, as the vector path */
            iv = iv < -127 ? -127 : (iv > 127 ? 127 : iv);
            q[k] = (int8_t)iv;
            total += iv;
        }
        for (long k = k1 > k0 ? k1 : k0; k < k0 + block; k++)
            q[k] = 0;
        sum[b] = total;
    }
}

static int quantize_activations(const float *x, long rows, long in_features, long padded, long block,
                                Activations *a, int threads)
{
    long blocks = padded / block;
    a->q = aligned_alloc(64, (size_t)((rows * padded + 63) / 64 * 64));
    a->scale = malloc(sizeof(float) * (size_t)(rows * blocks));
    a->sum = malloc(sizeof(int32_t) * (size_t)(rows * blocks));
    if (!a->q || !a->scale || !a->sum)
        return -1;
#pragma omp parallel for num_threads(threads) schedule(static) if (rows > 8)
    for (long r = 0; r < rows; r++)
        quantize_row(x + r * in_features, in_features, padded, block, a->q + r * padded, a->scale + r * blocks,
                     a->sum + r * blocks);
    return 0;
}

static void free_activations(Activations *a)
{
    free(a->q);
    free(a->scale);
    free(a->sum);
}

/* ---- horizontal sums (a fixed order: the same for every tile) --------------------------------------- */

AVX2 INLINE float hsum8(__m256 v)
{
    __m128 s = _mm_add_ps(_mm256_castps256_ps128(v), _mm256_extractf128_ps(v, 1));
    s = _mm_add_ps(s, _mm_movehl_ps(s, s));
    s = _mm_add_ss(s, _mm_movehdup_ps(s));
    return _mm_cvtss_f32(s);
}

AVX512 INLINE float hsum16(__m512 v)
{
    __m256 s = _mm256_add_ps(_mm512_castps512_ps256(v), _mm256_castpd_ps(_mm512_extractf64x4_pd(_mm512_castps_pd(v), 1)));
    __m128 t = _mm_add_ps(_mm256_castps256_ps128(s), _mm256_extractf128_ps(s, 1));
    t = _mm_add_ps(t, _mm_movehl_ps(t, t));
    t = _mm_add_ss(t, _mm_movehdup_ps(t));
    return _mm_cvtss_f32(t);
}

/* int4's minimum term of one (row, output): sum over groups of min[n, g] * scale[r, g] * sum[r, g]. */
AVX2 INLINE float min_term(const uint16_t *mins, const float *scale, const int32_t *sum, long groups)
{
    float z = 0.0f;
    for (long g = 0; g < groups; g++)
        z = __builtin_fmaf(_cvtsh_ss(mins[g]), scale[g] * (float)sum[g], z);
    return z;
}

/* ---- int8 ------------------------------------------------------------------------------------------ */

typedef struct {
    const int8_t *w;
    const float *wscale, *bias;
    long padded, block, out_features;
    float *y;
} Int8Args;

/* AVX-512 VNNI: vpdpbusd takes unsigned bytes on one side; the weights are flipped to w + 128
 * (xor 0x80) and each block's accumulator starts at -128 * sum(x) in one lane, so it ends exact. */
AVX512 INLINE void int8_tile_avx512(const Activations *a, const Int8Args *p, long r0, int rt, long n0, int nt,
                                    const int RT, const int NT)
{
    const long padded = p->padded, block = p->block, blocks = padded / block;
    const __m512i flip = _mm512_set1_epi8((char)0x80);
    __m512 facc[4][2];
    for (int r = 0; r < RT; r++)
        for (int j = 0; j < NT; j++)
            facc[r][j] = _mm512_setzero_ps();
    for (long b = 0; b < blocks; b++) {
        __m512i acc[4][2];
        for (int r = 0; r < RT; r++) {
            long row = r0 + (r < rt ? r : 0);
            __m512i start = _mm512_castsi128_si512(_mm_cvtsi32_si128(-128 * a->sum[row * blocks + b]));
            start = _mm512_maskz_mov_epi32(1, start);
            for (int j = 0; j < NT; j++)
                acc[r][j] = start;
        }
        for (long k = b * block; k < (b + 1) * block; k += 64) {
            __m512i w[2];
            for (int j = 0; j < NT; j++) {
                long n = n0 + (j < nt ? j : 0);
                w[j] = _mm512_xor_si512(_mm512_loadu_si512(p->w + n * padded + k), flip);
                /* the next tile's rows at this offset: a row is a page or less, and the hardware
                 * prefetcher starts over at every page (decode steps read ~2x faster with this) */
                _mm_prefetch((const char *)(p->w + (n + NT) * padded + k), _MM_HINT_T0);
            }
            for (int r = 0; r < RT; r++) {
                long row = r0 + (r < rt ? r : 0);
                __m512i x = _mm512_loadu_si512(a->q + row * padded + k);
                for (int j = 0; j < NT; j++)
                    acc[r][j] = _mm512_dpbusd_epi32(acc[r][j], w[j], x);
            }
        }
        for (int r = 0; r < RT; r++) {
            long row = r0 + (r < rt ? r : 0);
            __m512 s = _mm512_set1_ps(a->scale[row * blocks + b]);
            for (int j = 0; j < NT; j++)
                facc[r][j] = _mm512_fmadd_ps(_mm512_cvtepi32_ps(acc[r][j]), s, facc[r][j]);
        }
    }
    for (int r = 0; r < rt && r < RT; r++)
        for (int j = 0; j < nt && j < NT; j++) {
            long n = n0 + j;
            float v = hsum16(facc[r][j]) * p->wscale[n];
            p->y[(r0 + r) * p->out_features + n] = p->bias ? v + p->bias[n] : v;
        }
}

/* AVX2: vpmaddubsw takes unsigned bytes on one side; |w| against x with w's sign (pairs stay below
 * 2 * 127 * 127, no saturation). */
AVX2 INLINE void int8_tile_avx2(const Activations *a, const Int8Args *p, long r0, int rt, long n0, int nt,
                                const int RT, const int NT)
{
    const long padded = p->padded, block = p->block, blocks = padded / block;
    const __m256i ones = _mm256_set1_epi16(1);
    __m256 facc[2][2];
    for (int r = 0; r < RT; r++)
        for (int j = 0; j < NT; j++)
            facc[r][j] = _mm256_setzero_ps();
    for (long b = 0; b < blocks; b++) {
        __m256i acc[2][2];
        for (int r = 0; r < RT; r++)
            for (int j = 0; j < NT; j++)
                acc[r][j] = _mm256_setzero_si256();
        for (long k = b * block; k < (b + 1) * block; k += 32) {
            __m256i w[2], wabs[2];
            for (int j = 0; j < NT; j++) {
                long n = n0 + (j < nt ? j : 0);
                w[j] = _mm256_loadu_si256((const __m256i *)(p->w + n * padded + k));
                wabs[j] = _mm256_abs_epi8(w[j]);
                if (k % 64 == 0)
                    _mm_prefetch((const char *)(p->w + (n + NT) * padded + k), _MM_HINT_T0);
            }
            for (int r = 0; r < RT; r++) {
                long row = r0 + (r < rt ? r : 0);
                __m256i x = _mm256_loadu_si256((const __m256i *)(a->q + row * padded + k));
                for (int j = 0; j < NT; j++) {
                    __m256i pairs = _mm256_maddubs_epi16(wabs[j], _mm256_sign_epi8(x, w[j]));
                    acc[r][j] = _mm256_add_epi32(acc[r][j], _mm256_madd_epi16(pairs, ones));
                }
            }
        }
        for (int r = 0; r < RT; r++) {
            long row = r0 + (r < rt ? r : 0);
            __m256 s = _mm256_set1_ps(a->scale[row * blocks + b]);
            for (int j = 0; j < NT; j++)
                facc[r][j] = _mm256_fmadd_ps(_mm256_cvtepi32_ps(acc[r][j]), s, facc[r][j]);
        }
    }
    for (int r = 0; r < rt && r < RT; r++)
        for (int j = 0; j < nt && j < NT; j++) {
            long n = n0 + j;
            float v = hsum8(facc[r][j]) * p->wscale[n];
            p->y[(r0 + r) * p->out_features + n] = p->bias ? v + p->bias[n] : v;
        }
}

/* Tiles of RT rows x NT outputs; a smaller edge tile runs the same code with its rows and outputs
 * repeated (their results are not stored), so every stored value took the same operations. */
AVX512 static void int8_tile_avx512_4x2(const Activations *a, const Int8Args *p, long r0, int rt, long n0, int nt)
{
    int8_tile_avx512(a, p, r0, rt, n0, nt, 4, 2);
}

AVX512 static void int8_tile_avx512_1x2(const Activations *a, const Int8Args *p, long r0, int rt, long n0, int nt)
{
    int8_tile_avx512(a, p, r0, rt, n0, nt, 1, 2);
}

AVX2 static void int8_tile_avx2_2x2(const Activations *a, const Int8Args *p, long r0, int rt, long n0, int nt)
{
    int8_tile_avx2(a, p, r0, rt, n0, nt, 2, 2);
}

AVX2 static void int8_tile_avx2_1x2(const Activations *a, const Int8Args *p, long r0, int rt, long n0, int nt)
{
    int8_tile_avx2(a, p, r0, rt, n0, nt, 1, 2);
}

/* ---- int4 ------------------------------------------------------------------------------------------ */

typedef struct {
    const uint8_t *w;
    const uint16_t *scales, *mins;
    const float *bias;
    long padded, group, out_features;
    float *y;
} Int4Args;

AVX512 INLINE void int4_tile_avx512(const Activations *a, const Int4Args *p, long r0, int rt, long n0, int nt,
                                    const int RT, const int NT)
{
    const long padded = p->padded, groups = padded / p->group, row_bytes = padded / 2;
    const __m512i low = _mm512_set1_epi8(0x0F);
    __m512 facc[4][2];
    for (int r = 0; r < RT; r++)
        for (int j = 0; j < NT; j++)
            facc[r][j] = _mm512_setzero_ps();
    for (long g = 0; g < groups; g++) {
        __m512i acc[4][2];
        for (int r = 0; r < RT; r++)
            for (int j = 0; j < NT; j++)
                acc[r][j] = _mm512_setzero_si512();
        for (long k = g * p->group; k < (g + 1) * p->group; k += INT4_CHUNK) {
            __m512i wlo[2], whi[2];
            for (int j = 0; j < NT; j++) {
                long n = n0 + (j < nt ? j : 0);
                __m512i v = _mm512_loadu_si512(p->w + n * row_bytes + k / 2);
                _mm_prefetch((const char *)(p->w + (n + NT) * row_bytes + k / 2), _MM_HINT_T0);
                wlo[j] = _mm512_and_si512(v, low);
                whi[j] = _mm512_and_si512(_mm512_srli_epi16(v, 4), low);
            }
            for (int r = 0; r < RT; r++) {
                long row = r0 + (r < rt ? r : 0);
                const int8_t *xq = a->q + row * padded + k;
                __m512i xlo = _mm512_loadu_si512(xq), xhi = _mm512_loadu_si512(xq + 64);
                for (int j = 0; j < NT; j++)
                    acc[r][j] = _mm512_dpbusd_epi32(_mm512_dpbusd_epi32(acc[r][j], wlo[j], xlo), whi[j], xhi);
            }
        }
        __m512 ws[2];
        for (int j = 0; j < NT; j++) {
            long n = n0 + (j < nt ? j : 0);
            ws[j] = _mm512_set1_ps(_cvtsh_ss(p->scales[n * groups + g]));
        }
        for (int r = 0; r < RT; r++) {
            long row = r0 + (r < rt ? r : 0);
            __m512 xs = _mm512_set1_ps(a->scale[row * groups + g]);
            for (int j = 0; j < NT; j++)
                facc[r][j] = _mm512_fmadd_ps(_mm512_mul_ps(_mm512_cvtepi32_ps(acc[r][j]), xs), ws[j], facc[r][j]);
        }
    }
    for (int r = 0; r < rt && r < RT; r++)
        for (int j = 0; j < nt && j < NT; j++) {
            long n = n0 + j, row = r0 + r;
            float v = hsum16(facc[r][j]) +
                      min_term(p->mins + n * groups, a->scale + row * groups, a->sum + row * groups, groups);
            p->y[row * p->out_features + n] = p->bias ? v + p->bias[n] : v;
        }
}

/* AVX2: 32 bytes of a 64-byte chunk hold inputs k..k+31 (low nibbles) and k+64..k+95 (high). */
AVX2 INLINE void int4_tile_avx2(const Activations *a, const Int4Args *p, long r0, int rt, long n0, int nt,
                                const int RT, const int NT)
{
    const long padded = p->padded, groups = padded / p->group, row_bytes = padded / 2;
    const __m256i low = _mm256_set1_epi8(0x0F), ones = _mm256_set1_epi16(1);
    __m256 facc[2][2];
    for (int r = 0; r < RT; r++)
        for (int j = 0; j < NT; j++)
            facc[r][j] = _mm256_setzero_ps();
    for (long g = 0; g < groups; g++) {
        __m256i acc[2][2];
        for (int r = 0; r < RT; r++)
            for (int j = 0; j < NT; j++)
                acc[r][j] = _mm256_setzero_si256();
        for (long k = g * p->group; k < (g + 1) * p->group; k += INT4_CHUNK) {
            for (int half = 0; half < 2; half++) {
                long kk = k + 32 * half;
                __m256i wlo[2], whi[2];
                for (int j = 0; j < NT; j++) {
                    long n = n0 + (j < nt ? j : 0);
                    __m256i v = _mm256_loadu_si256((const __m256i *)(p->w + n * row_bytes + kk / 2 + 16 * half));
                    if (half == 0)
                        _mm_prefetch((const char *)(p->w + (n + NT) * row_bytes + kk / 2), _MM_HINT_T0);
                    wlo[j] = _mm256_and_si256(v, low);
                    whi[j] = _mm256_and_si256(_mm256_srli_epi16(v, 4), low);
                }
                for (int r = 0; r < RT; r++) {
                    long row = r0 + (r < rt ? r : 0);
                    const int8_t *xq = a->q + row * padded + kk;
                    __m256i xlo = _mm256_loadu_si256((const __m256i *)xq);
                    __m256i xhi = _mm256_loadu_si256((const __m256i *)(xq + 64));
                    for (int j = 0; j < NT; j++) {
                        __m256i pairs = _mm256_add_epi16(_mm256_maddubs_epi16(wlo[j], xlo),
                                                         _mm256_maddubs_epi16(whi[j], xhi));
                        acc[r][j] = _mm256_add_epi32(acc[r][j], _mm256_madd_epi16(pairs, ones));
                    }
                }
            }
        }
        __m256 ws[2];
        for (int j = 0; j < NT; j++) {
            long n = n0 + (j < nt ? j : 0);
            ws[j] = _mm256_set1_ps(_cvtsh_ss(p->scales[n * groups + g]));
        }
        for (int r = 0; r < RT; r++) {
            long row = r0 + (r < rt ? r : 0);
            __m256 xs = _mm256_set1_ps(a->scale[row * groups + g]);
            for (int j = 0; j < NT; j++)
                facc[r][j] = _mm256_fmadd_ps(_mm256_mul_ps(_mm256_cvtepi32_ps(acc[r][j]), xs), ws[j], facc[r][j]);
        }
    }
    for (int r = 0; r < rt && r < RT; r++)
        for (int j = 0; j < nt && j < NT; j++) {
            long n = n0 + j, row = r0 + r;
            float v = hsum8(facc[r][j]) +
                      min_term(p->mins + n * groups, a->scale + row * groups, a->sum + row * groups, groups);
            p->y[row * p->out_features + n] = p->bias ? v + p->bias[n] : v;
        }
}

AVX512 static void int4_tile_avx512_4x2(const Activations *a, const Int4Args *p, long r0, int rt, long n0, int nt)
{
    int4_tile_avx512(a, p, r0, rt, n0, nt, 4, 2);
}

AVX512 static void int4_tile_avx512_1x2(const Activations *a, const Int4Args *p, long r0, int rt, long n0, int nt)
{
    int4_tile_avx512(a, p, r0, rt, n0, nt, 1, 2);
}

AVX2 static void int4_tile_avx2_2x2(const Activations *a, const Int4Args *p, long r0, int rt, long n0, int nt)
{
    int4_tile_avx2(a, p, r0, rt, n0, nt, 2, 2);
}

AVX2 static void int4_tile_avx2_1x2(const Activations *a, const Int4Args *p, long r0, int rt, long n0, int nt)
{
    int4_tile_avx2(a, p, r0, rt, n0, nt, 1, 2);
}

/* ---- the loop over tiles ------------------------------------------------------------------------- */

typedef void (*TileFn)(const Activations *, const void *, long, int, long, int);

/* Outputs are split among threads in pairs; each thread walks its outputs once per chunk of
 * ROW_CHUNK rows (whose activations stay in cache). A single row takes the one-row tile: the
 * same operations as a row of the wide tile, without the repeated rows. */
static void run_tiles(const Activations *a, const void *p, long rows, long out_features, TileFn wide, int wide_rows,
                      TileFn single, int threads)
{
    const long pairs = (out_features + 1) / 2;
#pragma omp parallel num_threads(threads)
    {
        int t = omp_get_thread_num(), nth = omp_get_num_threads();
        long first = pairs * t / nth * 2, last = pairs * (t + 1) / nth * 2;
        if (last > out_features)
            last = out_features;
        for (long c = 0; c < rows; c += ROW_CHUNK) {
            long c_end = c + ROW_CHUNK < rows ? c + ROW_CHUNK : rows;
            for (long n = first; n < last; n += 2) {
                int nt = last - n < 2 ? (int)(last - n) : 2;
                long r = c;
                for (; r + wide_rows <= c_end; r += wide_rows)
                    wide(a, p, r, wide_rows, n, nt);
                for (; r < c_end; r++)
                    single(a, p, r, 1, n, nt);
            }
        }
    }
}

/* y (rows, out_features) = x (rows, in_features) W^T + bias. kind: KIND_AVX2 or KIND_AVX512.
 * Returns 0, or -1 for sizes the layout does not allow, -2 when memory runs out. */
int blip2_int8_linear(int kind, const float *x, long rows, long in_features, long padded, long block,
                      const int8_t *w, const float *wscale, const float *bias, long out_features, float *y,
                      int threads)
{
    if (rows < 0 || in_features <= 0 || padded < in_features || padded % INT8_BLOCK || block <= 0 ||
        block % INT8_BLOCK || padded % block || out_features <= 0)
        return -1;
    if (rows == 0)
        return 0;
    Activations a = {0};
    if (quantize_activations(x, rows, in_features, padded, block, &a, threads)) {
        free_activations(&a);
        return -2;
    }
    Int8Args p = {w, wscale, bias, padded, block, out_features, y};
    if (kind == KIND_AVX512)
        run_tiles(&a, &p, rows, out_features, (TileFn)int8_tile_avx512_4x2, 4, (TileFn)int8_tile_avx512_1x2, threads);
    else
        run_tiles(&a, &p, rows, out_features, (TileFn)int8_tile_avx2_2x2, 2, (TileFn)int8_tile_avx2_1x2, threads);
    free_activations(&a);
    return 0;
}

int blip2_int4_linear(int kind, const float *x, long rows, long in_features, long padded, long group,
                      const uint8_t *w, const uint16_t *scales, const uint16_t *mins, const float *bias,
                      long out_features, float *y, int threads)
{
    if (rows < 0 || in_features <= 0 || group <= 0 || group % INT4_CHUNK || padded < in_features ||
        padded % group || out_features <= 0)
        return -1;
    if (rows == 0)
        return 0;
    Activations a = {0};
    if (quantize_activations(x, rows, in_features, padded, group, &a, threads)) {
        free_activations(&a);
        return -2;
    }
    Int4Args p = {w, scales, mins, bias, padded, group, out_features, y};
    if (kind == KIND_AVX512)
        run_tiles(&a, &p, rows, out_features, (TileFn)int4_tile_avx512_4x2, 4, (TileFn)int4_tile_avx512_1x2, threads);
    else
        run_tiles(&a, &p, rows, out_features, (TileFn)int4_tile_avx2_2x2, 2, (TileFn)int4_tile_avx2_1x2, threads);
    free_activations(&a);
    return 0;
}
