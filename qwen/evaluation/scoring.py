"""Multiple-choice scoring by the next-token log-probabilities of the answer letters.

The original scripts ran the whole few-shot prompt through the model once per question.
Every question of a subject shares the same few-shot prefix (five solved examples,
hundreds of tokens), so :class:`ChoiceScorer` runs the prefix once per subject, keeps its
KV cache, and runs only each question's own tokens on top of it, several questions per
forward (left-padded between the prefix and the question, masked). The scores equal the
full-prompt ones up to floating-point rounding; prompts where reuse would not be exact
(longer than ``max_seq_len``, so the original cut them from the left; longer than the
model's ``seq_length``, where dynamic NTK depends on the whole length; a tokenization
that merges across the prefix boundary) are scored from their full prompt.
"""

from __future__ import annotations

import copy
import dataclasses
import inspect
import logging
import math
from collections.abc import Sequence
from typing import Any

import torch

logger = logging.getLogger(__name__)


@dataclasses.dataclass
class ChoiceScore:
    """Log-probabilities of each choice's answer token (over the whole vocabulary)."""

    logprobs: list[float]
    reused_prefix: bool

    @property
    def best(self) -> int:
        """Index of the highest-scored choice (the first on ties)."""
        return max(range(len(self.logprobs)), key=lambda i: (self.logprobs[i], -i))

    @property
    def probs(self) -> list[float]:
        """The choices' probabilities renormalized over the choices alone."""
        top = max(self.logprobs)
        if top == -math.inf:
            return [1.0 / len(self.logprobs)] * len(self.logprobs)
        weights = [math.exp(lp - top) for lp in self.logprobs]
        total = sum(weights)
        return [w / total for w in weights]


def choice_token_ids(tokenizer: Any, choices: Sequence[str], prefix: str = " ") -> list[int]:
    """The token id of ``prefix + choice`` for each choice; each must be one token."""
    ids = []
    for choice in choices:
        encoded = list(tokenizer.encode(prefix + choice))
        if len(encoded) != 1:
            raise ValueError(f"answer text {prefix + choice!r} is {len(encoded)} tokens; choice scoring needs one")
        ids.append(encoded[0])
    return ids


def _pad_id(tokenizer: Any) -> int:
    try:
        pad = tokenizer.convert_tokens_to_ids("<|extra_0|>")
    except (KeyError, ValueError, TypeError):
        pad = None
    return pad if isinstance(pad, int) and pad != getattr(tokenizer, "unk_token_id", None) else tokenizer.eod_id


class ChoiceScorer:
    """Scores multiple-choice prompts that share a prefix (see the module docstring).

    Args:
        model: a causal LM (``model(input_ids, attention_mask=..., past_key_values=...)``).
        tokenizer: its tokenizer (``encode``).
        choice_ids: token ids of the answers, in choice order (:func:`choice_token_ids`).
        batch_size: questions per forward.
        reuse_prefix: False scores every prompt in full (the reference path).
        max_seq_len: prompts longer than this keep their last ``max_seq_len - 1`` tokens, as
            the original MMLU script did (None: no limit).
    """

    def __init__(
        self,
        model: Any,
        tokenizer: Any,
        choice_ids: Sequence[int],
        batch_size: int = 8,
        reuse_prefix: bool = True,
        max_seq_len: int | None = 2048,
    ):
        if batch_size < 1:
            raise ValueError("batch_size must be at least 1")
        self.model = model
        self.tokenizer = tokenizer
        self.choice_ids = torch.tensor(list(choice_ids), dtype=torch.long)
        self.batch_size = batch_size
        self.reuse_prefix = reuse_prefix
        self.max_seq_len = max_seq_len
        self.pad_id = _pad_id(tokenizer)
        self.seq_length = getattr(getattr(model, "config", None), "seq_length", None)
        # transformers 5.24 renamed the cache argument and output field to `cache`
        params = inspect.signature(model.forward).parameters
        self._cache_arg = "cache" if "cache" in params else "past_key_values"

    @property
    def device(self) -> torch.device:
        return getattr(self.model, "device", torch.device("cpu"))

    def _encode(self, text: str) -> list[int]:
        return list(self.tokenizer.encode(text))

    def _logprobs(self, last_logits: torch.Tensor) -> torch.Tensor:
        """(B, V) logits -> (B, n_choices) log-probabilities, in float32."""
        logprobs = torch.log_softmax(last_logits.float(), dim=-1)
        return logprobs[:, self.choice_ids.to(logprobs.device)].cpu()

    @torch.no_grad()
    def score(self, prefix: str, questions: Sequence[str]) -> list[ChoiceScore]:
        """Scores of ``prefix + question`` for each question (the prefix may be empty)."""
        prefix_ids = self._encode(prefix) if prefix else []
        full = [self._encode(prefix + q) for q in questions]
        results: list[ChoiceScore | None] = [None] * len(full)
        reusable, whole = [], []
        for i, ids in enumerate(full):
            too_long = self.max_seq_len is not None and len(ids) > self.max_seq_len
            beyond_context = self.seq_length is not None and len(ids) > self.seq_length
            if (
                self.reuse_prefix
                and prefix_ids
                and not too_long
                and not beyond_context
                and len(ids) > len(prefix_ids)
                and ids[: len(prefix_ids)] == prefix_ids
            ):
                reusable.append(i)
            else:
                whole.append(i)
        if reusable:
            cache = self._prefix_cache(prefix_ids)
            for start in range(0, len(reusable), self.batch_size):
                rows = reusable[start : start + self.batch_size]
                suffixes = [full[i][len(prefix_ids) :] for i in rows]
                for i, lp in zip(rows, self._score_on_prefix(cache, len(prefix_ids), suffixes), strict=True):
                    results[i] = ChoiceScore(lp, reused_prefix=True)
        for start in range(0, len(whole), self.batch_size):
            rows = whole[start : start + self.batch_size]
            prompts = [self._truncate(full[i]) for i in rows]
            for i, lp in zip(rows, self._score_full(prompts), strict=True):
                results[i] = ChoiceScore(lp, reused_prefix=False)
        return results  # type: ignore[return-value]

    def _truncate(self, ids: list[int]) -> list[int]:
        if self.max_seq_len is not None and len(ids) > self.max_seq_len:
            return ids[len(ids) - self.max_seq_len + 1 :]  # the original's cut
        return ids

    def _prefix_cache(self, prefix_ids: list[int]):
        ids = torch.tensor([prefix_ids], dtype=torch.long, device=self.device)
        out = self.model(input_ids=ids, attention_mask=torch.ones_like(ids), use_cache=True, logits_to_keep=1)
        cache = getattr(out, "cache", None)
        return cache if cache is not None else out.past_key_values

    def _score_on_prefix(self, prefix_cache, prefix_len: int, suffixes: list[list[int]]) -> list[list[float]]:
        width = max(len(s) for s in suffixes)
        batch = len(suffixes)
        input_ids = torch.full((batch, width), self.pad_id, dtype=torch.long)
        mask = torch.zeros((batch, prefix_len + width), dtype=torch.long)
        mask[:, :prefix_len] = 1
        for row, suffix in enumerate(suffixes):  # left-padded after the prefix
            input_ids[row, width - len(suffix) :] = torch.tensor(suffix, dtype=torch.long)
            mask[row, prefix_len + width - len(suffix) :] = 1
        cache = copy.deepcopy(prefix_cache)
        if batch > 1:
            cache.batch_repeat_interleave(batch)
        out = self.model(
            input_ids=input_ids.to(self.device),
            attention_mask=mask.to(self.device),
            use_cache=True,
            **{self._cache_arg: cache},
            logits_to_keep=1,
        )
        return self._logprobs(out.logits[:, -1, :]).tolist()

    def _score_full(self, prompts: list[list[int]]) -> list[list[float]]:
        width = max(len(p) for p in prompts)
        input_ids = torch.full((len(prompts), width), self.pad_id, dtype=torch.long)
        mask = torch.zeros((len(prompts), width), dtype=torch.long)
        for row, ids in enumerate(prompts):
            input_ids[row, width - len(ids) :] = torch.tensor(ids, dtype=torch.long)
            mask[row, width - len(ids) :] = 1
        out = self.model(
            input_ids=input_ids.to(self.device), attention_mask=mask.to(self.device), use_cache=False, logits_to_keep=1
        )
        return self._logprobs(out.logits[:, -1, :]).tolist()


@torch.no_grad()
def score_one_prompt_at_a_time(model: Any, tokenizer: Any, prompt: str, choice_ids: Sequence[int]) -> list[float]:
    """The original loop's scoring of one question: the whole prompt in one forward, the
    last position's log-softmax at the answer tokens. The reference for tests and benchmarks."""
    ids = torch.tensor([list(tokenizer.encode(prompt))], dtype=torch.long, device=getattr(model, "device", "cpu"))
    logits = model(input_ids=ids).logits[0, -1].float()
    return torch.log_softmax(logits, dim=-1)[list(choice_ids)].cpu().tolist()
