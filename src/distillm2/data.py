"""Prompts, pair files, tokenisation with masking, and collation (DESIGN.md §4).

Prompt records are ``{"id", "messages"}``; ids are stable hashes of the prompt, and everything
downstream (responses, pairs) is joined by id, never by row index. Training text is the chat
template applied to the prompt with the generation prompt added -- exactly the text the responses
were sampled from -- followed by the response tokens and the end-of-turn token (only when the
response ended on its own; a response cut by ``max_new_tokens`` gets no end token, so the student
is never taught to stop mid-sentence). Labels are the response tokens only.
"""

from __future__ import annotations

import hashlib
import json
import os
from dataclasses import dataclass, field
from pathlib import Path

import torch


class DataError(ValueError):
    """Bad input data; the message names the file, line or key."""


# JSONL: atomic writes, whole-line appends, strict reads ------------------------------------------


def read_jsonl(path: str | Path) -> list[dict]:
    """Every line of a JSONL file as a dict; a malformed line is an error naming file and line."""
    path = Path(path)
    rows = []
    with path.open(encoding="utf-8") as fh:
        for number, line in enumerate(fh, start=1):
            if not line.strip():
                continue
            try:
                row = json.loads(line)
            except json.JSONDecodeError as err:
                raise DataError(f"{path}:{number}: not valid JSON ({err.msg})") from None
            if not isinstance(row, dict):
                raise DataError(f"{path}:{number}: expected a JSON object, got {type(row).__name__}")
            rows.append(row)
    return rows


def write_jsonl(path: str | Path, rows) -> None:
    """Write rows to a temporary file and rename it over ``path`` (readers never see half a file)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f"{path.name}.{os.getpid()}.tmp")  # per process: no two writers share it
    with tmp.open("w", encoding="utf-8") as fh:
        for row in rows:
            fh.write(json.dumps(row, ensure_ascii=False) + "\n")
        fh.flush()
        os.fsync(fh.fileno())
    tmp.replace(path)


def append_jsonl(path: str | Path, rows) -> None:
    """Append whole lines in one write, flushed to disk before returning."""
    data = "".join(json.dumps(row, ensure_ascii=False) + "\n" for row in rows)
    with open(path, "a", encoding="utf-8") as fh:
        fh.write(data)
        fh.flush()
        os.fsync(fh.fileno())


def drop_partial_tail(path: str | Path) -> bool:
    """Cut a last line that a crash left without its newline (it is regenerated on resume).
    Returns True if something was cut."""
    path = Path(path)
    if not path.exists() or path.stat().st_size == 0:
        return False
    data = path.read_bytes()
    if data.endswith(b"\n"):
        return False
    keep = data[: data.rfind(b"\n") + 1]
    tmp = path.with_name(f"{path.name}.{os.getpid()}.tmp")  # per process: no two writers share it
    tmp.write_bytes(keep)
    tmp.replace(path)
    return True


def write_text_atomic(path: str | Path, text: str) -> None:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f"{path.name}.{os.getpid()}.tmp")  # per process: no two writers share it
    tmp.write_text(text, encoding="utf-8")
    tmp.replace(path)


# Prompts ----------------------------------------------------------------------------------------


def prompt_id(prompt) -> str:
    """Stable id of a prompt (a string or a messages list): 16 hex digits of its SHA-1."""
    if isinstance(prompt, str):
        prompt = [{"role": "user", "content": prompt}]
    canonical = json.dumps(
        [{"role": m["role"], "content": m["content"]} for m in prompt],
        ensure_ascii=False, sort_keys=True, separators=(",", ":"),
    )
    return hashlib.sha1(canonical.encode("utf-8")).hexdigest()[:16]


_AUTO_FIELDS = ("messages", "prompt", "instruction", "question", "input", "text")


def _to_messages(value, where: str) -> list[dict]:
    if isinstance(value, str):
        if not value.strip():
            raise DataError(f"{where}: empty prompt")
        return [{"role": "user", "content": value}]
    if isinstance(value, list) and value and all(isinstance(m, dict) for m in value):
        for i, m in enumerate(value):
            if "role" not in m or "content" not in m or not isinstance(m["content"], str):
                raise DataError(f"{where}: message {i} needs string 'role' and 'content'")
        messages = [{"role": m["role"], "content": m["content"]} for m in value]
        # A conversation that ends with the assistant's answer: the prompt is what precedes it.
        while messages and messages[-1]["role"] == "assistant":
            messages.pop()
        if not messages or not any(m["content"].strip() for m in messages if m["role"] == "user"):
            raise DataError(f"{where}: empty prompt (no user message with content)")
        return messages
    raise DataError(
        f"{where}: expected a string or a list of {{role, content}} messages, got {value!r:.80}"
    )


def _records_from_rows(rows, source: str, fld: str | None) -> list[dict]:
    if not rows:
        raise DataError(f"{source}: no rows")
    if fld is None:
        fld = next((f for f in _AUTO_FIELDS if f in rows[0]), None)
        if fld is None:
            raise DataError(
                f"{source}: no prompt field found; set data.field (row 1 has keys: "
                f"{', '.join(rows[0])}; looked for {', '.join(_AUTO_FIELDS)})"
            )
    records, seen = [], set()
    for number, row in enumerate(rows, start=1):
        where = f"{source}:{number}"
        if fld not in row:
            raise DataError(f"{where}: missing field {fld!r} (row has keys: {', '.join(row)})")
        messages = _to_messages(row[fld], where)
        pid = prompt_id(messages)
        if pid in seen:
            continue  # the same prompt twice: one id, one record
        seen.add(pid)
        records.append({"id": pid, "messages": messages})
    return records


def load_prompts(source: str, field: str | None = None, limit: int | None = None) -> list[dict]:
    """Prompt records ``{"id", "messages"}`` from ``source``:

    - a ``.jsonl``, ``.json`` (a list of objects), ``.parquet`` or ``.csv`` file, with ``field``
      naming the column (a string or a chat ``messages`` list; guessed when None);
    - ``demo:train`` / ``demo:heldout`` / ``demo:all``: the bundled demo set;
    - ``hf:<dataset>[:<split>]``: a Hugging Face dataset (needs the hub, or its local cache).
    Duplicate prompts are kept once. ``limit`` keeps the first n.
    """
    if source.startswith("demo"):
        from distillm2.demo_prompts import demo_prompts

        split = source.split(":", 1)[1] if ":" in source else "train"
        records = [{"id": r["id"], "messages": r["messages"]} for r in demo_prompts(split)]
    elif source.startswith("hf:"):
        try:
            import datasets
        except ImportError as err:
            raise ImportError("hf: prompt sources need `pip install distillm2[eval]` (datasets)") from err
        name, _, split = source[3:].partition(":")
        rows = list(datasets.load_dataset(name, split=split or "train"))
        records = _records_from_rows(rows, source, field)
    else:
        path = Path(source)
        if not path.exists():
            raise DataError(f"prompt file not found: {path}")
        suffix = path.suffix.lower()
        if suffix == ".jsonl":
            rows = read_jsonl(path)
        elif suffix == ".json":
            try:
                rows = json.loads(path.read_text(encoding="utf-8"))
            except json.JSONDecodeError as err:
                raise DataError(f"{path}:{err.lineno}: not valid JSON ({err.msg})") from None
            if not isinstance(rows, list):
                raise DataError(f"{path}: expected a JSON list of objects")
        elif suffix in (".parquet", ".csv"):
            import pandas as pd

            frame = pd.read_parquet(path) if suffix == ".parquet" else pd.read_csv(path)
            rows = [{k: (v.tolist() if hasattr(v, "tolist") else v) for k, v in r.items()}
                    for r in frame.to_dict("records")]
        else:
            raise DataError(f"{path}: unknown prompt file type {suffix!r} (use .jsonl, .json, .parquet or .csv)")
        records = _records_from_rows(rows, str(path), field)
    return records[:limit] if limit else records


def render_prompt(tokenizer, messages: list[dict]) -> str:
    """The prompt text the model sees: its chat template with the generation prompt added."""
    if getattr(tokenizer, "chat_template", None):
        return tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
    # A base model without a template: the user turns as plain text.
    return "\n\n".join(m["content"] for m in messages) + "\n"


# Pairs --------------------------------------------------------------------------------------------


def make_pairs(prompts: list[dict], teacher: list[dict], student: list[dict]) -> tuple[list[dict], int]:
    """Join teacher and student responses by prompt id into TRL-layout pairs
    ``{"id", "prompt", "chosen", "rejected", "chosen_finished", "rejected_finished"}``.
    Returns the pairs (in prompt order) and the number of prompts missing a response."""
    by_t = {r["id"]: r for r in teacher}
    by_s = {r["id"]: r for r in student}
    pairs, missing = [], 0
    for rec in prompts:
        t, s = by_t.get(rec["id"]), by_s.get(rec["id"])
        if t is None or s is None:
            missing += 1
            continue
        pairs.append({
            "id": rec["id"], "prompt": rec["messages"],
            "chosen": t["response"], "rejected": s["response"],
            "chosen_finished": t.get("finish_reason") == "stop",
            "rejected_finished": s.get("finish_reason") == "stop",
        })
    return pairs, missing


def load_pairs(path: str | Path) -> list[dict]:
    """Read a pairs file; every row needs id, prompt, chosen and rejected."""
    rows = read_jsonl(path)
    for number, row in enumerate(rows, start=1):
        for key in ("id", "prompt", "chosen", "rejected"):
            if key not in row:
                raise DataError(f"{path}:{number}: missing field {key!r}")
        row["prompt"] = _to_messages(row["prompt"], f"{path}:{number}")
    return rows


# Tokenisation and collation ---------------------------------------------------------------------


@dataclass
class EncodedRow:
    prompt_ids: list[int]
    response_ids: list[int]  # response tokens (+ end-of-turn token when it finished)


@dataclass
class TruncationStats:
    prompts: int = 0
    responses: int = 0
    rows: int = 0

    def report(self) -> str:
        return (f"truncated {self.prompts} of {self.rows} prompts (max_prompt_length) and "
                f"{self.responses} responses (max_length)")


def encode(tokenizer, messages, response: str, finished: bool, max_prompt_length: int,
           max_length: int, stats: TruncationStats | None = None) -> EncodedRow:
    """Token ids of prompt and response, truncated as DESIGN.md §4 says (counted in ``stats``):
    the prompt keeps its last ``max_prompt_length`` tokens (the generation prompt is at the end),
    the response is cut so that the row fits ``max_length``."""
    prompt_ids = tokenizer(render_prompt(tokenizer, messages), add_special_tokens=False)["input_ids"]
    response_ids = tokenizer(response, add_special_tokens=False)["input_ids"] if response else []
    if finished and tokenizer.eos_token_id is not None:
        response_ids = response_ids + [tokenizer.eos_token_id]
    if stats is not None:
        stats.rows += 1
    if len(prompt_ids) > max_prompt_length:
        prompt_ids = prompt_ids[-max_prompt_length:]
        if stats is not None:
            stats.prompts += 1
    room = max(max_length - len(prompt_ids), 0)
    if len(response_ids) > room:
        response_ids = response_ids[:room]
        if stats is not None:
            stats.responses += 1
    return EncodedRow(prompt_ids, response_ids)


@dataclass
class Batch:
    """Rows laid out as [left-padded prompt | right-padded response], so that every row's
    response starts at the same column and one ``logits_to_keep`` range selects exactly the
    positions that predict response tokens (no lm_head work on prompt tokens).

    input_ids, attention_mask, position_ids: ``[R, P + L]``; labels, mask: ``[R, L]``;
    ``keep``: the ``[L]`` positions (P - 1 ... P + L - 2) whose logits predict the response.
    """

    input_ids: torch.Tensor
    attention_mask: torch.Tensor
    position_ids: torch.Tensor
    labels: torch.Tensor
    mask: torch.Tensor
    keep: torch.Tensor
    meta: dict = field(default_factory=dict)

    def to(self, device):
        for name in ("input_ids", "attention_mask", "position_ids", "labels", "mask", "keep"):
            setattr(self, name, getattr(self, name).to(device))
        return self

    @property
    def num_tokens(self) -> int:
        return int(self.mask.sum())


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
    return Batch(ids, attn, position_ids, labels, mask, keep)
