"""The CPU inference engine (qwen/cpu_engine.py): its paths against exact arithmetic and the plain modules."""

from __future__ import annotations

import pytest
import torch
from conftest import make_tiny, needs_compiler, rand_ids
from transformers import AutoModelForCausalLM, DynamicCache

import qwen  # noqa: F401
from qwen import cpu_engine, cpu_kernels, kv_cache
from qwen.cpu_engine import CPU_FP32_MIN_ROWS, CPULinear, pack_for_cpu_batches
from qwen.modeling_qwen import rotary_tables


def load(path, **kw):
    kw.setdefault("dtype", torch.float32)
    return AutoModelForCausalLM.from_pretrained(path, **kw).eval()


@torch.no_grad()
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
@pytest.mark.parametrize("bias", [True, False])
def test_cpu_fp32_matmul_path_matches_half_precision_kernel(monkeypatch, dtype, bias):
    """Half-precision CPU matmuls of several rows run in float32, a block of weight rows
    at a time; results agree with the half-precision kernel and with exact arithmetic."""

    # 24-row blocks for a 100-row weight: four full blocks and a partial one
    monkeypatch.setattr(cpu_engine, "CPU_FP32_BLOCK_BYTES", 24 * 4 * 64)
    monkeypatch.setattr(cpu_engine, "cpu_has_native", lambda dtype: False)
    calls = []
    real = cpu_engine.cpu_half_linear
    monkeypatch.setattr(cpu_engine, "cpu_half_linear", lambda *a: calls.append(a) or real(*a))
    layer = CPULinear(64, 100, bias=bias).to(dtype)
    x = torch.randn(2, CPU_FP32_MIN_ROWS + 3, 64).to(dtype)
    big = layer(x)
    assert len(calls) == 1 and big.shape == (2, CPU_FP32_MIN_ROWS + 3, 100) and big.is_contiguous()
    rows = torch.stack([torch.cat([layer(x[b, i : i + 1]) for i in range(x.shape[1])]) for b in range(2)])
    assert len(calls) == 1  # single rows keep the half-precision kernel
    exact = x.double() @ layer.weight.double().T + (layer.bias.double() if bias else 0)
    assert big.dtype == dtype
    # both are exact products with float32 accumulation, rounded once to half precision
    ulp = 2**-8 if dtype == torch.bfloat16 else 2**-11
    assert (big.double() - exact).abs().max() <= exact.abs().max() * ulp
    assert (rows.double() - exact).abs().max() <= exact.abs().max() * ulp
    with torch.enable_grad():  # training keeps torch's kernel (and its autograd)
        layer(x)
    assert len(calls) == 1


@torch.no_grad()
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_one_row_half_matmul_skips_onednn(monkeypatch, dtype):
    """Without the C kernel (bf16; test_cpu_kernels), a one-row half-precision CPU matmul
    runs torch's GEMV with oneDNN switched off (its GEMV is much slower on CPUs with
    native bf16), accumulates exactly in float32, and leaves the global oneDNN switch as
    it was, also when the product raises."""

    monkeypatch.setattr(cpu_engine, "linear_row", lambda *a, **k: None)

    seen = []
    real = torch.nn.functional.linear
    monkeypatch.setattr(
        torch.nn.functional, "linear", lambda *a: seen.append(torch._C._get_mkldnn_enabled()) or real(*a)
    )
    layer = CPULinear(64, 100).to(dtype)
    x = torch.randn(1, 1, 64).to(dtype)
    assert torch._C._get_mkldnn_enabled()
    y = layer(x)
    assert seen == [False] and torch._C._get_mkldnn_enabled()
    exact = x.double() @ layer.weight.double().T + layer.bias.double()
    ulp = 2**-8 if dtype == torch.bfloat16 else 2**-11
    assert y.dtype == dtype and (y.double() - exact).abs().max() <= exact.abs().max() * ulp
    with torch.enable_grad():  # training keeps torch's dispatch
        layer(x)
    assert seen == [False, True]
    with torch.backends.mkldnn.flags(enabled=False):  # already off: left off
        layer(x)
        assert not torch._C._get_mkldnn_enabled()
    with pytest.raises(RuntimeError):
        layer(torch.randn(1, 1, 63).to(dtype))
    assert torch._C._get_mkldnn_enabled()


@torch.no_grad()
@pytest.mark.parametrize("native", [False, True])
def test_cpu_half_decode_step_attends_eagerly(tiny_dir, monkeypatch, native):
    """Without the C kernel, a one-token bf16 decoding step on a CPU attends over the cache
    with plain attention instead of torch's half-precision SDPA kernel: in float32 for one sequence or without
    native bf16, in bf16 (softmax in float32) for a batch with it. A left-padded batch's
    last logits stay as close to the float32 model's as SDPA's own whole-sequence forward."""
    monkeypatch.setattr(cpu_engine, "cpu_has_native", lambda dtype: native)
    # the C kernels (test_cpu_kernels): the attention kernel, and all blocks of a step in one call
    monkeypatch.setattr(cpu_engine, "decode_attention", lambda *a: None)
    monkeypatch.setattr(cpu_engine, "decode_all_blocks", lambda *a: None)
    calls = []
    real = cpu_engine.eager_attention
    monkeypatch.setattr(cpu_engine, "eager_attention", lambda *a, **k: calls.append(a[1].dtype) or real(*a, **k))
    half = AutoModelForCausalLM.from_pretrained(tiny_dir, dtype=torch.bfloat16, attn_implementation="sdpa").eval()
    layers = half.config.num_hidden_layers
    ids = torch.randint(0, 1000, (2, 12), generator=torch.Generator().manual_seed(0))
    mask = torch.ones_like(ids)
    mask[1, :3] = 0
    cache = DynamicCache(config=half.config)
    half(ids[:, :-1], attention_mask=mask[:, :-1], past_key_values=cache, use_cache=True)
    assert calls == []  # prefill keeps SDPA
    step = half(ids[:, -1:], attention_mask=mask, past_key_values=cache, use_cache=True).logits[:, -1].float()
    assert calls == [torch.bfloat16 if native else torch.float32] * layers
    whole = half(ids, attention_mask=mask).logits[:, -1].float()
    exact = load(tiny_dir)(ids, attention_mask=mask).logits[:, -1]
    assert (step - exact).abs().max() <= 2 * (whole - exact).abs().max() + 1e-3
    calls.clear()
    cache.batch_select_indices(torch.tensor([0]))  # one sequence: float32 either way
    half(ids[:1, -1:], past_key_values=cache, use_cache=True)
    assert calls == [torch.float32] * layers


@torch.no_grad()
def test_packed_weights_for_cpu_batches(tiny_dir, monkeypatch):
    """pack_for_cpu_batches gives half-precision linears a oneDNN-packed weight copy used
    for products of 2..2*rows rows (same results as the plain weight); one row and long
    prefills keep the plain weight; changing the weight in place drops the copy. Where
    CPU bf16 matmuls are not native it does nothing."""

    m = AutoModelForCausalLM.from_pretrained(tiny_dir, dtype=torch.bfloat16).eval()
    weights = sum(x.numel() * 2 for n, x in m.named_parameters() if n.endswith("weight") and x.dim() == 2)
    weights -= m.transformer.wte.weight.numel() * 2  # the embedding is no linear
    with monkeypatch.context() as patch:
        patch.setattr(cpu_engine, "cpu_has_native", lambda dtype: False)
        assert pack_for_cpu_batches(m, 4) == 0
    if not cpu_engine.cpu_has_native(torch.bfloat16):
        pytest.skip("CPU bf16 matmuls are not native here: nothing to pack")
    x = torch.randn(6, 1, 64).to(torch.bfloat16)
    layer = m.transformer.h[0].mlp.w1
    plain = [layer(x), layer(x[:1]), layer(torch.randn(3, 5, 64).to(torch.bfloat16))]
    assert pack_for_cpu_batches(m, 4) == weights
    linears = [mod for mod in m.modules() if isinstance(mod, CPULinear)]
    assert all(mod._packed is not None and mod._packed.layout == torch._mkldnn for mod in linears)
    assert torch.equal(layer(x), plain[0]) and torch.equal(layer(x[:1]), plain[1])
    ids = rand_ids(5, 9)
    cache = DynamicCache(config=m.config)
    m(ids[:, :8], past_key_values=cache, use_cache=True)
    packed_step = m(ids[:, 8:], past_key_values=cache, use_cache=True).logits
    for mod in linears:
        mod._packed = None
    cache = DynamicCache(config=m.config)
    m(ids[:, :8], past_key_values=cache, use_cache=True)
    assert torch.equal(m(ids[:, 8:], past_key_values=cache, use_cache=True).logits, packed_step)
    pack_for_cpu_batches(m, 4)
    layer.weight.mul_(2)  # in place: the packed copy is stale and dropped
    assert torch.equal(layer(x), 2 * plain[0]) and layer._packed is None
    # a weight replaced (new storage) or converted: the copy is dropped too
    pack_for_cpu_batches(m, 4)
    layer.weight.data = layer.weight.data * 0.5
    assert torch.equal(layer(x), plain[0]) and layer._packed is None
    pack_for_cpu_batches(m, 4)
    m.half()  # was: oneDNN failed on the bf16 copy of an fp16 weight
    expected = torch.nn.functional.linear(x.half().float(), layer.weight.float())
    torch.testing.assert_close(layer(x.half()).float(), expected, atol=2e-3, rtol=2e-3)
    assert layer._packed is None


# --------------------------------------------------------------------------- the C kernels in the model


@pytest.fixture(scope="module")
def head128_dir(tmp_path_factory):
    """Heads of 128 dims, as every Qwen-1 model: the kernel's AVX-512 path."""
    return make_tiny(
        tmp_path_factory.mktemp("ckpt") / "tiny-128", "--hidden", "256", "--heads", "2", "--seq-length", "64"
    )


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
    rotary = rotary_tables(*model.transformer.rotary_emb(position, None))
    hidden = model.transformer.wte(ids[:, -1:])
    layers = model.config.num_hidden_layers
    outputs = []
    for device in ("cpu", "meta"):
        cache = DynamicCache(config=model.config)
        model(ids[:, :-1], past_key_values=cache)
        with torch.device(device):
            block_step = cpu_engine.decode_all_blocks(model.transformer, hidden, rotary, None, [None] * layers, cache)
            kernels = (cpu_kernels.linear_row(x, w, None), cpu_kernels.rms_norm(x, w[0], 1e-6))
        outputs.append((block_step, cache.layers[-1].keys, *kernels))
    for plain, under_meta in zip(*outputs, strict=True):
        assert under_meta.device.type == "cpu" and torch.equal(plain, under_meta)


@needs_compiler
@torch.no_grad()
def test_decoding_step_runs_through_the_kernels(head128_dir, monkeypatch):
    """A one-sequence bf16 decoding step on CPU runs all its blocks in one C call
    (BlockSteps); block by block, each module runs its kernel (ln_1, c_attn, attention,
    c_proj, ln_2, w1/w2 + gate, the MLP's c_proj). Both give exactly the same logits, and
    those of the torch path up to bf16 rounding noise. A block with a hook on one of its
    modules (as adapters and quantizers add) runs through its modules, the hook fires, and
    the other blocks still use their kernels."""
    model = AutoModelForCausalLM.from_pretrained(head128_dir, dtype=torch.bfloat16).eval()
    layers = model.config.num_hidden_layers
    names = ["linear_row", "swiglu_row", "rms_norm", "decode_attention"]
    real = {name: getattr(cpu_engine, name) for name in names}
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
            monkeypatch.setattr(cpu_engine, name, counting(name) if kernels else lambda *a, **k: None)
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
    monkeypatch.setattr(model.transformer, "decode_step", None)
    modules = step()
    # per block: ln_1 and ln_2, c_attn, c_proj and the MLP's c_proj, the gate, attention; then ln_f and lm_head
    assert calls == {
        "decode_attention": layers, "linear_row": 3 * layers + 1, "swiglu_row": layers, "rms_norm": 2 * layers + 1,
        "all blocks": 0,
    }  # fmt: skip
    assert torch.equal(all_blocks, modules)  # the same roundings
    monkeypatch.undo()
    use(kernels=False)
    torch_path = step()
    whole = model(ids).logits[:, -1].float()
    spread = (whole - torch_path).abs().max().item()  # SDPA's whole-sequence forward: as far off
    assert (modules - torch_path).abs().max().item() <= spread + 2e-2

    use(kernels=True)
    seen = []
    model.transformer.h[0].mlp.w1.register_forward_hook(lambda module, args, out: seen.append(out.shape))
    assert torch.equal(step(), modules)
    assert calls["all blocks"] == 0
    assert calls["swiglu_row"] == layers - 1 and calls["decode_attention"] == layers
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
    monkeypatch.setattr(kv_cache, "GROWING_MIN_ROOM", 1)
    taken = []

    def spying(*args):
        out = cpu_engine.decode_all_blocks(*args)
        taken.append(out is not None)
        return out

    ids = rand_ids(1, 12, seed=3)
    runs = {}
    for how in ("all blocks", "block by block"):
        monkeypatch.setattr(model.transformer, "decode_step", spying if how == "all blocks" else None)
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

    monkeypatch.setattr(model.transformer, "decode_step", spying)
    taken.clear()
    fast_tokens = model.generate(ids, max_new_tokens=6, do_sample=False, min_new_tokens=6)
    assert taken == [True] * 5
    monkeypatch.setattr(model.transformer, "decode_step", None)
    assert torch.equal(fast_tokens, model.generate(ids, max_new_tokens=6, do_sample=False, min_new_tokens=6))

    monkeypatch.setattr(model.transformer, "decode_step", spying)
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
    assert cpu_engine._block_parts(block) is None


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
    real = cpu_engine.decode_attention

    def counting(*args):
        calls.append(1)
        return real(*args)

    monkeypatch.setattr(cpu_engine, "decode_attention", counting)
    # one sequence's steps would run all blocks in one C call (tested on their own above)
    monkeypatch.setattr(half.transformer, "decode_step", None)
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
        monkeypatch.setattr(cpu_engine, "decode_attention", lambda *a: None)
        torch_path = step(ids[rows], mask[rows]).float()
        monkeypatch.setattr(cpu_engine, "decode_attention", counting)
        whole = half(ids[rows], attention_mask=mask[rows]).logits[:, -1].float()
        exact = exact_model(ids[rows], attention_mask=mask[rows]).logits[:, -1]
        assert (kernel - exact).abs().max() <= 2 * (whole - exact).abs().max() + 1e-3
        if rows.stop == 1:  # one sequence: the torch path is float32 attention too
            assert (kernel - torch_path).abs().max() <= (whole - exact).abs().max() + 1e-3
