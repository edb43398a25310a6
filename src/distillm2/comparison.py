"""``distillm2 compare``: the paper's method comparison on one budget.

A shared stage first (``OUT/shared``: prompts, teacher responses, the initial student and its
optional SFT warm-up). Then every method -- a loss name, or a named variant with config overrides
(the ablations) -- runs the same rounds from that same initial student, on the same prompts and
teacher responses with the same step budget (``OUT/<method>``, an ordinary resumable run
directory). Finally teacher, initial student and every method's student are evaluated on the
held-out prompts: ROUGE-L of greedy outputs against the teacher's greedy outputs (primary metric)
and the per-token KL(teacher || student) on the teacher's responses. Results: ``OUT/results.json``,
``OUT/results.md``, ``OUT/metrics.png`` (a bar chart per metric), ``OUT/curves.png`` (training
loss per method). Re-running the command continues where it stopped.
"""

from __future__ import annotations

import copy
import dataclasses
import json
import shutil
from pathlib import Path

from distillm2.config import CompareConfig, ConfigError, RunConfig, load_config, to_dict
from distillm2.evaluation.held_out import evaluate_models
from distillm2.evaluation.report import write_held_out
from distillm2.files import atomic_dir, read_jsonl
from distillm2.losses import LOSSES
from distillm2.pipeline import Run
from distillm2.progress import logger


def _method_configs(cfg: CompareConfig) -> dict[str, RunConfig]:
    base = {k: v for k, v in to_dict(cfg).items() if k not in ("methods", "variants")}
    base.update(sft_epochs=0.0)
    base["eval"]["prompts"] = None  # evaluated together at the end, against one teacher
    base["models"].update(student=None, student_layers=None, student_num_layers=None)
    out = {}
    entries = [{"name": m, "loss": m, "overrides": []} for m in cfg.methods] + list(cfg.variants)
    for entry in entries:
        if not isinstance(entry, dict) or set(entry) - {"name", "loss", "overrides"} or "name" not in entry:
            raise ConfigError(f"variants: each entry needs name, loss and optional overrides, got {entry!r}")
        loss = entry.get("loss", entry["name"])
        if loss not in LOSSES:
            raise ConfigError(f"methods/variants: unknown loss {loss!r}; valid: {', '.join(LOSSES)}")
        data = copy.deepcopy(base)
        data["loss"]["name"] = loss
        data["output_dir"] = str(Path(cfg.output_dir) / entry["name"])
        out[entry["name"]] = load_config(RunConfig, base=data, overrides=list(entry.get("overrides", [])))
    return out


def _seed(method_dir: Path, shared: Path) -> None:
    """Give a method's run directory the shared prompts, teacher responses and initial student,
    so that its pipeline starts from them (finished stages are never redone)."""
    method_dir.mkdir(parents=True, exist_ok=True)
    if not (method_dir / "prompts.jsonl").exists():
        shutil.copy(shared / "prompts.jsonl", method_dir / "prompts.jsonl")
    (method_dir / "round-1").mkdir(exist_ok=True)
    if not (method_dir / "round-1" / "teacher.jsonl").exists():
        shutil.copy(shared / "round-1" / "teacher.jsonl", method_dir / "round-1" / "teacher.jsonl")
    if not (method_dir / "student-init" / "config.json").exists():
        with atomic_dir(method_dir / "student-init") as tmp:
            shutil.copytree(shared / "final", tmp, dirs_exist_ok=True)


def compare(cfg: CompareConfig, force: bool = False) -> dict:
    """Train every method and variant of ``cfg`` from one initial student on one budget,
    evaluate all of them with the teacher and the initial student, write ``results.json``,
    ``results.md``, ``metrics.png`` and ``curves.png``; returns the report."""
    out = Path(cfg.output_dir)
    methods = _method_configs(cfg)
    shared_cfg = RunConfig(**{f.name: getattr(cfg, f.name) for f in dataclasses.fields(RunConfig)})
    shared_cfg = dataclasses.replace(shared_cfg, output_dir=str(out / "shared"), rounds=0,
                                     eval=dataclasses.replace(cfg.eval, prompts=None))
    shared = Run(shared_cfg, force=force)
    shared.execute()  # prompts, teacher responses, initial student (+ SFT warm-up) -> shared/final
    for name, method_cfg in methods.items():
        _seed(Path(method_cfg.output_dir), out / "shared")
        logger.info("compare: method %s", name)
        Run(method_cfg, teacher=shared.teacher, force=force).execute()

    candidates = {"teacher": None, "initial": out / "shared" / "final"}
    candidates.update({name: Path(c.output_dir) / "final" for name, c in methods.items()})
    results = evaluate_models(candidates, teacher=shared.teacher, teacher_source=cfg.models.teacher,
                              tokenizer=shared.tokenizer, vocab=shared.vocab,
                              eval_cfg=cfg.eval, generation=cfg.generation, out_dir=out / "eval",
                              accelerator=shared.acc, seed=cfg.train.seed,
                              max_prompt_length=cfg.data.max_prompt_length)
    report = {"models": results, "methods": list(methods), "rounds": cfg.rounds,
              "steps_per_round": _steps(methods), "config": to_dict(cfg)}
    if shared.main:
        table = write_held_out(report, out, "results.md", f"Method comparison ({out})",
                               "held-out prompts: ROUGE-L vs teacher (higher better), KL on teacher responses "
                               "(lower better)")
        curves_plot(methods, out / "curves.png")
        print(f"\ncomparison ({out}):\n{table}", flush=True)
    return report


def _steps(methods) -> dict:
    steps = {}
    for name, c in methods.items():
        info = Path(c.output_dir) / "round-1" / "train_info.json"
        if info.exists():
            steps[name] = json.loads(info.read_text())["steps"]
    return steps


def curves_plot(methods: dict, path: Path) -> None:
    """Training loss per optimiser step, one panel per method (rounds concatenated)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    n = len(methods)
    cols = min(3, n)
    rows = (n + cols - 1) // cols
    fig, axes = plt.subplots(rows, cols, figsize=(4.5 * cols, 3.2 * rows), squeeze=False)
    for ax, (name, c) in zip(axes.flat, methods.items()):
        step = 0
        for k in range(1, c.rounds + 1):
            metrics = Path(c.output_dir) / f"round-{k}" / "metrics.jsonl"
            if not metrics.exists():
                continue
            rows_ = read_jsonl(metrics)
            ax.plot([step + r["step"] for r in rows_], [r["loss"] for r in rows_], label=f"round {k}")
            step += rows_[-1]["step"] if rows_ else 0
        ax.set_title(f"{name} ({c.loss.name})")
        ax.set_xlabel("step")
        ax.legend(fontsize=7)
    for ax in list(axes.flat)[n:]:
        ax.axis("off")
    fig.suptitle("training loss (each method's own objective)")
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)
