"""Distillation losses: the DistiLLM-2 objective and the baselines as named losses over row kinds.

The token-level divergences and reductions live in :mod:`distillm2.divergences` and are
re-exported here (``losses.skew_forward_kl`` etc.): every divergence takes logits aligned for
next-token prediction ``[B, T, V]`` and a mask ``[B, T]`` and returns float32 ``[B, T]``.

Paper: Ko et al., "DistiLLM-2: A Contrastive Approach Boosts the Distillation of LLMs", ICML 2025
(arXiv 2503.07067); equation numbers below refer to it.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field

import torch
from torch import Tensor

from distillm2 import _kernels as K
from distillm2._chunks import chunked_divergence, grouped_divergence
from distillm2._topk import TopKTeacher, coarse_pair
from distillm2.divergences import (
    _check_jsd_beta,
    _skew_forward_kernel,
    _skew_reverse_kernel,
    forward_kl,
    generalized_jsd,
    reverse_kl,
    sequence_mean,
    skew_forward_kl,
    skew_reverse_kl,
    token_cross_entropy,
    token_mean,
    total_variation,
)
from distillm2.schedules import BETA_SCHEDULES, adaptive_alpha, beta_schedule

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
    "LossSpec",
    "LOSSES",
    "RowInputs",
    "LossParams",
    "TopKTeacher",
    "pair_loss",
    "stacked_pair_loss",
    "curriculum_gaps",
    "adaptive_alpha",
    "beta_schedule",
    "BETA_SCHEDULES",
]

# The DistiLLM-2 objective and the baselines ----------------------------------------------------


@dataclass
class DistiLLM2Output:
    """``loss`` scalar; ``skl`` and ``srkl`` the per-pair terms ``[B]`` (no gradient detached)."""

    loss: Tensor
    skl: Tensor
    srkl: Tensor


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


@dataclass
class RowInputs:
    """One row kind (``chosen`` = teacher responses, ``rejected`` = student responses) of a batch
    of B pairs: the student's logits ``[B, T, V]``, the teacher's logits ``[B, T, V]`` or its
    top-k coarsening (a :class:`TopKTeacher`, ``train.teacher_topk``; None for a loss without a
    teacher), the ``[B, T]`` labels and mask of trained tokens, and alpha (a float or ``[B]``)."""

    student: Tensor
    teacher: Tensor | TopKTeacher | None
    mask: Tensor
    labels: Tensor | None = None
    alpha: Tensor | float = 0.1


@dataclass(frozen=True)
class LossParams:
    """The numbers a loss may read besides its rows."""

    temperature: float = 1.0
    jsd_beta: float = 0.9
    dpo_beta: float = 0.1


# A row divergence: (row, params) -> per-token values [B, T]. One per row kind a loss trains on.
RowDivergence = Callable[[RowInputs, LossParams], Tensor]


@dataclass(frozen=True)
class LossSpec:
    """A named loss as data: per row kind the log name of its per-pair term and its per-token
    divergence; whether it reads the teacher; the weight of each row as a function of beta; and,
    for a loss that couples the two rows of a pair (DPKD, DPO), ``combine`` mapping the per-row
    sequence values and the params to the per-pair loss instead of the weighted sum."""

    terms: dict[str, tuple[str, RowDivergence]]
    needs_teacher: bool
    description: str
    weights: Callable[[float], dict[str, float]] | None = None
    combine: Callable[[dict[str, Tensor], LossParams], Tensor] | None = None
    reference: str = "teacher"  # the model in the teacher's slot: "teacher", or "student" = frozen start of stage

    @property
    def rows(self) -> tuple[str, ...]:
        """The row kinds this loss trains on, chosen first."""
        return tuple(self.terms)

    def row_weights(self, beta: float) -> dict[str, float]:
        """Weight of each row's sequence mean in the per-pair loss (equal weights by default)."""
        if self.weights is not None:
            return self.weights(beta)
        return {which: 1.0 / len(self.terms) for which in self.terms}


def _need(row: RowInputs, what: str):
    value = getattr(row, what)
    if value is None:
        raise ValueError(f"this loss needs the {what} of its rows")
    return value


def _nll(r, p):
    return token_cross_entropy(r.student, _need(r, "labels"), r.mask)


def _pair(r: RowInputs, p: LossParams) -> tuple[Tensor, Tensor, float]:
    """Student and teacher as the divergence sees them, and the temperature to apply: the logits
    themselves, or with a top-k teacher both coarsened to its k + 1 buckets (log-probabilities
    already at the loss's temperature, so 1 is applied)."""
    teacher = _need(r, "teacher")
    if isinstance(teacher, TopKTeacher):
        return *coarse_pair(r.student, teacher, p.temperature), 1.0
    return r.student, teacher, p.temperature


def _plain(kernel_of: Callable[[RowInputs, LossParams], tuple]) -> RowDivergence:
    """A row divergence that is one chunked kernel of the student against the teacher (or its
    top-k coarsening); ``kernel_of(row, params)`` gives the kernel and its per-row parameter.
    Kept on the function, so that :func:`stacked_pair_loss` can run several in one pass."""

    def divergence(r: RowInputs, p: LossParams) -> Tensor:
        s, t, tau = _pair(r, p)
        kernel, param = kernel_of(r, p)
        return chunked_divergence(kernel, s, t, r.mask, param, tau)

    divergence.kernel_of = kernel_of
    return divergence


_kd = _plain(lambda r, p: (K.forward_kl, None))
_rkl = _plain(lambda r, p: (K.reverse_kl, None))
_gkd = _plain(lambda r, p: (K.generalized_jsd, _check_jsd_beta(p.jsd_beta)))
_tvd = _plain(lambda r, p: (K.total_variation, None))
_skl = _plain(lambda r, p: (_skew_forward_kernel(r.alpha), r.alpha))
_srkl = _plain(lambda r, p: (_skew_reverse_kernel(r.alpha), r.alpha))
_srkl_v1 = _plain(lambda r, p: (_skew_reverse_kernel(r.alpha, detach_mixture=False), r.alpha))


def teacher_nll(teacher: Tensor | TopKTeacher, labels: Tensor, mask: Tensor) -> Tensor:
    """-log p(labels) at temperature 1 under the teacher (full logits, or a top-k teacher, which
    keeps the label's log-probability exactly): float32 ``[B, T]``, zero off the mask, no gradient."""
    if isinstance(teacher, TopKTeacher):
        return torch.where(mask.bool(), -teacher.label.float().to(mask.device), 0.0)
    return token_cross_entropy(teacher.detach(), labels, mask)


def _log_ratio(r, p):
    """log q(y_t) - log p(y_t) per token: the student's log-probability of the row's own tokens
    relative to the teacher's (the teacher is the DPO reference, without gradient)."""
    labels = _need(r, "labels")
    with torch.no_grad():
        reference = teacher_nll(_need(r, "teacher"), labels, r.mask)
    return reference - token_cross_entropy(r.student, labels, r.mask)


def _dpo(sequences: dict[str, Tensor], p: LossParams) -> Tensor:
    """-log sigmoid(beta (r_chosen - r_rejected)) on mean-token log-ratios (DPKD)."""
    return -torch.nn.functional.logsigmoid(p.dpo_beta * (sequences["chosen"] - sequences["rejected"]))


def _distillm2_weights(beta: float) -> dict[str, float]:
    return {"chosen": 1.0 - beta, "rejected": beta}


def _summed(beta: float) -> dict[str, float]:
    return {"chosen": 1.0, "rejected": 1.0}


LOSSES: dict[str, LossSpec] = {
    "sft": LossSpec({"chosen": ("nll", _nll)}, False, "cross-entropy on teacher responses"),
    "seqkd": LossSpec({"chosen": ("nll", _nll)}, False, "cross-entropy on teacher responses (SeqKD)"),
    "kd": LossSpec({"chosen": ("chosen", _kd)}, True, "forward KL on teacher responses"),
    "rkl": LossSpec({"rejected": ("rejected", _rkl)}, True, "reverse KL on student responses"),
    "imitkd": LossSpec({"rejected": ("rejected", _kd)}, True, "forward KL on student responses (ImitKD)"),
    "skd": LossSpec({"rejected": ("rejected", _kd)}, True,
                    "forward KL on interleaved student/teacher samples (Speculative KD; generation.mode skd)"),
    "gkd": LossSpec({"chosen": ("chosen", _gkd), "rejected": ("rejected", _gkd)}, True,
                    "generalised JSD (loss.jsd_beta) on both, averaged"),
    "tvd": LossSpec({"chosen": ("chosen", _tvd), "rejected": ("rejected", _tvd)}, True,
                    "total variation on both, averaged"),
    "distillm": LossSpec({"chosen": ("chosen", _srkl), "rejected": ("rejected", _srkl)}, True,
                         "skew reverse KL on both rows, summed (the released distillm_v1 path)", weights=_summed),
    "distillm_v1grad": LossSpec({"chosen": ("chosen", _srkl_v1), "rejected": ("rejected", _srkl_v1)}, True,
                                "skew reverse KL with DistiLLM v1's non-detached gradient on both, averaged"),
    "dpkd": LossSpec({"chosen": ("chosen", _log_ratio), "rejected": ("rejected", _log_ratio)}, True,
                     "DPO with the teacher as reference on mean-token log-probabilities (DPKD)", combine=_dpo),
    "dpo": LossSpec({"chosen": ("chosen", _log_ratio), "rejected": ("rejected", _log_ratio)}, True,
                    "DPO on preference pairs; the reference is the student frozen at the start of the stage",
                    combine=_dpo, reference="student"),
    "distillm2": LossSpec({"chosen": ("skl", _skl), "rejected": ("srkl", _srkl)}, True,
                          "(1-beta) SKL on teacher + beta SRKL on student responses", weights=_distillm2_weights),
}


def topk_unsupported(name: str) -> str | None:
    """Why ``train.teacher_topk`` cannot serve loss ``name`` (None when it can): the cache holds
    the teacher on the chosen rows (its own responses), so the loss must read the teacher there."""
    spec = LOSSES[name]
    if not spec.needs_teacher:
        return f"loss {name} never reads the teacher"
    if spec.reference != "teacher":
        return f"loss {name} compares against the frozen student, not the teacher"
    if "chosen" not in spec.rows:
        return (f"loss {name} reads the teacher only on student responses (rejected rows), which are resampled "
                "every round: there is nothing to cache")
    return None


def _resolve(name: str, params, jsd_beta, temperature) -> tuple[LossSpec, LossParams]:
    if name not in LOSSES:
        raise ValueError(f"unknown loss {name!r}; valid: {', '.join(LOSSES)}")
    params = params or LossParams()
    if jsd_beta is not None or temperature is not None:
        params = LossParams(temperature=params.temperature if temperature is None else temperature,
                            jsd_beta=params.jsd_beta if jsd_beta is None else jsd_beta, dpo_beta=params.dpo_beta)
    return LOSSES[name], params


def _combine(spec: LossSpec, beta: float, values: dict[str, Tensor], masks: dict[str, Tensor],
             params: LossParams) -> LossOutput:
    """Per-row token values ``[B, T]`` -> the per-pair loss, its terms and token sums."""
    weights = spec.row_weights(beta)
    terms, token_sums, sequences = {}, {}, {}
    for which, (term, _) in spec.terms.items():
        mask = masks[which]
        sequences[which] = terms[term] = sequence_mean(values[which], mask)
        token_sums[which] = weights[which] * torch.where(mask.bool(), values[which], 0.0).sum()
    sizes = {tuple(v.shape) for v in sequences.values()}
    if len(sizes) > 1:
        raise ValueError(f"chosen and rejected batches differ in size: {' vs '.join(map(str, sizes))}")
    if spec.combine is not None:
        per_pair = spec.combine(sequences, params)
    else:
        per_pair = sum(weights[which] * seq for which, seq in sequences.items())
    return LossOutput(per_pair.mean(), per_pair, terms, token_sums)


def pair_loss(name: str, rows: dict[str, RowInputs], *, beta: float = 0.5, params: LossParams | None = None,
              jsd_beta: float | None = None, temperature: float | None = None) -> LossOutput:
    """Any loss of :data:`LOSSES` by name, as its table entry says: per pair, the sequence mean
    of each used row's divergence, combined by the row weights (``1 - beta``, ``beta`` for
    distillm2; 1 each for distillm; equal otherwise) or by the spec's ``combine``. ``rows`` must
    hold every row kind of ``LOSSES[name].rows``. Returns a :class:`LossOutput`."""
    spec, params = _resolve(name, params, jsd_beta, temperature)
    values = {}
    for which, (_, divergence) in spec.terms.items():
        row = rows.get(which)
        if row is None or row.student is None or row.mask is None:
            raise ValueError(f"loss {name!r} needs the {which} rows")
        try:
            values[which] = divergence(row, params)
        except ValueError as err:
            if "this loss needs" in str(err):
                what = "labels_chosen" if not spec.needs_teacher else f"student, teacher and mask for the {which} rows"
                raise ValueError(f"loss {name!r} needs {what}") from None
            raise
    return _combine(spec, beta, values, {w: rows[w].mask for w in spec.terms}, params)


def stacked_pair_loss(name: str, student: Tensor, teacher, mask: Tensor, parts: dict[str, slice], *,
                      labels: Tensor | None = None, alphas: dict | None = None, beta: float = 0.5,
                      params: LossParams | None = None) -> LossOutput:
    """:func:`pair_loss` for the row kinds of one micro-batch stacked in one tensor: ``student``
    (and ``teacher``, or None) ``[R, T, V]``, ``mask`` and ``labels`` ``[R, T]``, ``parts`` maps
    each row kind to its slice of the R rows, ``alphas`` each row kind to its alpha.

    Same values and gradients as slicing the rows and calling :func:`pair_loss`, but when every
    term is a plain divergence (all but dpkd/dpo and the top-k teacher) all rows go through one
    chunked pass with one gradient buffer; sliced logits would make autograd allocate and
    zero-fill a ``[R, T, V]`` buffer per row kind in the backward pass.
    """
    spec, params = _resolve(name, params, None, None)
    missing = [w for w in spec.terms if w not in parts]
    if missing:
        raise ValueError(f"loss {name!r} needs the {' and '.join(missing)} rows")
    alphas = alphas or {}

    def teacher_part(w, sl):  # a dict teacher is the top-k cache: one entry per row kind
        return teacher.get(w) if isinstance(teacher, dict) else None if teacher is None else teacher[sl]

    rows = {w: RowInputs(student[sl], teacher_part(w, sl), mask[sl], None if labels is None else labels[sl],
                         alphas.get(w, 0.1)) for w, sl in parts.items()}
    divergences = [div for _, div in spec.terms.values()]
    if all(div is _nll for div in divergences) and labels is not None:
        groups = [(K.cross_entropy, parts[w], None) for w in spec.terms]
        full, tau = labels, 1.0
    elif isinstance(teacher, Tensor) and all(hasattr(div, "kernel_of") for div in divergences):
        groups = []
        for w, (_, div) in spec.terms.items():
            kernel, param = div.kernel_of(rows[w], params)
            groups.append((kernel, parts[w], param))
        full, tau = teacher, params.temperature
    else:
        return pair_loss(name, rows, beta=beta, params=params)
    values = grouped_divergence(student, full, mask, groups, tau)
    return _combine(spec, beta, {w: values[parts[w]] for w in spec.terms}, {w: mask[parts[w]] for w in spec.terms},
                    params)


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
    labels_rejected=None,
    alpha_chosen=0.1,
    alpha_rejected=0.1,
    beta=0.5,
    jsd_beta=0.9,
    dpo_beta=0.1,
    temperature=1.0,
) -> LossOutput:
    """:func:`pair_loss` with the rows given as keywords. Only the rows ``LOSSES[name].rows``
    need to be given; losses without a teacher read ``labels_chosen``, dpkd reads both labels.
    Logits ``[B, T, V]``, masks ``[B, T]``; returns a :class:`LossOutput`."""
    rows = {
        "chosen": RowInputs(student_chosen, teacher_chosen, mask_chosen, labels_chosen, alpha_chosen),
        "rejected": RowInputs(student_rejected, teacher_rejected, mask_rejected, labels_rejected, alpha_rejected),
    }
    return pair_loss(name, rows, beta=beta,
                     params=LossParams(temperature=temperature, jsd_beta=jsd_beta, dpo_beta=dpo_beta))


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
    The same computation as ``distillation_loss("distillm2", ...)``, which it calls.
    """
    out = distillation_loss(
        "distillm2", student_chosen=student_chosen, teacher_chosen=teacher_chosen, mask_chosen=mask_chosen,
        student_rejected=student_rejected, teacher_rejected=teacher_rejected, mask_rejected=mask_rejected,
        alpha_chosen=alpha_chosen, alpha_rejected=alpha_rejected, beta=beta, temperature=temperature,
    )
    return DistiLLM2Output(loss=out.loss, skl=out.terms["skl"], srkl=out.terms["srkl"])


@torch.no_grad()
def curriculum_gaps(student_logits: Tensor, teacher_logits: Tensor | TopKTeacher, labels: Tensor, mask: Tensor,
                    chosen_rows: int) -> tuple[Tensor, Tensor]:
    """The per-pair gaps of DistiLLM-2's curriculum (§3.3) for a batch whose first
    ``chosen_rows`` rows are teacher responses and the rest student responses: with lp / lq the
    mean token log-probability of a row's response under teacher / student, ``exp(lp) - exp(lq)``
    on chosen rows and ``exp(lq) - exp(lp)`` on rejected rows. Logits ``[R, T, V]`` (the teacher's
    may be a :class:`TopKTeacher`: it keeps p(label) exactly), labels and mask ``[R, T]``; returns
    float32 ``[chosen_rows]`` and ``[R - chosen_rows]`` tensors (no gradient)."""
    lq = (-sequence_mean(token_cross_entropy(student_logits.detach(), labels, mask), mask)).exp()
    lp = (-sequence_mean(teacher_nll(teacher_logits, labels, mask), mask)).exp()
    k = chosen_rows
    return lp[:k] - lq[:k], lq[k:] - lp[k:]
