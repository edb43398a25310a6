"""Every model directory a run writes loads alone with ``from_pretrained`` (model, tokenizer and
generation config), so any evaluation tool (lm-eval, vLLM, AlpacaEval) can take it as is; and
the run's held-out report carries the measures of each candidate's own outputs."""

import json

import pytest
from conftest import tiny_config

from distillm2.config import RunConfig, load_config
from distillm2.pipeline import run


@pytest.fixture()
def fresh_accelerate_state():
    from accelerate.state import AcceleratorState

    # accelerate keeps one process-wide state: start from none and leave none behind
    AcceleratorState._reset_state(reset_partial_state=True)
    yield
    AcceleratorState._reset_state(reset_partial_state=True)


def test_run_model_directories_load_alone(tiny, tmp_path, fresh_accelerate_state):
    cfg = load_config(RunConfig, base=tiny_config(tiny, tmp_path / "run", rounds=1, sft_epochs=1.0,
                                                  **{"eval.prompts": str(tiny / "prompts.jsonl"),
                                                     "eval.max_prompts": 3, "eval.max_new_tokens": 4,
                                                     "eval.batch_size": 4}))
    out = run(cfg)
    from transformers import AutoModelForCausalLM, AutoTokenizer, GenerationConfig

    for name in ("sft/model", "round-1/model", "final"):
        folder = out / name
        model = AutoModelForCausalLM.from_pretrained(folder)
        tokenizer = AutoTokenizer.from_pretrained(folder)
        generation = GenerationConfig.from_pretrained(folder)
        assert model.config.num_hidden_layers == 2 and len(tokenizer) > 1 and tokenizer.chat_template, name
        assert generation.eos_token_id is not None, name
    results = json.loads((out / "eval" / "results.json").read_text())["models"]
    for name, values in results.items():
        assert {"rouge_l", "rouge_l_ci95", "n", "kl_teacher_responses", "teacher_nll_own_outputs", "distinct_2",
                "repeated_4gram_share"} <= set(values), name
    assert "nll_teacher_responses" in results["student"]
