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
from distillm2.evaluation.identity import cache_key, claim, model_identity, read_keyed_json
from distillm2.evaluation.metrics import own_output_metrics, rouge_summary, teacher_forced_kl
from distillm2.files import write_json_atomic, write_jsonl
from distillm2.generation import generate_responses


def _cached_json(path: Path, key: str, compute, main: bool) -> dict:
    """The value cached in ``path`` for ``key``, else ``compute()`` (written by the main process)."""
    cached = read_keyed_json(path, key)
    if cached is not None:
        return cached
    value = {"key": key, **compute()}
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
    results = {}
    for name, path in candidates.items():
        results[name] = rouge_summary({r["id"]: r["response"] for r in outputs[name]}, reference)
        own = _cached_json(out_dir / f"{name}.own.json", cache_key(outputs=keys[name], **scoring),
                           lambda name=name: own_output_metrics(teacher, tokenizer, prompts, outputs[name], vocab,
                                                                batch_size=eval_cfg.batch_size,
                                                                max_prompt_length=max_prompt_length,
                                                                desc=f"own outputs {name}"), main)
        results[name].update({k: own[k] for k in ("teacher_nll_own_outputs", "distinct_2", "repeated_4gram_share")})
        if path is None:
            results[name].update(kl_teacher_responses=0.0)
            continue
        kl = _cached_json(out_dir / f"{name}.kl.json",
                          cache_key(model=identity[name], outputs=keys["teacher"], **scoring),
                          lambda name=name: teacher_forced_kl(loaded[name], teacher, tokenizer, prompts,
                                                              outputs["teacher"], vocab,
                                                              batch_size=eval_cfg.batch_size,
                                                              max_prompt_length=max_prompt_length,
                                                              desc=f"kl {name}"), main)
        results[name].update(kl_teacher_responses=kl["forward_kl"], nll_teacher_responses=kl["nll"])
    return results
