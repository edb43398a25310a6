"""The held-out evaluation a run ends with, and that ``compare`` runs over all its methods:
greedy outputs of every candidate on the held-out prompts, ROUGE-L against the teacher's greedy
outputs (with a 95% bootstrap interval), KL / NLL on the teacher's responses, and measures of
each candidate's own outputs (the teacher's NLL of them, distinct-2, repeated 4-grams).

The caller hands in the teacher it already holds (nothing is loaded twice) and the accelerator,
so the greedy outputs are split over the processes like any other generation. Every cached file
(``<name>.greedy.jsonl``, ``<name>.kl.json``, ``<name>.own.json``) carries a key of what
determines it (the candidate's and the teacher's fingerprints, decoding settings, lengths), so a
rerun after a model or a setting changed recomputes instead of reusing old numbers.
"""

from __future__ import annotations

import dataclasses
from pathlib import Path

from distillm2 import distributed, models
from distillm2.config import GenerationConfig, RunEvalConfig
from distillm2.data import load_prompts
from distillm2.evaluation.metrics import (
    own_metrics_from,
    own_output_metrics,
    rouge_summary,
    teacher_forced_kls,
)
from distillm2.files import write_json_atomic, write_jsonl
from distillm2.generation import generate_responses
from distillm2.identity import cache_key, claim, model_identity, read_keyed_json


def _stored(path: Path, key: str, value: dict, main: bool) -> dict:
    """``value`` with its cache ``key``, written to ``path`` by the main process."""
    value = {"key": key, **value}
    if main:
        write_json_atomic(path, value, indent=None)
    return value


def evaluate_models(candidates: dict[str, Path | None], *, teacher, teacher_source: str, tokenizer, vocab: int,
                    eval_cfg: RunEvalConfig, generation: GenerationConfig, out_dir: Path, accelerator,
                    seed: int = 42, max_prompt_length: int = 512) -> dict[str, dict]:
    """ROUGE-L against the teacher's greedy outputs, KL / NLL on them, and the measures of each
    candidate's own greedy outputs, per candidate model directory (``None`` = the teacher
    itself). Returns ``{name: {"rouge_l", "rouge_l_ci95", "n", "kl_teacher_responses",
    "nll_teacher_responses", "teacher_nll_own_outputs", "distinct_2", "repeated_4gram_share"}}``
    (the teacher has no NLL entry: its KL is 0 by definition)."""
    out_dir = Path(out_dir)
    main = accelerator.is_main_process
    prompts = load_prompts(eval_cfg.prompts, limit=eval_cfg.max_prompts)
    if main:
        write_jsonl(out_dir / "prompts.jsonl", prompts)
    settings = dataclasses.replace(generation, greedy=True, max_new_tokens=eval_cfg.max_new_tokens)
    decoding = {k: getattr(settings, k) for k in ("backend", "max_new_tokens", "greedy", "batch_size", "dtype")}
    teacher_param = next(teacher.parameters())
    identity = {name: model_identity(teacher_source if path is None else str(path))["fingerprint"]
                for name, path in candidates.items()}
    teacher_id = model_identity(teacher_source)["fingerprint"]
    keys = {name: cache_key(model=identity[name], decoding=decoding, seed=seed, max_prompt_length=max_prompt_length)
            for name in candidates}
    if main:
        for name in candidates:
            claim(out_dir / f"{name}.greedy.jsonl", keys[name])
    accelerator.wait_for_everyone()  # stale outputs are gone before any rank reads them
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
    scoring = {"teacher": teacher_id, "teacher_dtype": str(teacher_param.dtype), "device": teacher_param.device.type,
               "batch_size": eval_cfg.batch_size, "max_prompt_length": max_prompt_length}
    # The teacher's forward over its own greedy outputs serves every candidate's KL and the
    # teacher's own-output NLL: it runs once (teacher_forced_kls) for whatever is not cached.
    own_keys = {name: cache_key(outputs=keys[name], **scoring) for name in candidates}
    kl_keys = {name: cache_key(model=identity[name], outputs=keys["teacher"], **scoring)
               for name, path in candidates.items() if path is not None}
    own = {name: read_keyed_json(out_dir / f"{name}.own.json", key) for name, key in own_keys.items()}
    kl = {name: read_keyed_json(out_dir / f"{name}.kl.json", key) for name, key in kl_keys.items()}
    missing = [name for name in kl if kl[name] is None]
    lengths = {"batch_size": eval_cfg.batch_size, "max_prompt_length": max_prompt_length}
    if missing or own["teacher"] is None:
        kls, teacher_own = teacher_forced_kls({name: loaded[name] for name in missing}, teacher, tokenizer, prompts,
                                              outputs["teacher"], vocab, desc="kl " + ", ".join(missing or ["teacher"]),
                                              **lengths)
        for name in missing:
            kl[name] = _stored(out_dir / f"{name}.kl.json", kl_keys[name], kls[name], main)
        if own["teacher"] is None:
            own["teacher"] = _stored(out_dir / "teacher.own.json", own_keys["teacher"],
                                     own_metrics_from(tokenizer, outputs["teacher"], teacher_own), main)
    results = {}
    for name in candidates:
        if own[name] is None:
            own[name] = _stored(out_dir / f"{name}.own.json", own_keys[name], own_output_metrics(
                teacher, tokenizer, prompts, outputs[name], vocab, desc=f"own outputs {name}", **lengths), main)
        results[name] = rouge_summary({r["id"]: r["response"] for r in outputs[name]}, reference)
        results[name].update({k: own[name][k] for k in ("teacher_nll_own_outputs", "distinct_2",
                                                        "repeated_4gram_share")})
        if name in kl:
            results[name].update(kl_teacher_responses=kl[name]["forward_kl"], nll_teacher_responses=kl[name]["nll"])
        else:
            results[name].update(kl_teacher_responses=0.0)
    return results
