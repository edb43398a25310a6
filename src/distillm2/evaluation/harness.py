"""Standard benchmarks through lm-evaluation-harness: the ``lm_eval:<task>`` tasks of ``eval``.

Every requested ``lm_eval:<task>`` runs in one ``lm_eval.simple_evaluate`` call on the evaluated
model, with lm-eval's own prompts, few-shot examples, answer extraction and metrics, so the
numbers can be set beside published ones (use the published settings: ``lm_eval.num_fewshot``
and ``lm_eval.apply_chat_template`` as the paper states). Backends: ``hf`` wraps the model this
command already loaded (``HFLM``); ``vllm`` starts lm-eval's vLLM engine from the model's
directory. lm-eval's request cache lives beside our output, keyed by the model's fingerprint
and the settings, so a rerun only computes what is missing and never reuses another model's
answers. Task data comes from the Hugging Face hub unless a task YAML in ``lm_eval.include_path``
points at local files (``dataset_path: json`` with ``dataset_kwargs: {data_files: ...}``).
"""

from __future__ import annotations

import functools
import importlib.util
import math
import os

import torch

from distillm2 import models
from distillm2.config import EvaluateConfig
from distillm2.errors import DataError, MissingExtra
from distillm2.identity import cache_key
from distillm2.progress import logger

PREFIX = "lm_eval:"
CODE_TASKS = ("humaneval", "mbpp")  # lm-eval tasks that execute model-written code


def _import():
    try:
        import lm_eval
    except ImportError:
        raise MissingExtra("the lm_eval:<task> tasks", "eval") from None
    return lm_eval


@functools.lru_cache(maxsize=4)
def _task_manager(include_path: str | None):
    """lm-eval's task index (building it reads every task YAML: seconds), once per folder."""
    from lm_eval.tasks import TaskManager

    return TaskManager(include_path=include_path) if include_path else TaskManager()


def task_names(names: list[str]) -> list[str]:
    """The lm-eval task names of ``lm_eval:<task>`` entries (others left out)."""
    return [n[len(PREFIX):] for n in names if n.startswith(PREFIX)]


def check_tasks(cfg: EvaluateConfig) -> None:
    """Fail before any model is loaded when lm-eval is missing or a task is unknown to it."""
    names = task_names(cfg.tasks)
    if not names:
        return
    if "" in names:
        raise DataError("lm_eval: give a task name, e.g. lm_eval:gsm8k")
    _import()
    manager = _task_manager(cfg.lm_eval.include_path)
    unknown = [n for n in names if n not in manager.all_tasks]
    if unknown:
        raise DataError(f"lm-eval does not know task(s) {', '.join(unknown)} (see `lm_eval ls tasks`; local task "
                        "YAMLs go in lm_eval.include_path)")


def _backend(choice: str) -> str:
    if choice != "auto":
        return choice
    return "vllm" if importlib.util.find_spec("vllm") is not None and torch.cuda.is_available() else "hf"


def _number(value):
    return float(value) if isinstance(value, (int, float)) and not isinstance(value, bool) else None


def _fold(out: dict, task: str) -> dict:
    """One task's (or group's) metrics from lm-eval's results as ``{metric: value, "n", ...}``;
    metric names keep lm-eval's ``metric,filter`` form."""
    res = out.get("results", {}).get(task) or out.get("groups", {}).get(task) or {}
    metrics = {k: v for k, v in ((k, _number(v)) for k, v in res.items() if k not in ("alias", "sample_len"))
               if v is not None and not math.isnan(v)}
    samples = out.get("n-samples", {}).get(task, {})
    metrics["n"] = samples.get("effective", res.get("sample_len"))
    metrics["n_shot"] = out.get("n-shot", {}).get(task)
    metrics["version"] = out.get("versions", {}).get(task)
    subtasks = out.get("group_subtasks", {}).get(task) or []
    if subtasks:
        metrics["subtasks"] = {s: _fold(out, s) for s in subtasks}
    return metrics


def run_lm_eval(ctx, names: list[str]) -> dict[str, dict]:
    """Run the ``lm_eval:<task>`` entries of ``names`` on the context's model in one call and
    return ``{"lm_eval:<task>": metrics}``."""
    lm_eval = _import()
    cfg, lc = ctx.cfg, ctx.cfg.lm_eval
    tasks = task_names(names)
    manager = _task_manager(lc.include_path)
    backend = _backend(lc.backend)
    if any(t.startswith(CODE_TASKS) for t in tasks):
        if not lc.allow_code_execution:
            raise DataError(f"lm-eval code tasks ({', '.join(tasks)}) execute model-written code; allow it with "
                            "--set lm_eval.allow_code_execution=true")
        os.environ["HF_ALLOW_CODE_EVAL"] = "1"  # lm-eval's code_eval refuses to run without it
        logger.warning("lm-eval code tasks run model-written code outside distillm2's sandbox")
    if backend == "hf":
        from lm_eval.models.huggingface import HFLM

        model = HFLM(pretrained=ctx.model, tokenizer=ctx.tokenizer, batch_size=lc.batch_size,
                     device=str(ctx.device))
        model_args = None
    else:
        model = "vllm"
        model_args = {"pretrained": models.resolve(cfg.model), "dtype": cfg.dtype, "batch_size": lc.batch_size}
    # after loading: a hub id is then in the local cache, so its fingerprint is of its files
    key = cache_key(model=ctx.identity("model")["fingerprint"], backend=backend, dtype=cfg.dtype,
                    device=ctx.device.type, batch_size=lc.batch_size, chat=lc.apply_chat_template,
                    gen_kwargs=lc.gen_kwargs)
    logger.info("lm-eval %s on %s (%s backend)", ", ".join(tasks), cfg.model, backend)
    out = lm_eval.simple_evaluate(
        model=model, model_args=model_args, tasks=tasks, num_fewshot=lc.num_fewshot, limit=cfg.limit,
        task_manager=manager, log_samples=False, apply_chat_template=lc.apply_chat_template,
        fewshot_as_multiturn=lc.apply_chat_template, gen_kwargs=lc.gen_kwargs,
        use_cache=str(ctx.cache / f"lm_eval.{key}"), confirm_run_unsafe_code=lc.allow_code_execution)
    if out is None:  # lm-eval returns nothing on processes other than the main one
        return {}
    folded = {f"{PREFIX}{t}": _fold(out, t) for t in tasks}
    for name in folded:
        folded[name]["lm_eval_version"] = out.get("lm_eval_version")
    return folded
