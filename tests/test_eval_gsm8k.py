"""GSM8K worked examples: the bundled chain-of-thought exemplars by default, never an evaluated
question."""

import json
import logging

import pytest

from distillm2.config import EvaluateConfig, Gsm8kConfig
from distillm2.errors import ConfigError, DataError
from distillm2.evaluation import evaluate
from distillm2.evaluation.benchmarks import extract_answer, gsm8k_messages, gsm8k_shots

TEST = [{"question": "What is 2 + 3?", "answer": "2 + 3 = 5\n#### 5"},
        {"question": "What is 4 * 2?", "answer": "4 * 2 = 8\n#### 8"}]


def _write(path, rows):
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return str(path)


def test_bundled_exemplars_are_the_standard_eight():
    shots = gsm8k_shots(8, None, TEST)
    assert len(shots) == 8 and shots[0]["question"].startswith("There are 15 trees in the grove")
    assert all(extract_answer(s["answer"]) is not None and "The answer is" in s["answer"] for s in shots)
    assert gsm8k_shots(0, None, TEST) == []
    with pytest.raises(ConfigError, match="8 bundled"):
        gsm8k_shots(9, None, TEST)
    messages = gsm8k_messages(TEST[0]["question"], shots[:2])
    assert [m["role"] for m in messages] == ["user", "assistant"] * 2 + ["user"]
    assert "The answer is" in messages[-1]["content"]  # asked in the form the examples use
    assert "####" in gsm8k_messages(TEST[0]["question"], [])[-1]["content"]


def test_a_fewshot_file_never_shows_an_evaluated_question(tmp_path, caplog):
    pool = _write(tmp_path / "train.jsonl", [TEST[1], {"question": "What is 1 + 1?", "answer": "#### 2"},
                                             {"question": "What is 9 - 3?", "answer": "#### 6"}])
    with caplog.at_level(logging.INFO, logger="distillm2"):
        shots = gsm8k_shots(2, pool, TEST)
    assert [s["question"] for s in shots] == ["What is 1 + 1?", "What is 9 - 3?"]
    assert "1 worked example(s)" in caplog.text
    with pytest.raises(DataError, match="2 usable worked examples"):
        gsm8k_shots(3, pool, TEST)


def test_gsm8k_task_with_bundled_exemplars(tiny, tmp_path):
    data = _write(tmp_path / "test.jsonl", TEST)
    report = evaluate(EvaluateConfig(model=str(tiny / "student"), tasks=["gsm8k"], gsm8k=Gsm8kConfig(data=data, fewshot=3),
                                     output=str(tmp_path / "g.json"), max_new_tokens=4, dtype="float32", device="cpu"))
    result = report["tasks"]["gsm8k"]
    assert result["n"] == 2 and result["fewshot"] == 3 and 0 <= result["no_answer"] <= 2
    assert report["inputs"]["task_options"]["gsm8k"]["fewshot"] == 3
