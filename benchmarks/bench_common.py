"""What the benchmark scripts share: peak resident memory of this process (VmHWM, which
``/proc/self/clear_refs`` resets to the current size) and a side-by-side bar chart."""

from __future__ import annotations

from pathlib import Path


def status_kib(field: str) -> int:
    """A ``/proc/self/status`` field in KiB (VmRSS, VmHWM, ...)."""
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(field + ":"):
            return int(line.split()[1])
    raise RuntimeError(f"{field} not in /proc/self/status")


def reset_peak() -> None:
    """Reset VmHWM to the current VmRSS, so the next peak is this measurement's."""
    Path("/proc/self/clear_refs").write_text("5")


def paired_bars(rows: list[dict], labels: list[str], series: list[tuple[str, str]], path, title: str,
                legend_panel: int = 0) -> None:
    """Two panels (time, peak extra memory), one pair of bars per row: ``series`` is
    ``[(key in the row, legend label), ...]`` of the two compared implementations."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    x = range(len(rows))
    fig, axes = plt.subplots(1, 2, figsize=(10, 4))
    for ax, key, panel in ((axes[0], "time_s", "forward + backward time (s)"),
                           (axes[1], "peak_extra_mib", "peak extra memory (MiB)")):
        for offset, (name, label) in zip((-0.2, 0.2), series):
            ax.bar([i + offset for i in x], [r[name][key] for r in rows], 0.4, label=label)
        ax.set_xticks(list(x), labels)
        ax.set_title(panel)
    axes[legend_panel].legend()
    fig.suptitle(title)
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)
