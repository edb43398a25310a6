"""Response generation behind one entry point, :func:`generate_responses`.

It owns the backend choice (``hf``, ``vllm``, ``server``), the LoRA merge and the copy in the
sampling dtype, the export a separate engine needs, and the merge of per-rank part files. Output
rows are ``{"id", "response", "finish_reason", "num_tokens"}``; every backend resumes by prompt
id and samples each prompt with a seed fixed by the run's plan. How the current model reaches
each backend:

- ``hf``: the live model (a merged copy in ``generation.dtype`` when it carries LoRA adapters or
  another dtype), every rank taking its share; models sharded by the engine run in lockstep.
- ``vllm``: an engine in the main process, started for the call and stopped after it; the
  teacher from its own directory, the student from a merged export of the round.
- ``server``: the teacher as served at ``generation.server_url``; the student through
  ``generation.student_server_url`` (weights reloaded in place from the round's export), or
  ``hf`` without one.

Image prompts run with ``hf`` only: the other backends and interleaved sampling refuse them
(they send token ids, which would drop the image).
"""

from __future__ import annotations

import dataclasses
import json
import shutil
from pathlib import Path

from distillm2 import distributed, models, precision, vision
from distillm2.config import GenerateConfig, GenerationConfig
from distillm2.data import load_prompts
from distillm2.errors import ConfigError
from distillm2.files import read_jsonl, write_json_atomic
from distillm2.generation.common import all_paths, done_rows, merge_parts, repair
from distillm2.generation.hf import eos_ids, generate_hf, sampling_kwargs
from distillm2.generation.interleaved import generate_interleaved
from distillm2.generation.server import generate_server, load_weights
from distillm2.generation.vllm import _import_vllm, generate_vllm
from distillm2.identity import model_identity
from distillm2.progress import logger, setup_logging

__all__ = ["generate", "generate_hf", "generate_responses", "generate_server", "generate_vllm", "sampling_kwargs"]


def _export(model, tokenizer, target: Path, dtype: str, accelerator) -> Path:
    """The model, merged and in ``dtype``, saved where an engine can load it (main process)."""
    plain = accelerator.unwrap_model(model) if accelerator is not None else model
    models.save_model(models.plain_copy(plain, dtype), tokenizer, target)
    return target


def generate_responses(model, tokenizer, prompts: list[dict], output: str | Path, settings: GenerationConfig,
                       *, seed: int = 42, max_prompt_length: int = 512, accelerator=None, desc: str = "generate",
                       source: str | None = None, role: str = "student", interleave_with=None,
                       top_k: int = 25) -> list[dict]:
    """Responses of ``model`` for ``prompts`` into ``output`` (resumable; every rank calls it).

    ``model`` is a loaded model (possibly wrapped by accelerate or an engine, or carrying LoRA
    adapters), or None when ``source`` is all an engine needs. ``source``: the hub id or
    directory the model was loaded from and still equals (engines then load it from there;
    otherwise they get a merged export). ``role``: ``"teacher"`` (the server backend asks
    ``generation.server_url``) or ``"student"`` (``generation.student_server_url``).
    ``interleave_with``: a teacher model for Speculative KD's interleaved sampling (HF backend;
    a student token outside the teacher's ``top_k`` is replaced by the teacher's). Returns all
    rows, in prompt order.
    """
    output = Path(output)
    output.parent.mkdir(parents=True, exist_ok=True)
    main = accelerator is None or accelerator.is_main_process
    rank, world = (0, 1) if accelerator is None else (accelerator.process_index, accelerator.num_processes)
    barrier = accelerator.wait_for_everyone if accelerator is not None else (lambda: None)
    barrier()  # every rank sees the same finished rows
    if main:
        repair(all_paths(output, world))
    barrier()
    if output.exists() and {p["id"] for p in prompts} <= {r["id"] for r in read_jsonl(output)}:
        return read_jsonl(output)
    done = done_rows(all_paths(output, world))
    barrier()  # all ranks have read what is done before any rank writes: they agree on the plan
    common = dict(max_new_tokens=settings.max_new_tokens, temperature=settings.temperature, top_p=settings.top_p,
                  greedy=settings.greedy, seed=seed, max_prompt_length=max_prompt_length, desc=desc)
    backend = settings.backend
    if backend == "server" and role != "teacher" and not settings.student_server_url:
        backend = "hf"
    if backend in ("vllm", "server"):
        vision.refuse_images(prompts, f"generation.backend {backend}")
    if interleave_with is not None:
        vision.refuse_images(prompts, "interleaved sampling (loss skd)")
        if backend != "hf":
            raise ConfigError(f"interleaved sampling (loss skd) needs generation.backend hf, not {backend}")
        student = models.plain_copy(accelerator.unwrap_model(model) if accelerator else model, settings.dtype)
        teacher = distributed.generation_module(interleave_with)
        generate_interleaved(student.to(next(teacher.parameters()).device), teacher, tokenizer, prompts, output,
                             top_k=top_k, batch_size=settings.batch_size, rank=rank, world_size=world, done=done,
                             **{k: v for k, v in common.items() if k != "greedy"})
        backend = None
    if backend is None:
        pass
    elif backend == "hf":
        if model is None:
            model = models.load_model(source, settings.dtype)
        gen_model = distributed.generation_module(model if accelerator is None else accelerator.unwrap_model(model))
        synced = accelerator is not None and world > 1 and getattr(model, "_distillm2_placed", False) \
            and distributed.shards_parameters(accelerator)
        if not synced and (models.is_peft(gen_model)
                           or next(gen_model.parameters()).dtype != models.DTYPES[settings.dtype]):
            # a merged copy in the sampling dtype (bf16 weights sample ~2x faster on CPU)
            device = next(gen_model.parameters()).device
            gen_model = models.plain_copy(gen_model, settings.dtype).to(device)
        generate_hf(gen_model, tokenizer, prompts, output, batch_size=settings.batch_size, rank=rank,
                    world_size=world, synced=synced, done=done, **common)
        del gen_model
    elif main:
        stop = eos_ids(None, tokenizer)
        export = output.parent / f".{output.stem}-export"
        if backend == "vllm":
            path = models.resolve(source) if source else _export(model, tokenizer, export, settings.dtype, accelerator)
            generate_vllm(path, tokenizer, prompts, output, stop_ids=stop, dtype=settings.dtype,
                          max_model_len=settings.vllm_max_model_len or max_prompt_length + settings.max_new_tokens,
                          gpu_memory_utilization=settings.vllm_gpu_memory_utilization,
                          tensor_parallel_size=settings.vllm_tensor_parallel_size,
                          cpu_kvcache_gib=settings.vllm_cpu_kvcache_gib, **common)
        elif backend == "server":
            if role == "teacher":
                if not settings.server_url:
                    raise ConfigError("generation.backend server needs generation.server_url (the teacher's server)")
                url, name = settings.server_url, settings.server_model or source
            else:
                url, name = settings.student_server_url, settings.student_server_model or "student"
                local = source is not None and Path(models.resolve(source)).is_dir()
                load_weights(url, models.resolve(source) if local else
                             _export(model, tokenizer, export, settings.dtype, accelerator))
            generate_server(url, name, tokenizer, prompts, output, stop_ids=stop,
                            concurrency=settings.server_concurrency, timeout=settings.server_timeout, **common)
        else:
            raise ConfigError(f"generation.backend: unknown backend {backend!r}")
        shutil.rmtree(export, ignore_errors=True)
    barrier()
    if main:
        merge_parts(output, prompts, world)
    barrier()
    return read_jsonl(output)


def _settings_record(cfg: GenerateConfig, settings: GenerationConfig) -> dict:
    """What determines ``distillm2 generate``'s rows: the model (and a fingerprint of its
    files), the prompts, the decoding settings and seed, the backend and dtype."""
    return {"model": cfg.model, "model_fingerprint": model_identity(cfg.model)["fingerprint"],
            "prompts": cfg.prompts, "field": cfg.field, "seed": cfg.seed, "max_prompt_length": cfg.max_prompt_length,
            **{k: getattr(settings, k) for k in ("backend", "dtype", "max_new_tokens", "temperature", "top_p",
                                                 "greedy")}}


def _guard_output(output: Path, record: dict, force: bool) -> None:
    """Refuse to continue ``output`` when it was made with other settings (the rows there would
    be returned as if made with these), unless ``force`` (then it is replaced)."""
    marker = output.with_name(output.name + ".settings.json")
    if not output.exists() and not any(output.parent.glob(output.name + ".rank*")):
        return
    old = json.loads(marker.read_text()) if marker.exists() else None
    if old == record:
        return
    differ = ["(no record of the settings it was made with)"] if old is None else \
        [f"{k}: {old.get(k)!r} -> {v!r}" for k, v in record.items() if old.get(k) != v]
    if not force:
        raise ConfigError(f"{output} was made with other settings ({', '.join(differ[:4])}); its rows would be "
                          "returned as this command's. Use another --output, or --force to replace it")
    logger.warning("%s: replacing rows made with other settings (%s)", output, ", ".join(differ[:4]))
    for part in [output, *output.parent.glob(output.name + ".rank*")]:
        part.unlink(missing_ok=True)


def generate(cfg: GenerateConfig, force: bool = False) -> Path:
    """``distillm2 generate``: responses of ``cfg.model`` for ``cfg.prompts`` into ``cfg.output``
    (resumable: a rerun of the same command continues), on ``cfg.device``. An output made with
    other settings is refused unless ``force`` replaces it. Returns the output path."""
    for key in ("model", "prompts", "output"):
        if not getattr(cfg, key):
            raise ConfigError(f"generate: {key} is required (--{key} or `{key}:` in the config)")
    setup_logging()
    prompts = load_prompts(cfg.prompts, cfg.field, cfg.limit)
    tokenizer = models.load_tokenizer(cfg.model)
    if cfg.generation.backend == "vllm":
        _import_vllm()  # a missing extra is the error, before anything is measured or loaded
    model, device = None, models.pick_device(cfg.device)
    settings = dataclasses.replace(cfg.generation, dtype=precision.resolve_weights(
        cfg.generation.dtype, device, cfg.model, "generation.dtype"))
    output, record = Path(cfg.output), _settings_record(cfg, settings)
    _guard_output(output, record, force)
    if settings.backend == "hf":
        model = models.load_model(cfg.model, settings.dtype, device=device)
    output.parent.mkdir(parents=True, exist_ok=True)
    write_json_atomic(output.with_name(output.name + ".settings.json"), record)
    rows = generate_responses(model, tokenizer, prompts, cfg.output, settings, seed=cfg.seed,
                              max_prompt_length=cfg.max_prompt_length, source=cfg.model, role="teacher")
    logger.info("%d responses in %s", len(rows), cfg.output)
    return Path(cfg.output)
