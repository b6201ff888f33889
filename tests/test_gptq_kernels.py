"""The C kernel for one-row products on GPTQ weights (qwen/gptq_kernels.py) and its hook in
the CPU engine: against weights dequantized here from the integers themselves, and a whole
tiny Int4/Int8 model against gptqmodel's own path and the float model holding the
dequantized weights."""

from __future__ import annotations

import re

import pytest
import torch
from conftest import make_tiny, needs_compiler, rand_ids
from safetensors.torch import load_file
from test_kernel_boundary import TARGETS, WARNINGS, compile_c
from test_quantization import official_layout_pair, pack_by_hand

from qwen import QWenLMHeadModel, cpu_engine, gptq_kernels
from qwen.quantization import GPTQ_TENSORS, QUANTIZED_LINEARS, dequantize_gptq

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
    """How many one-row products the hook took through the kernel."""
    calls = {"kernel": 0, "declined": 0}

    def counted(module, x):
        out = gptq_kernels.quant_linear_row(module, x)
        calls["declined" if out is None else "kernel"] += 1
        return out

    monkeypatch.setattr(cpu_engine, "quant_linear_row", counted)
    return calls


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


def exact_float_model(ref_dir, quant_dir, bits):
    """The float model of ``ref_dir`` holding the weights the GPTQ tensors of ``quant_dir``
    stand for exactly, ``s * (q - z)`` in float32 (exact: at most 19 significant bits)."""
    ref = QWenLMHeadModel.from_pretrained(ref_dir, fp32=True).eval()
    stored = load_file(quant_dir / "model.safetensors")
    with torch.no_grad():
        for name, module in ref.named_modules():
            if name.split(".", 3)[-1] in QUANTIZED_LINEARS:
                tensors = {n: stored[f"{name}.{n}"] for n in GPTQ_TENSORS}
                module.weight.copy_(dequantize_gptq(tensors, bits))
    return ref


@needs_compiler
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
def test_quantized_model_decodes_through_the_kernel_as_the_library_does(gptq_pair, kernel_calls, dtype):
    """Greedy decoding with the hook gives gptqmodel's own tokens (the engine uninstalled); in
    float32 its logits are those of the float model holding the exact dequantized weights.
    gptqmodel rounds each weight s * (q - z) to float16 before multiplying, the kernel does
    not: their logits differ by that rounding."""
    bits, quant_dir, ref_dir = gptq_pair
    model = load_gptq(quant_dir, bits, dtype=dtype)
    layer = model.transformer.h[0].attn.c_attn
    assert isinstance(layer, cpu_engine.CPUGPTQRow)
    ids = rand_ids(1, 7, seed=bits)
    tokens, scores = generate_scores(model, ids)
    layers = len(model.transformer.h)
    assert kernel_calls["kernel"] == 5 * layers * 5  # five products per block, five one-row steps

    cpu_engine.uninstall(model)
    assert type(layer).__name__ == "TorchLinear"
    library_tokens, library_scores = generate_scores(model, ids)
    assert torch.equal(tokens, library_tokens)
    tolerance = {torch.float32: 1e-2, torch.bfloat16: 0.1}[dtype]
    torch.testing.assert_close(scores.float(), library_scores.float(), atol=tolerance, rtol=0)
    cpu_engine.install(model)
    assert isinstance(layer, cpu_engine.CPUGPTQRow)
    if dtype == torch.float32:  # every product through the kernel: one token at a time
        sequence = tokens[:, :-1]
        calls = kernel_calls["kernel"]
        one_by_one = logits_token_by_token(model, sequence)
        assert kernel_calls["kernel"] - calls == 5 * layers * sequence.shape[1]
        with torch.inference_mode():
            exact = exact_float_model(ref_dir, quant_dir, bits)(sequence).logits
        torch.testing.assert_close(one_by_one, exact, atol=1e-4, rtol=0)


@needs_compiler
def test_batches_and_prefills_take_the_library_path(gptq_pair, kernel_calls):
    bits, quant_dir, _ = gptq_pair
    model = load_gptq(quant_dir, bits, dtype=torch.float32)
    ids = rand_ids(2, 5, seed=1)
    tokens, _ = generate_scores(model, ids, new_tokens=3)
    assert kernel_calls["kernel"] == 0 and kernel_calls["declined"] > 0
    single, _ = generate_scores(model, ids[:1], new_tokens=3)
    assert kernel_calls["kernel"] > 0
    assert torch.equal(single[0], tokens[0])


@needs_compiler
@torch.inference_mode()
def test_hook_declines_reordered_groups(gptq_pair):
    """``desc_act`` checkpoints permute the groups (g_idx not i // group_size): library path."""
    bits, quant_dir, _ = gptq_pair
    model = load_gptq(quant_dir, bits, dtype=torch.float32)
    layer = model.transformer.h[0].mlp.w1
    x = torch.randn(1, 1, layer.in_features)
    assert gptq_kernels.quant_linear_row(layer, x) is not None
    layer.g_idx = layer.g_idx.flip(0).contiguous()
    assert gptq_kernels.quant_linear_row(layer, x) is None
    assert layer(x).shape == (1, 1, layer.out_features)


@needs_compiler
def test_cpu_load_without_a_quantization_config_takes_the_kernel_backend(gptq_pair, kernel_calls):
    """A GPTQ checkpoint loaded on CPU as users load it (no quantization_config) gets
    gptqmodel's gptq_torch modules, which the kernel serves, not gptqmodel's own CPU choice
    (for 4 bits a module that repacks the weights and decodes several times slower): the
    same modules and logits as the explicit backend."""
    bits, quant_dir, _ = gptq_pair
    plain = QWenLMHeadModel.from_pretrained(quant_dir, fp32=True).eval()
    assert isinstance(plain.transformer.h[0].mlp.w1, cpu_engine.CPUGPTQRow)
    explicit = load_gptq(quant_dir, bits, fp32=True)
    ids = rand_ids(1, 5, seed=bits)
    assert torch.equal(logits_token_by_token(plain, ids), logits_token_by_token(explicit, ids))
    assert kernel_calls["kernel"] == 2 * 5 * len(plain.transformer.h) * ids.shape[1]
