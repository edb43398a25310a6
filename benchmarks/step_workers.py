"""The subprocess workers of ``benchmarks/step.py`` (one run each, so that peak RSS is per
process) and the settings and helpers both files share. Run through step.py, never alone."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
OUT_DIR = ROOT / "docs" / "benchmarks"  # step-<dtype>.json and .png
TEACHER = "smollm2-135m-instruct"
STUDENT_LAYERS = [0, 1, 2, 3, 4, 5, 20, 21, 22, 23, 24, 25, 26, 27, 28, 29]
ROWS = 8  # sequences (pairs) per step
MAX_NEW = 40  # new tokens per response: ~40 prompt + ~40 response = ~80 real tokens a row, ~640 a step
LR = 5e-5
DTYPES = {"fp32": "float32", "bf16": "bfloat16"}  # the benchmark's precision names -> torch dtype names


def runs(precision: str) -> list[str]:
    """The runs of one benchmark, all in ``precision`` (the machine's fastest, by default)."""
    return [f"trl-gkd-{precision}", f"ours-gkd-{precision}", f"ours-distillm2-{precision}",
            f"ours-distillm2fused-{precision}"]


TRL_PIP = ["torch==2.13.0", "trl"]


def cache_dir() -> Path:
    """The project's cache (the same rule as distillm2.models.cache_dir; the TRL venv lacks distillm2)."""
    default = Path(os.environ.get("XDG_CACHE_HOME", Path.home() / ".cache")) / "distillm2"
    return Path(os.environ.get("DISTILLM2_CACHE", default))


def work_dir() -> Path:
    return cache_dir() / "bench-step"


def vm_kib(field: str) -> int:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(field + ":"):
            return int(line.split()[1])
    return -1


def env() -> dict:
    e = dict(os.environ, HF_HUB_OFFLINE="1", TRANSFORMERS_OFFLINE="1", TOKENIZERS_PARALLELISM="false")
    e["PYTHONPATH"] = str(ROOT / "src") + (os.pathsep + e["PYTHONPATH"] if e.get("PYTHONPATH") else "")
    return e


# Set-up (main process, project environment) ----------------------------------------------------


def ensure_trl_venv() -> Path:
    venv = cache_dir() / "bench-trl-venv"
    python = venv / "bin" / "python"
    probe = [str(python), "-c", "import trl.experimental.gkd"]
    if python.exists() and subprocess.run(probe, capture_output=True, env=env()).returncode == 0:
        return python
    print(f"creating {venv} (pip install {' '.join(TRL_PIP)}) ...", flush=True)
    subprocess.run([sys.executable, "-m", "venv", str(venv)], check=True)
    subprocess.run([str(python), "-m", "pip", "install", "-q", *TRL_PIP], check=True)  # ONE command: the pin holds
    subprocess.run(probe, check=True, env=env())
    return python


def _finish(out: Path, result: dict) -> None:
    result["peak_rss_kib"] = vm_kib("VmHWM")
    result["load_after"] = os.getloadavg()
    out.write_text(json.dumps(result))


def worker_trl(spec: dict, precision: str, steps: int, out: Path) -> None:
    import torch
    import transformers
    import trl
    from datasets import Dataset
    from transformers import AutoTokenizer
    from trl.experimental.gkd import GKDConfig, GKDTrainer

    rows = json.loads(Path(spec["data"]).read_text())["rows"]
    plan = spec["plan"][:steps]
    tok = AutoTokenizer.from_pretrained(spec["teacher_dir"])
    # pre-tokenised examples: the collator takes input_ids and the prompt/completion boundary as they are
    step_examples = [[{"prompt": tok.decode(rows[i]["prompt_ids"]),
                       "input_ids": rows[i]["prompt_ids"] + rows[i]["chosen_ids"],
                       "completion_mask": [0] * len(rows[i]["prompt_ids"]) + [1] * len(rows[i]["chosen_ids"])}
                      for i in idx] for idx in plan]
    tmp = tempfile.mkdtemp(prefix="trl-gkd-")
    args = GKDConfig(output_dir=tmp, per_device_train_batch_size=ROWS, bf16=precision == "bf16", use_cpu=True,
                     lmbda=0.0, beta=0.5, seq_kd=False, learning_rate=LR, max_grad_norm=1.0, report_to="none",
                     save_strategy="no", max_steps=len(plan), lr_scheduler_type="cosine", warmup_steps=1,
                     max_length=1024)
    trainer = GKDTrainer(model=spec["student_dir"], teacher_model=spec["teacher_dir"], args=args,
                         train_dataset=Dataset.from_list([e for s in step_examples for e in s]),
                         processing_class=tok)
    # what Trainer._inner_training_loop does before its first step (single CPU process)
    trainer.create_optimizer()
    model, trainer.optimizer = trainer.accelerator.prepare(trainer.model, trainer.optimizer)
    trainer.model_wrapped = model
    trainer.create_scheduler(num_training_steps=len(plan), optimizer=trainer.optimizer)
    trainer.current_gradient_accumulation_steps = 1
    batches = [trainer.data_collator(s) for s in step_examples]
    layout = []
    for b in batches:
        n = int(b["input_ids"].numel())
        layout.append({"exec": n, "lm": n, "trained": int((b["labels"][:, 1:] != -100).sum()),
                       "real": int(b["attention_mask"].sum())})
    model.zero_grad()
    times, losses = [], []
    for inputs in batches:
        t0 = time.perf_counter()
        try:
            n_items = trainer._get_num_items_in_batch([inputs], trainer.args.device)
        except Exception:  # noqa: BLE001 - an older or newer transformers: the loop's default
            n_items = None
        loss = trainer.training_step(model, inputs, n_items)
        trainer._clip_grad_norm(model)
        trainer.optimizer.step()
        trainer.lr_scheduler.step()
        model.zero_grad()
        times.append(time.perf_counter() - t0)
        losses.append(float(loss))
    shutil.rmtree(tmp, ignore_errors=True)
    _finish(out, {"times": times, "losses": losses, "layout": layout, "threads": torch.get_num_threads(),
                  "optimizer": type(trainer.optimizer.optimizer).__name__,
                  "fused": bool(trainer.optimizer.optimizer.defaults.get("fused")),
                  "mixed_precision": trainer.accelerator.mixed_precision,
                  "student_dtype": str(next(trainer.model.parameters()).dtype),
                  "teacher_dtype": str(next(trainer.teacher_model.parameters()).dtype),
                  "attn": trainer.model.config._attn_implementation,
                  "versions": {"torch": torch.__version__, "transformers": transformers.__version__,
                               "trl": trl.__version__}})


ATTN = None  # --attn: a what-if for our workers (default: transformers' default, sdpa, as on the TRL side)


def _ours_setup(spec, precision):
    from distillm2 import distributed, models

    acc = distributed.make_accelerator("bf16" if precision == "bf16" else "no")
    tok = models.load_tokenizer(spec["teacher_dir"])
    student = models.load_model(spec["student_dir"], "float32", attn_implementation=ATTN)
    teacher = models.load_model(spec["teacher_dir"], DTYPES[precision], attn_implementation=ATTN)
    vocab = models.check_tokenizers(tok, tok, teacher, student)
    return acc, tok, student, teacher, vocab


def worker_ours_gkd(spec: dict, precision: str, steps: int, out: Path) -> None:
    """Trainer.fit's step with the same library calls, on the 8 teacher-response rows."""
    import torch

    from distillm2 import distributed
    from distillm2.config import TrainConfig
    from distillm2.data import EncodedRow, collate
    from distillm2.losses import LossParams, stacked_pair_loss
    from distillm2.models import response_logits
    from distillm2.train import lr_factor, make_optimizer

    rows = json.loads(Path(spec["data"]).read_text())["rows"]
    plan = spec["plan"][:steps]
    acc, tok, student, teacher, vocab = _ours_setup(spec, precision)
    cfg = TrainConfig(batch_size=ROWS, lr=LR)
    student.train()
    trainable = [p for p in student.parameters() if p.requires_grad]
    optimizer = make_optimizer(trainable, cfg, fused=True)
    student, optimizer = acc.prepare(student, optimizer)
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lr_factor(cfg, len(plan)))
    teacher = distributed.place_teacher(acc, teacher)
    scale = distributed.loss_scale(acc, cfg)
    params = LossParams(jsd_beta=0.5)
    half = ROWS // 2
    times, losses = [], []
    for idx in plan:
        t0 = time.perf_counter()
        batch = collate([EncodedRow(rows[i]["prompt_ids"], rows[i]["chosen_ids"]) for i in idx],
                        tok.pad_token_id).to(acc.device)
        with acc.autocast():
            s = response_logits(student, batch, vocab)
        with torch.no_grad():
            t = response_logits(teacher, batch, vocab)
        parts = {"chosen": slice(0, half), "rejected": slice(half, ROWS)}
        out_loss = stacked_pair_loss("gkd", s, t, batch.mask, parts, labels=batch.labels, params=params)
        loss = out_loss.per_pair.sum() / half * scale
        acc.backward(loss)
        distributed.grad_norm(acc, student, cfg.max_grad_norm)
        optimizer.step()
        scheduler.step()
        optimizer.zero_grad(set_to_none=True)
        del s, t, loss
        times.append(time.perf_counter() - t0)
        losses.append(float(out_loss.per_pair.detach().mean()))
    _finish(out, {"times": times, "losses": losses, "threads": torch.get_num_threads(),
                  "optimizer": type(optimizer.optimizer).__name__,
                  "fused": bool(optimizer.optimizer.defaults.get("fused")),
                  "mixed_precision": acc.mixed_precision, "teacher_dtype": str(next(teacher.parameters()).dtype),
                  "attn": student.config._attn_implementation, "driver": "replicated Trainer.fit step"})


def _trainer_for(spec, precision, steps, stage_dir, fused=False):
    """distillm2.train.Trainer on the text pairs of the first ``steps`` plan steps (its own plan:
    checked to equal the spec's); ``fused``: train.fused_loss (the loss from hidden states)."""
    from distillm2.config import LossConfig, TrainConfig
    from distillm2.train import Trainer

    rows = json.loads(Path(spec["data"]).read_text())["rows"][: spec["n_pairs"]]
    acc, tok, student, teacher, vocab = _ours_setup(spec, precision)
    pairs = [{"id": r["id"], "prompt": r["messages"], "chosen": r["chosen"], "rejected": r["rejected"],
              "chosen_finished": r["chosen_finished"], "rejected_finished": r["rejected_finished"]} for r in rows]
    shutil.rmtree(stage_dir, ignore_errors=True)
    cfg = TrainConfig(batch_size=ROWS, grad_accum=1, epochs=1.0, lr=LR, checkpoint_every=0,
                      mixed_precision="bf16" if precision == "bf16" else "no", fused_loss=fused)
    trainer = Trainer(accelerator=acc, student=student, teacher=teacher, tokenizer=tok, pairs=pairs, train_cfg=cfg,
                      loss_cfg=LossConfig(name="distillm2"), stage_dir=stage_dir, vocab=vocab, stage_seed=0)
    for r, enc in zip(rows, trainer.encoded):  # the Trainer's own encoding gives the benchmark's ids
        for which in ("chosen", "rejected"):
            assert enc[which].prompt_ids == r["prompt_ids"] and enc[which].response_ids == r[f"{which}_ids"], r["id"]
    assert [s[0] for s in trainer.steps] == spec["plan"], "Trainer's plan differs from the spec's"
    trainer.steps = trainer.steps[:steps]
    return trainer, acc


def worker_ours_distillm2(spec: dict, precision: str, steps: int, out: Path, fused: bool = False) -> None:
    """distillm2.train.Trainer.fit itself; step times from its metrics.jsonl (step_s); ``fused``:
    with train.fused_loss."""
    import torch

    from distillm2 import checkpoint

    stage_dir = work_dir() / "runs" / f"distillm2-{os.getpid()}"
    trainer, acc = _trainer_for(spec, precision, steps, stage_dir, fused)
    peak = {}

    def no_checkpoint(*a, **k):  # the end-of-stage checkpoint is no part of a step: record the peak, skip it
        peak["kib"] = vm_kib("VmHWM")

    checkpoint.save_checkpoint = no_checkpoint
    trainer.fit(save_to=None)
    records = [json.loads(line) for line in (stage_dir / "metrics.jsonl").read_text().splitlines()]
    shutil.rmtree(stage_dir, ignore_errors=True)
    opt = trainer.optimizer.optimizer
    result = {"times": [r["step_s"] for r in records], "losses": [r["loss"] for r in records],
              "threads": torch.get_num_threads(), "optimizer": type(opt).__name__,
              "fused": bool(opt.defaults.get("fused")), "mixed_precision": acc.mixed_precision,
              "teacher_dtype": str(next(trainer.teacher.parameters()).dtype),
              "attn": trainer.student.config._attn_implementation, "driver": "Trainer.fit", "fused_loss": fused}
    _finish(out, result)
    result = json.loads(out.read_text())
    result["peak_rss_kib"] = peak.get("kib", result["peak_rss_kib"])
    out.write_text(json.dumps(result))


def gemm_shapes(cfg: dict, tokens: int, lm: int) -> list[dict]:
    """(M, K, N) of every GEMM of a teacher forward + student forward/backward: per linear layer
    forward x @ W.T, input gradient g @ W, weight gradient g.T @ x; ``flops_teacher`` /
    ``flops_student`` = how many such FLOPs the step has per layer (times the layer count later)."""
    h, inter = cfg["hidden_size"], cfg["intermediate_size"]
    kv = cfg["num_key_value_heads"] * cfg.get("head_dim", h // cfg["num_attention_heads"])
    linears = {"q/o": (h, h, 2), "k/v": (h, kv, 2), "gate/up": (h, inter, 2), "down": (inter, h, 1)}
    out = []
    for name, (k, n, count) in linears.items():
        out.append({"name": f"{name} fwd", "m": tokens, "k": k, "n": n, "kind": "fwd", "per_layer": count})
        out.append({"name": f"{name} dgrad", "m": tokens, "k": n, "n": k, "kind": "dgrad", "per_layer": count})
        out.append({"name": f"{name} wgrad", "m": n, "k": tokens, "n": k, "kind": "wgrad", "per_layer": count})
    v = cfg["vocab_size"]
    out.append({"name": "lm_head fwd", "m": lm, "k": h, "n": v, "kind": "fwd", "per_layer": 1, "head": True})
    out.append({"name": "lm_head dgrad", "m": lm, "k": v, "n": h, "kind": "dgrad", "per_layer": 1, "head": True})
    out.append({"name": "lm_head wgrad", "m": v, "k": lm, "n": h, "kind": "wgrad", "per_layer": 1, "head": True})
    return out


def worker_gemm(spec: dict, tokens: int, lm: int, out: Path, precision: str = "bf16") -> None:
    import torch

    dtype = getattr(torch, DTYPES[precision])
    cfg = json.loads((Path(spec["teacher_dir"]) / "config.json").read_text())
    shapes = gemm_shapes(cfg, tokens, lm)
    for s in shapes:
        m, k, n = s["m"], s["k"], s["n"]
        if s["kind"] == "fwd":  # F.linear: x [m, k] @ W.T, W [n, k]
            a, w = torch.randn(m, k, dtype=dtype), torch.randn(n, k, dtype=dtype)
            fn = lambda a=a, w=w: torch.matmul(a, w.t())  # noqa: E731
        elif s["kind"] == "dgrad":  # g [m, k] @ W, W [k, n]
            a, w = torch.randn(m, k, dtype=dtype), torch.randn(k, n, dtype=dtype)
            fn = lambda a=a, w=w: torch.matmul(a, w)  # noqa: E731
        else:  # g.T @ x: g [k, m], x [k, n]
            a, w = torch.randn(k, m, dtype=dtype), torch.randn(k, n, dtype=dtype)
            fn = lambda a=a, w=w: torch.matmul(a.t(), w)  # noqa: E731
        for _ in range(3):
            fn()
        best = 0.0
        for _ in range(3):
            reps, t0 = 0, time.perf_counter()
            while True:
                fn()
                reps += 1
                dt = time.perf_counter() - t0
                if dt > 0.25:
                    break
            best = max(best, 2.0 * m * k * n * reps / dt / 1e9)
        s["gflops"] = best
    _finish(out, {"shapes": shapes, "threads": torch.get_num_threads()})


PHASES = ("collate", "student_forward", "teacher_forward", "loss_forward", "backward", "clip", "optimizer",
          "zero_grad")


def _category(name: str, shapes, vocab: int) -> str:
    n = name.lower()
    if any(x in n for x in ("::mm", "addmm", "::bmm", "::matmul", "::linear", "mkldnn_matmul")):
        flat = [d for s in (shapes or []) for d in (s or [])]
        return "gemm lm_head" if vocab in flat else "gemm layers"
    if "attention" in n or "sdpa" in n:
        return "attention (ops named so)"
    if any(x in n for x in ("zero_", "fill_", "::zeros", "zeros_like", "new_zeros", "::full")):
        return "zero-fill"
    if any(x in n for x in ("copy_", "_to_copy", "::to", "clone", "contiguous", "::index", "cat", "stack")):
        return "copy/cast/index"
    if "adam" in n:
        return "optimizer kernel"
    if any(x in n for x in ("exp", "log", "softmax", "logsumexp", "max", "sum", "where", "amax")):
        return "softmax/exp/log/reductions"
    return "other elementwise/overhead"


def worker_profile(spec: dict, out: Path, vocab: int = 49152, precision: str = "bf16") -> None:
    """Trainer.fit on DistiLLM-2 in ``precision`` under torch.profiler: 2 untraced steps, 2 traced; the library
    calls Trainer.fit makes are wrapped in record_function labels (no change to their work)."""
    from torch.profiler import ProfilerActivity, profile, record_function, schedule

    import distillm2.train  # noqa: F401 - loads the module (sys.modules below)
    from distillm2 import checkpoint

    dist_mod = sys.modules["distillm2.distributed"]
    train_mod = sys.modules["distillm2.train"]  # the package exports a function named train

    stage_dir = work_dir() / "runs" / f"profile-{os.getpid()}"
    trainer, acc = _trainer_for(spec, precision, 4, stage_dir)
    checkpoint.save_checkpoint = lambda *a, **k: None

    def label(name, fn):
        def wrapped(*a, **k):
            with record_function(f"phase:{name}"):
                return fn(*a, **k)
        return wrapped

    orig_logits = train_mod.response_logits

    def logits(model, *a, **k):
        which = "student_forward" if next(model.parameters()).requires_grad else "teacher_forward"
        with record_function(f"phase:{which}"):
            return orig_logits(model, *a, **k)

    train_mod.response_logits = logits
    train_mod.collate = label("collate", train_mod.collate)
    train_mod.stacked_pair_loss = label("loss_forward", train_mod.stacked_pair_loss)
    dist_mod.grad_norm = label("clip", dist_mod.grad_norm)
    acc.backward = label("backward", acc.backward)
    trainer.optimizer.step = label("optimizer", trainer.optimizer.step)
    trainer.optimizer.zero_grad = label("zero_grad", trainer.optimizer.zero_grad)
    collected = {}

    def ready(prof):
        collected["events"] = list(prof.events())

    prof = profile(activities=[ProfilerActivity.CPU], record_shapes=True,
                   schedule=schedule(wait=1, warmup=1, active=2), on_trace_ready=ready)
    train_mod.maybe_crash = lambda *a, **k: prof.step()
    t0 = time.perf_counter()
    with prof:
        trainer.fit(save_to=None)
    wall = time.perf_counter() - t0
    records = [json.loads(line) for line in (stage_dir / "metrics.jsonl").read_text().splitlines()]
    shutil.rmtree(stage_dir, ignore_errors=True)
    traced = max(1, sum(ev.name == "phase:optimizer" for ev in collected.get("events", [])))  # one per step
    phase_time = {p: 0.0 for p in PHASES}
    by = {}
    zero_fill = {}
    total_self = 0.0
    for ev in collected.get("events", []):
        if ev.name.startswith("phase:"):
            if ev.name[6:] in phase_time:
                phase_time[ev.name[6:]] += ev.cpu_time_total / 1e6
            continue
        if ev.name.startswith("ProfilerStep"):
            continue
        parent, phase = ev.cpu_parent, "outside phases"
        while parent is not None:
            if parent.name.startswith("phase:"):
                phase = parent.name[6:]
                break
            parent = parent.cpu_parent
        self_s = ev.self_cpu_time_total / 1e6
        total_self += self_s
        cat = _category(ev.name, ev.input_shapes, vocab)
        by.setdefault(phase, {}).setdefault(cat, 0.0)
        by[phase][cat] += self_s
        if cat == "zero-fill":
            key = f"{phase}: {ev.name} {ev.input_shapes[0] if ev.input_shapes else ''}"
            zero_fill[key] = zero_fill.get(key, 0.0) + self_s
    top_zero = dict(sorted(zero_fill.items(), key=lambda kv: -kv[1])[:8])
    _finish(out, {"traced_steps": traced, "phase_s": {k: v / traced for k, v in phase_time.items()},
                  "by_phase_category_s": {p: {c: v / traced for c, v in sorted(d.items(), key=lambda kv: -kv[1])}
                                          for p, d in by.items()},
                  "total_self_s_per_step": total_self / traced,
                  "top_zero_fills_s": {k: v / traced for k, v in top_zero.items()},
                  "step_s_logged": [r["step_s"] for r in records], "wall_s": wall})


# Orchestration ----------------------------------------------------------------------------------
