"""The network: logits against independent references, caching, padding, backends."""

from __future__ import annotations

import copy
import math

import pytest
import torch
from conftest import make_tiny, rand_ids
from reference import naive_forward, qwen2_reference
from transformers import AutoModelForCausalLM, DynamicCache

import qwen
from qwen.modeling_qwen import QWenRotaryEmbedding, apply_rotary, logn_scale, ntk_alpha, rotary_tables

ATOL = 1e-5


def load(path, **kw):
    kw.setdefault("dtype", torch.float32)
    return AutoModelForCausalLM.from_pretrained(path, **kw).eval()


@pytest.fixture(scope="module")
def model(tiny_dir):
    return load(tiny_dir)


@pytest.fixture(scope="module")
def plain_model(tiny_dir):
    """NTK and logN off: the plain function, for comparisons beyond seq_length."""
    return load(tiny_dir, use_dynamic_ntk=False, use_logn_attn=False)


def test_auto_classes_return_package_classes(model):
    assert type(model) is qwen.QWenLMHeadModel
    assert type(model.transformer) is qwen.QWenModel
    assert isinstance(model.config, qwen.QWenConfig)


def test_state_dict_names_match_official_layout(model):
    names = set(model.state_dict())
    expected = {"transformer.wte.weight", "transformer.ln_f.weight", "lm_head.weight"}
    for i in range(2):
        p = f"transformer.h.{i}."
        expected |= {
            p + n
            for n in (
                "ln_1.weight",
                "attn.c_attn.weight",
                "attn.c_attn.bias",
                "attn.c_proj.weight",
                "ln_2.weight",
                "mlp.w1.weight",
                "mlp.w2.weight",
                "mlp.c_proj.weight",
            )
        }
    assert names == expected


@torch.no_grad()
@pytest.mark.parametrize("length", [1, 7, 64])
def test_logits_equal_qwen2_within_seq_length(tiny_dir, model, length):
    ref = qwen2_reference(tiny_dir)
    ids = rand_ids(2, length)
    ours = model(ids).logits
    theirs = ref(ids).logits
    assert (ours - theirs).abs().max().item() < ATOL


def test_ntk_alpha_and_logn_by_hand():
    S = 64
    # alpha = max(2**ceil(log2(L/S) + 1) - 1, 1)
    cases = {1: 1, 32: 1, 64: 1, 65: 3, 100: 3, 128: 3, 129: 7, 256: 7, 257: 15, 1024: 31}
    got = ntk_alpha(torch.tensor(list(cases)), S)
    assert got.tolist() == [float(v) for v in cases.values()]
    # logN at 0-based position p: max(1, ln(p+1)/ln(S)); no upper limit.
    p = torch.tensor([0, 62, 63, 64, 127, 4095, 100_000])
    expected = [1, 1, 1, math.log(65) / math.log(64), math.log(128) / math.log(64), 2.0, math.log(100_001, 64)]
    assert torch.allclose(logn_scale(p, S), torch.tensor(expected, dtype=torch.float32), atol=1e-6)


@pytest.mark.parametrize("pct", [1.0, 0.5])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_rotary_is_the_rotate_half_formula(pct, dtype):
    # The textbook form, written out: the first rot dims of q and k become
    # x * cos + cat(-x2, x1) * sin (float32, rounded once); the rest pass through.
    config = qwen.QWenConfig(
        hidden_size=64,
        num_attention_heads=2,
        kv_channels=32,
        rotary_pct=pct,
        num_hidden_layers=1,
        intermediate_size=16,
        vocab_size=32,
        rotary_emb_base=10000,
    )
    positions = torch.tensor([[0, 1, 5, 300]])
    cos, sin = QWenRotaryEmbedding(config)(positions)
    rot = int(32 * pct)
    freqs = positions[0, :, None].double() / 10000 ** (torch.arange(0, rot, 2).double() / rot)
    assert torch.allclose(cos[0, :, 0], torch.cat((freqs, freqs), -1).cos().float(), atol=1e-4)
    qk = torch.randn(1, 4, 2, 2, 32).to(dtype)
    x = qk[..., :rot].float()
    x1, x2 = x[..., : rot // 2], x[..., rot // 2 :]
    c, s = cos[:, :, None], sin[:, :, None]
    expected = torch.cat((x * c + torch.cat((-x2, x1), -1) * s, qk[..., rot:].float()), -1).to(dtype)
    got = apply_rotary(qk, *rotary_tables(cos, sin))
    assert got.dtype == dtype and torch.equal(got, expected)


@torch.no_grad()
def test_dynamic_ntk_beyond_seq_length_equals_qwen2_with_scaled_base(tiny_dir):
    m = load(tiny_dir, use_logn_attn=False)
    ids = rand_ids(1, 100)  # S=64 -> alpha 3
    d = m.config.kv_channels
    ref = qwen2_reference(tiny_dir, rope_theta=10000 * 3 ** (d / (d - 2)))
    assert (m(ids).logits - ref(ids).logits).abs().max().item() < ATOL


@torch.no_grad()
@pytest.mark.parametrize("ntk,logn", [(True, True), (False, True), (True, False)])
def test_beyond_seq_length_equals_official_formulas(tiny_dir, ntk, logn):
    m = load(tiny_dir, use_dynamic_ntk=ntk, use_logn_attn=logn)
    # 150 tokens, and 65: one past seq_length (64), where alpha first changes
    for length in (150, 65):
        ids = rand_ids(1, length)
        ref = naive_forward(tiny_dir, ids[0].tolist(), ntk, logn)
        assert (m(ids).logits[0] - ref).abs().max().item() < ATOL, length


@torch.no_grad()
@pytest.mark.parametrize("length", [20, 62, 130])
def test_cached_decoding_equals_full_forward(model, tiny_dir, length):
    """Prefill ``length`` tokens, then decode 6 one at a time. The NTK alpha is fixed by
    the prompt for the whole sequence (the official behaviour), so the reference is the
    official formulas with the prompt's alpha. 62 -> 68 crosses seq_length (64): the
    decoded steps keep alpha 1 while a full forward over 68 tokens takes alpha 3 (and logN
    applies past 64 in both); 20 and 130 keep one alpha (1 and 7) throughout."""
    ids = rand_ids(2, length + 6)
    cache = DynamicCache(config=model.config)
    steps = [model(ids[:, :length], past_key_values=cache, use_cache=True).logits]
    for t in range(length, length + 6):
        steps.append(model(ids[:, t : t + 1], past_key_values=cache, use_cache=True).logits)
    got = torch.cat(steps, 1)
    for row in range(2):
        ref = naive_forward(tiny_dir, ids[row].tolist(), True, True, ntk_length=length)
        assert (got[row] - ref).abs().max().item() < ATOL, row
    full = model(ids, use_cache=False).logits  # alpha from all length + 6 tokens
    if ntk_alpha(torch.tensor(length), 64) == ntk_alpha(torch.tensor(length + 6), 64):
        assert (got - full).abs().max().item() < ATOL
    else:  # another alpha rotates every position differently: the check above can tell
        assert (got - full)[:, 1:].abs().amax(-1).min().item() > 100 * ATOL  # position 0 is unrotated


@torch.no_grad()
@pytest.mark.parametrize("impl", ["sdpa", "eager"])
def test_decoding_cache_grows_in_place(tiny_dir, monkeypatch, impl):
    """No-grad decoding appends into spare room of the DynamicCache's buffers (a
    GrowingLayer) instead of copying the cache every step (eager attention reads those
    views in place); logits still equal a full forward, across reallocations, a crop and
    a row selection."""
    from qwen import kv_cache

    monkeypatch.setattr(kv_cache, "GROWING_MIN_ROOM", 3)
    model = load(tiny_dir, attn_implementation=impl)
    ids = rand_ids(2, 40)
    full = model(ids, use_cache=False).logits
    cache = DynamicCache(config=model.config)
    steps = [model(ids[:, :10], past_key_values=cache, use_cache=True).logits]
    assert type(cache) is DynamicCache and all(type(layer) is kv_cache.GrowingLayer for layer in cache.layers)
    pointers = []
    for t in range(10, 30):
        steps.append(model(ids[:, t : t + 1], past_key_values=cache, use_cache=True).logits)
        pointers.append(cache.layers[0].keys.data_ptr())
    assert cache.get_seq_length() == 30 and cache.layers[0].keys.shape[::2] == (2, 30)
    assert 1 < len(set(pointers)) < len(pointers) / 2  # most steps wrote in place
    assert (torch.cat(steps, 1) - full[:, :30]).abs().max().item() < ATOL
    cache.crop(-5)  # forget 5 positions, decode them again
    again = [model(ids[:, t : t + 1], past_key_values=cache, use_cache=True).logits for t in range(25, 35)]
    assert (torch.cat(again, 1) - full[:, 25:35]).abs().max().item() < ATOL
    cache.batch_select_indices(torch.tensor([1]))
    last = [model(ids[1:, t : t + 1], past_key_values=cache, use_cache=True).logits for t in range(35, 40)]
    assert (torch.cat(last, 1) - full[1:, 35:40]).abs().max().item() < ATOL


def test_growing_layer_takes_rows_sliced_from_its_buffer():
    """Keys and values set to a batch slice of a GrowingLayer's buffer (the same first
    row, the same strides) are not its buffer: the next update starts new buffers of the
    slice's batch instead of writing the new rows into every row of the old one."""
    from qwen.kv_cache import GrowingLayer

    layer, g = GrowingLayer(), torch.Generator().manual_seed(0)
    two = [torch.randn(2, 3, 4, 8, generator=g) for _ in range(2)]
    layer.update(*two)
    layer.keys, layer.values = layer.keys[:1], layer.values[:1]  # keep sequence 0
    new = [torch.randn(1, 3, 1, 8, generator=g) for _ in range(2)]
    keys, values = layer.update(*new)
    assert keys.shape == values.shape == (1, 3, 5, 8)
    assert torch.equal(keys, torch.cat([two[0][:1], new[0]], 2))
    assert torch.equal(values, torch.cat([two[1][:1], new[1]], 2))
    assert layer.room_for_one()[0].shape[0] == 1


@torch.no_grad()
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_one_query_attention_reads_cache_views(dtype):
    """eager_attention with one query against key/value views of larger buffers (as a
    GrowingLayer hands them out) equals softmax(q k^T * s) v computed by hand."""
    from qwen.modeling_qwen import eager_attention

    g = torch.Generator().manual_seed(0)
    q = torch.randn(2, 4, 1, 8, generator=g).to(dtype)
    k_buf, v_buf = (torch.randn(2, 4, 20, 8, generator=g).to(dtype) for _ in range(2))
    k, v = k_buf[:, :, :13], v_buf[:, :, :13]
    mask = torch.ones(2, 1, 1, 13, dtype=torch.bool)
    mask[1, ..., :4] = False  # a left-padded row
    out, _ = eager_attention(None, q, k, v, mask, scaling=0.3)
    scores = (q.float() @ k.float().transpose(2, 3) * 0.3).masked_fill(~mask, float("-inf"))
    ref = (scores.softmax(-1) @ v.float()).transpose(1, 2)
    assert out.shape == (2, 1, 4, 8) and out.dtype == dtype
    assert (out.float() - ref).abs().max().item() < (1e-6 if dtype == torch.float32 else 3e-2)


@torch.no_grad()
def test_ntk_alpha_stays_fixed_while_decoding(model, tiny_dir):
    """Prefill of 60 tokens (alpha 1), then decode past 64: cached keys keep alpha 1."""
    ids = rand_ids(1, 70)
    cache = DynamicCache(config=model.config)
    model(ids[:, :60], past_key_values=cache, use_cache=True)
    logits = [model(ids[:, t : t + 1], past_key_values=cache, use_cache=True).logits for t in range(60, 70)]
    ref = naive_forward(tiny_dir, ids[0].tolist(), use_dynamic_ntk=False, use_logn_attn=True)
    assert (torch.cat(logits, 1)[0] - ref[60:]).abs().max().item() < ATOL
    # a copy of a prompt cache (transformers' way of reusing one) keeps the alpha too;
    # (without it, a 10-token chunk reaching 70 > 64 positions would pick alpha 3)
    cache = DynamicCache(config=model.config)
    model(ids[:, :60], past_key_values=cache, use_cache=True)
    chunk = model(ids[:, 60:], past_key_values=copy.deepcopy(cache), use_cache=True).logits
    assert (chunk[0] - ref[60:]).abs().max().item() < ATOL


@torch.no_grad()
@pytest.mark.parametrize("impl", ["sdpa", "eager"])
@pytest.mark.parametrize("lengths", [(5, 12, 9), (40, 100, 70)])
def test_left_padded_batch_equals_rows_alone(tiny_dir, impl, lengths):
    m = load(tiny_dir, attn_implementation=impl)
    rows = [rand_ids(1, n, seed=n)[0] for n in lengths]
    width = max(lengths)
    ids = torch.full((len(rows), width), 151643)
    mask = torch.zeros(len(rows), width, dtype=torch.long)
    for i, r in enumerate(rows):
        ids[i, width - len(r) :] = r
        mask[i, width - len(r) :] = 1
    batch = m(ids, attention_mask=mask).logits
    for i, r in enumerate(rows):
        alone = m(r[None]).logits[0]
        assert (batch[i, width - len(r) :] - alone).abs().max().item() < ATOL
    # and generation: greedy continuation of each row equals the row alone
    gen = m.generate(ids, attention_mask=mask, max_new_tokens=4, do_sample=False, pad_token_id=151643)
    for i, r in enumerate(rows):
        alone = m.generate(r[None], max_new_tokens=4, do_sample=False, pad_token_id=151643)
        assert gen[i, width:].tolist() == alone[0, len(r) :].tolist()


@torch.no_grad()
def test_sdpa_equals_eager(tiny_dir):
    ids = rand_ids(2, 90)
    a = load(tiny_dir, attn_implementation="sdpa")(ids).logits
    b = load(tiny_dir, attn_implementation="eager")(ids).logits
    assert (a - b).abs().max().item() < ATOL


@torch.no_grad()
@pytest.mark.parametrize("impl", ["sdpa", "eager"])
def test_window_attention(tmp_path, impl):
    ckpt = make_tiny(tmp_path / "w", "--seq-length", "64", "--layers", "2")
    m = load(ckpt, window_size=8, attn_implementation=impl)
    ids = rand_ids(1, 30)
    ref = naive_forward(ckpt, ids[0].tolist(), True, True, window=8)
    assert (m(ids).logits[0] - ref).abs().max().item() < ATOL
    # with the cache, token by token
    cache = DynamicCache(config=m.config)
    steps = [m(ids[:, :10], past_key_values=cache).logits]
    steps += [m(ids[:, t : t + 1], past_key_values=cache).logits for t in range(10, 30)]
    assert (torch.cat(steps, 1)[0] - ref).abs().max().item() < ATOL
    # per-layer windows, in layer order: none on layer 0, 5 on layer 1 (and the reverse)
    for windows in ([None, 5], [5, None]):
        m2 = load(ckpt, window_size=windows, attn_implementation=impl)
        per_layer = naive_forward(ckpt, ids[0].tolist(), True, True, window=windows)
        assert (m2(ids).logits[0] - per_layer).abs().max().item() < ATOL
    assert not torch.allclose(per_layer, naive_forward(ckpt, ids[0].tolist(), True, True, window=[None, 5]))


def test_window_one_layer_only_sees_the_window(tmp_path):
    """One layer, window w: the last position's output only depends on the last w tokens."""
    ckpt = make_tiny(tmp_path / "w1", "--layers", "1")
    m = load(ckpt, window_size=6)
    ids = rand_ids(1, 20)
    with torch.no_grad():
        full = m(ids).logits[0, -1]
        tail = m(ids[:, -6:]).logits[0, -1]
    assert (full - tail).abs().max().item() < 1e-4


@torch.no_grad()
def test_static_cache_generation_equals_dynamic(model):
    ids = rand_ids(1, 12)
    a = model.generate(ids, max_new_tokens=6, do_sample=False)
    b = model.generate(ids, max_new_tokens=6, do_sample=False, cache_implementation="static")
    assert a.tolist() == b.tolist()


@torch.no_grad()
def test_static_cache_generation_keeps_the_window(tiny_dir):
    """For static caches ``generate`` builds the attention masks ahead of the forward;
    they must carry ``window_size`` (transformers' generic ones attend to everything)."""
    m = load(tiny_dir, window_size=4)
    ids = rand_ids(1, 12)
    kw = dict(max_new_tokens=6, do_sample=False, output_logits=True, return_dict_in_generate=True)
    a = m.generate(ids, **kw)
    b = m.generate(ids, cache_implementation="static", **kw)
    assert a.sequences.tolist() == b.sequences.tolist()
    for x, y in zip(a.logits, b.logits, strict=True):
        assert (x - y).abs().max().item() < ATOL


@torch.no_grad()
def test_generation_is_greedy_argmax(model):
    ids = rand_ids(1, 8)
    gen = model.generate(ids, max_new_tokens=5, do_sample=False)
    seq = ids
    for _ in range(5):
        nxt = model(seq).logits[:, -1].argmax(-1, keepdim=True)
        seq = torch.cat([seq, nxt], 1)
    assert gen.tolist() == seq.tolist()


@torch.no_grad()
def test_stop_words_ids(model):
    ids = rand_ids(1, 8)
    free = model.generate(ids, max_new_tokens=6, do_sample=False)[0, 8:].tolist()
    # stop on the 3rd generated token, given as a single-token and as a 2-token stop word
    out = model.generate(ids, max_new_tokens=6, do_sample=False, stop_words_ids=[[free[2]]])
    assert out[0, 8:].tolist() == free[:3]
    out = model.generate(ids, max_new_tokens=6, do_sample=False, stop_words_ids=[[free[1], free[2]]])
    assert out[0, 8:].tolist() == free[:3]
    # and from the generation config
    model.generation_config.stop_words_ids = [[free[1]]]
    try:
        out = model.generate(ids, max_new_tokens=6, do_sample=False)
    finally:
        model.generation_config.stop_words_ids = [[151643]]
    assert out[0, 8:].tolist() == free[:2]


def test_official_generation_config_samples(tiny_chat_dir):
    m = load(tiny_chat_dir)
    assert m.generation_config.chat_format == "chatml"
    assert m.generation_config.top_k == 0
    torch.manual_seed(1)
    out = m.generate(rand_ids(1, 5), max_new_tokens=3)  # do_sample, top_p 0.8, top_k 0
    assert out.shape == (1, 8)
    # What the official config asks for, worked out here from the raw logits: repetition
    # penalty 1.1 over all seen tokens, then the top-p 0.8 nucleus of the whole vocabulary
    # (top_k 0: not transformers' default of 50). Every sampled token lies in that
    # nucleus; some lie beyond the 50 most likely (the random model's distribution is
    # flat); the draws differ from greedy decoding.
    config = m.generation_config
    assert (config.do_sample, config.top_p, config.repetition_penalty) == (True, 0.8, 1.1)
    ids = rand_ids(1, 5)
    n = 12
    greedy = m.generate(ids, max_new_tokens=n, do_sample=False, repetition_penalty=1.1)[0, 5:]
    out = m.generate(ids, max_new_tokens=n, output_logits=True, return_dict_in_generate=True)
    ranks = []
    for step, logits in enumerate(out.logits):
        seen = out.sequences[0, : 5 + step]
        scores = logits[0].clone()
        scores[seen] = torch.where(scores[seen] < 0, scores[seen] * 1.1, scores[seen] / 1.1)
        probs, order = scores.softmax(-1).sort(descending=True)
        token = out.sequences[0, 5 + step]
        rank = int((order == token).nonzero())
        assert probs[:rank].sum() < 0.8 + 1e-6, (step, rank)  # inside the nucleus
        ranks.append(rank)
    assert max(ranks) >= 50, ranks
    assert not torch.equal(out.sequences[0, 5:], greedy)


def test_loss_and_gradient_checkpointing(tiny_dir):
    m = load(tiny_dir).train()
    ids = rand_ids(2, 16)
    labels = ids.clone()
    labels[:, :5] = -100
    out = m(ids, labels=labels)
    logits = out.logits[:, :-1].reshape(-1, out.logits.shape[-1])
    expected = torch.nn.functional.cross_entropy(logits, labels[:, 1:].reshape(-1), ignore_index=-100)
    assert abs(out.loss.item() - expected.item()) < 1e-5
    out.loss.backward()
    grads = {n: p.grad.clone() for n, p in m.named_parameters()}
    m.zero_grad()
    m.gradient_checkpointing_enable()
    m(ids, labels=labels).loss.backward()
    for n, p in m.named_parameters():
        assert torch.allclose(p.grad, grads[n], atol=1e-6), n


@torch.no_grad()
def test_return_dict_false_gives_tuples(tiny_dir):
    """``return_dict=False`` (or ``config.return_dict = False``) returns the output's
    fields that are set, in order, as transformers' own models do."""
    m = load(tiny_dir).eval()
    ids = rand_ids(2, 7)
    full = m(ids, labels=ids)
    loss, logits, cache = m(ids, labels=ids, return_dict=False)
    assert torch.equal(loss, full.loss) and torch.equal(logits, full.logits)
    assert cache.get_seq_length() == 7
    hidden, _ = m.transformer(ids, return_dict=False)
    assert torch.equal(hidden, m.transformer(ids).last_hidden_state)
    m.config.return_dict = False
    try:
        assert isinstance(m(ids, use_cache=False), tuple)
        assert isinstance(m(ids, use_cache=False, return_dict=True).logits, torch.Tensor)
    finally:
        m.config.return_dict = True


def test_torch_compile_runs(model, tiny_dir):
    """The forward compiles into one graph (fullgraph: no break), and the captured graph
    computes the official function (not merely what the eager forward computes)."""
    ids = rand_ids(1, 6)
    graphs = []

    def recording_backend(gm, example_inputs):
        graphs.append(gm)
        return gm.forward

    compiled = torch.compile(model.forward, backend=recording_backend, fullgraph=True)
    with torch.no_grad():
        # no cache: a DynamicCache's layers grow in place (a __class__ swap Dynamo cannot
        # trace); compiled decoding runs over a StaticCache (test_compile.py)
        got = compiled(ids, use_cache=False).logits
        assert torch.allclose(got, model(ids, use_cache=False).logits, atol=ATOL)
    assert len(graphs) == 1 and any(n.op == "call_function" for n in graphs[0].graph.nodes)
    reference = naive_forward(tiny_dir, ids[0].tolist(), True, True)
    assert (got[0] - reference).abs().max().item() < ATOL


def test_no_split_modules():
    assert qwen.QWenLMHeadModel._no_split_modules == ["QWenBlock"]
