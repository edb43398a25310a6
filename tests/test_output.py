"""Default output: our own bar per stage, none of the libraries' bars or routine warnings (-v
shows them)."""

import os
import subprocess
import sys
from pathlib import Path

import yaml
from conftest import tiny_config

THIRD_PARTY = ("Loading weights", "Writing model shards", "Removed shared tensor")


def _cli(args, tmp_path):
    exe = Path(sys.executable).with_name("distillm2")
    env = dict(os.environ, HF_HUB_OFFLINE="1", TRANSFORMERS_OFFLINE="1", DISTILLM2_CACHE=str(tmp_path / "cache"))
    return subprocess.run([str(exe), *args], capture_output=True, text=True, timeout=600, env=env)


def test_run_output_has_our_bars_only(tiny, tmp_path):
    """A two-round run with checkpoints (saves of a tied-embedding student, which accelerate
    reports as "Removed shared tensor" at every save) and a final save: no third-party line."""
    from tiny import make_model, make_tokenizer

    tok = make_tokenizer(tmp_path / "tok")
    teacher = make_model(tmp_path / "teacher", tok, layers=4, seed=0)
    teacher.config.tie_word_embeddings = True
    teacher.tie_weights()
    teacher.save_pretrained(tmp_path / "teacher")
    cfg = tiny_config(tiny, tmp_path / "run", rounds=1)
    cfg["models"]["teacher"] = str(tmp_path / "teacher")
    path = tmp_path / "run.yaml"
    path.write_text(yaml.safe_dump(cfg))
    quiet = _cli(["run", str(path)], tmp_path)
    assert quiet.returncode == 0, quiet.stderr[-3000:]
    assert "train round-1" in quiet.stderr  # our bar
    for text in THIRD_PARTY:
        assert text not in quiet.stderr + quiet.stdout, text
    loud = _cli(["run", str(path), "--output-dir", str(tmp_path / "run-v"), "-v"], tmp_path)
    assert loud.returncode == 0, loud.stderr[-3000:]
    for text in THIRD_PARTY:  # -v: the libraries speak again (so the quiet run did hide them)
        assert text in loud.stderr + loud.stdout, text
