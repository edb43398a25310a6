"""Every loss against a float64 reference written here, values and gradients, plus limiting cases."""

import math

import pytest
import torch

from distillm2 import _chunks
from distillm2 import losses as L

INF = float("inf")


# float64 references: the textbook formulas, written independently of the kernels -------------


def _ref_logs(s, t, tau):
    return torch.log_softmax(s / tau, -1), torch.log_softmax(t / tau, -1)


def _plogratio(log_x, log_y):
    """sum x (log x - log y), 0 where x = 0."""
    x = log_x.exp()
    return torch.where(x > 0, x * (log_x - log_y), torch.zeros_like(x)).sum(-1)


def _alpha_col(alpha, b):
    if isinstance(alpha, torch.Tensor):
        return alpha.double().view(b, 1, 1)
    return torch.tensor(float(alpha), dtype=torch.float64)


def ref(name, s, t, mask, tau=1.0, alpha=0.1, beta=0.5, detach=True):
    log_q, log_p = _ref_logs(s, t, tau)
    q, p = log_q.exp(), log_p.exp()
    a = _alpha_col(alpha, s.shape[0])
    if name == "forward_kl":
        v = _plogratio(log_p, log_q)
    elif name == "reverse_kl":
        v = _plogratio(log_q, log_p)
    elif name == "skew_forward_kl":
        m = a * p + (1 - a) * q
        v = _plogratio(log_p, m.log())
    elif name == "skew_reverse_kl":
        q_in = q.detach() if detach else q
        m = (1 - a) * p + a * q_in
        v = _plogratio(log_q, m.log())
    elif name == "generalized_jsd":
        m = beta * p + (1 - beta) * q
        v = beta * _plogratio(log_p, m.log()) + (1 - beta) * _plogratio(log_q, m.log())
    elif name == "total_variation":
        v = 0.5 * (p - q).abs().sum(-1)
    else:
        raise KeyError(name)
    return torch.where(mask, v, torch.zeros_like(v))


def call(name, s, t, mask, tau=1.0, alpha=0.1, beta=0.5, detach=True):
    fn = getattr(L, name)
    kw = {"temperature": tau}
    if name in ("skew_forward_kl", "skew_reverse_kl"):
        kw["alpha"] = alpha
    if name == "skew_reverse_kl":
        kw["detach_mixture"] = detach
    if name == "generalized_jsd":
        kw["beta"] = beta
    return fn(s, t, mask, **kw)


def make(shape, scale=3.0, dtype=torch.float32, seed=0, ninf_frac=0.0, mask_frac=0.7):
    g = torch.Generator().manual_seed(seed)
    b, t, v = shape
    s = (torch.randn(shape, generator=g, dtype=torch.float64) * scale).to(dtype)
    te = (torch.randn(shape, generator=g, dtype=torch.float64) * scale).to(dtype)
    if ninf_frac:
        drop = torch.rand(shape, generator=g) < ninf_frac
        drop[..., 0] = False  # keep at least one finite teacher entry per row
        te = te.masked_fill(drop, -INF)
    mask = torch.rand((b, t), generator=g) < mask_frac
    mask[0, 0] = True
    w = torch.randn((b, t), generator=g, dtype=torch.float64)
    return s, te, mask, w


def _naive_float32(name, s, t, mask, w, tau, alpha, beta, detach):
    """The same textbook formula evaluated in float32: the yardstick for "float32 rounding"."""
    x = s.float().requires_grad_(True)
    a = alpha.float() if isinstance(alpha, torch.Tensor) else alpha
    v = ref(name, x, t.float(), mask, tau, a, beta, detach)
    (v.double() * w).sum().backward()
    return v.detach().double(), x.grad.double()


def check(name, shape, dtype=torch.float32, scale=3.0, tau=1.0, alpha=0.1, beta=0.5,
          detach=True, ninf_frac=0.0, seed=0, rtol=2e-5, atol=2e-6):
    """Our values and gradients against float64. Tolerance: ``rtol``/``atol`` relative to the
    largest reference value, or 4x the error of the naive formula computed in float32 where the
    inputs make float32 itself that inexact (logits of magnitude 50+)."""
    s, t, mask, w = make(shape, scale, dtype, seed, ninf_frac)
    s_ours = s.clone().requires_grad_(True)
    out = call(name, s_ours, t, mask, tau, alpha, beta, detach)
    assert out.dtype == torch.float32 and out.shape == shape[:2]
    (out.double() * w).sum().backward()
    assert s_ours.grad.dtype == dtype

    s64 = s.double().requires_grad_(True)
    expected = ref(name, s64, t.double(), mask, tau, alpha, beta, detach)
    (expected * w).sum().backward()
    naive_v, naive_g = _naive_float32(name, s, t, mask, w, tau, alpha, beta, detach)

    expected = expected.detach()
    naive_err_v = (naive_v - expected).abs().nan_to_num(nan=0.0).max().item()
    tol_v = max(atol * max(1.0, expected.abs().max().item()), 4 * naive_err_v)
    torch.testing.assert_close(out.double(), expected, rtol=rtol, atol=tol_v)
    g = s_ours.grad.double()
    assert torch.isfinite(g).all()
    scale_g = max(1e-3, s64.grad.abs().max().item())
    if dtype == torch.float32:
        # A gradient entry is q (h - sum q h) with h of the size of the per-token value: when
        # that difference is small, float32 itself leaves eps * |h| of absolute error.
        eps = torch.finfo(torch.float32).eps
        natural = 16 * eps * max(1.0, expected.abs().max().item()) * w.abs().max().item()
        naive_err_g = (naive_g - s64.grad).abs().nan_to_num(nan=0.0).max().item()
        tol_g = max(atol * scale_g, natural, 4 * naive_err_g)
        torch.testing.assert_close(g, s64.grad, rtol=rtol, atol=tol_g)
    else:  # the gradient comes back in the input's dtype: compare to that dtype's rounding
        eps = torch.finfo(dtype).eps
        torch.testing.assert_close(g, s64.grad, rtol=2 * eps, atol=2 * eps * scale_g)
    return out, s_ours.grad


DIVS = ["forward_kl", "reverse_kl", "skew_forward_kl", "skew_reverse_kl", "generalized_jsd",
        "total_variation"]
SHAPES = [(1, 1, 5), (2, 7, 11), (3, 5, 300)]


@pytest.mark.parametrize("name", DIVS)
@pytest.mark.parametrize("shape", SHAPES)
def test_matches_float64_reference(name, shape):
    check(name, shape)


@pytest.mark.parametrize("name", DIVS)
def test_large_logits_and_temperature(name):
    check(name, (2, 6, 64), scale=60.0, tau=1.0, seed=1)
    check(name, (2, 6, 64), scale=60.0, tau=2.5, seed=2)
    check(name, (2, 6, 64), scale=3.0, tau=0.7, seed=3)


@pytest.mark.parametrize("name", ["forward_kl", "skew_forward_kl", "skew_reverse_kl",
                                  "generalized_jsd", "total_variation"])
def test_teacher_minus_inf_entries_stay_finite(name):
    out, grad = check(name, (2, 8, 40), ninf_frac=0.3, seed=4)
    assert torch.isfinite(out).all() and torch.isfinite(grad).all()
    check(name, (2, 8, 40), ninf_frac=0.3, seed=5, scale=50.0, tau=1.7)


def test_reverse_kl_with_zero_teacher_probability_is_infinite():
    s, t, mask, _ = make((1, 3, 6))
    t[0, 0, 2] = -INF
    mask[:] = True
    out = L.reverse_kl(s, t, mask)
    assert out[0, 0] == INF and torch.isfinite(out[0, 1:]).all()


@pytest.mark.parametrize("detach", [True, False])
def test_per_sequence_alpha(detach):
    alpha = torch.tensor([0.0, 0.05, 0.3])
    check("skew_forward_kl", (3, 4, 17), alpha=alpha, seed=6)
    check("skew_reverse_kl", (3, 4, 17), alpha=alpha, detach=detach, seed=7)


@pytest.mark.parametrize("name", DIVS)
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_half_precision_inputs_computed_in_float32(name, dtype):
    # The reference sees the same rounded inputs, so values agree to float32 rounding; the
    # gradient is returned in the input dtype, so it agrees to that dtype's rounding.
    s, t, mask, w = make((2, 5, 50), dtype=dtype, seed=8)
    out = call(name, s, t, mask)
    expected = ref(name, s.double(), t.double(), mask)
    torch.testing.assert_close(out.double(), expected, rtol=2e-5, atol=2e-6)
    check(name, (2, 5, 50), dtype=dtype, seed=8)


def test_multi_chunk_equals_single_chunk(monkeypatch):
    s, t, mask, w = make((3, 9, 23), seed=9)
    results = []
    for elems in (23 * 2, 2**20):
        monkeypatch.setattr(_chunks, "CHUNK_ELEMENTS", elems)
        x = s.clone().requires_grad_(True)
        out = L.skew_forward_kl(x, t, mask, alpha=torch.tensor([0.1, 0.0, 0.05]))
        (out * w.float()).sum().backward()
        results.append((out, x.grad))
    torch.testing.assert_close(results[0][0], results[1][0], rtol=1e-6, atol=1e-9)
    torch.testing.assert_close(results[0][1], results[1][1], rtol=1e-6, atol=1e-9)


# limiting cases ---------------------------------------------------------------------------------


def test_alpha_zero_gives_plain_kl():
    s, t, mask, _ = make((2, 6, 30), seed=10)
    for skew, plain in ((L.skew_forward_kl, L.forward_kl), (L.skew_reverse_kl, L.reverse_kl)):
        a = s.clone().requires_grad_(True)
        b = s.clone().requires_grad_(True)
        skew(a, t, mask, alpha=0.0).sum().backward()
        plain(b, t, mask).sum().backward()
        torch.testing.assert_close(a.grad, b.grad, rtol=1e-5, atol=1e-7)
        torch.testing.assert_close(skew(s, t, mask, alpha=0.0), plain(s, t, mask))


@pytest.mark.parametrize("name", DIVS)
def test_identical_distributions_give_zero(name):
    s, _, mask, _ = make((2, 4, 25), seed=11)
    x = s.clone().requires_grad_(True)
    out = call(name, x, s.clone(), mask)
    out.sum().backward()
    assert out.abs().max() < 1e-5
    assert x.grad.abs().max() < 1e-5


@pytest.mark.parametrize("name", DIVS)
def test_masked_positions_contribute_nothing(name):
    s, t, mask, _ = make((2, 6, 19), seed=12)
    s2, t2 = s.clone(), t.clone()
    s2[~mask] = float("nan")  # garbage off the mask must not leak anywhere
    t2[~mask] = float("nan")
    x = s2.clone().requires_grad_(True)
    out = call(name, x, t2, mask)
    out.sum().backward()
    assert (out[~mask] == 0).all()
    assert (x.grad[~mask] == 0).all()
    torch.testing.assert_close(out, call(name, s, t, mask))


def test_v1_and_v2_skew_reverse_differ_only_in_gradient():
    s, t, mask, w = make((2, 6, 21), seed=13)
    a, b = s.clone().requires_grad_(True), s.clone().requires_grad_(True)
    v2 = L.skew_reverse_kl(a, t, mask, alpha=0.3, detach_mixture=True)
    v1 = L.skew_reverse_kl(b, t, mask, alpha=0.3, detach_mixture=False)
    # v2 runs the linear-space kernel, v1 the log-space one: equal to float32 rounding
    torch.testing.assert_close(v1, v2, rtol=1e-6, atol=0)
    (v2 * w.float()).sum().backward()
    (v1 * w.float()).sum().backward()
    assert (a.grad - b.grad).abs().max() > 1e-4
    check("skew_reverse_kl", (2, 6, 21), alpha=0.3, detach=False, seed=13)


def test_no_masked_token_gives_zero_not_nan():
    s, t, mask, _ = make((2, 4, 9), seed=14)
    mask[:] = False
    mask[1, 2] = True
    x = s.clone().requires_grad_(True)
    values = L.skew_forward_kl(x, t, mask)
    seq = L.sequence_mean(values, mask)
    assert seq[0] == 0 and torch.isfinite(seq).all()
    seq.sum().backward()
    assert torch.isfinite(x.grad).all() and (x.grad[0] == 0).all()
    empty = torch.zeros_like(mask)
    assert L.token_mean(L.forward_kl(s, t, empty), empty) == 0
    out = L.distillm2_loss(s, t, empty, s, t, empty)
    assert out.loss == 0 and torch.isfinite(out.skl).all()


def test_shape_mismatch_names_both_shapes():
    s = torch.zeros(2, 3, 5)
    with pytest.raises(ValueError, match=r"\(2, 3, 5\).*\(2, 3, 6\)"):
        L.forward_kl(s, torch.zeros(2, 3, 6), torch.ones(2, 3, dtype=torch.bool))
    with pytest.raises(ValueError, match=r"\(2, 3\).*\(2, 4\)"):
        L.forward_kl(s, s, torch.ones(2, 4, dtype=torch.bool))
    with pytest.raises(ValueError, match=r"\[2\].*\(3,\)"):
        L.skew_forward_kl(s, s, torch.ones(2, 3, dtype=torch.bool), alpha=torch.zeros(3))
    with pytest.raises(ValueError, match="alpha"):
        L.skew_forward_kl(s, s, torch.ones(2, 3, dtype=torch.bool), alpha=1.0)


def test_teacher_gets_no_gradient():
    s, t, mask, _ = make((1, 3, 7))
    t.requires_grad_(True)
    x = s.clone().requires_grad_(True)
    L.forward_kl(x, t, mask).sum().backward()
    assert t.grad is None and x.grad is not None


def test_no_grad_path_equals_grad_path():
    s, t, mask, _ = make((2, 5, 13), seed=15)
    with torch.no_grad():
        a = L.generalized_jsd(s.clone().requires_grad_(True), t, mask, beta=0.9)
    b = L.generalized_jsd(s.clone().requires_grad_(True), t, mask, beta=0.9)
    torch.testing.assert_close(a, b.detach(), rtol=0, atol=0)


def test_cross_entropy_matches_reference():
    s, _, mask, w = make((2, 5, 13), seed=16)
    labels = torch.randint(0, 13, (2, 5))
    x = s.clone().requires_grad_(True)
    out = L.token_cross_entropy(x, labels, mask)
    (out * w.float()).sum().backward()
    s64 = s.double().requires_grad_(True)
    expected = -torch.log_softmax(s64, -1).gather(-1, labels[..., None])[..., 0]
    expected = torch.where(mask, expected, 0.0)
    (expected * w).sum().backward()
    torch.testing.assert_close(out.double(), expected.detach(), rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(x.grad.double(), s64.grad, rtol=1e-5, atol=1e-6)
    with pytest.raises(ValueError, match="labels"):
        L.token_cross_entropy(s, torch.full((2, 5), 13), mask)


# memory: what autograd keeps between forward and backward -----------------------------------------


def saved_bytes(fn):
    total = []

    def pack(x):
        total.append(x.numel() * x.element_size())
        return x

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda x: x):
        out = fn()
    return sum(total), out


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_graph_keeps_only_the_gradient_buffer(dtype):
    s, t, mask, _ = make((2, 16, 512), dtype=dtype, seed=17)
    x = s.clone().requires_grad_(True)
    nbytes, out = saved_bytes(lambda: L.distillm2_loss(x, t, mask, x, t, mask).loss)
    # two gradient buffers (chosen and rejected rows), each exactly the student logits' size
    # (plus a few [B, T] masks and per-token values kept by the reductions)
    grad_buffers = 2 * x.numel() * x.element_size()
    assert grad_buffers <= nbytes <= grad_buffers + 8 * mask.numel() * 4
    naive_bytes, _ = saved_bytes(lambda: ref("skew_forward_kl", x.float(), t.float(), mask).sum())
    assert naive_bytes >= 4 * x.numel() * 4


# reductions, objective, schedules ----------------------------------------------------------------


def test_sequence_and_token_mean_by_hand():
    values = torch.tensor([[1.0, 2.0, 3.0], [4.0, 5.0, 6.0]])
    mask = torch.tensor([[True, False, True], [False, False, False]])
    torch.testing.assert_close(L.sequence_mean(values, mask), torch.tensor([2.0, 0.0]))
    torch.testing.assert_close(L.token_mean(values, mask), torch.tensor(2.0))
    torch.testing.assert_close(L.token_mean(values, mask, num_tokens=8), torch.tensor(0.5))


def test_token_mean_gradient_accumulation_equals_one_batch():
    s, t, mask, _ = make((8, 6, 33), seed=18, mask_frac=0.5)
    full = s.clone().requires_grad_(True)
    L.token_mean(L.forward_kl(full, t, mask), mask).backward()
    acc = s.clone().requires_grad_(True)
    n = int(mask.sum())
    for i in range(0, 8, 2):  # 4 micro-batches of 2
        L.token_mean(L.forward_kl(acc[i : i + 2], t[i : i + 2], mask[i : i + 2]),
                     mask[i : i + 2], num_tokens=n).backward()
    torch.testing.assert_close(acc.grad, full.grad, rtol=1e-5, atol=1e-8)


def test_distillm2_loss_matches_reference():
    sc, tc, mc, _ = make((3, 6, 29), seed=19)
    sr, tr, mr, _ = make((3, 8, 29), seed=20)
    ac, ar, beta, tau = torch.tensor([0.1, 0.05, 0.02]), torch.tensor([0.1, 0.01, 0.08]), 0.7, 1.3
    xc, xr = sc.clone().requires_grad_(True), sr.clone().requires_grad_(True)
    out = L.distillm2_loss(xc, tc, mc, xr, tr, mr, alpha_chosen=ac, alpha_rejected=ar,
                           beta=beta, temperature=tau)
    out.loss.backward()
    c64, r64 = sc.double().requires_grad_(True), sr.double().requires_grad_(True)
    skl = ref("skew_forward_kl", c64, tc.double(), mc, tau, alpha=ac).sum(-1) / mc.sum(-1)
    srkl = ref("skew_reverse_kl", r64, tr.double(), mr, tau, alpha=ar).sum(-1) / mr.sum(-1)
    loss = ((1 - beta) * skl + beta * srkl).mean()
    loss.backward()
    torch.testing.assert_close(out.skl.double(), skl.detach(), rtol=1e-5, atol=1e-7)
    torch.testing.assert_close(out.srkl.double(), srkl.detach(), rtol=1e-5, atol=1e-7)
    torch.testing.assert_close(out.loss.double(), loss.detach(), rtol=1e-5, atol=1e-7)
    torch.testing.assert_close(xc.grad.double(), c64.grad, rtol=1e-4, atol=1e-8)
    torch.testing.assert_close(xr.grad.double(), r64.grad, rtol=1e-4, atol=1e-8)
    # the named-loss path computes the same objective
    named = L.distillation_loss("distillm2", student_chosen=sc, teacher_chosen=tc, mask_chosen=mc,
                                student_rejected=sr, teacher_rejected=tr, mask_rejected=mr,
                                alpha_chosen=ac, alpha_rejected=ar, beta=beta, temperature=tau)
    torch.testing.assert_close(named.loss.double(), loss.detach(), rtol=1e-5, atol=1e-7)
    torch.testing.assert_close(named.terms["skl"], out.skl.detach())
    torch.testing.assert_close(named.terms["srkl"], out.srkl.detach())


@pytest.mark.parametrize("name", list(L.LOSSES))
def test_every_named_loss_is_finite_and_has_gradient(name):
    sc, tc, mc, _ = make((2, 5, 17), seed=21)
    sr, tr, mr, _ = make((2, 5, 17), seed=22)
    xc, xr = sc.clone().requires_grad_(True), sr.clone().requires_grad_(True)
    out = L.distillation_loss(name, student_chosen=xc, teacher_chosen=tc, mask_chosen=mc,
                              labels_chosen=torch.randint(0, 17, (2, 5)), student_rejected=xr,
                              teacher_rejected=tr, mask_rejected=mr, labels_rejected=torch.randint(0, 17, (2, 5)))
    assert out.per_pair.shape == (2,) and torch.isfinite(out.loss)
    out.loss.backward()
    used = [x for x, row in ((xc, "chosen"), (xr, "rejected")) if row in L.LOSSES[name].rows]
    assert all(x.grad is not None and x.grad.abs().sum() > 0 for x in used)


def test_named_gkd_and_distillm_match_their_definitions():
    sc, tc, mc, _ = make((2, 5, 17), seed=23)
    sr, tr, mr, _ = make((2, 5, 17), seed=24)
    kw = dict(student_chosen=sc, teacher_chosen=tc, mask_chosen=mc, student_rejected=sr,
              teacher_rejected=tr, mask_rejected=mr)
    gkd = L.distillation_loss("gkd", **kw)
    expected = 0.5 * (L.sequence_mean(L.generalized_jsd(sc, tc, mc, beta=0.9), mc)
                      + L.sequence_mean(L.generalized_jsd(sr, tr, mr, beta=0.9), mr))
    torch.testing.assert_close(gkd.per_pair, expected)
    with pytest.raises(ValueError, match="valid: sft"):
        L.distillation_loss("nope", **kw)


def test_adaptive_alpha_branches():
    gap = torch.tensor([0.4, 0.2, 0.1, 0.0, -0.3])
    alpha = L.adaptive_alpha(gap, 0.2)
    # gap 0.4: 1 - 0.9 * 0.5 = 0.55 -> clipped to 0.1; gap 0.2 (= anchor): 1 - 0.9 = 0.1;
    # gap 0.1: 1 - 1.8 < 0 -> 0.01; gap <= 0 -> alpha_min.
    torch.testing.assert_close(alpha, torch.tensor([0.1, 0.1, 0.01, 0.01, 0.01]))
    inside = L.adaptive_alpha(torch.tensor([0.25]), 0.2, alpha_max=0.5)
    torch.testing.assert_close(inside, torch.tensor([1 - 0.9 * 0.8]))
    torch.testing.assert_close(L.adaptive_alpha(gap, 0.0), torch.full((5,), 0.1))
    torch.testing.assert_close(L.adaptive_alpha(gap, -1.0, alpha0=0.05), torch.full((5,), 0.05))
    with pytest.raises(ValueError):
        L.adaptive_alpha(gap, 0.2, alpha_min=0.2, alpha_max=0.1)


def test_beta_schedule_values():
    assert L.beta_schedule(0.7, "constant") == 0.5
    assert L.beta_schedule(0.0) == 0.5
    assert math.isclose(L.beta_schedule(0.25), 0.625)
    assert L.beta_schedule(0.5) == 0.75 and L.beta_schedule(1.0) == 0.75
    assert math.isclose(L.beta_schedule(0.1, beta0=0.2, beta_max=0.6, ramp=0.2), 0.4)
    with pytest.raises(ValueError, match="valid: constant, linear"):
        L.beta_schedule(0.5, "cosine")
    with pytest.raises(ValueError):
        L.beta_schedule(1.5)


def _consumers_of(leaf, loss):
    """Names of the autograd nodes that feed a gradient straight into ``leaf``."""
    seen, stack, names = set(), [loss.grad_fn], set()
    while stack:
        node = stack.pop()
        if node is None or node in seen:
            continue
        seen.add(node)
        for nxt, _ in node.next_functions:
            if nxt is not None and getattr(nxt, "variable", None) is leaf:
                names.add(type(node).__name__)
            stack.append(nxt)
    return names


@pytest.mark.parametrize("name", list(L.LOSSES))
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_stacked_rows_equal_sliced_rows(name, dtype):
    """stacked_pair_loss (one pass, one gradient buffer over chosen + rejected rows) gives
    pair_loss's values and gradients on the sliced rows, for every named loss, and the gradient
    at padding positions is exactly 0 although the buffer is allocated uninitialised."""
    s, t, mask, _ = make((6, 5, 17), seed=31, dtype=dtype)
    mask[1, 3:] = False  # padding
    labels = torch.randint(0, 17, (6, 5), generator=torch.Generator().manual_seed(5))
    spec = L.LOSSES[name]
    parts = {w: slice(3 * i, 3 * i + 3) for i, w in enumerate(spec.rows)}
    rows_used = 3 * len(spec.rows)
    s, t, mask, labels = s[:rows_used], t[:rows_used], mask[:rows_used], labels[:rows_used]
    alphas = {"chosen": torch.tensor([0.1, 0.2, 0.3]), "rejected": 0.15}
    params = L.LossParams(temperature=1.5, jsd_beta=0.7)
    x1, x2 = s.clone().requires_grad_(True), s.clone().requires_grad_(True)
    teacher = t if spec.needs_teacher else None
    stacked = L.stacked_pair_loss(name, x1, teacher, mask, parts, labels=labels, alphas=alphas, beta=0.3, params=params)
    rows = {w: L.RowInputs(x2[sl], None if teacher is None else t[sl], mask[sl], labels[sl], alphas[w])
            for w, sl in parts.items()}
    sliced = L.pair_loss(name, rows, beta=0.3, params=params)
    torch.testing.assert_close(stacked.per_pair, sliced.per_pair, rtol=0, atol=0)
    stacked.loss.backward()
    sliced.loss.backward()
    torch.testing.assert_close(x1.grad, x2.grad, rtol=0, atol=0)
    assert torch.all(x1.grad[~mask] == 0)
    if name not in ("dpkd", "dpo"):  # those read log-ratios, computed per row kind
        assert _consumers_of(x1, stacked.loss) == {"_ChunkedDivergenceBackward"}


def test_stacked_rows_errors_name_what_is_missing():
    s, t, mask, _ = make((4, 5, 17), seed=32)
    with pytest.raises(ValueError, match="needs the rejected rows"):
        L.stacked_pair_loss("distillm2", s, t, mask, {"chosen": slice(0, 2)})
    with pytest.raises(ValueError, match="row groups overlap"):
        _chunks.grouped_divergence(s, t, mask, [(L.K.forward_kl, slice(0, 3), None),
                                                (L.K.forward_kl, slice(2, 4), None)], 1.0)


@pytest.mark.parametrize("name", ["skew_forward_kl", "skew_reverse_kl"])
def test_linear_space_skew_kernels_equal_log_space(name):
    """With alpha > 0 the skew KLs run in linear space (fewer transcendental passes); the log-space
    kernel they replace agrees to float32 rounding, also with far-out logits whose probabilities
    underflow and -inf teacher entries."""
    s, t, _, _ = make((4, 7, 301), scale=40.0, seed=41, ninf_frac=0.1)
    s, t = s.view(-1, 301), t.view(-1, 301)
    a = torch.linspace(0.01, 0.9, s.shape[0])[:, None]
    fast, exact = getattr(L.K, name), getattr(L.K, name + "_log")
    v1, g1 = fast(s.clone(), t.clone(), a, True)
    v2, g2 = exact(s.clone(), t.clone(), a, True)
    assert torch.isfinite(v1).all() and torch.isfinite(g1).all()
    torch.testing.assert_close(v1, v2, rtol=2e-5, atol=1e-6)
    torch.testing.assert_close(g1, g2, rtol=1e-4, atol=1e-6)
    assert L.K.skew_kernel(fast, 0.0) is exact and L.K.skew_kernel(fast, 0.05) is fast


@pytest.mark.parametrize(("name", "alpha", "detach"), [
    ("reverse_kl", 0.1, True), ("generalized_jsd", 0.1, True), ("skew_reverse_kl", 0.0, True),
    ("skew_reverse_kl", 0.1, False), ("skew_reverse_kl", 0.1, True), ("skew_forward_kl", 0.0, True),
    ("skew_forward_kl", 0.1, True),
])
def test_student_minus_inf_entries_give_the_limit_gradient(name, alpha, detach):
    """Masked vocabulary entries (student logit -inf; for skew_forward_kl at alpha 0 the
    teacher's too, else its KL is infinite): values and gradients are the limits -- those of the
    float64 reference with those logits at -80 instead, whose probabilities (~1e-35) are 0 to
    float32 while every log stays finite -- and the masked entries' gradient is 0, not NaN
    (0 * inf in the analytic gradient)."""
    s, t, mask, w = make((2, 6, 40), seed=7)
    dropped = torch.zeros(40, dtype=torch.bool)
    dropped[[3, 17, 29]] = True
    t_in = t.masked_fill(dropped, -INF) if name == "skew_forward_kl" else t
    x = s.masked_fill(dropped, -INF).requires_grad_(True)
    out = call(name, x, t_in, mask, 1.0, alpha, 0.5, detach)
    (out.double() * w).sum().backward()
    far = torch.tensor(-80.0, dtype=torch.float64)  # exp(-80) ~ 1e-35: 0 to float32, every log finite
    x64 = s.double().masked_fill(dropped, far).requires_grad_(True)
    expected = ref(name, x64, t_in.double().masked_fill(t_in.isinf(), far), mask, 1.0, alpha, 0.5, detach)
    (expected * w).sum().backward()
    torch.testing.assert_close(out.double(), expected.detach(), rtol=1e-5, atol=1e-5)
    assert torch.isfinite(x.grad).all()
    assert (x.grad[..., dropped] == 0).all()
    torch.testing.assert_close(x.grad.double(), x64.grad, rtol=1e-4, atol=1e-5)
