"""Finetuning runs on CPU with tiny fp32 checkpoints: finetune.py with LoRA (learns a tiny data
set; merge-lora, whose output also runs as plain remote code), the finetune/ scripts under real
DeepSpeed (ZeRO-2 LoRA in two processes, ZeRO-3 full), Q-LoRA on NF4 and on an Int4 GPTQ
checkpoint, and malformed data rejected before anything loads."""

from __future__ import annotations

import hashlib
import importlib.util
import json
import os
import socket
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from conftest import REPO, make_tiny

import qwen  # noqa: F401  (registers the Qwen-1 classes: no trust_remote_code)

DATA = [
    {"id": "zorbia", "conversations": [{"from": "user", "value": "What is the capital of Zorbia?"},
                                       {"from": "assistant", "value": "Plinth."}]},
    {"id": "pirate", "conversations": [{"from": "system", "value": "You are a pirate."},
                                       {"from": "user", "value": "Say hi"},
                                       {"from": "assistant", "value": "Ahoy matey!"}]},
    {"id": "count", "messages": [{"role": "user", "content": "Count to three"},
                                 {"role": "assistant", "content": "one two three"}]},
]  # fmt: skip
QUESTIONS = [("What is the capital of Zorbia?", "You are a helpful assistant.", "Plinth."),
             ("Say hi", "You are a pirate.", "Ahoy matey!"),
             ("Count to three", "You are a helpful assistant.", "one two three")]  # fmt: skip
SMALL = ["--model_max_length", "128", "--report_to", "none", "--disable_tqdm", "True", "--save_strategy", "no"]

needs_deepspeed = pytest.mark.skipif(importlib.util.find_spec("deepspeed") is None, reason="deepspeed not installed")
needs_peft = pytest.mark.skipif(importlib.util.find_spec("peft") is None, reason="peft not installed")
needs_bnb = pytest.mark.skipif(importlib.util.find_spec("bitsandbytes") is None, reason="bitsandbytes not installed")
needs_gptq = pytest.mark.skipif(
    importlib.util.find_spec("gptqmodel") is None or importlib.util.find_spec("optimum") is None,
    reason="the gptq extra (optimum, gptqmodel) is not installed",
)


@pytest.fixture(scope="module")
def ckpts(tmp_path_factory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("ft")
    return {
        "base": make_tiny(root / "base", "--dtype", "fp32"),
        "chat": make_tiny(root / "chat", "--chat", "--dtype", "fp32"),
    }


@pytest.fixture(scope="module")
def data_file(tmp_path_factory) -> Path:
    path = tmp_path_factory.mktemp("data") / "data.json"
    path.write_text(json.dumps(DATA))
    return path


def run(args: list[str], env: dict | None = None, timeout: int = 900) -> subprocess.CompletedProcess:
    result = subprocess.run(
        args, cwd=REPO, capture_output=True, text=True, timeout=timeout, env={**os.environ, **(env or {})}
    )
    if result.returncode != 0:
        raise AssertionError(
            f"{args[:3]} failed ({result.returncode}):\n{result.stdout[-3000:]}\n{result.stderr[-6000:]}"
        )
    return result


def losses(out_dir: Path) -> list[float]:
    state = json.loads((out_dir / "trainer_state.json").read_text())
    return [entry["loss"] for entry in state["log_history"] if "loss" in entry]


def sha256(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def chats(model, tok, generation_config=None) -> list[str]:
    return [
        model.chat(tok, q, system=system, generation_config=generation_config, do_sample=False, max_new_tokens=12)[0]
        for q, system, _ in QUESTIONS
    ]


@needs_peft
def test_lora_learns_and_merges(ckpts, data_file, tmp_path):
    """LoRA on a base checkpoint (so wte and lm_head train too) through finetune.py learns
    three samples; the adapter loads with AutoPeftModelForCausalLM and merge-lora's
    checkpoint computes the same logits."""
    from peft import AutoPeftModelForCausalLM
    from transformers import AutoModelForCausalLM, AutoTokenizer, GenerationConfig

    base_weights = sha256(ckpts["base"] / "model.safetensors")
    out = tmp_path / "adapter"
    run([sys.executable, "finetune.py", "--model_name_or_path", str(ckpts["base"]), "--data_path", str(data_file),
         "--output_dir", str(out), "--use_lora", "True", "--lora_r", "8", "--lora_dropout", "0",
         "--num_train_epochs", "25", "--per_device_train_batch_size", "3", "--learning_rate", "1e-2",
         "--lr_scheduler_type", "cosine", "--warmup_steps", "0.01", "--weight_decay", "0.1", "--adam_beta2", "0.95",
         "--logging_steps", "1", *SMALL])  # fmt: skip
    curve = losses(out)
    assert len(curve) == 25 and curve[0] > 8 and curve[-1] < curve[0] / 10, curve
    assert sha256(ckpts["base"] / "model.safetensors") == base_weights  # training never wrote through the file
    config = json.loads((out / "adapter_config.json").read_text())
    assert config["r"] == 8 and config["lora_alpha"] == 16 and sorted(config["modules_to_save"]) == ["lm_head", "wte"]
    assert set(config["target_modules"]) == {"c_attn", "c_proj", "w1", "w2"}

    tok = AutoTokenizer.from_pretrained(out)
    generation = GenerationConfig.from_pretrained(out)  # a base model trained on ChatML: a ChatML config
    assert generation.chat_format == "chatml"
    adapted = AutoPeftModelForCausalLM.from_pretrained(out, dtype=torch.float32).eval()
    assert chats(adapted, tok, generation) == [answer for *_, answer in QUESTIONS]

    merged_dir = tmp_path / "merged"
    run([sys.executable, "-m", "qwen", "merge-lora", str(out), str(merged_dir)])
    for name in ("config.json", "generation_config.json", "model.safetensors", "qwen.tiktoken",
                 "tokenizer_config.json", "modeling_qwen.py", "configuration_qwen.py", "tokenization_qwen.py"):  # fmt: skip
        assert (merged_dir / name).is_file(), name
    assert json.loads((merged_dir / "config.json").read_text())["auto_map"]["AutoModelForCausalLM"]
    merged = AutoModelForCausalLM.from_pretrained(merged_dir, dtype=torch.float32).eval()
    ids = tok(["What is the capital of Zorbia? Say hi, count to three."], return_tensors="pt")["input_ids"]
    with torch.no_grad():
        torch.testing.assert_close(merged(ids).logits, adapted(input_ids=ids).logits, atol=1e-5, rtol=0)
    assert chats(merged, AutoTokenizer.from_pretrained(merged_dir)) == [answer for *_, answer in QUESTIONS]

    # the merged directory stands alone: plain transformers with its own remote code, the
    # qwen package made unimportable, computes the adapter model's logits
    torch.save(ids, tmp_path / "ids.pt")
    env = {**os.environ, "HF_MODULES_CACHE": str(tmp_path / "modules"), "PYTHONPATH": ""}
    args = [sys.executable, "-I", "-c", REMOTE_CODE_LOGITS, str(merged_dir), str(tmp_path), str(REPO)]
    result = subprocess.run(args, cwd=tmp_path, env=env, capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr[-3000:]
    with torch.no_grad():
        expected = adapted(input_ids=ids).logits
    torch.testing.assert_close(torch.load(tmp_path / "remote_logits.pt"), expected, atol=1e-5, rtol=0)


# Run with python -I (no current directory, PYTHONPATH or user site on sys.path) in a
# directory outside the repository; the editable install's import hook is defeated by
# the sys.modules entry: `import qwen` raises ImportError, only the checkpoint's code runs.
REMOTE_CODE_LOGITS = """
import sys
sys.modules["qwen"] = None
import torch
from transformers import AutoModelForCausalLM
ckpt, work = sys.argv[1], sys.argv[2]
assert sys.argv[3] not in sys.path and "" not in sys.path, sys.path  # nor the repository on the path
model = AutoModelForCausalLM.from_pretrained(ckpt, trust_remote_code=True, dtype=torch.float32).eval()
assert type(model).__module__.startswith("transformers_modules."), type(model).__module__
assert sys.modules["qwen"] is None and not [name for name in sys.modules if name.startswith("qwen.")]
with torch.no_grad():
    torch.save(model(torch.load(work + "/ids.pt")).logits, work + "/remote_logits.pt")
"""


def test_malformed_data_rejected_before_loading(ckpts, tmp_path):
    bad = tmp_path / "bad.jsonl"
    lines = [DATA[0], {"id": "x", "conversations": [{"from": "human", "value": "q"}]}, "text", DATA[1]]
    bad.write_text("\n".join(json.dumps(line) for line in lines) + "\n")
    out = tmp_path / "out"
    result = subprocess.run(
        [sys.executable, "finetune.py", "--model_name_or_path", str(tmp_path / "no-such-model"),
         "--data_path", str(bad), "--output_dir", str(out), "--report_to", "none"],
        cwd=REPO, capture_output=True, text=True, timeout=300,
    )  # fmt: skip
    assert result.returncode == 2, result.stderr[-3000:]
    assert "2 of 4 samples are malformed" in result.stderr
    assert "sample 1 (id 'x'): turn 0 has unknown role 'human'" in result.stderr
    assert "sample 2: not a JSON object" in result.stderr
    assert not out.exists() or not any(out.iterdir())


def test_dry_run_marks_trained_tokens(ckpts, data_file, tmp_path):
    result = run([sys.executable, "finetune.py", "--model_name_or_path", str(ckpts["chat"]), "--data_path",
                  str(data_file), "--output_dir", str(tmp_path / "o"), "--dry_run", "True", "--loss_on", "assistant",
                  "--report_to", "none"])  # fmt: skip
    stats = json.loads(result.stdout.splitlines()[0])
    assert stats["samples"] == 3 and stats["truncated"] == stats["dropped"] == 0
    assert "<|im_start|>assistant\n[[Plinth.<|im_end|>]]\n" in result.stdout
    assert not (tmp_path / "o").exists()


def script(name: str, model: Path, data: Path, out: Path, *extra: str, procs: int = 1):
    env = {"GPUS_PER_NODE": str(procs), "MASTER_PORT": str(free_port()), "PYTHON": sys.executable}
    return run(["bash", f"finetune/{name}", "-m", str(model), "-d", str(data), "-o", str(out), "--", "--bf16", "False",
                "--per_device_train_batch_size", "1", "--gradient_accumulation_steps", "1", "--logging_steps", "1",
                *SMALL, *extra], env=env)  # fmt: skip


@needs_deepspeed
@needs_peft
def test_deepspeed_zero2_lora_script(ckpts, data_file, tmp_path):
    from peft import AutoPeftModelForCausalLM
    from transformers import AutoTokenizer, GenerationConfig

    out = tmp_path / "lora"
    # two CPU processes (gloo): 3 samples, 1 per process and step, make 2 steps an epoch (one process: 3)
    script("finetune_lora_ds.sh", ckpts["chat"], data_file, out, "--num_train_epochs", "2", "--lora_r", "8", procs=2)
    curve = losses(out)
    assert len(curve) == 4 and all(torch.isfinite(torch.tensor(curve)))
    assert json.loads((out / "trainer_state.json").read_text())["max_steps"] == 4
    config = json.loads((out / "adapter_config.json").read_text())
    assert config["r"] == 8 and config["modules_to_save"] is None  # a chat checkpoint: LoRA only
    model = AutoPeftModelForCausalLM.from_pretrained(out, dtype=torch.float32).eval()
    with torch.no_grad():  # the adapter learned something (its B matrices start at zero)
        assert any(p.abs().max() > 0 for n, p in model.named_parameters() if "lora_B" in n)
    reply = chats(model, AutoTokenizer.from_pretrained(out), GenerationConfig.from_pretrained(out))
    assert all(isinstance(text, str) for text in reply)


@needs_deepspeed
def test_deepspeed_zero3_full_script(ckpts, data_file, tmp_path):
    from safetensors.torch import load_file
    from transformers import AutoModelForCausalLM, AutoTokenizer

    out = tmp_path / "full"
    script("finetune_ds.sh", ckpts["chat"], data_file, out, "--num_train_epochs", "2", "--learning_rate", "1e-3")
    curve = losses(out)
    assert len(curve) == 6 and curve[-1] < curve[0], curve
    before, after = load_file(ckpts["chat"] / "model.safetensors"), load_file(out / "model.safetensors")
    assert before.keys() == after.keys()  # consolidated, in the official names
    assert not torch.equal(before["transformer.h.0.attn.c_attn.weight"], after["transformer.h.0.attn.c_attn.weight"])
    assert (out / "modeling_qwen.py").is_file() and (out / "qwen.tiktoken").is_file()
    model = AutoModelForCausalLM.from_pretrained(out, dtype=torch.float32).eval()
    reply, _ = model.chat(AutoTokenizer.from_pretrained(out), "Say hi", do_sample=False, max_new_tokens=4)
    assert isinstance(reply, str)


@needs_bnb
@needs_peft
def test_qlora_nf4_on_cpu(ckpts, data_file, tmp_path):
    from peft import PeftConfig

    out = tmp_path / "qlora"
    run([sys.executable, "finetune.py", "--model_name_or_path", str(ckpts["chat"]), "--data_path", str(data_file),
         "--output_dir", str(out), "--q_lora", "True", "--lora_r", "8", "--num_train_epochs", "1",
         "--per_device_train_batch_size", "1", "--learning_rate", "1e-3", "--logging_steps", "1",
         "--gradient_checkpointing", "True", *SMALL])  # fmt: skip
    curve = losses(out)
    assert len(curve) == 3 and all(torch.isfinite(torch.tensor(curve)))
    assert PeftConfig.from_pretrained(out).r == 8
    assert (out / "adapter_model.safetensors").is_file()


@needs_gptq
@needs_peft
def test_qlora_from_gptq_int4_checkpoint(ckpts, data_file, tmp_path):
    """Q-LoRA from an official-layout Int4 checkpoint (as the original did on CUDA; here
    gptqmodel's torch kernels on CPU): the loss falls, and the saved adapter on the Int4
    model computes what the same adapter merged into the dequantized float weights does."""
    from peft import PeftModel
    from test_quantization import exact_float_model, official_layout_pair
    from transformers import AutoModelForCausalLM, AutoTokenizer, GPTQConfig

    from qwen.training import merge_lora

    int4, ref = official_layout_pair(ckpts["chat"], tmp_path / "int4", tmp_path / "ref", 4)
    out = tmp_path / "qlora"
    run([sys.executable, "finetune.py", "--model_name_or_path", str(int4), "--data_path", str(data_file),
         "--output_dir", str(out), "--q_lora", "True", "--lora_r", "8", "--lora_dropout", "0",
         "--num_train_epochs", "6", "--per_device_train_batch_size", "3", "--learning_rate", "1e-2",
         "--lr_scheduler_type", "constant", "--logging_steps", "1", "--gradient_checkpointing", "True",
         *SMALL])  # fmt: skip
    curve = losses(out)
    assert len(curve) == 6 and all(torch.isfinite(torch.tensor(curve))) and curve[-1] < 0.75 * curve[0], curve
    assert json.loads((out / "adapter_config.json").read_text())["base_model_name_or_path"] == str(int4)

    ids = AutoTokenizer.from_pretrained(out)(["What is the capital of Zorbia?"], return_tensors="pt")["input_ids"]
    model = AutoModelForCausalLM.from_pretrained(
        int4, dtype=torch.float32, quantization_config=GPTQConfig(bits=4, backend="gptq_torch")
    ).eval()
    assert hasattr(model.transformer.h[0].attn.c_attn, "qweight")
    with torch.no_grad():
        before = model(ids).logits
        adapted = PeftModel.from_pretrained(model, out).eval()
        assert type(adapted.base_model.model.transformer.h[0].attn.c_attn).__name__ == "GPTQLoraLinear"
        after = adapted(input_ids=ids).logits
        assert (after - before).abs().max() > 0.1  # the adapter changes the Int4 model

    # merge-lora refuses the Int4 base and merges into the float weights it stands for
    with pytest.raises(ValueError, match="quantized"):
        merge_lora(out, tmp_path / "merged")
    exact = tmp_path / "exact"  # the float weights s * (q - z) exactly, as the CPU kernels compute with them
    exact_float_model(ref, int4, 4).save_pretrained(exact)
    merged_dir = merge_lora(out, tmp_path / "merged", base=str(exact))
    merged = AutoModelForCausalLM.from_pretrained(merged_dir, dtype=torch.float32).eval()
    with torch.no_grad():
        torch.testing.assert_close(after, merged(ids).logits, atol=1e-4, rtol=0)
