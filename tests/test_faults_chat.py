"""chat_batch() against chat() with custom stop words (not only ChatML's own stops).

Random tiny models never emit ``<|im_end|>``, so the stop words here are taken from each
query's own greedy generation: the expected response is the generation up to and
including the first stop word (the official code keeps a custom stop word in the
text), worked out here from the token ids, and ``chat()`` run alone for each query is
the reference for every row of ``chat_batch()``.
"""

from __future__ import annotations

import pytest
import torch
from transformers import AutoModelForCausalLM, AutoTokenizer

import qwen  # noqa: F401  (registers the Auto classes)
from qwen.qwen_generation_utils import make_context

SYSTEM = "You are a helpful assistant."
N = 10
QUERIES = ["hi", "Please write a long poem about the sea, the sky and 1234 gulls.", "再见"]


@pytest.fixture(scope="module")
def tokenizer(tiny_chat_dir):
    return AutoTokenizer.from_pretrained(tiny_chat_dir)


@pytest.fixture(scope="module")
def model(tiny_chat_dir):
    return AutoModelForCausalLM.from_pretrained(tiny_chat_dir, dtype=torch.float32).eval()


def greedy_tokens(model, tokenizer, query: str) -> list[int]:
    ids = torch.tensor([make_context(tokenizer, query, system=SYSTEM)[1]])
    out = model.generate(ids, attention_mask=torch.ones_like(ids), do_sample=False, max_new_tokens=N)
    return out[0, ids.shape[1] :].tolist()


def until_first_stop(tokens: list[int], stops: list[list[int]]) -> list[int]:
    for end in range(1, len(tokens) + 1):
        if any(tokens[max(0, end - len(word)) : end] == word for word in stops):
            return tokens[:end]
    return tokens


@pytest.mark.parametrize("where", ["stop_words_ids", "generation_config", "pad-not-an-end-token"])
def test_chat_batch_trims_custom_stop_words_as_chat_does(model, tokenizer, where):
    """A row that stops early is padded by generate() with the config's pad_token_id
    while the others run on; whatever that id is (here also one that is not an end
    token, so decoding cannot hide a missed stop), each row ends at its stop word."""
    generations = [greedy_tokens(model, tokenizer, q) for q in QUERIES]
    # a two-token stop word inside the first generation, a one-token one inside the second;
    # the third query runs to max_new_tokens unless one of them comes up there too
    stops = [generations[0][3:5], generations[1][6:7]]
    expected = [tokenizer.decode(until_first_stop(g, stops), errors="replace").strip() for g in generations]
    assert len(until_first_stop(generations[0], stops)) <= 5 and len(until_first_stop(generations[1], stops)) <= 7
    greedy = {"do_sample": False, "max_new_tokens": N}
    if where == "stop_words_ids":
        kwargs = {"stop_words_ids": stops}
    else:
        config = model.generation_config.__class__.from_dict(model.generation_config.to_dict())
        config.stop_words_ids = stops
        if where == "pad-not-an-end-token":
            config.pad_token_id = tokenizer.convert_tokens_to_ids("<|extra_1|>")
        kwargs = {"generation_config": config}
    single = [model.chat(tokenizer, q, history=None, system=SYSTEM, **greedy, **kwargs)[0] for q in QUERIES]
    assert single == expected
    batch, histories = model.chat_batch(tokenizer, QUERIES, system=SYSTEM, **greedy, **kwargs)
    assert batch == single
    assert [h[-1] for h in histories] == list(zip(QUERIES, single, strict=True))
