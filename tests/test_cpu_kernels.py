"""The C kernel for a decoding step's attention on CPU (qwen/cpu_kernels.py)."""

from __future__ import annotations

import os
import subprocess

import pytest
import torch
from conftest import make_tiny, rand_ids
from transformers import AutoModelForCausalLM, DynamicCache

from qwen import cpu_kernels, modeling_qwen

needs_compiler = pytest.mark.skipif(
    cpu_kernels._compiler() is None or not cpu_kernels.enabled(), reason="no C compiler (or QWEN_CPU_KERNELS=0)"
)


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


@pytest.fixture
def fresh_kernel():
    """Forget the process's kernel before and after the test (its environment differs)."""
    cpu_kernels._kernel.cache_clear()
    yield
    cpu_kernels._kernel.cache_clear()


@needs_compiler
def test_kernel_is_built_once_and_cached(tmp_path, monkeypatch, fresh_kernel):
    monkeypatch.setenv("QWEN_KERNEL_CACHE", str(tmp_path / "kernels"))
    assert cpu_kernels.available()
    built = list((tmp_path / "kernels").glob("decode_attention_*.so"))
    assert len(built) == 1
    stamp = built[0].stat().st_mtime_ns
    cpu_kernels._kernel.cache_clear()

    def no_compiler(*args, **kwargs):
        raise AssertionError("compiled again")

    monkeypatch.setattr(subprocess, "run", no_compiler)
    assert cpu_kernels.available()  # loaded from the cache
    assert built[0].stat().st_mtime_ns == stamp
    assert not [p for p in (tmp_path / "kernels").iterdir() if p != built[0]]  # no temporary left behind


@pytest.mark.parametrize("setting", ["failing compiler", "switched off"])
def test_without_the_kernel_the_model_attends_in_torch(tmp_path, monkeypatch, tiny_dir, caplog, setting, fresh_kernel):
    if setting == "failing compiler":
        monkeypatch.setenv("CC", "false")  # exits 1 on anything
        monkeypatch.setenv("QWEN_KERNEL_CACHE", str(tmp_path / "empty"))
    else:
        monkeypatch.setenv("QWEN_CPU_KERNELS", "0")
    assert not cpu_kernels.available()
    if setting == "failing compiler":
        assert "could not build the CPU decoding-attention kernel" in caplog.text
    model = AutoModelForCausalLM.from_pretrained(tiny_dir, dtype=torch.bfloat16).eval()
    ids = rand_ids(1, 6)
    with torch.inference_mode():
        cache = DynamicCache(config=model.config)
        model(ids[:, :-1], past_key_values=cache, use_cache=True)
        step = model(ids[:, -1:], past_key_values=cache, use_cache=True).logits
        whole = model(ids).logits
    assert torch.isfinite(step).all()
    assert (step[:, -1].float() - whole[:, -1].float()).abs().max() < 0.1


@pytest.fixture(scope="module")
def head128_dir(tmp_path_factory):
    """Heads of 128 dims, as every Qwen-1 model: the kernel's AVX-512 path."""
    return make_tiny(
        tmp_path_factory.mktemp("ckpt") / "tiny-128", "--hidden", "256", "--heads", "2", "--seq-length", "64"
    )


@needs_compiler
@torch.no_grad()
@pytest.mark.parametrize("which", ["head128_dir", "tiny_dir"])
def test_model_decoding_step_through_the_kernel(request, monkeypatch, which):
    """A bf16 decoding step on CPU attends through the kernel, once per layer, for one
    sequence and for a left-padded batch; its logits equal those of the torch path
    (float32 attention over a float32 copy of the cache: the same arithmetic) up to bf16
    rounding noise, and stay as close to the float32 model's as SDPA's whole-sequence
    forward is."""
    path = request.getfixturevalue(which)
    half = AutoModelForCausalLM.from_pretrained(path, dtype=torch.bfloat16).eval()
    exact_model = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32).eval()
    layers = half.config.num_hidden_layers
    calls = []
    real = modeling_qwen.decode_attention

    def counting(*args):
        calls.append(1)
        return real(*args)

    monkeypatch.setattr(modeling_qwen, "decode_attention", counting)
    ids = rand_ids(2, 40, seed=4)
    mask = torch.ones_like(ids)
    mask[1, :5] = 0

    def step(batch_ids, batch_mask):
        cache = DynamicCache(config=half.config)
        half(batch_ids[:, :-1], attention_mask=batch_mask[:, :-1], past_key_values=cache, use_cache=True)
        return half(batch_ids[:, -1:], attention_mask=batch_mask, past_key_values=cache, use_cache=True).logits[:, -1]

    for rows in (slice(0, 1), slice(0, 2)):
        calls.clear()
        kernel = step(ids[rows], mask[rows]).float()
        assert len(calls) == layers
        monkeypatch.setattr(modeling_qwen, "decode_attention", lambda *a: None)
        torch_path = step(ids[rows], mask[rows]).float()
        monkeypatch.setattr(modeling_qwen, "decode_attention", counting)
        whole = half(ids[rows], attention_mask=mask[rows]).logits[:, -1].float()
        exact = exact_model(ids[rows], attention_mask=mask[rows]).logits[:, -1]
        assert (kernel - exact).abs().max() <= 2 * (whole - exact).abs().max() + 1e-3
        if rows.stop == 1:  # one sequence: the torch path is float32 attention too
            assert (kernel - torch_path).abs().max() <= (whole - exact).abs().max() + 1e-3


@needs_compiler
def test_unwritable_cache_falls_back_to_a_private_temporary_directory(tmp_path, monkeypatch, fresh_kernel):
    blocker = tmp_path / "not-a-directory"
    blocker.write_text("")
    monkeypatch.setenv("QWEN_KERNEL_CACHE", str(blocker / "kernels"))  # mkdir fails there
    monkeypatch.setattr(cpu_kernels.tempfile, "gettempdir", lambda: str(tmp_path / "tmp"))
    (tmp_path / "tmp").mkdir()
    assert cpu_kernels.available()
    private = tmp_path / "tmp" / f"qwen-kernels-{os.getuid()}"
    assert len(list(private.glob("decode_attention_*.so"))) == 1
    assert private.stat().st_mode & 0o777 == 0o700
    # a fallback directory others can write to is not trusted
    private.chmod(0o777)
    cpu_kernels._kernel.cache_clear()
    assert not cpu_kernels.available()
