"""Quantized models on CPU: official-layout GPTQ Int4/Int8 checkpoints through transformers'
GPTQ integration (optimum + gptqmodel), run_gptq.py, bitsandbytes nf4/int8.

The GPTQ checkpoints here are packed by this file itself (the auto-gptq format as
docs/quantization.md states it), independently of gptqmodel's writer and of
``qwen.quantization``; the references are float models holding the dequantized weights.
"""

from __future__ import annotations

import json
import pickle
import shutil
import subprocess
import sys

import pytest
import torch
from conftest import REPO, make_tiny, rand_ids
from safetensors.torch import load_file, save_file

from qwen import QWenLMHeadModel, QWenTokenizer
from qwen.quantization import (
    GPTQ_TENSORS,
    QUANTIZED_LINEARS,
    calibration_samples,
    dequantize_gptq,
    pack_gptq,
    quantize_rtn,
)

GROUP = 32


@pytest.fixture(scope="module")
def fp32_tiny(tmp_path_factory):
    return make_tiny(tmp_path_factory.mktemp("q") / "tiny", "--seq-length", "64", "--dtype", "fp32")


@pytest.fixture(scope="module")
def fp32_tiny_chat(tmp_path_factory):
    return make_tiny(tmp_path_factory.mktemp("q") / "tiny-chat", "--chat", "--dtype", "fp32")


# --------------------------------------------------------------------------- the format, by hand


def pack_by_hand(values: list[list[int]], bits: int) -> list[list[int]]:
    """Pack a (R, C) list of integers along R into int32 words, lowest bits first: word
    (r, c) holds values[r * 32/bits + j][c] at bits [bits*j, bits*(j+1))."""
    per = 32 // bits
    words = []
    for r in range(len(values) // per):
        row = []
        for c in range(len(values[0])):
            word = 0
            for j in range(per):
                word |= values[r * per + j][c] << (bits * j)
            row.append(word - (1 << 32) if word >= 1 << 31 else word)  # as a signed int32
        words.append(row)
    return words


def official_layout_pair(src, out_quant, out_ref, bits: int):
    """An official-layout GPTQ checkpoint of ``src`` (symmetric round-to-nearest per group of
    GROUP inputs, zero point 2**(bits-1) stored minus one, float16 scales and biases) and a
    float checkpoint holding the weights it stands for."""
    shutil.copytree(src, out_quant)
    shutil.copytree(src, out_ref)
    maxq = 2**bits - 1
    quant, ref = {}, {}
    for key, value in load_file(src / "model.safetensors").items():
        module = key.rsplit(".", 1)[0]
        if key.endswith(".weight") and module.split(".", 3)[-1] in QUANTIZED_LINEARS:
            n_out, n_in = value.shape
            groups = value.reshape(n_out, n_in // GROUP, GROUP)
            scales = (groups.abs().amax(-1) * 2 / maxq).half()  # (out, groups)
            q = ((groups / scales.float()[..., None]).round() + 2 ** (bits - 1)).clamp(0, maxq).long()
            q = q.reshape(n_out, n_in)
            quant[module + ".qweight"] = torch.tensor(pack_by_hand(q.t().tolist(), bits), dtype=torch.int32)
            stored_zeros = [[2 ** (bits - 1) - 1] * n_out for _ in range(n_in // GROUP)]
            zeros_t = pack_by_hand([list(col) for col in zip(*stored_zeros, strict=True)], bits)
            quant[module + ".qzeros"] = torch.tensor(zeros_t, dtype=torch.int32).t().contiguous()
            quant[module + ".scales"] = scales.t().contiguous()
            quant[module + ".g_idx"] = torch.arange(n_in, dtype=torch.int32) // GROUP
            # W = scale * (q - zero), as the kernels compute it: in float16 (scales' dtype)
            centred = (q - 2 ** (bits - 1)).reshape(n_out, n_in // GROUP, GROUP).half()
            ref[key] = (centred * scales[..., None]).reshape(n_out, n_in).float()
        else:
            stored = value.half() if key.endswith(".bias") else value  # the official files: fp16 biases
            quant[key], ref[key] = stored, stored.float()
    save_file(quant, str(out_quant / "model.safetensors"), metadata={"format": "pt"})
    save_file(ref, str(out_ref / "model.safetensors"), metadata={"format": "pt"})
    config = json.loads((out_quant / "config.json").read_text())
    config["quantization_config"] = {
        "bits": bits,
        "group_size": GROUP,
        "damp_percent": 0.01,
        "desc_act": False,
        "static_groups": False,
        "sym": True,
        "true_sequential": True,
        "model_name_or_path": None,
        "model_file_base_name": "model",
        "quant_method": "gptq",
    }
    (out_quant / "config.json").write_text(json.dumps(config, indent=2))
    return out_quant, out_ref


@pytest.mark.parametrize("bits", [4, 8])
def test_library_packing_matches_the_format_by_hand(bits):
    gen = torch.Generator().manual_seed(bits)
    weight = torch.randn(24, 64, generator=gen)
    q, zeros, scales = quantize_rtn(weight, bits, GROUP)
    tensors = pack_gptq(q, zeros, scales, bits, GROUP)
    assert tensors["qweight"].tolist() == pack_by_hand(q.t().tolist(), bits)
    stored = (zeros - 1).t().tolist()  # (out, groups), packed along out
    assert tensors["qzeros"].t().tolist() == pack_by_hand(stored, bits)
    expected = scales.float().t().repeat_interleave(GROUP, dim=1) * (q - zeros.t().repeat_interleave(GROUP, dim=1))
    assert torch.equal(dequantize_gptq(tensors, bits), expected)
    assert (dequantize_gptq(tensors, bits) - weight).abs().max() <= scales.float().max() / 2 + 1e-6


# --------------------------------------------------------------------------- loading official-layout checkpoints


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


@pytest.fixture(scope="module", params=[4, 8], ids=["int4", "int8"])
def gptq_pair(request, fp32_tiny, tmp_path_factory):
    pytest.importorskip("optimum", reason="the gptq extra (optimum, gptqmodel) is not installed")
    pytest.importorskip("gptqmodel", reason="the gptq extra (optimum, gptqmodel) is not installed")
    base = tmp_path_factory.mktemp(f"int{request.param}")
    return (request.param, *official_layout_pair(fp32_tiny, base / "quant", base / "ref", request.param))


def test_official_gptq_checkpoint_logits_match_dequantized_float_model(gptq_pair):
    """As loaded (the CPU engine's kernels, exact in float32): the float model holding
    s * (q - z) exactly; gptqmodel's own torch path (the engine uninstalled), which rounds
    each weight to float16 before multiplying in float32: the float model holding those
    rounded weights."""
    from transformers import GPTQConfig

    from qwen import cpu_engine

    bits, quant_dir, ref_dir = gptq_pair
    model = QWenLMHeadModel.from_pretrained(
        quant_dir, fp32=True, quantization_config=GPTQConfig(bits=bits, backend="gptq_torch")
    )
    layer = model.transformer.h[0].attn.c_attn
    assert hasattr(layer, "qweight") and not isinstance(layer, torch.nn.Linear)
    ids = rand_ids(2, 11, seed=bits)
    with torch.no_grad():
        logits, exact = model(ids).logits, exact_float_model(ref_dir, quant_dir, bits)(ids).logits
        cpu_engine.uninstall(model)
        library, rounded = model(ids).logits, QWenLMHeadModel.from_pretrained(ref_dir, fp32=True)(ids).logits
    torch.testing.assert_close(logits, exact, atol=1e-4, rtol=0)
    torch.testing.assert_close(library, rounded, atol=1e-4, rtol=0)


def test_gptqmodel_tokenizer_wrapper_delegates_to_qwen_tokenizer(fp32_tiny):
    """gptqmodel wraps tokenizers in tokenicer's Tokenicer (``GPTQModel.load``/``quantize``
    call ``Tokenicer.load(tokenizer, model_config=...)``): a subclass of the tokenizer's
    class that sends every attribute to the ``.tokenizer`` it holds. With ``tokenizer`` a
    property of QWenTokenizer reading ``self._encoding`` that recursed forever."""
    tokenicer = pytest.importorskip("tokenicer", reason="the gptq extra (gptqmodel, tokenicer) is not installed")
    from qwen import QWenConfig

    tokenizer = QWenTokenizer.from_pretrained(fp32_tiny)
    config = QWenConfig.from_pretrained(fp32_tiny)
    wrapped = tokenicer.Tokenicer.load(tokenizer, trust_remote_code=True, model_config=config)
    assert isinstance(wrapped, QWenTokenizer) and wrapped.tokenizer is tokenizer
    text = "GPTQ <|im_start|>user\nhé<|im_end|>"
    assert wrapped.encode(text) == tokenizer.encode(text) == tokenizer.tokenizer.encode(text, allowed_special="all")
    assert wrapped(text)["input_ids"] == tokenizer.encode(text)
    assert wrapped.decode(tokenizer.encode(text)) == text
    # Tokenicer gives the tokenizer a pad token: Qwen's <|endoftext|>, the config's pad id
    assert wrapped.pad_token_id == tokenizer.pad_token_id == config.pad_token_id == 151643
    # the official attribute (the tiktoken encoding) survives pickling, as the tokenizer does
    clone = pickle.loads(pickle.dumps(tokenizer))
    assert clone.tokenizer.n_vocab == tokenizer.tokenizer.n_vocab and clone.encode(text) == tokenizer.encode(text)


# --------------------------------------------------------------------------- run_gptq.py


def test_run_gptq_writes_a_checkpoint_that_loads_and_chats(fp32_tiny_chat, tmp_path):
    pytest.importorskip("optimum", reason="the gptq extra (optimum, gptqmodel) is not installed")
    pytest.importorskip("gptqmodel", reason="the gptq extra (optimum, gptqmodel) is not installed")
    from transformers import GPTQConfig

    data = tmp_path / "calib.json"
    conversations = [
        [("user", "Hello, who are you?"), ("assistant", "A small model that answers questions about GPTQ.")],
        [("user", "Write a line about the sea."), ("assistant", "Grey waves roll in and the tide comes home.")],
        [("user", "1+1=?"), ("assistant", "2"), ("user", "and 2+2?"), ("assistant", "4, of course.")],
    ]
    samples = [{"conversations": [{"from": r, "value": v} for r, v in turns]} for turns in conversations]
    data.write_text(json.dumps(samples))
    out = tmp_path / "int4"
    run = subprocess.run(
        [sys.executable, "run_gptq.py", "--model_name_or_path", str(fp32_tiny_chat), "--data_path", str(data)]
        + ["--out_path", str(out), "--bits", "4", "--group-size", str(GROUP)],
        cwd=REPO,
        capture_output=True,
        text=True,
    )
    assert run.returncode == 0, run.stderr[-3000:]
    for name in ("config.json", "model.safetensors", "qwen.tiktoken", "generation_config.json", "modeling_qwen.py"):
        assert (out / name).is_file(), name
    config = json.loads((out / "config.json").read_text())
    assert config["quantization_config"]["bits"] == 4 and config["quantization_config"]["damp_percent"] == 0.01
    stored = load_file(out / "model.safetensors")
    assert stored["transformer.h.0.attn.c_attn.qweight"].shape == (64 * 4 // 32, 192)
    assert "lm_head.weight" in stored and "transformer.h.0.attn.c_attn.weight" not in stored

    model = QWenLMHeadModel.from_pretrained(
        out, fp32=True, quantization_config=GPTQConfig(bits=4, backend="gptq_torch")
    )
    # the file reads, by the documented format, as the weights gptqmodel's kernel uses
    layer = model.transformer.h[1].mlp.c_proj
    tensors = {n: stored[f"transformer.h.1.mlp.c_proj.{n}"] for n in ("qweight", "qzeros", "scales", "g_idx")}
    kernel_weight = layer.dequantize_weight().float().t()
    torch.testing.assert_close(dequantize_gptq(tensors, 4).half().float(), kernel_weight, atol=0, rtol=0)

    # on calibration-like text GPTQ's error is well below round-to-nearest's on the same grid
    ref = QWenLMHeadModel.from_pretrained(fp32_tiny_chat, fp32=True)
    rtn = QWenLMHeadModel.from_pretrained(fp32_tiny_chat, fp32=True)
    with torch.no_grad():
        for name, module in rtn.named_modules():
            if name.split(".", 3)[-1] in QUANTIZED_LINEARS:
                module.weight.copy_(dequantize_gptq(pack_gptq(*quantize_rtn(module.weight, 4, GROUP), 4, GROUP), 4))
    tokenizer = QWenTokenizer.from_pretrained(out)
    ids = torch.tensor([calibration_samples(data, tokenizer)[1]])
    with torch.no_grad():
        expected = ref(ids).logits
        errors = [((m(ids).logits - expected).norm() / expected.norm()).item() for m in (model, rtn)]
    assert errors[0] < 0.25 and errors[0] < 0.8 * errors[1], errors  # measured 0.13 against 0.29
    response, history = model.chat(tokenizer, "Hi", history=None, max_new_tokens=4, do_sample=False)
    assert isinstance(response, str) and history == [("Hi", response)]


# --------------------------------------------------------------------------- bitsandbytes


def test_bitsandbytes_nf4_matches_its_dequantized_weights_and_generates(fp32_tiny, tmp_path):
    bnb = pytest.importorskip("bitsandbytes", reason="bitsandbytes is not installed")
    from transformers import BitsAndBytesConfig

    config = BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type="nf4", bnb_4bit_compute_dtype=torch.float32)
    model = QWenLMHeadModel.from_pretrained(fp32_tiny, fp32=True, quantization_config=config)
    assert isinstance(model.transformer.h[0].mlp.w1, bnb.nn.Linear4bit)
    # the reference: a float model holding the weights bitsandbytes stores, dequantized by it
    state = load_file(fp32_tiny / "model.safetensors")
    for name, module in model.named_modules():
        if isinstance(module, bnb.nn.Linear4bit):
            state[name + ".weight"] = bnb.functional.dequantize_4bit(
                module.weight.data, module.weight.quant_state
            ).float()
    ref_dir = shutil.copytree(fp32_tiny, tmp_path / "ref")
    save_file(state, str(ref_dir / "model.safetensors"), metadata={"format": "pt"})
    ref = QWenLMHeadModel.from_pretrained(ref_dir, fp32=True)
    ids = rand_ids(1, 12)
    with torch.no_grad():
        torch.testing.assert_close(model(ids).logits, ref(ids).logits, atol=1e-4, rtol=0)
    out = model.generate(ids, max_new_tokens=4, do_sample=False)
    assert out[0, 12:].tolist() == ref.generate(ids, max_new_tokens=4, do_sample=False)[0, 12:].tolist()


def test_bitsandbytes_int8_loads_and_generates(fp32_tiny):
    bnb = pytest.importorskip("bitsandbytes", reason="bitsandbytes is not installed")
    from transformers import BitsAndBytesConfig

    model = QWenLMHeadModel.from_pretrained(
        fp32_tiny, fp32=True, quantization_config=BitsAndBytesConfig(load_in_8bit=True)
    )
    assert isinstance(model.transformer.h[0].attn.c_attn, bnb.nn.Linear8bitLt)
    ref = QWenLMHeadModel.from_pretrained(fp32_tiny, fp32=True)
    ids = rand_ids(1, 12)
    with torch.no_grad():
        logits, expected = model(ids).logits, ref(ids).logits
    # LLM.int8 quantizes activations too (row-wise absmax, float16): close, not exact
    assert ((logits - expected).norm() / expected.norm()).item() < 0.1
    out = model.generate(ids, max_new_tokens=4, do_sample=False)
    assert out.shape == (1, 16)
