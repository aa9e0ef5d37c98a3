/* Dr.LLM router decisions on CPU in one call per decoder layer (retrofit/kernels/router_cpu.py builds and loads it).
 *
 * For each row r of a batch: window means m = A[r] @ hidden[r] ([W, d]), pre = m @ w1 + b1 ([W, b]), GELU (tanh
 * form), the valid windows' weighted average of the hidden units ([b]), logits = w2 @ avg + bias ([3]: skip,
 * execute, repeat, the budget knob folded into bias). code[r] = 1 + argmax, or 0 when a window mean is not finite.
 * The torch path is five ATen ops a layer, each paying tens of microseconds for caches the decoder layer before it
 * has flushed; this is one call whose cost is its arithmetic and one read of fc1's weight.
 *
 * Built with -O3 -march=native -ffast-math: the finiteness check reads the exponent bits (fast-math may assume
 * finite floats, integer tests survive it) and the caller passes finite biases (a masked action gets -1e30).
 * GCC/Clang vector extensions: 16-float vectors, lowered to whatever the machine has.
 */
#include <math.h>
#include <stdint.h>
#include <string.h>

typedef float v16 __attribute__((vector_size(64)));

static inline int finite_bits(float x) {
    uint32_t u;
    memcpy(&u, &x, 4);
    return (u & 0x7f800000u) != 0x7f800000u;
}

static inline v16 load16(const float *p) { v16 x; memcpy(&x, p, 64); return x; }
static inline void store16(float *p, v16 x) { memcpy(p, &x, 64); }

/* pre[w, k0:k0+32] = m[w, :] @ w1b[k0/32] for windows w0..w0+nw (nw <= 8): the 32-unit block of fc1's weight,
 * stored [d, 32] contiguous, is read once, in order, for up to 8 windows; the 16 accumulators stay in registers. */
static void fc1_block8x32(int d, int b, int nw, const float *m, const float *blk, int k0, float *pre) {
    v16 acc[8][2];
    for (int w = 0; w < 8; w++) acc[w][0] = acc[w][1] = (v16){0};
    for (int j = 0; j < d; j++) {
        v16 x0 = load16(blk + (long)j * 32), x1 = load16(blk + (long)j * 32 + 16);
        for (int w = 0; w < 8; w++) {
            if (w < nw) {
                float c = m[(long)w * d + j];
                acc[w][0] += c * x0;
                acc[w][1] += c * x1;
            }
        }
    }
    for (int w = 0; w < nw; w++) {
        store16(pre + (long)w * b + k0, acc[w][0]);
        store16(pre + (long)w * b + k0 + 16, acc[w][1]);
    }
}

/* One call per layer: args (int64) = B, T, d, W, b, hidden, hs_b, hs_t, A, a_b, ww, ww_b, w1b, b1, w2, bias,
 * work, codes, logits (pointers as integers). B rows; hidden [B, T, d] with strides (hs_b, hs_t, 1); A [B, W, T]
 * with batch stride a_b (0 = shared); ww [B, W] with batch stride ww_b: the valid windows' weights (sum 1);
 * w1b [b / 32, d, 32] (fc1's weight in blocks of 32 units; b a multiple of 32, padded with zero units); b1 [b];
 * w2 [3, b] (fc2's weight); bias [3]; work: W * d + W * b floats;
 * codes [B] int64 out; logits [B, 3] out or 0. Returns the codes' counts packed in 16-bit fields: not finite,
 * skip, execute, repeat (B < 65536), so the caller learns which rows run the layer without reading the codes. */
int64_t retrofit_router_codes(const int64_t *args) {
    int B = (int)args[0], T = (int)args[1], d = (int)args[2], W = (int)args[3], b = (int)args[4];
    const float *hidden = (const float *)(intptr_t)args[5];
    long hs_b = (long)args[6], hs_t = (long)args[7];
    const float *A = (const float *)(intptr_t)args[8];
    long a_b = (long)args[9];
    const float *ww = (const float *)(intptr_t)args[10];
    long ww_b = (long)args[11];
    const float *w1b = (const float *)(intptr_t)args[12], *b1 = (const float *)(intptr_t)args[13];
    const float *w2 = (const float *)(intptr_t)args[14], *bias = (const float *)(intptr_t)args[15];
    float *work = (float *)(intptr_t)args[16];
    int64_t *codes = (int64_t *)(intptr_t)args[17];
    float *logits = (float *)(intptr_t)args[18];
    int64_t counts[4] = {0, 0, 0, 0};
    float *means = work, *pre = work + (long)W * d;
    for (int r = 0; r < B; r++) {
        const float *h = hidden + r * hs_b;
        const float *a = A + r * a_b;
        const float *wr = ww + r * ww_b;
        int finite = 1;
        for (int w = 0; w < W; w++) {
            float *m = means + (long)w * d;
            for (int j = 0; j < d; j++) m[j] = 0.f;
            for (int t = 0; t < T; t++) {
                float c = a[(long)w * T + t];
                if (c == 0.f) continue;
                const float *ht = h + t * hs_t;
                for (int j = 0; j < d; j++) m[j] += c * ht[j];
            }
            for (int j = 0; j < d; j++) finite &= finite_bits(m[j]);
        }
        for (int w0 = 0; w0 < W; w0 += 8) {
            int nw = W - w0 < 8 ? W - w0 : 8;
            for (int k0 = 0; k0 < b; k0 += 32)
                fc1_block8x32(d, b, nw, means + (long)w0 * d, w1b + (long)k0 * d, k0, pre + (long)w0 * b);
        }
        for (int w = 0; w < W; w++) {
            float *p = pre + (long)w * b;
            for (int k = 0; k < b; k++) {
                float x = p[k] + b1[k];
                float u = 0.7978845608028654f * (x + 0.044715f * x * x * x);
                u = u > 20.f ? 20.f : (u < -20.f ? -20.f : u);
                p[k] = x / (1.f + expf(-2.f * u));  /* x * (1 + tanh u) / 2 */
            }
        }
        float lg[3];
        for (int o = 0; o < 3; o++) lg[o] = bias[o];
        for (int w = 0; w < W; w++) {
            float c = wr[w];
            if (c == 0.f) continue;
            const float *p = pre + (long)w * b;
            for (int o = 0; o < 3; o++) {
                float s = 0.f;
                for (int k = 0; k < b; k++) s += p[k] * w2[(long)o * b + k];
                lg[o] += c * s;
            }
        }
        int best = 0;
        for (int o = 1; o < 3; o++)
            if (lg[o] > lg[best]) best = o;
        codes[r] = finite ? 1 + best : 0;
        counts[codes[r]]++;
        if (logits)
            for (int o = 0; o < 3; o++) logits[r * 3 + o] = lg[o];
    }
    return counts[0] | counts[1] << 16 | counts[2] << 32 | counts[3] << 48;
}
