"""Token-level divergences and their reductions (re-exported by :mod:`distillm2.losses`).

Every divergence takes logits already aligned for next-token prediction: ``student_logits[b, t]``
and ``teacher_logits[b, t]`` are the distributions over token ``t + 1``, shape ``[B, T, V]`` in any
float dtype, and ``mask[b, t]`` is True where that token is trained on. With temperature ``tau``,
``p = softmax(teacher / tau)`` and ``q = softmax(student / tau)``. Results are float32 ``[B, T]``,
zero where the mask is False, differentiable with respect to ``student_logits`` only. (No
``tau**2`` factor is applied: the values are the divergences themselves.)

Memory. A naive implementation materialises several float32 ``[B, T, V]`` tensors
and lets autograd keep them for the backward pass. Here only the masked rows are computed, in
chunks of rows small enough to stay in cache, and the gradient with respect to the student logits
is formed analytically chunk by chunk during the forward pass (see ``_chunks.py``). The extra
memory is O(chunk x V) plus the gradient buffer itself, and the work is one pass instead of a
forward pass, a stored graph and a backward pass.

Paper: Ko et al., "DistiLLM-2: A Contrastive Approach Boosts the Distillation of LLMs", ICML 2025
(arXiv 2503.07067); equation numbers below refer to it.
"""

from __future__ import annotations

import torch
from torch import Tensor

from distillm2 import _kernels as K
from distillm2._chunks import chunked_divergence


def _check_alpha(alpha, name="alpha") -> float:
    """Refuses alphas outside [0, 1); returns the smallest (for :func:`_kernels.skew_kernel`)."""
    if isinstance(alpha, Tensor):
        lo, hi = (float(alpha.min()), float(alpha.max())) if alpha.numel() else (0.0, 0.0)
    else:
        lo = hi = float(alpha)
    if not (0.0 <= lo and hi < 1.0):
        raise ValueError(f"{name} must lie in [0, 1), got min {lo} and max {hi}")
    return lo


def _skew_forward_kernel(alpha):
    """The skew KL kernel for ``alpha`` (checked): linear space unless some alpha is 0."""
    return K.skew_kernel(K.skew_forward_kl, _check_alpha(alpha))


def _skew_reverse_kernel(alpha, detach_mixture=True):
    """The skew reverse KL kernel for ``alpha`` (checked): DistiLLM-2's (mixture detached; linear
    space unless some alpha is 0) or DistiLLM v1's."""
    lo = _check_alpha(alpha)
    return K.skew_kernel(K.skew_reverse_kl, lo) if detach_mixture else K.skew_reverse_kl_v1


def _check_jsd_beta(beta) -> float:
    if not 0.0 < float(beta) < 1.0:
        raise ValueError(f"generalized_jsd: beta must lie in (0, 1), got {beta}")
    return float(beta)


def forward_kl(student_logits, teacher_logits, mask, *, temperature=1.0) -> Tensor:
    """KL(p || q) = sum_v p (log p - log q) per token. ``[B, T, V] x2, [B, T] -> [B, T]``."""
    return chunked_divergence(K.forward_kl, student_logits, teacher_logits, mask, None, temperature)


def reverse_kl(student_logits, teacher_logits, mask, *, temperature=1.0) -> Tensor:
    """KL(q || p) = sum_v q (log q - log p) per token. ``[B, T, V] x2, [B, T] -> [B, T]``.

    Infinite where the teacher gives probability 0 to a token the student can emit.
    """
    return chunked_divergence(K.reverse_kl, student_logits, teacher_logits, mask, None, temperature)


def skew_forward_kl(student_logits, teacher_logits, mask, *, alpha=0.1, temperature=1.0) -> Tensor:
    """Skew KL, DistiLLM-2 eq. (1): KL(p || alpha p + (1 - alpha) q) per token.

    ``alpha`` is a float or a per-sequence tensor ``[B]`` in [0, 1); alpha = 0 gives
    :func:`forward_kl`. Gradient flows through q inside the mixture. Returns ``[B, T]``.
    """
    kernel = _skew_forward_kernel(alpha)
    return chunked_divergence(kernel, student_logits, teacher_logits, mask, alpha, temperature)


def skew_reverse_kl(
    student_logits, teacher_logits, mask, *, alpha=0.1, detach_mixture=True, temperature=1.0
) -> Tensor:
    """Skew reverse KL, DistiLLM-2 eq. (2): KL(q || (1 - alpha) p + alpha q') per token.

    With ``detach_mixture=True`` (DistiLLM-2) q' is q under stop-gradient; with False (DistiLLM
    v1) the gradient also flows through q'. The values are identical; only gradients differ.
    ``alpha`` is a float or ``[B]`` tensor in [0, 1); alpha = 0 gives :func:`reverse_kl`.
    """
    kernel = _skew_reverse_kernel(alpha, detach_mixture)
    return chunked_divergence(kernel, student_logits, teacher_logits, mask, alpha, temperature)


def generalized_jsd(student_logits, teacher_logits, mask, *, beta=0.5, temperature=1.0) -> Tensor:
    """Generalised JSD (GKD, Agarwal et al. 2024): beta KL(p||m) + (1-beta) KL(q||m), m = beta p +
    (1-beta) q, per token. ``beta`` in (0, 1). Returns ``[B, T]``."""
    return chunked_divergence(
        K.generalized_jsd, student_logits, teacher_logits, mask, _check_jsd_beta(beta), temperature
    )


def total_variation(student_logits, teacher_logits, mask, *, temperature=1.0) -> Tensor:
    """Total variation distance 0.5 sum_v |p - q| per token. Returns ``[B, T]``."""
    return chunked_divergence(
        K.total_variation, student_logits, teacher_logits, mask, None, temperature
    )


def token_cross_entropy(student_logits, labels, mask) -> Tensor:
    """Negative log-likelihood -log q(labels[b, t]) per token (SFT / SeqKD).

    ``student_logits`` ``[B, T, V]``, ``labels`` integer ``[B, T]`` (the token at position t + 1;
    any value where the mask is False). Returns float32 ``[B, T]``.
    """
    return chunked_divergence(K.cross_entropy, student_logits, labels, mask, None, 1.0)


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
