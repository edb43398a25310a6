"""``distillm2 check CONFIG --processes N``: what a run will do and whether it fits, before it
starts.

Resolves the models (their configs only: a local directory, or the hub where it is reachable),
the tokenizers and the prompts; prints the effective batch, the steps per round and a per-device
memory estimate (teacher + student + gradients + optimiser state + activations + logits, and the
vLLM engine's reservation beside the training state); says what it could not check. A layout
whose estimate exceeds the device memory is an error that names the numbers.

The estimate is arithmetic on parameter counts (models instantiated on the meta device, no
weights read), not a measurement: activations assume ~34 bytes per token, hidden unit and layer
without gradient checkpointing (Korthikanti et al. 2022) and one saved layer input (2 bytes per
token and hidden unit) per layer with it; logits count the student's logits, their gradient and the teacher's logits
for the trained rows in the autocast dtype.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field

import torch

from distillm2 import models, precision, vision
from distillm2.config import RunConfig, check_trains_something
from distillm2.data import load_prompts
from distillm2.errors import ConfigError, UserError
from distillm2.losses import LOSSES
from distillm2.train import num_steps

GIB = 2**30
BYTES = {"float32": 4, "bfloat16": 2, "float16": 2}


@dataclass
class Plan:
    """The numbers ``check`` reports."""

    processes: int
    engine: str
    device_gib: float
    prompts: int | None = None
    effective_batch: int = 0
    steps_per_round: int | None = None
    params: dict[str, int] = field(default_factory=dict)
    memory_gib: dict[str, float] = field(default_factory=dict)
    unchecked: list[str] = field(default_factory=list)
    notes: list[str] = field(default_factory=list)  # assumptions the estimate rests on

    @property
    def peak_gib(self) -> float:
        """The larger of the training peak and the state kept while a vLLM engine samples."""
        m = self.memory_gib
        training = sum(v for k, v in m.items() if k not in ("vllm_reservation",))
        state = sum(m.get(k, 0.0) for k in ("teacher", "student", "gradients", "optimizer"))
        return max(training, state + m.get("vllm_reservation", 0.0))


def _model_config(name: str):
    from transformers import AutoConfig

    return AutoConfig.from_pretrained(models.resolve(name))


def _meta_model(config):
    from transformers import AutoModelForCausalLM, AutoModelForImageTextToText

    auto = AutoModelForImageTextToText if vision.is_vision_config(config) else AutoModelForCausalLM
    with torch.device("meta"):
        return auto.from_config(config)


def _lora_params(model, r: int, frozen=None) -> int:
    """LoRA parameters on every linear layer but the output head (and a frozen vision tower's):
    r x (in + out) each."""
    head = model.get_output_embeddings()
    skip = {id(m) for m in frozen.modules()} if frozen is not None else set()
    return sum(r * (m.in_features + m.out_features) for m in model.modules()
               if isinstance(m, torch.nn.Linear) and m is not head and id(m) not in skip)


def _planned_precision(cfg: RunConfig, plan: Plan) -> RunConfig:
    """``cfg`` with its ``auto`` precisions as the planned device gets them: this machine's CUDA
    device when it has one, else a GPU with bf16 (the device memory the plan is for is a GPU's)."""
    if torch.cuda.is_available():
        found = precision.verdict(precision.run_device())
    else:
        found = precision.Verdict("cuda", "bfloat16", "planned for a GPU with bf16")
        if any(precision.setting(cfg, key) == precision.AUTO for key in precision.RUN_KEYS):
            plan.notes.append("precision auto counted as on a GPU with bf16; a CPU without bf16 units runs the "
                              "teacher and sampling in float32 (twice their memory)")
    return precision.apply_verdict(cfg, found)


def plan_run(cfg: RunConfig, processes: int = 1, engine: str = "ddp", device_gib: float | None = None) -> Plan:
    """The effective batch, steps and per-device memory estimate of ``cfg`` on ``processes``
    processes under ``engine`` (``ddp``, ``fsdp`` or ``zero3``)."""
    if engine not in ("ddp", "fsdp", "zero3"):
        raise ConfigError(f"--engine: unknown engine {engine!r}; valid: ddp, fsdp, zero3")
    if device_gib is None:
        device_gib = torch.cuda.get_device_properties(0).total_memory / GIB if torch.cuda.is_available() else 80.0
    plan = Plan(processes=processes, engine=engine, device_gib=device_gib)
    cfg = _planned_precision(cfg, plan)
    mc, tc = cfg.models, cfg.train
    plan.effective_batch = tc.batch_size * tc.grad_accum * processes
    try:
        plan.prompts = len(load_prompts(cfg.data.prompts, cfg.data.field, cfg.data.max_prompts))
        plan.steps_per_round = num_steps(plan.prompts, tc, processes)
    except (UserError, OSError) as err:
        if not cfg.data.prompts.startswith("hf:"):  # a local file or demo set: a run would fail on it
            raise
        plan.unchecked.append(f"prompts ({cfg.data.prompts}): {err}")
    try:
        teacher_cfg = _model_config(mc.teacher)
    except Exception as err:  # noqa: BLE001 - any loading failure means "could not resolve"
        plan.unchecked.append(f"teacher {mc.teacher}: {type(err).__name__}: {str(err)[:160]}")
        return plan
    if not mc.student:  # a layer index past the teacher's depth is an error, as in a run
        layers = models.student_layers_of(mc.teacher, mc.student_layers, mc.student_num_layers)
    try:
        if mc.student:
            student_cfg = _model_config(mc.student)
        else:
            student_cfg = teacher_cfg.__class__(**teacher_cfg.to_dict())
            vision.text_config(student_cfg).num_hidden_layers = len(layers)
    except Exception as err:  # noqa: BLE001
        plan.unchecked.append(f"student {mc.student}: {type(err).__name__}: {str(err)[:160]}")
        return plan
    _tokenizers(cfg, plan)
    teacher, student = _meta_model(teacher_cfg), _meta_model(student_cfg)
    p_teacher = sum(p.numel() for p in teacher.parameters())
    p_student = sum(p.numel() for p in student.parameters())
    tower = vision.vision_tower(student) if mc.freeze_vision_tower else None
    frozen = sum(p.numel() for p in tower.parameters()) if tower is not None else 0
    trainable = _lora_params(student, mc.lora_r, tower) if mc.lora else p_student - frozen
    plan.params = {"teacher": p_teacher, "student": p_student, "trainable": trainable}

    shard = processes if engine in ("fsdp", "zero3") else 1
    w_student = BYTES[mc.dtype]
    m = plan.memory_gib
    m["teacher"] = p_teacher * BYTES[mc.teacher_dtype] / shard / GIB
    m["student"] = (p_student * w_student / shard + (trainable * w_student if mc.lora else 0)) / GIB
    optimizer_states = 2 if tc.optimizer == "adamw" else 0
    m["gradients"] = trainable * w_student / shard / GIB
    m["optimizer"] = optimizer_states * trainable * w_student / shard / GIB
    rows = tc.batch_size * len(LOSSES[cfg.loss.name].rows)
    tokens = rows * cfg.data.max_length
    text = vision.text_config(student_cfg)  # activations and logits: the language model's
    hidden, layers = text.hidden_size, text.num_hidden_layers
    act = 2 if tc.mixed_precision != "no" or mc.dtype != "float32" else 4
    per_token_layer = act if tc.gradient_checkpointing else 17 * act  # 34 bytes in 16-bit
    m["activations"] = tokens * hidden * layers * per_token_layer / GIB
    vocab = text.vocab_size
    response = max(cfg.data.max_length - cfg.data.max_prompt_length, cfg.data.max_length // 2)
    logits = rows * response * vocab
    m["logits"] = (2 * logits * act + logits * BYTES[mc.teacher_dtype]) / GIB
    if cfg.generation.backend == "vllm":
        m["vllm_reservation"] = cfg.generation.vllm_gpu_memory_utilization * device_gib
    return plan


def _tokenizers(cfg: RunConfig, plan: Plan) -> None:
    mc = cfg.models
    try:
        teacher_tok = models.load_tokenizer(mc.teacher)
        student_tok = models.load_tokenizer(mc.student or mc.teacher)
    except Exception as err:  # noqa: BLE001
        plan.unchecked.append(f"tokenizers: {type(err).__name__}: {str(err)[:160]}")
        return
    models.check_tokenizers(teacher_tok, student_tok)


def format_plan(plan: Plan) -> str:
    """The report ``distillm2 check`` prints."""
    lines = [f"processes: {plan.processes} ({plan.engine}), device memory {plan.device_gib:.0f} GiB",
             f"prompts: {plan.prompts if plan.prompts is not None else '?'}; effective batch "
             f"{plan.effective_batch} pairs per step; steps per round: "
             f"{plan.steps_per_round if plan.steps_per_round is not None else '?'}"]
    if plan.params:
        lines.append("parameters: " + ", ".join(f"{k} {v / 1e9:.3f}B" for k, v in plan.params.items()))
        lines.append("per-device memory estimate (GiB):")
        lines += [f"  {k:<17}{v:8.2f}" for k, v in plan.memory_gib.items()]
        lines.append(f"  {'peak':<17}{plan.peak_gib:8.2f}   of {plan.device_gib:.0f}")
    lines += [f"not checked: {u}" for u in plan.unchecked] + [f"note: {n}" for n in plan.notes]
    return "\n".join(lines)


def check(cfg: RunConfig, processes: int = 1, engine: str = "ddp", device_gib: float | None = None) -> Plan:
    """Print the plan of ``cfg``; raise :class:`ConfigError` when its estimate does not fit, or on
    an input a run would refuse (a config that trains nothing, missing prompts, a student layer
    past the teacher's depth)."""
    check_trains_something(cfg)
    plan = plan_run(cfg, processes, engine, device_gib)
    print(format_plan(plan))
    if plan.params and plan.peak_gib > plan.device_gib:
        parts = ", ".join(f"{k} {v:.1f}" for k, v in plan.memory_gib.items())
        raise ConfigError(
            f"the estimated peak of {plan.peak_gib:.1f} GiB per device exceeds {plan.device_gib:.0f} GiB "
            f"({parts}); lower train.batch_size, data.max_length or generation.vllm_gpu_memory_utilization, "
            f"or enable train.gradient_checkpointing, models.lora or a sharding engine")
    if math.isfinite(plan.peak_gib) and plan.params:
        print(f"fits: estimated peak {plan.peak_gib:.1f} GiB of {plan.device_gib:.0f} GiB per device")
    return plan
