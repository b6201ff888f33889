"""Triton kernels for attention over the int8 KV cache of ``kv_cache.py``.

One fused kernel computes ``softmax(q @ k^T * scaling + mask) @ v`` directly from the
uint8 keys and values and their per-vector scale and zero point: each block of keys and
values is dequantized in registers (``q_u8 * scale + zero``), so no float copy of the
cache is ever written to memory. The softmax is computed online (flash-attention
style, base-2 exponentials). Causality, the optional window and an optional boolean
mask (padding) are applied per block. For few (row, head, query-block) programs and
long caches the key range is split across programs ("flash-decoding") and the partial
results are merged with their log-sum-exp in torch.

Triton is optional: this module imports without it, and :func:`unavailable_reason`
says why the kernels cannot run. On CPU they run only in Triton's interpreter
(``TRITON_INTERPRET=1``, set before ``triton`` is first imported), which is how the
test suite checks them. The kernels are
JIT-compiled by Triton from this file: nothing needs to be copied next to a checkpoint.
"""

import math
import os

import torch

try:
    import triton
    import triton.language as tl
except ImportError:  # optional dependency: pip install "triton>=3.0"
    triton = None
    tl = None

_MIN_TRITON = (3, 0)
_BLOCK_N = 64
_MIN_SPLIT_TOKENS = 256


def _interpreting() -> bool:
    return os.environ.get("TRITON_INTERPRET", "0").strip().lower() in ("1", "true", "yes", "on", "y")


def _triton_version() -> tuple[int, ...]:
    parts = []
    for piece in triton.__version__.split(".")[:2]:
        digits = "".join(ch for ch in piece if ch.isdigit())
        parts.append(int(digits or 0))
    return tuple(parts)


def unavailable_reason(device: torch.device) -> str | None:
    """Why the kernels cannot run for tensors on ``device``, or ``None`` when they can."""
    if triton is None:
        return "Triton is not installed (pip install 'triton>=3.0')"
    if _triton_version() < _MIN_TRITON:
        return f"Triton {triton.__version__} is older than {'.'.join(map(str, _MIN_TRITON))}"
    if device.type == "cuda" or _interpreting():
        return None
    return f"the model runs on {device.type}, not CUDA"


if triton is not None:

    @triton.jit
    def _int8_attention_fwd(
        Q,
        KQ,
        KP,
        VQ,
        VP,
        MASK,
        OUT,
        LSE,
        stride_qb,
        stride_qh,
        stride_qm,
        stride_qd,
        stride_kb,
        stride_kh,
        stride_kn,
        stride_kd,
        stride_kpb,
        stride_kph,
        stride_kpn,
        stride_kpc,
        stride_vb,
        stride_vh,
        stride_vn,
        stride_vd,
        stride_vpb,
        stride_vph,
        stride_vpn,
        stride_vpc,
        stride_mb,
        stride_mh,
        stride_mm,
        stride_mn,
        stride_ob,
        stride_oh,
        stride_os,
        stride_om,
        stride_od,
        stride_lb,
        stride_lh,
        stride_ls,
        stride_lm,
        H,
        M,
        N,
        D,
        split_len,
        qk_scale_log2,
        window,
        HAS_MASK: tl.constexpr,
        HAS_WINDOW: tl.constexpr,
        SPLIT: tl.constexpr,
        BLOCK_M: tl.constexpr,
        BLOCK_N: tl.constexpr,
        BLOCK_D: tl.constexpr,
        DOT_DTYPE: tl.constexpr,
        DOT_PRECISION: tl.constexpr,
    ):
        pid_m = tl.program_id(0)
        pid_bh = tl.program_id(1)
        pid_s = tl.program_id(2)
        # 64-bit row and head offsets: a large cache exceeds 2**31 elements
        b = (pid_bh // H).to(tl.int64)
        h = (pid_bh % H).to(tl.int64)

        offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
        offs_d = tl.arange(0, BLOCK_D)
        m_ok = offs_m < M
        d_ok = offs_d < D
        q = tl.load(
            Q + b * stride_qb + h * stride_qh + offs_m[:, None] * stride_qm + offs_d[None, :] * stride_qd,
            mask=m_ok[:, None] & d_ok[None, :],
            other=0.0,
        )
        # Operands are rounded to the query dtype (as flash attention does); DOT_DTYPE is that
        # dtype on GPUs, float32 in the interpreter (whose bf16 dot is wrong in Triton 3.x).
        qd = q.to(DOT_DTYPE)
        # The queries are the last M of the N cached tokens.
        q_pos = offs_m + (N - M)

        # Keys of this split, cut to what the causal (and window) mask can reach.
        start = pid_s * split_len
        end = tl.minimum(start + split_len, N)
        end = tl.minimum(end, tl.minimum(pid_m * BLOCK_M + BLOCK_M, M) + (N - M))
        if HAS_WINDOW:
            start = tl.maximum(start, pid_m * BLOCK_M + (N - M) - window + 1)

        m_i = tl.full([BLOCK_M], float("-inf"), tl.float32)
        l_i = tl.zeros([BLOCK_M], tl.float32)
        acc = tl.zeros([BLOCK_M, BLOCK_D], tl.float32)

        for n0 in range(start, end, BLOCK_N):
            offs_n = n0 + tl.arange(0, BLOCK_N)
            n_ok = offs_n < end
            nd_ok = n_ok[:, None] & d_ok[None, :]

            # keys: uint8 -> float in registers
            kq = tl.load(
                KQ + b * stride_kb + h * stride_kh + offs_n[:, None] * stride_kn + offs_d[None, :] * stride_kd,
                mask=nd_ok,
                other=0,
            )
            kp = KP + b * stride_kpb + h * stride_kph + offs_n * stride_kpn
            k_scale = tl.load(kp, mask=n_ok, other=0.0).to(tl.float32)
            k_zero = tl.load(kp + stride_kpc, mask=n_ok, other=0.0).to(tl.float32)
            k = tl.where(nd_ok, kq.to(tl.float32) * k_scale[:, None] + k_zero[:, None], 0.0)
            s = tl.dot(qd, tl.trans(k.to(q.dtype).to(DOT_DTYPE)), input_precision=DOT_PRECISION) * qk_scale_log2

            keep = n_ok[None, :] & (offs_n[None, :] <= q_pos[:, None])
            if HAS_WINDOW:
                keep = keep & (q_pos[:, None] - offs_n[None, :] < window)
            if HAS_MASK:
                allowed = tl.load(
                    MASK + b * stride_mb + h * stride_mh + offs_m[:, None] * stride_mm + offs_n[None, :] * stride_mn,
                    mask=m_ok[:, None] & n_ok[None, :],
                    other=0,
                )
                keep = keep & (allowed != 0)
            s = tl.where(keep, s, float("-inf"))

            # online softmax (base 2)
            m_new = tl.maximum(m_i, tl.max(s, 1))
            m_safe = tl.where(m_new == float("-inf"), 0.0, m_new)
            p = tl.exp2(s - m_safe[:, None])
            alpha = tl.exp2(m_i - m_safe)
            l_i = l_i * alpha + tl.sum(p, 1)

            # values: uint8 -> float in registers
            vq = tl.load(
                VQ + b * stride_vb + h * stride_vh + offs_n[:, None] * stride_vn + offs_d[None, :] * stride_vd,
                mask=nd_ok,
                other=0,
            )
            vp = VP + b * stride_vpb + h * stride_vph + offs_n * stride_vpn
            v_scale = tl.load(vp, mask=n_ok, other=0.0).to(tl.float32)
            v_zero = tl.load(vp + stride_vpc, mask=n_ok, other=0.0).to(tl.float32)
            v = tl.where(nd_ok, vq.to(tl.float32) * v_scale[:, None] + v_zero[:, None], 0.0)
            pv = tl.dot(p.to(q.dtype).to(DOT_DTYPE), v.to(q.dtype).to(DOT_DTYPE), input_precision=DOT_PRECISION)
            acc = acc * alpha[:, None] + pv
            m_i = m_new

        l_safe = tl.where(l_i > 0, l_i, 1.0)
        o = acc / l_safe[:, None]
        out_ptrs = (
            OUT
            + b * stride_ob
            + h * stride_oh
            + pid_s * stride_os
            + offs_m[:, None] * stride_om
            + offs_d[None, :] * stride_od
        )
        tl.store(out_ptrs, o.to(OUT.dtype.element_ty), mask=m_ok[:, None] & d_ok[None, :])
        if SPLIT:
            lse = tl.where(l_i > 0, m_i + tl.log2(l_safe), float("-inf"))
            tl.store(LSE + b * stride_lb + h * stride_lh + pid_s * stride_ls + offs_m * stride_lm, lse, mask=m_ok)


_TL_DTYPES = {torch.float16: tl.float16, torch.bfloat16: tl.bfloat16, torch.float32: tl.float32} if tl else {}


def _bool_mask(mask: torch.Tensor | None, B: int, H: int, M: int, N: int) -> torch.Tensor | None:
    """The attention mask as a (B, H, M, N) uint8 view (1 = attend), or None.

    Accepts what the model's mask builders give: a 2-D (B, keys) padding mask
    (flash-attention-2), a 4-D boolean mask (SDPA) or a 4-D additive float mask (eager).
    """
    if mask is None:
        return None
    if mask.dim() == 2:
        mask = (mask[:, -N:] != 0)[:, None, None, :]
    elif mask.dim() == 4:
        if mask.dtype != torch.bool:
            mask = mask > torch.finfo(mask.dtype).min / 2 if mask.is_floating_point() else mask != 0
        mask = mask[..., -M:, -N:]
    else:
        raise ValueError(f"attention mask of shape {tuple(mask.shape)}: expected 2-D or 4-D")
    return mask.expand(B, H, M, N).view(torch.uint8)


def _num_splits(programs: int, n_keys: int, device: torch.device) -> int:
    if device.type != "cuda":
        return 1
    sms = torch.cuda.get_device_properties(device).multi_processor_count
    if programs >= sms:
        return 1
    return max(1, min(math.ceil(2 * sms / programs), math.ceil(n_keys / _MIN_SPLIT_TOKENS), 64))


def int8_attention(
    query: torch.Tensor,
    key_q: torch.Tensor,
    key_p: torch.Tensor,
    value_q: torch.Tensor,
    value_p: torch.Tensor,
    attention_mask: torch.Tensor | None = None,
    scaling: float | None = None,
    window: int | None = None,
    num_splits: int | None = None,
) -> torch.Tensor:
    """Causal attention of ``query`` (B, H, M, D) over an int8 cache.

    ``key_q``/``value_q``: uint8 (B, H, N, D); ``key_p``/``value_p``: (B, H, N, 2) scale and
    zero point. The queries are the last ``M`` of the ``N`` cached positions. ``window``
    limits each query to that many most recent keys; ``attention_mask`` (see
    :func:`_bool_mask`) adds padding. Returns (B, M, H, D) in the dtype of ``query``, the
    layout of the ``transformers`` attention functions.
    """
    reason = unavailable_reason(query.device)
    if reason is not None:
        raise RuntimeError(f"the int8 attention kernels cannot run: {reason}")
    B, H, M, D = query.shape
    N = key_q.shape[-2]
    if M > N:
        raise ValueError(f"{M} queries but only {N} cached keys; the queries must be cached first")
    if scaling is None:
        scaling = D**-0.5
    mask = _bool_mask(attention_mask, B, H, M, N)

    block_m = 16 if M <= 16 else 64
    block_d = max(16, triton.next_power_of_2(D))
    m_blocks = triton.cdiv(M, block_m)
    splits = num_splits or _num_splits(m_blocks * B * H, N, query.device)
    split_len = triton.cdiv(triton.cdiv(N, splits), _BLOCK_N) * _BLOCK_N
    splits = triton.cdiv(N, split_len)

    out = torch.empty((B, M, H, D), dtype=query.dtype, device=query.device)
    if splits == 1:
        target, lse = out, out  # lse is not written
        o_strides = (out.stride(0), out.stride(2), 0, out.stride(1), out.stride(3))
        l_strides = (0, 0, 0, 0)
    else:
        target = torch.empty((B, H, splits, M, D), dtype=torch.float32, device=query.device)
        lse = torch.empty((B, H, splits, M), dtype=torch.float32, device=query.device)
        o_strides = target.stride()
        l_strides = lse.stride()
    m_strides = mask.stride() if mask is not None else (0, 0, 0, 0)

    grid = (m_blocks, B * H, splits)
    _int8_attention_fwd[grid](
        query,
        key_q,
        key_p,
        value_q,
        value_p,
        mask if mask is not None else key_q,
        target,
        lse,
        *query.stride(),
        *key_q.stride(),
        *key_p.stride(),
        *value_q.stride(),
        *value_p.stride(),
        *m_strides,
        *o_strides,
        *l_strides,
        H,
        M,
        N,
        D,
        split_len,
        float(scaling) * math.log2(math.e),
        int(window or 0),
        HAS_MASK=mask is not None,
        HAS_WINDOW=window is not None,
        SPLIT=splits > 1,
        BLOCK_M=block_m,
        BLOCK_N=_BLOCK_N,
        BLOCK_D=block_d,
        DOT_DTYPE=tl.float32 if _interpreting() else _TL_DTYPES[query.dtype],
        DOT_PRECISION="ieee" if query.dtype == torch.float32 or _interpreting() else None,
        num_warps=4,
    )
    if splits == 1:
        return out
    # merge the splits by their log-sum-exp
    top = lse.amax(dim=2, keepdim=True)
    top = torch.where(torch.isinf(top), torch.zeros_like(top), top)
    weight = torch.exp2(lse - top)
    total = weight.sum(dim=2)
    merged = (target * weight[..., None]).sum(dim=2) / torch.where(total > 0, total, 1.0)[..., None]
    out.copy_(merged.transpose(1, 2))
    return out
