"""Vision-language prompts: image parts of chat messages, the bytes behind them and the ids they
give, the processor that turns an image prompt into token ids and pixel tensors, and the image
inputs a vision-language model (VLM) takes beside ``input_ids``.

A message's ``content`` is a string (a text prompt, unchanged) or a list of parts in the HF /
OpenAI layout: ``{"type": "text", "text": ...}``, ``{"type": "image", "path": ...}``,
``{"type": "image", "url": ...}`` (``http(s)://``, ``file://`` or ``data:``), ``{"type":
"image", "image": <path or URL>}`` or ``{"type": "image_url", "image_url": {"url": ...}}``.
When the prompts are read every image is read once: relative paths resolve against the data
file's directory, the bytes must decode as an image, and the part is stored as
``{"type": "image", "path" | "url": ..., "sha256": ...}``. The prompt id hashes the image bytes
(not the location), so a changed image is a new prompt; every later read checks the bytes
against that hash, so a run never trains on other pixels than it sampled from. Images fetched
from http(s) URLs are kept under ``$DISTILLM2_CACHE/images/<sha256>`` and fetched again only
when that copy is gone. A list of text parts only is joined into one string (a text prompt).

Models. A checkpoint whose config has a ``vision_config`` is a VLM: it loads with
``AutoModelForImageTextToText`` and its ``AutoProcessor``, which :func:`attach_processor`
hangs on the tokenizer, so that every function that is handed the tokenizer (prompt path,
generation, training, evaluation, saving) finds it. Prompts of a VLM are rendered by the
processor's chat template (contents as parts) and tokenised by the processor, which expands
each image placeholder into the model's image tokens; they are never truncated (an image prompt
longer than ``data.max_prompt_length`` is an error: a cut would split an image's tokens).
Image inputs must be per image (LLaVA-style); a processor that also returns per-token inputs
(Qwen2-VL's ``mm_token_type_ids``, Gemma 3's ``token_type_ids``) is refused for image prompts.
"""

from __future__ import annotations

import base64
import hashlib
import io
import urllib.parse
import urllib.request
import weakref
from dataclasses import dataclass
from pathlib import Path

import torch

from distillm2.errors import ConfigError, DataError, MissingExtra, TokenizerMismatch
from distillm2.files import atomic_path, cache_dir

# What a processor returns about the text; everything else is an image input of the model.
TEXT_KEYS = frozenset({"input_ids", "attention_mask"})
FETCH_TIMEOUT_S = 30


def _pil():
    try:
        from PIL import Image
    except ImportError:
        raise MissingExtra("image prompts", command="pip install pillow") from None
    return Image


# Image parts ------------------------------------------------------------------------------------


def is_image(part) -> bool:
    """Whether a content part is an image (in any accepted layout)."""
    return isinstance(part, dict) and part.get("type") in ("image", "image_url")


def has_images(messages) -> bool:
    """Whether any message of ``messages`` holds an image part."""
    return isinstance(messages, list) and any(
        isinstance(m, dict) and isinstance(m.get("content"), list) and any(is_image(p) for p in m["content"])
        for m in messages)


def image_parts(messages: list[dict]) -> list[dict]:
    """The image parts of ``messages`` in the order the template places them (message order)."""
    return [p for m in messages if isinstance(m["content"], list) for p in m["content"] if is_image(p)]


def has_text(content) -> bool:
    """Whether a content (string or parts) holds anything: text, or an image."""
    if isinstance(content, str):
        return bool(content.strip())
    return any(is_image(p) or p.get("text", "").strip() for p in content)


def canonical_content(content):
    """The content as the prompt id hashes it: a string as is (text ids stay what they were);
    parts with each image reduced to the hash of its bytes."""
    if isinstance(content, str):
        return content
    return [{"type": "image", "sha256": p["sha256"]} if is_image(p) else {"type": "text", "text": p["text"]}
            for p in content]


def parse_content(content, where: str, base: Path | None = None):
    """A message content as stored: a string, or parts with every image read, checked and
    hashed (``base``: the directory relative paths resolve against; default the working
    directory). A list of text parts only becomes one string (parts joined by newlines)."""
    if isinstance(content, str):
        return content
    if not isinstance(content, list) or not content:
        raise DataError(f"{where}: 'content' must be a string or a non-empty list of parts, got {content!r:.60}")
    parts = []
    for j, part in enumerate(content):
        here = f"{where}, part {j}"
        if not isinstance(part, dict):
            raise DataError(f"{here}: expected a {{type, ...}} object, got {part!r:.60}")
        if part.get("type") == "text":
            if not isinstance(part.get("text"), str):
                raise DataError(f"{here}: a text part needs a string 'text'")
            parts.append({"type": "text", "text": part["text"]})
        elif is_image(part):
            parts.append(_image_part(part, here, base))
        else:
            raise DataError(f"{here}: unknown part type {part.get('type')!r}; expected text, image or image_url")
    if not any(is_image(p) for p in parts):
        return "\n".join(p["text"] for p in parts)
    return parts


def _image_part(part: dict, where: str, base: Path | None) -> dict:
    if part["type"] == "image_url":
        ref = part.get("image_url")
        ref = ref.get("url") if isinstance(ref, dict) else ref
        given = {"url": ref}
    else:
        given = {k: part[k] for k in ("path", "url", "image") if part.get(k) is not None}
    if len(given) != 1 or not isinstance(next(iter(given.values())), str):
        raise DataError(f"{where}: an image part needs exactly one string 'path' or 'url' (or image_url.url), "
                        f"got {part!r:.100}")
    kind, ref = next(iter(given.items()))
    if kind == "image":  # HF's {"type": "image", "image": "<path or URL>"}
        kind = "url" if urllib.parse.urlparse(ref).scheme in ("http", "https", "file", "data") else "path"
    if kind == "url" and ref.startswith("file://"):
        kind, ref = "path", urllib.request.url2pathname(urllib.parse.urlparse(ref).path)
    if kind == "path":
        path = Path(ref).expanduser()
        source = {"path": str((path if path.is_absolute() else (base or Path.cwd()) / path).resolve())}
    else:
        source = {"url": ref}
    data = _read_source(source, where)
    _check_decodes(data, source, where)
    digest = hashlib.sha256(data).hexdigest()
    if part.get("sha256") not in (None, digest):
        raise DataError(f"{where}: image {_name(source)} changed since this prompt was recorded (sha256 "
                        f"{part['sha256'][:12]}... then, {digest[:12]}... now); start a new run or restore it")
    return {"type": "image", **source, "sha256": digest}


def _name(source: dict) -> str:
    ref = source.get("path") or source.get("url", "")
    return ref if len(ref) <= 80 else ref[:60] + "..."


def _url_cache(digest: str) -> Path:
    return cache_dir() / "images" / digest


def _read_source(source: dict, where: str) -> bytes:
    """The bytes of a path or URL; a clear error naming it when they cannot be read."""
    if "path" in source:
        path = Path(source["path"])
        if not path.is_file():
            raise DataError(f"{where}: image file not found: {path} (expected an image file; relative paths "
                            "resolve against the data file's directory)")
        try:
            return path.read_bytes()
        except OSError as err:
            raise DataError(f"{where}: cannot read image {path}: {err}") from None
    url = source["url"]
    if url.startswith("data:"):
        header, _, payload = url.partition(",")
        if not header.startswith("data:image/") or ";base64" not in header:
            raise DataError(f"{where}: a data: URL image must be data:image/<type>;base64,<bytes>, got {url[:40]!r}")
        try:
            return base64.b64decode(payload, validate=True)
        except ValueError as err:
            raise DataError(f"{where}: data: URL image is not valid base64 ({err})") from None
    if urllib.parse.urlparse(url).scheme not in ("http", "https"):
        raise DataError(f"{where}: image URL {url[:80]!r}: expected http(s)://, file:// or data:")
    try:
        with urllib.request.urlopen(url, timeout=FETCH_TIMEOUT_S) as response:  # noqa: S310 - a user's URL
            data = response.read()
    except (OSError, ValueError) as err:
        raise DataError(f"{where}: cannot fetch image {url[:80]} ({err}); expected a reachable image URL "
                        "(or a local path)") from None
    # Kept by content: later reads (every round, step and rank) take the copy, not the network.
    target = _url_cache(hashlib.sha256(data).hexdigest())
    if not target.exists():
        with atomic_path(target) as tmp:
            tmp.write_bytes(data)
    return data


def _check_decodes(data: bytes, source: dict, where: str) -> None:
    image = _pil()
    try:
        with image.open(io.BytesIO(data)) as img:
            img.verify()
    except Exception as err:  # noqa: BLE001 - PIL raises many kinds for a file that is not an image
        raise DataError(f"{where}: {_name(source)} is not a readable image ({type(err).__name__}: "
                        f"{str(err)[:80]}); expected PNG, JPEG or another format PIL opens") from None


def image_bytes(part: dict) -> bytes:
    """The bytes of a stored image part, checked against its hash (the cached copy of a URL
    when there is one)."""
    where = f"image {_name(part)}"
    cached = _url_cache(part["sha256"]) if "url" in part and not part["url"].startswith("data:") else None
    data = cached.read_bytes() if cached is not None and cached.exists() else _read_source(part, where)
    if hashlib.sha256(data).hexdigest() != part["sha256"]:
        raise DataError(f"{where} changed since the prompts were read (its sha256 differs from the one recorded "
                        "with the prompt); start a new run or restore the image")
    return data


def load_image(part: dict):
    """A stored image part as a PIL image (decoded, RGB)."""
    with _pil().open(io.BytesIO(image_bytes(part))) as img:
        return img.convert("RGB")


# Processors -------------------------------------------------------------------------------------


def attach_processor(processor):
    """The processor's tokenizer, carrying the processor (every caller is handed the tokenizer)."""
    tokenizer = processor.tokenizer
    tokenizer._distillm2_processor = processor
    return tokenizer


def processor_of(tokenizer):
    """The processor a VLM's tokenizer carries, or None (a text model)."""
    return getattr(tokenizer, "_distillm2_processor", None)


def save_tokenizer(tokenizer, target) -> None:
    """``save_pretrained`` of the processor a tokenizer carries (tokenizer included), else the
    tokenizer: a saved VLM directory loads again with its processor."""
    (processor_of(tokenizer) or tokenizer).save_pretrained(target)


def _template_content(content) -> list[dict]:
    if isinstance(content, str):
        return [{"type": "text", "text": content}]
    return [{"type": "image"} if is_image(p) else {"type": "text", "text": p["text"]} for p in content]


def render(processor, messages: list[dict], add_generation_prompt: bool = True) -> str:
    """A prompt as a VLM sees it: the processor's chat template over the messages with their
    contents as parts (an image part renders as the template's placeholder). Without a
    template: the image placeholders, then the text of each message."""
    if getattr(processor, "chat_template", None):
        conversation = [{"role": m["role"], "content": _template_content(m["content"])} for m in messages]
        return processor.apply_chat_template(conversation, tokenize=False, add_generation_prompt=add_generation_prompt)
    return "\n\n".join("".join(f"{processor.image_token}\n" if p.get("type") == "image" else p["text"]
                               for p in _template_content(m["content"])) for m in messages) + "\n"


def _process(processor, text: str, images: list | None) -> dict:
    """The processor over one rendered prompt; special tokens as HF's processor chat path adds
    them (a beginning-of-sequence token unless the template already starts with it)."""
    bos = getattr(processor.tokenizer, "bos_token", None)
    out = processor(text=[text], images=images or None, add_special_tokens=not (bos and text.startswith(bos)),
                    return_tensors="pt")
    return dict(out)


@dataclass(frozen=True)
class PromptImages:
    """The images of one prompt, loaded when a batch needs them (pixel tensors of a whole data
    set would not fit in memory): the processor, the rendered prompt and its image parts."""

    processor: object
    text: str
    parts: tuple

    def tensors(self, prompt_ids: list[int]) -> dict[str, torch.Tensor]:
        """The model's image inputs for this prompt (``pixel_values`` ``[n, C, H, W]`` for LLaVA,
        plus e.g. LLaVA-NeXT's ``image_sizes``), each with one entry per image along dim 0.
        ``prompt_ids`` (as encoded) must still be what the processor gives."""
        out = _process(self.processor, self.text, [load_image(p) for p in self.parts])
        ids = out["input_ids"][0].tolist()
        if ids != list(prompt_ids):
            raise DataError(f"image prompt with {', '.join(_name(p) for p in self.parts)}: its tokens changed since "
                            "it was encoded (a different processor or image)")
        return _image_inputs(out)


def _image_inputs(out: dict) -> dict[str, torch.Tensor]:
    """The image inputs of a processor's output; per-token inputs are refused (see module)."""
    ids = out["input_ids"]
    per_token = [k for k, v in out.items() if k not in TEXT_KEYS and isinstance(v, torch.Tensor)
                 and v.shape == ids.shape]
    if per_token:
        raise ConfigError(f"this model's processor returns per-token inputs ({', '.join(per_token)}: Qwen2-VL's "
                          "multimodal RoPE, Gemma 3's image attention), which distillm2 does not lay out yet; "
                          "image prompts work with models whose image inputs are per image (LLaVA-style)")
    return {k: v for k, v in out.items() if k not in TEXT_KEYS and isinstance(v, torch.Tensor)}


def _probe(processor) -> dict[str, torch.Tensor]:
    """A probe image prompt through ``processor``: ids and image inputs (per-token inputs refused)."""
    img = _pil().new("RGB", (48, 40), (200, 120, 30))
    messages = [{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": "probe"}]}]
    out = _process(processor, render(processor, messages), [img])
    return {"input_ids": out["input_ids"], **_image_inputs(out)}


_IDS_CACHE_SIZE = 4096
# Per processor, the ids of the prompts it has tokenised (every row of a pair, every round, asks
# again); kept beside the processor, not on it, so that saving it never copies the cache.
_IDS: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()


def prompt_inputs(processor, messages: list[dict], max_prompt_length: int | None = None
                  ) -> tuple[list[int], PromptImages | None]:
    """A VLM's prompt: token ids with every image placeholder expanded into the model's image
    tokens, and its images (None for a text prompt). A text prompt keeps its last
    ``max_prompt_length`` tokens; an image prompt longer than that is an error."""
    text = render(processor, messages)
    parts = tuple(image_parts(messages))
    cache = _IDS.setdefault(processor, {})
    key = (text, tuple(p["sha256"] for p in parts))
    if key not in cache:
        if len(cache) >= _IDS_CACHE_SIZE:
            cache.clear()
        images = [load_image(p) for p in parts]
        cache[key] = _process(processor, text, images)["input_ids"][0].tolist()
    ids = list(cache[key])
    images = PromptImages(processor, text, parts) if parts else None
    if max_prompt_length and len(ids) > max_prompt_length:
        if images is not None:
            raise DataError(too_long(ids, max_prompt_length, parts))
        ids = ids[-max_prompt_length:]
    return ids, images


def too_long(ids: list[int], limit: int, parts) -> str:
    """The error of an image prompt that does not fit ``data.max_prompt_length``."""
    return (f"an image prompt ({', '.join(_name(p) for p in parts)}) is {len(ids)} tokens with its image tokens, "
            f"more than data.max_prompt_length={limit}; image prompts are never cut (a cut would split an image's "
            "tokens): raise data.max_prompt_length (and data.max_length)")


def batch_inputs(model, rows: list[dict | None]) -> dict[str, torch.Tensor]:
    """The image inputs of a batch: each key's per-row tensors concatenated along dim 0 in row
    order (the order the model fills its image tokens in), other dims zero-padded to the
    largest (LLaVA-NeXT's patch counts; the model drops padded patches by ``image_sizes``),
    floating tensors cast to the model's dtype. ``{}`` when no row has images."""
    present = [r for r in rows if r]
    if not present:
        return {}
    dtype = next((p.dtype for p in model.parameters() if p.is_floating_point()), torch.float32)
    out = {}
    for key in present[0]:
        tensors = [r[key] for r in present]
        shape = [max(t.shape[d] for t in tensors) for d in range(1, tensors[0].dim())]
        padded = []
        for t in tensors:
            if list(t.shape[1:]) != shape:
                grown = t.new_zeros((t.shape[0], *shape))
                grown[tuple(slice(0, s) for s in t.shape)] = t
                t = grown
            padded.append(t)
        value = torch.cat(padded)
        out[key] = value.to(dtype) if value.is_floating_point() else value
    return out


def check_processors(teacher_tokenizer, student_tokenizer) -> None:
    """Teacher and student VLMs must turn an image into the same tokens and pixels (the student's
    processor prepares both models' inputs): a probe image through both processors must give
    equal ids and equal tensors. Raises :class:`TokenizerMismatch` naming what differs."""
    t, s = processor_of(teacher_tokenizer), processor_of(student_tokenizer)
    if t is None or s is None:
        return
    try:
        outs = [_probe(p) for p in (t, s)]
    except ConfigError:
        return  # a processor image prompts cannot use: check_run refuses them (text prompts are fine)
    differ = sorted(k for k in set(outs[0]) | set(outs[1])
                    if k not in outs[0] or k not in outs[1] or not torch.equal(outs[0][k], outs[1][k]))
    if differ:
        raise TokenizerMismatch(f"teacher and student processors differ on an image prompt ({', '.join(differ)}); "
                                "both models must see the same image tokens and pixels")


def check_image_token(tokenizer, model, who: str) -> None:
    """A VLM's config must name the image token its processor writes."""
    processor = processor_of(tokenizer)
    expected = getattr(processor, "image_token_id", None) if processor is not None else None
    got = getattr(model.config, "image_token_id", None) if is_vision_config(model.config) else None
    if expected is not None and got is not None and int(got) != int(expected):
        raise TokenizerMismatch(f"{who}'s image token id is {got}, its processor writes {expected}")


# Models -----------------------------------------------------------------------------------------


def is_vision_config(config) -> bool:
    """Whether a model config is a vision-language model's (it has a vision tower)."""
    return getattr(config, "vision_config", None) is not None


def text_config(config):
    """The language model's config (the config itself for a text model)."""
    return config.get_text_config() if hasattr(config, "get_text_config") else config


def vision_tower(model):
    """A VLM's vision tower (None for a text model)."""
    if not is_vision_config(getattr(model, "config", None)):
        return None
    tower = model.get_encoder(modality="image")
    return None if tower is model else tower


def refuse_images(prompts: list[dict], what: str) -> None:
    """``ConfigError`` naming ``what`` when any prompt has images (a path that would drop them)."""
    for p in prompts:
        if has_images(p.get("messages") or p.get("prompt")):
            raise ConfigError(f"{what} cannot take image prompts (prompt {p.get('id', '?')} has images); "
                              "image prompts run with generation.backend hf and the default training loop")


def check_run(cfg, prompts: list[dict], teacher_tokenizer, student_tokenizer) -> None:
    """Before any work: a run on image prompts needs VLMs on both sides and the paths that take
    images (hf generation; not train.fused_loss, train.teacher_topk, loss skd)."""
    if not any(has_images(p["messages"]) for p in prompts):
        return
    for who, tok in (("teacher", teacher_tokenizer), ("student", student_tokenizer)):
        if processor_of(tok) is None:
            raise ConfigError(f"the prompts have images but the {who} is not a vision-language model (its config "
                              "has no vision_config and it has no image processor)")
    _probe(processor_of(student_tokenizer))  # its processor prepares both models' image inputs
    if cfg.generation.backend != "hf":
        refuse_images(prompts, f"generation.backend {cfg.generation.backend}")
    if cfg.loss.name == "skd":
        refuse_images(prompts, "loss skd (interleaved sampling)")
    check_training(cfg.train, prompts)


def check_training(train_cfg, rows: list[dict]) -> None:
    """The training options that cannot take image prompts refuse them (``rows``: prompts or pairs)."""
    if train_cfg.fused_loss:
        refuse_images(rows, "train.fused_loss (it runs the language model alone)")
    if train_cfg.teacher_topk:
        refuse_images(rows, "train.teacher_topk (its cache is keyed by token ids, which do not see pixels)")
