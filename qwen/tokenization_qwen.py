"""Tokenizer of the first-generation Qwen models: byte-level BPE run by ``tiktoken``.

The vocabulary file ``qwen.tiktoken`` holds one ``base64(token bytes) rank`` pair per
line (151,643 ranks, the rank is the token id). On top of it sit 208 special tokens
at fixed ids: ``<|endoftext|>`` (151643), ``<|im_start|>`` (151644), ``<|im_end|>``
(151645) and ``<|extra_0|>`` ... ``<|extra_204|>`` (151646-151850).

Qwen's own parts are the encoding of one string (:meth:`QWenTokenizer.encode_text`),
decoding and the vocabulary; batches, padding, truncation, pairs and tensors are
``transformers``' ``PreTrainedTokenizer`` machinery. This module only imports the
standard library, ``tiktoken`` and ``transformers``, so it can be copied into a
checkpoint directory and loaded as remote code
(``AutoTokenizer.from_pretrained(path, trust_remote_code=True)``).
"""

from __future__ import annotations

import base64
import codecs
import importlib.util
import itertools
import logging
import os
import re
import unicodedata
from collections.abc import Collection, Iterable
from typing import Any

import tiktoken
from transformers import AddedToken, BatchEncoding, PreTrainedTokenizer
from transformers.tokenization_utils_base import PaddingStrategy, TruncationStrategy

logger = logging.getLogger(__name__)

VOCAB_FILES_NAMES = {"vocab_file": "qwen.tiktoken"}

# Pre-tokenisation pattern. Unlike GPT-4's cl100k pattern, numbers are split into
# single digits (``\p{N}`` instead of ``\p{N}{1,3}``).
PAT_STR = (
    r"""(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}"""
    r"""| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+"""
)

ENDOFTEXT = "<|endoftext|>"
IMSTART = "<|im_start|>"
IMEND = "<|im_end|>"
EXTRAS = tuple(f"<|extra_{i}|>" for i in range(205))
SPECIAL_START_ID = 151643
SPECIAL_TOKENS: dict[str, int] = {
    token: SPECIAL_START_ID + offset for offset, token in enumerate((ENDOFTEXT, IMSTART, IMEND, *EXTRAS))
}
_SPECIAL_BY_ID = {index: token for token, index in SPECIAL_TOKENS.items()}
_SPECIAL_SET = frozenset(SPECIAL_TOKENS)

# sha256 of the vocabulary shipped with every official checkpoint (and with dashscope).
QWEN_TIKTOKEN_SHA256 = "b2b1b8dfb5cc5f024bafc373121c6aba3f66f9a5a0269e243470a1de16a33186"


class MissingVocabularyError(ValueError):
    """Raised when the ``qwen.tiktoken`` vocabulary cannot be found."""


def default_vocab_file() -> str | None:
    """Path of the ``qwen.tiktoken`` in the PyPI package ``dashscope`` (found without importing it), or None."""
    try:
        spec = importlib.util.find_spec("dashscope")
    except (ImportError, ValueError):
        return None
    for location in (spec.submodule_search_locations or []) if spec else []:
        candidate = os.path.join(location, "resources", VOCAB_FILES_NAMES["vocab_file"])
        if os.path.isfile(candidate):
            return candidate
    return None


def load_tiktoken_ranks(path: str | os.PathLike) -> dict[bytes, int]:
    """Read a tiktoken vocabulary file (``base64(token) rank`` per line) into ``{bytes: rank}``.

    Unlike ``tiktoken.load.load_tiktoken_bpe`` this never caches by file name, so a file
    rewritten in place is always read afresh.
    """
    ranks: dict[bytes, int] = {}
    with open(path, "rb") as handle:
        for line_number, line in enumerate(handle, start=1):
            try:
                if line.strip():
                    token_b64, rank_text = line.split()
                    token, rank = base64.b64decode(token_b64, validate=True), int(rank_text)
                    if not token or rank < 0 or token in ranks:
                        raise ValueError("an empty or repeated token, or a negative rank")
                    ranks[token] = rank
            except ValueError as error:
                raise ValueError(
                    f"{path}, line {line_number}: expected '<base64 token bytes> <rank>' with a new token and a "
                    f"rank >= 0, got {line[:80]!r}"
                ) from error
    return ranks


def dump_tiktoken_ranks(ranks: dict[bytes, int], path: str | os.PathLike) -> None:
    """Write ``{bytes: rank}`` in the tiktoken file format, sorted by rank."""
    with open(path, "wb") as handle:
        for token, rank in sorted(ranks.items(), key=lambda item: item[1]):
            handle.write(base64.b64encode(token) + b" " + str(rank).encode("ascii") + b"\n")


def _token_content(token: str | AddedToken) -> str:
    return token.content if isinstance(token, AddedToken) else str(token)


class QWenTokenizer(PreTrainedTokenizer):
    """Qwen(-1) tokenizer: ``tiktoken`` byte-level BPE plus 208 fixed special tokens.

    Args:
        vocab_file: Path of ``qwen.tiktoken``. When omitted (and not loading a checkpoint
            directory through ``from_pretrained``) the copy inside the ``dashscope``
            package is used.
        errors: How ``decode`` treats byte sequences that are not valid UTF-8 (a token
            may hold only part of a character): "replace" (default), "ignore", "strict"
            or any other ``bytes.decode`` error handler.
        extra_vocab_file: Optional file in the same format as ``qwen.tiktoken`` whose
            tokens are added at the ranks it gives. Tokens that already exist, and ranks
            already taken (including the special-token ids), are skipped with a logged
            warning. ``save_pretrained`` folds the added tokens into the saved
            ``qwen.tiktoken``.
        **kwargs: Passed to ``transformers.PreTrainedTokenizer`` (``pad_token``,
            ``eos_token``, ``padding_side``, ``model_max_length``, ...). Named special
            tokens must be Qwen special tokens, e.g. ``pad_token="<|extra_0|>"``.

    Encoding (``__call__``, ``encode``, ``tokenize``) normalises text to NFC and accepts
    ``allowed_special`` / ``disallowed_special`` (see :meth:`encode_text`). By default the
    surface forms of special tokens in the text become special tokens; pass
    ``allowed_special=set()`` to encode untrusted text as plain text.
    """

    vocab_files_names = VOCAB_FILES_NAMES
    model_input_names = ["input_ids", "attention_mask"]
    # save_pretrained copies this file next to the saved files and writes the auto_map, like official checkpoints.
    _auto_class = "AutoTokenizer"

    def __init__(
        self,
        vocab_file: str | os.PathLike | None = None,
        errors: str = "replace",
        extra_vocab_file: str | os.PathLike | None = None,
        **kwargs: Any,
    ) -> None:
        if vocab_file is None:
            if kwargs.get("name_or_path"):
                raise MissingVocabularyError(_missing_vocab_message(kwargs["name_or_path"]))
            vocab_file = default_vocab_file()
        if vocab_file is None or not os.path.isfile(vocab_file):
            raise MissingVocabularyError(_missing_vocab_message(vocab_file and os.fspath(vocab_file)))
        try:
            codecs.lookup_error(errors)
        except (LookupError, TypeError) as error:
            raise ValueError(
                f"errors must be a `bytes.decode` error handler such as 'replace', got {errors!r}"
            ) from error

        self.errors = errors
        self.vocab_file = os.fspath(vocab_file)
        self.mergeable_ranks = load_tiktoken_ranks(vocab_file)
        ids = set(self.mergeable_ranks.values())
        if len(ids) != len(self.mergeable_ranks) or ids & _SPECIAL_BY_ID.keys():
            raise ValueError(
                f"{vocab_file} gives several tokens the same rank, or a token the id of a Qwen special token "
                f"({SPECIAL_START_ID}-{SPECIAL_START_ID + len(SPECIAL_TOKENS) - 1})"
            )
        if extra_vocab_file is not None:
            self._add_extra_vocab(os.fspath(extra_vocab_file))
        self._build_runtime()

        # Our special tokens are fixed: they are never stored as transformers "added tokens".
        for index, token in (kwargs.pop("added_tokens_decoder", None) or {}).items():
            content = token["content"] if isinstance(token, dict) else _token_content(token)
            if SPECIAL_TOKENS.get(content) != int(index):
                logger.warning(
                    "Ignoring added token %r at id %s: QWenTokenizer has fixed special tokens", content, index
                )
        kwargs.setdefault("clean_up_tokenization_spaces", False)
        super().__init__(errors=errors, **kwargs)
        # Loading details that have no business in a saved tokenizer_config.json.
        for key in ("is_local", "local_files_only", "tokenizer_file"):
            self.init_kwargs.pop(key, None)
        # Make save_pretrained write the current values of these settings.
        for key in ("padding_side", "truncation_side", "split_special_tokens"):
            self.init_kwargs.setdefault(key, getattr(self, key))

    def _add_extra_vocab(self, extra_vocab_file: str) -> None:
        extra = load_tiktoken_ranks(extra_vocab_file)
        used_ids = set(self.mergeable_ranks.values()) | set(_SPECIAL_BY_ID)
        skipped = []
        for token, rank in sorted(extra.items(), key=lambda item: item[1]):
            if token in self.mergeable_ranks:
                skipped.append(f"{token!r} (already token {self.mergeable_ranks[token]})")
            elif rank in used_ids:
                skipped.append(f"{token!r} (id {rank} already taken)")
            else:
                self.mergeable_ranks[token] = rank
                used_ids.add(rank)
        if skipped:
            more = ", ..." if len(skipped) > 5 else ""
            message = "extra vocabulary %s: skipped %d of %d entries that already exist: %s%s"
            logger.warning(message, extra_vocab_file, len(skipped), len(extra), ", ".join(skipped[:5]), more)

    def _build_runtime(self) -> None:
        """(Re)create the tiktoken encoder and the id -> bytes table from ``mergeable_ranks`` (not pickled)."""
        self._encoding = tiktoken.Encoding(
            "Qwen", pat_str=PAT_STR, mergeable_ranks=self.mergeable_ranks, special_tokens=SPECIAL_TOKENS
        )
        self._decoder: dict[int, bytes] = {rank: token for token, rank in self.mergeable_ranks.items()}
        # The underlying encoding under its official name. A plain attribute, as in the official
        # code, not a property: wrappers that delegate every attribute to a ``.tokenizer`` they
        # hold (gptqmodel's Tokenicer subclasses the wrapped class) recursed forever through
        # a property reading ``self._encoding``.
        self.tokenizer: tiktoken.Encoding = self._encoding

    def __getstate__(self) -> dict[str, Any]:
        runtime = ("_encoding", "_decoder", "tokenizer")
        return {key: value for key, value in self.__dict__.items() if key not in runtime}

    def __setstate__(self, state: dict[str, Any]) -> None:
        self.__dict__.update(state)
        self._build_runtime()

    # ------------------------------------------------------------ vocabulary

    @property
    def special_tokens(self) -> dict[str, int]:
        """Surface form -> id of the 208 special tokens."""
        return dict(SPECIAL_TOKENS)

    eod_id = property(lambda self: SPECIAL_TOKENS[ENDOFTEXT])
    im_start_id = property(lambda self: SPECIAL_TOKENS[IMSTART])
    im_end_id = property(lambda self: SPECIAL_TOKENS[IMEND])
    vocab_size = property(lambda self: self._encoding.n_vocab)

    def __len__(self) -> int:
        return self._encoding.n_vocab

    def get_vocab(self) -> dict[bytes | str, int]:
        """Token -> id: ``bytes`` keys for BPE tokens, ``str`` keys for special tokens."""
        return {**self.mergeable_ranks, **SPECIAL_TOKENS}

    @property
    def all_special_tokens(self) -> list[str]:
        """Named special tokens (pad, eos, ...) and every Qwen special token."""
        return list(dict.fromkeys([*super().all_special_tokens, *SPECIAL_TOKENS]))

    @property
    def added_tokens_encoder(self) -> dict[str, int]:
        # The special tokens play the part of added tokens (added_tokens_decoder stays empty,
        # so that saved configurations do not list the 208 fixed tokens).
        return dict(SPECIAL_TOKENS)

    def _get_control_tokens(self, chat_template: str) -> tuple[str, ...]:
        # What apply_chat_template(..., sanitize_control_tokens=True) neutralises in messages.
        chosen = set(self.chat_control_tokens if self.chat_control_tokens is not None else SPECIAL_TOKENS)
        return tuple(token for token in SPECIAL_TOKENS if token in chosen)

    def _add_tokens(self, new_tokens: Iterable[str | AddedToken], special_tokens: bool = False) -> int:
        """Only accepts tokens that already are Qwen special tokens (adds nothing)."""
        unknown = [_token_content(token) for token in new_tokens or () if _token_content(token) not in SPECIAL_TOKENS]
        if unknown:
            raise ValueError(
                f"QWenTokenizer cannot add new {'special tokens' if special_tokens else 'tokens'} {unknown[:5]}: its "
                f"vocabulary is fixed. Use one of the reserved special tokens {EXTRAS[0]} ... {EXTRAS[-1]} (ids "
                f"{SPECIAL_TOKENS[EXTRAS[0]]}-{SPECIAL_TOKENS[EXTRAS[-1]]}) for a new control token, or extend the "
                "BPE vocabulary with `extra_vocab_file` (see tokenization_note.md)."
            )
        return 0

    def add_special_tokens(self, special_tokens_dict: dict[str, Any], replace_extra_special_tokens: bool = True) -> int:
        # Validate before the base class starts assigning attributes.
        for value in (special_tokens_dict or {}).values():
            self._add_tokens([value] if isinstance(value, (str, AddedToken)) else value, special_tokens=True)
        return super().add_special_tokens(special_tokens_dict, replace_extra_special_tokens)

    def convert_tokens_to_ids(self, tokens: Any) -> int | None | list[int | None]:
        """Ids of ``bytes`` BPE tokens or ``str`` special tokens (None when unknown); other ``str`` by their UTF-8."""
        if isinstance(tokens, (str, bytes, AddedToken)):
            return self._convert_token_to_id(tokens)
        return [self._convert_token_to_id(token) for token in tokens]

    def _convert_token_to_id(self, token: bytes | str | AddedToken) -> int | None:
        if isinstance(token, bytes):
            return self.mergeable_ranks.get(token)
        token = _token_content(token)
        if token in SPECIAL_TOKENS:
            return SPECIAL_TOKENS[token]
        return self.mergeable_ranks.get(token.encode("utf-8", "surrogatepass"))

    def _convert_id_to_token(self, index: int) -> bytes | str:
        """``bytes`` for BPE tokens, ``str`` for special tokens."""
        token = self._decoder.get(int(index)) or _SPECIAL_BY_ID.get(int(index))
        if token is None:
            raise ValueError(f"Token id {index} is not in the Qwen vocabulary (size {len(self)})")
        return token

    def convert_tokens_to_string(self, tokens: Iterable[bytes | str], errors: str | None = None) -> str:
        """Join ``bytes`` tokens and decode them; ``str`` tokens are inserted as they are."""
        runs = itertools.groupby(tokens, key=lambda token: isinstance(token, bytes))
        return "".join(
            b"".join(run).decode("utf-8", errors or self.errors) if raw else "".join(run) for raw, run in runs
        )

    # --------------------------------------------------------------- encode

    def encode_text(
        self,
        text: str,
        allowed_special: str | Collection[str] | None = None,
        disallowed_special: str | Collection[str] = (),
        split_special_tokens: bool = False,
    ) -> list[int]:
        """Token ids of ``text`` (NFC-normalised); the core of every encoding call.

        Args:
            allowed_special: Special tokens whose surface form in the text becomes the
                special token: ``"all"`` or a collection of surface forms. Defaults to all
                special tokens except the disallowed ones; ``set()`` encodes everything
                as plain text.
            disallowed_special: Special tokens whose surface form in the text raises a
                ``ValueError``: ``"all"`` (every special token not explicitly allowed) or a
                collection of surface forms. Defaults to none.
            split_special_tokens: The transformers switch for "special-token text is plain
                text"; the same as ``allowed_special=set()`` when that is not given.
        """
        text = _nfc(text)
        if allowed_special is None:
            allowed = frozenset() if split_special_tokens else _SPECIAL_SET
        else:
            allowed = _special_names(allowed_special, "allowed_special")
        disallowed = _special_names(disallowed_special, "disallowed_special") if disallowed_special else frozenset()
        if allowed_special is None and disallowed:
            allowed -= disallowed
        elif disallowed_special == "all":
            disallowed -= allowed  # explicitly allowed tokens win (tiktoken's rule)
        # Every special token starts with "<|": text without it is plain text.
        if "<|" not in text or not (allowed or disallowed):
            return self._encoding.encode_ordinary(text)
        match = disallowed and re.search("|".join(map(re.escape, sorted(disallowed, key=len, reverse=True))), text)
        if match:
            raise ValueError(
                f"The text contains {match.group()!r} (at character {match.start()}), the surface form of a Qwen "
                "special token that disallowed_special forbids. To encode it as plain text pass allowed_special=set(), "
                "disallowed_special=(); to encode it as the special token, add it to allowed_special."
            )
        return self._encoding.encode(text, allowed_special=allowed, disallowed_special=())

    def tokenize(self, text: str, **kwargs: Any) -> list[bytes | str]:
        """Tokens of ``text``: ``bytes`` for BPE tokens, ``str`` for special tokens (options of :meth:`encode_text`)."""
        return [self._convert_id_to_token(index) for index in self.encode_text(text, *self._special_options(kwargs))]

    def _special_options(self, kwargs: dict[str, Any]) -> tuple[Any, Any, bool]:
        return (
            kwargs.get("allowed_special"),
            kwargs.get("disallowed_special", ()),
            kwargs.get("split_special_tokens", self.split_special_tokens),
        )

    def _plain_ids(self, text: str, kwargs: dict[str, Any]) -> list[int]:
        if kwargs:
            ids = self.encode_text(text, *self._special_options(kwargs))
        else:
            ids = self.encode_text(text, None, (), self.split_special_tokens)
        if len(ids) > self.model_max_length:
            self._eventual_warn_about_too_long_sequence(ids, None, True)
        return ids

    def encode(self, text: Any, text_pair: Any = None, *args: Any, **kwargs: Any) -> list[int]:
        """``PreTrainedTokenizer.encode``, also taking the special-token options of :meth:`encode_text`."""
        if _is_plain(text, text_pair, args, kwargs):
            return self._plain_ids(text, kwargs)
        return super().encode(text, text_pair, *args, **kwargs)

    def __call__(self, text: Any = None, text_pair: Any = None, *args: Any, **kwargs: Any) -> BatchEncoding:
        """``PreTrainedTokenizer.__call__``, also taking the special-token options of :meth:`encode_text`."""
        if not _is_plain(text, text_pair, args, kwargs):
            return super().__call__(text, text_pair, *args, **kwargs)
        # The call a chat or a server makes: the generic result without the generic argument plumbing.
        ids = self._plain_ids(text, kwargs)
        out = BatchEncoding()
        out.data = {"input_ids": ids}  # filled in place: BatchEncoding(data) copies it key by key
        if "attention_mask" in self.model_input_names:
            out.data["attention_mask"] = [1] * len(ids)
        if "token_type_ids" in self.model_input_names:
            out.data["token_type_ids"] = [0] * len(ids)
        return out

    def _encode_plus(self, text: Any, text_pair: Any = None, **kwargs: Any) -> BatchEncoding:
        """Encode a string or a batch of strings (Qwen adds no special tokens: truncation, masks, padding).

        Pairs, pre-tokenised words, ids, overflow windows and sanitised chat templates take
        ``PreTrainedTokenizer``'s generic path, which encodes strings with :meth:`tokenize`.
        """
        if kwargs.get("return_offsets_mapping"):
            raise NotImplementedError("QWenTokenizer cannot return offsets; use the fast tokenizer from to_fast().")
        options = self._special_options(kwargs)
        single = isinstance(text, str)
        strings = single or (isinstance(text, (list, tuple)) and text and all(isinstance(item, str) for item in text))
        generic = ("is_split_into_words", "return_overflowing_tokens", "sanitize_control_tokens")
        if not strings or text_pair is not None or any(kwargs.get(key) for key in generic):
            return super()._encode_plus(text, text_pair, **kwargs)
        batch = [self.encode_text(item, *options) for item in ([text] if single else text)]
        max_length, truncation = kwargs.get("max_length"), kwargs.get("truncation_strategy")
        if truncation not in (None, TruncationStrategy.DO_NOT_TRUNCATE) and max_length:
            batch = [self.truncate_sequences(ids, None, len(ids) - max_length, truncation)[0] for ids in batch]
        for ids in batch:
            self._eventual_warn_about_too_long_sequence(ids, max_length, kwargs.get("verbose", True))

        def wanted(name: str) -> bool:
            requested = kwargs.get(f"return_{name}")
            return requested if requested is not None else name in self.model_input_names

        data: dict[str, Any] = {"input_ids": batch}
        if wanted("token_type_ids"):
            data["token_type_ids"] = [[0] * len(ids) for ids in batch]
        if kwargs.get("return_special_tokens_mask"):  # marks the tokens the tokenizer adds: none
            data["special_tokens_mask"] = [[0] * len(ids) for ids in batch]
        if kwargs.get("return_length"):  # of a batch: before padding, like transformers
            data["length"] = [len(ids) for ids in batch]
        if single:
            data = {key: value[0] for key, value in data.items()}
        padding = kwargs.get("padding_strategy", PaddingStrategy.DO_NOT_PAD)
        if padding != PaddingStrategy.DO_NOT_PAD:
            pad_options = {
                key: kwargs.get(key) for key in ("pad_to_multiple_of", "padding_side", "return_attention_mask")
            }
            data = self.pad(data, padding=padding, max_length=max_length, **pad_options)
        elif wanted("attention_mask"):
            data["attention_mask"] = [1] * len(batch[0]) if single else [[1] * len(ids) for ids in batch]
        if kwargs.get("return_length") and single:
            data["length"] = len(data["input_ids"])
        return BatchEncoding(data, tensor_type=kwargs.get("return_tensors"), prepend_batch_axis=single)

    def _decode(
        self,
        token_ids: int | list[int],
        skip_special_tokens: bool = False,
        clean_up_tokenization_spaces: bool | None = None,
        errors: str | None = None,
        **kwargs: Any,
    ) -> str:
        """Decode ids; bytes that are not valid UTF-8 are handled per ``errors``.

        ``skip_special_tokens`` drops the special tokens and ids outside the vocabulary (e.g. the
        padding rows of the model's embedding). Without it, an id outside the vocabulary is treated
        like an invalid byte: U+FFFD with ``errors="replace"``, dropped with "ignore", raises with "strict".
        """
        errors = errors or self.errors
        token_ids = [token_ids] if isinstance(token_ids, int) else token_ids
        if skip_special_tokens:
            token_ids = [index for index in token_ids if index in self._decoder]
        try:
            text = self._encoding.decode_bytes(token_ids).decode("utf-8", errors=errors)
        except (KeyError, OverflowError, TypeError):  # ids outside the vocabulary
            tokens: list[bytes | str] = []
            for index in map(int, token_ids):
                if errors == "strict" or index in self._decoder or index in _SPECIAL_BY_ID:
                    tokens.append(self._convert_id_to_token(index))  # raises for an unknown id
                else:
                    tokens.append("\ufffd" if errors == "replace" else "")
            text = self.convert_tokens_to_string(tokens, errors)
        if clean_up_tokenization_spaces or (clean_up_tokenization_spaces is None and self.clean_up_tokenization_spaces):
            text = self.clean_up_tokenization(text)
        return text

    def save_vocabulary(self, save_directory: str, filename_prefix: str | None = None) -> tuple[str]:
        """Write ``qwen.tiktoken`` (including any extra vocabulary) into ``save_directory``."""
        if not os.path.isdir(save_directory):
            raise NotADirectoryError(f"Vocabulary path ({save_directory}) should be a directory")
        path = os.path.join(
            save_directory, (filename_prefix + "-" if filename_prefix else "") + VOCAB_FILES_NAMES["vocab_file"]
        )
        dump_tiktoken_ranks(self.mergeable_ranks, path)
        return (path,)

    # ----------------------------------------------------------------- fast

    def to_fast(self, **kwargs: Any):
        """An equivalent ``tokenizers``-backed tokenizer: the same ids for every input.

        Its ``save_pretrained`` writes a ``tokenizer.json`` that plain ``AutoTokenizer``
        loads without this package. The class is ``transformers.Qwen2Tokenizer``, as Qwen2
        uses this very pre-tokenisation and normalisation. Named special tokens and
        settings are copied from this tokenizer; ``eos_token`` and ``pad_token`` default to
        ``<|endoftext|>`` (the Qwen2 base-model convention), ``unk_token`` and ``bos_token``
        to None. ``kwargs`` override them (e.g. ``eos_token="<|im_end|>"``, ``chat_template``).
        """
        from transformers import Qwen2Tokenizer

        settings = {"bos_token": None, "unk_token": None, "eos_token": ENDOFTEXT, "pad_token": ENDOFTEXT}
        settings.update(self.special_tokens_map, clean_up_tokenization_spaces=False)
        for key in ("model_max_length", "padding_side", "truncation_side", "split_special_tokens", "chat_template"):
            if getattr(self, key) is not None:
                settings[key] = getattr(self, key)
        fast = Qwen2Tokenizer(tokenizer_object=self._backend_tokenizer(), **{**settings, **kwargs})
        # Qwen2Tokenizer re-registers its named special tokens as matched before
        # normalisation; put them back to "after NFC", as everywhere else here.
        fast.backend_tokenizer.add_special_tokens(_fast_special_tokens())
        return fast

    def _backend_tokenizer(self):
        """The ``tokenizers.Tokenizer`` behind :meth:`to_fast`: an NFC normaliser, then transformers'
        ``TikTokenConverter`` pipeline (Qwen split pattern, byte-level BPE of the ranks, extra vocabulary
        included), and the special tokens as special added tokens at their ids, matched on the normalised text.
        """
        from tokenizers import normalizers
        from transformers.convert_slow_tokenizer import TikTokenConverter

        ranks = self.mergeable_ranks

        class Converter(TikTokenConverter):
            def load_tiktoken_bpe(self, tiktoken_url: Any) -> dict[bytes, int]:  # type: ignore[override]
                return ranks

            def extract_vocab_merges_from_model(self, tiktoken_url: Any) -> tuple[dict[str, int], list]:
                vocab, merges = super().extract_vocab_merges_from_model(tiktoken_url)
                # Special tokens in the model vocabulary pin them to their fixed ids even when
                # an extra vocabulary puts BPE tokens after them. No pre-tokenised piece can
                # equal one (a piece never mixes punctuation and letters): BPE never emits them.
                return {**vocab, **SPECIAL_TOKENS}, merges

        backend = Converter(pattern=PAT_STR).converted()
        backend.normalizer = normalizers.NFC()
        backend.add_special_tokens(_fast_special_tokens())
        if any(backend.token_to_id(token) != index for token, index in SPECIAL_TOKENS.items()):
            raise RuntimeError("the fast tokenizer did not keep the special tokens at their ids")
        return backend


# Keyword arguments that need none of transformers' padding, truncation or tensor plumbing.
_PLAIN_OPTIONS = frozenset({"allowed_special", "disallowed_special", "split_special_tokens", "add_special_tokens"})


def _is_plain(text: Any, text_pair: Any, args: tuple, kwargs: dict[str, Any]) -> bool:
    return isinstance(text, str) and text_pair is None and not args and (not kwargs or kwargs.keys() <= _PLAIN_OPTIONS)


def _fast_special_tokens() -> list[Any]:
    from tokenizers import AddedToken as FastAddedToken

    # normalized=True: matched on the NFC-normalised text, as QWenTokenizer.encode_text does.
    return [FastAddedToken(token, special=True, normalized=True) for token in SPECIAL_TOKENS]


def _special_names(names: str | Collection[str] | None, argument: str) -> frozenset[str]:
    if names == "all":
        return _SPECIAL_SET
    if not names:
        return frozenset()
    if isinstance(names, str):
        raise TypeError(f'{argument} must be "all" or a collection of special tokens, got the string {names!r}')
    names = frozenset(_token_content(name) for name in names)
    if not names <= _SPECIAL_SET:
        raise ValueError(
            f"{argument} names tokens that are not Qwen special tokens: {sorted(names - _SPECIAL_SET)[:5]}"
        )
    return names


def _nfc(text: str) -> str:
    """``unicodedata.normalize("NFC", text)``, a line at a time for long texts.

    Normalisation is cheap for text that passes the quick check (nearly all text), but a
    single character that only "may" be normalised (a combining mark) sends the whole
    string through full normalisation, an order of magnitude slower. A line break never
    composes or reorders with its neighbours, so lines can be normalised separately and
    only the lines holding such characters pay for it.
    """
    if text.isascii():
        return text
    if len(text) <= 2048 or "\n" not in text:
        return unicodedata.normalize("NFC", text)
    lines = text.split("\n")
    normalized = [unicodedata.normalize("NFC", line) for line in lines]
    # normalize() returns its argument itself when the quick check passes.
    if all(new is old for new, old in zip(normalized, lines, strict=True)):
        return text
    return "\n".join(normalized)


def _missing_vocab_message(where: str | None) -> str:
    origin = (
        "The file ships with every official Qwen(-1) checkpoint (e.g. Qwen/Qwen-7B-Chat) next to its config.json, "
        "and the identical file is part of the PyPI package `dashscope` (dashscope/resources/qwen.tiktoken, sha256 "
        f"{QWEN_TIKTOKEN_SHA256[:16]}...)."
    )
    if where is None:
        return f"No vocabulary given and no `dashscope` installed. {origin} Pass vocab_file or `pip install dashscope`."
    if os.path.isdir(where) or not os.path.splitext(where)[1]:
        return (
            f"{where!r} has no 'qwen.tiktoken'. {origin} Copy it from the checkpoint you started from, or from an "
            'installed dashscope (python -c "from qwen.tokenization_qwen import default_vocab_file as f; print(f())").'
        )
    return f"Vocabulary file {where!r} does not exist. {origin}"
