"""DistiLLM-2 as released and as published: beta schedules, per-round seeds, ground-truth SFT,
the template's end of turn, sampling from the model's own distribution, fresh LoRA adapters per
round, the non-finite guard, the negative-gap rule, a stale final/ rebuilt, and the remaining
baselines (ImitKD, Speculative KD, DPKD, the released DistiLLM v1 path)."""

import json
import math
import os
import subprocess
import sys

import pytest
import torch
import yaml
from conftest import tiny_config
from safetensors.torch import load_file
from tiny import make_tokenizer

from distillm2 import losses as L
from distillm2 import models
from distillm2.config import RunConfig, load_config
from distillm2.data import encode, end_of_turn_ids
from distillm2.generation.hf import sampling_kwargs
from distillm2.pipeline import run


def _cfg(tiny, out, **kw):
    return load_config(RunConfig, base=tiny_config(tiny, out, **kw))


def _rows(path):
    return [json.loads(x) for x in path.read_text().splitlines()]


def test_beta_schedules():
    kw = dict(beta0=0.5, beta_max=0.75, ramp=0.5)
    # the released gradual_beta restarts every round
    assert L.beta_schedule(0.9, "linear_per_round", round_progress=0.0, **kw) == 0.5
    assert math.isclose(L.beta_schedule(0.1, "linear_per_round", round_progress=0.25, **kw), 0.625)
    assert L.beta_schedule(0.1, "linear_per_round", round_progress=0.9, **kw) == 0.75
    # linear_run (and its old name) ramps once over the run
    assert L.beta_schedule(0.25, "linear_run", round_progress=0.9, **kw) == L.beta_schedule(0.25, "linear", **kw)
    assert math.isclose(L.beta_schedule(0.25, "linear_run", **kw), 0.625)
    # paper: clip(e/E + tau/T, beta0, 1)
    assert L.beta_schedule(0.0, "paper", round_progress=0.1, round_index=1, rounds=3, **kw) == 0.5
    assert math.isclose(L.beta_schedule(0.5, "paper", round_progress=0.3, round_index=2, rounds=3, **kw), 1 / 3 + 0.3)
    assert L.beta_schedule(1.0, "paper", round_progress=1.0, round_index=3, rounds=3, **kw) == 1.0
    assert L.beta_schedule(0.3, "constant", round_progress=0.7, **kw) == 0.5


def test_negative_gap_rule():
    gap = torch.tensor([0.4, 0.2, -0.3, 0.0])
    assert L.adaptive_alpha(gap, 0.2).tolist()[2:] == pytest.approx([0.01, 0.01])
    assert L.adaptive_alpha(gap, 0.2, negative_gap="alpha_max").tolist()[2:] == pytest.approx([0.1, 0.1])
    # and the released formula gives alpha_max there too: clip(1 - anchor / gap, min, max)
    released = torch.clip(1 - 0.9 * 0.2 / (gap[2] + 1e-5), min=1e-2, max=0.1)
    assert float(released) == pytest.approx(0.1)


def test_released_distillm_and_dpkd_match_their_definitions():
    torch.manual_seed(0)
    sc, tc, sr, tr = (torch.randn(2, 5, 17) for _ in range(4))
    m = torch.ones(2, 5, dtype=torch.bool)
    yc, yr = torch.randint(0, 17, (2, 5)), torch.randint(0, 17, (2, 5))
    kw = dict(student_chosen=sc, teacher_chosen=tc, mask_chosen=m, labels_chosen=yc, student_rejected=sr,
              teacher_rejected=tr, mask_rejected=m, labels_rejected=yr)
    released = L.distillation_loss("distillm", **kw)
    expected = (L.sequence_mean(L.skew_reverse_kl(sc, tc, m, alpha=0.1), m)
                + L.sequence_mean(L.skew_reverse_kl(sr, tr, m, alpha=0.1), m))
    torch.testing.assert_close(released.per_pair, expected)  # summed, detached mixture
    dpkd = L.distillation_loss("dpkd", dpo_beta=0.1, **kw)

    def mean_logp(logits, y):
        return torch.log_softmax(logits, -1).gather(-1, y[..., None])[..., 0].mean(-1)

    ratio = (mean_logp(sc, yc) - mean_logp(tc, yc)) - (mean_logp(sr, yr) - mean_logp(tr, yr))
    torch.testing.assert_close(dpkd.per_pair, -torch.nn.functional.logsigmoid(0.1 * ratio))


def test_end_of_turn_from_the_template_and_eos_may_differ(tmp_path):
    tok = make_tokenizer(tmp_path / "tok", extra_token="<|end|>")
    tok.chat_template = ("{% for m in messages %}<|im_start|>{{ m['role'] }}\n{{ m['content'] }}<|end|>\n{% endfor %}"
                         "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}")
    end = tok.convert_tokens_to_ids("<|end|>")
    assert end != tok.eos_token_id and end_of_turn_ids(tok) == [end, tok.eos_token_id]
    row = encode(tok, [{"role": "user", "content": "hi"}], "paris", True, 64, 64)
    assert row.response_ids[-1] == end  # a finished response ends with the turn's end token
    other = make_tokenizer(tmp_path / "tok2", extra_token="<|end|>")
    other.eos_token = "<unk>"  # same vocabulary, another eos (an instruct teacher, a base student)
    assert models.check_tokenizers(tok, other) == len(tok)


def test_sampling_ignores_generation_config_extras(tiny):
    model = models.load_model(str(tiny / "teacher"))
    ids = torch.tensor([[5, 6, 7, 8]])
    plain = model.generate(ids, max_new_tokens=40, pad_token_id=0, **sampling_kwargs(True, 0.0, 1.0))
    model.generation_config.repetition_penalty = 50.0
    model.generation_config.no_repeat_ngram_size = 1
    again = model.generate(ids, max_new_tokens=40, pad_token_id=0, **sampling_kwargs(True, 0.0, 1.0))
    penalised = model.generate(ids, max_new_tokens=40, pad_token_id=0, do_sample=False)
    assert torch.equal(plain, again) and not torch.equal(plain, penalised)


def test_rounds_sample_with_their_own_seeds(tiny, tmp_path):
    out = run(_cfg(tiny, tmp_path / "run", **{"train.lr": 0.0, "generation.teacher_per_round": True}))
    # the student did not change (lr 0), yet round 2 samples afresh -- and so does the teacher
    assert _rows(out / "round-1" / "student.jsonl") != _rows(out / "round-2" / "student.jsonl")
    assert _rows(out / "round-1" / "teacher.jsonl") != _rows(out / "round-2" / "teacher.jsonl")


def test_sft_on_ground_truth_when_the_data_has_it(tiny, tmp_path):
    path = tmp_path / "chat.jsonl"
    with open(path, "w") as fh:
        for i in range(6):
            fh.write(json.dumps({"messages": [{"role": "user", "content": f"list three fruits {i}"},
                                              {"role": "assistant", "content": f"apples bananas {i}"}]}) + "\n")
    out = run(_cfg(tiny, tmp_path / "gt", rounds=1, sft_epochs=1.0, **{"data.prompts": str(path)}))
    assert json.loads((out / "sft" / "sft_source.json").read_text())["responses"] == "ground_truth"
    seq = run(_cfg(tiny, tmp_path / "seq", rounds=1, sft_epochs=1.0))  # prompts without answers
    assert json.loads((seq / "sft" / "sft_source.json").read_text())["responses"] == "teacher"
    with pytest.raises(Exception, match="carry no response"):
        run(_cfg(tiny, tmp_path / "bad", rounds=1, sft_epochs=1.0, **{"data.sft_on": "ground_truth"}))


def test_fresh_lora_adapter_per_round_on_the_merged_model(tiny, tmp_path):
    out = run(_cfg(tiny, tmp_path / "lora", rounds=2, **{"models.lora": True, "models.lora_r": 4,
                                                         "models.lora_alpha": 8}))
    from peft import PeftModel

    base = models.load_model(str(out / "student-init"))
    for k in (1, 2):  # merge round 1's adapter, then round 2's: that is final/
        base = PeftModel.from_pretrained(base, str(out / f"round-{k}" / "model")).merge_and_unload()
    final = load_file(str(out / "final" / "model.safetensors"))
    for key, value in base.state_dict().items():
        torch.testing.assert_close(final[key], value, rtol=1e-5, atol=1e-6, msg=key)
    carried = run(_cfg(tiny, tmp_path / "carry", rounds=2, **{"models.lora": True, "models.lora_r": 4,
                                                              "models.lora_alpha": 8, "models.lora_rounds": "carry"}))
    assert (carried / "final" / "model.safetensors").exists()


def test_continuing_a_finished_run_rebuilds_final(tiny, tmp_path):
    out = run(_cfg(tiny, tmp_path / "run", rounds=1))
    first = load_file(str(out / "final" / "model.safetensors"))
    run(_cfg(tiny, tmp_path / "run", rounds=2))
    second = load_file(str(out / "final" / "model.safetensors"))
    round2 = load_file(str(out / "round-2" / "model" / "model.safetensors"))
    assert any(not torch.equal(first[k], second[k]) for k in first)
    assert all(torch.equal(second[k], round2[k]) for k in round2)


def _cli_run(cfg_dict, path, **env):
    path.write_text(yaml.safe_dump(cfg_dict))
    return subprocess.run([sys.executable, "-m", "distillm2", "run", str(path)], capture_output=True, text=True,
                          timeout=600, env=dict(os.environ, HF_HUB_OFFLINE="1", **env))


def test_a_nonfinite_step_is_skipped_and_too_many_stop_the_stage(tiny, tmp_path):
    cfg = tiny_config(tiny, tmp_path / "once", rounds=1, **{"train.grad_accum": 1, "train.checkpoint_every": 1})
    done = _cli_run(cfg, tmp_path / "once.yaml", DISTILLM2_NAN="round-1/train:2")
    assert done.returncode == 0, done.stderr[-2000:]
    metrics = _rows(tmp_path / "once" / "round-1" / "metrics.jsonl")
    assert [m["skipped"] for m in metrics] == [0, 1, 0, 0, 0, 0] and metrics[-1]["skipped_total"] == 1
    assert "step 2 skipped" in done.stderr
    final = load_file(str(tmp_path / "once" / "final" / "model.safetensors"))
    assert all(torch.isfinite(v).all() for v in final.values())

    cfg = tiny_config(tiny, tmp_path / "many", rounds=1, **{"train.grad_accum": 1, "train.max_nonfinite_steps": 1})
    failed = _cli_run(cfg, tmp_path / "many.yaml", DISTILLM2_NAN="round-1/train:2,3")
    assert failed.returncode == 2
    assert "step 3: 2 non-finite steps in a row" in failed.stderr and "pairs with a non-finite loss" in failed.stderr
    assert "Traceback" not in failed.stderr
    assert not (tmp_path / "many" / "round-1" / "model").exists() and not (tmp_path / "many" / "final").exists()


def test_speculative_kd_interleaves_student_and_teacher(tiny, tmp_path):
    out = run(_cfg(tiny, tmp_path / "skd", rounds=1, **{"loss.name": "skd", "loss.skd_top_k": 1}))
    rows = _rows(out / "round-1" / "student.jsonl")
    assert len(rows) == 12 and sum(r["replaced"] for r in rows) > 0  # a random student misses the teacher's top 1
    vocab = len(models.load_tokenizer(str(tiny / "tok")))
    everything = run(_cfg(tiny, tmp_path / "all", rounds=1, **{"loss.name": "skd", "loss.skd_top_k": vocab}))
    assert sum(r["replaced"] for r in _rows(everything / "round-1" / "student.jsonl")) == 0
    assert (out / "round-1" / "model").exists()


def test_dpo_alignment_stage_after_the_rounds(tiny, tmp_path):
    prefs = tmp_path / "prefs.jsonl"
    with open(prefs, "w") as fh:
        for i in range(6):
            fh.write(json.dumps({"prompt": f"name a fruit {i}", "chosen": "an apple", "rejected": "a rock"}) + "\n")
    out = run(_cfg(tiny, tmp_path / "run", rounds=1, **{"align.pairs": str(prefs), "align.lr": 1e-2}))
    metrics = _rows(out / "align" / "metrics.jsonl")
    assert len(metrics) >= 2 and all(math.isfinite(m["loss"]) for m in metrics)
    # the first step's DPO loss is log 2: the reference is the student itself at the stage's start
    assert metrics[0]["loss"] == pytest.approx(math.log(2), abs=1e-5)
    assert metrics[-1]["loss"] < metrics[0]["loss"]  # the chosen answers became more likely
    final = load_file(str(out / "final" / "model.safetensors"))
    aligned = load_file(str(out / "align" / "model" / "model.safetensors"))
    assert all(torch.equal(final[k], aligned[k]) for k in aligned)


def test_quantized_student_recovers_with_lora(tiny, tmp_path):
    teacher = models.load_model(str(tiny / "teacher"))
    w = teacher.model.layers[0].mlp.up_proj.weight.detach().clone()
    q = models.quantize_weights(models.load_model(str(tiny / "teacher")), bits=4, group_size=16)
    wq = q.model.layers[0].mlp.up_proj.weight.detach()
    groups, qgroups = w.reshape(w.shape[0], -1, 16), wq.reshape(w.shape[0], -1, 16)
    scale = groups.abs().amax(-1, keepdim=True) / 7
    assert torch.allclose(qgroups / scale, (qgroups / scale).round(), atol=1e-4)  # on the 4-bit grid
    assert (qgroups / scale).abs().max() <= 8 and not torch.equal(w, wq)
    assert torch.equal(q.lm_head.weight, teacher.lm_head.weight)  # the head is left alone
    out = run(_cfg(tiny, tmp_path / "q", rounds=1, **{
        "models.student": str(tiny / "teacher"), "models.student_num_layers": None,
        "models.student_quantization_bits": 4, "models.student_quantization_group": 16, "models.lora": True,
        "models.lora_r": 4, "models.lora_alpha": 8, "eval.prompts": str(tiny / "prompts.jsonl"),
        "eval.max_prompts": 4, "eval.max_new_tokens": 4, "eval.include_initial": True}))
    report = json.loads((out / "eval" / "results.json").read_text())
    assert {"teacher", "student_init", "student"} <= set(report["models"])
    assert report["models"]["student_init"]["kl_teacher_responses"] > 0  # quantisation cost something


def test_fused_loss_path_trains_like_the_logits_path(tiny, tmp_path):
    kw = {"train.optimizer": "sgd", "train.lr": 0.5, "generation.greedy": True}
    plain = run(_cfg(tiny, tmp_path / "plain", **kw))
    fused = run(_cfg(tiny, tmp_path / "fused", **kw, **{"train.fused_loss": True}))
    a = load_file(str(plain / "final" / "model.safetensors"))
    b = load_file(str(fused / "final" / "model.safetensors"))
    init = load_file(str(plain / "student-init" / "model.safetensors"))
    assert max((a[k] - init[k]).abs().max() for k in a) > 1e-3  # training moved the weights
    for key in a:  # round 2 includes the curriculum, computed from hidden states on the fused path
        torch.testing.assert_close(b[key], a[key], rtol=1e-4, atol=1e-5, msg=key)
    m_plain = _rows(plain / "round-2" / "metrics.jsonl")
    m_fused = _rows(fused / "round-2" / "metrics.jsonl")
    assert [m["alpha_chosen_mean"] for m in m_fused] == pytest.approx([m["alpha_chosen_mean"] for m in m_plain], rel=1e-4)


@pytest.mark.parametrize("top_p", [0.5, 0.9, 0.95])
def test_nucleus_from_top_k_keeps_what_hf_top_p_keeps(top_p):
    """The top-k search for the nucleus keeps exactly HF's TopPLogitsWarper's tokens, on peaked
    rows (nucleus inside the top 64) and flat ones (the full-sort fallback)."""
    from transformers.generation.logits_process import TemperatureLogitsWarper, TopPLogitsWarper

    from distillm2.generation.hf import NucleusFromTopK

    gen = torch.Generator().manual_seed(0)
    scale = torch.tensor([0.02] * 40 + [1.0] * 40 + [3.0] * 40 + [12.0] * 40)[:, None]  # flat ... peaked
    scores = torch.randn(160, 12000, generator=gen) * scale
    ours = NucleusFromTopK(top_p, 0.8)(None, scores.clone())
    scaled = TemperatureLogitsWarper(0.8)(None, scores.clone())
    theirs = TopPLogitsWarper(top_p)(None, scaled.clone())
    reach = scaled.softmax(-1).sort(dim=-1, descending=True).values.cumsum(-1)
    width = (reach < top_p).sum(-1) + 1  # nucleus sizes: rows of every rung of the ladder and beyond
    assert (width <= 64).any() and (width > 4096).any()
    assert torch.equal(torch.isfinite(ours), torch.isfinite(theirs))
    assert torch.equal(ours[torch.isfinite(ours)], scaled[torch.isfinite(ours)])  # kept scores: T applied, untouched


def test_a_diverging_stage_stops_with_the_step_and_the_numbers(tiny, tmp_path):
    """Issue 19, item 3: a stage whose loss explodes while staying finite stops with exit 2
    naming the step, saves no model, and the run is not done. The explosion is injected (the
    student's logits scaled by 1e3 at steps 4-5: a real, finite, huge KL, under `kd`, whose
    forward KL is unbounded -- DistiLLM-2's skew KLs are bounded by -log alpha, 2.3 nats at
    alpha 0.1, so there the vanished gradient is what signals divergence); the tiny test models
    cannot be made to diverge finitely by the learning rate alone (at lr >= 100 their gradient
    turns non-finite, the other guard). The same run without the fault is not stopped."""
    cfg = tiny_config(tiny, tmp_path / "hot", rounds=1, **{"train.grad_accum": 1, "loss.name": "kd"})
    failed = _cli_run(cfg, tmp_path / "hot.yaml", DISTILLM2_BLOWUP="round-1/train:4,5")
    assert failed.returncode == 2, failed.stderr[-2000:]
    line = [ln for ln in failed.stderr.splitlines() if "diverged" in ln]
    assert line and "round-1: step 4 diverged" in line[0] and "lower train.lr" in line[0], failed.stderr[-2000:]
    assert "Traceback" not in failed.stderr
    assert not (tmp_path / "hot" / "round-1" / "model").exists() and not (tmp_path / "hot" / "final").exists()
    metrics = _rows(tmp_path / "hot" / "round-1" / "metrics.jsonl")
    assert len(metrics) == 4 and all(math.isfinite(m["loss"]) for m in metrics)  # finite, yet diverged


def test_divergence_check_fires_on_explosions_and_zero_gradients_only():
    from distillm2 import divergence

    healthy = [2.0, 2.3, 1.9, 2.6, 1.5, 1.2, 3.1, 0.9]  # noisy, falling, one batch 1.6x the reference
    state: dict = {}
    assert [divergence.check(state, i + 1, v, 1.0, 10.0) for i, v in enumerate(healthy)] == [None] * len(healthy)
    assert state["loss_reference"] == 2.0  # median of the first three
    assert "loss 25" in divergence.check(state, 9, 25.0, 1.0, 10.0)
    state = {}
    assert divergence.check(state, 1, 2.0, 0.0, 10.0) is None  # one zero norm is not yet a pattern
    assert "exactly 0 for 2 steps" in divergence.check(state, 2, 2.0, 0.0, 10.0)
    assert divergence.check({}, 1, 2.0, 0.0, 0.0) is None and divergence.check({}, 1, 1e9, 1.0, 0.0) is None  # off
    state = {"loss_reference": [2.0]}  # resumed while collecting: the reference is the first loss until then
    assert "is 20x the stage's reference 2" in divergence.check(state, 2, 40.0, 1.0, 10.0)
    small = {"loss_reference": 5e-4}  # near 0 the reference is floored: 25x of 5e-4 is noise
    assert divergence.check(small, 9, 0.0125, 0.1, 10.0) is None and "x the stage" in divergence.check(small, 10, 11.0, 0.1, 10.0)
