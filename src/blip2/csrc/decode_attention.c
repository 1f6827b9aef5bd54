/* One query's attention in float32, for every (batch row, head) of a decode step, in one call:
 *
 *     out[b, h] = softmax(q[b, h] . k[b, h]^T * scale + mask[b, h]) . v[b, h]      (over S positions)
 *
 * PyTorch spends about ten operator calls on this per layer (two batched products, scale, mask,
 * softmax, the head split and merge), each costing more in overhead than its arithmetic at the few
 * dozen positions of a caption. Here each (row, head) pair is computed alone, in a fixed order:
 * every score is a dot product over head_dim (lane l takes d = l (mod LANES), d ascending, one fused
 * multiply-add each, then one fixed reduction tree), the softmax's exponentials are taken LANES
 * positions at a time and summed lane by lane (then by the same tree), and the output is the weighted
 * sum of the values, s ascending. Nothing depends on the batch, the other heads or the thread count,
 * so a row's result is the same bits alone or in any batch.
 *
 * Mask semantics are PyTorch's: a boolean mask (1 = attend) sets the masked scores to -inf, a float
 * mask is added. A pair with every position masked gives NaN, as softmax of all -inf does.
 *
 * Built by blip2.native either with -mavx2 -mfma (8 lanes) or with -mavx512f (16 lanes).
 */
#include <immintrin.h>
#include <math.h>
#include <omp.h>
#include <stdlib.h>
#include <string.h>

#ifdef __AVX512F__
#define LANES 16
typedef __m512 vec;
typedef __mmask16 tail_mask;
#define vzero() _mm512_setzero_ps()
#define vset1(x) _mm512_set1_ps(x)
#define vload(p) _mm512_loadu_ps(p)
#define vstore(p, v) _mm512_storeu_ps(p, v)
#define vload_tail(p, mask) _mm512_maskz_loadu_ps(mask, p)
#define vstore_tail(p, v, mask) _mm512_mask_storeu_ps(p, mask, v)
#define vfma(a, b, c) _mm512_fmadd_ps(a, b, c)
static inline tail_mask make_tail_mask(long tail) { return (tail_mask)((1u << tail) - 1u); }
#define vselect_tail(v, mask) _mm512_maskz_mov_ps(mask, v)
static inline __m256 halve(vec v) {
    return _mm256_add_ps(_mm512_castps512_ps256(v), _mm256_castpd_ps(_mm512_extractf64x4_pd(_mm512_castps_pd(v), 1)));
}
#else
#define LANES 8
typedef __m256 vec;
typedef __m256i tail_mask;
#define vzero() _mm256_setzero_ps()
#define vset1(x) _mm256_set1_ps(x)
#define vload(p) _mm256_loadu_ps(p)
#define vstore(p, v) _mm256_storeu_ps(p, v)
#define vload_tail(p, mask) _mm256_maskload_ps(p, mask)
#define vstore_tail(p, v, mask) _mm256_maskstore_ps(p, mask, v)
#define vfma(a, b, c) _mm256_fmadd_ps(a, b, c)
static inline tail_mask make_tail_mask(long tail) {
    return _mm256_cmpgt_epi32(_mm256_set1_epi32((int)tail), _mm256_setr_epi32(0, 1, 2, 3, 4, 5, 6, 7));
}
#define vselect_tail(v, mask) _mm256_and_ps(v, _mm256_castsi256_ps(mask))
static inline __m256 halve(vec v) { return v; }
#endif

/* The lane sum by one tree: l + LANES/2, then l + 4, l + 2, l + 1. */
static inline float reduce(vec v) {
    __m256 h = halve(v);
    __m128 s = _mm_add_ps(_mm256_castps256_ps128(h), _mm256_extractf128_ps(h, 1));
    s = _mm_add_ps(s, _mm_movehl_ps(s, s));
    s = _mm_add_ss(s, _mm_movehdup_ps(s));
    return _mm_cvtss_f32(s);
}

/* More of the vector layer, for the kernels compiled after this file (encoder_attention.c,
 * decoder_step.c): arithmetic, e^x for x <= 0, and from it the sigmoid and tanh. */
#ifdef __AVX512F__
#define vmul(a, b) _mm512_mul_ps(a, b)
#define vadd(a, b) _mm512_add_ps(a, b)
#define vsub(a, b) _mm512_sub_ps(a, b)
#define vdiv(a, b) _mm512_div_ps(a, b)
#define vmax(a, b) _mm512_max_ps(a, b)
#define vabs(x) _mm512_abs_ps(x)
#define vround(x) _mm512_roundscale_ps(x, _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC)
#define vcvt(x) _mm512_cvtps_epi32(x)
#define vpow2(n) _mm512_castsi512_ps(_mm512_slli_epi32(_mm512_add_epi32(n, _mm512_set1_epi32(127)), 23))
#define vzero_below(v, x, limit) _mm512_maskz_mov_ps(_mm512_cmp_ps_mask(x, limit, _CMP_GE_OQ), v)
#define vselect_negative(x, if_negative, otherwise) \
    _mm512_mask_blend_ps(_mm512_cmp_ps_mask(x, _mm512_setzero_ps(), _CMP_LT_OQ), otherwise, if_negative)
static inline float hmax(vec v) { return _mm512_reduce_max_ps(v); }
#else
#define vmul(a, b) _mm256_mul_ps(a, b)
#define vadd(a, b) _mm256_add_ps(a, b)
#define vsub(a, b) _mm256_sub_ps(a, b)
#define vdiv(a, b) _mm256_div_ps(a, b)
#define vmax(a, b) _mm256_max_ps(a, b)
#define vabs(x) _mm256_andnot_ps(_mm256_set1_ps(-0.0f), x)
#define vround(x) _mm256_round_ps(x, _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC)
#define vcvt(x) _mm256_cvtps_epi32(x)
#define vpow2(n) _mm256_castsi256_ps(_mm256_slli_epi32(_mm256_add_epi32(n, _mm256_set1_epi32(127)), 23))
#define vzero_below(v, x, limit) _mm256_and_ps(v, _mm256_cmp_ps(x, limit, _CMP_GE_OQ))
#define vselect_negative(x, if_negative, otherwise) \
    _mm256_blendv_ps(otherwise, if_negative, _mm256_cmp_ps(x, _mm256_setzero_ps(), _CMP_LT_OQ))
static inline float hmax(vec v) {
    __m128 m = _mm_max_ps(_mm256_castps256_ps128(v), _mm256_extractf128_ps(v, 1));
    m = _mm_max_ps(m, _mm_movehl_ps(m, m));
    m = _mm_max_ss(m, _mm_movehdup_ps(m));
    return _mm_cvtss_f32(m);
}
#endif

/* e^x for x <= 0: 2^n * e^r with |r| <= ln(2) / 2, e^r by its degree-6 Taylor polynomial (relative error
 * < 2e-7); below -87.3 the result is 0, as expf's underflow. */
static inline vec vexp(vec x) {
    const vec lowest = vset1(-87.3f);
    vec original = x;
    x = vmax(x, lowest);
    vec n = vround(vmul(x, vset1(1.44269504088896341f)));
    vec r = vsub(vsub(x, vmul(n, vset1(0.693359375f))), vmul(n, vset1(-2.12194440e-4f)));
    vec p = vset1(1.0f / 720.0f);
    p = vfma(p, r, vset1(1.0f / 120.0f));
    p = vfma(p, r, vset1(1.0f / 24.0f));
    p = vfma(p, r, vset1(1.0f / 6.0f));
    p = vfma(p, r, vset1(0.5f));
    p = vfma(p, r, vset1(1.0f));
    p = vfma(p, r, vset1(1.0f));
    return vzero_below(vmul(p, vpow2(vcvt(n))), original, lowest);
}

/* 1 / (1 + e^-x), from t = e^-|x|: 1 / (1 + t) for x >= 0, t / (1 + t) below */
static inline vec vsigmoid(vec x) {
    vec t = vexp(vsub(vzero(), vabs(x))), denominator = vadd(vset1(1.0f), t);
    return vselect_negative(x, vdiv(t, denominator), vdiv(vset1(1.0f), denominator));
}

/* tanh(x) = (1 - t) / (1 + t) with t = e^-2|x|, with x's sign */
static inline vec vtanh(vec x) {
    vec t = vexp(vmul(vset1(-2.0f), vabs(x)));
    vec magnitude = vdiv(vsub(vset1(1.0f), t), vadd(vset1(1.0f), t));
    return vselect_negative(x, vsub(vzero(), magnitude), magnitude);
}

/* Vectors of the output summed together (independent chains of fused multiply-adds). */
#define GROUP 4

/* Element strides (a broadcast dimension has stride 0); the last dimension of q, k, v is contiguous. */
typedef struct {
    long q_batch, q_head;
    long k_batch, k_head, k_pos;
    long v_batch, v_head, v_pos;
    long mask_batch, mask_head, mask_pos;
    long new_k_batch, new_k_head, new_v_batch, new_v_head;
} Strides;

/* A score: q . key over head_dim (lane l takes d = l (mod LANES), d ascending, then the lane sum). */
static inline vec dot_lanes(const float *q, const float *key, long body, long head_dim, tail_mask tail) {
    vec acc = vzero();
    long d = 0;
    for (; d < body; d += LANES) acc = vfma(vload(q + d), vload(key + d), acc);
    if (d < head_dim) acc = vfma(vload_tail(q + d, tail), vload_tail(key + d, tail), acc);
    return acc;
}

/* How far ahead (in positions) the score loop asks for keys: a pair's keys come from memory when the
 * step's weights have pushed its cache out, and the loop alone has too few loads in flight. */
#define KEYS_AHEAD 16

static inline void prefetch_rows(const float *first, long rows, long row_stride, long row_bytes) {
    for (long s = 0; s < rows; s++)
        for (long byte = 0; byte < row_bytes; byte += 64)
            _mm_prefetch((const char *)(first + s * row_stride) + byte, _MM_HINT_T0);
}

static inline float masked_score(float score, long s, const float *mask_float, const unsigned char *mask_bool,
                                 const Strides *st, float scale, int scaled) {
    if (scaled) score = score * scale;
    if (mask_bool && !mask_bool[s * st->mask_pos]) score = -INFINITY;
    if (mask_float) score = score + mask_float[s * st->mask_pos];
    return score;
}

/* One (row, head) pair: scores into the scratch buffer, then the output row. Four scores at a time
 * (independent chains, each summed as one alone would be); the softmax's exponentials LANES at a time,
 * its total lane by lane, then by the reduction tree. */
static void one_pair(const float *q, const float *k, const float *v, const float *mask_float,
                     const unsigned char *mask_bool, const Strides *st, long length, long head_dim,
                     float scale, int scaled, float *scores, float *out) {
    tail_mask tail = make_tail_mask(head_dim % LANES);
    long body = head_dim - head_dim % LANES, row_bytes = head_dim * (long)sizeof(float);
    prefetch_rows(k, length < KEYS_AHEAD ? length : KEYS_AHEAD, st->k_pos, row_bytes);
    float top = -INFINITY;
    int nan_seen = 0;
    long s = 0;
    for (; s + 4 <= length; s += 4) {
        long ahead = s + KEYS_AHEAD;
        if (ahead + 4 <= length) prefetch_rows(k + ahead * st->k_pos, 4, st->k_pos, row_bytes);
        else if (ahead < length) prefetch_rows(k + ahead * st->k_pos, length - ahead, st->k_pos, row_bytes);
        const float *k0 = k + s * st->k_pos, *k1 = k0 + st->k_pos, *k2 = k1 + st->k_pos, *k3 = k2 + st->k_pos;
        vec a0 = vzero(), a1 = vzero(), a2 = vzero(), a3 = vzero();
        long d = 0;
        for (; d < body; d += LANES) {
            vec qd = vload(q + d);
            a0 = vfma(qd, vload(k0 + d), a0);
            a1 = vfma(qd, vload(k1 + d), a1);
            a2 = vfma(qd, vload(k2 + d), a2);
            a3 = vfma(qd, vload(k3 + d), a3);
        }
        if (d < head_dim) {
            vec qd = vload_tail(q + d, tail);
            a0 = vfma(qd, vload_tail(k0 + d, tail), a0);
            a1 = vfma(qd, vload_tail(k1 + d, tail), a1);
            a2 = vfma(qd, vload_tail(k2 + d, tail), a2);
            a3 = vfma(qd, vload_tail(k3 + d, tail), a3);
        }
        float s0 = masked_score(reduce(a0), s, mask_float, mask_bool, st, scale, scaled);
        float s1 = masked_score(reduce(a1), s + 1, mask_float, mask_bool, st, scale, scaled);
        float s2 = masked_score(reduce(a2), s + 2, mask_float, mask_bool, st, scale, scaled);
        float s3 = masked_score(reduce(a3), s + 3, mask_float, mask_bool, st, scale, scaled);
        scores[s] = s0, scores[s + 1] = s1, scores[s + 2] = s2, scores[s + 3] = s3;
        top = fmaxf(fmaxf(top, fmaxf(s0, s1)), fmaxf(s2, s3));
        nan_seen |= isnan(s0) | isnan(s1) | isnan(s2) | isnan(s3);
    }
    for (; s < length; s++) {
        float score = masked_score(reduce(dot_lanes(q, k + s * st->k_pos, body, head_dim, tail)), s, mask_float,
                                   mask_bool, st, scale, scaled);
        scores[s] = score;
        top = fmaxf(top, score);
        nan_seen |= isnan(score);
    }
    prefetch_rows(v, length < KEYS_AHEAD ? length : KEYS_AHEAD, st->v_pos, row_bytes);
    if (nan_seen || !(top < INFINITY && top > -INFINITY)) {
        /* a NaN score, a +inf one or every position masked: PyTorch's softmax gives NaN everywhere */
        for (long d = 0; d < head_dim; d++) out[d] = NAN;
        return;
    }
    vec top_lanes = vset1(top), totals = vzero();
    long tail_length = length % LANES;
    for (s = 0; s + LANES <= length; s += LANES) {
        vec e = vexp(vsub(vload(scores + s), top_lanes));
        vstore(scores + s, e);
        totals = vadd(totals, e);
    }
    if (tail_length) {
        tail_mask last = make_tail_mask(tail_length);
        vec e = vexp(vsub(vload_tail(scores + s, last), top_lanes));
        vstore_tail(scores + s, e, last);
        totals = vadd(totals, vselect_tail(e, last));
    }
    vec inverse = vset1(1.0f / reduce(totals));
    for (s = 0; s + LANES <= length; s += LANES) vstore(scores + s, vmul(vload(scores + s), inverse));
    if (tail_length) {
        tail_mask last = make_tail_mask(tail_length);
        vstore_tail(scores + s, vmul(vload_tail(scores + s, last), inverse), last);
    }
    /* out = sum over s of p_s v_s, GROUP vectors of head_dim at a time: independent FMA chains */
    long d = 0;
    for (; d + GROUP * LANES <= body; d += GROUP * LANES) {
        vec acc[GROUP];
        _Pragma("GCC unroll 4") for (int g = 0; g < GROUP; g++) acc[g] = vzero();
        for (long s = 0; s < length; s++) {
            vec p = vset1(scores[s]);
            const float *value = v + s * st->v_pos + d;
            if (s + KEYS_AHEAD < length)
                for (long byte = 0; byte < GROUP * LANES * (long)sizeof(float); byte += 64)
                    _mm_prefetch((const char *)(value + KEYS_AHEAD * st->v_pos) + byte, _MM_HINT_T0);
            _Pragma("GCC unroll 4") for (int g = 0; g < GROUP; g++) acc[g] = vfma(p, vload(value + g * LANES), acc[g]);
        }
        _Pragma("GCC unroll 4") for (int g = 0; g < GROUP; g++) vstore(out + d + g * LANES, acc[g]);
    }
    for (; d < head_dim; d += LANES) {
        vec acc = vzero();
        if (d < body) {
            for (long s = 0; s < length; s++) acc = vfma(vset1(scores[s]), vload(v + s * st->v_pos + d), acc);
            vstore(out + d, acc);
        } else {
            for (long s = 0; s < length; s++)
                acc = vfma(vset1(scores[s]), vload_tail(v + s * st->v_pos + d, tail), acc);
            vstore_tail(out + d, acc, tail);
        }
    }
}

/* One call's arguments, packed by blip2.native in this order (every field 8 bytes): q (batch, heads,
 * head_dim), k and v (batch, heads, length, head_dim), at most one of mask_float / mask_bool
 * (batch, heads, length) or neither, all by `strides`; out (batch, heads, head_dim) at out_batch,
 * out_head element strides, last dimension contiguous. scale is applied when `scaled` is nonzero.
 * With write_at >= 0, new_k and new_v (batch, heads, head_dim) are first copied to position write_at
 * of k and v (a KV cache; each pair writes its own row; write_at < length). */
typedef struct {
    const float *q, *mask_float, *new_k, *new_v;
    float *k, *v;
    const unsigned char *mask_bool;
    float *out;
    long batch, heads, length, head_dim;
    Strides strides;
    long out_batch, out_head;
    double scale;
    long scaled, threads, write_at;
    double q_scale; /* q is first multiplied by it (rounded, as PyTorch's q * scale) when q_scaled */
    long q_scaled;
} Call;

/* Returns 0, -1 for a bad size, -2 if out of memory. */
int blip2_decode_attention(const Call *c) {
    long batch = c->batch, heads = c->heads, length = c->length, head_dim = c->head_dim;
    if (batch < 0 || heads < 0 || length < 1 || head_dim < 1 || (c->mask_float && c->mask_bool) ||
        (c->write_at >= 0 && (c->write_at >= length || !c->new_k || !c->new_v)))
        return -1;
    const Strides *st = &c->strides;
    float scale = (float)c->scale, q_scale = (float)c->q_scale;
    long pairs = batch * heads;
    /* threads only where there is enough work to pay for waking them; results do not depend on it */
    long threads = pairs * length * head_dim / 32768 + 1;
    if (threads > c->threads) threads = c->threads;
    if (threads > pairs) threads = pairs;
    if (threads < 1) threads = 1;
    int failed = 0;
#pragma omp parallel num_threads((int)threads) reduction(| : failed)
    {
        float *scores = malloc(sizeof(float) * (length + head_dim)); /* and q scaled */
        if (!scores) {
            failed = 1;
        } else {
            int thread = omp_get_thread_num(), team = omp_get_num_threads();
            long per_thread = (pairs + team - 1) / team;
            long first = thread * per_thread, last = first + per_thread < pairs ? first + per_thread : pairs;
            for (long p = first; p < last; p++) {
                long b = p / heads, h = p % heads;
                const float *query = c->q + b * st->q_batch + h * st->q_head;
                if (c->q_scaled) {
                    float *scaled_query = scores + length;
                    for (long d = 0; d < head_dim; d++) scaled_query[d] = query[d] * q_scale;
                    query = scaled_query;
                }
                long m = b * st->mask_batch + h * st->mask_head;
                if (c->write_at >= 0) {
                    float *key = c->k + b * st->k_batch + h * st->k_head + c->write_at * st->k_pos;
                    float *value = c->v + b * st->v_batch + h * st->v_head + c->write_at * st->v_pos;
                    memcpy(key, c->new_k + b * st->new_k_batch + h * st->new_k_head, sizeof(float) * head_dim);
                    memcpy(value, c->new_v + b * st->new_v_batch + h * st->new_v_head, sizeof(float) * head_dim);
                }
                one_pair(query, c->k + b * st->k_batch + h * st->k_head,
                         c->v + b * st->v_batch + h * st->v_head, c->mask_float ? c->mask_float + m : 0,
                         c->mask_bool ? c->mask_bool + m : 0, st, length, head_dim, scale, (int)c->scaled,
                         scores, c->out + b * c->out_batch + h * c->out_head);
            }
            free(scores);
        }
    }
    return failed ? -2 : 0;
}
