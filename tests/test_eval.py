"""Metrics with values worked out by hand, verdict parsing, answer extraction, the sandbox."""

import json
import math
from pathlib import Path

import pytest
import torch

from distillm2.evaluation.benchmarks import extract_answer, extract_code, gsm8k_reference
from distillm2.evaluation.judge import CachedJudge, pairwise_win_rate, parse_verdict
from distillm2.evaluation.metrics import rouge_l
from distillm2.evaluation.sandbox import run_program


def test_rouge_l_by_hand():
    # LCS("the cat sat", "the cat ran") = 2 tokens: P = R = 2/3 -> F = 2/3
    assert math.isclose(rouge_l(["the cat sat"], ["the cat ran"]), 2 / 3)
    assert rouge_l(["same words here"], ["same words here"]) == 1.0
    assert rouge_l(["nothing shared"], ["entirely different"]) == 0.0
    # mean over pairs: (1 + 0) / 2
    assert rouge_l(["a b", "x"], ["a b", "y"]) == 0.5
    with pytest.raises(ValueError):
        rouge_l(["a"], [])


def test_bootstrap_ci():
    from distillm2.evaluation.metrics import bootstrap_ci

    assert bootstrap_ci([0.5] * 10) == (0.5, 0.5)  # no spread, no interval
    low, high = bootstrap_ci([0.0, 1.0] * 50)
    assert low < 0.5 < high and high - low < 0.25  # mean 0.5, standard error 0.05


def test_kl_metric_by_hand(tiny):
    """teacher_forced_kl against a forward KL computed directly from the two models' logits."""
    from distillm2 import models
    from distillm2.data import encode
    from distillm2.evaluation.metrics import teacher_forced_kl

    tok = models.load_tokenizer(str(tiny / "tok"))
    teacher, student = models.load_model(str(tiny / "teacher")), models.load_model(str(tiny / "student"))
    prompts = [{"id": "a", "messages": [{"role": "user", "content": "list three fruits"}]}]
    responses = [{"id": "a", "response": "apples bananas", "finish_reason": "stop"}]
    got = teacher_forced_kl(student, teacher, tok, prompts, responses, len(tok))
    row = encode(tok, prompts[0]["messages"], "apples bananas", True, 96, 128)
    ids = torch.tensor([row.prompt_ids + row.response_ids])
    with torch.no_grad():
        s = student(ids).logits[0].double().log_softmax(-1)
        t = teacher(ids).logits[0].double().log_softmax(-1)
    p0 = len(row.prompt_ids) - 1
    sl, tl = s[p0 : p0 + len(row.response_ids)], t[p0 : p0 + len(row.response_ids)]
    kl = (tl.exp() * (tl - sl)).sum(-1).mean().item()
    nll = -sl.gather(-1, torch.tensor(row.response_ids)[:, None]).mean().item()
    assert got["tokens"] == len(row.response_ids)
    assert math.isclose(got["forward_kl"], kl, rel_tol=1e-4) and math.isclose(got["nll"], nll, rel_tol=1e-4)


@pytest.mark.parametrize("text, verdict", [
    ("Assistant A is more helpful. [[A]]", "A"),
    ("Both fine. Final verdict: [[C]]", "C"),
    ("[[ B ]]", "B"),
    ("I think [[B]] ... to be clear, [[B]]", "B"),
    ("[[A]] no wait [[B]]", None),  # contradictory: not guessed
    ("Assistant A is better.", None),  # no verdict
    ("[A]", None),
    ("[[D]]", None),
    ("", None),
    (None, None),
])
def test_verdict_parsing(text, verdict):
    assert parse_verdict(text) == verdict


def test_pairwise_win_rate_both_orders_and_cache(tmp_path):
    calls = []

    def judge_always_a(messages):  # a position-biased judge: always prefers the first answer
        calls.append(messages)
        return "[[A]]"

    judge = CachedJudge("biased", judge_always_a, tmp_path / "cache.jsonl")
    result = pairwise_win_rate(judge, ["q1", "q2"], ["ans1", "ans2"], ["ref1", "ref2"])
    # model first: 2 wins (1.0); reference first: 2 losses (0.0) -> averaged 0.5
    assert result["win_rate"] == 0.5 and result["orders"]["model_first"]["wins"] == 2
    assert result["unparsed"] == 0 and result["n"] == 2 and len(calls) == 4
    again = CachedJudge("biased", judge_always_a, tmp_path / "cache.jsonl")
    assert pairwise_win_rate(again, ["q1", "q2"], ["ans1", "ans2"], ["ref1", "ref2"])["win_rate"] == 0.5
    assert len(calls) == 4 and again.calls == 0  # every request came from the disk cache

    replies = iter(["[[C]]", "garbage", "[[B]]", "[[A]]"])
    mixed = CachedJudge("mixed", lambda m: next(replies), None)
    r = pairwise_win_rate(mixed, ["q1", "q2"], ["a1", "a2"], ["r1", "r2"])
    # model first: tie + unparsed; reference first: B (model wins), A (model loses). Over all four
    # comparisons (the paper): (1 + 0.5) / 4; over the three parsed ones: 1.5 / 3
    assert r["win_rate"] == 0.375 and r["win_rate_parsed"] == 0.5
    assert r["unparsed"] == 1 and math.isclose(r["ties"], 1 / 3)


@pytest.mark.parametrize("text, value", [
    ("She has 5 apples, then 3 more. #### 8", 8.0),
    ("Total: 1,250 dollars\n#### $1,250", 1250.0),
    ("So the answer is 42.", 42.0),
    ("It costs 3.5 and then 7 more, 10.5 in all", 10.5),
    ("#### -4", -4.0),
    ("no numbers at all", None),
    ("", None),
])
def test_gsm8k_answer_extraction(text, value):
    assert extract_answer(text) == value


def test_gsm8k_reference():
    assert gsm8k_reference("Natalia sold 48/2 = 24 clips.\n#### 72") == 72.0
    with pytest.raises(ValueError):
        gsm8k_reference("no marker 72")


def test_extract_code():
    prompt = "import math\n\ndef area(r):\n    \"\"\"Area of a circle.\"\"\"\n"
    fenced = "Here:\n```python\ndef area(r):\n    return math.pi * r * r\n```\nDone."
    # a whole function follows the whole prompt (its imports and helpers kept) and replaces its stub
    assert extract_code(fenced, prompt, "area") == prompt + "\ndef area(r):\n    return math.pi * r * r\n"
    body = "    return math.pi * r * r\n"
    assert extract_code(body, prompt, "area") == prompt + body


def test_sandbox_pass_fail_timeout_crash(tmp_path):
    assert run_program("assert 1 + 1 == 2").status == "passed"
    failed = run_program("assert 1 + 1 == 3")
    assert not failed.passed and failed.status == "failed" and "AssertionError" in failed.detail
    slow = run_program("while True:\n    pass\n", timeout=2)
    assert not slow.passed and slow.status == "timeout"
    crash = run_program("import os\nos.abort()")
    assert not crash.passed
    assert run_program("raise SystemExit(3)").status == "failed"


def test_sandbox_cannot_write_outside_its_folder_or_use_the_network(tmp_path):
    target = tmp_path / "escaped.txt"
    program = f"open({str(target)!r}, 'w').write('x')"
    assert not run_program(program).passed
    assert not target.exists()
    assert run_program("open('inside.txt', 'w').write('fine')\nassert open('inside.txt').read() == 'fine'").passed
    assert not run_program(f"import os\nos.remove({str(Path(__file__))!r})").passed
    assert Path(__file__).exists()
    assert not run_program("import socket\nsocket.create_connection(('127.0.0.1', 9))").passed
    assert not run_program("import subprocess\nsubprocess.run(['true'])").passed
    big = run_program("x = bytearray(4 * 1024**3)", timeout=10)
    assert not big.passed  # memory limit


def test_sandbox_leaves_nothing_behind():
    import tempfile

    before = set(Path(tempfile.gettempdir()).glob("distillm2-sandbox-*"))
    run_program("open('junk.bin', 'wb').write(b'0' * 1000)")
    assert set(Path(tempfile.gettempdir()).glob("distillm2-sandbox-*")) == before


def test_humaneval_on_a_fixture(tmp_path, tiny):
    """The humaneval task end to end on a two-problem fixture: the tiny model's completions
    fail, and the canonical solutions, fed as references through the same path, pass."""
    from distillm2.evaluation.benchmarks import load_humaneval

    problems = [
        {"task_id": "t/0", "prompt": "def add(a, b):\n    \"\"\"Add.\"\"\"\n", "entry_point": "add",
         "canonical_solution": "    return a + b\n", "test": "def check(f):\n    assert f(2, 3) == 5\n"},
        {"task_id": "t/1", "prompt": "def neg(a):\n    \"\"\"Negate.\"\"\"\n", "entry_point": "neg",
         "canonical_solution": "    return -a\n", "test": "def check(f):\n    assert f(2) == -2\n"},
    ]
    path = tmp_path / "he.jsonl"
    path.write_text("".join(json.dumps(p) + "\n" for p in problems))
    loaded = load_humaneval(str(path), None)
    for p in loaded:
        program = extract_code(p["canonical_solution"], p["prompt"], p["entry_point"])
        assert run_program(f"{program}\n{p['test']}\ncheck({p['entry_point']})\n").passed
        wrong = extract_code("    return None\n", p["prompt"], p["entry_point"])
        assert not run_program(f"{wrong}\n{p['test']}\ncheck({p['entry_point']})\n").passed

    from distillm2.config import EvaluateConfig, HumanEvalConfig
    from distillm2.evaluation import evaluate

    report = evaluate(EvaluateConfig(model=str(tiny / "teacher"), tasks=["humaneval"],
                                     humaneval=HumanEvalConfig(data=str(path), timeout=5),
                                     output=str(tmp_path / "he.json"), max_new_tokens=8))
    assert report["tasks"]["humaneval"]["n"] == 2 and report["tasks"]["humaneval"]["pass@1"] == 0.0
    assert json.loads((tmp_path / "he.json").read_text())["tasks"]["humaneval"]["pass@1"] == 0.0
