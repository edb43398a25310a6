"""The training loop: every loss trains, accumulation equals one big batch, collation is right."""

import json

import pytest
import torch

from distillm2 import models
from distillm2.config import LossConfig, TrainConfig
from distillm2.data import collate, encode
from distillm2.distributed import make_accelerator
from distillm2.losses import LOSSES
from distillm2.train import Schedule, Trainer, plan_steps


def _pairs(n=8):
    return [{"id": f"p{i}", "prompt": [{"role": "user", "content": f"explain apple number {i}"}],
             "chosen": f"paris is the capital {i}", "rejected": f"one two {i} three",
             "chosen_finished": True, "rejected_finished": i % 2 == 0} for i in range(n)]


def _train(tiny, tmp_path, loss="distillm2", steps=2, grad_accum=1, batch_size=2, round_index=1,
           reduction="sequence", lr=1e-3, optimizer="adamw"):
    tok = models.load_tokenizer(str(tiny / "tok"))
    teacher = models.load_model(str(tiny / "teacher"))
    student = models.load_model(str(tiny / "student"))
    pairs = _pairs(steps * grad_accum * batch_size)
    cfg = TrainConfig(optimizer=optimizer, lr=lr, batch_size=batch_size, grad_accum=grad_accum, mixed_precision="no",
                      warmup_ratio=0.0, lr_schedule="constant", reduction=reduction, checkpoint_every=0)
    trainer = Trainer(accelerator=make_accelerator("no"), student=student, teacher=teacher, tokenizer=tok, pairs=pairs,
                      train_cfg=cfg, loss_cfg=LossConfig(name=loss), stage_dir=tmp_path / f"{loss}-{grad_accum}",
                      vocab=len(tok), max_prompt_length=96, max_length=128, schedule=Schedule(round_index=round_index))
    trained = trainer.fit()
    metrics = [json.loads(x) for x in (tmp_path / f"{loss}-{grad_accum}" / "metrics.jsonl").read_text().splitlines()]
    return trained, metrics


@pytest.mark.parametrize("loss", list(LOSSES))
def test_every_loss_trains_two_steps(tiny, tmp_path, loss):
    init = models.load_model(str(tiny / "student")).state_dict()
    trained, metrics = _train(tiny, tmp_path, loss)
    assert len(metrics) == 2
    assert all(torch.isfinite(torch.tensor(m["loss"])) for m in metrics)
    changed = [k for k, v in trained.state_dict().items() if not torch.equal(v.cpu(), init[k])]
    assert changed, "no parameter changed"


@pytest.mark.parametrize("reduction", ["sequence", "token"])
def test_gradient_accumulation_equals_one_big_batch(tiny, tmp_path, reduction):
    # one step of 4 micro-batches of 1 pair vs one step of 1 micro-batch of 4 pairs. Plain SGD, so
    # that the update is the gradient itself: AdamW's first step is lr * g / |g|, which turns
    # rounding noise in near-zero gradient entries into +-lr differences (seen on a GPU).
    init = models.load_model(str(tiny / "student")).state_dict()
    a, _ = _train(tiny, tmp_path / "a", steps=1, grad_accum=4, batch_size=1, reduction=reduction, lr=1.0, optimizer="sgd")
    b, _ = _train(tiny, tmp_path / "b", steps=1, grad_accum=1, batch_size=4, reduction=reduction, lr=1.0, optimizer="sgd")
    sa, sb = a.state_dict(), b.state_dict()
    assert max((sa[k].cpu() - init[k]).abs().max() for k in sa) > 1e-3  # the step did something
    for k in sa:
        torch.testing.assert_close(sa[k].cpu(), sb[k].cpu(), rtol=1e-5, atol=1e-7, msg=k)


def test_curriculum_from_round_two(tiny, tmp_path):
    _, m1 = _train(tiny, tmp_path / "r1", round_index=1)
    _, m2 = _train(tiny, tmp_path / "r2", round_index=2)
    assert "alpha_chosen_mean" not in m1[0]  # round 1: fixed alpha0
    assert "alpha_chosen_mean" in m2[0]
    state = json.loads((tmp_path / "r2" / "distillm2-1" / "checkpoint" / "state.json").read_text())
    assert state["anchor_chosen"] is not None and state["anchor_rejected"] is not None


def test_plan_is_global_and_padded_for_several_processes():
    cfg = TrainConfig(batch_size=2, grad_accum=2, epochs=1.0)
    one = plan_steps(10, cfg, world=1, stage_seed=3)
    assert [len(m) for step in one for m in step] == [2, 2, 2, 2, 2]
    two = plan_steps(10, cfg, world=2, stage_seed=3)
    assert all(len(m) == 4 for step in two for m in step)  # wrapped around to full micro-batches
    flat = [i for step in one for m in step for i in m]
    assert sorted(flat) == list(range(10))
    two_epochs = [i for step in plan_steps(10, TrainConfig(epochs=2.0, batch_size=4), 1, 0) for m in step for i in m]
    assert sorted(two_epochs) == sorted(list(range(10)) * 2)  # every pair exactly twice


def test_collate_aligns_responses_and_masks_prompts(tiny):
    tok = models.load_tokenizer(str(tiny / "tok"))
    rows = [encode(tok, [{"role": "user", "content": "hi"}], "paris is", True, 96, 128),
            encode(tok, [{"role": "user", "content": "explain gravity in one sentence"}], "", False, 96, 128)]
    assert rows[0].response_ids[-1] == tok.eos_token_id  # finished: end-of-turn trained
    assert rows[1].response_ids == []  # cut by max_new_tokens and empty: nothing to train
    b = collate(rows, tok.pad_token_id)
    p = b.input_ids.shape[1] - b.labels.shape[1]
    # labels are exactly the tokens after the kept positions
    for i, r in enumerate(rows):
        n = len(r.response_ids)
        assert b.labels[i, :n].tolist() == r.response_ids and b.mask[i].sum() == n
        assert b.input_ids[i, p : p + n].tolist() == r.response_ids
        assert b.input_ids[i, p - len(r.prompt_ids) : p].tolist() == r.prompt_ids
    assert b.keep.tolist() == list(range(p - 1, p - 1 + b.labels.shape[1]))
    # positions restart at 0 at each row's first real token
    first = (b.attention_mask[1] == 1).nonzero()[0].item()
    assert b.position_ids[1, first] == 0


def test_truncation_is_counted(tiny):
    from distillm2.data import TruncationStats

    tok = models.load_tokenizer(str(tiny / "tok"))
    stats = TruncationStats()
    row = encode(tok, [{"role": "user", "content": "explain gravity " * 20}], "paris " * 50, True, 16, 24, stats)
    assert len(row.prompt_ids) == 16 and len(row.prompt_ids) + len(row.response_ids) == 24
    assert stats.prompts == 1 and stats.responses == 1 and "truncated 1 of 1 prompts" in stats.report()


def test_length_grouped_plan_is_deterministic_and_complete():
    lengths = [(i * 37) % 101 for i in range(64)]
    cfg = TrainConfig(batch_size=4, grad_accum=2, group_by_length=True)
    plan = plan_steps(64, cfg, world=1, stage_seed=5, lengths=lengths)
    assert plan == plan_steps(64, cfg, world=1, stage_seed=5, lengths=lengths)
    flat = [i for step in plan for m in step for i in m]
    assert sorted(flat) == list(range(64))
    plain = plan_steps(64, TrainConfig(batch_size=4, grad_accum=2), world=1, stage_seed=5)

    def padding(p):  # columns padded inside micro-batches
        return sum(max(lengths[i] for i in m) * len(m) - sum(lengths[i] for i in m) for step in p for m in step)

    assert padding(plan) < padding(plain) / 2


def test_one_process_can_build_accelerators_of_different_precisions():
    """compare, a notebook or this suite run several runs in one process; accelerate's singleton
    state must not make the second run's precision an error (it did: CI failed on it)."""
    from distillm2.distributed import make_accelerator

    assert make_accelerator("bf16").mixed_precision == "bf16"
    assert make_accelerator("no").mixed_precision == "no"


def test_fp16_overflow_lowers_the_scale_instead_of_failing(tiny, tmp_path):
    """fp16 autocast with a gradient scaler (auto's choice on a GPU without bf16): a step whose
    scaled gradient overflows is skipped by the scaler, which lowers the scale; the stage goes on
    (it would stop after max_nonfinite_steps if the loop skipped the scaler's step) and trains.
    Run on the CPU with torch's CPU GradScaler in the place accelerate puts the CUDA one."""
    tok = models.load_tokenizer(str(tiny / "tok"))
    teacher = models.load_model(str(tiny / "teacher"))
    student = models.load_model(str(tiny / "student"))
    init = {k: v.clone() for k, v in student.state_dict().items()}
    acc = make_accelerator("fp16")
    acc.scaler, acc.native_amp = torch.amp.GradScaler("cpu", init_scale=2.0**40, backoff_factor=2.0**-8, growth_interval=1000), True
    cfg = TrainConfig(lr=1e-3, batch_size=2, grad_accum=1, mixed_precision="fp16", warmup_ratio=0.0,
                      lr_schedule="constant", checkpoint_every=0, max_nonfinite_steps=1)
    trainer = Trainer(accelerator=acc, student=student, teacher=teacher, tokenizer=tok, pairs=_pairs(12),
                      train_cfg=cfg, loss_cfg=LossConfig(name="distillm2"), stage_dir=tmp_path / "fp16", vocab=len(tok),
                      max_prompt_length=96, max_length=128)
    trained = trainer.fit()
    metrics = [json.loads(x) for x in (tmp_path / "fp16" / "metrics.jsonl").read_text().splitlines()]
    assert len(metrics) == 6
    skipped = [m["step"] for m in metrics if m["skipped"]]
    assert skipped and skipped[0] == 1 and len(skipped) < 6  # overflows first, then real updates
    assert acc.scaler.get_scale() < 2.0**40
    assert any(not torch.equal(v, init[k]) for k, v in trained.state_dict().items())


@pytest.mark.parametrize("attn", ["eager", "sdpa"])
def test_shared_prompt_forward_equals_the_plain_one(tiny, attn):
    """Chosen and rejected rows of the same pairs share their prompts: the prompts run once and
    both row kinds continue from the tiled cache. Logits and the gradient of every parameter
    equal the plain forward's to float32 rounding (prompts of different lengths, responses of
    different lengths, one empty)."""
    from distillm2.models import response_logits

    tok = models.load_tokenizer(str(tiny / "tok"))
    model = models.load_model(str(tiny / "student"), attn_implementation=attn)
    pairs = _pairs(3)
    pairs[1]["prompt"][0]["content"] += " with a much longer prompt than the others"
    pairs[2]["rejected"] = ""
    rows = [encode(tok, p["prompt"], p[which], True, 96, 128) for which in ("chosen", "rejected") for p in pairs]
    batch = collate(rows, tok.pad_token_id)
    grads = []
    for shared in (0, 3):
        model.zero_grad()
        logits = response_logits(model, batch, len(tok), shared_prompts=shared)
        (logits.float().log_softmax(-1) * batch.mask[..., None]).sum().backward()
        grads.append({n: p.grad.clone() for n, p in model.named_parameters()})
        if shared == 0:
            plain = logits.detach()
        else:
            torch.testing.assert_close(logits.detach(), plain, rtol=1e-5, atol=1e-5)
    for name in grads[0]:
        torch.testing.assert_close(grads[1][name], grads[0][name], rtol=1e-4, atol=1e-5, msg=name)
