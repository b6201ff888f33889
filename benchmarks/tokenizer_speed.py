"""Encoding throughput: QWenTokenizer vs raw tiktoken vs the fast (tokenizers) twin.

Builds a few MB of mixed text from files already on the machine (Python sources and
docstrings for English and code, the CJK sample texts of CPython's test suite and the
Chinese READMEs of dashscope when present, plus built-in Cyrillic, Arabic, emoji and
digit paragraphs), cuts it into documents of ``--doc-chars`` characters and encodes every
document one call at a time with each implementation:

* ``tiktoken.encode_ordinary``: the raw ``tiktoken.Encoding`` (no NFC, no special tokens)
* ``QWenTokenizer.encode`` and ``QWenTokenizer.__call__``: this package's tokenizer
* ``fast.encode`` and ``fast.__call__``: ``QWenTokenizer.to_fast()`` (Rust ``tokenizers``)
* ``...__call__[batch=N]``: the same documents in batches of ``--batch-size``

Implementations alternate on blocks of documents (the order rotates), so that load from
other processes hits them alike; the median over repeats of each total time is
reported, and ``overhead_vs_raw`` is the median of the per-repeat ratio to raw tiktoken
minus one. Each result is dropped as soon as it is returned. Prints one JSON object per line: an ``env`` line, a ``convert``
line (time of ``to_fast()``), then one ``result`` line per implementation and document
size.

On a machine shared with other work, ``--clock cpu`` times this process's CPU time
instead of wall time, which other processes disturb much less. (The fast tokenizer's
batched calls run on several threads, so their CPU time exceeds their wall time.)
"""

from __future__ import annotations

import argparse
import glob
import json
import os
import platform
import statistics
import sys
import time
import unicodedata

BUILTIN_PARAGRAPHS = [
    "Съешь же ещё этих мягких французских булок, да выпей чаю. Широкая электрификация южных губерний "
    "даст мощный толчок подъёму сельского хозяйства.",
    "مرحبا بالعالم! هذه فقرة عربية قصيرة تحتوي على أرقام ١٢٣٤٥٦ وعلامات ترقيم، لاختبار سرعة الترميز.",
    "Emoji stress: 😀🤗👍🏽 👨‍👩‍👧‍👦 🇨🇳🇯🇵🇺🇸 ❤️✨🚀 — and numbers 3.14159265358979 2024-06-01 +86-10-1234-5678.",
    "吾輩は猫である。名前はまだ無い。どこで生れたかとんと見当がつかぬ。何でも薄暗いじめじめした所で"
    "ニャーニャー泣いていた事だけは記憶している。",
    "通义千问是阿里云研发的超大规模语言模型，能够回答问题、创作文字，还能表达观点、撰写代码。"
    "它支持多轮对话，可以处理中文、英文以及多种其他语言。",
]


def _paragraphs(text: str) -> list[str]:
    return [p.strip("\n") + "\n\n" for p in text.split("\n\n") if p.strip()]


def build_corpus(target_chars: int) -> tuple[str, dict[str, int]]:
    """Interleave paragraphs from local sources until ``target_chars`` characters."""
    stdlib = os.path.dirname(os.__file__)
    sources: dict[str, list[str]] = {"code_en": [], "cjk": [], "other": []}
    for path in sorted(glob.glob(os.path.join(stdlib, "*.py")))[:400]:
        with open(path, encoding="utf-8", errors="replace") as handle:
            sources["code_en"].extend(_paragraphs(handle.read()))
    cjk_files = sorted(glob.glob(os.path.join(stdlib, "test", "cjkencodings", "*-utf8.txt")))
    try:
        import importlib.util

        spec = importlib.util.find_spec("dashscope")
        for location in (spec.submodule_search_locations or []) if spec else []:
            cjk_files += sorted(glob.glob(os.path.join(location, "**", "*_zh.md"), recursive=True))
    except ImportError:
        pass
    for path in cjk_files:
        with open(path, encoding="utf-8", errors="replace") as handle:
            sources["cjk"].extend(_paragraphs(handle.read()))
    # CPython's encoding test files contain a few CJK compatibility ideographs, which NFC
    # replaces. Repeated to fill megabytes they would put one in every document, unlike
    # real text (nearly always NFC already), so they are left out; time text that needs
    # normalising with --corpus.
    sources = {
        name: [p for p in paragraphs if unicodedata.is_normalized("NFC", p)] for name, paragraphs in sources.items()
    }
    sources["cjk"].extend(BUILTIN_PARAGRAPHS[3:])
    sources["other"].extend(BUILTIN_PARAGRAPHS[:3])
    # Characters per round: about 60% code/English, 30% CJK, 10% other scripts.
    weights = {"code_en": 6, "cjk": 3, "other": 1}
    positions = dict.fromkeys(sources, 0)
    parts: list[str] = []
    counts = dict.fromkeys(sources, 0)
    total = 0
    while total < target_chars:
        for name, weight in weights.items():
            budget = weight * 2000
            while budget > 0 and sources[name]:
                paragraph = sources[name][positions[name] % len(sources[name])]
                positions[name] += 1
                parts.append(paragraph)
                budget -= len(paragraph)
                counts[name] += len(paragraph)
                total += len(paragraph)
    return "".join(parts)[:target_chars], counts


def split_documents(text: str, doc_chars: int) -> list[str]:
    return [text[i : i + doc_chars] for i in range(0, len(text), doc_chars)]


def time_all(
    impls: dict, docs: list[str], repeats: int, block_chars: int = 256_000, clock=time.perf_counter
) -> dict[str, dict[str, float]]:
    """Per implementation: median total time over repeats, and median ratio to the first one.

    Each repeat walks the documents in blocks of about ``block_chars`` characters and runs
    every implementation on a block before moving on (rotating the order), so that load
    from other processes hits all implementations alike. The ratio is taken per repeat
    (paired) before the median.
    """
    names = list(impls)
    blocks, current, size = [], [], 0
    for doc in docs:
        current.append(doc)
        size += len(doc)
        if size >= block_chars:
            blocks.append(current)
            current, size = [], 0
    if current:
        blocks.append(current)
    for name in names:  # warm-up
        impls[name](blocks[0])
    totals: dict[str, list[float]] = {name: [] for name in names}
    step = 0
    for _ in range(repeats):
        spent = dict.fromkeys(names, 0.0)
        for block in blocks:
            order = names[step % len(names) :] + names[: step % len(names)]
            step += 1
            for name in order:
                start = clock()
                impls[name](block)
                spent[name] += clock() - start
        for name in names:
            totals[name].append(spent[name])
    base = totals[names[0]]
    return {
        name: {
            "median_s": statistics.median(values),
            "ratio": statistics.median(v / b for v, b in zip(values, base, strict=True)),
        }
        for name, values in totals.items()
    }


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--mb", type=float, default=4.0, help="corpus size in millions of characters (default 4)")
    parser.add_argument(
        "--doc-chars",
        type=int,
        nargs="+",
        default=[512, 4096, 32768],
        help="document sizes in characters, one result set each (default: 512 4096 32768)",
    )
    parser.add_argument("--repeats", type=int, default=7, help="timed passes per implementation (default 7)")
    parser.add_argument("--batch-size", type=int, default=64, help="documents per batched call (default 64)")
    parser.add_argument("--corpus", help="use this UTF-8 text file instead of the built-in mix")
    parser.add_argument("--vocab", help="qwen.tiktoken to use (default: the one in dashscope)")
    parser.add_argument("--no-fast", action="store_true", help="skip the tokenizers-based fast tokenizer")
    parser.add_argument(
        "--clock", choices=["wall", "cpu"], default="wall", help="time wall time (default) or this process's CPU time"
    )
    args = parser.parse_args(argv)

    import tiktoken
    import transformers

    from qwen.tokenization_qwen import QWenTokenizer

    if args.corpus:
        with open(args.corpus, encoding="utf-8") as handle:
            text = handle.read()
        composition = {"file": len(text)}
    else:
        text, composition = build_corpus(int(args.mb * 1_000_000))
    tok = QWenTokenizer(args.vocab) if args.vocab else QWenTokenizer()
    enc = tok.tokenizer
    print(
        json.dumps(
            {
                "kind": "env",
                "python": sys.version.split()[0],
                "platform": platform.platform(),
                "cpus": os.cpu_count(),
                "transformers": transformers.__version__,
                "tiktoken": tiktoken.__version__,
                "clock": args.clock,
                "corpus_chars": len(text),
                "corpus_utf8_bytes": len(text.encode("utf-8")),
                "composition_chars": composition,
            }
        ),
        flush=True,
    )

    fast = None
    if not args.no_fast:
        import tokenizers

        start = time.perf_counter()
        fast = tok.to_fast()
        print(
            json.dumps(
                {
                    "kind": "convert",
                    "to_fast_s": round(time.perf_counter() - start, 3),
                    "tokenizers": tokenizers.__version__,
                }
            ),
            flush=True,
        )

    batch = args.batch_size

    def each(fn):
        # Results are dropped as they come: this measures encoding, not the cost of keeping
        # millions of Python objects alive (which slows the garbage collector for everyone).
        def run(docs):
            for doc in docs:
                fn(doc)

        return run

    def batched(fn):
        def run(docs):
            for i in range(0, len(docs), batch):
                fn(docs[i : i + batch])

        return run

    impls = {
        "tiktoken.encode_ordinary": each(enc.encode_ordinary),
        "QWenTokenizer.encode": each(tok.encode),
        "QWenTokenizer.__call__": each(tok),
        f"QWenTokenizer.__call__[batch={batch}]": batched(tok),
    }
    if fast is not None:
        impls["fast.encode"] = each(fast.encode)
        impls["fast.__call__"] = each(fast)
        impls[f"fast.__call__[batch={batch}]"] = batched(fast)

    for doc_chars in args.doc_chars:
        docs = split_documents(text, doc_chars)
        reference = [enc.encode_ordinary(unicodedata.normalize("NFC", d)) for d in docs]
        n_tokens = sum(len(ids) for ids in reference)
        n_bytes = sum(len(d.encode("utf-8")) for d in docs)
        agree = {"QWenTokenizer": [tok.encode(d, allowed_special=set()) for d in docs] == reference}
        if fast is not None:
            agree["fast"] = [fast(d, split_special_tokens=True)["input_ids"] for d in docs] == reference
        clock = time.process_time if args.clock == "cpu" else time.perf_counter
        stats = time_all(impls, docs, args.repeats, clock=clock)
        for name, stat in stats.items():
            seconds = stat["median_s"]
            print(
                json.dumps(
                    {
                        "kind": "result",
                        "impl": name,
                        "doc_chars": doc_chars,
                        "docs": len(docs),
                        "median_s": round(seconds, 4),
                        "mb_per_s": round(n_bytes / seconds / 1e6, 2),
                        "mtokens_per_s": round(n_tokens / seconds / 1e6, 3),
                        "overhead_vs_raw": round(stat["ratio"] - 1, 4),
                        "ids_agree_with_raw": agree.get(name.split(".")[0]),
                        "repeats": args.repeats,
                    }
                ),
                flush=True,
            )


if __name__ == "__main__":
    main()
