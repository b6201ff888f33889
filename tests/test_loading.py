"""Config keys, precision flags, weight formats, failure modes, remote code."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys

import pytest
import torch
from conftest import REPO, make_tiny
from safetensors.torch import load_file, save_file
from transformers import AutoConfig, AutoModel, AutoModelForCausalLM, AutoTokenizer

import qwen
from qwen import cpu_memory
from qwen.configuration_qwen import QWenConfig
from qwen.remote_code import MODEL_AUTO_MAP, write_remote_code


def copy_ckpt(src, dst):
    shutil.copytree(src, dst)
    return dst


# ----------------------------------------------------------------- config


def test_official_config_keys_load(tiny_dir):
    cfg = AutoConfig.from_pretrained(tiny_dir)
    assert isinstance(cfg, QWenConfig)
    raw = json.loads((tiny_dir / "config.json").read_text())
    for key in ("kv_channels", "seq_length", "rotary_emb_base", "use_dynamic_ntk", "use_logn_attn", "no_bias"):
        assert getattr(cfg, key) == raw[key]
    assert cfg.head_dim == cfg.kv_channels


def test_legacy_first_release_config(tmp_path, tiny_dir):
    """The first Qwen-7B release used GPT-2/Megatron names."""
    ckpt = copy_ckpt(tiny_dir, tmp_path / "legacy")
    raw = json.loads((ckpt / "config.json").read_text())
    legacy = {
        "n_embd": raw.pop("hidden_size"),
        "n_head": raw.pop("num_attention_heads"),
        "n_layer": raw.pop("num_hidden_layers"),
        "ffn_hidden_size": raw.pop("intermediate_size"),
        "padded_vocab_size": raw["vocab_size"],
        "n_positions": raw.pop("max_position_embeddings"),
        "attn_pdrop": 0.0,
        "embd_pdrop": 0.1,
        "resid_pdrop": 0.1,
        "params_dtype": "torch.float32",
        "activation": "swiglu",
        "pos_emb": "rotary",
        "apply_residual_connection_post_layernorm": False,
        "bias_dropout_fusion": True,
        "tokenizer_type": "QWenTokenizer",
    }
    raw.pop("attn_dropout_prob")
    raw.pop("emb_dropout_prob")
    (ckpt / "config.json").write_text(json.dumps(raw | legacy))
    cfg = AutoConfig.from_pretrained(ckpt)
    assert (cfg.hidden_size, cfg.num_attention_heads, cfg.num_hidden_layers) == (64, 4, 2)
    assert cfg.intermediate_size == 256 and cfg.emb_dropout_prob == 0.1 and cfg.fp32
    model = AutoModelForCausalLM.from_pretrained(ckpt).eval()
    ref = AutoModelForCausalLM.from_pretrained(tiny_dir, dtype=torch.float32).eval()
    ids = torch.arange(10)[None]
    with torch.no_grad():
        assert torch.equal(model(ids).logits, ref(ids).logits)


@pytest.mark.parametrize(
    "kwargs, words",
    [
        ({"bf16": True, "fp16": True}, ["bf16", "fp16"]),
        ({"hidden_size": 64, "num_attention_heads": 4, "kv_channels": 8}, ["hidden_size", "kv_channels"]),
        ({"intermediate_size": 255}, ["intermediate_size"]),
        ({"rotary_pct": 0.0}, ["rotary_pct"]),
        ({"use_flash_attn": "yes"}, ["use_flash_attn"]),
        ({"window_size": [4]}, ["window_size", "num_hidden_layers"]),
        ({"window_size": 0}, ["window_size"]),
        ({"n_embd": 128, "hidden_size": 64}, ["n_embd", "hidden_size"]),
        ({"activation": "gelu"}, ["activation"]),
        ({"num_attention_heads": 0}, ["num_attention_heads", "positive"]),
        ({"rotary_emb_base": -5}, ["rotary_emb_base"]),
        ({"layer_norm_epsilon": -1}, ["layer_norm_epsilon"]),
        ({"use_dynamic_ntk": "no"}, ["use_dynamic_ntk", "true or false"]),
        ({"bf16": "yes"}, ["bf16", "true or false"]),
    ],
)
def test_inconsistent_config_raises_naming_keys(kwargs, words):
    base = {"hidden_size": 64, "num_attention_heads": 4, "num_hidden_layers": 2, "intermediate_size": 256}
    with pytest.raises(ValueError) as err:
        QWenConfig(**(base | kwargs))
    for word in words:
        assert word in str(err.value)


# ----------------------------------------------------------------- precision


@pytest.mark.parametrize(
    "kwargs, dtype",
    [
        ({}, torch.float32),  # no CUDA here: fp32
        ({"bf16": True}, torch.bfloat16),
        ({"fp16": True}, torch.float16),
        ({"fp32": True}, torch.float32),
        ({"dtype": torch.bfloat16}, torch.bfloat16),
        ({"torch_dtype": torch.float16}, torch.float16),
        ({"dtype": "bfloat16"}, torch.bfloat16),
    ],
)
def test_precision_flags(tiny_dir, kwargs, dtype):
    model = AutoModelForCausalLM.from_pretrained(tiny_dir, **kwargs)
    assert model.dtype == dtype
    assert all(p.dtype == dtype for p in model.parameters())


def test_precision_flag_in_config_json(tmp_path, tiny_dir):
    ckpt = copy_ckpt(tiny_dir, tmp_path / "bf16")
    raw = json.loads((ckpt / "config.json").read_text())
    (ckpt / "config.json").write_text(json.dumps(raw | {"bf16": True}))
    assert AutoModelForCausalLM.from_pretrained(ckpt).dtype == torch.bfloat16
    with pytest.raises(ValueError, match="bf16 and fp16"):
        AutoModelForCausalLM.from_pretrained(ckpt, fp16=True)


def test_saved_checkpoint_keeps_choosing_its_dtype(tmp_path, tiny_dir):
    """A dtype chosen automatically (fp32 on a CPU) is not saved as a precision flag:
    the saved checkpoint reloads with any flag, and chooses again without one."""
    model = AutoModelForCausalLM.from_pretrained(tiny_dir)
    assert model.dtype == torch.float32
    model.save_pretrained(tmp_path / "saved")
    saved = json.loads((tmp_path / "saved" / "config.json").read_text())
    assert not any(saved.get(f) for f in ("bf16", "fp16", "fp32"))
    assert AutoModelForCausalLM.from_pretrained(tmp_path / "saved", bf16=True).dtype == torch.bfloat16
    # an explicit flag is the caller's choice and is kept
    flagged = AutoModelForCausalLM.from_pretrained(tiny_dir, fp16=True)
    flagged.save_pretrained(tmp_path / "fp16")
    assert json.loads((tmp_path / "fp16" / "config.json").read_text())["fp16"] is True


@pytest.mark.parametrize("key", ["dtype", "torch_dtype"])
def test_dtype_auto_is_the_stored_dtype(tmp_path, key):
    """``dtype="auto"`` means what it means in transformers: the checkpoint's own dtype
    (its precision flag, config dtype or safetensors tensors), not float32."""
    for stored, expected in (("bf16", torch.bfloat16), ("fp32", torch.float32)):
        ckpt = make_tiny(tmp_path / f"{key}-{stored}", "--dtype", stored, "--layers", "1")
        assert AutoModelForCausalLM.from_pretrained(ckpt, **{key: "auto"}).dtype == expected


def test_official_readme_kwargs(tiny_dir):
    """The official README passes pad_token_id (and precision flags) to from_pretrained."""
    model = AutoModelForCausalLM.from_pretrained(tiny_dir, pad_token_id=151643, fp32=True)
    assert model.config.pad_token_id == 151643


def test_contradicting_flag_and_dtype(tiny_dir):
    with pytest.raises(ValueError, match="contradicts"):
        qwen.QWenLMHeadModel.from_pretrained(tiny_dir, bf16=True, dtype=torch.float16)


def test_bf16_load_keeps_bf16_values(tiny_dir):
    """Loading in bf16 gives exactly the stored bf16 tensors (no float32 round trip)."""
    stored = load_file(str(tiny_dir / "model.safetensors"))
    model = AutoModelForCausalLM.from_pretrained(tiny_dir, bf16=True)
    state = model.state_dict()
    for name, tensor in stored.items():
        assert torch.equal(state[name], tensor), name


def _smaps() -> list[tuple[int, int, str, dict[str, str]]]:
    """This process's memory mappings from /proc/self/smaps: start, end, path ("" for
    anonymous memory) and the fields (``Rss``, ``THPeligible``, ...) as text."""
    mappings = []
    with open("/proc/self/smaps") as f:
        for line in f:
            head = line.split()
            if head and "-" in head[0] and len(head) >= 5 and ":" in head[3]:  # a mapping's header line
                start, end = (int(x, 16) for x in head[0].split("-"))
                mappings.append((start, end, head[5] if len(head) > 5 else "", {}))
            elif mappings and ":" in line:
                key, value = line.split(":", 1)
                mappings[-1][3][key] = value.strip()
    return mappings


def _mapped_bytes(path) -> int:
    """Resident bytes of this process's memory mappings of ``path``."""
    return sum(int(fields["Rss"].split()[0]) * 1024 for _, _, name, fields in _smaps() if name == str(path))


def _mapping_of(address: int) -> tuple[str, dict[str, str]]:
    """The path (or "" for anonymous memory) and smaps fields of the mapping holding ``address``."""
    found = [(path, fields) for start, end, path, fields in _smaps() if start <= address < end]
    assert found, hex(address)
    return found[0]


@pytest.mark.skipif(not os.path.exists("/proc/self/smaps"), reason="needs Linux /proc/self/smaps")
def test_memory_mapped_weights_are_mapped_at_load(tmp_path, monkeypatch):
    """Without huge pages, from_pretrained maps the weights file in, so the first forward
    does not page-fault it in; all but the input embedding table, of which a forward reads
    a few rows."""
    monkeypatch.setenv("QWEN_HUGE_PAGES", "0")
    ckpt = make_tiny(tmp_path / "bf16", "--dtype", "bf16")
    weights = (ckpt / "model.safetensors").resolve()
    model = AutoModelForCausalLM.from_pretrained(ckpt, bf16=True)
    assert _mapping_of(model.lm_head.weight.data_ptr())[0] == str(weights)
    table = model.get_input_embeddings().weight
    table_bytes = table.numel() * table.element_size()
    assert table_bytes < weights.stat().st_size / 2  # untied: lm_head is as large
    mapped = _mapped_bytes(weights)
    assert 0.95 * (weights.stat().st_size - table_bytes) <= mapped <= weights.stat().st_size - table_bytes / 2
    del model


@pytest.mark.skipif(not cpu_memory._transparent_huge_pages(), reason="needs Linux transparent huge pages")
@pytest.mark.parametrize("tied", [False, True])
def test_weights_move_to_huge_pages(tmp_path, monkeypatch, tied):
    """With transparent huge pages, every weight a forward reads in full moves out of the
    file mapping into anonymous memory advised for huge pages, values unchanged, and
    the file pages it was copied from leave the process's resident set. The untied input
    embedding table stays mapped from the file, untouched."""
    ckpt = make_tiny(tmp_path / "ckpt", "--dtype", "bf16", *(["--tie-word-embeddings"] if tied else []))
    weights = (ckpt / "model.safetensors").resolve()
    model = AutoModelForCausalLM.from_pretrained(ckpt, bf16=True)
    table = model.get_input_embeddings().weight
    moved = sum(p.numel() * p.element_size() for p in model.parameters() if p is not table or tied)
    assert _mapped_bytes(weights) < 0.05 * moved  # (measured before anything else maps the file)
    stored = load_file(str(weights))
    for name, param in model.named_parameters():
        assert torch.equal(param, stored[name]), name
        path, fields = _mapping_of(param.data_ptr())
        if param is table and not tied:
            assert path == str(weights)
            continue
        assert path == "", (name, path)
        nbytes = param.numel() * param.element_size()
        assert param.untyped_storage().nbytes() == nbytes, name  # its own storage, its size (torch.save, safetensors)
        if nbytes >= 2**21:  # room for a huge page: it starts on one, and (Linux 5.0+ says) may have them
            assert param.data_ptr() % 2**21 == 0, name
            assert fields.get("THPeligible", "1") == "1", name
    assert tied == (model.lm_head.weight.data_ptr() == table.data_ptr())
    ids = torch.arange(12)[None]
    monkeypatch.setenv("QWEN_HUGE_PAGES", "0")
    mapped = AutoModelForCausalLM.from_pretrained(ckpt, bf16=True)
    assert _mapping_of(mapped.lm_head.weight.data_ptr())[0] == str(weights)
    with torch.no_grad():
        assert torch.equal(model(ids).logits, mapped(ids).logits)


@pytest.mark.skipif(not cpu_memory._transparent_huge_pages(), reason="needs Linux transparent huge pages")
def test_huge_pages_keep_changes_made_in_the_file_mapping(tmp_path, monkeypatch):
    """Weights changed in place in a private file mapping live only in this process: the
    move must not release those pages (another model still reads them)."""
    ckpt = make_tiny(tmp_path / "ckpt", "--dtype", "bf16")
    monkeypatch.setenv("QWEN_HUGE_PAGES", "0")
    patched = AutoModelForCausalLM.from_pretrained(ckpt, bf16=True)
    with torch.no_grad():
        patched.lm_head.weight.mul_(2)
    expected = patched.lm_head.weight.clone()
    monkeypatch.setenv("QWEN_HUGE_PAGES", "1")
    again = qwen.QWenLMHeadModel.from_pretrained(None, config=patched.config, state_dict=patched.state_dict())
    assert _mapping_of(again.lm_head.weight.data_ptr())[0] == ""  # moved
    assert torch.equal(again.lm_head.weight, expected)
    assert torch.equal(patched.lm_head.weight, expected)  # not reverted to the file's bytes


@pytest.mark.skipif(not cpu_memory._transparent_huge_pages(), reason="needs Linux transparent huge pages")
def test_huge_pages_release_the_file_pages_around_a_written_one(tmp_path, monkeypatch):
    """A page written in the private file mapping (gptqmodel rewrites GPTQ zero points in
    place as it loads) stays; the mapping's other pages are released as the weights move
    (before, one written page kept the whole file resident beside the copies)."""
    ckpt = make_tiny(tmp_path / "ckpt", "--dtype", "bf16")
    weights = (ckpt / "model.safetensors").resolve()
    monkeypatch.setenv("QWEN_HUGE_PAGES", "0")
    model = AutoModelForCausalLM.from_pretrained(ckpt, bf16=True)
    head = model.lm_head.weight
    assert _mapping_of(head.data_ptr())[0] == str(weights)
    old = head.data  # the file mapping's bytes, still readable through this view after the move
    row = 4 * 4096 // (head.shape[1] * head.element_size())  # a row in a page wholly inside the weight
    with torch.no_grad():
        old[row, 0] = 3.0  # that page written
    expected = old.clone()
    before = _mapped_bytes(weights)
    monkeypatch.setenv("QWEN_HUGE_PAGES", "1")
    assert cpu_memory.huge_page_weights(model) > 0
    assert _mapped_bytes(weights) < 0.05 * before  # (measured before anything reads the old pages)
    assert _mapping_of(model.lm_head.weight.data_ptr())[0] == ""
    assert torch.equal(model.lm_head.weight, expected)
    assert old[row, 0] == 3.0 and torch.equal(old, expected)  # the written page kept, the others from the file


@pytest.mark.skipif(not cpu_memory._transparent_huge_pages(), reason="needs Linux transparent huge pages")
def test_huge_pages_refused_midway_leaves_a_working_model(tmp_path, monkeypatch, caplog):
    """No anonymous memory for a copy (say, a strict overcommit limit) is not an error:
    the weights not yet moved stay mapped from the file, and the model computes the same."""
    ckpt = make_tiny(tmp_path / "ckpt", "--dtype", "bf16")
    monkeypatch.setenv("QWEN_HUGE_PAGES", "0")
    mapped = AutoModelForCausalLM.from_pretrained(ckpt, bf16=True)
    monkeypatch.setenv("QWEN_HUGE_PAGES", "1")
    real, calls = cpu_memory.huge_page_empty_like, []

    def refuse_after_three(like):
        calls.append(like.shape)
        if len(calls) > 3:
            raise OSError(12, "Cannot allocate memory")
        return real(like)

    monkeypatch.setattr(cpu_memory, "huge_page_empty_like", refuse_after_three)
    with caplog.at_level("WARNING", logger="qwen.cpu_memory"):
        model = AutoModelForCausalLM.from_pretrained(ckpt, bf16=True)
    assert "weights left in place" in caplog.text
    weights = str((ckpt / "model.safetensors").resolve())
    places = [_mapping_of(p.data_ptr())[0] for p in model.parameters()]
    assert places.count("") == 3 and places.count(weights) == len(places) - 3
    ids = torch.arange(12)[None]
    with torch.no_grad():
        assert torch.equal(model(ids).logits, mapped(ids).logits)


# ----------------------------------------------------------------- weights


def test_save_load_round_trip_is_bit_exact(tmp_path, tiny_dir):
    model = AutoModelForCausalLM.from_pretrained(tiny_dir, dtype=torch.float32).eval()
    model.save_pretrained(tmp_path / "saved")
    again = AutoModelForCausalLM.from_pretrained(tmp_path / "saved").eval()
    assert again.dtype == torch.float32
    for (n, a), (_, b) in zip(model.state_dict().items(), again.state_dict().items(), strict=True):
        assert torch.equal(a, b), n
    ids = torch.arange(20)[None]
    with torch.no_grad():
        assert torch.equal(model(ids).logits, again(ids).logits)


def _shard(state, ckpt, fmt):
    names = sorted(state)
    shards = [names[: len(names) // 2], names[len(names) // 2 :]]
    weight_map = {}
    for i, shard in enumerate(shards, 1):
        if fmt == "safetensors":
            fname = f"model-{i:05d}-of-00002.safetensors"
            save_file({n: state[n] for n in shard}, str(ckpt / fname), metadata={"format": "pt"})
        else:
            fname = f"pytorch_model-{i:05d}-of-00002.bin"
            torch.save({n: state[n] for n in shard}, ckpt / fname)
        weight_map |= dict.fromkeys(shard, fname)
    index = "model.safetensors.index.json" if fmt == "safetensors" else "pytorch_model.bin.index.json"
    (ckpt / index).write_text(json.dumps({"metadata": {"total_size": 0}, "weight_map": weight_map}))


@pytest.mark.parametrize("fmt", ["safetensors", "bin"])
def test_sharded_checkpoints_load(tmp_path, tiny_dir, fmt):
    ckpt = copy_ckpt(tiny_dir, tmp_path / fmt)
    state = load_file(str(ckpt / "model.safetensors"))
    os.remove(ckpt / "model.safetensors")
    _shard(state, ckpt, fmt)
    model = AutoModelForCausalLM.from_pretrained(ckpt, bf16=True)
    for name, tensor in state.items():
        assert torch.equal(model.state_dict()[name], tensor), name


def test_missing_weights_fail_loudly(tmp_path, tiny_dir):
    ckpt = copy_ckpt(tiny_dir, tmp_path / "missing")
    state = load_file(str(ckpt / "model.safetensors"))
    del state["transformer.h.1.mlp.w1.weight"]
    state["transformer.h.0.attn.rotary.extra"] = torch.zeros(2)
    save_file(state, str(ckpt / "model.safetensors"), metadata={"format": "pt"})
    with pytest.raises(ValueError) as err:
        AutoModelForCausalLM.from_pretrained(ckpt)
    assert "transformer.h.1.mlp.w1.weight" in str(err.value)
    assert "transformer.h.0.attn.rotary.extra" in str(err.value)
    # the base model (AutoModel) checks as strictly, and takes the precision flags
    with pytest.raises(ValueError, match=r"h\.1\.mlp\.w1\.weight"):
        AutoModel.from_pretrained(ckpt)
    base = AutoModel.from_pretrained(tiny_dir, fp16=True)  # lm_head.weight is expected there
    assert type(base) is qwen.QWenModel and base.dtype == torch.float16
    full = AutoModelForCausalLM.from_pretrained(tiny_dir, fp16=True)
    assert torch.equal(base.h[1].mlp.w1.weight, full.transformer.h[1].mlp.w1.weight)


def test_tied_embeddings(tmp_path):
    from conftest import make_tiny

    ckpt = make_tiny(tmp_path / "tied", "--tie-word-embeddings")
    model = AutoModelForCausalLM.from_pretrained(ckpt)
    assert model.lm_head.weight.data_ptr() == model.transformer.wte.weight.data_ptr()


# ----------------------------------------------------------------- tiny + remote code


def test_tiny_checkpoint_layout(tiny_chat_dir):
    files = {p.name for p in tiny_chat_dir.iterdir()}
    assert {
        "config.json",
        "generation_config.json",
        "model.safetensors",
        "qwen.tiktoken",
        "tokenizer_config.json",
    } <= files
    gen = json.loads((tiny_chat_dir / "generation_config.json").read_text())
    assert gen["chat_format"] == "chatml"
    assert type(AutoTokenizer.from_pretrained(tiny_chat_dir)) is qwen.QWenTokenizer


def test_cli_help():
    out = subprocess.run([sys.executable, "-m", "qwen", "--help"], capture_output=True, text=True, cwd=REPO)
    assert out.returncode == 0 and "tiny" in out.stdout and "update-remote-code" in out.stdout
    out = subprocess.run(
        [sys.executable, "-m", "qwen", "update-remote-code", "/nonexistent"], capture_output=True, text=True
    )
    assert out.returncode == 2 and "config.json" in out.stderr


REMOTE_SCRIPT = """
import sys, torch, json
from transformers import AutoModelForCausalLM, AutoTokenizer
path = sys.argv[1]
model = AutoModelForCausalLM.from_pretrained(path, trust_remote_code=True, dtype=torch.float32).eval()
tok = AutoTokenizer.from_pretrained(path, trust_remote_code=True)
assert "qwen" not in sys.modules, "the package itself must not be imported"
ids = tok("Hello, world! 你好")["input_ids"]
with torch.no_grad():
    logits = model(torch.tensor([ids])).logits
print(json.dumps({"module": type(model).__module__, "ids": ids, "logits": logits[0, -1, :8].tolist()}))
"""


def test_update_remote_code(tmp_path, tiny_dir):
    ckpt = copy_ckpt(tiny_dir, tmp_path / "remote")
    (ckpt / "modeling_qwen.py").write_text("# the old official file\n")
    out = subprocess.run(
        [sys.executable, "-m", "qwen", "update-remote-code", str(ckpt)],
        capture_output=True,
        text=True,
        cwd=REPO,
        check=True,
    )
    backups = list(ckpt.glob("remote_code_backup-*"))
    assert len(backups) == 1 and "previous files kept" in out.stdout
    assert (backups[0] / "modeling_qwen.py").read_text() == "# the old official file\n"
    assert (ckpt / "modeling_qwen.py").read_text() == (REPO / "qwen" / "modeling_qwen.py").read_text()
    assert json.loads((ckpt / "config.json").read_text())["auto_map"]["AutoModelForCausalLM"] == (
        "modeling_qwen.QWenLMHeadModel"
    )
    # Load with trust_remote_code in a process that never imports the package.
    env = dict(os.environ, HF_HUB_OFFLINE="1", PYTHONPATH="")
    run = subprocess.run(
        [sys.executable, "-c", REMOTE_SCRIPT, str(ckpt)], capture_output=True, text=True, cwd=tmp_path, env=env
    )
    assert run.returncode == 0, run.stderr[-3000:]
    remote = json.loads(run.stdout.strip().splitlines()[-1])
    assert remote["module"].startswith("transformers_modules")
    model = AutoModelForCausalLM.from_pretrained(tiny_dir, dtype=torch.float32).eval()
    tok = AutoTokenizer.from_pretrained(tiny_dir)
    ids = tok("Hello, world! 你好")["input_ids"]
    assert remote["ids"] == ids
    with torch.no_grad():
        expected = model(torch.tensor([ids])).logits[0, -1, :8]
    assert torch.allclose(torch.tensor(remote["logits"]), expected, atol=1e-6)


def test_update_remote_code_replaces_links_not_their_targets(tmp_path, tiny_dir):
    # A Hugging Face cache snapshot: its files are links into a shared blobs/ directory.
    blobs, ckpt = tmp_path / "blobs", copy_ckpt(tiny_dir, tmp_path / "snapshot")
    blobs.mkdir()
    config = {k: v for k, v in json.loads((ckpt / "config.json").read_text()).items() if k != "auto_map"}
    originals = {"config.json": json.dumps(config), "modeling_qwen.py": "# the old official file\n"}
    for name, text in originals.items():
        (blobs / name).write_text(text)
        (ckpt / name).unlink(missing_ok=True)
        (ckpt / name).symlink_to(blobs / name)
    (blobs / "modeling_qwen.py").chmod(0o600)
    (ckpt / "cpu_kernels.py").unlink(missing_ok=True)
    umask = os.umask(0o022)
    try:
        backup = write_remote_code(ckpt)
    finally:
        os.umask(umask)
    assert (ckpt / "modeling_qwen.py").stat().st_mode & 0o777 == 0o600  # the replaced file's mode kept
    assert (ckpt / "cpu_kernels.py").stat().st_mode & 0o777 == 0o644  # a new file: 0o666 less the umask
    for name, text in originals.items():
        assert (blobs / name).read_text() == text, f"{name}: the link's target was written through"
        assert not (ckpt / name).is_symlink() and (backup / name).read_text() == text
    assert (ckpt / "modeling_qwen.py").read_text() == (REPO / "qwen" / "modeling_qwen.py").read_text()
    assert json.loads((ckpt / "config.json").read_text())["auto_map"] == MODEL_AUTO_MAP
    assert not list(ckpt.glob(".*.tmp"))


def test_flash_attention_falls_back_with_notice(tiny_dir, caplog):
    caplog.set_level("INFO", logger="qwen.loading")
    model = AutoModelForCausalLM.from_pretrained(tiny_dir, use_flash_attn=True)
    assert model.config._attn_implementation == "sdpa"
    assert "using SDPA attention because" in caplog.text
    assert "CUDA is not available" in caplog.text
    eager = AutoModelForCausalLM.from_pretrained(tiny_dir, use_flash_attn=True, attn_implementation="eager")
    assert eager.config._attn_implementation == "eager"


def test_tiny_rejects_bad_shape(tmp_path):
    out = subprocess.run(
        [sys.executable, "-m", "qwen", "tiny", str(tmp_path / "bad"), "--hidden", "65", "--heads", "4"],
        capture_output=True,
        text=True,
        cwd=REPO,
    )
    assert out.returncode == 2 and "not divisible" in out.stderr and "Traceback" not in out.stderr
