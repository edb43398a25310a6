"""End-to-end runs on tiny models: rounds, resume after a kill, run directory layout."""

import json

import torch
import yaml
from conftest import tiny_config

from distillm2.config import RunConfig, load_config
from distillm2.pipeline import run


def _cfg(tiny, out, **kw):
    return load_config(RunConfig, base=tiny_config(tiny, out, **kw))


def test_full_run_two_rounds(tiny, tmp_path):
    out = run(_cfg(tiny, tmp_path / "run", sft_epochs=1.0))
    for name in ("config.yaml", "prompts.jsonl", "student-init/config.json", "round-1/teacher.jsonl",
                 "round-1/student.jsonl", "round-1/pairs.jsonl", "round-1/metrics.jsonl",
                 "round-1/model", "round-2/student.jsonl", "round-2/pairs.jsonl", "sft/model",
                 "final/config.json", "final/tokenizer_config.json", "final/distillm2_config.yaml"):
        assert (out / name).exists(), name
    prompts = [json.loads(x) for x in (out / "prompts.jsonl").read_text().splitlines()]
    pairs = [json.loads(x) for x in (out / "round-2/pairs.jsonl").read_text().splitlines()]
    assert {p["id"] for p in pairs} == {p["id"] for p in prompts}
    assert set(pairs[0]) >= {"id", "prompt", "chosen", "rejected"}
    metrics = [json.loads(x) for x in (out / "round-2/metrics.jsonl").read_text().splitlines()]
    assert all(m["loss"] == m["loss"] for m in metrics)  # finite, not NaN
    assert {"skl", "srkl", "beta", "lr", "grad_norm", "tokens_per_s", "alpha_chosen_mean"} <= set(metrics[0])
    # round 2 uses the curriculum: per-pair alphas within [alpha_min, alpha_max]
    assert all(0.01 - 1e-6 <= m["alpha_chosen_min"] <= m["alpha_chosen_max"] <= 0.1 + 1e-6 for m in metrics)
    # the linear beta schedule rises over the run
    r1 = [json.loads(x) for x in (out / "round-1/metrics.jsonl").read_text().splitlines()]
    assert r1[0]["beta"] == 0.5 and metrics[-1]["beta"] == 0.75
    saved = yaml.safe_load((out / "config.yaml").read_text())
    assert saved["version"] and saved["rounds"] == 2
    from transformers import AutoModelForCausalLM

    final = AutoModelForCausalLM.from_pretrained(out / "final")
    init = AutoModelForCausalLM.from_pretrained(out / "student-init")
    assert any(not torch.equal(a, b) for a, b in zip(final.state_dict().values(), init.state_dict().values()))
