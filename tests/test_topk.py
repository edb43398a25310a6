"""train.teacher_topk: the teacher on chosen rows as top-k log-probabilities + tail, cached once.

The maths (k = V is the exact loss, a lower bound below it, the error shrinks with k), the
cache (built once, reused by a later stage without a teacher forward on chosen rows, resumed
after a kill, rebuilt under another key) and the config checks."""


import json

import pytest
import torch
from conftest import tiny_config

from distillm2 import _topk, models, teacher_cache
from distillm2.config import ConfigError, LossConfig, RunConfig, TrainConfig, load_config
from distillm2.distributed import make_accelerator
from distillm2.losses import LOSSES, RowInputs, curriculum_gaps, pair_loss, topk_unsupported
from distillm2.pipeline import run
from distillm2.train import Schedule, Trainer

TOPK_LOSSES = [name for name in LOSSES if topk_unsupported(name) is None]


def _logits(b, t, v, scale, seed, dtype=torch.float64):
    g = torch.Generator().manual_seed(seed)
    # Zipf-like base preferences plus noise: peaked like an LM's next-token distribution.
    base = -1.1 * torch.log(torch.arange(1, v + 1, dtype=torch.float64))[torch.randperm(v, generator=g)]
    return (base + scale * torch.randn((b, t, v), generator=g, dtype=torch.float64)).to(dtype)


def _rows(student, teacher, labels, mask, k, tau=1.0):
    """chosen = the top-k teacher (or the exact one for k None), rejected = exact, both losses."""
    chosen_teacher = teacher if k is None else _topk.topk_of_logits(teacher, labels, k, tau)
    alpha = torch.tensor([0.1, 0.3])
    return {"chosen": RowInputs(student, chosen_teacher, mask, labels, alpha),
            "rejected": RowInputs(student, teacher, mask, labels, alpha)}


@pytest.mark.parametrize("name", TOPK_LOSSES)
@pytest.mark.parametrize("tau", [1.0, 2.0])
def test_k_equal_to_vocab_is_the_exact_loss_and_gradient(name, tau):
    b, t, v = 2, 5, 23
    teacher = _logits(b, t, v, 2.0, 0)
    labels = torch.randint(0, v, (b, t), generator=torch.Generator().manual_seed(1))
    mask = torch.ones((b, t), dtype=torch.bool)
    mask[1, 3:] = False
    results = []
    for k in (None, v):
        student = _logits(b, t, v, 1.0, 2).requires_grad_(True)
        out = pair_loss(name, _rows(student, teacher, labels, mask, k, tau), beta=0.3,
                        temperature=tau)
        out.loss.backward()
        results.append((out.loss.detach(), student.grad.clone()))
    (exact, g_exact), (coarse, g_coarse) = results
    torch.testing.assert_close(coarse, exact, rtol=1e-5, atol=1e-7)
    torch.testing.assert_close(g_coarse, g_exact, rtol=1e-4, atol=1e-7)


def test_coarsened_student_gradient_matches_float64_autograd():
    b, t, v, k = 2, 3, 17, 4
    teacher = _logits(b, t, v, 2.0, 3)
    top = _topk.topk_of_logits(teacher, torch.zeros((b, t), dtype=torch.long), k, 1.5)
    student = _logits(b, t, v, 1.0, 4).requires_grad_(True)
    upstream = torch.randn((b, t, k + 1), dtype=torch.float64)
    (_topk.coarsen_student(student, top, 1.5).double() * upstream).sum().backward()
    ours = student.grad.clone()
    student.grad = None
    logq = torch.log_softmax(student / 1.5, -1)
    picked = logq.gather(-1, top.indices)
    rest = torch.logsumexp(logq.scatter(-1, top.indices, float("-inf")), -1, keepdim=True)
    (torch.cat([picked, rest], -1) * upstream).sum().backward()
    torch.testing.assert_close(ours, student.grad, rtol=1e-5, atol=1e-6)
    # the teacher's buckets are a distribution: top-k mass + tail = 1
    mass = top.logprobs.exp().sum(-1) + top.tail.exp()
    torch.testing.assert_close(mass.float(), torch.ones_like(mass).float(), rtol=1e-5, atol=1e-6)


def test_error_shrinks_with_k_and_is_a_lower_bound():
    b, t, v = 2, 16, 512
    teacher = _logits(b, t, v, 3.0, 5, torch.float32)
    labels = teacher.argmax(-1)
    mask = torch.ones((b, t), dtype=torch.bool)
    student = _logits(b, t, v, 2.0, 6, torch.float32).requires_grad_(True)
    exact = pair_loss("distillm2", _rows(student, teacher, labels, mask, None))
    exact.loss.backward()
    g_exact = student.grad.clone()
    errors, cosines = [], []
    for k in (1, 4, 16, 64, 256):
        student.grad = None
        out = pair_loss("distillm2", _rows(student, teacher, labels, mask, k))
        out.loss.backward()
        assert float(out.terms["skl"].detach().sum()) <= float(exact.terms["skl"].detach().sum()) + 1e-5  # a lower bound
        errors.append(abs(out.loss.item() - exact.loss.item()) / exact.loss.item())
        cosines.append(float(torch.nn.functional.cosine_similarity(student.grad.flatten(), g_exact.flatten(), 0)))
    assert all(a >= b - 1e-6 for a, b in zip(errors, errors[1:])), errors
    assert errors[-1] < 0.02 and cosines[-1] > 0.99, (errors, cosines)


def test_curriculum_gaps_read_the_exact_label_logprob():
    b, t, v = 4, 6, 31
    teacher, student = _logits(b, t, v, 2.0, 7), _logits(b, t, v, 1.0, 8)
    labels = torch.randint(0, v, (b, t), generator=torch.Generator().manual_seed(9))
    mask = torch.rand((b, t), generator=torch.Generator().manual_seed(10)) > 0.3
    exact = curriculum_gaps(student, teacher, labels, mask, 4)[0]
    top = curriculum_gaps(student, _topk.topk_of_logits(teacher, labels, 2), labels, mask, 4)[0]
    torch.testing.assert_close(top, exact, rtol=1e-5, atol=1e-6)


def test_mismatched_temperature_is_refused():
    teacher = _logits(1, 2, 9, 1.0, 0)
    labels = torch.zeros((1, 2), dtype=torch.long)
    rows = _rows(teacher.clone().requires_grad_(True), teacher, labels, torch.ones((1, 2), dtype=torch.bool), 3, 1.0)
    with pytest.raises(ValueError, match="temperature"):
        pair_loss("kd", rows, temperature=2.0)


def test_inputs_are_left_untouched_in_float32():
    teacher, student = _logits(2, 3, 11, 2.0, 11, torch.float32), _logits(2, 3, 11, 1.0, 12, torch.float32)
    t0, s0 = teacher.clone(), student.clone()
    top = _topk.topk_of_logits(teacher, teacher.argmax(-1), 3, 2.0)
    student.requires_grad_(True)
    _topk.coarsen_student(student, top, 2.0).sum().backward()
    assert torch.equal(teacher, t0) and torch.equal(student.detach(), s0)


# The cache in the training loop ----------------------------------------------------------------


def _pairs(n=8):
    return [{"id": f"p{i}", "prompt": [{"role": "user", "content": f"explain apple number {i}"}],
             "chosen": f"paris is the capital {i} of france", "rejected": f"one two {i} three",
             "chosen_finished": True, "rejected_finished": i % 2 == 0} for i in range(n)]


class _Counter:
    """Rows of every forward of a model (a forward pre-hook)."""

    def __init__(self, model):
        self.rows: list[int] = []
        model.register_forward_pre_hook(lambda m, args, kwargs: self.rows.append(kwargs["input_ids"].shape[0]),
                                        with_kwargs=True)


def _trainer(tiny, stage_dir, teacher, topk, round_index=1, loss="distillm2", temperature=1.0, steps=2):
    tok = models.load_tokenizer(str(tiny / "tok"))
    cfg = TrainConfig(lr=1e-3, batch_size=2, mixed_precision="no", warmup_ratio=0.0, lr_schedule="constant",
                      checkpoint_every=1, teacher_topk=topk, optimizer="sgd")
    return Trainer(accelerator=make_accelerator("no"), student=models.load_model(str(tiny / "student")),
                   teacher=teacher, tokenizer=tok, pairs=_pairs(2 * steps), train_cfg=cfg,
                   loss_cfg=LossConfig(name=loss, temperature=temperature), stage_dir=stage_dir, vocab=len(tok),
                   max_prompt_length=96, max_length=128, schedule=Schedule(round_index=round_index, rounds=2))


def _metrics(stage_dir):
    return [json.loads(x) for x in (stage_dir / "metrics.jsonl").read_text().splitlines()]


def test_cache_is_built_once_and_later_stages_run_the_teacher_on_rejected_rows_only(tiny, tmp_path):
    teacher = models.load_model(str(tiny / "teacher"))
    calls = _Counter(teacher)
    first = _trainer(tiny, tmp_path / "round-1", teacher, 8)
    assert sum(calls.rows) == 4  # the chosen rows of the 4 pairs, once, before any step
    keys = list((tmp_path / "teacher-topk").iterdir())
    assert len(keys) == 1 and (keys[0] / "key.json").exists() and list(keys[0].glob("part-*.pt"))
    calls.rows.clear()
    first.fit()
    assert calls.rows == [2, 2]  # each micro-batch: its 2 rejected rows, never the chosen ones
    calls.rows.clear()
    second = _trainer(tiny, tmp_path / "round-2", teacher, 8, round_index=2)  # curriculum from round 2
    assert calls.rows == []  # reused, not recomputed
    second.fit()
    assert calls.rows == [2, 2, 2]  # the anchor's measurement, then the two steps: rejected rows only
    metrics = _metrics(tmp_path / "round-2")
    assert len(metrics) == 2 and all(m["loss"] == m["loss"] for m in metrics) and "alpha_chosen_mean" in metrics[0]
    # another temperature is another key: a second cache beside the first
    _trainer(tiny, tmp_path / "round-3", teacher, 8, temperature=2.0)
    assert len(list((tmp_path / "teacher-topk").iterdir())) == 2


@pytest.mark.parametrize("loss", ["distillm2", "dpkd"])
def test_full_k_trains_like_the_exact_teacher(tiny, tmp_path, loss):
    teacher = models.load_model(str(tiny / "teacher"))
    vocab = len(models.load_tokenizer(str(tiny / "tok")))
    exact = _trainer(tiny, tmp_path / "exact", teacher, 0, loss=loss).fit()
    top = _trainer(tiny, tmp_path / "top", teacher, vocab, loss=loss).fit()
    for a, b in zip(_metrics(tmp_path / "exact"), _metrics(tmp_path / "top")):
        assert a["loss"] == pytest.approx(b["loss"], rel=1e-3)  # float16 storage of the log-probabilities
    for (name, a), b in zip(exact.state_dict().items(), top.state_dict().values()):
        torch.testing.assert_close(a, b, rtol=1e-3, atol=1e-5, msg=name)


def test_cache_build_resumes_after_a_kill(tiny, tmp_path, monkeypatch):
    teacher = models.load_model(str(tiny / "teacher"))
    tok = models.load_tokenizer(str(tiny / "tok"))
    rows = [r for r in _trainer(tiny, tmp_path / "enc", teacher, 0).encoded]
    rows = [item["chosen"] for item in rows]
    args = dict(k=5, temperature=1.0, vocab=len(tok), pad_id=tok.pad_token_id, batch_rows=1, device="cpu")
    monkeypatch.setattr(teacher_cache, "SHARD_TOKENS", 1)  # a shard per batch

    def killed(stage, shards):
        if shards >= 2:
            raise KeyboardInterrupt  # as a kill: the shards written so far stay, nothing else

    monkeypatch.setattr(teacher_cache, "maybe_crash", killed)
    with pytest.raises(KeyboardInterrupt):
        teacher_cache.ChosenTopK(tmp_path / "cache", teacher, rows, **args)
    (key_dir,) = (tmp_path / "cache").iterdir()
    assert len(list(key_dir.glob("part-*.pt"))) == 2 and not list(key_dir.glob("*.tmp"))
    monkeypatch.setattr(teacher_cache, "maybe_crash", lambda stage, shards: None)
    calls = _Counter(teacher)
    resumed = teacher_cache.ChosenTopK(tmp_path / "cache", teacher, rows, **args)
    assert sum(calls.rows) == len(rows) - 2  # only what no shard holds
    fresh = teacher_cache.ChosenTopK(tmp_path / "fresh", teacher, rows, **args)
    a, b = resumed.teacher(list(range(len(rows))), 12, "cpu"), fresh.teacher(list(range(len(rows))), 12, "cpu")
    for name in ("logprobs", "indices", "tail", "label"):
        assert torch.equal(getattr(a, name), getattr(b, name)), name


def test_a_stage_resumes_after_an_interruption(tiny, tmp_path, monkeypatch):
    teacher = models.load_model(str(tiny / "teacher"))
    whole = _trainer(tiny, tmp_path / "whole", teacher, 8, steps=3).fit()

    import distillm2.train as train_module

    def crash(stage, step):
        if step == 2:
            raise KeyboardInterrupt

    monkeypatch.setattr(train_module, "maybe_crash", crash)
    with pytest.raises(KeyboardInterrupt):
        _trainer(tiny, tmp_path / "cut", teacher, 8, steps=3).fit()
    monkeypatch.setattr(train_module, "maybe_crash", lambda stage, step: None)
    resumed = _trainer(tiny, tmp_path / "cut", teacher, 8, steps=3)
    assert resumed.state["step"] == 2
    resumed = resumed.fit()
    for (name, a), b in zip(whole.state_dict().items(), resumed.state_dict().values()):
        torch.testing.assert_close(a, b, rtol=1e-6, atol=1e-7, msg=name)


def test_run_keeps_one_cache_for_all_rounds(tiny, tmp_path):
    # with an SFT warm-up, which never reads the teacher: the cache is switched off for that stage only
    out = run(load_config(RunConfig, base=tiny_config(tiny, tmp_path / "run", sft_epochs=1.0,
                                                      **{"train.teacher_topk": 16})))
    assert (out / "sft" / "model").exists()
    (key_dir,) = (out / "teacher-topk").iterdir()
    shards = list(key_dir.glob("part-*.pt"))
    assert shards and json.loads((key_dir / "key.json").read_text())["k"] == 16
    # written in round 1 only: round 2 started (truncation.json) after the last shard
    assert max(p.stat().st_mtime_ns for p in shards) < (out / "round-2" / "truncation.json").stat().st_mtime_ns
    assert (out / "final" / "config.json").exists()


# Config ----------------------------------------------------------------------------------------


@pytest.mark.parametrize("overrides, match", [
    (["train.teacher_topk=-1"], "train.teacher_topk must be >= 0"),
    (["train.teacher_topk=8", "train.fused_loss=true"], "train.teacher_topk cannot be combined with train.fused_loss"),
])
def test_bad_values_are_refused_when_loaded(overrides, match):
    with pytest.raises(ConfigError, match=match):
        load_config(RunConfig, overrides=overrides)


@pytest.mark.parametrize("loss, why", [("sft", "never reads the teacher"), ("rkl", "only on student responses"),
                                       ("dpo", "frozen student")])
def test_losses_the_cache_cannot_serve_are_refused(tiny, tmp_path, loss, why):
    with pytest.raises(ConfigError, match=f"train.teacher_topk: loss {loss} .*{why}"):
        _trainer(tiny, tmp_path / loss, models.load_model(str(tiny / "teacher")), 8, loss=loss)
    with pytest.raises(ConfigError, match="one process, got 2"):
        teacher_cache.check_topk(8, "distillm2", False, 2)


def test_compare_shares_the_cache_with_the_methods_it_can_serve(tmp_path):
    from distillm2.comparison import _method_configs
    from distillm2.config import CompareConfig

    cfg = load_config(CompareConfig, overrides=["train.teacher_topk=8", "methods=[sft, rkl, kd, distillm2]"])
    methods = _method_configs(cfg, tmp_path, 0)
    assert {name: c.train.teacher_topk for name, c in methods.items()} == {"sft": 0, "rkl": 0, "kd": 8,
                                                                           "distillm2": 8}
