"""Schedules of the DistiLLM-2 objective, as pure functions of numbers: the curriculum's
adaptive skew coefficient (§3.3) and the weight beta of the reverse term over training.

The paper's eq. 3 weighs the two terms (1 - beta) SKL + beta SRKL (the released code's
(2 - b) SKL + b SRKL with b = 2 beta is twice that); the schedules below are in that convention.
"""

from __future__ import annotations

import math

import torch
from torch import Tensor

NEGATIVE_GAP_RULES = ("alpha_min", "alpha_max")


@torch.no_grad()
def adaptive_alpha(gap, anchor, *, alpha0=0.1, alpha_min=0.01, alpha_max=0.1, negative_gap="alpha_min") -> Tensor:
    """Per-sample skew coefficient of DistiLLM-2's curriculum (§3.3).

    ``gap`` ``[B]``: exp(mean teacher log-prob) - exp(mean student log-prob) of a row's response
    (sign flipped for student rows), ``anchor``: the batch-mean gap measured at the start of the
    round. Returns float32 ``[B]``: clip(1 - (1 - alpha0) anchor / gap, alpha_min, alpha_max)
    where gap > 0, and alpha0 everywhere if anchor <= 0. Where gap <= 0 (the student already
    does at least as well) ``negative_gap`` decides: ``alpha_min`` (this project's default: the
    sample is easy, so it gets the least skew) or ``alpha_max`` (what the released code's formula
    gives, since 1 - anchor / gap > 1 there and is clipped to the maximum).
    """
    if not 0.0 <= alpha_min <= alpha_max < 1.0:
        raise ValueError(f"need 0 <= alpha_min <= alpha_max < 1, got {alpha_min}, {alpha_max}")
    if negative_gap not in NEGATIVE_GAP_RULES:
        raise ValueError(f"negative_gap must be one of {', '.join(NEGATIVE_GAP_RULES)}, got {negative_gap!r}")
    gap = torch.as_tensor(gap, dtype=torch.float32)
    anchor = float(anchor)
    if not math.isfinite(anchor) or anchor <= 0.0:
        return torch.full_like(gap, float(alpha0))
    safe_gap = torch.where(gap > 0, gap, 1.0)
    alpha = (1.0 - (1.0 - alpha0) * anchor / safe_gap).clamp(alpha_min, alpha_max)
    fallback = alpha_min if negative_gap == "alpha_min" else alpha_max
    return torch.where(gap > 0, alpha, torch.full_like(alpha, fallback))


BETA_SCHEDULES = {
    "constant": "beta0 throughout (the released code as run: its gradual_beta is switched off)",
    "linear_per_round": "beta0 -> beta_max over the first beta_ramp of each round, again every round "
                        "(the released gradual_beta; each round is a training run there)",
    "paper": "clip(e / E + tau / T, beta0, 1): e round index from 0, E rounds, tau step in the round, "
             "T steps per round (Algorithm 1 as the issue reads it; not checked against the paper text)",
    "linear_run": "beta0 -> beta_max over the first beta_ramp of the whole run",
    "linear": "the old name of linear_run",
}


def beta_schedule(progress, kind="linear", *, beta0=0.5, beta_max=0.75, ramp=0.5, round_progress=None,
                  round_index=1, rounds=1) -> float:
    """Weight beta of the reverse (student-response) term.

    ``progress`` in [0, 1] of the whole run; ``round_progress`` in [0, 1] of the current round
    (default: ``progress``); ``round_index`` 1-based of ``rounds``. See :data:`BETA_SCHEDULES`.
    """
    progress = float(progress)
    round_progress = progress if round_progress is None else float(round_progress)
    for name, value in (("progress", progress), ("round_progress", round_progress)):
        if not 0.0 <= value <= 1.0:
            raise ValueError(f"beta_schedule: {name} must lie in [0, 1], got {value}")
    if ramp < 0:
        raise ValueError(f"beta_schedule: ramp must be >= 0, got {ramp}")

    def ramped(p):
        return float(beta0 + (beta_max - beta0) * (1.0 if ramp == 0 else min(p / ramp, 1.0)))

    if kind == "constant":
        return float(beta0)
    if kind in ("linear", "linear_run"):
        return ramped(progress)
    if kind == "linear_per_round":
        return ramped(round_progress)
    if kind == "paper":
        return float(min(max((round_index - 1) / max(rounds, 1) + round_progress, beta0), 1.0))
    raise ValueError(f"unknown beta schedule {kind!r}; valid: {', '.join(BETA_SCHEDULES)}")
