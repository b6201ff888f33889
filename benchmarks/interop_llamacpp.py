"""llama.cpp interop: Qwen2 export -> GGUF -> llama.cpp, compared with this package.

Phases (each contender runs in a fresh process; every result is one JSON line):

  exactness  a tiny, decisive (init_std 0.1) fp32 checkpoint: export, convert to an f32
             GGUF with llama.cpp's own convert_hf_to_gguf.py, greedy-decode in llama.cpp
             and in QWenLMHeadModel, compare the tokens and the teacher-forced logits.
  tokenizer  llama.cpp's tokenizer (read from the GGUF) against QWenTokenizer on a
             multilingual corpus.
  speed      the Qwen-1.8B-shaped random checkpoint of benchmarks/decode.py
             (~/.cache/qwen-bench/qwen-1.8b-random, made if missing): export, bf16 and f16
             GGUFs, then rounds (order rotating) of llama.cpp on each GGUF and
             QWenLMHeadModel (bf16), greedy decoding on the same ChatML prompt: decode
             tokens/s side by side (median and best), the tokens, and a teacher-forced
             comparison of the logits on this package's sequence.

llama.cpp comes from the llama-cpp-python source distribution on PyPI (its
vendor/llama.cpp holds convert_hf_to_gguf.py and gguf-py)::

    mkdir -p ~/.cache/qwen-bench/llamacpp && cd ~/.cache/qwen-bench/llamacpp
    pip download --no-binary :all: --no-deps llama-cpp-python && tar xzf llama_cpp_python-*.tar.gz
    python -m venv --system-site-packages venv
    venv/bin/pip install scikit-build-core diskcache sentencepiece   # sentencepiece: convert_hf_to_gguf.py
    CMAKE_ARGS="-DGGML_NATIVE=ON -DLLAVA_BUILD=OFF" CMAKE_BUILD_PARALLEL_LEVEL=2 \\
        venv/bin/pip install --no-deps --no-build-isolation ./llama_cpp_python-*/

    python benchmarks/interop_llamacpp.py

Not run in CI. On a shared machine the timings are noisy: compare medians (and bests) of the same run.
"""

from __future__ import annotations

import argparse
import glob
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))
from decode import peak_rss_gib, timed_generate  # noqa: E402  (benchmarks/decode.py)

REPO = HERE.parent
CACHE = Path(os.environ.get("QWEN_BENCH_DIR", Path.home() / ".cache" / "qwen-bench"))
LLAMACPP = CACHE / "llamacpp"
END_IDS = (151643, 151645)
PROMPT = "Give me a short introduction to large language models."
CORPUS = [
    "Hello, world! The quick brown fox jumps over the lazy dog.",
    "通义千问是阿里云研发的大语言模型。我们今天去北京，好吗？",
    "東京は日本の首都です。カタカナとひらがな、漢字を混ぜる。",
    "Съешь же ещё этих мягких французских булок, да выпей чаю.",
    "مرحبا بالعالم، هذه جملة باللغة العربية.",
    "emoji: 😀👍🏽 👨‍👩‍👧‍👦 🇨🇳🇺🇸",
    "def f(x):\r\n\tif x > 1:\r\n\t\treturn x ** 2\t# comment\r\n\treturn 0\n\n\n",
    "digits 1234567890 3.14159 -42 ０１２３",
    "<|im_start|>user\nhi<|im_end|>\n<|im_start|>assistant\n",
    "decomposed e\u0301 (NFC gives é)",
]


# --------------------------------------------------------------------------- workers


def worker_convert(job: dict) -> dict:
    sys.path.insert(0, str(REPO))
    from qwen.convert import convert_qwen2

    t0 = time.perf_counter()
    convert_qwen2(job["src"], job["dst"], dtype=job.get("dtype"), force=True, progress=False)
    return {"convert_s": round(time.perf_counter() - t0, 2), "convert_peak_rss_gib": round(peak_rss_gib(), 3)}


def worker_llama(job: dict) -> dict:
    """Greedy decoding (argmax, no penalties) in llama.cpp, timed per token."""
    import numpy as np
    from llama_cpp import Llama, llama_get_logits_ith

    prompt, new = job["prompt"], job["new_tokens"]
    t0 = time.perf_counter()
    llm = Llama(
        model_path=job["gguf"],
        n_ctx=len(prompt) + new + 8,
        n_batch=512,
        n_threads=job["threads"],
        n_threads_batch=job["threads"],
        n_gpu_layers=0,
        logits_all=False,
        verbose=False,
    )
    load_s = time.perf_counter() - t0
    n_vocab = llm.n_vocab()

    def last_argmax() -> int:
        return int(np.argmax(np.ctypeslib.as_array(llama_get_logits_ith(llm.ctx, -1), shape=(n_vocab,))))

    start = time.perf_counter()
    llm.eval(prompt)
    token = last_argmax()
    times = [time.perf_counter()]
    tokens = [token]
    while len(tokens) < new and token not in END_IDS:
        llm.eval([token])
        token = last_argmax()
        tokens.append(token)
        times.append(time.perf_counter())
    keys = ("general.architecture", "tokenizer.ggml.pre", "tokenizer.ggml.eos_token_id", "qwen2.context_length")
    out = {
        "contender": "llama.cpp",
        "gguf_metadata": {key: llm.metadata.get(key) for key in keys},
        "gguf_chat_template": llm.metadata.get("tokenizer.chat_template"),
        "load_s": round(load_s, 2),
        "ttft_s": round(times[0] - start, 3),
        "decode_tok_s": round((len(times) - 1) / (times[-1] - times[0]), 3) if len(times) > 1 else None,
        "peak_rss_gib": round(peak_rss_gib(), 3),
        "tokens": tokens,
    }
    if job.get("teacher"):
        # Logits at every position of a given sequence (logits_all), for the comparison.
        del llm
        llm = Llama(
            model_path=job["gguf"],
            n_ctx=len(job["teacher"]) + 8,
            n_threads=job["threads"],
            n_threads_batch=job["threads"],
            logits_all=True,
            verbose=False,
        )
        llm.eval(job["teacher"][:-1])
        np.save(job["logits_out"], np.asarray(llm.scores[len(prompt) - 1 : len(job["teacher"]) - 1], dtype=np.float32))
    if job.get("corpus"):
        out["corpus_ids"] = [llm.tokenize(text.encode("utf-8"), add_bos=False, special=True) for text in job["corpus"]]
    return out


def worker_qwen(job: dict) -> dict:
    """Greedy decoding in this package's QWenLMHeadModel, timed per token."""
    sys.path.insert(0, str(REPO))
    import numpy as np
    import torch
    from transformers import AutoModelForCausalLM

    import qwen  # noqa: F401  (registers model_type "qwen")

    torch.set_num_threads(job["threads"])
    dtype = {"bf16": torch.bfloat16, "fp32": torch.float32}[job["dtype"]]
    t0 = time.perf_counter()
    model = AutoModelForCausalLM.from_pretrained(job["ckpt"], dtype=dtype).eval()
    load_s = time.perf_counter() - t0
    ids = torch.tensor([job["prompt"]])
    seq, ttft, decode = timed_generate(
        model,
        ids,
        repetition_penalty=1.0,
        max_new_tokens=job["new_tokens"],
        eos_token_id=list(END_IDS),
        pad_token_id=END_IDS[0],
    )
    tokens = seq[0, ids.shape[1] :].tolist()
    # put() #0 is the prompt, #1 the first new token, then one per decoded token.
    out = {
        "contender": "qwen",
        "load_s": round(load_s, 2),
        "ttft_s": round(ttft, 3),
        "decode_tok_s": None if decode is None else round(decode, 3),
        "peak_rss_gib": round(peak_rss_gib(), 3),
        "tokens": tokens,
    }
    if job.get("logits_out"):
        with torch.inference_mode():
            logits = model(seq).logits[0, len(job["prompt"]) - 1 : -1].float().numpy()
        np.save(job["logits_out"], logits)
        out["sequence"] = seq[0].tolist()
    return out


WORKERS = {"convert": worker_convert, "llama": worker_llama, "qwen": worker_qwen}


def run_worker(python: str, name: str, job: dict) -> dict:
    with tempfile.NamedTemporaryFile("w", suffix=".json", delete=False) as handle:
        json.dump(job, handle)
    try:
        proc = subprocess.run(
            [python, __file__, "--worker", name, "--job", handle.name], capture_output=True, text=True, cwd=REPO
        )
    finally:
        os.unlink(handle.name)
    if proc.returncode != 0:
        raise RuntimeError(f"worker {name} failed:\n{proc.stderr[-4000:]}")
    return json.loads(proc.stdout.strip().splitlines()[-1])


# --------------------------------------------------------------------------- steps


def to_gguf(python: str, llama_dir: Path, export: Path, out: Path, outtype: str) -> dict:
    if out.exists():
        return {"gguf": str(out), "gguf_gb": round(out.stat().st_size / 1e9, 3), "reused": True}
    env = dict(os.environ, PYTHONPATH=str(llama_dir / "gguf-py"))
    t0 = time.perf_counter()
    cmd = [python, str(llama_dir / "convert_hf_to_gguf.py"), str(export), "--outfile", str(out), "--outtype", outtype]
    proc = subprocess.run(cmd, capture_output=True, text=True, env=env)
    if proc.returncode != 0:
        raise RuntimeError(f"convert_hf_to_gguf.py failed:\n{proc.stderr[-4000:]}")
    return {
        "gguf": str(out),
        "gguf_gb": round(out.stat().st_size / 1e9, 3),
        "gguf_convert_s": round(time.perf_counter() - t0, 1),
    }


def compare_logits(ours_path: str, theirs_path: str) -> dict:
    import numpy as np

    ours, theirs = np.load(ours_path), np.load(theirs_path)
    agree = ours.argmax(-1) == theirs.argmax(-1)
    top2 = np.sort(ours, axis=-1)[:, -2:]
    margins = (top2[:, 1] - top2[:, 0])[~agree]
    return {
        "teacher_forced_positions": int(len(agree)),
        "teacher_forced_argmax_agree": int(agree.sum()),
        "max_abs_logit_diff": round(float(np.abs(ours - theirs).max()), 5),
        "logit_scale": round(float(np.abs(ours).max()), 3),
        "our_top2_margin_where_they_differ": [round(float(m), 5) for m in margins],
    }


def chat_prompt() -> list[int]:
    sys.path.insert(0, str(REPO))
    from qwen.qwen_generation_utils import DEFAULT_SYSTEM, make_context
    from qwen.tokenization_qwen import QWenTokenizer

    return make_context(QWenTokenizer(), PROMPT, [], system=DEFAULT_SYSTEM)[1]


def exactness(args, llama_python: str, llama_dir: Path, work: Path) -> dict:
    sys.path.insert(0, str(REPO))
    from qwen.tiny import make_tiny_checkpoint

    src = make_tiny_checkpoint(work / "tiny", chat=True, seq_length=256, dtype="fp32", init_std=0.1)
    export = work / "tiny-qwen2"
    run_worker(sys.executable, "convert", {"src": str(src), "dst": str(export)})
    gguf = to_gguf(llama_python, llama_dir, export, work / "tiny-f32.gguf", "f32")
    prompt = chat_prompt()
    common = {"prompt": prompt, "new_tokens": 48, "threads": args.threads}
    ours = run_worker(
        sys.executable, "qwen", {**common, "ckpt": str(src), "dtype": "fp32", "logits_out": str(work / "ours.npy")}
    )
    theirs = run_worker(
        llama_python,
        "llama",
        {
            **common,
            "gguf": gguf["gguf"],
            "teacher": ours["sequence"],
            "logits_out": str(work / "theirs.npy"),
            "corpus": CORPUS,
        },
    )
    sys.path.insert(0, str(REPO))
    from qwen.convert import CHAT_TEMPLATE

    return {
        "phase": "exactness",
        "gguf_metadata": theirs["gguf_metadata"],
        "gguf_chat_template_is_ours": theirs["gguf_chat_template"] == CHAT_TEMPLATE,
        "weights": "tiny random fp32, f32 GGUF",
        "same_greedy_tokens": ours["tokens"] == theirs["tokens"],
        "new_tokens": len(ours["tokens"]),
        **compare_logits(str(work / "ours.npy"), str(work / "theirs.npy")),
        "corpus_ids": theirs["corpus_ids"],
    }


def tokenizer_report(corpus_ids: list[list[int]]) -> dict:
    sys.path.insert(0, str(REPO))
    from qwen.tokenization_qwen import QWenTokenizer

    tok = QWenTokenizer()
    differ = [text for text, ids in zip(CORPUS, corpus_ids, strict=True) if tok.encode(text) != ids]
    return {"phase": "tokenizer", "texts": len(CORPUS), "same_ids": len(CORPUS) - len(differ), "differ": differ}


def speed(args, llama_python: str, llama_dir: Path) -> list[dict]:
    sys.path.insert(0, str(HERE))
    from decode import DEFAULT_DIR, ensure_checkpoints

    ckpt = args.ckpt or DEFAULT_DIR
    if not (ckpt / "model.safetensors").exists():
        ensure_checkpoints(ckpt)
    export = ckpt.with_name(ckpt.name + "-export")
    lines = []
    if not (export / "config.json").exists():
        lines.append(
            {"phase": "export", **run_worker(sys.executable, "convert", {"src": str(ckpt), "dst": str(export)})}
        )
        print(json.dumps(lines[-1]), flush=True)
    ggufs = {}
    for outtype in args.outtypes:
        gguf = to_gguf(llama_python, llama_dir, export, export.with_name(f"{ckpt.name}-{outtype}.gguf"), outtype)
        ggufs[f"llama.cpp-{outtype}"] = gguf["gguf"]
        lines.append({"phase": "gguf", "type": outtype, **gguf})
        print(json.dumps(lines[-1]), flush=True)

    prompt = chat_prompt()
    common = {"prompt": prompt, "new_tokens": args.new_tokens, "threads": args.threads}
    contenders = [*ggufs, "qwen"]
    results: dict[str, list[dict]] = {name: [] for name in contenders}
    for r in range(args.rounds):
        # Rotate the order so that no contender always runs first (or right after another).
        for name in contenders[r % len(contenders) :] + contenders[: r % len(contenders)]:
            if name == "qwen":
                line = run_worker(sys.executable, "qwen", {**common, "ckpt": str(ckpt), "dtype": "bf16"})
            else:
                line = run_worker(llama_python, "llama", {**common, "gguf": ggufs[name]})
                line.pop("gguf_chat_template", None)
                line["contender"] = name
            line["round"] = r
            print(json.dumps(line), flush=True)
            results[name].append(line)
            lines.append(line)

    summary = {
        "phase": "speed-summary",
        "checkpoint": str(ckpt),
        "rounds": args.rounds,
        "threads": args.threads,
        "prompt_tokens": len(prompt),
        "new_tokens": args.new_tokens,
    }
    for name in contenders:
        rates = [x["decode_tok_s"] for x in results[name]]
        summary[name] = {
            "decode_tok_s_median": statistics.median(rates),
            "decode_tok_s_best": max(rates),
            "ttft_s_median": statistics.median(x["ttft_s"] for x in results[name]),
            "peak_rss_gib": max(x["peak_rss_gib"] for x in results[name]),
        }
    with tempfile.TemporaryDirectory() as tmp:
        ours = run_worker(
            sys.executable, "qwen", {**common, "ckpt": str(ckpt), "dtype": "bf16", "logits_out": f"{tmp}/ours.npy"}
        )
        for name, path in ggufs.items():
            job = {**common, "gguf": path, "teacher": ours["sequence"], "logits_out": f"{tmp}/{name}.npy"}
            run_worker(llama_python, "llama", job)
            theirs = results[name][0]["tokens"]
            prefix = next((i for i, (a, b) in enumerate(zip(theirs, ours["tokens"], strict=False)) if a != b), None)
            summary[name] |= {
                "same_greedy_tokens": theirs == ours["tokens"],
                "common_prefix_tokens": len(theirs) if prefix is None else prefix,
                **compare_logits(f"{tmp}/ours.npy", f"{tmp}/{name}.npy"),
            }
    lines.append(summary)
    return lines


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument(
        "--ckpt",
        type=Path,
        default=None,
        help="Qwen-1 checkpoint for the speed phase "
        "(default: benchmarks/decode.py's ~/.cache/qwen-bench/qwen-1.8b-random)",
    )
    parser.add_argument(
        "--llama-cpp-dir",
        type=Path,
        default=None,
        help="llama.cpp source tree with convert_hf_to_gguf.py and gguf-py "
        f"(default: {LLAMACPP}/llama_cpp_python-*/vendor/llama.cpp)",
    )
    parser.add_argument(
        "--llama-python",
        default=None,
        help=f"python with llama_cpp installed (default: {LLAMACPP}/venv/bin/python if present)",
    )
    parser.add_argument(
        "--outtypes",
        type=lambda text: [t for t in text.split(",") if t],
        default=["bf16", "f16"],
        help="GGUF weight types to compare, comma-separated from bf16,f16 (default bf16,f16)",
    )
    parser.add_argument("--rounds", type=int, default=5, help="speed rounds (default 5)")
    parser.add_argument("--new-tokens", type=int, default=64, help="generated tokens (default 64)")
    parser.add_argument("--threads", type=int, default=os.cpu_count() or 1, help="threads for both (default: all)")
    parser.add_argument("--skip-exactness", action="store_true", help="skip the tiny fp32 exactness phase")
    parser.add_argument("--skip-speed", action="store_true", help="skip the 1.8B speed phase")
    parser.add_argument("--worker", choices=sorted(WORKERS), help=argparse.SUPPRESS)
    parser.add_argument("--job", help=argparse.SUPPRESS)
    args = parser.parse_args()

    if not set(args.outtypes) <= {"bf16", "f16"}:
        parser.error(f"--outtypes: {args.outtypes} is not a subset of bf16,f16")
    if args.worker:
        print(json.dumps(WORKERS[args.worker](json.loads(Path(args.job).read_text()))), flush=True)
        return 0

    llama_dir = args.llama_cpp_dir
    if llama_dir is None:
        found = sorted(glob.glob(str(LLAMACPP / "llama_cpp_python-*" / "vendor" / "llama.cpp")))
        if not found:
            parser.error(f"no llama.cpp tree under {LLAMACPP}; see --help for how to get it, or pass --llama-cpp-dir")
        llama_dir = Path(found[-1])
    llama_python = args.llama_python or (
        str(LLAMACPP / "venv" / "bin" / "python") if (LLAMACPP / "venv" / "bin" / "python").exists() else sys.executable
    )
    check = subprocess.run(
        [llama_python, "-c", "import llama_cpp; print(llama_cpp.__version__)"], capture_output=True, text=True
    )
    if check.returncode != 0:
        parser.error(f"{llama_python} cannot import llama_cpp; build llama-cpp-python (see --help)")
    print(json.dumps({"llama_cpp_python": check.stdout.strip(), "llama_cpp_dir": str(llama_dir)}), flush=True)

    if not args.skip_exactness:
        with tempfile.TemporaryDirectory() as tmp:
            result = exactness(args, llama_python, llama_dir, Path(tmp))
        corpus_ids = result.pop("corpus_ids")
        print(json.dumps(result), flush=True)
        print(json.dumps(tokenizer_report(corpus_ids)), flush=True)
    if not args.skip_speed:
        for line in speed(args, llama_python, llama_dir)[-1:]:
            print(json.dumps(line), flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
