"""The student as a speculative-decoding draft for its teacher (DistiLLM-2 §5.4).

Greedy teacher decoding with transformers' assisted generation (``assistant_model=draft``),
batch size 1, against the teacher alone on the same prompts: the acceptance rate (draft tokens the
teacher accepted / draft tokens proposed) and the wall-clock speed-up. Assisted greedy decoding must
reproduce the teacher's greedy output exactly; every prompt is checked and mismatches reported.
Drafts are a constant ``num_assistant_tokens`` long with no confidence cut-off, so the acceptance
rate measures the draft, not transformers' adaptive heuristics.
"""

from __future__ import annotations

import contextlib
import time

import torch

from distillm2.data import prompt_token_ids
from distillm2.generation import sampling_kwargs
from distillm2.progress import progress_bar


@contextlib.contextmanager
def _count_acceptance():
    """Record (matches, drafted) per verification round. transformers exposes no counter, but
    calls ``update_candidate_strategy`` once per round with the number of accepted draft tokens;
    ``scores`` holds one more position than there were draft tokens."""
    from transformers.generation.candidate_generator import AssistedCandidateGenerator

    record = {"matches": 0, "drafted": 0, "rounds": 0}
    original = AssistedCandidateGenerator.update_candidate_strategy

    def wrapped(self, input_ids, scores, num_matches):
        record["matches"] += int(num_matches)
        record["drafted"] += int(scores.shape[1]) - 1
        record["rounds"] += 1
        return original(self, input_ids, scores, num_matches)

    AssistedCandidateGenerator.update_candidate_strategy = wrapped
    try:
        yield record
    finally:
        AssistedCandidateGenerator.update_candidate_strategy = original


@torch.no_grad()
def speculative_eval(teacher, draft, tokenizer, prompts: list[dict], max_new_tokens: int = 64,
                     num_assistant_tokens: int = 5, max_prompt_length: int | None = None) -> dict:
    """Acceptance rate and speed-up of ``draft`` for greedy ``teacher`` decoding on ``prompts``."""
    device = next(teacher.parameters()).device
    teacher.eval()
    draft.eval()
    gc = draft.generation_config
    gc.num_assistant_tokens = num_assistant_tokens
    gc.num_assistant_tokens_schedule = "constant"
    gc.assistant_confidence_threshold = 0.0
    common = dict(max_new_tokens=max_new_tokens, pad_token_id=tokenizer.pad_token_id,
                  **sampling_kwargs(True, 0.0, 1.0))

    def encode(p):
        ids = torch.tensor([prompt_token_ids(tokenizer, p["messages"], max_prompt_length)], device=device)
        return {"input_ids": ids, "attention_mask": torch.ones_like(ids)}

    warm = encode(prompts[0])  # first calls pay one-off costs: keep them out of the timing
    teacher.generate(**warm, **dict(common, max_new_tokens=4))
    teacher.generate(**warm, assistant_model=draft, **dict(common, max_new_tokens=4))

    base_time = assisted_time = 0.0
    mismatches = generated = 0
    with _count_acceptance() as record, progress_bar(len(prompts), "speculative", "prompt") as bar:
        record.update(matches=0, drafted=0, rounds=0)
        for p in prompts:
            ids = encode(p)
            start = time.perf_counter()
            base = teacher.generate(**ids, **common)
            base_time += time.perf_counter() - start
            start = time.perf_counter()
            assisted = teacher.generate(**ids, assistant_model=draft, **common)
            assisted_time += time.perf_counter() - start
            generated += base.shape[1] - ids["input_ids"].shape[1]
            if base.shape != assisted.shape or not torch.equal(base, assisted):
                mismatches += 1
            bar.update(1)
    return {
        "acceptance_rate": record["matches"] / record["drafted"] if record["drafted"] else float("nan"),
        "speedup": base_time / assisted_time if assisted_time else float("nan"),
        "n": len(prompts),
        "identical_outputs": len(prompts) - mismatches,
        "drafted_tokens": record["drafted"],
        "accepted_tokens": record["matches"],
        "teacher_tokens_per_s": generated / base_time if base_time else float("nan"),
        "num_assistant_tokens": num_assistant_tokens,
    }
