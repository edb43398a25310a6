"""The step benchmark's arithmetic and plot: FLOPs per step from a model config, the per-run
summary (medians after the warm-up) and the bar chart. Split from ``step.py`` (the driver) and
``step_workers.py`` (the measured processes); see ``step.py`` for what is measured and how."""

from __future__ import annotations

import os
import statistics
from pathlib import Path

from step_workers import STUDENT_LAYERS  # noqa: E402 - a sibling script: benchmarks/ is on sys.path


def flop_counts(cfg: dict) -> dict:
    h, inter, v = cfg["hidden_size"], cfg["intermediate_size"], cfg["vocab_size"]
    kv = cfg["num_key_value_heads"] * cfg.get("head_dim", h // cfg["num_attention_heads"])
    per_layer = 2 * h * h + 2 * h * kv + 3 * h * inter
    return {"per_layer": per_layer, "head": h * v, "teacher_layers": cfg["num_hidden_layers"],
            "student_layers": len(STUDENT_LAYERS)}


def step_flops(fc: dict, exec_tokens: int, lm: int, student_only_passes: int = 6, teacher_passes: int = 2) -> float:
    nt = fc["per_layer"] * fc["teacher_layers"]
    ns = fc["per_layer"] * fc["student_layers"]
    return (teacher_passes * (nt * exec_tokens + fc["head"] * lm)
            + student_only_passes * (ns * exec_tokens + fc["head"] * lm))


def summarize(name: str, results: list[dict], layouts: list[dict], warmup: int, fc: dict) -> dict:
    times, tok_rates, flop_rates, plain_rates = [], [], [], []
    for r in results:
        for i, t in enumerate(r["times"]):
            if i < warmup:
                continue
            lay = layouts[i] if "layout" not in r else r["layout"][i]
            times.append(t)
            tok_rates.append(lay["trained"] / t)
            flop_rates.append(step_flops(fc, lay["exec"], lay["lm"]) / t / 1e9)
            plain_rates.append(step_flops(fc, lay.get("plain_exec", lay["exec"]), lay.get("plain_lm", lay["lm"])) / t / 1e9)
    measured = [lay for i, lay in enumerate(layouts) if i >= warmup]
    return {
        "run": name, "s_per_step": statistics.median(times), "trained_tokens_per_s": statistics.median(tok_rates),
        "achieved_gflops": statistics.median(flop_rates),
        "plain_equivalent_gflops": statistics.median(plain_rates),
        "peak_rss_gib": max(r["peak_rss_kib"] for r in results) / 2**20,
        "peak_rss_gib_each": [r["peak_rss_kib"] / 2**20 for r in results],
        "median_s_each_run": [statistics.median(r["times"][warmup:]) for r in results],
        "steps_measured": len(times),
        "per_step_mean": {k: statistics.mean(lay[k] for lay in measured) for k in ("trained", "real", "exec", "lm")},
        "rows": measured[0]["rows"] if measured else None,
        "loss_first_last": [results[0]["losses"][0], results[0]["losses"][-1]],
        "details": {k: v for k, v in results[0].items() if k not in ("times", "losses", "layout")},
        "times_each_run": [r["times"] for r in results],
        "load_before_each_run": [r["load_before"] for r in results],
    }


def plot(rows: list[dict], path: Path, precision: str = "") -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    names = [r["run"] for r in rows]
    colors = ["#888888" if n.startswith("trl") else "#1f77b4" for n in names]
    fig, axes = plt.subplots(1, 3, figsize=(15, 4.2))
    for ax, key, title in zip(axes, ("s_per_step", "trained_tokens_per_s", "peak_rss_gib"),
                              ("seconds / step (median)", "trained tokens / s", "peak RSS (GiB)")):
        vals = [r[key] for r in rows]
        ax.bar(range(len(rows)), vals, color=colors)
        ax.set_xticks(range(len(rows)), names, rotation=30, ha="right", fontsize=8)
        ax.set_title(title)
        for i, v in enumerate(vals):
            ax.text(i, v, f"{v:.2f}" if v < 100 else f"{v:.0f}", ha="center", va="bottom", fontsize=8)
    fig.suptitle(f"One training step ({precision}), {os.cpu_count()} CPU cores: TRL GKDTrainer (grey) vs distillm2 "
                 "(blue); 8 prompts/step")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
