"""Small C kernels for one-row (decoding) steps on CPU in bf16, built on first use.

A decoding step multiplies one row per sequence by every weight matrix and attends with
one query row per (sequence, head) over the cached keys and values. torch's general
kernels do that well below memory speed on CPU: each small operation between the matrix
products (norms, rotary embedding, SiLU) costs a dispatch and a pass over threads that
are longer than its arithmetic, its matrix-vector product streams layer-sized weights
~10% slower than a plain loop does, and its attention over many small matrices is slower
still (a 16-row step of a 1.8B model spent 40-60 ms of ~220 in attention). The kernels:

- :func:`linear_row`: ``F.linear`` of one row (a matrix-vector product with float32
  accumulation, in parallel over output rows; AVX512-BF16 dot products where the CPU
  has them);
- :func:`swiglu_row`: the MLP's ``w1(x) * silu(w2(x))`` for one row, both products and
  the gate in one pass;
- :func:`rms_norm`: the model's RMSNorm (float32, rounded, times the weight);
- :func:`rotary_qk`: the rotary embedding of one step's queries and keys;
- :func:`decode_attention`: ``softmax(q k^T * scaling, masked) v`` per (row, head) in
  float32 from the bf16 cache in place (no float copy of the cache), skipping masked
  (padding) keys, in parallel over rows and heads;
- :class:`BlockSteps`: every block of a single-sequence decoding step in one call, the
  kernels above in turn with the step's keys and values written into the cache's
  buffers, so that no Python runs between the blocks' kernels (each Python operation
  between two products costs 3-5x its warm time: the product has just streamed its
  weights through the CPU's caches).

Each rounds to bf16 where the torch code it replaces does, so results differ from it
only by the order of float32 sums (rarely a last bf16 bit).

The C source below is compiled with the system C compiler (``$CC``, else ``cc``/``gcc``,
``-O3 -march=native -fopenmp``; about 0.5 s) the first time it is needed and cached
under ``$QWEN_KERNEL_CACHE`` (default ``~/.cache/qwen/kernels``; when that cannot be
written, a private ``qwen-kernels-<uid>`` directory in the system's temporary directory,
used only while it is the user's own and writable by nobody else), keyed by the source,
the compiler and the CPU's feature flags. Without a compiler, or with
``QWEN_CPU_KERNELS=0``, every function here returns ``None`` and the model runs its torch
code as before.
"""

from __future__ import annotations

import ctypes
import functools
import hashlib
import logging
import os
import platform
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path
from types import SimpleNamespace

import torch

logger = logging.getLogger(__name__)

_CPU = torch.device("cpu")

_SOURCE = r"""
#include <stdint.h>
#include <math.h>
#if defined(__AVX512F__)
#include <immintrin.h>
#endif

static inline float bf16_to_float(uint16_t v) {
    union { uint32_t u; float f; } c;
    c.u = (uint32_t)v << 16;
    return c.f;
}

static inline uint16_t float_to_bf16(float f) {  /* round to nearest even; NaN stays NaN */
    union { uint32_t u; float f; } c;
    c.f = f;
    if ((c.u & 0x7fffffffu) > 0x7f800000u) return (uint16_t)((c.u >> 16) | 0x40);
    return (uint16_t)((c.u + 0x7fffu + ((c.u >> 16) & 1u)) >> 16);
}

#if defined(__AVX512F__)
static inline __m512 load16(const uint16_t *p) {
    __m512i wide = _mm512_cvtepu16_epi32(_mm256_loadu_si256((const __m256i *)p));
    return _mm512_castsi512_ps(_mm512_slli_epi32(wide, 16));
}
#endif

/* Scores of one query row against the kept keys (masked ones: -INFINITY); returns their max. */
static float scores(const uint16_t *qp, const uint16_t *kp, int64_t ks_l, const uint8_t *keep,
                    int64_t L, int64_t D, float scale, float *s, float *qf) {
    float m = -INFINITY;
#if defined(__AVX512F__)
    if (D == 128) {
        __m512 q[8];
        for (int j = 0; j < 8; j++) q[j] = load16(qp + 16 * j);
        for (int64_t l = 0; l < L; l++) {
            if (keep && !keep[l]) { s[l] = -INFINITY; continue; }
            const uint16_t *row = kp + l * ks_l;
            __m512 a = _mm512_mul_ps(q[0], load16(row)), b = _mm512_mul_ps(q[1], load16(row + 16));
            a = _mm512_fmadd_ps(q[2], load16(row + 32), a);
            b = _mm512_fmadd_ps(q[3], load16(row + 48), b);
            a = _mm512_fmadd_ps(q[4], load16(row + 64), a);
            b = _mm512_fmadd_ps(q[5], load16(row + 80), b);
            a = _mm512_fmadd_ps(q[6], load16(row + 96), a);
            b = _mm512_fmadd_ps(q[7], load16(row + 112), b);
            s[l] = _mm512_reduce_add_ps(_mm512_add_ps(a, b)) * scale;
            if (s[l] > m) m = s[l];
        }
        return m;
    }
#endif
    for (int64_t d = 0; d < D; d++) qf[d] = bf16_to_float(qp[d]);
    for (int64_t l = 0; l < L; l++) {
        if (keep && !keep[l]) { s[l] = -INFINITY; continue; }
        const uint16_t *row = kp + l * ks_l;
        float dot = 0.f;
        #pragma omp simd reduction(+:dot)
        for (int64_t d = 0; d < D; d++) dot += qf[d] * bf16_to_float(row[d]);
        s[l] = dot * scale;
        if (s[l] > m) m = s[l];
    }
    return m;
}

/* acc = sum_l w[l] * v[l] over the keys with nonzero weight, written to op as bf16. */
static void weighted_values(const float *w, const uint16_t *vp, int64_t vs_l, int64_t L, int64_t D,
                            float *acc, uint16_t *op) {
#if defined(__AVX512F__)
    if (D == 128) {
        __m512 a[8];
        for (int j = 0; j < 8; j++) a[j] = _mm512_setzero_ps();
        for (int64_t l = 0; l < L; l++) {
            if (w[l] == 0.f) continue;
            const uint16_t *row = vp + l * vs_l;
            __m512 x = _mm512_set1_ps(w[l]);
            for (int j = 0; j < 8; j++) a[j] = _mm512_fmadd_ps(x, load16(row + 16 * j), a[j]);
        }
        for (int j = 0; j < 8; j++) _mm512_storeu_ps(acc + 16 * j, a[j]);
        for (int64_t d = 0; d < D; d++) op[d] = float_to_bf16(acc[d]);
        return;
    }
#endif
    for (int64_t d = 0; d < D; d++) acc[d] = 0.f;
    for (int64_t l = 0; l < L; l++) {
        if (w[l] == 0.f) continue;
        const uint16_t *row = vp + l * vs_l;
        float x = w[l];
        #pragma omp simd
        for (int64_t d = 0; d < D; d++) acc[d] += x * bf16_to_float(row[d]);
    }
    for (int64_t d = 0; d < D; d++) op[d] = float_to_bf16(acc[d]);
}

/* out[b, h, :] = softmax(q[b, h] . k[b, h, l] * scale over kept l) @ v[b, h, l] for one query
   row per (b, h); bf16 tensors with a contiguous last dimension, other strides in elements.
   keep: [B, L] bytes (nonzero = attend) with batch stride keep_b (0 broadcasts), or NULL.
   A row with no kept key gets zeros. scratch: B * H * (L + 2 * D) floats. */
void qwen_decode_attention_bf16(const uint16_t *q, int64_t qs_b, int64_t qs_h,
                                const uint16_t *k, int64_t ks_b, int64_t ks_h, int64_t ks_l,
                                const uint16_t *v, int64_t vs_b, int64_t vs_h, int64_t vs_l,
                                const uint8_t *keep, int64_t keep_b, uint16_t *out,
                                int64_t B, int64_t H, int64_t L, int64_t D, float scale,
                                int threads, float *scratch) {
    #pragma omp parallel for num_threads(threads) schedule(static)
    for (int64_t bh = 0; bh < B * H; bh++) {
        int64_t b = bh / H, h = bh % H;
        float *s = scratch + bh * (L + 2 * D), *qf = s + L, *acc = qf + D;
        const uint8_t *kp_keep = keep ? keep + b * keep_b : 0;
        float m = scores(q + b * qs_b + h * qs_h, k + b * ks_b + h * ks_h, ks_l, kp_keep, L, D, scale, s, qf);
        float sum = 0.f;
        for (int64_t l = 0; l < L; l++) {
            float e = s[l] == -INFINITY ? 0.f : expf(s[l] - m);
            s[l] = e;
            sum += e;
        }
        float inv = sum > 0.f ? 1.f / sum : 0.f;
        for (int64_t l = 0; l < L; l++) s[l] *= inv;
        weighted_values(s, v + b * vs_b + h * vs_h, vs_l, L, D, acc, out + bh * D);
    }
}

/* sum_k w[k] x[k], float32 accumulation (bf16 products are exact in float32). */
static inline float dot_bf16(const uint16_t *w, const uint16_t *x, int64_t K) {
    int64_t k = 0;
    float s = 0.f;
#if defined(__AVX512BF16__)
    __m512 a = _mm512_setzero_ps(), b = _mm512_setzero_ps();
    for (; k + 64 <= K; k += 64) {
        a = _mm512_dpbf16_ps(a, (__m512bh)_mm512_loadu_si512(w + k), (__m512bh)_mm512_loadu_si512(x + k));
        b = _mm512_dpbf16_ps(b, (__m512bh)_mm512_loadu_si512(w + k + 32), (__m512bh)_mm512_loadu_si512(x + k + 32));
    }
    for (; k + 32 <= K; k += 32)
        a = _mm512_dpbf16_ps(a, (__m512bh)_mm512_loadu_si512(w + k), (__m512bh)_mm512_loadu_si512(x + k));
    s = _mm512_reduce_add_ps(_mm512_add_ps(a, b));
#elif defined(__AVX512F__)
    __m512 a = _mm512_setzero_ps(), b = _mm512_setzero_ps();
    for (; k + 32 <= K; k += 32) {
        a = _mm512_fmadd_ps(load16(w + k), load16(x + k), a);
        b = _mm512_fmadd_ps(load16(w + k + 16), load16(x + k + 16), b);
    }
    s = _mm512_reduce_add_ps(_mm512_add_ps(a, b));
#endif
    float t = 0.f;
    #pragma omp simd reduction(+:t)
    for (int64_t i = k; i < K; i++) t += bf16_to_float(w[i]) * bf16_to_float(x[i]);
    return s + t;
}

/* Rows a thread takes at a time in a product: about 1 MiB of weights. Threads taking such
   chunks in turn stream nearby memory and finish together; with one half of the rows
   each (a static schedule) layer-sized products streamed 5-15% slower (2-core EPYC:
   2048 x 6144 at 44 against 52 GB/s). */
static inline int64_t row_chunk(int64_t K) {
    int64_t rows = (int64_t)(1 << 20) / (2 * (K > 0 ? K : 1));
    return rows < 8 ? 8 : rows;
}

static inline float row_out(const uint16_t *W, int64_t ldw, const uint16_t *x, const uint16_t *bias,
                            int64_t n, int64_t K) {
    float s = dot_bf16(W + n * ldw, x, K);
    return bias ? s + bf16_to_float(bias[n]) : s;
}

/* One row: out = bf16(bf16(x * rsqrt(mean(x^2) + eps)) * w), float32 inside. */
static void norm_row(const uint16_t *x, const uint16_t *w, float eps, int64_t H, uint16_t *out) {
    float ss = 0.f;
    #pragma omp simd reduction(+:ss)
    for (int64_t i = 0; i < H; i++) ss += bf16_to_float(x[i]) * bf16_to_float(x[i]);
    float inv = 1.f / sqrtf(ss / (float)H + eps);
    for (int64_t i = 0; i < H; i++)
        out[i] = float_to_bf16(bf16_to_float(float_to_bf16(bf16_to_float(x[i]) * inv)) * bf16_to_float(w[i]));
}

/* out[n] = bf16(W[n, :] . x + bias[n]) for one row x of K; W rows ldw apart; bias may be NULL.
   With norm_w (else NULL), x is first normalized as norm_row does (into scratch, K values).
   With residual (else NULL): out[n] = bf16(residual[n] + that), torch's residual + linear(x).
   Threads take row_chunk(K) rows at a time. */
void qwen_linear_row_bf16(const uint16_t *W, int64_t ldw, const uint16_t *x, const uint16_t *norm_w, float eps,
                          const uint16_t *bias, const uint16_t *residual, uint16_t *out, int64_t N, int64_t K,
                          int threads, uint16_t *scratch) {
    if (norm_w) { norm_row(x, norm_w, eps, K, scratch); x = scratch; }
    int64_t chunk = row_chunk(K);
    #pragma omp parallel for num_threads(threads) schedule(dynamic, chunk)
    for (int64_t n = 0; n < N; n++) {
        uint16_t y = float_to_bf16(row_out(W, ldw, x, bias, n, K));
        out[n] = residual ? float_to_bf16(bf16_to_float(residual[n]) + bf16_to_float(y)) : y;
    }
}

/* out[n] = bf16(a * bf16(silu(g))) with a = bf16(W1[n] . x + b1[n]), g = bf16(W2[n] . x + b2[n]):
   torch's w1(x) * F.silu(w2(x)) in bf16, rounded at the same points; norm_w as in
   qwen_linear_row_bf16. */
void qwen_swiglu_row_bf16(const uint16_t *W1, int64_t ld1, const uint16_t *b1, const uint16_t *W2, int64_t ld2,
                          const uint16_t *b2, const uint16_t *x, const uint16_t *norm_w, float eps, uint16_t *out,
                          int64_t N, int64_t K, int threads, uint16_t *scratch) {
    if (norm_w) { norm_row(x, norm_w, eps, K, scratch); x = scratch; }
    int64_t chunk = row_chunk(K);
    #pragma omp parallel for num_threads(threads) schedule(dynamic, chunk)
    for (int64_t n = 0; n < N; n++) {
        float a = bf16_to_float(float_to_bf16(row_out(W1, ld1, x, b1, n, K)));
        float g = bf16_to_float(float_to_bf16(row_out(W2, ld2, x, b2, n, K)));
        float gate = bf16_to_float(float_to_bf16(g / (1.f + expf(-g))));
        out[n] = float_to_bf16(a * gate);
    }
}

/* out[r] = norm_row(x[r]) for rows xs apart. */
void qwen_rms_norm_bf16(const uint16_t *x, int64_t xs, const uint16_t *w, uint16_t *out, int64_t rows,
                        int64_t H, float eps, int threads) {
    #pragma omp parallel for num_threads(threads) schedule(static) if (rows * H >= 65536)
    for (int64_t r = 0; r < rows; r++) norm_row(x + r * xs, w, eps, H, out + r * H);
}

/* One head vector with the rotary embedding (rotate-half convention) on its first rot dims,
   in float32, rounded to bf16: x * cos + rotate_half(x) * sin, with sin signed (-sin on the
   first half); the other dims copied. o may be x. */
static void rotate_head(const uint16_t *x, const float *c, const float *s, int64_t D, int64_t rot, uint16_t *o) {
    int64_t half = rot / 2;
    uint16_t r[rot > 0 ? rot : 1];
    for (int64_t d = 0; d < rot; d++) {
        float partner = bf16_to_float(x[d < half ? d + half : d - half]);
        float p = bf16_to_float(x[d]) * c[d], q = partner * s[d];
        r[d] = float_to_bf16(p + q);
    }
    for (int64_t d = rot; d < D; d++) o[d] = x[d];
    for (int64_t d = 0; d < rot; d++) o[d] = r[d];
}

/* One step's queries and keys with the rotary embedding: src [B, 2, H, D] (batch stride
   src_b, contiguous inside), cos/sin [B, rot] float32 (batch stride cs_b), out [B, 2, H, D]
   contiguous. */
void qwen_rotary_qk_bf16(const uint16_t *src, int64_t src_b, const float *cos, const float *sin, int64_t cs_b,
                         uint16_t *out, int64_t B, int64_t H, int64_t D, int64_t rot) {
    for (int64_t b = 0; b < B; b++)
        for (int64_t j = 0; j < 2 * H; j++)
            rotate_head(src + b * src_b + j * D, cos + b * cs_b, sin + b * cs_b, D, rot, out + (b * 2 * H + j) * D);
}

/* An attention block's input for one row: out [3, H, D] = the rotary embedding (on queries
   and keys) of W . norm_row(x) + bias, as the model's ln_1, c_attn and rotary compute it. */
void qwen_qkv_row_bf16(const uint16_t *W, int64_t ldw, const uint16_t *x, const uint16_t *norm_w, float eps,
                       const uint16_t *bias, const float *cos, const float *sin, uint16_t *out, int64_t H,
                       int64_t D, int64_t rot, int64_t K, int threads, uint16_t *scratch) {
    qwen_linear_row_bf16(W, ldw, x, norm_w, eps, bias, 0, out, 3 * H * D, K, threads, scratch);
    for (int64_t j = 0; j < 2 * H; j++) rotate_head(out + j * D, cos, sin, D, rot, out + j * D);
}

/* Fields of one block in qwen_decode_blocks_bf16's table (int64 each; pointers as integers). */
enum {
    B_LN1, B_QKV_W, B_QKV_LD, B_QKV_B, B_PROJ_W, B_PROJ_LD, B_PROJ_B, B_LN2, B_W1, B_W1_LD, B_W1_B,
    B_W2, B_W2_LD, B_W2_B, B_MLP_W, B_MLP_LD, B_MLP_B, B_K, B_KS_H, B_KS_L, B_V, B_VS_H, B_VS_L,
    B_POS, B_KEEP, B_WIDTH, B_FIELDS
};

/* Every block of a one-sequence decoding step: for each block (fields above, eps1/eps2/scale
   per block in `reals`), ln_1 + c_attn + rotary (qwen_qkv_row_bf16); its key and value rows
   written at position B_POS of the block's cache (heads B_KS_H/B_VS_H, positions
   B_KS_L/B_VS_L elements apart); attention over positions 0..B_POS (keep: B_POS + 1 bytes,
   or 0); c_proj + the residual; ln_2 + w1/w2 + gate; the MLP's c_proj + the residual: the
   per-block calls of QWenBlock.one_row_step, with nothing in between. x: the first block's
   input (hidden values), out: the last block's output. work: bf16 scratch of 3 * H * D
   (qkv) + H * D (attention) + 3 * hidden (h, two block outputs) + max width + hidden;
   scores: float scratch of H * (max positions + 2 * D). */
void qwen_decode_blocks_bf16(const int64_t *table, const float *reals, int64_t n_blocks, const uint16_t *x,
                             uint16_t *out, int64_t hidden, int64_t H, int64_t D, int64_t rot, const float *cos,
                             const float *sin, int threads, uint16_t *work, float *scores) {
    uint16_t *qkv = work, *att = qkv + 3 * H * D, *h = att + H * D, *xs[2] = {h + hidden, h + 2 * hidden};
    uint16_t *gated = h + 3 * hidden;
    for (int64_t i = 0; i < n_blocks; i++) {
        const int64_t *f = table + i * B_FIELDS;
        const float *r = reals + 3 * i;
        const uint16_t *in = i == 0 ? x : xs[(i - 1) & 1];
        uint16_t *next = i == n_blocks - 1 ? out : xs[i & 1];
        uint16_t *norm_scratch = gated + f[B_WIDTH];
        #define P(field) ((uint16_t *)(intptr_t)f[field])
        qwen_qkv_row_bf16(P(B_QKV_W), f[B_QKV_LD], in, P(B_LN1), r[0], P(B_QKV_B), cos, sin, qkv, H, D, rot,
                          hidden, threads, norm_scratch);
        uint16_t *kc = P(B_K), *vc = P(B_V);
        for (int64_t j = 0; j < H; j++)
            for (int64_t d = 0; d < D; d++) {
                kc[j * f[B_KS_H] + f[B_POS] * f[B_KS_L] + d] = qkv[(H + j) * D + d];
                vc[j * f[B_VS_H] + f[B_POS] * f[B_VS_L] + d] = qkv[(2 * H + j) * D + d];
            }
        qwen_decode_attention_bf16(qkv, 0, D, kc, 0, f[B_KS_H], f[B_KS_L], vc, 0, f[B_VS_H], f[B_VS_L],
                                   (const uint8_t *)(intptr_t)f[B_KEEP], 0, att, 1, H, f[B_POS] + 1, D, r[2],
                                   threads, scores);
        qwen_linear_row_bf16(P(B_PROJ_W), f[B_PROJ_LD], att, 0, 0.f, P(B_PROJ_B), in, h, hidden, H * D, threads, 0);
        qwen_swiglu_row_bf16(P(B_W1), f[B_W1_LD], P(B_W1_B), P(B_W2), f[B_W2_LD], P(B_W2_B), h, P(B_LN2), r[1],
                             gated, f[B_WIDTH], hidden, threads, norm_scratch);
        qwen_linear_row_bf16(P(B_MLP_W), f[B_MLP_LD], gated, 0, 0.f, P(B_MLP_B), h, next, hidden, f[B_WIDTH],
                             threads, 0);
        #undef P
    }
}
"""

# -ffp-contract=off: a * b + c stays two roundings, as in torch's kernels (not one FMA)
_FLAGS = ["-O3", "-march=native", "-fopenmp", "-ffp-contract=off", "-shared", "-fPIC"]
_P, _I, _F = ctypes.c_void_p, ctypes.c_int64, ctypes.c_float
_SIGNATURES = {  # Python name: (C symbol, argument types)
    "decode_attention": (
        "qwen_decode_attention_bf16",
        [_P, _I, _I] + [_P, _I, _I, _I] * 2 + [_P, _I, _P] + [_I] * 4 + [_F, ctypes.c_int, _P],
    ),
    "linear_row": ("qwen_linear_row_bf16", [_P, _I, _P, _P, _F, _P, _P, _P, _I, _I, ctypes.c_int, _P]),
    "swiglu_row": ("qwen_swiglu_row_bf16", [_P, _I, _P, _P, _I, _P, _P, _P, _F, _P, _I, _I, ctypes.c_int, _P]),
    "qkv_row": ("qwen_qkv_row_bf16", [_P, _I, _P, _P, _F, _P, _P, _P, _P, _I, _I, _I, _I, ctypes.c_int, _P]),
    "rms_norm": ("qwen_rms_norm_bf16", [_P, _I, _P, _P, _I, _I, _F, ctypes.c_int]),
    "rotary_qk": ("qwen_rotary_qk_bf16", [_P, _I, _P, _P, _I, _P, _I, _I, _I, _I]),
    "decode_blocks": ("qwen_decode_blocks_bf16", [_P, _P, _I, _P, _P, _I, _I, _I, _I, _P, _P, ctypes.c_int, _P, _P]),
}


def env_switched_off(name: str) -> bool:
    """Whether the environment variable ``name`` is ``0``/``false``/``no``/``off`` (any case)."""
    return os.environ.get(name, "1").strip().lower() in ("0", "false", "no", "off")


def enabled() -> bool:
    """False when ``QWEN_CPU_KERNELS`` is ``0``/``false``/``no``/``off``."""
    return not env_switched_off("QWEN_CPU_KERNELS")


def cache_dir() -> Path:
    """Where built kernels are kept: ``$QWEN_KERNEL_CACHE``, else ``$XDG_CACHE_HOME/qwen/kernels``
    (``~/.cache/qwen/kernels``)."""
    if os.environ.get("QWEN_KERNEL_CACHE"):
        return Path(os.environ["QWEN_KERNEL_CACHE"])
    base = os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache")
    return Path(base) / "qwen" / "kernels"


def _compiler() -> str | None:
    for name in (os.environ.get("CC"), "cc", "gcc", "clang"):
        path = shutil.which(name) if name else None
        if path:
            return path
    return None


def _cpu_signature() -> str:
    """What ``-march=native`` depends on: the CPU's model and feature flags (Linux), else the platform."""
    try:
        with open("/proc/cpuinfo") as info:
            lines = [line for line in info if line.startswith(("model name", "flags", "Features"))]
        return "".join(sorted(set(lines)))
    except OSError:
        return platform.processor() + platform.machine()


def _fallback_dir() -> Path | None:
    """A private per-user directory under the system's temporary directory, for when the
    cache cannot be written; ``None`` unless it is ours and nobody else can write there
    (a library loaded from a shared path must not be planted by someone else)."""
    if not hasattr(os, "getuid"):
        return None
    directory = Path(tempfile.gettempdir()) / f"qwen-kernels-{os.getuid()}"
    try:
        directory.mkdir(mode=0o700, exist_ok=True)
        info = directory.lstat()
    except OSError:
        return None
    if not directory.is_dir() or directory.is_symlink() or info.st_uid != os.getuid() or info.st_mode & 0o022:
        return None
    return directory


def _build(compiler: str) -> Path:
    """The kernel's shared library: from the cache, else compiled into it (or into a
    private temporary directory when the cache directory cannot be written)."""
    key = hashlib.sha256(
        "\0".join([_SOURCE, " ".join(_FLAGS), compiler, _cpu_signature(), sys.platform]).encode()
    ).hexdigest()[:24]
    name = f"cpu_kernels_{key}.so"
    if (cache_dir() / name).exists():
        return cache_dir() / name
    try:
        return _compile(compiler, cache_dir(), name)
    except OSError as error:
        fallback = _fallback_dir()
        if fallback is None:
            raise
        logger.info("kernel cache %s not writable (%s); using %s", cache_dir(), error, fallback)
        if (fallback / name).exists():
            return fallback / name
        return _compile(compiler, fallback, name)


def _compile(compiler: str, directory: Path, name: str) -> Path:
    target = directory / name
    directory.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(dir=directory) as tmp:
        source = Path(tmp) / "cpu_kernels.c"
        source.write_text(_SOURCE)
        built = Path(tmp) / target.name
        result = subprocess.run(
            [compiler, *_FLAGS, str(source), "-o", str(built)], capture_output=True, text=True, timeout=120
        )
        if result.returncode != 0:
            raise RuntimeError(f"{compiler} failed: {result.stderr.strip()[-2000:]}")
        os.replace(built, target)  # atomic: concurrent builders each install a complete file
    return target


@functools.cache
def _kernel() -> SimpleNamespace | None:
    """The compiled kernels as ctypes functions (attributes named as in ``_SIGNATURES``),
    or ``None`` (logged once) when they cannot be built."""
    if not enabled():
        return None
    compiler = _compiler()
    if compiler is None:
        logger.info("no C compiler found ($CC, cc, gcc, clang): one-row CPU steps stay in torch")
        return None
    try:
        library = ctypes.CDLL(str(_build(compiler)))
        functions = {name: getattr(library, symbol) for name, (symbol, _) in _SIGNATURES.items()}
    except Exception as error:  # any failure only costs speed
        logger.warning(
            "could not build the CPU kernels (%s); decoding steps stay in torch (QWEN_CPU_KERNELS=0 skips the attempt)",
            error,
        )
        return None
    for name, function in functions.items():
        function.argtypes = _SIGNATURES[name][1]
        function.restype = None
    return SimpleNamespace(**functions)


def available() -> bool:
    """Whether the kernels are built (or can be) and enabled; builds them on first call."""
    return _kernel() is not None


def decode_attention(
    query: torch.Tensor,
    key: torch.Tensor,
    value: torch.Tensor,
    attention_mask: torch.Tensor | None,
    scaling: float,
) -> torch.Tensor | None:
    """One decoding step's attention, ``(B, H, 1, d)`` queries over ``(B, H, L, d)`` keys
    and values -> ``(B, 1, H, d)``, or ``None`` when the kernel does not apply (not bf16 on
    CPU, more than one query row, a mask other than boolean ``(B or 1, 1, 1, L)``, a
    non-contiguous last dimension, autograd, tracing, or no kernel)."""
    if not _ready(query) or query.shape[2] != 1:
        return None
    if key.dtype != query.dtype or value.dtype != query.dtype or key.shape != value.shape:
        return None
    if not (key.is_cpu and value.is_cpu and (attention_mask is None or attention_mask.is_cpu)):
        return None
    bsz, heads, _, dim = query.shape
    length = key.shape[2]
    if key.shape[:2] != (bsz, heads) or key.shape[3] != dim:
        return None
    if query.stride(3) != 1 or key.stride(3) != 1 or value.stride(3) != 1:
        return None
    keep = attention_mask  # (B or 1, 1, 1, L) booleans, True = attend
    if keep is not None:
        if keep.dtype != torch.bool or keep.dim() != 4 or keep.shape[1:3] != (1, 1) or keep.shape[0] not in (1, bsz):
            return None
        if keep.shape[3] != length or keep.stride(3) != 1:
            return None
    kernel = _kernel()
    if kernel is None:
        return None
    out = torch.empty((bsz, 1, heads, dim), dtype=query.dtype, device=_CPU)
    scratch = torch.empty(bsz * heads * (length + 2 * dim), dtype=torch.float32, device=_CPU)
    kernel.decode_attention(
        query.data_ptr(), query.stride(0), query.stride(1),
        key.data_ptr(), key.stride(0), key.stride(1), key.stride(2),
        value.data_ptr(), value.stride(0), value.stride(1), value.stride(2),
        None if keep is None else keep.data_ptr(), 0 if keep is None or keep.shape[0] == 1 else keep.stride(0),
        out.data_ptr(), bsz, heads, length, dim, float(scaling), torch.get_num_threads(), scratch.data_ptr(),
    )  # fmt: skip
    return out


def _ready(x: torch.Tensor) -> bool:
    """A bf16 CPU tensor outside autograd and tracing: what every kernel here takes."""
    return x.dtype == torch.bfloat16 and x.is_cpu and not torch.is_grad_enabled() and not torch.compiler.is_compiling()


def _matrix(weight: torch.Tensor, bias: torch.Tensor | None, n_in: int) -> bool:
    """A bf16 (N, n_in) weight with contiguous rows and an optional contiguous (N,) bf16 bias."""
    if weight.dtype != torch.bfloat16 or not weight.is_cpu or weight.dim() != 2:
        return False
    if weight.shape[1] != n_in or weight.stride(1) != 1:
        return False
    return bias is None or (
        bias.dtype == torch.bfloat16 and bias.shape == weight.shape[:1] and bias.stride(0) == 1 and bias.is_cpu
    )


def _vector(t: torch.Tensor, n: int) -> bool:
    """A contiguous bf16 vector of ``n`` values (a norm's weight)."""
    return t.dtype == torch.bfloat16 and t.shape == (n,) and t.stride(0) == 1 and t.is_cpu


def _row(x: torch.Tensor) -> bool:
    """One bf16 row (every dimension but the last of size 1) with a contiguous last dim."""
    return _ready(x) and x.numel() == x.shape[-1] and x.stride(-1) == 1


def _norm_args(norm: tuple[torch.Tensor, float] | None, n_in: int) -> tuple | None:
    """ctypes arguments for an optional RMSNorm of the input row, ``norm = (weight, eps)``:
    (weight pointer, eps, scratch tensor), or ``None`` when the weight does not fit."""
    if norm is None:
        return (None, 0.0, None)
    weight, eps = norm
    if not _vector(weight, n_in):
        return None
    return (weight.data_ptr(), float(eps), torch.empty(n_in, dtype=torch.bfloat16, device=_CPU))


def _rotary_tables(cos: torch.Tensor, signed_sin: torch.Tensor, dim: int) -> bool:
    """float32 ``cos``/``signed_sin`` tables of one shape for an even number of rotated
    dims, at most ``dim``, each with a contiguous last dimension."""
    rot = cos.shape[-1]
    if cos.dtype != torch.float32 or signed_sin.dtype != torch.float32 or cos.shape != signed_sin.shape:
        return False
    if not (cos.is_cpu and signed_sin.is_cpu):
        return False
    return rot % 2 == 0 and rot <= dim and cos.stride(-1) == 1 and signed_sin.stride(-1) == 1


def _ptr(t: torch.Tensor | None) -> int | None:
    return None if t is None else t.data_ptr()


def _product_call(norm: tuple[torch.Tensor, float] | None, n_in: int, out_shape: tuple) -> tuple | None:
    """What a one-row product kernel needs besides its operands: (kernel, norm weight
    pointer, eps, scratch, output tensor), or ``None`` when there is no kernel or the
    norm's weight does not fit."""
    normed = _norm_args(norm, n_in)
    kernel = _kernel()
    if kernel is None or normed is None:
        return None
    return (kernel, *normed, torch.empty(out_shape, dtype=torch.bfloat16, device=_CPU))


def linear_row(
    x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None, residual: torch.Tensor | None = None
) -> torch.Tensor | None:
    """``F.linear(x, weight, bias)`` for one bf16 row ``x`` (shape (..., K), one row in all),
    or ``None`` when the kernel does not apply. ``residual`` (one bf16 row of the output's
    size) is added to the result, rounded as torch's ``residual + linear(x)``."""
    if not _row(x) or not _matrix(weight, bias, x.shape[-1]):
        return None
    if residual is not None and (
        residual.dtype != torch.bfloat16
        or residual.numel() != weight.shape[0]
        or residual.stride(-1) != 1
        or not residual.is_cpu
    ):
        return None
    n_out, n_in = weight.shape
    call = _product_call(None, n_in, (*x.shape[:-1], n_out))
    if call is None:
        return None
    kernel, norm_weight, eps, scratch, out = call
    kernel.linear_row(
        weight.data_ptr(), weight.stride(0), x.data_ptr(), norm_weight, eps, _ptr(bias), _ptr(residual),
        out.data_ptr(), n_out, n_in, torch.get_num_threads(), _ptr(scratch),
    )  # fmt: skip
    return out


def swiglu_row(
    x: torch.Tensor,
    w1: torch.Tensor,
    b1: torch.Tensor | None,
    w2: torch.Tensor,
    b2: torch.Tensor | None,
    norm: tuple[torch.Tensor, float] | None = None,
) -> torch.Tensor | None:
    """``F.linear(x, w1, b1) * F.silu(F.linear(x, w2, b2))`` for one bf16 row, rounded to bf16
    where torch rounds it, or ``None`` when the kernel does not apply. ``norm = (weight,
    eps)`` first applies the model's RMSNorm to ``x`` (:func:`rms_norm`)."""
    if not _row(x) or not _matrix(w1, b1, x.shape[-1]) or not _matrix(w2, b2, x.shape[-1]):
        return None
    if w1.shape != w2.shape:
        return None
    n_out, n_in = w1.shape
    call = _product_call(norm, n_in, (*x.shape[:-1], n_out))
    if call is None:
        return None
    kernel, norm_weight, eps, scratch, out = call
    kernel.swiglu_row(
        w1.data_ptr(), w1.stride(0), _ptr(b1), w2.data_ptr(), w2.stride(0), _ptr(b2),
        x.data_ptr(), norm_weight, eps, out.data_ptr(), n_out, n_in, torch.get_num_threads(), _ptr(scratch),
    )  # fmt: skip
    return out


def qkv_row(
    x: torch.Tensor,
    norm: tuple[torch.Tensor, float],
    weight: torch.Tensor,
    bias: torch.Tensor | None,
    cos: torch.Tensor,
    signed_sin: torch.Tensor,
    heads: int,
) -> torch.Tensor | None:
    """An attention block's input for one bf16 row ``x`` (1, 1, K): the model's RMSNorm
    (``norm = (weight, eps)``), the ``c_attn`` product (``weight``, ``bias``) and the rotary
    embedding of queries and keys (``cos``/``signed_sin`` (1, 1, 1, 1, rot) float32, as
    :func:`qwen.modeling_qwen.rotary_tables` makes them) -> (1, 1, 3, heads, D), or ``None``
    when the kernel does not apply."""
    if not _row(x) or x.shape[:-1] != (1, 1) or not _matrix(weight, bias, x.shape[-1]):
        return None
    n_out, n_in = weight.shape
    dim = n_out // (3 * heads) if heads > 0 else 0
    rot = cos.shape[-1]
    if dim == 0 or 3 * heads * dim != n_out or not _rotary_tables(cos, signed_sin, dim) or cos.numel() != rot:
        return None
    call = _product_call(norm, n_in, (1, 1, 3, heads, dim))
    if call is None:
        return None
    kernel, norm_weight, eps, scratch, out = call
    kernel.qkv_row(
        weight.data_ptr(), weight.stride(0), x.data_ptr(), norm_weight, eps, _ptr(bias), cos.data_ptr(),
        signed_sin.data_ptr(), out.data_ptr(), heads, dim, rot, n_in, torch.get_num_threads(), _ptr(scratch),
    )  # fmt: skip
    return out


def rms_norm(x: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor | None:
    """``F.rms_norm(x.float(), eps).to(bf16) * weight`` for bf16 ``x`` and ``weight``, or
    ``None`` when the kernel does not apply."""
    hidden = x.shape[-1] if x.dim() else 0
    if not _ready(x) or hidden == 0 or x.stride(-1) != 1:
        return None
    if not _vector(weight, hidden):
        return None
    kernel = _kernel()
    if kernel is None:
        return None
    rows = x.reshape(-1, hidden)  # a view wherever the rows are evenly spaced
    out = torch.empty(x.shape, dtype=torch.bfloat16, device=_CPU)
    kernel.rms_norm(
        rows.data_ptr(), rows.stride(0), weight.data_ptr(), out.data_ptr(), rows.shape[0], hidden, float(eps),
        torch.get_num_threads(),
    )  # fmt: skip
    return out


def rotary_qk(qk: torch.Tensor, cos: torch.Tensor, signed_sin: torch.Tensor) -> torch.Tensor | None:
    """:func:`qwen.modeling_qwen.apply_rotary` of one step's queries and keys: ``qk`` a
    (B, 1, 2, H, D) bf16 view (of the (B, 1, 3, H, D) projection), ``cos``/``signed_sin``
    (B or 1, 1, 1, 1, rot) float32; -> a new contiguous (B, 1, 2, H, D) tensor, or ``None``
    when the kernel does not apply."""
    if not _ready(qk) or qk.dim() != 5 or qk.shape[1] != 1 or qk.shape[2] != 2:
        return None
    bsz, _, _, heads, dim = qk.shape
    if qk.stride(4) != 1 or qk.stride(3) != dim or qk.stride(2) != heads * dim:
        return None
    rot = cos.shape[-1]
    if not _rotary_tables(cos, signed_sin, dim) or cos.stride() != signed_sin.stride():
        return None
    if cos.dim() != 5 or cos.shape[0] not in (1, bsz) or cos.shape[1:4] != (1, 1, 1):
        return None
    kernel = _kernel()
    if kernel is None:
        return None
    out = torch.empty((bsz, 1, 2, heads, dim), dtype=torch.bfloat16, device=_CPU)
    kernel.rotary_qk(
        qk.data_ptr(), qk.stride(0), cos.data_ptr(), signed_sin.data_ptr(),
        cos.stride(0) if cos.shape[0] > 1 else 0, out.data_ptr(), bsz, heads, dim, rot,
    )  # fmt: skip
    return out


class BlockSteps:
    """The blocks of one single-sequence decoding step, for :meth:`run` to take through
    all of them in one C call (``qwen_decode_blocks_bf16``): what
    ``QWenBlock.one_row_step`` does block by block, with no Python between the blocks'
    kernels. Each :meth:`add` checks one block's weights and cache as the per-block
    kernels do and says whether it can be taken (if not, nothing is run)."""

    # int64 fields a block has in the C function's table: the names before B_FIELDS in its enum
    _FIELDS = _SOURCE[_SOURCE.index("enum {") : _SOURCE.index("B_FIELDS\n")].count(",")

    def __init__(self, x: torch.Tensor, cos: torch.Tensor, signed_sin: torch.Tensor, heads: int, dim: int):
        self.x, self.cos, self.sin, self.heads, self.dim = x, cos, signed_sin, heads, dim
        self.hidden = x.shape[-1]
        rot = cos.shape[-1]
        self.ok = (
            _row(x)
            and x.shape[:-1] == (1, 1)
            and heads > 0
            and dim > 0
            and _rotary_tables(cos, signed_sin, dim)
            and cos.numel() == rot
            and _kernel() is not None
        )
        self.rows: list[int] = []
        self.reals: list[float] = []
        self.keep_alive: list[torch.Tensor | None] = []
        self.width = self.length = 0

    def _cache(self, buffer: torch.Tensor, position: int) -> bool:
        """A (1, heads, room, dim) bf16 buffer with contiguous head vectors and room past ``position``."""
        return (
            buffer.dtype == torch.bfloat16
            and buffer.is_cpu
            and buffer.shape[:2] == (1, self.heads)
            and buffer.dim() == 4
            and buffer.shape[3] == self.dim
            and buffer.shape[2] > position
            and buffer.stride(3) == 1
        )

    def add(
        self,
        ln_1: tuple[torch.Tensor, float],
        c_attn: tuple[torch.Tensor, torch.Tensor | None],
        c_proj: tuple[torch.Tensor, torch.Tensor | None],
        ln_2: tuple[torch.Tensor, float],
        w1: tuple[torch.Tensor, torch.Tensor | None],
        w2: tuple[torch.Tensor, torch.Tensor | None],
        mlp_proj: tuple[torch.Tensor, torch.Tensor | None],
        keys: tuple[torch.Tensor, torch.Tensor],
        position: int,
        keep: torch.Tensor | None,
        scaling: float,
    ) -> bool:
        """One block: its norms ``(weight, eps)`` and products ``(weight, bias)``, its cache's
        (key buffer, value buffer) with the step's row to go at ``position`` (attending to
        positions ``0..position``), the boolean mask of those positions (None: all) and the
        attention's ``scaling``. False (and the step not to be run) where anything does not fit."""
        hidden, projection = self.hidden, self.heads * self.dim
        width = w1[0].shape[0] if w1[0].dim() == 2 else 0
        key_buffer, value_buffer = keys
        self.ok = (
            self.ok
            and _vector(ln_1[0], hidden)
            and _vector(ln_2[0], hidden)
            and _matrix(*c_attn, hidden)
            and c_attn[0].shape[0] == 3 * projection
            and _matrix(*c_proj, projection)
            and c_proj[0].shape[0] == hidden
            and _matrix(*w1, hidden)
            and _matrix(*w2, hidden)
            and w2[0].shape[0] == width > 0
            and _matrix(*mlp_proj, width)
            and mlp_proj[0].shape[0] == hidden
            and self._cache(key_buffer, position)
            and self._cache(value_buffer, position)
            and (
                keep is None
                or (
                    keep.dtype == torch.bool
                    and keep.shape == (1, 1, 1, position + 1)
                    and keep.stride(3) == 1
                    and keep.is_cpu
                )
            )
        )
        if not self.ok:
            return False
        self.rows += [
            ln_1[0].data_ptr(), c_attn[0].data_ptr(), c_attn[0].stride(0), _ptr(c_attn[1]) or 0,
            c_proj[0].data_ptr(), c_proj[0].stride(0), _ptr(c_proj[1]) or 0, ln_2[0].data_ptr(),
            w1[0].data_ptr(), w1[0].stride(0), _ptr(w1[1]) or 0, w2[0].data_ptr(), w2[0].stride(0), _ptr(w2[1]) or 0,
            mlp_proj[0].data_ptr(), mlp_proj[0].stride(0), _ptr(mlp_proj[1]) or 0,
            key_buffer.data_ptr(), key_buffer.stride(1), key_buffer.stride(2),
            value_buffer.data_ptr(), value_buffer.stride(1), value_buffer.stride(2),
            position, 0 if keep is None else keep.data_ptr(), width,
        ]  # fmt: skip
        self.reals += [float(ln_1[1]), float(ln_2[1]), float(scaling)]
        # every tensor the table points into stays referenced until the call has returned
        self.keep_alive += [ln_1[0], *c_attn, *c_proj, ln_2[0], *w1, *w2, *mlp_proj, key_buffer, value_buffer, keep]
        self.width, self.length = max(self.width, width), max(self.length, position + 1)
        return True

    def run(self) -> torch.Tensor | None:
        """Every added block in turn -> the last one's output (the shape of ``x``), their key
        and value rows written into the caches; None (nothing done) where :meth:`add`
        refused a block or none was added."""
        blocks = len(self.reals) // 3
        if not self.ok or blocks == 0 or len(self.rows) != blocks * self._FIELDS:
            return None
        table = torch.tensor(self.rows, dtype=torch.int64, device=_CPU)
        reals = torch.tensor(self.reals, dtype=torch.float32, device=_CPU)
        heads, dim, hidden = self.heads, self.dim, self.hidden
        work = torch.empty(4 * heads * dim + 4 * hidden + self.width, dtype=torch.bfloat16, device=_CPU)
        scores = torch.empty(heads * (self.length + 2 * dim), dtype=torch.float32, device=_CPU)
        out = torch.empty(self.x.shape, dtype=torch.bfloat16, device=_CPU)
        _kernel().decode_blocks(
            table.data_ptr(), reals.data_ptr(), blocks, self.x.data_ptr(), out.data_ptr(), hidden, heads, dim,
            self.cos.shape[-1], self.cos.data_ptr(), self.sin.data_ptr(), torch.get_num_threads(), work.data_ptr(),
            scores.data_ptr(),
        )  # fmt: skip
        return out
