"""Time and peak extra memory of distillm2_loss (forward + backward) against a naive reference.

The reference follows the paper's released formula: full [N, V] float32 tensors (log-softmax of
both models, the stacked log-space mixture and its logsumexp), differentiated by autograd. Ours is
:func:`distillm2.losses.distillm2_loss`. Both see the same inputs in one process.

Peak extra memory = peak resident memory (VmHWM, reset through /proc/self/clear_refs) during
forward + backward, minus the resident memory just before (inputs already allocated); with
``--device cuda``, the CUDA allocator's peak minus what was allocated before.

    python benchmarks/losses.py                 # the issue's sizes; writes benchmarks/out/losses.json + .png
    python benchmarks/losses.py --quick         # small sizes, for a smoke test
"""

from __future__ import annotations

import argparse
import gc
import json
import math
import platform
import statistics
import time
from pathlib import Path

import torch
from bench_common import paired_bars, reset_peak, status_kib

from distillm2.losses import distillm2_loss

ALPHA, BETA = 0.1, 0.5


def naive_distillm2(sc, tc, mc, sr, tr, mr, alpha=ALPHA, beta=BETA):
    """The released code's formula on full tensors (autograd keeps every intermediate)."""
    log_a, log_1a = math.log(alpha), math.log(1 - alpha)
    # chosen rows: skew forward KL, KL(p || a p + (1-a) q)
    log_q = torch.log_softmax(sc.float(), -1)
    log_p = torch.log_softmax(tc.float(), -1)
    log_m = torch.logsumexp(torch.stack([log_p + log_a, log_q + log_1a]), 0)
    skl_tok = (log_p.exp() * (log_p - log_m)).sum(-1)
    skl = (skl_tok * mc).sum(-1) / mc.sum(-1)
    # rejected rows: skew reverse KL, KL(q || (1-a) p + a q'), q' detached
    log_q = torch.log_softmax(sr.float(), -1)
    log_p = torch.log_softmax(tr.float(), -1)
    log_m = torch.logsumexp(torch.stack([log_p + log_1a, log_q.detach() + log_a]), 0)
    srkl_tok = (log_q.exp() * (log_q - log_m)).sum(-1)
    srkl = (srkl_tok * mr).sum(-1) / mr.sum(-1)
    return ((1 - beta) * skl + beta * srkl).mean()


def ours(sc, tc, mc, sr, tr, mr):
    return distillm2_loss(sc, tc, mc, sr, tr, mr, alpha_chosen=ALPHA, alpha_rejected=ALPHA,
                          beta=BETA).loss


IMPLS = {"naive": naive_distillm2, "distillm2": ours}


def run_case(impl, batch, length, vocab, dtype, repeats, seed=0, device="cpu"):
    g = torch.Generator().manual_seed(seed)

    def logits():
        return (torch.randn((batch, length, vocab), generator=g) * 2).to(dtype).to(device)

    sc, tc, sr, tr = logits(), logits(), logits(), logits()
    sc.requires_grad_(True)
    sr.requires_grad_(True)
    mask = torch.ones((batch, length), dtype=torch.bool, device=device)
    cuda = device.startswith("cuda")
    times, peaks, value = [], [], None
    for _ in range(repeats):
        sc.grad = sr.grad = None
        gc.collect()
        if cuda:  # GPU: allocator peak above what was allocated before
            torch.cuda.synchronize()
            before = torch.cuda.memory_allocated() / 2**20
            torch.cuda.reset_peak_memory_stats()
        else:
            before = status_kib("VmRSS") / 1024
            reset_peak()
        start = time.perf_counter()
        loss = IMPLS[impl](sc, tc, mask, sr, tr, mask)
        loss.backward()
        if cuda:
            torch.cuda.synchronize()
        times.append(time.perf_counter() - start)
        peak = torch.cuda.max_memory_allocated() / 2**20 if cuda else status_kib("VmHWM") / 1024
        peaks.append(peak - before)
        value = float(loss.detach())
        del loss
    del sc, tc, sr, tr
    gc.collect()
    # first repeat pays page faults like a real first step does; report the median time and the
    # largest peak so neither number flatters
    return {"time_s": statistics.median(times), "times_s": times, "peak_extra_mib": max(peaks),
            "loss": value}


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    parser.add_argument("--quick", action="store_true", help="small sizes (smoke test)")
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--out", default="benchmarks/out/losses.json")
    parser.add_argument("--device", default="cpu", help="cpu or cuda (GPU memory: allocator peak)")
    args = parser.parse_args(argv)

    if args.quick:
        cases = [(1, 64, 4096)]
    else:
        cases = [(2, 1024, 49_152), (1, 1024, 151_936)]
    rows = []
    for batch, length, vocab in cases:
        for dtype in (torch.float32, torch.bfloat16):
            result = {}
            for impl in IMPLS:
                result[impl] = run_case(impl, batch, length, vocab, dtype, args.repeats, device=args.device)
            rel = abs(result["naive"]["loss"] - result["distillm2"]["loss"]) / abs(result["naive"]["loss"])
            row = {
                "shape_each": [batch, length, vocab],
                "rows": 2 * batch * length,
                "dtype": str(dtype).replace("torch.", ""),
                "naive": result["naive"],
                "distillm2": result["distillm2"],
                "memory_ratio": result["naive"]["peak_extra_mib"] / max(result["distillm2"]["peak_extra_mib"], 1.0),
                "time_ratio": result["distillm2"]["time_s"] / result["naive"]["time_s"],
                "loss_rel_diff": rel,
            }
            rows.append(row)
            print_row(row, header=len(rows) == 1)

    meta = {"torch": torch.__version__, "threads": torch.get_num_threads(), "device": args.device,
            "machine": torch.cuda.get_device_name() if args.device.startswith("cuda")
            else platform.processor() or platform.machine(), "repeats": args.repeats}
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = out.with_suffix(".json.tmp")
    tmp.write_text(json.dumps({"meta": meta, "rows": rows}, indent=2))
    tmp.replace(out)
    plot(rows, out.with_suffix(".png"))
    print(f"\nwrote {out} and {out.with_suffix('.png')}")
    return rows


def print_row(row, header):
    if header:
        print(f"{'shape (each)':>18} {'dtype':>8} | {'naive s':>8} {'ours s':>8} {'time x':>7} | "
              f"{'naive MiB':>9} {'ours MiB':>8} {'mem /':>6} | loss rel diff")
    b, t, v = row["shape_each"]
    print(f"{f'[{b},{t},{v}]':>18} {row['dtype']:>8} | {row['naive']['time_s']:8.2f} "
          f"{row['distillm2']['time_s']:8.2f} {row['time_ratio']:7.2f} | "
          f"{row['naive']['peak_extra_mib']:9.0f} {row['distillm2']['peak_extra_mib']:8.0f} "
          f"{row['memory_ratio']:6.1f} | {row['loss_rel_diff']:.1e}", flush=True)


def plot(rows, path):
    """Time and peak extra memory, side by side per row."""
    paired_bars(rows, [f"V={r['shape_each'][2]}\n{r['dtype']}" for r in rows], [("naive", "naive (released formula)"), ("distillm2", "distillm2 (chunked)")], path,
                "distillm2_loss vs naive reference (lower is better)", legend_panel=0)


if __name__ == "__main__":
    main()
