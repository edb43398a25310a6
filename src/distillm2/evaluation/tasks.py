"""The evaluation tasks as one table, :data:`TASKS`.

Each task is a function of an :class:`EvalContext` (the models, the prompts and cached greedy
outputs of one ``distillm2 eval``) returning its metrics ``{metric: value, "n": count}``:
``rouge`` -> rouge_l (+ 95% interval); ``kl`` -> forward_kl, nll; ``judge`` -> win_rate, ties,
unparsed; ``gsm8k`` -> accuracy; ``humaneval`` -> pass@1; ``speculative`` -> acceptance_rate,
speedup. The table also says what a task needs, so the command checks its inputs before any work.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

from distillm2 import models
from distillm2.config import EvaluateConfig, GenerationConfig
from distillm2.data import records
from distillm2.errors import DataError
from distillm2.evaluation.benchmarks import (
    extract_answer,
    extract_code,
    gsm8k_messages,
    gsm8k_reference,
    humaneval_messages,
    load_gsm8k,
    load_humaneval,
)
from distillm2.evaluation.judge import CachedJudge, hf_judge, openai_judge, pairwise_win_rate
from distillm2.evaluation.metrics import rouge_summary, teacher_forced_kl
from distillm2.evaluation.sandbox import run_program
from distillm2.evaluation.speculative import speculative_eval
from distillm2.generation import generate_responses


@dataclass
class EvalContext:
    """What the tasks of one evaluation share: the config, the models, the instruction prompts,
    the reference answers, and a cache of greedy outputs (``cache/<who>.<name>.jsonl``)."""

    cfg: EvaluateConfig
    model: object
    tokenizer: object
    cache: Path
    teacher: object = None
    vocab: int | None = None
    prompts: list[dict] | None = None
    references: dict[str, str] | None = None
    answers: dict[str, str] = field(default_factory=dict)

    def greedy(self, who: str, model, prompts: list[dict], name: str, max_new_tokens: int | None = None):
        """Greedy outputs of ``model`` for ``prompts``, cached under ``who.name``."""
        settings = GenerationConfig(greedy=True, max_new_tokens=max_new_tokens or self.cfg.max_new_tokens,
                                    batch_size=self.cfg.batch_size, dtype=self.cfg.dtype)
        return generate_responses(model, self.tokenizer, prompts, self.cache / f"{who}.{name}.jsonl", settings,
                                  desc=f"{who} {name}")


def _rouge(ctx: EvalContext) -> dict:
    return rouge_summary(ctx.answers, ctx.references)


def _kl(ctx: EvalContext) -> dict:
    rows = ctx.greedy("teacher", ctx.teacher, ctx.prompts, "prompts")
    kl = teacher_forced_kl(ctx.model, ctx.teacher, ctx.tokenizer, ctx.prompts, rows, ctx.vocab,
                           batch_size=ctx.cfg.batch_size)
    return {"forward_kl": kl["forward_kl"], "nll": kl["nll"], "n": len(rows), "tokens": kl["tokens"]}


def _judge(ctx: EvalContext) -> dict:
    jc = ctx.cfg.judge
    if jc.api_model:
        name = f"openai:{jc.base_url}:{jc.api_model}"
        complete = openai_judge(jc.api_model, jc.base_url, jc.api_key, max_tokens=jc.api_max_tokens)
    elif jc.model:
        name = f"hf:{jc.model}"
        device = next(ctx.model.parameters()).device
        complete = hf_judge(models.load_model(jc.model, ctx.cfg.dtype, device=device), models.load_tokenizer(jc.model),
                            max_new_tokens=jc.max_new_tokens)
    else:
        raise DataError("judge: give --judge MODEL (local) or --judge-model NAME [--judge-base-url URL]")
    judge = CachedJudge(name, complete, ctx.cache / "judge.jsonl")
    by_id = {p["id"]: p for p in ctx.prompts}
    ids = [i for i in ctx.references if i in ctx.answers]
    questions = ["\n".join(m["content"] for m in by_id[i]["messages"] if m["role"] == "user") for i in ids]
    result = pairwise_win_rate(judge, questions, [ctx.answers[i] for i in ids], [ctx.references[i] for i in ids])
    result["judge_calls"] = judge.calls
    return result


def _gsm8k(ctx: EvalContext) -> dict:
    gc = ctx.cfg.gsm8k
    rows = load_gsm8k(gc.data, ctx.cfg.limit)
    shots = load_gsm8k(gc.fewshot_data, gc.fewshot) if gc.fewshot else []
    recs = records([gsm8k_messages(r["question"], shots) for r in rows])
    outs = ctx.greedy("model", ctx.model, recs, "gsm8k")
    got = {o["id"]: extract_answer(o["response"]) for o in outs}
    correct = sum(got[rec["id"]] is not None and abs(got[rec["id"]] - gsm8k_reference(r["answer"])) < 1e-6
                  for rec, r in zip(recs, rows))
    return {"accuracy": correct / len(rows), "n": len(rows), "no_answer": sum(v is None for v in got.values())}


def _humaneval(ctx: EvalContext) -> dict:
    hc = ctx.cfg.humaneval
    problems = load_humaneval(hc.data, ctx.cfg.limit)
    recs = records([humaneval_messages(p["prompt"]) for p in problems])
    max_new = max(ctx.cfg.max_new_tokens, hc.max_new_tokens)
    outs = {o["id"]: o["response"] for o in ctx.greedy("model", ctx.model, recs, "humaneval", max_new)}
    passed, statuses = 0, {}
    for rec, problem in zip(recs, problems):
        program = extract_code(outs[rec["id"]], problem["prompt"], problem["entry_point"])
        program += f"\n\n{problem['test']}\n\ncheck({problem['entry_point']})\n"
        outcome = run_program(program, timeout=hc.timeout)
        passed += outcome.passed
        statuses[outcome.status] = statuses.get(outcome.status, 0) + 1
    return {"pass@1": passed / len(problems), "n": len(problems), **{f"n_{k}": v for k, v in statuses.items()}}


def _speculative(ctx: EvalContext) -> dict:
    return speculative_eval(ctx.teacher, ctx.model, ctx.tokenizer, ctx.prompts, max_new_tokens=ctx.cfg.max_new_tokens,
                            num_assistant_tokens=ctx.cfg.speculative_tokens)


@dataclass(frozen=True)
class Task:
    """One evaluation task: its function and what it needs."""

    run: Callable[[EvalContext], dict]
    description: str
    needs_teacher: bool = False  # the teacher model itself (not only reference answers)
    needs_prompts: bool = False  # the instruction prompts
    needs_references: bool = False  # reference answers and the model's greedy answers


TASKS: dict[str, Task] = {
    "rouge": Task(_rouge, "ROUGE-L of greedy outputs vs references", needs_prompts=True, needs_references=True),
    "kl": Task(_kl, "KL(teacher||model) and NLL on the teacher's greedy responses", needs_teacher=True,
               needs_prompts=True),
    "judge": Task(_judge, "pairwise LLM-judge win rate vs references", needs_prompts=True, needs_references=True),
    "gsm8k": Task(_gsm8k, "GSM8K final-number accuracy"),
    "humaneval": Task(_humaneval, "HumanEval pass@1 in a sandbox"),
    "speculative": Task(_speculative, "acceptance and speed-up as a draft for the teacher", needs_teacher=True,
                        needs_prompts=True),
}

