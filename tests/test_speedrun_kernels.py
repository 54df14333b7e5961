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


def test_polar_express_tall_right_multiplication_is_the_transposed_wide_map():
    """Record #74: a tall matrix iterates X <- aX + X(bA + cA^2), A = X^T X, instead of
    transposing; the same map as the wide iteration on G^T, up to bf16 rounding."""
    G, _ = _matrix_with_spectrum(2, 96, 32, 1.0, seed=4)
    for split in (False, True):
        tall = ts.polar_express(G.float(), split_baddbmm=split).float()
        wide = ts.polar_express(G.float().mT, split_baddbmm=split).float().mT
        assert tall.shape == G.shape and tall.is_contiguous()
        assert ((tall - wide).norm() / wide.norm()).item() < 0.02


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

def _naive_mtp_losses(x, targets, mtp_weights, w_t, prefix_targets=None, prefix_weight=0.0):
    """One row and one prediction offset at a time, straight from the definition; plus record
    #88's prefix-token term of each row whose prefix target is not -1."""
    z = 23.0 * torch.sigmoid((x @ w_t + 5.0) / 7.5)
    rows = []
    for i in range(z.size(0)):
        total = z.new_zeros(())
        for k, weight in enumerate(mtp_weights):
            if i + k < z.size(0):
                total = total + weight * (torch.logsumexp(z[i], 0) - z[i, targets[i + k]])
        if prefix_targets is not None and prefix_targets[i] >= 0:
            total = total + prefix_weight * (torch.logsumexp(z[i], 0) - z[i, prefix_targets[i]])
        rows.append(total)
    return torch.stack(rows)


@settings(max_examples=15, deadline=None)
@given(rows=st.integers(1, 9), dim=st.integers(1, 8), vocab=st.integers(2, 40),
       weights=st.lists(st.floats(0.0, 1.0), min_size=1, max_size=4), seed=st.integers(0, 2**16),
       prefix_weight=st.one_of(st.none(), st.floats(0.0, 1.0)))
def test_mtp_loss_and_gradient_match_naive_definition(rows, dim, vocab, weights, seed, prefix_weight):
    gen = torch.Generator().manual_seed(seed)
    x = torch.randn(rows, dim, generator=gen, dtype=torch.float64, requires_grad=True)
    w_t = (torch.randn(dim, vocab, generator=gen, dtype=torch.float64) * 3).requires_grad_()
    targets = torch.randint(0, vocab, (rows,), generator=gen)
    mtp = torch.tensor(weights, dtype=torch.float64)
    prefix = {}
    if prefix_weight is not None:   # record #88: some rows without a prefix target (-1)
        prefix = dict(prefix_targets=torch.randint(-1, vocab, (rows,), generator=gen),
                      prefix_weight=torch.tensor([prefix_weight], dtype=torch.float64))
    got = ts.softcapped_mtp_loss_reference(x, targets, mtp, w_t, 1.0, 1.0, 1.0, False, **prefix)
    want = _naive_mtp_losses(x, targets, mtp, w_t, prefix.get("prefix_targets"), prefix_weight or 0.0)
    torch.testing.assert_close(got, want)
    upstream = torch.randn(rows, generator=gen, dtype=torch.float64)
    got_grads = torch.autograd.grad(got, (x, w_t), upstream)
    want_grads = torch.autograd.grad(want, (x, w_t), upstream)
    for g, w in zip(got_grads, want_grads):
        torch.testing.assert_close(g, w)
    # the training loss is their sum
    total = ts.softcapped_mtp_loss_sum(x, targets, mtp, w_t, 1.0, 1.0, 1.0, False, **prefix)
    torch.testing.assert_close(total, want.sum())


def test_prefix_token_table_of_gpt2_examples():
    """Record #88 on GPT-2's own vocabulary (tests have it offline): ' hello' -> ' hell',
    'ing' -> 'in'; single bytes and <|endoftext|> have none."""
    import prepare_data
    enc = prepare_data.gpt2_encoding()
    table = ts.gpt2_prefix_token_table(50304)
    assert table.shape == (50304,) and table.dtype == torch.int64
    token = lambda text: enc.encode_single_token(text.encode())
    assert table[token(" hello")] == token(" hell") and table[token("ing")] == token("in")
    assert table[token("a")] == -1 and table[50256] == -1 and (table[50257:] == -1).all()


def test_missing_gpt2_vocabulary_is_one_error_line(monkeypatch, tmp_path):
    import prepare_data
    monkeypatch.setenv("GPT2_TIKTOKEN_FILE", str(tmp_path / "nowhere.tiktoken"))
    prepare_data.gpt2_encoding.cache_clear()        # (it keeps the encoding an earlier test loaded)
    monkeypatch.setattr(prepare_data, "gpt2_encoding", prepare_data.gpt2_encoding.__wrapped__)
    with pytest.raises(SystemExit, match=r"^error: the prefix-token loss \(record #88\) needs GPT-2's "
                                         r"vocabulary: GPT2_TIKTOKEN_FILE=.*nowhere.tiktoken does not exist"):
        ts.gpt2_prefix_token_table(50304)


@settings(max_examples=30, deadline=None)
@given(words=st.sets(st.binary(min_size=1, max_size=5), min_size=1, max_size=40))
def test_prefix_token_table_is_the_longest_proper_prefix_in_the_vocabulary(words):
    ranks = {word: i for i, word in enumerate(sorted(words))}
    table = ts.prefix_token_table(ranks, len(ranks) + 3)
    for word, token in ranks.items():
        prefixes = [ranks[word[:end]] for end in range(1, len(word)) if word[:end] in ranks]
        assert table[token] == (prefixes[-1] if prefixes else -1)
    assert (table[len(ranks):] == -1).all()             # ids beyond the vocabulary (padding)


def test_mtp_loss_zero_padded_weights_change_nothing():
    x, w_t = torch.randn(6, 4), torch.randn(4, 11)
    targets = torch.randint(0, 11, (6,))
    short = ts.softcapped_mtp_loss_reference(x, targets, torch.tensor([1.0, 0.5]), w_t, 1, 1, 1, False)
    padded = ts.softcapped_mtp_loss_reference(x, targets, torch.tensor([1.0, 0.5, 0.0]), w_t, 1, 1, 1, False)
    torch.testing.assert_close(short, padded)


def test_mtp_single_weight_is_plain_softcapped_cross_entropy():
    x, w_t = torch.randn(5, 4), torch.randn(4, 9)
    targets = torch.randint(0, 9, (5,))
    losses = ts.softcapped_mtp_loss_reference(x, targets, torch.tensor([1.0]), w_t, 1, 1, 1, False)
    expected = F.cross_entropy(ts.softcap(x @ w_t), targets, reduction="none")
    torch.testing.assert_close(losses, expected)


# ---- lm_head and MLP references -----------------------------------------------------------------

def test_lm_head_logits_plain_and_fp8_reference():
    x = torch.randn(3, 5, 16, dtype=torch.bfloat16)
    w_t = torch.randn(16, 24, dtype=torch.bfloat16) * 0.05
    plain = ts.lm_head_logits(x, w_t)
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


def test_fp8_mlp_reference_is_straight_through():
    """Record #84: the FP8 up-projection changes the forward's pre-activation (e4m3 operands,
    scaled back), and the gradient is the bf16 formula's taken at that pre-activation."""
    g = torch.Generator().manual_seed(0)
    x = torch.randn(3, 10, 32, generator=g, dtype=torch.float64).requires_grad_()
    w_fc = (0.2 * torch.randn(128, 32, generator=g, dtype=torch.float64)).requires_grad_()
    w_proj = (0.2 * torch.randn(128, 32, generator=g, dtype=torch.float64)).requires_grad_()
    upstream = torch.randn(3, 10, 32, generator=g, dtype=torch.float64)
    out = ts.relu_square_mlp(x, w_fc, w_proj, use_fp8=True)
    x_f8, w_f8, dequant = ts.mlp_up_fp8_operands(x, w_fc)
    assert x_f8.dtype == w_f8.dtype == torch.float8_e4m3fn
    assert x_f8.float().abs().max() == 448 and w_f8.float().abs().max() == 448   # full e4m3 range
    pre = (x_f8.double() @ w_f8.double().mT) * dequant.double()
    exact = x.detach() @ w_fc.detach().T
    assert 0 < ((pre - exact).norm() / exact.norm()).item() < 0.1              # 3 mantissa bits
    post = torch.relu(pre) ** 2
    close = dict(rtol=1e-5, atol=1e-6)        # the reference multiplies the e4m3 values in fp32
    torch.testing.assert_close(out, post @ w_proj.detach(), **close)
    grads = torch.autograd.grad(out, (x, w_fc, w_proj), upstream)
    dpre = 2 * (upstream @ w_proj.detach().T) * torch.relu(pre)
    want = (dpre @ w_fc.detach(), dpre.flatten(0, 1).T @ x.detach().flatten(0, 1),
            post.flatten(0, 1).T @ upstream.flatten(0, 1))
    for got, w in zip(grads, want):
        torch.testing.assert_close(got, w, **close)


def test_fp8_supported_is_false_off_cuda():
    assert ts.fp8_supported("cpu") is False


# ---- Triton kernels against their references ----------------------------------------------------
# Each check runs on CUDA (bf16, real kernels) and on CPU under TRITON_INTERPRET=1 (fp32 inputs:
# triton's CPU interpreter misreads bf16 loads). Interpreter mode is fixed when triton.jit wraps the
# kernels, i.e. at import of train_speedrun, so those checks run in a fresh subprocess.
import os
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]


def _rel_err(got, want):
    got, want = got.double(), want.double()
    return ((got - want).norm() / want.norm().clamp_min(1e-30)).item()


def _randn(*shape, device, dtype, scale=1.0, seed=0):
    gen = torch.Generator().manual_seed(seed)
    return (torch.randn(*shape, generator=gen) * scale).to(device=device, dtype=dtype)


def check_symmetric_gram(device, dtype, tol):
    # shapes cross block boundaries; small blocks on CPU so several blocks (and mirrors) occur
    small = (32, 32, 16) if device == "cpu" else None
    for batch, m, k in [(2, 40, 24), (1, 150, 96), (3, 70, 70)]:
        A = _randn(batch, m, k, device=device, dtype=dtype, seed=m)
        out = torch.full((batch, m, m), float("nan"), device=device, dtype=dtype)
        want = ts.xxt_reference(A, torch.empty_like(out))
        assert _rel_err(ts._xxt_triton(A, out, blocks=small), want) < tol
        gram = want.clone()
        out = torch.full_like(gram, float("nan"))
        want = ts.ba_plus_caa_reference(gram, 0.7, -1.3, torch.empty_like(gram))
        assert _rel_err(ts._ba_plus_caa_triton(gram, 0.7, -1.3, out, blocks=small), want) < tol
    # unbatched input, the default (tuned) block shapes
    A = _randn(100, 64, device=device, dtype=dtype)
    out = torch.empty(100, 100, device=device, dtype=dtype)
    assert _rel_err(ts._xxt_triton(A, out), A.float() @ A.float().T) < tol
    # X^T X of tall matrices through the transposed view (record #74), batched and not
    for shape in [(2, 150, 40), (96, 70)]:
        X = _randn(*shape, device=device, dtype=dtype, seed=7)
        out = torch.full((*shape[:-2], shape[-1], shape[-1]), float("nan"), device=device, dtype=dtype)
        assert _rel_err(ts._xtx_triton(X, out, blocks=small), X.float().mT @ X.float()) < tol


def check_transpose_copy_and_add(device, dtype, tol):
    """The tiled transpose (the FP8 loss backward, the tied embedding): copy into a new tensor,
    into a given one, and accumulate into one; edges not multiples of the tile; exact."""
    src = _randn(70, 150, device=device, dtype=dtype)
    assert torch.equal(ts._transpose_triton(src, tile=(16, 32)), src.T)
    dst = torch.full((150, 70), float("nan"), device=device, dtype=dtype)
    ts._transpose_triton(src, dst, tile=(32, 64))
    assert torch.equal(dst, src.T)
    base = _randn(150, 70, device=device, dtype=dtype, seed=1)
    dst = base.clone()
    ts._transpose_triton(src, dst, add=True, tile=(16, 32))
    assert _rel_err(dst, base.float() + src.float().T) < tol
    # the optimizer's entry points, a row-strided source (a slice of a wider tensor)
    wide = _randn(70, 200, device=device, dtype=dtype, seed=2)
    src = wide[:, :150]
    dst = torch.empty(150, 70, device=device, dtype=dtype)
    ts.transpose_copy_(dst, src)
    assert torch.equal(dst, src.T)
    ts.transpose_add_(dst, src)
    assert _rel_err(dst, 2 * src.float().T) < tol


def check_linear_relu_square(device, dtype, tol):
    use_tma_options = [False, True] if device == "cpu" else [None]  # None: the GPU picks
    for use_tma in use_tma_options:
        x = _randn(150, 64, device=device, dtype=dtype)
        w = _randn(300, 64, device=device, dtype=dtype, scale=0.1, seed=1)
        post = ts._linear_relu_square_triton(x, w, use_tma=use_tma)     # record #87: post only
        want_pre = x.float() @ w.float().T
        assert _rel_err(post, torch.relu(want_pre).square()) < tol
        g = _randn(150, 64, device=device, dtype=dtype, seed=2)
        w_proj = _randn(300, 64, device=device, dtype=dtype, scale=0.1, seed=3)
        dpre = ts._linear_relu_square_triton(g, w_proj, post=post, use_tma=use_tma)   # relu(pre) = sqrt(post)
        assert _rel_err(dpre, 2 * (g.float() @ w_proj.float().T) * torch.relu(want_pre)) < tol


def check_linear_relu_square_fp8(device, dtype, tol):
    """Record #84: e4m3 operands, the product scaled back by one fp32 factor, outputs in the
    activations' dtype; the TMA path uses 128-wide K blocks for FP8."""
    use_tma_options = [False, True] if device == "cpu" else [None]
    x = _randn(150, 128, device=device, dtype=dtype)
    w = _randn(300, 128, device=device, dtype=dtype, scale=0.1, seed=1)
    x_f8, w_f8, dequant = ts.mlp_up_fp8_operands(x, w)
    want_pre = (x_f8.float() @ w_f8.float().T) * dequant
    for use_tma in use_tma_options:
        post = ts._linear_relu_square_triton(x_f8, w_f8, use_tma=use_tma, dequant=dequant,
                                             out_dtype=dtype)
        assert post.dtype == dtype
        assert _rel_err(post, torch.relu(want_pre).square()) < tol
    # record #89: with act_scale the forward also returns post / act_scale in e4m3 (the largest
    # entries clipped at 448 with this scale) and the largest post. (N = 320: the e4m3 rows of a
    # TMA store must be 16-byte multiples.) Triton's CPU interpreter rounds fp32 -> e4m3 wrongly
    # (triton 3.9: 1.977 -> 1.0, 100 -> 104; torch and the GPU give 2.0 and 96), so the e4m3
    # values are compared on the GPU only; the interpreter checks the scale, the clip and the max.
    w_f8 = ts.mlp_up_fp8_operands(x, _randn(320, 128, device=device, dtype=dtype, scale=0.1, seed=4))[1]
    post = ts._linear_relu_square_triton(x_f8, w_f8, dequant=dequant, out_dtype=dtype, use_tma=False)
    act_scale = (post.float().amax() / 600).reshape(1)
    for use_tma in use_tma_options:
        post, post_f8, amax = ts._linear_relu_square_triton(x_f8, w_f8, use_tma=use_tma, dequant=dequant,
                                                            out_dtype=dtype, act_scale=act_scale)
        want_f8, _ = ts.mlp_down_fp8_operands(post, w_f8.float(), act_scale, act_scale)
        assert post_f8.dtype == torch.float8_e4m3fn and post_f8.float().max() == 448
        assert amax.shape == (1,) and amax.item() == post.float().max().item()
        if device == "cpu":
            assert _rel_err(post_f8.float().clamp(max=440), want_f8.float().clamp(max=440)) < 0.5
        else:
            assert torch.equal(post_f8.float(), want_f8.float())


def _check_fused_mlp_autograd(device, dtype, tol, use_fp8, reference):
    x = _randn(2, 70, 64, device=device, dtype=dtype).requires_grad_()
    w_fc = _randn(256, 64, device=device, dtype=dtype, scale=0.1, seed=1).requires_grad_()
    w_proj = _randn(256, 64, device=device, dtype=dtype, scale=0.1, seed=2).requires_grad_()
    upstream = _randn(2, 70, 64, device=device, dtype=dtype, seed=3)
    got = ts._FusedReluSquareMLP.apply(x, w_fc, w_proj, use_fp8)
    got_grads = torch.autograd.grad(got, (x, w_fc, w_proj), upstream)
    leaves = [t.detach().float().requires_grad_() for t in (x, w_fc, w_proj)]
    want = reference(*leaves)
    want_grads = torch.autograd.grad(want, leaves, upstream.float())
    assert _rel_err(got, want) < tol
    for g, w in zip(got_grads, want_grads):
        assert _rel_err(g, w) < tol


def check_fused_mlp_fp8_autograd(device, dtype, tol):
    _check_fused_mlp_autograd(device, dtype, tol, True, ts.relu_square_mlp_fp8_reference)


def check_fused_mlp_fp8_down_autograd(device, dtype, tol):
    """Record #89: both MLP products in FP8 (delayed scales given), straight-through bf16
    backward, and the largest post for the next act_scale, against the plain-PyTorch reference."""
    x = _randn(2, 70, 64, device=device, dtype=dtype).requires_grad_()
    w_fc = _randn(256, 64, device=device, dtype=dtype, scale=0.1, seed=1).requires_grad_()
    w_proj = _randn(256, 64, device=device, dtype=dtype, scale=0.1, seed=2).requires_grad_()
    upstream = _randn(2, 70, 64, device=device, dtype=dtype, seed=3)
    act_scale = torch.tensor([0.02], device=device)      # some posts clip at 448
    w_scale = (w_proj.detach().float().abs().amax() / 300).reshape(1)
    got, amax = ts._FusedReluSquareMLP.apply(x, w_fc, w_proj, True, act_scale, w_scale)
    got_grads = torch.autograd.grad(got, (x, w_fc, w_proj), upstream)
    leaves = [t.detach().float().requires_grad_() for t in (x, w_fc, w_proj)]
    want, want_amax = ts.relu_square_mlp_fp8_reference(*leaves, (act_scale, w_scale))
    want_grads = torch.autograd.grad(want, leaves, upstream.float())
    assert got.dtype == dtype and _rel_err(got, want) < tol
    assert _rel_err(amax, want_amax) < tol
    for g, w in zip(got_grads, want_grads):
        assert _rel_err(g, w) < tol


def check_fused_mlp_autograd(device, dtype, tol):
    _check_fused_mlp_autograd(device, dtype, tol, False, ts.relu_square_mlp_reference)


def check_softcapped_ce_kernels(device, dtype, tol):
    vocab = 2100  # not a multiple of the 1024-wide column block
    logits = _randn(37, vocab, device=device, dtype=dtype, scale=4.0)
    targets = torch.randint(0, vocab, (37,), generator=torch.Generator().manual_seed(0)).to(device)
    targets[5] = targets[6] = targets[7]   # one row whose MTP targets are all the same token
    for weights in ([1.0], [1.0, 0.5, 0.25], [1.0, 0.0, 0.0], [1.0, 0.5, 0.25, 0.125, 0.1]):
        mtp = torch.tensor(weights, device=device)
        exact_logits = logits.float().requires_grad_()
        want = ts.mtp_losses_from_logits(exact_logits, targets, mtp)
        (want_grad,) = torch.autograd.grad(want.sum(), exact_logits)
        # one program per row, and fewer programs than rows (each takes several rows in turn)
        for programs_per_sm in (64, 1):
            losses, got = ts._softcapped_ce_fwd_bwd_triton(logits, targets, mtp, 2.0, dtype,
                                                           programs_per_sm=programs_per_sm)
            assert _rel_err(losses, want) < tol
            assert _rel_err(got, 2.0 * want_grad) < tol
        # a 256-wide column block: the row is 9 blocks, the last one partial
        losses, got = ts._softcapped_ce_fwd_bwd_triton(logits, targets, mtp, 2.0, dtype, block=256)
        assert _rel_err(got, 2.0 * want_grad) < tol
        assert torch.equal(ts._transpose_triton(got, tile=(16, 32)), got.T)
        # record #88: the prefix-token term; rows without one (-1), one prefix on its row's own
        # MTP target column (both weights land on one logit)
        prefix = torch.randint(-1, vocab, (37,), generator=torch.Generator().manual_seed(1)).to(device)
        prefix[3], prefix[9] = -1, targets[9]
        prefix_weight = torch.tensor([0.25], device=device)
        want = ts.mtp_losses_from_logits(exact_logits, targets, mtp, prefix, prefix_weight)
        (want_grad,) = torch.autograd.grad(want.sum(), exact_logits)
        losses, got = ts._softcapped_ce_fwd_bwd_triton(logits, targets, mtp, 2.0, dtype,
                                                       prefix_targets=prefix, prefix_weight=prefix_weight)
        assert _rel_err(losses, want) < tol
        assert _rel_err(got, 2.0 * want_grad) < tol


def check_fused_loss_autograd(device, dtype, tol):
    x = _randn(40, 32, device=device, dtype=dtype).requires_grad_()
    w_t = _randn(32, 1500, device=device, dtype=dtype, scale=0.3, seed=1).requires_grad_()
    targets = torch.randint(0, 1500, (40,), generator=torch.Generator().manual_seed(0)).to(device)
    mtp = torch.tensor([1.0, 0.5, 0.25], device=device)
    # the incoming gradient of the summed loss (the loop's 1/accum) reaches both matmuls
    upstream = torch.tensor(0.375, device=device)
    prefix = torch.randint(-1, 1500, (40,), generator=torch.Generator().manual_seed(2)).to(device)
    prefix_weight = torch.tensor([0.25], device=device)
    got = ts._FusedSoftcappedMTPLoss.apply(x, targets, mtp, w_t, 1.0, 1.0, 1.0, False, prefix, prefix_weight)
    got_grads = torch.autograd.grad(got, (x, w_t), upstream)
    leaves = [t.detach().float().requires_grad_() for t in (x, w_t)]
    want = ts.softcapped_mtp_loss_reference(leaves[0], targets, mtp, leaves[1], 1, 1, 1, False,
                                            prefix, prefix_weight).sum()
    want_grads = torch.autograd.grad(want, leaves, upstream)
    assert got.dim() == 0 and _rel_err(got, want) < tol
    for g, w in zip(got_grads, want_grads):
        assert _rel_err(g, w) < tol


def check_ops_trace_under_compile(device, dtype, tol):
    """Dynamo traces the Triton launches (fullgraph) and the compiled graph gives eager's values.
    GPU only: interpreted kernels are plain Python that Dynamo cannot capture."""
    x = _randn(2, 20, 64, device=device, dtype=dtype).requires_grad_()
    w_fc = _randn(256, 64, device=device, dtype=dtype, scale=0.1, seed=1).requires_grad_()
    w_proj = _randn(256, 64, device=device, dtype=dtype, scale=0.1, seed=2).requires_grad_()
    targets = torch.randint(0, 300, (40,), generator=torch.Generator().manual_seed(0)).to(device)
    w_t = _randn(64, 300, device=device, dtype=dtype, scale=0.3, seed=3).requires_grad_()
    mtp = torch.tensor([1.0, 0.5], device=device)

    def loss_fn(x, w_fc, w_proj, w_t):
        h = ts._FusedReluSquareMLP.apply(x, w_fc, w_proj).flatten(0, 1)
        return ts._FusedSoftcappedMTPLoss.apply(h, targets, mtp, w_t, 1.0, 1.0, 1.0, False)

    compiled = torch.compile(loss_fn, backend="aot_eager", fullgraph=True)
    params = (x, w_fc, w_proj, w_t)
    eager_loss = loss_fn(*params)
    eager_grads = torch.autograd.grad(eager_loss, params)
    compiled_loss = compiled(*params)
    compiled_grads = torch.autograd.grad(compiled_loss, params)
    assert _rel_err(compiled_loss, eager_loss) < 1e-6
    for g, w in zip(compiled_grads, eager_grads):
        assert _rel_err(g, w) < 1e-6
    # the DC correction (record #85), its softmax scale a tensor that changes between calls
    T, H, D = 40, 6, 128
    y, q, k, v = (_randn(T, H, D, device=device, dtype=dtype, seed=s).requires_grad_() for s in range(4))
    w1, w2 = (_randn(T, H, device=device, dtype=dtype, seed=s).requires_grad_() for s in (4, 5))
    doc_ids = torch.tensor([0] * 15 + [1] * 25, device=device, dtype=torch.int32)
    dc = lambda scale: ts._DCCorrection.apply(y, q, k, v, w1, w2, doc_ids, scale, 112).float().square().sum()
    compiled_dc = torch.compile(dc, backend="aot_eager", fullgraph=True)
    for value in (0.12, 0.15):
        scale = torch.tensor(value, device=device)
        assert _rel_err(compiled_dc(scale), dc(scale)) < 1e-6


# (T, H, D, window, document lengths, block_m): a 1-token document, boundaries inside query
# blocks, T not a multiple of the block, T below the window, window 1, 32-query blocks, and the
# record's H 6, D 128, window 112
DC_CASES = [
    (50, 2, 16, 7, [1, 12, 20, 17], 16),
    (37, 6, 32, 20, [5, 1, 31], 16),
    (9, 2, 32, 24, [9], 16),
    (45, 6, 16, 1, [20, 1, 24], 16),
    (70, 2, 16, 40, [33, 37], 32),
    (300, 6, 128, 112, [100, 1, 150, 49], 16),
]


def check_dc_correction(device, dtype, tol):
    """Record #85: the DC correction's output and the gradients of y, q, k, v, w1, w2 from the
    Triton kernels against the reference's autograd in fp32 on the same (rounded) inputs; q, k, v
    strided views of one projection, as in the model."""
    for case, (T, H, D, window, docs, block_m) in enumerate(DC_CASES):
        seed = 10 * case
        y = _randn(T, H, D, device=device, dtype=dtype, seed=seed)
        q, k, v = _randn(T, 3, H, D, device=device, dtype=dtype, seed=seed + 1).unbind(1)
        w1 = (1 + _randn(T, H, device=device, dtype=torch.float32, scale=0.3, seed=seed + 2)).to(dtype)
        w2 = _randn(T, H, device=device, dtype=dtype, scale=0.5, seed=seed + 3)
        doc_ids = torch.repeat_interleave(torch.arange(len(docs)), torch.tensor(docs)).to(device, torch.int32)
        scale = torch.tensor(2.0 / D ** 0.5, device=device)    # scores of std 2: neither flat nor one-hot
        upstream = _randn(T, H, D, device=device, dtype=dtype, seed=seed + 7)
        leaves = [t.detach().float().requires_grad_() for t in (y, q, k, v, w1, w2)]
        want = ts.dc_correction_reference(*leaves, doc_ids, scale, window)
        want_grads = torch.autograd.grad(want, leaves, upstream.float())
        if block_m == 16:   # the autograd Function the model calls
            leaves = [t.detach().clone().requires_grad_() for t in (y, q, k, v, w1, w2)]
            got = ts._DCCorrection.apply(*leaves, doc_ids, scale, window)
            got_grads = torch.autograd.grad(got, leaves, upstream)
        else:               # the launchers with another query block
            got, lse = ts._dc_correction_triton_forward(y, q, k, v, w1, w2, doc_ids, scale, window,
                                                        block_m=block_m)
            got_grads = (upstream, *ts._dc_correction_triton_backward(upstream, q, k, v, w1, w2, doc_ids,
                                                                      scale, lse, window, block_m=block_m))
        assert got.dtype == dtype and _rel_err(got, want) < tol, case
        for name, g, w in zip(("y", "q", "k", "v", "w1", "w2"), got_grads, want_grads):
            assert g.dtype == dtype and _rel_err(g, w) < tol, (case, name, _rel_err(g, w))
    with pytest.raises(ValueError, match="power of two"):     # a head dim tl.dot cannot take
        ts._dc_correction_triton_forward(y[:, :, :24], q[:, :, :24], k[:, :, :24], v[:, :, :24], w1, w2,
                                         doc_ids, scale, 4)


# checks that need what the interpreter gets wrong (fp32 -> e4m3 rounding, see above)
GPU_ONLY_CHECKS = {"check_fused_mlp_fp8_down_autograd"}

KERNEL_CHECKS = {f.__name__: f for f in (
    check_symmetric_gram, check_transpose_copy_and_add, check_linear_relu_square, check_fused_mlp_autograd,
    check_linear_relu_square_fp8, check_fused_mlp_fp8_autograd, check_fused_mlp_fp8_down_autograd,
    check_softcapped_ce_kernels, check_fused_loss_autograd, check_dc_correction, check_ops_trace_under_compile)}
INTERPRETER_CHECKS = sorted(set(KERNEL_CHECKS) - {"check_ops_trace_under_compile"} - GPU_ONLY_CHECKS)


@pytest.mark.parametrize("check", INTERPRETER_CHECKS)
def test_triton_kernel_under_cpu_interpreter(check):
    code = ("import test_speedrun_kernels as t, torch; "
            f"t.KERNEL_CHECKS[{check!r}]('cpu', torch.float32, 1e-5); print('PASSED')")
    env = dict(os.environ, TRITON_INTERPRET="1",
               PYTHONPATH=os.pathsep.join([str(REPO), str(REPO / "tests"),
                                           os.environ.get("PYTHONPATH", "")]))
    result = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True,
                            timeout=300)
    assert result.returncode == 0 and "PASSED" in result.stdout, result.stderr[-3000:]


# ---- GPU: bf16 Triton kernels vs references (run: python3 -m pytest -m gpu tests/test_speedrun_kernels.py)

gpu = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")


@pytest.fixture
def triton_on():
    """Force the Triton paths even if a test elsewhere switched them off."""
    saved = ts.USE_TRITON_KERNELS
    ts.USE_TRITON_KERNELS = True
    yield
    ts.USE_TRITON_KERNELS = saved


@pytest.mark.gpu
@gpu
@pytest.mark.parametrize("check", sorted(KERNEL_CHECKS))
def test_triton_kernel_on_gpu_bf16(check, triton_on):
    # bf16 inputs and outputs, fp32 references on the same (rounded) inputs: ~1e-2 relative
    KERNEL_CHECKS[check]("cuda", torch.bfloat16, 2e-2)


@pytest.mark.gpu
@gpu
def test_polar_express_record_shapes_gpu(triton_on):
    """Bank chunk shapes of the record: attention (40, 768, 768), MLP (24, 3072, 768) with split."""
    for shape, split in [((8, 768, 768), False), ((4, 3072, 768), True)]:
        G = _randn(*shape, device="cuda", dtype=torch.float32, seed=shape[0])
        fast = ts.polar_express(G, split_baddbmm=split)
        ts.USE_TRITON_KERNELS = False
        slow = ts.polar_express(G, split_baddbmm=split)
        ts.USE_TRITON_KERNELS = True
        assert _rel_err(fast, slow) < 2e-2
        U, _, Vh = torch.linalg.svd(G.double(), full_matrices=False)
        polar = U @ Vh
        cosine = (fast.double() * polar).sum((-2, -1)) / (fast.double().norm(dim=(-2, -1)) * polar.norm(dim=(-2, -1)))
        assert cosine.min() > 0.9  # gaussian matrices: tiny singular values stay unconverged


@pytest.mark.gpu
@gpu
def test_linear_relu_square_tma_and_portable_agree_at_record_shapes(triton_on):
    x = _randn(4096 + 64, 768, device="cuda", dtype=torch.bfloat16)  # M not a tile multiple
    w = _randn(3072, 768, device="cuda", dtype=torch.bfloat16, scale=768 ** -0.5, seed=1)
    want_pre = x.float() @ w.float().T
    for use_tma in ([False, True] if torch.cuda.get_device_capability()[0] >= 9 else [False]):
        post = ts._linear_relu_square_triton(x, w, use_tma=use_tma)
        assert _rel_err(post, torch.relu(want_pre).square()) < 2e-2
        dpre = ts._linear_relu_square_triton(x, w, post=post, use_tma=use_tma)
        assert _rel_err(dpre, 2 * want_pre * torch.relu(want_pre)) < 2e-2


@pytest.mark.gpu
@gpu
@pytest.mark.skipif(not ts.fp8_supported("cuda") if torch.cuda.is_available() else True,
                    reason="needs FP8 (compute capability >= 8.9)")
def test_fp8_paths_match_references_gpu(triton_on):
    """The fused FP8 loss at record scales (x_s, w_s, grad_s of the record)."""
    rows, dim, vocab = 2048, 768, 50304
    x_s, w_s, grad_s = 100 / 448, 1.6 / 448, 0.75 / 448
    x = torch.nn.functional.rms_norm(_randn(rows, dim, device="cuda", dtype=torch.float32), (dim,))
    x = x.bfloat16().requires_grad_()
    w_t = _randn(dim, vocab, device="cuda", dtype=torch.bfloat16, scale=0.02, seed=1).requires_grad_()
    targets = torch.randint(0, 50257, (rows,), device="cuda")
    mtp = torch.tensor([1.0, 0.5, 0.25], device="cuda")
    exact = [t.detach().float().requires_grad_() for t in (x, w_t)]

    # fused loss: FP8 logits, e5m2 logits gradient scaled by 1/grad_s
    losses = ts.softcapped_mtp_loss_sum(x, targets, mtp, w_t, x_s, w_s, grad_s, use_fp8=True)
    ref = ts.softcapped_mtp_loss_reference(exact[0], targets, mtp, exact[1], x_s, w_s, grad_s, False).sum()
    assert _rel_err(losses, ref) < 1e-2
    # the loop's 1/accum (1/8 at one GPU) on the incoming gradient
    got = torch.autograd.grad(losses, (x, w_t), torch.tensor(0.125, device="cuda"))
    want = torch.autograd.grad(ref, exact, torch.tensor(0.125, device="cuda"))
    for g, w in zip(got, want):
        assert _rel_err(g, w) < 0.1

    # inside a compiled graph (Inductor) the same ops give the same loss
    compiled = torch.compile(ts.softcapped_mtp_loss_sum, fullgraph=True)
    again = compiled(x, targets, mtp, w_t, x_s, w_s, grad_s, True)
    assert _rel_err(again, losses) < 1e-3
    for g, w in zip(torch.autograd.grad(again, (x, w_t), torch.tensor(0.125, device="cuda")), got):
        assert _rel_err(g, w) < 1e-3
