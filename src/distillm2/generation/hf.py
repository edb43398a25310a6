"""The Hugging Face backend: ``model.generate`` in batches of similar length, left-padded.

Every rank reads what is already done (all part files), takes every n-th unfinished batch of the
global plan and appends its rows to its own part file. A model whose parameters an engine shards
(DeepSpeed ZeRO-3, FSDP) runs in lockstep: every rank makes the same number of ``generate``
calls (a rank without a batch left repeats one and discards it) with ``synced_gpus=True``.
Image prompts (a vision-language model) pass their image inputs with the batch; the image
tokens are part of each left-padded prompt, so the new tokens start where they do for text.
"""

from __future__ import annotations

import math
import time
from pathlib import Path

import torch

from distillm2 import vision
from distillm2.data import end_of_turn_ids, prompt_inputs
from distillm2.errors import ConfigError
from distillm2.faults import maybe_crash
from distillm2.files import append_jsonl
from distillm2.generation.common import (
    all_paths,
    batch_seed,
    done_rows,
    part_path,
    plan_batches,
    response_row,
)
from distillm2.progress import progress_bar


def sampling_kwargs(greedy: bool, temperature: float, top_p: float) -> dict:
    """``generate`` keyword arguments for greedy decoding or plain temperature / top-p sampling,
    the one place the decoding settings become HF arguments. Everything the model's
    ``generation_config`` might add (top-k, repetition penalty, ...) is switched off, so samples
    come from the model's own distribution, as in the other backends. Temperature and top-p run
    as :class:`NucleusFromTopK`: the same nucleus as HF's warpers, without sorting the vocabulary."""
    neutral = dict(top_k=None, repetition_penalty=None, no_repeat_ngram_size=None, typical_p=None, min_p=None)
    if greedy:
        return dict(do_sample=False, temperature=None, top_p=None, **neutral)
    if top_p >= 1.0:
        return dict(do_sample=True, temperature=temperature, top_p=None, **neutral)
    from transformers import LogitsProcessorList

    # Custom processors run before HF's own warpers (temperature among them): the temperature is
    # applied inside ours, before the nucleus is found, as HF's order would.
    return dict(do_sample=True, temperature=None, top_p=None,
                logits_processor=LogitsProcessorList([NucleusFromTopK(top_p, temperature)]), **neutral)


class NucleusFromTopK:
    """Temperature, then top-p (nucleus) filtering of ``[B, V]`` scores that keeps exactly the
    tokens HF's ``TopPLogitsWarper`` keeps -- a token stays when the probability of the tokens
    ranked above it is below ``top_p`` -- found among the most likely tokens (``topk`` with k =
    64, then 1024, then 4096 for the rows whose nucleus is wider) instead of a sort of the whole
    vocabulary, which only rows wider still get, as in HF. On a 2-core CPU a full sort of a
    [64, 49152] batch costs 156 ms per new token (a fifth of a small student's sampling time),
    ``topk`` 6-30 ms. (Ties at the boundary may be broken differently and the cumulative sums
    round differently: the kept set can differ only for a token whose probability sits exactly
    on the threshold.)"""

    LADDER = (64, 1024, 4096)

    def __init__(self, top_p: float, temperature: float = 1.0):
        if not 0.0 < top_p < 1.0:
            raise ValueError(f"top_p must be in (0, 1), got {top_p}")
        self.top_p, self.temperature = top_p, temperature

    def __call__(self, input_ids, scores: torch.Tensor) -> torch.Tensor:
        """``scores / temperature`` with every token outside the nucleus set to -inf."""
        if self.temperature != 1.0:
            scores = scores / self.temperature
        probs = scores.float().softmax(-1)
        out = torch.full_like(scores, float("-inf"))
        todo = torch.arange(scores.shape[0], device=scores.device)
        for k in (*self.LADDER, scores.shape[-1]):
            k = min(k, scores.shape[-1])
            top, index = probs[todo].topk(k, dim=-1)  # k = V: a full sort
            done = (top.sum(-1) >= self.top_p) | (k == scores.shape[-1])
            keep = (top.cumsum(-1) - top) < self.top_p  # mass of the tokens ranked above each one
            rows, index, keep = todo[done], index[done], keep[done]
            out[rows] = out[rows].scatter(1, index, torch.where(keep, scores[rows].gather(1, index), float("-inf")))
            todo = todo[~done]
            if not len(todo):
                break
        return out


def eos_ids(model, tokenizer) -> list[int]:
    """Token ids that end a response: the chat template's end of turn, the tokenizer's end token
    and the model's."""
    ids = []
    gen_eos = getattr(getattr(model, "generation_config", None), "eos_token_id", None)
    for value in (end_of_turn_ids(tokenizer), tokenizer.eos_token_id, gen_eos):
        for v in value if isinstance(value, (list, tuple)) else [value]:
            if v is not None and v not in ids:
                ids.append(int(v))
    if not ids:
        raise ConfigError("the tokenizer has no end-of-sequence token; generation could not stop")
    return ids


def _pixels(prompt: tuple, device) -> dict | None:
    """An encoded prompt's image inputs on ``device`` (None for a text prompt)."""
    ids, images = prompt
    return None if images is None else {k: v.to(device) for k, v in images.tensors(ids).items()}


@torch.no_grad()
def generate_hf(model, tokenizer, prompts: list[dict], output: str | Path, *, max_new_tokens=256,
                temperature=0.8, top_p=0.95, greedy=False, batch_size=16, seed=42,
                max_prompt_length=512, rank=0, world_size=1, synced=False, done: dict | None = None,
                desc="generate") -> list[dict]:
    """Sample a response for every prompt record (``{"id", "messages"}``) with a HF model.

    Rows are appended to ``output`` (or ``output.rank{r}`` under several processes) as each batch
    finishes; prompts whose id is in ``done`` (default: read from the output and part files)
    are skipped -- under several processes the caller reads ``done`` on every rank before any
    rank writes, so all ranks agree on the plan. ``synced``: lockstep ``generate`` for a model
    whose parameters are sharded. Returns the rows this call wrote.
    """
    output = Path(output)
    output.parent.mkdir(parents=True, exist_ok=True)
    part = part_path(output, rank, world_size)
    if done is None:
        done = done_rows(all_paths(output, world_size))
    done = dict(done)
    encoded = [prompt_inputs(tokenizer, p["messages"], max_prompt_length) for p in prompts]
    tokenized = [ids for ids, _ in encoded]
    plan = plan_batches(tokenized, batch_size)
    todo = [b for b, idx in enumerate(plan) if any(prompts[i]["id"] not in done for i in idx)]
    mine = todo[rank::world_size]
    calls = math.ceil(len(todo) / world_size) if synced else len(mine)

    stop_ids = eos_ids(model, tokenizer)
    pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else stop_ids[0]
    device = next(model.parameters()).device
    was_training = model.training
    model.eval()
    # Explicit either way: transformers turns synced_gpus on by itself whenever DeepSpeed ZeRO-3 or
    # FSDP is active, which deadlocks ranks that generate different numbers of batches with a
    # replicated model.
    decoding = dict(sampling_kwargs(greedy, temperature, top_p), synced_gpus=synced)
    written, generated_tokens, start = [], 0, time.perf_counter()
    with progress_bar(total=sum(len(plan[b]) for b in mine), desc=desc, unit="prompt", disable=rank != 0) as bar:
        for count in range(calls):
            real = count < len(mine)
            b = mine[count] if real else (mine or todo)[0]  # lockstep filler, discarded
            idx = plan[b]
            length = max(len(tokenized[i]) for i in idx)
            ids = torch.full((len(idx), length), pad_id, dtype=torch.long)
            attn = torch.zeros((len(idx), length), dtype=torch.long)
            for row, i in enumerate(idx):  # left padding: every prompt ends at the last column
                ids[row, length - len(tokenized[i]):] = torch.tensor(tokenized[i])
                attn[row, length - len(tokenized[i]):] = 1
            images = vision.batch_inputs(model, [_pixels(encoded[i], device) for i in idx])
            # One seed per batch of the global plan: resuming at batch b samples what b would have.
            torch.manual_seed(batch_seed(seed, b))
            out = model.generate(input_ids=ids.to(device), attention_mask=attn.to(device), **images,
                                 max_new_tokens=max_new_tokens, pad_token_id=pad_id, eos_token_id=stop_ids,
                                 **decoding)
            if not real:
                continue
            new = out[:, length:].cpu()
            rows = []
            for row, i in enumerate(idx):
                tokens = new[row].tolist()
                stop = next((k for k, t in enumerate(tokens) if t in stop_ids), None)
                kept = tokens if stop is None else tokens[:stop]
                generated_tokens += len(kept) + (stop is not None)
                if prompts[i]["id"] not in done:
                    rows.append(response_row(prompts[i]["id"], tokenizer.decode(kept, skip_special_tokens=True),
                                             stop is not None, len(kept)))
            append_jsonl(part, rows)
            for r in rows:
                done[r["id"]] = r
            written += rows
            bar.update(len(idx))
            bar.set_postfix(tok_s=f"{generated_tokens / max(time.perf_counter() - start, 1e-9):.0f}")
            maybe_crash(desc, count + 1)
    model.train(was_training)
    return written
