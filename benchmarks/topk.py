"""The error and the savings of ``train.teacher_topk``: the DistiLLM-2 loss with the chosen rows'
teacher kept as its top-k log-probabilities + tail, against the exact loss (issue #11, item 4).

    python benchmarks/topk.py            # docs/benchmarks/topk.json + topk.png, a markdown table
    python benchmarks/topk.py --quick    # 4 pairs, k in (4, 64): a smoke test

Set-up: the models and rows of benchmarks/step.py (``step.prepare``, cached under
``$DISTILLM2_CACHE/bench-step``): teacher = the embedded SmolLM2-135M-Instruct (V = 49152),
student = the demo's 16-layer student derived from it, chosen = the teacher's greedy responses
(at most 40 tokens), rejected = the student's samples (temperature 0.8) of the same demo:train
prompts. Micro-batches of 8 pairs (16 rows) laid out as the Trainer does.

Reference: the exact loss (round 1: alpha 0.1, beta 0.5, temperature 1) from a float32 teacher
and the float32 student's logits, and its gradient with respect to those logits. Each variant
changes only the teacher of the chosen rows: its top-k log-probabilities stored as the cache
stores them (float16 log-probabilities, float32 tail and label), for each k; ``V (fp16)`` is
k = V (no truncation: the storage error alone); ``bf16 teacher`` is the exact path with the
project's default bfloat16 teacher weights, the error every run already accepts. Reported per
variant: relative error of the loss and of its chosen term (SKL), cosine and relative norm of
the difference of the gradient on the chosen rows' logits (the rejected rows' are unchanged),
and the teacher's mean tail mass. Time: the teacher's bf16 forward per micro-batch on all 16
rows (exact) against the 8 rejected rows (with the cache), median of the repeats; the loss's
forward + backward exact against top-k; and the cache's size per response token.
"""

from __future__ import annotations

import argparse
import json
import platform
import statistics
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).parent))
import step  # noqa: E402 - benchmarks/step.py: its models and rows

from distillm2 import models  # noqa: E402
from distillm2._topk import TopKTeacher, topk_of_logits  # noqa: E402
from distillm2.data import EncodedRow, collate, sub_batch  # noqa: E402
from distillm2.losses import RowInputs, pair_loss  # noqa: E402
from distillm2.teacher_cache import STORE_DTYPE  # noqa: E402

PAIRS_PER_BATCH = 8
KS = (1, 4, 16, 64, 256)


def stored(top: TopKTeacher) -> TopKTeacher:
    """As the cache gives it back: float16 log-probabilities, int32 ids, float32 tail and label."""
    return TopKTeacher(top.logprobs.to(STORE_DTYPE).float(), top.indices.to(torch.int32).long(), top.tail.float(),
                       top.label.float(), top.vocab, top.temperature)


def loss_and_grad(student_logits, chosen_teacher, rejected_teacher, batch, pairs):
    """The DistiLLM-2 loss of one micro-batch, its SKL term and the gradient on the logits."""
    s = student_logits.detach().requires_grad_(True)
    c, r = slice(0, pairs), slice(pairs, 2 * pairs)
    rows = {"chosen": RowInputs(s[c], chosen_teacher, batch.mask[c], batch.labels[c], 0.1),
            "rejected": RowInputs(s[r], rejected_teacher, batch.mask[r], batch.labels[r], 0.1)}
    out = pair_loss("distillm2", rows, beta=0.5)
    out.loss.backward()
    return out.loss.item(), out.terms["skl"].detach().mean().item(), s.grad[c].flatten().double()


def timed(fn, *args) -> tuple[float, float]:
    """Wall-clock and process CPU seconds of one ``fn(*args)`` (CPU time is the steadier of the two
    when other jobs share the cores)."""
    t0, c0 = time.perf_counter(), time.process_time()
    fn(*args)
    return time.perf_counter() - t0, time.process_time() - c0


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true")
    parser.add_argument("--out", default=str(Path(__file__).resolve().parents[1] / "docs" / "benchmarks"))
    args = parser.parse_args()
    torch.set_num_threads(max(1, torch.get_num_threads()))
    pairs_per_batch = 4 if args.quick else PAIRS_PER_BATCH
    batches = 1 if args.quick else 2
    ks = (4, 64) if args.quick else KS
    spec = step.prepare(2)
    rows = json.loads(Path(spec["data"]).read_text())["rows"][: pairs_per_batch * batches]
    tok = models.load_tokenizer(spec["teacher_dir"])
    teacher32 = models.load_model(spec["teacher_dir"], "float32").eval()
    teacher16 = models.load_model(spec["teacher_dir"], "bfloat16").eval()
    student = models.load_model(spec["student_dir"], "float32").eval()
    vocab = models.check_tokenizers(tok, tok, teacher32, student)

    variants = [*(str(k) for k in ks), "V (fp16)", "bf16 teacher"]
    acc = {v: {"loss": [], "skl": [], "grad": [], "tail": []} for v in variants}
    exact_loss, exact_skl, exact_grad = [], [], []
    timing = {f"teacher_{d}_{rows}": [] for d in ("bf16", "fp32") for rows in ("all_rows", "rejected_rows")}
    timing.update(loss_exact=[], loss_topk64=[])
    tokens = 0
    for b in range(batches):
        part = rows[b * pairs_per_batch : (b + 1) * pairs_per_batch]
        encoded = [EncodedRow(r["prompt_ids"], r["chosen_ids"]) for r in part] + \
                  [EncodedRow(r["prompt_ids"], r["rejected_ids"]) for r in part]
        batch = collate(encoded, tok.pad_token_id)
        n = len(part)
        tokens += int(batch.mask[:n].sum())
        with torch.no_grad():
            s_logits = models.response_logits(student, batch, vocab).float()
            t32 = models.response_logits(teacher32, batch, vocab).float()
            t16 = models.response_logits(teacher16, batch, vocab).float()
        c, r = slice(0, n), slice(n, 2 * n)
        loss, skl, grad = loss_and_grad(s_logits, t32[c], t32[r], batch, n)
        exact_loss.append(loss)
        exact_skl.append(skl)
        exact_grad.append(grad)
        for v in variants:
            if v == "bf16 teacher":
                chosen, tail = t16[c], None
            else:
                k = vocab if v.startswith("V") else int(v)
                chosen = stored(topk_of_logits(t32[c], batch.labels[c], k))
                tail = chosen.tail.exp()[batch.mask[c]].mean().item() if k < vocab else 0.0
            loss_v, skl_v, grad_v = loss_and_grad(s_logits, chosen, t32[r], batch, n)
            acc[v]["loss"].append(loss_v)
            acc[v]["skl"].append(skl_v)
            acc[v]["grad"].append(grad_v)
            acc[v]["tail"].append(tail)
        if b:
            continue
        # time (first micro-batch, alternating, 3 repeats): the teacher's forward on every row
        # (exact) vs on the rejected rows only (the cache); the loss exact vs top-64
        rejected = sub_batch(batch, r)
        top64 = stored(topk_of_logits(t32[c], batch.labels[c], 64))
        for _ in range(3):
            with torch.no_grad():
                for d, model in (("bf16", teacher16), ("fp32", teacher32)):
                    timing[f"teacher_{d}_all_rows"].append(timed(models.response_logits, model, batch, vocab))
                    timing[f"teacher_{d}_rejected_rows"].append(timed(models.response_logits, model, rejected, vocab))
            timing["loss_exact"].append(timed(loss_and_grad, s_logits, t32[c], t32[r], batch, n))
            timing["loss_topk64"].append(timed(loss_and_grad, s_logits, top64, t32[r], batch, n))

    g_exact = torch.cat(exact_grad)  # float64: a cosine of ~10^7 entries
    results = []
    for v in variants:
        g = torch.cat(acc[v]["grad"])
        loss_err = statistics.mean(abs(a - e) / e for a, e in zip(acc[v]["loss"], exact_loss))
        skl_err = statistics.mean(abs(a - e) / e for a, e in zip(acc[v]["skl"], exact_skl))
        tail = [t for t in acc[v]["tail"] if t is not None]
        k = None if v == "bf16 teacher" else (vocab if v.startswith("V") else int(v))
        results.append({
            "variant": v, "k": k,
            "loss_rel_err": loss_err, "skl_rel_err": skl_err,
            "skl_signed": statistics.mean((a - e) / e for a, e in zip(acc[v]["skl"], exact_skl)),
            "grad_cosine": float(torch.nn.functional.cosine_similarity(g, g_exact, 0)),
            "grad_rel_norm": float((g - g_exact).norm() / g_exact.norm()),
            "tail_mass": statistics.mean(tail) if tail else None,
            "bytes_per_token": None if k is None else k * (STORE_DTYPE.itemsize + 4) + 8,
        })
    med = {key: {"wall_s": statistics.median(w for w, _ in v), "cpu_s": statistics.median(c for _, c in v)}
           for key, v in timing.items()}
    report = {
        "setting": {"teacher": "SmolLM2-135M-Instruct", "student": "the demo's 16-layer student (bench-step/student)", "vocab": vocab,
                    "pairs": pairs_per_batch * batches, "pairs_per_batch": pairs_per_batch,
                    "chosen_tokens": tokens, "alpha": 0.1, "beta": 0.5, "temperature": 1.0,
                    "chosen": "teacher greedy responses (<= 40 tokens)", "reference": "float32 teacher, exact loss"},
        "results": results,
        "timing_median": med,
        "teacher_cpu_time_saved_fraction": {
            d: 1 - med[f"teacher_{d}_rejected_rows"]["cpu_s"] / med[f"teacher_{d}_all_rows"]["cpu_s"]
            for d in ("bf16", "fp32")},
        "machine": {"platform": platform.platform(), "threads": torch.get_num_threads(), "torch": torch.__version__},
    }
    print(table(report))
    if not args.quick:
        out = Path(args.out)
        out.mkdir(parents=True, exist_ok=True)
        (out / "topk.json").write_text(json.dumps(report, indent=2))
        plot(results, out / "topk.png")
        print(f"wrote {out / 'topk.json'} and {out / 'topk.png'}")


def table(report: dict) -> str:
    lines = ["| teacher on chosen rows | loss rel. err | SKL rel. err | grad cosine | grad rel. diff | tail mass "
             "| cache bytes/token |", "|---|---|---|---|---|---|---|"]
    for r in report["results"]:
        name = f"top-{r['variant']}" if r["k"] and not r["variant"].startswith("V") else r["variant"]
        tail = "" if r["tail_mass"] is None else f"{r['tail_mass']:.4f}"
        size = "" if r["bytes_per_token"] is None else f"{r['bytes_per_token']:,}"
        lines.append(f"| {name} | {r['loss_rel_err']:.2e} | {r['skl_rel_err']:.2e} | {r['grad_cosine']:.6f} | "
                     f"{r['grad_rel_norm']:.2e} | {tail} | {size} |")
    t = report["timing_median"]
    saved = report["teacher_cpu_time_saved_fraction"]

    def both(key):
        return f"{t[key]['cpu_s']:.2f} s CPU ({t[key]['wall_s']:.2f} s wall)"

    lines.append("")
    for d in ("bf16", "fp32"):
        lines.append(f"- teacher forward per micro-batch of {report['setting']['pairs_per_batch']} pairs ({d} weights): "
                     f"all rows {both(f'teacher_{d}_all_rows')}, rejected rows only "
                     f"{both(f'teacher_{d}_rejected_rows')}: {saved[d]:.0%} of its CPU time saved")
    lines.append(f"- loss forward + backward per micro-batch: exact {both('loss_exact')}, top-64 {both('loss_topk64')}")
    return "\n".join(lines)


def plot(results: list[dict], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    tops = [r for r in results if r["k"] and not r["variant"].startswith("V")]
    ks = [r["k"] for r in tops]
    fig, ax = plt.subplots(figsize=(6, 4))
    ax.loglog(ks, [r["loss_rel_err"] for r in tops], "o-", label="loss, relative error")
    ax.loglog(ks, [r["grad_rel_norm"] for r in tops], "s-", label="gradient, relative difference")
    for r in results:
        if r["variant"] == "bf16 teacher":
            ax.axhline(r["grad_rel_norm"], color="grey", ls="--", label="bf16 teacher (exact path), gradient")
            ax.axhline(max(r["loss_rel_err"], 1e-9), color="grey", ls=":", label="bf16 teacher, loss")
    ax.set_xlabel("k (top-k teacher log-probabilities kept)")
    ax.set_title("DistiLLM-2 loss with a top-k teacher vs exact (SmolLM2-135M)")
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)


if __name__ == "__main__":
    main()
