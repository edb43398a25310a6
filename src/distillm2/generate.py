"""Response generation: a Hugging Face backend (default) and a vLLM backend (optional extra).

Output rows are ``{"id", "response", "finish_reason", "num_tokens"}`` (DESIGN.md §4), appended to
a JSONL file batch by batch. Resume is exact: the batch plan (prompts sorted by length, cut into
batches) is computed from the full prompt list and every batch is sampled with its own seed, so a
rerun after a crash regenerates the unfinished batches exactly as an uninterrupted run would have.
Under several processes each rank takes every n-th batch into its own part file; rank 0 merges.
"""

from __future__ import annotations

import time
from pathlib import Path

import torch

from distillm2.data import append_jsonl, drop_partial_tail, read_jsonl, render_prompt, write_jsonl
from distillm2.progress import progress_bar


def _done_ids(paths) -> dict[str, dict]:
    done = {}
    for path in paths:
        if Path(path).exists():
            drop_partial_tail(path)
            for row in read_jsonl(path):
                done.setdefault(row["id"], row)
    return done


def _plan(tokenized: list[list[int]], batch_size: int) -> list[list[int]]:
    """Indices grouped into batches of similar length (less padding), longest first so that an
    out-of-memory error shows up at once. Stable: ties keep prompt order."""
    order = sorted(range(len(tokenized)), key=lambda i: -len(tokenized[i]))
    return [order[i : i + batch_size] for i in range(0, len(order), batch_size)]


@torch.no_grad()
def generate_hf(model, tokenizer, prompts: list[dict], output: str | Path, *, max_new_tokens=256,
                temperature=0.8, top_p=0.95, greedy=False, batch_size=16, seed=42,
                max_prompt_length=512, rank=0, world_size=1, desc="generate",
                crash_after_batches=None) -> list[dict]:
    """Sample a response for every prompt record (``{"id", "messages"}``) with a HF model.

    Rows are appended to ``output`` (or ``output.rank{r}`` under several processes) as each batch
    finishes; prompts whose id is already there are skipped. Returns the rows of this rank, in
    prompt order (rank 0 of a multi-process run returns all rows after :func:`merge_parts`).
    """
    output = Path(output)
    output.parent.mkdir(parents=True, exist_ok=True)
    part = output if world_size == 1 else output.with_name(f"{output.name}.rank{rank}")
    done = _done_ids([output, part])
    texts = [render_prompt(tokenizer, p["messages"]) for p in prompts]
    tokenized = [tokenizer(t, add_special_tokens=False)["input_ids"][-max_prompt_length:] for t in texts]
    plan = [(b, idx) for b, idx in enumerate(_plan(tokenized, batch_size)) if b % world_size == rank]
    todo = [(b, idx) for b, idx in plan if any(prompts[i]["id"] not in done for i in idx)]

    eos_ids = _eos_ids(model, tokenizer)
    pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else eos_ids[0]
    device = next(model.parameters()).device
    was_training = model.training
    model.eval()
    total = sum(len(idx) for _, idx in todo)
    generated_tokens, start = 0, time.perf_counter()
    with progress_bar(total=total, desc=desc, unit="prompt", disable=rank != 0) as bar:
        for count, (b, idx) in enumerate(todo):
            length = max(len(tokenized[i]) for i in idx)
            ids = torch.full((len(idx), length), pad_id, dtype=torch.long)
            attn = torch.zeros((len(idx), length), dtype=torch.long)
            for row, i in enumerate(idx):  # left padding: every prompt ends at the last column
                ids[row, length - len(tokenized[i]):] = torch.tensor(tokenized[i])
                attn[row, length - len(tokenized[i]):] = 1
            # One seed per batch (not per run): resuming at batch b samples what b would have.
            torch.manual_seed(seed * 1_000_003 + b)
            kwargs = dict(max_new_tokens=max_new_tokens, pad_token_id=pad_id, eos_token_id=eos_ids)
            if greedy:
                kwargs.update(do_sample=False, temperature=None, top_p=None, top_k=None)
            else:
                kwargs.update(do_sample=True, temperature=temperature, top_p=top_p, top_k=None)
            out = model.generate(input_ids=ids.to(device), attention_mask=attn.to(device), **kwargs)
            new = out[:, length:].cpu()
            rows = []
            for row, i in enumerate(idx):
                tokens = new[row].tolist()
                stop = next((k for k, t in enumerate(tokens) if t in eos_ids), None)
                kept = tokens if stop is None else tokens[:stop]
                generated_tokens += len(kept) + (stop is not None)
                if prompts[i]["id"] in done:
                    continue
                rows.append({
                    "id": prompts[i]["id"],
                    "response": tokenizer.decode(kept, skip_special_tokens=True),
                    "finish_reason": "length" if stop is None else "stop",
                    "num_tokens": len(kept),
                })
            append_jsonl(part, rows)
            for r in rows:
                done[r["id"]] = r
            bar.update(len(idx))
            bar.set_postfix(tok_s=f"{generated_tokens / max(time.perf_counter() - start, 1e-9):.0f}")
            if crash_after_batches is not None and count + 1 >= crash_after_batches:
                _crash_for_test()
    model.train(was_training)
    mine = {prompts[i]["id"] for _, idx in plan for i in idx}
    return [done[p["id"]] for p in prompts if p["id"] in mine and p["id"] in done]


def merge_parts(output: str | Path, prompts: list[dict], world_size: int) -> list[dict]:
    """Rank 0, after all ranks finished: merge the part files into ``output`` in prompt order."""
    output = Path(output)
    paths = [output] + [output.with_name(f"{output.name}.rank{r}") for r in range(world_size)]
    done = _done_ids(paths)
    rows = [done[p["id"]] for p in prompts if p["id"] in done]
    if world_size > 1:
        write_jsonl(output, rows)
        for path in paths[1:]:
            path.unlink(missing_ok=True)
    return rows


def _eos_ids(model, tokenizer) -> list[int]:
    ids = []
    gen_eos = getattr(getattr(model, "generation_config", None), "eos_token_id", None)
    for value in (tokenizer.eos_token_id, gen_eos):
        for v in value if isinstance(value, (list, tuple)) else [value]:
            if v is not None and v not in ids:
                ids.append(int(v))
    if not ids:
        raise ValueError("the tokenizer has no end-of-sequence token; generation could not stop")
    return ids


def _crash_for_test():
    """Fault injection for the resume tests: die the hard way, mid-stage."""
    import os
    import signal

    os.kill(os.getpid(), signal.SIGKILL)


def generate_vllm(model_path: str, tokenizer, prompts: list[dict], output: str | Path, *,
                  max_new_tokens=256, temperature=0.8, top_p=0.95, greedy=False, seed=42,
                  max_prompt_length=512, tensor_parallel_size=1, gpu_memory_utilization=0.85,
                  **_ignored) -> list[dict]:
    """Same inputs and outputs as :func:`generate_hf`, sampled by vLLM from a saved model
    directory (LoRA merged). Needs the ``vllm`` extra; resumes by skipping finished ids."""
    try:
        from vllm import LLM, SamplingParams
    except ImportError as err:
        raise ImportError("the vLLM backend needs `pip install distillm2[vllm]` (and a GPU)") from err
    output = Path(output)
    done = _done_ids([output])
    todo = [p for p in prompts if p["id"] not in done]
    if todo:
        llm = LLM(model=str(model_path), tensor_parallel_size=tensor_parallel_size, seed=seed,
                  gpu_memory_utilization=gpu_memory_utilization)
        params = SamplingParams(
            max_tokens=max_new_tokens, seed=seed,
            temperature=0.0 if greedy else temperature, top_p=1.0 if greedy else top_p,
        )
        token_prompts = [
            {"prompt_token_ids": tokenizer(render_prompt(tokenizer, p["messages"]),
                                           add_special_tokens=False)["input_ids"][-max_prompt_length:]}
            for p in todo
        ]
        results = llm.generate(token_prompts, params)
        rows = []
        for p, res in zip(todo, results):
            o = res.outputs[0]
            rows.append({"id": p["id"], "response": o.text,
                         "finish_reason": "stop" if o.finish_reason == "stop" else "length",
                         "num_tokens": len(o.token_ids)})
        append_jsonl(output, rows)
        for r in rows:
            done[r["id"]] = r
    return [done[p["id"]] for p in prompts if p["id"] in done]
