"""The held-out evaluation a run ends with, and that ``compare`` runs over all its methods:
greedy outputs of every candidate on the held-out prompts, ROUGE-L against the teacher's greedy
outputs (with a 95% bootstrap interval) and KL / NLL on the teacher's responses.

The caller hands in the teacher it already holds (nothing is loaded twice) and the accelerator,
so the greedy outputs are split over the processes like any other generation.
"""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path

from distillm2 import distributed, models
from distillm2.config import GenerationConfig, RunEvalConfig
from distillm2.data import load_prompts
from distillm2.evaluation.metrics import rouge_summary, teacher_forced_kl
from distillm2.files import write_json_atomic, write_jsonl
from distillm2.generation import generate_responses


def evaluate_models(candidates: dict[str, Path | None], *, teacher, teacher_source: str, tokenizer, vocab: int,
                    eval_cfg: RunEvalConfig, generation: GenerationConfig, out_dir: Path, accelerator,
                    seed: int = 42, max_prompt_length: int = 512) -> dict[str, dict]:
    """ROUGE-L against the teacher's greedy outputs and KL / NLL on them, per candidate model
    directory (``None`` = the teacher itself). Greedy outputs and KL values are cached in
    ``out_dir``; returns ``{name: {"rouge_l", "rouge_l_ci95", "n", "kl_teacher_responses", ...}}``."""
    out_dir = Path(out_dir)
    main = accelerator.is_main_process
    prompts = load_prompts(eval_cfg.prompts, limit=eval_cfg.max_prompts)
    if main:
        write_jsonl(out_dir / "prompts.jsonl", prompts)
    settings = dataclasses.replace(generation, greedy=True, max_new_tokens=eval_cfg.max_new_tokens)
    outputs, loaded = {}, {}
    for name, path in candidates.items():
        with distributed.replicated_loading(accelerator):
            model = teacher if path is None else models.load_model(str(path), "float32").to(accelerator.device)
        loaded[name] = model
        outputs[name] = generate_responses(model, tokenizer, prompts, out_dir / f"{name}.greedy.jsonl", settings,
                                           seed=seed, max_prompt_length=max_prompt_length, accelerator=accelerator,
                                           desc=f"eval/{name}", source=teacher_source if path is None else
                                           (str(path) if (Path(path) / "config.json").exists() else None),
                                           role="teacher" if path is None else "student")
    reference = {r["id"]: r["response"] for r in outputs["teacher"]}
    results = {}
    for name, path in candidates.items():
        results[name] = rouge_summary({r["id"]: r["response"] for r in outputs[name]}, reference)
        if path is None:
            results[name].update(kl_teacher_responses=0.0)
            continue
        cache = out_dir / f"{name}.kl.json"
        if cache.exists():
            kl = json.loads(cache.read_text())
        else:
            kl = teacher_forced_kl(loaded[name], teacher, tokenizer, prompts, outputs["teacher"], vocab,
                                   batch_size=eval_cfg.batch_size, desc=f"kl {name}")
            if main:
                write_json_atomic(cache, kl, indent=None)
        results[name].update(kl_teacher_responses=kl["forward_kl"], nll_teacher_responses=kl["nll"])
    return results
