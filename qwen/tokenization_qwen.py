"""Tokenizer of the first-generation Qwen models: byte-level BPE run by ``tiktoken``.

The vocabulary file ``qwen.tiktoken`` holds one ``base64(token bytes) rank`` pair per
line (151,643 ranks, the rank is the token id). On top of it sit 208 special tokens
at fixed ids: ``<|endoftext|>`` (151643), ``<|im_start|>`` (151644), ``<|im_end|>``
(151645) and ``<|extra_0|>`` ... ``<|extra_204|>`` (151646-151850).

This module only imports the standard library, ``tiktoken`` and ``transformers``, so
it can be copied into a checkpoint directory and loaded as remote code
(``AutoTokenizer.from_pretrained(path, trust_remote_code=True)``).
"""

from __future__ import annotations

import base64
import codecs
import functools
import importlib.util
import logging
import os
import re
import unicodedata
from collections.abc import Collection, Iterable
from typing import Any

import tiktoken
from transformers import AddedToken, BatchEncoding, PreTrainedTokenizer
from transformers.tokenization_utils_base import PaddingStrategy, TruncationStrategy
from transformers.utils import to_py_obj

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

# sha256 of the vocabulary shipped with every official checkpoint (and with dashscope).
QWEN_TIKTOKEN_SHA256 = "b2b1b8dfb5cc5f024bafc373121c6aba3f66f9a5a0269e243470a1de16a33186"

_DECODE_ERRORS_DOC = '"replace" (default), "ignore", "strict" or any other `bytes.decode` error handler'


class MissingVocabularyError(ValueError):
    """Raised when the ``qwen.tiktoken`` vocabulary cannot be found."""


def default_vocab_file() -> str | None:
    """Path of the ``qwen.tiktoken`` shipped inside the PyPI package ``dashscope``, or None.

    The package is located without being imported (importing dashscope pulls in its
    HTTP client stack).
    """
    try:
        spec = importlib.util.find_spec("dashscope")
    except (ImportError, ValueError):
        return None
    if spec is None or not spec.submodule_search_locations:
        return None
    for location in spec.submodule_search_locations:
        candidate = os.path.join(location, "resources", VOCAB_FILES_NAMES["vocab_file"])
        if os.path.isfile(candidate):
            return candidate
    return None


def load_tiktoken_ranks(path: str | os.PathLike) -> dict[bytes, int]:
    """Read a tiktoken vocabulary file (``base64(token) rank`` per line) into ``{bytes: rank}``.

    Unlike ``tiktoken.load.load_tiktoken_bpe`` this never caches by file name, so a file
    rewritten in place is always read afresh.
    """
    with open(path, "rb") as handle:
        data = handle.read()
    ranks: dict[bytes, int] = {}
    for line_number, line in enumerate(data.splitlines(), start=1):
        if not line.strip():
            continue
        try:
            token_b64, rank = line.split()
            token = base64.b64decode(token_b64, validate=True)
            rank = int(rank)
        except (ValueError, TypeError) as error:
            raise ValueError(
                f"{path}, line {line_number}: expected '<base64 token bytes> <rank>', got {line[:80]!r}"
            ) from error
        if not token:
            raise ValueError(f"{path}, line {line_number}: empty token")
        if token in ranks:
            raise ValueError(f"{path}, line {line_number}: token {token!r} appears twice")
        if rank < 0:
            raise ValueError(f"{path}, line {line_number}: negative rank {rank}")
        ranks[token] = rank
    return ranks


def dump_tiktoken_ranks(ranks: dict[bytes, int], path: str | os.PathLike) -> None:
    """Write ``{bytes: rank}`` in the tiktoken file format, sorted by rank."""
    with open(path, "wb") as handle:
        for token, rank in sorted(ranks.items(), key=lambda item: item[1]):
            handle.write(base64.b64encode(token) + b" " + str(rank).encode("ascii") + b"\n")


@functools.lru_cache(maxsize=64)
def _special_token_regex(tokens: frozenset[str]) -> re.Pattern[str]:
    return re.compile("|".join(re.escape(token) for token in sorted(tokens, key=len, reverse=True)))


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
    # save_pretrained copies this file next to the saved files and writes the auto_map,
    # like the official checkpoints.
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
            if vocab_file is None:
                raise MissingVocabularyError(_missing_vocab_message(None))
        vocab_file = os.fspath(vocab_file)
        if not os.path.isfile(vocab_file):
            raise MissingVocabularyError(_missing_vocab_message(vocab_file))

        self.errors = _check_errors(errors)
        self.vocab_file = vocab_file
        self.mergeable_ranks = load_tiktoken_ranks(vocab_file)
        clashes = sorted(set(self.mergeable_ranks.values()) & set(SPECIAL_TOKENS.values()))
        if clashes:
            raise ValueError(
                f"{vocab_file} assigns ranks {clashes[:5]} that belong to Qwen special tokens "
                f"({SPECIAL_START_ID}-{SPECIAL_START_ID + len(SPECIAL_TOKENS) - 1})"
            )
        if len(set(self.mergeable_ranks.values())) != len(self.mergeable_ranks):
            raise ValueError(f"{vocab_file} gives the same rank to several tokens")
        if extra_vocab_file is not None:
            self._add_extra_vocab(os.fspath(extra_vocab_file))
        self._build_runtime()

        # Our special tokens are fixed: they are never stored as transformers "added tokens".
        self._check_added_tokens_decoder(kwargs.pop("added_tokens_decoder", None) or {})
        kwargs.setdefault("clean_up_tokenization_spaces", False)
        super().__init__(errors=errors, **kwargs)
        # Loading details that have no business in a saved tokenizer_config.json.
        for key in ("is_local", "local_files_only", "tokenizer_file"):
            self.init_kwargs.pop(key, None)
        # Make save_pretrained write the current values of these settings.
        for key in ("padding_side", "truncation_side", "split_special_tokens"):
            self.init_kwargs.setdefault(key, getattr(self, key))

    # ------------------------------------------------------------------ setup

    def _add_extra_vocab(self, extra_vocab_file: str) -> None:
        extra = load_tiktoken_ranks(extra_vocab_file)
        used_ids = set(self.mergeable_ranks.values()) | set(SPECIAL_TOKENS.values())
        skipped = []
        for token, rank in sorted(extra.items(), key=lambda item: item[1]):
            if token in self.mergeable_ranks:
                skipped.append(f"{token!r} (already token {self.mergeable_ranks[token]})")
            elif rank in used_ids:
                skipped.append(f"{token!r} (id {rank} already taken)")
            else:
                self.mergeable_ranks[token] = rank
                used_ids.add(rank)
                continue
            logger.debug("extra vocabulary %s: skipping %s", extra_vocab_file, skipped[-1])
        if skipped:
            logger.warning(
                "extra vocabulary %s: skipped %d of %d entries that already exist: %s%s",
                extra_vocab_file,
                len(skipped),
                len(extra),
                ", ".join(skipped[:5]),
                ", ..." if len(skipped) > 5 else "",
            )

    def _build_runtime(self) -> None:
        """(Re)create everything derived from ``mergeable_ranks`` (not pickled)."""
        self._encoding = tiktoken.Encoding(
            "Qwen", pat_str=PAT_STR, mergeable_ranks=self.mergeable_ranks, special_tokens=SPECIAL_TOKENS
        )
        self._decoder: dict[int, bytes] = {rank: token for token, rank in self.mergeable_ranks.items()}
        self._special_decoder: dict[int, str] = {index: token for token, index in SPECIAL_TOKENS.items()}
        self._special_set = frozenset(SPECIAL_TOKENS)

    @staticmethod
    def _check_added_tokens_decoder(added_tokens_decoder: dict) -> None:
        for index, token in added_tokens_decoder.items():
            content = token["content"] if isinstance(token, dict) else _token_content(token)
            if SPECIAL_TOKENS.get(content) != int(index):
                logger.warning(
                    "Ignoring added token %r at id %s from the tokenizer configuration: QWenTokenizer "
                    "only has its fixed special tokens.",
                    content,
                    index,
                )

    def __getstate__(self) -> dict[str, Any]:
        state = self.__dict__.copy()
        for key in ("_encoding", "_decoder", "_special_decoder", "_special_set"):
            state.pop(key, None)
        return state

    def __setstate__(self, state: dict[str, Any]) -> None:
        self.__dict__.update(state)
        self._build_runtime()

    # ------------------------------------------------------------ vocabulary

    @property
    def tokenizer(self) -> tiktoken.Encoding:
        """The underlying ``tiktoken.Encoding`` (attribute name kept from the official code)."""
        return self._encoding

    @property
    def special_tokens(self) -> dict[str, int]:
        """Surface form -> id of the 208 special tokens."""
        return dict(SPECIAL_TOKENS)

    @property
    def eod_id(self) -> int:
        return SPECIAL_TOKENS[ENDOFTEXT]

    @property
    def im_start_id(self) -> int:
        return SPECIAL_TOKENS[IMSTART]

    @property
    def im_end_id(self) -> int:
        return SPECIAL_TOKENS[IMEND]

    @property
    def vocab_size(self) -> int:
        return self._encoding.n_vocab

    def __len__(self) -> int:
        return self._encoding.n_vocab

    def get_vocab(self) -> dict[bytes | str, int]:
        """Token -> id: ``bytes`` keys for BPE tokens, ``str`` keys for special tokens."""
        vocab: dict[bytes | str, int] = dict(self.mergeable_ranks)
        vocab.update(SPECIAL_TOKENS)
        return vocab

    @property
    def all_special_tokens(self) -> list[str]:
        """Named special tokens (pad, eos, ...) and every Qwen special token."""
        tokens = dict.fromkeys(super().all_special_tokens)
        tokens.update(dict.fromkeys(SPECIAL_TOKENS))
        return list(tokens)

    @property
    def all_special_ids(self) -> list[int]:
        return self.convert_tokens_to_ids(self.all_special_tokens)

    @property
    def added_tokens_encoder(self) -> dict[str, int]:
        """The special tokens, which play the part of transformers' added tokens.

        (``added_tokens_decoder`` stays empty, so that saved configurations do not list
        the 208 fixed tokens.)
        """
        return dict(SPECIAL_TOKENS)

    def _get_control_tokens(self, chat_template: str) -> tuple[str, ...]:
        # What apply_chat_template(..., sanitize_control_tokens=True) neutralises in messages.
        if self.chat_control_tokens is not None:
            return tuple(token for token in SPECIAL_TOKENS if token in set(self.chat_control_tokens))
        return tuple(SPECIAL_TOKENS)

    def get_special_tokens_mask(
        self, token_ids_0: list[int], token_ids_1: list[int] | None = None, already_has_special_tokens: bool = False
    ) -> list[int]:
        if already_has_special_tokens:
            if token_ids_1 is not None:
                raise ValueError("token_ids_1 must be None when already_has_special_tokens=True")
            return [1 if int(index) in self._special_decoder else 0 for index in token_ids_0]
        return [0] * (len(token_ids_0) + len(token_ids_1 or ()))

    def _add_tokens(self, new_tokens: Iterable[str | AddedToken], special_tokens: bool = False) -> int:
        """Only accepts tokens that already are Qwen special tokens (adds nothing)."""
        unknown = [_token_content(token) for token in new_tokens or () if _token_content(token) not in SPECIAL_TOKENS]
        if unknown:
            kind = "special tokens" if special_tokens else "tokens"
            raise ValueError(
                f"QWenTokenizer cannot add new {kind} {unknown[:5]}: its vocabulary is fixed. Use one of "
                f"the reserved special tokens {EXTRAS[0]} ... {EXTRAS[-1]} (ids {SPECIAL_TOKENS[EXTRAS[0]]}-"
                f"{SPECIAL_TOKENS[EXTRAS[-1]]}) for a new control token, or extend the BPE vocabulary "
                "with `extra_vocab_file` (see tokenization_note.md)."
            )
        return 0

    def add_special_tokens(self, special_tokens_dict: dict[str, Any], replace_extra_special_tokens: bool = True) -> int:
        # Validate before the base class starts assigning attributes.
        values: list[Any] = []
        for value in (special_tokens_dict or {}).values():
            values.extend(value if isinstance(value, (list, tuple)) else [value])
        self._add_tokens([value for value in values if isinstance(value, (str, AddedToken))], special_tokens=True)
        return super().add_special_tokens(special_tokens_dict, replace_extra_special_tokens)

    # ---------------------------------------------------- tokens <-> ids

    def _token_to_id(self, token: bytes | str | AddedToken) -> int | None:
        if isinstance(token, bytes):
            return self.mergeable_ranks.get(token)
        token = _token_content(token)
        if token in SPECIAL_TOKENS:
            return SPECIAL_TOKENS[token]
        return self.mergeable_ranks.get(token.encode("utf-8", "surrogatepass"))

    def convert_tokens_to_ids(self, tokens: Any) -> int | None | list[int | None]:
        """Ids of ``bytes`` BPE tokens or ``str`` special tokens (None when unknown).

        A ``str`` that is not a special token is looked up by its UTF-8 bytes.
        """
        if isinstance(tokens, (str, bytes, AddedToken)):
            return self._token_to_id(tokens)
        return [self._token_to_id(token) for token in tokens]

    def _convert_token_to_id(self, token: bytes | str) -> int | None:
        return self._token_to_id(token)

    def _convert_token_to_id_with_added_voc(self, token: bytes | str) -> int | None:
        return self._token_to_id(token)

    def _id_to_token(self, index: int) -> bytes | str:
        index = int(index)
        token = self._decoder.get(index)
        if token is None:
            token = self._special_decoder.get(index)
            if token is None:
                raise ValueError(f"Token id {index} is not in the Qwen vocabulary (size {len(self)})")
        return token

    def convert_ids_to_tokens(self, ids: Any, skip_special_tokens: bool = False) -> bytes | str | list[bytes | str]:
        """``bytes`` for BPE tokens, ``str`` for special tokens."""
        ids = to_py_obj(ids)
        if not isinstance(ids, (list, tuple)):
            return self._id_to_token(ids)
        if skip_special_tokens:
            ids = [index for index in ids if int(index) not in self._special_decoder]
        return [self._id_to_token(index) for index in ids]

    def _convert_id_to_token(self, index: int) -> bytes | str:
        return self._id_to_token(index)

    def convert_tokens_to_string(self, tokens: Iterable[bytes | str], errors: str | None = None) -> str:
        """Join ``bytes`` tokens and decode them; ``str`` tokens are inserted as they are."""
        errors = errors or self.errors
        parts: list[str] = []
        pending = b""
        for token in tokens:
            if isinstance(token, bytes):
                pending += token
            elif isinstance(token, str):
                if pending:
                    parts.append(pending.decode("utf-8", errors=errors))
                    pending = b""
                parts.append(token)
            else:
                raise TypeError(f"tokens must be bytes or str, got {type(token).__name__}")
        if pending:
            parts.append(pending.decode("utf-8", errors=errors))
        return "".join(parts)

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
        if allowed_special is None and not disallowed_special and not split_special_tokens:
            # The default: recognise all special tokens. They all start with "<|".
            if "<|" not in text:
                return self._encoding.encode_ordinary(text)
            return self._encoding.encode(text, allowed_special=self._special_set, disallowed_special=())

        explicit_allowed = allowed_special is not None
        if allowed_special is None:
            allowed = frozenset() if split_special_tokens else self._special_set
        elif allowed_special == "all":
            allowed = self._special_set
        else:
            allowed = self._check_special_names(allowed_special, "allowed_special")
        if disallowed_special == "all":
            disallowed = self._special_set - allowed if explicit_allowed else self._special_set
        else:
            disallowed = self._check_special_names(disallowed_special or (), "disallowed_special")
        if not explicit_allowed:
            allowed = allowed - disallowed

        if disallowed and "<|" in text:
            match = _special_token_regex(disallowed).search(text)
            if match:
                raise ValueError(
                    f"The text contains {match.group()!r} (at character {match.start()}), the surface form of "
                    "a Qwen special token that disallowed_special forbids. To encode it as plain text pass "
                    "allowed_special=set(), disallowed_special=(); to encode it as the special token, add it "
                    "to allowed_special."
                )
        if not allowed or "<|" not in text:
            return self._encoding.encode_ordinary(text)
        return self._encoding.encode(text, allowed_special=allowed, disallowed_special=())

    def _check_special_names(self, names: str | Collection[str], argument: str) -> frozenset[str]:
        if not names:
            return frozenset()
        if isinstance(names, str):
            raise TypeError(f'{argument} must be "all" or a collection of special tokens, got the string {names!r}')
        names = frozenset(_token_content(name) for name in names)
        unknown = names - self._special_set
        if unknown:
            raise ValueError(f"{argument} names tokens that are not Qwen special tokens: {sorted(unknown)[:5]}")
        return names

    @staticmethod
    def _pop_encode_options(kwargs: dict[str, Any]) -> dict[str, Any]:
        options = {
            "allowed_special": kwargs.pop("allowed_special", None),
            "disallowed_special": kwargs.pop("disallowed_special", ()),
            "split_special_tokens": kwargs.pop("split_special_tokens", False),
        }
        if kwargs.pop("return_offsets_mapping", False):
            raise NotImplementedError(
                "QWenTokenizer cannot return offsets; use the fast tokenizer from QWenTokenizer.to_fast()."
            )
        return options

    def tokenize(self, text: str, **kwargs: Any) -> list[bytes | str]:
        """Tokens of ``text``: ``bytes`` for BPE tokens, ``str`` for special tokens.

        Accepts ``allowed_special``, ``disallowed_special`` and ``split_special_tokens``
        like :meth:`encode_text`.
        """
        kwargs.setdefault("split_special_tokens", self.split_special_tokens)
        options = self._pop_encode_options(kwargs)
        return [self._id_to_token(index) for index in self.encode_text(text, **options)]

    def _tokenize(self, text: str, **kwargs: Any) -> list[bytes]:
        # transformers' contract: no special-token handling here.
        return [self._decoder[index] for index in self.encode_text(text, allowed_special=set())]

    def encode(self, text: Any, text_pair: Any = None, *args: Any, **kwargs: Any) -> list[int]:
        """Token ids of ``text``; see :meth:`encode_text` for the special-token options.

        Takes the arguments of ``PreTrainedTokenizer.encode`` (padding, truncation, ...).
        """
        if (
            text_pair is None
            and not args
            and isinstance(text, str)
            and _is_plain_request(kwargs)
            and kwargs.get("return_tensors") is None
        ):
            # Nothing to pad, truncate or convert: skip the BatchEncoding machinery.
            if kwargs:
                ids = self.encode_text(text, **self._encode_options(kwargs))
            else:
                ids = self.encode_text(text, None, (), self.split_special_tokens)
            if len(ids) > self.model_max_length:
                self._eventual_warn_about_too_long_sequence(ids, None, kwargs.get("verbose", True))
            return ids
        return super().encode(text, text_pair, *args, **kwargs)

    def __call__(self, text: Any = None, text_pair: Any = None, *args: Any, **kwargs: Any) -> BatchEncoding:
        """Encode a string, a batch of strings or pairs; see ``PreTrainedTokenizer.__call__``.

        Also accepts ``allowed_special`` and ``disallowed_special`` (see :meth:`encode_text`).
        """
        if text_pair is None and not args and isinstance(text, str) and _is_plain_request(kwargs):
            # The common single-string call, without the generic argument plumbing.
            if kwargs:
                ids = self.encode_text(text, **self._encode_options(kwargs))
            else:
                ids = self.encode_text(text, None, (), self.split_special_tokens)
            if len(ids) > self.model_max_length:
                self._eventual_warn_about_too_long_sequence(ids, None, kwargs.get("verbose", True))
            data: dict[str, Any] = {"input_ids": ids}
            return_attention_mask = kwargs.get("return_attention_mask")
            if return_attention_mask or (return_attention_mask is None and "attention_mask" in self.model_input_names):
                data["attention_mask"] = [1] * len(ids)
            return_token_type_ids = kwargs.get("return_token_type_ids")
            if return_token_type_ids or (return_token_type_ids is None and "token_type_ids" in self.model_input_names):
                data["token_type_ids"] = [0] * len(ids)
            # BatchEncoding(data) copies the dict key by key in Python; handing it the dict
            # as its UserDict storage is the same thing, a third of the cost of the call.
            out = BatchEncoding()
            out.data = data
            return_tensors = kwargs.get("return_tensors")
            if return_tensors is not None:
                out.convert_to_tensors(tensor_type=return_tensors, prepend_batch_axis=True)
            return out
        return super().__call__(text, text_pair, *args, **kwargs)

    def _encode_options(self, kwargs: dict[str, Any]) -> dict[str, Any]:
        return {
            "allowed_special": kwargs.get("allowed_special"),
            "disallowed_special": kwargs.get("disallowed_special", ()),
            "split_special_tokens": kwargs.get("split_special_tokens", self.split_special_tokens),
        }

    def _switch_to_input_mode(self) -> None:
        # Defined so that __call__'s hasattr() probe does not go through the slow __getattr__.
        pass

    def _encode_plus(
        self,
        text: Any,
        text_pair: Any = None,
        add_special_tokens: bool = True,
        padding_strategy: PaddingStrategy = PaddingStrategy.DO_NOT_PAD,
        truncation_strategy: TruncationStrategy = TruncationStrategy.DO_NOT_TRUNCATE,
        max_length: int | None = None,
        stride: int = 0,
        is_split_into_words: bool = False,
        pad_to_multiple_of: int | None = None,
        padding_side: str | None = None,
        return_tensors: Any = None,
        return_token_type_ids: bool | None = None,
        return_attention_mask: bool | None = None,
        return_overflowing_tokens: bool = False,
        return_special_tokens_mask: bool = False,
        return_length: bool = False,
        verbose: bool = True,
        **kwargs: Any,
    ) -> BatchEncoding:
        common = {
            "add_special_tokens": add_special_tokens,
            "max_length": max_length,
            "stride": stride,
            "pad_to_multiple_of": pad_to_multiple_of,
            "padding_side": padding_side,
            "return_tensors": return_tensors,
            "return_token_type_ids": return_token_type_ids,
            "return_attention_mask": return_attention_mask,
            "return_overflowing_tokens": return_overflowing_tokens,
            "return_special_tokens_mask": return_special_tokens_mask,
            "return_length": return_length,
            "verbose": verbose,
        }
        single = isinstance(text, str)
        if not single and not (
            isinstance(text, (list, tuple))
            and text
            and not is_split_into_words
            and text_pair is None
            and all(isinstance(item, str) for item in text)
        ):
            # Pre-tokenised input, ids and batches of pairs: the generic implementation,
            # which comes back here for each string.
            return super()._encode_plus(
                text,
                text_pair=text_pair,
                padding_strategy=padding_strategy,
                truncation_strategy=truncation_strategy,
                is_split_into_words=is_split_into_words,
                **common,
                **kwargs,
            )
        kwargs.setdefault("split_special_tokens", self.split_special_tokens)
        options = self._pop_encode_options(kwargs)
        if kwargs.pop("sanitize_control_tokens", False):
            # apply_chat_template(..., sanitize_control_tokens=True): special-token text that
            # came from the messages is plain text, the template's own is special.
            def encode(chat: str) -> list[int]:
                return _encode_marked_chat(self, chat)
        else:

            def encode(chat: str) -> list[int]:
                return self.encode_text(chat, **options)

        if text_pair is not None or return_overflowing_tokens:
            # Pairs and overflow windows: ids here, the rest in prepare_for_model.
            if not (single and (text_pair is None or isinstance(text_pair, str))):
                raise ValueError("text_pair must be a string when text is a string")
            return self.prepare_for_model(
                encode(text),
                pair_ids=encode(text_pair) if text_pair is not None else None,
                padding=padding_strategy.value,
                truncation=truncation_strategy.value,
                prepend_batch_axis=True,
                **common,
            )

        # Lean path for a string or a batch of strings. Qwen adds no special tokens, so
        # this only has to truncate, build the masks and pad.
        batch = [encode(text)] if single else [encode(item) for item in text]
        if max_length is not None and truncation_strategy in (
            TruncationStrategy.LONGEST_FIRST,
            TruncationStrategy.ONLY_FIRST,
        ):
            if self.truncation_side == "left":
                batch = [ids[-max_length:] if len(ids) > max_length else ids for ids in batch]
            else:
                batch = [ids[:max_length] for ids in batch]
        for ids in batch:
            self._eventual_warn_about_too_long_sequence(ids, max_length, verbose)

        data: dict[str, list] = {"input_ids": batch}
        if return_token_type_ids or (return_token_type_ids is None and "token_type_ids" in self.model_input_names):
            data["token_type_ids"] = [[0] * len(ids) for ids in batch]
        if return_special_tokens_mask:
            # Marks tokens the tokenizer adds (none), not special tokens found in the text.
            data["special_tokens_mask"] = [[0] * len(ids) for ids in batch]
        if return_length and not single:
            data["length"] = [len(ids) for ids in batch]
        if single:
            data = {key: value[0] for key, value in data.items()}
        if padding_strategy != PaddingStrategy.DO_NOT_PAD:
            data = self.pad(
                data,
                padding=padding_strategy.value,
                max_length=max_length,
                pad_to_multiple_of=pad_to_multiple_of,
                padding_side=padding_side,
                return_attention_mask=return_attention_mask,
            )
        elif return_attention_mask or (return_attention_mask is None and "attention_mask" in self.model_input_names):
            data["attention_mask"] = [1] * len(data["input_ids"]) if single else [[1] * len(ids) for ids in batch]
        if return_length and single:
            data["length"] = len(data["input_ids"])
        return BatchEncoding(data, tensor_type=return_tensors, prepend_batch_axis=single)

    # --------------------------------------------------------------- decode

    def _decode(
        self,
        token_ids: int | list[int],
        skip_special_tokens: bool = False,
        clean_up_tokenization_spaces: bool | None = None,
        errors: str | None = None,
        **kwargs: Any,
    ) -> str:
        """Decode ids; bytes that are not valid UTF-8 are handled per ``errors``.

        ``skip_special_tokens`` drops the special tokens (ids 151643-151850) and ids
        outside the vocabulary (e.g. the padding rows of the model's embedding).
        Without it, an id outside the vocabulary is treated like an invalid byte: it
        becomes U+FFFD with ``errors="replace"``, is dropped with ``"ignore"`` and
        raises with ``"strict"``.
        """
        errors = errors or self.errors
        if isinstance(token_ids, int):
            token_ids = [token_ids]
        if skip_special_tokens:
            decoder = self._decoder
            token_ids = [index for index in token_ids if index in decoder]
        try:
            text = self._encoding.decode_bytes(token_ids).decode("utf-8", errors=errors)
        except (KeyError, OverflowError, TypeError):
            text = self._decode_with_unknown_ids(token_ids, errors)
        if clean_up_tokenization_spaces or (clean_up_tokenization_spaces is None and self.clean_up_tokenization_spaces):
            text = self.clean_up_tokenization(text)
        return text

    def _decode_with_unknown_ids(self, token_ids: Iterable[int], errors: str) -> str:
        parts: list[str] = []
        pending: list[bytes] = []
        for index in token_ids:
            index = int(index)
            token = self._decoder.get(index)
            if token is None:
                token = self._special_decoder.get(index)
                if token is not None:
                    token = token.encode("utf-8")
            if token is not None:
                pending.append(token)
                continue
            if errors == "strict":
                raise ValueError(f"Token id {index} is not in the Qwen vocabulary (size {len(self)})")
            parts.append(b"".join(pending).decode("utf-8", errors=errors))
            pending = []
            if errors == "replace":
                parts.append("\ufffd")
        parts.append(b"".join(pending).decode("utf-8", errors=errors))
        return "".join(parts)

    # ----------------------------------------------------------------- save

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
        """An equivalent ``tokenizers``-backed tokenizer (a ``transformers.Qwen2Tokenizer``).

        The pipeline is: NFC normaliser -> the Qwen split pattern -> byte-level BPE, whose
        vocabulary and merges come from transformers' ``TikTokenConverter`` (including
        any extra vocabulary); the 208 special tokens are special added tokens at their
        fixed ids, matched on the normalised text like here. It gives the same ids as
        this tokenizer for every input. ``save_pretrained`` writes a ``tokenizer.json``
        that plain ``AutoTokenizer.from_pretrained`` loads without this package.

        The class is ``Qwen2Tokenizer`` because Qwen2 uses this very pre-tokenisation and
        normalisation, so tools that know Qwen2 (transformers 4.x and 5.x, serving
        engines) load it natively. Named special tokens and settings are copied from this
        tokenizer; ``eos_token`` and ``pad_token`` default to ``<|endoftext|>`` (the Qwen2
        base-model convention) when unset here, ``unk_token`` and ``bos_token`` to None.
        ``kwargs`` override any of them (e.g. ``eos_token="<|im_end|>"`` for a chat
        model, ``chat_template=...``).
        """
        from tokenizers import AddedToken as FastAddedToken
        from transformers import Qwen2Tokenizer

        settings: dict[str, Any] = {
            "bos_token": None,
            "unk_token": None,
            "eos_token": ENDOFTEXT,
            "pad_token": ENDOFTEXT,
            **self.special_tokens_map,
            "model_max_length": self.model_max_length,
            "padding_side": self.padding_side,
            "truncation_side": self.truncation_side,
            "clean_up_tokenization_spaces": False,
            "split_special_tokens": self.split_special_tokens,
        }
        if self.chat_template is not None:
            settings["chat_template"] = self.chat_template
        settings.update(kwargs)
        fast = Qwen2Tokenizer(tokenizer_object=self._backend_tokenizer(), **settings)
        # Qwen2Tokenizer re-registers its named special tokens as matched before
        # normalisation; put them back to "after NFC", as everywhere else here.
        fast.backend_tokenizer.add_special_tokens([_fast_special_token(FastAddedToken, t) for t in SPECIAL_TOKENS])
        return fast

    def _backend_tokenizer(self):
        """The ``tokenizers.Tokenizer`` behind :meth:`to_fast`."""
        from tokenizers import AddedToken as FastAddedToken
        from tokenizers import Regex, Tokenizer, decoders, normalizers, pre_tokenizers, processors
        from tokenizers.models import BPE
        from transformers.convert_slow_tokenizer import TikTokenConverter

        ranks = self.mergeable_ranks

        class _InMemoryConverter(TikTokenConverter):
            def load_tiktoken_bpe(self, tiktoken_url: Any) -> dict[bytes, int]:  # type: ignore[override]
                return ranks

        vocab, merges = _InMemoryConverter(pattern=PAT_STR).extract_vocab_merges_from_model(None)
        # Special tokens in the model vocabulary pin them to their fixed ids even when an
        # extra vocabulary puts BPE tokens after them. No pre-tokenised piece can equal
        # one (a piece never mixes punctuation and letters), so BPE never emits them.
        vocab.update(SPECIAL_TOKENS)
        backend = Tokenizer(BPE(vocab, merges, fuse_unk=False, byte_fallback=False))
        backend.model.ignore_merges = True  # a piece that is a token stays whole, as in tiktoken
        backend.normalizer = normalizers.NFC()
        backend.pre_tokenizer = pre_tokenizers.Sequence(
            [
                pre_tokenizers.Split(Regex(PAT_STR), behavior="isolated", invert=False),
                pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False),
            ]
        )
        backend.decoder = decoders.ByteLevel()
        backend.post_processor = processors.ByteLevel(trim_offsets=False)
        backend.add_special_tokens([_fast_special_token(FastAddedToken, token) for token in SPECIAL_TOKENS])
        for token, index in SPECIAL_TOKENS.items():
            if backend.token_to_id(token) != index:
                raise RuntimeError(f"fast tokenizer put {token} at {backend.token_to_id(token)}, expected {index}")
        return backend


def _fast_special_token(added_token_class: Any, content: str) -> Any:
    # normalized=True: matched on the NFC-normalised text, as QWenTokenizer.encode_text does.
    return added_token_class(content, special=True, normalized=True, lstrip=False, rstrip=False, single_word=False)


def _encode_marked_chat(tokenizer: QWenTokenizer, chat: str) -> list[int]:
    try:
        from transformers.utils.chat_template_utils import encode_marked_chat
    except ImportError as error:  # transformers without sanitize_control_tokens
        raise NotImplementedError("sanitize_control_tokens needs a newer transformers") from error
    return encode_marked_chat(tokenizer, chat)


# Keyword arguments of __call__ / encode that the single-string fast path can honour.
_PLAIN_REQUEST_KEYS = frozenset(
    {
        "allowed_special",
        "disallowed_special",
        "split_special_tokens",
        "add_special_tokens",  # Qwen adds no special tokens either way
        "verbose",
        "padding",
        "truncation",
        "max_length",
        "return_tensors",
        "return_attention_mask",
        "return_token_type_ids",
    }
)


def _is_plain_request(kwargs: dict[str, Any]) -> bool:
    """True when the call needs no padding, truncation or extra outputs."""
    if not kwargs:
        return True
    return (
        kwargs.keys() <= _PLAIN_REQUEST_KEYS
        and kwargs.get("padding") in (None, False, PaddingStrategy.DO_NOT_PAD)
        and kwargs.get("truncation") in (None, False, TruncationStrategy.DO_NOT_TRUNCATE)
        and kwargs.get("max_length") is None
    )


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


def _check_errors(errors: str) -> str:
    try:
        codecs.lookup_error(errors)
    except (LookupError, TypeError) as error:
        raise ValueError(f"errors must be {_DECODE_ERRORS_DOC}, got {errors!r}") from error
    return errors


def _missing_vocab_message(where: str | None) -> str:
    origin = (
        "The file ships with every official Qwen(-1) checkpoint (e.g. Qwen/Qwen-7B-Chat) next to its "
        "config.json, and the identical file is part of the PyPI package `dashscope` "
        f"(dashscope/resources/qwen.tiktoken, sha256 {QWEN_TIKTOKEN_SHA256[:16]}...)."
    )
    if where is None:
        return (
            "No vocabulary given and the `dashscope` package is not installed. " + origin + " Either pass "
            "vocab_file='/path/to/qwen.tiktoken' or `pip install dashscope`."
        )
    if os.path.isdir(where) or not os.path.splitext(where)[1]:
        return (
            f"{where!r} has no {VOCAB_FILES_NAMES['vocab_file']!r}. " + origin + " Copy it from the checkpoint "
            'you started from, or from an installed dashscope (python -c "from qwen.tokenization_qwen import '
            'default_vocab_file; print(default_vocab_file())").'
        )
    return f"Vocabulary file {where!r} does not exist. " + origin
