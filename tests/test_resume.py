"""Kill a real subprocess during generation and during training, rerun, and compare with an
uninterrupted run of the same seed."""

import os
import subprocess
import sys

import torch
import yaml
from conftest import tiny_config
from safetensors.torch import load_file


def _run_cli(cfg_path, crash=None):
    env = dict(os.environ, HF_HUB_OFFLINE="1", TRANSFORMERS_OFFLINE="1")
    env.pop("DISTILLM2_CRASH", None)
    if crash:
        env["DISTILLM2_CRASH"] = crash
    return subprocess.run([sys.executable, "-m", "distillm2.cli", "run", str(cfg_path)],
                          env=env, capture_output=True, text=True, timeout=600)


def _write(tiny, tmp_path, name):
    cfg = tiny_config(tiny, tmp_path / name, **{"train.grad_accum": 1, "train.checkpoint_every": 2})
    path = tmp_path / f"{name}.yaml"
    path.write_text(yaml.safe_dump(cfg))
    return path, tmp_path / name


def _weights(run_dir):
    return load_file(str(run_dir / "final" / "model.safetensors"))


def test_kill_during_generation_and_training_then_resume(tiny, tmp_path):
    ref_cfg, ref_dir = _write(tiny, tmp_path, "reference")
    result = _run_cli(ref_cfg)
    assert result.returncode == 0, result.stderr[-3000:]

    cfg, run_dir = _write(tiny, tmp_path, "crashy")
    # killed after the first batch of round 2's student generation (a partial student.jsonl)
    crashed = _run_cli(cfg, crash="round-2/student:1")
    assert crashed.returncode == -9
    partial = (run_dir / "round-2" / "student.jsonl").read_text().splitlines()
    assert 0 < len(partial) < 12
    assert not (run_dir / "final").exists()
    # killed in round 2's training after step 3 (the last checkpoint is at step 2)
    crashed = _run_cli(cfg, crash="round-2/train:3")
    assert crashed.returncode == -9
    state = yaml.safe_load((run_dir / "round-2" / "checkpoint" / "state.json").read_text())
    assert state["step"] == 2 and not state["finished"]
    resumed = _run_cli(cfg)
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    assert "resumed at step 2" in resumed.stderr

    for name in ("round-1/teacher.jsonl", "round-2/student.jsonl", "round-2/pairs.jsonl"):
        assert (run_dir / name).read_text() == (ref_dir / name).read_text(), name
    ours, ref = _weights(run_dir), _weights(ref_dir)
    assert ours.keys() == ref.keys()
    for key in ref:
        torch.testing.assert_close(ours[key], ref[key], rtol=0, atol=0, msg=key)
    # metrics were not duplicated by the replayed step
    steps = [yaml.safe_load(x)["step"] for x in (run_dir / "round-2" / "metrics.jsonl").read_text().splitlines()]
    assert steps == sorted(set(steps))


def test_rerun_of_finished_run_does_nothing(tiny, tmp_path):
    cfg, run_dir = _write(tiny, tmp_path, "done")
    assert _run_cli(cfg).returncode == 0
    before = (run_dir / "final" / "model.safetensors").stat().st_mtime_ns
    again = _run_cli(cfg)
    assert again.returncode == 0
    assert "train round" not in again.stderr and "round-1/teacher" not in again.stderr
    # issue 19, item 8: the rerun says so and where the model is (both runs name it)
    assert "already finished, nothing to redo" in again.stderr and f"the final model is {run_dir / 'final'}" in again.stderr
    assert (run_dir / "final" / "model.safetensors").stat().st_mtime_ns == before


def test_ctrl_c_prints_one_line_exits_130_and_the_same_command_continues(tiny, tmp_path):
    """Issue 19, item 8: a SIGINT in the middle of training (sent by the process to itself at
    a known step, as a Ctrl-C would arrive) ends with one line naming the command that
    continues, exit status 130 and no traceback; that command then finishes the run."""
    cfg, run_dir = _write(tiny, tmp_path, "interrupted")
    env_crash = "round-1/train:1"
    os.environ["DISTILLM2_CRASH_SIGNAL"] = "INT"
    try:
        stopped = _run_cli(cfg, crash=env_crash)
    finally:
        del os.environ["DISTILLM2_CRASH_SIGNAL"]
    assert stopped.returncode == 130, stopped.stderr[-3000:]
    assert "Traceback" not in stopped.stderr
    last = [ln for ln in stopped.stderr.replace("\r", "\n").splitlines() if ln.strip()][-1]
    assert "interrupted" in last and f"run {cfg}" in last
    assert not (run_dir / "final").exists()
    again = _run_cli(cfg)
    assert again.returncode == 0, again.stderr[-3000:]
    assert (run_dir / "final" / "config.json").exists()


def test_kill_before_the_first_checkpoint_logs_no_step_twice(tiny, tmp_path):
    """Issue 19, item 9: killed after step 1 with the first checkpoint due at step 2, the stage
    restarts from step 0 and metrics.jsonl is cut back first, so step 1 appears once."""
    cfg, run_dir = _write(tiny, tmp_path, "early")
    crashed = _run_cli(cfg, crash="round-1/train:1")
    assert crashed.returncode == -9
    assert [yaml.safe_load(x)["step"] for x in (run_dir / "round-1" / "metrics.jsonl").read_text().splitlines()] == [1]
    assert not (run_dir / "round-1" / "checkpoint").exists()
    assert _run_cli(cfg).returncode == 0
    steps = [yaml.safe_load(x)["step"] for x in (run_dir / "round-1" / "metrics.jsonl").read_text().splitlines()]
    assert steps == sorted(set(steps)) and steps[0] == 1
