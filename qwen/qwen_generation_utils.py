"""Generation helpers of the Qwen-1 models: stop words, ChatML prompts, decoding.

Kept at the official import path (``qwen_generation_utils``) so existing user code and
the official README's batch example keep working.
"""

from __future__ import annotations

import torch
from transformers import StoppingCriteria


def _normalize_stop_words(stop_words_ids) -> list[list[int]]:
    words = []
    for word in stop_words_ids:
        if isinstance(word, int):
            word = [word]
        word = [int(t) for t in word]
        if word:
            words.append(word)
    return words


class StopWordsCriteria(StoppingCriteria):
    """Stops a row once its generated ids end with any of ``stop_words_ids``
    (a list of token-id lists; multi-token sequences allowed). The stop word itself
    is kept in the output, as in the official code."""

    def __init__(self, stop_words_ids):
        self.stop_words_ids = _normalize_stop_words(stop_words_ids)

    def __call__(self, input_ids: torch.LongTensor, scores, **kwargs) -> torch.BoolTensor:
        done = torch.zeros(input_ids.shape[0], dtype=torch.bool, device=input_ids.device)
        for word in self.stop_words_ids:
            n = len(word)
            if n > input_ids.shape[1]:
                continue
            target = torch.tensor(word, device=input_ids.device, dtype=input_ids.dtype)
            done |= (input_ids[:, -n:] == target).all(dim=-1)
        return done


class QWenChatMixin:
    """``chat()``, ``chat_stream()`` and batch chat for :class:`QWenLMHeadModel`."""
