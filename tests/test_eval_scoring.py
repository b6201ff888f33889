"""qwen.evaluation: prompts, loaders, choice scoring, answer extraction, result files, sandbox.

Scoring is checked against hand-computed log-probabilities (a stub model with known logits)
and against the original loop (one full-prompt forward per question) on a tiny checkpoint;
extractors against hand-made responses in the phrasings the original scripts handled.
"""

from __future__ import annotations

import json
import math
import types

import pytest
import torch
from conftest import make_tiny
from transformers import AutoModelForCausalLM, AutoTokenizer, DynamicCache

import qwen  # noqa: F401
from qwen.evaluation import CEVAL, CMMLU, MMLU, Question, load_multiple_choice
from qwen.evaluation.data import chat_ceval_prompt, chat_mmlu_prompt, gsm8k_base_prompt, gsm8k_fewshot_from_train
from qwen.evaluation.extract import (
    extract_choice_en,
    extract_choice_zh,
    extract_code,
    extract_number,
    extract_number_original,
    gsm8k_correct_original,
    gsm8k_reference,
    numbers_equal,
    parse_react,
    rouge_l,
)
from qwen.evaluation.results import ResultStore, SettingsMismatchError, accuracy_summary
from qwen.evaluation.scoring import ChoiceScorer, choice_token_ids, score_one_prompt_at_a_time


def q(subject, index, text, answer="A", options=None):
    return Question(subject, index, text, options or {c: f"{text} option {c}" for c in "ABCD"}, answer)


# --------------------------------------------------------------------------- prompts and files


def test_mmlu_prompt_is_the_originals():
    dev = [q("high_school_physics", 0, "What is g?", "B", {"A": "1", "B": "9.8", "C": "3", "D": "0"})]
    prefix = MMLU.few_shot_prefix("high_school_physics", dev, 5)
    assert prefix == (
        "The following are multiple choice questions (with answers) about high school physics.\n\n"
        "Question: What is g?\nA. 1\nB. 9.8\nC. 3\nD. 0\nAnswer: B\n\n"
    )
    assert MMLU.format_example(dev[0], include_answer=False).endswith("\nD. 0\nAnswer:")
    assert MMLU.choice_prefix == " " and not MMLU.macro_average


def test_ceval_and_cmmlu_prompts_are_the_originals():
    item = q("law", 0, "哪个对？", "C", {"A": "甲", "B": "乙", "C": "丙", "D": "丁"})
    for bench in (CEVAL, CMMLU):
        assert bench.few_shot_prefix("law", [item]) == "问题：哪个对？\nA. 甲\nB. 乙\nC. 丙\nD. 丁\n答案：C\n\n"
        assert bench.format_example(item, include_answer=False) == "问题：哪个对？\nA. 甲\nB. 乙\nC. 丙\nD. 丁\n答案："
        assert bench.choice_prefix == "" and bench.macro_average
    assert chat_ceval_prompt(item) == "哪个对？\n\nA. 甲\nB. 乙\nC. 丙\nD. 丁\n"
    assert chat_mmlu_prompt(q("x", 0, "Q?", options=dict(A="a", B="b", C="c", D="d"))) == (
        "The following is a multiple-choice question. Please choose the most suitable one among A, B, C and D "
        "as the answer to this question.\n\nQ?\nA. a\nB. b\nC. c\nD. d\n"
    )


def test_gsm8k_prompts():
    train = [{"question": "1+1?", "answer": "1+1=<<1+1=2>>2\n#### 2"}] * 9
    shots = gsm8k_fewshot_from_train(train)
    assert shots.count("Question: 1+1?\nLet's think step by step\n1+1=2\nThe answer is 2\n") == 8
    assert gsm8k_base_prompt("SHOTS", "Q?") == "SHOTS\nQuestion: Q?\nLet's think step by step\n"


def test_loaders_read_the_original_layouts(tmp_path):
    mmlu = tmp_path / "mmlu"
    (mmlu / "dev").mkdir(parents=True)
    (mmlu / "test").mkdir()
    (mmlu / "dev" / "anatomy_dev.csv").write_text('"What, exactly?",a,"b ""q""",c,d,B\n')
    (mmlu / "test" / "anatomy_test.csv").write_text("Q1,a,b,c,d,A\nQ2,a,b,c,d,D\n")
    data = load_multiple_choice("mmlu", mmlu)
    dev, test = data["anatomy"]
    assert dev[0].question == "What, exactly?" and dev[0].options["B"] == 'b "q"' and dev[0].answer == "B"
    assert [t.answer for t in test] == ["A", "D"]

    ceval = tmp_path / "ceval"
    for split in ("dev", "val"):
        (ceval / split).mkdir(parents=True)
    (ceval / "dev" / "law_dev.csv").write_text("id,question,A,B,C,D,answer,explanation\n0,问,甲,乙,丙,丁,A,因为\n")
    (ceval / "val" / "law_val.csv").write_text("id,question,A,B,C,D,answer\n0,问2,甲,乙,丙,丁,C\n")
    dev, val = load_multiple_choice("ceval", ceval)["law"]
    assert dev[0].answer == "A" and val[0].question == "问2" and val[0].answer == "C"

    cmmlu = tmp_path / "cmmlu"
    for split in ("dev", "test"):
        (cmmlu / split).mkdir(parents=True)
        (cmmlu / split / "arts.csv").write_text(",Question,A,B,C,D,Answer\n0,问,甲,乙,丙,丁,D\n")
    dev, test = load_multiple_choice("cmmlu", cmmlu)["arts"]
    assert test[0].question == "问" and test[0].answer == "D"
    with pytest.raises(FileNotFoundError, match="no file for subject"):
        load_multiple_choice("cmmlu", cmmlu, subjects=["nope"])


# --------------------------------------------------------------------------- choice scoring


class _StubModel(torch.nn.Module):
    """Next-token logits looked up from the last input token (zeros elsewhere); keeps a
    real cache so the prefix-reuse path runs."""

    def __init__(self, table: dict[int, dict[int, float]], vocab: int = 1000):
        super().__init__()
        self.table, self.vocab = table, vocab
        self.config = types.SimpleNamespace(seq_length=8192)

    @property
    def device(self):
        return torch.device("cpu")

    def forward(self, input_ids, attention_mask=None, past_key_values=None, use_cache=False, logits_to_keep=0):
        bsz, q_len = input_ids.shape
        logits = torch.zeros(bsz, q_len, self.vocab)
        for row in range(bsz):
            for token, value in self.table.get(int(input_ids[row, -1]), {}).items():
                logits[row, -1, token] = value
        cache = past_key_values
        if use_cache:
            cache = cache if cache is not None else DynamicCache()
            cache.update(torch.zeros(bsz, 1, q_len, 2), torch.zeros(bsz, 1, q_len, 2), 0)
        return types.SimpleNamespace(logits=logits[:, -1:] if logits_to_keep else logits, past_key_values=cache)


@pytest.fixture(scope="module")
def tokenizer(tmp_path_factory):
    from qwen import QWenTokenizer

    return QWenTokenizer()


def test_mmlu_letter_scoring_against_hand_computed_logprobs(tokenizer):
    ids = choice_token_ids(tokenizer, "ABCD", " ")
    assert ids == [tokenizer.encode(" " + c)[0] for c in "ABCD"] and len(set(ids)) == 4
    colon = tokenizer.encode(":")[0]  # "Answer:" ends with the token ":"
    model = _StubModel({colon: {ids[0]: 1.0, ids[1]: 3.0, ids[2]: 2.0, ids[3]: -1.0}})
    # by hand: log p(x) = x - log(e^1 + e^3 + e^2 + e^-1 + (V - 4) * e^0)
    log_z = math.log(math.e + math.e**3 + math.e**2 + math.e**-1 + (model.vocab - 4))
    expected = [1.0 - log_z, 3.0 - log_z, 2.0 - log_z, -1.0 - log_z]
    prefix = MMLU.few_shot_prefix("anatomy", [q("anatomy", i, f"dev {i}") for i in range(5)])
    questions = [MMLU.format_example(q("anatomy", i, "x" * (i + 1)), include_answer=False) for i in range(3)]
    for reuse in (True, False):
        scores = ChoiceScorer(model, tokenizer, ids, batch_size=2, reuse_prefix=reuse).score(prefix, questions)
        for score in scores:
            assert score.logprobs == pytest.approx(expected, abs=1e-5)
            assert score.best == 1 and score.reused_prefix is reuse
            total = sum(math.exp(v) for v in expected)
            assert score.probs == pytest.approx([math.exp(v) / total for v in expected], abs=1e-6)


def test_multi_token_answers_are_refused(tokenizer):
    with pytest.raises(ValueError, match="one"):
        choice_token_ids(tokenizer, ["A longer answer"], " ")


@pytest.fixture(scope="module")
def tiny_base(tmp_path_factory):
    path = make_tiny(tmp_path_factory.mktemp("ckpt") / "tiny-eval")  # seq_length 8192: room for 5-shot prompts
    model = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32).eval()
    return model, AutoTokenizer.from_pretrained(path)


def test_prefix_reuse_equals_the_original_full_prompt_loop(tiny_base):
    model, tok = tiny_base
    ids = choice_token_ids(tok, "ABCD", " ")
    dev = [q("college_physics", i, f"Example number {i}: what is {i} squared?", "ABCD"[i % 4]) for i in range(5)]
    prefix = MMLU.few_shot_prefix("college_physics", dev)
    tests = [
        q("college_physics", i, "How far does light travel " + "in a very long time " * (i % 3) + f"#{i}?")
        for i in range(7)
    ]
    texts = [MMLU.format_example(t, include_answer=False) for t in tests]
    scores = ChoiceScorer(model, tok, ids, batch_size=3).score(prefix, texts)
    assert all(s.reused_prefix for s in scores)
    for text, score in zip(texts, scores, strict=True):
        reference = score_one_prompt_at_a_time(model, tok, prefix + text, ids)
        assert score.logprobs == pytest.approx(reference, abs=1e-4)
        assert score.best == max(range(4), key=lambda i: reference[i])


def test_prompts_over_max_seq_len_are_cut_like_the_original(tiny_base):
    model, tok = tiny_base
    ids = choice_token_ids(tok, "ABCD", " ")
    prefix = "Question: " + "many words here " * 30 + "\n\n"
    texts = ["Question: short?\nAnswer:", "Question: " + "long " * 40 + "?\nAnswer:"]
    limit = len(tok.encode(prefix + texts[0])) + 5
    scores = ChoiceScorer(model, tok, ids, batch_size=4, max_seq_len=limit).score(prefix, texts)
    assert [s.reused_prefix for s in scores] == [True, False]
    full = tok.encode(prefix + texts[1])
    cut = torch.tensor([full[len(full) - limit + 1 :]])
    reference = torch.log_softmax(model(input_ids=cut).logits[0, -1].float(), -1)[ids].tolist()
    assert scores[1].logprobs == pytest.approx(reference, abs=1e-4)


# --------------------------------------------------------------------------- GSM8K extraction


@pytest.mark.parametrize(
    ("text", "fixed", "original"),
    [
        ("So the total is 1,000 dollars.\nThe answer is 1,000", "1000", 0),
        ("The temperature drops to -3 degrees.\nThe answer is -3", "-3", 3),
        ("Each costs $2.50.\nThe answer is 2.5", "2.5", 5),
        ("He pays $1,234,567.", "1234567", 567),
        ("5 - 3 = 2 apples left", "2", 2),
        ("It grows 20% to 12 km.", "12", 12),
        ("#### 72", "72", 72),
        ("So \\boxed{-7.5} is it.", "-7.5", 5),
        ("Answer is 18. Check: 9 * 2 = 18.", "18", 18),
        ("The answer is 42 (since 6*7=42), not 41.", "42", 41),
        ("答案是：1,500元", "1500", 500),
        ("The answer is 3.50", "3.5", 50),
        ("There are no numbers here", None, None),
        ("The answer is −4", "-4", 4),  # Unicode minus
    ],
)
def test_gsm8k_extraction(text, fixed, original):
    assert extract_number(text) == fixed
    assert extract_number_original(text) == original


def test_gsm8k_verdicts_fixed_and_original():
    solution = "Some steps\n#### 1,000"
    assert gsm8k_reference(solution) == "1000"
    assert numbers_equal(extract_number("The answer is 1,000"), "1000")
    assert numbers_equal("2.50", "2.5") and not numbers_equal(None, "1")
    # the original base script: reference 1000, answer 0 -> wrong; its chat script: both 0 -> right
    assert not gsm8k_correct_original("The answer is 1,000", solution, chat=False)
    assert gsm8k_correct_original("The answer is 1,000", solution, chat=True)
    assert gsm8k_correct_original("The answer is 72", "#### 72", chat=False)
    with pytest.raises(ValueError, match="####"):
        gsm8k_reference("no final answer")


# --------------------------------------------------------------------------- chat letters

EN = {"A": "London", "B": "Paris", "C": "Rome", "D": "Berlin"}


@pytest.mark.parametrize(
    ("response", "letter"),
    [
        ("The answer is B.", "B"),
        ("Answer: C", "C"),
        ("The correct choice is D because it is the capital.", "D"),
        ("I would choose A.", "A"),
        ("B is correct.", "B"),
        ("C is the right answer here", "C"),
        ("D", "D"),
        ("A. London is the capital of the UK", "A"),
        ("Paris is the capital of France.", "B"),  # option text, no letter
        ("It must be rome", "C"),  # option text, other case
        ("The answer isn't A; the answer is D.", "D"),
        ("It is probably the city on the Tiber, Roma", "C"),  # nothing matches: the closest option's letter
        ("", None),
    ],
)
def test_english_chat_choice_extraction(response, letter):
    assert extract_choice_en(response, EN) == letter


ZH = {
    "A": "既不保证可靠，也不保证按序交付",
    "B": "不保证可靠，但保证按序交付",
    "C": "保证可靠，但不保证按序交付",
    "D": "既保证可靠，也保证按序交付",
}


@pytest.mark.parametrize(
    ("response", "letter"),
    [
        ("答案是C", "C"),
        ("答案为：B。", "B"),
        ("正确答案是A，因为……", "A"),
        ("应该选D。", "D"),
        ("故选B", "B"),
        ("选项C正确", "C"),
        ("B选项符合题意", "B"),
        ("A", "A"),
        ("D. 既保证可靠，也保证按序交付", "D"),
        ("关于传输层的面向连接服务的特性是既保证可靠，也保证按序交付", "D"),  # the blank restated
        ("", None),
    ],
)
def test_chinese_chat_choice_extraction(response, letter):
    assert extract_choice_zh(response, ZH, "关于传输层的面向连接服务的特性是____。") == letter


# --------------------------------------------------------------------------- code and ReAct


def test_code_extraction():
    fenced = "Sure:\n```python\nimport math\n\ndef f(x):\n    return math.floor(x)\n```\nDone."
    assert extract_code(fenced, "f") == "\nimport math\n\ndef f(x):\n    return math.floor(x)\n"
    assert extract_code("def f(x):\n    return 1\n", "f") == "\ndef f(x):\n    return 1\n"
    assert extract_code("return x + 1", "f") == "    return x + 1"
    assert extract_code("    return x + 1", "f") == "    return x + 1"


def test_react_parsing_and_rouge_l():
    text = 'Thought: look it up\nAction: search\nAction Input: {"q": "x", "a": 1}\nObservation: found'
    step = parse_react(text)
    assert (step.thought, step.action, step.observation) == ("Thought: look it up", "search", "found")
    assert step.action_input == json.dumps({"a": 1, "q": "x"}, sort_keys=True)
    assert parse_react("Action: x\nAction Input: not json").action_input == ""
    # LCS("a b c d", "a c d e") = 3: P = R = 3/4
    assert rouge_l("a b c d".split(), "a c d e".split()) == pytest.approx(0.75)
    assert rouge_l(["a"], []) == 0.0


# --------------------------------------------------------------------------- results


def test_accuracy_summary_micro_and_macro():
    records = [{"subject": "a", "correct": c} for c in (True, True, True, False)] + [{"subject": "b", "correct": False}]
    s = accuracy_summary(records, categories={"a": "X", "b": "Y"}, macro_average=True, hard=["b"])
    assert s["micro_average"] == pytest.approx(60.0) and s["macro_average"] == pytest.approx(37.5)
    assert s["overall"] == s["macro_average"] and s["categories"] == {"X": 75.0, "Y": 0.0} and s["hard"] == 0.0
    assert accuracy_summary(records)["overall"] == pytest.approx(60.0)


def test_result_store_resumes_and_refuses_other_settings(tmp_path):
    store = ResultStore(tmp_path, "t", {"checkpoint": "a"})
    store.add([{"key": "s/0", "x": 1}])
    with open(store.samples_path, "a") as f:
        f.write('{"key": "s/1", "x"')  # a line cut off by an interrupted run
    again = ResultStore(tmp_path, "t", {"checkpoint": "a"})
    assert again.done("s/0") and not again.done("s/1")
    with pytest.raises(SettingsMismatchError):
        ResultStore(tmp_path, "t", {"checkpoint": "b"})
    assert not ResultStore(tmp_path, "t", {"checkpoint": "b"}, overwrite=True).done("s/0")


# --------------------------------------------------------------------------- sandbox


@pytest.mark.parametrize(
    ("body", "result"),
    [
        ("    while True:\n        pass\n", "timed out"),
        ("    exit(0)\n", "failed"),
        ("    import sys\n    sys.exit(0)\n", "failed"),
        ("    import os\n    os._exit(0)\n", "failed"),
        ("    raise SystemExit(0)\n", "failed"),
        ("    x = ' ' * (8 << 30)\n", "failed"),
        ("    return 1\n", "passed"),
    ],
)
def test_sandbox_contains_loops_exits_and_memory(body, result):
    from qwen.evaluation.humaneval import run_program

    program = "def f():\n" + body + "\nassert f() == 1\n"
    outcome = run_program(program, timeout=2.0, memory_bytes=1 << 30)
    assert outcome.result.startswith(result) and outcome.passed is (result == "passed")
