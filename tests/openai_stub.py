"""A small OpenAI-compatible server for tests, on the loopback address: ``/v1/completions`` from a
tiny Hugging Face model (token-id prompts, seeds, greedy or sampled), ``/v1/chat/completions``
from a reply function, vLLM's development endpoints ``/collective_rpc`` (``reload_weights``) and
``/reset_prefix_cache``, and ``/health``. Faults can be injected: the first ``fail_first``
requests get HTTP 429, and ``malformed`` request numbers get a reply that is not a completion.
It records every request body (the API key header included) for the tests to inspect."""

from __future__ import annotations

import json
import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer


class StubServer:
    def __init__(self, model_dir=None, chat_reply=None, fail_first: int = 0, malformed=()):
        self.model_dir, self.chat_reply = model_dir, chat_reply
        self.fail_first, self.malformed = fail_first, set(malformed)
        self.requests, self.reloads, self.lock = [], [], threading.Lock()
        self.model = None
        if model_dir is not None:
            self._load(model_dir)
        self.httpd = ThreadingHTTPServer(("127.0.0.1", 0), self._handler())
        self.url = f"http://127.0.0.1:{self.httpd.server_address[1]}/v1"
        self.thread = threading.Thread(target=self.httpd.serve_forever, daemon=True)

    def _load(self, path):
        from transformers import AutoModelForCausalLM, AutoTokenizer

        self.model = AutoModelForCausalLM.from_pretrained(path).eval()
        self.tokenizer = AutoTokenizer.from_pretrained(path)

    def __enter__(self):
        self.thread.start()
        return self

    def __exit__(self, *exc):
        self.httpd.shutdown()
        self.httpd.server_close()

    def complete(self, body: dict) -> dict:
        import torch

        ids = body["prompt"]
        with torch.no_grad(), self.lock:
            torch.manual_seed(int(body.get("seed") or 0))
            greedy = float(body.get("temperature", 1.0)) == 0.0
            out = self.model.generate(
                torch.tensor([ids]), attention_mask=torch.ones(1, len(ids), dtype=torch.long),
                max_new_tokens=int(body["max_tokens"]), do_sample=not greedy,
                temperature=None if greedy else float(body["temperature"]), top_p=None if greedy else float(body["top_p"]),
                top_k=None, eos_token_id=body.get("stop_token_ids"), pad_token_id=0)
        new = out[0, len(ids):].tolist()
        stops = set(body.get("stop_token_ids") or [])
        cut = next((i for i, t in enumerate(new) if t in stops), None)
        tokens = new if cut is None else new[: cut + 1]
        text = self.tokenizer.decode([t for t in tokens if t not in stops], skip_special_tokens=True)
        return {"object": "text_completion", "choices": [{
            "index": 0, "text": text, "token_ids": tokens,
            "finish_reason": "stop" if cut is not None else "length"}],
            "usage": {"completion_tokens": len(tokens)}}

    def _handler(self):
        stub = self

        class Handler(BaseHTTPRequestHandler):
            def log_message(self, *args):
                pass

            def _send(self, code, payload):
                data = payload if isinstance(payload, bytes) else json.dumps(payload).encode()
                self.send_response(code)
                self.send_header("Content-Type", "application/json")
                self.send_header("Content-Length", str(len(data)))
                if code == 429:
                    self.send_header("Retry-After", "0")
                self.end_headers()
                self.wfile.write(data)

            def do_GET(self):
                self._send(200 if self.path in ("/health", "/v1/models") else 404, {"data": []})

            def do_POST(self):
                body = json.loads(self.rfile.read(int(self.headers["Content-Length"])) or b"{}")
                with stub.lock:
                    stub.requests.append({"path": self.path, "body": body,
                                          "authorization": self.headers.get("Authorization")})
                    number = len(stub.requests)
                if number <= stub.fail_first:
                    return self._send(429, {"error": "rate limited"})
                if number in stub.malformed:
                    return self._send(200, {"unexpected": True})
                if self.path == "/v1/completions":
                    return self._send(200, stub.complete(body))
                if self.path == "/v1/chat/completions":
                    text = stub.chat_reply(body)
                    return self._send(200, {"choices": [{"index": 0, "message": {"role": "assistant", "content": text},
                                                         "finish_reason": "stop"}]})
                if self.path == "/collective_rpc" and body.get("method") == "reload_weights":
                    stub.reloads.append(body["kwargs"]["weights_path"])
                    stub._load(body["kwargs"]["weights_path"])
                    return self._send(200, {"results": [None]})
                if self.path == "/reset_prefix_cache":
                    return self._send(200, b"")
                return self._send(404, {"error": self.path})

        return Handler
