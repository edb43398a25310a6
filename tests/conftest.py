"""Test-wide settings: nothing may reach a model hub (a stray call fails at once)."""
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).parent))

import os

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")

import pytest  # noqa: E402
from tiny import make_model, make_tokenizer, write_prompts  # noqa: E402


@pytest.fixture(scope="session")
def tiny(tmp_path_factory):
    """A tiny teacher (4 layers) and its tokenizer on disk, plus a prompt file."""
    root = tmp_path_factory.mktemp("tiny")
    tok = make_tokenizer(root / "tok")
    make_model(root / "teacher", tok, layers=4, seed=0)
    make_model(root / "student", tok, layers=2, seed=1)
    write_prompts(root / "prompts.jsonl", 12)
    return root


def tiny_config(tiny, out, **overrides):
    """A RunConfig dict for the tiny pair: float32, small batches, short responses."""
    cfg = {
        "output_dir": str(out),
        "rounds": 2,
        "sft_epochs": 0.0,
        "models": {"teacher": str(tiny / "teacher"), "student_num_layers": 2,
                   "dtype": "float32", "teacher_dtype": "float32"},
        "data": {"prompts": str(tiny / "prompts.jsonl"), "max_prompt_length": 96, "max_length": 128},
        "generation": {"max_new_tokens": 6, "batch_size": 4, "dtype": "float32"},
        "train": {"lr": 1e-3, "batch_size": 2, "grad_accum": 2, "mixed_precision": "no",
                  "checkpoint_every": 1, "warmup_ratio": 0.0},
        "eval": {"prompts": None},
    }
    for key, value in overrides.items():
        node = cfg
        *parents, last = key.split(".")
        for p in parents:
            node = node.setdefault(p, {})
        node[last] = value
    return cfg
