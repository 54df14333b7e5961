"""Kernels section of train_speedrun.py: references on CPU, Triton kernels under the interpreter
(subprocess, fp32/fp16 inputs) and on CUDA (`pytest -m gpu tests/test_speedrun_kernels.py`)."""
import torch
import torch.nn.functional as F
from hypothesis import given, settings
from hypothesis import strategies as st

import train_speedrun as ts


# ---- Polar Express ------------------------------------------------------------------------------

def _matrix_with_spectrum(batch, m, n, log10_condition, seed):
    """Random (batch, m, n) fp64 matrix with singular values spread over 10**-log10_condition..1
    (times an arbitrary scale), and its exact polar factor U V^T."""
    gen = torch.Generator().manual_seed(seed)
    r = min(m, n)
    U, _ = torch.linalg.qr(torch.randn(batch, m, r, generator=gen, dtype=torch.float64))
    V, _ = torch.linalg.qr(torch.randn(batch, n, r, generator=gen, dtype=torch.float64))
    sigma = torch.logspace(0, -log10_condition, r, dtype=torch.float64)
    sigma = sigma[torch.randperm(r, generator=gen)]
    return 3.7 * (U * sigma[None, None, :]) @ V.mT, U @ V.mT


@settings(max_examples=12, deadline=None)
@given(batch=st.integers(1, 3), m=st.integers(4, 80), n=st.integers(4, 80),
       log10_condition=st.floats(0.0, 2.0), split=st.booleans(), seed=st.integers(0, 2**16))
def test_polar_express_is_close_to_exact_polar_factor(batch, m, n, log10_condition, split, seed):
    G, polar = _matrix_with_spectrum(batch, m, n, log10_condition, seed)
    X = ts.polar_express(G.float(), split_baddbmm=split).double()
    assert X.shape == G.shape
    # Five bf16 Polar Express steps leave singular values in a band around 1 (measured 0.86..1.15
    # for condition numbers up to 100), not exactly 1; direction matches U V^T closely.
    sv = torch.linalg.svdvals(X)
    assert sv.min() > 0.8 and sv.max() < 1.2, (sv.min(), sv.max())
    cosine = (X * polar).sum((-2, -1)) / (X.norm(dim=(-2, -1)) * polar.norm(dim=(-2, -1)))
    assert cosine.min() > 0.99, cosine


def test_polar_express_unbatched_matches_batched():
    G, _ = _matrix_with_spectrum(3, 40, 24, 1.0, seed=1)
    batched = ts.polar_express(G.float())
    single = ts.polar_express(G[1].float())
    assert batched.dtype == torch.bfloat16
    torch.testing.assert_close(single, batched[1], atol=0, rtol=0)


def test_symmetric_references():
    A = torch.randn(2, 12, 7)
    out = torch.empty(2, 12, 12)
    torch.testing.assert_close(ts.xxt_reference(A, out), A @ A.mT)
    S = A @ A.mT
    out2 = torch.empty_like(S)
    torch.testing.assert_close(ts.ba_plus_caa_reference(S, 0.5, -2.0, out2), 0.5 * S @ S - 2.0 * S)


# ---- softcapped multi-token-prediction loss -----------------------------------------------------

def _naive_mtp_losses(x, targets, mtp_weights, w_t):
    """One row and one prediction offset at a time, straight from the definition."""
    z = 23.0 * torch.sigmoid((x @ w_t + 5.0) / 7.5)
    rows = []
    for i in range(z.size(0)):
        total = z.new_zeros(())
        for k, weight in enumerate(mtp_weights):
            if i + k < z.size(0):
                total = total + weight * (torch.logsumexp(z[i], 0) - z[i, targets[i + k]])
        rows.append(total)
    return torch.stack(rows)


@settings(max_examples=15, deadline=None)
@given(rows=st.integers(1, 9), dim=st.integers(1, 8), vocab=st.integers(2, 40),
       weights=st.lists(st.floats(0.0, 1.0), min_size=1, max_size=4), seed=st.integers(0, 2**16))
def test_mtp_loss_and_gradient_match_naive_definition(rows, dim, vocab, weights, seed):
    gen = torch.Generator().manual_seed(seed)
    x = torch.randn(rows, dim, generator=gen, dtype=torch.float64, requires_grad=True)
    w_t = (torch.randn(dim, vocab, generator=gen, dtype=torch.float64) * 3).requires_grad_()
    targets = torch.randint(0, vocab, (rows,), generator=gen)
    mtp = torch.tensor(weights, dtype=torch.float64)
    got = ts.softcapped_mtp_loss(x, targets, mtp, w_t, 1.0, 1.0, 1.0, use_fp8=False)
    want = _naive_mtp_losses(x, targets, mtp, w_t)
    torch.testing.assert_close(got, want)
    upstream = torch.randn(rows, generator=gen, dtype=torch.float64)
    got_grads = torch.autograd.grad(got, (x, w_t), upstream)
    want_grads = torch.autograd.grad(want, (x, w_t), upstream)
    for g, w in zip(got_grads, want_grads):
        torch.testing.assert_close(g, w)


def test_mtp_loss_zero_padded_weights_change_nothing():
    x, w_t = torch.randn(6, 4), torch.randn(4, 11)
    targets = torch.randint(0, 11, (6,))
    short = ts.softcapped_mtp_loss(x, targets, torch.tensor([1.0, 0.5]), w_t, 1, 1, 1, False)
    padded = ts.softcapped_mtp_loss(x, targets, torch.tensor([1.0, 0.5, 0.0]), w_t, 1, 1, 1, False)
    torch.testing.assert_close(short, padded)


def test_mtp_single_weight_is_plain_softcapped_cross_entropy():
    x, w_t = torch.randn(5, 4), torch.randn(4, 9)
    targets = torch.randint(0, 9, (5,))
    losses = ts.softcapped_mtp_loss(x, targets, torch.tensor([1.0]), w_t, 1, 1, 1, False)
    expected = F.cross_entropy(ts.softcap(x @ w_t), targets, reduction="none")
    torch.testing.assert_close(losses, expected)


# ---- lm_head and MLP references -----------------------------------------------------------------

def test_lm_head_logits_plain_and_fp8_reference():
    x = torch.randn(3, 5, 16, dtype=torch.bfloat16)
    w_t = torch.randn(16, 24, dtype=torch.bfloat16) * 0.05
    plain = ts.lm_head_logits(x, w_t, 1.0, 1.0, 1.0, use_fp8=False)
    torch.testing.assert_close(plain, x @ w_t)
    # The FP8 reference rounds both operands to e4m3 (3 mantissa bits: <= 6.25% relative error).
    exact = x.flatten(0, 1).float() @ w_t.float()
    fp8 = ts.lm_head_logits_reference(x.flatten(0, 1), w_t, 4.0 / 448, 0.2 / 448, 1.0, use_fp8=True)
    assert fp8.shape == exact.shape
    err = (fp8.float() - exact).norm() / exact.norm()
    assert 0 < err < 0.1


def test_relu_square_mlp_reference_formula():
    x = torch.randn(2, 3, 8, dtype=torch.float64)
    w_fc, w_proj = torch.randn(32, 8, dtype=torch.float64), torch.randn(32, 8, dtype=torch.float64)
    out = ts.relu_square_mlp(x, w_fc, w_proj)
    expected = torch.einsum("bth,hd->btd", torch.clamp(x @ w_fc.T, min=0) ** 2, w_proj)
    torch.testing.assert_close(out, expected)


def test_fp8_supported_is_false_off_cuda():
    assert ts.fp8_supported("cpu") is False
