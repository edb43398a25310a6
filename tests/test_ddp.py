"""Two CPU processes (gloo) give the same parameters after 2 steps as one process with the same
global batch; the run must really be distributed (a plain torchrun without ACCELERATE_USE_CPU
would start two independent processes that also "agree")."""

import json
import os
import subprocess
import sys

import torch
import yaml
from safetensors.torch import load_file

from distillm2.data import make_pairs
from distillm2.files import read_jsonl, write_jsonl


def _pairs(tiny, path):
    prompts = [{"id": f"p{i}", "messages": [{"role": "user", "content": r["prompt"]}]}
               for i, r in enumerate(read_jsonl(tiny / "prompts.jsonl"))][:8]
    teacher = [{"id": p["id"], "response": f"answer {i} is here", "finish_reason": "stop"} for i, p in enumerate(prompts)]
    student = [{"id": p["id"], "response": f"maybe {i} apples", "finish_reason": "length"} for i, p in enumerate(prompts)]
    pairs, _ = make_pairs(prompts, teacher, student)
    write_jsonl(path, pairs)


def _config(tiny, tmp_path, name, batch_size):
    cfg = {
        "pairs": str(tmp_path / "pairs.jsonl"),
        "output_dir": str(tmp_path / name),
        "models": {"teacher": str(tiny / "teacher"), "student": str(tiny / "student"),
                   "dtype": "float32", "teacher_dtype": "float32"},
        "data": {"max_prompt_length": 96, "max_length": 128},
        "train": {"lr": 1e-2, "batch_size": batch_size, "grad_accum": 1, "mixed_precision": "no",
                  "warmup_ratio": 0.0, "lr_schedule": "constant"},
        "loss": {"name": "distillm2"},
    }
    path = tmp_path / f"{name}.yaml"
    path.write_text(yaml.safe_dump(cfg))
    return path


def test_two_processes_equal_one_with_the_same_global_batch(tiny, tmp_path):
    _pairs(tiny, tmp_path / "pairs.jsonl")
    env = dict(os.environ, HF_HUB_OFFLINE="1", TRANSFORMERS_OFFLINE="1", OMP_NUM_THREADS="1")
    one = subprocess.run([sys.executable, "-m", "distillm2.cli", "train", str(_config(tiny, tmp_path, "one", 4))],
                         env=env, capture_output=True, text=True, timeout=600)
    assert one.returncode == 0, one.stderr[-3000:]
    two = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2",
                          "-m", "distillm2.cli", "train", str(_config(tiny, tmp_path, "two", 2))],
                         env=dict(env, ACCELERATE_USE_CPU="1"), capture_output=True, text=True, timeout=600)
    assert two.returncode == 0, two.stderr[-3000:]

    info = json.loads((tmp_path / "two" / "train" / "train_info.json").read_text())
    assert info["num_processes"] == 2 and "MULTI_CPU" in info["distributed_type"]
    assert info["steps"] == 2
    assert json.loads((tmp_path / "one" / "train" / "train_info.json").read_text())["num_processes"] == 1

    a = load_file(str(tmp_path / "one" / "final" / "model.safetensors"))
    b = load_file(str(tmp_path / "two" / "final" / "model.safetensors"))
    init = load_file(str(tiny / "student" / "model.safetensors"))
    moved = max((a[k] - init[k]).abs().max().item() for k in a)
    assert moved > 1e-3  # the steps did something
    for key in a:
        torch.testing.assert_close(a[key], b[key], rtol=0, atol=5e-5, msg=key)
