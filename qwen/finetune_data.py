"""Finetuning data: reading, validating, labelling and batching chat conversations.

Formats read (a ``.json`` file holding a list, or JSON Lines, one sample per line):

- the original Qwen format, ``{"id": ..., "conversations": [{"from": "user"|"assistant",
  "value": ...}, ...]}``, with an optional first ``{"from": "system", "value": ...}`` turn
  (that sample's system prompt);
- the OpenAI style, ``{"messages": [{"role": "system"|"user"|"assistant", "content": ...}]}``.

:func:`encode_conversation` turns one conversation into ``input_ids`` and ``labels`` with the
ChatML of :func:`qwen.qwen_generation_utils.make_context`. :class:`SupervisedDataset` encodes a
file's samples (truncating or dropping the ones longer than ``max_len``), optionally packs
several into one row, and :class:`DataCollator` pads a batch to its longest row.
"""

from __future__ import annotations

import bisect
import dataclasses
import json
import logging
from collections.abc import Iterable, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch

from .qwen_generation_utils import DEFAULT_SYSTEM, chatml_message_parts

logger = logging.getLogger(__name__)

IGNORE_INDEX = -100
# "original": the labels of the original Qwen finetune.py (every <|im_start|>, <|im_end|> and the
# "\n" after it trained, in every turn; assistant contents trained; role names, system and user
# contents masked). "assistant": only the assistant contents and their <|im_end|>.
LOSS_MODES = ("original", "assistant")
ROLES = ("system", "user", "assistant")


class DataError(ValueError):
    """Malformed samples: ``problems`` lists ``(index, id, reason)`` for every one of them."""

    def __init__(self, source: str, problems: list[tuple[int, Any, str]], total: int):
        self.problems = problems
        shown = [f"  sample {i}{'' if sid is None else f' (id {sid!r})'}: {why}" for i, sid, why in problems[:50]]
        if len(problems) > 50:
            shown.append(f"  ... and {len(problems) - 50} more")
        super().__init__(f"{source}: {len(problems)} of {total} samples are malformed:\n" + "\n".join(shown))


class SampleTooLongError(ValueError):
    """No prefix of the conversation that ends after an assistant turn fits in ``max_len`` tokens."""


@dataclasses.dataclass
class Conversation:
    """One validated sample: its messages as ``(role, content)`` pairs, user and assistant only,
    and its own system prompt (None: the default one)."""

    messages: list[tuple[str, str]]
    system: str | None = None
    id: Any = None


# --------------------------------------------------------------------------- validation


def _turns_of(sample: Any) -> tuple[list, str, str]:
    """The turn list of a sample and the keys its turns use for role and content."""
    if not isinstance(sample, dict):
        raise ValueError(f"not a JSON object but a {type(sample).__name__}")
    if "conversations" in sample:
        turns, role_key, content_key = sample["conversations"], "from", "value"
    elif "messages" in sample:
        turns, role_key, content_key = sample["messages"], "role", "content"
    else:
        raise ValueError('no "conversations" (or "messages") list')
    if not isinstance(turns, list) or not turns:
        raise ValueError("the conversation is not a non-empty list")
    return turns, role_key, content_key


def to_conversation(sample: Any) -> Conversation:
    """Validate one sample (a dict in either format, or the original format's turn list) and
    return it as a :class:`Conversation`; ``ValueError`` with the reason when it is malformed."""
    if isinstance(sample, Conversation):
        return sample
    if isinstance(sample, list):
        sample = {"conversations": sample}
    turns, role_key, content_key = _turns_of(sample)
    system = None
    messages: list[tuple[str, str]] = []
    for j, turn in enumerate(turns):
        if not isinstance(turn, dict):
            raise ValueError(f"turn {j} is not a JSON object but a {type(turn).__name__}")
        if role_key not in turn and ("from" in turn or "role" in turn):  # tolerate the other format's keys
            role_key, content_key = ("from", "value") if "from" in turn else ("role", "content")
        role, content = turn.get(role_key), turn.get(content_key)
        if role not in ROLES:
            raise ValueError(f"turn {j} has unknown role {role!r} (expected one of {', '.join(ROLES)})")
        if not isinstance(content, str):
            raise ValueError(f"turn {j} ({role}) has a {type(content).__name__} value, not a string")
        if not content.strip():
            raise ValueError(f"turn {j} ({role}) has an empty value")
        if role == "system":
            if j != 0:
                raise ValueError(f"turn {j} is a system turn; only the first turn may be one")
            system = content
        else:
            messages.append((role, content))
    if not any(role == "assistant" for role, _ in messages):
        raise ValueError("no assistant turn (nothing to learn)")
    return Conversation(messages=messages, system=system, id=sample.get("id"))


def validate_samples(samples: Sequence[Any], source: str = "data") -> list[Conversation]:
    """Every sample as a :class:`Conversation`; raises :class:`DataError` naming every
    malformed sample (index, id, reason) at once."""
    conversations, problems = [], []
    for index, sample in enumerate(samples):
        try:
            conversations.append(to_conversation(sample))
        except ValueError as err:
            sid = sample.get("id") if isinstance(sample, dict) else None
            problems.append((index, sid, str(err)))
    if problems:
        raise DataError(source, problems, len(samples))
    if not conversations:
        raise DataError(source, [(0, None, "the file holds no samples")], 0)
    return conversations


def read_samples(path: str | Path) -> list[Any]:
    """The raw samples of a JSON file (a list) or a JSON Lines file (one sample per line)."""
    path = Path(path)
    text = path.read_text(encoding="utf-8")
    if path.suffix != ".jsonl":
        try:
            data = json.loads(text)
        except json.JSONDecodeError as err:
            if err.msg != "Extra data":  # one JSON value per line reads as "Extra data"
                raise ValueError(f"{path} is not valid JSON: {err}") from None
        else:
            if isinstance(data, list):
                return data
            if isinstance(data, dict) and ("conversations" in data or "messages" in data):
                return [data]  # a JSON Lines file of one sample
            raise ValueError(f"{path} holds a JSON {type(data).__name__}, not a list of samples")
    samples = []
    for number, line in enumerate(text.splitlines(), 1):
        if line.strip():
            try:
                samples.append(json.loads(line))
            except json.JSONDecodeError as err:
                raise ValueError(f"{path}, line {number}: not valid JSON ({err})") from None
    return samples


def load_conversations(path: str | Path) -> list[Conversation]:
    """Read and validate a data file (see the module docstring); raises :class:`DataError`
    listing every malformed sample, before anything is tokenized or loaded."""
    return validate_samples(read_samples(path), source=str(path))


# --------------------------------------------------------------------------- labels


def _encode(conversation: Conversation, tokenizer: Any, system: str, loss_on: str):
    """ids, labels, and the lengths after which the conversation may be cut (after each
    assistant turn, its ``<|im_end|>`` and the ``\\n`` after it)."""
    if loss_on not in LOSS_MODES:
        raise ValueError(f"loss_on must be one of {LOSS_MODES}, got {loss_on!r}")
    nl = list(tokenizer.encode("\n"))
    ids: list[int] = []
    labels: list[int] = []
    cuts: list[int] = []
    original = loss_on == "original"
    messages = [("system", conversation.system if conversation.system is not None else system)]
    for role, content in messages + conversation.messages:
        start, role_nl, text, end = chatml_message_parts(tokenizer, role, content)
        assistant = role == "assistant"
        ids += start + role_nl + text + end + nl
        labels += start if original else [IGNORE_INDEX]
        labels += [IGNORE_INDEX] * len(role_nl)
        labels += text if assistant else [IGNORE_INDEX] * len(text)
        labels += end if original or assistant else [IGNORE_INDEX]
        labels += nl if original else [IGNORE_INDEX] * len(nl)
        if assistant:
            cuts.append(len(ids))
    return ids, labels, cuts


def encode_conversation(
    conversation: Any,
    tokenizer: Any,
    system: str = DEFAULT_SYSTEM,
    max_len: int | None = None,
    *,
    loss_on: str = "original",
) -> dict[str, list[int]]:
    """``{"input_ids": [...], "labels": [...]}`` (plain, unpadded lists) of one conversation.

    ``conversation`` is the original format's turn list (``[{"from": ..., "value": ...}, ...]``,
    an optional first system turn replacing ``system``), or a whole sample in either format.
    The tokens are those of :func:`~qwen.qwen_generation_utils.make_context` with the last
    answer, its ``<|im_end|>`` and a ``\\n`` appended: each message is
    ``<|im_start|>role\\ncontent<|im_end|>\\n``. Contents are plain text (special-token
    look-alikes stay text). Labels (``-100``: not trained), ``loss_on="original"`` (the
    original Qwen script's scheme): ``<|im_start|>``, ``<|im_end|>`` and the ``\\n`` after it
    trained in every message, role names and their ``\\n`` masked, system and user contents
    masked, assistant contents trained. ``loss_on="assistant"``: only the assistant contents
    and their ``<|im_end|>``.

    With ``max_len``, a longer conversation is cut after the last assistant turn that fits;
    :class:`SampleTooLongError` when even the first one does not.
    """
    ids, labels, cuts = _encode(to_conversation(conversation), tokenizer, system, loss_on)
    if max_len is not None and len(ids) > max_len:
        fitting = [cut for cut in cuts if cut <= max_len]
        if not fitting:
            raise SampleTooLongError(f"the first assistant turn ends after token {cuts[0]}, beyond max_len={max_len}")
        ids, labels = ids[: fitting[-1]], labels[: fitting[-1]]
    return {"input_ids": ids, "labels": labels}


# --------------------------------------------------------------------------- datasets


def pack_lengths(lengths: Sequence[int], max_len: int) -> list[list[int]]:
    """Indices of ``lengths`` grouped into rows of at most ``max_len`` tokens (best fit,
    longest first); each row's indices in ascending order, rows in order of their first index."""
    order = sorted(range(len(lengths)), key=lambda i: (-lengths[i], i))
    rows: list[list[int]] = []
    free: list[tuple[int, int]] = []  # (room left, row number), sorted
    for i in order:
        n = lengths[i]
        if n > max_len:
            raise ValueError(f"sample {i} has {n} tokens, more than max_len={max_len}")
        at = bisect.bisect_left(free, (n, -1))
        if at < len(free):
            room, row = free.pop(at)
        else:
            room, row = max_len, len(rows)
            rows.append([])
        rows[row].append(i)
        if room - n > 0:
            bisect.insort(free, (room - n, row))
    rows = [sorted(row) for row in rows]
    rows.sort(key=lambda row: row[0])
    return rows


class SupervisedDataset(torch.utils.data.Dataset):
    """Encoded conversations for ``Trainer``: items are ``input_ids`` and ``labels``
    (int64 tensors), with ``position_ids`` restarting at each sample when ``packing``.

    Every sample is encoded once at construction: samples longer than ``max_len`` are cut
    at a turn boundary (``overlong="truncate"``; dropped where even the first answer does
    not fit) or dropped (``overlong="drop"``), and the counts logged. ``lazy`` keeps only
    the lengths and encodes each item again when it is read (less memory, more CPU).
    ``packing`` puts several samples into one row of at most ``max_len`` tokens; the
    first label of every sample after the first in a row is masked, so no token learns
    from the sample before it, and the restarting ``position_ids`` keep attention within
    each sample.
    """

    def __init__(
        self,
        conversations: Sequence[Conversation],
        tokenizer: Any,
        max_len: int,
        *,
        system: str = DEFAULT_SYSTEM,
        loss_on: str = "original",
        overlong: str = "truncate",
        lazy: bool = False,
        packing: bool = False,
        name: str = "data",
    ):
        if overlong not in ("truncate", "drop"):
            raise ValueError(f"overlong must be 'truncate' or 'drop', got {overlong!r}")
        if loss_on not in LOSS_MODES:
            raise ValueError(f"loss_on must be one of {LOSS_MODES}, got {loss_on!r}")
        self.tokenizer, self.max_len, self.system, self.loss_on = tokenizer, max_len, system, loss_on
        self.lazy, self.packing = lazy, packing
        self.conversations: list[Conversation] = []
        self.sample_lengths: list[int] = []
        self._encoded: list[tuple[np.ndarray, np.ndarray]] = []
        self.truncated = self.dropped = 0
        self.original_lengths: list[int] = []
        for conversation in conversations:
            ids, labels, cuts = _encode(conversation, tokenizer, system, loss_on)
            self.original_lengths.append(len(ids))
            if len(ids) > max_len:
                fitting = [cut for cut in cuts if cut <= max_len]
                if overlong == "drop" or not fitting:
                    self.dropped += 1
                    continue
                self.truncated += 1
                kept_turns = _turns_before(conversation, cuts.index(fitting[-1]))
                conversation = dataclasses.replace(conversation, messages=conversation.messages[:kept_turns])
                ids, labels = ids[: fitting[-1]], labels[: fitting[-1]]
            self.conversations.append(conversation)
            self.sample_lengths.append(len(ids))
            if not lazy:
                self._encoded.append((np.asarray(ids, dtype=np.int32), np.asarray(labels, dtype=np.int32)))
        if self.truncated or self.dropped:
            logger.warning(
                "%s: %d samples longer than model_max_length=%d were truncated at a turn boundary, %d dropped",
                name,
                self.truncated,
                max_len,
                self.dropped,
            )
        if not self.conversations:
            raise ValueError(f"{name}: no sample fits in model_max_length={max_len} tokens")
        self.rows = pack_lengths(self.sample_lengths, max_len) if packing else [[i] for i in range(len(self))]
        self.lengths = [sum(self.sample_lengths[i] for i in row) for row in self.rows]

    def __len__(self) -> int:
        return len(self.rows) if hasattr(self, "rows") else len(self.conversations)

    def encoded(self, index: int) -> tuple[np.ndarray, np.ndarray]:
        """ids and labels of sample ``index`` (after truncation), as int32 arrays."""
        if not self.lazy:
            return self._encoded[index]
        ids, labels, _ = _encode(self.conversations[index], self.tokenizer, self.system, self.loss_on)
        return np.asarray(ids, dtype=np.int32), np.asarray(labels, dtype=np.int32)

    def __getitem__(self, index: int) -> dict[str, torch.Tensor]:
        parts = [self.encoded(i) for i in self.rows[index]]
        if not self.packing:
            ids, labels = parts[0]
            return {"input_ids": torch.from_numpy(ids).long(), "labels": torch.from_numpy(labels).long()}
        labels = []
        for k, (_, sample_labels) in enumerate(parts):
            sample_labels = sample_labels.copy()
            if k:
                sample_labels[0] = IGNORE_INDEX
            labels.append(sample_labels)
        return {
            "input_ids": torch.from_numpy(np.concatenate([ids for ids, _ in parts])).long(),
            "labels": torch.from_numpy(np.concatenate(labels)).long(),
            "position_ids": torch.cat([torch.arange(len(ids)) for ids, _ in parts]),
        }

    def stats(self) -> dict[str, Any]:
        """Counts and token-length statistics of the encoded samples."""
        lengths = np.asarray(self.sample_lengths)
        trained = sum(int((self.encoded(i)[1] != IGNORE_INDEX).sum()) for i in range(len(self.conversations)))
        return {
            "samples": len(self.conversations),
            "truncated": self.truncated,
            "dropped": self.dropped,
            "rows": len(self.rows),
            "tokens": int(lengths.sum()),
            "trained_tokens": trained,
            "length_min": int(lengths.min()),
            "length_mean": round(float(lengths.mean()), 1),
            "length_p50": int(np.percentile(lengths, 50)),
            "length_p95": int(np.percentile(lengths, 95)),
            "length_max": int(lengths.max()),
            "max_len": self.max_len,
        }


def _turns_before(conversation: Conversation, assistant_number: int) -> int:
    """How many messages end with the ``assistant_number``-th (0-based) assistant message."""
    seen = -1
    for k, (role, _) in enumerate(conversation.messages):
        if role == "assistant":
            seen += 1
            if seen == assistant_number:
                return k + 1
    raise IndexError(assistant_number)


@dataclasses.dataclass
class DataCollator:
    """Pads a batch to its longest row (rounded up to ``pad_to_multiple_of``): ``input_ids``
    with ``pad_token_id``, ``labels`` with -100. Unpacked rows get an ``attention_mask``;
    packed rows (items with ``position_ids``) get no mask, their padding continuing as one
    more sequence whose positions restart at 0, so the model keeps every sample apart."""

    pad_token_id: int
    pad_to_multiple_of: int | None = None

    def __call__(self, features: Iterable[dict[str, torch.Tensor]]) -> dict[str, torch.Tensor]:
        features = list(features)
        longest = max(len(f["input_ids"]) for f in features)
        if self.pad_to_multiple_of:
            longest = -(-longest // self.pad_to_multiple_of) * self.pad_to_multiple_of
        batch = len(features)
        input_ids = torch.full((batch, longest), self.pad_token_id, dtype=torch.long)
        labels = torch.full((batch, longest), IGNORE_INDEX, dtype=torch.long)
        packed = "position_ids" in features[0]
        if packed:
            position_ids = torch.arange(longest).repeat(batch, 1)
        else:
            attention_mask = torch.zeros((batch, longest), dtype=torch.long)
        for row, feature in enumerate(features):
            n = len(feature["input_ids"])
            input_ids[row, :n] = feature["input_ids"]
            labels[row, :n] = feature["labels"]
            if packed:
                position_ids[row, :n] = feature["position_ids"]
                position_ids[row, n:] = torch.arange(longest - n)
            else:
                attention_mask[row, :n] = 1
        out = {"input_ids": input_ids, "labels": labels}
        if packed:
            out["position_ids"] = position_ids
        else:
            out["attention_mask"] = attention_mask
        return out


# --------------------------------------------------------------------------- dry run


def render_labels(input_ids: Sequence[int], labels: Sequence[int], tokenizer: Any, color: bool = False) -> str:
    """The sample's text with its trained tokens marked: ``[[...]]`` around each trained
    run (underlined green instead where ``color``)."""
    out, run, trained = [], [], None

    def flush():
        if not run:
            return
        text = tokenizer.decode(run)
        if trained:
            text = f"\x1b[4;32m{text}\x1b[0m" if color else f"[[{text}]]"
        out.append(text)

    for token, label in zip(input_ids, labels, strict=True):
        is_trained = int(label) != IGNORE_INDEX
        if is_trained != trained:
            flush()
            run, trained = [], is_trained
        run.append(int(token))
    flush()
    return "".join(out)
