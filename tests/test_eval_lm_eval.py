"""lm_eval:<task> through lm-evaluation-harness, for real but without the hub: a three-question
task of its own written as a local task YAML over a local JSONL file."""

import json

import pytest

from distillm2 import cli

TASK = """task: tiny_arith
dataset_path: json
dataset_kwargs:
  data_files:
    test: {data}
test_split: test
output_type: generate_until
doc_to_text: "Q: {{{{question}}}}\\nA:"
doc_to_target: "{{{{answer}}}}"
generation_kwargs:
  until: ["\\n"]
  do_sample: false
  max_gen_toks: 6
metric_list:
  - metric: exact_match
    aggregation: mean
    higher_is_better: true
metadata:
  version: 1.0
"""


@pytest.fixture()
def task_dir(tmp_path):
    data = tmp_path / "arith.jsonl"
    data.write_text("".join(json.dumps({"question": q, "answer": a}) + "\n"
                            for q, a in [("1 + 1", "2"), ("2 + 2", "4"), ("3 + 3", "6")]))
    folder = tmp_path / "tasks"
    folder.mkdir()
    (folder / "tiny_arith.yaml").write_text(TASK.format(data=data))
    return folder


@pytest.mark.slow
def test_lm_eval_task_folded_into_the_report(tiny, tmp_path, task_dir):
    pytest.importorskip("lm_eval")
    out = tmp_path / "eval.json"
    args = ["eval", "--model", str(tiny / "student"), "--tasks", "lm_eval:tiny_arith,rouge", "--teacher",
            str(tiny / "teacher"), "--prompts", str(tiny / "prompts.jsonl"), "--limit", "2", "--max-new-tokens", "4",
            "--output", str(out), "--set", f"lm_eval.include_path={task_dir}", "--set", "lm_eval.backend=hf",
            "--dtype", "float32", "--device", "cpu"]
    assert cli.main(args) == 0
    report = json.loads(out.read_text())
    assert list(report["tasks"]) == ["lm_eval:tiny_arith", "rouge"]
    result = report["tasks"]["lm_eval:tiny_arith"]
    assert result["n"] == 2 and result["n_shot"] == 0 and 0.0 <= result["exact_match,none"] <= 1.0
    assert result["lm_eval_version"] and report["inputs"]["versions"]["lm_eval"]
    assert report["inputs"]["task_options"]["lm_eval"]["include_path"] == str(task_dir)
    cache = list((tmp_path / "eval.cache").glob("lm_eval.*"))
    assert cache  # lm-eval's request cache, keyed by the model's fingerprint
    # another model into the same output: its own lm-eval cache, not the first model's answers
    assert cli.main([a if a != str(tiny / "student") else str(tiny / "teacher") for a in args]) == 0
    assert len(list((tmp_path / "eval.cache").glob("lm_eval.*"))) > len(cache)


def test_lm_eval_unknown_task_fails_before_loading(tiny, tmp_path, task_dir, capsys):
    pytest.importorskip("lm_eval")
    code = cli.main(["eval", "--model", str(tiny / "student"), "--tasks", "lm_eval:no_such_task_xyz",
                     "--output", str(tmp_path / "e.json"), "--set", f"lm_eval.include_path={task_dir}"])
    assert code == 2 and "lm-eval does not know task(s) no_such_task_xyz" in capsys.readouterr().err
    assert cli.main(["eval", "--model", str(tiny / "student"), "--tasks", "lm_eval:"]) == 2
