"""Metrics: ROUGE-L against reference outputs and teacher-forced KL / NLL on teacher responses,
and the evaluation a run ends with (teacher, SFT student, distilled student on held-out prompts).

ROUGE-L (``rouge-score``, F-measure, stemming on) compares greedy outputs with references -- here
the teacher's greedy outputs, so it measures how closely the student reproduces its teacher.
``kl_teacher_responses`` is the mean per-token KL(teacher || student) over the teacher's greedy
responses (token-weighted over the whole set), computed with the chunked losses; ``nll`` the
student's mean per-token negative log-likelihood of the same tokens. Lower is better for both.
"""

from __future__ import annotations

import json
from pathlib import Path

import torch

from distillm2.data import collate, encode, write_jsonl, write_text_atomic
from distillm2.losses import forward_kl, token_cross_entropy
from distillm2.progress import progress_bar


def rouge_l_scores(predictions: list[str], references: list[str]) -> list[float]:
    """ROUGE-L F-measure (0..1) of each prediction against its reference."""
    from rouge_score import rouge_scorer

    if len(predictions) != len(references):
        raise ValueError(f"{len(predictions)} predictions but {len(references)} references")
    if not predictions:
        raise ValueError("rouge_l: no predictions")
    scorer = rouge_scorer.RougeScorer(["rougeL"], use_stemmer=True)
    return [scorer.score(r, p)["rougeL"].fmeasure for p, r in zip(predictions, references)]


def rouge_l(predictions: list[str], references: list[str]) -> float:
    """Mean ROUGE-L F-measure (0..1) of predictions against references (pairwise)."""
    scores = rouge_l_scores(predictions, references)
    return sum(scores) / len(scores)


def bootstrap_ci(values: list[float], samples: int = 2000, level: float = 0.95, seed: int = 0) -> tuple[float, float]:
    """Percentile bootstrap confidence interval of the mean of ``values`` (prompts resampled)."""
    gen = torch.Generator().manual_seed(seed)
    data = torch.tensor(values, dtype=torch.float64)
    idx = torch.randint(0, len(values), (samples, len(values)), generator=gen)
    means = data[idx].mean(1).sort().values
    lo = int((1 - level) / 2 * samples)
    return float(means[lo]), float(means[samples - 1 - lo])


@torch.no_grad()
def teacher_forced_kl(student, teacher, tokenizer, prompts: list[dict], responses: list[dict],
                      vocab: int, batch_size: int = 8, max_prompt_length=512, max_length=1024,
                      desc="kl") -> dict:
    """Token-weighted mean KL(teacher || student) and student NLL on ``responses`` (rows with
    ``id``, ``response``, ``finish_reason``), joined to ``prompts`` by id."""
    by_id = {p["id"]: p for p in prompts}
    rows = [encode(tokenizer, by_id[r["id"]]["messages"], r["response"], r.get("finish_reason") == "stop",
                   max_prompt_length, max_length) for r in responses if r["id"] in by_id]
    rows = [r for r in rows if r.response_ids]
    device = next(student.parameters()).device
    kl_sum = nll_sum = 0.0
    tokens = 0
    student.eval()
    teacher.eval()
    with progress_bar(total=len(rows), desc=desc, unit="row") as bar:
        for i in range(0, len(rows), batch_size):
            batch = collate(rows[i : i + batch_size], tokenizer.pad_token_id).to(device)
            args = dict(input_ids=batch.input_ids, attention_mask=batch.attention_mask,
                        position_ids=batch.position_ids, logits_to_keep=batch.keep, use_cache=False)
            s = student(**args).logits[..., :vocab]
            t = teacher(**args).logits[..., :vocab]
            kl_sum += float(forward_kl(s, t, batch.mask).sum())
            nll_sum += float(token_cross_entropy(s, batch.labels, batch.mask).sum())
            tokens += batch.num_tokens
            bar.update(len(rows[i : i + batch_size]))
    if tokens == 0:
        raise ValueError("teacher_forced_kl: no response tokens to score")
    return {"forward_kl": kl_sum / tokens, "nll": nll_sum / tokens, "tokens": tokens}


def format_table(models: dict[str, dict], better: dict[str, str] | None = None) -> str:
    """A markdown table: one row per model, one column per metric."""
    metrics = sorted({m for values in models.values() for m in values})
    better = better or {}
    head = "| model | " + " | ".join(f"{m} {better.get(m, '')}".strip() for m in metrics) + " |"
    lines = [head, "|---" * (len(metrics) + 1) + "|"]
    for name, values in models.items():
        cells = [_cell(values.get(m, "")) for m in metrics]
        lines.append(f"| {name} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


def _cell(value) -> str:
    if isinstance(value, float):
        return f"{value:.4f}"
    if isinstance(value, (list, tuple)) and len(value) == 2:
        return f"[{value[0]:.3f}, {value[1]:.3f}]"
    return str(value)


def bar_plot(models: dict[str, dict], metrics: list[str], path: Path, title: str) -> None:
    """One bar chart per metric, with the 95% bootstrap interval where there is one. The teacher
    is left out: against its own outputs it scores ROUGE-L 1 and KL 0 by definition."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, len(metrics), figsize=(4.8 * len(metrics), 4.0))
    axes = [axes] if len(metrics) == 1 else axes
    names = [n for n in models if n != "teacher"]
    for ax, metric in zip(axes, metrics):
        values = [models[n].get(metric, float("nan")) for n in names]
        errors = None
        if all(f"{metric}_ci95" in models[n] for n in names):
            errors = [[v - models[n][f"{metric}_ci95"][0] for n, v in zip(names, values)],
                      [models[n][f"{metric}_ci95"][1] - v for n, v in zip(names, values)]]
        ax.bar(range(len(names)), values, yerr=errors, capsize=3, color=[f"C{i}" for i in range(len(names))])
        ax.set_xticks(range(len(names)), names, rotation=30, ha="right", fontsize=8)
        ax.set_title(metric + (" (95% CI)" if errors else ""))
        for i, v in enumerate(values):
            ax.text(i, v, f"{v:.3f}", ha="center", va="bottom", fontsize=7)
    fig.suptitle(title, fontsize=10)
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)


def evaluate_models(run, cfg, candidates: dict, out_dir: Path) -> dict:
    """ROUGE-L against the teacher's greedy outputs and KL / NLL on them, per candidate model
    (None = the teacher itself). Greedy outputs are cached in ``out_dir``."""
    from distillm2 import models as M
    from distillm2.data import load_prompts

    prompts = load_prompts(cfg.eval.prompts, limit=cfg.eval.max_prompts)
    if run.main:
        write_jsonl(out_dir / "prompts.jsonl", prompts)
    outputs, loaded = {}, {}
    for name, path in candidates.items():
        model = run.teacher if path is None else M.load_model(str(path), "float32").to(run.acc.device)
        loaded[name] = model
        outputs[name] = run.generate(model, out_dir / f"{name}.greedy.jsonl", f"eval/{name}", greedy=True,
                                     prompts=prompts, max_new_tokens=cfg.eval.max_new_tokens)
    reference = {r["id"]: r["response"] for r in outputs["teacher"]}
    results = {}
    for name, path in candidates.items():
        preds = {r["id"]: r["response"] for r in outputs[name]}
        ids = [i for i in reference if i in preds]
        scores = rouge_l_scores([preds[i] for i in ids], [reference[i] for i in ids])
        low, high = bootstrap_ci(scores)
        results[name] = {"rouge_l": sum(scores) / len(scores), "rouge_l_ci95": [low, high], "n": len(ids)}
        if path is None:
            results[name].update(kl_teacher_responses=0.0)
            continue
        cache = out_dir / f"{name}.kl.json"
        if cache.exists():
            kl = json.loads(cache.read_text())
        else:
            kl = teacher_forced_kl(loaded[name], run.teacher, run.tokenizer, prompts, outputs["teacher"],
                                   run.vocab, batch_size=cfg.eval.batch_size, desc=f"kl {name}")
            if run.main:
                write_text_atomic(cache, json.dumps(kl))
        results[name].update(kl_teacher_responses=kl["forward_kl"], nll_teacher_responses=kl["nll"])
    return results


def evaluate_run(run, cfg) -> dict:
    """Teacher, SFT student (if the run had a warm-up) and distilled student on the held-out
    prompts. Writes RUN/eval/{results.json, report.md, metrics.png} and returns the results."""
    out_dir = run.dir / "eval"
    candidates = {"teacher": None}
    if (run.dir / "sft" / "model").exists():
        candidates["student_sft"] = run.dir / "sft" / "model"
    candidates["student"] = run.dir / "final"
    results = evaluate_models(run, cfg, candidates, out_dir)
    report = {"models": results, "prompts": cfg.eval.prompts, "n_prompts": next(iter(results.values()))["n"]}
    if run.main:
        write_text_atomic(out_dir / "results.json", json.dumps(report, indent=2))
        table = format_table({k: {m: v for m, v in r.items() if m != "n"} for k, r in results.items()},
                             {"rouge_l": "(higher better)", "kl_teacher_responses": "(lower better)",
                              "nll_teacher_responses": "(lower better)"})
        write_text_atomic(out_dir / "report.md", f"# Evaluation of {run.dir}\n\n{table}\n")
        bar_plot(results, ["rouge_l", "kl_teacher_responses"], out_dir / "metrics.png",
                 "held-out prompts (ROUGE-L higher, KL lower is better)")
        print(f"\nevaluation on {report['n_prompts']} held-out prompts ({out_dir}):\n{table}", flush=True)
    return report
