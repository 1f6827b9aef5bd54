/* One decode step of a whole OPT-style decoder in one call: every layer, for a few rows at one new
 * position each.
 *
 * In PyTorch each layer of a decode step is ~40 operator and module calls around its six matrix
 * products; with low-bit weights those calls take about a third of the step (~2 ms of ~6 at OPT-350m's
 * shape). Here the caller describes the decoder once (each linear layer as a function and the argument
 * it takes, e.g. blip2_lowbit_linear and its layer) and each step passes the rows, the caches and the
 * mask. A layer, per row (LN = LayerNorm, attn = blip2_decode_attention):
 *
 *     pre-norm:   x = x + out(attn(LN1(x)));   x = x + fc2(relu(fc1(LN2(x))))
 *     post-norm:  x = LN1(x + out(attn(x)));   x = LN2(x + fc2(relu(fc1(x))))
 *
 * attn writes the step's keys and values into the layer's cache at `position`, then the query (times
 * q_scale, rounded as q * q_scale) attends to positions [0, position] where the mask allows. Every row
 * goes through the same operations whatever the other rows, as in the kernels it calls.
 *
 * blip2.native compiles this file after decode_attention.c, as one unit, with that file's flags.
 */

/* A linear layer y (rows, out) = x (rows, in) W^T + b: returns 0, or what the kernel's error is. */
typedef int (*LinearFn)(const void *layer, const float *x, long rows, float *y, int threads);

typedef struct {
    LinearFn run;
    const void *layer;
} Linear;

typedef struct {
    Linear q, k, v, out, fc1, fc2;
    const float *norm1_weight, *norm1_bias, *norm2_weight, *norm2_bias; /* NULL: no affine part */
} Block;

typedef struct {
    const Block *blocks;
    long layers, hidden, heads, mlp, pre_norm;
    double eps, q_scale;
} Decoder;

typedef struct {
    float *x;                  /* (rows, hidden), updated in place */
    float *const *caches;      /* 2 per layer, keys then values: (rows, heads, max_len, head_dim) */
    const unsigned char *mask; /* (rows, position + 1) at mask_row elements per row: 1 = attend */
    float *work;               /* (rows, 5 * hidden + mlp) */
    long rows, max_len, position, mask_row, threads;
} Step;

/* y = (x - mean) / sqrt(var + eps) * weight + bias over one row of n (y may be x) */
static void layer_norm(const float *x, const float *weight, const float *bias, long n, float eps, float *y)
{
    float sum = 0.0f;
#pragma omp simd reduction(+ : sum)
    for (long d = 0; d < n; d++)
        sum += x[d];
    float mean = sum / (float)n, squares = 0.0f;
#pragma omp simd reduction(+ : squares)
    for (long d = 0; d < n; d++)
        squares += (x[d] - mean) * (x[d] - mean);
    float rstd = 1.0f / sqrtf(squares / (float)n + eps);
    for (long d = 0; d < n; d++) {
        float v = (x[d] - mean) * rstd;
        y[d] = weight ? v * weight[d] + (bias ? bias[d] : 0.0f) : v;
    }
}

static void layer_norm_rows(const float *x, const float *weight, const float *bias, long rows, long n, float eps,
                            float *y)
{
    for (long r = 0; r < rows; r++)
        layer_norm(x + r * n, weight, bias, n, eps, y + r * n);
}

static void add_into(float *x, const float *y, long n)
{
#pragma omp simd
    for (long i = 0; i < n; i++)
        x[i] += y[i];
}

static void relu(float *x, long n)
{
#pragma omp simd
    for (long i = 0; i < n; i++)
        x[i] = x[i] > 0.0f ? x[i] : 0.0f;
}

/* A decode step's self-attention call over one layer's KV cache (rows, heads, max_len, head_dim): the
 * step's keys and values written at `position` first, then positions [0, position] attended to; q, k, v
 * and out are (rows, heads * head_dim). Callers add the mask, the scales. */
static Call cached_attention(const float *q, const float *k, const float *v, float *k_cache, float *v_cache,
                             float *out, long rows, long heads, long head_dim, long max_len, long position,
                             long threads)
{
    long inner = heads * head_dim, k_head = max_len * head_dim, k_batch = heads * k_head;
    Call c = {0};
    c.q = q;
    c.new_k = k;
    c.new_v = v;
    c.k = k_cache;
    c.v = v_cache;
    c.out = out;
    c.batch = rows;
    c.heads = heads;
    c.length = position + 1;
    c.head_dim = head_dim;
    c.strides = (Strides){inner, head_dim, k_batch, k_head, head_dim, k_batch, k_head, head_dim,
                          0,     0,        1,       inner,  head_dim, inner,  head_dim};
    c.out_batch = inner;
    c.out_head = head_dim;
    c.scale = 1.0;
    c.threads = threads;
    c.write_at = position;
    return c;
}

static int attend(const Decoder *d, const Step *s, long layer, const float *q, const float *k, const float *v,
                  float *out)
{
    Call c = cached_attention(q, k, v, s->caches[2 * layer], s->caches[2 * layer + 1], out, s->rows, d->heads,
                              d->hidden / d->heads, s->max_len, s->position, s->threads);
    c.mask_bool = s->mask;
    c.strides.mask_batch = s->mask_row;
    c.q_scale = d->q_scale;
    c.q_scaled = 1;
    return blip2_decode_attention(&c);
}

#define RUN(linear, x, y)                                                                \
    do {                                                                                 \
        int status_ = (linear).run((linear).layer, (x), rows, (y), (int)s->threads);     \
        if (status_)                                                                     \
            return status_;                                                              \
    } while (0)

static int block_step(const Decoder *d, const Step *s, long layer)
{
    const Block *b = d->blocks + layer;
    long rows = s->rows, hidden = d->hidden, n = rows * hidden;
    float eps = (float)d->eps;
    float *x = s->x, *normed = s->work, *q = normed + n, *k = q + n, *v = k + n, *attended = v + n,
          *mlp = attended + n;
    const float *input = x;
    if (d->pre_norm) {
        layer_norm_rows(x, b->norm1_weight, b->norm1_bias, rows, hidden, eps, normed);
        input = normed;
    }
    RUN(b->q, input, q);
    RUN(b->k, input, k);
    RUN(b->v, input, v);
    int status = attend(d, s, layer, q, k, v, attended);
    if (status)
        return status;
    RUN(b->out, attended, normed);
    add_into(x, normed, n);
    if (!d->pre_norm)
        layer_norm_rows(x, b->norm1_weight, b->norm1_bias, rows, hidden, eps, x);
    input = x;
    if (d->pre_norm) {
        layer_norm_rows(x, b->norm2_weight, b->norm2_bias, rows, hidden, eps, normed);
        input = normed;
    }
    RUN(b->fc1, input, mlp);
    relu(mlp, rows * d->mlp);
    RUN(b->fc2, mlp, q); /* q is free again */
    add_into(x, q, n);
    if (!d->pre_norm)
        layer_norm_rows(x, b->norm2_weight, b->norm2_bias, rows, hidden, eps, x);
    return 0;
}

/* Returns 0; -1 for sizes it does not take; else the first failing kernel's status. */
int blip2_decoder_step(const Decoder *d, const Step *s)
{
    if (d->layers < 1 || d->hidden < 1 || d->heads < 1 || d->hidden % d->heads || d->mlp < 1 || s->rows < 1 ||
        s->position < 0 || s->position >= s->max_len || s->mask_row < s->position + 1)
        return -1;
    for (long layer = 0; layer < d->layers; layer++) {
        int status = block_step(d, s, layer);
        if (status)
            return status;
    }
    return 0;
}

/* ---- T5 v1.1 / Flan-T5 decoders --------------------------------------------------------------------------
 *
 * A layer, per row (RMS = T5's norm: x / sqrt(mean(x^2) + eps) * weight; no biases; no attention scale):
 *
 *     x = x + o(attn(RMS1(x), self cache, position bias + mask))
 *     x = x + cross_o(attn(cross_q(RMS_cross(x)), the encoder's keys and values, its padding mask))
 *     x = x + wo(gelu_tanh(wi0(RMS2(x))) * wi1(RMS2(x)))
 *
 * The self-attention's additive bias (the relative position bias and the causal / padding mask, made
 * once per step by the caller) and the cross-attention's (the encoder's padding) are float masks of the
 * attention kernel. */

typedef struct {
    Linear q, k, v, o, cross_q, cross_o, wi0, wi1, wo;
    const float *norm1, *norm_cross, *norm2; /* the RMS norms' weights */
} T5Block;

/* A T5 or LLaMA decoder: `blocks` are `layers` T5Blocks or LlamaBlocks. */
typedef struct {
    const void *blocks;
    long layers, hidden, heads, kv_heads, head_dim, mlp; /* kv_heads: T5's are its heads */
    double eps;
} GatedDecoder;

/* The T5 and LLaMA steps' work buffer: rows * (2 * hidden + 4 * heads * head_dim + 2 * mlp) floats. */
typedef struct {
    float *normed, *out, *q, *k, *v, *attended, *gate, *up;
} GatedWork;

static GatedWork gated_work(const GatedDecoder *d, float *work, long rows)
{
    long n = rows * d->hidden, inner = rows * d->heads * d->head_dim;
    GatedWork w;
    w.normed = work;
    w.out = w.normed + n;
    w.q = w.out + n;
    w.k = w.q + inner;
    w.v = w.k + inner;
    w.attended = w.v + inner;
    w.gate = w.attended + inner;
    w.up = w.gate + rows * d->mlp;
    return w;
}

typedef struct {
    float *x;                  /* (rows, hidden), updated in place */
    float *const *caches;      /* 2 per layer, keys then values: (rows, heads, max_len, head_dim) */
    float *const *cross;       /* 2 per layer, the encoder's keys then values, at the cross_* strides */
    const float *bias;         /* (rows or 1, heads, >= position + 1) at bias_* strides, positions contiguous */
    const float *cross_bias;   /* (rows, cross_len) at cross_bias_row elements a row */
    float *work;               /* rows * (2 * hidden + 4 * heads * head_dim + 2 * mlp) */
    long rows, max_len, position, threads;
    long bias_batch, bias_head;
    long cross_len, cross_batch, cross_head, cross_pos;
    long cross_bias_row;
} T5Step;

/* y = x / sqrt(mean(x^2) + eps) * weight over each row of n (y may be x) */
static void rms_norm_rows(const float *x, const float *weight, long rows, long n, float eps, float *y)
{
    for (long r = 0; r < rows; r++) {
        const float *row = x + r * n;
        float squares = 0.0f;
#pragma omp simd reduction(+ : squares)
        for (long d = 0; d < n; d++)
            squares += row[d] * row[d];
        float scale = 1.0f / sqrtf(squares / (float)n + eps);
        for (long d = 0; d < n; d++)
            y[r * n + d] = weight[d] * (row[d] * scale);
    }
}

/* gate = act(gate) * up over rows of n, each element by the same vector operations whatever the row count
 * (a row's tail in a masked vector); act is gelu_tanh (PyTorch's gelu(approximate="tanh")) or silu. */
static inline vec gelu_tanh(vec x) {
    vec inner = vmul(vset1(0.7978845608028654f), vadd(x, vmul(vset1(0.044715f), vmul(vmul(x, x), x))));
    return vmul(vmul(vset1(0.5f), x), vadd(vset1(1.0f), vtanh(inner)));
}

static inline vec silu(vec x) { return vmul(x, vsigmoid(x)); }

static void gated_rows(float *gate, const float *up, long rows, long n, int gelu)
{
    long full = n / LANES * LANES;
    tail_mask mask = make_tail_mask(n - full);
    for (long r = 0; r < rows; r++) {
        float *g = gate + r * n;
        const float *u = up + r * n;
        for (long i = 0; i < full; i += LANES) {
            vec x = vload(g + i);
            vstore(g + i, vmul(gelu ? gelu_tanh(x) : silu(x), vload(u + i)));
        }
        if (full < n) {
            vec x = vload_tail(g + full, mask);
            vstore_tail(g + full, vmul(gelu ? gelu_tanh(x) : silu(x), vload_tail(u + full, mask)), mask);
        }
    }
}

static int t5_attend(const GatedDecoder *d, const T5Step *s, long layer, int cross, const float *q, const float *k,
                     const float *v, float *out)
{
    long heads = d->heads, head_dim = d->head_dim;
    Call c = cached_attention(q, k, v, s->caches[2 * layer], s->caches[2 * layer + 1], out, s->rows, heads,
                              head_dim, s->max_len, s->position, s->threads);
    if (cross) { /* the encoder's keys and values, nothing written */
        c.new_k = c.new_v = 0;
        c.write_at = -1;
        c.k = s->cross[2 * layer];
        c.v = s->cross[2 * layer + 1];
        c.length = s->cross_len;
        c.strides.k_batch = c.strides.v_batch = s->cross_batch;
        c.strides.k_head = c.strides.v_head = s->cross_head;
        c.strides.k_pos = c.strides.v_pos = s->cross_pos;
        c.mask_float = s->cross_bias;
        c.strides.mask_batch = s->cross_bias_row;
    } else {
        c.mask_float = s->bias;
        c.strides.mask_batch = s->bias_batch;
        c.strides.mask_head = s->bias_head;
    }
    return blip2_decode_attention(&c);
}

/* x += wo(act(wi0(RMS(x))) * wi1(RMS(x))) over rows (act: gelu_tanh or silu); work: normed (rows, hidden),
 * gate and up (rows, mlp), out (rows, hidden). */
static int gated_feed_forward(const Linear *wi0, const Linear *wi1, const Linear *wo, const float *norm, float *x,
                              long rows, long hidden, long mlp, float eps, int gelu, float *normed, float *gate,
                              float *up, float *out, long threads)
{
    int status;
    rms_norm_rows(x, norm, rows, hidden, eps, normed);
    if ((status = wi0->run(wi0->layer, normed, rows, gate, (int)threads)) ||
        (status = wi1->run(wi1->layer, normed, rows, up, (int)threads)))
        return status;
    gated_rows(gate, up, rows, mlp, gelu);
    if ((status = wo->run(wo->layer, gate, rows, out, (int)threads)))
        return status;
    add_into(x, out, rows * hidden);
    return 0;
}

static int t5_block_step(const GatedDecoder *d, const T5Step *s, long layer)
{
    const T5Block *b = (const T5Block *)d->blocks + layer;
    long rows = s->rows, hidden = d->hidden, n = rows * hidden;
    float eps = (float)d->eps;
    GatedWork w = gated_work(d, s->work, rows);
    float *x = s->x, *normed = w.normed, *out = w.out, *q = w.q, *k = w.k, *v = w.v, *attended = w.attended;
    int status;
    rms_norm_rows(x, b->norm1, rows, hidden, eps, normed);
    RUN(b->q, normed, q);
    RUN(b->k, normed, k);
    RUN(b->v, normed, v);
    if ((status = t5_attend(d, s, layer, 0, q, k, v, attended)))
        return status;
    RUN(b->o, attended, out);
    add_into(x, out, n);
    rms_norm_rows(x, b->norm_cross, rows, hidden, eps, normed);
    RUN(b->cross_q, normed, q);
    if ((status = t5_attend(d, s, layer, 1, q, 0, 0, attended)))
        return status;
    RUN(b->cross_o, attended, out);
    add_into(x, out, n);
    return gated_feed_forward(&b->wi0, &b->wi1, &b->wo, b->norm2, x, rows, hidden, d->mlp, eps, 1, normed, w.gate,
                              w.up, out, s->threads);
}

/* Returns 0; -1 for sizes it does not take; else the first failing kernel's status. */
int blip2_t5_decoder_step(const GatedDecoder *d, const T5Step *s)
{
    if (d->layers < 1 || d->hidden < 1 || d->heads < 1 || d->kv_heads != d->heads || d->head_dim < 1 ||
        d->mlp < 1 || s->rows < 1 || s->position < 0 || s->position >= s->max_len || s->cross_len < 1)
        return -1;
    for (long layer = 0; layer < d->layers; layer++) {
        int status = t5_block_step(d, s, layer);
        if (status)
            return status;
    }
    return 0;
}

/* ---- LLaMA decoders (Vicuna in InstructBLIP) --------------------------------------------------------------
 *
 * A layer, per row (RMS as T5's; rotary positions on the queries and keys with the row's cos and sin;
 * the attention scaled by 1 / sqrt(head_dim); keys and values of as many heads as the queries):
 *
 *     x = x + o(attn(rope(q(RMS1(x))), rope(k(RMS1(x))), v(RMS1(x)), cache, mask))
 *     x = x + wo(silu(wi0(RMS2(x))) * wi1(RMS2(x)))
 */

typedef struct {
    Linear q, k, v, o, wi0, wi1, wo;
    const float *norm1, *norm2; /* the RMS norms' weights */
} LlamaBlock;

typedef struct {
    float *x;                  /* (rows, hidden), updated in place */
    float *const *caches;      /* 2 per layer, keys then values: (rows, kv_heads, max_len, head_dim) */
    const unsigned char *mask; /* (rows, position + 1) at mask_row elements per row: 1 = attend */
    const float *cos, *sin;    /* (rows, head_dim): the rotation at each row's position */
    float *work;               /* rows * (2 * hidden + 4 * heads * head_dim + 2 * mlp) */
    long rows, max_len, position, mask_row, threads;
} LlamaStep;

/* x (rows, heads * head_dim) rotated in place: pairs (i, i + head_dim / 2) of each head, as
 * x * cos + rotate_half(x) * sin with rotate_half(x) = (-x[half:], x[:half]) */
static void rotate_rows(float *x, const float *cos, const float *sin, long rows, long heads, long head_dim)
{
    long half = head_dim / 2;
    for (long r = 0; r < rows; r++)
        for (long h = 0; h < heads; h++) {
            float *v = x + (r * heads + h) * head_dim;
            const float *c = cos + r * head_dim, *s = sin + r * head_dim;
            for (long i = 0; i < half; i++) {
                float a = v[i], b = v[i + half];
                v[i] = a * c[i] + (-b) * s[i];
                v[i + half] = b * c[i + half] + a * s[i + half];
            }
        }
}

static int llama_block_step(const GatedDecoder *d, const LlamaStep *s, long layer)
{
    const LlamaBlock *b = (const LlamaBlock *)d->blocks + layer;
    long rows = s->rows, hidden = d->hidden, heads = d->heads, kv_heads = d->kv_heads, head_dim = d->head_dim,
         n = rows * hidden;
    float eps = (float)d->eps;
    GatedWork w = gated_work(d, s->work, rows);
    float *x = s->x, *normed = w.normed, *out = w.out, *q = w.q, *k = w.k, *v = w.v, *attended = w.attended;
    rms_norm_rows(x, b->norm1, rows, hidden, eps, normed);
    RUN(b->q, normed, q);
    RUN(b->k, normed, k);
    RUN(b->v, normed, v);
    rotate_rows(q, s->cos, s->sin, rows, heads, head_dim);
    rotate_rows(k, s->cos, s->sin, rows, kv_heads, head_dim);
    /* Query head h attends with key/value head h / group: one call per place r in the groups, over the
     * query heads r, group + r, ... (the first call writes the step's keys and values into the cache). */
    long group = heads / kv_heads;
    for (long r = 0; r < group; r++) {
        Call c = cached_attention(q + r * head_dim, k, v, s->caches[2 * layer], s->caches[2 * layer + 1],
                                  attended + r * head_dim, rows, kv_heads, head_dim, s->max_len, s->position,
                                  s->threads);
        c.strides.q_batch = c.out_batch = heads * head_dim;
        c.strides.q_head = c.out_head = group * head_dim;
        if (r > 0)
            c.write_at = -1;
        c.mask_bool = s->mask;
        c.strides.mask_batch = s->mask_row;
        c.scale = 1.0 / sqrt((double)head_dim);
        c.scaled = 1;
        int status = blip2_decode_attention(&c);
        if (status)
            return status;
    }
    RUN(b->o, attended, out);
    add_into(x, out, n);
    return gated_feed_forward(&b->wi0, &b->wi1, &b->wo, b->norm2, x, rows, hidden, d->mlp, eps, 0, normed, w.gate,
                              w.up, out, s->threads);
}

/* Returns 0; -1 for sizes it does not take; else the first failing kernel's status. */
int blip2_llama_decoder_step(const GatedDecoder *d, const LlamaStep *s)
{
    if (d->layers < 1 || d->hidden < 1 || d->heads < 1 || d->kv_heads < 1 || d->heads % d->kv_heads ||
        d->head_dim < 2 || d->head_dim % 2 || d->mlp < 1 || s->rows < 1 || s->position < 0 ||
        s->position >= s->max_len || s->mask_row < s->position + 1)
        return -1;
    for (long layer = 0; layer < d->layers; layer++) {
        int status = llama_block_step(d, s, layer);
        if (status)
            return status;
    }
    return 0;
}
