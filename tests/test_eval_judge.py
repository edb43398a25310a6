"""The judge at an OpenAI-compatible endpoint (a stub on the loopback address): retries after
HTTP 429 and malformed replies, concurrent requests, both win rates, the sampled judge as the
default, the cache, AlpacaEval export, and the API key never written anywhere."""

import json
import math

from openai_stub import StubServer

from distillm2 import cli
from distillm2.evaluation.judge import CachedJudge, openai_judge, pairwise_win_rate

SECRET = "sk-test-0123456789-secret"


def _first_answer_wins(body):
    # a position-biased judge: the first answer always wins
    return "Assistant A follows the instruction more closely. [[A]]"


def test_eval_judge_through_an_endpoint(tiny, tmp_path, capsys, caplog):
    out = tmp_path / "eval.json"
    export = tmp_path / "alpaca"
    with StubServer(chat_reply=_first_answer_wins, fail_first=1, malformed={3}) as stub:
        args = ["eval", "--model", str(tiny / "student"), "--teacher", str(tiny / "teacher"), "--tasks", "judge",
                "--prompts", str(tiny / "prompts.jsonl"), "--limit", "3", "--max-new-tokens", "4",
                "--output", str(out), "--judge-model", "stub-judge", "--judge-base-url", stub.url,
                "--judge-api-key", SECRET, "--set", f"export_alpaca_eval={export}"]
        assert cli.main(args) == 0
        chat = [r for r in stub.requests if r["path"] == "/v1/chat/completions"]
        # 6 verdicts (3 prompts, both orders) + one 429 + one malformed reply, both retried
        assert len(chat) == 8
        assert all(r["authorization"] == f"Bearer {SECRET}" for r in chat)
        assert all(r["body"]["temperature"] == 1.0 and r["body"]["model"] == "stub-judge" for r in chat)
        result = json.loads(out.read_text())["tasks"]["judge"]
        # model first: 3 wins; reference first: 3 losses -> 0.5 both ways, nothing unparsed
        assert result["win_rate"] == 0.5 and result["win_rate_parsed"] == 0.5 and result["unparsed"] == 0
        assert result["judge_calls"] == 6 and result["n"] == 3
        assert cli.main(args) == 0  # a rerun asks the judge nothing: every verdict is cached
        assert len(stub.requests) == 8
    report = json.loads(out.read_text())
    assert report["tasks"]["judge"]["judge_calls"] == 0
    options = report["inputs"]["task_options"]["judge"]
    assert "api_key" not in options and options["temperature"] == 1.0 and options["api_model"] == "stub-judge"

    outputs = json.loads((export / "model_outputs.json").read_text())
    references = json.loads((export / "reference_outputs.json").read_text())
    assert len(outputs) == len(references) == 3
    assert set(outputs[0]) == {"instruction", "output", "generator"}
    assert outputs[0]["generator"] == str(tiny / "student") and outputs[0]["instruction"].startswith("explain ")
    assert [o["instruction"] for o in outputs] == [r["instruction"] for r in references]

    # the key is in no file and no log line
    for path in tmp_path.rglob("*"):
        if path.is_file():
            assert SECRET not in path.read_text(errors="replace"), path
    captured = capsys.readouterr()
    assert SECRET not in captured.out + captured.err + caplog.text


def test_malformed_replies_that_never_heal_are_unparsed_and_not_cached(tmp_path):
    # concurrency 1 makes the request numbers deterministic: the first verdict's request and its
    # one retry get malformed replies
    with StubServer(chat_reply=_first_answer_wins, malformed={1, 2}) as stub:
        complete = openai_judge("stub-judge", stub.url, "k", retries=1, temperature=0.0)
        judge = CachedJudge("stub", complete, tmp_path / "judge.jsonl")
        result = pairwise_win_rate(judge, ["q1", "q2"], ["a1", "a2"], ["r1", "r2"], concurrency=1)
        assert result["unparsed"] == 1 and len(stub.requests) == 5
        assert all(r["body"]["temperature"] == 0.0 for r in stub.requests)
        # over all 4 comparisons: 1 win (model first, q2) + 0 of 2 (reference first) = 1/4;
        # over the 3 parsed: 1/3
        assert result["win_rate"] == 0.25 and math.isclose(result["win_rate_parsed"], 1 / 3)
        assert len((tmp_path / "judge.jsonl").read_text().splitlines()) == 3  # the failed one is asked again
        again = CachedJudge("stub", complete, tmp_path / "judge.jsonl")
        assert pairwise_win_rate(again, ["q1", "q2"], ["a1", "a2"], ["r1", "r2"])["unparsed"] == 0
        assert again.calls == 1


def test_concurrent_requests(tmp_path):
    import threading
    import time

    active, peak, lock = [0], [0], threading.Lock()

    def slow_reply(body):
        with lock:
            active[0] += 1
            peak[0] = max(peak[0], active[0])
        time.sleep(0.2)
        with lock:
            active[0] -= 1
        return "[[C]]"

    with StubServer(chat_reply=slow_reply) as stub:
        judge = CachedJudge("stub", openai_judge("j", stub.url, "k"), None)
        result = pairwise_win_rate(judge, [f"q{i}" for i in range(4)], ["a"] * 4, ["r"] * 4, concurrency=4)
    assert result["ties"] == 1.0 and result["win_rate"] == 0.5 and peak[0] > 1


def test_a_refused_key_is_an_error_that_does_not_show_the_key():
    import threading
    from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

    import pytest

    from distillm2.evaluation.judge import JudgeError

    class Refuse(BaseHTTPRequestHandler):
        def log_message(self, *args):
            pass

        def do_POST(self):
            self.rfile.read(int(self.headers["Content-Length"]))
            body = json.dumps({"error": {"message": f"Incorrect API key provided: {self.headers['Authorization']}"}})
            self.send_response(401)
            self.send_header("Content-Type", "application/json")
            self.send_header("Content-Length", str(len(body)))
            self.end_headers()
            self.wfile.write(body.encode())

    server = ThreadingHTTPServer(("127.0.0.1", 0), Refuse)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    try:
        complete = openai_judge("j", f"http://127.0.0.1:{server.server_address[1]}/v1", SECRET, retries=2)
        with pytest.raises(JudgeError) as err:
            complete([{"role": "user", "content": "q"}])
    finally:
        server.shutdown()
        server.server_close()
    assert "AuthenticationError" in str(err.value) and SECRET not in str(err.value)
