"""Interleaved sampling for Speculative KD (Xu et al., 2024; a baseline of DistiLLM-2 Table 2):
the student proposes every token; when the proposal is not among the teacher's ``top_k`` most
likely tokens at that position, the teacher's own sample replaces it. Both models keep their KV
caches and read the same accepted tokens. HF models only (it needs both models' logits at every
step); each batch has its own seed from the run's plan, so a rerun resumes exactly.
"""

from __future__ import annotations

import time
from pathlib import Path

import torch

from distillm2.data import prompt_token_ids
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
from distillm2.generation.hf import eos_ids
from distillm2.progress import progress_bar


def _sample(logits: torch.Tensor, temperature: float, top_p: float, generator: torch.Generator) -> torch.Tensor:
    """One token per row from ``logits`` ``[B, V]`` with temperature and nucleus filtering."""
    probs = torch.softmax(logits.float() / temperature, -1)
    if top_p < 1.0:
        sorted_p, order = probs.sort(-1, descending=True)
        keep = sorted_p.cumsum(-1) - sorted_p < top_p  # the smallest set reaching top_p
        sorted_p = sorted_p * keep
        probs = torch.zeros_like(probs).scatter(-1, order, sorted_p)
    return torch.multinomial(probs, 1, generator=generator)[:, 0]


@torch.no_grad()
def generate_interleaved(student, teacher, tokenizer, prompts: list[dict], output: str | Path, *, top_k: int = 25,
                         max_new_tokens: int = 256, temperature: float = 0.8, top_p: float = 0.95,
                         batch_size: int = 16, seed: int = 42, max_prompt_length: int = 512, rank: int = 0,
                         world_size: int = 1, done: dict | None = None, desc: str = "skd") -> list[dict]:
    """Rows ``{"id", "response", "finish_reason", "num_tokens", "replaced"}`` of interleaved
    sampling for ``prompts`` (resumable like :func:`~distillm2.generation.hf.generate_hf`);
    ``replaced`` counts the student's tokens the teacher replaced. Returns the rows written."""
    output = Path(output)
    output.parent.mkdir(parents=True, exist_ok=True)
    done = dict(done_rows(all_paths(output, world_size)) if done is None else done)
    tokenized = [prompt_token_ids(tokenizer, p["messages"], max_prompt_length) for p in prompts]
    plan = plan_batches(tokenized, batch_size)
    todo = [b for b, idx in enumerate(plan) if any(prompts[i]["id"] not in done for i in idx)]
    mine = todo[rank::world_size]
    stops = torch.tensor(eos_ids(student, tokenizer))
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else int(stops[0])
    device = next(student.parameters()).device
    student.eval()
    teacher.eval()
    written, start, tokens_out = [], time.perf_counter(), 0
    with progress_bar(total=sum(len(plan[b]) for b in mine), desc=desc, unit="prompt", disable=rank != 0) as bar:
        for count, b in enumerate(mine):
            idx = plan[b]
            length = max(len(tokenized[i]) for i in idx)
            ids = torch.full((len(idx), length), pad, dtype=torch.long)
            attn = torch.zeros((len(idx), length), dtype=torch.long)
            for row, i in enumerate(idx):
                ids[row, length - len(tokenized[i]):] = torch.tensor(tokenized[i])
                attn[row, length - len(tokenized[i]):] = 1
            ids, attn = ids.to(device), attn.to(device)
            gen = torch.Generator(device=device).manual_seed(batch_seed(seed, b))
            caches = {"s": None, "t": None}
            step_ids, out = ids, []
            finished = torch.zeros(len(idx), dtype=torch.bool, device=device)
            replaced = torch.zeros(len(idx), dtype=torch.long, device=device)
            for _ in range(max_new_tokens):
                positions = (attn.cumsum(-1) - 1).clamp_min(0)[:, -step_ids.shape[1]:]
                s = student(input_ids=step_ids, attention_mask=attn, position_ids=positions,
                            past_key_values=caches["s"], use_cache=True)
                t = teacher(input_ids=step_ids, attention_mask=attn, position_ids=positions,
                            past_key_values=caches["t"], use_cache=True)
                caches["s"], caches["t"] = s.past_key_values, t.past_key_values
                s_logits, t_logits = s.logits[:, -1], t.logits[:, -1, : s.logits.shape[-1]]
                proposal = _sample(s_logits, temperature, top_p, gen)
                allowed = t_logits.topk(top_k, -1).indices
                accept = (allowed == proposal[:, None]).any(-1)
                token = torch.where(accept, proposal, _sample(t_logits, temperature, top_p, gen))
                replaced += (~accept & ~finished).long()
                token = torch.where(finished, torch.full_like(token, pad), token)
                out.append(token)
                finished |= torch.isin(token, stops.to(device))
                if finished.all():
                    break
                step_ids = token[:, None]
                attn = torch.cat([attn, torch.ones_like(token)[:, None]], -1)
            new = torch.stack(out, -1).cpu()
            rows = []
            for row, i in enumerate(idx):
                seq = new[row].tolist()
                stop = next((k for k, tok in enumerate(seq) if tok in stops.tolist()), None)
                kept = seq if stop is None else seq[:stop]
                tokens_out += len(kept)
                if prompts[i]["id"] not in done:
                    r = response_row(prompts[i]["id"], tokenizer.decode(kept, skip_special_tokens=True),
                                     stop is not None, len(kept))
                    r["replaced"] = int(replaced[row])
                    rows.append(r)
            append_jsonl(part_path(output, rank, world_size), rows)
            for r in rows:
                done[r["id"]] = r
            written += rows
            bar.update(len(idx))
            bar.set_postfix(tok_s=f"{tokens_out / max(time.perf_counter() - start, 1e-9):.0f}")
            maybe_crash(desc, count + 1)
    return written
