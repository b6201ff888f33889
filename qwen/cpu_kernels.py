"""Small C kernels for one-row (decoding) steps on CPU in bf16, built on first use.

A decoding step multiplies one row per sequence by every weight matrix and attends with
one query row per (sequence, head) over the cached keys and values, where torch's general
CPU kernels stay below memory speed (a dispatch and a pass over threads per small
operation; attention over many small matrices). The kernels, each rounding to bf16 where
the torch code it replaces does (results differ only by the order of float32 sums):

- :func:`linear_row`: ``F.linear`` of one row, optionally plus a residual (float32
  accumulation, in parallel over output rows; AVX512-BF16 dot products where available);
- :func:`swiglu_row`: the MLP's ``w1(x) * silu(w2(x))`` for one row in one pass;
- :func:`rms_norm`: the model's RMSNorm (float32, rounded, times the weight);
- :func:`decode_attention`: ``softmax(q k^T * scaling, masked) v`` per (row, head) in
  float32 from the bf16 cache in place, skipping masked keys;
- :class:`BlockSteps`: every block of a single-sequence decoding step in one call, the
  kernels above in turn with the step's keys and values written into the cache's
  buffers, with no Python between the blocks' kernels.

The boundary is declared once, in Python: ``_ENTRY_POINTS`` (each exported C function's
arguments and their C types) and ``_BLOCK_FIELDS``/``_BLOCK_REALS`` (the fields of
BlockSteps' table). From them come the ctypes argument types, Python functions that take
those arguments by name, and a header of C prototypes and field enums compiled ahead of
the definitions, so that the C compiler rejects a definition that disagrees.

The source is compiled with the system C compiler (``$CC``, else ``cc``/``gcc``/``clang``)
when first needed and cached under ``$QWEN_KERNEL_CACHE`` (default
``~/.cache/qwen/kernels``; when that cannot be written, a private ``qwen-kernels-<uid>``
directory in the system's temporary directory, used only while it is the user's own and
writable by nobody else), keyed by the source, the flags, the compiler and the CPU's
features. Without a compiler, or with ``QWEN_CPU_KERNELS=0``, every function here returns
``None`` and the caller runs its torch code.
"""

from __future__ import annotations

import ctypes
import dataclasses
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

# C types of the entry points' arguments (bf16 values travel as uint16_t)
_IN, _OUT, _F32_IN, _F32_OUT = "const uint16_t *", "uint16_t *", "const float *", "float *"
_I64, _F32, _INT = "int64_t", "float", "int"
_CTYPES = {_I64: ctypes.c_int64, _F32: ctypes.c_float, _INT: ctypes.c_int}  # pointers: ctypes.c_void_p

# The exported C functions, qwen_<name>_bf16 (returning void): their arguments, in order, as
# (name, C type). Python passes them by these names; the C definitions must match them.
_ENTRY_POINTS: dict[str, tuple[tuple[str, str], ...]] = {
    "decode_attention": (
        ("q", _IN), ("qs_b", _I64), ("qs_h", _I64),
        ("k", _IN), ("ks_b", _I64), ("ks_h", _I64), ("ks_l", _I64),
        ("v", _IN), ("vs_b", _I64), ("vs_h", _I64), ("vs_l", _I64),
        ("keep", "const uint8_t *"), ("keep_b", _I64), ("out", _OUT),
        ("B", _I64), ("H", _I64), ("L", _I64), ("D", _I64), ("scale", _F32), ("threads", _INT), ("scratch", _F32_OUT),
    ),
    "linear_row": (
        ("W", _IN), ("ldw", _I64), ("x", _IN), ("norm_w", _IN), ("eps", _F32), ("bias", _IN), ("residual", _IN),
        ("out", _OUT), ("N", _I64), ("K", _I64), ("threads", _INT), ("scratch", _OUT),
    ),
    "swiglu_row": (
        ("W1", _IN), ("ld1", _I64), ("b1", _IN), ("W2", _IN), ("ld2", _I64), ("b2", _IN), ("x", _IN),
        ("norm_w", _IN), ("eps", _F32), ("out", _OUT), ("N", _I64), ("K", _I64), ("threads", _INT), ("scratch", _OUT),
    ),
    "rms_norm": (
        ("x", _IN), ("xs", _I64), ("w", _IN), ("out", _OUT), ("rows", _I64), ("H", _I64), ("eps", _F32),
        ("threads", _INT),
    ),
    "decode_blocks": (
        ("table", "const int64_t *"), ("reals", _F32_IN), ("n_blocks", _I64), ("x", _IN), ("out", _OUT),
        ("hidden", _I64), ("H", _I64), ("D", _I64), ("rot", _I64), ("cos", _F32_IN), ("sin", _F32_IN),
        ("threads", _INT), ("work", _OUT), ("scores", _F32_OUT), ("gptq", "gptq_row_fn"), ("gptq_scratch", _F32_OUT),
    ),
}  # fmt: skip

# qwen_gptq_row, the one-row product on GPTQ weights of gptq_kernels.py's library: its arguments,
# declared here because the block step calls it through a pointer (C type gptq_row_fn), and the
# dtype codes it takes (C enum DT_<NAME>, in this order). gptq_kernels.py declares its
# definition with the same tuples.
GPTQ_ROW_ARGUMENTS: tuple[tuple[str, str], ...] = (
    ("x", "const void *"), ("x_dtype", _INT), ("qweight", "const int32_t *"), ("qzeros", "const int32_t *"),
    ("scales", "const uint16_t *"), ("bias", "const void *"), ("bias_dtype", _INT), ("out", "void *"),
    ("N", _I64), ("K", _I64), ("group_size", _I64), ("bits", _INT), ("zero_add", _INT), ("threads", _INT),
    ("scratch", "float *"),
)  # fmt: skip
GPTQ_DTYPES = {torch.float32: "F32", torch.bfloat16: "BF16", torch.float16: "F16"}
GPTQ_DTYPE_NAMES = tuple(GPTQ_DTYPES.values())
GPTQ_DTYPE_CODE = {dtype: code for code, dtype in enumerate(GPTQ_DTYPES)}

# One block's row of qwen_decode_blocks_bf16's table (int64: pointers as addresses, strides in
# elements): the fields _BLOCK_FIELDS (C enum B_<NAME>), then the products _PRODUCTS, each the
# fields _PRODUCT_FIELDS (C enum P_<NAME>, from B_<PRODUCT>: a bf16 weight with bits 0, or the
# GPTQ tensors as qwen_gptq_row takes them, the packed integers as the weight); and its reals
# (float32, R_<NAME>). :meth:`BlockSteps.add` fills them by name.
_BLOCK_FIELDS = (
    "ln_1", "ln_2", "keys", "keys_head", "keys_pos", "values", "values_head", "values_pos", "position", "keep", "width"
)  # fmt: skip
_PRODUCTS = ("c_attn", "c_proj", "w1", "w2", "mlp_proj")
_PRODUCT_FIELDS = ("weight", "ld", "bias", "bias_dtype", "qzeros", "scales", "bits", "group_size", "zero_add")
_BLOCK_REALS = ("ln_1_eps", "ln_2_eps", "scaling")


def prototype(symbol: str, arguments) -> str:
    """The C prototype of an exported ``void`` function taking the declared ``arguments``."""
    parameters = (f"{c_type}{'' if c_type.endswith('*') else ' '}{argument}" for argument, c_type in arguments)
    return f"void {symbol}({', '.join(parameters)});\n"


def enum(prefix: str, names, last: str = "FIELDS") -> str:
    """A C enum of ``<PREFIX>_<NAME>`` for ``names`` in order, then ``<PREFIX>_<LAST>``."""
    return "enum { " + "".join(f"{prefix}_{name.upper()}, " for name in names) + f"{prefix}_{last} }};\n"


def _source(
    entry_points=_ENTRY_POINTS,
    block_fields=_BLOCK_FIELDS,
    block_reals=_BLOCK_REALS,
    products=_PRODUCTS,
    product_fields=_PRODUCT_FIELDS,
    gptq_row=GPTQ_ROW_ARGUMENTS,
    dtypes=GPTQ_DTYPE_NAMES,
) -> str:
    """The C source as compiled: a header generated from the declarations (the entry points'
    prototypes, the GPTQ product's function type and dtype codes, the table's field enums),
    then the definitions."""
    prototypes = "".join(prototype(f"qwen_{name}_bf16", arguments) for name, arguments in entry_points.items())
    starts = [f"{name} = B_PRODUCTS + {i} * P_FIELDS" for i, name in enumerate(products)]  # each P_FIELDS long
    table = enum("B", [*block_fields, "products", *starts], f"FIELDS = B_PRODUCTS + {len(products)} * P_FIELDS")
    header = (
        "#include <stdint.h>\n"
        + "typedef "
        + prototype("(*gptq_row_fn)", gptq_row)
        + enum("DT", dtypes, "COUNT")
        + prototypes
        + enum("P", product_fields)
        + table
        + enum("R", block_reals)
    )
    return "/* generated from cpu_kernels.py's declarations */\n" + header + _DEFINITIONS


BF16_C = r"""
/* bf16 <-> float32 (shared with gptq_kernels) */
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

"""

_DEFINITIONS = (
    r"""
#include <math.h>
#if defined(__AVX512F__)
#include <immintrin.h>
#endif

"""
    + BF16_C
    + r"""#if defined(__AVX512F__)
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
   chunks in turn stream nearby memory and finish together (a static schedule, one share
   of the rows each, streams layer-sized products more slowly). */
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

/* bf16(a * bf16(silu(g))) of bf16 a and g: torch's a * F.silu(g) in bf16. */
static inline uint16_t swiglu(uint16_t a, uint16_t g) {
    float gf = bf16_to_float(g);
    return float_to_bf16(bf16_to_float(a) * bf16_to_float(float_to_bf16(gf / (1.f + expf(-gf)))));
}

/* out[n] = swiglu(a, g) with a = bf16(W1[n] . x + b1[n]), g = bf16(W2[n] . x + b2[n]):
   torch's w1(x) * F.silu(w2(x)) in bf16, rounded at the same points; norm_w as in
   qwen_linear_row_bf16. */
void qwen_swiglu_row_bf16(const uint16_t *W1, int64_t ld1, const uint16_t *b1, const uint16_t *W2, int64_t ld2,
                          const uint16_t *b2, const uint16_t *x, const uint16_t *norm_w, float eps, uint16_t *out,
                          int64_t N, int64_t K, int threads, uint16_t *scratch) {
    if (norm_w) { norm_row(x, norm_w, eps, K, scratch); x = scratch; }
    int64_t chunk = row_chunk(K);
    #pragma omp parallel for num_threads(threads) schedule(dynamic, chunk)
    for (int64_t n = 0; n < N; n++)
        out[n] = swiglu(float_to_bf16(row_out(W1, ld1, x, b1, n, K)), float_to_bf16(row_out(W2, ld2, x, b2, n, K)));
}

/* out[r] = norm_row(x[r]) for rows xs apart. */
void qwen_rms_norm_bf16(const uint16_t *x, int64_t xs, const uint16_t *w, uint16_t *out, int64_t rows,
                        int64_t H, float eps, int threads) {
    #pragma omp parallel for num_threads(threads) schedule(static) if (rows * H >= 65536)
    for (int64_t r = 0; r < rows; r++) norm_row(x + r * xs, w, eps, H, out + r * H);
}

/* The rotary embedding (rotate-half convention) of one head vector's first rot dims, in place:
   x * cos + rotate_half(x) * sin in float32, rounded to bf16, with sin signed (-sin on the
   first half). */
static void rotate_head(uint16_t *x, const float *c, const float *s, int64_t rot) {
    int64_t half = rot / 2;
    uint16_t r[rot > 0 ? rot : 1];
    for (int64_t d = 0; d < rot; d++) {
        float partner = bf16_to_float(x[d < half ? d + half : d - half]);
        float p = bf16_to_float(x[d]) * c[d], q = partner * s[d];
        r[d] = float_to_bf16(p + q);
    }
    for (int64_t d = 0; d < rot; d++) x[d] = r[d];
}

#define FIELD_PTR(type, value) ((type)(intptr_t)(value))

/* The product whose P_* fields start at p: out = bf16(W x + bias) for one row x of K, W (N, K) in bf16 (P_BITS 0:
   qwen_linear_row_bf16) or GPTQ (through gptq, qwen_gptq_row of gptq_kernels.py's library, on the packed
   integers; float32 inside, rounded once). norm_w (else NULL): x normalized first as norm_row does, into scratch
   (K values); residual (else NULL): out = bf16(residual + that). GPTQ biases in any DT_* dtype (P_BIAS_DTYPE).
   fscratch: 2 * K floats for gptq. */
static void project(const int64_t *p, gptq_row_fn gptq, const uint16_t *x, const uint16_t *norm_w, float eps,
                    const uint16_t *residual, uint16_t *out, int64_t N, int64_t K, int threads, uint16_t *scratch,
                    float *fscratch) {
    if (p[P_BITS] == 0) {
        qwen_linear_row_bf16(FIELD_PTR(const uint16_t *, p[P_WEIGHT]), p[P_LD], x, norm_w, eps,
                             FIELD_PTR(const uint16_t *, p[P_BIAS]), residual, out, N, K, threads, scratch);
        return;
    }
    if (norm_w) { norm_row(x, norm_w, eps, K, scratch); x = scratch; }
    gptq(x, DT_BF16, FIELD_PTR(const int32_t *, p[P_WEIGHT]), FIELD_PTR(const int32_t *, p[P_QZEROS]),
         FIELD_PTR(const uint16_t *, p[P_SCALES]), FIELD_PTR(const void *, p[P_BIAS]), (int)p[P_BIAS_DTYPE], out, N, K,
         p[P_GROUP_SIZE], (int)p[P_BITS], (int)p[P_ZERO_ADD], threads, fscratch);
    if (residual)
        for (int64_t n = 0; n < N; n++) out[n] = float_to_bf16(bf16_to_float(residual[n]) + bf16_to_float(out[n]));
}

/* Every block of a one-sequence decoding step, with nothing in between: ln_1 + c_attn + rotary;
   the key and value rows written at B_POSITION of the block's cache (strides in elements);
   attention over positions 0..B_POSITION (B_KEEP: B_POSITION + 1 bytes, or 0); c_proj + the
   residual; ln_2 + w1/w2 + gate; the MLP's c_proj + the residual. Block i's fields are
   table[i * B_FIELDS + B_<NAME>], its products' table[i * B_FIELDS + B_<PRODUCT> + P_<NAME>], and
   reals[i * R_FIELDS + R_<NAME>] (the enums generated from cpu_kernels.py's declarations); products
   in bf16 or GPTQ (through gptq, which may be NULL where none is). x: the first block's input
   (hidden values), out: the last block's output. work: bf16 scratch of 3 * H * D (qkv) + H * D
   (attention) + 3 * hidden (h, two block outputs) + 2 * max width + hidden; scores: float scratch of
   H * (max positions + 2 * D); gptq_scratch: 2 * max(hidden, width, H * D) floats (or NULL: no GPTQ). */
void qwen_decode_blocks_bf16(const int64_t *table, const float *reals, int64_t n_blocks, const uint16_t *x,
                             uint16_t *out, int64_t hidden, int64_t H, int64_t D, int64_t rot, const float *cos,
                             const float *sin, int threads, uint16_t *work, float *scores, gptq_row_fn gptq,
                             float *gptq_scratch) {
    uint16_t *qkv = work, *att = qkv + 3 * H * D, *h = att + H * D, *xs[2] = {h + hidden, h + 2 * hidden};
    uint16_t *gated = h + 3 * hidden;
    for (int64_t i = 0; i < n_blocks; i++) {
        const int64_t *f = table + i * B_FIELDS;
        const float *r = reals + i * R_FIELDS;
        const int64_t *w1 = f + B_W1, *w2 = f + B_W2, width = f[B_WIDTH], pos = f[B_POSITION];
        const uint16_t *in = i == 0 ? x : xs[(i - 1) & 1];
        uint16_t *next = i == n_blocks - 1 ? out : xs[i & 1];
        uint16_t *norm_scratch = gated + width, *gate_in = norm_scratch + hidden;
        project(f + B_C_ATTN, gptq, in, FIELD_PTR(const uint16_t *, f[B_LN_1]), r[R_LN_1_EPS], 0, qkv, 3 * H * D,
                hidden, threads, norm_scratch, gptq_scratch);
        for (int64_t j = 0; j < 2 * H; j++) rotate_head(qkv + j * D, cos, sin, rot);  /* queries and keys */
        uint16_t *kc = FIELD_PTR(uint16_t *, f[B_KEYS]), *vc = FIELD_PTR(uint16_t *, f[B_VALUES]);
        for (int64_t j = 0; j < H; j++)
            for (int64_t d = 0; d < D; d++) {
                kc[j * f[B_KEYS_HEAD] + pos * f[B_KEYS_POS] + d] = qkv[(H + j) * D + d];
                vc[j * f[B_VALUES_HEAD] + pos * f[B_VALUES_POS] + d] = qkv[(2 * H + j) * D + d];
            }
        qwen_decode_attention_bf16(qkv, 0, D, kc, 0, f[B_KEYS_HEAD], f[B_KEYS_POS], vc, 0, f[B_VALUES_HEAD],
                                   f[B_VALUES_POS], FIELD_PTR(const uint8_t *, f[B_KEEP]), 0, att, 1, H, pos + 1, D,
                                   r[R_SCALING], threads, scores);
        project(f + B_C_PROJ, gptq, att, 0, 0.f, in, h, hidden, H * D, threads, 0, gptq_scratch);
        const uint16_t *ln_2 = FIELD_PTR(const uint16_t *, f[B_LN_2]);
        if (w1[P_BITS] == 0 && w2[P_BITS] == 0) {
            qwen_swiglu_row_bf16(FIELD_PTR(const uint16_t *, w1[P_WEIGHT]), w1[P_LD], FIELD_PTR(const uint16_t *, w1[P_BIAS]),
                                 FIELD_PTR(const uint16_t *, w2[P_WEIGHT]), w2[P_LD], FIELD_PTR(const uint16_t *, w2[P_BIAS]),
                                 h, ln_2, r[R_LN_2_EPS], gated, width, hidden, threads, norm_scratch);
        } else {
            norm_row(h, ln_2, r[R_LN_2_EPS], hidden, norm_scratch);
            project(w1, gptq, norm_scratch, 0, 0.f, 0, gated, width, hidden, threads, 0, gptq_scratch);
            project(w2, gptq, norm_scratch, 0, 0.f, 0, gate_in, width, hidden, threads, 0, gptq_scratch);
            for (int64_t n = 0; n < width; n++) gated[n] = swiglu(gated[n], gate_in[n]);
        }
        project(f + B_MLP_PROJ, gptq, gated, 0, 0.f, h, next, hidden, width, threads, 0, gptq_scratch);
    }
}
#undef FIELD_PTR
"""
)

_SOURCE = _source()
# -ffp-contract=off: a * b + c stays two roundings, as in torch's kernels (not one FMA)
_FLAGS = ["-O3", "-march=native", "-fopenmp", "-ffp-contract=off", "-shared", "-fPIC"]


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


def _build(compiler: str, source: str = _SOURCE, flags: list[str] = _FLAGS, stem: str = "cpu_kernels") -> Path:
    """A shared library of C ``source`` (these kernels by default): from the cache, else
    compiled into it (or into a private temporary directory when the cache directory
    cannot be written)."""
    key = hashlib.sha256(
        "\0".join([source, " ".join(flags), compiler, _cpu_signature(), sys.platform]).encode()
    ).hexdigest()[:24]
    name = f"{stem}_{key}.so"
    if (cache_dir() / name).exists():
        return cache_dir() / name
    try:
        return _compile(compiler, cache_dir(), name, source, flags)
    except OSError as error:
        fallback = _fallback_dir()
        if fallback is None:
            raise
        logger.info("kernel cache %s not writable (%s); using %s", cache_dir(), error, fallback)
        if (fallback / name).exists():
            return fallback / name
        return _compile(compiler, fallback, name, source, flags)


def _run_compiler(compiler: str, source: str, target: Path, flags: list[str]) -> None:
    """Compile ``source`` (C text) into ``target`` with ``flags``; RuntimeError with the
    compiler's messages where it fails."""
    source_path = target.with_suffix(".c")
    source_path.write_text(source)
    result = subprocess.run(
        [compiler, *flags, str(source_path), "-o", str(target)], capture_output=True, text=True, timeout=120
    )
    if result.returncode != 0:
        raise RuntimeError(f"{compiler} failed: {result.stderr.strip()[-2000:]}")


def _compile(compiler: str, directory: Path, name: str, source: str = _SOURCE, flags: list[str] = _FLAGS) -> Path:
    target = directory / name
    directory.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(dir=directory) as tmp:
        built = Path(tmp) / name
        _run_compiler(compiler, source, built, flags)
        os.replace(built, target)  # atomic: concurrent builders each install a complete file
    return target


def _entry_point(library: ctypes.CDLL, name: str, arguments: tuple[tuple[str, str], ...], symbol: str | None = None):
    """``qwen_<name>_bf16`` (or ``symbol``) of ``library`` with its declared argument types, as
    a Python function taking exactly the declared arguments, by keyword (generated: Python
    checks the names)."""
    symbol = symbol or f"qwen_{name}_bf16"
    function = getattr(library, symbol)
    function.argtypes = [_CTYPES.get(c_type, ctypes.c_void_p) for _, c_type in arguments]
    function.restype = None
    names = ", ".join(argument for argument, _ in arguments)
    namespace = {"function": function}
    exec(f"def {symbol}(*, {names}) -> None:\n    function({names})", namespace)
    bound = namespace[symbol]
    bound.address = ctypes.cast(function, ctypes.c_void_p).value  # for C code that calls it through a pointer
    return bound


def load_library(
    entry_points: dict, *, source: str, flags: list[str], stem: str, what: str, fallback: str, symbol=None
) -> SimpleNamespace | None:
    """Build ``source`` (or take it from the cache) and bind ``entry_points`` (attributes named
    as declared; ``symbol(name)`` the exported C name, default ``qwen_<name>_bf16``). ``None``
    when disabled, without a compiler or when the build fails (logged; ``what`` names the
    kernels, ``fallback`` says what runs instead)."""
    if not enabled():
        return None
    compiler = _compiler()
    if compiler is None:
        logger.info("no C compiler found ($CC, cc, gcc, clang): %s", fallback)
        return None
    try:
        library = ctypes.CDLL(str(_build(compiler, source, flags, stem)))
        return SimpleNamespace(
            **{
                name: _entry_point(library, name, args, symbol(name) if symbol else None)
                for name, args in entry_points.items()
            }
        )
    except Exception as error:  # any failure only costs speed
        logger.warning("could not build %s (%s); %s (QWEN_CPU_KERNELS=0 skips the attempt)", what, error, fallback)
        return None


@functools.cache
def _kernel() -> SimpleNamespace | None:
    """The compiled kernels (attributes named as in ``_ENTRY_POINTS``), or ``None`` (logged
    once) when they cannot be built."""
    return load_library(
        _ENTRY_POINTS,
        source=_SOURCE,
        flags=_FLAGS,
        stem="cpu_kernels",
        what="the CPU kernels",
        fallback="decoding steps stay in torch",
    )


def available() -> bool:
    """Whether the kernels are built (or can be) and enabled; builds them on first call."""
    return _kernel() is not None


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


def _ptr(t: torch.Tensor | None) -> int | None:
    return None if t is None else t.data_ptr()


def _bf16(shape: tuple) -> torch.Tensor:
    """A new bf16 CPU tensor for a kernel to write (on the CPU whatever torch's default device)."""
    return torch.empty(shape, dtype=torch.bfloat16, device=_CPU)


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
    out = _bf16((bsz, 1, heads, dim))
    scratch = torch.empty(bsz * heads * (length + 2 * dim), dtype=torch.float32, device=_CPU)
    kernel.decode_attention(
        q=query.data_ptr(), qs_b=query.stride(0), qs_h=query.stride(1),
        k=key.data_ptr(), ks_b=key.stride(0), ks_h=key.stride(1), ks_l=key.stride(2),
        v=value.data_ptr(), vs_b=value.stride(0), vs_h=value.stride(1), vs_l=value.stride(2),
        keep=_ptr(keep), keep_b=0 if keep is None or keep.shape[0] == 1 else keep.stride(0), out=out.data_ptr(),
        B=bsz, H=heads, L=length, D=dim, scale=float(scaling), threads=torch.get_num_threads(),
        scratch=scratch.data_ptr(),
    )  # fmt: skip
    return out


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
    kernel = _kernel()
    if kernel is None:
        return None
    n_out, n_in = weight.shape
    out = _bf16((*x.shape[:-1], n_out))
    kernel.linear_row(
        W=weight.data_ptr(), ldw=weight.stride(0), x=x.data_ptr(), norm_w=None, eps=0.0, bias=_ptr(bias),
        residual=_ptr(residual), out=out.data_ptr(), N=n_out, K=n_in, threads=torch.get_num_threads(), scratch=None,
    )  # fmt: skip
    return out


def swiglu_row(
    x: torch.Tensor, w1: torch.Tensor, b1: torch.Tensor | None, w2: torch.Tensor, b2: torch.Tensor | None
) -> torch.Tensor | None:
    """``F.linear(x, w1, b1) * F.silu(F.linear(x, w2, b2))`` for one bf16 row, rounded to bf16
    where torch rounds it, or ``None`` when the kernel does not apply."""
    if not _row(x) or not _matrix(w1, b1, x.shape[-1]) or not _matrix(w2, b2, x.shape[-1]):
        return None
    if w1.shape != w2.shape:
        return None
    kernel = _kernel()
    if kernel is None:
        return None
    n_out, n_in = w1.shape
    out = _bf16((*x.shape[:-1], n_out))
    kernel.swiglu_row(
        W1=w1.data_ptr(), ld1=w1.stride(0), b1=_ptr(b1), W2=w2.data_ptr(), ld2=w2.stride(0), b2=_ptr(b2),
        x=x.data_ptr(), norm_w=None, eps=0.0, out=out.data_ptr(), N=n_out, K=n_in, threads=torch.get_num_threads(),
        scratch=None,
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
    out = _bf16(x.shape)
    kernel.rms_norm(
        x=rows.data_ptr(), xs=rows.stride(0), w=weight.data_ptr(), out=out.data_ptr(), rows=rows.shape[0], H=hidden,
        eps=float(eps), threads=torch.get_num_threads(),
    )  # fmt: skip
    return out


@dataclasses.dataclass(frozen=True)
class Product:
    """A linear layer's weight (N, K) and optional bias (N,)."""

    weight: torch.Tensor
    bias: torch.Tensor | None


@dataclasses.dataclass(frozen=True)
class QuantProduct:
    """A GPTQ linear layer's tensors as ``gptq_kernels.gptq_row`` takes them (checked there, by
    ``gptq_kernels.quant_product``): packed ``qweight`` (K * bits / 32, N), ``qzeros`` holding
    ``z - zero_add``, float16 ``scales``, groups of ``group_size`` consecutive inputs."""

    qweight: torch.Tensor
    qzeros: torch.Tensor
    scales: torch.Tensor
    bias: torch.Tensor | None
    bits: int
    group_size: int
    zero_add: int
    n_in: int
    n_out: int


@dataclasses.dataclass(frozen=True)
class Norm:
    """An RMSNorm's weight and epsilon."""

    weight: torch.Tensor
    eps: float


@dataclasses.dataclass(frozen=True)
class BlockParts:
    """What one block of a one-row decoding step reads: its norms, its products (bf16 or
    GPTQ) and the attention's scaling."""

    ln_1: Norm
    c_attn: Product | QuantProduct
    c_proj: Product | QuantProduct
    ln_2: Norm
    w1: Product | QuantProduct
    w2: Product | QuantProduct
    mlp_proj: Product | QuantProduct
    scaling: float

    def products(self) -> list[Product | QuantProduct]:
        """The products, in the table's order (``_PRODUCTS``)."""
        return [getattr(self, name) for name in _PRODUCTS]


def _product(p: Product | QuantProduct, n_in: int, n_out: int) -> bool:
    if isinstance(p, QuantProduct):  # its tensors checked where it was made
        return p.n_in == n_in and p.n_out == n_out
    return _matrix(p.weight, p.bias, n_in) and p.weight.shape[0] == n_out


def _product_fields(p: Product | QuantProduct) -> dict[str, int]:
    """A product's ``_PRODUCT_FIELDS`` in the table: a bf16 weight with bits 0, or GPTQ tensors."""
    if isinstance(p, QuantProduct):
        return {
            "weight": p.qweight.data_ptr(), "ld": 0, "bias": _ptr(p.bias) or 0,
            "bias_dtype": 0 if p.bias is None else GPTQ_DTYPE_CODE[p.bias.dtype], "qzeros": p.qzeros.data_ptr(),
            "scales": p.scales.data_ptr(), "bits": p.bits, "group_size": p.group_size, "zero_add": p.zero_add,
        }  # fmt: skip
    return {
        "weight": p.weight.data_ptr(), "ld": p.weight.stride(0), "bias": _ptr(p.bias) or 0, "bias_dtype": 0,
        "qzeros": 0, "scales": 0, "bits": 0, "group_size": 0, "zero_add": 0,
    }  # fmt: skip


def _by_name(values: dict, names: tuple[str, ...]) -> list:
    """``values`` in the order of ``names``, which must be exactly its keys."""
    try:
        ordered = [values[name] for name in names]
    except KeyError as missing:
        raise ValueError(f"field {missing} not given") from None
    if len(ordered) != len(values):
        raise ValueError(f"fields {sorted(values.keys() - set(names))} not declared")
    return ordered


class BlockSteps:
    """The blocks of one single-sequence decoding step, for :meth:`run` to take through
    all of them in one C call (``qwen_decode_blocks_bf16``), with no Python between the
    blocks' kernels. ``x``: the first block's input, one bf16 row (1, 1, hidden);
    ``cos``/``signed_sin``: the step's float32 rotary tables, ``rot`` values each (sin
    negated on the first half); ``gptq_row``: the address of ``qwen_gptq_row`` (the GPTQ
    kernel library's, ``gptq_kernels.row_function()``) for blocks with GPTQ products (None:
    bf16 products only; may be set before the first such block is added). Each :meth:`add` checks one block's weights and cache and says
    whether it can be taken (if not, :meth:`run` runs nothing); ``ok`` says whether every
    check so far has passed."""

    def __init__(
        self,
        x: torch.Tensor,
        cos: torch.Tensor,
        signed_sin: torch.Tensor,
        heads: int,
        dim: int,
        gptq_row: int | None = None,
    ):
        self.x, self.cos, self.sin, self.heads, self.dim = x, cos, signed_sin, heads, dim
        self.gptq_row = gptq_row
        self.hidden = x.shape[-1]
        rot = cos.shape[-1]
        self.ok = (
            _row(x)
            and x.shape[:-1] == (1, 1)
            and heads > 0
            and dim > 0
            and cos.dtype == signed_sin.dtype == torch.float32
            and cos.shape == signed_sin.shape
            and cos.is_cpu
            and signed_sin.is_cpu
            and rot % 2 == 0
            and rot <= dim
            and cos.numel() == rot
            and cos.stride(-1) == signed_sin.stride(-1) == 1
            and _kernel() is not None
        )
        self.table: list[list[int]] = []
        self.reals: list[list[float]] = []
        self.keep_alive: list[tuple] = []  # every tensor the table points into, until run() has returned
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
        self, parts: BlockParts, keys: torch.Tensor, values: torch.Tensor, position: int, keep: torch.Tensor | None
    ) -> bool:
        """One block: its ``parts``, its cache's key and value buffers (1, heads, room, dim)
        with the step's row to go at ``position`` (attending to positions ``0..position``),
        and the boolean (1, 1, 1, position + 1) mask of those positions (None: all). False
        (and the step not to be run) where anything does not fit."""
        hidden, projection = self.hidden, self.heads * self.dim
        products = parts.products()
        w1 = parts.w1
        width = w1.n_out if isinstance(w1, QuantProduct) else w1.weight.shape[0] if w1.weight.dim() == 2 else 0
        self.ok = (
            self.ok
            and (self.gptq_row is not None or not any(isinstance(p, QuantProduct) for p in products))
            and _vector(parts.ln_1.weight, hidden)
            and _vector(parts.ln_2.weight, hidden)
            and _product(parts.c_attn, hidden, 3 * projection)
            and _product(parts.c_proj, projection, hidden)
            and width > 0
            and _product(parts.w1, hidden, width)
            and _product(parts.w2, hidden, width)
            and _product(parts.mlp_proj, width, hidden)
            and self._cache(keys, position)
            and self._cache(values, position)
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
        fields = {
            "ln_1": parts.ln_1.weight.data_ptr(), "ln_2": parts.ln_2.weight.data_ptr(),
            "keys": keys.data_ptr(), "keys_head": keys.stride(1), "keys_pos": keys.stride(2),
            "values": values.data_ptr(), "values_head": values.stride(1), "values_pos": values.stride(2),
            "position": int(position), "keep": _ptr(keep) or 0, "width": width,
        }  # fmt: skip
        row = _by_name(fields, _BLOCK_FIELDS)
        for product in products:
            row += _by_name(_product_fields(product), _PRODUCT_FIELDS)
        reals = {"ln_1_eps": float(parts.ln_1.eps), "ln_2_eps": float(parts.ln_2.eps), "scaling": float(parts.scaling)}
        self.table.append(row)
        self.reals.append(_by_name(reals, _BLOCK_REALS))
        self.keep_alive.append((parts, keys, values, keep))
        self.width, self.length = max(self.width, width), max(self.length, position + 1)
        return True

    def run(self) -> torch.Tensor | None:
        """Every added block in turn -> the last one's output (the shape of ``x``), their key
        and value rows written into the caches; None (nothing done) where :meth:`add`
        refused a block or none was added."""
        if not self.ok or not self.table:
            return None
        table = torch.tensor(self.table, dtype=torch.int64, device=_CPU)
        reals = torch.tensor(self.reals, dtype=torch.float32, device=_CPU)
        heads, dim, hidden = self.heads, self.dim, self.hidden
        work = _bf16((4 * heads * dim + 4 * hidden + 2 * self.width,))
        scores = torch.empty(heads * (self.length + 2 * dim), dtype=torch.float32, device=_CPU)
        gptq_scratch = torch.empty(2 * max(hidden, self.width, heads * dim), dtype=torch.float32, device=_CPU)
        out = _bf16(self.x.shape)
        _kernel().decode_blocks(
            table=table.data_ptr(), reals=reals.data_ptr(), n_blocks=len(self.table), x=self.x.data_ptr(),
            out=out.data_ptr(), hidden=hidden, H=heads, D=dim, rot=self.cos.shape[-1], cos=self.cos.data_ptr(),
            sin=self.sin.data_ptr(), threads=torch.get_num_threads(), work=work.data_ptr(), scores=scores.data_ptr(),
            gptq=self.gptq_row, gptq_scratch=gptq_scratch.data_ptr(),
        )  # fmt: skip
        return out
