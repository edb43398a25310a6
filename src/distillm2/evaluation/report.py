"""Tables and plots of evaluation results (markdown for reports, PNG beside them)."""

from __future__ import annotations

from pathlib import Path

from distillm2.files import atomic_path, write_json_atomic, write_text_atomic

BETTER = {"rouge_l": "(higher better)", "kl_teacher_responses": "(lower better)",
          "nll_teacher_responses": "(lower better)", "teacher_nll_own_outputs": "(lower better)",
          "distinct_2": "(higher better)", "repeated_4gram_share": "(lower better)"}


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


def models_table(results: dict[str, dict]) -> str:
    """The held-out table of a run or a comparison (counts left out)."""
    return format_table({k: {m: v for m, v in r.items() if m != "n"} for k, r in results.items()}, BETTER)


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
    with atomic_path(path) as tmp:  # its folder made; never a half-written PNG
        fig.savefig(tmp, dpi=100, format="png")
    plt.close(fig)


def write_held_out(report: dict, folder: Path, markdown: str, heading: str, title: str) -> str:
    """Write a held-out report (``report["models"]`` holds the results): ``results.json``, the
    table as ``markdown`` under ``heading``, and ``metrics.png``; returns the table."""
    folder = Path(folder)
    write_json_atomic(folder / "results.json", report)
    table = models_table(report["models"])
    write_text_atomic(folder / markdown, f"# {heading}\n\n{table}\n")
    bar_plot(report["models"], ["rouge_l", "kl_teacher_responses"], folder / "metrics.png", title)
    return table


def format_results(report: dict) -> str:
    """The ``distillm2 eval`` report as a markdown table of task, metric, value."""
    lines = [f"model: {report['model']}" + (f"   teacher: {report['teacher']}" if report.get("teacher") else ""),
             "| task | metric | value |", "|---|---|---|"]
    for task, metrics in report["tasks"].items():
        for key, value in metrics.items():
            if isinstance(value, list) and len(value) == 2:
                lines.append(f"| {task} | {key} | [{value[0]:.4f}, {value[1]:.4f}] |")
            elif isinstance(value, float):
                lines.append(f"| {task} | {key} | {value:.4f} |")
            elif isinstance(value, int):
                lines.append(f"| {task} | {key} | {value} |")
    return "\n".join(lines)
