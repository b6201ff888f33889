"""A continuous-batching generation engine for one Qwen model.

One background thread owns the model and runs a loop of *steps*. Each step:

1. drops the rows whose requests were cancelled (client gone) and the cancelled
   requests still waiting;
2. admits waiting requests while the batch has room: their prompts are run through
   the model together (left-padded, one forward) into a fresh cache, their first
   tokens are sampled, and their cache rows are joined to the running batch;
3. runs one decoding forward over every running row (one new token each), samples
   each row's next token with its own settings, and lets finished rows leave.

So a request joins the batch at the next step after it arrives and leaves as soon as
it ends (iteration-level scheduling); the batch never waits for its slowest member.

The batch keeps one ``DynamicCache`` whose rows are left-padded to a common length,
with a 2-D attention mask marking the padding. Every row carries its own positions
(passed as ``position_ids``), so a row computes exactly what it would compute alone:
masked cache entries get zero attention weight. Rows are inserted by left-padding the
two caches to the same length and concatenating them along the batch axis, and
evicted by selecting the remaining rows (columns that became padding in every row are
trimmed). The model fixes each sequence's dynamic-NTK ``alpha`` when the sequence
starts and keeps it on the cache object; the engine keeps one alpha per row and sets
the current vector on the batched cache.

Each row samples with its own ``LogitsProcessorList`` (repetition penalty,
presence/frequency penalties, temperature, top-k, top-p) and its own
``torch.Generator`` (seeded from the request's ``seed``), so what a row samples does
not depend on what else is in the batch. Text is decoded incrementally per row:
stop strings are honoured while streaming and never emitted (text that could be the
start of a stop string is held back until it is known not to be one), and bytes of a
character split over several tokens are held back until the character is complete.

The engine knows nothing about HTTP; :mod:`qwen.serving.app` puts the OpenAI API on
top of it. It can also be used directly::

    engine = Engine(model, tokenizer, max_batch_size=8)
    engine.start()
    result = engine.generate(prompt_ids, SamplingParams(max_tokens=64, temperature=0))
    engine.stop()
"""

from __future__ import annotations

import collections
import dataclasses
import itertools
import logging
import random
import threading
import time
from collections.abc import Callable, Mapping, Sequence

import torch
from transformers import LogitsProcessor, LogitsProcessorList
from transformers.cache_utils import DynamicCache, DynamicLayer

from qwen.modeling_qwen import ntk_alpha_of, set_ntk_alpha

logger = logging.getLogger(__name__)

FINISH_REASONS = ("stop", "length", "cancelled", "error")
MAX_LOGPROBS = 20  # most alternatives reported per token
# Prompt log-probabilities are computed this many positions at a time (logits of
# 152k-token vocabularies are 0.6 MB a position in float32).
PROMPT_LOGPROB_CHUNK = 128


class EngineError(RuntimeError):
    """Base class of the engine's own errors."""


class QueueFullError(EngineError):
    """The batch and the waiting queue are full; try again later."""


class EngineStoppedError(EngineError):
    """The engine is not running."""


class ContextLengthError(ValueError):
    """Prompt plus requested completion do not fit in the model's context."""

    def __init__(self, prompt_tokens: int, max_tokens: int, max_model_len: int):
        self.prompt_tokens = prompt_tokens
        self.max_tokens = max_tokens
        self.max_model_len = max_model_len
        super().__init__(
            f"This model's maximum context length is {max_model_len} tokens. However, you requested "
            f"{prompt_tokens + max_tokens} tokens ({prompt_tokens} in the messages/prompt, {max_tokens} in the "
            "completion). Please reduce the length of the messages/prompt or the completion."
        )


# --------------------------------------------------------------------------- requests


@dataclasses.dataclass
class SamplingParams:
    """How one request is generated.

    ``temperature=0`` (or ``top_k=1``) is greedy decoding. ``top_k=0`` and ``top_p=1``
    switch those filters off. ``stop`` strings end the text (they are not part of it);
    ``stop_token_ids`` end it at a token (not decoded into the text, but counted as a
    completion token); ``ignore_eos`` disregards the stop tokens (benchmarks).
    ``strip`` removes surrounding whitespace from the text, as ``model.chat()`` does.
    ``forced_token_ids`` (a testing aid) replaces the model's choices by these tokens,
    then by the first stop token; the model still runs.

    ``logprobs`` (n >= 0) reports, with each generated token, its log-probability and
    the ``n`` most likely tokens'; ``prompt_logprobs`` (n >= 0) does the same for the
    prompt's tokens (from the second on), in the first update. Both are the model's own
    distribution (log-softmax of its logits), before penalties, ``logit_bias``,
    constraints and temperature. ``logit_bias`` maps token ids to values added to their
    logits (OpenAI's -100..100). ``logits_processors`` are factories, each called once
    per request, of further ``LogitsProcessor`` objects applied after the bias (for
    example a grammar constraint, :mod:`qwen.serving.constraints`); a processor sees
    the prompt and generated ids of its request and its (1, vocab) scores.
    """

    max_tokens: int = 16
    temperature: float = 1.0
    top_p: float = 1.0
    top_k: int = 0
    repetition_penalty: float = 1.0
    presence_penalty: float = 0.0
    frequency_penalty: float = 0.0
    seed: int | None = None
    stop: Sequence[str] = ()
    stop_token_ids: Sequence[int] = ()
    ignore_eos: bool = False
    strip: bool = False
    forced_token_ids: Sequence[int] | None = None
    logprobs: int | None = None
    prompt_logprobs: int | None = None
    logit_bias: Mapping[int, float] | None = None
    logits_processors: Sequence[Callable[[], LogitsProcessor]] = ()

    def validate(self) -> None:
        """Raise ``ValueError`` naming the first bad field."""
        if not isinstance(self.max_tokens, int) or self.max_tokens < 1:
            raise ValueError(f"max_tokens must be a positive integer, got {self.max_tokens!r}")
        if not 0 <= self.temperature <= 100:
            raise ValueError(f"temperature must be between 0 and 100, got {self.temperature!r}")
        if not 0 < self.top_p <= 1:
            raise ValueError(f"top_p must be in (0, 1], got {self.top_p!r}")
        if not isinstance(self.top_k, int) or self.top_k < 0:
            raise ValueError(f"top_k must be a non-negative integer (0: off), got {self.top_k!r}")
        if not self.repetition_penalty > 0:
            raise ValueError(f"repetition_penalty must be positive, got {self.repetition_penalty!r}")
        for name in ("presence_penalty", "frequency_penalty"):
            if not -2 <= getattr(self, name) <= 2:
                raise ValueError(f"{name} must be between -2 and 2, got {getattr(self, name)!r}")
        if any(not isinstance(s, str) for s in self.stop):
            raise ValueError("stop must be a list of strings")
        for name in ("logprobs", "prompt_logprobs"):
            value = getattr(self, name)
            if value is not None and (not isinstance(value, int) or not 0 <= value <= MAX_LOGPROBS):
                raise ValueError(f"{name} must be an integer between 0 and {MAX_LOGPROBS}, got {value!r}")
        for token, bias in (self.logit_bias or {}).items():
            if not isinstance(token, int) or token < 0:
                raise ValueError(f"logit_bias keys must be token ids, got {token!r}")
            if not -100 <= bias <= 100:
                raise ValueError(f"logit_bias values must be between -100 and 100, got {bias!r}")

    @property
    def greedy(self) -> bool:
        return self.temperature == 0 or self.top_k == 1


@dataclasses.dataclass
class Update:
    """What the engine reports about a request: new text and tokens since the last
    update and, on the last update, why it ended."""

    request_id: str
    text: str
    token_ids: list[int]
    prompt_tokens: int
    completion_tokens: int  # so far
    finished: bool = False
    finish_reason: str | None = None  # one of FINISH_REASONS when finished
    error: str | None = None
    # With SamplingParams.logprobs: one TokenLogprob per token of token_ids.
    logprobs: list[TokenLogprob] | None = None
    # With SamplingParams.prompt_logprobs, in the first update: one per prompt token,
    # None for the first (nothing predicts it).
    prompt_logprobs: list[TokenLogprob | None] | None = None


@dataclasses.dataclass
class TokenLogprob:
    """A token's log-probability and the most likely alternatives ``(id, logprob)``,
    most likely first."""

    token_id: int
    logprob: float
    top: list[tuple[int, float]]


@dataclasses.dataclass
class Completion:
    """The result of :meth:`Engine.generate`."""

    text: str
    token_ids: list[int]
    finish_reason: str
    prompt_tokens: int
    completion_tokens: int
    error: str | None = None
    logprobs: list[TokenLogprob] | None = None
    prompt_logprobs: list[TokenLogprob | None] | None = None


_request_ids = itertools.count()


class RequestHandle:
    """A submitted request; pass it to :meth:`Engine.cancel`."""

    def __init__(self, prompt_ids: list[int], params: SamplingParams, callback: Callable[[Update], None], request_id):
        self.id = request_id if request_id is not None else f"req-{next(_request_ids)}"
        self.prompt_ids = prompt_ids
        self.params = params
        self.callback = callback
        self.cancelled = False
        self.done = False
        self.submitted_at = time.monotonic()
        self.first_token_at: float | None = None
        self.finished_at: float | None = None


# --------------------------------------------------------------------------- text


class TextTracker:
    """Incremental detokenisation of one row with stop strings.

    :meth:`push` takes the next token and returns the new text that is safe to show
    (the delta) and whether a stop string was met; :meth:`flush` returns the rest at
    the end. The deltas joined equal :attr:`text`, the final text.
    """

    def __init__(self, decode: Callable[[list[int]], str], stop: Sequence[str] = (), strip: bool = False):
        self.decode = decode
        self.stop = [s for s in dict.fromkeys(stop) if s]
        self.strip = strip
        self.tokens: list[int] = []
        self.emitted = ""
        self.text = ""  # the final text, set by push (stop string met) or flush
        self.stopped = False

    def push(self, token: int) -> tuple[str, bool]:
        self.tokens.append(token)
        raw = self.decode(self.tokens)
        cut = self._find_stop(raw)
        if cut is not None:
            self.stopped = True
            return self._emit(raw[:cut], final=True), True
        return self._emit(raw, final=False), False

    def flush(self) -> str:
        if self.stopped:
            return ""
        return self._emit(self.decode(self.tokens), final=True)

    def _find_stop(self, raw: str) -> int | None:
        hits = [i for i in (raw.find(s) for s in self.stop) if i >= 0]
        return min(hits) if hits else None

    def _emit(self, text: str, final: bool) -> str:
        if final:
            if self.strip:
                text = text.strip()
            self.text = text
        else:
            # The bytes of a character split over tokens decode to U+FFFD until complete.
            text = text.rstrip("\ufffd")
            text = text[: len(text) - self._stop_prefix_len(text)]
            if self.strip:
                text = text.strip()  # trailing whitespace may turn out to be the end
        if not text.startswith(self.emitted):
            # Not expected: decoding more tokens changed text already shown. Keep what was
            # shown; the final text is still exact for non-streaming callers.
            logger.debug("text changed under the stream: %r -> %r", self.emitted, text)
            return ""
        delta = text[len(self.emitted) :]
        self.emitted = text
        return delta

    def _stop_prefix_len(self, text: str) -> int:
        """Length of the longest suffix of ``text`` that starts a stop string."""
        for length in range(min(len(text), max((len(s) - 1 for s in self.stop), default=0)), 0, -1):
            tail = text[-length:]
            if any(s.startswith(tail) for s in self.stop):
                return length
        return 0


# --------------------------------------------------------------------------- sampling


class PresenceFrequencyPenalty(LogitsProcessor):
    """OpenAI's presence and frequency penalties over the generated tokens (the prompt
    is not counted): ``logit -= presence * (count > 0) + frequency * count``."""

    def __init__(self, presence: float, frequency: float, prompt_len: int):
        self.presence = presence
        self.frequency = frequency
        self.prompt_len = prompt_len

    def __call__(self, input_ids: torch.LongTensor, scores: torch.FloatTensor) -> torch.FloatTensor:
        generated = input_ids[:, self.prompt_len :]
        if generated.numel() == 0:
            return scores
        tokens, counts = torch.unique(generated, return_counts=True)
        penalty = self.presence + self.frequency * counts.to(scores.dtype)
        scores = scores.clone()
        scores[:, tokens] -= penalty
        return scores


class RepetitionPenalty(LogitsProcessor):
    """The CTRL repetition penalty over prompt and generated tokens, as
    ``transformers.RepetitionPenaltyLogitsProcessor`` computes it (a positive logit is
    divided by ``penalty``, a negative one multiplied), touching only the seen tokens."""

    def __init__(self, penalty: float):
        self.penalty = penalty

    def __call__(self, input_ids: torch.LongTensor, scores: torch.FloatTensor) -> torch.FloatTensor:
        tokens = torch.unique(input_ids)
        seen = scores[:, tokens]
        scores = scores.clone()
        scores[:, tokens] = torch.where(seen < 0, seen * self.penalty, seen / self.penalty)
        return scores


class LogitBias(LogitsProcessor):
    """OpenAI's ``logit_bias``: adds a fixed value to the logits of some tokens (-100
    bans a token in practice, 100 all but forces it)."""

    def __init__(self, bias: Mapping[int, float], vocab_size: int | None = None):
        items = sorted((int(t), float(b)) for t, b in bias.items())
        if vocab_size is not None and items and items[-1][0] >= vocab_size:
            raise ValueError(f"logit_bias token id {items[-1][0]} is outside the vocabulary (0..{vocab_size - 1})")
        self.tokens = torch.tensor([t for t, _ in items], dtype=torch.long)
        self.values = torch.tensor([b for _, b in items])

    def __call__(self, input_ids: torch.LongTensor, scores: torch.FloatTensor) -> torch.FloatTensor:
        scores = scores.clone()
        tokens = self.tokens.to(scores.device)
        scores[:, tokens] += self.values.to(device=scores.device, dtype=scores.dtype)
        return scores


# Nucleus (top-p) sampling looks for the nucleus among this many most likely tokens
# first (a partial sort, ~50x cheaper than sorting the 152k-token vocabulary) and sorts
# everything only when the nucleus is larger.
_NUCLEUS_CANDIDATES = 1024


class RowSampler:
    """Chooses the next token of one row with the row's own settings and generator.

    Order as in ``transformers``' ``generate``: repetition penalty (and OpenAI's
    presence/frequency penalties, ``logit_bias``, further processors such as a grammar
    constraint), then temperature, top-k and top-p; greedy rows take
    the argmax after the penalties. Only the candidate tokens are sorted (see
    ``_NUCLEUS_CANDIDATES``), and the draw uses the row's own ``torch.Generator``, so a
    seeded request samples the same tokens alone or in any batch.
    """

    def __init__(self, params: SamplingParams, prompt_len: int, device: torch.device):
        self.processors = LogitsProcessorList()
        if params.repetition_penalty != 1.0:
            self.processors.append(RepetitionPenalty(float(params.repetition_penalty)))
        if params.presence_penalty or params.frequency_penalty:
            self.processors.append(
                PresenceFrequencyPenalty(params.presence_penalty, params.frequency_penalty, prompt_len)
            )
        if params.logit_bias:
            self.processors.append(LogitBias(params.logit_bias))
        for factory in params.logits_processors:
            self.processors.append(factory())
        self.greedy = params.greedy
        self.temperature = float(params.temperature)
        self.top_k = int(params.top_k)
        self.top_p = float(params.top_p)
        seed = params.seed if params.seed is not None else random.randrange(2**62)
        self.generator = torch.Generator(device=device)
        self.generator.manual_seed(int(seed) % 2**63)
        self.forced = list(params.forced_token_ids) if params.forced_token_ids is not None else None
        self.after_forced = list(params.stop_token_ids)[:1] or [0]
        self.plain_greedy = self.greedy and not self.processors and self.forced is None

    def __call__(self, ids: list[int], scores: torch.Tensor) -> int:
        """The next token after ``ids`` (prompt and generated) given ``scores`` (1, vocab)."""
        if self.forced is not None:
            return self.forced.pop(0) if self.forced else self.after_forced[0]
        if self.processors:
            scores = self.processors(torch.tensor([ids], dtype=torch.long, device=scores.device), scores)
        if self.greedy:
            return int(scores.argmax(dim=-1))
        indices, probs = self.distribution(scores)
        choice = torch.multinomial(probs, 1, generator=self.generator)
        return int(choice) if indices is None else int(indices[choice])

    def distribution(self, scores: torch.Tensor) -> tuple[torch.Tensor | None, torch.Tensor]:
        """The tokens that may be drawn and their (unnormalised) probabilities, after
        temperature, top-k and top-p; ``None`` tokens: the whole vocabulary."""
        logits = scores[0]
        if self.temperature != 1.0:
            logits = logits / self.temperature
        if not bool(torch.isfinite(logits.max())):
            # Overflow: a tiny temperature (1e-40) or repetition penalty (1e-300) made
            # scores infinite, and inf - inf would give NaN probabilities. Shifted so the
            # largest is 0 before scaling, the same distribution is finite: the top
            # tokens keep probability, the rest go to 0.
            finite = scores[0].clamp(max=torch.finfo(scores.dtype).max)
            logits = (finite - finite.max()) / self.temperature
        vocab = logits.shape[-1]
        if self.top_k > 0:  # the top-k set, renormalised; top-p is then applied within it
            values, indices = torch.topk(logits, min(self.top_k, vocab))
            norm = torch.logsumexp(values, dim=0)
            complete = True
        else:
            values, indices = torch.topk(logits, min(vocab, _NUCLEUS_CANDIDATES))
            norm = torch.logsumexp(logits, dim=0)
            complete = values.shape[0] == vocab
        probs = torch.exp(values - norm)
        if self.top_p < 1.0:
            before = torch.cumsum(probs, dim=0, dtype=torch.float64) - probs  # mass of the more likely tokens
            keep = int((before < self.top_p).sum().clamp(min=1))
            if not complete and keep == probs.shape[0] and float(before[-1] + probs[-1]) < self.top_p:
                values, indices = torch.sort(logits, descending=True)  # a wide nucleus: sort it all
                probs = torch.exp(values - norm)
                before = torch.cumsum(probs, dim=0, dtype=torch.float64) - probs
                keep = int((before < self.top_p).sum().clamp(min=1))
            probs, indices = probs[:keep], indices[:keep]
        elif not complete:  # no filter: draw from the whole vocabulary
            probs, indices = torch.softmax(logits, dim=0), None
        return indices, probs


class _Row:
    """A running request: its tokens, sampler and text."""

    def __init__(self, handle: RequestHandle, sampler: RowSampler, tracker: TextTracker):
        self.handle = handle
        self.ids = list(handle.prompt_ids)
        self.prompt_len = len(handle.prompt_ids)
        self.sampler = sampler
        self.tracker = tracker
        self.stop_ids = frozenset(handle.params.stop_token_ids)
        self.finish_reason: str | None = None
        self.prompt_logprobs: list[TokenLogprob | None] | None = None  # sent with the first update

    @property
    def completion_tokens(self) -> int:
        return len(self.ids) - self.prompt_len


# --------------------------------------------------------------------------- engine


class Engine:
    """Continuous batching over one model in one background thread.

    Args:
        model: A ``QWenLMHeadModel`` (any causal LM taking ``attention_mask``,
            ``position_ids``, a ``DynamicCache`` and ``logits_to_keep`` works).
        tokenizer: Its tokenizer (used to decode generated text).
        max_batch_size: Most requests decoded together.
        max_queue: Most requests waiting beyond a full batch; :meth:`submit` raises
            :class:`QueueFullError` past it.
        max_model_len: Most tokens (prompt + completion) of one request; defaults to
            the config's ``seq_length``.
        max_prefill_tokens: Most (padded) prompt tokens admitted in one prefill
            forward; a longer single prompt is still admitted alone.
    """

    def __init__(
        self,
        model,
        tokenizer,
        max_batch_size: int = 16,
        max_queue: int = 64,
        max_model_len: int | None = None,
        max_prefill_tokens: int = 4096,
    ):
        if max_batch_size < 1:
            raise ValueError(f"max_batch_size must be at least 1, got {max_batch_size}")
        if max_queue < 0:
            raise ValueError(f"max_queue must be non-negative, got {max_queue}")
        config = model.config
        if getattr(config, "use_cache_quantization", False):
            raise ValueError(
                "the batching engine keeps a float DynamicCache; load the model with use_cache_quantization=False"
            )
        self.model = model
        self.tokenizer = tokenizer
        self.max_batch_size = int(max_batch_size)
        self.max_queue = int(max_queue)
        self.max_model_len = int(max_model_len or getattr(config, "seq_length", None) or config.max_position_embeddings)
        self.max_prefill_tokens = int(max_prefill_tokens)
        self.device = model.device
        self.pad_id = int(getattr(tokenizer, "eod_id", None) or getattr(config, "pad_token_id", None) or 0)

        self._cond = threading.Condition()
        self._waiting: collections.deque[RequestHandle] = collections.deque()
        self._thread: threading.Thread | None = None
        self._stopping = False

        # Batch state, touched by the engine thread only.
        self._rows: list[_Row] = []
        self._cache: DynamicCache | None = None
        self._mask: torch.Tensor | None = None  # (B, T) long, 0 = padding
        self._alphas: torch.Tensor | None = None  # (B,) dynamic-NTK alpha per row, or None
        self._n_active = 0  # rows in the batch or being admitted
        self.stats_counters = collections.Counter()
        self.peak_active = 0

    # ------------------------------------------------------------------ control

    def start(self) -> Engine:
        with self._cond:
            if self._thread is not None and self._thread.is_alive():
                return self
            self._stopping = False
            # torch's intra-op thread count is per thread: give the loop the caller's.
            threads = torch.get_num_threads()
            self._thread = threading.Thread(target=self._run, args=(threads,), name="qwen-engine", daemon=True)
            self._thread.start()
        return self

    def stop(self, timeout: float | None = 30.0) -> None:
        """Stop the loop; unfinished requests end with finish_reason "error"."""
        with self._cond:
            self._stopping = True
            self._cond.notify_all()
        if self._thread is not None:
            self._thread.join(timeout)

    @property
    def running(self) -> bool:
        return self._thread is not None and self._thread.is_alive() and not self._stopping

    def stats(self) -> dict:
        with self._cond:
            waiting = sum(not h.cancelled for h in self._waiting)
        return {
            "active": self._n_active,
            "waiting": waiting,
            "peak_active": self.peak_active,
            "max_batch_size": self.max_batch_size,
            "max_queue": self.max_queue,
            "max_model_len": self.max_model_len,
            "steps": self.stats_counters["steps"],
            "prefills": self.stats_counters["prefills"],
            "finished": self.stats_counters["finished"],
        }

    def check_length(self, prompt_tokens: int, max_tokens: int) -> None:
        """Raise :class:`ContextLengthError` if the request cannot fit."""
        if prompt_tokens + max_tokens > self.max_model_len:
            raise ContextLengthError(prompt_tokens, max_tokens, self.max_model_len)

    def submit(
        self,
        prompt_ids: Sequence[int],
        params: SamplingParams,
        callback: Callable[[Update], None],
        request_id: str | None = None,
    ) -> RequestHandle:
        """Queue one request; ``callback`` is called from the engine thread with each
        :class:`Update` (keep it quick: hand the update over to your own thread/loop)."""
        return self.submit_many([(prompt_ids, params, callback, request_id)])[0]

    def submit_many(self, requests) -> list[RequestHandle]:
        """Queue several ``(prompt_ids, params, callback, request_id)`` at once: all are
        accepted or none (:class:`QueueFullError`)."""
        requests = list(requests)
        if len(requests) > self.max_batch_size + self.max_queue:
            raise ValueError(
                f"{len(requests)} sequences requested at once, more than this server ever holds "
                f"(max_batch_size {self.max_batch_size} + max_queue {self.max_queue})"
            )
        handles = []
        for prompt_ids, params, callback, request_id in requests:
            prompt_ids = [int(t) for t in prompt_ids]
            if not prompt_ids:
                raise ValueError("the prompt is empty")
            params.validate()
            self.check_length(len(prompt_ids), params.max_tokens)
            handles.append(RequestHandle(prompt_ids, params, callback, request_id))
        with self._cond:
            if not self.running:
                raise EngineStoppedError("the engine is not running")
            in_system = self._n_active + sum(not h.cancelled for h in self._waiting)
            if in_system + len(handles) > self.max_batch_size + self.max_queue:
                raise QueueFullError(
                    f"the server is busy ({self._n_active} requests running, {len(self._waiting)} waiting); "
                    "retry shortly"
                )
            self._waiting.extend(handles)
            self._cond.notify_all()
        return handles

    def cancel(self, handle: RequestHandle) -> None:
        """Stop a request; it leaves the batch at the next step (finish_reason "cancelled")."""
        if handle.done:
            return
        handle.cancelled = True
        with self._cond:
            self._cond.notify_all()

    def generate(self, prompt_ids: Sequence[int], params: SamplingParams, timeout: float | None = None) -> Completion:
        """Submit one request and wait for it (blocking)."""
        done = threading.Event()
        updates: list[Update] = []

        def collect(update: Update) -> None:
            updates.append(update)
            if update.finished:
                done.set()

        handle = self.submit(prompt_ids, params, collect)
        if not done.wait(timeout):
            self.cancel(handle)
            raise TimeoutError(f"request {handle.id} did not finish within {timeout} s")
        last = updates[-1]
        return Completion(
            text="".join(u.text for u in updates),
            token_ids=[t for u in updates for t in u.token_ids],
            finish_reason=last.finish_reason,
            prompt_tokens=last.prompt_tokens,
            completion_tokens=last.completion_tokens,
            error=last.error,
            logprobs=[lp for u in updates for lp in u.logprobs or ()] if params.logprobs is not None else None,
            prompt_logprobs=updates[0].prompt_logprobs,
        )

    # ------------------------------------------------------------------ loop

    def _run(self, threads: int) -> None:
        torch.set_num_threads(threads)
        logger.info(
            "engine started: max_batch_size=%d max_queue=%d threads=%d", self.max_batch_size, self.max_queue, threads
        )
        while True:
            with self._cond:
                while not self._stopping and not self._waiting and not self._rows:
                    self._cond.wait()
                if self._stopping:
                    break
                dropped = [h for h in self._waiting if h.cancelled]
                if dropped:
                    self._waiting = collections.deque(h for h in self._waiting if not h.cancelled)
                group = self._take_group()
                self._n_active = len(self._rows) + len(group)
            for handle in dropped:
                self._finish_handle(handle, "cancelled", prompt_tokens=len(handle.prompt_ids))
            try:
                with torch.inference_mode():
                    self._drop_cancelled()
                    if group:
                        self._admit(group)
                        group = []
                    if self._rows:
                        self._decode_step()
            except Exception as error:  # never let the loop die: fail what was running
                logger.exception("engine step failed")
                self._fail_all(group, error)
            self._n_active = len(self._rows)
        self._shutdown()

    def _take_group(self) -> list[RequestHandle]:
        """Waiting requests to admit now (called with the lock held)."""
        group: list[RequestHandle] = []
        width = 0
        while self._waiting and len(self._rows) + len(group) < self.max_batch_size:
            candidate = self._waiting[0]
            new_width = max(width, len(candidate.prompt_ids))
            if group and new_width * (len(group) + 1) > self.max_prefill_tokens:
                break
            group.append(self._waiting.popleft())
            width = new_width
        return group

    def _admit(self, group: list[RequestHandle]) -> None:
        """Prefill ``group`` together, sample first tokens, join the survivors to the batch."""
        self.stats_counters["prefills"] += 1
        width = max(len(h.prompt_ids) for h in group)
        input_ids = torch.full((len(group), width), self.pad_id, dtype=torch.long)
        mask = torch.zeros((len(group), width), dtype=torch.long)
        for i, handle in enumerate(group):
            n = len(handle.prompt_ids)
            input_ids[i, width - n :] = torch.tensor(handle.prompt_ids, dtype=torch.long)
            mask[i, width - n :] = 1
        input_ids, mask = input_ids.to(self.device), mask.to(self.device)
        cache = DynamicCache()
        scored = [i for i, h in enumerate(group) if h.params.prompt_logprobs is not None]
        captured: list[torch.Tensor] = []
        hook = None
        if scored:  # the final hidden states of every position, for the prompt's logprobs
            hook = self.model.base_model.register_forward_hook(lambda module, args, out: captured.append(out[0]))
        try:
            out = self.model(
                input_ids=input_ids, attention_mask=mask, past_key_values=cache, use_cache=True, logits_to_keep=1
            )
        finally:
            if hook is not None:
                hook.remove()
        logits = out.logits[:, -1, :].float()
        alphas = self._cache_alphas(cache)
        rows = [self._make_row(handle) for handle in group]
        for i in scored:
            handle = group[i]
            n = len(handle.prompt_ids)
            rows[i].prompt_logprobs = [None] + self._prompt_logprobs(
                captured[0][i, width - n : width - 1], handle.prompt_ids[1:], handle.params.prompt_logprobs
            )
        captured.clear()
        self._advance(rows, logits)
        keep = [i for i, row in enumerate(rows) if row.finish_reason is None]
        if not keep:
            return
        if len(keep) < len(rows):
            index = torch.tensor(keep, device=self.device)
            _select_rows(cache, index)
            mask = mask.index_select(0, index)
            alphas = alphas.index_select(0, index.to(alphas.device)) if alphas is not None else None
        self._join([rows[i] for i in keep], cache, mask, alphas)

    def _decode_step(self) -> None:
        rows = self._rows
        self.stats_counters["steps"] += 1
        input_ids = torch.tensor([[row.ids[-1]] for row in rows], dtype=torch.long, device=self.device)
        positions = torch.tensor([[len(row.ids) - 1] for row in rows], dtype=torch.long, device=self.device)
        mask = torch.cat([self._mask, self._mask.new_ones((len(rows), 1))], dim=1)
        self._publish_alphas()
        out = self.model(
            input_ids=input_ids,
            attention_mask=mask,
            position_ids=positions,
            past_key_values=self._cache,
            use_cache=True,
            logits_to_keep=1,
        )
        self._mask = mask
        self._advance(rows, out.logits[:, -1, :].float())
        keep = [i for i, row in enumerate(rows) if row.finish_reason is None]
        if len(keep) < len(rows):
            self._evict(keep)

    def _make_row(self, handle: RequestHandle) -> _Row:
        params = handle.params
        sampler = RowSampler(params, len(handle.prompt_ids), self.device)
        tracker = TextTracker(self._decode, params.stop, params.strip)
        return _Row(handle, sampler, tracker)

    def _prompt_logprobs(self, hidden: torch.Tensor, targets: list[int], top: int) -> list[TokenLogprob]:
        """Log-probabilities of ``targets`` given the hidden states before each of them,
        through the output embeddings, ``PROMPT_LOGPROB_CHUNK`` positions at a time."""
        head = self.model.get_output_embeddings()
        out: list[TokenLogprob] = []
        for start in range(0, len(targets), PROMPT_LOGPROB_CHUNK):
            chunk = targets[start : start + PROMPT_LOGPROB_CHUNK]
            logits = head(hidden[start : start + len(chunk)]).float()
            out += _logprobs_of(logits, chunk, top)
        return out

    def _decode(self, ids: list[int]) -> str:
        return self.tokenizer.decode(ids, errors="replace")

    def _advance(self, rows: list[_Row], logits: torch.Tensor) -> None:
        """Sample one token per row, update its text, report, and mark finished rows."""
        argmax = None
        if any(row.sampler.plain_greedy for row in rows):
            argmax = logits.argmax(dim=-1).tolist()
        now = time.monotonic()
        for i, row in enumerate(rows):
            handle = row.handle
            try:
                token = argmax[i] if row.sampler.plain_greedy else row.sampler(row.ids, logits[i : i + 1])
            except Exception as error:  # a bad row (say NaN probabilities) fails alone
                logger.exception("sampling failed for request %s", handle.id)
                row.finish_reason = "error"
                self._report(row, "", [], finished=True, error=f"sampling failed: {error}")
                continue
            top = handle.params.logprobs
            logprobs = _logprobs_of(logits[i : i + 1], [token], top) if top is not None else None
            row.ids.append(token)
            if handle.first_token_at is None:
                handle.first_token_at = now
            params = handle.params
            if token in row.stop_ids and not params.ignore_eos:
                reason, text = "stop", row.tracker.flush()
            else:
                text, hit = row.tracker.push(token)
                reason = "stop" if hit else None
                if reason is None and (
                    row.completion_tokens >= params.max_tokens or len(row.ids) >= self.max_model_len
                ):
                    reason = "length"
                    text += row.tracker.flush()
            if handle.cancelled and reason is None:
                reason = "cancelled"
                text += row.tracker.flush()
            row.finish_reason = reason
            self._report(row, text, [token], finished=reason is not None, logprobs=logprobs)

    def _report(
        self,
        row: _Row,
        text: str,
        tokens: list[int],
        finished: bool,
        error: str | None = None,
        logprobs: list[TokenLogprob] | None = None,
    ) -> None:
        handle = row.handle
        prompt_logprobs, row.prompt_logprobs = row.prompt_logprobs, None
        if logprobs is None and handle.params.logprobs is not None:
            logprobs = []
        update = Update(
            request_id=handle.id,
            text=text,
            token_ids=tokens,
            prompt_tokens=row.prompt_len,
            completion_tokens=row.completion_tokens,
            finished=finished,
            finish_reason=row.finish_reason if finished else None,
            error=error,
            logprobs=logprobs,
            prompt_logprobs=prompt_logprobs,
        )
        if finished:
            handle.done = True
            handle.finished_at = time.monotonic()
            self.stats_counters["finished"] += 1
        _deliver(handle, update)

    def _finish_handle(self, handle: RequestHandle, reason: str, prompt_tokens: int, error: str | None = None):
        """Report the end of a request that has no row (never admitted, or its row is gone)."""
        if handle.done:
            return
        handle.done = True
        handle.finished_at = time.monotonic()
        self.stats_counters["finished"] += 1
        _deliver(
            handle,
            Update(handle.id, "", [], prompt_tokens, 0, finished=True, finish_reason=reason, error=error),
        )

    def _drop_cancelled(self) -> None:
        keep = []
        for i, row in enumerate(self._rows):
            if row.handle.cancelled:
                row.finish_reason = "cancelled"
                self._report(row, row.tracker.flush(), [], finished=True)
            else:
                keep.append(i)
        if len(keep) < len(self._rows):
            self._evict(keep)

    # ------------------------------------------------------------------ batch surgery

    def _join(self, rows: list[_Row], cache: DynamicCache, mask: torch.Tensor, alphas) -> None:
        if not self._rows:
            self._rows, self._cache, self._mask, self._alphas = rows, cache, mask, alphas
        else:
            width = max(self._mask.shape[1], mask.shape[1])
            old_layers, new_layers = self._cache.layers, cache.layers
            for old, new in zip(old_layers, new_layers, strict=True):
                old.keys = torch.cat([_pad_left(old.keys, width), _pad_left(new.keys, width)], dim=0)
                old.values = torch.cat([_pad_left(old.values, width), _pad_left(new.values, width)], dim=0)
            self._mask = torch.cat([_pad_left(self._mask, width, dim=1), _pad_left(mask, width, dim=1)], dim=0)
            if self._alphas is not None and alphas is not None:
                self._alphas = torch.cat([self._alphas, alphas.to(self._alphas.device)])
            else:
                self._alphas = None
            self._rows = self._rows + rows
        self._n_active = len(self._rows)
        self.peak_active = max(self.peak_active, self._n_active)

    def _evict(self, keep: list[int]) -> None:
        if not keep:
            self._rows, self._cache, self._mask, self._alphas = [], None, None, None
            return
        index = torch.tensor(keep, device=self.device)
        _select_rows(self._cache, index)
        mask = self._mask.index_select(0, index)
        # Columns that are padding in every remaining row can go.
        leading = int((mask.cumsum(dim=1) == 0).sum(dim=1).min())
        if leading:
            mask = mask[:, leading:]
            for layer in self._cache.layers:
                layer.keys = layer.keys[:, :, leading:, :]
                layer.values = layer.values[:, :, leading:, :]
        self._mask = mask
        if self._alphas is not None:
            self._alphas = self._alphas.index_select(0, index.to(self._alphas.device))
        self._rows = [self._rows[i] for i in keep]
        self._n_active = len(self._rows)

    def _cache_alphas(self, cache: DynamicCache) -> torch.Tensor | None:
        """The per-row dynamic-NTK alphas the model fixed for a freshly prefilled cache."""
        value = ntk_alpha_of(cache)
        return None if value is None else value.clone()

    def _publish_alphas(self) -> None:
        """Tell the model the alpha of every row of the batched cache."""
        if self._alphas is not None:
            set_ntk_alpha(self._cache, self._alphas)

    def _fail_all(self, group: list[RequestHandle], error: BaseException) -> None:
        message = f"generation failed: {type(error).__name__}: {error}"
        for row in self._rows:
            if not row.handle.done:
                row.finish_reason = "error"
                self._report(row, "", [], finished=True, error=message)
        for handle in group:
            self._finish_handle(handle, "error", len(handle.prompt_ids), error=message)
        self._rows, self._cache, self._mask, self._alphas = [], None, None, None

    def _shutdown(self) -> None:
        with self._cond:
            waiting = list(self._waiting)
            self._waiting.clear()
        self._fail_all(waiting, EngineStoppedError("the engine stopped"))
        self._n_active = 0
        logger.info("engine stopped")


def _logprobs_of(logits: torch.Tensor, tokens: list[int], top: int) -> list[TokenLogprob]:
    """Per row of ``logits`` (n, vocab): the log-probability of ``tokens[row]`` and the
    ``top`` most likely tokens'."""
    logprobs = torch.log_softmax(logits.float(), dim=-1)
    chosen = logprobs.gather(1, torch.tensor(tokens, device=logprobs.device).unsqueeze(1))[:, 0].tolist()
    if top:
        values, indices = torch.topk(logprobs, top, dim=-1)
        values, indices = values.tolist(), indices.tolist()
    else:
        values = indices = [[] for _ in tokens]
    return [
        TokenLogprob(token, lp, list(zip(ids, vals, strict=True)))
        for token, lp, ids, vals in zip(tokens, chosen, indices, values, strict=True)
    ]


def _deliver(handle: RequestHandle, update: Update) -> None:
    try:
        handle.callback(update)
    except Exception:  # a consumer's bug must not stop the engine
        logger.exception("callback of request %s failed", handle.id)


def _pad_left(tensor: torch.Tensor, width: int, dim: int = -2) -> torch.Tensor:
    """Zero-pad ``tensor`` on the left along ``dim`` (-2: a cache's token axis) to ``width``."""
    missing = width - tensor.shape[dim]
    if missing <= 0:
        return tensor
    shape = list(tensor.shape)
    shape[dim] = missing
    return torch.cat([tensor.new_zeros(shape), tensor], dim=dim)


def _select_rows(cache: DynamicCache, index: torch.Tensor) -> None:
    for layer in cache.layers:
        if not isinstance(layer, DynamicLayer) or getattr(layer, "is_sliding", False):
            raise TypeError(f"the batching engine needs plain DynamicLayer caches, got {type(layer).__name__}")
        layer.keys = layer.keys.index_select(0, index)
        layer.values = layer.values.index_select(0, index)
