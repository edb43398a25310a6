"""Pairwise LLM-as-judge (MT-Bench protocol, as in the DistiLLM-2 paper's win-rate tables).

For every prompt the judge sees the question and two answers (A, B) and must end with a verdict
``[[A]]``, ``[[B]]`` or ``[[C]]`` (tie). Each pair is judged in both orders to cancel the judge's
position bias. ``win_rate`` = (wins + 0.5 ties) / all comparisons (both orders), as the paper's
released scoring does: a reply without a verdict counts as no win. ``win_rate_parsed`` divides
by the parsed verdicts only; unparsed verdicts are counted and reported, never guessed. The
judge samples at ``temperature`` (default 1.0, the paper's protocol and the API's default; 0 for
greedy).

Judges: a local Hugging Face chat model, or any OpenAI-compatible chat endpoint through the
``openai`` client (retries with exponential backoff on 429, 5xx and timeouts, honouring
Retry-After; ``concurrency`` requests in flight). A reply that is not a chat completion (no
``choices[0].message.content``) is retried like a transient error; if it never comes right the
verdict is counted unparsed and nothing is cached, so a rerun asks again. Every answered call is
cached on disk by a hash of the judge, its settings and the request, so a rerun costs nothing.
The API key is passed to the client only; it is never written to a file or a log.
"""

from __future__ import annotations

import hashlib
import json
import os
import re
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import torch

from distillm2.data import prompt_token_ids
from distillm2.errors import MissingExtra, UserError
from distillm2.files import append_jsonl, drop_partial_tail, read_jsonl
from distillm2.generation import sampling_kwargs
from distillm2.progress import logger, progress_bar

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
    """Wraps a ``complete(messages) -> str | None`` function with an on-disk JSONL cache keyed by
    the judge's name (which carries its settings) and the request. Safe to call from several
    threads; a ``None`` reply (no usable answer) is returned but not cached."""

    def __init__(self, name: str, complete, cache: str | Path | None):
        self.name, self.complete = name, complete
        self.cache_path = Path(cache) if cache else None
        self.cache: dict[str, str] = {}
        self.calls = 0
        self._lock = threading.Lock()
        if self.cache_path and self.cache_path.exists():
            drop_partial_tail(self.cache_path)
            self.cache = {row["key"]: row["reply"] for row in read_jsonl(self.cache_path)}

    def key(self, messages) -> str:
        """The cache key of a request: a hash of the judge's name and the messages."""
        blob = json.dumps({"judge": self.name, "messages": messages}, sort_keys=True, ensure_ascii=False)
        return hashlib.sha256(blob.encode()).hexdigest()

    def __call__(self, messages) -> str | None:
        """The judge's reply to ``messages``, from the cache when it was asked before."""
        key = self.key(messages)
        with self._lock:
            if key in self.cache:
                return self.cache[key]
            self.calls += 1
        reply = self.complete(messages)
        if reply is None:
            return None
        with self._lock:
            self.cache[key] = reply
            if self.cache_path:
                self.cache_path.parent.mkdir(parents=True, exist_ok=True)
                append_jsonl(self.cache_path, [{"key": key, "reply": reply}])
        return reply


class JudgeError(UserError):
    """The judge endpoint failed after all retries (answered calls stay cached)."""


def openai_judge(model: str, base_url: str | None = None, api_key: str | None = None, max_tokens: int = 1024,
                 temperature: float = 1.0, retries: int = 6, timeout: float = 120.0):
    """A ``complete(messages) -> str | None`` for an OpenAI-compatible chat endpoint through the
    ``openai`` client. Base URL and key default to $OPENAI_BASE_URL and $OPENAI_API_KEY.
    Transient HTTP errors are retried by the client (``retries`` times, exponential backoff); a
    malformed reply is retried here as often, then given up as None."""
    try:
        import openai
    except ImportError:
        raise MissingExtra("the judge at an OpenAI-compatible endpoint", "eval") from None
    key = api_key or os.environ.get("OPENAI_API_KEY") or "EMPTY"
    client = openai.OpenAI(base_url=base_url or os.environ.get("OPENAI_BASE_URL") or "https://api.openai.com/v1",
                           api_key=key, max_retries=retries, timeout=timeout)

    def complete(messages):
        for attempt in range(retries + 1):
            try:
                reply = client.chat.completions.create(model=model, messages=messages, temperature=temperature,
                                                       max_tokens=max_tokens)
            except openai.APIError as err:  # retries spent, or not retryable (401, 404, ...)
                raise JudgeError(f"judge {model}: {type(err).__name__}: {_short(err, key)}") from None
            try:
                content = reply.choices[0].message.content
            except (AttributeError, IndexError, KeyError, TypeError):
                content = None
            if isinstance(content, str):
                return content
            logger.info("judge %s: reply without a message (attempt %d of %d)", model, attempt + 1, retries + 1)
            time.sleep(min(8.0, 0.25 * 2**attempt))
        return None

    return complete


def _short(err, secret: str) -> str:
    # the message is the server's reply; a server may echo the key back: never show it
    return str(getattr(err, "message", err)).replace(secret, "***")[:300]


def hf_judge(model, tokenizer, max_new_tokens: int = 256, temperature: float = 1.0):
    """A ``complete(messages)`` for a local Hugging Face chat model: greedy at temperature 0,
    else sampled with a seed drawn from the request, so a rerun gives the same reply."""
    device = next(model.parameters()).device
    lock = threading.Lock()  # one generate at a time on a shared model

    @torch.no_grad()
    def complete(messages):
        ids = torch.tensor([prompt_token_ids(tokenizer, messages)], device=device)
        seed = int(hashlib.sha256(json.dumps(messages, sort_keys=True).encode()).hexdigest()[:8], 16)
        with lock:
            torch.manual_seed(seed)
            out = model.generate(input_ids=ids, attention_mask=torch.ones_like(ids), max_new_tokens=max_new_tokens,
                                 pad_token_id=tokenizer.pad_token_id,
                                 **sampling_kwargs(temperature <= 0, temperature, 1.0))
        return tokenizer.decode(out[0, ids.shape[1]:], skip_special_tokens=True)

    return complete


def _tally(order: str, verdicts: list[str | None]) -> dict:
    wins = ties = losses = unparsed = 0
    for verdict in verdicts:
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
            "win_rate": (wins + 0.5 * ties) / len(verdicts) if verdicts else float("nan"),
            "win_rate_parsed": (wins + 0.5 * ties) / parsed if parsed else float("nan")}


def pairwise_win_rate(judge, questions: list[str], answers: list[str], references: list[str],
                      concurrency: int = 1) -> dict:
    """Win rate of ``answers`` against ``references`` under ``judge`` (both orders), with up to
    ``concurrency`` judge calls in flight.

    Returns ``win_rate`` (over all comparisons), ``win_rate_parsed`` (over parsed verdicts),
    ``ties`` (fraction of parsed verdicts that are ties), ``unparsed`` (count), ``n`` (pairs)
    and per-order detail.
    """
    jobs = []
    for order in ("model_first", "reference_first"):
        for question, answer, reference in zip(questions, answers, references):
            a, b = (answer, reference) if order == "model_first" else (reference, answer)
            jobs.append((order, judge_messages(question, a, b)))
    with progress_bar(len(jobs), "judge", "verdict") as bar:
        def ask(job):
            reply = judge(job[1])
            bar.update(1)
            return parse_verdict(reply)

        with ThreadPoolExecutor(max(1, concurrency)) as pool:
            verdicts = list(pool.map(ask, jobs))
    orders = {order: _tally(order, [v for (o, _), v in zip(jobs, verdicts) if o == order])
              for order in ("model_first", "reference_first")}
    wins = sum(o["wins"] for o in orders.values())
    ties = sum(o["ties"] for o in orders.values())
    parsed = sum(o["wins"] + o["ties"] + o["losses"] for o in orders.values())
    return {
        "win_rate": (wins + 0.5 * ties) / len(jobs) if jobs else float("nan"),
        "win_rate_parsed": (wins + 0.5 * ties) / parsed if parsed else float("nan"),
        "ties": ties / parsed if parsed else float("nan"),
        "unparsed": sum(o["unparsed"] for o in orders.values()),
        "n": len(questions),
        "orders": orders,
    }
