"""C kernels for products on GPTQ int2/int4/int8 weights on CPU.

A decoding step multiplies one row by every weight matrix, so its speed is the speed at
which the weights stream from memory; GPTQ weights are a quarter (int4) or half (int8) of
the bytes of 16-bit ones, but gptqmodel's CPU path dequantizes each whole matrix to 16 bits
first and multiplies after. :func:`gptq_row` reads the packed integers once instead:

    ``y[o] = bias[o] + sum_g scales[g, o] * (sum_{i in g} x[i] q[o, i] - z[g, o] sum_{i in g} x[i])``

(the format of ``quantization.py``'s docstring: ``qweight`` packed along the input,
``qzeros`` along the output, float16 ``scales``; groups of ``group_size`` consecutive
inputs, ``g_idx == i // group_size``), which is ``x @ W.T + bias`` for the exact
dequantized weight ``W[o, i] = scales[g, o] * (q[o, i] - z[g, o])`` regrouped: every product
and sum in float32 (products ``x[i] q[o, i]`` exact for bf16/fp16 inputs), the result
rounded once to the input's dtype (float32, bfloat16 or float16). It differs from the
product with ``W`` only by float32 rounding in the sums (tested within 1e-6 of their
size); gptqmodel instead rounds each ``W[o, i]`` to float16 before multiplying. The
outputs are spread over threads (OpenMP) in contiguous column ranges. Each weight costs a
mask, a conversion and an FMA, which keeps a CPU core busy (it is compute-bound on the 2-core
AVX2 machine of docs/performance.md): with AVX2 and FMA (built with ``-march=native``) the
products are written with intrinsics, in tiles of 32 columns whose sums stay in registers
over a group's rows (eight independent chains of FMAs, each input broadcast once a tile, the
tiles ahead prefetched); elsewhere in plain loops that the compiler vectorizes (16 columns at
a time where the CPU has AVX-512).

:func:`gptq_rows` takes several rows (a prefill, a batch): up to :data:`ROWS_ONE_BY_ONE`
through the one-row kernel row by row, more through ``qwen_gptq_dequant``, which writes the
exact float32 ``W`` (transposed) a block of columns at a time for torch to multiply; the same
contract (exact weights, float32 sums, one rounding). gptqmodel's own path there compiles its
dequantization with Inductor at each module's first call (minutes for a 1.8B model's first
prompt on CPU).

:func:`quant_linear` applies them to a gptqmodel quant-linear module (``TorchLinear``, the
``gptq_torch`` backend) as loaded, where they fit; ``cpu_engine.install`` hooks it in, and the
CPU engine's all-blocks decoding step calls ``qwen_gptq_row`` itself
(:func:`quant_product`, :func:`row_function`).

The boundary follows ``cpu_kernels.py``: the entry points are declared once below
(``_ENTRY_POINTS``; ``qwen_gptq_row``'s arguments and the dtype codes in ``cpu_kernels``,
whose block step calls it through a pointer), a header of prototypes and enums is
generated from them and compiled ahead of the definitions, and the library is built with
``cpu_kernels``' helpers into the same cache (``QWEN_CPU_KERNELS=0`` turns it off too).

Part of the self-contained remote-code set: imports its siblings relatively only.
"""

from __future__ import annotations

import functools
import logging
import platform
from types import SimpleNamespace

import torch

from . import cpu_kernels
from .cpu_kernels import (
    _I64,
    _INT,
    BF16_C,
    GPTQ_DTYPE_CODE,
    GPTQ_DTYPE_NAMES,
    GPTQ_DTYPES,
    GPTQ_ROW_ARGUMENTS,
    QuantProduct,
    enum,
    prototype,
)

logger = logging.getLogger(__name__)

_CPU = torch.device("cpu")

BITS = (2, 4, 8)

_ENTRY_POINTS: dict[str, tuple[tuple[str, str], ...]] = {
    "gptq_row": GPTQ_ROW_ARGUMENTS,
    "gptq_dequant": (
        ("qweight", "const int32_t *"), ("qzeros", "const int32_t *"), ("scales", "const uint16_t *"),
        ("out", "float *"), ("ldo", _I64), ("N", _I64), ("K", _I64), ("c0", _I64), ("n", _I64),
        ("group_size", _I64), ("bits", _INT), ("zero_add", _INT), ("threads", _INT), ("scratch", "float *"),
    ),
}  # fmt: skip


def _symbol(name: str) -> str:
    return f"qwen_{name}"


def _source(entry_points=_ENTRY_POINTS, dtypes=GPTQ_DTYPE_NAMES) -> str:
    """The C source as compiled: a header generated from the declarations, then the definitions."""
    prototypes = "".join(prototype(_symbol(name), arguments) for name, arguments in entry_points.items())
    header = "#include <stdint.h>\n" + prototypes + enum("DT", dtypes, "COUNT")
    return "/* generated from gptq_kernels.py's declarations */\n" + header + _DEFINITIONS


_DEFINITIONS = (
    r"""
#include <math.h>
#include <string.h>

/* Columns one thread takes at a time: its accumulators (three arrays of this many) stay in L1. */
#define CHUNK 1024

"""
    + BF16_C
    + r"""static inline float half_to_float(uint16_t h) {  /* exact */
    union { uint32_t u; float f; } c;
    uint32_t sign = (uint32_t)(h & 0x8000u) << 16, exponent = (h >> 10) & 0x1fu, mantissa = h & 0x3ffu;
    if (exponent == 0) {  /* zero or subnormal: mantissa * 2^-24 */
        c.f = (float)mantissa * 5.9604644775390625e-8f;
        c.u |= sign;
    } else if (exponent == 31) {
        c.u = sign | 0x7f800000u | (mantissa << 13);
    } else {
        c.u = sign | ((exponent + 112u) << 23) | (mantissa << 13);
    }
    return c.f;
}

static inline uint16_t float_to_half(float f) {  /* round to nearest even */
    union { uint32_t u; float f; } c;
    c.f = f;
    uint16_t sign = (uint16_t)((c.u >> 16) & 0x8000u);
    uint32_t a = c.u & 0x7fffffffu;
    if (a > 0x7f800000u) return (uint16_t)(sign | 0x7e00u);                  /* NaN */
    if (a >= 0x477ff000u) return (uint16_t)(sign | 0x7c00u);                 /* >= 65520: infinity */
    if (a < 0x38800000u) {                                                   /* below 2^-14: subnormal */
        c.u = a;
        float scaled = c.f * 16777216.f;                                      /* exact: in units of 2^-24 */
        uint32_t m = (uint32_t)scaled;
        float rest = scaled - (float)m;
        if (rest > 0.5f || (rest == 0.5f && (m & 1u))) m++;
        return (uint16_t)(sign | m);
    }
    uint32_t r = a - 0x38000000u;                                            /* rebias the exponent */
    r = r + 0xfffu + ((r >> 13) & 1u);
    return (uint16_t)(sign | (r >> 13));
}

#if defined(__F16C__) || defined(__AVX2__)
#include <immintrin.h>
#endif

static void halves_to_floats(const uint16_t *h, float *f, int64_t n) {
    int64_t i = 0;
#if defined(__F16C__)
    for (; i + 8 <= n; i += 8) _mm256_storeu_ps(f + i, _mm256_cvtph_ps(_mm_loadu_si128((const __m128i *)(h + i))));
#endif
    for (; i < n; i++) f[i] = half_to_float(h[i]);
}

static inline float load_as_float(const void *p, int dtype, int64_t i) {
    if (dtype == DT_BF16) return bf16_to_float(((const uint16_t *)p)[i]);
    if (dtype == DT_F16) return half_to_float(((const uint16_t *)p)[i]);
    return ((const float *)p)[i];
}

static inline void store_as(void *p, int dtype, int64_t i, float v) {
    if (dtype == DT_BF16) ((uint16_t *)p)[i] = float_to_bf16(v);
    else if (dtype == DT_F16) ((uint16_t *)p)[i] = float_to_half(v);
    else ((float *)p)[i] = v;
}

/* Before each group's sums: zs[c] = z[g, c0 + c] (whole words: up to PER - 1 values past n) and ss[c] =
   scales[g, c0 + c], c < n. After them: tot[c] += ss[c] * (acc[c] - zs[c] * sum), sum the group's sum of x. */
#define GROUP_PROLOGUE(BITS)                                                                               \
    const uint32_t *zw = (const uint32_t *)qzeros + g * ldz + c0 / per;                                    \
    for (int64_t k = 0; k < (n + per - 1) / per; k++)                                                      \
        for (int j = 0; j < per; j++)                                                                      \
            zs[k * per + j] = (float)((int32_t)((zw[k] >> ((BITS) * j)) & maxq) + zero_add);               \
    halves_to_floats(scales + g * N + c0, ss, n);

#define GROUP_EPILOGUE                                                                                     \
    const float sum = sums[g];                                                                             \
    _Pragma("omp simd")                                                                                    \
    for (int64_t c = 0; c < n; c++) tot[c] += ss[c] * (acc[c] - zs[c] * sum);

/* The value at bits [BITS * j, BITS * (j + 1)) of a word is taken as word & mask, that is q * 2^(BITS * j),
   against xs[i] = x[i] * 2^-(BITS * j) (exact: a power of two), and the top one as word >> (BITS * (PER - 1))
   against x[i]: two operations and an FMA per weight. */
#define VALUE(BITS, word, j)                                                                               \
    ((j) + 1 < 32 / (BITS) ? (float)(int32_t)((word) & (((1u << (BITS)) - 1u) << ((BITS) * (j))))           \
                           : (float)(int32_t)((word) >> ((BITS) * (32 / (BITS) - 1))))

#if defined(__AVX2__) && defined(__FMA__) && !defined(__AVX512F__)
/* AVX2 and FMA (where AVX-512 is there, the compiler's own vectorization of the plain loops takes 16 columns
   at a time). acc[c] = sum_{i in g} x[i] q[c0 + c, i] for c < n, group g, in tiles of up to 4 vectors of 8
   columns whose sums stay in registers over the group's rows (w: the tile's first word of its first row, N
   words a row): each input's x broadcast once a tile, the values at even and odd j in two chains of FMAs a
   vector (8 chains in flight cover the FMAs' latency). pf: the words of a tile further on (same rows), fetched
   into L1 ahead of their use (NULL: none). */

static inline __attribute__((always_inline)) void tile_avx2(const int bits, const int vectors, const uint32_t *w,
                                                             int64_t N, const float *xr, int64_t rows, float *acc,
                                                             const uint32_t *pf) {
    const int per = 32 / bits;
    const uint32_t maxq = (1u << bits) - 1u;
    __m256 a[2][4];  /* 2 chains a vector (inputs j % 2): 8 sums in flight hide the FMAs' latency */
#pragma GCC unroll 4
    for (int v = 0; v < vectors; v++) a[0][v] = a[1][v] = _mm256_setzero_ps();
    for (int64_t r = 0; r < rows; r++, w += N, xr += per) {
        if (pf) {
            for (int line = 0; line < vectors * 32; line += 64)
                _mm_prefetch((const char *)(pf + r * N) + line, _MM_HINT_T0);
        }
#pragma GCC unroll 16
        for (int j = 0; j < per; j++) {
            const __m256 xb = _mm256_broadcast_ss(xr + j);
#pragma GCC unroll 4
            for (int v = 0; v < vectors; v++) {
                const __m256i word = _mm256_loadu_si256((const __m256i *)(w + 8 * v));
                const __m256i q = j + 1 < per ? _mm256_and_si256(word, _mm256_set1_epi32((int)(maxq << (bits * j))))
                                              : _mm256_srli_epi32(word, bits * (per - 1));
                a[j % 2][v] = _mm256_fmadd_ps(_mm256_cvtepi32_ps(q), xb, a[j % 2][v]);
            }
        }
    }
#pragma GCC unroll 4
    for (int v = 0; v < vectors; v++)
        _mm256_storeu_ps(acc + 8 * v, _mm256_add_ps(a[0][v], a[1][v]));
}

#define GROUPS_BODY(BITS)                                                                                  \
    const int per = 32 / (BITS);                                                                           \
    const uint32_t maxq = (1u << (BITS)) - 1u;                                                             \
    const int64_t ldz = (N + per - 1) / per, rows = group_size / per, groups = K / group_size;             \
    const int64_t wide = n / 32 * 32, n8 = n / 8 * 8;                                                      \
    for (int64_t g = 0; g < groups; g++) {                                                                 \
        GROUP_PROLOGUE(BITS)                                                                               \
        const uint32_t *w = (const uint32_t *)qweight + g * rows * N + c0;                                 \
        const float *xr = xs + g * rows * per;                                                             \
        for (int64_t c = 0; c < wide; c += 32) {                                                           \
            /* 4 tiles further on, else in the next group */                                               \
            const int64_t ahead = (c + 128) % wide;                                                        \
            const uint32_t *pf = c + 128 < wide ? w + ahead : g + 1 < groups ? w + rows * N + ahead : NULL; \
            tile_avx2((BITS), 4, w + c, N, xr, rows, acc + c, pf);                                         \
        }                                                                                                  \
        int64_t t = wide;                                                                                  \
        if (t + 16 <= n8) { tile_avx2((BITS), 2, w + t, N, xr, rows, acc + t, NULL); t += 16; }           \
        if (t + 8 <= n8) { tile_avx2((BITS), 1, w + t, N, xr, rows, acc + t, NULL); t += 8; }             \
        for (; t < n; t++) {                                                                               \
            float s = 0.f;                                                                                 \
            for (int64_t r = 0; r < rows; r++) {                                                           \
                const uint32_t word = w[r * N + t];                                                        \
                for (int j = 0; j < per; j++) s += xr[r * per + j] * VALUE(BITS, word, j);                 \
            }                                                                                              \
            acc[t] = s;                                                                                    \
        }                                                                                                  \
        GROUP_EPILOGUE                                                                                     \
    }
#else
/* Portable: rows of qweight (PER inputs each) are read in order, n consecutive words of each; BITS is a
   constant where this is expanded: the compiler unrolls the PER values of a word (two chains of sums) and
   vectorizes over the columns. */
#define GROUPS_BODY(BITS)                                                                                  \
    const int per = 32 / (BITS);                                                                           \
    const uint32_t maxq = (1u << (BITS)) - 1u;                                                             \
    const int64_t ldz = (N + per - 1) / per, rows = group_size / per;                                      \
    for (int64_t g = 0; g < K / group_size; g++) {                                                         \
        GROUP_PROLOGUE(BITS)                                                                               \
        for (int64_t c = 0; c < n; c++) acc[c] = 0.f;                                                      \
        for (int64_t r = 0; r < rows; r++) {                                                               \
            const uint32_t *w = (const uint32_t *)qweight + (g * rows + r) * N + c0;                       \
            const float *xr = xs + (g * rows + r) * per;                                                   \
            _Pragma("omp simd")                                                                            \
            for (int64_t c = 0; c < n; c++) {                                                              \
                uint32_t word = w[c];                                                                      \
                float a = acc[c], b = xr[per - 1] * VALUE(BITS, word, per - 1);                            \
                for (int j = 0; j + 1 < per; j += 2) a += xr[j] * VALUE(BITS, word, j);                    \
                for (int j = 1; j + 1 < per; j += 2) b += xr[j] * VALUE(BITS, word, j);                    \
                acc[c] = a + b;                                                                            \
            }                                                                                              \
        }                                                                                                  \
        GROUP_EPILOGUE                                                                                     \
    }
#endif

/* tot[c] += scales[g, c0 + c] * (sum_{i in g} x[i] q[c0 + c, i] - z[g, c0 + c] * sum_{i in g} x[i]) for c < n,
   every group g in turn (sums[g]: the group's sum of x). */
#define GROUPS_FUNCTION(BITS)                                                                              \
static void groups_##BITS(const float *xs, const float *sums, const int32_t *qweight,                     \
                          const int32_t *qzeros, const uint16_t *scales, int64_t N, int64_t K,             \
                          int64_t group_size, int zero_add, int64_t c0, int64_t n, float *acc, float *tot,  \
                          float *zs, float *ss) {                                                          \
    GROUPS_BODY(BITS)                                                                                      \
}

GROUPS_FUNCTION(2)
GROUPS_FUNCTION(4)
GROUPS_FUNCTION(8)

/* out[o] = bias[o] + sum_i x[i] * W[o, i] for one row x of K values, W the GPTQ weight of N outputs
   (qweight (K * bits / 32, N), qzeros (K / group_size, ceil(N * bits / 32)) holding z - zero_add,
   float16 scales (K / group_size, N), all contiguous; group_size a multiple of 32 / bits dividing K).
   x, bias and out in the DT_* dtypes given (out in x's); bias may be NULL. float32 throughout, out
   rounded once. scratch: K + K / group_size floats. Threads take contiguous ranges of the outputs. */
void qwen_gptq_row(const void *x, int x_dtype, const int32_t *qweight, const int32_t *qzeros,
                   const uint16_t *scales, const void *bias, int bias_dtype, void *out, int64_t N, int64_t K,
                   int64_t group_size, int bits, int zero_add, int threads, float *scratch) {
    const int per = 32 / bits;
    float *xs = scratch, *sums = scratch + K;
    float scale[16];  /* 2^-(bits * j), exact */
    for (int j = 0; j < per; j++) scale[j] = j + 1 < per ? ldexpf(1.f, -bits * j) : 1.f;
    for (int64_t g = 0; g < K / group_size; g++) {
        float sum = 0.f;
        for (int64_t i = g * group_size; i < (g + 1) * group_size; i++) {
            float v = load_as_float(x, x_dtype, i);
            sum += v;
            xs[i] = v * scale[i % per];
        }
        sums[g] = sum;
    }
    /* ranges: a multiple of the threads, each at most CHUNK columns and a multiple of 16 */
    int64_t t = threads > 0 ? threads : 1;
    int64_t per_thread = (N + t * CHUNK - 1) / (t * CHUNK), ranges = t * per_thread;
    int64_t width = ((N + ranges - 1) / ranges + 15) / 16 * 16;
    ranges = (N + width - 1) / width;
    #pragma omp parallel for num_threads(threads) schedule(static)
    for (int64_t k = 0; k < ranges; k++) {
        float acc[CHUNK], tot[CHUNK], zs[CHUNK + 16], ss[CHUNK];  /* zs: whole words of zero points */
        int64_t c0 = k * width, n = N - c0 < width ? N - c0 : width;
        for (int64_t c = 0; c < n; c++) tot[c] = 0.f;
        if (bits == 4) groups_4(xs, sums, qweight, qzeros, scales, N, K, group_size, zero_add, c0, n, acc, tot, zs, ss);
        else if (bits == 8) groups_8(xs, sums, qweight, qzeros, scales, N, K, group_size, zero_add, c0, n, acc, tot, zs, ss);
        else groups_2(xs, sums, qweight, qzeros, scales, N, K, group_size, zero_add, c0, n, acc, tot, zs, ss);
        for (int64_t c = 0; c < n; c++)
            store_as(out, x_dtype, c0 + c, bias ? tot[c] + load_as_float(bias, bias_dtype, c0 + c) : tot[c]);
    }
}

/* out[i * ldo + c] = scales[g, c0 + c] * (q[c0 + c, i] - z[g, c0 + c]) in float32, g = i / group_size, for i < K and
   c < n: the dequantized weight of outputs c0..c0 + n - 1, transposed (exact: an 11-bit scale times an integer of
   at most 9 bits). Tensors as in qwen_gptq_row. scratch: 2 * (K / group_size) * n floats (each group's zero points
   and scales). Threads take whole rows of qweight. */
void qwen_gptq_dequant(const int32_t *qweight, const int32_t *qzeros, const uint16_t *scales, float *out,
                       int64_t ldo, int64_t N, int64_t K, int64_t c0, int64_t n, int64_t group_size, int bits,
                       int zero_add, int threads, float *scratch) {
    const int per = 32 / bits;
    const uint32_t maxq = (1u << bits) - 1u;
    const int64_t ldz = (N + per - 1) / per, groups = K / group_size, rows = K / per;
    float *zf = scratch, *sf = scratch + groups * n;
    #pragma omp parallel for num_threads(threads) schedule(static)
    for (int64_t g = 0; g < groups; g++) {
        const uint32_t *zw = (const uint32_t *)qzeros + g * ldz;
        for (int64_t c = 0; c < n; c++) {
            const int64_t col = c0 + c;
            zf[g * n + c] = (float)((int32_t)((zw[col / per] >> (bits * (col % per))) & maxq) + zero_add);
        }
        halves_to_floats(scales + g * N + c0, sf + g * n, n);
    }
    #pragma omp parallel for num_threads(threads) schedule(static)
    for (int64_t r = 0; r < rows; r++) {
        const uint32_t *w = (const uint32_t *)qweight + r * N + c0;
        const int64_t g = r * per / group_size;
        const float *z = zf + g * n, *s = sf + g * n;
        for (int j = 0; j < per; j++) {
            float *o = out + (r * per + j) * ldo;
            #pragma omp simd
            for (int64_t c = 0; c < n; c++) o[c] = s[c] * ((float)(int32_t)((w[c] >> (bits * j)) & maxq) - z[c]);
        }
    }
}
"""
)

_SOURCE = _source()
# -ffp-contract=fast: x * w + acc may be one FMA (a float32 rounding detail, like the order of sums);
# -mprefer-vector-width=512 (x86): 16 columns at a time where the CPU has AVX-512 (GCC prefers 256 bits)
_FLAGS = ["-O3", "-march=native", "-fopenmp", "-ffp-contract=fast", "-shared", "-fPIC"]
if platform.machine().lower() in ("x86_64", "amd64"):
    _FLAGS.insert(2, "-mprefer-vector-width=512")


@functools.cache
def _kernel() -> SimpleNamespace | None:
    """The compiled kernels (attributes named as in ``_ENTRY_POINTS``), or ``None`` (logged
    once) when they cannot be built."""
    return cpu_kernels.load_library(
        _ENTRY_POINTS,
        source=_SOURCE,
        flags=_FLAGS,
        stem="gptq_kernels",
        what="the GPTQ CPU kernels",
        fallback="GPTQ products stay in gptqmodel's code",
        symbol=_symbol,
    )


def available() -> bool:
    """Whether the kernel is built (or can be) and enabled; builds it on first call."""
    return _kernel() is not None


def _int32_matrix(t: torch.Tensor, shape: tuple[int, int]) -> bool:
    return t.dtype == torch.int32 and t.is_cpu and tuple(t.shape) == shape and t.is_contiguous()


def _weights_checked(n_in: int, qweight, qzeros, scales, bias, bits, group_size) -> tuple[int, int] | None:
    """(N, groups) where the kernels take the GPTQ tensors of an (N, ``n_in``) weight as declared
    in :func:`gptq_row` (int32 packing, float16 scales, contiguous, on CPU; a bias of a dtype of
    ``GPTQ_DTYPES``); else None."""
    if bits not in BITS or qweight.dim() != 2:
        return None
    per = 32 // bits
    n_out = qweight.shape[1]
    if group_size <= 0 or group_size % per or n_in % group_size or n_in == 0 or n_out == 0:
        return None
    groups = n_in // group_size
    if not (
        _int32_matrix(qweight, (n_in // per, n_out))
        and _int32_matrix(qzeros, (groups, -(-n_out // per)))
        and scales.dtype == torch.float16
        and scales.is_cpu
        and tuple(scales.shape) == (groups, n_out)
        and scales.is_contiguous()
    ):
        return None
    if bias is not None and (
        bias.dtype not in GPTQ_DTYPES or not bias.is_cpu or tuple(bias.shape) != (n_out,) or bias.stride(0) != 1
    ):
        return None
    return n_out, groups


def _checked(x, qweight, qzeros, scales, bias, bits, group_size) -> tuple[int, int, int] | None:
    """(K, N, groups) where the kernels take ``x`` (rows of K with a contiguous last dimension;
    float32, bfloat16 or float16, on CPU, outside autograd and tracing) and the GPTQ tensors
    (:func:`_weights_checked`); else None."""
    if x.dtype not in GPTQ_DTYPES or not x.is_cpu or x.dim() == 0 or x.stride(-1) != 1:
        return None
    if torch.is_grad_enabled() or torch.compiler.is_compiling():
        return None
    sizes = _weights_checked(x.shape[-1], qweight, qzeros, scales, bias, bits, group_size)
    return None if sizes is None else (x.shape[-1], *sizes)


def gptq_row(
    x: torch.Tensor,
    qweight: torch.Tensor,
    qzeros: torch.Tensor,
    scales: torch.Tensor,
    bias: torch.Tensor | None,
    bits: int,
    group_size: int,
    zero_offset: int = 1,
) -> torch.Tensor | None:
    """``x @ W.T + bias`` for one row ``x`` (shape (..., K), one row in all; float32, bfloat16
    or float16) and the GPTQ weight ``W`` (N, K) of ``qweight``/``qzeros``/``scales`` with
    ``g_idx == i // group_size``; ``qzeros`` holds ``z - zero_offset`` (1 in the checkpoint
    format, 0 in gptqmodel's in-memory "v2" format). Returns a tensor of ``x``'s dtype and
    shape (..., N), or ``None`` where the kernel does not apply (other dtypes, layouts or
    devices, more than one row, autograd, tracing, or no kernel)."""
    if x.dim() == 0 or x.numel() != x.shape[-1]:
        return None
    return gptq_rows(x, qweight, qzeros, scales, bias, bits, group_size, zero_offset)  # one row: the kernel once


# Up to this many rows, several rows go through the one-row kernel row by row; past it, the
# weight is dequantized to float32 DEQUANT_BLOCK_BYTES at a time and torch multiplies (its
# float32 product of few rows is bound by reading the float32 weight). A forward of the 1.8B
# shape in Int4 on the 2-core AVX2 machine, row by row against dequantized: 4 rows 0.25 against
# 0.74 s, 32 rows 1.23 against 1.31 s, 64 rows 2.49 against 2.16 s.
ROWS_ONE_BY_ONE = 48
DEQUANT_BLOCK_BYTES = 16 * 2**20


def gptq_rows(
    x: torch.Tensor,
    qweight: torch.Tensor,
    qzeros: torch.Tensor,
    scales: torch.Tensor,
    bias: torch.Tensor | None,
    bits: int,
    group_size: int,
    zero_offset: int = 1,
) -> torch.Tensor | None:
    """:func:`gptq_row` for any number of rows (a prefill, a batch): up to
    :data:`ROWS_ONE_BY_ONE` rows through the one-row kernel one at a time; more through the
    weight dequantized exactly to float32 by the C kernel (:data:`DEQUANT_BLOCK_BYTES` of it
    at a time) and torch's float32 product, the bias added in float32. Either way the
    result is rounded once to ``x``'s dtype. ``None`` where it does not apply (as
    :func:`gptq_row`, except for the number of rows)."""
    sizes = _checked(x, qweight, qzeros, scales, bias, bits, group_size)
    kernel = _kernel() if sizes is not None else None
    if kernel is None:
        return None
    n_in, n_out, groups = sizes
    if x.numel() // n_in <= ROWS_ONE_BY_ONE:
        rows = x.reshape(-1, n_in).contiguous()
        out = torch.empty(rows.shape[0], n_out, dtype=x.dtype, device=_CPU)
        scratch = torch.empty(n_in + groups, dtype=torch.float32, device=_CPU)
        for row, result in zip(rows, out, strict=True):
            kernel.gptq_row(
                x=row.data_ptr(), x_dtype=GPTQ_DTYPE_CODE[x.dtype], qweight=qweight.data_ptr(), qzeros=qzeros.data_ptr(),
                scales=scales.data_ptr(), bias=None if bias is None else bias.data_ptr(),
                bias_dtype=GPTQ_DTYPE_CODE[bias.dtype] if bias is not None else 0, out=result.data_ptr(), N=n_out,
                K=n_in, group_size=group_size, bits=bits, zero_add=zero_offset, threads=torch.get_num_threads(),
                scratch=scratch.data_ptr(),
            )  # fmt: skip
        return out.reshape(*x.shape[:-1], n_out)
    rows = x.reshape(-1, n_in).float()
    width = min(n_out, max(16, DEQUANT_BLOCK_BYTES // (4 * n_in) // 16 * 16))
    weight = torch.empty(n_in, width, dtype=torch.float32, device=_CPU)
    scratch = torch.empty(2 * groups * width, dtype=torch.float32, device=_CPU)
    out = torch.empty(rows.shape[0], n_out, dtype=torch.float32, device=_CPU)
    for c0 in range(0, n_out, width):
        n = min(width, n_out - c0)
        kernel.gptq_dequant(
            qweight=qweight.data_ptr(), qzeros=qzeros.data_ptr(), scales=scales.data_ptr(), out=weight.data_ptr(),
            ldo=width, N=n_out, K=n_in, c0=c0, n=n, group_size=group_size, bits=bits, zero_add=zero_offset,
            threads=torch.get_num_threads(), scratch=scratch.data_ptr(),
        )  # fmt: skip
        if width == n_out:
            torch.mm(rows, weight, out=out)
        else:
            out[:, c0 : c0 + n] = rows @ weight[:, :n]
    if bias is not None:
        out += bias.float()
    return out.to(x.dtype).reshape(*x.shape[:-1], n_out)


def _plain_groups(module) -> bool:
    """Whether ``module.g_idx`` is ``i // group_size`` (no ``desc_act`` reordering); checked
    once per g_idx tensor (and version: inference tensors have none)."""
    g_idx = module.g_idx
    key = (g_idx.data_ptr(), None if g_idx.is_inference() else g_idx._version, tuple(g_idx.shape))
    cached = module.__dict__.get("_qwen_plain_groups")
    if cached is None or cached[0] != key:
        n_in, size = module.in_features, module.group_size
        plain = g_idx.shape == (n_in,) and torch.equal(g_idx.to(torch.int64), torch.arange(n_in) // size)
        cached = (key, bool(plain))
        module.__dict__["_qwen_plain_groups"] = cached
    return cached[1]


def _zero_add(module) -> int | None:
    """What ``module``'s qzeros add to the zero points (1: the checkpoint format, 0: gptqmodel's
    "v2"), for a gptqmodel quant-linear module the kernels can take as it is (in inference, no
    adapter or input rotation, int32 packing, plain groups); else None."""
    if module.training or getattr(module, "adapter", None) is not None:
        return None
    if getattr(module, "online_full_had", False) or getattr(module, "online_partial_had", False):
        return None
    qweight = module.qweight
    if getattr(module, "pack_dtype", torch.int32) != torch.int32 or qweight is None:
        return None
    if qweight.dim() != 2 or qweight.shape[1] != module.out_features:  # a padded layout: not this format
        return None
    zero_format = module.qzero_format() if hasattr(module, "qzero_format") else 1
    return 2 - zero_format if zero_format in (1, 2) and _plain_groups(module) else None


def quant_linear(module, x: torch.Tensor) -> torch.Tensor | None:
    """``module(x)`` for a gptqmodel quant-linear module holding the GPTQ tensors
    (``TorchLinear``) in inference, any number of rows, through :func:`gptq_rows`; ``None``
    where it does not apply (autograd, tracing, training, an
    adapter, an input rotation, ``desc_act`` groups, a packing other than int32, or what
    they refuse)."""
    if torch.is_grad_enabled() or torch.compiler.is_compiling():
        return None
    if x.dim() == 0 or x.shape[-1] != module.in_features:
        return None
    zero_add = _zero_add(module)
    if zero_add is None:
        return None
    if x.stride(-1) != 1:
        x = x.contiguous()
    return gptq_rows(
        x, module.qweight, module.qzeros, module.scales, module.bias, module.bits, module.group_size, zero_add
    )


def quant_product(module) -> QuantProduct | None:
    """``module``'s GPTQ tensors for the CPU engine's all-blocks decoding step (which calls
    :func:`row_function` on them), where :func:`quant_linear` would take one row; else None.
    Kept on the module until its mode, adapter, zero-point format or tensors change (the
    step asks for every linear at every token)."""
    state = module.__dict__
    buffers = module._buffers
    key = (
        module.training, state.get("adapter"), state.get("_qzeros_format"),
        *(buffers.get(name) for name in ("qweight", "qzeros", "scales", "bias", "g_idx")),
    )  # fmt: skip
    cached = state.get("_qwen_quant_product")
    if cached is not None and all(a is b for a, b in zip(cached[0], key, strict=True)) and _plain_groups(module):
        return cached[1]
    zero_add = _zero_add(module)
    product = None
    if zero_add is not None:
        tensors = (module.qweight, module.qzeros, module.scales, module.bias)
        sizes = _weights_checked(module.in_features, *tensors, module.bits, module.group_size)
        if sizes is not None:
            product = QuantProduct(*tensors, module.bits, module.group_size, zero_add, module.in_features, sizes[0])
    state["_qwen_quant_product"] = (key, product)
    return product


def row_function() -> int | None:
    """The address of the C function behind :func:`gptq_row` (``qwen_gptq_row``, of C type
    ``cpu_kernels``' ``gptq_row_fn``), or None without the kernel."""
    kernel = _kernel()
    return None if kernel is None else kernel.gptq_row.address
