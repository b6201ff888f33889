"""Qwen2 export of GPTQ checkpoints (``python -m qwen convert-qwen2`` on -Int4/-Int8).

The sources are official-layout GPTQ checkpoints packed by hand (tests/test_quantization.py's
``official_layout_pair``), with the zero points of ``c_attn`` made to differ per output so
that a misplaced split of the packed ``qzeros`` changes the function. The reference is this
package's load of the source through the same gptqmodel kernel; the export is loaded by plain
transformers (``Qwen2ForCausalLM`` and its GPTQ integration, no remote code).
"""

from __future__ import annotations

import json

import pytest
import torch
from conftest import rand_ids
from safetensors.torch import load_file, save_file
from test_quantization import GROUP, official_layout_pair, pack_by_hand

from qwen import QWenLMHeadModel, cpu_engine
from qwen.convert import ConversionError, GPTQSettings, convert_qwen2, qwen2_gptq_parts

HIDDEN = 64  # the tiny model's hidden size: c_attn has 3 * HIDDEN outputs


def unpack_by_hand(words: list[list[int]], bits: int, along_columns: bool) -> list[list[int]]:
    """The integers in int32 ``words``, ``32 / bits`` per word, lowest bits first: packed
    along rows (qweight: word (r, c) holds rows r*per .. r*per+per-1 of column c) or along
    columns (qzeros: word (r, c) holds columns c*per ..)."""
    per, mask = 32 // bits, (1 << bits) - 1
    if along_columns:
        return [[(w & 0xFFFFFFFF) >> (bits * (o % per)) & mask for w in row for o in range(per)] for row in words]
    return [[(row[c] & 0xFFFFFFFF) >> (bits * j) & mask for c in range(len(row))] for row in words for j in range(per)]


def spread_c_attn_zeros(quant_dir, bits: int) -> list[list[list[int]]]:
    """Give every block's c_attn zero points that differ per output and group (stored values
    around the symmetric 2**(bits-1) - 1); returns the stored values (groups, out) per block."""
    path = quant_dir / "model.safetensors"
    state = load_file(path)
    gen = torch.Generator().manual_seed(bits)
    stored_per_layer = []
    for layer in range(2):
        key = f"transformer.h.{layer}.attn.c_attn.qzeros"
        groups = state[key].shape[0]
        stored = torch.randint(-3, 2, (groups, 3 * HIDDEN), generator=gen) + 2 ** (bits - 1) - 1
        packed = pack_by_hand(stored.t().tolist(), bits)  # packed along the outputs
        state[key] = torch.tensor(packed, dtype=torch.int32).t().contiguous()
        stored_per_layer.append(stored.tolist())
    save_file(state, str(path), metadata={"format": "pt"})
    return stored_per_layer


@pytest.fixture(scope="module", params=[4, 8], ids=["int4", "int8"])
def gptq_export(request, tiny_dir, tmp_path_factory):
    pytest.importorskip("optimum", reason="the gptq extra (optimum, gptqmodel) is not installed")
    pytest.importorskip("gptqmodel", reason="the gptq extra (optimum, gptqmodel) is not installed")
    bits = request.param
    base = tmp_path_factory.mktemp(f"export-int{bits}")
    quant_dir, _ = official_layout_pair(tiny_dir, base / "quant", base / "ref", bits)
    stored_zeros = spread_c_attn_zeros(quant_dir, bits)
    # the tokenizer export is the float export's (tests/test_convert.py); skipped here for time
    convert_qwen2(quant_dir, base / "qwen2", progress=False, tokenizer=False)
    return bits, quant_dir, base / "qwen2", stored_zeros


def test_gptq_export_logits_match_the_source_in_plain_transformers(gptq_export):
    from transformers import AutoModelForCausalLM, GPTQConfig, Qwen2ForCausalLM

    bits, quant_dir, dst, _ = gptq_export
    config = json.loads((dst / "config.json").read_text())
    source_config = json.loads((quant_dir / "config.json").read_text())
    assert config["model_type"] == "qwen2" and "auto_map" not in config and not list(dst.glob("*.py"))
    assert config["quantization_config"] == source_config["quantization_config"]
    stored = load_file(dst / "model.safetensors")
    assert stored["model.layers.0.self_attn.q_proj.qweight"].shape == (HIDDEN * bits // 32, HIDDEN)
    assert stored["model.layers.0.self_attn.v_proj.qzeros"].shape == (HIDDEN // GROUP, HIDDEN * bits // 32)
    assert stored["model.layers.1.mlp.gate_proj.scales"].dtype == torch.float16
    assert stored["model.layers.0.self_attn.k_proj.bias"].dtype == torch.float16

    backend = GPTQConfig(bits=bits, backend="gptq_torch")  # the same kernel for both
    ours = QWenLMHeadModel.from_pretrained(quant_dir, fp32=True, quantization_config=backend)
    cpu_engine.uninstall(ours)  # gptqmodel's own products, as plain transformers runs them
    theirs = AutoModelForCausalLM.from_pretrained(dst, dtype=torch.float32, quantization_config=backend)
    assert type(theirs) is Qwen2ForCausalLM
    for module in (theirs.model.layers[1].self_attn.k_proj, theirs.model.layers[1].mlp.gate_proj):
        assert hasattr(module, "qweight") and not isinstance(module, torch.nn.Linear)
    ids = rand_ids(2, 13, seed=bits)
    with torch.no_grad():
        expected, logits = ours(ids).logits, theirs(ids).logits
    torch.testing.assert_close(logits, expected, atol=1e-4, rtol=0)  # measured: equal


def test_gptq_export_splits_c_attn_along_outputs(gptq_export):
    """k_proj of block 0, unpacked by hand, holds outputs HIDDEN..2*HIDDEN of c_attn: its
    integers, its zero points (as spread_c_attn_zeros wrote them), scales, g_idx and bias."""
    bits, quant_dir, dst, stored_zeros = gptq_export
    source = load_file(quant_dir / "model.safetensors")
    out = load_file(dst / "model.safetensors")
    c_attn = {n: source[f"transformer.h.0.attn.c_attn.{n}"] for n in ("qweight", "scales", "g_idx", "bias")}
    k = {n: out[f"model.layers.0.self_attn.k_proj.{n}"] for n in ("qweight", "qzeros", "scales", "g_idx", "bias")}
    k_outputs = slice(HIDDEN, 2 * HIDDEN)

    zeros = unpack_by_hand(k["qzeros"].tolist(), bits, along_columns=True)
    assert zeros == [row[k_outputs] for row in stored_zeros[0]]
    q = unpack_by_hand(k["qweight"].tolist(), bits, along_columns=False)
    q_source = unpack_by_hand(c_attn["qweight"].tolist(), bits, along_columns=False)
    assert q == [row[k_outputs] for row in q_source]
    assert torch.equal(k["scales"], c_attn["scales"][:, k_outputs])
    assert torch.equal(k["g_idx"], c_attn["g_idx"])
    assert torch.equal(k["bias"], c_attn["bias"][k_outputs])
    # the MLP: Qwen-1 computes c_proj(w1(x) * silu(w2(x))), so w2 is the gate
    for qwen1, qwen2 in (("w2", "gate_proj"), ("w1", "up_proj"), ("c_proj", "down_proj")):
        assert torch.equal(out[f"model.layers.1.mlp.{qwen2}.qweight"], source[f"transformer.h.1.mlp.{qwen1}.qweight"])


def test_gptq_export_refuses_what_it_cannot_split(tmp_path, tiny_dir):
    gptq = GPTQSettings(bits=4, group_size=GROUP)
    # 14 packed columns: q, k and v would start inside an int32 word
    with pytest.raises(ConversionError, match="int32 boundaries"):
        qwen2_gptq_parts("transformer.h.0.attn.c_attn.qzeros", (2, 14), gptq)
    parts = qwen2_gptq_parts("transformer.h.3.attn.c_attn.qzeros", (2, 24), gptq)
    assert parts == [
        (f"model.layers.3.self_attn.{p}_proj.qzeros", (0, 2), (8 * i, 8 * (i + 1))) for i, p in enumerate("qkv")
    ]
    with pytest.raises(ConversionError, match="left unquantized"):
        qwen2_gptq_parts("transformer.h.0.mlp.w1.weight", (128, 64), gptq)

    config = json.loads((tiny_dir / "config.json").read_text())
    for settings, words in (
        ({"quant_method": "awq", "bits": 4, "group_size": 128}, r"quantized \(awq\).*only GPTQ"),
        ({"quant_method": "gptq", "bits": 3, "group_size": 128}, "bits=3"),
        ({"quant_method": "gptq", "bits": 4, "group_size": 128, "checkpoint_format": "gptq_v2"}, "gptq_v2"),
    ):
        src = tmp_path / settings["quant_method"] / str(settings["bits"])
        src.mkdir(parents=True)
        (src / "config.json").write_text(json.dumps({**config, "quantization_config": settings}))
        with pytest.raises(ConversionError, match=words):
            convert_qwen2(src, tmp_path / "dst", progress=False)
        assert not (tmp_path / "dst").exists()
