"""The fused losses from hidden states against float64 references, the chunked losses on
materialised logits, and a check that no [N, V] tensor is ever created."""

import pytest
import torch
from torch.utils._python_dispatch import TorchDispatchMode

from distillm2 import fused as F
from distillm2 import losses as L

N, V, HS, HT = 12, 50, 8, 6


# float64 references: logits = h @ W.T (+ b), then the textbook formulas -------------------------


def _plogratio(log_x, log_y):
    x = log_x.exp()
    return torch.where(x > 0, x * (log_x - log_y), torch.zeros_like(x)).sum(-1)


def ref(name, s, t, tau=1.0, alpha=0.1):
    """Per-row values from logits ``[N, V]`` (or labels ``[N]`` for cross_entropy)."""
    if name == "cross_entropy":
        return -torch.log_softmax(s, -1).gather(-1, t[:, None])[:, 0]
    log_q, log_p = torch.log_softmax(s / tau, -1), torch.log_softmax(t / tau, -1)
    q, p = log_q.exp(), log_p.exp()
    a = alpha.double()[:, None] if isinstance(alpha, torch.Tensor) else alpha
    if name == "forward_kl":
        return _plogratio(log_p, log_q)
    if name == "reverse_kl":
        return _plogratio(log_q, log_p)
    if name == "skew_forward_kl":
        return _plogratio(log_p, (a * p + (1 - a) * q).log())
    if name in ("skew_reverse_kl", "skew_reverse_kl_v1"):
        q_in = q.detach() if name == "skew_reverse_kl" else q
        return _plogratio(log_q, ((1 - a) * p + a * q_in).log())
    raise KeyError(name)


def make(seed=0, dtype=torch.float32, n=N, bias=True):
    g = torch.Generator().manual_seed(seed)

    def r(*shape, scale=1.0):
        return (torch.randn(shape, generator=g, dtype=torch.float64) * scale).to(dtype)

    return {
        "h_s": r(n, HS), "w_s": r(V, HS, scale=0.8), "b_s": r(V, scale=0.5) if bias else None,
        "h_t": r(n, HT), "w_t": r(V, HT, scale=0.8), "b_t": r(V, scale=0.5) if bias else None,
        "labels": torch.randint(0, V, (n,), generator=g),
        "alpha": torch.rand(n, generator=g, dtype=torch.float64).mul(0.5).to(torch.float32),
        "w": torch.randn(n, generator=g, dtype=torch.float64),
    }


def call(name, x, h_s, w_s, b_s, tau, alpha, **kw):
    """Our wrapper for ``name``, student tensors given (they carry requires_grad)."""
    if name == "cross_entropy":
        return F.fused_cross_entropy(h_s, w_s, x["labels"], student_bias=b_s, **kw)
    fn = {"forward_kl": F.fused_forward_kl, "reverse_kl": F.fused_reverse_kl,
          "skew_forward_kl": F.fused_skew_forward_kl, "skew_reverse_kl": F.fused_skew_reverse_kl,
          "skew_reverse_kl_v1": F.fused_skew_reverse_kl}[name]
    if name.startswith("skew"):
        kw["alpha"] = alpha
    if name == "skew_reverse_kl_v1":
        kw["detach_mixture"] = False
    return fn(h_s, w_s, x["h_t"], x["w_t"], temperature=tau, student_bias=b_s,
              teacher_bias=x["b_t"], **kw)


def reference(name, x, tau, alpha, w):
    """float64 values and gradients (hidden, weight, bias) of sum(w * values)."""
    leaves = [x[k].double().requires_grad_(True) for k in ("h_s", "w_s", "b_s")]
    h, wt, b = leaves
    s = h @ wt.T + b
    t = x["labels"] if name == "cross_entropy" else x["h_t"].double() @ x["w_t"].double().T + x["b_t"].double()
    v = ref(name, s, t, 1.0 if name == "cross_entropy" else tau, alpha)
    (v * w).sum().backward()
    return [v.detach()] + [leaf.grad for leaf in leaves]


def ours(name, x, tau, alpha, w, **kw):
    leaves = [x[k].clone().requires_grad_(True) for k in ("h_s", "w_s", "b_s")]
    v = call(name, x, *leaves, tau, alpha, **kw)
    assert v.dtype == torch.float32 and v.shape == (x["h_s"].shape[0],)
    (v * w.to(v.dtype)).sum().backward()
    for leaf in leaves:
        assert leaf.grad.dtype == leaf.dtype
    return [v.detach()] + [leaf.grad for leaf in leaves]


def assert_all_close(got, expected, rtol, atol):
    for a, b, what in zip(got, expected, ("values", "grad hidden", "grad weight", "grad bias")):
        scale = max(1.0, b.abs().max().item())
        torch.testing.assert_close(a.double(), b, rtol=rtol, atol=atol * scale, msg=what)


NAMES = ["forward_kl", "reverse_kl", "skew_forward_kl", "skew_reverse_kl", "skew_reverse_kl_v1",
         "cross_entropy"]


@pytest.mark.parametrize("name", NAMES)
@pytest.mark.parametrize("tau", [1.0, 2.0])
@pytest.mark.parametrize("row_weights", ["ones", "stated", "unstated"])
def test_matches_float64_reference(name, tau, row_weights):
    # chunk_rows=5 does not divide N = 12: three chunks, the last one short. "stated": the row
    # weights are passed ahead (one pass); "unstated": backward recomputes with the true grad_out.
    x = make(seed=hash((name, tau)) % 1000)
    w = torch.ones(N, dtype=torch.float64) if row_weights == "ones" else x["w"]
    kw = {"weights": w} if row_weights == "stated" else {}
    got = ours(name, x, tau, x["alpha"], w, chunk_rows=5, **kw)
    assert_all_close(got, reference(name, x, tau, x["alpha"], w), rtol=2e-5, atol=2e-6)


@pytest.mark.parametrize("name", NAMES)
def test_float_alpha_no_bias_one_chunk(name):
    x = make(seed=3, bias=False)
    x["b_s"] = torch.zeros(V)  # the reference adds zeros; ours gets no bias at all
    leaves = [x[k].clone().requires_grad_(True) for k in ("h_s", "w_s")]
    v = call(name, {**x, "b_t": None}, *leaves, None, 1.0, 0.2)
    (v * x["w"].float()).sum().backward()
    x["b_t"] = torch.zeros(V)
    expected = reference(name, x, 1.0, 0.2, x["w"])
    assert_all_close([v.detach(), leaves[0].grad, leaves[1].grad], expected[:3], rtol=2e-5, atol=2e-6)


def test_single_pass_when_grad_out_is_a_multiple_of_the_weights(monkeypatch):
    calls = []
    real = F._run

    def counting(*args, **kw):
        calls.append(kw["need"])
        return real(*args, **kw)

    monkeypatch.setattr(F, "_run", counting)
    x = make(seed=4)
    for weights, loss_of, passes in [
        (None, lambda v: v.sum() / 7, 1),
        (x["w"], lambda v: (v * x["w"].float()).sum() * 3, 1),
        (None, lambda v: (v * x["w"].float()).sum(), 2),  # not proportional: recompute
        (torch.zeros(N), lambda v: (v * 0).sum(), 1),
    ]:
        calls.clear()
        h = x["h_s"].clone().requires_grad_(True)
        v = F.fused_forward_kl(h, x["w_s"].clone().requires_grad_(True), x["h_t"], x["w_t"],
                               weights=weights, chunk_rows=5)
        loss_of(v).backward()
        assert len(calls) == passes
        if passes == 2:
            assert calls[1] == (False, True, False)  # grad_hidden is never recomputed


@pytest.mark.parametrize("name", ["forward_kl", "skew_forward_kl", "skew_reverse_kl", "cross_entropy"])
@pytest.mark.parametrize("tau", [1.0, 2.0])
def test_same_as_the_chunked_losses_on_materialised_logits(name, tau):
    x = make(seed=5)
    alpha = 0.3
    h, w = x["h_s"].clone().requires_grad_(True), x["w_s"].clone().requires_grad_(True)
    s = (h @ w.T + x["b_s"])[None]
    mask = torch.ones((1, N), dtype=torch.bool)
    if name == "cross_entropy":
        expected = L.token_cross_entropy(s, x["labels"][None], mask)[0]
    else:
        t = (x["h_t"] @ x["w_t"].T + x["b_t"])[None]
        kw = {"alpha": alpha} if name.startswith("skew") else {}
        expected = getattr(L, name)(s, t, mask, temperature=tau, **kw)[0]
    expected.sum().backward()
    got = ours(name, x, tau, alpha, torch.ones(N), chunk_rows=4)
    for a, b in zip(got[:3], [expected.detach(), h.grad, w.grad]):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("name", ["forward_kl", "skew_forward_kl", "skew_reverse_kl", "cross_entropy"])
def test_bfloat16_inputs(name):
    # The logits are computed and rounded in bf16, as a bf16 lm_head computes them: against the
    # chunked loss on those materialised bf16 logits, values agree to float32 rounding and the
    # gradients (returned in bf16) to bf16 rounding; against float64 on the rounded inputs, to
    # the bf16 rounding of the logits.
    x = make(seed=6, dtype=torch.bfloat16)
    alpha = x["alpha"]
    h, w, b = (x[k].clone().requires_grad_(True) for k in ("h_s", "w_s", "b_s"))
    s = (h @ w.T + b)[None]
    mask = torch.ones((1, N), dtype=torch.bool)
    if name == "cross_entropy":
        expected = L.token_cross_entropy(s, x["labels"][None], mask)[0]
    else:
        t = (x["h_t"] @ x["w_t"].T + x["b_t"])[None]
        kw = {"alpha": alpha[:1]} if name.startswith("skew") else {}  # one sequence: one alpha
        expected = getattr(L, name)(s, t, mask, temperature=2.0, **kw)[0]
    (expected * x["w"].float()).sum().backward()
    got = ours(name, x, 2.0, alpha[0].item(), x["w"], chunk_rows=5, weights=x["w"])
    eps = torch.finfo(torch.bfloat16).eps
    torch.testing.assert_close(got[0], expected.detach(), rtol=1e-5, atol=1e-6)
    for a, e in zip(got[1:], (h.grad, w.grad, b.grad)):
        torch.testing.assert_close(a.float(), e.float(), rtol=2 * eps, atol=2 * eps * e.abs().max().item())
    assert_all_close(got, reference(name, x, 2.0, alpha[0].item(), x["w"]), rtol=0.05, atol=0.05)


def test_distillm2_loss_matches_the_logits_version():
    g = torch.Generator().manual_seed(7)
    b, tc, tr = 3, 5, 4
    w_s = (torch.randn(V, HS, generator=g) * 0.8).requires_grad_(True)
    w_t = torch.randn(V, HT, generator=g) * 0.8
    hs_c, hs_r = torch.randn(b, tc, HS, generator=g), torch.randn(b, tr, HS, generator=g)
    ht_c, ht_r = torch.randn(b, tc, HT, generator=g), torch.randn(b, tr, HT, generator=g)
    m_c, m_r = torch.rand(b, tc, generator=g) < 0.7, torch.rand(b, tr, generator=g) < 0.7
    m_c[0, 0] = m_r[0, 0] = True
    m_r[2] = False  # a pair with no rejected row counts 0
    alpha_c, alpha_r = torch.tensor([0.1, 0.3, 0.0]), 0.2
    hs_c.requires_grad_(True)
    hs_r.requires_grad_(True)
    expected = L.distillm2_loss(hs_c @ w_s.T, ht_c @ w_t.T, m_c, hs_r @ w_s.T, ht_r @ w_t.T, m_r,
                                alpha_chosen=alpha_c, alpha_rejected=alpha_r, beta=0.3, temperature=1.5)
    expected.loss.backward()
    grads = [t.grad.clone() for t in (hs_c, hs_r, w_s)]
    for t in (hs_c, hs_r, w_s):
        t.grad = None

    def rows(hs, ht, m, alpha):
        bi, ti = m.nonzero(as_tuple=True)
        return F.HiddenRows(hs[bi, ti], ht[bi, ti], bi, alpha)

    out = F.fused_distillm2_loss(rows(hs_c, ht_c, m_c, alpha_c), rows(hs_r, ht_r, m_r, alpha_r), w_s,
                                 w_t, num_pairs=b, beta=0.3, temperature=1.5, chunk_rows=3)
    out.loss.backward()
    for a, e in [(out.loss, expected.loss), (out.skl, expected.skl), (out.srkl, expected.srkl)]:
        torch.testing.assert_close(a.detach(), e.detach(), rtol=1e-5, atol=1e-6)
    for t, e in zip((hs_c, hs_r, w_s), grads):
        torch.testing.assert_close(t.grad, e, rtol=1e-5, atol=1e-6)


class _LargestTensor(TorchDispatchMode):
    """Records the largest number of elements of any tensor an operator returns."""

    def __init__(self):
        super().__init__()
        self.largest = 0

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        for t in out if isinstance(out, (tuple, list)) else (out,):
            if isinstance(t, torch.Tensor):
                self.largest = max(self.largest, t.numel())
        return out


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("stated", [True, False])
def test_no_tensor_of_n_by_v_elements(dtype, stated):
    n, vocab, hs, ht, rows = 256, 400, 16, 24, 8
    g = torch.Generator().manual_seed(8)
    h = torch.randn(n, hs, generator=g).to(dtype).requires_grad_(True)
    w = torch.randn(vocab, hs, generator=g).to(dtype).requires_grad_(True)
    h_t, w_t = torch.randn(n, ht, generator=g).to(dtype), torch.randn(vocab, ht, generator=g).to(dtype)
    row_w = torch.rand(n, generator=g)
    # the largest legitimate tensors: [chunk, V] temporaries, the weights and their gradient
    bound = max(rows * vocab, vocab * max(hs, ht), n * ht)
    assert bound * 4 < n * vocab
    with _LargestTensor() as mode:
        v = F.fused_skew_forward_kl(h, w, h_t, w_t, alpha=0.1, chunk_rows=rows,
                                    weights=row_w if stated else None)
        (v * row_w).sum().backward()
    assert mode.largest <= bound
    assert h.grad is not None and w.grad is not None
    logits = h @ w.T
    with _LargestTensor() as mode:  # the check sees [N, V] tensors, in a backward pass too
        logits.sum().backward()
    assert mode.largest == n * vocab


def test_no_grad_and_values_only():
    x = make(seed=9)
    with torch.no_grad():
        v = F.fused_skew_forward_kl(x["h_s"].requires_grad_(True), x["w_s"], x["h_t"], x["w_t"])
    assert not v.requires_grad
    expected = ref("skew_forward_kl", x["h_s"].double() @ x["w_s"].double().T,
                   x["h_t"].double() @ x["w_t"].double().T)
    torch.testing.assert_close(v.double(), expected, rtol=2e-5, atol=2e-6)


def test_frozen_weight_and_empty_rows():
    x = make(seed=10)
    h = x["h_s"].clone().requires_grad_(True)
    F.fused_forward_kl(h, x["w_s"], x["h_t"], x["w_t"]).sum().backward()  # weight needs no grad
    assert h.grad is not None and torch.isfinite(h.grad).all()
    h0 = torch.zeros((0, HS), requires_grad=True)
    w = x["w_s"].clone().requires_grad_(True)
    v = F.fused_forward_kl(h0, w, torch.zeros((0, HT)), x["w_t"])
    assert v.shape == (0,)
    v.sum().backward()
    assert h0.grad.shape == (0, HS) and not w.grad.any()


def test_second_backward_is_refused():
    x = make(seed=11)
    h = x["h_s"].clone().requires_grad_(True)
    v = F.fused_forward_kl(h, x["w_s"].clone().requires_grad_(True), x["h_t"], x["w_t"])
    v.sum().backward(retain_graph=True)
    with pytest.raises(RuntimeError, match="one backward"):
        v.sum().backward()


def test_invalid_inputs():
    x = make(seed=12)
    h, w, ht, wt = x["h_s"], x["w_s"], x["h_t"], x["w_t"]
    with pytest.raises(ValueError, match="labels must lie"):
        F.fused_cross_entropy(h, w, torch.full((N,), V))
    with pytest.raises(ValueError, match="labels must be an integer"):
        F.fused_cross_entropy(h, w, torch.zeros(N))
    with pytest.raises(ValueError, match="must agree"):
        F.fused_forward_kl(h, w[:, :3], ht, wt)
    with pytest.raises(ValueError, match="teacher_hidden must be"):
        F.fused_forward_kl(h, w, ht[:3], wt)
    with pytest.raises(ValueError, match="share a float dtype"):
        F.fused_forward_kl(h.double(), w, ht, wt)
    with pytest.raises(ValueError, match="temperature"):
        F.fused_forward_kl(h, w, ht, wt, temperature=0.0)
    with pytest.raises(ValueError, match="alpha"):
        F.fused_skew_forward_kl(h, w, ht, wt, alpha=1.0)
    with pytest.raises(ValueError, match=r"\[N\]"):
        F.fused_skew_reverse_kl(h, w, ht, wt, alpha=torch.full((3,), 0.1))
    with pytest.raises(ValueError, match="chunk_rows"):
        F.fused_forward_kl(h, w, ht, wt, chunk_rows=-1)


def test_half_precision_grad_weight_accumulation():
    """A bf16 weight's gradient is accumulated in bf16 by default (one rounding per chunk, half the
    memory of a float32 accumulator) or in float32 on request; both agree with float64 on the
    rounded inputs to bf16 rounding, float32 at least as closely, and other dtypes are refused."""
    x = make(seed=11, dtype=torch.bfloat16, n=40)
    w = torch.ones(40)
    got = {dt: ours("skew_forward_kl", x, 1.0, 0.1, w, chunk_rows=3, grad_weight_dtype=dt)
           for dt in (None, torch.float32)}
    exact = reference("skew_forward_kl", x, 1.0, 0.1, w)[2]
    err = {dt: float((g[2].double() - exact).norm() / exact.norm()) for dt, g in got.items()}
    eps = torch.finfo(torch.bfloat16).eps
    assert err[torch.float32] <= err[None] < 2 * eps  # both dominated by the bf16 rounding of the logits
    torch.testing.assert_close(got[None][0], got[torch.float32][0], rtol=0, atol=0)  # values equal
    with pytest.raises(ValueError, match="grad_weight_dtype must be"):
        ours("skew_forward_kl", x, 1.0, 0.1, w, grad_weight_dtype=torch.float16)
