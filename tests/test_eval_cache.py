"""Evaluation caches are keyed by everything that determines their contents: two models, new
weights in the same directory or another decoding setting never reuse old outputs; the held-out
evaluation of runs reports the measures of each candidate's own outputs."""

import json
import math
import shutil

import pytest

from distillm2.config import EvaluateConfig, GenerationConfig, RunEvalConfig
from distillm2.evaluation import evaluate
from distillm2.evaluation.metrics import distinct_n, repeated_ngram_share, repetition
from distillm2.identity import cache_key, claim, model_identity


def _eval(tiny, model, out, **kw):
    cfg = dict(model=str(model), teacher=str(tiny / "teacher"), tasks=["rouge"], prompts=str(tiny / "prompts.jsonl"),
               limit=3, output=str(out), max_new_tokens=6, batch_size=4, dtype="float32", device="cpu")
    cfg.update(kw)
    return evaluate(EvaluateConfig(**cfg))


def test_two_models_into_one_output_get_two_results(tiny, tmp_path):
    out = tmp_path / "eval.json"  # one output, hence one cache folder, for everything below
    model = tmp_path / "model"
    shutil.copytree(tiny / "student", model)
    student = _eval(tiny, model, out)["tasks"]["rouge"]["rouge_l"]
    teacher = _eval(tiny, tiny / "teacher", out)["tasks"]["rouge"]["rouge_l"]
    assert teacher == 1.0 and student < 1.0  # the teacher against its own greedy outputs
    # new weights in the same directory: regenerated, not read from the cache
    shutil.rmtree(model)
    shutil.copytree(tiny / "teacher", model)
    assert _eval(tiny, model, out)["tasks"]["rouge"]["rouge_l"] == 1.0
    # another decoding length: new outputs of the model and of the teacher (its references)
    before = set((tmp_path / "eval.cache").iterdir())
    report = _eval(tiny, model, out, max_new_tokens=3)
    new = set((tmp_path / "eval.cache").iterdir()) - before
    assert sorted(p.name.split(".")[0] for p in new) == ["model", "teacher"]
    assert all(json.loads(line)["num_tokens"] <= 3 for p in new for line in p.read_text().splitlines())
    assert report["inputs"]["decoding"]["max_new_tokens"] == 3
    # a rerun of the same evaluation generates nothing
    before = {p: p.stat().st_mtime_ns for p in (tmp_path / "eval.cache").iterdir()}
    _eval(tiny, model, out, max_new_tokens=3)
    assert before == {p: p.stat().st_mtime_ns for p in (tmp_path / "eval.cache").iterdir()}


def test_model_identity_and_claim(tiny, tmp_path):
    a = model_identity(str(tiny / "student"))
    assert a == model_identity(str(tiny / "student")) and a["path"] == str(tiny / "student")
    assert a["fingerprint"] != model_identity(str(tiny / "teacher"))["fingerprint"]
    unresolved = model_identity("no-such-org/no-such-model")
    assert unresolved["resolved"] is False and unresolved["path"] is None
    assert cache_key(a=1) != cache_key(a=2) and cache_key(a=1, b=2) == cache_key(b=2, a=1)

    out = tmp_path / "x.greedy.jsonl"
    out.write_text('{"id": "1"}\n')
    (tmp_path / "x.greedy.jsonl.rank0").write_text("")
    assert claim(out, "k1") and not out.exists()  # no key yet: whatever is there is stale
    out.write_text('{"id": "1"}\n')
    assert not claim(out, "k1") and out.exists()
    assert claim(out, "k2") and not out.exists() and (tmp_path / "x.greedy.jsonl.key").read_text().strip() == "k2"


def test_repetition_by_hand():
    assert distinct_n([1, 2, 3, 4], 2) == 1.0
    assert distinct_n([1, 1, 1, 1], 2) == 1 / 3  # bigrams (1,1) x3: one distinct
    assert distinct_n([7], 2) is None
    # 1 2 3 4 1 2 3 4 5: the 4-gram (1,2,3,4) occurs twice and covers positions 0-7 of 9 tokens
    assert repeated_ngram_share([1, 2, 3, 4, 1, 2, 3, 4, 5], 4) == 8 / 9
    assert repeated_ngram_share([1, 2, 3, 4, 5], 4) == 0.0
    assert repeated_ngram_share([], 4) is None
    r = repetition([[1, 2, 3, 4], [1, 1, 1, 1], []])
    assert math.isclose(r["distinct_2"], (1 + 1 / 3) / 2)
    assert math.isclose(r["repeated_4gram_share"], (0 + 0) / 2)


@pytest.fixture()
def accelerator():
    from accelerate.state import AcceleratorState

    from distillm2.distributed import make_accelerator

    # accelerate keeps one process-wide state: start from none and leave none behind, so that
    # neither this test nor a later one depends on another's mixed precision
    AcceleratorState._reset_state(reset_partial_state=True)
    yield make_accelerator()
    AcceleratorState._reset_state(reset_partial_state=True)


def test_held_out_evaluation_is_keyed_and_reports_own_outputs(tiny, tmp_path, accelerator):
    from distillm2 import models
    from distillm2.evaluation.held_out import evaluate_models

    tok = models.load_tokenizer(str(tiny / "tok"))
    teacher = models.load_model(str(tiny / "teacher"))
    candidate = tmp_path / "final"
    shutil.copytree(tiny / "student", candidate)
    kwargs = dict(teacher=teacher, teacher_source=str(tiny / "teacher"), tokenizer=tok, vocab=len(tok),
                  eval_cfg=RunEvalConfig(prompts=str(tiny / "prompts.jsonl"), max_prompts=3, max_new_tokens=6,
                                         batch_size=4),
                  generation=GenerationConfig(dtype="float32", batch_size=4), out_dir=tmp_path / "eval",
                  accelerator=accelerator, max_prompt_length=96)
    first = evaluate_models({"teacher": None, "student": candidate}, **kwargs)
    for name in ("teacher", "student"):
        assert {"rouge_l", "rouge_l_ci95", "n", "kl_teacher_responses", "teacher_nll_own_outputs", "distinct_2",
                "repeated_4gram_share"} <= set(first[name])
    assert "nll_teacher_responses" in first["student"] and first["teacher"]["rouge_l"] == 1.0
    assert first["student"]["rouge_l"] < 1.0 and first["student"]["kl_teacher_responses"] > 0
    # the teacher's own outputs are what it finds most plausible among greedy answers
    assert first["teacher"]["teacher_nll_own_outputs"] < first["student"]["teacher_nll_own_outputs"]
    assert evaluate_models({"teacher": None, "student": candidate}, **kwargs) == first  # from the caches
    # the candidate's directory now holds the teacher: every cached number of it is recomputed
    shutil.rmtree(candidate)
    shutil.copytree(tiny / "teacher", candidate)
    second = evaluate_models({"teacher": None, "student": candidate}, **kwargs)
    assert second["student"]["rouge_l"] == 1.0 and second["student"]["kl_teacher_responses"] < 1e-6
    assert second["teacher"] == first["teacher"]
