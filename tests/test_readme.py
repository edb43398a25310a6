"""The README's quick start is exactly two commands, and both are the ones that are run."""

import json
import os
import re
import shlex
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


def quick_start_commands():
    text = (ROOT / "README.md").read_text()
    section = text.split("## Quick start", 1)[1].split("\n## ", 1)[0]
    block = re.search(r"```bash\n(.*?)```", section, re.S).group(1)
    return [line for line in block.splitlines() if line.strip() and not line.startswith("#")]


def test_quick_start_is_two_commands_and_ci_runs_the_second():
    main_cmd, test_cmd = quick_start_commands()
    ci_lines = (ROOT / ".ci" / "run").read_text().strip().splitlines()
    assert ci_lines[-1] == test_cmd
    # both install the same way: the CPU torch pin in the same pip command as the package
    assert main_cmd.split(" && ")[:-1][0].startswith("pip install torch==2.13.0 -e .")
    assert main_cmd.split(" && ")[1] == test_cmd.split(" && ")[1]


@pytest.mark.slow
def test_main_command_job_runs(tmp_path):
    """The main command's job (`distillm2 demo`, the part after the install, which CI's own
    install covers), through the installed console script, on a reduced budget; the full-size
    run and its time are in docs/results.md."""
    job = shlex.split(quick_start_commands()[0].split(" && ")[-1])
    assert job == ["distillm2", "demo"]
    exe = Path(sys.executable).with_name("distillm2")
    small = ["data.max_prompts=8", "eval.max_prompts=4", "generation.max_new_tokens=8",
             "eval.max_new_tokens=8", "train.checkpoint_every=0"]
    result = subprocess.run([str(exe), "demo", "--output-dir", str(tmp_path / "demo"),
                             *[a for kv in small for a in ("--set", kv)]],
                            capture_output=True, text=True, timeout=900,
                            env=dict(os.environ, HF_HUB_OFFLINE="1", TRANSFORMERS_OFFLINE="1"))
    assert result.returncode == 0, result.stderr[-3000:]
    report = json.loads((tmp_path / "demo" / "eval" / "results.json").read_text())
    assert set(report["models"]) == {"teacher", "student_sft", "student"}
    for metrics in report["models"].values():
        assert {"rouge_l", "kl_teacher_responses"} <= set(metrics)
    assert "rouge_l" in result.stdout  # the table is printed
    assert (tmp_path / "demo" / "eval" / "metrics.png").exists()
    assert (tmp_path / "demo" / "round-2" / "model").exists()  # at least 2 DistiLLM-2 rounds
