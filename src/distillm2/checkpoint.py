"""Checkpoints of a training stage: ``STAGE/checkpoint/`` holds accelerate's ``save_state``
(model, optimiser, RNG states) and ``state.json`` (step, curriculum anchors, LR scheduler).

Saving writes ``checkpoint.tmp`` on all ranks and renames it on the main process, so a crash
mid-save leaves the previous checkpoint intact. Loading also cuts ``metrics.jsonl`` back to the
checkpoint's step, so replayed steps are not logged twice.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

from distillm2.files import write_text_atomic


def checkpoint_dir(stage_dir: Path) -> Path:
    """Where a stage keeps its checkpoint."""
    return Path(stage_dir) / "checkpoint"


def load_checkpoint(accelerator, stage_dir: Path, scheduler) -> dict | None:
    """Restore the prepared objects, RNG states and ``scheduler`` from the stage's checkpoint;
    returns its state dict (``step``, ...) or None when there is none."""
    folder = checkpoint_dir(stage_dir)
    state_file = folder / "state.json"
    if not state_file.exists():
        return None
    state = json.loads(state_file.read_text())
    accelerator.load_state(str(folder))
    scheduler.load_state_dict(state.pop("scheduler"))
    cut_metrics(accelerator, stage_dir, state["step"])
    return state


def cut_metrics(accelerator, stage_dir: Path, step: int) -> None:
    """Drop the lines of ``metrics.jsonl`` logged after ``step``: the checkpoint a stage resumes
    from, or 0 when it starts without one (a process killed before its first checkpoint logged
    steps it trains again)."""
    metrics = Path(stage_dir) / "metrics.jsonl"
    if accelerator.is_main_process and metrics.exists():
        lines = metrics.read_text().splitlines(keepends=True)
        kept = [ln for ln in lines if ln.endswith("\n") and json.loads(ln)["step"] <= step]
        if len(kept) != len(lines):
            write_text_atomic(metrics, "".join(kept))


def save_checkpoint(accelerator, stage_dir: Path, state: dict, scheduler) -> None:
    """Save the prepared objects and ``state`` (plus the scheduler's state) atomically."""
    stage_dir = Path(stage_dir)
    tmp = stage_dir / "checkpoint.tmp"
    if accelerator.is_main_process:
        shutil.rmtree(tmp, ignore_errors=True)
    accelerator.wait_for_everyone()
    accelerator.save_state(str(tmp))
    accelerator.wait_for_everyone()
    if accelerator.is_main_process:
        write_text_atomic(tmp / "state.json", json.dumps(dict(state, scheduler=scheduler.state_dict())))
        target, old = checkpoint_dir(stage_dir), stage_dir / "checkpoint.old"
        shutil.rmtree(old, ignore_errors=True)
        if target.exists():
            target.rename(old)
        tmp.rename(target)
        shutil.rmtree(old, ignore_errors=True)
    accelerator.wait_for_everyone()


def remove_checkpoint(stage_dir: Path) -> None:
    """A finished stage whose model is saved no longer needs its optimiser state."""
    shutil.rmtree(checkpoint_dir(stage_dir), ignore_errors=True)
