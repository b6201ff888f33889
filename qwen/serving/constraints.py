"""Constrained decoding for the server: JSON mode, JSON schemas and forced ReAct tool
calls, through `xgrammar <https://github.com/mlc-ai/xgrammar>`_ (``pip install xgrammar``).

A :class:`Constraints` object belongs to one tokenizer. It describes the tokenizer's
vocabulary to xgrammar once (the raw bytes of every token: the Qwen tokenizer is
tiktoken's byte-level BPE), compiles grammars (cached by their text) and returns
factories of :class:`GrammarProcessor`, a ``LogitsProcessor`` that the engine applies
to one request's logits at every step: tokens that cannot continue a valid output get
``-inf``, and once the output is complete only the end tokens remain. Compiling takes
0.1-1 s: do it off the event loop and off the engine's thread (the server calls these
methods from a worker thread).

xgrammar is optional: without it :class:`ConstraintsUnavailable` says what to install.
"""

from __future__ import annotations

import functools
import json
import logging
import threading
from collections.abc import Callable, Mapping, Sequence
from typing import Any

import torch
from transformers import LogitsProcessor

logger = logging.getLogger(__name__)

# Most characters of the thought before a forced tool call (the model must get to the call).
MAX_THOUGHT_CHARS = 400


class ConstraintsUnavailable(RuntimeError):
    """xgrammar is not installed (or cannot be loaded)."""


class GrammarProcessor(LogitsProcessor):
    """Masks one request's logits to the tokens its grammar allows next.

    Stateful: at each call it first feeds the grammar matcher the tokens generated since
    the previous call (the first call fixes where the prompt ends), then masks. Once the
    grammar is complete, only ``end_ids`` are allowed. ``banned`` tokens are never
    allowed (JSON output: tokens with raw control characters, which xgrammar's string
    rule lets through but JSON parsers refuse). A token the matcher refuses (a
    forced token, a stop string cut) ends the constraint: the scores pass unchanged and
    a warning is logged.
    """

    def __init__(self, xgr, compiled, vocab_size: int, end_ids: Sequence[int], banned: torch.Tensor | None = None):
        self.xgr = xgr
        self.banned = banned
        self.matcher = xgr.GrammarMatcher(compiled)
        self.bitmask = xgr.allocate_token_bitmask(1, vocab_size)
        self.end_ids = torch.tensor(sorted(set(end_ids)), dtype=torch.long)
        self.seen: int | None = None
        self.broken = False

    def __call__(self, input_ids: torch.LongTensor, scores: torch.FloatTensor) -> torch.FloatTensor:
        length = input_ids.shape[1]
        if self.seen is None:
            self.seen = length
        for token in input_ids[0, self.seen :].tolist():
            if not self.broken and not self.matcher.is_terminated() and not self.matcher.accept_token(token):
                logger.warning("token %d does not fit the grammar; constraint dropped for this request", token)
                self.broken = True
        self.seen = length
        if self.broken:
            return scores
        scores = scores.clone()
        if self.matcher.is_terminated():
            ends = self.end_ids.to(scores.device)
            kept = scores[:, ends]
            scores.fill_(float("-inf"))
            scores[:, ends] = kept
            return scores
        self.matcher.fill_next_token_bitmask(self.bitmask)
        vocab = scores.shape[-1]
        if scores.device.type == "cpu" and scores.dtype == torch.float32 and scores.is_contiguous():
            self.xgr.apply_token_bitmask_inplace(scores, self.bitmask[:, : (vocab + 31) // 32])
        else:
            allowed = self._allowed(vocab).to(scores.device)
            scores = scores.masked_fill(~allowed, float("-inf"))
        if self.banned is not None:
            scores[:, self.banned.to(scores.device)] = float("-inf")
        return scores

    def _allowed(self, vocab: int) -> torch.Tensor:
        bits = self.bitmask[0].to(torch.int64) & 0xFFFFFFFF
        shifts = torch.arange(32, dtype=torch.int64)
        return ((bits.unsqueeze(1) >> shifts) & 1).bool().flatten()[:vocab].unsqueeze(0)


def _load_xgrammar():
    try:
        import xgrammar
    except ImportError as error:  # also a broken native library
        raise ConstraintsUnavailable(
            f"constrained decoding needs the xgrammar package ({error}); install it with: pip install xgrammar"
        ) from None
    return xgrammar


class Constraints:
    """Grammar compilation for one tokenizer and model vocabulary.

    Args:
        tokenizer: A ``QWenTokenizer`` (``mergeable_ranks`` and ``special_tokens`` give
            every token's bytes).
        vocab_size: The model's vocabulary (its logits' width; ids beyond the
            tokenizer's are never allowed).
        end_ids: Tokens that end a complete output (``<|im_end|>``, ``<|endoftext|>``).
    """

    def __init__(self, tokenizer, vocab_size: int, end_ids: Sequence[int], cache_size: int = 64):
        self.tokenizer = tokenizer
        self.vocab_size = int(vocab_size)
        self.end_ids = list(end_ids)
        self._lock = threading.Lock()
        self._compiler = None
        self._compile = functools.lru_cache(maxsize=cache_size)(self._compile_uncached)

    @property
    def available(self) -> bool:
        try:
            _load_xgrammar()
        except ConstraintsUnavailable:
            return False
        return True

    def _compiler_for(self):
        with self._lock:
            if self._compiler is None:
                xgr = _load_xgrammar()
                vocab = [b""] * self.vocab_size
                for token, rank in self.tokenizer.mergeable_ranks.items():
                    if rank < self.vocab_size:
                        vocab[rank] = token
                for text, rank in self.tokenizer.special_tokens.items():
                    if rank < self.vocab_size:
                        vocab[rank] = text.encode()
                info = xgr.TokenizerInfo(
                    vocab,
                    vocab_type=xgr.VocabType.RAW,
                    vocab_size=self.vocab_size,
                    stop_token_ids=self.end_ids,
                    add_prefix_space=False,
                )
                self._compiler = xgr.GrammarCompiler(info, max_threads=1)
            return self._compiler

    def _compile_uncached(self, kind: str, key: str):
        xgr = _load_xgrammar()
        compiler = self._compiler_for()
        if kind == "schema":
            return compiler.compile_json_schema(key, any_whitespace=False, strict_mode=True)
        return compiler.compile_grammar(xgr.Grammar.deserialize_json(key))

    def _factory(self, compiled, banned: torch.Tensor | None = None) -> Callable[[], GrammarProcessor]:
        xgr = _load_xgrammar()
        return lambda: GrammarProcessor(xgr, compiled, self.vocab_size, self.end_ids, banned)

    @functools.cached_property
    def control_tokens(self) -> torch.Tensor:
        """Ids of the tokens holding a raw control character (bytes 0-31): compact JSON
        has none (they are escaped inside strings)."""
        ids = [rank for token, rank in self.tokenizer.mergeable_ranks.items() if any(b < 32 for b in token)]
        return torch.tensor(sorted(r for r in ids if r < self.vocab_size), dtype=torch.long)

    def json_schema(self, schema: Mapping[str, Any] | None = None) -> Callable[[], GrammarProcessor]:
        """A factory of processors for JSON text matching ``schema`` (None: any JSON
        object), written compactly (``{"a": 1, "b": [2, 3]}``). Raises ``ValueError``
        for a schema xgrammar cannot compile."""
        text = json.dumps(schema if schema is not None else {"type": "object"}, sort_keys=True)
        try:
            return self._factory(self._compile("schema", text), self.control_tokens)
        except ConstraintsUnavailable:
            raise
        except Exception as error:  # xgrammar raises RuntimeError / ValueError for bad schemas
            raise ValueError(f"the JSON schema cannot be used for constrained decoding: {error}") from None

    def react_call(
        self, functions: Mapping[str, Mapping[str, Any] | None], after_thought: bool = False
    ) -> Callable[[], GrammarProcessor]:
        """A factory of processors that make the model write one ReAct tool call:
        ``Thought: <one line>\\nAction: <name>\\nAction Input: <JSON>\\nObservation:``,
        the name one of ``functions`` (name -> JSON schema of its arguments, None: any
        object) and the input matching that function's schema. ``after_thought``: the
        prompt already ends with ``Thought:``."""
        xgr = _load_xgrammar()
        try:
            start = "" if after_thought else '"Thought: " '
            head = xgr.Grammar.from_ebnf(f'root ::= {start}[^\\n]{{0,{MAX_THOUGHT_CHARS}}} "\\nAction: "')
            calls = []
            for name, schema in functions.items():
                literal = json.dumps(name + "\nAction Input: ", ensure_ascii=False)
                schema_text = json.dumps(schema if schema is not None else {"type": "object"})
                arguments = xgr.Grammar.from_json_schema(schema_text, any_whitespace=False, strict_mode=True)
                calls.append(xgr.Grammar.concat(xgr.Grammar.from_ebnf(f"root ::= {literal}"), arguments))
            body = calls[0] if len(calls) == 1 else xgr.Grammar.union(*calls)
            tail = xgr.Grammar.from_ebnf('root ::= "\\nObservation:"')
            grammar = xgr.Grammar.concat(head, body, tail)
            return self._factory(self._compile("grammar", grammar.serialize_json()))
        except Exception as error:
            raise ValueError(f"the function parameters cannot be used for a forced call: {error}") from None
