"""The distributed set-up in one place: the accelerator, where the frozen teacher lives, the
DeepSpeed settings a loop without a dataloader must fill in, the loss scale that makes every
engine sum gradients over the global step, full-model saves, and loading models as plain
replicated copies while an engine is active.

The training loop asks this module and nothing else about the engine it runs under (a single
process, DDP, DeepSpeed ZeRO-2/3 or FSDP), so the loop itself is written once for all of them.

Engines on a CPU. accelerate 1.15 never tells its multi-process launchers to use the CPU: the
processes of ``accelerate launch --config_file X.yaml`` (X a MULTI_GPU, DEEPSPEED or FSDP
config) start with torch.distributed initialised but accelerate's state left at one process
and no engine. :func:`make_accelerator` detects that case (several processes, no CUDA) and builds
the engine on gloo itself -- DDP as MULTI_CPU, DeepSpeed with a gloo process group, FSDP by
forcing the state's distributed type -- and then checks that accelerate sees every process.
"""

from __future__ import annotations

import contextlib
import datetime
import importlib.util
import os

import torch

from distillm2 import vision
from distillm2.config import TrainConfig
from distillm2.errors import MissingExtra, NonFiniteError
from distillm2.files import atomic_dir

# Generation on the main process (vLLM, a server) or a long evaluation can keep the other ranks
# at a barrier for a long time; the default collective timeout would kill them.
COLLECTIVE_TIMEOUT = datetime.timedelta(hours=int(os.environ.get("DISTILLM2_COLLECTIVE_TIMEOUT_H", "6")))


TRACKER_PACKAGES = {"tensorboard": "tensorboard", "wandb": "wandb", "mlflow": "mlflow", "trackio": "trackio"}


def _flag(name: str) -> bool:
    return os.environ.get(name, "false").lower() in ("1", "true")


def make_accelerator(mixed_precision: str = "no", log_with: list[str] | None = None, project_dir=None):
    """An ``accelerate.Accelerator`` for the engine the launcher asked for; on a machine without
    CUDA (or with ACCELERATE_USE_CPU=1) on the CPU, over gloo when there are several processes.
    ``log_with``: experiment trackers (tensorboard, trackio, wandb, mlflow) logging under
    ``project_dir``."""
    from accelerate import Accelerator, PartialState
    from accelerate.state import AcceleratorState
    from accelerate.utils import DistributedType, InitProcessGroupKwargs

    for tracker in log_with or []:  # a tracker that is not installed would log nothing, with a warning only
        package = TRACKER_PACKAGES.get(tracker, tracker)
        if importlib.util.find_spec(package) is None:
            raise MissingExtra(f"train.report_to {tracker}", command=f"pip install {package}")
    world = int(os.environ.get("WORLD_SIZE", "1"))
    on_cpu = not torch.cuda.is_available() or _flag("ACCELERATE_USE_CPU")
    kwargs = {"mixed_precision": mixed_precision, "step_scheduler_with_optimizer": False}
    if log_with:
        kwargs.update(log_with=list(log_with), project_dir=str(project_dir) if project_dir else None)
    if world == 1:
        # accelerate keeps its state in a process-wide singleton that refuses a second
        # Accelerator with another precision; one process running several runs (compare, a
        # notebook, the test suite) must be able to, so a single process starts afresh.
        AcceleratorState._reset_state()
    if not on_cpu:
        return Accelerator(kwargs_handlers=[InitProcessGroupKwargs(timeout=COLLECTIVE_TIMEOUT)], **kwargs)
    if world == 1:
        return Accelerator(cpu=True, **kwargs)
    gloo = InitProcessGroupKwargs(backend="gloo", timeout=COLLECTIVE_TIMEOUT)
    if _flag("ACCELERATE_USE_DEEPSPEED"):
        accelerator = Accelerator(kwargs_handlers=[gloo], **kwargs)
        expected = DistributedType.DEEPSPEED
    elif _flag("ACCELERATE_USE_FSDP"):
        state = PartialState(backend="gloo", timeout=COLLECTIVE_TIMEOUT)
        if state.distributed_type == DistributedType.NO:
            # accelerate enables FSDP only for accelerator device types; on CPU processes the
            # state has to be told (checked below, so a changed accelerate fails loudly).
            PartialState._shared_state["distributed_type"] = DistributedType.MULTI_GPU
        accelerator = Accelerator(**kwargs)
        expected = DistributedType.FSDP
    else:
        accelerator = Accelerator(cpu=True, kwargs_handlers=[gloo], **kwargs)
        expected = DistributedType.MULTI_CPU
    if accelerator.num_processes != world or accelerator.distributed_type != expected:
        raise RuntimeError(
            f"accelerate set up {accelerator.num_processes} process(es) as {accelerator.distributed_type} "
            f"where the launcher started {world} for {expected}; check the accelerate config")
    return accelerator


def engine(accelerator) -> str:
    """``"deepspeed"``, ``"fsdp"`` or ``"ddp"`` (which also covers a single process)."""
    from accelerate.utils import DistributedType

    kind = accelerator.distributed_type
    if kind == DistributedType.DEEPSPEED:
        return "deepspeed"
    if kind == DistributedType.FSDP:
        return "fsdp"
    return "ddp"


def zero_stage(accelerator) -> int:
    """The DeepSpeed ZeRO stage (0 when not under DeepSpeed)."""
    if engine(accelerator) != "deepspeed":
        return 0
    return int(accelerator.state.deepspeed_plugin.zero_stage)


def shards_parameters(accelerator) -> bool:
    """Whether the engine partitions parameters (ZeRO-3, FSDP): a trained model then exists in
    full only through :func:`save_trained`, and models are loaded replicated first."""
    return zero_stage(accelerator) == 3 or engine(accelerator) == "fsdp"


@contextlib.contextmanager
def replicated_loading(accelerator):
    """Load models as plain, complete copies even under DeepSpeed ZeRO-3: accelerate registers
    its config with transformers, which would otherwise build every model inside
    ``deepspeed.zero.Init`` -- a collective call that deadlocks when one rank loads alone."""
    if engine(accelerator) != "deepspeed":
        yield
        return
    from transformers.integrations import unset_hf_deepspeed_config

    unset_hf_deepspeed_config()
    try:
        yield
    finally:
        accelerator.state.deepspeed_plugin.set_deepspeed_weakref()


def _decoder_layers(model) -> list[torch.nn.Module]:
    names = set(getattr(model, "_no_split_modules", None) or [])
    return [m for m in model.modules() if type(m).__name__ in names]


def place_teacher(accelerator, teacher, dtype: torch.dtype | None = None):
    """Put the frozen teacher where the run needs it: replicated under DDP; under DeepSpeed
    ZeRO-3 an inference engine that partitions it; under FSDP2 sharded with ``fully_shard``
    per decoder layer, never registered with accelerate (so it is never checkpointed). Sharded
    teachers run their forwards in lockstep on all ranks. Idempotent."""
    if getattr(teacher, "_distillm2_placed", False):
        return teacher
    teacher.eval().requires_grad_(False)
    kind = engine(accelerator)
    placed = teacher
    if kind == "deepspeed" and zero_stage(accelerator) == 3:
        import deepspeed

        hidden = int(getattr(teacher.config, "hidden_size", 1024))
        dtype = dtype or next(teacher.parameters()).dtype
        config = {  # explicit: accelerate's config still holds "auto" values here
            "train_micro_batch_size_per_gpu": 1, "gradient_accumulation_steps": 1,
            "train_batch_size": accelerator.num_processes,
            "zero_optimization": {"stage": 3, "stage3_param_persistence_threshold": 10 * hidden,
                                  "stage3_prefetch_bucket_size": int(0.9 * hidden * hidden),
                                  "reduce_bucket_size": hidden * hidden},
            "bf16": {"enabled": dtype == torch.bfloat16}, "fp16": {"enabled": dtype == torch.float16},
        }
        placed, *_ = deepspeed.initialize(model=teacher, config=config)
        placed.eval()
    elif kind == "fsdp" and getattr(accelerator.state.fsdp_plugin, "fsdp_version", 1) == 2:
        from torch.distributed.fsdp import fully_shard

        teacher.to(accelerator.device)
        for layer in _decoder_layers(teacher):
            fully_shard(layer)
        fully_shard(teacher)
    else:
        placed = teacher.to(accelerator.device)
    placed._distillm2_placed = True
    return placed


def generation_module(model):
    """The module whose ``generate`` to call: a DeepSpeed engine's wrapped module, or the model."""
    return getattr(model, "module", model) if type(model).__name__ == "DeepSpeedEngine" else model


def configure_deepspeed(accelerator, cfg: TrainConfig) -> None:
    """No dataloader is prepared, so DeepSpeed's "auto" sizes are set from the train config.
    Clipping is always set: DeepSpeed clips at 1.0 when the key is absent."""
    if engine(accelerator) != "deepspeed":
        return
    ds = accelerator.state.deepspeed_plugin.deepspeed_config
    ds["train_micro_batch_size_per_gpu"] = cfg.batch_size
    ds["gradient_accumulation_steps"] = cfg.grad_accum
    ds["train_batch_size"] = cfg.batch_size * cfg.grad_accum * accelerator.num_processes
    ds["gradient_clipping"] = cfg.max_grad_norm if cfg.max_grad_norm > 0 else 1e9


def loss_scale(accelerator, cfg: TrainConfig) -> float:
    """Factor on each micro-batch's loss (already divided by the global pair or token count of
    the step) so that the engine's gradient is the exact sum over the step: DDP and FSDP average
    over processes, DeepSpeed also divides by its accumulation steps; both are undone here."""
    scale = float(accelerator.num_processes)
    if engine(accelerator) == "deepspeed":
        scale *= cfg.grad_accum
    return scale


def grad_norm(accelerator, model, max_norm: float) -> float:
    """Clip (except under DeepSpeed, whose engine clips at its step) and return the norm of the
    step's gradient before clipping."""
    if engine(accelerator) == "deepspeed":
        value = model.get_global_grad_norm() if hasattr(model, "get_global_grad_norm") else None
        return float("nan") if value is None else float(value)
    return float(accelerator.clip_grad_norm_(model.parameters(), max_norm))


def save_trained(accelerator, model, target, tokenizer=None) -> None:
    """``save_pretrained`` of the prepared ``model`` into ``target`` with its full weights, also
    when the engine shards them (ZeRO-3, FSDP): every rank takes part in gathering the state
    dict, the main process writes it atomically (only the adapter under LoRA), with the
    tokenizer so that the directory loads alone."""
    state_dict = accelerator.get_state_dict(model)
    if accelerator.is_main_process:
        bad = [k for k, v in (state_dict or {}).items() if v.is_floating_point() and not torch.isfinite(v).all()]
        if bad:
            raise NonFiniteError(f"refusing to save {target}: non-finite values in {', '.join(bad[:5])}")
        with atomic_dir(target) as tmp:
            accelerator.unwrap_model(model).save_pretrained(tmp, state_dict=state_dict)
            if tokenizer is not None:
                vision.save_tokenizer(tokenizer, tmp)  # with a VLM's processor
    accelerator.wait_for_everyone()
