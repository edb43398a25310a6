"""Divergences computed from the last hidden states, without ever holding the ``[N, V]`` logits.

The losses of :mod:`distillm2.losses` take logits. Even chunked, that path holds the student's and
the teacher's ``[N, V]`` logits and the gradient buffer of the student's (three ``[N, V]``
tensors: 7.5 GB in float32 for 4,096 rows of a 151,936-token vocabulary). Here the loss takes the
hidden states that feed the output layer and the output layer's weight (and bias) of both models,
and for each chunk of rows computes the logits ``h @ W.T``, the divergence and its analytic
gradient with the existing kernels (:mod:`distillm2._kernels`), and the gradients with respect
to the student's hidden states and weight. Only ``[chunk, V]`` temporaries exist, plus
``grad_hidden [N, Hs]`` and ``grad_weight [V, Hs]`` (the Liger-Kernel idea, for our losses).

One pass, not two. The loss is a function of per-row values, so the gradient each row receives
(``grad_out[i]``) is only known in the backward pass. ``grad_hidden`` scales row by row, so it is
formed in the forward pass for a unit row gradient and scaled later; ``grad_weight`` is a sum over
rows and does not. So the caller states, with ``weights`` ``[N]``, how the values will be combined
(default: all ones, i.e. any multiple of ``values.sum()``, which covers a token mean), and the
forward pass accumulates ``grad_weight`` for those row weights. If the backward pass then
receives a ``grad_out`` proportional to ``weights`` (checked to float32 rounding) the buffer is
scaled by one number; otherwise the chunk logits are recomputed with the true ``grad_out`` in a
second pass: always correct, 1.5-1.9x the time (measured at the paper's sizes, 512 rows). So a caller that takes
sequence means passes ``weights = 1 / count[sequence]`` (see :func:`sequence_mean_weights`) and
reduces with ``(values * weights).sum()``, as :func:`fused_distillm2_loss` does.

Numerics. Every chunk's divergence runs in float32 on logits computed as the model's output layer
would compute them: ``h @ W.T`` in the inputs' dtype (bfloat16 logits are rounded to bfloat16, as
a bfloat16 ``lm_head`` rounds them), then cast to float32. The gradient reaching ``h @ W.T`` is
cast to that dtype, as autograd through a bfloat16 ``lm_head`` casts it. ``grad_weight`` is
accumulated over chunks in the weight's dtype (float32 inside each chunk's product, one rounding
per chunk) or, with ``grad_weight_dtype=torch.float32``, in float32 and cast once at the end: at
the paper's sizes the float32 accumulator alone is 891 MiB, more than everything else the fused
path holds (benchmarks/fused.py measures both, and their errors).
"""

from __future__ import annotations

import os
from dataclasses import dataclass

import torch
from torch import Tensor
from torch.autograd.function import once_differentiable

from distillm2 import _kernels as K
from distillm2._chunks import _chunk_rows as _kernel_rows
from distillm2.divergences import _check_alpha, _skew_forward_kernel, _skew_reverse_kernel
from distillm2.losses import DistiLLM2Output

__all__ = [
    "fused_divergence",
    "fused_forward_kl",
    "fused_reverse_kl",
    "fused_skew_forward_kl",
    "fused_skew_reverse_kl",
    "fused_cross_entropy",
    "sequence_mean_weights",
    "HiddenRows",
    "fused_distillm2_loss",
]

# Elements of one float32 [rows, V] chunk buffer. The matmuls need many rows per chunk to reuse
# each weight row they read from memory (at 6 rows, the losses' cache-sized chunk, h @ W.T is
# memory-bound and several times slower). 3 * 2**24 elements: 331 rows at V = 151,936, 192 MiB
# per float32 buffer, 96 MiB per bfloat16 one; on this CPU 441 rows took 0.8x the CPU time of 220
# at the paper's sizes. The kernels run on cache-sized sub-chunks.
# DISTILLM2_FUSED_CHUNK_ELEMENTS overrides both (benchmarks/fused.py measures the effect).
CHUNK_ELEMENTS = int(os.environ.get("DISTILLM2_FUSED_CHUNK_ELEMENTS", 3 * 2**24))
CUDA_CHUNK_ELEMENTS = int(os.environ.get("DISTILLM2_FUSED_CHUNK_ELEMENTS", 2**26))
# Vocabulary rows per block of a float32 grad_weight accumulated from half-precision chunks (see
# _GradWeight); 2**13 rows x 1,536 is 48 MiB in float32.
_VOCAB_BLOCK = 2**13


def _default_chunk_rows(device: torch.device, vocab: int) -> int:
    elements = CHUNK_ELEMENTS if device.type == "cpu" else CUDA_CHUNK_ELEMENTS
    return max(1, elements // vocab)


class _GradWeight:
    """Accumulates grad_weight ``[V, H]`` over row chunks, in ``dtype``.

    float32 (always for a float32 weight): a float32 weight gets one buffer and ``addmm_``; a
    half-precision weight keeps float32 blocks of vocabulary rows, each chunk's product formed in
    the weight's dtype block by block and added in float32, and :meth:`result` casts block by
    block, freeing each float32 block as it goes.
    The weight's own half-precision dtype (the default for a half-precision weight): one buffer
    in that dtype and ``addmm_`` (float32 inside each product, one rounding per chunk). Half the
    memory of the float32 accumulator, which at the paper's sizes is most of what the fused
    path holds; its error is of the order of the rounding the unfused half-precision path
    already applies to the logits' gradient (measured in benchmarks/fused.py).
    """

    def __init__(self, weight: Tensor, dtype: torch.dtype):
        self.dtype, self.shape = weight.dtype, weight.shape
        self.single = weight.dtype == torch.float32 or dtype == weight.dtype
        if self.single:
            self.blocks = [torch.zeros(weight.shape, dtype=weight.dtype, device=weight.device)]
            self.step = weight.shape[0]
        else:
            self.step = _VOCAB_BLOCK
            self.tmp = torch.empty((min(self.step, weight.shape[0]), weight.shape[1]), dtype=weight.dtype, device=weight.device)
            self.blocks = [
                torch.zeros((min(self.step, weight.shape[0] - v), weight.shape[1]),
                            dtype=torch.float32, device=weight.device)
                for v in range(0, weight.shape[0], self.step)
            ]

    def add(self, grad_logits: Tensor, hidden: Tensor) -> None:
        """``+= grad_logits.T @ hidden`` for a chunk: ``[C, V]`` and ``[C, H]`` in the weight's dtype."""
        if self.single:
            self.blocks[0].addmm_(grad_logits.t(), hidden)
            return
        for i, block in enumerate(self.blocks):
            part = grad_logits[:, i * self.step : i * self.step + block.shape[0]]
            block.add_(torch.mm(part.t(), hidden, out=self.tmp[: block.shape[0]]))

    def result(self, scale: float) -> Tensor:
        """The accumulated gradient times ``scale``, in the weight's dtype; frees the blocks."""
        if self.single:
            out = self.blocks.pop()
            return out.mul_(scale) if scale != 1.0 else out
        out = torch.empty(self.shape, dtype=self.dtype, device=self.blocks[0].device)
        for i in range(len(self.blocks)):
            block, self.blocks[i] = self.blocks[i], None
            out[i * self.step : i * self.step + block.shape[0]].copy_(block.mul_(scale))
            del block
        return out


def _logits_into(buf: Tensor, hidden: Tensor, weight: Tensor, bias) -> Tensor:
    """``hidden @ weight.T + bias`` into ``buf`` ``[C, V]``, in the inputs' dtype (bfloat16 logits
    are rounded to bfloat16, as the model's output layer rounds them)."""
    torch.mm(hidden, weight.t(), out=buf)
    if bias is not None:
        buf.add_(bias)
    return buf


class _Fused(torch.autograd.Function):
    @staticmethod
    def forward(ctx, h_s, w_s, b_s, target, w_t, b_t, row_param, weights, kernel, inv_temp, rows, accumulate):
        ctx.setup = (target, w_t, b_t, row_param, kernel, inv_temp, rows, accumulate)
        need = (h_s.requires_grad, w_s.requires_grad, b_s is not None and b_s.requires_grad)
        values, grads = _run(h_s, w_s, b_s, *ctx.setup, need=need, row_scale=weights)
        ctx.grads, ctx.weights = grads, weights
        ctx.save_for_backward(h_s, w_s, b_s)
        return values

    @staticmethod
    @once_differentiable
    def backward(ctx, grad_out):
        if ctx.grads is None:
            raise RuntimeError("fused_divergence supports one backward pass per forward pass")
        grad_h, grad_w, grad_b = ctx.grads
        ctx.grads = None  # the buffers are scaled in place and handed to autograd
        h_s, w_s, b_s = ctx.saved_tensors
        go = grad_out.float()
        scale = _proportional(go, ctx.weights)
        if scale is None and (grad_w is not None or grad_b is not None):
            # grad_out is not a multiple of the row weights: grad_weight (a sum over rows) must
            # be formed again with the true row gradients. The second pass recomputes the chunk
            # logits; grad_hidden (row-wise) is still the forward pass's.
            need = (False, grad_w is not None, grad_b is not None)
            del grad_w, grad_b
            _, (_, grad_w, grad_b) = _run(h_s, w_s, b_s, *ctx.setup, need=need, row_scale=go)
            scale = 1.0
        if grad_h is not None:
            grad_h = grad_h.mul_(go[:, None]).to(h_s.dtype)
        if grad_w is not None:
            grad_w = grad_w.result(scale)
        if grad_b is not None:
            grad_b = grad_b.mul_(scale).to(b_s.dtype)
        return grad_h, grad_w, grad_b, None, None, None, None, None, None, None, None, None


def _proportional(grad_out: Tensor, weights: Tensor) -> float | None:
    """c with grad_out = c * weights to float32 rounding, else None."""
    if not weights.numel():
        return 0.0
    k = int(weights.abs().argmax())
    if float(weights[k]) == 0.0:
        return 0.0 if not bool(grad_out.any()) else None
    c = float(grad_out[k]) / float(weights[k])
    # 4 eps of the largest row gradient: what `(values * weights).sum() * s` leaves after
    # rounding; the grad_weight error this admits is below its own float32 accumulation error.
    tol = 4 * torch.finfo(torch.float32).eps * float(grad_out.abs().max())
    return c if float((grad_out - c * weights).abs().max()) <= tol else None


def _run(h_s, w_s, b_s, target, w_t, b_t, row_param, kernel, inv_temp, rows, accumulate, *, need, row_scale):
    """Values ``[N]`` and, per ``need`` (hidden, weight, bias), the gradients: grad_hidden
    ``[N, Hs]`` float32 for unit row gradients, a :class:`_GradWeight` (in ``accumulate``) and
    grad_bias float32 ``[V]`` for row gradients ``row_scale``."""
    n, vocab = h_s.shape[0], w_s.shape[0]
    dev = h_s.device
    is_labels = w_t is None
    values = torch.empty(n, dtype=torch.float32, device=dev)
    grad_h = torch.empty(h_s.shape, dtype=torch.float32, device=dev) if need[0] else None
    grad_w = _GradWeight(w_s, accumulate) if need[1] else None
    grad_b = torch.zeros(vocab, dtype=torch.float32, device=dev) if need[2] else None
    any_grad = any(need)
    step = min(rows, n) if n else 1
    # Two chunk buffers reused for every chunk, in the models' dtypes (the logits as the output
    # layers round them): s (the gradient is written over it, in the student's dtype, as autograd
    # casts the gradient reaching a half-precision lm_head) and t. The kernels read float32
    # copies of cache-sized sub-chunks, so no float32 [C, V] buffer exists for half precision.
    s_buf = torch.empty((step, vocab), dtype=w_s.dtype, device=dev)
    t_buf = None if is_labels else torch.empty((step, vocab), dtype=w_t.dtype, device=dev)
    sub = _kernel_rows(dev, vocab)  # kernel temporaries stay cache-sized, as in _chunks
    for start in range(0, n, step):
        stop = min(start + step, n)
        s = _logits_into(s_buf[: stop - start], h_s[start:stop], w_s, b_s)
        if is_labels:
            t = target[start:stop]
        else:
            t = _logits_into(t_buf[: stop - start], target[start:stop], w_t, b_t)
        for i in range(0, stop - start, sub):
            j = min(i + sub, stop - start)
            a = None if row_param is None else row_param[start + i : start + j, None]
            s_sub = s[i:j].float()  # a copy for half precision; for float32 the buffer itself
            t_sub = t[i:j] if is_labels else t[i:j].float()
            if inv_temp != 1.0:
                s_sub = s_sub.mul_(inv_temp)
                if not is_labels:
                    t_sub = t_sub.mul(inv_temp)
            value, g = kernel(s_sub, t_sub, a, any_grad)
            values[start + i : start + j] = value
            if not any_grad:
                continue
            if inv_temp != 1.0:
                g.mul_(inv_temp)  # d/dz = (1 / tau) d/ds with s = z / tau
            if grad_b is not None:
                grad_b.addmv_(g.t(), row_scale[start + i : start + j])
            s[i:j] = g  # the chunk's logits are no longer needed: reuse their buffer
        if not any_grad:
            continue
        g = s
        if grad_h is not None:
            grad_h[start:stop] = torch.mm(g, w_s)
        scale = row_scale[start:stop, None]
        if grad_w is not None:
            # sum_i scale_i g_i^T h_i: scale the [C, H] hidden states, not the [C, V] gradient
            grad_w.add(g, (h_s[start:stop] * scale).to(w_s.dtype))
        del g
    return values, (grad_h, grad_w, grad_b)


def _per_row(param, n: int, device, name: str) -> Tensor | None:
    if param is None:
        return None
    if isinstance(param, Tensor):
        if param.dim() == 0:
            return param.detach().float().to(device).expand(n).contiguous()
        if param.shape != (n,):
            raise ValueError(f"{name} must be a float or a [N] = [{n}] tensor, got {tuple(param.shape)}")
        return param.detach().float().to(device).contiguous()
    return torch.full((n,), float(param), dtype=torch.float32, device=device)


def _check_inputs(h_s, w_s, b_s, target, w_t, b_t):
    if h_s.dim() != 2 or w_s.dim() != 2 or h_s.shape[1] != w_s.shape[1]:
        raise ValueError(f"student_hidden [N, H] and student_weight [V, H] must agree, got "
                         f"{tuple(h_s.shape)} and {tuple(w_s.shape)}")
    if not h_s.is_floating_point() or h_s.dtype != w_s.dtype:
        raise ValueError(f"student_hidden and student_weight must share a float dtype, got "
                         f"{h_s.dtype} and {w_s.dtype}")
    n, vocab = h_s.shape[0], w_s.shape[0]
    if b_s is not None and b_s.shape != (vocab,):
        raise ValueError(f"student_bias must be [V] = [{vocab}], got {tuple(b_s.shape)}")
    if w_t is None:
        if target.shape != (n,) or target.is_floating_point():
            raise ValueError(f"labels must be an integer [N] = [{n}] tensor, got {target.dtype} "
                             f"of shape {tuple(target.shape)}")
        if n and (int(target.min()) < 0 or int(target.max()) >= vocab):
            raise ValueError(f"labels must lie in [0, {vocab}), got values in "
                             f"[{int(target.min())}, {int(target.max())}]")
        return
    if target.dim() != 2 or target.shape[0] != n or w_t.shape != (vocab, target.shape[1]):
        raise ValueError(f"teacher_hidden must be [N = {n}, Ht] and teacher_weight [V = {vocab}, Ht], "
                         f"got {tuple(target.shape)} and {tuple(w_t.shape)}")
    if target.dtype != w_t.dtype:
        raise ValueError(f"teacher_hidden and teacher_weight must share a dtype, got {target.dtype} "
                         f"and {w_t.dtype}")
    if b_t is not None and b_t.shape != (vocab,):
        raise ValueError(f"teacher_bias must be [V] = [{vocab}], got {tuple(b_t.shape)}")


def fused_divergence(kernel, student_hidden: Tensor, student_weight: Tensor, teacher, teacher_weight,
                     param, temperature: float = 1.0, *, student_bias=None, teacher_bias=None,
                     weights=None, chunk_rows=None, grad_weight_dtype=None) -> Tensor:
    """Per-row values ``[N]`` (float32) of a :mod:`distillm2._kernels` kernel, from hidden states.

    ``student_hidden`` ``[N, Hs]`` and ``student_weight`` ``[V, Hs]`` (one float dtype) give the
    student logits ``student_hidden @ student_weight.T (+ student_bias)``; ``teacher`` is the
    teacher's ``[N, Ht]`` hidden states with ``teacher_weight`` ``[V, Ht]``, or integer labels
    ``[N]`` with ``teacher_weight=None``. Rows are the trained (masked) positions, already
    flattened. ``param`` is a float, a per-row ``[N]`` tensor or None (the kernel's ``a``).
    Differentiable with respect to the student's hidden states, weight and bias; the teacher gets
    no gradient. ``weights`` ``[N]``: the row weights the caller will sum the values with (default
    ones); a backward pass with another ``grad_out`` is still exact but recomputes the logits
    (see the module docstring). ``chunk_rows`` overrides the rows per chunk.
    ``grad_weight_dtype``: the dtype grad_weight is accumulated in over the chunks: the weight's
    (the default; for a half-precision weight half the memory) or ``torch.float32``.
    """
    _check_inputs(student_hidden, student_weight, student_bias, teacher, teacher_weight, teacher_bias)
    if temperature <= 0:
        raise ValueError(f"temperature must be > 0, got {temperature}")
    n, dev = student_hidden.shape[0], student_hidden.device
    rows = int(chunk_rows) if chunk_rows else _default_chunk_rows(dev, student_weight.shape[0])
    if rows < 1:
        raise ValueError(f"chunk_rows must be >= 1, got {chunk_rows}")
    w = torch.ones(n, dtype=torch.float32, device=dev) if weights is None else _per_row(weights, n, dev, "weights")
    teacher = teacher.detach()
    teacher_weight = None if teacher_weight is None else teacher_weight.detach()
    teacher_bias = None if teacher_bias is None else teacher_bias.detach()
    args = (student_hidden, student_weight, student_bias, teacher, teacher_weight, teacher_bias,
            _per_row(param, n, dev, "param"))
    inv_temp = 1.0 / float(temperature)
    trainable = [x for x in (student_hidden, student_weight, student_bias) if x is not None]
    if torch.is_grad_enabled() and any(x.requires_grad for x in trainable):
        accumulate = student_weight.dtype if grad_weight_dtype is None else grad_weight_dtype
        if accumulate not in (student_weight.dtype, torch.float32):
            raise ValueError(f"grad_weight_dtype must be the weight's dtype ({student_weight.dtype}) or "
                             f"torch.float32, got {accumulate}")
        return _Fused.apply(*args, w, kernel, inv_temp, rows, accumulate)
    with torch.no_grad():
        values, _ = _run(*args, kernel, inv_temp, rows, None, need=(False, False, False), row_scale=w)
    return values


def fused_forward_kl(student_hidden, student_weight, teacher_hidden, teacher_weight, *,
                     temperature=1.0, **kw) -> Tensor:
    """KL(p || q) per row from hidden states, as :func:`distillm2.losses.forward_kl`. ``[N]``.

    Keywords: ``student_bias``, ``teacher_bias``, ``weights``, ``chunk_rows`` (see
    :func:`fused_divergence`)."""
    return fused_divergence(K.forward_kl, student_hidden, student_weight, teacher_hidden,
                            teacher_weight, None, temperature, **kw)


def fused_reverse_kl(student_hidden, student_weight, teacher_hidden, teacher_weight, *,
                     temperature=1.0, **kw) -> Tensor:
    """KL(q || p) per row from hidden states, as :func:`distillm2.losses.reverse_kl`. ``[N]``."""
    return fused_divergence(K.reverse_kl, student_hidden, student_weight, teacher_hidden,
                            teacher_weight, None, temperature, **kw)


def fused_skew_forward_kl(student_hidden, student_weight, teacher_hidden, teacher_weight, *,
                          alpha=0.1, temperature=1.0, **kw) -> Tensor:
    """Skew KL, KL(p || alpha p + (1 - alpha) q), per row from hidden states. ``[N]``.

    As :func:`distillm2.losses.skew_forward_kl`, except that ``alpha`` is a float or a per-row
    ``[N]`` tensor (rows are already flattened; a per-sequence alpha is ``alpha[sequence]``)."""
    return fused_divergence(_skew_forward_kernel(alpha), student_hidden, student_weight, teacher_hidden,
                            teacher_weight, alpha, temperature, **kw)


def fused_skew_reverse_kl(student_hidden, student_weight, teacher_hidden, teacher_weight, *,
                          alpha=0.1, detach_mixture=True, temperature=1.0, **kw) -> Tensor:
    """Skew reverse KL, KL(q || (1 - alpha) p + alpha q'), per row from hidden states. ``[N]``.

    As :func:`distillm2.losses.skew_reverse_kl` (``detach_mixture`` True: DistiLLM-2, q' under
    stop-gradient), with a float or per-row ``[N]`` ``alpha``."""
    kernel = _skew_reverse_kernel(alpha, detach_mixture)
    return fused_divergence(kernel, student_hidden, student_weight, teacher_hidden, teacher_weight,
                            alpha, temperature, **kw)


def fused_cross_entropy(student_hidden, student_weight, labels, *, student_bias=None, weights=None,
                        chunk_rows=None) -> Tensor:
    """-log q(labels[i]) per row from hidden states, as :func:`distillm2.losses.token_cross_entropy`.

    ``labels`` integer ``[N]``, the token each row predicts. Returns float32 ``[N]``."""
    return fused_divergence(K.cross_entropy, student_hidden, student_weight, labels, None, None, 1.0,
                            student_bias=student_bias, weights=weights, chunk_rows=chunk_rows)


def sequence_mean_weights(sequence: Tensor, num_sequences: int, scale=1.0) -> Tensor:
    """Row weights ``scale / count[sequence[i]]`` ``[N]`` float32, so that
    ``(values * weights).sum()`` is ``scale`` times the sum over sequences of their row means (a
    sequence without rows counts 0, as :func:`distillm2.losses.sequence_mean` gives)."""
    counts = torch.bincount(sequence, minlength=num_sequences).clamp_min(1).float()
    return (scale / counts)[sequence]


@dataclass
class HiddenRows:
    """One row kind of a batch of pairs, flattened to its trained rows: the student's and the
    teacher's last hidden states ``[N, Hs]``, ``[N, Ht]`` (the positions predicting trained
    tokens), the pair each row belongs to ``sequence`` ``[N]`` (long, in [0, B)), and alpha (a
    float or a per-pair ``[B]`` tensor, as in :mod:`distillm2.losses`)."""

    student: Tensor
    teacher: Tensor
    sequence: Tensor
    alpha: Tensor | float = 0.1


def fused_distillm2_loss(chosen: HiddenRows, rejected: HiddenRows, student_weight: Tensor,
                         teacher_weight: Tensor, *, num_pairs: int, beta=0.5, temperature=1.0,
                         student_bias=None, teacher_bias=None, chunk_rows=None) -> DistiLLM2Output:
    """:func:`distillm2.losses.distillm2_loss` from hidden states: (1 - beta) SKL on the chosen
    rows plus beta SRKL on the rejected rows, each a per-pair mean over its rows, averaged over
    ``num_pairs`` pairs. One pass over each row kind (the row weights are passed ahead).

    ``skl`` and ``srkl`` ``[B]`` are for logging: a backward pass through them is exact but takes
    the recomputing path.
    """
    terms = {}
    loss = None
    for key, rows, fn, w in (("skl", chosen, fused_skew_forward_kl, 1.0 - beta),
                             ("srkl", rejected, fused_skew_reverse_kl, beta)):
        _check_alpha(rows.alpha)
        alpha = rows.alpha
        if isinstance(alpha, Tensor) and alpha.dim() == 1:
            alpha = alpha.to(rows.sequence.device)[rows.sequence]  # per pair -> per row
        means = sequence_mean_weights(rows.sequence, num_pairs)
        weights = means * (w / num_pairs)
        values = fn(rows.student, student_weight, rows.teacher, teacher_weight, alpha=alpha,
                    temperature=temperature, student_bias=student_bias, teacher_bias=teacher_bias,
                    weights=weights, chunk_rows=chunk_rows)
        part = (values * weights).sum()
        loss = part if loss is None else loss + part
        terms[key] = torch.zeros(num_pairs, dtype=torch.float32, device=values.device).index_add_(
            0, rows.sequence, values * means)
    return DistiLLM2Output(loss=loss, skl=terms["skl"], srkl=terms["srkl"])
