/* Weight-only low-bit linear layers for CPU inference: y = x W^T + b, x and y float32.
 *
 * Weights are stored in blocks of 16 outputs (rows of W), the outputs padded with zero rows to a
 * multiple of 16 and the inputs with zeros to `padded` (a multiple of 128). Within a block, each
 * 64-byte vector holds a few inputs of all 16 outputs: 4 bytes per output ("lane"), so that one
 * `vpdpbusd` multiplies 4 inputs of one row of x (broadcast) with 16 outputs at once.
 *   int8: vector v of block B holds w[16B + i][4v + b] at byte 4i + b;
 *         w = q * scale[n], q in [-127, 127], scale float32 (one per output).
 *   int4: vector v of block B holds, at byte 4i + b, w[16B + i][8v + b] in the low nibble and
 *         w[16B + i][8v + 4 + b] in the high one; w = q * scale + min, q in [0, 15], scale and min
 *         float16 per output and group of `group` inputs (a multiple of 128), stored per block:
 *         [block][group][16 outputs].
 * The input is quantized per row and per block of 128 inputs (int8) or per group (int4) to int8
 * with a scale of max|x| / 127 (rounded half to even), and multiplied in integers: AVX-512 VNNI
 * `vpdpbusd`, or AVX2 `vpmaddubsw` + `vpmaddwd`. Each block's integer dot product is exact; it is
 * scaled into a float accumulator per block, so the result is the product of the dequantized input
 * and weights up to float32 rounding.
 *
 * A row's result depends on that row alone: every (row, output) pair goes through the same
 * operations whatever the number of rows, the tile it falls in, or the thread count.
 *
 * Built by blip2.native with `cc -O3 -ffp-contract=off -fopenmp -shared -fPIC` (no fused
 * multiply-adds but the written ones: every tile instance rounds alike); the instruction sets are
 * chosen per function (target attributes) and the caller picks the kind the CPU has.
 */
#include <immintrin.h>
#include <omp.h>
#include <pthread.h>
#include <float.h>
#include <math.h>
#include <stdint.h>
#include <stdlib.h>
#include <string.h>

#define AVX2 __attribute__((target("avx2,fma,f16c")))
#define AVX512 __attribute__((target("avx512f,avx512bw,avx512vl,avx512vnni,avx2,fma,f16c")))
#define INLINE static inline __attribute__((always_inline))

enum { KIND_AVX2 = 1, KIND_AVX512 = 2 };
enum { LANES = 16, INT8_BLOCK = 128, INT4_CHUNK = 128, ROW_CHUNK = 64 };

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
    int8_t *q;     /* (rows, padded) */
    float *scale;  /* (rows, blocks) */
    int32_t *sum;  /* (rows, blocks): sum of q over the block */
    long padded, blocks;
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
        long k = k0;
        /* 32 at a time: packed to bytes with saturation (the clamp keeps them in [-127, 127]), the
         * in-lane packing's order undone by one permutation */
        const __m256i order = _mm256_setr_epi32(0, 4, 1, 5, 2, 6, 3, 7);
        for (; k + 32 <= full; k += 32) {
            __m256i v[4];
            for (int i = 0; i < 4; i++) {
                v[i] = _mm256_cvtps_epi32(_mm256_mul_ps(_mm256_loadu_ps(x + k + 8 * i), vinv)); /* nearest even */
                v[i] = _mm256_min_epi32(_mm256_max_epi32(v[i], lo), hi);
                vsum = _mm256_add_epi32(vsum, v[i]);
            }
            __m256i bytes = _mm256_packs_epi16(_mm256_packs_epi32(v[0], v[1]), _mm256_packs_epi32(v[2], v[3]));
            _mm256_storeu_si256((__m256i *)(q + k), _mm256_permutevar8x32_epi32(bytes, order));
        }
        for (; k < full; k += 8) {
            __m256i v = _mm256_cvtps_epi32(_mm256_mul_ps(_mm256_loadu_ps(x + k), vinv));
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
            int iv = _mm_cvtss_si32(_mm_set_ss(x[k] * inv)); /* nearest even, as the vector path */
            iv = iv < -127 ? -127 : (iv > 127 ? 127 : iv);
            q[k] = (int8_t)iv;
            total += iv;
        }
        for (long k = k1 > k0 ? k1 : k0; k < k0 + block; k++)
            q[k] = 0;
        sum[b] = total;
    }
}

/* The quantized activations live in one buffer per calling thread, kept between calls (a decode step
 * makes ~150 calls of a few KB each: malloc and free cost as much as a small layer's work); one larger
 * than KEEP_BYTES is given back after its call. */
enum { KEEP_BYTES = 1 << 20 };
static pthread_key_t scratch_key;
static pthread_once_t scratch_once = PTHREAD_ONCE_INIT;

static void make_scratch_key(void)
{
    pthread_key_create(&scratch_key, free);
}

static void *scratch_buffer(size_t size)
{
    if (size > KEEP_BYTES)
        return aligned_alloc(64, size);
    pthread_once(&scratch_once, make_scratch_key);
    void *p = pthread_getspecific(scratch_key);
    if (!p && (p = aligned_alloc(64, KEEP_BYTES)) && pthread_setspecific(scratch_key, p)) {
        free(p);
        return NULL;
    }
    return p;
}

static void release_scratch(void *p, size_t size)
{
    if (size > KEEP_BYTES)
        free(p);
}

static size_t activations_bytes(long rows, long padded, long block)
{
    return (size_t)((rows * padded + 63) / 64 * 64) + 2 * sizeof(float) * (size_t)(rows * (padded / block));
}

static int quantize_activations(const float *x, long rows, long in_features, long padded, long block,
                                Activations *a, int threads)
{
    a->padded = padded;
    a->blocks = padded / block;
    char *buffer = scratch_buffer(activations_bytes(rows, padded, block));
    if (!buffer)
        return -1;
    a->q = (int8_t *)buffer;
    a->scale = (float *)(buffer + (rows * padded + 63) / 64 * 64);
    a->sum = (int32_t *)(a->scale + rows * a->blocks);
    if (rows <= 8) { /* outside OpenMP: an `if (rows > 8)` clause still enters its runtime on every call */
        for (long r = 0; r < rows; r++)
            quantize_row(x + r * in_features, in_features, padded, block, a->q + r * padded,
                         a->scale + r * a->blocks, a->sum + r * a->blocks);
        return 0;
    }
#pragma omp parallel for num_threads(threads) schedule(static)
    for (long r = 0; r < rows; r++)
        quantize_row(x + r * in_features, in_features, padded, block, a->q + r * padded, a->scale + r * a->blocks,
                     a->sum + r * a->blocks);
    return 0;
}

/* 4 quantized inputs of a row, as one 32-bit word (to broadcast to every lane) */
INLINE int32_t four(const int8_t *q)
{
    int32_t v;
    memcpy(&v, q, 4);
    return v;
}

typedef struct {
    const void *w;           /* packed blocks */
    const float *wscale;     /* int8: (out_features,) */
    const uint16_t *scales;  /* int4: (blocks, groups, 16) */
    const uint16_t *mins;
    const float *bias;       /* (out_features,) or NULL */
    long out_features, group;
    float *y;                /* (rows, out_features) */
} Layer;

/* int4, tiles of several blocks: the scales and minimums of their `nb` blocks from b0 (contiguous),
 * all requested before the first group's are needed (read a group at a time as they are used, these
 * two small streams slowed 8-row passes by ~8%). */
INLINE void prefetch_group_params(const Layer *p, long b0, int nb, long groups)
{
    const char *scales = (const char *)(p->scales + b0 * groups * LANES);
    const char *mins = (const char *)(p->mins + b0 * groups * LANES);
    for (long k = 0; k < nb * groups * LANES * 2; k += 64) {
        _mm_prefetch(scales + k, _MM_HINT_T0);
        _mm_prefetch(mins + k, _MM_HINT_T0);
    }
}

/* ---- AVX-512 VNNI ------------------------------------------------------------------------------------ */

/* Stores 16 outputs of a row (fewer at the end of the layer), with the bias. */
AVX512 INLINE void store16(const Layer *p, long row, long n0, __m512 v)
{
    long valid = p->out_features - n0;
    __mmask16 m = valid >= LANES ? (__mmask16)0xFFFF : (__mmask16)((1u << valid) - 1);
    if (p->bias)
        v = _mm512_add_ps(v, _mm512_maskz_loadu_ps(m, p->bias + n0));
    _mm512_mask_storeu_ps(p->y + row * p->out_features + n0, m, v);
}

/* The 4 x 4 tiles' inner loops (8 rows and more: image encoder, prefill) are written out with their 16
 * integer accumulators named one by one, and vpdpbusd as inline assembly that accumulates in place:
 * from arrays of accumulators and the intrinsic, GCC 12 makes register copies and stack spills on every
 * vector, and these tiles ran at ~60 % of the machine's vpdpbusd rate (int8 ~1.6x slower, int4 ~1.2x,
 * than written out). The float sums live in memory between blocks for the same reason. */
#define DPBUSD(acc, w, x) __asm__("vpdpbusd %2, %1, %0" : "+v"(acc) : "v"(w), "v"(x))
#define DOT_ROW(r, xv, w0, w1, w2, w3) \
    {                                  \
        __m512i xb = xv;               \
        DPBUSD(acc##r##0, w0, xb);     \
        DPBUSD(acc##r##1, w1, xb);     \
        DPBUSD(acc##r##2, w2, xb);     \
        DPBUSD(acc##r##3, w3, xb);     \
    }
#define ACC_ROW(r, start) __m512i acc##r##0 = start, acc##r##1 = start, acc##r##2 = start, acc##r##3 = start;
#define SAVE_ROW(r)                           \
    _mm512_store_si512(acc[r][0], acc##r##0); \
    _mm512_store_si512(acc[r][1], acc##r##1); \
    _mm512_store_si512(acc[r][2], acc##r##2); \
    _mm512_store_si512(acc[r][3], acc##r##3);

/* int8: vpdpbusd takes unsigned bytes on one side; the weights are flipped to w + 128 (xor 0x80) and
 * each block's accumulators start at -128 * sum(x), so they end exact. */
AVX512 INLINE void int8_block_4x4(const int8_t *const *wb, const int8_t *const *xr, long v0, long v1,
                                  const int32_t *start, int32_t acc[4][4][LANES])
{
    const __m512i flip = _mm512_set1_epi8((char)0x80);
    const int8_t *w0 = wb[0], *w1 = wb[1], *w2 = wb[2], *w3 = wb[3];
    const int8_t *x0 = xr[0], *x1 = xr[1], *x2 = xr[2], *x3 = xr[3];
    ACC_ROW(0, _mm512_set1_epi32(start[0]))
    ACC_ROW(1, _mm512_set1_epi32(start[1]))
    ACC_ROW(2, _mm512_set1_epi32(start[2]))
    ACC_ROW(3, _mm512_set1_epi32(start[3]))
    for (long v = v0; v < v1; v++) {
        __m512i l0 = _mm512_xor_si512(_mm512_loadu_si512(w0 + v * 64), flip);
        __m512i l1 = _mm512_xor_si512(_mm512_loadu_si512(w1 + v * 64), flip);
        __m512i l2 = _mm512_xor_si512(_mm512_loadu_si512(w2 + v * 64), flip);
        __m512i l3 = _mm512_xor_si512(_mm512_loadu_si512(w3 + v * 64), flip);
        DOT_ROW(0, _mm512_set1_epi32(four(x0 + 4 * v)), l0, l1, l2, l3)
        DOT_ROW(1, _mm512_set1_epi32(four(x1 + 4 * v)), l0, l1, l2, l3)
        DOT_ROW(2, _mm512_set1_epi32(four(x2 + 4 * v)), l0, l1, l2, l3)
        DOT_ROW(3, _mm512_set1_epi32(four(x3 + 4 * v)), l0, l1, l2, l3)
    }
    SAVE_ROW(0) SAVE_ROW(1) SAVE_ROW(2) SAVE_ROW(3)
}

AVX512 INLINE void int8_tile_avx512(const Activations *a, const Layer *p, long r0, int rt, long b0, int nb,
                                    const int RT, const int NB)
{
    const long padded = a->padded, vectors = padded / 4, per_block = INT8_BLOCK / 4;
    const __m512i flip = _mm512_set1_epi8((char)0x80);
    const int8_t *wb[4];
    const int8_t *xr[4];
    long rowi[4];
    for (int j = 0; j < NB; j++)
        wb[j] = (const int8_t *)p->w + (b0 + (j < nb ? j : 0)) * vectors * 64;
    for (int r = 0; r < RT; r++) {
        rowi[r] = r0 + (r < rt ? r : 0);
        xr[r] = a->q + rowi[r] * padded;
    }
    const long ahead = NB * vectors * 64;
    float facc[4][4][LANES] __attribute__((aligned(64)));
    for (int r = 0; r < RT; r++)
        for (int j = 0; j < NB; j++)
            _mm512_store_ps(facc[r][j], _mm512_setzero_ps());
    for (long b = 0; b < a->blocks; b++) {
        int32_t acc[4][4][LANES] __attribute__((aligned(64)));
        int32_t start[4];
        for (int r = 0; r < RT; r++)
            start[r] = -128 * a->sum[rowi[r] * a->blocks + b];
        if (RT == 4 && NB == 4) {
            int8_block_4x4(wb, xr, b * per_block, (b + 1) * per_block, start, acc);
        } else {
            __m512i iacc[4][4];
            for (int r = 0; r < RT; r++)
                for (int j = 0; j < NB; j++)
                    iacc[r][j] = _mm512_set1_epi32(start[r]);
            for (long v = b * per_block; v < (b + 1) * per_block; v++) {
                __m512i wv[4];
                for (int j = 0; j < NB; j++) {
                    wv[j] = _mm512_xor_si512(_mm512_loadu_si512(wb[j] + v * 64), flip);
                    _mm_prefetch((const char *)(wb[j] + v * 64 + ahead), _MM_HINT_NTA);
                }
                for (int r = 0; r < RT; r++) {
                    __m512i x = _mm512_set1_epi32(four(xr[r] + 4 * v));
                    for (int j = 0; j < NB; j++)
                        iacc[r][j] = _mm512_dpbusd_epi32(iacc[r][j], wv[j], x);
                }
            }
            for (int r = 0; r < RT; r++)
                for (int j = 0; j < NB; j++)
                    _mm512_store_si512(acc[r][j], iacc[r][j]);
        }
        for (int r = 0; r < RT; r++) {
            __m512 s = _mm512_set1_ps(a->scale[rowi[r] * a->blocks + b]);
            for (int j = 0; j < NB; j++) {
                __m512 f = _mm512_fmadd_ps(_mm512_cvtepi32_ps(_mm512_load_si512(acc[r][j])), s, _mm512_load_ps(facc[r][j]));
                _mm512_store_ps(facc[r][j], f);
            }
        }
    }
    for (int j = 0; j < nb && j < NB; j++) {
        long n0 = (b0 + j) * LANES, valid = p->out_features - n0;
        __mmask16 m = valid >= LANES ? (__mmask16)0xFFFF : (__mmask16)((1u << valid) - 1);
        __m512 ws = _mm512_maskz_loadu_ps(m, p->wscale + n0);
        for (int r = 0; r < rt && r < RT; r++)
            store16(p, r0 + r, n0, _mm512_mul_ps(_mm512_load_ps(facc[r][j]), ws));
    }
}

/* int4: two vpdpbusd per vector (low nibbles: inputs 8v..8v+3, high: 8v+4..8v+7); per group, the
 * integer dot products scaled by the input's and the weights' scales, and the minimum's term added. */
AVX512 INLINE void int4_group_4x4(const uint8_t *const *wb, const int8_t *const *xr, long v0, long v1,
                                  int32_t acc[4][4][LANES])
{
    const __m512i low = _mm512_set1_epi8(0x0F), zero = _mm512_setzero_si512();
    const uint8_t *w0 = wb[0], *w1 = wb[1], *w2 = wb[2], *w3 = wb[3];
    const int8_t *x0 = xr[0], *x1 = xr[1], *x2 = xr[2], *x3 = xr[3];
    ACC_ROW(0, zero) ACC_ROW(1, zero) ACC_ROW(2, zero) ACC_ROW(3, zero)
    for (long v = v0; v < v1; v++) {
        __m512i p0 = _mm512_loadu_si512(w0 + v * 64), p1 = _mm512_loadu_si512(w1 + v * 64);
        __m512i p2 = _mm512_loadu_si512(w2 + v * 64), p3 = _mm512_loadu_si512(w3 + v * 64);
        __m512i l0 = _mm512_and_si512(p0, low), l1 = _mm512_and_si512(p1, low);
        __m512i l2 = _mm512_and_si512(p2, low), l3 = _mm512_and_si512(p3, low);
        DOT_ROW(0, _mm512_set1_epi32(four(x0 + 8 * v)), l0, l1, l2, l3)
        DOT_ROW(1, _mm512_set1_epi32(four(x1 + 8 * v)), l0, l1, l2, l3)
        DOT_ROW(2, _mm512_set1_epi32(four(x2 + 8 * v)), l0, l1, l2, l3)
        DOT_ROW(3, _mm512_set1_epi32(four(x3 + 8 * v)), l0, l1, l2, l3)
        __m512i h0 = _mm512_and_si512(_mm512_srli_epi16(p0, 4), low);
        __m512i h1 = _mm512_and_si512(_mm512_srli_epi16(p1, 4), low);
        __m512i h2 = _mm512_and_si512(_mm512_srli_epi16(p2, 4), low);
        __m512i h3 = _mm512_and_si512(_mm512_srli_epi16(p3, 4), low);
        DOT_ROW(0, _mm512_set1_epi32(four(x0 + 8 * v + 4)), h0, h1, h2, h3)
        DOT_ROW(1, _mm512_set1_epi32(four(x1 + 8 * v + 4)), h0, h1, h2, h3)
        DOT_ROW(2, _mm512_set1_epi32(four(x2 + 8 * v + 4)), h0, h1, h2, h3)
        DOT_ROW(3, _mm512_set1_epi32(four(x3 + 8 * v + 4)), h0, h1, h2, h3)
    }
    SAVE_ROW(0) SAVE_ROW(1) SAVE_ROW(2) SAVE_ROW(3)
}

AVX512 INLINE void int4_tile_avx512(const Activations *a, const Layer *p, long r0, int rt, long b0, int nb,
                                    const int RT, const int NB)
{
    const long padded = a->padded, vectors = padded / 8, groups = a->blocks, per_group = p->group / 8;
    const __m512i low = _mm512_set1_epi8(0x0F);
    const uint8_t *wb[4];
    const int8_t *xr[4];
    for (int j = 0; j < NB; j++)
        wb[j] = (const uint8_t *)p->w + (b0 + (j < nb ? j : 0)) * vectors * 64;
    for (int r = 0; r < RT; r++)
        xr[r] = a->q + (r0 + (r < rt ? r : 0)) * padded;
    const long ahead = NB * vectors * 64;
    float facc[4][4][LANES] __attribute__((aligned(64)));
    for (int r = 0; r < RT; r++)
        for (int j = 0; j < NB; j++)
            _mm512_store_ps(facc[r][j], _mm512_setzero_ps());
    if (NB > 1)
        prefetch_group_params(p, b0, NB, groups);
    for (long g = 0; g < groups; g++) {
        int32_t acc[4][4][LANES] __attribute__((aligned(64)));
        if (RT == 4 && NB == 4) {
            int4_group_4x4(wb, xr, g * per_group, (g + 1) * per_group, acc);
        } else {
            __m512i iacc[4][4];
            for (int r = 0; r < RT; r++)
                for (int j = 0; j < NB; j++)
                    iacc[r][j] = _mm512_setzero_si512();
            for (long v = g * per_group; v < (g + 1) * per_group; v++) {
                __m512i wlo[4], whi[4];
                for (int j = 0; j < NB; j++) {
                    __m512i packed = _mm512_loadu_si512(wb[j] + v * 64);
                    _mm_prefetch((const char *)(wb[j] + v * 64 + ahead), _MM_HINT_NTA);
                    wlo[j] = _mm512_and_si512(packed, low);
                    whi[j] = _mm512_and_si512(_mm512_srli_epi16(packed, 4), low);
                }
                for (int r = 0; r < RT; r++) {
                    const int8_t *xq = xr[r] + 8 * v;
                    __m512i xlo = _mm512_set1_epi32(four(xq)), xhi = _mm512_set1_epi32(four(xq + 4));
                    for (int j = 0; j < NB; j++)
                        iacc[r][j] = _mm512_dpbusd_epi32(_mm512_dpbusd_epi32(iacc[r][j], wlo[j], xlo), whi[j], xhi);
                }
            }
            for (int r = 0; r < RT; r++)
                for (int j = 0; j < NB; j++)
                    _mm512_store_si512(acc[r][j], iacc[r][j]);
        }
        __m512 sv[4], mv[4];
        for (int j = 0; j < NB; j++) {
            long blk = b0 + (j < nb ? j : 0);
            sv[j] = _mm512_cvtph_ps(_mm256_loadu_si256((const __m256i *)(p->scales + (blk * groups + g) * LANES)));
            mv[j] = _mm512_cvtph_ps(_mm256_loadu_si256((const __m256i *)(p->mins + (blk * groups + g) * LANES)));
        }
        for (int r = 0; r < RT; r++) {
            long row = r0 + (r < rt ? r : 0);
            float xs = a->scale[row * groups + g];
            __m512 vxs = _mm512_set1_ps(xs), vsum = _mm512_set1_ps(xs * (float)a->sum[row * groups + g]);
            for (int j = 0; j < NB; j++) {
                __m512 dot = _mm512_mul_ps(_mm512_cvtepi32_ps(_mm512_load_si512(acc[r][j])), vxs);
                __m512 f = _mm512_fmadd_ps(mv[j], vsum, _mm512_fmadd_ps(dot, sv[j], _mm512_load_ps(facc[r][j])));
                _mm512_store_ps(facc[r][j], f);
            }
        }
    }
    for (int j = 0; j < nb && j < NB; j++)
        for (int r = 0; r < rt && r < RT; r++)
            store16(p, r0 + r, (b0 + j) * LANES, _mm512_load_ps(facc[r][j]));
}

/* ---- AVX2: the same blocks, each 64-byte vector as two halves of 8 outputs ---------------------------- */

AVX2 INLINE void store8(const Layer *p, long row, long n0, __m256 v)
{
    long valid = p->out_features - n0;
    if (valid >= 8) {
        if (p->bias)
            v = _mm256_add_ps(v, _mm256_loadu_ps(p->bias + n0));
        _mm256_storeu_ps(p->y + row * p->out_features + n0, v);
        return;
    }
    float lanes[8];
    _mm256_storeu_ps(lanes, v);
    for (long i = 0; i < valid; i++)
        p->y[row * p->out_features + n0 + i] = p->bias ? lanes[i] + p->bias[n0 + i] : lanes[i];
}

/* int8: vpmaddubsw takes unsigned bytes on one side: |w| against x with w's sign (pairs stay below
 * 2 * 127 * 127: no saturation). */
AVX2 INLINE void int8_tile_avx2(const Activations *a, const Layer *p, long r0, int rt, long b0, int nb,
                                const int RT)
{
    const long padded = a->padded, vectors = padded / 4, per_block = INT8_BLOCK / 4;
    const int8_t *w = p->w;
    const __m256i ones = _mm256_set1_epi16(1);
    __m256 facc[2][2];
    for (int r = 0; r < RT; r++)
        facc[r][0] = facc[r][1] = _mm256_setzero_ps();
    (void)nb;
    for (long b = 0; b < a->blocks; b++) {
        __m256i acc[2][2];
        for (int r = 0; r < RT; r++)
            acc[r][0] = acc[r][1] = _mm256_setzero_si256();
        for (long v = b * per_block; v < (b + 1) * per_block; v++) {
            const int8_t *vec = w + (b0 * vectors + v) * 64;
            _mm_prefetch((const char *)(vec + vectors * 64), _MM_HINT_NTA);
            __m256i wv[2], wabs[2];
            for (int h = 0; h < 2; h++) {
                wv[h] = _mm256_loadu_si256((const __m256i *)(vec + 32 * h));
                wabs[h] = _mm256_abs_epi8(wv[h]);
            }
            for (int r = 0; r < RT; r++) {
                long row = r0 + (r < rt ? r : 0);
                __m256i x = _mm256_set1_epi32(four(a->q + row * padded + 4 * v));
                for (int h = 0; h < 2; h++) {
                    __m256i pairs = _mm256_maddubs_epi16(wabs[h], _mm256_sign_epi8(x, wv[h]));
                    acc[r][h] = _mm256_add_epi32(acc[r][h], _mm256_madd_epi16(pairs, ones));
                }
            }
        }
        for (int r = 0; r < RT; r++) {
            long row = r0 + (r < rt ? r : 0);
            __m256 s = _mm256_set1_ps(a->scale[row * a->blocks + b]);
            for (int h = 0; h < 2; h++)
                facc[r][h] = _mm256_fmadd_ps(_mm256_cvtepi32_ps(acc[r][h]), s, facc[r][h]);
        }
    }
    for (int h = 0; h < 2; h++) {
        long n0 = b0 * LANES + 8 * h, valid = p->out_features - n0;
        if (valid <= 0)
            break;
        float scale[8] = {0};
        memcpy(scale, p->wscale + n0, sizeof(float) * (size_t)(valid < 8 ? valid : 8));
        __m256 ws = _mm256_loadu_ps(scale);
        for (int r = 0; r < rt && r < RT; r++)
            store8(p, r0 + r, n0, _mm256_mul_ps(facc[r][h], ws));
    }
}

AVX2 INLINE void int4_tile_avx2(const Activations *a, const Layer *p, long r0, int rt, long b0, int nb,
                                const int RT)
{
    const long padded = a->padded, vectors = padded / 8, groups = a->blocks, per_group = p->group / 8;
    const uint8_t *w = p->w;
    const __m256i low = _mm256_set1_epi8(0x0F), ones = _mm256_set1_epi16(1);
    __m256 facc[2][2];
    for (int r = 0; r < RT; r++)
        facc[r][0] = facc[r][1] = _mm256_setzero_ps();
    (void)nb;
    for (long g = 0; g < groups; g++) {
        __m256i acc[2][2];
        for (int r = 0; r < RT; r++)
            acc[r][0] = acc[r][1] = _mm256_setzero_si256();
        for (long v = g * per_group; v < (g + 1) * per_group; v++) {
            const uint8_t *vec = w + (b0 * vectors + v) * 64;
            _mm_prefetch((const char *)(vec + vectors * 64), _MM_HINT_NTA);
            __m256i wlo[2], whi[2];
            for (int h = 0; h < 2; h++) {
                __m256i packed = _mm256_loadu_si256((const __m256i *)(vec + 32 * h));
                wlo[h] = _mm256_and_si256(packed, low);
                whi[h] = _mm256_and_si256(_mm256_srli_epi16(packed, 4), low);
            }
            for (int r = 0; r < RT; r++) {
                long row = r0 + (r < rt ? r : 0);
                const int8_t *xq = a->q + row * padded + 8 * v;
                __m256i xlo = _mm256_set1_epi32(four(xq)), xhi = _mm256_set1_epi32(four(xq + 4));
                for (int h = 0; h < 2; h++) {
                    __m256i pairs = _mm256_add_epi16(_mm256_maddubs_epi16(wlo[h], xlo), _mm256_maddubs_epi16(whi[h], xhi));
                    acc[r][h] = _mm256_add_epi32(acc[r][h], _mm256_madd_epi16(pairs, ones));
                }
            }
        }
        __m256 sv[2], mv[2];
        for (int h = 0; h < 2; h++) {
            long at = (b0 * groups + g) * LANES + 8 * h;
            sv[h] = _mm256_cvtph_ps(_mm_loadu_si128((const __m128i *)(p->scales + at)));
            mv[h] = _mm256_cvtph_ps(_mm_loadu_si128((const __m128i *)(p->mins + at)));
        }
        for (int r = 0; r < RT; r++) {
            long row = r0 + (r < rt ? r : 0);
            float xs = a->scale[row * groups + g];
            __m256 vxs = _mm256_set1_ps(xs), vsum = _mm256_set1_ps(xs * (float)a->sum[row * groups + g]);
            for (int h = 0; h < 2; h++) {
                __m256 dot = _mm256_mul_ps(_mm256_cvtepi32_ps(acc[r][h]), vxs);
                facc[r][h] = _mm256_fmadd_ps(mv[h], vsum, _mm256_fmadd_ps(dot, sv[h], facc[r][h]));
            }
        }
    }
    for (int h = 0; h < 2; h++) {
        long n0 = b0 * LANES + 8 * h;
        if (n0 >= p->out_features)
            break;
        for (int r = 0; r < rt && r < RT; r++)
            store8(p, r0 + r, n0, facc[r][h]);
    }
}

/* Tiles of RT rows x NB blocks of 16 outputs; a smaller edge tile runs the same code with its rows and
 * blocks repeated (their results are not stored), so every stored value took the same operations. */
typedef void (*TileFn)(const Activations *, const Layer *, long, int, long, int);

#define TILE_FN(TARGET, name, tile, ...)                                                            \
    TARGET static void name(const Activations *a, const Layer *p, long r0, int rt, long b0, int nb) \
    {                                                                                               \
        tile(a, p, r0, rt, b0, nb, __VA_ARGS__);                                                    \
    }

TILE_FN(AVX512, int8_avx512_4x4, int8_tile_avx512, 4, 4)
TILE_FN(AVX512, int8_avx512_1x4, int8_tile_avx512, 1, 4)
TILE_FN(AVX512, int8_avx512_4x1, int8_tile_avx512, 4, 1)
TILE_FN(AVX512, int8_avx512_1x1, int8_tile_avx512, 1, 1)
TILE_FN(AVX512, int4_avx512_4x4, int4_tile_avx512, 4, 4)
TILE_FN(AVX512, int4_avx512_1x4, int4_tile_avx512, 1, 4)
TILE_FN(AVX512, int4_avx512_4x1, int4_tile_avx512, 4, 1)
TILE_FN(AVX512, int4_avx512_1x1, int4_tile_avx512, 1, 1)
TILE_FN(AVX2, int8_avx2_2x1, int8_tile_avx2, 2)
TILE_FN(AVX2, int8_avx2_1x1, int8_tile_avx2, 1)
TILE_FN(AVX2, int4_avx2_2x1, int4_tile_avx2, 2)
TILE_FN(AVX2, int4_avx2_1x1, int4_tile_avx2, 1)

/* ---- the loop over tiles ------------------------------------------------------------------------- */

/* Blocks of outputs are split among threads; each thread walks its blocks once per chunk of
 * ROW_CHUNK rows (whose activations stay in cache), `wide_rows` rows at a time, then one at a time. */
static void run_tiles(const Activations *a, const Layer *p, long rows, TileFn wide, int wide_rows, int wide_blocks,
                      TileFn single, int threads)
{
    const long blocks = (p->out_features + LANES - 1) / LANES;
    const long steps = (blocks + wide_blocks - 1) / wide_blocks;
#pragma omp parallel num_threads(threads)
    {
        int t = omp_get_thread_num(), nth = omp_get_num_threads();
        long first = steps * t / nth * wide_blocks, last = steps * (t + 1) / nth * wide_blocks;
        if (last > blocks)
            last = blocks;
        for (long c = 0; c < rows; c += ROW_CHUNK) {
            long c_end = c + ROW_CHUNK < rows ? c + ROW_CHUNK : rows;
            for (long b = first; b < last; b += wide_blocks) {
                int nb = last - b < wide_blocks ? (int)(last - b) : wide_blocks;
                long r = c;
                for (; r + wide_rows <= c_end; r += wide_rows)
                    wide(a, p, r, wide_rows, b, nb);
                for (; r < c_end; r++)
                    single(a, p, r, 1, b, nb);
            }
        }
    }
}

/* A layer as the caller describes it once (blip2.quantize.kernels.NativeLayer mirrors it). */
typedef struct {
    int kind;                 /* KIND_AVX2 or KIND_AVX512 */
    int bits;                 /* 8 or 4 */
    long in_features, padded, group, out_features;
    const void *w;            /* packed blocks */
    const float *wscale;      /* int8: (out_features,) */
    const uint16_t *scales;   /* int4: (blocks, groups, 16) float16 */
    const uint16_t *mins;
    const float *bias;        /* (out_features,) or NULL */
} Blip2LowbitLayer;

/* y (rows, out_features) = x (rows, in_features) W^T + bias. Returns 0, or -1 for sizes the layout does
 * not allow, -2 when memory runs out. */
int blip2_lowbit_linear(const Blip2LowbitLayer *l, const float *x, long rows, float *y, int threads)
{
    int int4 = l->bits == 4;
    long block = int4 ? l->group : INT8_BLOCK;
    if (rows < 0 || l->in_features <= 0 || l->out_features <= 0 || l->padded < l->in_features || block <= 0 ||
        block % INT4_CHUNK || l->padded % block || (l->bits != 4 && l->bits != 8) ||
        (l->kind != KIND_AVX2 && l->kind != KIND_AVX512))
        return -1;
    if (rows == 0)
        return 0;
    Activations a = {0};
    if (quantize_activations(x, rows, l->in_features, l->padded, block, &a, threads))
        return -2;
    Layer p = {l->w, l->wscale, l->scales, l->mins, l->bias, l->out_features, l->group, y};
    /* Below 8 rows (decode steps): one block per tile, so that each thread reads two streams (this block
     * and the next one, prefetched) instead of eight: from memory, int4 passes ~20% faster at 1 row,
     * int8 ~6%; from 8 rows on, the 4x4 tiles' reuse of each loaded vector pays more. */
    if (l->kind == KIND_AVX512 && int4 && rows < 8)
        run_tiles(&a, &p, rows, int4_avx512_4x1, 4, 1, int4_avx512_1x1, threads);
    else if (l->kind == KIND_AVX512 && int4)
        run_tiles(&a, &p, rows, int4_avx512_4x4, 4, 4, int4_avx512_1x4, threads);
    else if (l->kind == KIND_AVX512 && rows < 8)
        run_tiles(&a, &p, rows, int8_avx512_4x1, 4, 1, int8_avx512_1x1, threads);
    else if (l->kind == KIND_AVX512)
        run_tiles(&a, &p, rows, int8_avx512_4x4, 4, 4, int8_avx512_1x4, threads);
    else if (int4)
        run_tiles(&a, &p, rows, int4_avx2_2x1, 2, 1, int4_avx2_1x1, threads);
    else
        run_tiles(&a, &p, rows, int8_avx2_2x1, 2, 1, int8_avx2_1x1, threads);
    release_scratch(a.q, activations_bytes(rows, l->padded, block));
    return 0;
}

/* ---- fitting int4 groups (blip2.quantize.int4._fit, the same steps) ------------------------------------ */

AVX2 static float lane_sum(__m256 v)
{
    float lanes[8], total = 0.0f;
    _mm256_storeu_ps(lanes, v);
    for (int i = 0; i < 8; i++)
        total += lanes[i];
    return total;
}

/* q = round((w - low) / step) in [0, 15] (half to even, as torch.round) for one group of n (a multiple of
 * 8), into q when given; returns the sum of ((low - w) + q * step)^2. */
AVX2 static float group_error(const float *w, long n, float step, float low, uint8_t *q)
{
    const __m256 vstep = _mm256_set1_ps(step > FLT_MIN ? step : FLT_MIN), vlow = _mm256_set1_ps(low);
    const __m256 top = _mm256_set1_ps(15.0f), zero = _mm256_setzero_ps(), scale = _mm256_set1_ps(step);
    __m256 sum = _mm256_setzero_ps();
    for (long k = 0; k < n; k += 8) {
        __m256 x = _mm256_loadu_ps(w + k);
        __m256 v = _mm256_round_ps(_mm256_div_ps(_mm256_sub_ps(x, vlow), vstep),
                                   _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC);
        v = _mm256_min_ps(_mm256_max_ps(v, zero), top);
        __m256 e = _mm256_add_ps(_mm256_sub_ps(vlow, x), _mm256_mul_ps(v, scale));
        sum = _mm256_add_ps(sum, _mm256_mul_ps(e, e));
        if (q) {
            int32_t ints[8];
            _mm256_storeu_si256((__m256i *)ints, _mm256_cvtps_epi32(v));
            for (int i = 0; i < 8; i++)
                q[k + i] = (uint8_t)ints[i];
        }
    }
    return lane_sum(sum);
}

AVX2 static float to_half(float x, uint16_t *bits)
{
    *bits = (uint16_t)_cvtss_sh(x, _MM_FROUND_TO_NEAREST_INT);
    return _cvtsh_ss(*bits);
}

/* One group: [min, max] of its real weights in 15 steps, then ranges narrowed by SHRINK of their width at
 * both ends, then a least-squares refit of scale and minimum to the best one's q; the smallest squared
 * error wins (float16 scale and minimum). `work`: n floats. */
AVX2 static __m256 q_lanes(const uint8_t *q)
{
    return _mm256_cvtepi32_ps(_mm256_cvtepu8_epi32(_mm_loadl_epi64((const __m128i *)q)));
}

AVX2 static void fit_group(const float *w, long real, long n, float *work, uint8_t *q, uint16_t *scale_bits,
                           uint16_t *min_bits)
{
    static const float SHRINK[] = {0.0f, 0.04f, 0.08f, 0.12f};
    memcpy(work, w, sizeof(float) * (size_t)real);
    __m256 vlow = _mm256_set1_ps(work[0]), vhigh = vlow;
    long k = 0;
    for (; k + 8 <= real; k += 8) {
        vlow = _mm256_min_ps(vlow, _mm256_loadu_ps(work + k));
        vhigh = _mm256_max_ps(vhigh, _mm256_loadu_ps(work + k));
    }
    float lows[8], highs[8];
    _mm256_storeu_ps(lows, vlow);
    _mm256_storeu_ps(highs, vhigh);
    float low = lows[0], high = highs[0];
    for (int i = 1; i < 8; i++) {
        low = lows[i] < low ? lows[i] : low;
        high = highs[i] > high ? highs[i] : high;
    }
    for (; k < real; k++) {
        low = work[k] < low ? work[k] : low;
        high = work[k] > high ? work[k] : high;
    }
    for (k = real; k < n; k++)
        work[k] = low; /* padding sits on the minimum: it costs nothing */
    uint16_t best_s = 0, best_m = 0;
    float scale = 0.0f, minimum = 0.0f, err = 0.0f;
    for (int c = 0; c < 4; c++) {
        float cut = (high - low) * SHRINK[c];
        uint16_t sb, mb;
        float s = to_half((high - low - 2.0f * cut) / 15.0f, &sb), m = to_half(low + cut, &mb);
        float e = group_error(work, n, s, m, NULL);
        if (c == 0 || e < err) {
            best_s = sb, best_m = mb, scale = s, minimum = m, err = e;
        }
    }
    group_error(work, n, scale, minimum, q);
    __m256 q_sum = _mm256_setzero_ps(), w_sum = _mm256_setzero_ps();
    for (k = 0; k < n; k += 8) {
        q_sum = _mm256_add_ps(q_sum, q_lanes(q + k));
        w_sum = _mm256_add_ps(w_sum, _mm256_loadu_ps(work + k));
    }
    float q_mean = lane_sum(q_sum) / (float)n, w_mean = lane_sum(w_sum) / (float)n;
    __m256 spread = _mm256_setzero_ps(), cross = _mm256_setzero_ps();
    for (k = 0; k < n; k += 8) {
        __m256 centred = _mm256_sub_ps(q_lanes(q + k), _mm256_set1_ps(q_mean));
        spread = _mm256_add_ps(spread, _mm256_mul_ps(centred, centred));
        cross = _mm256_add_ps(cross, _mm256_mul_ps(centred, _mm256_sub_ps(_mm256_loadu_ps(work + k),
                                                                          _mm256_set1_ps(w_mean))));
    }
    float total_spread = lane_sum(spread), total_cross = lane_sum(cross);
    uint16_t fsb, fmb;
    float fit_scale = to_half(total_spread > 0.0f ? total_cross / (total_spread > 1e-12f ? total_spread : 1e-12f)
                                                  : scale,
                              &fsb);
    float fit_min = to_half(w_mean - fit_scale * q_mean, &fmb);
    if (fit_scale > 0.0f) {
        uint8_t q_fit[INT4_CHUNK * 64];
        if (n <= (long)sizeof q_fit && group_error(work, n, fit_scale, fit_min, q_fit) < err) {
            memcpy(q, q_fit, (size_t)n);
            best_s = fsb, best_m = fmb;
        }
    }
    *scale_bits = best_s;
    *min_bits = best_m;
}

/* w (rows, in_features) float32 -> q (rows, padded) in [0, 15], scales and mins (rows, padded / group)
 * float16 bits. Returns 0, or -1 for sizes it does not take, -2 when memory runs out. */
int blip2_int4_fit(const float *w, long rows, long in_features, long padded, long group, uint8_t *q,
                   uint16_t *scales, uint16_t *mins, int threads)
{
    if (rows < 0 || in_features <= 0 || group <= 0 || group % 8 || group > INT4_CHUNK * 64 || padded % group ||
        padded < in_features)
        return -1;
    const long groups = padded / group;
    int failed = 0;
#pragma omp parallel num_threads(threads) reduction(| : failed)
    {
        float *work = malloc(sizeof(float) * (size_t)group);
        if (!work)
            failed = 1;
#pragma omp for schedule(static)
        for (long r = 0; r < rows; r++)
            for (long g = 0; work && g < groups; g++) {
                long k0 = g * group, real = in_features - k0 < group ? in_features - k0 : group;
                fit_group(w + r * in_features + k0, real > 0 ? real : 0, group, work, q + r * padded + k0,
                          scales + r * groups + g, mins + r * groups + g);
            }
        free(work);
    }
    return failed ? -2 : 0;
}

/* q (rows, padded) values in [0, 15] -> their nibbles in blocked qweight (blocks, padded / 8, 64) as rows
 * row0, row0 + 1, ... (the layout at the top of this file; blip2.quantize.kernels.block_int4 in C). */
void blip2_int4_block(const uint8_t *q, long rows, long padded, long row0, uint8_t *qweight, int threads)
{
    const long vectors = padded / 8;
#pragma omp parallel for num_threads(threads) schedule(static)
    for (long r = 0; r < rows; r++) {
        const uint8_t *row = q + r * padded;
        long block = (row0 + r) / LANES, lane = (row0 + r) % LANES;
        uint8_t *out = qweight + block * vectors * 64 + 4 * lane;
        for (long v = 0; v < vectors; v++)
            for (int b = 0; b < 4; b++)
                out[v * 64 + b] = (uint8_t)(row[8 * v + b] | row[8 * v + 4 + b] << 4);
    }
}

/* int8 weights (blip2.quantize.int8.pack_int8, the same arithmetic): each row of w (rows, in_features)
 * float32 scaled by max|w| / 127 (at least 1e-12 / 127) and rounded half to even, written as rows row0,
 * row0 + 1, ... of blocked qweight (blocks, padded / 4, 64: the layout at the top of this file; padding
 * stays as the caller made it), the scales into scale[row0 + r]. */
AVX2 void blip2_int8_quantize(const float *w, long rows, long in_features, long padded, long row0,
                              int8_t *qweight, float *scale, int threads)
{
    const long vectors = padded / 4;
#pragma omp parallel for num_threads(threads) schedule(static)
    for (long r = 0; r < rows; r++) {
        const float *row = w + r * in_features;
        float top = 0.0f;
        for (long k = 0; k < in_features; k++) {
            float a = row[k] < 0.0f ? -row[k] : row[k];
            top = a > top ? a : top;
        }
        float s = (top > 1e-12f ? top : 1e-12f) / 127.0f;
        long block = (row0 + r) / LANES, lane = (row0 + r) % LANES;
        int8_t *out = qweight + block * vectors * 64 + 4 * lane;
        for (long k = 0; k < in_features; k++) {
            float v = nearbyintf(row[k] / s);
            out[(k / 4) * 64 + k % 4] = (int8_t)(v < -127.0f ? -127.0f : (v > 127.0f ? 127.0f : v));
        }
        scale[row0 + r] = s;
    }
}
