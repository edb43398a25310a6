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
    out = run(_cfg(tiny, tmp_path / "run", sft_epochs=1.0, **{"loss.beta_schedule": "linear"}))
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
    # attention chosen by measurement, kept for every rank and resumed stage
    attention = json.loads((out / "attention.json").read_text())
    assert attention["choice"] in ("sdpa", "eager") and set(attention["seconds"]) == {"sdpa", "eager"}
    saved = yaml.safe_load((out / "config.yaml").read_text())
    assert saved["version"] and saved["rounds"] == 2
    from transformers import AutoModelForCausalLM

    final = AutoModelForCausalLM.from_pretrained(out / "final")
    init = AutoModelForCausalLM.from_pretrained(out / "student-init")
    assert any(not torch.equal(a, b) for a, b in zip(final.state_dict().values(), init.state_dict().values()))


def test_lora_run_saves_adapters_and_merges_at_the_end(tiny, tmp_path):
    out = run(_cfg(tiny, tmp_path / "lora", rounds=1, **{"models.lora": True, "models.lora_r": 4,
                                                         "models.lora_alpha": 8}))
    assert (out / "round-1" / "model" / "adapter_config.json").exists()
    from safetensors.torch import load_file

    final = load_file(str(out / "final" / "model.safetensors"))
    init = load_file(str(out / "student-init" / "model.safetensors"))
    assert not any("lora" in k for k in final)  # merged into plain weights
    assert final.keys() == init.keys()
    assert any(not torch.equal(final[k], init[k]) for k in final)


def test_cli_train_with_bf16_gradient_checkpointing_and_lora(tiny, tmp_path):
    """`distillm2 train` in a subprocess (its own accelerate state): bf16 autocast, gradient
    checkpointing and LoRA together."""
    import os
    import subprocess
    import sys

    from distillm2.files import write_jsonl

    pairs = [{"id": f"p{i}", "prompt": [{"role": "user", "content": f"list three fruits {i}"}],
              "chosen": "apples bananas and cherries", "rejected": "one two three"} for i in range(4)]
    write_jsonl(tmp_path / "pairs.jsonl", pairs)
    cfg = {"pairs": str(tmp_path / "pairs.jsonl"), "output_dir": str(tmp_path / "out"),
           "models": {"teacher": str(tiny / "teacher"), "student": str(tiny / "student"), "lora": True,
                      "teacher_dtype": "bfloat16"},
           "data": {"max_prompt_length": 96, "max_length": 128},
           "train": {"batch_size": 2, "mixed_precision": "bf16", "gradient_checkpointing": True, "lr": 1e-3}}
    (tmp_path / "t.yaml").write_text(yaml.safe_dump(cfg))
    result = subprocess.run([sys.executable, "-m", "distillm2.cli", "train", str(tmp_path / "t.yaml")],
                            capture_output=True, text=True, timeout=300,
                            env=dict(os.environ, HF_HUB_OFFLINE="1"))
    assert result.returncode == 0, result.stderr[-3000:]
    info = json.loads((tmp_path / "out" / "train" / "train_info.json").read_text())
    assert info["mixed_precision"] == "bf16" and info["steps"] == 2
    metrics = [json.loads(x) for x in (tmp_path / "out" / "train" / "metrics.jsonl").read_text().splitlines()]
    assert all(m["loss"] == m["loss"] and m["grad_norm"] > 0 for m in metrics)
    assert (tmp_path / "out" / "final" / "model.safetensors").exists()


def test_vllm_backend_missing_gives_install_hint(tiny, tmp_path):
    import importlib.util

    import pytest

    if importlib.util.find_spec("vllm") is not None:
        pytest.skip("vllm is installed here")
    from distillm2.generation import generate_vllm
    from distillm2.models import load_tokenizer

    with pytest.raises(ImportError, match=r"distillm2\[vllm\]"):
        generate_vllm(str(tiny / "teacher"), load_tokenizer(str(tiny / "tok")),
                      [{"id": "a", "messages": [{"role": "user", "content": "hi"}]}], tmp_path / "o.jsonl")


def test_every_subcommand_has_help_with_examples(capsys):
    import pytest

    from distillm2 import cli

    for command in ("demo", "run", "generate", "train", "eval", "compare"):
        with pytest.raises(SystemExit) as exit_:
            cli.main([command, "--help"])
        assert exit_.value.code == 0
        assert "examples:" in capsys.readouterr().out, command
