"""Multiple-choice scoring speed: this package's scorer against the original evaluation loop.

Both score the same MMLU-like 5-shot prompts (a subject header, five solved examples, the
question; about 700 tokens each) on a small random Qwen-1 checkpoint (``python -m qwen
tiny``, fp32, CPU):

  * ``original``  one forward of the whole prompt per question (the original scripts' loop:
                  ``model(input_ids)['logits'][:, -1]``);
  * ``original-last-logit``  the same loop projecting only the last position onto the
                  vocabulary (``logits_to_keep=1``): isolates what prefix reuse adds;
  * ``package``   ``qwen.evaluation.ChoiceScorer``: the few-shot prefix's KV cache computed
                  once per subject, questions scored on top of it in left-padded batches.

Prints one JSON line per contender and a summary line with the speed-up, whether every
prediction agrees and the largest log-probability difference.

    python benchmarks/eval_scoring.py                      # 2 subjects x 16 questions
    python benchmarks/eval_scoring.py --subjects 4 --questions 32 --batch-size 8
"""

from __future__ import annotations

import argparse
import json
import random
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

WORDS = (
    "energy force mass velocity cell protein market demand law court theorem proof vector matrix river "
    "empire treaty reaction acid enzyme signal circuit voltage contract tax moral duty virtue logic set"
).split()


def sentence(rng: random.Random, n: int) -> str:
    return " ".join(rng.choice(WORDS) for _ in range(n)).capitalize()


def make_questions(subject: str, n: int, rng: random.Random):
    from qwen.evaluation import Question

    return [
        Question(
            subject,
            i,
            sentence(rng, rng.randint(40, 80)) + "?",
            {c: sentence(rng, rng.randint(3, 12)) for c in "ABCD"},
            rng.choice("ABCD"),
        )
        for i in range(n)
    ]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--subjects", type=int, default=2)
    parser.add_argument("--questions", type=int, default=16, help="questions per subject")
    parser.add_argument("--batch-size", type=int, default=8)
    parser.add_argument("--layers", type=int, default=4)
    parser.add_argument("--hidden", type=int, default=256)
    parser.add_argument("--intermediate", type=int, default=1376)
    parser.add_argument("--threads", type=int, default=0, help="torch threads (default: torch's choice)")
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)

    from transformers import AutoModelForCausalLM, AutoTokenizer

    import qwen  # noqa: F401
    from qwen.evaluation import MMLU, ChoiceScorer, choice_token_ids, score_one_prompt_at_a_time

    with tempfile.TemporaryDirectory() as tmp:
        ckpt = Path(tmp) / "model"
        shape = ["--layers", str(args.layers), "--hidden", str(args.hidden), "--heads", "4"]
        shape += ["--intermediate", str(args.intermediate), "--dtype", "fp32"]
        subprocess.run([sys.executable, "-m", "qwen", "tiny", str(ckpt), *shape], check=True, capture_output=True)
        model = AutoModelForCausalLM.from_pretrained(ckpt, dtype=torch.float32).eval()
        tokenizer = AutoTokenizer.from_pretrained(ckpt)
    ids = choice_token_ids(tokenizer, "ABCD", " ")
    rng = random.Random(0)
    subjects = []
    for s in range(args.subjects):
        name = f"subject_{s}"
        prefix = MMLU.few_shot_prefix(name, make_questions(name, 5, rng))
        texts = [MMLU.format_example(q, include_answer=False) for q in make_questions(name, args.questions, rng)]
        subjects.append((prefix, texts))
    n = args.subjects * args.questions
    prompt_tokens = sum(len(tokenizer.encode(p + t)) for p, ts in subjects for t in ts) / n

    # warm-up (first-call costs) on a short prompt, then the two contenders
    score_one_prompt_at_a_time(model, tokenizer, subjects[0][1][0], ids)
    start = time.perf_counter()
    original = [score_one_prompt_at_a_time(model, tokenizer, p + t, ids) for p, ts in subjects for t in ts]
    t_original = time.perf_counter() - start

    # the original loop with only the last position projected onto the vocabulary (what
    # batching and prefix reuse gain on top of that)
    last_only = ChoiceScorer(model, tokenizer, ids, batch_size=1, reuse_prefix=False, max_seq_len=None)
    start = time.perf_counter()
    for p, ts in subjects:
        last_only.score(p, ts)
    t_last_only = time.perf_counter() - start

    scorer = ChoiceScorer(model, tokenizer, ids, batch_size=args.batch_size)
    start = time.perf_counter()
    package = [s.logprobs for p, ts in subjects for s in scorer.score(p, ts)]
    t_package = time.perf_counter() - start

    def best(row):
        return max(range(4), key=lambda i: (row[i], -i))

    same = all(best(a) == best(b) for a, b in zip(original, package, strict=True))
    diff = max(abs(x - y) for a, b in zip(original, package, strict=True) for x, y in zip(a, b, strict=True))
    common = {"questions": n, "mean_prompt_tokens": round(prompt_tokens, 1), "threads": torch.get_num_threads()}
    print(
        json.dumps(
            {
                "contender": "original",
                **common,
                "seconds": round(t_original, 3),
                "questions_per_s": round(n / t_original, 2),
            }
        )
    )
    print(
        json.dumps(
            {
                "contender": "original-last-logit",
                **common,
                "seconds": round(t_last_only, 3),
                "questions_per_s": round(n / t_last_only, 2),
            }
        )
    )
    print(
        json.dumps(
            {
                "contender": "package",
                **common,
                "batch_size": args.batch_size,
                "seconds": round(t_package, 3),
                "questions_per_s": round(n / t_package, 2),
            }
        )
    )
    print(
        json.dumps(
            {
                "summary": True,
                "speedup": round(t_original / t_package, 2),
                "speedup_vs_last_logit": round(t_last_only / t_package, 2),
                "same_predictions": same,
                "max_abs_logprob_diff": diff,
                "model": {"layers": args.layers, "hidden": args.hidden, "intermediate": args.intermediate},
            }
        )
    )


if __name__ == "__main__":
    main()
