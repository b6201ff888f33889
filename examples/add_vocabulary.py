"""Add new words to the Qwen vocabulary, then finetune a model to use them.

Step 1 builds an *extra vocabulary* file: the same format as ``qwen.tiktoken``
(``base64(token bytes) rank`` per line) holding only the new tokens. Qwen's tokenizer
is byte-level BPE, so a new word only becomes one token if every intermediate merge
also exists; the file therefore holds the merges learned on top of the current
vocabulary (most frequent adjacent pair first), numbered from 151851, the first id
after the 208 special tokens::

    python examples/add_vocabulary.py build --word 通义千问 --word QwenAgent \\
        --words my_words.tsv --output qwen_extra.tiktoken

``my_words.tsv`` has one ``word<TAB>frequency`` per line (the frequency only decides
which merges are learned first). A word must survive pre-tokenisation as a single
piece, so "hello world" (two pieces) is refused; by default the variant with a leading
space (" word", how a word usually appears in running English text) is added too.

Step 2 loads the tokenizer with the file and trains the model on text that uses the new
tokens. The model's embedding matrix has 151936 rows, so ids up to 151935 fit without
resizing; larger ones need ``resize_token_embeddings``. The new rows start as the mean
of the embeddings of the pieces the word used to be split into, and training must
update the embedding and output layers (with LoRA: ``modules_to_save=["wte",
"lm_head"]``)::

    python examples/add_vocabulary.py finetune path/to/Qwen-1_8B qwen_extra.tiktoken \\
        --text-file corpus.txt --output-dir qwen-1_8b-newvocab --steps 200

The saved tokenizer folds the extra tokens into its ``qwen.tiktoken``, so the output
directory loads like any checkpoint, without ``extra_vocab_file``.
"""

from __future__ import annotations

import argparse
import collections
import logging
import unicodedata
from collections.abc import Iterable
from pathlib import Path

import regex

from qwen.tokenization_qwen import (
    PAT_STR,
    SPECIAL_START_ID,
    SPECIAL_TOKENS,
    default_vocab_file,
    dump_tiktoken_ranks,
    load_tiktoken_ranks,
)

logger = logging.getLogger("add_vocabulary")

FIRST_FREE_ID = SPECIAL_START_ID + len(SPECIAL_TOKENS)  # 151851
_PIECE = regex.compile(PAT_STR)


def bpe(word: bytes, ranks: dict[bytes, int]) -> list[bytes]:
    """Byte-pair encode one pre-tokenised piece the way tiktoken does."""
    if word in ranks:
        return [word]
    parts = [bytes([byte]) for byte in word]
    while len(parts) > 1:
        best = min(range(len(parts) - 1), key=lambda i: ranks.get(parts[i] + parts[i + 1], float("inf")))
        if parts[best] + parts[best + 1] not in ranks:
            break
        parts[best : best + 2] = [parts[best] + parts[best + 1]]
    return parts


def check_word(word: str) -> str | None:
    """Why ``word`` cannot become a single token, or None when it can."""
    pieces = _PIECE.findall(word)
    if len(pieces) != 1:
        return f"pre-tokenisation splits it into {pieces}"
    if "<|" in word:
        return "it contains '<|', the start of special-token text"
    return None


def learn_extra_vocab(
    words: dict[str, int], ranks: dict[bytes, int], start_id: int = FIRST_FREE_ID
) -> dict[bytes, int]:
    """Merges (new token bytes -> id) that make every word in ``words`` a single token.

    ``words`` maps each word to its frequency. Words are NFC-normalised, as the
    tokenizer normalises text. Each round adds the most frequent adjacent pair of pieces
    (ties: the shorter token, then the smaller bytes) with the next id, then
    re-encodes every word with the enlarged vocabulary, since a new token can enable
    merges that already existed.
    """
    if start_id < FIRST_FREE_ID:
        raise ValueError(f"start_id must be at least {FIRST_FREE_ID}: lower ids belong to existing tokens")
    current = dict(ranks)
    freqs: collections.Counter[bytes] = collections.Counter()
    for word, freq in words.items():
        word = unicodedata.normalize("NFC", word)
        problem = check_word(word)
        if problem:
            logger.warning("skipping %r: %s", word, problem)
            continue
        if word.encode("utf-8") in current:
            logger.info("skipping %r: already a single token (id %d)", word, current[word.encode("utf-8")])
            continue
        freqs[word.encode("utf-8")] += max(int(freq), 1)

    new_tokens: dict[bytes, int] = {}
    next_id = start_id
    pieces = {word: bpe(word, current) for word in freqs}
    while True:
        pairs: collections.Counter[tuple[bytes, bytes]] = collections.Counter()
        for word, parts in pieces.items():
            for left, right in zip(parts, parts[1:], strict=False):
                pairs[left, right] += freqs[word]
        if not pairs:
            return new_tokens
        left, right = min(pairs, key=lambda pair: (-pairs[pair], len(pair[0] + pair[1]), pair[0] + pair[1]))
        token = left + right
        new_tokens[token] = current[token] = next_id
        next_id += 1
        pieces = {word: bpe(word, current) for word, parts in pieces.items() if len(parts) > 1}
        pieces = {word: parts for word, parts in pieces.items() if len(parts) > 1}


def read_words(paths: Iterable[str], words: Iterable[str], space_variant: bool = True) -> dict[str, int]:
    """Collect ``word -> frequency`` from TSV files and single words."""
    result: collections.Counter[str] = collections.Counter()
    for path in paths:
        for number, line in enumerate(Path(path).read_text(encoding="utf-8").splitlines(), 1):
            if not line.strip():
                continue
            word, _, freq = line.rstrip("\n").partition("\t")
            if freq.strip() and not freq.strip().isdigit():
                raise ValueError(f"{path}:{number}: frequency {freq.strip()!r} is not a whole number (word<TAB>count)")
            result[word] += int(freq) if freq.strip() else 1
    for word in words:
        result[word] += 1
    if space_variant:
        for word, freq in list(result.items()):
            if not word.startswith(" ") and regex.match(r"\p{L}", word) and not check_word(" " + word):
                result[" " + word] += freq
    return dict(result)


def initialise_new_embeddings(model, tokenizer, base_ranks: dict[bytes, int]) -> list[int]:
    """Set each new token's input/output embedding rows to the mean over its old pieces."""
    import torch

    new_ids = sorted(index for token, index in tokenizer.mergeable_ranks.items() if token not in base_ranks)
    if not new_ids:
        return []
    if max(new_ids) >= model.get_input_embeddings().weight.shape[0]:
        model.resize_token_embeddings(max(new_ids) + 1)
    matrices = [model.get_input_embeddings().weight]
    output = model.get_output_embeddings()
    if output is not None and output.weight is not matrices[0]:
        matrices.append(output.weight)
    with torch.no_grad():
        for index in new_ids:
            token = tokenizer.convert_ids_to_tokens(index)
            old_ids = [base_ranks[piece] for piece in bpe(token, base_ranks)]
            for matrix in matrices:
                matrix[index] = matrix[old_ids].mean(dim=0)
    return new_ids


def finetune(
    model_dir: str,
    extra_vocab_file: str,
    texts: list[str],
    output_dir: str,
    steps: int = 100,
    lr: float = 1e-4,
    max_length: int = 512,
    batch_size: int = 4,
) -> None:
    """Minimal full finetuning loop with the extended vocabulary (use your trainer of choice)."""
    import torch
    from transformers import AutoModelForCausalLM

    import qwen  # noqa: F401  (registers the Qwen classes with the Auto* factories)
    from qwen.tokenization_qwen import QWenTokenizer

    base = QWenTokenizer.from_pretrained(model_dir)
    tokenizer = QWenTokenizer.from_pretrained(
        model_dir, extra_vocab_file=extra_vocab_file, pad_token="<|endoftext|>", padding_side="right"
    )
    model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32)
    new_ids = initialise_new_embeddings(model, tokenizer, base.mergeable_ranks)
    logger.info("%d new tokens, ids %s", len(new_ids), f"{new_ids[0]}-{new_ids[-1]}" if new_ids else "-")

    model.train()
    optimizer = torch.optim.AdamW(model.parameters(), lr=lr)
    for step in range(steps):
        batch_texts = [texts[(step * batch_size + i) % len(texts)] + "<|endoftext|>" for i in range(batch_size)]
        batch = tokenizer(batch_texts, padding=True, truncation=True, max_length=max_length, return_tensors="pt")
        labels = batch["input_ids"].masked_fill(batch["attention_mask"] == 0, -100)
        loss = model(**batch, labels=labels).loss
        loss.backward()
        optimizer.step()
        optimizer.zero_grad()
        if step % 10 == 0 or step == steps - 1:
            logger.info("step %d loss %.4f", step, loss.item())
    model.save_pretrained(output_dir)
    tokenizer.save_pretrained(output_dir)
    logger.info("saved to %s", output_dir)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = parser.add_subparsers(dest="command", required=True)

    build = sub.add_parser("build", help="learn the merges for new words and write an extra vocabulary file")
    build.add_argument("--words", action="append", default=[], help="TSV file: word<TAB>frequency per line")
    build.add_argument("--word", action="append", default=[], help="a single new word (repeatable)")
    build.add_argument("--vocab", default=None, help="base qwen.tiktoken (default: the one in dashscope)")
    build.add_argument("--start-id", type=int, default=FIRST_FREE_ID, help="first new id (default %(default)s)")
    build.add_argument("--no-space-variant", action="store_true", help='do not also add " word" variants')
    build.add_argument("--output", default="qwen_extra.tiktoken", help="file to write (default %(default)s)")

    tune = sub.add_parser("finetune", help="finetune a checkpoint with an extra vocabulary")
    tune.add_argument("model_dir", help="a Qwen-1 checkpoint directory")
    tune.add_argument("extra_vocab_file", help="the file written by `build`")
    tune.add_argument("--text-file", required=True, help="training text, one example per line")
    tune.add_argument("--output-dir", required=True)
    tune.add_argument("--steps", type=int, default=100)
    tune.add_argument("--lr", type=float, default=1e-4)
    tune.add_argument("--batch-size", type=int, default=4)
    tune.add_argument("--max-length", type=int, default=512)

    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(message)s")
    if args.command == "build":
        vocab = args.vocab or default_vocab_file()
        if vocab is None:
            parser.error("no --vocab given and dashscope is not installed")
        ranks = load_tiktoken_ranks(vocab)
        try:
            words = read_words(args.words, args.word, space_variant=not args.no_space_variant)
        except (OSError, ValueError) as error:
            parser.error(str(error))
        new_tokens = learn_extra_vocab(words, ranks, start_id=args.start_id)
        dump_tiktoken_ranks(new_tokens, args.output)
        for token, index in new_tokens.items():
            logger.info("%d %s", index, token.decode("utf-8", errors="backslashreplace"))
        logger.info("wrote %d tokens to %s", len(new_tokens), args.output)
    else:
        texts = [line for line in Path(args.text_file).read_text(encoding="utf-8").splitlines() if line.strip()]
        finetune(
            args.model_dir,
            args.extra_vocab_file,
            texts,
            args.output_dir,
            steps=args.steps,
            lr=args.lr,
            max_length=args.max_length,
            batch_size=args.batch_size,
        )


if __name__ == "__main__":
    main()
