"""Generation helpers of the Qwen-1 models: ChatML prompts, stop words, decoding, chat.

Kept at the official import path (``qwen_generation_utils``) with the official names, so
existing user code and the official README's batch example keep working:

- :func:`make_context` builds the prompt: the one ChatML prompt builder of this
  repository, for ``chat()``, serving, finetuning data and evaluation alike,
- :func:`decode_tokens` turns generated ids back into the response text,
- :func:`get_stop_words_ids`, :class:`StopWordsCriteria` and
  :class:`StopWordsLogitsProcessor` deal with stop words,
- :class:`QWenChatMixin` gives :class:`QWenLMHeadModel` its ``chat()``,
  ``chat_stream()`` and ``chat_batch()`` methods.

The tokenizer is used through its public API only (``encode`` with
``allowed_special``/``disallowed_special``, ``decode`` with ``errors``, the attributes
``im_start_id``, ``im_end_id`` and ``eod_id``), so this module never imports it.
"""

from __future__ import annotations

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
# Used to pad batched prompts: a special token the models never generate, so logits
# processors that look at the prompt ids (repetition_penalty) leave real tokens alone.
_BATCH_PAD_TOKEN = "<|extra_0|>"


class UnknownChatFormatError(ValueError, NotImplementedError):
    """A ``chat_format`` other than "chatml" or "raw". Also a ``NotImplementedError``,
    the type the official code raised."""


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
        if isinstance(turn, (str, bytes)) or len(turn) != 2:
            raise TypeError(f"history[{index}] must be a (query, response) pair, got {turn!r}")
        query, response = turn
        if not isinstance(query, str) or not isinstance(response, str):
            raise TypeError(
                f"history[{index}] must hold two strings, got ({type(query).__name__}, {type(response).__name__})"
            )
        turns.append((query, response))
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

    ChatML (the -Chat models)::

        <|im_start|>system\\n{system}<|im_end|>
        <|im_start|>user\\n{q}<|im_end|>\\n<|im_start|>assistant\\n{r}<|im_end|>   (each kept turn)
        <|im_start|>user\\n{query}<|im_end|>\\n<|im_start|>assistant\\n

    (lines joined by ``\\n``). Every message is ``<|im_start|>`` + the role word + ``\\n`` +
    the content + ``<|im_end|>``: the markers are inserted as token ids and the role
    words and contents are tokenised separately, as plain text. Text in a query, a
    response or the system prompt that looks like a special token (``<|im_end|>``) is
    therefore never turned into one, so it cannot forge a turn. The token ids are those
    of the official code.

    History is kept newest turn first, as long as the system message and the kept turns
    stay below ``max_window_size`` tokens (as in the official code, the current query is
    not counted); the first turn that does not fit and all older ones are dropped.
    ``max_window_size=None`` keeps everything.

    ``chat_format="raw"`` (the base models) returns the query alone, encoded as it is.

    Raises:
        UnknownChatFormatError: for any other ``chat_format``.
        TypeError: if ``history`` is not a list of ``(query, response)`` string pairs.
    """
    _check_chat_format(chat_format)
    if not isinstance(query, str):
        raise TypeError(f"query must be a string, got {type(query).__name__}")
    if chat_format == "raw":
        return query, list(tokenizer.encode(query))
    if not isinstance(system, str):
        raise TypeError(f"system must be a string, got {type(system).__name__}")
    history = _check_history(history)

    im_start, im_end = [tokenizer.im_start_id], [tokenizer.im_end_id]
    nl = list(tokenizer.encode("\n"))

    def plain(text: str) -> list[int]:
        return list(tokenizer.encode(text, allowed_special=set(), disallowed_special=()))

    def message(role: str, content: str) -> tuple[str, list[int]]:
        return f"{IM_START}{role}\n{content}{IM_END}", im_start + plain(role) + nl + plain(content) + im_end

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


# --------------------------------------------------------------------------- stop words


def get_stop_words_ids(chat_format: str, tokenizer: Any) -> list[list[int]]:
    """Stop words of a chat format, as lists of token ids (the official values).

    chatml: ``[[<|im_end|>], [<|im_start|>]]``; raw: ``[ids of "Human:", [<|endoftext|>]]``.
    """
    _check_chat_format(chat_format)
    if chat_format == "chatml":
        return [[tokenizer.im_end_id], [tokenizer.im_start_id]]
    return [list(tokenizer.encode("Human:")), [tokenizer.eod_id]]


def _normalize_stop_words(stop_words_ids) -> list[list[int]]:
    words = []
    for word in stop_words_ids:
        if isinstance(word, int):
            word = [word]
        word = [int(t) for t in word]
        if word:
            words.append(word)
    return words


def _as_id_list(ids) -> list[int]:
    if ids is None:
        return []
    if isinstance(ids, torch.Tensor):
        ids = ids.tolist()
    if isinstance(ids, int):
        return [ids]
    return [int(i) for i in ids]


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


class StopWordsLogitsProcessor(LogitsProcessor):
    """Forces ``eos_token_id`` as the next token of every row whose ids end with one of
    ``stop_words_ids`` (lists of token ids; multi-token sequences allowed), so generation
    ends right after a stop word.

    The official name and arguments, kept for user code; ``generate()`` of this package
    stops on ``stop_words_ids`` through :class:`StopWordsCriteria` instead, which does not
    spend an extra step on the end token. A stop word equal to ``[eos_token_id]`` is
    ignored (``generate`` already stops there).
    """

    def __init__(self, stop_words_ids: Iterable[Iterable[int]], eos_token_id: int | Sequence[int]):
        message = f"stop_words_ids must be a non-empty list of non-empty token-id lists, got {stop_words_ids!r}"
        if isinstance(stop_words_ids, (str, bytes)) or not isinstance(stop_words_ids, Iterable):
            raise ValueError(message)
        words = []
        for word in stop_words_ids:
            if isinstance(word, (str, bytes)) or not isinstance(word, Iterable):
                raise ValueError(message)
            ids = [_token_id(t) for t in word]
            if not ids or None in ids:
                raise ValueError(message)
            words.append(ids)
        if not words:
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


def _token_id(value: Any) -> int | None:
    """``value`` as a non-negative Python int (also from numpy or 0-d tensor integers), else None."""
    if isinstance(value, bool):
        return None
    try:
        value = operator.index(value)
    except TypeError:
        return None
    return value if value >= 0 else None


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
    """The response text in ``tokens`` (the prompt's ``context_length`` ids followed by
    the generated ones), with surrounding whitespace stripped.

    The text ends before the first ``<|im_end|>``, ``<|im_start|>`` or ``<|endoftext|>``
    (chatml) or before the first ``<|endoftext|>`` (raw); anything after it (padding of a
    finished batch row, say) is dropped. ``errors`` is the ``bytes.decode`` error handler
    for bytes that do not form valid UTF-8.

    The prompt is split off by token count (``context_length``), which stays exact when
    the tokenizer normalised the prompt text; ``raw_text_len`` (the prompt's length in
    characters) is accepted for compatibility with the official signature. With
    ``return_end_reason`` the result is ``(text, reason)``, reason being
    ``"Gen length N"`` (ran out of tokens) or ``"Gen '<|im_end|>'"`` (the end token met).
    ``verbose`` logs the raw and the final text at INFO level.
    """
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
    """The response so far. Until the response is complete, trailing U+FFFD characters
    are held back: they are (or may be) the first bytes of a character whose remaining
    bytes arrive with the next tokens."""
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

    Load a model this way when its decoding will run in other threads (``chat_stream``'s
    generation thread, a server's engine loop). torch's parallel work on the main thread
    leaves OpenMP worker threads behind, kept for the main thread; once more OpenMP
    threads exist than cores, the OpenMP runtime (GNU libgomp) stops spinning between
    parallel regions, and every decoding step in another thread ran 10-20% slower (2-core
    CPU, 1.8B bf16 model, one row or sixteen). A thread that has ended leaves none behind.
    """
    result: list[Any] = []
    failure: list[BaseException] = []

    def run() -> None:
        try:
            result.append(fn(*args, **kwargs))
        except BaseException as error:  # handed back to the caller
            failure.append(error)

    thread = threading.Thread(target=run, name="qwen-loader")
    thread.start()
    thread.join()
    if failure:
        raise failure[0]
    return result[0]


class _TokenQueueStreamer(BaseStreamer):
    """Puts the generated token ids (the prompt skipped) on a queue, as lists of ints."""

    def __init__(self, sink: queue.SimpleQueue):
        self.sink = sink
        self.prompt_seen = False

    def put(self, value: torch.Tensor) -> None:
        if not self.prompt_seen:
            self.prompt_seen = True
            return
        self.sink.put([int(t) for t in value.reshape(-1).tolist()])

    def end(self) -> None:
        pass  # the generation thread signals the end itself, also after an exception


class _EventCriteria(StoppingCriteria):
    """Stops every row once ``event`` is set (checked after each generated token)."""

    def __init__(self, event: threading.Event):
        self.event = event

    def __call__(self, input_ids: torch.LongTensor, scores, **kwargs) -> torch.BoolTensor:
        return torch.full((input_ids.shape[0],), self.event.is_set(), dtype=torch.bool, device=input_ids.device)


# --------------------------------------------------------------------------- chat


def _bad_chat_format_message(chat_format: Any, method: str) -> str:
    return (
        f"model.{method}() needs a chat model, but this model's generation config has "
        f"chat_format={chat_format!r} instead of 'chatml'. This is probably a base (pretrained) "
        "checkpoint such as Qwen/Qwen-7B: load the -Chat checkpoint (e.g. Qwen/Qwen-7B-Chat) to chat, or "
        "use model.generate() for plain text completion with a base model. For a chat finetune whose "
        "generation_config.json lacks the setting, set model.generation_config.chat_format = 'chatml' "
        "(and max_window_size), or pass such a generation_config."
    )


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
    ``chat_format`` (which must be "chatml") and ``max_window_size``, stop at
    ``<|im_end|>``/``<|im_start|>`` (plus any ``stop_words_ids`` given, and those of the
    generation config) and decode with :func:`decode_tokens`. Further keyword arguments
    (``max_new_tokens``, ``do_sample``, ``temperature``, ``top_p``, ``top_k``,
    ``repetition_penalty``, ``logits_processor``, ...) go to ``generate()``;
    ``max_window_size=`` overrides the generation config's.
    """

    def _prepare_chat(
        self,
        method: str,
        tokenizer: Any,
        query: str,
        history: HistoryType | None,
        system: str,
        stop_words_ids: Sequence[Sequence[int]] | None,
        generation_config: Any,
        generate_kwargs: dict[str, Any],
    ) -> _ChatRequest:
        kwargs = dict(generate_kwargs)
        for name in ("stream", "streamer", "return_dict_in_generate"):
            if name in kwargs:
                hint = "; use model.chat_stream() to stream" if name != "return_dict_in_generate" else ""
                raise TypeError(f"model.{method}() takes no `{name}` argument{hint}")
        if generation_config is None:
            generation_config = self.generation_config
        chat_format = getattr(generation_config, "chat_format", None)
        if chat_format != "chatml":
            raise ChatFormatError(_bad_chat_format_message(chat_format, method))
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
        config, model_kwargs = _generation_inputs(generation_config, kwargs)
        return _ChatRequest(raw_text, context, history, stop, config, model_kwargs)

    def _generate_chat(self, input_ids: torch.Tensor, attention_mask: torch.Tensor, request: _ChatRequest, **extra):
        return self.generate(
            input_ids,
            attention_mask=attention_mask,
            stop_words_ids=request.stop_words_ids,
            generation_config=request.generation_config,
            **request.model_kwargs,
            **extra,
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
        """One chat turn: ``(response, history)``.

        Args:
            tokenizer: The model's ``QWenTokenizer``.
            query: The user's message.
            history: Earlier turns as ``(query, response)`` pairs, oldest first. Never
                modified: the returned history is a new list.
            system: The system prompt.
            stop_words_ids: Extra stop sequences (lists of token ids), on top of
                ``<|im_end|>`` and ``<|im_start|>``.
            generation_config: Used instead of ``self.generation_config``; its
                ``chat_format`` must be "chatml" (a chat model) and its
                ``max_window_size`` bounds the kept history.
            **generate_kwargs: Passed to ``generate()`` (``max_new_tokens``,
                ``do_sample``, ``temperature``, ``top_p``, ``repetition_penalty``, ...).
                ``max_window_size=`` overrides the config's; ``append_history=False``
                returns the history without the new turn.

        Returns:
            The response text (stripped, up to the first end token) and the history with
            ``(query, response)`` appended.

        Raises:
            ChatFormatError: for a generation config whose chat_format is not "chatml"
                (a base model).
        """
        append_history = generate_kwargs.pop("append_history", True)
        request = self._prepare_chat(
            "chat", tokenizer, query, history, system, stop_words_ids, generation_config, generate_kwargs
        )
        input_ids = torch.tensor([request.context], dtype=torch.long, device=self.device)
        outputs = self._generate_chat(input_ids, torch.ones_like(input_ids), request)
        response = decode_tokens(
            outputs[0],
            tokenizer,
            raw_text_len=len(request.raw_text),
            context_length=len(request.context),
            chat_format="chatml",
            errors="replace",
        )
        history = request.history
        if append_history:
            history.append((query, response))
        return response, history

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
        """Like :meth:`chat`, but returns an iterator over the growing response.

        Each item is the whole response so far (not a delta), and each item extends the
        previous one; the last item equals what ``chat()`` returns for the same
        arguments. A character whose UTF-8 bytes are split over several tokens shows up
        once all of them have arrived, so items never end in a broken character. The
        history is not returned: append ``(query, last_item)`` yourself.

        Generation runs in a background thread, started by the first ``next()``.
        Closing the iterator (``close()``, leaving a ``for`` loop over it with ``break``
        and dropping it, or garbage collection) stops generation after the current token
        and waits for the thread to end. The arguments are checked and the prompt built
        when this method is called.
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
                self._generate_chat(
                    input_ids,
                    torch.ones_like(input_ids),
                    request,
                    streamer=_TokenQueueStreamer(tokens),
                    stopping_criteria=criteria,
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
            while True:
                item = tokens.get()
                if item is _END:
                    break
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
        The prompts are left-padded with ``<|extra_0|>`` and masked; the model derives
        positions from the attention mask, so padding changes nothing: under greedy
        decoding each response equals what :meth:`chat` returns for that query alone (up
        to floating-point differences between batched and single-row kernels). Each row
        ends at its own first stop word. Arguments as in :meth:`chat`; the histories
        passed in are not modified.
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
        append_history = generate_kwargs.pop("append_history", True)
        requests = [
            self._prepare_chat(
                "chat_batch", tokenizer, query, history, system, stop_words_ids, generation_config, generate_kwargs
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

        eos_ids = set(_as_id_list(first.generation_config.eos_token_id))
        responses: list[str] = []
        new_histories: list[HistoryType] = []
        for query, request, sequence in zip(queries, requests, outputs, strict=True):
            generated = _until_stop(request.context, sequence[width:], request.stop_words_ids, eos_ids)
            response = decode_tokens(
                request.context + generated,
                tokenizer,
                raw_text_len=len(request.raw_text),
                context_length=len(request.context),
                chat_format="chatml",
                errors="replace",
            )
            if append_history:
                request.history.append((query, response))
            responses.append(response)
            new_histories.append(request.history)
        return responses, new_histories


def _generation_inputs(generation_config: Any, generate_kwargs: dict[str, Any]) -> tuple[Any, dict[str, Any]]:
    """A copy of ``generation_config`` updated with the generation arguments among
    ``generate_kwargs``, and the remaining (model) arguments: ``generate()`` wants one or
    the other, not a config and generation arguments together."""
    config = copy.deepcopy(generation_config)
    model_kwargs = config.update(**generate_kwargs)
    config.return_dict_in_generate = False
    return config, model_kwargs


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
