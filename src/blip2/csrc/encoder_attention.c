/* An image encoder's self-attention in float32, every (image, head) pair in one call:
 *
 *     out[b, n, h] = softmax(q[b, n, h] . k[b, :, h]^T * scale) . v[b, :, h]
 *
 * read straight from the fused q/k/v projection's output (B, N, 3, H, D) and written with the heads
 * merged (B, N, H, D), ready for the output projection: no mask, every query attends to every token.
 * PyTorch's fused CPU kernel ran these shapes (257 tokens, head_dim 64 or 88) at ~30 % of the float32
 * FMA rate; here a pair's keys are transposed and its values padded once into a per-thread buffer, and
 * both products run as register tiles of 4 queries by a few vectors.
 *
 * Each (image, head) pair is computed alone, in a fixed order (scores: d ascending, one FMA each; the
 * softmax over the tokens in order of vectors, then one fixed lane reduction; the output: tokens
 * ascending, one FMA each, then times 1 / sum), so an image's result is the same bits alone or in any
 * batch, on any thread count.
 *
 * Built by blip2.native after decode_attention.c, as one unit, whose vector type and operations (vec,
 * LANES, vload, vfma, vexp, reduce, hmax...) it uses: either with -mavx2 -mfma (8 lanes) or with
 * -mavx512f (16 lanes). Here a pair runs at ~60 % of the FMA rate.
 */

#ifdef __AVX512F__
#define SCORE_VECTORS 4 /* a score tile: 4 queries x 4 vectors of keys (16 accumulators) */
#define VALUE_VECTORS 4 /* an output tile: 4 queries x 4 vectors of head_dim */
#else
#define SCORE_VECTORS 2 /* 16 registers: 4 x 2 accumulators */
#define VALUE_VECTORS 2
#endif

#define ROWS 4 /* queries per tile */

/* Scores of `rows` queries (pointers to their q) against keys [k0, k0 + nv * LANES), each a dot product
 * over d ascending, times scale; the tile's repeated rows (rows < ROWS) are computed and not stored. */
static inline void score_tile(const float *const *q, int rows, const float *keys_t, long padded, long head_dim,
                              long k0, int nv, float scale, float *scores) {
    vec acc[ROWS][SCORE_VECTORS];
    for (int r = 0; r < ROWS; r++)
        for (int c = 0; c < SCORE_VECTORS; c++)
            acc[r][c] = vzero();
    const float *key[SCORE_VECTORS];
    for (int c = 0; c < SCORE_VECTORS; c++)
        key[c] = keys_t + k0 + (c < nv ? c : 0) * LANES;
    for (long d = 0; d < head_dim; d++) {
        vec kv[SCORE_VECTORS];
        for (int c = 0; c < SCORE_VECTORS; c++)
            kv[c] = vload(key[c] + d * padded);
        for (int r = 0; r < ROWS; r++) {
            vec qb = vset1(q[r][d]);
            for (int c = 0; c < SCORE_VECTORS; c++)
                acc[r][c] = vfma(qb, kv[c], acc[r][c]);
        }
    }
    vec s = vset1(scale);
    for (int r = 0; r < rows; r++)
        for (int c = 0; c < nv; c++)
            vstore(scores + r * padded + k0 + c * LANES, vmul(acc[r][c], s));
}

/* Output vectors [d0, d0 + nv * LANES) of `rows` queries: sum over tokens of weight x value. */
static inline void value_tile(const float *weights, int rows, long padded, const float *values, long padded_dim,
                              long length, long d0, int nv, const float *inv_sum, float *out, long out_stride,
                              long head_dim) {
    vec acc[ROWS][VALUE_VECTORS];
    for (int r = 0; r < ROWS; r++)
        for (int c = 0; c < VALUE_VECTORS; c++)
            acc[r][c] = vzero();
    const float *value[VALUE_VECTORS], *weight[ROWS];
    for (int c = 0; c < VALUE_VECTORS; c++)
        value[c] = values + d0 + (c < nv ? c : 0) * LANES;
    for (int r = 0; r < ROWS; r++)
        weight[r] = weights + (r < rows ? r : 0) * padded;
    for (long t = 0; t < length; t++) {
        vec vv[VALUE_VECTORS];
        for (int c = 0; c < VALUE_VECTORS; c++)
            vv[c] = vload(value[c] + t * padded_dim);
        for (int r = 0; r < ROWS; r++) {
            vec w = vset1(weight[r][t]);
            for (int c = 0; c < VALUE_VECTORS; c++)
                acc[r][c] = vfma(w, vv[c], acc[r][c]);
        }
    }
    for (int r = 0; r < rows; r++)
        for (int c = 0; c < nv; c++) {
            long d = d0 + c * LANES;
            vec o = vmul(acc[r][c], vset1(inv_sum[r]));
            if (d + LANES <= head_dim) {
                vstore(out + r * out_stride + d, o);
            } else {
                float lanes[LANES];
                vstore(lanes, o);
                memcpy(out + r * out_stride + d, lanes, sizeof(float) * (size_t)(head_dim - d));
            }
        }
}

/* Softmax numerators in place over [0, length) of one row (the padding past it set to 0); returns
 * 1 / their sum. */
static inline float softmax_row(float *row, long length, long padded) {
    for (long t = length; t < padded; t++)
        row[t] = -__builtin_inff();
    vec m = vset1(-__builtin_inff());
    for (long t = 0; t < padded; t += LANES)
        m = vmax(m, vload(row + t));
    vec top = vset1(hmax(m)), sum = vzero();
    for (long t = 0; t < padded; t += LANES) {
        vec e = vexp(vsub(vload(row + t), top));
        vstore(row + t, e);
        sum = vadd(sum, e);
    }
    return 1.0f / reduce(sum);
}

/* One (image, head) pair. scratch: keys_t (head_dim x padded), values (length x padded_dim), scores
 * (ROWS x padded). */
static void encoder_pair(const float *qkv, long length, long heads, long head_dim, float scale, long b, long h,
                     float *out, float *scratch) {
    const long padded = (length + LANES - 1) / LANES * LANES;
    const long padded_dim = (head_dim + LANES - 1) / LANES * LANES;
    const long token_stride = 3 * heads * head_dim, width = heads * head_dim;
    float *keys_t = scratch, *values = keys_t + head_dim * padded, *scores = values + length * padded_dim;
    const float *base = qkv + b * length * token_stride + h * head_dim;
    for (long t = 0; t < length; t++) {
        const float *k = base + t * token_stride + width, *v = k + width;
        for (long d = 0; d < head_dim; d++)
            keys_t[d * padded + t] = k[d];
        memcpy(values + t * padded_dim, v, sizeof(float) * (size_t)head_dim);
        memset(values + t * padded_dim + head_dim, 0, sizeof(float) * (size_t)(padded_dim - head_dim));
    }
    for (long d = 0; d < head_dim; d++)
        memset(keys_t + d * padded + length, 0, sizeof(float) * (size_t)(padded - length));
    const long vectors = padded / LANES, dim_vectors = padded_dim / LANES;
    for (long i0 = 0; i0 < length; i0 += ROWS) {
        int rows = length - i0 < ROWS ? (int)(length - i0) : ROWS;
        const float *q[ROWS];
        for (int r = 0; r < ROWS; r++)
            q[r] = base + (i0 + (r < rows ? r : 0)) * token_stride;
        for (long c = 0; c < vectors; c += SCORE_VECTORS) {
            int nv = vectors - c < SCORE_VECTORS ? (int)(vectors - c) : SCORE_VECTORS;
            score_tile(q, rows, keys_t, padded, head_dim, c * LANES, nv, scale, scores);
        }
        float inv_sum[ROWS];
        for (int r = 0; r < rows; r++)
            inv_sum[r] = softmax_row(scores + r * padded, length, padded);
        float *o = out + (b * length + i0) * width + h * head_dim;
        for (long c = 0; c < dim_vectors; c += VALUE_VECTORS) {
            int nv = dim_vectors - c < VALUE_VECTORS ? (int)(dim_vectors - c) : VALUE_VECTORS;
            value_tile(scores, rows, padded, values, padded_dim, length, c * LANES, nv, inv_sum, o, width,
                       head_dim);
        }
    }
}

/* qkv (batch, length, 3, heads, head_dim) contiguous -> out (batch, length, heads, head_dim). Returns 0,
 * -1 for sizes it does not take, -2 when memory runs out. */
int blip2_encoder_attention(const float *qkv, long batch, long length, long heads, long head_dim, float scale,
                            float *out, int threads) {
    if (batch < 0 || length <= 0 || heads <= 0 || head_dim <= 0)
        return -1;
    const long padded = (length + LANES - 1) / LANES * LANES;
    const long padded_dim = (head_dim + LANES - 1) / LANES * LANES;
    const size_t floats = (size_t)(head_dim * padded + length * padded_dim + ROWS * padded);
    const long pairs = batch * heads;
    int failed = 0;
#pragma omp parallel num_threads(threads) reduction(| : failed)
    {
        float *scratch = aligned_alloc(64, (floats * sizeof(float) + 63) / 64 * 64);
        if (!scratch)
            failed = 1;
#pragma omp for schedule(static)
        for (long p = 0; p < pairs; p++)
            if (scratch)
                encoder_pair(qkv, length, heads, head_dim, scale, p / heads, p % heads, out, scratch);
        free(scratch);
    }
    return failed ? -2 : 0;
}
