"""One training step, distillm2 against TRL's GKDTrainer, on identical token ids, in the fastest
precision of the machine it runs on.

    python benchmarks/step.py              # everything; writes docs/benchmarks/step-<dtype>.json + .png
    python benchmarks/step.py --quick      # 1 warm-up + 2 steps, one repetition, no profile (smoke test)
    python benchmarks/step.py --dtype bf16 # force a precision (default auto: distillm2.precision's choice)

Precision: ``--dtype auto`` takes what a run's ``auto`` takes on this CPU (bf16 where a GEMM probe
shows it faster than float32 -- AMX, AVX512-BF16 -- float32 on an AVX2-only CPU), and every run,
TRL's included, and the GEMM ceiling are in that precision: a bf16 comparison on a CPU without
bf16 units would measure its scalar fallback, and a float32 one on a CPU with them would leave
its fastest units idle.

Set-up (cached under ``$DISTILLM2_CACHE``, default ``~/.cache/distillm2``):

- TRL lives in a virtual environment of its own, ``bench-trl-venv`` (``python -m venv`` then
  ``pip install torch==2.13.0 trl`` in one command: without the torch pin in the same command pip
  resolves a CUDA build). TRL is never a dependency of the package; only the TRL worker runs there.
- Teacher: the embedded SmolLM2-135M-Instruct (``models.load_model("smollm2-135m-instruct")``),
  whose converted cache directory is already a plain HF directory; student: the demo's
  16-layer student (``models.derive_student`` with layers 0-5, 20-29) saved as a plain HF directory
  ``bench-step/student``. Both systems load the same weights from these directories.
- Data (``bench-step/data.json``): demo:train prompts through ``data.prompt_token_ids``; chosen =
  the teacher's greedy responses (at most 40 new tokens, weights in the benchmark's precision),
  rejected = the student's sampled responses (temperature 0.8, top-p 0.95, seed 0). The ids stored are those of
  ``data.encode`` applied to the decoded text, so the Trainer's own encoding reproduces them
  exactly (checked); how many differ from the generated ids is recorded.
- Steps: ``train.plan_steps`` (seed 0) over 8-pair micro-batches. Step s of every run uses the same
  8 prompts: TRL GKD and our GKD train on their 8 teacher-response rows, DistiLLM-2 on those 8 rows
  plus the 8 student-response rows of the same prompts (16 rows).

Runs, each in its own subprocess (peak RSS = VmHWM of /proc/self/status after the last step), P
the precision: ``trl-gkd-P`` (GKDTrainer, beta 0.5, lmbda 0, seq_kd False; TRL's collator on the
ids; ``trainer.training_step`` + clip + optimizer/scheduler step + zero_grad as its inner loop
does), ``ours-gkd-P`` (Trainer.fit's step replicated with the library calls:
``stacked_pair_loss("gkd")`` needs a chosen and a rejected row kind, so the 8 rows are passed as
4 + 4), ``ours-distillm2-P`` (``distillm2.train.Trainer.fit`` itself; its per-step ``step_s``) and
``ours-distillm2fused-P`` (the same with ``train.fused_loss``: the loss from hidden states). bf16 =
autocast of the fp32-weight student plus, on our side, bf16 teacher weights (what ``auto`` picks
there); TRL's bf16 = ``bf16=True`` (autocast of both fp32-weight models); fp32 = no autocast, every
weight float32, on both sides. Runs are interleaved (TRL, ours, ... then again); per run the
median of the measured steps after the warm-up steps.

Ceiling: ``torch.matmul`` rates in P of every GEMM shape of the step (forward, input gradient and
weight gradient of each linear layer at the step's executed token count, and of lm_head at the
positions whose logits are computed), best of 3. ``ceiling_fraction`` divides the DistiLLM-2 step's
achieved rate, counting 2 N_teacher + 6 N_student FLOPs per executed token (padding included;
lm_head only at its logit positions; attention scores not counted), by the FLOP-weighted mix of
those rates (the time the step's GEMM FLOPs take at the measured rates); the max single-shape
rate is reported too.

Then a torch.profiler (CPU) trace of 2 DistiLLM-2 steps in P after 2 untraced ones, driven
through Trainer.fit with record_function labels added around the library calls it makes.
The last line printed is ``step: ratio_tokens_per_s=X ratio_peak_rss=Y ceiling_fraction=Z``
(DistiLLM-2 against TRL GKD in P: trained tokens/s ours/TRL, peak RSS ours/TRL), and the line
before it names P.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import shutil
import statistics
import subprocess
import sys
import time
from pathlib import Path

import step_workers  # noqa: E402 - a sibling script: benchmarks/ is on sys.path
from step_summary import flop_counts, plot, summarize  # noqa: E402 - a sibling script
from step_workers import (  # noqa: E402 - a sibling script: benchmarks/ is on sys.path
    DTYPES,
    LR,
    MAX_NEW,
    OUT_DIR,
    ROOT,
    ROWS,
    STUDENT_LAYERS,
    TEACHER,
    ensure_trl_venv,
    env,
    runs,
    work_dir,
    worker_gemm,
    worker_ours_distillm2,
    worker_ours_gkd,
    worker_profile,
    worker_trl,
)


def _generate(model, tok, prompt_ids, eot, sample: bool, seed: int, batch: int = 16):
    import torch

    pad = tok.pad_token_id
    out = []
    for start in range(0, len(prompt_ids), batch):
        chunk = prompt_ids[start : start + batch]
        width = max(map(len, chunk))
        ids = torch.tensor([[pad] * (width - len(p)) + p for p in chunk])
        attn = torch.tensor([[0] * (width - len(p)) + [1] * len(p) for p in chunk])
        torch.manual_seed(seed + start)
        kw = dict(do_sample=True, temperature=0.8, top_p=0.95, top_k=0) if sample else dict(do_sample=False)
        with torch.no_grad():
            seqs = model.generate(input_ids=ids, attention_mask=attn, max_new_tokens=MAX_NEW, eos_token_id=eot,
                                  pad_token_id=pad, **kw)
        for row in seqs[:, width:].tolist():
            cut = next((i for i, t in enumerate(row) if t in eot), None)
            out.append((row[: cut + 1], True) if cut is not None else (row, False))
    return out


def machine_precision(given: str) -> tuple[str, dict]:
    """The benchmark's precision (``fp32`` or ``bf16``): ``given``, or for ``auto`` what
    ``distillm2.precision`` chooses on this CPU for the teacher's shapes; and the probe's numbers."""
    from distillm2 import precision

    found = precision.verdict("cpu", *precision.model_dims(TEACHER))
    chosen = given if given != "auto" else ("bf16" if found.weights == "bfloat16" else "fp32")
    return chosen, {"auto_choice": found.weights, "reason": found.reason, "numbers": found.numbers}


def prepare(steps_needed: int, precision: str) -> dict:
    """Teacher/student directories, the cached rows (ids) and the step plan; returns the spec."""
    from distillm2 import data, models
    from distillm2.config import TrainConfig
    from distillm2.train import plan_steps

    wd = work_dir()
    wd.mkdir(parents=True, exist_ok=True)
    teacher_dir = models.resolve(TEACHER)
    student_dir = wd / "student"
    tok = models.load_tokenizer(TEACHER)
    if not (student_dir / "model.safetensors").exists():
        teacher = models.load_model(TEACHER, "float32")
        student = models.derive_student(teacher, layers=STUDENT_LAYERS)
        tmp = wd / f"student.tmp{os.getpid()}"
        student.save_pretrained(tmp)
        tok.save_pretrained(tmp)
        shutil.rmtree(student_dir, ignore_errors=True)
        tmp.rename(student_dir)
        del teacher, student
    n_pairs = steps_needed * ROWS
    pool = max(n_pairs, 12 * ROWS)  # generated once for the default 2 + 10 steps
    data_path = wd / "data.json"
    cached = json.loads(data_path.read_text()) if data_path.exists() else None
    gen_dtype = DTYPES[precision]
    if cached is None or cached["max_new"] != MAX_NEW or len(cached["rows"]) < n_pairs \
            or cached.get("gen_dtype", "bfloat16") != gen_dtype:
        prompts = data.load_prompts("demo:train")[:pool]
        p_ids = [data.prompt_token_ids(tok, p["messages"]) for p in prompts]
        eot = data.end_of_turn_ids(tok)
        t0 = time.perf_counter()
        teacher = models.load_model(teacher_dir, gen_dtype).eval()
        chosen = _generate(teacher, tok, p_ids, eot, sample=False, seed=0)
        del teacher
        student = models.load_model(str(student_dir), gen_dtype).eval()
        rejected = _generate(student, tok, p_ids, eot, sample=True, seed=0)
        del student
        print(f"generated {2 * len(prompts)} responses in {time.perf_counter() - t0:.0f} s", flush=True)
        rows, differ = [], 0
        for p, pi, (c, cf), (r, rf) in zip(prompts, p_ids, chosen, rejected):
            row = {"id": p["id"], "messages": p["messages"], "prompt_ids": pi}
            for which, ids, fin in (("chosen", c, cf), ("rejected", r, rf)):
                text = tok.decode(ids[:-1] if fin else ids, skip_special_tokens=False)
                enc = data.encode(tok, p["messages"], text, fin, 512, 1024)
                assert enc.prompt_ids == pi
                differ += enc.response_ids != ids
                row.update({which: text, f"{which}_finished": fin, f"{which}_ids": enc.response_ids})
            rows.append(row)
        cached = {"max_new": MAX_NEW, "gen_dtype": gen_dtype, "rows": rows, "reencode_differs": differ,
                  "note": "ids = data.encode(decoded generation); reencode_differs counts responses whose ids changed"}
        data_path.write_text(json.dumps(cached))
    rows = cached["rows"][:n_pairs]
    cfg = TrainConfig(batch_size=ROWS, grad_accum=1, epochs=1.0)
    plan = [s[0] for s in plan_steps(n_pairs, cfg, 1, 0)]
    # layout of each step (for FLOPs and tokens): ours = [left-padded prompt | right-padded response],
    # TRL = left-padded [prompt + response] with logits everywhere
    layout = []
    for idx in plan:
        P = max(len(rows[i]["prompt_ids"]) for i in idx)
        Lc = max(len(rows[i]["chosen_ids"]) for i in idx)
        Lr = max(len(rows[i]["rejected_ids"]) for i in idx)
        L2 = max(Lc, Lr)
        full = max(len(rows[i]["prompt_ids"]) + len(rows[i]["chosen_ids"]) for i in idx)
        tc = sum(len(rows[i]["chosen_ids"]) for i in idx)
        tr = sum(len(rows[i]["rejected_ids"]) for i in idx)
        real_c = sum(len(rows[i]["prompt_ids"]) + len(rows[i]["chosen_ids"]) for i in idx)
        real_r = sum(len(rows[i]["prompt_ids"]) + len(rows[i]["rejected_ids"]) for i in idx)
        layout.append({
            "gkd8": {"rows": ROWS, "trained": tc, "real": real_c, "exec": ROWS * (P + Lc), "lm": ROWS * Lc},
            "trl8": {"rows": ROWS, "trained": tc, "real": real_c, "exec": ROWS * full, "lm": ROWS * full},
            "distillm2_16": {"rows": 2 * ROWS, "trained": tc + tr, "real": real_c + real_r,
                             "exec": 2 * ROWS * (P + L2), "lm": 2 * ROWS * L2},
            # Trainer.fit runs each pair's prompt once for both rows (models.response_logits,
            # shared_prompts): what it executes; the plain layout's counts are kept beside them.
            "distillm2_shared": {"rows": 2 * ROWS, "trained": tc + tr, "real": real_c + real_r,
                                 "exec": ROWS * P + 2 * ROWS * L2, "lm": ROWS + 2 * ROWS * (L2 - 1),
                                 "plain_exec": 2 * ROWS * (P + L2), "plain_lm": 2 * ROWS * L2},
        })
    spec = {"teacher_dir": str(teacher_dir), "student_dir": str(student_dir), "data": str(data_path),
            "plan": plan, "layout": layout, "n_pairs": n_pairs, "reencode_differs": cached["reencode_differs"]}
    (wd / "spec.json").write_text(json.dumps(spec))
    return spec


# Workers (each its own process) -----------------------------------------------------------------


REUSE = False  # --reuse: a worker whose result file exists is not run again (the summary is redone)


def run_worker(python: str, args: list[str], out: Path) -> dict:
    if REUSE and out.exists():
        return {"load_before": [float("nan")] * 3, **json.loads(out.read_text()), "reused": True}
    out.unlink(missing_ok=True)
    load = os.getloadavg()
    t0 = time.perf_counter()
    proc = subprocess.run([python, str(Path(__file__).resolve()), *args, "--out", str(out)], env=env(),
                          capture_output=True, text=True, cwd=ROOT)
    if proc.returncode != 0 or not out.exists():
        sys.stderr.write(proc.stdout[-3000:] + proc.stderr[-6000:])
        raise SystemExit(f"worker {args} failed (exit {proc.returncode})")
    result = json.loads(out.read_text())
    result["load_before"] = load
    result["process_s"] = time.perf_counter() - t0
    return result


def choose_attention(spec: dict, given: str, rows: int, length: int, precision: str) -> dict:
    """Our models' attention: ``given``, or for ``auto`` the faster of sdpa and eager in a
    forward + backward in ``precision`` of the student at the DistiLLM-2 step's shape, measured the way a run with
    ``models.attn_implementation: auto`` measures it (:func:`distillm2.models.measure_attention`)."""
    if given != "auto":
        return {"choice": given, "how": "given by --attn"}
    import torch

    from distillm2 import models

    student = models.load_model(spec["student_dir"], "float32")
    with torch.autocast("cpu", dtype=torch.bfloat16, enabled=precision == "bf16"):
        seconds = models.measure_attention(student, rows, length)
    del student
    choice = min(seconds, key=seconds.get)
    return {"choice": choice, "seconds": seconds, "rows": rows, "length": length,
            "how": "measured: " + ", ".join(f"{k} {v * 1000:.0f} ms" for k, v in seconds.items())}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--worker", choices=("trl", "ours-gkd", "ours-distillm2", "ours-distillm2fused", "gemm",
                                         "profile"))
    ap.add_argument("--precision", default="bf16", help="workers: the precision they run in")
    ap.add_argument("--dtype", default="auto", choices=("auto", "fp32", "bf16"),
                    help="precision of every run and of the ceiling; auto: the machine's fastest (distillm2.precision)")
    ap.add_argument("--spec")
    ap.add_argument("--out")
    ap.add_argument("--tokens", type=int)
    ap.add_argument("--lm", type=int)
    ap.add_argument("--steps", type=int, default=10, help="measured steps per run")
    ap.add_argument("--warmup", type=int, default=2)
    ap.add_argument("--reps", type=int, default=2, help="interleaved repetitions of every run")
    ap.add_argument("--quick", action="store_true", help="1 warm-up + 2 steps, 1 repetition, no profile")
    ap.add_argument("--no-profile", action="store_true")
    ap.add_argument("--reuse", action="store_true",
                    help="reuse the result files of workers that already ran (cache/bench-step/results); redo the summary")
    ap.add_argument("--json", help="output JSON (default docs/benchmarks/step-<dtype>.json, -quick added with --quick; the plot beside it)")
    ap.add_argument("--attn", default="auto",
                    help="attention implementation of our models: auto (measured at the step's shape, as a "
                         "run's models.attn_implementation: auto does), eager or sdpa")
    args = ap.parse_args()
    if args.worker:
        step_workers.ATTN = None if args.attn == "auto" else args.attn
        spec = json.loads(Path(args.spec).read_text())
        out = Path(args.out)
        n = args.steps + args.warmup
        if args.worker == "trl":
            worker_trl(spec, args.precision, n, out)
        elif args.worker == "ours-gkd":
            worker_ours_gkd(spec, args.precision, n, out)
        elif args.worker in ("ours-distillm2", "ours-distillm2fused"):
            worker_ours_distillm2(spec, args.precision, n, out, fused=args.worker.endswith("fused"))
        elif args.worker == "gemm":
            worker_gemm(spec, args.tokens, args.lm, out, args.precision)
        else:
            worker_profile(spec, out, precision=args.precision)
        return

    if args.quick:
        args.steps, args.warmup, args.reps, args.no_profile = 2, 1, 1, True
    global REUSE
    REUSE = args.reuse
    started, load_start = time.time(), os.getloadavg()
    import torch

    trl_python = ensure_trl_venv()
    n = args.steps + args.warmup
    P, precision_info = machine_precision(args.dtype)
    run_names = runs(P)
    print(f"precision: {P} ({'given' if args.dtype != 'auto' else 'auto'}; {precision_info['reason']})", flush=True)
    spec = prepare(n, P)
    spec_path = work_dir() / "spec.json"
    out_dir = work_dir() / "results"
    out_dir.mkdir(parents=True, exist_ok=True)
    layouts = spec["layout"][:n]
    d2 = [lay["distillm2_16"] for lay in layouts[args.warmup:]]
    tokens = round(statistics.median(lay["exec"] for lay in d2))
    lm = round(statistics.median(lay["lm"] for lay in d2))
    common = ["--spec", str(spec_path), "--steps", str(args.steps), "--warmup", str(args.warmup)]
    attention = choose_attention(spec, args.attn, rows=2 * ROWS, length=round(tokens / (2 * ROWS)), precision=P)
    print(f"attention of our models: {attention['choice']} ({attention['how']})", flush=True)
    gemm_args = ["--worker", "gemm", "--tokens", str(tokens), "--lm", str(lm), "--precision", P, *common]
    gemms = [run_worker(sys.executable, gemm_args, out_dir / "gemm-0.json")]
    results = {name: [] for name in run_names}
    for rep in range(args.reps):
        for name in run_names:
            system, loss, precision = name.split("-")
            if system == "trl":
                python, wargs = str(trl_python), ["--worker", "trl"]
            else:
                python, wargs = sys.executable, ["--worker", f"ours-{loss}", "--attn", attention["choice"]]
            r = run_worker(python, [*wargs, "--precision", precision, *common], out_dir / f"{name}-{rep}.json")
            results[name].append(r)
            print(f"  {name} rep {rep + 1}: median {statistics.median(r['times'][args.warmup:]):.2f} s/step, "
                  f"peak RSS {r['peak_rss_kib'] / 2**20:.2f} GiB, load {r['load_before'][0]:.1f}", flush=True)
    gemms.append(run_worker(sys.executable, gemm_args, out_dir / "gemm-1.json"))

    cfg = json.loads((Path(spec["teacher_dir"]) / "config.json").read_text())
    fc = flop_counts(cfg)
    layout_key = {"trl": "trl8", "gkd": "gkd8", "distillm2": "distillm2_shared", "distillm2fused": "distillm2_16"}
    table = []
    for name in run_names:
        system, loss = name.split("-")[:2]
        key = "trl8" if system == "trl" else layout_key[loss]
        table.append(summarize(name, results[name], [lay[key] for lay in layouts], args.warmup, fc))
    rows = {r["run"]: r for r in table}

    # GEMM ceiling: per shape the best of both measurements; the mix weights each shape by the
    # FLOPs the DistiLLM-2 step puts through it (teacher: forward only; student: all three)
    shapes = gemms[0]["shapes"]
    for s, s2 in zip(shapes, gemms[1]["shapes"]):
        s["gflops"] = max(s["gflops"], s2["gflops"])
    gemm_flops, gemm_time = 0.0, 0.0
    for s in shapes:
        layers_t = 1 if s.get("head") else fc["teacher_layers"]
        layers_s = 1 if s.get("head") else fc["student_layers"]
        uses = (layers_t if s["kind"] == "fwd" else 0) + layers_s
        f = 2.0 * s["m"] * s["k"] * s["n"] * s["per_layer"] * uses
        s["step_flops_share"] = f
        gemm_flops += f
        gemm_time += f / (s["gflops"] * 1e9)
    ceiling_mix = gemm_flops / gemm_time / 1e9
    ceiling_max = max(s["gflops"] for s in shapes)
    for s in shapes:
        s["step_flops_share"] /= gemm_flops
    ours, trl = rows[f"ours-distillm2-{P}"], rows[f"trl-gkd-{P}"]
    ratio_tok = ours["trained_tokens_per_s"] / trl["trained_tokens_per_s"]
    ratio_rss = ours["peak_rss_gib"] / trl["peak_rss_gib"]
    for r in table:
        r["fraction_of_ceiling_mix"] = r["achieved_gflops"] / ceiling_mix
    ceiling_fraction = ours["achieved_gflops"] / ceiling_mix
    plain_fraction = ours["plain_equivalent_gflops"] / ceiling_mix

    profile = None
    if not args.no_profile:
        profile = run_worker(sys.executable, ["--worker", "profile", "--precision", P, *common],
                             out_dir / "profile.json")

    print()
    print(f"8 prompts per step (demo:train, teacher greedy responses <= {MAX_NEW} tokens; DistiLLM-2 adds the "
          f"student's sampled responses: 16 rows); median of {args.steps} steps after {args.warmup} warm-up, "
          f"{args.reps} interleaved runs; load average {load_start[0]:.1f} at start")
    print()
    print("| run | rows | s/step | trained tokens/s | exec tokens/step | GFLOP/s | peak RSS GiB |")
    print("|---|---|---|---|---|---|---|")
    for r in table:
        print(f"| {r['run']} | {r['rows']} | {r['s_per_step']:.2f} | {r['trained_tokens_per_s']:.0f} | "
              f"{r['per_step_mean']['exec']:.0f} | {r['achieved_gflops']:.0f} | {r['peak_rss_gib']:.2f} |")
    print()
    print(f"{P} GEMM ceiling: FLOP-weighted mix {ceiling_mix:.0f} GFLOP/s (max single shape {ceiling_max:.0f}); "
          f"DistiLLM-2 {P} step reaches {ours['achieved_gflops']:.0f} GFLOP/s executed (prompts once per pair), "
          f"{ours['plain_equivalent_gflops']:.0f} GFLOP/s counting the plain layout's FLOPs "
          f"(fraction {plain_fraction:.2f})")
    if profile:
        print()
        print(f"profile (DistiLLM-2 {P}, s per step, inclusive per phase):",
              ", ".join(f"{k} {v:.2f}" for k, v in profile["phase_s"].items()))
        for phase, cats in profile["by_phase_category_s"].items():
            print(f"  {phase}: " + ", ".join(f"{c} {v:.2f}" for c, v in cats.items() if v >= 0.005))

    result = {
        "benchmark": "one training step: TRL GKDTrainer vs distillm2, in the machine's fastest precision",
        "command": "python benchmarks/step.py" + (" --quick" if args.quick else "")
                   + (f" --attn {args.attn}" if args.attn != "auto" else "")
                   + (f" --dtype {args.dtype}" if args.dtype != "auto" else ""),
        "dtype": P, "precision": precision_info,
        "machine": {"platform": platform.platform(), "processor": platform.processor(), "cpus": os.cpu_count(),
                    "cpu": precision_info["numbers"].get("cpu"), "isa": torch.backends.cpu.get_cpu_capability(),
                    "torch_threads": torch.get_num_threads(), "python": platform.python_version()},
        "loadavg": {"start": load_start, "end": os.getloadavg()},
        "wall_s": time.time() - started,
        "setup": {"teacher": TEACHER, "student_layers": STUDENT_LAYERS, "rows_per_step": ROWS,
                  "max_new_tokens": MAX_NEW, "chosen": f"teacher greedy ({DTYPES[P]} weights)",
                  "rejected": f"student sampled ({DTYPES[P]} weights, T 0.8, top-p 0.95, seed 0)",
                  "reencode_differs": spec["reencode_differs"], "warmup": args.warmup, "steps": args.steps,
                  "reps": args.reps, "order": run_names, "lr": LR,
                  "trl": "GKDTrainer beta 0.5 lmbda 0 seq_kd False; training_step + clip + optimizer/scheduler step "
                         "+ zero_grad on DataCollatorForChatML batches of the same ids",
                  "ours_gkd": "Trainer.fit step replicated with collate/response_logits/stacked_pair_loss('gkd', 4+4 rows, "
                              "jsd_beta 0.5)/accelerator.backward/distributed.grad_norm/fused AdamW",
                  "ours_distillm2": "distillm2.train.Trainer.fit (loss distillm2, alpha 0.1, beta 0.5), step_s of "
                                    "metrics.jsonl; end-of-stage checkpoint skipped",
                  "ours_distillm2fused": "the same with train.fused_loss (the loss from hidden states)",
                  "flops": "2 N_teacher + 6 N_student per executed token (padding included), lm_head only at "
                           "logit positions (TRL: every position), attention scores not counted",
                  "flop_counts": fc, "attention": attention},
        "runs": table,
        "gemm": {"tokens": tokens, "lm_positions": lm, "ceiling_gflops_mix": ceiling_mix,
                 "ceiling_gflops_max": ceiling_max, "ceiling_used": "FLOP-weighted mix of the step's GEMM shapes",
                 "shapes": shapes, "load_before": [g["load_before"] for g in gemms]},
        "ratio_tokens_per_s": ratio_tok,
        "ratio_peak_rss": ratio_rss,
        "ceiling_fraction": ceiling_fraction,
        "ceiling_fraction_plain_equivalent": plain_fraction,
        "ceiling_fraction_of_max": ours["achieved_gflops"] / ceiling_max,
        "gkd_vs_gkd": {"ratio_tokens_per_s": rows[f"ours-gkd-{P}"]["trained_tokens_per_s"]
                       / trl["trained_tokens_per_s"],
                       "ratio_peak_rss": rows[f"ours-gkd-{P}"]["peak_rss_gib"] / trl["peak_rss_gib"]},
        "profile": profile,
    }
    # a --quick smoke run never replaces the published numbers
    json_path = Path(args.json or OUT_DIR / f"step-{P}{'-quick' if args.quick else ''}.json")
    json_path.parent.mkdir(parents=True, exist_ok=True)
    json_path.write_text(json.dumps(result, indent=1))
    plot(table, json_path.with_suffix(".png"), f"{P}, {precision_info['numbers'].get('cpu', '')}")
    print(f"\nwrote {json_path} and {json_path.with_suffix('.png')}")
    print(f"step ({P}, {precision_info['numbers'].get('isa', '')}): trained tokens/s ours/TRL, peak RSS ours/TRL, "
          f"fraction of the {P} GEMM ceiling")
    print(f"step: ratio_tokens_per_s={ratio_tok:.2f} ratio_peak_rss={ratio_rss:.2f} ceiling_fraction={ceiling_fraction:.2f}")


if __name__ == "__main__":
    main()
