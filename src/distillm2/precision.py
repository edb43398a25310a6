"""The numeric precision a run uses on the machine it is given (``auto``), chosen by measurement.

Every precision setting (``models.dtype``, ``models.teacher_dtype``, ``generation.dtype``,
``train.mixed_precision``; ``eval``'s ``dtype``) defaults to ``auto``; an explicit value always
wins. What ``auto`` means:

- the trained student's weights (``models.dtype``): float32 everywhere -- they are the master
  weights that autocast computes from, and AdamW's update needs their precision;
- on a CPU, the frozen teacher, the sampling copy and autocast use bfloat16 only where a short
  GEMM probe at the model's shapes shows bf16 at least :data:`CPU_BF16_MARGIN` times faster than
  float32 (CPUs with AMX or AVX512-BF16); elsewhere (AVX2-only CPUs, where a bf16 matmul falls to
  a scalar loop some 40x slower than float32) float32 and no autocast. The probe takes well under
  a second and is cached per machine under ``$DISTILLM2_CACHE/precision.json``;
- on a CUDA device, bfloat16 where the device runs it natively (compute capability >= 8.0), else
  float16 for the frozen models and fp16 autocast with gradient scaling for training (the
  student's master weights stay float32): never an emulated bf16;
- any other device: float32.

A run writes what it chose, and the numbers behind it, to ``RUN/precision.json`` (beside its
config, once the inputs are checked); a resumed run keeps that choice. An explicit bf16 where the probe shows it slower than float32 (or a CUDA device
emulates it) gets a one-line warning with the numbers.
"""

from __future__ import annotations

import dataclasses
import json
import os
import platform
import time
from pathlib import Path

import torch
from filelock import FileLock

from distillm2 import models, vision
from distillm2.files import cache_dir, write_json_atomic
from distillm2.progress import logger

AUTO = "auto"
# bf16 has to win clearly: autocast adds casts around every matmul, and on a CPU the other
# operations (softmax, norms, the loss in float32) do not speed up at all.
CPU_BF16_MARGIN = 1.25
PROBE_ROWS = 64  # rows of the probe GEMM: a generation batch, a short slice of a training batch
PROBE_MAX_DIM = 1536  # larger layers are probed at this size: the ratio is settled well before
PROBE_SECONDS = 0.15  # per dtype, after one warm-up call

# The settings auto resolves, and which kind of choice each is.
RUN_KEYS = {"models.dtype": "master", "models.teacher_dtype": "weights", "generation.dtype": "weights",
            "train.mixed_precision": "autocast"}
AUTOCAST_NAME = {"bfloat16": "bf16", "float16": "fp16", "float32": "no"}


@dataclasses.dataclass
class Verdict:
    """What this device runs fastest: ``weights`` (the dtype of frozen weights, ``"bfloat16"``,
    ``"float16"`` or ``"float32"``), the numbers behind it and a one-line reason."""

    device: str
    weights: str
    reason: str
    numbers: dict = dataclasses.field(default_factory=dict)

    @property
    def autocast(self) -> str:
        """accelerate's mixed-precision name for the same choice (``bf16``, ``fp16``, ``no``)."""
        return AUTOCAST_NAME[self.weights]


def cpu_name() -> str:
    """The CPU's model name (``/proc/cpuinfo``), or what ``platform`` knows."""
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def _gflops(m: int, k: int, n: int, dtype: torch.dtype, seconds: float) -> float:
    a, b = torch.randn(m, k).to(dtype), torch.randn(k, n).to(dtype)
    a @ b  # warm-up: oneDNN builds its kernel on the first call
    best, spent, calls = float("inf"), 0.0, 0
    while spent < seconds and calls < 50:
        start = time.perf_counter()
        a @ b
        took = time.perf_counter() - start
        best, spent, calls = min(best, took), spent + took, calls + 1
    return 2 * m * k * n / best / 1e9


def gemm_probe(k: int, n: int, seconds: float = PROBE_SECONDS) -> dict:
    """GFLOP/s of a ``[64, k] @ [k, n]`` matmul on this CPU in float32 and in bfloat16 (best of
    repeated calls within ``seconds`` each, after a warm-up), with the shape. ``k`` and ``n`` are
    capped at :data:`PROBE_MAX_DIM` so that the probe stays short on a slow bf16 path."""
    k, n = min(k, PROBE_MAX_DIM), min(n, PROBE_MAX_DIM)
    return {"shape": [PROBE_ROWS, k, n], "threads": torch.get_num_threads(),
            "float32_gflops": round(_gflops(PROBE_ROWS, k, n, torch.float32, seconds), 2),
            "bfloat16_gflops": round(_gflops(PROBE_ROWS, k, n, torch.bfloat16, seconds), 2)}


def machine_key(k: int, n: int) -> str:
    """What a cached probe is valid for: the CPU, the ISA torch dispatches to (which
    ``ATEN_CPU_CAPABILITY`` can lower), oneDNN's cap, the torch build, the threads and the shape."""
    return "|".join([cpu_name(), torch.backends.cpu.get_cpu_capability(), os.environ.get("ONEDNN_MAX_CPU_ISA", ""),
                     torch.__version__, f"threads={torch.get_num_threads()}",
                     f"{min(k, PROBE_MAX_DIM)}x{min(n, PROBE_MAX_DIM)}"])


def cpu_probe(k: int, n: int) -> dict:
    """:func:`gemm_probe` measured once per machine and shape, cached under a file lock (the
    processes of a launched job wait for one measurement instead of each timing a busy CPU)."""
    path = cache_dir() / "precision.json"
    key = machine_key(k, n)
    path.parent.mkdir(parents=True, exist_ok=True)
    with FileLock(str(path) + ".lock"):
        table = json.loads(path.read_text()) if path.exists() else {}
        if key not in table:
            logger.info("precision: timing float32 and bfloat16 matmuls on this CPU (once per machine, < 1 s)")
            table[key] = gemm_probe(k, n)
            write_json_atomic(path, table)
    return table[key]


def verdict(device: torch.device | str, k: int = 1024, n: int = 4096) -> Verdict:
    """The fastest precision of ``device`` for frozen weights and autocast, for a model whose
    layers multiply ``[*, k] @ [k, n]`` (hidden and intermediate sizes)."""
    device = torch.device(device)
    if device.type == "cuda":
        major, minor = torch.cuda.get_device_capability(device)
        numbers = {"gpu": torch.cuda.get_device_name(device), "capability": f"{major}.{minor}"}
        if (major, minor) >= (8, 0):
            return Verdict("cuda", "bfloat16", f"{numbers['gpu']} (compute capability {major}.{minor}) runs bf16 "
                           "natively", numbers)
        return Verdict("cuda", "float16", f"{numbers['gpu']} (compute capability {major}.{minor}) has no native "
                       "bf16: fp16 with gradient scaling", numbers)
    if device.type != "cpu":
        return Verdict(device.type, "float32", f"{device.type}: float32 (auto probes CPUs and CUDA devices only)")
    probe = cpu_probe(k, n)
    f32, bf16 = probe["float32_gflops"], probe["bfloat16_gflops"]
    numbers = {"cpu": cpu_name(), "isa": torch.backends.cpu.get_cpu_capability(), **probe}
    shape = "x".join(map(str, probe["shape"]))
    measured = f"{numbers['cpu']} ({numbers['isa']}): float32 {f32:.1f}, bfloat16 {bf16:.1f} GFLOP/s at {shape}"
    if bf16 >= CPU_BF16_MARGIN * f32:
        return Verdict("cpu", "bfloat16", measured, numbers)
    return Verdict("cpu", "float32", measured, numbers)


def model_dims(name_or_path: str, **extra) -> tuple[int, int]:
    """(hidden size, intermediate size) of a model's (language model's) config, read without
    loading weights; (1024, 4096) when there is no config to read."""
    from transformers import AutoConfig

    try:
        config = vision.text_config(AutoConfig.from_pretrained(
            models.resolve(name_or_path), **{k: v for k, v in extra.items() if k in ("revision", "trust_remote_code")}))
    except (OSError, ValueError, KeyError):
        return 1024, 4096
    hidden = int(getattr(config, "hidden_size", 1024))
    return hidden, int(getattr(config, "intermediate_size", None) or 4 * hidden)


def resolve(value: str, kind: str, found: Verdict) -> str:
    """One setting: ``value`` itself unless ``"auto"``; then float32 for ``kind`` ``"master"``
    (the trained weights), the verdict's dtype for ``"weights"``, its autocast name for
    ``"autocast"``."""
    if value != AUTO:
        return value
    if kind == "master":
        return "float32"
    return found.autocast if kind == "autocast" else found.weights


def warn_if_slow(settings: dict[str, str], found: Verdict) -> None:
    """One warning line for explicit half-precision settings this device runs slowly (a CPU
    whose probe shows bf16 slower than float32) or emulates (bf16 on CUDA before Ampere)."""
    slow = {"bfloat16", "bf16"} if found.weights != "bfloat16" else set()
    named = [k for k, v in settings.items() if v in slow]
    if not named:
        return
    if found.device == "cpu" and found.numbers.get("bfloat16_gflops", 0) >= found.numbers.get("float32_gflops", 0):
        return  # bf16 is not slower, only not fast enough to be chosen by auto
    logger.warning("precision: %s set to bf16, but %s; auto would choose %s", ", ".join(named), found.reason,
                   found.weights)


def apply_verdict(cfg, found: Verdict):
    """``cfg`` (a RunConfig) with each ``auto`` precision of :data:`RUN_KEYS` resolved by ``found``."""
    for key, kind in RUN_KEYS.items():
        cfg = with_setting(cfg, key, resolve(setting(cfg, key), kind, found))
    return cfg


def setting(cfg, key: str):
    """The value of the dotted ``key`` (``section.name`` or ``name``) of a config dataclass."""
    section, _, name = key.rpartition(".")
    return getattr(getattr(cfg, section) if section else cfg, name)


def with_setting(cfg, key: str, value):
    """A copy of the config dataclass ``cfg`` with the dotted ``key`` set to ``value``."""
    section, _, name = key.rpartition(".")
    if not section:
        return dataclasses.replace(cfg, **{name: value})
    return dataclasses.replace(cfg, **{section: dataclasses.replace(getattr(cfg, section), **{name: value})})


def run_device() -> torch.device:
    """The device a run's processes compute on, before the accelerator exists: the CUDA device of
    this process when there is one (and ``ACCELERATE_USE_CPU`` is not set), else the CPU."""
    if torch.cuda.is_available() and os.environ.get("ACCELERATE_USE_CPU", "false").lower() not in ("1", "true"):
        return torch.device("cuda", int(os.environ.get("LOCAL_RANK", "0")))
    return torch.device("cpu")


def resolve_run(cfg, run_dir: Path):
    """``cfg`` (a RunConfig) with every ``auto`` precision resolved for this machine, or as
    ``run_dir/precision.json`` recorded it when the run was started (a resumed run keeps its
    choice); and the record to write there (None when it exists). Logs the choice; writes nothing."""
    path = Path(run_dir) / "precision.json"
    given = {key: setting(cfg, key) for key in RUN_KEYS}
    saved = json.loads(path.read_text()) if path.exists() else None
    found, record = None, None
    if saved is None or any(v != AUTO for v in given.values()):
        found = verdict(run_device(), *model_dims(cfg.models.teacher, **cfg.models.teacher_kwargs))
    if saved is not None:
        chosen = {key: saved["chosen"][key] if value == AUTO and key in saved.get("chosen", {}) else
                  resolve(value, RUN_KEYS[key], found) for key, value in given.items()}
        logger.info("precision (kept from %s): %s", path, _describe(chosen))
    else:
        chosen = {key: resolve(value, RUN_KEYS[key], found) for key, value in given.items()}
        logger.info("precision: %s (%s)", _describe(chosen), found.reason)
        record = {"given": given, "chosen": chosen, "device": found.device, "reason": found.reason,
                  "numbers": found.numbers}
    if found is not None:
        warn_if_slow({k: v for k, v in given.items() if v != AUTO}, found)
    for key, value in chosen.items():
        cfg = with_setting(cfg, key, value)
    return cfg, record


def _describe(chosen: dict) -> str:
    return (f"teacher {chosen['models.teacher_dtype']}, sampling {chosen['generation.dtype']}, student "
            f"{chosen['models.dtype']} with autocast {chosen['train.mixed_precision']}")


def resolve_weights(value: str, device: torch.device | str, model: str | None = None, what: str = "dtype") -> str:
    """A single weights setting (``generate --dtype``, ``eval --dtype``) for ``device``: ``value``
    unless ``auto``, then the verdict for ``model``'s shapes; an explicit bf16 that runs slowly
    gets the warning."""
    if value != AUTO and value not in ("bfloat16",):
        return value
    found = verdict(device, *(model_dims(model) if model else (1024, 4096)))
    if value == AUTO:
        logger.info("precision: %s %s (%s)", what, found.weights, found.reason)
        return found.weights
    warn_if_slow({what: value}, found)
    return value
