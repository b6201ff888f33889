"""The C kernels for one-row (decoding) steps on CPU in bf16 (qwen/cpu_kernels.py)."""

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
    norm = modeling_qwen.QWenRMSNorm(shape[-1], eps=1e-6).bfloat16()
    norm.weight.copy_(weight)
    torch_norm = torch.nn.functional.rms_norm(x.float(), (shape[-1],), eps=1e-6).to(torch.bfloat16) * weight
    assert_torch_rounding(out, torch_norm)
    assert torch.equal(norm(x), out)  # the module uses the kernel
    # rows that are a strided view (every other row of a larger tensor)
    strided = (torch.randn(2 * shape[0], *shape[1:], generator=g) * 4).bfloat16()[::2]
    assert torch.equal(
        cpu_kernels.rms_norm(strided, weight, 1e-6), cpu_kernels.rms_norm(strided.contiguous(), weight, 1e-6)
    )


@needs_compiler
@torch.inference_mode()
@pytest.mark.parametrize("dim,rot", [(128, 128), (128, 64), (24, 16)])  # rotary_pct 1, 0.5, and a small head
def test_rotary_qk_equals_apply_rotary(dim, rot):
    g = torch.Generator().manual_seed(dim + rot)
    qkv = (torch.randn(2, 1, 3, 4, dim, generator=g) * 3).bfloat16()
    inv_freq = 1.0 / 10000 ** (torch.arange(0, rot, 2, dtype=torch.float32) / rot)
    for positions in (torch.tensor([[5], [700]]), torch.tensor([[9]])):  # a row each; one row for the batch
        freqs = positions.float()[..., None] * inv_freq
        emb = torch.cat((freqs, freqs), dim=-1)[:, :, None, :]
        cos, signed_sin = modeling_qwen.rotary_tables(emb.cos(), emb.sin())
        out = cpu_kernels.rotary_qk(qkv[:, :, :2], cos, signed_sin)
        # the same float32 operations as torch's (no fused multiply-add): equal
        assert torch.equal(out, modeling_qwen.apply_rotary(qkv[:, :, :2], cos, signed_sin))
        # and the rotation itself, against float64
        x = qkv[:, :, :2].double()
        half = rot // 2
        rotated = torch.cat((-x[..., half:rot], x[..., :half]), dim=-1)
        c, s = (t.double().expand(2, -1, -1, -1, -1) for t in (emb.cos()[:, :, None], emb.sin()[:, :, None]))
        exact = torch.cat((x[..., :rot] * c + rotated * s, x[..., rot:]), dim=-1)
        assert_rounded_from(out, exact)


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
        lambda: cpu_kernels.rotary_qk(
            torch.randn(1, 2, 2, 1, 16).bfloat16(), *[torch.ones(1, 1, 1, 1, 16)] * 2
        ),  # two rows
        lambda: cpu_kernels.rotary_qk(
            torch.randn(1, 1, 2, 1, 16).bfloat16(), *[torch.ones(1, 1, 1, 1, 16).double()] * 2
        ),
        lambda: cpu_kernels.linear_row(x, w.to("meta"), None),  # a weight elsewhere than the CPU
        lambda: cpu_kernels.linear_row(x, w, None, residual=torch.ones(8, dtype=torch.bfloat16, device="meta")),
        lambda: cpu_kernels.swiglu_row(x, w, None, w, None, norm=(w[0].to("meta"), 1e-6)),
    ]
    for call in declined:
        assert call() is None
    with torch.enable_grad():
        assert cpu_kernels.linear_row(x, w, None) is None
        assert cpu_kernels.rms_norm(x, w[0], 1e-6) is None


@needs_compiler
@torch.no_grad()
def test_kernels_allocate_on_the_cpu_under_another_default_device(head128_dir):
    """The kernels' outputs and scratch are CPU tensors whatever torch's default device
    (the C code writes through their pointers): under ``torch.device("meta")`` a decoding
    step through one C call, and each kernel on its own, give the results they give
    without it."""
    model = AutoModelForCausalLM.from_pretrained(head128_dir, dtype=torch.bfloat16).eval()
    ids = rand_ids(1, 9, seed=2)
    w, x = torch.randn(8, 16).bfloat16(), torch.randn(1, 16).bfloat16()
    position = torch.tensor([[ids.shape[1] - 1]])
    rotary = modeling_qwen.rotary_tables(*model.transformer.rotary_emb(position, None))
    hidden = model.transformer.wte(ids[:, -1:])
    layers = model.config.num_hidden_layers
    outputs = []
    for device in ("cpu", "meta"):
        cache = DynamicCache(config=model.config)
        model(ids[:, :-1], past_key_values=cache)
        with torch.device(device):
            block_step = model.transformer._one_row_blocks(hidden, rotary, [None] * layers, cache)
            kernels = (cpu_kernels.linear_row(x, w, None), cpu_kernels.rms_norm(x, w[0], 1e-6))
        outputs.append((block_step, cache.layers[-1].keys, *kernels))
    for plain, under_meta in zip(*outputs, strict=True):
        assert under_meta.device.type == "cpu" and torch.equal(plain, under_meta)


@needs_compiler
@torch.no_grad()
def test_decoding_step_runs_through_the_kernels(head128_dir, monkeypatch):
    """A one-sequence bf16 decoding step on CPU runs all its blocks in one C call
    (BlockSteps); block by block, each block runs in five C calls (ln_1 + c_attn +
    rotary; attention; c_proj + residual; ln_2 + w1/w2 + gate; c_proj + residual). Both
    give exactly the logits of the blocks' modules (which use the kernels one by one),
    and those of the torch path up to bf16 rounding noise. A block with a hook on one of
    its modules (as adapters and quantizers add) runs through its modules, the hook
    fires, and the other blocks still run in their five calls."""
    model = AutoModelForCausalLM.from_pretrained(head128_dir, dtype=torch.bfloat16).eval()
    layers = model.config.num_hidden_layers
    names = ["qkv_row", "linear_row", "swiglu_row", "rms_norm", "rotary_qk", "decode_attention"]
    real = {name: getattr(modeling_qwen, name) for name in names}
    calls = dict.fromkeys([*names, "all blocks"], 0)
    real_run = cpu_kernels.BlockSteps.run

    def counting(name):
        def call(*args, **kwargs):
            calls[name] += 1
            return real[name](*args, **kwargs)

        return call

    def counted_run(steps):
        out = real_run(steps)
        calls["all blocks"] += out is not None
        return out

    def use(kernels: bool):
        for name in names:
            monkeypatch.setattr(modeling_qwen, name, counting(name) if kernels else lambda *a, **k: None)
        monkeypatch.setattr(cpu_kernels.BlockSteps, "run", counted_run if kernels else lambda steps: None)

    ids = rand_ids(1, 30, seed=6)

    def step():
        cache = DynamicCache(config=model.config)
        model(ids[:, :-1], past_key_values=cache, use_cache=True)
        calls.update(dict.fromkeys(calls, 0))
        return model(ids[:, -1:], past_key_values=cache, use_cache=True).logits[:, -1].float()

    use(kernels=True)
    all_blocks = step()
    assert calls == {name: 0 for name in names} | {"all blocks": 1, "linear_row": 1, "rms_norm": 1}  # + ln_f, lm_head
    monkeypatch.setattr(modeling_qwen.QWenModel, "_one_row_blocks", lambda *args: None)
    fused = step()
    # per block: qkv_row, attention, linear_row twice, swiglu_row; then ln_f and lm_head
    assert calls == {
        "qkv_row": layers, "decode_attention": layers, "linear_row": 2 * layers + 1,
        "swiglu_row": layers, "rms_norm": 1, "rotary_qk": 0, "all blocks": 0,
    }  # fmt: skip
    assert torch.equal(all_blocks, fused)
    monkeypatch.setattr(modeling_qwen.QWenBlock, "one_row_step", lambda *args: None)
    modules = step()
    assert calls["rotary_qk"] == layers and calls["rms_norm"] == 2 * layers + 1
    assert torch.equal(fused, modules)  # the same roundings
    monkeypatch.undo()
    use(kernels=False)
    torch_path = step()
    whole = model(ids).logits[:, -1].float()
    spread = (whole - torch_path).abs().max().item()  # SDPA's whole-sequence forward: as far off
    assert (fused - torch_path).abs().max().item() <= spread + 2e-2

    use(kernels=True)
    seen = []
    model.transformer.h[0].mlp.w1.register_forward_hook(lambda module, args, out: seen.append(out.shape))
    assert torch.equal(step(), fused)
    assert calls["all blocks"] == 0
    assert calls["qkv_row"] == layers - 1 and calls["swiglu_row"] == layers - 1
    width = model.config.intermediate_size // 2
    assert seen == [(1, 29, width), (1, 1, width)]  # the prefill, then the step


@needs_compiler
@torch.no_grad()
@pytest.mark.parametrize("which", ["head128_dir", "tiny_dir"])  # heads of 128 dims (AVX-512 attention) and 16
def test_steps_through_all_blocks_equal_block_by_block(request, monkeypatch, which):
    """Decoding steps through all blocks in one C call write the same cache and give the
    same logits, bit for bit, as the blocks one by one, step after step: with a window on
    one layer (a boolean mask of the cached positions), with biases, and while the cache's
    buffers regrow (no spare room kept); generate() decodes through it and picks the same
    tokens. Steps it does not take (hidden states asked for, a static cache, a hooked
    block) go block by block."""
    path = request.getfixturevalue(which)
    model = AutoModelForCausalLM.from_pretrained(path, dtype=torch.bfloat16, window_size=[None, 7]).eval()
    torch.manual_seed(1)
    for name, param in model.named_parameters():
        if name.endswith("bias") or ".mlp." in name:
            param.normal_(0, 0.5)  # c_attn's bias and the MLP: nonzero, as in trained weights
    for block in model.transformer.h:
        block.ln_2.eps = 0.25  # each norm's own epsilon reaches its kernel
    monkeypatch.setattr(modeling_qwen_kv(), "GROWING_MIN_ROOM", 1)
    taken = []
    real = modeling_qwen.QWenModel._one_row_blocks

    def spying(self, *args):
        out = real(self, *args)
        taken.append(out is not None)
        return out

    ids = rand_ids(1, 12, seed=3)
    runs = {}
    for how in ("all blocks", "block by block"):
        monkeypatch.setattr(
            modeling_qwen.QWenModel, "_one_row_blocks", spying if how == "all blocks" else lambda *a: None
        )
        cache = DynamicCache(config=model.config)
        token, logits = model(ids, past_key_values=cache).logits[:, -1:].argmax(-1), []
        for _ in range(14):  # the window of 7 and the buffers' room (1 + length // 4) passed
            logits.append(model(token, past_key_values=cache).logits[:, -1])
            token = logits[-1].argmax(-1, keepdim=True)
        runs[how] = logits, cache
    assert taken == [True] * 14
    (fast, fast_cache), (slow, slow_cache) = runs["all blocks"], runs["block by block"]
    assert all(torch.equal(a, b) for a, b in zip(fast, slow, strict=True))
    for a, b in zip(fast_cache.layers, slow_cache.layers, strict=True):
        assert a.keys.shape[-2] == 12 + 14 and torch.equal(a.keys, b.keys) and torch.equal(a.values, b.values)

    monkeypatch.setattr(modeling_qwen.QWenModel, "_one_row_blocks", spying)
    taken.clear()
    fast_tokens = model.generate(ids, max_new_tokens=6, do_sample=False, min_new_tokens=6)
    assert taken == [True] * 5
    monkeypatch.setattr(modeling_qwen.QWenModel, "_one_row_blocks", lambda *a: None)
    assert torch.equal(fast_tokens, model.generate(ids, max_new_tokens=6, do_sample=False, min_new_tokens=6))

    monkeypatch.setattr(modeling_qwen.QWenModel, "_one_row_blocks", spying)
    taken.clear()
    cache = DynamicCache(config=model.config)
    model(ids[:, :-1], past_key_values=cache)
    hidden = model(ids[:, -1:], past_key_values=cache, output_hidden_states=True).hidden_states
    assert taken == [] and len(hidden) == model.config.num_hidden_layers + 1
    model.generate(ids, max_new_tokens=3, do_sample=False, cache_implementation="static")
    assert taken == [False, False]
    taken.clear()
    # the last block hooked: the step declines after the first layers' buffers have grown
    model.transformer.h[1].ln_2.register_forward_pre_hook(lambda module, args: None)
    hooked = model.generate(ids, max_new_tokens=6, do_sample=False, min_new_tokens=6)
    assert taken == [False] * 5
    assert torch.equal(hooked, fast_tokens)
    block = model.transformer.h[0]
    block.compile()  # compiled on its own (lazily, at its first call): its calls must go through it
    assert block.one_row_parts(DynamicCache(config=model.config)) is None


def modeling_qwen_kv():
    from qwen import kv_cache

    return kv_cache


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


@pytest.mark.parametrize("setting", ["failing compiler", "switched off"])
def test_without_the_kernel_the_model_attends_in_torch(tmp_path, monkeypatch, tiny_dir, caplog, setting, fresh_kernel):
    if setting == "failing compiler":
        monkeypatch.setenv("CC", "false")  # exits 1 on anything
        monkeypatch.setenv("QWEN_KERNEL_CACHE", str(tmp_path / "empty"))
    else:
        monkeypatch.setenv("QWEN_CPU_KERNELS", "0")
    assert not cpu_kernels.available()
    if setting == "failing compiler":
        assert "could not build the CPU kernels" in caplog.text
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
    # one sequence's steps would run all blocks in one C call (tested on their own above)
    monkeypatch.setattr(modeling_qwen.QWenModel, "_one_row_blocks", lambda *args: None)
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
    assert len(list(private.glob("cpu_kernels_*.so"))) == 1
    assert private.stat().st_mode & 0o777 == 0o700
    # a fallback directory others can write to is not trusted
    private.chmod(0o777)
    cpu_kernels._kernel.cache_clear()
    assert not cpu_kernels.available()
