"""The C kernel for one-row products on GPTQ weights (qwen/gptq_kernels.py) and its hook in
the CPU engine: against weights dequantized here from the integers themselves, and a whole
tiny Int4/Int8 model against gptqmodel's own path and the float model holding the
dequantized weights."""

from __future__ import annotations

import re

import pytest
import torch
from conftest import make_tiny, needs_compiler, rand_ids
from test_kernel_boundary import TARGETS, WARNINGS, compile_c
from test_quantization import exact_float_model, official_layout_pair, pack_by_hand
from transformers import DynamicCache

from qwen import QWenLMHeadModel, cpu_engine, cpu_memory, gptq_kernels

# --------------------------------------------------------------------------- the kernel


def random_gptq(n_out: int, n_in: int, bits: int, group_size: int, seed: int, stored_offset: int = 1):
    """Random integers, zero points and float16 scales, the GPTQ tensors packed by hand
    (qzeros holding z - stored_offset), and the weight they stand for in float64."""
    g = torch.Generator().manual_seed(seed)
    groups = n_in // group_size
    q = torch.randint(0, 2**bits, (n_out, n_in), generator=g)
    z = torch.randint(stored_offset, 2**bits + stored_offset, (groups, n_out), generator=g)
    scales = (torch.rand(groups, n_out, generator=g) * 0.02 + 1e-3).half()
    tensors = {
        "qweight": torch.tensor(pack_by_hand(q.t().tolist(), bits), dtype=torch.int32),
        "qzeros": torch.tensor(pack_by_hand((z - stored_offset).t().tolist(), bits), dtype=torch.int32)
        .t()
        .contiguous(),
        "scales": scales,
    }
    group_of = torch.arange(n_in) // group_size
    weight = scales.double()[group_of].t() * (q - z[group_of].t()).double()  # W[o, i] = s[g, o] (q[o, i] - z[g, o])
    return tensors, weight


CASES = [  # (bits, out, in, group size): outputs not a multiple of 16 (the vector width), several groups
    (4, 40, 96, 32),
    (4, 2072, 256, 64),  # several column ranges per thread
    (8, 52, 128, 32),
    (8, 1160, 384, 128),
    (2, 48, 64, 16),
]


@needs_compiler
@torch.inference_mode()
@pytest.mark.parametrize("bits,n_out,n_in,group_size", CASES)
@pytest.mark.parametrize("threads", [1, 2])
def test_kernel_equals_the_dequantized_weights_in_float32(bits, n_out, n_in, group_size, threads):
    tensors, weight = random_gptq(n_out, n_in, bits, group_size, seed=n_out)
    g = torch.Generator().manual_seed(bits)
    x = torch.randn(1, 1, n_in, generator=g)
    bias = torch.randn(n_out, generator=g).half()  # the official files' biases: float16
    before = torch.get_num_threads()
    torch.set_num_threads(threads)
    try:
        out = gptq_kernels.gptq_row(x, **tensors, bias=bias, bits=bits, group_size=group_size)
        plain = gptq_kernels.gptq_row(x[0], **tensors, bias=None, bits=bits, group_size=group_size)
    finally:
        torch.set_num_threads(before)
    expected = x.double() @ weight.t() + bias.double()
    assert out.shape == (1, 1, n_out) and out.dtype == torch.float32
    scale = (x.double().abs() @ weight.abs().t()).max()  # the size of the sums' terms
    assert ((out.double() - expected).abs().max() / scale).item() < 1e-6
    assert plain.shape == (1, n_out)
    assert ((plain.double() - (x[0].double() @ weight.t())).abs().max() / scale).item() < 1e-6


@needs_compiler
@torch.inference_mode()
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_kernel_in_half_precision_rounds_the_float32_result_once(dtype):
    """A half-precision row and bias: the float32 product of the dequantized weights rounded
    to the row's dtype at the end (one rounding: within half an ulp, up to float32 sums)."""
    bits, n_out, n_in, group_size = 4, 200, 256, 128
    tensors, weight = random_gptq(n_out, n_in, bits, group_size, seed=3)
    x = torch.randn(1, n_in, generator=torch.Generator().manual_seed(4)).to(dtype)
    bias = torch.randn(n_out).to(dtype)
    out = gptq_kernels.gptq_row(x, **tensors, bias=bias, bits=bits, group_size=group_size)
    exact = x.double() @ weight.t() + bias.double()
    assert out.dtype == dtype
    slack = 1e-6 * (x.double().abs() @ weight.abs().t()).max()  # float32 sums
    assert ((out.double() - exact).abs() <= torch.finfo(dtype).eps * exact.abs() + slack).all()  # within an ulp
    assert (out == exact.to(dtype)).float().mean() > 0.95  # and nearly all exactly the rounded value


@needs_compiler
@torch.inference_mode()
@pytest.mark.parametrize("bits,n_out,n_in,group_size", CASES)
@pytest.mark.parametrize(
    "block_columns", [None, "whole", 32], ids=["row by row", "dequantized whole", "dequantized 32 columns at a time"]
)
def test_rows_equal_the_dequantized_weights_in_float32(monkeypatch, bits, n_out, n_in, group_size, block_columns):
    """Several rows (a prefill, a batch): row by row through the one-row kernel, or (past
    ROWS_ONE_BY_ONE rows) the weight dequantized to float32 a block of columns at a time and
    multiplied by torch: the exact weights' product up to float32 sums either way."""
    if block_columns is not None:
        monkeypatch.setattr(gptq_kernels, "ROWS_ONE_BY_ONE", 1)
    if block_columns == 32:
        monkeypatch.setattr(gptq_kernels, "DEQUANT_BLOCK_BYTES", 4 * n_in * block_columns)
    tensors, weight = random_gptq(n_out, n_in, bits, group_size, seed=n_out + 1)
    g = torch.Generator().manual_seed(bits + 1)
    x = torch.randn(2, 3, n_in, generator=g)
    bias = torch.randn(n_out, generator=g).half()
    out = gptq_kernels.gptq_rows(x, **tensors, bias=bias, bits=bits, group_size=group_size)
    expected = x.double() @ weight.t() + bias.double()
    assert out.shape == (2, 3, n_out) and out.dtype == torch.float32
    scale = (x.double().abs() @ weight.abs().t()).max()
    assert ((out.double() - expected).abs().max() / scale).item() < 1e-6
    half = gptq_kernels.gptq_rows(x.bfloat16(), **tensors, bias=bias, bits=bits, group_size=group_size)
    exact = x.bfloat16().double() @ weight.t() + bias.double()
    assert half.dtype == torch.bfloat16
    assert ((half.double() - exact).abs() <= 2**-8 * exact.abs() + 1e-6 * scale).all()  # rounded once
    assert gptq_kernels.gptq_rows(x, **tensors, bias=None, bits=3, group_size=group_size) is None
    with torch.enable_grad():
        assert gptq_kernels.gptq_rows(x, **tensors, bias=None, bits=bits, group_size=group_size) is None


@needs_compiler
@torch.inference_mode()
def test_kernel_reads_zero_points_stored_as_they_are():
    """gptqmodel keeps qzeros in memory as z itself ("v2"); the checkpoint stores z - 1."""
    stored_as_z, weight = random_gptq(24, 64, 4, 32, seed=5, stored_offset=0)
    x = torch.randn(1, 64)
    out = gptq_kernels.gptq_row(x, **stored_as_z, bias=None, bits=4, group_size=32, zero_offset=0)
    torch.testing.assert_close(out.double(), x.double() @ weight.t(), rtol=1e-6, atol=1e-6)


@torch.inference_mode()
def test_kernel_declines_what_it_does_not_handle():
    tensors, _ = random_gptq(16, 64, 4, 32, seed=6)
    x = torch.randn(1, 64)
    args = dict(bias=None, bits=4, group_size=32)
    declined = [
        (torch.randn(2, 64), tensors, args),  # two rows
        (x.double(), tensors, args),  # float64
        (torch.randn(64, 2)[:, 0], tensors, args),  # strided row
        (x, {**tensors, "scales": tensors["scales"].float()}, args),  # float32 scales
        (x, {**tensors, "qweight": tensors["qweight"][:, :8]}, args),  # qweight of the wrong shape
        (x, {**tensors, "qzeros": tensors["qzeros"].t().contiguous().t()}, args),  # non-contiguous zeros
        (x, tensors, {**args, "bits": 3}),
        (x, tensors, {**args, "group_size": 12}),  # not whole words
        (x, tensors, {**args, "bias": torch.zeros(15)}),
        (torch.randn(1, 128), tensors, args),  # another input size
    ]
    for row, given, kwargs in declined:
        assert gptq_kernels.gptq_row(row, **given, **kwargs) is None
    with torch.enable_grad():
        assert gptq_kernels.gptq_row(x, **tensors, **args) is None


# --------------------------------------------------------------------------- the boundary


@needs_compiler
@pytest.mark.parametrize("target", TARGETS)
def test_the_source_compiles_without_a_warning(tmp_path, target):
    flags = [f for f in gptq_kernels._FLAGS if f != "-march=native"] + TARGETS[target]
    compile_c(gptq_kernels._SOURCE, tmp_path, flags + WARNINGS)


@needs_compiler
def test_declarations_that_disagree_with_the_c_code_do_not_compile(tmp_path):
    flags = ["-fsyntax-only", "-fopenmp", "-march=native"]
    arguments = dict(gptq_kernels._ENTRY_POINTS["gptq_row"])
    changed = {"gptq_row": tuple((a, "float" if a == "group_size" else t) for a, t in arguments.items())}
    with pytest.raises(RuntimeError, match="qwen_gptq_row"):
        compile_c(gptq_kernels._source(entry_points=changed), tmp_path, flags)
    with pytest.raises(RuntimeError, match="DT_F16"):
        compile_c(gptq_kernels._source(dtypes=("F32", "BF16")), tmp_path, flags)


def test_the_c_definitions_name_their_arguments_as_declared():
    defined = {
        name: [re.findall(r"\w+", argument)[-1] for argument in arguments.split(",")]
        for name, arguments in re.findall(r"^void qwen_(\w+)\(([^)]*)\)", gptq_kernels._DEFINITIONS, re.M)
    }
    assert defined == {name: [a for a, _ in args] for name, args in gptq_kernels._ENTRY_POINTS.items()}


# --------------------------------------------------------------------------- a whole model


@pytest.fixture(scope="module")
def fp32_tiny(tmp_path_factory):
    return make_tiny(tmp_path_factory.mktemp("gk") / "tiny", "--seq-length", "64", "--dtype", "fp32")


@pytest.fixture(scope="module", params=[4, 8], ids=["int4", "int8"])
def gptq_pair(request, fp32_tiny, tmp_path_factory):
    base = tmp_path_factory.mktemp(f"gk-int{request.param}")
    return (request.param, *official_layout_pair(fp32_tiny, base / "quant", base / "ref", request.param))


def load_gptq(path, bits, **kwargs):
    from transformers import GPTQConfig

    return QWenLMHeadModel.from_pretrained(
        path, quantization_config=GPTQConfig(bits=bits, backend="gptq_torch"), **kwargs
    ).eval()


@pytest.fixture
def kernel_calls(monkeypatch):
    """How many products the hook took through the kernels: one row, several rows, declined."""
    calls = {"row": 0, "rows": 0, "declined": 0}

    def counted(module, x):
        out = gptq_kernels.quant_linear(module, x)
        calls["declined" if out is None else "row" if x.numel() == x.shape[-1] else "rows"] += 1
        return out

    monkeypatch.setattr(cpu_engine, "quant_linear", counted)
    return calls


def spy_on_steps(monkeypatch, model) -> list[bool]:
    """Whether each decoding step went through all blocks in one C call."""
    taken = []

    def spying(*args):
        out = cpu_engine.decode_all_blocks(*args)
        taken.append(out is not None)
        return out

    monkeypatch.setattr(model.transformer, "decode_step", spying)
    return taken


def generate_scores(model, ids, new_tokens=6):
    with torch.inference_mode():
        out = model.generate(
            ids, max_new_tokens=new_tokens, min_new_tokens=new_tokens, do_sample=False,
            output_scores=True, return_dict_in_generate=True,
        )  # fmt: skip
    return out.sequences, torch.stack(out.scores)


@torch.inference_mode()
def logits_token_by_token(model, ids):
    cache, logits = None, []
    for position in range(ids.shape[1]):
        out = model(ids[:, position : position + 1], past_key_values=cache, use_cache=True)
        cache = out.past_key_values
        logits.append(out.logits)
    return torch.cat(logits, dim=1)


@needs_compiler
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
def test_quantized_model_decodes_through_the_kernel_as_the_library_does(gptq_pair, kernel_calls, monkeypatch, dtype):
    """The prompt goes through the several-rows product; the steps through the one-row
    product, module by module in float32 and in one C call for all blocks in bf16. Against
    gptqmodel's own path (the engine uninstalled) on the same tokens: the same logits up to
    rounding (gptqmodel rounds each weight s * (q - z) to float16 and, in bf16, multiplies in
    bf16; the kernels do neither), and in float32 the same greedy tokens; in float32 the
    logits, prefill and steps, are those of the float model holding the exact dequantized
    weights. (In bf16 greedy tokens of this random model can part where two logits are
    within that rounding: Int8's did, where the kernels' tokens were the float model's.)"""
    bits, quant_dir, ref_dir = gptq_pair
    model = load_gptq(quant_dir, bits, dtype=dtype)
    layer = model.transformer.h[0].attn.c_attn
    assert isinstance(layer, cpu_engine.CPUGPTQLinear)
    steps = spy_on_steps(monkeypatch, model)
    ids = rand_ids(1, 7, seed=bits)
    tokens, scores = generate_scores(model, ids)
    layers = len(model.transformer.h)
    one_call = dtype == torch.bfloat16
    assert steps == [one_call] * 5
    assert kernel_calls == {"rows": 5 * layers, "row": 0 if one_call else 5 * layers * 5, "declined": 0}

    sequence = tokens[:, :-1]
    with torch.inference_mode():
        ours = torch.cat((model(sequence).logits, logits_token_by_token(model, sequence)))
    cpu_engine.uninstall(model)
    assert type(layer).__name__ == "TorchLinear"
    library_tokens, _ = generate_scores(model, ids)
    with torch.inference_mode():
        library = torch.cat((model(sequence).logits, logits_token_by_token(model, sequence)))
    tolerance = {torch.float32: 1e-2, torch.bfloat16: 0.1}[dtype]
    torch.testing.assert_close(ours.float(), library.float(), atol=tolerance, rtol=0)
    if dtype == torch.float32:
        assert torch.equal(tokens, library_tokens)
    cpu_engine.install(model)
    assert isinstance(layer, cpu_engine.CPUGPTQLinear)
    if dtype == torch.float32:  # every product through the kernels: the prompt, then one token at a time
        calls = dict(kernel_calls)
        with torch.inference_mode():
            prefill = model(sequence).logits
            exact = exact_float_model(ref_dir, quant_dir, bits)(sequence).logits
        one_by_one = logits_token_by_token(model, sequence)
        assert kernel_calls["rows"] - calls["rows"] == 5 * layers
        assert kernel_calls["row"] - calls["row"] == 5 * layers * sequence.shape[1]
        torch.testing.assert_close(prefill, exact, atol=1e-4, rtol=0)
        torch.testing.assert_close(one_by_one, exact, atol=1e-4, rtol=0)


@needs_compiler
def test_batches_take_the_several_rows_product(gptq_pair, kernel_calls):
    """A batch of two (prefill and steps: several rows each) gives each sequence's tokens
    alone, and gptqmodel's own tokens."""
    bits, quant_dir, _ = gptq_pair
    model = load_gptq(quant_dir, bits, dtype=torch.float32)
    ids = rand_ids(2, 5, seed=1)
    tokens, _ = generate_scores(model, ids, new_tokens=3)
    assert kernel_calls["row"] == kernel_calls["declined"] == 0 and kernel_calls["rows"] == 3 * 5 * len(
        model.transformer.h
    )
    single, _ = generate_scores(model, ids[:1], new_tokens=3)
    assert kernel_calls["row"] > 0
    assert torch.equal(single[0], tokens[0])
    cpu_engine.uninstall(model)
    library_tokens, _ = generate_scores(model, ids, new_tokens=3)
    assert torch.equal(tokens, library_tokens)


@needs_compiler
@torch.inference_mode()
def test_steps_through_all_quantized_blocks_equal_block_by_block(gptq_pair, monkeypatch):
    """bf16 decoding steps through every quantized block in one C call give the logits and
    write the cache of the blocks one by one (the one-row kernel per module, torch between
    them), step after step; with a GPTQ linear hooked the step goes block by block."""
    bits, quant_dir, _ = gptq_pair
    model = load_gptq(quant_dir, bits, dtype=torch.bfloat16)
    torch.manual_seed(bits)
    for name, param in model.named_parameters():
        if name.endswith("ln_2.weight"):
            param.normal_(1, 0.5)  # the norms' weights reach the quantized products
    ids = rand_ids(1, 9, seed=bits)
    runs = {}
    for how in ("all blocks", "block by block"):
        steps = spy_on_steps(monkeypatch, model)
        if how == "block by block":
            monkeypatch.setattr(model.transformer, "decode_step", None)
        cache = DynamicCache(config=model.config)
        token, logits = model(ids, past_key_values=cache).logits[:, -1:].argmax(-1), []
        for _ in range(8):
            logits.append(model(token, past_key_values=cache).logits[:, -1])
            token = logits[-1].argmax(-1, keepdim=True)
        runs[how] = torch.stack(logits), cache, steps
    (fast, fast_cache, taken), (slow, slow_cache, _) = runs["all blocks"], runs["block by block"]
    assert taken == [True] * 8
    assert torch.equal(fast, slow)
    for a, b in zip(fast_cache.layers, slow_cache.layers, strict=True):
        assert torch.equal(a.keys, b.keys) and torch.equal(a.values, b.values)

    taken = spy_on_steps(monkeypatch, model)
    model.transformer.h[-1].mlp.w2.register_forward_pre_hook(lambda module, args: None)
    hooked, _ = generate_scores(model, ids, new_tokens=3)
    assert taken == [False, False]


@needs_compiler
@torch.inference_mode()
def test_hook_declines_reordered_groups(gptq_pair):
    """``desc_act`` checkpoints permute the groups (g_idx not i // group_size): library path."""
    bits, quant_dir, _ = gptq_pair
    model = load_gptq(quant_dir, bits, dtype=torch.float32)
    layer = model.transformer.h[0].mlp.w1
    x = torch.randn(1, 1, layer.in_features)
    assert gptq_kernels.quant_linear(layer, x) is not None
    layer.g_idx = layer.g_idx.flip(0).contiguous()
    assert gptq_kernels.quant_linear(layer, x) is None
    assert layer(x).shape == (1, 1, layer.out_features)


@needs_compiler
@torch.inference_mode()
def test_an_input_of_the_wrong_size_is_named(gptq_pair):
    """gptqmodel's own code fails on it with a ZeroDivisionError."""
    bits, quant_dir, _ = gptq_pair
    layer = load_gptq(quant_dir, bits, dtype=torch.float32).transformer.h[0].mlp.w1
    with pytest.raises(ValueError, match=rf"last dimension is {layer.in_features + 1} .* takes {layer.in_features}"):
        layer(torch.randn(2, 3, layer.in_features + 1))


@needs_compiler
def test_cpu_load_without_a_quantization_config_takes_the_kernel_backend(gptq_pair, kernel_calls):
    """A GPTQ checkpoint loaded on CPU as users load it (no quantization_config) gets
    gptqmodel's gptq_torch modules, which the kernel serves, not gptqmodel's own CPU choice
    (for 4 bits a module that repacks the weights and decodes several times slower): the
    same modules and logits as the explicit backend."""
    bits, quant_dir, _ = gptq_pair
    plain = QWenLMHeadModel.from_pretrained(quant_dir, fp32=True).eval()
    assert isinstance(plain.transformer.h[0].mlp.w1, cpu_engine.CPUGPTQLinear)
    explicit = load_gptq(quant_dir, bits, fp32=True)
    ids = rand_ids(1, 5, seed=bits)
    assert torch.equal(logits_token_by_token(plain, ids), logits_token_by_token(explicit, ids))
    assert kernel_calls["row"] == 2 * 5 * len(plain.transformer.h) * ids.shape[1]


@needs_compiler
@pytest.mark.skipif(not cpu_memory._transparent_huge_pages(), reason="needs Linux transparent huge pages")
def test_packed_weights_move_to_huge_pages(gptq_pair, monkeypatch):
    """The GPTQ tensors (buffers, not parameters) move to huge-page memory with the rest of
    the weights a step streams, values unchanged."""
    bits, quant_dir, _ = gptq_pair
    real, placed = cpu_memory.huge_page_empty_like, set()

    def recording(like):
        out = real(like)
        placed.add(out.data_ptr())
        return out

    monkeypatch.setattr(cpu_memory, "huge_page_empty_like", recording)
    model = load_gptq(quant_dir, bits, fp32=True)
    monkeypatch.setenv("QWEN_HUGE_PAGES", "0")
    unmoved = load_gptq(quant_dir, bits, fp32=True)
    layers = [m for m in model.modules() if isinstance(m, cpu_engine.CPUGPTQLinear)]
    assert len(layers) == 5 * len(model.transformer.h)
    for layer in layers:
        assert {layer.qweight.data_ptr(), layer.qzeros.data_ptr(), layer.scales.data_ptr()} <= placed
    for name, tensor in unmoved.state_dict().items():
        assert torch.equal(model.state_dict()[name], tensor), name
    ids = rand_ids(1, 5, seed=2)
    with torch.inference_mode():
        assert torch.equal(model(ids).logits, unmoved(ids).logits)


@needs_compiler
@torch.inference_mode()
def test_quant_product_is_kept_until_the_module_changes(gptq_pair):
    """The all-blocks step asks for every linear's GPTQ tensors at every token: they are
    kept on the module, and not past a change of mode, groups or tensors."""
    bits, quant_dir, _ = gptq_pair
    model = load_gptq(quant_dir, bits, dtype=torch.bfloat16)
    layer = model.transformer.h[0].mlp.w1
    first = gptq_kernels.quant_product(layer)
    assert first is not None and gptq_kernels.quant_product(layer) is first
    assert first.qweight is layer.qweight and first.n_out == layer.out_features
    layer.training = True
    assert gptq_kernels.quant_product(layer) is None
    layer.training = False
    assert gptq_kernels.quant_product(layer) is not None
    layer.scales = layer.scales.clone()
    assert gptq_kernels.quant_product(layer).scales is layer.scales
    layer.g_idx = layer.g_idx.flip(0).contiguous()
    assert gptq_kernels.quant_product(layer) is None
