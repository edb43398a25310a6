"""``distillm2 compare``: the paper's method comparison on one budget, over seeds.

For each seed: a shared stage first (``shared/``: prompts, teacher responses, the initial student
and its optional SFT warm-up); then every method -- a loss name, or a named variant with config
overrides (the ablations) -- runs the same rounds from that same initial student, on the same
prompts and teacher responses with the same step budget (``<method>/``, an ordinary resumable run
directory); then teacher, initial student and every method's student are evaluated on each
held-out set (``compare.eval_sets``, default ``eval.prompts``): ROUGE-L of greedy outputs against
the teacher's greedy outputs (primary metric), KL(teacher || student) on the teacher's responses,
and whatever else the held-out evaluation reports. Without ``seeds`` the layout is
``OUT/<method>``; with them, ``OUT/seed-<s>/<method>`` (so running some seeds first and the rest
later reuses what is done). Results: ``OUT/results.json``, ``OUT/results.md`` (each
metric's mean and 95% interval over seeds; a paired test of every method against the best
baseline), ``OUT/metrics.png``, ``OUT/curves.png``. Re-running the command continues where it
stopped.
"""

from __future__ import annotations

import copy
import dataclasses
import json
import shutil
from pathlib import Path

from distillm2.config import CompareConfig, ConfigError, RunConfig, load_config, to_dict
from distillm2.evaluation.held_out import evaluate_models
from distillm2.evaluation.metrics import rouge_l_scores
from distillm2.evaluation.report import models_table, write_held_out
from distillm2.files import atomic_dir, atomic_path, read_jsonl
from distillm2.losses import LOSSES, topk_unsupported
from distillm2.pipeline import Run
from distillm2.progress import logger
from distillm2.stats import mean_interval, paired_bootstrap


def _method_configs(cfg: CompareConfig, root: Path, seed: int) -> dict[str, RunConfig]:
    base = {k: v for k, v in to_dict(cfg).items() if k not in ("methods", "variants", "seeds", "eval_sets")}
    base.update(sft_epochs=0.0)
    base["eval"]["prompts"] = None  # evaluated together at the end, against one teacher
    base["models"].update(student=None, student_layers=None, student_num_layers=None)
    base["train"]["seed"] = seed
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
        if data["train"].get("teacher_topk") and topk_unsupported(loss):
            data["train"]["teacher_topk"] = 0  # the cache serves the methods that read the teacher on chosen rows
        data["output_dir"] = str(root / entry["name"])
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


def _slug(source: str) -> str:
    return "".join(c if c.isalnum() or c in "-_" else "-" for c in source)


def _one_seed(cfg: CompareConfig, root: Path, seed: int, sets: list[str], force: bool):
    """Train every method for ``seed`` under ``root`` and evaluate them on every held-out set;
    returns ({set: {model: metrics}}, {set: {model: {prompt id: ROUGE-L}}}, methods, shared Run)."""
    methods = _method_configs(cfg, root, seed)
    shared_cfg = RunConfig(**{f.name: getattr(cfg, f.name) for f in dataclasses.fields(RunConfig)})
    shared_cfg = dataclasses.replace(shared_cfg, output_dir=str(root / "shared"), rounds=0,
                                     eval=dataclasses.replace(cfg.eval, prompts=None),
                                     train=dataclasses.replace(cfg.train, seed=seed))
    shared = Run(shared_cfg, force=force)
    shared.execute()  # prompts, teacher responses, initial student (+ SFT warm-up) -> shared/final
    for name, method_cfg in methods.items():
        _seed(Path(method_cfg.output_dir), root / "shared")
        logger.info("compare: seed %d, method %s", seed, name)
        Run(method_cfg, teacher=shared.teacher, force=force, topk_dir=root / "shared" / "teacher-topk").execute()
    candidates = {"teacher": None, "initial": root / "shared" / "final"}
    candidates.update({name: Path(c.output_dir) / "final" for name, c in methods.items()})
    results, per_prompt = {}, {}
    for source in sets:
        folder = root / "eval" if len(sets) == 1 else root / "eval" / _slug(source)
        results[source] = evaluate_models(candidates, teacher=shared.teacher, teacher_source=cfg.models.teacher,
                                          tokenizer=shared.tokenizer, vocab=shared.vocab,
                                          eval_cfg=dataclasses.replace(cfg.eval, prompts=source),
                                          generation=shared.cfg.generation, out_dir=folder, accelerator=shared.acc,
                                          seed=seed, max_prompt_length=cfg.data.max_prompt_length)
        per_prompt[source] = _per_prompt_rouge(folder, list(candidates))
    return results, per_prompt, methods, shared


def _per_prompt_rouge(folder: Path, names: list[str]) -> dict[str, dict[str, float]]:
    reference = {r["id"]: r["response"] for r in read_jsonl(folder / "teacher.greedy.jsonl")}
    out = {}
    for name in names:
        answers = {r["id"]: r["response"] for r in read_jsonl(folder / f"{name}.greedy.jsonl")}
        ids = [i for i in reference if i in answers]
        out[name] = dict(zip(ids, rouge_l_scores([answers[i] for i in ids], [reference[i] for i in ids])))
    return out


def aggregate(per_seed: dict[int, dict], per_prompt: dict[int, dict], methods: dict[str, RunConfig]) -> dict:
    """Per held-out set: each model's metrics as the mean over seeds (with ``<metric>_ci95``, the
    95% t interval over seeds, when there are several), and a paired test (ROUGE-L per prompt, averaged
    over seeds) of every method against the best baseline: the best mean ROUGE-L among the
    methods whose loss is not distillm2."""
    seeds = sorted(per_seed)
    summary = {}
    for source in per_seed[seeds[0]]:
        table = {}
        for model, first in per_seed[seeds[0]][source].items():
            if len(seeds) == 1:  # one seed: the metrics as they are (intervals over prompts)
                table[model] = dict(first)
                continue
            table[model] = {}
            for key, value in first.items():
                if not isinstance(value, (int, float)) or isinstance(value, bool):
                    continue
                mean, low, high = mean_interval([per_seed[s][source][model][key] for s in seeds])
                table[model][key] = mean
                if key != "n":
                    table[model][f"{key}_ci95"] = [low, high]  # over seeds
        baselines = [m for m, c in methods.items() if c.loss.name != "distillm2"]
        best = max(baselines, key=lambda m: table[m]["rouge_l"]) if baselines else None
        tests = {}
        if best is not None:
            ids = sorted(per_prompt[seeds[0]][source][best])
            for model in methods:
                if model == best:
                    continue
                a = [sum(per_prompt[s][source][model][i] for s in seeds) / len(seeds) for i in ids]
                b = [sum(per_prompt[s][source][best][i] for s in seeds) / len(seeds) for i in ids]
                tests[model] = paired_bootstrap(a, b)
        summary[source] = {"models": table, "best_baseline": best, "paired_vs_best_baseline": tests}
    return summary


def _tests_markdown(source: str, summary: dict) -> str:
    lines = [f"\n## {source}\n", models_table(summary["models"]), ""]
    if summary["best_baseline"]:
        lines += [f"Paired test of ROUGE-L per prompt (mean over seeds) against the best baseline, "
                  f"{summary['best_baseline']}:", "", "| method | mean difference | 95% interval | p |",
                  "|---|---|---|---|"]
        for model, t in summary["paired_vs_best_baseline"].items():
            lines.append(f"| {model} | {t['mean_diff']:+.4f} | [{t['ci95'][0]:+.4f}, {t['ci95'][1]:+.4f}] | "
                         f"{t['p_value']:.3f} |")
    return "\n".join(lines) + "\n"


def compare(cfg: CompareConfig, force: bool = False) -> dict:
    """Train every method and variant of ``cfg`` from one initial student on one budget, for
    each of ``cfg.seeds``; evaluate all of them with the teacher and the initial student on each
    held-out set; write ``results.json``, ``results.md``, ``metrics.png`` and ``curves.png``;
    returns the report."""
    out = Path(cfg.output_dir)
    seeds = cfg.seeds or [cfg.train.seed]
    sets = cfg.eval_sets or [cfg.eval.prompts]
    per_seed, per_prompt, methods, shared = {}, {}, {}, None
    for seed in seeds:
        root = out / f"seed-{seed}" if cfg.seeds else out  # per seed: a subset of seeds can run first
        per_seed[seed], per_prompt[seed], methods, shared = _one_seed(cfg, root, seed, sets, force)
    summary = aggregate(per_seed, per_prompt, methods)
    report = {"models": summary[sets[0]]["models"], "sets": summary, "seeds": seeds, "methods": list(methods),
              "rounds": cfg.rounds, "steps_per_round": _steps(methods), "per_seed": per_seed,
              "config": to_dict(cfg)}
    if shared.main:
        table = write_held_out(report, out, "results.md", f"Method comparison ({out})",
                               f"{sets[0]}: ROUGE-L vs teacher (higher better), KL on teacher responses "
                               f"(lower better){f', mean of {len(seeds)} seeds' if len(seeds) > 1 else ''}")
        with open(out / "results.md", "a", encoding="utf-8") as fh:
            fh.write("".join(_tests_markdown(source, s) for source, s in summary.items()))
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
    with atomic_path(path) as tmp:  # its folder made; never a half-written PNG
        fig.savefig(tmp, dpi=100, format="png")
    plt.close(fig)
