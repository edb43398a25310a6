"""The chunked engine behind :mod:`distillm2.losses`.

A per-token divergence over logits ``[B, T, V]`` is computed only on the masked rows, in chunks of
rows, in float32. For each chunk a *kernel* returns the per-row value and (when the student needs
a gradient) the analytic gradient with respect to the scaled student logits; the gradient is
written into one buffer shaped like the student logits, in their dtype. The backward pass only
scales that buffer by the incoming per-token gradient, in place. So the extra memory is
O(chunk x V) for the float32 temporaries plus the gradient buffer that autograd would need anyway,
instead of several float32 ``[B, T, V]`` tensors kept alive between forward and backward.
"""

from __future__ import annotations

import os
from collections.abc import Callable

import torch
from torch import Tensor
from torch.autograd.function import once_differentiable

# Elements per float32 chunk (rows x V). On a CPU, 2**20 floats = 4 MiB per temporary: the
# handful of temporaries a kernel keeps alive stays in the L3 cache, which is what makes the
# chunked pass faster than the naive one, not only leaner (2**16 to 2**20 measured within noise of
# each other here). On a GPU, kernel launches dominate small chunks (3.5-4.7x slower than naive at
# 2**20 on an H200), so chunks are 16x larger there: 64 MiB per temporary.
# DISTILLM2_CHUNK_ELEMENTS overrides both (benchmarks/losses.py measures the effect).
CHUNK_ELEMENTS = int(os.environ.get("DISTILLM2_CHUNK_ELEMENTS", 2**20))
CUDA_CHUNK_ELEMENTS = int(os.environ.get("DISTILLM2_CHUNK_ELEMENTS", 2**24))


def _chunk_rows(device: torch.device, vocab: int) -> int:
    elements = CHUNK_ELEMENTS if device.type == "cpu" else CUDA_CHUNK_ELEMENTS
    return max(1, elements // vocab)

Kernel = Callable[[Tensor, Tensor, "Tensor | None", bool], "tuple[Tensor, Tensor | None]"]


def _validate(student: Tensor, teacher: Tensor, mask: Tensor, labels: bool) -> Tensor:
    if student.dim() != 3:
        raise ValueError(f"student_logits must be [B, T, V], got shape {tuple(student.shape)}")
    if not student.is_floating_point():
        raise ValueError(f"student_logits must be a float tensor, got {student.dtype}")
    if labels:
        if teacher.shape != student.shape[:2] or teacher.is_floating_point():
            raise ValueError(
                f"labels must be an integer [B, T] tensor matching student_logits "
                f"{tuple(student.shape)}, got {teacher.dtype} of shape {tuple(teacher.shape)}"
            )
    elif teacher.shape != student.shape:
        raise ValueError(
            f"student_logits and teacher_logits must have the same shape, got "
            f"{tuple(student.shape)} and {tuple(teacher.shape)}"
        )
    if mask.shape != student.shape[:2]:
        raise ValueError(
            f"mask must be [B, T] = {tuple(student.shape[:2])} to match logits "
            f"{tuple(student.shape)}, got {tuple(mask.shape)}"
        )
    return mask.bool()


def per_sequence(param, batch: int, device) -> Tensor | None:
    """A float or a ``[B]`` tensor as a float32 ``[B]`` tensor (None stays None)."""
    if param is None:
        return None
    if isinstance(param, Tensor):
        if param.dim() == 0:
            return param.detach().float().to(device).expand(batch)
        if param.shape != (batch,):
            raise ValueError(f"a per-sequence parameter must be [B] = [{batch}], got {tuple(param.shape)}")
        return param.detach().float().to(device)
    return torch.full((batch,), float(param), device=device)


def _run(groups, student, teacher, covered, inv_temp, is_labels, need_grad):
    """Apply each group's kernel to its selected rows chunk by chunk. ``groups``: (kernel, rows_b,
    rows_t, row_param) with the positions it owns and a float32 ``[B]`` parameter or None;
    ``covered`` ``[B, T]`` is the union of their positions. Returns values ``[B, T]`` float32 and
    the gradient w.r.t. ``student`` (its shape and dtype) or None."""
    batch, length, vocab = student.shape
    out = torch.zeros((batch, length), dtype=torch.float32, device=student.device)
    grad = None
    if need_grad:
        # Uninitialised, and zeros only where no kernel writes (padding): zero-filling the whole
        # [B, T, V] buffer first was a full extra pass over it (and its fresh pages) every step.
        grad = torch.empty_like(student, memory_format=torch.contiguous_format)
        free_b, free_t = (~covered).nonzero(as_tuple=True)
        if free_b.numel():
            grad[free_b, free_t] = 0
    step = _chunk_rows(student.device, vocab)
    for kernel, rows_b, rows_t, row_param in groups:
        if is_labels and rows_b.numel():
            picked = teacher[rows_b, rows_t]
            if int(picked.min()) < 0 or int(picked.max()) >= vocab:
                raise ValueError(
                    f"labels at masked positions must lie in [0, {vocab}), got values in "
                    f"[{int(picked.min())}, {int(picked.max())}]"
                )
        for start in range(0, rows_b.numel(), step):
            bi, ti = rows_b[start : start + step], rows_t[start : start + step]
            # Advanced indexing copies, so the in-place scaling never touches the caller's tensors.
            s = student[bi, ti].float()
            if inv_temp != 1.0:
                s.mul_(inv_temp)
            t = teacher[bi, ti]
            if not is_labels:
                t = t.float()
                if inv_temp != 1.0:
                    t.mul_(inv_temp)
            a = None if row_param is None else row_param[bi][:, None]
            value, g = kernel(s, t, a, need_grad)
            out[bi, ti] = value
            if need_grad:
                if inv_temp != 1.0:
                    g.mul_(inv_temp)  # d/dz = (1 / tau) d/ds with s = z / tau
                grad[bi, ti] = g.to(grad.dtype)
    return out, grad


class _ChunkedDivergence(torch.autograd.Function):
    @staticmethod
    def forward(ctx, student, teacher, covered, groups, inv_temp, is_labels):
        out, grad = _run(groups, student, teacher, covered, inv_temp, is_labels, True)
        ctx.save_for_backward(grad)
        return out

    @staticmethod
    @once_differentiable
    def backward(ctx, grad_out):
        (grad,) = ctx.saved_tensors
        # Scale the precomputed gradient in place: it is needed nowhere else, and a copy would
        # double the memory. A second backward through the same graph (retain_graph=True) is
        # refused by autograd's saved-tensor version check instead of silently giving wrong values.
        # Row chunks: a bf16 buffer times a float32 grad_out makes a float32 temporary as large
        # as the operand, so the operand is kept chunk-sized (and grad_out is not rounded).
        flat, scale = grad.view(-1, grad.shape[-1]), grad_out.reshape(-1, 1)
        step = _chunk_rows(grad.device, grad.shape[-1])
        for start in range(0, flat.shape[0], step):
            flat[start : start + step].mul_(scale[start : start + step])
        return grad, None, None, None, None, None


def grouped_divergence(
    student: Tensor, teacher: Tensor, mask: Tensor, groups: list[tuple[Kernel, slice, object]], temperature: float
) -> Tensor:
    """Per-token values ``[B, T]`` (float32, zero off the mask) with a kernel per group of rows.

    ``groups``: (kernel, rows, param), ``rows`` a slice of the batch dimension (disjoint), ``param``
    a float, a tensor over those rows or None; positions outside every group get value and
    gradient 0. One pass writes one gradient buffer for the whole batch, so the row kinds of a
    micro-batch (DistiLLM-2's chosen and rejected rows, one student forward) need no slicing of
    the logits, whose backward would allocate and zero a ``[B, T, V]`` buffer per row kind.
    ``teacher`` is logits ``[B, T, V]`` or integer labels ``[B, T]`` (then for every group).
    Differentiable with respect to ``student`` only.
    """
    is_labels = not teacher.is_floating_point()
    mask = _validate(student, teacher, mask, is_labels)
    if temperature <= 0:
        raise ValueError(f"temperature must be > 0, got {temperature}")
    batch = student.shape[0]
    covered = torch.zeros_like(mask)
    prepared, taken = [], []
    for kernel, rows, param in groups:
        start, stop, _ = rows.indices(batch)
        if any(max(start, lo) < min(stop, hi) for lo, hi in taken):
            raise ValueError(f"row groups overlap: rows {start}:{stop} and {taken}")
        taken.append((start, stop))
        covered[start:stop] = mask[start:stop]
        rows_b, rows_t = mask[start:stop].nonzero(as_tuple=True)
        row_param = per_sequence(param, stop - start, student.device)
        if row_param is not None:  # indexed by the batch row
            row_param = torch.cat([row_param.new_zeros(start), row_param, row_param.new_zeros(batch - stop)])
        prepared.append((kernel, rows_b + start, rows_t, row_param))
    teacher = teacher.detach()
    inv_temp = 1.0 / float(temperature)
    if student.requires_grad and torch.is_grad_enabled():
        return _ChunkedDivergence.apply(student, teacher, covered, prepared, inv_temp, is_labels)
    out, _ = _run(prepared, student, teacher, covered, inv_temp, is_labels, False)
    return out


def chunked_divergence(
    kernel: Kernel, student: Tensor, teacher: Tensor, mask: Tensor, param, temperature: float
) -> Tensor:
    """Per-token values ``[B, T]`` (float32, zero off the mask) of ``kernel`` over the masked rows.

    ``teacher`` is logits ``[B, T, V]`` or integer labels ``[B, T]``; ``param`` a float, a ``[B]``
    tensor or None. Differentiable with respect to ``student`` only.
    """
    return grouped_divergence(student, teacher, mask, [(kernel, slice(None), param)], temperature)
