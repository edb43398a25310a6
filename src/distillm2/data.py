"""Prompts, pair files, the one prompt path (render + tokenise + truncate), and collation.

Prompt records are ``{"id", "messages"}``; ids are stable hashes of the prompt, and everything
downstream (responses, pairs) is joined by id, never by row index. A prompt reaches a model only
through :func:`prompt_token_ids` -- its chat template with the generation prompt added, tokenised
without extra special tokens, truncated to its last ``max_prompt_length`` tokens -- in training,
in every generation backend, in evaluation, in the judge and in speculative decoding, so the text
a response was sampled from is exactly the text it is trained on. Training rows append the
response tokens and the end-of-turn token (only when the response ended on its own; a response
cut by ``max_new_tokens`` gets no end token, so the student is never taught to stop mid-sentence).
Labels are the response tokens only.

Image prompts (chat contents with image parts) take the same path through the processor of a
vision-language model (:mod:`distillm2.vision`): their ids hash the image bytes, and their rows
carry the images, loaded into pixel tensors when a batch is collated.
"""

from __future__ import annotations

import hashlib
import json
import os
from dataclasses import dataclass, field
from pathlib import Path

import torch

from distillm2 import vision
from distillm2.demo_prompts import demo_instructions
from distillm2.errors import DataError, MissingExtra
from distillm2.files import read_jsonl

# Prompts ----------------------------------------------------------------------------------------


def prompt_id(prompt) -> str:
    """Stable id of a prompt (a string or a messages list): 16 hex digits of its SHA-1. An image
    part counts by the hash of its bytes (:func:`vision.canonical_content`), not its location."""
    if isinstance(prompt, str):
        prompt = [{"role": "user", "content": prompt}]
    canonical = json.dumps(
        [{"role": m["role"], "content": vision.canonical_content(m["content"])} for m in prompt],
        ensure_ascii=False, sort_keys=True, separators=(",", ":"),
    )
    return hashlib.sha1(canonical.encode("utf-8")).hexdigest()[:16]


def records(messages_list: list[list[dict]]) -> list[dict]:
    """Prompt records ``{"id", "messages"}`` for message lists built in code."""
    return [{"id": prompt_id(m), "messages": m} for m in messages_list]


DEMO_SPLITS = ("train", "heldout", "all")


def demo_prompts(split: str = "train") -> list[dict]:
    """The bundled demo prompts of one split (``train``, ``heldout`` or ``all``), as prompt
    records ``{"id", "messages", "kind"}`` sorted by id; about one in seven ids is held out."""
    if split not in DEMO_SPLITS:
        raise DataError(f"unknown demo split {split!r}; valid: {', '.join(DEMO_SPLITS)}")
    out = []
    for kind, text in demo_instructions():
        messages = [{"role": "user", "content": text}]
        pid = prompt_id(messages)
        heldout = int(pid, 16) % 7 == 0
        if split == "all" or (split == "heldout") == heldout:
            out.append({"id": pid, "messages": messages, "kind": kind})
    return sorted(out, key=lambda r: r["id"])


def selfinst_prompts() -> list[dict]:
    """Self-Instruct's 252 user-oriented instructions (Apache-2.0, bundled): the instruction and
    its input as the prompt, the reference output as ``response``."""
    path = Path(__file__).parent / "bundled" / "selfinst_user_oriented.jsonl"
    out = []
    for row in read_jsonl(path):
        instance = row["instances"][0]
        text = row["instruction"] + (f"\n\n{instance['input']}" if instance.get("input") else "")
        messages = [{"role": "user", "content": text}]
        out.append({"id": prompt_id(messages), "messages": messages, "response": instance["output"]})
    return out


_AUTO_FIELDS = ("messages", "prompt", "instruction", "question", "input", "text")


def to_messages(value, where: str, base: Path | None = None) -> list[dict]:
    """A prompt (a string or a messages list) as messages; a trailing assistant turn is dropped
    (:func:`final_answer` reads it). A content may be a list of text and image parts
    (:func:`vision.parse_content`; relative image paths resolve against ``base``)."""
    if isinstance(value, str):
        if not value.strip():
            raise DataError(f"{where}: empty prompt")
        return [{"role": "user", "content": value}]
    if isinstance(value, list) and value and all(isinstance(m, dict) for m in value):
        for i, m in enumerate(value):
            if "role" not in m or "content" not in m or not isinstance(m["content"], (str, list)):
                raise DataError(f"{where}: message {i} needs string 'role' and 'content' (a string or a list of parts)")
        # A conversation that ends with the assistant's answer: the prompt is what precedes it.
        end = len(value)
        while end and value[end - 1]["role"] == "assistant":
            end -= 1
        messages = [{"role": m["role"], "content": vision.parse_content(m["content"], f"{where}: message {i}", base)}
                    for i, m in enumerate(value[:end])]
        if not messages or not any(vision.has_text(m["content"]) for m in messages if m["role"] == "user"):
            raise DataError(f"{where}: empty prompt (no user message with content)")
        return messages
    raise DataError(
        f"{where}: expected a string or a list of {{role, content}} messages, got {value!r:.80}"
    )


def final_answer(value) -> str | None:
    """The last assistant turn of a messages list that ends with one (a ground-truth response)."""
    if isinstance(value, list) and value and isinstance(value[-1], dict) and value[-1].get("role") == "assistant":
        content = value[-1].get("content")
        return content if isinstance(content, str) and content.strip() else None
    return None


def _records_from_rows(rows, source: str, fld: str | None, response_field: str | None = None,
                       base: Path | None = None) -> list[dict]:
    if not rows:
        raise DataError(f"{source}: no rows")
    if fld is None:
        fld = next((f for f in _AUTO_FIELDS if f in rows[0]), None)
        if fld is None:
            raise DataError(
                f"{source}: no prompt field found; set data.field (row 1 has keys: "
                f"{', '.join(rows[0])}; looked for {', '.join(_AUTO_FIELDS)})"
            )
    out, seen = [], set()
    for number, row in enumerate(rows, start=1):
        where = f"{source}:{number}"
        if fld not in row:
            raise DataError(f"{where}: missing field {fld!r} (row has keys: {', '.join(row)})")
        messages = to_messages(row[fld], where, base)
        pid = prompt_id(messages)
        if pid in seen:
            continue  # the same prompt twice: one id, one record
        seen.add(pid)
        record = {"id": pid, "messages": messages}
        if response_field is not None:
            if response_field not in row or not isinstance(row[response_field], str):
                raise DataError(f"{where}: missing string field {response_field!r} (data.response_field)")
            record["response"] = row[response_field]
        elif final_answer(row[fld]) is not None:
            record["response"] = final_answer(row[fld])
        out.append(record)
    return out


def read_table(path: Path) -> list[dict]:
    """The rows of a .jsonl, .json (a list of objects), .parquet or .csv file."""
    suffix = path.suffix.lower()
    if suffix == ".jsonl":
        return read_jsonl(path)
    if suffix == ".json":
        try:
            rows = json.loads(path.read_text(encoding="utf-8"))
        except json.JSONDecodeError as err:
            raise DataError(f"{path}:{err.lineno}: not valid JSON ({err.msg})") from None
        except UnicodeDecodeError as err:
            raise DataError(f"{path}: not UTF-8 text ({err.reason} at byte {err.start}); save it as UTF-8") from None
        if not isinstance(rows, list):
            raise DataError(f"{path}: expected a JSON list of objects")
        return rows
    if suffix in (".parquet", ".csv"):
        import pandas as pd

        frame = pd.read_parquet(path) if suffix == ".parquet" else pd.read_csv(path)
        return [{k: (v.tolist() if hasattr(v, "tolist") else v) for k, v in r.items()}
                for r in frame.to_dict("records")]
    raise DataError(f"{path}: unknown prompt file type {suffix!r} (use .jsonl, .json, .parquet or .csv)")


def load_prompts(source: str, field: str | None = None, limit: int | None = None,
                 response_field: str | None = None, columns: dict | None = None, hf: dict | None = None) -> list[dict]:
    """Prompt records ``{"id", "messages"[, "response"]}`` from ``source``:

    - a ``.jsonl``, ``.json`` (a list of objects), ``.parquet`` or ``.csv`` file, with ``field``
      naming the column (a string or a chat ``messages`` list; guessed when None);
    - ``demo:train`` / ``demo:heldout`` / ``demo:all``: the bundled demo set;
    - ``selfinst``: Self-Instruct's user-oriented instructions with reference outputs (bundled);
    - ``hf:<dataset>[:<split>]``: ``datasets.load_dataset`` (``hf`` holds config, split,
      revision, data_files, streaming; see :func:`load_hf_rows`).
    ``columns`` renames columns first. Duplicate prompts are kept once. ``limit`` keeps the first n. A ground-truth ``response`` is
    kept from ``response_field`` or from a messages list that ends with the assistant's turn.
    Image parts of messages are read (paths relative to the file's directory; for ``hf:`` the
    working directory) and hashed into the ids (:mod:`distillm2.vision`).
    """
    if source.startswith("demo"):
        split = source.split(":", 1)[1] if ":" in source else "train"
        found = [{"id": r["id"], "messages": r["messages"]} for r in demo_prompts(split)]
    elif source == "selfinst":
        found = selfinst_prompts()
    elif source.startswith("hf:"):
        found = _records_from_rows(_rename(load_hf_rows(source, limit=limit, **(hf or {})), columns), source,
                                   field, response_field)
    else:
        path = Path(source)
        if not path.exists():
            raise DataError(f"prompt file not found: {path}")
        found = _records_from_rows(_rename(read_table(path), columns), str(path), field, response_field,
                                   base=path.resolve().parent)
    return found[:limit] if limit else found


def _rename(rows: list[dict], columns: dict | None) -> list[dict]:
    if not columns:
        return rows
    return [{columns.get(k, k): v for k, v in row.items()} for row in rows]


def load_hf_rows(source: str, *, config: str | None = None, split: str = "train", revision: str | None = None,
                 data_files: list[str] | None = None, streaming: bool = False, limit: int | None = None) -> list[dict]:
    """Rows of ``hf:<dataset>[:<split>]`` through ``datasets.load_dataset``: a hub set (with its
    configuration, revision and split), or a builder such as ``json``, ``parquet`` or ``csv`` over
    ``data_files``; streamed when asked (then only the first ``limit`` rows are read)."""
    try:
        import datasets
    except ImportError:
        raise MissingExtra("hf: data sources", "eval") from None
    name, _, given_split = source[3:].partition(":")
    try:
        loaded = datasets.load_dataset(name, config, split=given_split or split, revision=revision,
                                       data_files=data_files, streaming=streaming)
        if streaming:
            return [dict(row) for _, row in zip(range(limit or 10**12), loaded)]
        return [dict(row) for row in loaded]
    except (FileNotFoundError, ConnectionError, ValueError, OSError) as err:
        offline = os.environ.get("HF_HUB_OFFLINE") == "1" or os.environ.get("HF_DATASETS_OFFLINE") == "1"
        hint = " (the hub is unreachable: HF_HUB_OFFLINE=1 or no network, and it is not cached)" if offline else ""
        raise DataError(f"{source}: cannot load the dataset{hint}: {str(err).splitlines()[0][:200]}") from None


def render_prompt(tokenizer, messages: list[dict]) -> str:
    """The prompt text the model sees: its chat template with the generation prompt added."""
    if getattr(tokenizer, "chat_template", None):
        return tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
    # A base model without a template: the user turns as plain text.
    return "\n\n".join(m["content"] for m in messages) + "\n"


_MARK = "\u2063DISTILLM2-END-OF-TURN\u2063"


def end_of_turn_ids(tokenizer) -> list[int]:
    """The tokens that end an assistant turn: the special token the chat template puts right
    after the assistant's text (``<|im_end|>``, ``<end_of_turn>``, ``<|end|>``, ...), then the
    tokenizer's end-of-sequence token. The first one is what training appends to a response that
    finished; all of them stop generation."""
    cached = getattr(tokenizer, "_distillm2_end_of_turn", None)
    if cached is not None:
        return cached
    ids = []
    processor = vision.processor_of(tokenizer)  # a VLM's template is its processor's
    template = processor if processor is not None and getattr(processor, "chat_template", None) else tokenizer
    if getattr(template, "chat_template", None):
        conversation = [{"role": "user", "content": "hi"}, {"role": "assistant", "content": _MARK}]
        try:
            text = (vision.render(processor, conversation, add_generation_prompt=False) if template is processor
                    else tokenizer.apply_chat_template(conversation, tokenize=False))
        except Exception:  # noqa: BLE001 - a template that cannot render a reply: fall back to eos
            text = ""
        if _MARK in text:
            tail = tokenizer(text[text.rindex(_MARK) + len(_MARK):], add_special_tokens=False)["input_ids"]
            special = set(tokenizer.all_special_ids) | {i for i, t in tokenizer.added_tokens_decoder.items() if t.special}
            ids += [t for t in tail[:3] if t in special][:1]
    if tokenizer.eos_token_id is not None and tokenizer.eos_token_id not in ids:
        ids.append(tokenizer.eos_token_id)
    try:
        tokenizer._distillm2_end_of_turn = ids
    except AttributeError:
        pass
    return ids


def prompt_inputs(tokenizer, messages: list[dict], max_prompt_length: int | None = None
                  ) -> tuple[list[int], vision.PromptImages | None]:
    """The one prompt path: rendered, tokenised without added special tokens (the template has
    them), truncated to the last ``max_prompt_length`` tokens (the generation prompt is at the
    end); with the prompt's images (None for text). Every caller that shows a prompt to a model
    uses this, or :func:`prompt_token_ids`. A VLM's tokenizer carries its processor: its prompts
    go through :func:`vision.prompt_inputs` (images expanded into image tokens, never cut)."""
    processor = vision.processor_of(tokenizer)
    if processor is not None:
        return vision.prompt_inputs(processor, messages, max_prompt_length)
    if vision.has_images(messages):
        raise DataError(f"an image prompt ({vision.image_parts(messages)[0].get('path') or 'URL'}) reached a model "
                        "that is not a vision-language model (it has no image processor)")
    ids = tokenizer(render_prompt(tokenizer, messages), add_special_tokens=False)["input_ids"]
    return (ids[-max_prompt_length:] if max_prompt_length else ids), None


def prompt_token_ids(tokenizer, messages: list[dict], max_prompt_length: int | None = None) -> list[int]:
    """:func:`prompt_inputs` for the paths that take text only (vLLM, servers, judges,
    speculative decoding, interleaved sampling): an image prompt is an error there, never a
    prompt whose image is silently dropped."""
    if vision.has_images(messages):
        raise DataError("this step takes text prompts only and the prompt has images: image prompts run with "
                        "generation.backend hf, the default training loop and the rouge / kl / self evaluations")
    return prompt_inputs(tokenizer, messages, max_prompt_length)[0]


# Tokenisation and collation ---------------------------------------------------------------------


@dataclass
class EncodedRow:
    """Token ids of one trained row."""

    prompt_ids: list[int]
    response_ids: list[int]  # response tokens (+ end-of-turn token when it finished)
    images: vision.PromptImages | None = None  # an image prompt's images, loaded at collation


@dataclass
class TruncationStats:
    """How many prompts and responses were cut to fit the length limits."""

    prompts: int = 0
    responses: int = 0
    rows: int = 0

    def report(self) -> str:
        """One line for the log."""
        return (f"truncated {self.prompts} of {self.rows} prompts (max_prompt_length) and "
                f"{self.responses} responses (max_length)")


def encode(tokenizer, messages, response: str, finished: bool, max_prompt_length: int,
           max_length: int, stats: TruncationStats | None = None) -> EncodedRow:
    """Token ids of prompt and response, truncated (and counted in ``stats``): the prompt keeps its
    last ``max_prompt_length`` tokens, the response is cut so that the row fits ``max_length``."""
    prompt_ids, images = prompt_inputs(tokenizer, messages)
    response_ids = tokenizer(response, add_special_tokens=False)["input_ids"] if response else []
    if finished:
        response_ids = response_ids + end_of_turn_ids(tokenizer)[:1]
    if stats is not None:
        stats.rows += 1
    if len(prompt_ids) > max_prompt_length:
        if images is not None:
            raise DataError(vision.too_long(prompt_ids, max_prompt_length, images.parts))
        prompt_ids = prompt_ids[-max_prompt_length:]
        if stats is not None:
            stats.prompts += 1
    room = max(max_length - len(prompt_ids), 0)
    if len(response_ids) > room:
        response_ids = response_ids[:room]
        if stats is not None:
            stats.responses += 1
    return EncodedRow(prompt_ids, response_ids, images)


def encode_pairs(pairs: list[dict], tokenizer, rows: tuple[str, ...], max_prompt_length: int,
                 max_length: int) -> tuple[list[dict[str, EncodedRow]], TruncationStats]:
    """Encode the ``rows`` (``"chosen"``, ``"rejected"``) of every pair; returns one
    ``{row kind: EncodedRow}`` per pair and the truncation counts."""
    stats = TruncationStats()
    encoded = [{which: encode(tokenizer, pair["prompt"], pair[which], bool(pair.get(f"{which}_finished", True)),
                              max_prompt_length, max_length, stats)
                for which in rows} for pair in pairs]
    return encoded, stats


def encode_responses(tokenizer, prompts: list[dict], responses: list[dict], max_prompt_length: int,
                     max_length: int) -> list[EncodedRow]:
    """Generated rows (``{"id", "response", "finish_reason"}``) joined to ``prompts`` by id and
    encoded for a teacher-forced pass; rows with no response token are dropped."""
    by_id = {p["id"]: p for p in prompts}
    encoded = [encode(tokenizer, by_id[r["id"]]["messages"], r["response"], r.get("finish_reason") == "stop",
                      max_prompt_length, max_length) for r in responses if r["id"] in by_id]
    return [r for r in encoded if r.response_ids]


@dataclass
class Batch:
    """Rows laid out as [left-padded prompt | right-padded response], so that every row's
    response starts at the same column and one ``logits_to_keep`` range selects exactly the
    positions that predict response tokens (no lm_head work on prompt tokens).

    input_ids, attention_mask, position_ids: ``[R, P + L]``; labels, mask: ``[R, L]``;
    ``keep``: the ``[L]`` positions (P - 1 ... P + L - 2) whose logits predict the response.
    ``images``: per row, an image prompt's image inputs (``{"pixel_values": [n, C, H, W], ...}``)
    or None; empty for text batches. An image's tokens sit inside its row's prompt, so ``keep``
    is the same as for text (:func:`vision.batch_inputs` joins the rows' tensors for a forward).
    """

    input_ids: torch.Tensor
    attention_mask: torch.Tensor
    position_ids: torch.Tensor
    labels: torch.Tensor
    mask: torch.Tensor
    keep: torch.Tensor
    images: list[dict[str, torch.Tensor] | None] = field(default_factory=list)

    def to(self, device) -> Batch:
        """Move every tensor to ``device`` (in place); returns self."""
        for name in ("input_ids", "attention_mask", "position_ids", "labels", "mask", "keep"):
            setattr(self, name, getattr(self, name).to(device))
        self.images = [None if r is None else {k: v.to(device) for k, v in r.items()} for r in self.images]
        return self

    @property
    def num_tokens(self) -> int:
        """Trained (masked-in) response tokens."""
        return int(self.mask.sum())


def sub_batch(batch: Batch, rows: slice) -> Batch:
    """The rows ``rows`` of ``batch``, with the same columns (and so the same ``keep``)."""
    return Batch(batch.input_ids[rows], batch.attention_mask[rows], batch.position_ids[rows], batch.labels[rows],
                 batch.mask[rows], batch.keep, batch.images[rows])


def collate(rows: list[EncodedRow], pad_id: int) -> Batch:
    """Pad encoded rows into a :class:`Batch`. Rows with an empty response keep one masked-out
    column so that shapes stay valid."""
    p = max(len(r.prompt_ids) for r in rows)
    resp = max(1, max(len(r.response_ids) for r in rows))
    n = len(rows)
    ids = torch.full((n, p + resp), pad_id, dtype=torch.long)
    attn = torch.zeros((n, p + resp), dtype=torch.long)
    labels = torch.zeros((n, resp), dtype=torch.long)
    mask = torch.zeros((n, resp), dtype=torch.bool)
    for i, r in enumerate(rows):
        lp, lr = len(r.prompt_ids), len(r.response_ids)
        ids[i, p - lp : p] = torch.tensor(r.prompt_ids)
        attn[i, p - lp : p + lr] = 1
        if lr:
            ids[i, p : p + lr] = torch.tensor(r.response_ids)
            labels[i, :lr] = torch.tensor(r.response_ids)
            mask[i, :lr] = True
    # RoPE positions count real tokens only, as in left-padded generation.
    position_ids = (attn.cumsum(-1) - 1).clamp_min(0)
    keep = torch.arange(p - 1, p - 1 + resp)
    images = [None if r.images is None else r.images.tensors(r.prompt_ids) for r in rows] \
        if any(r.images is not None for r in rows) else []
    return Batch(ids, attn, position_ids, labels, mask, keep, images)
