"""Generation helpers of the Qwen-1 models: ChatML prompts, stop words, decoding, chat.

The official module's path and names, so user code written for the official checkpoints keeps
working. :func:`make_context` is the one ChatML prompt builder of this repository (chat,
serving, finetuning data, evaluation); :class:`QWenChatMixin` gives the model ``chat()``,
``chat_stream()`` and ``chat_batch()``. The tokenizer is used through its public API only.
"""

from __future__ import annotations

import concurrent.futures
import copy
import dataclasses
import itertools
import logging
import operator
import queue
import threading
from collections.abc import Iterable, Iterator, Sequence
from typing import Any

import torch
from transformers import LogitsProcessor, StoppingCriteria, StoppingCriteriaList
from transformers.generation.streamers import BaseStreamer

logger = logging.getLogger(__name__)

# Types, as in the official module.
HistoryType = list[tuple[str, str]]
TokensType = list[int]
BatchTokensType = list[list[int]]

CHAT_FORMATS = ("chatml", "raw")
DEFAULT_SYSTEM = "You are a helpful assistant."
IM_START = "<|im_start|>"
IM_END = "<|im_end|>"
ENDOFTEXT = "<|endoftext|>"
# Pads batched prompts: a special token the models never generate, so logits processors
# that look at the prompt ids (repetition_penalty) leave real tokens alone.
_BATCH_PAD_TOKEN = "<|extra_0|>"
# GenerationConfig's sampling-only fields, at values that make them unused (and unreported).
_SAMPLING_DEFAULTS = {"temperature": 1.0, "top_p": 1.0, "top_k": 50, "typical_p": 1.0, "min_p": None}
_SAMPLING_DEFAULTS |= {"epsilon_cutoff": 0.0, "eta_cutoff": 0.0}


class UnknownChatFormatError(ValueError, NotImplementedError):
    """A ``chat_format`` other than "chatml" or "raw" (a ``NotImplementedError`` in the official code)."""


class ChatFormatError(ValueError):
    """``chat()`` called on a model whose generation config is not a chat (ChatML) one."""


def _check_chat_format(chat_format: str) -> None:
    if chat_format not in CHAT_FORMATS:
        raise UnknownChatFormatError(
            f"Unknown chat_format {chat_format!r}: Qwen-1 models know 'chatml' (the -Chat models) and "
            "'raw' (the base models, plain text completion)."
        )


def _check_history(history: Iterable[Sequence[str]] | None) -> HistoryType:
    """A new list of ``(query, response)`` tuples (never the caller's list)."""
    if history is None:
        return []
    if isinstance(history, (str, bytes)):
        raise TypeError("history must be a list of (query, response) pairs, got a string")
    turns: HistoryType = []
    for index, turn in enumerate(history):
        if isinstance(turn, (str, bytes)) or len(turn) != 2 or not all(isinstance(text, str) for text in turn):
            raise TypeError(f"history[{index}] must be a (query, response) pair of strings, got {turn!r}")
        turns.append((turn[0], turn[1]))
    return turns


# --------------------------------------------------------------------------- prompts


def make_context(
    tokenizer: Any,
    query: str,
    history: HistoryType | None = None,
    system: str = "",
    max_window_size: int | None = 6144,
    chat_format: str = "chatml",
) -> tuple[str, TokensType]:
    """The prompt for ``query`` after ``history``: ``(raw_text, context_tokens)``.

    ChatML (the -Chat models), lines joined by ``\\n``::

        <|im_start|>system\\n{system}<|im_end|>
        <|im_start|>user\\n{q}<|im_end|>\\n<|im_start|>assistant\\n{r}<|im_end|>   (each kept turn)
        <|im_start|>user\\n{query}<|im_end|>\\n<|im_start|>assistant\\n

    The markers are token ids; role words and contents are encoded as plain text, so text
    that looks like a special token (``<|im_end|>``) cannot forge a turn. History is kept
    newest turn first while the system message and the kept turns stay below
    ``max_window_size`` tokens (the query is not counted, as in the official code; ``None``
    keeps everything). ``chat_format="raw"`` (the base models) returns the query alone.
    """
    _check_chat_format(chat_format)
    if not isinstance(query, str):
        raise TypeError(f"query must be a string, got {type(query).__name__}")
    if chat_format == "raw":
        return query, list(tokenizer.encode(query))
    if not isinstance(system, str):
        raise TypeError(f"system must be a string, got {type(system).__name__}")
    history = _check_history(history)

    im_start = [tokenizer.im_start_id]
    nl = list(tokenizer.encode("\n"))

    def plain(text: str) -> list[int]:
        return list(tokenizer.encode(text, allowed_special=set(), disallowed_special=()))

    def message(role: str, content: str) -> tuple[str, list[int]]:
        return f"{IM_START}{role}\n{content}{IM_END}", sum(chatml_message_parts(tokenizer, role, content), [])

    system_text, system_ids = message("system", system)
    used = len(system_ids)
    kept_text: list[str] = []  # newest first
    kept_ids: list[list[int]] = []
    for turn_query, turn_response in reversed(history):
        query_text, query_ids = message("user", turn_query)
        response_text, response_ids = message("assistant", turn_response)
        turn_ids = nl + query_ids + nl + response_ids
        if max_window_size is not None and used + len(turn_ids) >= max_window_size:
            break
        used += len(turn_ids)
        kept_ids.append(turn_ids)
        kept_text.append(f"\n{query_text}\n{response_text}")

    query_text, query_ids = message("user", query)
    context = list(system_ids)
    for turn_ids in reversed(kept_ids):
        context += turn_ids
    context += nl + query_ids + nl + im_start + plain("assistant") + nl
    raw_text = system_text + "".join(reversed(kept_text)) + f"\n{query_text}\n{IM_START}assistant\n"
    return raw_text, context


def chatml_message_parts(tokenizer: Any, role: str, content: str) -> tuple[list[int], ...]:
    """The ids of one ChatML message in four parts: ``[<|im_start|>]``, the role word and
    ``\n``, the content (plain text: special-token look-alikes stay text) and
    ``[<|im_end|>]``. :func:`make_context` joins messages with ``\n``; finetuning data
    (``finetune_data.py``) labels each part."""
    nl = list(tokenizer.encode("\n"))

    def plain(text: str) -> list[int]:
        return list(tokenizer.encode(text, allowed_special=set(), disallowed_special=()))

    return [tokenizer.im_start_id], plain(role) + nl, plain(content), [tokenizer.im_end_id]


# --------------------------------------------------------------------------- stop words


def get_stop_words_ids(chat_format: str, tokenizer: Any) -> list[list[int]]:
    """Stop words of a chat format as token-id lists (the official values): chatml
    ``[[<|im_end|>], [<|im_start|>]]``, raw ``[ids of "Human:", [<|endoftext|>]]``."""
    _check_chat_format(chat_format)
    if chat_format == "chatml":
        return [[tokenizer.im_end_id], [tokenizer.im_start_id]]
    return [list(tokenizer.encode("Human:")), [tokenizer.eod_id]]


def _normalize_stop_words(stop_words_ids) -> list[list[int]]:
    """Token-id lists (a bare int is a one-token word; empty words are dropped)."""
    words = [[int(t) for t in ([word] if isinstance(word, int) else word)] for word in stop_words_ids]
    return [word for word in words if word]


def _as_id_list(ids) -> list[int]:
    if isinstance(ids, torch.Tensor):
        ids = ids.tolist()
    return [] if ids is None else [ids] if isinstance(ids, int) else [int(i) for i in ids]


def _token_id(value: Any) -> int | None:
    """``value`` as a non-negative Python int (also from numpy or 0-d tensor integers), else None."""
    try:
        index = operator.index(value)
    except TypeError:
        return None
    return None if isinstance(value, bool) or index < 0 else index


class StopWordsCriteria(StoppingCriteria):
    """Stops a row once its ids end with any of ``stop_words_ids`` (token-id lists, several
    tokens long or one); the stop word stays in the output, as in the official code."""

    def __init__(self, stop_words_ids):
        self.stop_words_ids = _normalize_stop_words(stop_words_ids)

    def __call__(self, input_ids: torch.LongTensor, scores, **kwargs) -> torch.BoolTensor:
        done = torch.zeros(input_ids.shape[0], dtype=torch.bool, device=input_ids.device)
        for word in self.stop_words_ids:
            if len(word) <= input_ids.shape[1]:
                target = torch.tensor(word, device=input_ids.device, dtype=input_ids.dtype)
                done |= (input_ids[:, -len(word) :] == target).all(dim=-1)
        return done


class StopWordsLogitsProcessor(LogitsProcessor):
    """Forces ``eos_token_id`` as the next token of every row that ends with one of
    ``stop_words_ids``. The official name and arguments, for user code; ``generate()`` of
    this package stops at ``stop_words_ids`` through :class:`StopWordsCriteria`, which
    spends no extra step on the end token. A stop word ``[eos_token_id]`` is dropped."""

    def __init__(self, stop_words_ids: Iterable[Iterable[int]], eos_token_id: int | Sequence[int]):
        message = f"stop_words_ids must be a non-empty list of non-empty token-id lists, got {stop_words_ids!r}"
        if isinstance(stop_words_ids, (str, bytes)) or not isinstance(stop_words_ids, Iterable):
            raise ValueError(message)
        words = [
            [_token_id(t) for t in word] if isinstance(word, Iterable) and not isinstance(word, (str, bytes)) else []
            for word in stop_words_ids
        ]
        if not words or any(not word or None in word for word in words):
            raise ValueError(message)
        eos = _as_id_list(eos_token_id)
        if not eos:
            raise ValueError("eos_token_id is required: it is the token forced after a stop word")
        self.eos_token_id = eos[0]
        self.stop_words_ids = [word for word in words if word != [self.eos_token_id]]
        self._criteria = StopWordsCriteria(self.stop_words_ids)

    def __call__(self, input_ids: torch.LongTensor, scores: torch.FloatTensor) -> torch.FloatTensor:
        stopped = self._criteria(input_ids, scores)
        if stopped.any():
            scores = scores.clone()
            scores[stopped] = float("-inf")
            scores[stopped, self.eos_token_id] = 0.0
        return scores


# --------------------------------------------------------------------------- decoding


def _end_ids(chat_format: str, tokenizer: Any) -> frozenset[int]:
    """Token ids at which a response ends (the first one is cut off with the rest)."""
    if chat_format == "chatml":
        return frozenset((tokenizer.im_start_id, tokenizer.im_end_id, tokenizer.eod_id))
    return frozenset((tokenizer.eod_id,))


def _cut(generated: Sequence[int], end_ids: frozenset[int]) -> tuple[list[int], int | None]:
    """``generated`` up to (without) the first end token, and that token (or None)."""
    for index, token in enumerate(generated):
        if token in end_ids:
            return list(generated[:index]), token
    return list(generated), None


def decode_tokens(
    tokens: torch.Tensor | TokensType,
    tokenizer: Any,
    raw_text_len: int,
    context_length: int,
    chat_format: str,
    verbose: bool = False,
    return_end_reason: bool = False,
    errors: str = "replace",
) -> str | tuple[str, str]:
    """The response in ``tokens`` (``context_length`` prompt ids, then the generated ones),
    stripped, up to the first ``<|im_end|>``, ``<|im_start|>`` or ``<|endoftext|>`` (chatml)
    or ``<|endoftext|>`` (raw); ``errors`` handles bytes that are not UTF-8. ``raw_text_len``
    is unused (the official signature). ``return_end_reason`` returns ``(text, reason)``, reason
    ``"Gen length N"`` or ``"Gen '<|im_end|>'"``; ``verbose`` logs the raw and the final text."""
    _check_chat_format(chat_format)
    if isinstance(tokens, torch.Tensor):
        tokens = tokens.tolist()
    generated = [int(t) for t in tokens[context_length:]]
    kept, end_token = _cut(generated, _end_ids(chat_format, tokenizer))
    text = tokenizer.decode(kept, errors=errors).strip()
    if end_token is None:
        end_reason = f"Gen length {len(generated)}"
    else:
        end_reason = f"Gen {tokenizer.decode([end_token], errors=errors)!r}"
    if verbose:
        logger.info("raw generation: %r", tokenizer.decode(generated, errors=errors))
        logger.info("end reason: %s; response: %r", end_reason, text)
    return (text, end_reason) if return_end_reason else text


def _stream_text(tokenizer: Any, generated: Sequence[int], end_ids: frozenset[int], final: bool) -> str:
    """The response so far. Until it is complete, trailing U+FFFD characters are held back:
    they may be the first bytes of a character whose other bytes come with the next tokens."""
    kept, end_token = _cut(generated, end_ids)
    text = tokenizer.decode(kept, errors="replace")
    if not final and end_token is None:
        text = text.rstrip("\ufffd")
    return text.strip()


# --------------------------------------------------------------------------- streaming


_END = object()
_stream_ids = itertools.count()


def call_off_main_thread(fn: Any, *args: Any, **kwargs: Any) -> Any:
    """``fn(*args, **kwargs)`` run in a short-lived thread: its result, or its exception.

    Load a model this way when it will decode in other threads (``chat_stream``, a server):
    torch's parallel work on the main thread leaves OpenMP workers behind, and with more of
    them than cores GNU libgomp stops spinning between parallel regions, slowing every
    decoding step in other threads. A thread that has ended leaves none behind."""
    with concurrent.futures.ThreadPoolExecutor(1, thread_name_prefix="qwen-loader") as thread:
        return thread.submit(fn, *args, **kwargs).result()  # leaving the block joins the thread


class _TokenQueueStreamer(BaseStreamer):
    """Puts the generated token ids (the prompt skipped) on a queue, as lists of ints."""

    def __init__(self, sink: queue.SimpleQueue):
        self.sink = sink
        self.prompt_seen = False

    def put(self, value: torch.Tensor) -> None:
        if self.prompt_seen:
            self.sink.put([int(t) for t in value.reshape(-1).tolist()])
        self.prompt_seen = True

    def end(self) -> None:
        pass  # the generation thread signals the end itself, also after an exception


class _EventCriteria(StoppingCriteria):
    """Stops every row once ``event`` is set (checked after each generated token)."""

    def __init__(self, event: threading.Event):
        self.event = event

    def __call__(self, input_ids: torch.LongTensor, scores, **kwargs) -> torch.BoolTensor:
        return torch.full((input_ids.shape[0],), self.event.is_set(), dtype=torch.bool, device=input_ids.device)


# --------------------------------------------------------------------------- chat


def greedy_config_without_sampling_fields(config: Any) -> Any:
    """A copy of the ``GenerationConfig`` ``config``; if its ``do_sample`` is False (not None),
    with the sampling-only fields at their defaults, so that ``generate()`` does not warn that a
    checkpoint's ``top_p``/``top_k`` are unused. Greedy and beam search never read them."""
    config = copy.deepcopy(config)
    if config.do_sample is False:
        for name, value in _SAMPLING_DEFAULTS.items():
            setattr(config, name, value)
    return config


@dataclasses.dataclass
class _ChatRequest:
    """A checked chat call: the prompt and what goes to ``generate()``."""

    raw_text: str
    context: list[int]
    history: HistoryType  # a copy of the caller's
    stop_words_ids: list[list[int]]
    generation_config: Any  # a copy, updated with the generation arguments
    model_kwargs: dict[str, Any]  # the other arguments of generate()


class QWenChatMixin:
    """``chat()``, ``chat_stream()`` and ``chat_batch()`` for :class:`QWenLMHeadModel`.

    All three build the prompt with :func:`make_context` from the generation config's
    ``chat_format`` (which must be "chatml") and ``max_window_size`` (``max_window_size=``
    overrides it), stop at ``<|im_end|>``/``<|im_start|>`` and at the ``stop_words_ids``
    given or in the generation config, and decode with :func:`decode_tokens`. Further
    keyword arguments (``max_new_tokens``, ``do_sample``, ``top_p``, ``logits_processor``,
    ...) go to ``generate()``; ``append_history=False`` leaves the new turn out of the
    returned history. The caller's history is never modified.
    """

    def _prepare_chat(self, method, tokenizer, query, history, system, stop_words_ids, generation_config, kwargs):
        """Check one chat call and build its :class:`_ChatRequest` (``method`` names it in errors)."""
        kwargs = dict(kwargs)
        for name in ("stream", "streamer", "return_dict_in_generate"):
            if name in kwargs:
                hint = "; use model.chat_stream() to stream" if name != "return_dict_in_generate" else ""
                raise TypeError(f"model.{method}() takes no `{name}` argument{hint}")
        if generation_config is None:
            generation_config = self.generation_config
        chat_format = getattr(generation_config, "chat_format", None)
        if chat_format != "chatml":
            raise ChatFormatError(
                f"model.{method}() needs a chat model, but this model's generation config has chat_format="
                f"{chat_format!r} instead of 'chatml': probably a base checkpoint such as Qwen/Qwen-7B. Load the -Chat "
                "checkpoint (e.g. Qwen/Qwen-7B-Chat) to chat, or use model.generate() for plain completion. For a chat "
                "finetune lacking the setting, set model.generation_config.chat_format = 'chatml' (and max_window_size)."
            )
        max_window_size = kwargs.pop("max_window_size", None)
        if max_window_size is None:
            max_window_size = getattr(generation_config, "max_window_size", None)
        history = _check_history(history)
        raw_text, context = make_context(
            tokenizer, query, history=history, system=system, max_window_size=max_window_size, chat_format=chat_format
        )
        stop = _normalize_stop_words(stop_words_ids or [])
        stop += _normalize_stop_words(kwargs.pop("stop_words_ids", None) or [])
        stop += _normalize_stop_words(getattr(generation_config, "stop_words_ids", None) or [])
        stop += get_stop_words_ids(chat_format, tokenizer)
        stop = [list(word) for word in dict.fromkeys(tuple(word) for word in stop)]
        # generate() wants a config or generation arguments, not both: the config gets them.
        config = copy.deepcopy(generation_config)
        config.do_sample = kwargs.get("do_sample", config.do_sample)
        if config.do_sample is None:  # as generate() decides
            config.do_sample = bool(self.generation_config.do_sample)
        config = greedy_config_without_sampling_fields(config)
        model_kwargs = config.update(**kwargs)
        config.return_dict_in_generate = False
        return _ChatRequest(raw_text, context, history, stop, config, model_kwargs)

    def _generate_chat(self, input_ids: torch.Tensor, attention_mask: torch.Tensor, request: _ChatRequest, **extra):
        kwargs = dict(request.model_kwargs, stop_words_ids=request.stop_words_ids, **extra)
        return self.generate(
            input_ids, attention_mask=attention_mask, generation_config=request.generation_config, **kwargs
        )

    def chat(
        self,
        tokenizer: Any,
        query: str,
        history: HistoryType | None = None,
        system: str = DEFAULT_SYSTEM,
        stop_words_ids: Sequence[Sequence[int]] | None = None,
        generation_config: Any = None,
        **generate_kwargs: Any,
    ) -> tuple[str, HistoryType]:
        """One chat turn: ``(response, history)``, the history (oldest turn first) a new list with
        ``(query, response)`` added. ``stop_words_ids``: extra stop sequences (token-id lists);
        ``generation_config`` replaces ``self.generation_config``. Raises
        :class:`ChatFormatError` for a generation config whose chat_format is not "chatml"."""
        responses, histories = self._chat_rows(
            "chat", tokenizer, [query], [history], system, stop_words_ids, generation_config, generate_kwargs
        )
        return responses[0], histories[0]

    def chat_stream(
        self,
        tokenizer: Any,
        query: str,
        history: HistoryType | None = None,
        system: str = DEFAULT_SYSTEM,
        stop_words_ids: Sequence[Sequence[int]] | None = None,
        generation_config: Any = None,
        **generate_kwargs: Any,
    ) -> Iterator[str]:
        """Like :meth:`chat`, but an iterator over the growing response (not the history).

        Each item is the whole response so far and extends the previous one; the last equals
        what ``chat()`` returns. A character split over several tokens shows up once all of
        them have arrived. The arguments are checked now; generation runs in a thread started
        by the first ``next()``. Closing the iterator (``close()``, ``break``, garbage
        collection) stops generation after the current token and waits for the thread.
        """
        generate_kwargs.pop("append_history", None)
        request = self._prepare_chat(
            "chat_stream", tokenizer, query, history, system, stop_words_ids, generation_config, generate_kwargs
        )
        return self._stream_response(tokenizer, request)

    def _stream_response(self, tokenizer: Any, request: _ChatRequest) -> Iterator[str]:
        end_ids = _end_ids("chatml", tokenizer)
        cancel = threading.Event()
        tokens: queue.SimpleQueue = queue.SimpleQueue()
        failure: list[BaseException] = []
        criteria = StoppingCriteriaList(list(request.model_kwargs.pop("stopping_criteria", None) or []))
        criteria.append(_EventCriteria(cancel))
        input_ids = torch.tensor([request.context], dtype=torch.long, device=self.device)

        def run() -> None:
            try:
                streamer = _TokenQueueStreamer(tokens)
                self._generate_chat(
                    input_ids, torch.ones_like(input_ids), request, streamer=streamer, stopping_criteria=criteria
                )
            except BaseException as error:  # handed to the consumer
                failure.append(error)
            finally:
                tokens.put(_END)

        thread = threading.Thread(target=run, name=f"qwen-chat-stream-{next(_stream_ids)}", daemon=True)
        thread.start()
        try:
            generated: list[int] = []
            emitted = ""
            while (item := tokens.get()) is not _END:
                generated.extend(item)
                text = _stream_text(tokenizer, generated, end_ids, final=False)
                if text != emitted:  # only longer: text always extends the previous one
                    emitted = text
                    yield text
            if failure:
                raise failure[0]
            text = _stream_text(tokenizer, generated, end_ids, final=True)
            if text != emitted or not emitted:  # an empty response still yields one (empty) item
                yield text
        finally:
            cancel.set()
            thread.join()

    def chat_batch(
        self,
        tokenizer: Any,
        queries: Sequence[str],
        histories: Sequence[HistoryType | None] | None = None,
        system: str = DEFAULT_SYSTEM,
        stop_words_ids: Sequence[Sequence[int]] | None = None,
        generation_config: Any = None,
        **generate_kwargs: Any,
    ) -> tuple[list[str], list[HistoryType]]:
        """Several independent chats in one ``generate()`` call: ``(responses, histories)``.

        ``queries[i]`` continues ``histories[i]`` (None: a new chat); all share ``system``.
        The prompts are left-padded with ``<|extra_0|>`` and masked, so under greedy decoding
        each response equals what :meth:`chat` returns for that query alone (up to
        floating-point differences between batched and single-row kernels).
        """
        if isinstance(queries, str):
            raise TypeError("queries must be a list of strings; use model.chat() for a single query")
        queries = list(queries)
        if histories is None:
            histories = [None] * len(queries)
        elif isinstance(histories, (str, bytes)) or len(histories) != len(queries):
            raise ValueError("histories must be None or a list with one history (or None) per query")
        if generate_kwargs.get("num_return_sequences", 1) != 1:
            raise ValueError("model.chat_batch() returns one response per query; num_return_sequences must be 1")
        return self._chat_rows(
            "chat_batch", tokenizer, queries, histories, system, stop_words_ids, generation_config, generate_kwargs
        )

    def _chat_rows(
        self, method, tokenizer, queries, histories, system, stop_words_ids, generation_config, generate_kwargs
    ) -> tuple[list[str], list[HistoryType]]:
        """``chat()`` (one row) and ``chat_batch()``: generate for all rows at once and decode each."""
        append_history = generate_kwargs.pop("append_history", True)
        requests = [
            self._prepare_chat(
                method, tokenizer, query, history, system, stop_words_ids, generation_config, generate_kwargs
            )
            for query, history in zip(queries, histories, strict=True)
        ]
        if not requests:
            return [], []
        width = max(len(request.context) for request in requests)
        input_ids = torch.full((len(requests), width), _batch_pad_id(tokenizer), dtype=torch.long)
        attention_mask = torch.zeros((len(requests), width), dtype=torch.long)
        for row, request in enumerate(requests):
            input_ids[row, width - len(request.context) :] = torch.tensor(request.context, dtype=torch.long)
            attention_mask[row, width - len(request.context) :] = 1
        first = requests[0]
        outputs = self._generate_chat(input_ids.to(self.device), attention_mask.to(self.device), first).tolist()
        # chat() keeps the official behaviour with num_return_sequences > 1: the first sequence.
        outputs = outputs[:: first.generation_config.num_return_sequences or 1]
        eos_ids = set(_as_id_list(first.generation_config.eos_token_id))
        responses = []
        for query, request, sequence in zip(queries, requests, outputs, strict=True):
            generated = _until_stop(request.context, sequence[width:], request.stop_words_ids, eos_ids)
            context = request.context
            responses.append(
                decode_tokens(context + generated, tokenizer, len(request.raw_text), len(context), "chatml")
            )
            if append_history:
                request.history.append((query, responses[-1]))
        return responses, [request.history for request in requests]


def _batch_pad_id(tokenizer: Any) -> int:
    try:
        pad_id = tokenizer.convert_tokens_to_ids(_BATCH_PAD_TOKEN)
    except (KeyError, ValueError, TypeError):
        pad_id = None
    if isinstance(pad_id, int) and pad_id != getattr(tokenizer, "unk_token_id", None):
        return pad_id
    return tokenizer.eod_id


def _until_stop(context: list[int], generated: list[int], stop: list[list[int]], eos_ids: set[int]) -> list[int]:
    """``generated`` up to and including the first stop word or eos token: what
    ``generate()`` returns for this row alone (a finished batch row is padded after it)."""
    sequence = context + generated
    for index in range(len(generated)):
        end = len(context) + index + 1
        if generated[index] in eos_ids or any(
            len(word) <= end and sequence[end - len(word) : end] == word for word in stop
        ):
            return generated[: index + 1]
    return generated
