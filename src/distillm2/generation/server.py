"""The server backend (``generation.backend: server``): any OpenAI-compatible completions
endpoint -- ``vllm serve``, SGLang, ``transformers serve``, a hosted API.

Prompts are sent as token ids from the one prompt path (``"prompt": [ids]`` on
``/v1/completions``), so the server sees exactly the training prompts; every sampling field is
sent explicitly (a server fills omitted ones from the model's ``generation_config.json``) and
every request carries its prompt's own seed. Requests run concurrently, are retried with
exponential backoff on rate limits, server errors and dropped connections, and each finished row
is appended at once, so a rerun resumes by prompt id.

How a model reaches the server: the teacher is whatever ``generation.server_url`` serves. The
student of each round, when ``generation.student_server_url`` is set, is saved to the run
directory and loaded into that server in place through vLLM's development endpoints
(``POST /collective_rpc`` with ``reload_weights`` from the saved directory, then
``POST /reset_prefix_cache``; start it with ``VLLM_SERVER_DEV_MODE=1`` on the student's
architecture and a file system shared with the trainer). Without a student server the student
is sampled with the ``hf`` backend.
"""

from __future__ import annotations

import json
import os
import random
import threading
import time
import urllib.error
import urllib.request
from concurrent.futures import ThreadPoolExecutor, as_completed
from pathlib import Path

from distillm2.data import prompt_token_ids
from distillm2.errors import DataError
from distillm2.faults import maybe_crash
from distillm2.files import append_jsonl
from distillm2.generation.common import batch_seed, done_rows, response_row
from distillm2.progress import progress_bar

RETRY_STATUS = {408, 409, 425, 429, 500, 502, 503, 504}


class ServerError(DataError):
    """A server answered with something that is not a usable completion, or never answered."""


def post_json(url: str, body: dict, *, api_key: str | None = None, timeout: float = 600.0, retries: int = 6,
              backoff: float = 1.0) -> dict:
    """POST ``body`` as JSON and return the JSON reply, retrying with exponential backoff (and
    jitter) on rate limits, server errors, timeouts and dropped connections. The API key goes
    into the Authorization header only; it is never logged or written anywhere."""
    data = json.dumps(body).encode()
    headers = {"Content-Type": "application/json"}
    if api_key:
        headers["Authorization"] = f"Bearer {api_key}"
    last = None
    for attempt in range(retries + 1):
        try:
            request = urllib.request.Request(url, data=data, headers=headers)
            with urllib.request.urlopen(request, timeout=timeout) as response:
                raw = response.read()
            return json.loads(raw) if raw.strip() else {}
        except urllib.error.HTTPError as err:
            last = f"HTTP {err.code}: {err.read()[:200]!r}"
            if err.code not in RETRY_STATUS:
                raise ServerError(f"{url}: {last}") from None
            wait = float(err.headers.get("Retry-After") or 0) if err.headers else 0.0
        except (urllib.error.URLError, TimeoutError, ConnectionError) as err:
            last, wait = f"{type(err).__name__}: {err}", 0.0
        except json.JSONDecodeError:
            raise ServerError(f"{url}: the reply is not JSON") from None
        if attempt < retries:
            time.sleep(max(wait, backoff * 2 ** attempt * (0.5 + random.random())))
    raise ServerError(f"{url}: no usable reply after {retries + 1} attempts (last: {last})")


def completion_body(model: str, ids: list[int], *, greedy: bool, temperature: float, top_p: float,
                    max_new_tokens: int, seed: int, stop_ids: list[int]) -> dict:
    """A ``/v1/completions`` request for one tokenised prompt with every sampling field set
    (``top_k``, ``repetition_penalty`` and ``stop_token_ids`` are vLLM/SGLang extensions that
    other servers ignore)."""
    return {"model": model, "prompt": ids, "max_tokens": max_new_tokens, "n": 1, "seed": seed,
            "temperature": 0.0 if greedy else temperature, "top_p": 1.0 if greedy else top_p,
            "top_k": -1, "repetition_penalty": 1.0, "presence_penalty": 0.0, "frequency_penalty": 0.0,
            "stop_token_ids": stop_ids, "skip_special_tokens": True, "return_token_ids": True}


def parse_completion(reply: dict, url: str) -> tuple[str, bool, int]:
    """(text, stopped by itself, number of generated tokens) from a completions reply."""
    try:
        choice = reply["choices"][0]
        text = choice["text"]
        reason = choice.get("finish_reason")
    except (KeyError, IndexError, TypeError):
        raise ServerError(f"{url}: not a completions reply: {json.dumps(reply)[:200]}") from None
    if not isinstance(text, str):
        raise ServerError(f"{url}: the completion text is not a string")
    ids = choice.get("token_ids")
    num = len(ids) if isinstance(ids, list) else int((reply.get("usage") or {}).get("completion_tokens", 0))
    stopped = reason == "stop"
    if stopped and isinstance(ids, list) and num:
        num -= 1  # the end token ends the response; it is not one of its tokens
    return text, stopped, num


def generate_server(url: str, model_name: str, tokenizer, prompts: list[dict], output: str | Path, *,
                    max_new_tokens=256, temperature=0.8, top_p=0.95, greedy=False, seed=42, max_prompt_length=512,
                    stop_ids: list[int] | None = None, concurrency: int = 8, api_key: str | None = None,
                    timeout: float = 600.0, retries: int = 6, desc: str = "generate") -> list[dict]:
    """Same inputs and outputs as :func:`~distillm2.generation.hf.generate_hf`, from an
    OpenAI-compatible server at ``url`` (its ``/v1`` base). Returns the rows this call wrote."""
    output = Path(output)
    output.parent.mkdir(parents=True, exist_ok=True)
    done = done_rows([output])
    todo = [(i, p) for i, p in enumerate(prompts) if p["id"] not in done]
    endpoint = url.rstrip("/") + "/completions"
    api_key = api_key or os.environ.get("OPENAI_API_KEY")
    stop_ids = stop_ids or [tokenizer.eos_token_id]
    lock, written = threading.Lock(), []

    def one(index: int, prompt: dict) -> dict:
        body = completion_body(model_name, prompt_token_ids(tokenizer, prompt["messages"], max_prompt_length),
                               greedy=greedy, temperature=temperature, top_p=top_p, max_new_tokens=max_new_tokens,
                               seed=batch_seed(seed, index), stop_ids=stop_ids)
        text, stopped, num = parse_completion(post_json(endpoint, body, api_key=api_key, timeout=timeout,
                                                        retries=retries), endpoint)
        return response_row(prompt["id"], text, stopped, num)

    with progress_bar(total=len(todo), desc=desc, unit="prompt") as bar, \
            ThreadPoolExecutor(max_workers=max(1, concurrency)) as pool:
        futures = [pool.submit(one, i, p) for i, p in todo]
        try:
            for future in as_completed(futures):
                row = future.result()
                with lock:
                    append_jsonl(output, [row])
                    written.append(row)
                bar.update(1)
                maybe_crash(desc, len(written))
        except BaseException:
            for future in futures:  # stop asking; what finished is on disk for the rerun
                future.cancel()
            raise
    return written


def server_root(url: str) -> str:
    """The server's root URL (its ``/v1`` base without ``/v1``)."""
    url = url.rstrip("/")
    return url[: -len("/v1")] if url.endswith("/v1") else url


def load_weights(url: str, weights_dir: str | Path, api_key: str | None = None) -> None:
    """Replace the weights of the model a vLLM server (development mode) serves by those saved
    in ``weights_dir`` -- same architecture -- and drop its cached prefixes, whose keys and values
    were computed with the old weights."""
    root = server_root(url)
    post_json(f"{root}/collective_rpc", {"method": "reload_weights",
                                         "kwargs": {"weights_path": str(Path(weights_dir).resolve())}},
              api_key=api_key)
    post_json(f"{root}/reset_prefix_cache", {}, api_key=api_key)


def wait_until_ready(url: str, timeout: float = 600.0) -> None:
    """Poll ``GET /health`` (or ``/v1/models``) of a starting server until it answers 200."""
    root, deadline = server_root(url), time.time() + timeout
    while time.time() < deadline:
        for path in ("/health", "/v1/models"):
            try:
                with urllib.request.urlopen(root + path, timeout=5) as response:
                    if response.status == 200:
                        return
            except (urllib.error.URLError, ConnectionError, TimeoutError):
                pass
        time.sleep(1.0)
    raise ServerError(f"{url}: not ready after {timeout:.0f} s")
