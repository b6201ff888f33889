"""A C kernel for one decoding step's attention on CPU (bf16 cache), built on first use.

A decoding step attends with one query row per (sequence, head) over the cached keys and
values. torch has no kernel made for that on CPU: its half-precision SDPA kernel and
batched matmuls over many small matrices run far below memory speed (a 16-row step of a
1.8B model spent 40-60 ms of ~220 in attention). :func:`decode_attention` computes
``softmax(q k^T * scaling, masked) v`` per (row, head) in float32 from the bf16 cache in
place (no float copy of the cache), skipping masked (padding) keys, in parallel over
rows and heads, with AVX-512 loads/FMAs where the CPU has them.

The C source below is compiled with the system C compiler (``$CC``, else ``cc``/``gcc``,
``-O3 -march=native -fopenmp``; about 0.2 s) the first time it is needed and cached
under ``$QWEN_KERNEL_CACHE`` (default ``~/.cache/qwen/kernels``; when that cannot be
written, a private ``qwen-kernels-<uid>`` directory in the system's temporary directory,
used only while it is the user's own and writable by nobody else), keyed by the source,
the compiler and the CPU's feature flags. Without a compiler, or with
``QWEN_CPU_KERNELS=0``, :func:`decode_attention` returns ``None`` and the model attends
with torch as before. Results: float32 arithmetic throughout (as the model's own
one-sequence path), the output rounded once to bf16 (round to nearest even).
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

import torch

logger = logging.getLogger(__name__)

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
"""

_FLAGS = ["-O3", "-march=native", "-fopenmp", "-shared", "-fPIC"]
_SYMBOL = "qwen_decode_attention_bf16"
_ARGTYPES = (
    [ctypes.c_void_p, ctypes.c_int64, ctypes.c_int64]
    + [ctypes.c_void_p, ctypes.c_int64, ctypes.c_int64, ctypes.c_int64] * 2
    + [ctypes.c_void_p, ctypes.c_int64, ctypes.c_void_p]
    + [ctypes.c_int64] * 4
    + [ctypes.c_float, ctypes.c_int, ctypes.c_void_p]
)


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
    name = f"decode_attention_{key}.so"
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
        source = Path(tmp) / "decode_attention.c"
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
def _kernel():
    """The compiled kernel's ctypes function, or ``None`` (logged once) when it cannot be built."""
    if not enabled():
        return None
    compiler = _compiler()
    if compiler is None:
        logger.info("no C compiler found ($CC, cc, gcc, clang): decoding attention stays in torch")
        return None
    try:
        function = getattr(ctypes.CDLL(str(_build(compiler))), _SYMBOL)
    except Exception as error:  # any failure only costs speed
        logger.warning(
            "could not build the CPU decoding-attention kernel (%s); attention stays in torch "
            "(QWEN_CPU_KERNELS=0 skips the attempt)",
            error,
        )
        return None
    function.argtypes = _ARGTYPES
    function.restype = None
    return function


def available() -> bool:
    """Whether the kernel is built (or can be) and enabled; builds it on first call."""
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
    if query.dtype != torch.bfloat16 or query.device.type != "cpu" or query.shape[2] != 1:
        return None
    if torch.is_grad_enabled() or torch.compiler.is_compiling():
        return None
    if key.dtype != query.dtype or value.dtype != query.dtype or key.shape != value.shape:
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
    out = torch.empty((bsz, 1, heads, dim), dtype=query.dtype)
    scratch = torch.empty(bsz * heads * (length + 2 * dim), dtype=torch.float32)
    kernel(
        query.data_ptr(), query.stride(0), query.stride(1),
        key.data_ptr(), key.stride(0), key.stride(1), key.stride(2),
        value.data_ptr(), value.stride(0), value.stride(1), value.stride(2),
        None if keep is None else keep.data_ptr(), 0 if keep is None or keep.shape[0] == 1 else keep.stride(0),
        out.data_ptr(), bsz, heads, length, dim, float(scaling), torch.get_num_threads(), scratch.data_ptr(),
    )  # fmt: skip
    return out
