"""benchmarks/fa3_standin/kernels.py: the FlexAttention stand-in for FA3's flash_attn_varlen_func
that lets upstream modded-nanogpt run without the `kernels` package. Checked against plain masked
attention (an explicit (T, T) mask and a softmax), block tables from bounds against
create_block_mask's, and inside torch.compile(dynamic=False, fullgraph=True) as upstream compiles
its model: training (backward) and no_grad evaluation.

CPU note: FlexAttention has no backward on CPU (torch 2.13 refuses inputs that require grad), so
on CPU a pass that needs gradients runs the stand-in's dense fallback (the same mask_mod through
SDPA); the no-grad pass runs flex_attention itself, eager and compiled. The GPU test covers flex's
backward in bf16 at upstream's shapes."""
import importlib.util
import math
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from hypothesis import given, settings, strategies as st

REPO = Path(__file__).resolve().parents[1]
STANDIN_DIR = REPO / "benchmarks" / "fa3_standin"


def _load():
    # loaded by path under its own name: a module called `kernels` on sys.path would shadow others
    spec = importlib.util.spec_from_file_location("fa3_standin_kernels", STANDIN_DIR / "kernels.py")
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module             # torch.compile looks the module up by name
    spec.loader.exec_module(module)
    return module


standin = _load()
# eager flex_attention on CPU (the reference-sized tests) warns that it is unfused: expected here
pytestmark = pytest.mark.filterwarnings("ignore:flex_attention called without torch.compile")
FA3 = standin.get_kernel("varunneal/flash-attention-3").flash_attn_interface


def naive_attention(q, k, v, cu, left, scale):
    """Reference: explicit (T, T) mask (same document, causal, at most `left` back), softmax."""
    T = q.size(0)
    offsets = cu.tolist()
    doc = torch.zeros(T, dtype=torch.long)
    for i, (a, b) in enumerate(zip(offsets[:-1], offsets[1:])):
        doc[a:b] = i
    pos = torch.arange(T)
    back = pos[:, None] - pos[None, :]
    allowed = (doc[:, None] == doc[None, :]) & (back >= 0)
    if left >= 0:
        allowed &= back <= left
    group = q.size(1) // k.size(1)
    k, v = k.repeat_interleave(group, dim=1), v.repeat_interleave(group, dim=1)
    scores = torch.einsum("thd,shd->hts", q.float(), k.float()) * scale
    scores = scores.masked_fill(~allowed, float("-inf"))
    return torch.einsum("hts,shd->thd", scores.softmax(dim=-1), v.float()).contiguous()


def call(q, k, v, cu, left, scale, fn=None):
    fn = fn or FA3.flash_attn_varlen_func
    T = q.size(0)
    return fn(q, k, v, cu_seqlens_q=cu, cu_seqlens_k=cu, max_seqlen_q=T, max_seqlen_k=T,
              causal=True, softmax_scale=scale, window_size=(left, 0))


def qkv(T, H=2, D=16, kv_heads=None, seed=0, grad=False):
    g = torch.Generator().manual_seed(seed)
    shapes = [(T, H, D), (T, kv_heads or H, D), (T, kv_heads or H, D)]
    return [torch.randn(s, generator=g).requires_grad_(grad) for s in shapes]


def cu_of(docs, pad_to=None):
    offsets = [0]
    for d in docs:
        offsets.append(offsets[-1] + d)
    offsets += [offsets[-1]] * 2                  # padded with the total, like upstream's loader
    return torch.tensor(offsets, dtype=torch.int32)


# ---- the entry point against the naive reference ------------------------------------------------

DOCS = (100, 1, 150, 133)                         # 384 tokens; a one-token document
WINDOWS = (-1, 0, 1, 5, 127, 128, 129, 300, 1000)


@pytest.mark.parametrize("left", WINDOWS)
def test_matches_naive_attention(left):
    q, k, v = qkv(sum(DOCS))
    cu = cu_of(DOCS)
    out = call(q, k, v, cu, left, 0.3)
    assert out.shape == q.shape and out.is_contiguous()
    torch.testing.assert_close(out, naive_attention(q, k, v, cu, left, 0.3), atol=2e-5, rtol=1e-4)


@pytest.mark.parametrize("method", standin.MASK_METHODS)
def test_both_mask_methods_match_naive(method, monkeypatch):
    monkeypatch.setattr(standin, "MASK_METHOD", method)
    docs = (300, 200, 12)
    q, k, v = qkv(sum(docs), H=3, D=8, seed=3)
    cu = cu_of(docs)
    for left in (-1, 64, 200):
        torch.testing.assert_close(call(q, k, v, cu, left, 0.25), naive_attention(q, k, v, cu, left, 0.25),
                                   atol=2e-5, rtol=1e-4)


def test_length_not_a_multiple_of_the_tile():
    docs = (70, 90, 40)                           # 200 tokens: padded to 256 inside, rows dropped
    q, k, v = qkv(sum(docs), seed=5)
    cu = cu_of(docs)
    out = call(q, k, v, cu, 50, 0.2)
    assert out.shape == q.shape
    torch.testing.assert_close(out, naive_attention(q, k, v, cu, 50, 0.2), atol=2e-5, rtol=1e-4)


def test_default_scale_and_grouped_query_heads():
    docs = (128, 256)
    q, k, v = qkv(sum(docs), H=4, kv_heads=2, D=16, seed=7)
    cu = cu_of(docs)
    T = q.size(0)
    out = FA3.flash_attn_varlen_func(q, k, v, cu, cu, T, T, causal=True, window_size=(64, 0))
    torch.testing.assert_close(out, naive_attention(q, k, v, cu, 64, 1 / math.sqrt(16)), atol=2e-5, rtol=1e-4)


def test_unpadded_offsets_and_leading_empty_document():
    q, k, v = qkv(256, seed=9)
    cu = torch.tensor([0, 0, 100, 256], dtype=torch.int32)       # no trailing repeats; an empty first doc
    torch.testing.assert_close(call(q, k, v, cu, -1, 0.3), naive_attention(q, k, v, cu, -1, 0.3),
                               atol=2e-5, rtol=1e-4)


def test_gradients_match_naive():
    """CPU: the dense fallback (flex has no CPU backward); the same mask_mod and document ids."""
    q, k, v = qkv(sum(DOCS), seed=11, grad=True)
    cu = cu_of(DOCS)
    w = torch.randn(q.shape, generator=torch.Generator().manual_seed(1))
    (call(q, k, v, cu, 129, 0.3) * w).sum().backward()
    got = [t.grad.clone() for t in (q, k, v)]
    for t in (q, k, v):
        t.grad = None
    (naive_attention(q, k, v, cu, 129, 0.3) * w).sum().backward()
    for a, b in zip(got, (q.grad, k.grad, v.grad)):
        torch.testing.assert_close(a, b, atol=5e-5, rtol=1e-4)


def test_refuses_what_it_does_not_implement():
    q, k, v = qkv(128)
    cu = cu_of((128,))
    with pytest.raises(NotImplementedError, match="causal"):
        FA3.flash_attn_varlen_func(q, k, v, cu, cu, 128, 128, causal=False)
    with pytest.raises(NotImplementedError, match="softcap"):
        FA3.flash_attn_varlen_func(q, k, v, cu, cu, 128, 128, causal=True, softcap=30.0)
    # FA3 options left at their defaults are accepted
    FA3.flash_attn_varlen_func(q, k, v, cu, cu, 128, 128, causal=True, softcap=0.0, deterministic=False)
    with pytest.raises(ValueError, match="no stand-in"):
        standin.get_kernel("kernels-community/activation")


def test_mask_method_env(monkeypatch):
    monkeypatch.setenv("FA3_STANDIN_MASK", "nonsense")
    with pytest.raises(ValueError, match="FA3_STANDIN_MASK"):
        standin.mask_method()
    monkeypatch.delenv("FA3_STANDIN_MASK")
    assert standin.mask_method() == "bounds"
    monkeypatch.setenv("FA3_STANDIN_TABLES", "nonsense")
    with pytest.raises(ValueError, match="FA3_STANDIN_TABLES"):
        standin.table_mode()
    monkeypatch.setenv("FA3_STANDIN_TABLES", "op")
    assert standin.table_mode() == "op"


def test_dense_method_refuses_long_sequences():
    cu = cu_of((standin.DENSE_MAX_TOKENS + 128,))
    with pytest.raises(ValueError, match="bounds"):
        standin.build_block_mask(cu, standin.DENSE_MAX_TOKENS + 128, 128, "dense")


# ---- block tables: from bounds == create_block_mask ------------------------------------------------

def dense_tiles(num, idx):
    """(n_rows, n_cols) 0/1 matrix of the tiles a (count, indices) table lists."""
    num, idx = num[0, 0], idx[0, 0]
    n_rows, n_cols = idx.shape
    out = torch.zeros(n_rows, n_cols, dtype=torch.int32)
    for r in range(n_rows):
        listed = idx[r, : int(num[r])].long()
        assert len(set(listed.tolist())) == len(listed), "a tile listed twice"
        out[r, listed] = 1
    return out


def assert_same_tiles(a, b):
    for name in ("kv", "full_kv", "q", "full_q"):
        num_a, idx_a = getattr(a, f"{name}_num_blocks"), getattr(a, f"{name}_indices")
        num_b, idx_b = getattr(b, f"{name}_num_blocks"), getattr(b, f"{name}_indices")
        assert torch.equal(dense_tiles(num_a, idx_a), dense_tiles(num_b, idx_b)), name
        if name == "kv":   # the kernel walks partial tiles in listed order: ascending both ways
            for r in range(num_a.shape[-1]):
                n = int(num_a[0, 0, r])
                assert torch.equal(idx_a[0, 0, r, :n], idx_b[0, 0, r, :n])


def check_tables(docs, left, block, length=None):
    length = length or -(-sum(docs) // block) * block
    cu = cu_of(docs)
    bounds = standin.build_block_mask(cu, length, left, "bounds", block=block)
    dense = standin.build_block_mask(cu, length, left, "dense", block=block)
    assert_same_tiles(bounds, dense)
    return bounds


@pytest.mark.parametrize("left", WINDOWS)
def test_bound_tables_equal_create_block_mask(left):
    check_tables(DOCS, left, block=128)
    check_tables((40, 40, 300, 3, 1, 125), left, block=16)


@settings(max_examples=60, deadline=None)
@given(docs=st.lists(st.integers(1, 90), min_size=1, max_size=12),
       left=st.one_of(st.just(-1), st.integers(0, 200)),
       block=st.sampled_from([8, 16, 32]),
       pad=st.integers(0, 40))
def test_bound_tables_equal_create_block_mask_random(docs, left, block, pad):
    total = sum(docs) + pad                       # pad: positions past the last offset
    length = -(-total // block) * block
    check_tables(docs, left, block, length=length)


def test_forward_only_tables_skip_the_transpose():
    cu = cu_of((100, 156))
    mask = standin.build_block_mask(cu, 256, 64, "bounds", with_backward=False)
    assert mask.q_num_blocks is None and mask.full_q_num_blocks is None


def test_validation_length_is_cheap():
    """Upstream's validation forward: 524,288 tokens per rank with paired heads (2 x 262,144).
    From bounds that is O(T) + O((T/128)^2) work, not 2.7e11 mask evaluations."""
    import time
    T = 2 * 262144
    lengths = torch.randint(200, 3000, (400,), generator=torch.Generator().manual_seed(0))
    offsets = torch.cat([torch.zeros(1, dtype=torch.long), lengths.cumsum(0)])
    offsets = offsets[offsets < T]
    cu = torch.cat([offsets, torch.full((8,), T)]).to(torch.int32)
    start = time.perf_counter()
    mask = standin.build_block_mask(cu, T, 13 * 128, "bounds", with_backward=False)
    assert time.perf_counter() - start < 30
    n = T // 128
    assert mask.kv_num_blocks.shape == (1, 1, n)
    # a query tile sees at most the window's 13 tiles, the one it starts in and the diagonal
    assert int((mask.kv_num_blocks + mask.full_kv_num_blocks).max()) <= 13 + 2


# ---- inside torch.compile, as upstream uses it --------------------------------------------------

class UpstreamLikeAttention(torch.nn.Module):
    """The shape of upstream's CausalSelfAttention around the FA3 call: packed (1, T, dim) input,
    q/k/v from one linear, the window and scale as Python numbers from the schedule, optional
    paired heads (the sequence doubled, windows in the doubled positions)."""

    def __init__(self, dim=32, heads=4, paired=False):
        super().__init__()
        self.heads, self.head_dim, self.paired = heads, dim // heads, paired
        self.qkv = torch.nn.Linear(dim, 3 * dim, bias=False)
        self.out = torch.nn.Linear(dim, dim, bias=False)
        self.window = 64                 # python ints/floats changed by the schedule (recompiles)
        self.attn_scale = 0.12

    def forward(self, x, seqlens, fn):
        B, T = x.shape[:2]
        q, k, v = self.qkv(x).view(B, T, 3 * self.heads, self.head_dim).chunk(3, dim=-2)
        q, k = F.rms_norm(q, (self.head_dim,)), F.rms_norm(k, (self.head_dim,))
        heads, length = self.heads, T
        if self.paired:
            q, k, v = (t.reshape(B, 2 * T, self.heads // 2, self.head_dim) for t in (q, k, v))
            heads, length, seqlens = self.heads // 2, 2 * T, 2 * seqlens
        y = fn(q[0], k[0], v[0], cu_seqlens_q=seqlens, cu_seqlens_k=seqlens, max_seqlen_q=length,
               max_seqlen_k=length, causal=True, softmax_scale=self.attn_scale,
               window_size=(self.window, 0))
        y = y.view(B, T, self.heads * self.head_dim)
        return self.out(y)


def naive_fn(q, k, v, cu_seqlens_q, cu_seqlens_k, max_seqlen_q, max_seqlen_k, causal, softmax_scale,
             window_size):
    return naive_attention(q, k, v, cu_seqlens_q, window_size[0], softmax_scale)


@pytest.fixture(scope="module")
def compile_setup():
    torch._dynamo.reset()
    yield
    torch._dynamo.reset()


@pytest.mark.slow       # ~50 s on 2 CPU cores with a cold Inductor cache (each window: 2 graphs)
@pytest.mark.parametrize("paired", [False, True])
def test_compiled_train_and_eval_match_reference(paired, compile_setup):
    torch.manual_seed(0)
    model = UpstreamLikeAttention(paired=paired)
    compiled = torch.compile(model, dynamic=False, fullgraph=True)
    T = 256
    x = torch.randn(1, T, 32)
    seqlens = cu_of((90, 100, 66))

    def grads(out):
        model.zero_grad(set_to_none=True)
        out.square().sum().backward()
        return [p.grad.clone() for p in model.parameters()]

    schedule = ((64, 0.12), (192, 0.15)) if not paired else ((192, 0.15),)
    for window, scale in schedule:                         # a schedule change: a new graph
        model.window, model.attn_scale = window, scale
        ref = model(x, seqlens, naive_fn)
        ref_grads = grads(ref)
        model.train()
        out = compiled(x, seqlens, FA3.flash_attn_varlen_func)
        torch.testing.assert_close(out, ref, atol=5e-5, rtol=1e-4)
        for a, b in zip(grads(out), ref_grads):
            torch.testing.assert_close(a, b, atol=5e-5, rtol=1e-4)
        model.eval()
        with torch.no_grad():                              # upstream's validation: flex proper on CPU
            out = compiled(x, seqlens, FA3.flash_attn_varlen_func)
        torch.testing.assert_close(out, ref.detach(), atol=5e-5, rtol=1e-4)


@pytest.mark.parametrize("with_backward", [False, True])
def test_compiled_bound_tables_equal_eager(with_backward, compile_setup):
    """The mask construction traced into a graph (from_kv_blocks and the transposed tables that
    the GPU backward reads) gives the eager tables."""
    cu = cu_of((300, 200, 12, 0, 256))
    length = 768

    def tables(cu):
        m = standin.build_block_mask(cu, length, 200, "bounds", block=32, with_backward=with_backward)
        return tuple(getattr(m, f"{name}_{part}") for name in ("kv", "full_kv", "q", "full_q")
                     for part in ("num_blocks", "indices"))

    got = torch.compile(tables, dynamic=False, fullgraph=True)(cu)
    want = tables(cu)
    assert len(got) == len(want)
    for a, b in zip(got, want):
        if b is None:
            assert a is None
        else:
            assert torch.equal(a, b)


def test_table_op_matches_graph_tables(compile_setup):
    """FA3_STANDIN_TABLES=op: the same tables out of a custom op, eager and traced."""
    cu = cu_of((300, 200, 12, 0, 256))
    length = 768
    for left in (-1, 0, 100, 300):
        graph = standin.build_block_mask(cu, length, left, block=32)
        op = standin.build_block_mask(cu, length, left, block=32, tables="op")
        assert_same_tiles(graph, op)

    def tables(cu):
        m = standin.build_block_mask(cu, length, 200, block=32, tables="op")
        return m.kv_num_blocks, m.kv_indices, m.full_q_num_blocks, m.full_q_indices

    got = torch.compile(tables, dynamic=False, fullgraph=True)(cu)
    for a, b in zip(got, tables(cu)):
        assert torch.equal(a, b)


@pytest.mark.parametrize("setting, value, seed", [("TABLE_MODE", "op", 17), ("MASK_METHOD", "dense", 13)],
                         ids=["table_op", "dense_method"])
def test_compiled_no_grad_variants(monkeypatch, compile_setup, setting, value, seed):
    """The fallback block-table op and the create_block_mask path, each inside a compiled no_grad graph."""
    monkeypatch.setattr(standin, setting, value)
    q, k, v = qkv(384, seed=seed)
    cu = cu_of((200, 184))
    fn = torch.compile(lambda q, k, v, cu: call(q, k, v, cu, 100, 0.3), dynamic=False, fullgraph=True)
    with torch.no_grad():
        out = fn(q, k, v, cu)
    torch.testing.assert_close(out, naive_attention(q, k, v, cu, 100, 0.3), atol=2e-5, rtol=1e-4)


def test_importable_as_kernels_from_pythonpath():
    """What upstream does once the folder is on PYTHONPATH; FA3_STANDIN_MASK is read at import."""
    code = ("import kernels\n"
            "fa = kernels.get_kernel('varunneal/flash-attention-3').flash_attn_interface\n"
            "print(callable(fa.flash_attn_varlen_func), kernels.MASK_METHOD)\n")
    env = dict(os.environ, PYTHONPATH=str(STANDIN_DIR), FA3_STANDIN_MASK="dense")
    result = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True,
                            timeout=300, cwd="/")
    assert result.returncode == 0, result.stderr
    assert result.stdout.strip() == "True dense"


# ---- GPU (python3 -m pytest -m gpu tests/test_fa3_standin.py) ----------------------------------

needs_gpu = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")


def per_document_reference(q, k, v, cu, left, scale):
    """fp32 reference one document at a time (long packed sequences: no (T, T) mask)."""
    out = torch.empty_like(q, dtype=torch.float32)
    offsets = sorted(set(cu.tolist()))
    for a, b in zip(offsets[:-1], offsets[1:]):
        n = b - a
        pos = torch.arange(n, device=q.device)
        back = pos[:, None] - pos[None, :]
        allowed = (back >= 0) & ((back <= left) if left >= 0 else True)
        qa, ka, va = (t[a:b].float().transpose(0, 1) for t in (q, k, v))
        out[a:b] = F.scaled_dot_product_attention(qa, ka, va, attn_mask=allowed, scale=scale).transpose(0, 1)
    return out


def record_like_offsets(T, device, seed=0, max_doc=2048):
    g = torch.Generator().manual_seed(seed)
    offsets = [0]
    while offsets[-1] < T:
        offsets.append(min(T, offsets[-1] + int(torch.randint(50, max_doc + 1, (1,), generator=g))))
    return torch.tensor(offsets + [T] * 4, dtype=torch.int32, device=device)


@pytest.mark.gpu
@needs_gpu
@pytest.mark.parametrize("left,paired", [(128 * 1, False), (128 * 3, True), (128 * 13, False)])
def test_gpu_bf16_upstream_shapes_train(left, paired):
    """Stage-1 micro-batch: 16,384 tokens, 6 heads x 128 (paired: 32,768 x 3), bf16, compiled."""
    torch._dynamo.reset()
    T, H, D = (32768, 3, 128) if paired else (16384, 6, 128)
    g = torch.Generator(device="cuda").manual_seed(0)
    q, k, v = (torch.randn(T, H, D, device="cuda", dtype=torch.bfloat16, generator=g).requires_grad_()
               for _ in range(3))
    cu = record_like_offsets(T, "cuda")
    fn = torch.compile(lambda q, k, v, cu: call(q, k, v, cu, left, 0.12), dynamic=False, fullgraph=True)
    out = fn(q, k, v, cu)
    assert out.dtype == torch.bfloat16 and out.shape == (T, H, D)
    ref = per_document_reference(q, k, v, cu, left, 0.12)
    torch.testing.assert_close(out.float(), ref, atol=2e-2, rtol=2e-2)
    w = torch.randn(out.shape, device="cuda", generator=g)
    grads = torch.autograd.grad((out.float() * w).sum(), (q, k, v))
    ref_grads = torch.autograd.grad((ref * w).sum(), (q, k, v))
    for a, b in zip(grads, ref_grads):
        torch.testing.assert_close(a.float(), b.float(), atol=5e-2, rtol=5e-2)


@pytest.mark.gpu
@needs_gpu
def test_gpu_bf16_validation_length_no_grad():
    """Validation forward on one GPU: 262,144 tokens per micro-batch (paired: 524,288), no_grad."""
    torch._dynamo.reset()
    T, H, D = 2 * 262144, 3, 128
    g = torch.Generator(device="cuda").manual_seed(1)
    q, k, v = (torch.randn(T, H, D, device="cuda", dtype=torch.bfloat16, generator=g) for _ in range(3))
    cu = record_like_offsets(T, "cuda", seed=1)
    fn = torch.compile(lambda q, k, v, cu: call(q, k, v, cu, 20 * 128, 0.12), dynamic=False, fullgraph=True)
    with torch.no_grad():
        out = fn(q, k, v, cu)
        ref = per_document_reference(q, k, v, cu, 20 * 128, 0.12)
    torch.testing.assert_close(out.float(), ref, atol=2e-2, rtol=2e-2)
