"""Time and peak extra memory of the skew KL from hidden states: today's path vs the fused one.

today: the logits of both models are materialised (``h @ W.T``, the student's inside autograd,
the teacher's under no_grad), then :func:`distillm2.losses.skew_forward_kl` (the chunked loss,
which holds the gradient of the full student logits) and ``.sum().backward()`` through the
student's matmul to its hidden states and output weight.
fused: :func:`distillm2.fused.fused_skew_forward_kl` on the hidden states and weights, the same
``.sum().backward()``; no ``[N, V]`` tensor exists.

Both run on the same inputs in one process, and their values and gradients are checked against
each other. Peak extra memory = peak resident memory (VmHWM, reset through /proc/self/clear_refs)
during forward + backward minus the resident memory just before (inputs allocated, gradients
cleared); time = median of the repeats, memory = their maximum (as benchmarks/losses.py).

    python benchmarks/fused.py                  # the paper's setting; docs/benchmarks/fused.json + .png
    python benchmarks/fused.py --quick          # small sizes, a smoke test
"""

from __future__ import annotations

import argparse
import gc
import json
import os
import platform
import statistics
import time
from pathlib import Path

import torch
from bench_common import paired_bars, reset_peak, status_kib

from distillm2 import fused as F
from distillm2.losses import skew_forward_kl

ALPHA = 0.1


def today(h_s, w_s, h_t, w_t):
    """Materialised logits + the chunked loss: values [N]."""
    n, vocab = h_s.shape[0], w_s.shape[0]
    student = (h_s @ w_s.t()).view(1, n, vocab)
    with torch.no_grad():
        teacher = (h_t @ w_t.t()).view(1, n, vocab)
    mask = torch.ones((1, n), dtype=torch.bool)
    return skew_forward_kl(student, teacher, mask, alpha=ALPHA)[0]


def fused(h_s, w_s, h_t, w_t):
    """The fused path: values [N]."""
    return F.fused_skew_forward_kl(h_s, w_s, h_t, w_t, alpha=ALPHA)


def fused_f32acc(h_s, w_s, h_t, w_t):
    """The fused path with a float32 grad_weight accumulator (half precision only): values [N]."""
    return F.fused_skew_forward_kl(h_s, w_s, h_t, w_t, alpha=ALPHA, grad_weight_dtype=torch.float32)


IMPLS = {"today": today, "fused": fused, "fused_f32acc": fused_f32acc}


def make_inputs(rows, vocab, hs, ht, dtype, seed=0):
    """Hidden states and output weights scaled so that logits have a standard deviation of ~2."""
    g = torch.Generator().manual_seed(seed)
    h_s = torch.randn((rows, hs), generator=g).to(dtype).requires_grad_(True)
    w_s = (torch.randn((vocab, hs), generator=g) * (2 / hs**0.5)).to(dtype).requires_grad_(True)
    h_t = torch.randn((rows, ht), generator=g).to(dtype)
    w_t = (torch.randn((vocab, ht), generator=g) * (2 / ht**0.5)).to(dtype)
    return h_s, w_s, h_t, w_t


def run_once(impl, inputs):
    """One forward + backward: wall time, CPU time, peak extra memory (MiB), and the outputs."""
    h_s, w_s, h_t, w_t = inputs
    h_s.grad = w_s.grad = None
    gc.collect()
    before = status_kib("VmRSS") / 1024
    reset_peak()
    start, cpu = time.perf_counter(), time.process_time()
    values = IMPLS[impl](h_s, w_s, h_t, w_t)
    values.sum().backward()
    wall, cpu = time.perf_counter() - start, time.process_time() - cpu
    peak = status_kib("VmHWM") / 1024 - before
    print(f"  {impl}: {wall:.1f} s ({cpu:.1f} s CPU), {peak:.0f} MiB, load {os.getloadavg()[0]:.1f}",
          flush=True)
    outputs = (values.detach(), h_s.grad, w_s.grad)
    h_s.grad = w_s.grad = None
    return wall, cpu, peak, outputs


def run_cases(inputs, repeats, impls):
    """Each implementation ``repeats`` times, alternating (the shared machine's load drifts):
    median wall and CPU time, largest peak; and the last run's outputs of each."""
    runs = {impl: [] for impl in impls}
    outputs = {}
    for rep in range(repeats):
        for impl in impls:
            *numbers, out = run_once(impl, inputs)
            runs[impl].append(numbers)
            if rep == repeats - 1:  # keep only the last outputs (a [V, H] gradient each)
                outputs[impl] = out
            del out
    results = {}
    for impl, numbers in runs.items():
        walls, cpus, peaks = (list(x) for x in zip(*numbers))
        # CPU time of this process too: the machine is shared, wall time includes waiting for it
        results[impl] = {"time_s": statistics.median(walls), "times_s": walls,
                         "cpu_s": statistics.median(cpus), "cpus_s": cpus, "peak_extra_mib": max(peaks)}
    return results, outputs


def float32_reference(inputs):
    """The fused path in float32 on the same (rounded) half-precision inputs: the exact function
    of those inputs up to float32 rounding, against which each half-precision path's error is
    measured. Outputs as run_once's."""
    up = [x.detach().float().requires_grad_(x.requires_grad) for x in inputs]
    values = fused(*up)
    values.sum().backward()
    return values.detach(), up[0].grad, up[1].grad


def rel_errors(got, exact):
    """Relative error (norm of the difference over the norm of the reference) of each output."""
    return {name: float((x.double() - y.double()).norm() / y.double().norm().clamp_min(1e-30))
            for name, x, y in zip(("values", "grad_hidden", "grad_weight"), got, exact)}


def compare(a, b):
    """Largest difference of each output relative to the largest magnitude of today's."""
    return {name: float((x.float() - y.float()).abs().max() / y.float().abs().max().clamp_min(1e-30))
            for name, x, y in zip(("values", "grad_hidden", "grad_weight"), b, a)}


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    parser.add_argument("--quick", action="store_true", help="small sizes (smoke test)")
    parser.add_argument("--rows", type=int, default=4096, help="response tokens N (default 4096)")
    parser.add_argument("--dtypes", default="float32,bfloat16")
    parser.add_argument("--repeats", type=int, default=2)
    parser.add_argument("--out", default="docs/benchmarks/fused.json")
    args = parser.parse_args(argv)

    vocab, hs, ht = (8192, 256, 512) if args.quick else (151_936, 1536, 3584)
    rows_n = 256 if args.quick else args.rows
    rows = []
    for name in args.dtypes.split(","):
        dtype = getattr(torch, name)
        inputs = make_inputs(rows_n, vocab, hs, ht, dtype)
        print(f"[{rows_n} rows, V={vocab}, Hs={hs}, Ht={ht}, {name}]", flush=True)
        row = {"rows": rows_n, "vocab": vocab, "hidden_student": hs, "hidden_teacher": ht,
               "dtype": name, "load_before": os.getloadavg()}
        half = dtype != torch.float32
        impls = list(IMPLS) if half else ["today", "fused"]
        results, outputs = run_cases(inputs, args.repeats, impls)
        row.update(results)
        if half:  # the error each path's half-precision rounding costs, and what the accumulator changes
            exact = float32_reference(inputs)
            row["rel_error_vs_float32"] = {impl: rel_errors(outputs[impl], exact) for impl in impls}
            row["memory_ratio_f32acc"] = row["today"]["peak_extra_mib"] / max(row["fused_f32acc"]["peak_extra_mib"], 1.0)
            row["time_ratio_f32acc"] = row["fused_f32acc"]["time_s"] / row["today"]["time_s"]
            del exact
        row["rel_diff"] = compare(outputs["today"], outputs["fused"])
        row["memory_ratio"] = row["today"]["peak_extra_mib"] / max(row["fused"]["peak_extra_mib"], 1.0)
        row["time_ratio"] = row["fused"]["time_s"] / row["today"]["time_s"]
        row["cpu_time_ratio"] = row["fused"]["cpu_s"] / row["today"]["cpu_s"]
        row["load_after"] = os.getloadavg()
        row["date"] = time.strftime("%Y-%m-%d")
        # today's outputs (float32) vs ours: float32 rounding; bf16 gradients: bf16 rounding
        tol = 1e-4 if dtype == torch.float32 else 2e-2
        bad = {k: v for k, v in row["rel_diff"].items() if not v <= tol}
        if bad:
            raise SystemExit(f"fused and today's outputs differ beyond {tol}: {bad}")
        rows.append(row)
        del inputs, outputs
        gc.collect()

    print_table(rows)
    meta = {"torch": torch.__version__, "threads": torch.get_num_threads(),
            "machine": platform.processor() or platform.machine(), "cpus": os.cpu_count(),
            "repeats": args.repeats, "chunk_elements": F.CHUNK_ELEMENTS,
            "chunk_rows": F._default_chunk_rows(torch.device("cpu"), vocab),
            "note": "load_before/after: 1, 5, 15-minute load averages (shared machine)"}
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    if out.exists() and not args.quick:  # dtypes not measured this time keep their earlier rows
        done = {(r["dtype"], r["rows"]) for r in rows}
        kept = [r for r in json.loads(out.read_text())["rows"] if (r["dtype"], r["rows"]) not in done]
        rows = sorted(kept + rows, key=lambda r: (r["rows"], r["dtype"] != "float32"))
    tmp = out.with_suffix(".json.tmp")
    tmp.write_text(json.dumps({"meta": meta, "rows": rows}, indent=2))
    tmp.replace(out)
    plot(rows, out.with_suffix(".png"))
    print(f"\nwrote {out} and {out.with_suffix('.png')}")
    # the worst case over the dtypes measured (float32 and bfloat16 by default)
    print(f"fused: memory_ratio={min(r['memory_ratio'] for r in rows):.2f} "
          f"time_ratio={max(r['time_ratio'] for r in rows):.2f}")
    return rows


def print_table(rows):
    """One line per dtype: times, peaks, ratios and the largest relative differences."""
    print(f"\n{'rows':>5} {'dtype':>9} | {'today s':>8} {'fused s':>8} {'time x':>7} | "
          f"{'cpu x':>6} | {'today MiB':>9} {'fused MiB':>9} {'mem /':>6} | max rel diff (values, grad h, grad W)")
    for r in rows:
        d = r["rel_diff"]
        print(f"{r['rows']:>5} {r['dtype']:>9} | {r['today']['time_s']:8.1f} {r['fused']['time_s']:8.1f} "
              f"{r['time_ratio']:7.2f} {r['cpu_time_ratio']:6.2f} | {r['today']['peak_extra_mib']:9.0f} "
              f"{r['fused']['peak_extra_mib']:9.0f} {r['memory_ratio']:6.1f} | "
              f"{d['values']:.1e}, {d['grad_hidden']:.1e}, {d['grad_weight']:.1e}", flush=True)
        if "fused_f32acc" in r:
            f = r["fused_f32acc"]
            print(f"{'':>5} {'f32 acc':>9} | {'':>8} {f['time_s']:8.1f} {r['time_ratio_f32acc']:7.2f} {'':>6} | "
                  f"{'':>9} {f['peak_extra_mib']:9.0f} {r['memory_ratio_f32acc']:6.1f} |", flush=True)
            for impl, e in r["rel_error_vs_float32"].items():
                print(f"{'':>5} {'':>9}   error vs float32 on the same inputs, {impl}: values {e['values']:.1e}, "
                      f"grad h {e['grad_hidden']:.1e}, grad W {e['grad_weight']:.1e}", flush=True)


def plot(rows, path):
    """Time and peak extra memory, side by side per row."""
    paired_bars(rows, [f"N={r['rows']}\n{r['dtype']}" for r in rows], [("today", "logits + chunked loss"), ("fused", "fused from hidden states")], path,
                f"skew KL + backward, V={rows[0]['vocab']}, Hs={rows[0]['hidden_student']}, Ht={rows[0]['hidden_teacher']} (lower is better)", legend_panel=1)


if __name__ == "__main__":
    main()
