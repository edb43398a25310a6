"""One training step, distillm2 against TRL's GKDTrainer, on identical token ids (issue #11, item 1).

    python benchmarks/step.py              # everything; writes docs/benchmarks/step.json + step.png
    python benchmarks/step.py --quick      # 1 warm-up + 2 steps, one repetition, no profile (smoke test)

Set-up (cached under ``$DISTILLM2_CACHE``, default ``~/.cache/distillm2``):

- TRL lives in a virtual environment of its own, ``bench-trl-venv`` (``python -m venv`` then
  ``pip install torch==2.13.0 trl`` in one command: without the torch pin in the same command pip
  resolves a CUDA build). TRL is never a dependency of the package; only the TRL worker runs there.
- Teacher: the embedded SmolLM2-135M-Instruct (``models.load_model("smollm2-135m-instruct")``),
  whose converted cache directory is already a plain HF directory; student: the demo's
  16-layer student (``models.derive_student`` with layers 0-5, 20-29) saved as a plain HF directory
  ``bench-step/student``. Both systems load the same weights from these directories.
- Data (``bench-step/data.json``): demo:train prompts through ``data.prompt_token_ids``; chosen =
  the teacher's greedy responses (bf16 weights, at most 40 new tokens), rejected = the student's
  sampled responses (temperature 0.8, top-p 0.95, seed 0). The ids stored are those of
  ``data.encode`` applied to the decoded text, so the Trainer's own encoding reproduces them
  exactly (checked); how many differ from the generated ids is recorded.
- Steps: ``train.plan_steps`` (seed 0) over 8-pair micro-batches. Step s of every run uses the same
  8 prompts: TRL GKD and our GKD train on their 8 teacher-response rows, DistiLLM-2 on those 8 rows
  plus the 8 student-response rows of the same prompts (16 rows).

Runs, each in its own subprocess (peak RSS = VmHWM of /proc/self/status after the last step):
``trl-gkd-{fp32,bf16}`` (GKDTrainer, beta 0.5, lmbda 0, seq_kd False; TRL's collator on the ids;
``trainer.training_step`` + clip + optimizer/scheduler step + zero_grad as its inner loop does),
``ours-gkd-{fp32,bf16}`` (Trainer.fit's step replicated with the library calls: ``pair_loss("gkd")``
needs a chosen and a rejected row kind, so the 8 rows are passed as 4 + 4) and
``ours-distillm2-bf16`` (``distillm2.train.Trainer.fit`` itself; its per-step ``step_s``). bf16 =
autocast of the fp32-weight student plus, on our side, bf16 teacher weights (the project's
defaults); TRL's bf16 = ``bf16=True`` (autocast of both fp32-weight models). Runs are interleaved
(TRL, ours, ... then again); per run the median of the measured steps after the warm-up steps.

Ceiling: bf16 ``torch.matmul`` rates of every GEMM shape of the step (forward, input gradient and
weight gradient of each linear layer at the step's executed token count, and of lm_head at the
positions whose logits are computed), best of 3. ``ceiling_fraction`` divides the DistiLLM-2 step's
achieved rate, counting 2 N_teacher + 6 N_student FLOPs per executed token (padding included;
lm_head only at its logit positions; attention scores not counted), by the FLOP-weighted mix of
those rates (the time the step's GEMM FLOPs take at the measured rates); the max single-shape
rate is reported too.

Then a torch.profiler (CPU) trace of 2 DistiLLM-2 bf16 steps after 2 untraced ones, driven
through Trainer.fit with record_function labels added around the library calls it makes.
The last line printed is ``step: ratio_tokens_per_s=X ratio_peak_rss=Y ceiling_fraction=Z``
(DistiLLM-2 bf16 against TRL GKD bf16: trained tokens/s ours/TRL, peak RSS ours/TRL).
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
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
OUT_JSON = ROOT / "docs" / "benchmarks" / "step.json"
OUT_PNG = ROOT / "docs" / "benchmarks" / "step.png"
TEACHER = "smollm2-135m-instruct"
STUDENT_LAYERS = [0, 1, 2, 3, 4, 5, 20, 21, 22, 23, 24, 25, 26, 27, 28, 29]
ROWS = 8  # sequences (pairs) per step
MAX_NEW = 40  # new tokens per response: ~40 prompt + ~40 response = ~80 real tokens a row, ~640 a step
LR = 5e-5
RUNS = ["trl-gkd-fp32", "ours-gkd-fp32", "trl-gkd-bf16", "ours-gkd-bf16", "ours-distillm2-bf16"]
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


def prepare(steps_needed: int) -> dict:
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
    if cached is None or cached["max_new"] != MAX_NEW or len(cached["rows"]) < n_pairs:
        prompts = data.load_prompts("demo:train")[:pool]
        p_ids = [data.prompt_token_ids(tok, p["messages"]) for p in prompts]
        eot = data.end_of_turn_ids(tok)
        t0 = time.perf_counter()
        teacher = models.load_model(teacher_dir, "bfloat16").eval()
        chosen = _generate(teacher, tok, p_ids, eot, sample=False, seed=0)
        del teacher
        student = models.load_model(str(student_dir), "bfloat16").eval()
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
        cached = {"max_new": MAX_NEW, "rows": rows, "reencode_differs": differ,
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
        })
    spec = {"teacher_dir": str(teacher_dir), "student_dir": str(student_dir), "data": str(data_path),
            "plan": plan, "layout": layout, "n_pairs": n_pairs, "reencode_differs": cached["reencode_differs"]}
    (wd / "spec.json").write_text(json.dumps(spec))
    return spec


# Workers (each its own process) -----------------------------------------------------------------


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
    step_examples = [[{"input_ids": rows[i]["prompt_ids"] + rows[i]["chosen_ids"],
                       "completion_mask": [0] * len(rows[i]["prompt_ids"]) + [1] * len(rows[i]["chosen_ids"])}
                      for i in idx] for idx in plan]
    tok = AutoTokenizer.from_pretrained(spec["teacher_dir"])
    tmp = tempfile.mkdtemp(prefix="trl-gkd-")
    args = GKDConfig(output_dir=tmp, per_device_train_batch_size=ROWS, bf16=precision == "bf16", use_cpu=True,
                     lmbda=0.0, beta=0.5, seq_kd=False, learning_rate=LR, max_grad_norm=1.0, report_to="none",
                     save_strategy="no", max_steps=len(plan), lr_scheduler_type="cosine", warmup_ratio=0.1,
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


def _ours_setup(spec, precision):
    from distillm2 import distributed, models

    acc = distributed.make_accelerator("bf16" if precision == "bf16" else "no")
    tok = models.load_tokenizer(spec["teacher_dir"])
    student = models.load_model(spec["student_dir"], "float32")
    teacher = models.load_model(spec["teacher_dir"], "bfloat16" if precision == "bf16" else "float32")
    vocab = models.check_tokenizers(tok, tok, teacher, student)
    return acc, tok, student, teacher, vocab


def worker_ours_gkd(spec: dict, precision: str, steps: int, out: Path) -> None:
    """Trainer.fit's step with the same library calls, on the 8 teacher-response rows."""
    import torch

    from distillm2 import distributed
    from distillm2.config import TrainConfig
    from distillm2.data import EncodedRow, collate
    from distillm2.losses import LossParams, RowInputs, pair_loss
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
        out_loss = pair_loss("gkd", {w: RowInputs(s[sl], t[sl], batch.mask[sl], batch.labels[sl], 0.1)
                                     for w, sl in parts.items()}, params=params)
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


def _trainer_for(spec, precision, steps, stage_dir):
    """distillm2.train.Trainer on the text pairs of the first ``steps`` plan steps (its own plan:
    checked to equal the spec's)."""
    from distillm2.config import LossConfig, TrainConfig
    from distillm2.train import Trainer

    rows = json.loads(Path(spec["data"]).read_text())["rows"][: spec["n_pairs"]]
    acc, tok, student, teacher, vocab = _ours_setup(spec, precision)
    pairs = [{"id": r["id"], "prompt": r["messages"], "chosen": r["chosen"], "rejected": r["rejected"],
              "chosen_finished": r["chosen_finished"], "rejected_finished": r["rejected_finished"]} for r in rows]
    shutil.rmtree(stage_dir, ignore_errors=True)
    cfg = TrainConfig(batch_size=ROWS, grad_accum=1, epochs=1.0, lr=LR, checkpoint_every=0,
                      mixed_precision="bf16" if precision == "bf16" else "no")
    trainer = Trainer(accelerator=acc, student=student, teacher=teacher, tokenizer=tok, pairs=pairs, train_cfg=cfg,
                      loss_cfg=LossConfig(name="distillm2"), stage_dir=stage_dir, vocab=vocab, stage_seed=0)
    for r, enc in zip(rows, trainer.encoded):  # the Trainer's own encoding gives the benchmark's ids
        for which in ("chosen", "rejected"):
            assert enc[which].prompt_ids == r["prompt_ids"] and enc[which].response_ids == r[f"{which}_ids"], r["id"]
    assert [s[0] for s in trainer.steps] == spec["plan"], "Trainer's plan differs from the spec's"
    trainer.steps = trainer.steps[:steps]
    return trainer, acc


def worker_ours_distillm2(spec: dict, precision: str, steps: int, out: Path) -> None:
    """distillm2.train.Trainer.fit itself; step times from its metrics.jsonl (step_s)."""
    import torch

    from distillm2 import checkpoint

    stage_dir = work_dir() / "runs" / f"distillm2-{os.getpid()}"
    trainer, acc = _trainer_for(spec, precision, steps, stage_dir)
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
              "attn": trainer.student.config._attn_implementation, "driver": "Trainer.fit"}
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


def worker_gemm(spec: dict, tokens: int, lm: int, out: Path) -> None:
    import torch

    cfg = json.loads((Path(spec["teacher_dir"]) / "config.json").read_text())
    shapes = gemm_shapes(cfg, tokens, lm)
    for s in shapes:
        m, k, n = s["m"], s["k"], s["n"]
        if s["kind"] == "fwd":  # F.linear: x [m, k] @ W.T, W [n, k]
            a, w = torch.randn(m, k, dtype=torch.bfloat16), torch.randn(n, k, dtype=torch.bfloat16)
            fn = lambda: torch.matmul(a, w.t())  # noqa: E731
        elif s["kind"] == "dgrad":  # g [m, k] @ W, W [k, n]
            a, w = torch.randn(m, k, dtype=torch.bfloat16), torch.randn(k, n, dtype=torch.bfloat16)
            fn = lambda: torch.matmul(a, w)  # noqa: E731
        else:  # g.T @ x: g [k, m], x [k, n]
            a, w = torch.randn(k, m, dtype=torch.bfloat16), torch.randn(k, n, dtype=torch.bfloat16)
            fn = lambda: torch.matmul(a.t(), w)  # noqa: E731
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
        return "attention (sdpa)"
    if any(x in n for x in ("zero_", "fill_", "::zeros", "zeros_like", "new_zeros", "::full")):
        return "zero-fill"
    if any(x in n for x in ("copy_", "_to_copy", "::to", "clone", "contiguous", "::index", "cat", "stack")):
        return "copy/cast/index"
    if "adam" in n:
        return "optimizer kernel"
    if any(x in n for x in ("exp", "log", "softmax", "logsumexp", "max", "sum", "where", "amax")):
        return "softmax/exp/log/reductions"
    return "other elementwise/overhead"


def worker_profile(spec: dict, out: Path, vocab: int = 49152) -> None:
    """Trainer.fit on DistiLLM-2 bf16 under torch.profiler: 2 untraced steps, 2 traced; the library
    calls Trainer.fit makes are wrapped in record_function labels (no change to their work)."""
    from torch.profiler import ProfilerActivity, profile, record_function, schedule

    import distillm2.distributed as dist_mod
    import distillm2.train as train_mod
    from distillm2 import checkpoint

    stage_dir = work_dir() / "runs" / f"profile-{os.getpid()}"
    trainer, acc = _trainer_for(spec, "bf16", 4, stage_dir)
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
    train_mod.pair_loss = label("loss_forward", train_mod.pair_loss)
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
    _finish(out, {"traced_steps": 2, "phase_s": {k: v / 2 for k, v in phase_time.items()},
                  "by_phase_category_s": {p: {c: v / 2 for c, v in sorted(d.items(), key=lambda kv: -kv[1])}
                                          for p, d in by.items()},
                  "total_self_s_per_step": total_self / 2, "top_zero_fills_s": {k: v / 2 for k, v in top_zero.items()},
                  "step_s_logged": [r["step_s"] for r in records], "wall_s": wall})


# Orchestration ----------------------------------------------------------------------------------


def run_worker(python: str, args: list[str], out: Path) -> dict:
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


def flop_counts(cfg: dict) -> dict:
    h, inter, v = cfg["hidden_size"], cfg["intermediate_size"], cfg["vocab_size"]
    kv = cfg["num_key_value_heads"] * cfg.get("head_dim", h // cfg["num_attention_heads"])
    per_layer = 2 * h * h + 2 * h * kv + 3 * h * inter
    return {"per_layer": per_layer, "head": h * v, "teacher_layers": cfg["num_hidden_layers"],
            "student_layers": len(STUDENT_LAYERS)}


def step_flops(fc: dict, exec_tokens: int, lm: int, student_only_passes: int = 6, teacher_passes: int = 2) -> float:
    nt = fc["per_layer"] * fc["teacher_layers"]
    ns = fc["per_layer"] * fc["student_layers"]
    return (teacher_passes * (nt * exec_tokens + fc["head"] * lm)
            + student_only_passes * (ns * exec_tokens + fc["head"] * lm))


def summarize(name: str, results: list[dict], layouts: list[dict], warmup: int, fc: dict) -> dict:
    times, tok_rates, flop_rates = [], [], []
    for r in results:
        for i, t in enumerate(r["times"]):
            if i < warmup:
                continue
            lay = layouts[i] if "layout" not in r else r["layout"][i]
            times.append(t)
            tok_rates.append(lay["trained"] / t)
            flop_rates.append(step_flops(fc, lay["exec"], lay["lm"]) / t / 1e9)
    measured = [lay for i, lay in enumerate(layouts) if i >= warmup]
    return {
        "run": name, "s_per_step": statistics.median(times), "trained_tokens_per_s": statistics.median(tok_rates),
        "achieved_gflops": statistics.median(flop_rates),
        "peak_rss_gib": max(r["peak_rss_kib"] for r in results) / 2**20,
        "peak_rss_gib_each": [r["peak_rss_kib"] / 2**20 for r in results],
        "median_s_each_run": [statistics.median(r["times"][warmup:]) for r in results],
        "steps_measured": len(times),
        "per_step_mean": {k: statistics.mean(lay[k] for lay in measured) for k in ("trained", "real", "exec", "lm")},
        "rows": measured[0]["rows"] if measured else None,
        "loss_first_last": [results[0]["losses"][0], results[0]["losses"][-1]],
        "details": {k: v for k, v in results[0].items() if k not in ("times", "losses", "layout")},
        "times_each_run": [r["times"] for r in results],
        "load_before_each_run": [r["load_before"] for r in results],
    }


def plot(rows: list[dict], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    names = [r["run"] for r in rows]
    colors = ["#888888" if n.startswith("trl") else "#1f77b4" for n in names]
    fig, axes = plt.subplots(1, 3, figsize=(15, 4.2))
    for ax, key, title in zip(axes, ("s_per_step", "trained_tokens_per_s", "peak_rss_gib"),
                              ("seconds / step (median)", "trained tokens / s", "peak RSS (GiB)")):
        vals = [r[key] for r in rows]
        ax.bar(range(len(rows)), vals, color=colors)
        ax.set_xticks(range(len(rows)), names, rotation=30, ha="right", fontsize=8)
        ax.set_title(title)
        for i, v in enumerate(vals):
            ax.text(i, v, f"{v:.2f}" if v < 100 else f"{v:.0f}", ha="center", va="bottom", fontsize=8)
    fig.suptitle("One training step, 2 CPU cores: TRL GKDTrainer (grey) vs distillm2 (blue); 8 prompts/step")
    fig.tight_layout()
    fig.savefig(path, dpi=110)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--worker", choices=("trl", "ours-gkd", "ours-distillm2", "gemm", "profile"))
    ap.add_argument("--precision", default="bf16")
    ap.add_argument("--spec")
    ap.add_argument("--out")
    ap.add_argument("--tokens", type=int)
    ap.add_argument("--lm", type=int)
    ap.add_argument("--steps", type=int, default=10, help="measured steps per run")
    ap.add_argument("--warmup", type=int, default=2)
    ap.add_argument("--reps", type=int, default=2, help="interleaved repetitions of every run")
    ap.add_argument("--quick", action="store_true", help="1 warm-up + 2 steps, 1 repetition, no profile")
    ap.add_argument("--no-profile", action="store_true")
    ap.add_argument("--json", default=str(OUT_JSON))
    args = ap.parse_args()
    if args.worker:
        spec = json.loads(Path(args.spec).read_text())
        out = Path(args.out)
        n = args.steps + args.warmup
        if args.worker == "trl":
            worker_trl(spec, args.precision, n, out)
        elif args.worker == "ours-gkd":
            worker_ours_gkd(spec, args.precision, n, out)
        elif args.worker == "ours-distillm2":
            worker_ours_distillm2(spec, args.precision, n, out)
        elif args.worker == "gemm":
            worker_gemm(spec, args.tokens, args.lm, out)
        else:
            worker_profile(spec, out)
        return

    if args.quick:
        args.steps, args.warmup, args.reps, args.no_profile = 2, 1, 1, True
    started, load_start = time.time(), os.getloadavg()
    import torch

    trl_python = ensure_trl_venv()
    n = args.steps + args.warmup
    spec = prepare(n)
    spec_path = work_dir() / "spec.json"
    out_dir = work_dir() / "results"
    out_dir.mkdir(parents=True, exist_ok=True)
    layouts = spec["layout"][:n]
    d2 = [lay["distillm2_16"] for lay in layouts[args.warmup:]]
    tokens = round(statistics.median(lay["exec"] for lay in d2))
    lm = round(statistics.median(lay["lm"] for lay in d2))
    common = ["--spec", str(spec_path), "--steps", str(args.steps), "--warmup", str(args.warmup)]
    gemm_args = ["--worker", "gemm", "--tokens", str(tokens), "--lm", str(lm), *common]
    gemms = [run_worker(sys.executable, gemm_args, out_dir / "gemm-0.json")]
    results = {name: [] for name in RUNS}
    for rep in range(args.reps):
        for name in RUNS:
            system, loss, precision = name.split("-")
            if system == "trl":
                python, wargs = str(trl_python), ["--worker", "trl"]
            else:
                python, wargs = sys.executable, ["--worker", f"ours-{loss}"]
            r = run_worker(python, [*wargs, "--precision", precision, *common], out_dir / f"{name}-{rep}.json")
            results[name].append(r)
            print(f"  {name} rep {rep + 1}: median {statistics.median(r['times'][args.warmup:]):.2f} s/step, "
                  f"peak RSS {r['peak_rss_kib'] / 2**20:.2f} GiB, load {r['load_before'][0]:.1f}", flush=True)
    gemms.append(run_worker(sys.executable, gemm_args, out_dir / "gemm-1.json"))

    cfg = json.loads((Path(spec["teacher_dir"]) / "config.json").read_text())
    fc = flop_counts(cfg)
    layout_key = {"trl": "trl8", "gkd": "gkd8", "distillm2": "distillm2_16"}
    table = []
    for name in RUNS:
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
    ours, trl = rows["ours-distillm2-bf16"], rows["trl-gkd-bf16"]
    ratio_tok = ours["trained_tokens_per_s"] / trl["trained_tokens_per_s"]
    ratio_rss = ours["peak_rss_gib"] / trl["peak_rss_gib"]
    for r in table:
        r["fraction_of_bf16_ceiling_mix"] = r["achieved_gflops"] / ceiling_mix
    ceiling_fraction = ours["achieved_gflops"] / ceiling_mix

    profile = None
    if not args.no_profile:
        profile = run_worker(sys.executable, ["--worker", "profile", *common], out_dir / "profile.json")

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
    print(f"bf16 GEMM ceiling: FLOP-weighted mix {ceiling_mix:.0f} GFLOP/s (max single shape {ceiling_max:.0f}); "
          f"DistiLLM-2 bf16 step reaches {ours['achieved_gflops']:.0f} GFLOP/s")
    if profile:
        print()
        print("profile (DistiLLM-2 bf16, s per step, inclusive per phase):",
              ", ".join(f"{k} {v:.2f}" for k, v in profile["phase_s"].items()))
        for phase, cats in profile["by_phase_category_s"].items():
            print(f"  {phase}: " + ", ".join(f"{c} {v:.2f}" for c, v in cats.items() if v >= 0.005))

    result = {
        "benchmark": "one training step: TRL GKDTrainer vs distillm2 (issue #11 item 1)",
        "command": "python benchmarks/step.py" + (" --quick" if args.quick else ""),
        "machine": {"platform": platform.platform(), "processor": platform.processor(), "cpus": os.cpu_count(),
                    "torch_threads": torch.get_num_threads(), "python": platform.python_version()},
        "loadavg": {"start": load_start, "end": os.getloadavg()},
        "wall_s": time.time() - started,
        "setup": {"teacher": TEACHER, "student_layers": STUDENT_LAYERS, "rows_per_step": ROWS,
                  "max_new_tokens": MAX_NEW, "chosen": "teacher greedy (bf16 weights)",
                  "rejected": "student sampled (bf16 weights, T 0.8, top-p 0.95, seed 0)",
                  "reencode_differs": spec["reencode_differs"], "warmup": args.warmup, "steps": args.steps,
                  "reps": args.reps, "order": RUNS, "lr": LR,
                  "trl": "GKDTrainer beta 0.5 lmbda 0 seq_kd False; training_step + clip + optimizer/scheduler step "
                         "+ zero_grad on DataCollatorForChatML batches of the same ids",
                  "ours_gkd": "Trainer.fit step replicated with collate/response_logits/pair_loss('gkd', 4+4 rows, "
                              "jsd_beta 0.5)/accelerator.backward/distributed.grad_norm/fused AdamW",
                  "ours_distillm2": "distillm2.train.Trainer.fit (loss distillm2, alpha 0.1, beta 0.5), step_s of "
                                    "metrics.jsonl; end-of-stage checkpoint skipped",
                  "flops": "2 N_teacher + 6 N_student per executed token (padding included), lm_head only at "
                           "logit positions (TRL: every position), attention scores not counted",
                  "flop_counts": fc},
        "runs": table,
        "gemm": {"tokens": tokens, "lm_positions": lm, "ceiling_gflops_mix": ceiling_mix,
                 "ceiling_gflops_max": ceiling_max, "ceiling_used": "FLOP-weighted mix of the step's GEMM shapes",
                 "shapes": shapes, "load_before": [g["load_before"] for g in gemms]},
        "ratio_tokens_per_s": ratio_tok,
        "ratio_peak_rss": ratio_rss,
        "ceiling_fraction": ceiling_fraction,
        "ceiling_fraction_of_max": ours["achieved_gflops"] / ceiling_max,
        "gkd_vs_gkd_bf16": {"ratio_tokens_per_s": rows["ours-gkd-bf16"]["trained_tokens_per_s"]
                            / trl["trained_tokens_per_s"],
                            "ratio_peak_rss": rows["ours-gkd-bf16"]["peak_rss_gib"] / trl["peak_rss_gib"]},
        "profile": profile,
    }
    json_path = Path(args.json)
    json_path.parent.mkdir(parents=True, exist_ok=True)
    json_path.write_text(json.dumps(result, indent=1))
    plot(table, json_path.with_suffix(".png"))
    print(f"\nwrote {json_path} and {json_path.with_suffix('.png')}")
    print(f"step: ratio_tokens_per_s={ratio_tok:.2f} ratio_peak_rss={ratio_rss:.2f} ceiling_fraction={ceiling_fraction:.2f}")


if __name__ == "__main__":
    main()
