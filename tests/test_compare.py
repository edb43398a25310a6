"""`distillm2 compare` and `distillm2 eval` end to end on tiny models."""

import json

import pytest
import yaml
from conftest import tiny_config

from distillm2 import cli


def test_compare_runs_end_to_end_and_resumes(tiny, tmp_path, capsys):
    cfg = tiny_config(tiny, tmp_path / "cmp", sft_epochs=1.0, rounds=1)
    cfg.update(methods=["sft", "kd", "distillm2"],
               variants=[{"name": "distillm2-const", "loss": "distillm2",
                          "overrides": ["loss.curriculum=false", "loss.beta_schedule=constant"]}])
    cfg["eval"] = {"prompts": str(tiny / "prompts.jsonl"), "max_prompts": 6, "max_new_tokens": 6}
    path = tmp_path / "cmp.yaml"
    path.write_text(yaml.safe_dump(cfg))
    assert cli.main(["compare", str(path)]) == 0
    out = tmp_path / "cmp"
    report = json.loads((out / "results.json").read_text())
    assert set(report["models"]) == {"teacher", "initial", "sft", "kd", "distillm2", "distillm2-const"}
    for metrics in report["models"].values():
        assert 0.0 <= metrics["rouge_l"] <= 1.0 and metrics["n"] == 6
        assert metrics["kl_teacher_responses"] >= 0.0
    assert report["models"]["teacher"]["rouge_l"] == 1.0
    # one budget: every method took the same number of steps
    assert len(set(report["steps_per_round"].values())) == 1
    for f in ("results.md", "metrics.png", "curves.png"):
        assert (out / f).exists(), f
    # every method started from the same initial student
    init = (out / "shared" / "final" / "model.safetensors").read_bytes()
    assert all((out / m / "student-init" / "model.safetensors").read_bytes() == init for m in report["methods"])
    # sft and kd never sample student responses; the on-policy methods do
    assert not (out / "kd" / "round-1" / "student.jsonl").exists()
    assert (out / "distillm2" / "round-1" / "student.jsonl").exists()
    saved = yaml.safe_load((out / "distillm2-const" / "config.yaml").read_text())
    assert saved["loss"]["curriculum"] is False and saved["loss"]["beta_schedule"] == "constant"
    capsys.readouterr()
    assert cli.main(["compare", str(path)]) == 0  # a rerun finds everything done
    assert "train " not in capsys.readouterr().err


def test_eval_command_all_tasks_on_tiny_models(tiny, tmp_path):
    gsm = tmp_path / "gsm.jsonl"
    gsm.write_text(json.dumps({"question": "What is 2 + 3?", "answer": "2 + 3 = 5\n#### 5"}) + "\n")
    out = tmp_path / "eval.json"
    code = cli.main(["eval", "--model", str(tiny / "student"), "--teacher", str(tiny / "teacher"),
                     "--tasks", "rouge,kl,judge,self,gsm8k,speculative", "--prompts", str(tiny / "prompts.jsonl"),
                     "--gsm8k-data", str(gsm), "--limit", "3", "--output", str(out), "--max-new-tokens", "6",
                     "--judge", str(tiny / "teacher")])
    assert code == 0
    report = json.loads(out.read_text())
    tasks = report["tasks"]
    assert report["model"] == str(tiny / "student")
    assert {"rouge_l", "n"} <= set(tasks["rouge"]) and tasks["rouge"]["n"] == 3
    assert tasks["kl"]["forward_kl"] > 0 and tasks["kl"]["nll"] > 0
    # a random tiny judge never writes a verdict: everything is reported unparsed, nothing guessed;
    # over all comparisons that is no win, over parsed ones undefined
    judge = tasks["judge"]
    assert judge["unparsed"] == 6 and judge["win_rate"] == 0.0 and judge["win_rate_parsed"] != judge["win_rate_parsed"]
    own = tasks["self"]
    assert own["teacher_nll_own_outputs"] > 0 and 0 <= own["distinct_2"] <= 1 and 0 <= own["repeated_4gram_share"] <= 1
    inputs = report["inputs"]
    assert inputs["model_identity"]["fingerprint"] != inputs["teacher_identity"]["fingerprint"]
    assert inputs["n_prompts"] == 3 and inputs["limit"] == 3 and inputs["decoding"]["max_new_tokens"] == 6
    assert inputs["dtype"] == "float32" and inputs["versions"]["distillm2"] and inputs["date"]
    assert tasks["gsm8k"]["n"] == 1 and tasks["gsm8k"]["accuracy"] in (0.0, 1.0)
    spec = tasks["speculative"]
    assert spec["identical_outputs"] == spec["n"] == 3
    assert 0.0 <= spec["acceptance_rate"] <= 1.0 and spec["speedup"] > 0
    # the teacher drafting for itself accepts (almost) everything
    self_draft = tmp_path / "self.json"
    assert cli.main(["eval", "--model", str(tiny / "teacher"), "--teacher", str(tiny / "teacher"), "--tasks",
                     "speculative", "--prompts", str(tiny / "prompts.jsonl"), "--limit", "2",
                     "--output", str(self_draft), "--max-new-tokens", "8"]) == 0
    assert json.loads(self_draft.read_text())["tasks"]["speculative"]["acceptance_rate"] > 0.9


def test_eval_command_errors(tiny, tmp_path, capsys):
    assert cli.main(["eval", "--model", str(tiny / "student"), "--tasks", "kl"]) == 2
    assert "need --teacher" in capsys.readouterr().err
    assert cli.main(["eval", "--model", str(tiny / "student"), "--tasks", "bleu"]) == 2
    assert "valid: rouge, kl, judge" in capsys.readouterr().err


def test_compare_over_seeds_and_two_heldout_sets(tiny, tmp_path):
    import json as _json

    other = tmp_path / "other.jsonl"
    other.write_text("".join(_json.dumps({"prompt": f"describe the colour {c}"}) + "\n"
                             for c in ("red", "blue", "green", "amber")))
    cfg = tiny_config(tiny, tmp_path / "cmp", rounds=1)
    cfg.update(methods=["kd", "distillm2"], seeds=[1, 2], eval_sets=[str(tiny / "prompts.jsonl"), str(other)])
    cfg["eval"] = {"prompts": None, "max_prompts": 4, "max_new_tokens": 6}
    path = tmp_path / "cmp.yaml"
    path.write_text(yaml.safe_dump(cfg))
    assert cli.main(["compare", str(path)]) == 0
    out = tmp_path / "cmp"
    report = json.loads((out / "results.json").read_text())
    assert report["seeds"] == [1, 2] and set(report["sets"]) == {str(tiny / "prompts.jsonl"), str(other)}
    for seed in (1, 2):
        assert (out / f"seed-{seed}" / "distillm2" / "final" / "config.json").exists()
    # the seeds differ (their own data order and samples), and the summary is their mean
    per_seed = report["per_seed"]
    first = str(tiny / "prompts.jsonl")
    kd = [per_seed[str(s)][first]["kd"]["rouge_l"] for s in (1, 2)]
    assert report["sets"][first]["models"]["kd"]["rouge_l"] == pytest.approx(sum(kd) / 2)
    low, high = report["sets"][first]["models"]["kd"]["rouge_l_ci95"]
    assert low <= sum(kd) / 2 <= high
    test = report["sets"][first]["paired_vs_best_baseline"]["distillm2"]
    assert report["sets"][first]["best_baseline"] == "kd" and 0.0 <= test["p_value"] <= 1.0 and test["n"] == 4
    text = (out / "results.md").read_text()
    assert "Paired test of ROUGE-L" in text and str(other) in text
