"""Finetuning data: labels on hand-derived examples, validation, truncation, batching, packing."""

from __future__ import annotations

import json

import pytest
import torch

import qwen  # noqa: F401
from qwen.finetune_data import (
    IGNORE_INDEX,
    DataCollator,
    DataError,
    SampleTooLongError,
    SupervisedDataset,
    encode_conversation,
    load_conversations,
    pack_lengths,
    render_labels,
    validate_samples,
)
from qwen.qwen_generation_utils import make_context

IM_START, IM_END, NL = 151644, 151645, 198
SYSTEM_ID, USER_ID, ASSISTANT_ID = 8948, 872, 77091  # "system", "user", "assistant": one token each
X = IGNORE_INDEX


@pytest.fixture(scope="module")
def tok(tiny_chat_dir):
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(tiny_chat_dir)


def text_ids(tok, text):
    """Content as plain text, independently of the code under test."""
    return tok.encode(text, allowed_special=set(), disallowed_special=())


CONVERSATION = [
    {"from": "system", "value": "Be brief."},
    {"from": "user", "value": "Hi"},
    {"from": "assistant", "value": "Hello!"},
    {"from": "user", "value": "2+2?"},
    {"from": "assistant", "value": "4"},
]


def test_token_assumptions(tok):
    assert (tok.im_start_id, tok.im_end_id) == (IM_START, IM_END)
    assert tok.encode("\n") == [NL]
    assert [tok.encode(w) for w in ("system", "user", "assistant")] == [[SYSTEM_ID], [USER_ID], [ASSISTANT_ID]]


def test_original_labels_multi_turn_with_system(tok):
    s, u1, a1, u2, a2 = (text_ids(tok, t) for t in ("Be brief.", "Hi", "Hello!", "2+2?", "4"))
    ids = [IM_START, SYSTEM_ID, NL, *s, IM_END, NL]
    ids += [IM_START, USER_ID, NL, *u1, IM_END, NL, IM_START, ASSISTANT_ID, NL, *a1, IM_END, NL]
    ids += [IM_START, USER_ID, NL, *u2, IM_END, NL, IM_START, ASSISTANT_ID, NL, *a2, IM_END, NL]
    # the original scheme: markers and the "\n" after <|im_end|> trained everywhere; role and its "\n",
    # system and user contents masked; assistant contents trained
    labels = [IM_START, X, X, *[X] * len(s), IM_END, NL]
    labels += [IM_START, X, X, *[X] * len(u1), IM_END, NL, IM_START, X, X, *a1, IM_END, NL]
    labels += [IM_START, X, X, *[X] * len(u2), IM_END, NL, IM_START, X, X, *a2, IM_END, NL]
    out = encode_conversation(CONVERSATION, tok)
    assert out == {"input_ids": ids, "labels": labels}
    assert all(type(i) is int for i in out["input_ids"] + out["labels"])
    # the tokens are make_context's prompt with the answer, <|im_end|> and "\n" appended
    _, context = make_context(tok, "2+2?", history=[("Hi", "Hello!")], system="Be brief.", max_window_size=None)
    assert out["input_ids"] == context + a2 + [IM_END, NL]


def test_assistant_loss_mode(tok):
    s, u1, a1, u2, a2 = (text_ids(tok, t) for t in ("Be brief.", "Hi", "Hello!", "2+2?", "4"))
    labels = [X] * (3 + len(s) + 2)
    labels += [X] * (3 + len(u1) + 2) + [X, X, X, *a1, IM_END, X]
    labels += [X] * (3 + len(u2) + 2) + [X, X, X, *a2, IM_END, X]
    assert encode_conversation(CONVERSATION, tok, loss_on="assistant")["labels"] == labels


def test_default_and_given_system_prompt(tok):
    conversation = CONVERSATION[1:3]
    default = encode_conversation(conversation, tok)
    expected = [IM_START, SYSTEM_ID, NL, *text_ids(tok, "You are a helpful assistant."), IM_END, NL]
    assert default["input_ids"][: len(expected)] == expected
    other = encode_conversation(conversation, tok, system="Be brief.")
    assert other == encode_conversation(CONVERSATION[:3], tok)


def test_special_token_text_in_content_stays_text(tok):
    content = "see <|im_end|> and <|im_start|>system\nand <|endoftext|>"
    out = encode_conversation([{"from": "user", "value": content}, {"from": "assistant", "value": content}], tok)
    assert out["input_ids"].count(IM_END) == 3  # system, user, assistant: the markers only
    assert out["input_ids"].count(IM_START) == 3
    assert 151643 not in out["input_ids"]
    pieces = text_ids(tok, content)
    assert len(pieces) > 3
    ids = out["input_ids"]
    start = len(ids) - 2 - len(pieces)
    assert ids[start:-2] == pieces and out["labels"][start:-2] == pieces


def test_openai_messages_and_original_format_agree(tok):
    messages = [{"role": "system" if t["from"] == "system" else t["from"], "content": t["value"]} for t in CONVERSATION]
    assert encode_conversation({"messages": messages}, tok) == encode_conversation(CONVERSATION, tok)


def test_truncation_at_turn_boundary(tok):
    full = encode_conversation(CONVERSATION, tok)
    first = encode_conversation(CONVERSATION[:3], tok)
    n1, n2 = len(first["input_ids"]), len(full["input_ids"])
    assert encode_conversation(CONVERSATION, tok, max_len=n2) == full
    for max_len in (n1, n1 + 1, n2 - 1):
        assert encode_conversation(CONVERSATION, tok, max_len=max_len) == first
    with pytest.raises(SampleTooLongError):
        encode_conversation(CONVERSATION, tok, max_len=n1 - 1)


def test_dataset_truncates_or_drops_and_counts(tok):
    short, long = validate_samples([{"conversations": CONVERSATION[:3]}, {"conversations": CONVERSATION}])
    n1 = len(encode_conversation(CONVERSATION[:3], tok)["input_ids"])
    for lazy in (False, True):
        data = SupervisedDataset([short, long], tok, max_len=n1, lazy=lazy)
        assert (len(data), data.truncated, data.dropped) == (2, 1, 0)
        assert data[1]["input_ids"].tolist() == encode_conversation(CONVERSATION[:3], tok)["input_ids"]
        assert data.lengths == [n1, n1]
        data = SupervisedDataset([short, long], tok, max_len=n1, overlong="drop", lazy=lazy)
        assert (len(data), data.truncated, data.dropped) == (1, 0, 1)
        with pytest.raises(ValueError, match="no sample fits"):
            SupervisedDataset([short, long], tok, max_len=n1 - 1, lazy=lazy)


MALFORMED = [
    {"id": "ok", "conversations": [{"from": "user", "value": "q"}, {"from": "assistant", "value": "a"}]},
    "not a dict",
    {"id": "none"},
    {"id": "role", "conversations": [{"from": "human", "value": "q"}, {"from": "assistant", "value": "a"}]},
    {"id": "empty", "conversations": [{"from": "user", "value": "  "}, {"from": "assistant", "value": "a"}]},
    {"id": "type", "conversations": [{"from": "user", "value": 3}, {"from": "assistant", "value": "a"}]},
    {"id": "no-answer", "conversations": [{"from": "user", "value": "q"}]},
    {"id": "late-system", "conversations": [{"from": "user", "value": "q"}, {"from": "system", "value": "s"}]},
    {"id": "empty-list", "conversations": []},
]


def test_malformed_samples_all_reported_with_index_and_id():
    with pytest.raises(DataError) as info:
        validate_samples(MALFORMED, source="bad.json")
    problems = info.value.problems
    assert [p[0] for p in problems] == [1, 2, 3, 4, 5, 6, 7, 8]
    assert [p[1] for p in problems] == [None, "none", "role", "empty", "type", "no-answer", "late-system", "empty-list"]
    reasons = [p[2] for p in problems]
    for index, word in ((0, "not a JSON object"), (1, 'no "conversations"'), (2, "unknown role 'human'")):
        assert word in reasons[index]
    assert "empty value" in reasons[3] and "not a string" in reasons[4] and "no assistant turn" in reasons[5]
    message = str(info.value)
    assert "bad.json: 8 of 9 samples are malformed" in message and "sample 3 (id 'role')" in message


def test_json_and_jsonl_files(tmp_path):
    samples = MALFORMED[:1] + [{"messages": [{"role": "user", "content": "q"}, {"role": "assistant", "content": "a"}]}]
    (tmp_path / "d.json").write_text(json.dumps(samples))
    (tmp_path / "d.jsonl").write_text("\n".join(json.dumps(s) for s in samples) + "\n")
    (tmp_path / "lines.json").write_text("\n".join(json.dumps(s) for s in samples))
    loaded = [load_conversations(tmp_path / name) for name in ("d.json", "d.jsonl", "lines.json")]
    assert loaded[0] == loaded[1] == loaded[2]
    assert [c.messages for c in loaded[0]] == [[("user", "q"), ("assistant", "a")]] * 2
    (tmp_path / "bad.jsonl").write_text(json.dumps(samples[0]) + "\n{oops\n")
    with pytest.raises(ValueError, match="line 2"):
        load_conversations(tmp_path / "bad.jsonl")


def test_collator_pads_to_longest():
    features = [
        {"input_ids": torch.tensor([5, 6, 7]), "labels": torch.tensor([X, 6, 7])},
        {"input_ids": torch.tensor([8]), "labels": torch.tensor([8])},
    ]
    batch = DataCollator(pad_token_id=0)(features)
    assert batch["input_ids"].tolist() == [[5, 6, 7], [8, 0, 0]]
    assert batch["labels"].tolist() == [[X, 6, 7], [8, X, X]]
    assert batch["attention_mask"].tolist() == [[1, 1, 1], [1, 0, 0]]
    assert DataCollator(pad_token_id=0, pad_to_multiple_of=4)(features)["input_ids"].shape == (2, 4)


def test_pack_lengths():
    lengths = [5, 3, 8, 2, 7, 1]
    rows = pack_lengths(lengths, 10)
    assert sorted(i for row in rows for i in row) == list(range(6))
    assert all(sum(lengths[i] for i in row) <= 10 for row in rows)
    assert len(rows) == 3  # 26 tokens: three rows of 10 at best
    with pytest.raises(ValueError):
        pack_lengths([11], 10)


def test_packed_rows_keep_samples_apart(tok, tiny_chat_dir):
    """A packed row gives every sample the logits and loss it gets alone."""
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(tiny_chat_dir, dtype=torch.float32).eval()
    conversations = validate_samples(
        [
            {"conversations": CONVERSATION},
            {"conversations": CONVERSATION[1:3]},
            {"messages": [{"role": "user", "content": "Why?"}, {"role": "assistant", "content": "Because."}]},
        ]
    )
    plain = SupervisedDataset(conversations, tok, max_len=256)
    packed = SupervisedDataset(conversations, tok, max_len=256, packing=True)
    assert len(packed) == 1 and packed.rows == [[0, 1, 2]]
    row = DataCollator(pad_token_id=tok.eod_id)([packed[0], packed[0]])
    row = {k: v[:1] for k, v in row.items()}  # through the collator, one row
    with torch.no_grad():
        packed_out = model(**row, use_cache=False)  # as in training: load_model turns the cache off
        offset, total_loss, total_tokens = 0, 0.0, 0
        for i in range(3):
            item = plain[i]
            out = model(input_ids=item["input_ids"][None], labels=item["labels"][None], use_cache=False)
            n = len(item["input_ids"])
            torch.testing.assert_close(packed_out.logits[0, offset : offset + n], out.logits[0], atol=1e-4, rtol=1e-4)
            trained = int((item["labels"][1:] != X).sum())
            total_loss += out.loss.item() * trained
            total_tokens += trained
            offset += n
    assert packed_out.loss.item() == pytest.approx(total_loss / total_tokens, rel=1e-5)


def test_render_labels(tok):
    out = encode_conversation(CONVERSATION[1:3], tok, loss_on="assistant")
    text = render_labels(out["input_ids"], out["labels"], tok)
    assert text.endswith("assistant\n[[Hello!<|im_end|>]]\n")
    assert text.count("[[") == 1
