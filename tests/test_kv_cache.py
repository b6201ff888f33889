"""int8 KV cache: quantization error, memory, generation against the float cache, kernels.

The Triton kernels run on CPU only in Triton's interpreter, which has to be chosen
before ``triton`` is first imported (importing ``qwen`` imports it through torch). So
unless this session was started with ``TRITON_INTERPRET=1``, the ``kernel`` tests are
run by ``test_triton_kernels_in_interpreter`` in a child pytest with that variable set.
"""

from __future__ import annotations

import ast
import importlib.util
import json
import logging
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from conftest import rand_ids
from reference import naive_forward
from transformers import AutoModelForCausalLM, DynamicCache

from qwen import kv_cache
from qwen.kv_cache import Int8KVCache, dequantize_kv, quantize_kv
from qwen.remote_code import REMOTE_CODE_FILES

REPO = Path(__file__).resolve().parents[1]
HAVE_TRITON = importlib.util.find_spec("triton") is not None
INTERPRETING = os.environ.get("TRITON_INTERPRET", "").strip().lower() in ("1", "true", "yes", "on", "y")
kernel = pytest.mark.skipif(
    not (HAVE_TRITON and INTERPRETING),
    reason="Triton kernel check: runs in a child pytest with TRITON_INTERPRET=1 (test_triton_kernels_in_interpreter)"
    if HAVE_TRITON
    else "Triton is not installed (pip install 'triton>=3.0')",
)


@pytest.fixture(scope="module")
def ckpt(request) -> Path:
    """The session's tiny checkpoint, or the parent session's one in the child pytest."""
    given = os.environ.get("QWEN_TEST_TINY_DIR")
    return Path(given) if given else request.getfixturevalue("tiny_dir")


def load(path, **kw):
    kw.setdefault("dtype", torch.float32)
    return AutoModelForCausalLM.from_pretrained(path, **kw).eval()


def official_fake_quant(x: torch.Tensor) -> torch.Tensor:
    """The official Qwen scheme (``quantize_cache_v`` + ``dequantize_cache_torch``) written
    from its behaviour: one scale and zero point per (row, head) over all tokens of the
    call, computed in the input dtype, truncating ``x / scale + zero`` to uint8.
    ``x``: (batch, heads, tokens, head_dim). Returns the dequantized tensor."""
    qmin = torch.tensor(0, dtype=torch.uint8)
    qmax = torch.tensor(255, dtype=torch.uint8)
    flat = x.flatten(2)
    fmax = flat.amax(-1, keepdim=True)
    fmin = flat.amin(-1, keepdim=True)
    scale = ((fmax - fmin) / (qmax - qmin)).unsqueeze(-1)
    zero = (qmin - fmin / scale.squeeze(-1)).unsqueeze(-1)
    q = torch.clamp(x / scale + zero, qmin, qmax).to(torch.uint8)
    return scale * (q - zero)


# --------------------------------------------------------------------------- quantization


def _awkward_vectors(dtype: torch.dtype) -> torch.Tensor:
    g = torch.Generator().manual_seed(1)
    x = torch.randn(3, 4, 50, 128, generator=g)
    x = x * torch.logspace(-3, 2, 50)[None, None, :, None]  # ranges from 1e-3 to 1e2
    x[0, 0, :5] += 300.0  # large offsets
    x[0, 1, :3] = 7.0  # constant vectors
    x[1, 2, 7] = 0.0  # all zero
    x[2, 3, :, 5] *= 40  # one outlier channel
    return x.to(dtype)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
def test_quantize_error_at_most_half_a_step(dtype):
    x = _awkward_vectors(dtype)
    q, params = quantize_kv(x)
    assert q.dtype == torch.uint8 and q.shape == x.shape
    assert params.dtype == dtype and params.shape == (*x.shape[:-1], 2)  # one pair per vector
    scale = params[..., :1].float()
    err = (dequantize_kv(q, params, torch.float32) - x.float()).abs()
    # half a step, up to float32 rounding of the arithmetic
    assert (err <= scale / 2 + 1e-6 * x.float().abs()).all()
    # the step is (max - min) / 255 up to the rounding of the stored scale and zero point
    span = x.float().amax(-1, keepdim=True) - x.float().amin(-1, keepdim=True)
    loose = torch.finfo(dtype).eps * 2 * x.float().abs().amax(-1, keepdim=True) / 255
    assert (scale <= span / 255 * (1 + 2 * torch.finfo(dtype).eps) + loose + torch.finfo(dtype).tiny * 2).all()
    # rounding to nearest uses all codes 0..255 on spread-out vectors
    assert q.min() == 0 and q.max() == 255


def test_dequantize_chunks_match_one_pass(monkeypatch):
    x = torch.randn(1, 2, 40, 16)
    q, params = quantize_kv(x)
    whole = dequantize_kv(q, params)
    monkeypatch.setattr(kv_cache, "_DEQUANT_CHUNK", 7)
    assert torch.equal(dequantize_kv(q, params), whole)


@torch.no_grad()
def _prompt_keys_values(ckpt, dtype, length=60):
    model = load(ckpt, dtype=dtype)
    cache = DynamicCache()
    model(rand_ids(2, length, seed=3), past_key_values=cache, use_cache=True)
    return [(layer.keys, layer.values) for layer in cache.layers]


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_more_accurate_than_official_scheme(ckpt, dtype):
    """On the keys and values of a real forward pass (a whole prompt, as the official code
    quantizes it), per-token scales with rounding beat per-prompt scales with truncation."""
    ours_sq = theirs_sq = ours_max = theirs_max = 0.0
    n = 0
    for keys, values in _prompt_keys_values(ckpt, dtype):
        for x in (keys, values):
            ref = x.float()
            ours = dequantize_kv(*quantize_kv(x), torch.float32) - ref
            theirs = official_fake_quant(x).float() - ref
            ours_sq += ours.pow(2).sum().item()
            theirs_sq += theirs.pow(2).sum().item()
            ours_max = max(ours_max, ours.abs().max().item())
            theirs_max = max(theirs_max, theirs.abs().max().item())
            n += x.numel()
    ours_rms, theirs_rms = (ours_sq / n) ** 0.5, (theirs_sq / n) ** 0.5
    print(
        f"\n{dtype}: rms error ours {ours_rms:.3e} official {theirs_rms:.3e} ({theirs_rms / ours_rms:.1f}x); "
        f"max ours {ours_max:.3e} official {theirs_max:.3e}"
    )
    assert ours_rms * 1.5 < theirs_rms
    assert ours_max * 1.5 < theirs_max


def test_more_accurate_than_official_scheme_when_token_scales_differ():
    """Keys and values whose magnitude varies from token to token (as in real models,
    e.g. the first token): one scale per prompt wastes most codes on the small tokens."""
    g = torch.Generator().manual_seed(2)
    x = torch.randn(2, 4, 64, 128, generator=g) * torch.logspace(0, 1, 64)[torch.randperm(64, generator=g)][:, None]
    for dtype in (torch.float32, torch.bfloat16):
        xd = x.to(dtype)
        ours = (dequantize_kv(*quantize_kv(xd), torch.float32) - xd.float()).pow(2).mean().sqrt()
        theirs = (official_fake_quant(xd).float() - xd.float()).pow(2).mean().sqrt()
        print(f"\n{dtype}: rms error ours {ours:.3e} official {theirs:.3e} ({theirs / ours:.1f}x)")
        assert ours * 2 < theirs


# --------------------------------------------------------------------------- cache object


def _filled(batch=2, heads=4, tokens=10, head_dim=128, dtype=torch.bfloat16, layers=2, seed=0):
    g = torch.Generator().manual_seed(seed)
    data = [(torch.randn(batch, heads, tokens, head_dim, generator=g).to(dtype),) * 2 for _ in range(layers)]
    int8, flt = Int8KVCache(num_layers=layers), DynamicCache()
    for i, (k, v) in enumerate(data):
        int8.update(k, v, i)
        flt.update(k, v, i)
    return int8, flt


def _float_cache_bytes(cache: DynamicCache) -> int:
    return sum(t.untyped_storage().nbytes() for layer in cache.layers for t in (layer.keys, layer.values))


def test_cache_bytes_are_what_we_claim():
    b, h, t, d, layers = 3, 4, 37, 128, 2
    int8, flt = _filled(b, h, t, d, torch.bfloat16, layers)
    # uint8 data + one bf16 scale and one bf16 zero point per vector, keys and values
    assert int8.nbytes == layers * 2 * b * h * t * (d + 2 * 2)
    for layer in int8.layers:
        assert layer.keys is None and layer.values is None  # no float copy kept
        assert layer.key_q.dtype == torch.uint8 and layer.key_p.shape == (b, h, t, 2)
    ratio = int8.nbytes / _float_cache_bytes(flt)
    assert ratio == pytest.approx((128 + 4) / 256) and ratio <= 0.53
    # fp32 caches store fp32 scales: (128 + 8) / 512
    int8_32, flt_32 = _filled(1, 2, 5, 128, torch.float32, 1)
    assert int8_32.nbytes / _float_cache_bytes(flt_32) == pytest.approx(136 / 512)


def test_cache_appends_crops_and_reorders_exactly():
    g = torch.Generator().manual_seed(0)
    k1, v1, k2, v2 = (torch.randn(3, 2, n, 16, generator=g) for n in (6, 6, 1, 1))
    cache = Int8KVCache(num_layers=1)
    cache.update(k1, v1, 0)
    keys, values = cache.update(k2, v2, 0)
    assert cache.get_seq_length() == 7 and cache.get_mask_sizes(1, 0) == (8, 0)
    ref_k = dequantize_kv(*quantize_kv(torch.cat((k1, k2), dim=2)))
    assert torch.equal(keys, ref_k)
    # beam reordering moves the bytes as they are
    beam_idx = torch.tensor([2, 0, 0])
    cache.reorder_cache(beam_idx)
    assert torch.equal(cache.layers[0].dequantized()[0], ref_k[beam_idx])
    cache.batch_repeat_interleave(2)
    assert cache.layers[0].key_q.shape[0] == 6
    cache.batch_select_indices(torch.tensor([0, 5]))
    assert torch.equal(cache.layers[0].dequantized()[1][1], dequantize_kv(*quantize_kv(torch.cat((v1, v2), 2)))[0])
    before = cache.nbytes
    cache.crop(-3)
    assert cache.get_seq_length() == 4 and cache.nbytes == before * 4 // 7
    cache.reset()
    assert cache.get_seq_length() == 0 and cache.nbytes == 0


# --------------------------------------------------------------------------- generation


@pytest.fixture(scope="module")
def float_model(ckpt):
    return load(ckpt)


@pytest.fixture(scope="module")
def int8_model(ckpt):
    return load(ckpt, use_cache_quantization=True)


def _greedy(model, ids, n=20, **kw):
    kw.setdefault("attention_mask", torch.ones_like(ids))
    return model.generate(
        ids, max_new_tokens=n, do_sample=False, output_logits=True, return_dict_in_generate=True, **kw
    )


@torch.no_grad()
def test_generate_with_int8_cache_is_close_to_float_cache(float_model, int8_model):
    """Greedy tokens equal the float cache's until the float model itself nearly ties
    (top-2 logit margin below TIE): a random tiny model over 151,936 tokens has many
    near-ties, where any perturbation may flip the choice."""
    tie, n = 0.05, 24
    ids = rand_ids(8, 12, seed=5)
    ref, out = _greedy(float_model, ids, n), _greedy(int8_model, ids, n)
    assert type(out.past_key_values) is Int8KVCache and type(ref.past_key_values) is DynamicCache
    same = (ref.sequences[:, 12:] == out.sequences[:, 12:]).long().cumprod(1).sum(1)
    ref_logits, out_logits = torch.stack(ref.logits, 1), torch.stack(out.logits, 1)
    top2 = ref_logits.topk(2, dim=-1).values
    near_tie = (top2[..., 0] - top2[..., 1]) < tie
    first_tie = torch.where(near_tie.any(1), near_tie.long().argmax(1), torch.full_like(same, n))
    print(f"\ngreedy: equal tokens per row {same.tolist()} of {n}; first near-tie {first_tie.tolist()}")
    assert (same >= first_tie).all()
    assert same.float().mean() >= n / 2
    # the first step (the prompt) attends over its own float keys and values: exact
    assert (out_logits[:, 0] - ref_logits[:, 0]).abs().max() < 1e-5
    # later steps, while the prefixes agree
    steps = torch.arange(n)[None, :] <= same[:, None]
    diff = (out_logits - ref_logits).abs()[steps]
    print(f"generate: mean |logit diff| {diff.mean().item():.2e}, max {diff.max().item():.2e}")
    assert diff.mean() < 0.01 * ref_logits.abs().mean()


@torch.no_grad()
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_half_precision_cpu_decoding_goes_through_the_int8_cache(ckpt, dtype):
    """bf16/fp16 on CPU with SDPA (the default) has a one-row decoding fast path; with
    the int8 cache it must still store each step and attend over the whole cache (it
    once bypassed the cache: every step saw only its own token). Reference: the same
    model with eager attention, which always went through the cache."""
    ids = rand_ids(1, 10, seed=3)
    sdpa = load(ckpt, use_cache_quantization=True, dtype=dtype)
    eager = load(ckpt, use_cache_quantization=True, dtype=dtype, attn_implementation="eager")
    assert sdpa.config._attn_implementation == "sdpa"
    out, ref = _greedy(sdpa, ids, 12), _greedy(eager, ids, 12)
    assert type(out.past_key_values) is Int8KVCache
    assert out.past_key_values.get_seq_length() == 10 + 12 - 1
    assert torch.equal(out.sequences, ref.sequences)
    for a, b in zip(out.logits, ref.logits, strict=True):
        torch.testing.assert_close(a, b, atol=0.1, rtol=0.05)  # bf16: eager and SDPA prefills round apart


@torch.no_grad()
def test_teacher_forced_logits_match_float_cache(float_model, int8_model):
    ids = rand_ids(2, 40, seed=6)
    prompt, rest = ids[:, :16], ids[:, 16:]
    diffs = []
    caches = [DynamicCache(), Int8KVCache(config=int8_model.config)]
    logits = [m(prompt, past_key_values=c).logits for m, c in zip((float_model, int8_model), caches, strict=True)]
    for t in range(rest.shape[1]):
        step = [
            m(rest[:, t : t + 1], past_key_values=c).logits
            for m, c in zip((float_model, int8_model), caches, strict=True)
        ]
        diffs.append((step[0] - step[1]).abs())
    assert torch.equal(logits[0], logits[1])
    diff = torch.cat(diffs, dim=1)
    print(f"\nteacher-forced: mean |logit diff| {diff.mean().item():.2e}, max {diff.max().item():.2e}")
    assert diff.mean() < 5e-3


@torch.no_grad()
@pytest.mark.parametrize("prompt", [56, 120])
def test_int8_cache_beyond_seq_length_follows_official_formulas(int8_model, ckpt, prompt):
    """Dynamic NTK and logN over a quantized cache: decoding 16 tokens past seq_length (64)
    keeps the prompt's alpha (1 for 56 tokens, 3 for 120, where the whole sequence would
    give 3 and 7) and scales queries by logN of their position. Reference: the official
    formulas in fp32 with the prompt's alpha. The prompt step attends over float keys
    (exact); decoded steps read int8 ones, so they differ from the reference by quantization
    only: measured ~0.002 mean, against ~0.2 for a wrong alpha and ~0.06 for no logN at 120+
    (at 56-72 logN is at most 1.03 and changes logits by only ~0.003, so it is checked at 120)."""
    decode = 16
    ids = rand_ids(2, prompt + decode, seed=11)
    cache = Int8KVCache(config=int8_model.config)
    steps = [int8_model(ids[:, :prompt], past_key_values=cache).logits]
    for t in range(prompt, prompt + decode):
        steps.append(int8_model(ids[:, t : t + 1], past_key_values=cache).logits)
    got = torch.cat(steps, 1)
    assert type(cache) is Int8KVCache and cache.get_seq_length() == prompt + decode
    for row in range(2):
        tokens = ids[row].tolist()
        ref = naive_forward(ckpt, tokens, True, True, ntk_length=prompt)
        assert (got[row, :prompt] - ref[:prompt]).abs().max() < 1e-4
        err = (got[row, prompt:] - ref[prompt:]).abs().mean()
        assert err < 0.01 * ref[prompt:].abs().mean(), (row, err)
        wrong = [naive_forward(ckpt, tokens, True, True)]  # alpha from the whole sequence
        if prompt > 100:
            wrong.append(naive_forward(ckpt, tokens, True, False, ntk_length=prompt))
        for other in wrong:
            assert err < 0.1 * (other[prompt:] - ref[prompt:]).abs().mean(), (row, err)


def test_forward_without_cache_argument_uses_int8_cache(int8_model, float_model):
    out = int8_model(rand_ids(1, 5), use_cache=True)
    assert type(out.past_key_values) is Int8KVCache
    assert type(float_model(rand_ids(1, 5), use_cache=True).past_key_values) is DynamicCache


@torch.no_grad()
def test_config_json_key_and_user_cache(ckpt, tmp_path):
    copy = tmp_path / "q"
    shutil.copytree(ckpt, copy)
    cfg = json.loads((copy / "config.json").read_text())
    cfg["use_cache_quantization"] = True
    (copy / "config.json").write_text(json.dumps(cfg))
    model = load(copy)
    assert model.config.use_cache_quantization
    ids = rand_ids(1, 6)
    assert type(_greedy(model, ids, 3).past_key_values) is Int8KVCache
    # a cache passed by the caller is used as given
    mine = DynamicCache()
    out = _greedy(model, ids, 3, past_key_values=mine)
    assert out.past_key_values is mine


@torch.no_grad()
def test_left_padded_batch_matches_single_rows(int8_model):
    """Per-token scales: a row's cache does not depend on the other rows or on padding."""
    a, b = rand_ids(1, 5, seed=7), rand_ids(1, 9, seed=8)
    pad = int8_model.generation_config.pad_token_id or 0
    ids = torch.cat((torch.cat((torch.full((1, 4), pad), a), dim=1), b))
    mask = torch.cat((torch.cat((torch.zeros(1, 4, dtype=torch.long), torch.ones_like(a)), dim=1), torch.ones_like(b)))
    batch = _greedy(int8_model, ids, 12, attention_mask=mask)
    for row, single in enumerate((a, b)):
        alone = _greedy(int8_model, single, 12)
        assert torch.equal(batch.sequences[row, 9:], alone.sequences[0, single.shape[1] :])
        diff = (torch.stack(batch.logits)[:, row] - torch.stack(alone.logits)[:, 0]).abs().max()
        assert diff < 1e-4


@torch.no_grad()
def test_beam_search_with_int8_cache(float_model, int8_model):
    ids = rand_ids(2, 7, seed=9)
    kw = dict(max_new_tokens=10, num_beams=3, num_return_sequences=2, do_sample=False)
    ref = float_model.generate(ids, attention_mask=torch.ones_like(ids), **kw)
    out = int8_model.generate(ids, attention_mask=torch.ones_like(ids), **kw)
    assert out.shape == ref.shape == (4, 17)
    assert torch.equal(out, ref)


@torch.no_grad()
def test_window_attention_with_int8_cache(ckpt):
    ids = rand_ids(1, 10, seed=10)
    ref = _greedy(load(ckpt, window_size=4), ids, 16)
    out = _greedy(load(ckpt, window_size=4, use_cache_quantization=True), ids, 16)
    assert type(out.past_key_values) is Int8KVCache
    assert torch.equal(out.sequences[:, :20], ref.sequences[:, :20])
    assert (torch.stack(out.logits) - torch.stack(ref.logits)).abs().mean() < 0.01


@torch.no_grad()
def test_chat_and_chat_stream_use_int8_cache(tiny_chat_dir, monkeypatch):
    from transformers import AutoTokenizer

    made = []

    class Spy(Int8KVCache):
        def __init__(self, *args, **kwargs):
            super().__init__(*args, **kwargs)
            made.append(self)

    monkeypatch.setattr(kv_cache, "Int8KVCache", Spy)
    tokenizer = AutoTokenizer.from_pretrained(tiny_chat_dir)
    model = load(tiny_chat_dir, use_cache_quantization=True)
    greedy = dict(do_sample=False, max_new_tokens=6)
    response, history = model.chat(tokenizer, "你好", history=None, **greedy)
    streamed = list(model.chat_stream(tokenizer, "你好", history=None, **greedy))
    assert len(made) == 2 and all(c.get_seq_length() > 0 for c in made)
    assert streamed[-1] == response and history[-1][1] == response


@pytest.mark.skipif(INTERPRETING, reason="the kernels can run here (TRITON_INTERPRET=1)")
def test_kernel_request_on_cpu_logs_notice_and_uses_torch_path(ckpt, caplog, monkeypatch):
    monkeypatch.setattr(kv_cache, "_NOTICES", set())
    model = load(ckpt, use_cache_quantization=True, use_cache_kernel=True)
    with caplog.at_level(logging.WARNING, logger="qwen.kv_cache"):
        out = _greedy(model, rand_ids(1, 6), 3)
    assert out.sequences.shape == (1, 9)
    assert any("use_cache_kernel=True" in r.getMessage() for r in caplog.records)
    # ... and computes exactly what the torch path (use_cache_kernel=False) computes
    ref = _greedy(load(ckpt, use_cache_quantization=True, use_cache_kernel=False), rand_ids(1, 6), 3)
    assert type(out.past_key_values) is Int8KVCache and type(ref.past_key_values) is Int8KVCache
    assert torch.equal(out.sequences, ref.sequences)
    for got, expected in zip(out.logits, ref.logits, strict=True):
        assert torch.equal(got, expected)


def test_modules_are_self_contained_remote_code(ckpt):
    assert {"kv_cache.py", "kv_cache_kernels.py"} <= set(REMOTE_CODE_FILES)
    allowed = {"torch", "transformers", "triton"} | set(sys.stdlib_module_names)
    for name in ("kv_cache.py", "kv_cache_kernels.py"):
        assert (ckpt / name).is_file()
        tree = ast.parse((REPO / "qwen" / name).read_text())
        for node in ast.walk(tree):
            if isinstance(node, ast.Import):
                roots = {a.name.split(".")[0] for a in node.names}
            elif isinstance(node, ast.ImportFrom) and node.level == 0:
                roots = {node.module.split(".")[0]}
            else:
                continue
            assert roots <= allowed, f"{name} imports {roots - allowed}"


# --------------------------------------------------------------------------- Triton kernels


def _reference_attention(q, kq, kp, vq, vp, scaling, window=None, keep=None):
    B, H, M, D = q.shape
    N = kq.shape[2]
    k, v = dequantize_kv(kq, kp, torch.float32), dequantize_kv(vq, vp, torch.float32)
    qpos = torch.arange(N - M, N)[:, None]
    kpos = torch.arange(N)[None, :]
    allowed = kpos <= qpos
    if window:
        allowed = allowed & (qpos - kpos < window)
    allowed = allowed.expand(B, H, M, N)
    if keep is not None:
        allowed = allowed & keep
    scores = (q.float() @ k.transpose(-1, -2) * scaling).masked_fill(~allowed, float("-inf"))
    return (scores.softmax(-1) @ v).transpose(1, 2)


KERNEL_CASES = {
    # name: (B, H, M, N, D, dtype, window, mask kind, splits)
    "decode": (2, 3, 1, 70, 16, torch.float32, None, None, None),
    "decode-bf16": (2, 3, 1, 70, 16, torch.bfloat16, None, None, None),
    "decode-fp16-odd-head-dim": (1, 2, 1, 33, 24, torch.float16, None, None, None),
    "chunk": (2, 2, 5, 130, 16, torch.float32, None, None, None),
    "window": (1, 2, 1, 200, 16, torch.float32, 7, None, None),
    "chunk-window": (1, 2, 20, 100, 16, torch.float32, 9, None, None),
    "left-padding-bool-4d": (2, 2, 1, 50, 16, torch.float32, None, "bool4d", None),
    "left-padding-additive-4d": (2, 2, 3, 50, 16, torch.float32, None, "float4d", None),
    "left-padding-2d": (2, 2, 1, 50, 16, torch.float32, None, "2d", None),
    "split-kv": (2, 2, 1, 300, 16, torch.float32, None, "bool4d", 3),
    "split-kv-window": (1, 2, 2, 300, 16, torch.bfloat16, 100, None, 4),
}


@kernel
@pytest.mark.parametrize("case", list(KERNEL_CASES))
def test_kernel_matches_torch_reference(case):
    from qwen.kv_cache_kernels import int8_attention

    B, H, M, N, D, dtype, window, mask_kind, splits = KERNEL_CASES[case]
    g = torch.Generator().manual_seed(0)
    q, k, v = (torch.randn(B, H, n, D, generator=g).to(dtype) for n in (M, N, N))
    kq, kp = quantize_kv(k)
    vq, vp = quantize_kv(v)
    keep = torch.ones(B, 1, M, N, dtype=torch.bool)
    keep[0, ..., :4] = False  # row 0 is left-padded by 4
    mask = {
        None: None,
        "bool4d": keep,
        "float4d": torch.zeros(B, 1, M, N).masked_fill(~keep, torch.finfo(torch.float32).min),
        "2d": keep[:, 0, 0, :].long(),
    }[mask_kind]
    out = int8_attention(q, kq, kp, vq, vp, attention_mask=mask, scaling=D**-0.5, window=window, num_splits=splits)
    ref = _reference_attention(q, kq, kp, vq, vp, D**-0.5, window, keep if mask_kind else None)
    assert out.shape == (B, M, H, D) and out.dtype == dtype
    tol = 1e-5 if dtype == torch.float32 else 2e-2
    torch.testing.assert_close(out.float(), ref, atol=tol, rtol=tol)


@kernel
@torch.no_grad()
def test_generate_with_kernels_matches_torch_path(ckpt):
    """Left-padded batch and window attention through the model, kernels against torch path."""
    torch_path = load(ckpt, use_cache_quantization=True, window_size=4)
    kernels = load(ckpt, use_cache_quantization=True, use_cache_kernel=True, window_size=4)
    ids = torch.cat((rand_ids(1, 9, seed=11), rand_ids(1, 9, seed=12)))
    mask = torch.ones_like(ids)
    mask[0, :3] = 0
    ref, out = _greedy(torch_path, ids, 6, attention_mask=mask), _greedy(kernels, ids, 6, attention_mask=mask)
    assert torch.equal(out.sequences, ref.sequences)
    torch.testing.assert_close(torch.stack(out.logits), torch.stack(ref.logits), atol=1e-4, rtol=1e-4)


@kernel
def test_kernel_places_chunk_queries_at_the_end():
    """A chunk with past (M > 1): the kernel's causal offset places queries at the end."""
    from qwen.kv_cache_kernels import int8_attention

    q = torch.randn(1, 1, 4, 16)
    k = torch.randn(1, 1, 12, 16)
    kq, kp = quantize_kv(k)
    out = int8_attention(q, kq, kp, kq, kp, scaling=0.25)
    kd = dequantize_kv(kq, kp)
    ref = F.scaled_dot_product_attention(
        q, kd, kd, attn_mask=torch.ones(4, 12, dtype=torch.bool).tril(8), scale=0.25
    ).transpose(1, 2)
    torch.testing.assert_close(out, ref, atol=1e-5, rtol=1e-5)


def test_triton_kernels_in_interpreter(tiny_dir):
    if not HAVE_TRITON:
        pytest.skip("Triton is not installed (pip install 'triton>=3.0'); the kernel checks need it")
    if INTERPRETING:
        pytest.skip("this session runs the kernel tests itself (TRITON_INTERPRET=1)")
    env = dict(os.environ, TRITON_INTERPRET="1", QWEN_TEST_TINY_DIR=str(tiny_dir))
    proc = subprocess.run(
        [
            sys.executable,
            "-m",
            "pytest",
            "-q",
            "-p",
            "no:cacheprovider",
            "-k",
            "kernel and not in_interpreter",
            __file__,
        ],
        cwd=REPO,
        env=env,
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert proc.returncode == 0, proc.stdout[-6000:] + proc.stderr[-3000:]
    assert " passed" in proc.stdout and " failed" not in proc.stdout, proc.stdout[-2000:]
