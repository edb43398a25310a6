"""The teacher's distribution kept as its top k log-probabilities plus the tail (``train.teacher_topk``).

A teacher row is stored as, per response position: the k largest log-probabilities of
``softmax(teacher / tau)`` and their token indices, the log of the remaining mass (the *tail*),
and the teacher's log-probability of the label token at temperature 1 (what the curriculum and
DPKD read). The vocabulary is thereby coarsened into k + 1 buckets: the k tokens, and one bucket
for everything else. The student is coarsened the same way (its log-probabilities at the same k
indices and the log of its own remaining mass), and since log-probabilities are valid logits over
k + 1 classes, every divergence of :mod:`distillm2.losses` applies unchanged to the ``[..., k+1]``
tensors at temperature 1.

Any f-divergence (KL, reverse KL, the skew KLs, JSD, total variation) of the coarsened pair is a
lower bound of the exact one (data-processing inequality: merging outcomes never separates two
distributions more), with equality when k = V (then there is no tail bucket). The coarsening of
the student is differentiable (:func:`coarsen_student`, chunked, its backward recomputes the
softmax instead of keeping a float32 ``[B, T, V]`` tensor).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor
from torch.autograd.function import once_differentiable

_ROW_CHUNK_ELEMENTS = 2**22  # float32 elements per chunk of rows (16 MiB temporaries)


def _chunks(rows: int, vocab: int):
    step = max(1, _ROW_CHUNK_ELEMENTS // max(1, vocab))
    for start in range(0, rows, step):
        yield slice(start, min(rows, start + step))


@dataclass
class TopKTeacher:
    """The teacher on B rows of T response positions, coarsened to its top k tokens.

    ``logprobs`` ``[B, T, k]`` (log p of the top-k tokens at ``temperature``, any float dtype),
    ``indices`` ``[B, T, k]`` (their token ids, distinct per position), ``tail`` ``[B, T]`` (log of
    the rest's mass; ignored when k = ``vocab``), ``label`` ``[B, T]`` (log p of the label token
    at temperature 1), ``vocab`` the full vocabulary width, ``temperature`` the tau of ``logprobs``.
    """

    logprobs: Tensor
    indices: Tensor
    tail: Tensor
    label: Tensor
    vocab: int
    temperature: float = 1.0

    @property
    def k(self) -> int:
        return self.indices.shape[-1]

    @property
    def full(self) -> bool:
        """Whether the k tokens are the whole vocabulary (no tail bucket: the exact distribution)."""
        return self.k >= self.vocab

    def coarse(self) -> Tensor:
        """The teacher's log-probabilities over the k + 1 buckets (k when full), float32."""
        top = self.logprobs.float()
        if self.full:
            return top
        return torch.cat([top, self.tail.float()[..., None]], -1)

    def __getitem__(self, rows) -> TopKTeacher:
        return TopKTeacher(self.logprobs[rows], self.indices[rows], self.tail[rows], self.label[rows],
                           self.vocab, self.temperature)

    def to(self, device) -> TopKTeacher:
        return TopKTeacher(self.logprobs.to(device), self.indices.to(device), self.tail.to(device),
                           self.label.to(device), self.vocab, self.temperature)


@torch.no_grad()
def topk_of_logits(logits: Tensor, labels: Tensor, k: int, temperature: float = 1.0) -> TopKTeacher:
    """The :class:`TopKTeacher` of teacher ``logits`` ``[B, T, V]`` with ``labels`` ``[B, T]``:
    top-k log-probabilities at ``temperature`` (float32), their indices (int64), the tail's log
    mass computed as a log-sum-exp of the other logits (exact, no ``1 - sum`` cancellation), and
    the label's log-probability at temperature 1. Chunked over rows; ``k`` is capped at V."""
    batch, length, vocab = logits.shape
    k = min(int(k), vocab)
    flat, flat_labels = logits.reshape(-1, vocab), labels.reshape(-1)
    n = flat.shape[0]
    device = logits.device
    logprobs = torch.empty((n, k), dtype=torch.float32, device=device)
    indices = torch.empty((n, k), dtype=torch.long, device=device)
    tail = torch.full((n,), float("-inf"), dtype=torch.float32, device=device)
    label = torch.empty((n,), dtype=torch.float32, device=device)
    for rows in _chunks(n, vocab):
        raw = flat[rows].to(torch.float32, copy=True)
        label[rows] = torch.log_softmax(raw, -1).gather(-1, flat_labels[rows, None].long())[:, 0]
        s = raw.div_(temperature) if temperature != 1.0 else raw
        lse = torch.logsumexp(s, -1, keepdim=True)
        top = torch.topk(s, k, -1)
        logprobs[rows] = top.values - lse
        indices[rows] = top.indices
        if k < vocab:
            tail[rows] = (torch.logsumexp(s.scatter_(-1, top.indices, float("-inf")), -1, keepdim=True) - lse)[:, 0]
    return TopKTeacher(logprobs.view(batch, length, k), indices.view(batch, length, k), tail.view(batch, length),
                       label.view(batch, length), vocab, float(temperature))


def _coarse_chunk(s: Tensor, idx: Tensor, full: bool) -> Tensor:
    lse = torch.logsumexp(s, -1, keepdim=True)
    top = s.gather(-1, idx) - lse
    if full:
        return top
    rest = torch.logsumexp(s.scatter(-1, idx, float("-inf")), -1, keepdim=True) - lse
    return torch.cat([top, rest], -1)


class _Coarsen(torch.autograd.Function):
    """log q at the k indices (+ the log of the rest) from student logits, chunk by chunk; the
    backward recomputes the softmax: d/ds_v = sum_j g_j ([v = i_j] - q_v) + g_tail (r_v - q_v),
    r = the softmax over the tokens outside the k."""

    @staticmethod
    def forward(ctx, student, idx, inv_temp, full):
        vocab = student.shape[-1]
        flat, flat_idx = student.reshape(-1, vocab), idx.reshape(-1, idx.shape[-1])
        width = flat_idx.shape[-1] + (0 if full else 1)
        out = torch.empty((flat.shape[0], width), dtype=torch.float32, device=student.device)
        for rows in _chunks(flat.shape[0], vocab):
            out[rows] = _coarse_chunk(flat[rows].to(torch.float32, copy=True).mul_(inv_temp), flat_idx[rows], full)
        ctx.save_for_backward(student, idx)
        ctx.inv_temp, ctx.full = inv_temp, full
        return out.view(*student.shape[:-1], width)

    @staticmethod
    @once_differentiable
    def backward(ctx, grad_out):
        student, idx = ctx.saved_tensors
        vocab, k = student.shape[-1], idx.shape[-1]
        flat, flat_idx = student.reshape(-1, vocab), idx.reshape(-1, k)
        g = grad_out.reshape(flat.shape[0], -1).float()
        grad = torch.empty_like(flat, memory_format=torch.contiguous_format)
        for rows in _chunks(flat.shape[0], vocab):
            s = flat[rows].to(torch.float32, copy=True).mul_(ctx.inv_temp)
            gr = g[rows]
            out = torch.softmax(s, -1).mul_(-gr.sum(-1, keepdim=True))
            out.scatter_add_(-1, flat_idx[rows], gr[:, :k])
            if not ctx.full:
                out.add_(torch.softmax(s.scatter_(-1, flat_idx[rows], float("-inf")), -1).mul_(gr[:, k:]))
            grad[rows] = out.mul_(ctx.inv_temp).to(grad.dtype)
        return grad.view_as(student), None, None, None


def coarsen_student(student: Tensor, teacher: TopKTeacher, temperature: float = 1.0) -> Tensor:
    """The student's log-probabilities at ``softmax(student / temperature)`` over the teacher's
    k + 1 buckets (k when ``teacher.full``): ``[B, T, V] -> [B, T, k(+1)]`` float32,
    differentiable with respect to ``student``."""
    if teacher.indices.shape[:-1] != student.shape[:-1]:
        raise ValueError(f"top-k teacher of shape {tuple(teacher.indices.shape)} does not match the student logits "
                         f"{tuple(student.shape)}")
    if teacher.vocab != student.shape[-1]:
        raise ValueError(f"top-k teacher over {teacher.vocab} tokens, student logits over {student.shape[-1]}")
    idx = teacher.indices.to(student.device, torch.long)
    return _Coarsen.apply(student, idx, 1.0 / float(temperature), teacher.full)


def coarse_pair(student: Tensor, teacher: TopKTeacher, temperature: float) -> tuple[Tensor, Tensor]:
    """Student and teacher over the k + 1 buckets, as log-probabilities (use them at temperature 1)."""
    if abs(teacher.temperature - float(temperature)) > 1e-12:
        raise ValueError(f"the top-k teacher was computed at temperature {teacher.temperature}, the loss uses "
                         f"{temperature}")
    return coarsen_student(student, teacher, temperature), teacher.coarse().to(student.device)


def label_logprob(teacher: Tensor | TopKTeacher, labels: Tensor) -> Tensor:
    """The teacher's log-probability of ``labels`` at temperature 1, ``[B, T]`` float32 (from
    full logits or from a :class:`TopKTeacher`, where it is stored exactly)."""
    if isinstance(teacher, TopKTeacher):
        return teacher.label.float()
    return torch.log_softmax(teacher.float(), -1).gather(-1, labels[..., None].long())[..., 0]
