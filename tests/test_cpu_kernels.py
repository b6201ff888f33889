"""The C kernels for one-row (decoding) steps on CPU in bf16 (qwen/cpu_kernels.py)."""

from __future__ import annotations

import os
import subprocess

import pytest
import torch
from conftest import needs_compiler

from qwen import cpu_engine, cpu_kernels


def reference(query, key, value, mask, scaling):
    """float64 softmax(q k^T * scaling, masked) v, as (B, 1, H, d)."""
    scores = query.double() @ key.double().transpose(-1, -2) * scaling
    if mask is not None:
        scores = scores.masked_fill(~mask, float("-inf"))
    return (scores.softmax(-1) @ value.double()).transpose(1, 2)


def assert_rounded_from(out: torch.Tensor, exact: torch.Tensor) -> None:
    """``out`` (bf16) is ``exact`` rounded to bf16, up to float32 arithmetic: at most half
    a bf16 unit in the last place (2**-8 relative) plus float32 error."""
    assert out.dtype == torch.bfloat16
    error = (out.double() - exact).abs()
    bound = exact.abs() * 2**-8 + 1e-5
    assert bool((error <= bound).all()), f"worst excess {(error - bound).max().item():.3g}"


def cache_like(bsz, heads, length, dim, room, seed):
    """Keys or values as a GrowingLayer keeps them: a view of a longer buffer."""
    g = torch.Generator().manual_seed(seed)
    buffer = torch.randn(bsz, heads, length + room, dim, generator=g).to(torch.bfloat16)
    return buffer[:, :, :length]


@needs_compiler
@torch.inference_mode()
@pytest.mark.parametrize("dim", [128, 24])  # 128: the AVX-512 path where there is one; 24: the portable path
@pytest.mark.parametrize("bsz,length", [(1, 1), (1, 70), (3, 33)])
def test_decode_attention_matches_float64(dim, bsz, length):
    heads = 4
    # the query as the model has it: a transposed view of the projection's output
    query = (torch.randn(bsz, 1, heads, dim, generator=torch.Generator().manual_seed(1)) * 3).bfloat16().transpose(1, 2)
    key = cache_like(bsz, heads, length, dim, room=5, seed=2)
    value = cache_like(bsz, heads, length, dim, room=7, seed=3)
    scaling = dim**-0.5
    masks = [None, torch.ones(1, 1, 1, length, dtype=torch.bool)]  # no mask; one mask for all rows
    padded = torch.ones(bsz, 1, 1, length, dtype=torch.bool)
    padded[-1, ..., : length // 2] = False  # a left-padded row
    padded[0, ..., length - 1 :] = True
    masks.append(padded)
    window = torch.zeros(bsz, 1, 1, length, dtype=torch.bool)
    window[..., -3:] = True  # a window of 3 keys
    masks.append(window)
    for mask in masks:
        out = cpu_kernels.decode_attention(query, key, value, mask, scaling)
        assert out is not None and out.shape == (bsz, 1, heads, dim)
        assert_rounded_from(out, reference(query, key, value, mask, scaling))


@needs_compiler
@torch.inference_mode()
def test_decode_attention_row_without_keys_is_zero_and_rows_are_independent():
    query = torch.randn(2, 2, 1, 128).bfloat16()
    key, value = torch.randn(2, 2, 9, 128).bfloat16(), torch.randn(2, 2, 9, 128).bfloat16()
    mask = torch.ones(2, 1, 1, 9, dtype=torch.bool)
    mask[1] = False
    out = cpu_kernels.decode_attention(query, key, value, mask, 0.1)
    assert bool((out[1] == 0).all())
    alone = cpu_kernels.decode_attention(query[:1], key[:1], value[:1], mask[:1], 0.1)
    assert torch.equal(out[:1], alone)  # one row's result does not depend on the batch


@torch.inference_mode()
def test_decode_attention_declines_what_it_does_not_handle():
    q, k, v = (
        torch.randn(1, 2, 1, 16).bfloat16(),
        torch.randn(1, 2, 5, 16).bfloat16(),
        torch.randn(1, 2, 5, 16).bfloat16(),
    )
    declined = [
        (q.float(), k.float(), v.float(), None),  # float32
        (torch.randn(1, 2, 2, 16).bfloat16(), k, v, None),  # two query rows
        (q, k, v, torch.zeros(1, 1, 1, 5)),  # an additive float mask
        (q, k, v, torch.ones(1, 2, 1, 5, dtype=torch.bool)),  # a mask per head
        (q, k.transpose(-1, -2).contiguous().transpose(-1, -2), v, None),  # last dimension not contiguous
    ]
    for args in declined:
        assert cpu_kernels.decode_attention(*args, 0.25) is None
    with torch.enable_grad():
        assert cpu_kernels.decode_attention(q, k, v, None, 0.25) is None


def bf16_ulp(t: torch.Tensor) -> torch.Tensor:
    """One bf16 unit in the last place at each value of ``t`` (a bf16 tensor)."""
    exponent = torch.frexp(t.float().abs().clamp(min=2.0**-126))[1]
    return torch.ldexp(torch.ones_like(t, dtype=torch.float64), (exponent - 8).to(torch.int64))


def assert_torch_rounding(out: torch.Tensor, expected: torch.Tensor) -> None:
    """The kernel rounds where torch's code rounds: equal to torch's bf16 result but for a
    float32 sum taken in another order, which moves a rounding rarely and by one unit."""
    assert out.dtype == expected.dtype == torch.bfloat16 and out.shape == expected.shape
    diff = (out.double() - expected.double()).abs()
    assert bool((diff <= bf16_ulp(expected)).all()), f"worst {diff.max().item():.3g}"
    assert (out != expected).double().mean().item() <= 0.01


@needs_compiler
@torch.inference_mode()
@pytest.mark.parametrize("n_out,n_in", [(300, 2048), (7, 100), (33, 37)])  # 2048: whole 64-wide blocks; 100, 37: tails
@pytest.mark.parametrize("with_bias", [True, False])
def test_linear_row_matches_float64(n_out, n_in, with_bias):
    g = torch.Generator().manual_seed(n_out + n_in)
    wide = (torch.randn(n_out, n_in + 6, generator=g) * 0.05).bfloat16()
    weight = wide[:, 3 : 3 + n_in]  # rows further apart than they are long
    bias = torch.randn(n_out, generator=g).bfloat16() if with_bias else None
    x = torch.randn(1, 1, n_in, generator=g).bfloat16()
    out = cpu_kernels.linear_row(x, weight, bias)
    assert out is not None and out.shape == (1, 1, n_out)
    exact = x.double() @ weight.double().T + (0 if bias is None else bias.double())
    assert_rounded_from(out, exact)
    with torch.backends.mkldnn.flags(enabled=False):
        assert_torch_rounding(out, torch.nn.functional.linear(x, weight, bias))


@needs_compiler
@torch.inference_mode()
@pytest.mark.parametrize("n_in", [2048, 100])
def test_swiglu_row_rounds_as_torch(n_in):
    g = torch.Generator().manual_seed(n_in)
    w1, w2 = ((torch.randn(260, n_in, generator=g) * 0.02).bfloat16() for _ in range(2))
    b1, b2 = ((torch.randn(260, generator=g) * 0.5).bfloat16() for _ in range(2))
    x = torch.randn(1, n_in, generator=g).bfloat16()
    for bias1, bias2 in ((None, None), (b1, b2)):
        out = cpu_kernels.swiglu_row(x, w1, bias1, w2, bias2)
        with torch.backends.mkldnn.flags(enabled=False):
            F = torch.nn.functional
            expected = F.linear(x, w1, bias1) * F.silu(F.linear(x, w2, bias2))
        assert_torch_rounding(out, expected)
        # against float64: both products, the gate and the result each rounded to bf16 once
        # (2**-9 each; the gate's error grows up to (1 + |g|)-fold through silu, |g| < 5 here)
        up = x.double() @ w1.double().T + (0 if bias1 is None else bias1.double())
        gate = x.double() @ w2.double().T + (0 if bias2 is None else bias2.double())
        assert gate.abs().max() < 5
        exact = up * gate * torch.sigmoid(gate)
        assert bool(((out.double() - exact).abs() <= exact.abs() * 2**-5 + 1e-4).all())


@needs_compiler
@torch.inference_mode()
@pytest.mark.parametrize("shape", [(1, 1, 2048), (3, 5, 24), (2, 200, 512)])  # the last one: threads split rows
def test_rms_norm_matches_the_model_norm(shape):
    g = torch.Generator().manual_seed(sum(shape))
    x = (torch.randn(*shape, generator=g) * 4).bfloat16()
    weight = torch.randn(shape[-1], generator=g).bfloat16()
    out = cpu_kernels.rms_norm(x, weight, 1e-6)
    x64 = x.double()
    normed = x64 * (x64.pow(2).mean(-1, keepdim=True) + 1e-6).rsqrt()
    # two roundings (the normed value, then its product with the weight), each within half a unit
    exact = normed * weight.double()
    assert bool(((out.double() - exact).abs() <= exact.abs() * 2**-7 + 1e-6).all())
    norm = cpu_engine.CPURMSNorm(shape[-1], eps=1e-6).bfloat16()
    norm.weight.copy_(weight)
    torch_norm = torch.nn.functional.rms_norm(x.float(), (shape[-1],), eps=1e-6).to(torch.bfloat16) * weight
    assert_torch_rounding(out, torch_norm)
    assert torch.equal(norm(x), out)  # the engine's module uses the kernel
    # rows that are a strided view (every other row of a larger tensor)
    strided = (torch.randn(2 * shape[0], *shape[1:], generator=g) * 4).bfloat16()[::2]
    assert torch.equal(
        cpu_kernels.rms_norm(strided, weight, 1e-6), cpu_kernels.rms_norm(strided.contiguous(), weight, 1e-6)
    )


@torch.inference_mode()
def test_one_row_kernels_decline_what_they_do_not_handle():
    w, x = torch.randn(8, 16).bfloat16(), torch.randn(1, 16).bfloat16()
    declined = [
        lambda: cpu_kernels.linear_row(x.half(), w.half(), None),  # fp16
        lambda: cpu_kernels.linear_row(torch.randn(2, 16).bfloat16(), w, None),  # two rows
        lambda: cpu_kernels.linear_row(x, w.T.contiguous().T, None),  # weight columns not contiguous
        lambda: cpu_kernels.linear_row(x, w, torch.zeros(8)),  # a float32 bias
        lambda: cpu_kernels.linear_row(x, torch.randn(8, 15).bfloat16(), None),  # sizes disagree
        lambda: cpu_kernels.swiglu_row(x, w, None, torch.randn(9, 16).bfloat16(), None),  # two widths
        lambda: cpu_kernels.rms_norm(x.float(), w[0], 1e-6),  # float32
        lambda: cpu_kernels.rms_norm(x, w[0].float(), 1e-6),  # float32 weight
        lambda: cpu_kernels.linear_row(x, w.to("meta"), None),  # a weight elsewhere than the CPU
        lambda: cpu_kernels.linear_row(x, w, None, residual=torch.ones(8, dtype=torch.bfloat16, device="meta")),
        lambda: cpu_kernels.swiglu_row(x, w, None, w.to("meta"), None),
    ]
    for call in declined:
        assert call() is None
    with torch.enable_grad():
        assert cpu_kernels.linear_row(x, w, None) is None
        assert cpu_kernels.rms_norm(x, w[0], 1e-6) is None


@needs_compiler
def test_kernel_is_built_once_and_cached(tmp_path, monkeypatch, fresh_kernel):
    monkeypatch.setenv("QWEN_KERNEL_CACHE", str(tmp_path / "kernels"))
    assert cpu_kernels.available()
    built = list((tmp_path / "kernels").glob("cpu_kernels_*.so"))
    assert len(built) == 1
    stamp = built[0].stat().st_mtime_ns
    cpu_kernels._kernel.cache_clear()

    def no_compiler(*args, **kwargs):
        raise AssertionError("compiled again")

    monkeypatch.setattr(subprocess, "run", no_compiler)
    assert cpu_kernels.available()  # loaded from the cache
    assert built[0].stat().st_mtime_ns == stamp
    assert not [p for p in (tmp_path / "kernels").iterdir() if p != built[0]]  # no temporary left behind


@needs_compiler
def test_unwritable_cache_falls_back_to_a_private_temporary_directory(tmp_path, monkeypatch, fresh_kernel):
    blocker = tmp_path / "not-a-directory"
    blocker.write_text("")
    monkeypatch.setenv("QWEN_KERNEL_CACHE", str(blocker / "kernels"))  # mkdir fails there
    monkeypatch.setattr(cpu_kernels.tempfile, "gettempdir", lambda: str(tmp_path / "tmp"))
    (tmp_path / "tmp").mkdir()
    assert cpu_kernels.available()
    private = tmp_path / "tmp" / f"qwen-kernels-{os.getuid()}"
    assert len(list(private.glob("cpu_kernels_*.so"))) == 1
    assert private.stat().st_mode & 0o777 == 0o700
    # a fallback directory others can write to is not trusted
    private.chmod(0o777)
    cpu_kernels._kernel.cache_clear()
    assert not cpu_kernels.available()
