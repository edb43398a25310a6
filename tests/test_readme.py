"""The README's quick start is exactly two commands, and both are the ones that are run."""

import re
import shlex
import subprocess
import sys
from pathlib import Path

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


def test_main_command_job_runs(tmp_path):
    """Runs the main command's job (the part after the install, which CI's own install covers)
    on the small sizes; the full sizes are what docs/results.md reports."""
    job = shlex.split(quick_start_commands()[0].split(" && ")[-1])
    assert job[:2] == ["python", "benchmarks/losses.py"]
    out = tmp_path / "losses.json"
    result = subprocess.run([sys.executable, *job[1:], "--quick", "--repeats", "1", "--out", str(out)],
                            cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr
    assert "naive" in result.stdout and out.exists() and out.with_suffix(".png").exists()
