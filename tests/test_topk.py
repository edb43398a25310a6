"""train.teacher_topk: the teacher on chosen rows as top-k log-probabilities + tail, cached once.

The maths (k = V is the exact loss, a lower bound below it, the error shrinks with k), the
cache (built once, reused by a later stage without a teacher forward on chosen rows, resumed
after a kill, rebuilt under another key) and the config checks."""


import pytest
import torch

from distillm2 import _topk
from distillm2.losses import LOSSES, RowInputs, curriculum_gaps, pair_loss, topk_unsupported

TOPK_LOSSES = [name for name in LOSSES if topk_unsupported(name) is None]


def _logits(b, t, v, scale, seed, dtype=torch.float64):
    g = torch.Generator().manual_seed(seed)
    # Zipf-like base preferences plus noise: peaked like an LM's next-token distribution.
    base = -1.1 * torch.log(torch.arange(1, v + 1, dtype=torch.float64))[torch.randperm(v, generator=g)]
    return (base + scale * torch.randn((b, t, v), generator=g, dtype=torch.float64)).to(dtype)


def _rows(student, teacher, labels, mask, k, tau=1.0):
    """chosen = the top-k teacher (or the exact one for k None), rejected = exact, both losses."""
    chosen_teacher = teacher if k is None else _topk.topk_of_logits(teacher, labels, k, tau)
    alpha = torch.tensor([0.1, 0.3])
    return {"chosen": RowInputs(student, chosen_teacher, mask, labels, alpha),
            "rejected": RowInputs(student, teacher, mask, labels, alpha)}


@pytest.mark.parametrize("name", TOPK_LOSSES)
@pytest.mark.parametrize("tau", [1.0, 2.0])
def test_k_equal_to_vocab_is_the_exact_loss_and_gradient(name, tau):
    b, t, v = 2, 5, 23
    teacher = _logits(b, t, v, 2.0, 0)
    labels = torch.randint(0, v, (b, t), generator=torch.Generator().manual_seed(1))
    mask = torch.ones((b, t), dtype=torch.bool)
    mask[1, 3:] = False
    results = []
    for k in (None, v):
        student = _logits(b, t, v, 1.0, 2).requires_grad_(True)
        out = pair_loss(name, _rows(student, teacher, labels, mask, k, tau), beta=0.3,
                        temperature=tau)
        out.loss.backward()
        results.append((out.loss.detach(), student.grad.clone()))
    (exact, g_exact), (coarse, g_coarse) = results
    torch.testing.assert_close(coarse, exact, rtol=1e-5, atol=1e-7)
    torch.testing.assert_close(g_coarse, g_exact, rtol=1e-4, atol=1e-7)


def test_coarsened_student_gradient_matches_float64_autograd():
    b, t, v, k = 2, 3, 17, 4
    teacher = _logits(b, t, v, 2.0, 3)
    top = _topk.topk_of_logits(teacher, torch.zeros((b, t), dtype=torch.long), k, 1.5)
    student = _logits(b, t, v, 1.0, 4).requires_grad_(True)
    upstream = torch.randn((b, t, k + 1), dtype=torch.float64)
    (_topk.coarsen_student(student, top, 1.5).double() * upstream).sum().backward()
    ours = student.grad.clone()
    student.grad = None
    logq = torch.log_softmax(student / 1.5, -1)
    picked = logq.gather(-1, top.indices)
    rest = torch.logsumexp(logq.scatter(-1, top.indices, float("-inf")), -1, keepdim=True)
    (torch.cat([picked, rest], -1) * upstream).sum().backward()
    torch.testing.assert_close(ours, student.grad, rtol=1e-5, atol=1e-6)
    # the teacher's buckets are a distribution: top-k mass + tail = 1
    mass = top.logprobs.exp().sum(-1) + top.tail.exp()
    torch.testing.assert_close(mass.float(), torch.ones_like(mass).float(), rtol=1e-5, atol=1e-6)


def test_error_shrinks_with_k_and_is_a_lower_bound():
    b, t, v = 2, 16, 512
    teacher = _logits(b, t, v, 3.0, 5, torch.float32)
    labels = teacher.argmax(-1)
    mask = torch.ones((b, t), dtype=torch.bool)
    student = _logits(b, t, v, 2.0, 6, torch.float32).requires_grad_(True)
    exact = pair_loss("distillm2", _rows(student, teacher, labels, mask, None))
    exact.loss.backward()
    g_exact = student.grad.clone()
    errors, cosines = [], []
    for k in (1, 4, 16, 64, 256):
        student.grad = None
        out = pair_loss("distillm2", _rows(student, teacher, labels, mask, k))
        out.loss.backward()
        assert float(out.terms["skl"].detach().sum()) <= float(exact.terms["skl"].detach().sum()) + 1e-5  # a lower bound
        errors.append(abs(out.loss.item() - exact.loss.item()) / exact.loss.item())
        cosines.append(float(torch.nn.functional.cosine_similarity(student.grad.flatten(), g_exact.flatten(), 0)))
    assert all(a >= b - 1e-6 for a, b in zip(errors, errors[1:])), errors
    assert errors[-1] < 0.02 and cosines[-1] > 0.99, (errors, cosines)


def test_curriculum_gaps_read_the_exact_label_logprob():
    b, t, v = 4, 6, 31
    teacher, student = _logits(b, t, v, 2.0, 7), _logits(b, t, v, 1.0, 8)
    labels = torch.randint(0, v, (b, t), generator=torch.Generator().manual_seed(9))
    mask = torch.rand((b, t), generator=torch.Generator().manual_seed(10)) > 0.3
    exact = curriculum_gaps(student, teacher, labels, mask, 4)[0]
    top = curriculum_gaps(student, _topk.topk_of_logits(teacher, labels, 2), labels, mask, 4)[0]
    torch.testing.assert_close(top, exact, rtol=1e-5, atol=1e-6)


def test_mismatched_temperature_is_refused():
    teacher = _logits(1, 2, 9, 1.0, 0)
    labels = torch.zeros((1, 2), dtype=torch.long)
    rows = _rows(teacher.clone().requires_grad_(True), teacher, labels, torch.ones((1, 2), dtype=torch.bool), 3, 1.0)
    with pytest.raises(ValueError, match="temperature"):
        pair_loss("kd", rows, temperature=2.0)


def test_inputs_are_left_untouched_in_float32():
    teacher, student = _logits(2, 3, 11, 2.0, 11, torch.float32), _logits(2, 3, 11, 1.0, 12, torch.float32)
    t0, s0 = teacher.clone(), student.clone()
    top = _topk.topk_of_logits(teacher, teacher.argmax(-1), 3, 2.0)
    student.requires_grad_(True)
    _topk.coarsen_student(student, top, 2.0).sum().backward()
    assert torch.equal(teacher, t0) and torch.equal(student.detach(), s0)
