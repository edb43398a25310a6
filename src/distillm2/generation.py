"""Response generation behind one entry point, :func:`generate_responses`.

It owns the backend choice (``hf``, the default, or ``vllm``), the LoRA merge and the copy in the
sampling dtype, the export a separate engine needs, and the merge of per-rank part files.
Output rows are ``{"id", "response", "finish_reason", "num_tokens"}``, appended to a JSONL file
batch by batch. Resume is exact: the batch plan (prompts sorted by length, cut into batches) is
computed from the full prompt list and every batch is sampled with its own seed, so a rerun after a
crash regenerates the unfinished batches exactly as an uninterrupted run would have. Under several
processes each rank takes every n-th batch into its own part file; rank 0 merges.
"""

from __future__ import annotations

import time
from pathlib import Path

import torch

from distillm2 import models
from distillm2.config import GenerateConfig, GenerationConfig
from distillm2.data import load_prompts, prompt_token_ids
from distillm2.errors import ConfigError, MissingExtra
from distillm2.faults import maybe_crash
from distillm2.files import append_jsonl, drop_partial_tail, read_jsonl, write_jsonl
from distillm2.progress import logger, progress_bar, setup_logging


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


def sampling_kwargs(greedy: bool, temperature: float, top_p: float) -> dict:
    """``generate`` keyword arguments for greedy decoding or plain temperature / top-p sampling
    (top-k off), the one place the decoding settings become HF arguments."""
    if greedy:
        return dict(do_sample=False, temperature=None, top_p=None, top_k=None)
    return dict(do_sample=True, temperature=temperature, top_p=top_p, top_k=None)


def _eos_ids(model, tokenizer) -> list[int]:
    ids = []
    gen_eos = getattr(getattr(model, "generation_config", None), "eos_token_id", None)
    for value in (tokenizer.eos_token_id, gen_eos):
        for v in value if isinstance(value, (list, tuple)) else [value]:
            if v is not None and v not in ids:
                ids.append(int(v))
    if not ids:
        raise ConfigError("the tokenizer has no end-of-sequence token; generation could not stop")
    return ids


@torch.no_grad()
def generate_hf(model, tokenizer, prompts: list[dict], output: str | Path, *, max_new_tokens=256,
                temperature=0.8, top_p=0.95, greedy=False, batch_size=16, seed=42,
                max_prompt_length=512, rank=0, world_size=1, desc="generate") -> list[dict]:
    """Sample a response for every prompt record (``{"id", "messages"}``) with a HF model.

    Rows are appended to ``output`` (or ``output.rank{r}`` under several processes) as each batch
    finishes; prompts whose id is already there are skipped. Returns the rows of this rank, in
    prompt order.
    """
    output = Path(output)
    output.parent.mkdir(parents=True, exist_ok=True)
    part = output if world_size == 1 else output.with_name(f"{output.name}.rank{rank}")
    done = _done_ids([output, part])
    tokenized = [prompt_token_ids(tokenizer, p["messages"], max_prompt_length) for p in prompts]
    plan = [(b, idx) for b, idx in enumerate(_plan(tokenized, batch_size)) if b % world_size == rank]
    todo = [(b, idx) for b, idx in plan if any(prompts[i]["id"] not in done for i in idx)]

    eos_ids = _eos_ids(model, tokenizer)
    pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else eos_ids[0]
    device = next(model.parameters()).device
    was_training = model.training
    model.eval()
    decoding = sampling_kwargs(greedy, temperature, top_p)
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
            out = model.generate(input_ids=ids.to(device), attention_mask=attn.to(device),
                                 max_new_tokens=max_new_tokens, pad_token_id=pad_id, eos_token_id=eos_ids,
                                 **decoding)
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
            maybe_crash(desc, count + 1)
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


def generate_vllm(model_path: str, tokenizer, prompts: list[dict], output: str | Path, *,
                  max_new_tokens=256, temperature=0.8, top_p=0.95, greedy=False, seed=42,
                  max_prompt_length=512, tensor_parallel_size=1, gpu_memory_utilization=0.85) -> list[dict]:
    """Same inputs and outputs as :func:`generate_hf`, sampled by vLLM from a saved model
    directory (LoRA merged). Needs the ``vllm`` extra; resumes by skipping finished ids."""
    try:
        from vllm import LLM, SamplingParams
    except ImportError:
        raise MissingExtra("the vLLM backend", "vllm") from None
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
        token_prompts = [{"prompt_token_ids": prompt_token_ids(tokenizer, p["messages"], max_prompt_length)}
                         for p in todo]
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


def generate_responses(model, tokenizer, prompts: list[dict], output: str | Path, settings: GenerationConfig,
                       *, seed: int = 42, max_prompt_length: int = 512, accelerator=None,
                       desc: str = "generate") -> list[dict]:
    """Responses of ``model`` for ``prompts`` into ``output`` (resumable; every rank calls it).

    ``model`` is a loaded model (possibly wrapped by accelerate or carrying LoRA adapters) or the
    path of a saved one. The ``hf`` backend samples from a merged copy in ``settings.dtype`` when
    the model is not already a plain model in that dtype, every rank taking its share of the
    batches; ``vllm`` samples on the main process from ``model`` itself when it is a path (the
    teacher is served from its own directory) or from a merged export. Returns all rows, in
    prompt order.
    """
    output = Path(output)
    main = accelerator is None or accelerator.is_main_process
    rank, world = (0, 1) if accelerator is None else (accelerator.process_index, accelerator.num_processes)
    barrier = accelerator.wait_for_everyone if accelerator is not None else (lambda: None)
    done = {r["id"] for r in read_jsonl(output)} if output.exists() else set()
    if all(p["id"] in done for p in prompts):
        return read_jsonl(output)
    common = dict(max_new_tokens=settings.max_new_tokens, temperature=settings.temperature,
                  top_p=settings.top_p, greedy=settings.greedy, seed=seed, max_prompt_length=max_prompt_length)
    if settings.backend == "vllm":
        if main:
            path = model if isinstance(model, (str, Path)) else output.parent / f".{output.stem}-model"
            if not isinstance(model, (str, Path)):
                models.save_model(model if accelerator is None else accelerator.unwrap_model(model), tokenizer, path)
            generate_vllm(str(path), tokenizer, prompts, output, **common,
                          tensor_parallel_size=settings.vllm_tensor_parallel_size,
                          gpu_memory_utilization=settings.vllm_gpu_memory_utilization)
        barrier()
        return read_jsonl(output)
    if isinstance(model, (str, Path)):
        model = models.load_model(str(model), settings.dtype)
    gen_model = model if accelerator is None else accelerator.unwrap_model(model)
    if models.is_peft(gen_model) or next(gen_model.parameters()).dtype != models.DTYPES[settings.dtype]:
        # a merged copy in the sampling dtype (bf16 weights sample ~2x faster on CPU)
        device = next(gen_model.parameters()).device
        gen_model = models.plain_copy(gen_model, settings.dtype).to(device)
    generate_hf(gen_model, tokenizer, prompts, output, batch_size=settings.batch_size, rank=rank,
                world_size=world, desc=desc, **common)
    del gen_model
    barrier()
    if main:
        merge_parts(output, prompts, world)
    barrier()
    return read_jsonl(output)


def generate(cfg: GenerateConfig) -> Path:
    """``distillm2 generate``: responses of ``cfg.model`` for ``cfg.prompts`` into ``cfg.output``
    (resumable). Returns the output path."""
    for key in ("model", "prompts", "output"):
        if not getattr(cfg, key):
            raise ConfigError(f"generate: {key} is required (--{key} or `{key}:` in the config)")
    setup_logging()
    prompts = load_prompts(cfg.prompts, cfg.field, cfg.limit)
    tokenizer = models.load_tokenizer(cfg.model)
    model = cfg.model if cfg.generation.backend == "vllm" else models.load_model(
        cfg.model, cfg.generation.dtype)
    rows = generate_responses(model, tokenizer, prompts, cfg.output, cfg.generation, seed=cfg.seed,
                              max_prompt_length=cfg.max_prompt_length)
    logger.info("%d responses in %s", len(rows), cfg.output)
    return Path(cfg.output)

