"""Pairwise LLM-as-judge (MT-Bench protocol, as in the DistiLLM-2 paper's win-rate tables).

For every prompt the judge sees the question and two answers (A, B) and must end with a verdict
``[[A]]``, ``[[B]]`` or ``[[C]]`` (tie). Each pair is judged in both orders to cancel the judge's
position bias. Win rate = (wins + 0.5 ties) / n per order, averaged over the two orders, where n
counts only parsed verdicts; verdicts that cannot be parsed are counted and reported, never
guessed. Judges: a local Hugging Face chat model, or any OpenAI-compatible chat endpoint. Every
judge call is cached on disk by a hash of the request, so a rerun costs nothing.
"""

from __future__ import annotations

import hashlib
import json
import os
import re
from pathlib import Path

import torch

from distillm2.data import prompt_token_ids
from distillm2.files import append_jsonl, drop_partial_tail, read_jsonl
from distillm2.generation import sampling_kwargs
from distillm2.progress import progress_bar

SYSTEM = (
    "Please act as an impartial judge and evaluate the quality of the responses provided by two AI "
    "assistants to the user question displayed below. You should choose the assistant that follows "
    "the user's instructions and answers the user's question better. Your evaluation should consider "
    "factors such as the helpfulness, relevance, accuracy, depth, creativity, and level of detail of "
    "their responses. Begin your evaluation by comparing the two responses and provide a short "
    "explanation. Avoid any position biases and ensure that the order in which the responses were "
    "presented does not influence your decision. Do not allow the length of the responses to "
    "influence your evaluation. Do not favor certain names of the assistants. Be as objective as "
    "possible. After providing your explanation, output your final verdict by strictly following "
    'this format: "[[A]]" if assistant A is better, "[[B]]" if assistant B is better, and "[[C]]" '
    "for a tie."
)

TEMPLATE = (
    "[User Question]\n{question}\n\n[The Start of Assistant A's Answer]\n{answer_a}\n"
    "[The End of Assistant A's Answer]\n\n[The Start of Assistant B's Answer]\n{answer_b}\n"
    "[The End of Assistant B's Answer]"
)

_VERDICT = re.compile(r"\[\[\s*([ABC])\s*\]\]")


def parse_verdict(text: str | None) -> str | None:
    """'A', 'B' or 'C' from the judge's reply, or None when it gives no verdict or contradicts
    itself (several different verdicts). The last verdict counts when it is repeated."""
    if not text:
        return None
    found = _VERDICT.findall(text)
    if not found or len(set(found)) > 1:
        return None
    return found[-1]


def judge_messages(question: str, answer_a: str, answer_b: str) -> list[dict]:
    """The MT-Bench pairwise request for one question and two answers."""
    return [{"role": "system", "content": SYSTEM},
            {"role": "user", "content": TEMPLATE.format(question=question, answer_a=answer_a, answer_b=answer_b)}]


class CachedJudge:
    """Wraps a ``complete(messages) -> str`` function with an on-disk JSONL cache keyed by the
    judge's name and the request."""

    def __init__(self, name: str, complete, cache: str | Path | None):
        self.name, self.complete = name, complete
        self.cache_path = Path(cache) if cache else None
        self.cache: dict[str, str] = {}
        self.calls = 0
        if self.cache_path and self.cache_path.exists():
            drop_partial_tail(self.cache_path)
            self.cache = {row["key"]: row["reply"] for row in read_jsonl(self.cache_path)}

    def key(self, messages) -> str:
        """The cache key of a request: a hash of the judge's name and the messages."""
        blob = json.dumps({"judge": self.name, "messages": messages}, sort_keys=True, ensure_ascii=False)
        return hashlib.sha256(blob.encode()).hexdigest()

    def __call__(self, messages) -> str:
        """The judge's reply to ``messages``, from the cache when it was asked before."""
        key = self.key(messages)
        if key not in self.cache:
            self.calls += 1
            reply = self.complete(messages)
            self.cache[key] = reply
            if self.cache_path:
                self.cache_path.parent.mkdir(parents=True, exist_ok=True)
                append_jsonl(self.cache_path, [{"key": key, "reply": reply}])
        return self.cache[key]


def openai_judge(model: str, base_url: str | None = None, api_key: str | None = None,
                 max_tokens: int = 1024, timeout: float = 120.0):
    """A ``complete(messages)`` for an OpenAI-compatible chat endpoint (plain HTTP, greedy).
    Base URL and key default to $OPENAI_BASE_URL and $OPENAI_API_KEY."""
    import urllib.request

    base_url = (base_url or os.environ.get("OPENAI_BASE_URL") or "https://api.openai.com/v1").rstrip("/")
    api_key = api_key or os.environ.get("OPENAI_API_KEY", "")

    def complete(messages):
        body = json.dumps({"model": model, "messages": messages, "temperature": 0.0,
                           "max_tokens": max_tokens}).encode()
        request = urllib.request.Request(f"{base_url}/chat/completions", data=body, headers={
            "Content-Type": "application/json", "Authorization": f"Bearer {api_key}"})
        with urllib.request.urlopen(request, timeout=timeout) as response:
            payload = json.loads(response.read())
        return payload["choices"][0]["message"]["content"] or ""

    return complete


def hf_judge(model, tokenizer, max_new_tokens: int = 256):
    """A ``complete(messages)`` for a local Hugging Face chat model (greedy)."""
    device = next(model.parameters()).device

    @torch.no_grad()
    def complete(messages):
        ids = torch.tensor([prompt_token_ids(tokenizer, messages)], device=device)
        out = model.generate(input_ids=ids, attention_mask=torch.ones_like(ids), max_new_tokens=max_new_tokens,
                             pad_token_id=tokenizer.pad_token_id, **sampling_kwargs(True, 0.0, 1.0))
        return tokenizer.decode(out[0, ids.shape[1]:], skip_special_tokens=True)

    return complete


def _judge_order(judge, order, questions, answers, references, bar) -> dict:
    wins = ties = losses = unparsed = 0
    for question, answer, reference in zip(questions, answers, references):
        a, b = (answer, reference) if order == "model_first" else (reference, answer)
        verdict = parse_verdict(judge(judge_messages(question, a, b)))
        bar.update(1)
        if verdict is None:
            unparsed += 1
        elif verdict == "C":
            ties += 1
        elif (verdict == "A") == (order == "model_first"):
            wins += 1
        else:
            losses += 1
    parsed = wins + ties + losses
    return {"wins": wins, "ties": ties, "losses": losses, "unparsed": unparsed,
            "win_rate": (wins + 0.5 * ties) / parsed if parsed else float("nan")}


def pairwise_win_rate(judge, questions: list[str], answers: list[str], references: list[str]) -> dict:
    """Win rate of ``answers`` against ``references`` under ``judge`` (both orders).

    Returns ``win_rate``, ``ties`` (fraction of parsed verdicts that are ties, both orders),
    ``unparsed`` (count of verdicts that could not be parsed), ``n`` (pairs) and per-order detail.
    """
    with progress_bar(2 * len(questions), "judge", "verdict") as bar:
        orders = {order: _judge_order(judge, order, questions, answers, references, bar)
                  for order in ("model_first", "reference_first")}
    rates = [o["win_rate"] for o in orders.values() if o["win_rate"] == o["win_rate"]]
    parsed_total = sum(o["wins"] + o["ties"] + o["losses"] for o in orders.values())
    return {
        "win_rate": sum(rates) / len(rates) if rates else float("nan"),
        "ties": sum(o["ties"] for o in orders.values()) / parsed_total if parsed_total else float("nan"),
        "unparsed": sum(o["unparsed"] for o in orders.values()),
        "n": len(questions),
        "orders": orders,
    }
