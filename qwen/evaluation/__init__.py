"""Benchmark evaluation of Qwen-1 checkpoints: the shared parts of the ``eval/`` scripts.

- :mod:`.data`: the benchmarks' on-disk layouts and the original prompts;
- :mod:`.scoring`: multiple-choice scoring by answer-letter log-probabilities, the few-shot
  prefix's KV cache computed once per subject and reused, batched;
- :mod:`.extract`: answer extraction (GSM8K numbers, chat letters, code, ReAct), fixed where
  the original was wrong, with the original's kept for comparison;
- :mod:`.backends`: a model loaded here, or an OpenAI-compatible server;
- :mod:`.humaneval`: HumanEval execution in a sandboxed subprocess;
- :mod:`.results`: resumable per-sample JSON lines and JSON summaries;
- :mod:`.tasks`: the evaluations the scripts run.
"""

from .data import BENCHMARKS, CEVAL, CHOICES, CMMLU, MMLU, Benchmark, Question, load_multiple_choice
from .extract import extract_choice_en, extract_choice_zh, extract_code, extract_number, extract_number_original
from .results import ResultStore, accuracy_summary
from .scoring import ChoiceScore, ChoiceScorer, choice_token_ids, score_one_prompt_at_a_time

__all__ = [
    "BENCHMARKS",
    "CEVAL",
    "CHOICES",
    "CMMLU",
    "MMLU",
    "Benchmark",
    "ChoiceScore",
    "ChoiceScorer",
    "Question",
    "ResultStore",
    "accuracy_summary",
    "choice_token_ids",
    "extract_choice_en",
    "extract_choice_zh",
    "extract_code",
    "extract_number",
    "extract_number_original",
    "load_multiple_choice",
    "score_one_prompt_at_a_time",
]
