"""The evaluations the ``eval/`` scripts run: data in, batched answers, result files out.

Each ``run_*`` function takes a backend (:class:`~.backends.LocalBackend` or
:class:`~.backends.APIBackend`), the loaded data and a :class:`~.results.ResultStore`;
it skips samples already in the store, records every sample as it finishes (in chunks,
with a progress bar) and returns the summary it writes.
"""

from __future__ import annotations

import argparse
import logging
import math
from collections.abc import Callable, Iterable, Mapping, Sequence
from typing import Any

from .data import (
    BENCHMARKS,
    CHAT_HUMANEVAL_INSTRUCTION,
    CHOICES,
    Question,
    chat_ceval_prompt,
    chat_mmlu_prompt,
    gsm8k_base_prompt,
    gsm8k_chat_prompt,
)
from .extract import (
    GSM8K_STOPS,
    extract_choice_en,
    extract_choice_zh,
    extract_code,
    extract_number,
    gsm8k_correct_original,
    gsm8k_reference,
    numbers_equal,
    parse_react,
    rouge_l,
)
from .results import ResultStore, accuracy_summary

logger = logging.getLogger(__name__)


def _progress(total: int, desc: str, enabled: bool):
    from tqdm.auto import tqdm

    return tqdm(total=total, desc=desc, disable=not enabled, dynamic_ncols=True)


def _chunks(items: Sequence[Any], size: int) -> Iterable[Sequence[Any]]:
    for start in range(0, len(items), size):
        yield items[start : start + size]


def _key(subject: str, index: int | str) -> str:
    return f"{subject}/{index}"


# --------------------------------------------------------------------------- multiple choice (base models)


def run_multiple_choice(
    backend: Any,
    benchmark: str,
    data: Mapping[str, tuple[list[Question], list[Question]]],
    store: ResultStore,
    shots: int = 5,
    max_seq_len: int | None = 2048,
    chunk: int = 256,
    progress: bool = True,
) -> dict:
    """Few-shot multiple choice scored by answer-letter log-probabilities (MMLU, C-Eval, CMMLU)."""
    bench = BENCHMARKS[benchmark]
    keys = []
    total = sum(len(questions) for _, questions in data.values())
    with _progress(total, benchmark, progress) as bar:
        for subject, (dev, questions) in data.items():
            keys += [_key(subject, q.index) for q in questions]
            todo = [q for q in questions if not store.done(_key(subject, q.index))]
            bar.update(len(questions) - len(todo))
            if not todo:
                continue
            if shots and len(dev) < shots:
                logger.warning("%s: %d dev questions for %d shots", subject, len(dev), shots)
            prefix = bench.few_shot_prefix(subject, dev, shots) if shots else ""
            for part in _chunks(todo, chunk):
                texts = [bench.format_example(q, include_answer=False) for q in part]
                scores = backend.score_choices(prefix, texts, CHOICES, bench.choice_prefix, max_seq_len)
                records = []
                for q, text, score in zip(part, texts, scores, strict=True):
                    answered = max(score.logprobs) > -math.inf
                    pred = CHOICES[score.best] if answered else None
                    records.append(
                        {
                            "key": _key(subject, q.index),
                            "subject": subject,
                            "index": q.index,
                            "prompt": prefix + text,
                            "logprobs": dict(zip(CHOICES, score.logprobs, strict=True)),
                            "probs": dict(zip(CHOICES, score.probs, strict=True)) if answered else None,
                            "pred": pred,
                            "answer": q.answer,
                            "correct": q.answer is not None and pred == q.answer,
                        }
                    )
                store.add(records)
                bar.update(len(part))
    return _write_accuracy(store, keys, bench.categories, bench.macro_average, bench.hard)


def _write_accuracy(store: ResultStore, keys: list[str], categories, macro: bool, hard=(), extra=None) -> dict:
    records = [store.records[k] for k in keys if k in store.records]
    unanswered = sum(1 for r in records if r.get("answer") is None)
    summary = accuracy_summary(
        [r for r in records if r.get("answer") is not None], categories, macro_average=macro, hard=hard
    )
    if unanswered:
        summary["without_reference_answer"] = unanswered
    summary.update(extra or {})
    return store.write_summary(summary)


# --------------------------------------------------------------------------- multiple choice (chat models)


def run_chat_choice(
    backend: Any,
    benchmark: str,
    data: Mapping[str, tuple[list[Question], list[Question]]],
    store: ResultStore,
    max_new_tokens: int | None = None,
    chunk: int = 64,
    progress: bool = True,
) -> dict:
    """Zero-shot chat multiple choice with answer extraction (MMLU in English, C-Eval in Chinese)."""
    bench = BENCHMARKS[benchmark]
    if benchmark == "mmlu":
        make_prompt: Callable[[Question], str] = chat_mmlu_prompt

        def extract(response: str, q: Question) -> str | None:
            return extract_choice_en(response, q.options)
    else:
        make_prompt = chat_ceval_prompt

        def extract(response: str, q: Question) -> str | None:
            return extract_choice_zh(response, q.options, q.question)

    keys = []
    total = sum(len(questions) for _, questions in data.values())
    with _progress(total, f"chat {benchmark}", progress) as bar:
        for subject, (_, questions) in data.items():
            keys += [_key(subject, q.index) for q in questions]
            todo = [q for q in questions if not store.done(_key(subject, q.index))]
            bar.update(len(questions) - len(todo))
            for part in _chunks(todo, chunk):
                prompts = [make_prompt(q) for q in part]
                responses = backend.chat(prompts, max_new_tokens=max_new_tokens)
                records = []
                for q, prompt, response in zip(part, prompts, responses, strict=True):
                    pred = extract(response, q)
                    records.append(
                        {
                            "key": _key(subject, q.index),
                            "subject": subject,
                            "index": q.index,
                            "prompt": prompt,
                            "response": response,
                            "pred": pred,
                            "answer": q.answer,
                            "correct": q.answer is not None and pred == q.answer,
                        }
                    )
                store.add(records)
                bar.update(len(part))
    return _write_accuracy(store, keys, bench.categories, bench.macro_average, bench.hard)


# --------------------------------------------------------------------------- GSM8K


def run_gsm8k(
    backend: Any,
    docs: Sequence[Mapping[str, Any]],
    store: ResultStore,
    chat: bool,
    fewshot: str | None,
    max_new_tokens: int | None = None,
    chunk: int = 32,
    progress: bool = True,
) -> dict:
    """GSM8K: 8-shot step-by-step completion (base) or zero/few-shot chat; both the fixed
    and the original extraction are recorded and summarized."""
    if not chat and not fewshot:
        raise ValueError("the base-model GSM8K prompt needs the few-shot text")
    keys = [_key("gsm8k", i) for i in range(len(docs))]
    todo = [i for i in range(len(docs)) if not store.done(keys[i])]
    with _progress(len(docs), "chat gsm8k" if chat else "gsm8k", progress) as bar:
        bar.update(len(docs) - len(todo))
        for part in _chunks(todo, chunk):
            if chat:
                prompts = [gsm8k_chat_prompt(docs[i]["question"], fewshot) for i in part]
                outputs = backend.chat(prompts, max_new_tokens=max_new_tokens)
            else:
                prompts = [gsm8k_base_prompt(fewshot, docs[i]["question"]) for i in part]  # type: ignore[arg-type]
                outputs = backend.complete(prompts, GSM8K_STOPS, max_new_tokens=max_new_tokens)
            records = []
            for i, prompt, output in zip(part, prompts, outputs, strict=True):
                reference = gsm8k_reference(docs[i]["answer"])
                extracted = extract_number(output)
                records.append(
                    {
                        "key": keys[i],
                        "subject": "gsm8k",
                        "index": i,
                        "prompt": prompt,
                        "completion": output,
                        "extracted": extracted,
                        "answer": reference,
                        "correct": numbers_equal(extracted, reference),
                        "correct_original": gsm8k_correct_original(output, docs[i]["answer"], chat=chat),
                    }
                )
            store.add(records)
            bar.update(len(part))
    records = [store.records[k] for k in keys]
    n = len(records)
    summary = {
        "accuracy": 100.0 * sum(r["correct"] for r in records) / n if n else 0.0,
        "accuracy_original_extraction": 100.0 * sum(r["correct_original"] for r in records) / n if n else 0.0,
        "verdicts_differing_from_original": sum(r["correct"] != r["correct_original"] for r in records),
        "n": n,
    }
    return store.write_summary(summary)


# --------------------------------------------------------------------------- HumanEval


def run_humaneval(
    backend: Any | None,
    problems: Mapping[str, Mapping[str, Any]],
    store: ResultStore,
    chat: bool,
    stops: Sequence[str] = (),
    completions: Mapping[str, str] | None = None,
    max_new_tokens: int | None = None,
    timeout: float = 10.0,
    workers: int = 2,
    chunk: int = 16,
    progress: bool = True,
) -> dict:
    """HumanEval pass@1: greedy completion of each problem (base: the prompt itself; chat:
    "Help me fill the following code." + prompt, code extracted), or the given
    ``completions`` (task_id -> completion), run in the sandbox of :mod:`.humaneval`."""
    from .humaneval import evaluate_completions, pass_at_k

    ids = list(problems)
    todo = [t for t in ids if not store.done(t)]
    with _progress(len(ids), "humaneval", progress) as bar:
        bar.update(len(ids) - len(todo))
        for part in _chunks(todo, chunk):
            responses: list[str | None]
            if completions is not None:
                missing = [t for t in part if t not in completions]
                if missing:
                    raise KeyError(f"no completion for {', '.join(missing[:5])}")
                texts = [completions[t] for t in part]
                responses = [None] * len(part)
            elif chat:
                responses = backend.chat(
                    [CHAT_HUMANEVAL_INSTRUCTION + problems[t]["prompt"] for t in part], max_new_tokens=max_new_tokens
                )
                texts = [
                    extract_code(r or "", problems[t]["entry_point"]) for t, r in zip(part, responses, strict=True)
                ]
            else:
                texts = backend.complete([problems[t]["prompt"] for t in part], stops, max_new_tokens=max_new_tokens)
                responses = [None] * len(part)
            results = evaluate_completions(
                problems, list(zip(part, texts, strict=True)), timeout=timeout, workers=workers
            )
            store.add(
                {
                    "key": t,
                    "task_id": t,
                    "response": response,
                    "completion": text,
                    "passed": result.passed,
                    "result": result.result,
                }
                for t, response, text, result in zip(part, responses, texts, results, strict=True)
            )
            bar.update(len(part))
    by_task = {t: [store.records[t]["passed"]] for t in ids}
    summary = {**pass_at_k(by_task, (1,)), "n": len(ids), "passed": sum(v[0] for v in by_task.values())}
    return store.write_summary(summary)


# --------------------------------------------------------------------------- tool use (ReAct)


def _token_strings(tokenizer: Any, text: str) -> list[str]:
    """The text's tokens as strings, whitespace-split again (the original's ROUGE tokens)."""
    tokens = tokenizer.convert_ids_to_tokens(list(tokenizer.encode(text)))
    words = [t.decode("utf-8", errors="replace") if isinstance(t, bytes) else str(t) for t in tokens]
    return " ".join(words).split()


def run_plugin(
    backend: Any,
    tokenizer: Any,
    store: ResultStore,
    positive: Sequence[Mapping[str, Any]] | None = None,
    negative: Sequence[Mapping[str, Any]] | None = None,
    max_new_tokens: int | None = None,
    chunk: int = 32,
    progress: bool = True,
) -> dict:
    """ReAct tool use on the original's data: on positive samples, the share whose response
    calls the reference's tool ("Action:"), and the ROUGE-L of the tool input (JSON,
    canonicalized, in tokenizer tokens); on negative samples, the share that calls a tool
    at all (false positives). The model answers each ``prompt`` through chat."""
    summary: dict[str, Any] = {}
    for name, jobs in (("react_positive", positive), ("react_negative", negative)):
        if jobs is None:
            continue
        keys = [_key(name, i) for i in range(len(jobs))]
        todo = [i for i in range(len(jobs)) if not store.done(keys[i])]
        with _progress(len(jobs), name, progress) as bar:
            bar.update(len(jobs) - len(todo))
            for part in _chunks(todo, chunk):
                responses = backend.chat([jobs[i]["prompt"] for i in part], max_new_tokens=max_new_tokens)
                records = []
                for i, response in zip(part, responses, strict=True):
                    calls = "\nAction: " in response
                    record = {"key": keys[i], "subject": name, "index": i, "response": response, "calls_tool": calls}
                    if name == "react_positive":
                        got, want = parse_react(response), parse_react(jobs[i]["response"])
                        record["tool_correct"] = calls and got.action.strip().lower() == want.action.strip().lower()
                        record["input_rouge_l"] = rouge_l(
                            _token_strings(tokenizer, want.action_input), _token_strings(tokenizer, got.action_input)
                        )
                    records.append(record)
                store.add(records)
                bar.update(len(part))
        records = [store.records[k] for k in keys]
        n = len(records) or 1
        if name == "react_positive":
            summary[name] = {
                "tool_selection_accuracy": 100.0 * sum(r["tool_correct"] for r in records) / n,
                "tool_input_rouge_l": sum(r["input_rouge_l"] for r in records) / n,
                "n": len(records),
            }
        else:
            summary[name] = {
                "false_positive_rate": 100.0 * sum(r["calls_tool"] for r in records) / n,
                "n": len(records),
            }
    return store.write_summary(summary)


# --------------------------------------------------------------------------- command lines


def add_common_arguments(parser: argparse.ArgumentParser, default_checkpoint: str) -> None:
    """The options every ``eval/`` script shares."""
    parser.add_argument("-c", "--checkpoint-path", default=default_checkpoint, help="checkpoint directory or hub id")
    parser.add_argument("-o", "--output-dir", default="outs", help="where results go (default ./outs)")
    parser.add_argument("--batch-size", type=int, default=8, help="questions per forward / generate (default 8)")
    parser.add_argument("--dtype", choices=["auto", "bf16", "fp16", "fp32"], default="auto", help="weights dtype")
    parser.add_argument("--device", help="device map (default: 'auto' with CUDA, else the CPU)")
    parser.add_argument("--limit", type=int, help="at most this many samples per subject / file (smoke runs)")
    parser.add_argument("--overwrite", action="store_true", help="start again instead of resuming")
    parser.add_argument("--no-progress", action="store_true", help="no progress bars")
    api = parser.add_argument_group("evaluating through an OpenAI-compatible server instead of loading the model")
    api.add_argument("--api-base", metavar="URL", help="e.g. http://127.0.0.1:8000/v1 (openai_api.py, vLLM)")
    api.add_argument("--api-key", help="bearer token (default $OPENAI_API_KEY)")
    api.add_argument("--api-model", help="model name to request (default: the first the server lists)")
    api.add_argument("--concurrency", type=int, default=8, help="requests in flight (default 8)")


def make_backend(args: argparse.Namespace, chat: bool) -> Any:
    """The backend the arguments ask for."""
    from .backends import APIBackend, LocalBackend, load_model

    if args.api_base:
        return APIBackend(args.api_base, args.api_model, args.api_key, concurrency=args.concurrency, is_chat=chat)
    model, tokenizer = load_model(args.checkpoint_path, dtype=args.dtype, device=args.device)
    return LocalBackend(model, tokenizer, batch_size=args.batch_size)


def settings_of(args: argparse.Namespace, **extra: Any) -> dict:
    """What identifies a run's results (a resumed run must match it)."""
    skip = {"output_dir", "overwrite", "no_progress", "batch_size", "concurrency", "api_key", "device"}
    settings = {k: v for k, v in vars(args).items() if k not in skip}
    settings.update(extra)
    return settings


def limit_data(data: dict, limit: int | None) -> dict:
    if limit is None:
        return data
    return {subject: (dev, questions[:limit]) for subject, (dev, questions) in data.items()}
