"""The per-chunk kernels of the divergences in :mod:`distillm2.losses`.

Each kernel takes float32 chunks ``s`` (student) and ``t`` (teacher logits, or labels) of shape
``[C, V]``, already divided by the temperature, and a per-row parameter ``a`` of shape ``[C, 1]``
(or None). It returns the per-row value ``[C]`` and, when ``need_grad``, the analytic gradient
d value / d s of shape ``[C, V]``; :func:`distillm2._chunks.chunked_divergence` runs them over
the masked rows. Mixtures are formed in log space, except in the skew KLs with alpha > 0, whose
mixture is bounded below by alpha times one of its parts (see there); ``0 * log 0`` counts as 0.
"""

from __future__ import annotations

import torch
from torch import Tensor

_NEG_INF = float("-inf")
_TINY = torch.finfo(torch.float32).tiny


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
    Where q = 0 (a -inf student logit: a masked or padded vocabulary entry) h is log 0 - log m,
    -inf or NaN; the limit of q h there is 0, so h is taken as 0 (else 0 * inf = NaN spreads over
    the row through sum q h).
    """
    h = h.masked_fill_(q == 0, 0.0)
    h = h.sub_(h.gather(-1, q.argmax(-1, keepdim=True)))
    return q * h.sub_((q * h).sum(-1, keepdim=True))


def forward_kl(s, t, a, need_grad):
    log_q, log_p = torch.log_softmax(s, -1), torch.log_softmax(t, -1)
    value = _xlog_ratio(log_p, log_q)
    grad = log_q.exp_().sub_(log_p.exp_()) if need_grad else None  # q - p
    return value, grad


def reverse_kl(s, t, a, need_grad):
    log_q, log_p = torch.log_softmax(s, -1), torch.log_softmax(t, -1)
    value = _xlog_ratio(log_q, log_p)
    # Where the teacher gives a token probability 0 the value is +inf (exact); so is the gradient.
    grad = _centered(log_q.exp(), log_q - log_p) if need_grad else None
    return value, grad


def skew_forward_kl(s, t, a, need_grad):
    """Skew KL for alpha > 0 (see :func:`skew_kernel`).

    Linear space: with alpha > 0, m >= alpha p, so m underflows only where p and q are both
    below ~1e-38, which contribute nothing at float32 precision; clamping m there to the
    smallest normal float keeps p / m finite. Two exponentials and one logarithm per element
    instead of eight transcendental passes: 2x faster, same values to float32 rounding.
    """
    q, p = torch.softmax(s, -1), torch.softmax(t, -1)
    m = torch.lerp(q, p, a).clamp_min_(_TINY)  # alpha p + (1 - alpha) q
    ratio = torch.div(p, m, out=m)
    value = torch.xlogy(p, ratio).sum(-1)
    if not need_grad:
        return value, None
    # d/ds of -sum p log m = -(p w - q sum(p w)), w = (1 - alpha) q / m: the student's share of m.
    pw = ratio.mul_(q).mul_(1 - a)
    return value, q.mul_(pw.sum(-1, keepdim=True)).sub_(pw)


def skew_forward_kl_log(s, t, a, need_grad):
    """Skew KL for any alpha in [0, 1), in log space: exact where p or q underflow (alpha = 0 and
    a student probability of exactly 0 give +inf, as KL does)."""
    log_q, log_p = torch.log_softmax(s, -1), torch.log_softmax(t, -1)
    log_q_part = log_q + torch.log1p(-a)  # log((1 - alpha) q)
    # log m = log(alpha p + (1 - alpha) q), in log space so that tiny p and q stay exact.
    log_m = torch.logaddexp(log_p + torch.log(a), log_q_part)
    value = _xlog_ratio(log_p, log_m)
    if not need_grad:
        return value, None
    # pw = p (1 - alpha) q / m; where p = 0 it is 0 (also where q = 0 too, alpha = 0: m = 0 and
    # the ratio would be exp(-inf - -inf) = NaN).
    p_zero = log_p == _NEG_INF
    pw = log_q_part.sub_(log_m).exp_().mul_(log_p.exp_()).masked_fill_(p_zero, 0.0)
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


def skew_reverse_kl(s, t, a, need_grad):
    """Skew reverse KL (DistiLLM-2) for alpha > 0, in linear space as :func:`skew_forward_kl`:
    m >= alpha q, so where m is clamped q is below ~1e-38 and h's clamped value is multiplied
    by (nearly) 0."""
    q, p = torch.softmax(s, -1), torch.softmax(t, -1)
    m = torch.lerp(p, q, a).clamp_min_(_TINY)  # (1 - alpha) p + alpha q
    h = torch.div(q, m, out=m).clamp_min_(_TINY).log_()  # log q / m, finite where q = 0
    value = (q * h).sum(-1)
    if not need_grad:
        return value, None
    return value, _centered(q, h)


def skew_reverse_kl_log(s, t, a, need_grad):
    """Skew reverse KL (DistiLLM-2) for any alpha in [0, 1), in log space."""
    return _skew_reverse(s, t, a, need_grad, detach_mixture=True)


def skew_reverse_kl_v1(s, t, a, need_grad):
    return _skew_reverse(s, t, a, need_grad, detach_mixture=False)


def skew_kernel(kernel, alpha_min: float):
    """The kernel to run for a call whose smallest alpha is ``alpha_min``: the linear-space skew
    kernels need alpha > 0, so with a zero alpha anywhere in the call the log-space one serves
    every row. Chosen once per call, not per chunk, so results never depend on the chunk size."""
    return _LOG_SPACE.get(kernel, kernel) if alpha_min <= 0.0 else kernel


_LOG_SPACE = {skew_forward_kl: skew_forward_kl_log, skew_reverse_kl: skew_reverse_kl_log}


def generalized_jsd(s, t, b, need_grad):
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


def total_variation(s, t, a, need_grad):
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


def cross_entropy(s, labels, a, need_grad):
    log_q = torch.log_softmax(s, -1)
    value = -log_q.gather(-1, labels[:, None])[:, 0]
    if not need_grad:
        return value, None
    grad = log_q.exp_()
    grad[torch.arange(grad.shape[0], device=grad.device), labels] -= 1.0  # q - onehot(y)
    return value, grad
