"""Answer extraction: GSM8K numbers, chat multiple-choice letters, HumanEval code, ReAct steps.

Where the original scripts' extraction was wrong, the fixed extractor is the default and
the original's is kept (``*_original``) so both numbers can be reported:

- GSM8K: the original took the last run of digits, so "1,000" became 0, "-3" became 3 and
  "2.5" became 5. :func:`extract_number` reads the final answer ("The answer is", "####",
  ``\\boxed{}``, "答案是"), else the last number, with thousands separators, signs,
  decimals, currency and units handled, and answers are compared as numbers.
- Chat multiple choice: where no pattern matched, the original returned the most similar
  option's *text* (never equal to a letter: always wrong, and C-Eval's guessed a random
  letter). :func:`extract_choice_en` / :func:`extract_choice_zh` return the most similar
  option's letter, or None for an empty response.
"""

from __future__ import annotations

import dataclasses
import difflib
import json
import re
import textwrap
from collections.abc import Mapping, Sequence
from decimal import Decimal, InvalidOperation

LETTERS = ("A", "B", "C", "D")

# --------------------------------------------------------------------------- GSM8K

# A number: optional sign (ASCII or Unicode minus) not glued to a word or a preceding number
# ("5-3" is 5 and 3), optional currency, digits with optional comma thousands groups, decimals.
_NUMBER = re.compile(
    r"(?<![\w.])(?P<sign>[-−+])?\s?[$€£¥]?\s?"
    r"(?P<int>\d{1,3}(?:,\d{3})+|\d+)?(?P<frac>\.\d+)?(?![\d,]*\d)"
)
_FINAL_MARKERS = (
    re.compile(r"####\s*(.+)"),
    re.compile(r"\\boxed\{([^{}]*)\}"),
    re.compile(r"[Tt]he (?:final )?answer is[:：]?\s*(.+)"),
    re.compile(r"答案(?:是|为)[:：]?\s*(.+)"),
)


def _numbers(text: str) -> list[str]:
    found = []
    for m in _NUMBER.finditer(text):
        if m.group("int") is None and m.group("frac") is None:
            continue
        digits = (m.group("int") or "0").replace(",", "") + (m.group("frac") or "")
        sign = "-" if m.group("sign") in ("-", "−") else ""
        found.append(sign + digits)
    return found


def normalize_number(text: str) -> str | None:
    """A number string in canonical form ("1,000.50" -> "1000.5", "-0" -> "0"), or None."""
    try:
        value = Decimal(text.replace(",", "").replace("−", "-"))
    except InvalidOperation:
        return None
    if value == value.to_integral_value():
        return str(int(value))
    return format(value.normalize(), "f")


def extract_number(text: str) -> str | None:
    """The final numeric answer of a solution (see the module docstring), canonical, or None."""
    for marker in _FINAL_MARKERS:
        matches = list(marker.finditer(text))
        if matches:
            numbers = _numbers(matches[-1].group(1).split("\n")[0])
            if numbers:
                return normalize_number(numbers[0])
    numbers = _numbers(text)
    return normalize_number(numbers[-1]) if numbers else None


def gsm8k_reference(solution: str) -> str:
    """The reference answer of a GSM8K solution (after ``####``), canonical."""
    m = re.search(r"####\s*([-−]?[\d.,]+)", solution)
    if m is None or normalize_number(m.group(1)) is None:
        raise ValueError(f"no '#### N' answer in the reference solution: {solution[-80:]!r}")
    return normalize_number(m.group(1))  # type: ignore[return-value]


def numbers_equal(a: str | None, b: str | None) -> bool:
    if a is None or b is None:
        return False
    return abs(Decimal(a) - Decimal(b)) <= Decimal("1e-6")


def extract_number_original(text: str) -> int | None:
    """The original scripts' extraction: the last run of ASCII digits, as an int."""
    runs = re.findall(r"[0-9]+", text)
    return int(runs[-1]) if runs else None


def gsm8k_correct_original(completion: str, solution: str, chat: bool) -> bool:
    """The original's verdict. Base script: reference from ``#### N`` (commas removed),
    answer from the last digit run. Chat script: both from their last digit run."""
    if chat:
        reference = extract_number_original(solution)
    else:
        m = re.search(r"#### (\-?[0-9\.\,]+)", solution)
        try:
            reference = Decimal(m.group(1).strip().replace(",", "")) if m else None
        except InvalidOperation:
            reference = None
    answer = extract_number_original(completion)
    return answer is not None and reference is not None and Decimal(answer) == Decimal(reference)


def cut_at(text: str, stops: Sequence[str]) -> str:
    """``text`` up to the first occurrence of each stop string, applied in order (as the
    original's successive ``split(stop)[0]``)."""
    for stop in stops:
        text = text.split(stop)[0]
    return text


# The original's post-processing of base-model generations.
GSM8K_STOPS = ("<|endoftext|>", "\n\n\n", "\n\n", "Question:")
HUMANEVAL_STOPS = ("<|endoftext|>", "\n\n\n", "\n\n", "def ")
HUMANEVAL_CODEX_STOPS = ("<|endoftext|>", "\nclass", "\ndef", "\n#", "\nif", "\nprint")


# --------------------------------------------------------------------------- chat multiple choice


def _replace_option_texts(response: str, options: Mapping[str, str], flags: int = 0) -> str:
    """Option texts quoted in the response replaced by their letters, longest first."""
    for letter, text in sorted(options.items(), key=lambda item: len(item[1]), reverse=True):
        text = str(text).rstrip(".。").strip()
        if len(text) >= 2:
            response = re.sub(re.escape(text), letter, response, flags=flags)
    return response


def _closest_option(response: str, options: Mapping[str, str]) -> str | None:
    if not response.strip():
        return None

    def similarity(letter: str) -> float:
        return difflib.SequenceMatcher(None, response, str(options[letter])).ratio()

    return max(LETTERS, key=lambda letter: (similarity(letter), -LETTERS.index(letter)))


_EN_PATTERNS = (
    # answer is A | answer: A | choice is B | the correct option would be C | I choose D
    re.compile(
        r"(?:\b[Cc]hoose|\b[Ss]elect|(?:\b[Aa]nswer|\b[Cc]hoice|\b[Oo]ption)(?![^ABCD]{0,20}?(?:n't|not))"
        r"[^ABCD]{0,10}?(?:\bis\b|:|\bbe\b))[^ABCD]{0,20}?\b([ABCD])\b"
    ),
    # A is correct | B is the right one
    re.compile(
        r"\b([ABCD])\b(?![^ABCD]{0,8}?(?:n't|not)[^ABCD]{0,5}?(?:correct|right))[^ABCD]{0,10}?\b(?:correct|right)\b"
    ),
    # a bare letter first: "A", "B.", "C:", "D,"
    re.compile(r"^\(?([ABCD])(?:[.,:)]|$)"),
    # the first letter standing alone
    re.compile(r"(?<![a-zA-Z])([ABCD])(?![a-zA-Z=])"),
)


def extract_choice_en(response: str, options: Mapping[str, str]) -> str | None:
    """The letter an English chat response chose (MMLU phrasings), or None if empty."""
    text = _replace_option_texts(response.strip(), options, flags=re.IGNORECASE)
    for pattern in _EN_PATTERNS:
        m = pattern.search(text)
        if m:
            return m.group(1)
    return _closest_option(response, options)


_ZH_PATTERNS = (
    # 答案是A | 答案为：B | 选项是C | 应该选D | 选择A | 故选B
    re.compile(
        r"(?:选择?|选定|(?:答案|选项)(?![^ABCD]{0,10}?(?:不|非)[^ABCD]{0,10}?(?:是|为|：|:|】))"
        r"[^ABCD]{0,10}?(?:是|为|：|:|】))[^ABCD]{0,10}?([ABCD])(?:选项)?(?:\)|）|。|\.|，|,|．|、|[ABCD]|\s|$)"
    ),
    # A选项正确 | B正确 | C符合题意 | D对
    re.compile(
        r"([ABCD])(?:选?项)?(?![^ABCD]{0,4}?(?:不|非)[^ABCD]{0,4}?(?:正确|对|符合))[^ABCD]{0,4}?(?:正确|对|符合)"
    ),
    # a bare letter first
    re.compile(r"^\(?([ABCD])(?:。|\.|，|,|．|:|：|\)|）|\s|$)"),
    # the first letter standing alone
    re.compile(r"(?<![a-zA-Z])([ABCD])(?![a-zA-Z=])"),
)


def extract_choice_zh(response: str, options: Mapping[str, str], question: str = "") -> str | None:
    """The letter a Chinese chat response chose (C-Eval phrasings), or None if empty.

    A response that restates the question's blank with an option's text ("...的特性是既保证可靠")
    is read as that option."""
    text = response.strip()
    parts = question.rstrip("。").split("。")[-1].split("_") if question else []
    if parts and len(parts[0].strip()) > 4:
        text = text.replace(parts[0], "答案是")
    if len(parts) > 1 and len(parts[-1].strip()) > 4:
        text = text.replace(parts[-1], "")
    text = _replace_option_texts(text, options)
    for pattern in _ZH_PATTERNS:
        m = pattern.search(text)
        if m:
            return m.group(1)
    return _closest_option(response, options)


# --------------------------------------------------------------------------- HumanEval


def extract_code(response: str, entry_point: str) -> str:
    """The HumanEval completion (text appended to the problem's prompt) in a chat response.

    A fenced code block (or plain code) that defines ``entry_point`` is kept whole, as top-level
    code after the prompt's docstring-only function: it redefines the function with its imports
    and helpers (the original kept only the function's body, dropping them). Otherwise the
    response is taken as the function's body, indented if it is not.
    """
    blocks = re.findall(r"```[ \t]*(?:[Pp]ython3?|py)?[ \t]*\n(.*?)(?:```|$)", response, flags=re.DOTALL)
    definition = re.compile(rf"^\s*(?:async\s+)?def\s+{re.escape(entry_point)}\s*\(", flags=re.MULTILINE)
    for block in blocks:
        if definition.search(block):
            return "\n" + textwrap.dedent(block).rstrip() + "\n"
    m = definition.search(response)
    if m:
        return "\n" + textwrap.dedent(response[m.start() :].split("```")[0]).rstrip() + "\n"
    body = blocks[0] if blocks else response
    if body.strip() and not body.startswith((" ", "\t")):
        body = textwrap.indent(body, " " * 4)
    return body


# --------------------------------------------------------------------------- ReAct


@dataclasses.dataclass
class ReActStep:
    thought: str
    action: str
    action_input: str  # canonical JSON (sorted keys) where it parses, else ""
    observation: str
    final_answer: str


def _between(text: str, start: str, ends: Sequence[str]) -> str:
    i = text.find(start)
    if i < 0:
        return ""
    i += len(start)
    stop = [j for j in (text.find(end, i) for end in ends) if j >= 0]
    return text[i : min(stop) if stop else len(text)].strip()


def parse_react(text: str) -> ReActStep:
    """The first Thought/Action/Action Input/Observation of a ReAct response."""
    thought = text[: text.find("Action:")].strip() if "Action:" in text else text.strip()
    action = _between(text, "Action:", ("Action Input:", "\n"))
    raw_input = _between(text, "Action Input:", ("Observation:", "\nThought:", "\nFinal Answer:"))
    try:
        action_input = json.dumps(json.loads(raw_input), ensure_ascii=False, sort_keys=True)
    except (ValueError, TypeError):
        action_input = ""
    observation = _between(text, "Observation:", ("\nThought:", "\nFinal Answer:"))
    final = _between(text, "Final Answer:", ())
    return ReActStep(thought, action, action_input, observation, final)


def rouge_l(reference: Sequence[str], candidate: Sequence[str]) -> float:
    """ROUGE-L F1 of two token sequences (longest common subsequence)."""
    if not reference or not candidate:
        return 0.0
    previous = [0] * (len(candidate) + 1)
    for ref_token in reference:
        current = [0]
        for j, cand_token in enumerate(candidate):
            current.append(previous[j] + 1 if ref_token == cand_token else max(previous[j + 1], current[j]))
        previous = current
    lcs = previous[-1]
    if lcs == 0:
        return 0.0
    precision, recall = lcs / len(candidate), lcs / len(reference)
    return 2 * precision * recall / (precision + recall)
