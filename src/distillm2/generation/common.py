"""What every generation backend shares: the output rows, resume by prompt id, the batch plan
and its per-batch seeds, the per-rank part files and their merge.

Output rows are ``{"id", "response", "finish_reason", "num_tokens"}``, appended to a JSONL file
as they finish. The plan (prompts sorted by length, cut into batches, batch b sampled with seed
``seed * 1_000_003 + b``) is computed from the full prompt list, so a rerun after a crash samples
each unfinished batch exactly as an uninterrupted run would have, whichever rank runs it.
"""

from __future__ import annotations

from pathlib import Path

from distillm2.files import drop_partial_tail, read_jsonl, write_jsonl


def part_path(output: Path, rank: int, world: int) -> Path:
    """Where rank ``rank`` appends its rows (``output`` itself for a single process)."""
    return output if world == 1 else output.with_name(f"{output.name}.rank{rank}")


def all_paths(output: Path, world: int) -> list[Path]:
    """The output and every rank's part file."""
    return [output] + ([part_path(output, r, world) for r in range(world)] if world > 1 else [])


def repair(paths) -> None:
    """Drop a last line a crash left without its newline (one process does this)."""
    for path in paths:
        drop_partial_tail(path)


def done_rows(paths) -> dict[str, dict]:
    """Rows already written to any of ``paths``, by prompt id (the first one wins)."""
    done = {}
    for path in paths:
        if Path(path).exists():
            for row in read_jsonl(path):
                done.setdefault(row["id"], row)
    return done


def plan_batches(tokenized: list[list[int]], batch_size: int) -> list[list[int]]:
    """Indices grouped into batches of similar length (less padding), longest first so that an
    out-of-memory error shows up at once. Stable: ties keep prompt order."""
    order = sorted(range(len(tokenized)), key=lambda i: -len(tokenized[i]))
    return [order[i : i + batch_size] for i in range(0, len(order), batch_size)]


def batch_seed(seed: int, batch: int) -> int:
    """The sampling seed of batch ``batch`` of the plan (or of prompt ``batch`` for per-prompt
    backends): resuming at it samples what an uninterrupted run would have."""
    return seed * 1_000_003 + batch


def merge_parts(output: Path, prompts: list[dict], world: int) -> list[dict]:
    """Main process, after all ranks finished: merge the part files into ``output`` in prompt
    order and remove them."""
    paths = all_paths(Path(output), world)
    done = done_rows(paths)
    rows = [done[p["id"]] for p in prompts if p["id"] in done]
    write_jsonl(output, rows)  # prompt order, whatever the number of processes
    for path in paths[1:]:
        path.unlink(missing_ok=True)
    return rows


def response_row(prompt_id: str, text: str, stopped: bool, num_tokens: int) -> dict:
    """One output row."""
    return {"id": prompt_id, "response": text, "finish_reason": "stop" if stopped else "length",
            "num_tokens": num_tokens}
