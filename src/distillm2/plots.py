"""``distillm2 plot RUN``: the training curves of any run directory in one PNG -- the loss and
its terms, the curriculum's alphas, beta, the learning rate, the gradient norm and tokens/s
against the optimiser step, stages one after the other (warm-up, then each round)."""

from __future__ import annotations

from pathlib import Path

from distillm2.errors import DataError
from distillm2.files import atomic_path, read_jsonl

PANELS = (
    ("loss", ("loss", "skl", "srkl", "nll", "chosen", "rejected")),
    ("alpha (curriculum)", ("alpha_chosen_mean", "alpha_rejected_mean", "alpha_chosen_min", "alpha_chosen_max")),
    ("beta", ("beta",)),
    ("learning rate", ("lr",)),
    ("gradient norm", ("grad_norm",)),
    ("tokens/s", ("tokens_per_s",)),
)


def stages(run_dir: Path) -> list[tuple[str, list[dict]]]:
    """(stage name, metrics rows) of every stage that logged, in training order."""
    names = ["sft", "train"] + sorted((p.name for p in run_dir.glob("round-*")), key=lambda n: int(n.split("-")[1]))
    found = []
    for name in names:
        path = run_dir / name / "metrics.jsonl"
        if path.exists():
            rows = read_jsonl(path)
            if rows:
                found.append((name, rows))
    return found


def plot_run(run_dir: str | Path, output: str | Path | None = None) -> Path:
    """Draw ``run_dir``'s curves into ``output`` (default ``RUN/curves.png``); returns the path."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    run_dir = Path(run_dir)
    found = stages(run_dir)
    if not found:
        raise DataError(f"{run_dir}: no metrics.jsonl in sft/, train/ or round-*/ (not a run directory, or nothing "
                        "trained yet)")
    output = Path(output) if output else run_dir / "curves.png"
    fig, axes = plt.subplots(2, 3, figsize=(14, 7))
    offset, boundaries = 0, []
    for stage, rows in found:
        steps = [offset + r["step"] for r in rows]
        for ax, (title, keys) in zip(axes.flat, PANELS):
            for key in keys:
                values = [r.get(key) for r in rows]
                if any(v is not None for v in values):
                    ax.plot(steps, [float("nan") if v is None else v for v in values], label=f"{stage} {key}",
                            linewidth=1)
            ax.set_title(title)
        offset = steps[-1]
        boundaries.append(offset)
    for ax in axes.flat:
        for b in boundaries[:-1]:
            ax.axvline(b, color="grey", linewidth=0.5, linestyle=":")
        ax.set_xlabel("optimiser step (stages in order)")
        if ax.get_legend_handles_labels()[0]:
            ax.legend(fontsize=6)
    fig.suptitle(f"{run_dir.name}: " + ", ".join(s for s, _ in found))
    fig.tight_layout()
    with atomic_path(output) as tmp:  # its folder made; never a half-written PNG
        fig.savefig(tmp, dpi=100, format="png")
    plt.close(fig)
    return output
