"""The training loop's fused path (``train.fused_loss``): the DistiLLM-2 objective computed from
the last hidden states and the output layers of both models (:mod:`distillm2.fused`), so that
neither model's ``[tokens, vocab]`` logits exist in full. It pays off at large vocabularies
(docs/results.md: 5.4x less peak memory at the paper's 151,936 tokens in float32, at equal
time); at the demo's 49,152 the logits are small and the plain path is as good.

The curriculum's gaps come from per-token log-probabilities computed the same way (no
gradient). Single process only: a DDP-wrapped model must be called through its wrapper for its
gradients to be synchronised, and this path calls the decoder inside it.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor

from distillm2.data import Batch
from distillm2.fused import HiddenRows, fused_cross_entropy, fused_distillm2_loss


@dataclass
class HiddenBatch:
    """A micro-batch's trained rows as hidden states: per row kind the student's (with grad) and
    the teacher's rows ``[N, H]``, the pair of each row, and its label."""

    student: dict[str, Tensor]
    teacher: dict[str, Tensor]
    sequence: dict[str, Tensor]
    labels: dict[str, Tensor]


def _decoder(model):
    inner = getattr(model, "module", model)  # an accelerate/engine wrapper
    return inner.get_decoder()


def output_layer(model, vocab: int) -> tuple[Tensor, Tensor | None]:
    """The output layer's weight ``[vocab, H]`` (sliced to the tokenizer) and bias."""
    head = getattr(model, "module", model).get_output_embeddings()
    bias = head.bias[:vocab] if getattr(head, "bias", None) is not None else None
    return head.weight[:vocab], bias


def response_hidden(model, batch: Batch) -> Tensor:
    """The last hidden states ``[R, L, H]`` at the positions that predict response tokens."""
    out = _decoder(model)(input_ids=batch.input_ids, attention_mask=batch.attention_mask,
                          position_ids=batch.position_ids, use_cache=False)
    return out.last_hidden_state[:, batch.keep]


def hidden_batch(student_hidden: Tensor, teacher_hidden: Tensor, batch: Batch, rows: tuple[str, ...],
                 pairs: int) -> HiddenBatch:
    """Split ``[R, L, H]`` hidden states into the masked rows of each row kind."""
    out = HiddenBatch({}, {}, {}, {})
    for i, which in enumerate(rows):
        part = slice(i * pairs, (i + 1) * pairs)
        mask = batch.mask[part]
        b, t = mask.nonzero(as_tuple=True)
        out.student[which] = student_hidden[part][b, t]
        out.teacher[which] = teacher_hidden[part][b, t]
        out.sequence[which] = b
        out.labels[which] = batch.labels[part][b, t]
    return out


def fused_loss(hb: HiddenBatch, student, teacher, vocab: int, *, pairs: int, alphas: dict, beta: float,
               temperature: float):
    """DistiLLM-2's (1 - beta) SKL + beta SRKL for one micro-batch; returns the
    :class:`~distillm2.losses.DistiLLM2Output` (``loss`` = mean over the ``pairs``)."""
    w_s, b_s = output_layer(student, vocab)
    w_t, b_t = output_layer(teacher, vocab)
    chosen = HiddenRows(hb.student["chosen"], hb.teacher["chosen"], hb.sequence["chosen"], alphas["chosen"])
    rejected = HiddenRows(hb.student["rejected"], hb.teacher["rejected"], hb.sequence["rejected"], alphas["rejected"])
    return fused_distillm2_loss(chosen, rejected, w_s, w_t.detach(), num_pairs=pairs, beta=beta,
                                temperature=temperature, student_bias=b_s,
                                teacher_bias=None if b_t is None else b_t.detach())


@torch.no_grad()
def fused_gaps(hb: HiddenBatch, student, teacher, vocab: int, pairs: int) -> tuple[Tensor, Tensor]:
    """The curriculum's per-pair gaps (as :func:`distillm2.losses.curriculum_gaps`) from hidden
    states: exp(mean log p) - exp(mean log q) on chosen rows, reversed on rejected rows."""
    w_s, b_s = output_layer(student, vocab)
    w_t, b_t = output_layer(teacher, vocab)
    gaps = {}
    for which in ("chosen", "rejected"):
        seq = hb.sequence[which]
        counts = torch.zeros(pairs, device=seq.device).index_add_(0, seq, torch.ones_like(seq, dtype=torch.float32))

        def mean_logprob(hidden, weight, bias, seq=seq, counts=counts, which=which):
            nll = fused_cross_entropy(hidden.detach(), weight.detach(), hb.labels[which],
                                      student_bias=None if bias is None else bias.detach())
            total = torch.zeros(pairs, device=nll.device).index_add_(0, seq, nll)
            return (-total / counts.clamp_min(1)).exp()

        lq = mean_logprob(hb.student[which], w_s, b_s)
        lp = mean_logprob(hb.teacher[which], w_t, b_t)
        gaps[which] = lp - lq if which == "chosen" else lq - lp
    return gaps["chosen"], gaps["rejected"]
