"""The distributed set-up in one place: the accelerator, where the frozen teacher lives, the
DeepSpeed settings a loop without a dataloader must fill in, and the loss scale that makes every
engine sum gradients over the global step.

The training loop asks this module and nothing else about the engine it runs under (plain, DDP,
DeepSpeed, FSDP), so the loop itself is written once for all of them.
"""

from __future__ import annotations

import os

import torch

from distillm2.config import TrainConfig


def make_accelerator(mixed_precision: str = "no"):
    """An ``accelerate.Accelerator``; on a machine without CUDA (or with ACCELERATE_USE_CPU=1)
    it runs on the CPU, distributed over gloo when launched with several processes."""
    from accelerate import Accelerator

    use_cpu = not torch.cuda.is_available() or os.environ.get("ACCELERATE_USE_CPU") == "1"
    return Accelerator(mixed_precision=mixed_precision, cpu=use_cpu)


def engine(accelerator) -> str:
    """``"deepspeed"``, ``"fsdp"`` or ``"ddp"`` (which also covers a single process)."""
    from accelerate.utils import DistributedType

    kind = accelerator.distributed_type
    if kind == DistributedType.DEEPSPEED:
        return "deepspeed"
    if kind == DistributedType.FSDP:
        return "fsdp"
    return "ddp"


def place_teacher(accelerator, teacher):
    """Put the frozen teacher where the run needs it: replicated under DDP, sharded under
    DeepSpeed ZeRO-3 (an inference engine) or FSDP. Idempotent for an already placed teacher."""
    teacher.eval().requires_grad_(False)
    kind = engine(accelerator)
    if kind == "deepspeed":
        ds_cfg = dict(accelerator.state.deepspeed_plugin.deepspeed_config)
        if ds_cfg.get("zero_optimization", {}).get("stage") == 3 and isinstance(teacher, torch.nn.Module) \
                and not hasattr(teacher, "module"):
            import deepspeed

            ds_cfg.pop("optimizer", None)
            ds_cfg.pop("scheduler", None)
            placed, *_ = deepspeed.initialize(model=teacher, config=ds_cfg)
            return placed.eval()
    if kind == "fsdp":
        if hasattr(teacher, "_fsdp_wrapped_module"):
            return teacher
        return accelerator.prepare_model(teacher)
    return teacher.to(accelerator.device)


def configure_deepspeed(accelerator, cfg: TrainConfig) -> None:
    """No dataloader is prepared, so DeepSpeed's "auto" sizes are set from the train config."""
    if engine(accelerator) != "deepspeed":
        return
    ds = accelerator.state.deepspeed_plugin.deepspeed_config
    ds["train_micro_batch_size_per_gpu"] = cfg.batch_size
    ds["gradient_accumulation_steps"] = cfg.grad_accum
    ds["gradient_clipping"] = cfg.max_grad_norm


def loss_scale(accelerator, cfg: TrainConfig) -> float:
    """Factor on each micro-batch's loss (already divided by the global pair or token count of
    the step) so that the engine's gradient is the exact sum over the step: DDP averages over
    processes, DeepSpeed also divides by its accumulation steps; both are undone here."""
    scale = float(accelerator.num_processes)
    if engine(accelerator) == "deepspeed":
        scale *= cfg.grad_accum
    return scale
