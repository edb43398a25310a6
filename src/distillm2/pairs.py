"""Preference pairs: joined from teacher and student responses by prompt id, written in TRL's
conversational preference layout, and read back from any of the layouts users bring:

- TRL standard: ``{"prompt": str, "chosen": str, "rejected": str}``;
- TRL conversational: ``{"prompt": [messages], "chosen": [{"role": "assistant", ...}], ...}``;
- the released DistiLLM-2 code's: ``{"prompt": str, "chosen": [user, assistant], "rejected": [...]}``
  (whole conversations; the response is the last assistant turn).

Internally a pair is ``{"id", "prompt": [messages], "chosen": str, "rejected": str,
"chosen_finished", "rejected_finished"}``; the flags say whether the response ended by itself
(only then is the end-of-turn token trained).
"""

from __future__ import annotations

from pathlib import Path

from distillm2.data import final_answer, prompt_id, read_table, to_messages
from distillm2.errors import DataError
from distillm2.files import write_jsonl


def make_pairs(prompts: list[dict], teacher: list[dict], student: list[dict]) -> tuple[list[dict], int]:
    """Join teacher and student responses by prompt id into pairs (in prompt order); returns the
    pairs and the number of prompts missing a response."""
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


def to_trl(pair: dict) -> dict:
    """A pair in TRL's conversational preference layout (plus our id and finished flags)."""
    return {"id": pair["id"], "prompt": pair["prompt"],
            "chosen": [{"role": "assistant", "content": pair["chosen"]}],
            "rejected": [{"role": "assistant", "content": pair["rejected"]}],
            "chosen_finished": pair.get("chosen_finished", True),
            "rejected_finished": pair.get("rejected_finished", True)}


def write_pairs(path: str | Path, pairs: list[dict]) -> None:
    """Write pairs as JSONL in TRL's conversational layout (atomically)."""
    write_jsonl(path, [to_trl(p) for p in pairs])


def _response(value, where: str, which: str) -> tuple[str, list[dict] | None]:
    """(response text, the conversation before it or None) of a chosen / rejected value."""
    if isinstance(value, str):
        return value, None
    if isinstance(value, list) and value and all(isinstance(m, dict) for m in value):
        answer = final_answer(value)
        if answer is None and value[-1].get("role") == "assistant":
            answer = ""  # an empty response is a valid sample
        if answer is None:
            raise DataError(f"{where}: {which} must end with an assistant message")
        before = value[:-1]
        return answer, (before or None)
    raise DataError(f"{where}: {which} must be a string or a list of messages, got {value!r:.60}")


def normalize_pair(row: dict, where: str, base: Path | None = None) -> dict:
    """One pair of any supported layout in the internal form (image paths of the prompt
    relative to ``base``)."""
    for key in ("chosen", "rejected"):
        if key not in row:
            raise DataError(f"{where}: missing field {key!r}")
    chosen, context = _response(row["chosen"], where, "chosen")
    rejected, _ = _response(row["rejected"], where, "rejected")
    prompt = row.get("prompt")
    if context is not None and (prompt is None or isinstance(prompt, str)):
        prompt = context  # the released layout: whole conversations; the prompt is what precedes
    if prompt is None:
        raise DataError(f"{where}: missing field 'prompt'")
    messages = to_messages(prompt, where, base)
    return {"id": str(row.get("id") or prompt_id(messages)), "prompt": messages, "chosen": chosen,
            "rejected": rejected, "chosen_finished": bool(row.get("chosen_finished", True)),
            "rejected_finished": bool(row.get("rejected_finished", True))}


def load_pairs(path: str | Path) -> list[dict]:
    """Read a pairs file (.jsonl, .json, .parquet, .csv) in any supported layout."""
    path = Path(path)
    if not path.exists():
        raise DataError(f"pairs file not found: {path}")
    rows = read_table(path)
    if not rows:
        raise DataError(f"{path}: no pairs")
    base = path.resolve().parent  # relative image paths: against the pairs file's directory
    return [normalize_pair(row, f"{path}:{number}", base) for number, row in enumerate(rows, start=1)]
