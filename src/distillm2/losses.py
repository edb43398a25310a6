"""Distillation losses: token-level divergences, reductions, the DistiLLM-2 objective, schedules.

Every divergence takes logits already aligned for next-token prediction: ``student_logits[b, t]``
and ``teacher_logits[b, t]`` are the distributions over token ``t + 1``, shape ``[B, T, V]`` in any
float dtype, and ``mask[b, t]`` is True where that token is trained on. With temperature ``tau``,
``p = softmax(teacher / tau)`` and ``q = softmax(student / tau)``. Results are float32 ``[B, T]``,
zero where the mask is False, differentiable with respect to ``student_logits`` only. (No
``tau**2`` factor is applied: the values are the divergences themselves.)

Memory (DESIGN.md §3). A naive implementation materialises several float32 ``[B, T, V]`` tensors
and lets autograd keep them for the backward pass. Here only the masked rows are computed, in
chunks of rows small enough to stay in cache, and the gradient with respect to the student logits
is formed analytically chunk by chunk during the forward pass (see ``_chunks.py``). The extra
memory is O(chunk x V) plus the gradient buffer itself, and the work is one pass instead of a
forward pass, a stored graph and a backward pass.

Paper: Ko et al., "DistiLLM-2: A Contrastive Approach Boosts the Distillation of LLMs", ICML 2025
(arXiv 2503.07067); equation numbers below refer to it.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field

import torch
from torch import Tensor

from distillm2._chunks import chunked_divergence

__all__ = [
    "forward_kl",
    "reverse_kl",
    "skew_forward_kl",
    "skew_reverse_kl",
    "generalized_jsd",
    "total_variation",
    "token_cross_entropy",
    "sequence_mean",
    "token_mean",
    "distillm2_loss",
    "DistiLLM2Output",
    "distillation_loss",
    "LossOutput",
    "LOSSES",
    "adaptive_alpha",
    "beta_schedule",
    "BETA_SCHEDULES",
]

_NEG_INF = float("-inf")


def _xlog_ratio(log_x: Tensor, log_y: Tensor) -> Tensor:
    """sum_v x (log x - log y) over the last dim, with 0 * log 0 = 0. ``[C, V] -> [C]``."""
    diff = log_x - log_y
    # x = 0 exactly (a -inf logit) contributes nothing; without this 0 * (-inf - -inf) = NaN.
    diff = torch.where(log_x == _NEG_INF, 0.0, diff)
    return (log_x.exp() * diff).sum(-1)


def _centered(q: Tensor, h: Tensor) -> Tensor:
    """q * (h - sum_v q h): the softmax Jacobian applied to h. ``[C, V] -> [C, V]``; h is modified.

    h is first shifted by its value at the most likely token (the result is invariant to a
    per-row shift). Without it, near one-hot q makes h_j - sum q h a difference of two large,
    almost equal float32 numbers and the dominant gradient entry loses most of its digits.
    """
    h = h.sub_(h.gather(-1, q.argmax(-1, keepdim=True)))
    return q * h.sub_((q * h).sum(-1, keepdim=True))


# Chunk kernels. Each takes float32 chunks ``s`` (student) and ``t`` (teacher) of shape [C, V],
# already divided by the temperature, and a per-row parameter ``a`` of shape [C, 1] (or None). It
# returns the per-row value [C] and, when asked, d value / d s of shape [C, V].


def _k_forward_kl(s, t, a, need_grad):
    log_q, log_p = torch.log_softmax(s, -1), torch.log_softmax(t, -1)
    value = _xlog_ratio(log_p, log_q)
    grad = log_q.exp_().sub_(log_p.exp_()) if need_grad else None  # q - p
    return value, grad


def _k_reverse_kl(s, t, a, need_grad):
    log_q, log_p = torch.log_softmax(s, -1), torch.log_softmax(t, -1)
    value = _xlog_ratio(log_q, log_p)
    # Where the teacher gives a token probability 0 the value is +inf (exact); so is the gradient.
    grad = _centered(log_q.exp(), log_q - log_p) if need_grad else None
    return value, grad


def _k_skew_forward_kl(s, t, a, need_grad):
    log_q, log_p = torch.log_softmax(s, -1), torch.log_softmax(t, -1)
    log_q_part = log_q + torch.log1p(-a)  # log((1 - alpha) q)
    # log m = log(alpha p + (1 - alpha) q), in log space so that tiny p and q stay exact.
    log_m = torch.logaddexp(log_p + torch.log(a), log_q_part)
    value = _xlog_ratio(log_p, log_m)
    if not need_grad:
        return value, None
    # d/ds of -sum p log m = -(p w - q sum(p w)), w = (1 - alpha) q / m: the student's share of m.
    pw = log_q_part.sub_(log_m).exp_().mul_(log_p.exp_())
    grad = log_q.exp_().mul_(pw.sum(-1, keepdim=True)).sub_(pw)
    return value, grad


def _skew_reverse(s, t, a, need_grad, detach_mixture):
    log_q, log_p = torch.log_softmax(s, -1), torch.log_softmax(t, -1)
    log_a = torch.log(a)
    log_m = torch.logaddexp(log_p + torch.log1p(-a), log_q + log_a)  # log((1-alpha) p + alpha q)
    value = _xlog_ratio(log_q, log_m)
    if not need_grad:
        return value, None
    h = log_q - log_m
    q = log_q.exp()
    if detach_mixture:  # DistiLLM-2: q inside the mixture is a constant (stop-gradient)
        return value, _centered(q, h)
    # DistiLLM v1: gradient also flows through alpha q in the mixture, adding -q (u - sum q u)
    # with u = alpha q / m, the student's share of the mixture.
    u = (log_a + log_q).sub_(log_m).exp_()
    return value, _centered(q, h.sub_(u))


def _k_skew_reverse_kl(s, t, a, need_grad):
    return _skew_reverse(s, t, a, need_grad, detach_mixture=True)


def _k_skew_reverse_kl_v1(s, t, a, need_grad):
    return _skew_reverse(s, t, a, need_grad, detach_mixture=False)


def _k_generalized_jsd(s, t, b, need_grad):
    log_q, log_p = torch.log_softmax(s, -1), torch.log_softmax(t, -1)
    log_m = torch.logaddexp(log_p + torch.log(b), log_q + torch.log1p(-b))
    kl_q = _xlog_ratio(log_q, log_m)
    value = b[:, 0] * _xlog_ratio(log_p, log_m) + (1 - b[:, 0]) * kl_q
    if not need_grad:
        return value, None
    # The terms through m cancel (d/dm of the sum is -1 everywhere and sum dq = 0), leaving
    # (1 - beta) q (log q/m - KL(q, m)).
    grad = _centered(log_q.exp(), log_q - log_m).mul_(1 - b)
    return value, grad


def _k_total_variation(s, t, a, need_grad):
    q, p = torch.softmax(s, -1), torch.softmax(t, -1)
    diff = q - p
    value = 0.5 * diff.abs().sum(-1)
    if not need_grad:
        return value, None
    # Subgradient: sign(q - p), taken as 0 where the difference is float32 rounding noise, so
    # that identical distributions get a zero gradient instead of random signs.
    noise = torch.maximum(q, p).mul_(4 * torch.finfo(torch.float32).eps)
    sign = diff.sign().masked_fill_(diff.abs_() <= noise, 0.0)
    return value, _centered(q, sign).mul_(0.5)


def _k_cross_entropy(s, labels, a, need_grad):
    log_q = torch.log_softmax(s, -1)
    value = -log_q.gather(-1, labels[:, None])[:, 0]
    if not need_grad:
        return value, None
    grad = log_q.exp_()
    grad[torch.arange(grad.shape[0], device=grad.device), labels] -= 1.0  # q - onehot(y)
    return value, grad


def _check_alpha(alpha, name="alpha"):
    if isinstance(alpha, Tensor):
        lo, hi = (float(alpha.min()), float(alpha.max())) if alpha.numel() else (0.0, 0.0)
    else:
        lo = hi = float(alpha)
    if not (0.0 <= lo and hi < 1.0):
        raise ValueError(f"{name} must lie in [0, 1), got min {lo} and max {hi}")


def forward_kl(student_logits, teacher_logits, mask, *, temperature=1.0) -> Tensor:
    """KL(p || q) = sum_v p (log p - log q) per token. ``[B, T, V] x2, [B, T] -> [B, T]``."""
    return chunked_divergence(_k_forward_kl, student_logits, teacher_logits, mask, None, temperature)


def reverse_kl(student_logits, teacher_logits, mask, *, temperature=1.0) -> Tensor:
    """KL(q || p) = sum_v q (log q - log p) per token. ``[B, T, V] x2, [B, T] -> [B, T]``.

    Infinite where the teacher gives probability 0 to a token the student can emit.
    """
    return chunked_divergence(_k_reverse_kl, student_logits, teacher_logits, mask, None, temperature)


def skew_forward_kl(student_logits, teacher_logits, mask, *, alpha=0.1, temperature=1.0) -> Tensor:
    """Skew KL, DistiLLM-2 eq. (1): KL(p || alpha p + (1 - alpha) q) per token.

    ``alpha`` is a float or a per-sequence tensor ``[B]`` in [0, 1); alpha = 0 gives
    :func:`forward_kl`. Gradient flows through q inside the mixture. Returns ``[B, T]``.
    """
    _check_alpha(alpha)
    return chunked_divergence(
        _k_skew_forward_kl, student_logits, teacher_logits, mask, alpha, temperature
    )


def skew_reverse_kl(
    student_logits, teacher_logits, mask, *, alpha=0.1, detach_mixture=True, temperature=1.0
) -> Tensor:
    """Skew reverse KL, DistiLLM-2 eq. (2): KL(q || (1 - alpha) p + alpha q') per token.

    With ``detach_mixture=True`` (DistiLLM-2) q' is q under stop-gradient; with False (DistiLLM
    v1) the gradient also flows through q'. The values are identical; only gradients differ.
    ``alpha`` is a float or ``[B]`` tensor in [0, 1); alpha = 0 gives :func:`reverse_kl`.
    """
    _check_alpha(alpha)
    kernel = _k_skew_reverse_kl if detach_mixture else _k_skew_reverse_kl_v1
    return chunked_divergence(kernel, student_logits, teacher_logits, mask, alpha, temperature)


def generalized_jsd(student_logits, teacher_logits, mask, *, beta=0.5, temperature=1.0) -> Tensor:
    """Generalised JSD (GKD, Agarwal et al. 2024): beta KL(p||m) + (1-beta) KL(q||m), m = beta p +
    (1-beta) q, per token. ``beta`` in (0, 1). Returns ``[B, T]``."""
    if not 0.0 < float(beta) < 1.0:
        raise ValueError(f"generalized_jsd: beta must lie in (0, 1), got {beta}")
    return chunked_divergence(
        _k_generalized_jsd, student_logits, teacher_logits, mask, float(beta), temperature
    )


def total_variation(student_logits, teacher_logits, mask, *, temperature=1.0) -> Tensor:
    """Total variation distance 0.5 sum_v |p - q| per token. Returns ``[B, T]``."""
    return chunked_divergence(
        _k_total_variation, student_logits, teacher_logits, mask, None, temperature
    )


def token_cross_entropy(student_logits, labels, mask) -> Tensor:
    """Negative log-likelihood -log q(labels[b, t]) per token (SFT / SeqKD).

    ``student_logits`` ``[B, T, V]``, ``labels`` integer ``[B, T]`` (the token at position t + 1;
    any value where the mask is False). Returns float32 ``[B, T]``.
    """
    return chunked_divergence(_k_cross_entropy, student_logits, labels, mask, None, 1.0)


# Reductions ------------------------------------------------------------------------------------


def sequence_mean(values: Tensor, mask: Tensor) -> Tensor:
    """Mean of ``values`` over each sequence's masked tokens. ``[B, T] -> [B]``; 0 (not NaN) for a
    sequence with no masked token."""
    mask = mask.bool()
    total = torch.where(mask, values, 0.0).sum(-1)
    return total / mask.sum(-1).clamp_min(1).to(total.dtype)


def token_mean(values: Tensor, mask: Tensor, num_tokens=None) -> Tensor:
    """Sum over masked tokens divided by ``num_tokens`` (or this batch's masked-token count).

    Under gradient accumulation pass the masked-token count of the whole optimiser step as
    ``num_tokens``, so that the summed micro-batch losses equal the loss of one large batch.
    Returns a scalar; 0 when there is no masked token.
    """
    mask = mask.bool()
    total = torch.where(mask, values, 0.0).sum()
    if num_tokens is None:
        num_tokens = mask.sum()
    if not isinstance(num_tokens, Tensor):
        num_tokens = torch.tensor(float(num_tokens), device=total.device)
    return total / num_tokens.to(total.dtype).clamp_min(1)


# The DistiLLM-2 objective and the baselines ----------------------------------------------------


@dataclass
class DistiLLM2Output:
    """``loss`` scalar; ``skl`` and ``srkl`` the per-pair terms ``[B]`` (no gradient detached)."""

    loss: Tensor
    skl: Tensor
    srkl: Tensor


def distillm2_loss(
    student_chosen,
    teacher_chosen,
    mask_chosen,
    student_rejected,
    teacher_rejected,
    mask_rejected,
    *,
    alpha_chosen=0.1,
    alpha_rejected=0.1,
    beta=0.5,
    temperature=1.0,
) -> DistiLLM2Output:
    """DistiLLM-2 contrastive objective (eq. 3): (1 - beta) SKL on teacher responses (chosen rows)
    plus beta SRKL on student responses (rejected rows), each a per-sequence token mean, averaged
    over the B pairs. The released code's (2 - b) SKL + b SRKL with b = 2 beta is twice this.

    Logits ``[B, T, V]`` (chosen and rejected may differ in T), masks ``[B, T]``, alphas floats
    or ``[B]`` tensors (see :func:`adaptive_alpha`), ``beta`` a float (see :func:`beta_schedule`).
    """
    skl = sequence_mean(
        skew_forward_kl(
            student_chosen, teacher_chosen, mask_chosen, alpha=alpha_chosen, temperature=temperature
        ),
        mask_chosen,
    )
    srkl = sequence_mean(
        skew_reverse_kl(
            student_rejected,
            teacher_rejected,
            mask_rejected,
            alpha=alpha_rejected,
            temperature=temperature,
        ),
        mask_rejected,
    )
    if skl.shape != srkl.shape:
        raise ValueError(
            f"chosen and rejected batches differ in size: {tuple(skl.shape)} vs {tuple(srkl.shape)}"
        )
    loss = ((1.0 - beta) * skl + beta * srkl).mean()
    return DistiLLM2Output(loss=loss, skl=skl, srkl=srkl)


@dataclass(frozen=True)
class LossSpec:
    """What a named loss needs: which rows of a pair it trains on and whether it reads the teacher."""

    rows: tuple[str, ...]
    needs_teacher: bool
    description: str


LOSSES: dict[str, LossSpec] = {
    "sft": LossSpec(("chosen",), False, "cross-entropy on teacher responses"),
    "seqkd": LossSpec(("chosen",), False, "cross-entropy on teacher responses (SeqKD)"),
    "kd": LossSpec(("chosen",), True, "forward KL on teacher responses"),
    "rkl": LossSpec(("rejected",), True, "reverse KL on student responses"),
    "gkd": LossSpec(("chosen", "rejected"), True, "generalised JSD (beta 0.9) on both"),
    "tvd": LossSpec(("chosen", "rejected"), True, "total variation on both"),
    "distillm": LossSpec(("chosen", "rejected"), True, "skew reverse KL (v1 gradient) on both"),
    "distillm2": LossSpec(("chosen", "rejected"), True, "SKL on teacher + SRKL on student rows"),
}


@dataclass
class LossOutput:
    """``loss`` = ``per_pair.mean()``; ``per_pair`` ``[B]`` (sum it yourself to normalise by a
    global pair count); ``terms`` named per-pair components ``[B]`` for logging; ``token_sums``
    the objective-weighted sum over masked tokens of each row kind (for token-mean reduction:
    divide each by its global masked-token count and add)."""

    loss: Tensor
    per_pair: Tensor
    terms: dict[str, Tensor] = field(default_factory=dict)
    token_sums: dict[str, Tensor] = field(default_factory=dict)


def distillation_loss(
    name: str,
    *,
    student_chosen=None,
    teacher_chosen=None,
    mask_chosen=None,
    labels_chosen=None,
    student_rejected=None,
    teacher_rejected=None,
    mask_rejected=None,
    alpha_chosen=0.1,
    alpha_rejected=0.1,
    beta=0.5,
    jsd_beta=0.9,
    temperature=1.0,
) -> LossOutput:
    """Any loss of DESIGN.md §3's table by name. Per pair: the sequence mean of each used row,
    weighted (1 - beta, beta) for distillm2 and averaged for the other two-row losses. Only the
    rows ``LOSSES[name].rows`` need to be given; sft and seqkd need ``labels_chosen`` and no
    teacher. Logits ``[B, T, V]``, masks ``[B, T]``; returns a :class:`LossOutput`."""
    if name not in LOSSES:
        raise ValueError(f"unknown loss {name!r}; valid: {', '.join(LOSSES)}")
    spec = LOSSES[name]
    given = {
        "chosen": (student_chosen, teacher_chosen, mask_chosen, alpha_chosen),
        "rejected": (student_rejected, teacher_rejected, mask_rejected, alpha_rejected),
    }
    if name == "distillm2":
        weights = {"chosen": 1.0 - beta, "rejected": beta}
        term_names = {"chosen": "skl", "rejected": "srkl"}
    else:
        weights = {which: 1.0 / len(spec.rows) for which in spec.rows}
        term_names = {"chosen": "nll" if not spec.needs_teacher else "chosen", "rejected": "rejected"}

    def values(which):
        s, t, m, alpha = given[which]
        if s is None or m is None or (spec.needs_teacher and t is None):
            raise ValueError(f"loss {name!r} needs student, teacher and mask for the {which} rows")
        tau = {"temperature": temperature}
        if name in ("sft", "seqkd"):
            if labels_chosen is None:
                raise ValueError(f"loss {name!r} needs labels_chosen")
            return token_cross_entropy(s, labels_chosen, m), m
        if name == "distillm2":
            fn = skew_forward_kl if which == "chosen" else skew_reverse_kl
            return fn(s, t, m, alpha=alpha, **tau), m
        return {
            "kd": lambda: forward_kl(s, t, m, **tau),
            "rkl": lambda: reverse_kl(s, t, m, **tau),
            "gkd": lambda: generalized_jsd(s, t, m, beta=jsd_beta, **tau),
            "tvd": lambda: total_variation(s, t, m, **tau),
            "distillm": lambda: skew_reverse_kl(s, t, m, alpha=alpha, detach_mixture=False, **tau),
        }[name](), m

    terms, token_sums, per_pair = {}, {}, 0.0
    for which in spec.rows:
        v, m = values(which)
        seq = sequence_mean(v, m)
        terms[term_names[which]] = seq
        token_sums[which] = weights[which] * torch.where(m.bool(), v, 0.0).sum()
        per_pair = per_pair + weights[which] * seq
    return LossOutput(per_pair.mean(), per_pair, terms, token_sums)


# Schedules -------------------------------------------------------------------------------------


@torch.no_grad()
def adaptive_alpha(gap, anchor, *, alpha0=0.1, alpha_min=0.01, alpha_max=0.1) -> Tensor:
    """Per-sample skew coefficient of DistiLLM-2's curriculum (§3.3, DESIGN.md §3).

    ``gap`` ``[B]``: exp(mean teacher log-prob) - exp(mean student log-prob) of a row's response
    (sign flipped for student rows), ``anchor``: the batch-mean gap measured at the start of the
    round. Returns float32 ``[B]``: clip(1 - (1 - alpha0) anchor / gap, alpha_min, alpha_max)
    where gap > 0, alpha_min where gap <= 0 (already easy), and alpha0 everywhere if anchor <= 0.
    """
    if not 0.0 <= alpha_min <= alpha_max < 1.0:
        raise ValueError(f"need 0 <= alpha_min <= alpha_max < 1, got {alpha_min}, {alpha_max}")
    gap = torch.as_tensor(gap, dtype=torch.float32)
    anchor = float(anchor)
    if not math.isfinite(anchor) or anchor <= 0.0:
        return torch.full_like(gap, float(alpha0))
    safe_gap = torch.where(gap > 0, gap, 1.0)
    alpha = (1.0 - (1.0 - alpha0) * anchor / safe_gap).clamp(alpha_min, alpha_max)
    return torch.where(gap > 0, alpha, torch.full_like(alpha, alpha_min))


BETA_SCHEDULES = ("constant", "linear")


def beta_schedule(progress, kind="linear", *, beta0=0.5, beta_max=0.75, ramp=0.5) -> float:
    """Weight of the reverse (student-response) term at ``progress`` in [0, 1] of the whole run.

    ``constant``: beta0. ``linear`` (the released code's schedule): rises linearly from beta0 to
    beta_max over the first ``ramp`` fraction of the run, then stays at beta_max.
    """
    progress = float(progress)
    if not 0.0 <= progress <= 1.0:
        raise ValueError(f"beta_schedule: progress must lie in [0, 1], got {progress}")
    if kind == "constant":
        return float(beta0)
    if kind == "linear":
        if ramp < 0:
            raise ValueError(f"beta_schedule: ramp must be >= 0, got {ramp}")
        frac = 1.0 if ramp == 0 else min(progress / ramp, 1.0)
        return float(beta0 + (beta_max - beta0) * frac)
    raise ValueError(f"unknown beta schedule {kind!r}; valid: {', '.join(BETA_SCHEDULES)}")
