"""The evaluation tasks as one table, :data:`TASKS`.

Each task is a function of an :class:`EvalContext` (the models, the prompts and cached greedy
outputs of one ``distillm2 eval``) returning its metrics ``{metric: value, "n": count}``:
``rouge`` -> rouge_l (+ 95% interval); ``kl`` -> forward_kl, nll; ``judge`` -> win_rate,
win_rate_parsed, ties, unparsed; ``self`` -> teacher_nll_own_outputs, distinct_2,
repeated_4gram_share; ``gsm8k`` -> accuracy; ``humaneval`` -> pass@1; ``speculative`` ->
acceptance_rate, speedup; ``lm_eval:<task>`` -> lm-evaluation-harness's metrics. The table also
says what a task needs, so the command checks its inputs before any work.

Models are loaded when a task first needs them. Greedy outputs are cached in
``cache/<who>.<name>.<key>.jsonl``, where the key hashes everything that determines them (the
model's fingerprint, dtype, device type, decoding settings, prompt length, batch size), so a
changed model or setting regenerates and two models never share outputs.
"""

from __future__ import annotations

import functools
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import torch

from distillm2 import models
from distillm2.config import EvaluateConfig, GenerationConfig
from distillm2.data import prompt_token_ids, records
from distillm2.errors import DataError
from distillm2.evaluation.benchmarks import (
    completion_from_response,
    extract_answer,
    gsm8k_messages,
    gsm8k_reference,
    gsm8k_shots,
    humaneval_messages,
    load_completions,
    load_gsm8k,
    load_humaneval,
    score_humaneval,
)
from distillm2.evaluation.harness import PREFIX as LM_EVAL_PREFIX
from distillm2.evaluation.judge import CachedJudge, hf_judge, openai_judge, pairwise_win_rate
from distillm2.evaluation.metrics import own_output_metrics, rouge_summary, teacher_forced_kl
from distillm2.evaluation.speculative import speculative_eval
from distillm2.files import read_jsonl
from distillm2.generation import generate_responses
from distillm2.identity import cache_key, model_identity


@dataclass
class EvalContext:
    """What the tasks of one evaluation share: the config, the device, the models (loaded on
    first use), the instruction prompts, the reference answers and the greedy-output cache."""

    cfg: EvaluateConfig
    cache: Path
    device: torch.device
    prompts: list[dict] | None = None
    _identities: dict[str, dict] = field(default_factory=dict)

    def identity(self, who: str) -> dict:
        """The identity (source, path, fingerprint) of ``"model"`` or ``"teacher"``."""
        if who not in self._identities:
            self._identities[who] = model_identity(self.cfg.model if who == "model" else self.cfg.teacher)
        return self._identities[who]

    @functools.cached_property
    def tokenizer(self):
        """The evaluated model's tokenizer."""
        return models.load_tokenizer(self.cfg.model)

    @functools.cached_property
    def model(self):
        """The evaluated model."""
        return models.load_model(self.cfg.model, self.cfg.dtype, device=self.device)

    @functools.cached_property
    def teacher_tokenizer(self):
        """The teacher's own tokenizer (its chat template renders the teacher's prompts)."""
        return models.load_tokenizer(self.cfg.teacher)

    @functools.cached_property
    def teacher(self):
        """The teacher model."""
        return models.load_model(self.cfg.teacher, self.cfg.dtype, device=self.device)

    @functools.cached_property
    def vocab(self) -> int:
        """The shared vocabulary width (checks that model and teacher share a tokenizer)."""
        return models.check_tokenizers(self.teacher_tokenizer, self.tokenizer, self.teacher, self.model)

    def greedy(self, who: str, prompts: list[dict], name: str, max_new_tokens: int | None = None,
               whole_prompts: bool = False) -> list[dict]:
        """Greedy outputs of the model (``who="model"``) or the teacher for ``prompts``, in
        prompt order, cached under a key of everything that determines them. ``whole_prompts``:
        never cut a prompt to ``max_prompt_length`` (benchmark prompts with worked examples)."""
        cfg = self.cfg
        settings = GenerationConfig(greedy=True, max_new_tokens=max_new_tokens or cfg.max_new_tokens,
                                    batch_size=cfg.batch_size, dtype=cfg.dtype)
        model, tokenizer = (self.model, self.tokenizer) if who == "model" else (self.teacher, self.teacher_tokenizer)
        length = cfg.max_prompt_length
        if whole_prompts:
            length = max([length] + [len(prompt_token_ids(tokenizer, p["messages"])) for p in prompts])
        key = cache_key(model=self.identity(who)["fingerprint"], dtype=cfg.dtype, device=self.device.type,
                        greedy=True, max_new_tokens=settings.max_new_tokens, batch_size=cfg.batch_size,
                        max_prompt_length="whole" if whole_prompts else length, backend=settings.backend)
        rows = generate_responses(model, tokenizer, prompts, self.cache / f"{who}.{name}.{key}.jsonl", settings,
                                  max_prompt_length=length, desc=f"{who} {name}")
        by_id = {r["id"]: r for r in rows}
        return [by_id[p["id"]] for p in prompts if p["id"] in by_id]

    @functools.cached_property
    def answer_rows(self) -> list[dict]:
        """The evaluated model's greedy outputs on the instruction prompts."""
        return self.greedy("model", self.prompts, "prompts")

    @functools.cached_property
    def answers(self) -> dict[str, str]:
        """The evaluated model's greedy answers by prompt id."""
        return {r["id"]: r["response"] for r in self.answer_rows}

    @functools.cached_property
    def teacher_rows(self) -> list[dict]:
        """The teacher's greedy outputs on the instruction prompts."""
        return self.greedy("teacher", self.prompts, "prompts")

    @functools.cached_property
    def references(self) -> dict[str, str]:
        """Reference answers by prompt id: ``cfg.references`` or the teacher's greedy outputs."""
        if not self.cfg.references:
            return {r["id"]: r["response"] for r in self.teacher_rows}
        by_id = {r["id"]: r["response"] for r in read_jsonl(self.cfg.references)}
        refs = {p["id"]: by_id[p["id"]] for p in self.prompts if p["id"] in by_id}
        if not refs:
            raise DataError(f"{self.cfg.references}: no reference shares an id with the prompts")
        return refs


def _rouge(ctx: EvalContext) -> dict:
    return rouge_summary(ctx.answers, ctx.references)


def _kl(ctx: EvalContext) -> dict:
    vocab = ctx.vocab  # checks the shared vocabulary before any generation
    rows = ctx.teacher_rows
    kl = teacher_forced_kl(ctx.model, ctx.teacher, ctx.tokenizer, ctx.prompts, rows, vocab,
                           batch_size=ctx.cfg.batch_size, max_prompt_length=ctx.cfg.max_prompt_length)
    return {"forward_kl": kl["forward_kl"], "nll": kl["nll"], "n": len(rows), "tokens": kl["tokens"]}


def _self(ctx: EvalContext) -> dict:
    vocab = ctx.vocab  # checks the shared vocabulary before any generation
    return own_output_metrics(ctx.teacher, ctx.tokenizer, ctx.prompts, ctx.answer_rows, vocab,
                              batch_size=ctx.cfg.batch_size, max_prompt_length=ctx.cfg.max_prompt_length)


def make_judge(ctx: EvalContext) -> CachedJudge:
    """The configured judge (endpoint or local model), cached in ``cache/judge.jsonl`` under a
    name that carries the judge's identity and settings."""
    jc = ctx.cfg.judge
    if jc.api_model:
        name = f"openai:{jc.base_url}:{jc.api_model}:t={jc.temperature}:max={jc.api_max_tokens}"
        complete = openai_judge(jc.api_model, jc.base_url, jc.api_key, max_tokens=jc.api_max_tokens,
                                temperature=jc.temperature, retries=jc.retries)
    elif jc.model:
        fingerprint = model_identity(jc.model)["fingerprint"]
        name = f"hf:{jc.model}:{fingerprint}:{ctx.cfg.dtype}:t={jc.temperature}:max={jc.max_new_tokens}"
        complete = hf_judge(models.load_model(jc.model, ctx.cfg.dtype, device=ctx.device),
                            models.load_tokenizer(jc.model), max_new_tokens=jc.max_new_tokens,
                            temperature=jc.temperature)
    else:
        raise DataError("judge: give --judge MODEL (local) or --judge-model NAME [--judge-base-url URL]")
    return CachedJudge(name, complete, ctx.cache / "judge.jsonl")


def question_text(prompt: dict) -> str:
    """The user turns of a prompt record, as the judge and AlpacaEval see the instruction."""
    return "\n".join(m["content"] for m in prompt["messages"] if m["role"] == "user")


def _judge(ctx: EvalContext) -> dict:
    judge = make_judge(ctx)
    by_id = {p["id"]: p for p in ctx.prompts}
    ids = [i for i in ctx.references if i in ctx.answers]
    result = pairwise_win_rate(judge, [question_text(by_id[i]) for i in ids], [ctx.answers[i] for i in ids],
                               [ctx.references[i] for i in ids],
                               concurrency=ctx.cfg.judge.concurrency if ctx.cfg.judge.api_model else 1)
    result["judge_calls"] = judge.calls
    return result


def _gsm8k(ctx: EvalContext) -> dict:
    gc = ctx.cfg.gsm8k
    rows = load_gsm8k(gc.data, ctx.cfg.limit)
    shots = gsm8k_shots(gc.fewshot, gc.fewshot_data, rows)
    recs = records([gsm8k_messages(r["question"], shots) for r in rows])
    outs = ctx.greedy("model", recs, "gsm8k", whole_prompts=True)
    got = {o["id"]: extract_answer(o["response"]) for o in outs}
    correct = sum(got.get(rec["id"]) is not None and abs(got[rec["id"]] - gsm8k_reference(r["answer"])) < 1e-6
                  for rec, r in zip(recs, rows))
    return {"accuracy": correct / len(rows), "n": len(rows), "no_answer": sum(got.get(r["id"]) is None for r in recs),
            "fewshot": len(shots)}


def _humaneval(ctx: EvalContext) -> dict:
    hc = ctx.cfg.humaneval
    problems = load_humaneval(hc.data, None)
    if hc.completions:
        completions = load_completions(hc.completions, problems)
        problems = problems[: ctx.cfg.limit] if ctx.cfg.limit else problems
        result = score_humaneval(problems, completions, timeout=hc.timeout, workers=hc.workers)
        result["problems_without_completion"] = len(problems) - result["n"]
        return result
    problems = problems[: ctx.cfg.limit] if ctx.cfg.limit else problems
    recs = records([humaneval_messages(p["prompt"]) for p in problems])
    max_new = max(ctx.cfg.max_new_tokens, hc.max_new_tokens)
    outs = {o["id"]: o["response"] for o in ctx.greedy("model", recs, "humaneval", max_new, whole_prompts=True)}
    completions = {p["task_id"]: [completion_from_response(outs[rec["id"]], p["entry_point"])]
                   for rec, p in zip(recs, problems)}
    return score_humaneval(problems, completions, timeout=hc.timeout, workers=hc.workers)


def _speculative(ctx: EvalContext) -> dict:
    ctx.vocab  # noqa: B018 - drafting needs a shared vocabulary: checked before any work
    return speculative_eval(ctx.teacher, ctx.model, ctx.tokenizer, ctx.prompts, max_new_tokens=ctx.cfg.max_new_tokens,
                            num_assistant_tokens=ctx.cfg.speculative_tokens,
                            max_prompt_length=ctx.cfg.max_prompt_length)


def _lm_eval(ctx: EvalContext) -> dict:
    raise RuntimeError("lm_eval:<task> entries are run together by the eval command")


@dataclass(frozen=True)
class Task:
    """One evaluation task: its function and what it needs."""

    run: Callable[[EvalContext], dict]
    description: str
    needs_teacher: bool = False  # the teacher model itself (not only reference answers)
    needs_prompts: bool = False  # the instruction prompts
    needs_references: bool = False  # reference answers and the model's greedy answers
    needs_model: Callable[[EvaluateConfig], bool] = lambda cfg: True


class TaskFamily(str):
    """A key of :data:`TASKS` that stands for every name with its prefix (``lm_eval:<task>``):
    it compares equal to each of them, so the config's check of valid values accepts them."""

    __hash__ = str.__hash__

    def __eq__(self, other):
        return isinstance(other, str) and other.startswith(self.split("<", 1)[0])

    def __ne__(self, other):
        return not self == other


LM_EVAL = TaskFamily(LM_EVAL_PREFIX + "<task>")

TASKS: dict[str, Task] = {
    "rouge": Task(_rouge, "ROUGE-L of greedy outputs vs references", needs_prompts=True, needs_references=True),
    "kl": Task(_kl, "KL(teacher||model) and NLL on the teacher's greedy responses", needs_teacher=True,
               needs_prompts=True),
    "judge": Task(_judge, "pairwise LLM-judge win rate vs references", needs_prompts=True, needs_references=True),
    "self": Task(_self, "the model's own greedy outputs: teacher NLL of them, distinct-2, repeated 4-grams",
                 needs_teacher=True, needs_prompts=True),
    "gsm8k": Task(_gsm8k, "GSM8K final-number accuracy (own chat prompt)"),
    "humaneval": Task(_humaneval, "HumanEval pass@1 in a sandbox (own chat prompt, or given completions)",
                      needs_model=lambda cfg: not cfg.humaneval.completions),
    "speculative": Task(_speculative, "acceptance and speed-up as a draft for the teacher", needs_teacher=True,
                        needs_prompts=True),
    LM_EVAL: Task(_lm_eval, "a task of lm-evaluation-harness (its prompts and metrics), e.g. lm_eval:gsm8k"),
}


def task_spec(name: str) -> Task | None:
    """The :class:`Task` behind a task name (``lm_eval:<task>`` included), or None."""
    if name in TASKS:
        return TASKS[name]
    return TASKS[LM_EVAL] if name.startswith(LM_EVAL_PREFIX) else None
