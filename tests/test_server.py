"""The server generation backend against a local OpenAI-compatible server (tests/openai_stub.py)
on the loopback address: a whole round with the teacher served and the student's weights loaded
into a second server in place; rate limits retried; a malformed reply is an error naming the
server; a rerun resumes by prompt id; the API key never reaches a file."""

import json

import pytest
from conftest import tiny_config
from openai_stub import StubServer

from distillm2.config import RunConfig, load_config
from distillm2.data import load_prompts
from distillm2.generation.server import ServerError, generate_server
from distillm2.models import load_tokenizer
from distillm2.pipeline import run


def test_round_with_server_backend(tiny, tmp_path, monkeypatch):
    monkeypatch.setenv("OPENAI_API_KEY", "sk-test-secret")
    with StubServer(tiny / "teacher", fail_first=2) as teacher, StubServer(tiny / "student") as student:
        cfg = load_config(RunConfig, base=tiny_config(tiny, tmp_path / "run", rounds=2, **{
            "generation.backend": "server", "generation.server_url": teacher.url,
            "generation.server_model": "tiny-teacher", "generation.student_server_url": student.url,
            "generation.server_concurrency": 3}))
        out = run(cfg)
    prompts = load_prompts(str(tiny / "prompts.jsonl"))
    for name in ("round-1/teacher.jsonl", "round-1/student.jsonl", "round-2/student.jsonl"):
        rows = [json.loads(x) for x in (out / name).read_text().splitlines()]
        assert [r["id"] for r in rows] == [p["id"] for p in prompts], name  # all, in prompt order
        assert all(r["num_tokens"] <= 6 for r in rows)
    completions = [r for r in teacher.requests if r["path"] == "/v1/completions"]
    # 2 rate-limited attempts retried, then one request per prompt with every sampling field set
    assert len(completions) == len(prompts) + 2
    body = completions[-1]["body"]
    assert body["model"] == "tiny-teacher" and isinstance(body["prompt"], list) and isinstance(body["prompt"][0], int)
    assert body["temperature"] == 0.8 and body["top_p"] == 0.95 and body["top_k"] == -1
    assert body["repetition_penalty"] == 1.0 and body["max_tokens"] == 6
    assert len({r["body"]["seed"] for r in completions[2:]}) == len(prompts)  # one seed per prompt
    assert completions[-1]["authorization"] == "Bearer sk-test-secret"
    # the student's weights reached its server in place, once per round, from the round's export
    assert [p.split("/")[-2:] for p in student.reloads] == [["round-1", ".student-export"],
                                                            ["round-2", ".student-export"]]
    assert not (out / "round-1" / ".student-export").exists()  # removed after sampling
    for path in out.rglob("*"):
        if path.is_file() and path.suffix in (".json", ".jsonl", ".yaml", ".txt"):
            assert "sk-test-secret" not in path.read_text(), path


def test_malformed_reply_is_an_error_and_a_rerun_resumes(tiny, tmp_path):
    tok = load_tokenizer(str(tiny / "tok"))
    prompts = load_prompts(str(tiny / "prompts.jsonl"))[:5]
    out = tmp_path / "rows.jsonl"
    with StubServer(tiny / "teacher", malformed={3}) as server:
        with pytest.raises(ServerError, match=r"127\.0\.0\.1.*not a completions reply"):
            generate_server(server.url, "m", tok, prompts, out, max_new_tokens=4, concurrency=1)
        written = out.read_text().splitlines()
        assert len(written) == 2  # finished rows are kept
        before = len(server.requests)
        generate_server(server.url, "m", tok, prompts, out, max_new_tokens=4, concurrency=1)
        rerun = server.requests[before:]
    rows = [json.loads(x) for x in out.read_text().splitlines()]
    assert sorted(r["id"] for r in rows) == sorted(p["id"] for p in prompts)
    assert out.read_text().splitlines()[:2] == written
    assert len(rerun) == 3  # the rerun asked only for the three missing prompts
