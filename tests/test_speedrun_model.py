"""Model and attention sections of train_speedrun.py: structure, init, forward/backward, the
paired-head / key-offset / rotary mechanics against direct per-head formulations, YaRN, window
masks, block masks built from bounds, backend agreement and compile behaviour (traced with
torch.compile's "eager" backend so it stays fast on CPU)."""
import math

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from hypothesis import given, settings, strategies as st
from torch.nn.attention.flex_attention import BlockMask, create_block_mask

import train_speedrun as ts

SMALL_VOCAB = 1000          # padded to 1024 inside GPT: fast heads for CPU tests


def small_cfg(**overrides):
    values = dict(vocab_size=SMALL_VOCAB, bigram_vocab_size=1031, max_seq_len=1024, val_max_len=512)
    values.update(overrides)
    return ts.ModelConfig.smoke(**values)


def make_model(seed=0, perturb=True, **overrides):
    """Tiny GPT; perturb=True gives the zero-initialised tensors (gates, value/bigram embeddings,
    MLP out projections, smear/x0 lambdas) small random values so every path carries signal."""
    torch.manual_seed(seed)
    model = ts.GPT(small_cfg(**overrides))
    if perturb:
        with torch.no_grad():
            for p in model.parameters():
                p.add_(0.02 * torch.randn_like(p))
    return model


def batch(T=256, docs=(100, 60, 96), seed=1, vocab=SMALL_VOCAB):
    g = torch.Generator().manual_seed(seed)
    inputs = torch.randint(0, vocab, (T,), generator=g, dtype=torch.int32)
    targets = torch.randint(0, vocab, (T,), generator=g)
    offsets = np.cumsum((0,) + tuple(docs)).tolist()
    assert offsets[-1] == T
    cu = torch.tensor(offsets + [T, T], dtype=torch.int32)     # padded like the loader's
    return inputs, targets, cu


def sched(short=128, long=384, mtp=(1.0, 0.5, 0.25), device="cpu"):
    return ts.ForwardScheduleConfig(torch.tensor(mtp, device=device), short, long)


# ---- structure ----------------------------------------------------------------------------------

RECORD_SHAPES = {
    "value_embeds": (5 * 50304, 768), "ve_gate_bank": (5, 6, 12),
    "qk_bank": (64, 256, 768), "vo_bank": (24, 768, 768), "mlp_bank": (12, 2, 3072, 768),
    "post_lambdas": (11, 2), "resid_lambdas": (11, 2),
    "scalars": (24,), "smear_gate.weight": (1, 12),
    "lm_head.weight": (768, 50304), "embed.weight": (50304, 768),
    "bigram_embed.weight": (50304 * 15 // 2, 768),
    "mudd_w1": (2, 64, 768), "mudd_w2": (2, 14, 64), "mudd_b2": (2, 14),
    "mudd_gate_w1": (2, 64, 768), "mudd_gate_w2": (2, 41, 64), "mudd_gate_b2": (2, 41), "mudd_gate_scale": (),
}
RECORD_LABELS = {
    "value_embeds": "value_embed", "qk_bank": "qk", "vo_bank": "vo", "mlp_bank": "mlp",
    "smear_gate.weight": "smear_gate", "lm_head.weight": "lm_head",
    "embed.weight": "embed", "bigram_embed.weight": "bigram_embed",
}


def test_record_config_parameters_names_shapes_labels():
    with torch.device("meta"):
        model = ts.GPT(ts.ModelConfig(world_size=8, max_seq_len=256))
    shapes = {n: tuple(p.shape) for n, p in model.named_parameters()}
    assert shapes == RECORD_SHAPES
    # the record's count at 2d218013 (#83), 8 ranks, its shapes summed by hand: #80's 546,964,658,
    # minus backout_lambda with its padding (scalars 32 -> 24), plus MUDD 98,304 + 1,792 + 28 (#81),
    # plus xsa_alphas 11 x 6 (#82), bigram table 251,520 x 768 -> 754,560 x 192 (#83) = 498,773,000;
    # #85: minus attn_gate_bank 720, skip_gate 12, x0/bigram lambdas 22, xsa_alphas 66; bigram
    # table -> 377,280 x 768; plus the MUDD gate 98,304 + 5,248 + 82 + 1
    assert sum(p.numel() for p in model.parameters()) == 643_751_335
    assert model.bigram_signs.shape == (8192, 768) and model.bigram_signs.dtype == torch.bfloat16
    for name, p in model.named_parameters():
        assert p.label == RECORD_LABELS.get(name, name)
    # record #80: W_q/W_k per pair of heads (60 matrices + 4 padding), W_v/W_o whole (20 + 4)
    assert model.qk_bank.reshape == (64, 256, 768) and model.vo_bank.reshape == (24, 768, 768)
    assert model.mlp_bank.reshape == (24, 3072, 768)
    assert model.lm_head.grad_s == pytest.approx(0.75 / 448)
    assert model.vocab_size == 50304


@pytest.mark.parametrize("world_size", [1, 2, 4, 8])
def test_scalars_padding_follows_the_record_formula(world_size):
    with torch.device("meta"):
        model = ts.GPT(small_cfg(world_size=world_size))
    assert model.scalars.numel() == 2 * 11 + 2 + (-2 * 11 - 2) % world_size   # record #81 on
    assert model.lm_head.grad_s == pytest.approx(0.75 / 448)   # per unit gradient of the summed loss


def test_layer_layout_is_the_records():
    specs = ts.record_layer_layout()
    assert [s.index for s in specs if not s.has_attn] == [6]
    assert [s.index for s in specs if s.paired] == [0, 2, 5, 9]
    assert [s.index for s in specs if s.long_window] == [3, 10]
    # record #70 shifted the first two value embeddings one layer up (layers 1, 2; then 8, 9, 10)
    assert [s.value_slot for s in specs] == [None, 0, 1, None, None, None, None, None, 2, 3, 4]
    assert [s.attn_slot for s in specs] == [0, 1, 2, 3, 4, 5, None, 6, 7, 8, 9]
    assert [s.index for s in specs if s.xsa] == [1, 3, 4, 7]    # record #85 (#82: 1, 3, 4, 7, 8, 10)


def test_mudd_gate_layout_is_the_records():
    """Record #85's fixed layouts, offsets as its unpack functions read them: pre (26) = XSA 1, 3,
    attention gate 3, then (x0, bigram) of layers 0..3; post (41) = XSA 4, 7, attention gate 10,
    (x0, bigram) of layers 4, 5, 7, 8, 9, skip at 28, DC w1 at 29:35 and w2 at 35:41."""
    pre, post = ts.mudd_gate_layout(6)

    def offsets(layout):
        out, start = {}, 0
        for name, (width, _) in layout.items():
            out[name] = (start, start + width)
            start += width
        return out, start
    pre_at, pre_n = offsets(pre)
    post_at, post_n = offsets(post)
    assert (pre_n, post_n) == (26, 41)
    assert pre_at["xsa_1"] == (0, 6) and pre_at["xsa_3"] == (6, 12) and pre_at["attn_gate_3"] == (12, 18)
    for j, layer in enumerate((0, 1, 2, 3)):
        assert pre_at[f"x0_{layer}"] == (18 + 2 * j, 19 + 2 * j)
        assert pre_at[f"bigram_{layer}"] == (19 + 2 * j, 20 + 2 * j)
    assert post_at["xsa_4"] == (0, 6) and post_at["xsa_7"] == (6, 12) and post_at["attn_gate_10"] == (12, 18)
    for j, layer in enumerate((4, 5, 7, 8, 9)):
        assert post_at[f"x0_{layer}"] == (18 + 2 * j, 19 + 2 * j)
        assert post_at[f"bigram_{layer}"] == (19 + 2 * j, 20 + 2 * j)
    assert post_at["skip"] == (28, 29) and post_at["dc_w1"] == (29, 35) and post_at["dc_w2"] == (35, 41)
    # the record's biases (stored / 0.1): attention gates 0.25, bigram 0.05, skip 0.5, DC w1 1.0
    inits = {name: init for layout in (pre, post) for name, (_, init) in layout.items()}
    assert inits["attn_gate_3"] == inits["attn_gate_10"] == 0.25 and inits["bigram_5"] == 0.05
    assert inits["skip"] == 0.5 and inits["dc_w1"] == 1.0 and inits["dc_w2"] == inits["xsa_7"] == inits["x0_0"] == 0


def test_init_matches_the_record():
    torch.manual_seed(0)
    model = ts.GPT(small_cfg()).requires_grad_(False)
    d = model.cfg.model_dim
    bound = 3 ** 0.5 * 0.5 * d ** -0.5
    for bank, used in ((model.qk_bank, model.num_qk_matrices), (model.vo_bank, model.num_vo_matrices)):
        assert bank[:used].abs().max() <= bound and bank[:used].std().item() == pytest.approx(0.5 * d ** -0.5, rel=0.05)
        assert bank[used:].abs().max() == 0 if bank.size(0) > used else True
    assert model.mlp_bank[:, 1].abs().max() == 0
    assert model.mlp_bank[:, 0].abs().max() <= bound
    assert torch.equal(model.embed.weight, model.lm_head.weight.T.float())
    assert model.lm_head.weight.float().std().item() == pytest.approx(0.005, rel=0.05)
    # record #70: value embeddings start as N(0, 0.01) gaussians (drawn in bf16, as recorded)
    assert model.value_embeds.dtype == torch.bfloat16
    assert model.value_embeds.float().std().item() == pytest.approx(0.01, rel=0.05)
    assert model.value_embeds.float().mean().abs().item() < 1e-3
    for zero in (model.bigram_embed.weight, model.ve_gate_bank, model.smear_gate.weight, model.mudd_gate_w2):
        assert zero.abs().max() == 0
    L = 11
    s = model.scalars
    assert torch.all(s[:2 * L:2] == 0.5) and torch.all(s[1:2 * L:2] == 1.0)
    assert s[2 * L:2 * L + 2].tolist() == [0.0, -1.5]          # smear, skip (backout went in #81)
    # records #73-#77: residual lambdas sqrt(1.1) per sublayer, every write 1.0
    assert torch.all(model.resid_lambdas == torch.tensor(1.1 ** 0.5))
    assert torch.equal(model.post_lambdas, torch.ones(L, 2))
    # record #85: the MUDD gate starts at its biases x its scale 0.1 (the record's bias layout)
    assert model.mudd_gate_scale.item() == pytest.approx(0.1)
    H = model.cfg.num_heads
    pre = [0.0] * (2 * H) + [0.25] * H + [0.0, 0.05] * 4
    post = [0.0] * (2 * H) + [0.25] * H + [0.0, 0.05] * 5 + [0.5] + [1.0] * H + [0.0] * H
    width = len(post)
    want = torch.tensor([pre + [0.0] * (width - len(pre)), post])
    assert model.mudd_gate_b2.shape == (2, width)
    torch.testing.assert_close(model.mudd_gate_b2 * 0.1, want)
    assert model.mudd_gate_w1.abs().max() <= d ** -0.5
    # record #81: MUDD output weights 0, so the coefficients start at their biases x 0.1
    assert model.mudd_w2.abs().max() == 0
    assert model.mudd_w1.abs().max() <= d ** -0.5 and model.mudd_w1.std() > 0.5 * d ** -0.5 / 3 ** 0.5
    first = [0, 0, 0, 0, 0, 0, 2.0, 2.0, 1.1 ** 0.5, 1.0, 0.0, 0.05, 1.1 ** 0.5, 1.0]
    head = [0, -0.5, 0, 0, 0] + [0] * 9
    torch.testing.assert_close(model.mudd_b2 * 0.1, torch.tensor([first, head]))


def test_init_draws_follow_record_81s_order():
    """One seed, the record's weights: the RNG draws in record #85's order (lm_head, embed's
    default init, value embeddings, qk/vo banks, MLP bank, smear Linear and bigram Embedding
    defaults, #83's sign table, MUDD W1, the MUDD gate's W1), replayed here by hand."""
    cfg = small_cfg(world_size=2)
    torch.manual_seed(7)
    model = ts.GPT(cfg)
    d, V, H, D = cfg.model_dim, model.vocab_size, cfg.num_heads, cfg.head_dim
    bound = 3 ** 0.5 * 0.5 * d ** -0.5
    torch.manual_seed(7)
    lm_head = torch.zeros(d, V, dtype=torch.bfloat16).normal_(0, 0.005)
    torch.empty(V, d).normal_()                                    # nn.Embedding's default
    value_embeds = 0.01 * torch.randn(5 * V, d, dtype=torch.bfloat16)
    qk = torch.empty(model.qk_bank.shape)
    qk[:model.num_qk_matrices].uniform_(-bound, bound)
    vo = torch.empty(model.vo_bank.shape)
    vo[:model.num_vo_matrices].uniform_(-bound, bound)
    mlp = torch.empty(12, 2, 4 * d, d)
    mlp[:, 0].uniform_(-bound, bound)
    torch.nn.Linear(12, 1, bias=False)                                # smear gate (skip gate gone in #85)
    torch.empty(cfg.bigram_vocab_size, cfg.bigram_dim).normal_()
    signs = torch.randn(8192, cfg.bigram_dim).sign().bfloat16()     # record #83's sign table
    w1 = torch.empty(2, 64, d)
    for block in range(2):
        torch.nn.init.kaiming_uniform_(w1[block], a=math.sqrt(5))
    gate_w1 = torch.empty(2, 64, d)
    for block in range(2):
        torch.nn.init.kaiming_uniform_(gate_w1[block], a=math.sqrt(5))
    assert torch.equal(model.lm_head.weight, lm_head)
    assert torch.equal(model.value_embeds, value_embeds)
    assert torch.equal(model.qk_bank[:model.num_qk_matrices], qk[:model.num_qk_matrices])
    assert torch.equal(model.vo_bank[:model.num_vo_matrices], vo[:model.num_vo_matrices])
    assert torch.equal(model.mlp_bank[:, 0], mlp[:, 0])
    assert torch.equal(model.mudd_w1, w1)
    assert torch.equal(model.mudd_gate_w1, gate_w1)
    assert torch.equal(model.bigram_signs, signs)


def test_same_seed_same_weights_and_cast_to_bf16():
    a, b = make_model(seed=3, perturb=False), make_model(seed=3, perturb=False)
    for (n, p), q in zip(a.named_parameters(), b.parameters()):
        assert torch.equal(p, q), n
    a.cast_to_bf16()
    fp32 = {n for n, p in a.named_parameters() if p.dtype == torch.float32}
    assert fp32 == {"post_lambdas", "resid_lambdas", "scalars", "mudd_gate_scale"}
    assert a.qk_bank.label == "qk" and a.qk_bank.reshape == (40, 32, 64)   # attrs survive
    assert a.vo_bank.label == "vo" and a.vo_bank.reshape == (20, 64, 64)


def test_config_errors_are_clear():
    with pytest.raises(ValueError, match="num_layers"):
        ts.ModelConfig(num_layers=12)
    with pytest.raises(ValueError, match="even"):
        ts.ModelConfig(num_heads=3, head_dim=256)
    with pytest.raises(ValueError, match="attn_backend"):
        ts.ModelConfig(attn_backend="xformers")


# ---- forward / backward -------------------------------------------------------------------------

def test_loss_at_init_is_log_vocab():
    model = make_model(perturb=False)
    inputs, targets, cu = batch()
    model.eval()
    with torch.no_grad():
        val = model(inputs, targets, cu, sched())
    assert val.item() == pytest.approx(math.log(1024), abs=0.02)
    model.train()
    train = model(inputs, targets, cu, sched(mtp=(1.0, 0.5, 0.25)))
    T = inputs.numel()
    terms = T + 0.5 * (T - 1) + 0.25 * (T - 2)      # MTP terms that stay inside the micro-batch
    assert train.item() == pytest.approx(terms * math.log(1024), rel=0.01)


def test_backward_reaches_every_parameter_and_spares_padding():
    model = make_model()
    inputs, targets, cu = batch()
    model(inputs, targets, cu, sched()).backward()
    for name, p in model.named_parameters():
        assert p.grad is not None and torch.isfinite(p.grad).all(), name
        assert p.grad.abs().sum() > 0, name
    assert model.mlp_bank.grad[11].abs().max() == 0          # padding layer of the MLP bank
    # record #80's banks: every used W_q/W_k block and W_v/W_o gets a gradient, padding none
    model = make_model(world_size=8)
    model(inputs, targets, cu, sched()).backward()
    for bank, used in ((model.qk_bank, model.num_qk_matrices), (model.vo_bank, model.num_vo_matrices)):
        per_matrix = bank.grad.abs().flatten(1).sum(1)
        assert (per_matrix[:used] > 0).all() and (per_matrix[used:] == 0).all()
    assert model.vo_bank.size(0) == 24 and model.num_vo_matrices == 20
    used_rows = 5 * 1024
    assert model.value_embeds.grad[inputs.long()].abs().sum() > 0
    assert model.value_embeds.grad.numel() == used_rows * model.cfg.model_dim


def test_bf16_model_forward_is_finite():
    model = make_model().cast_to_bf16()
    inputs, targets, cu = batch()
    loss = model(inputs, targets, cu, sched())
    loss.backward()
    assert torch.isfinite(loss) and model.qk_bank.grad.dtype == torch.bfloat16


def test_fp8_config_changes_training_forward_only(monkeypatch):
    """use_fp8 (record #84 adds the MLP up-projection to the lm_head): training forwards use the
    FP8 references on CPU and differ a little; evaluation never uses FP8."""
    inputs, targets, cu = batch()
    losses = {}
    for fp8 in (False, True):
        model = make_model(seed=4, use_fp8=fp8)
        model.eval()
        with torch.no_grad():
            losses[fp8, "eval"] = model(inputs, targets, cu, sched()).item()
        model.train()
        losses[fp8, "train"] = model(inputs, targets, cu, sched()).item()
    assert losses[True, "eval"] == losses[False, "eval"]
    assert losses[True, "train"] != losses[False, "train"]
    assert losses[True, "train"] == pytest.approx(losses[False, "train"], rel=0.02)
    calls = []
    monkeypatch.setattr(ts, "relu_square_mlp_fp8_reference", lambda x, w_fc, w_proj, down_scales:
                        calls.append(1) or (ts.relu_square_mlp_reference(x, w_fc, w_proj), torch.ones(1)))
    model.train()
    model(inputs, targets, cu, sched())
    assert len(calls) == 11                      # every layer's MLP


def test_fp8_down_projection_scales_are_delayed(monkeypatch):
    """Record #89: a training forward quantizes each layer's post with the scale its previous
    forward left (1.0 at first), then leaves largest post x 1.8 / 448 for the next one; W_proj's
    scale is the current largest entry / 448 while bootstrapping, else the one noted (x 1.12) at
    the previous refresh."""
    model = make_model(seed=4, use_fp8=True).train()
    inputs, targets, cu = batch()
    seen = []
    real = ts.relu_square_mlp_fp8_reference
    def spy(x, w_fc, w_proj, down_scales):
        out, amax = real(x, w_fc, w_proj, down_scales)
        seen.append((down_scales[0].clone(), down_scales[1].clone(), amax))
        return out, amax
    monkeypatch.setattr(ts, "relu_square_mlp_fp8_reference", spy)
    model.refresh_mlp_down_scales(bootstrap=True)
    w_amax = model.mlp_bank[:, 1].abs().amax(dim=(1, 2)).float()
    torch.testing.assert_close(model.mlp_down_w_scales, w_amax / 448)
    torch.testing.assert_close(model.mlp_down_w_next_scales, w_amax * 1.12 / 448)
    model(inputs, targets, cu, sched())
    first = seen[:11]
    assert all(act.item() == 1.0 for act, _, _ in first)
    for i, (_, w_scale, amax) in enumerate(first):
        assert w_scale.item() == pytest.approx(w_amax[i].item() / 448)
        assert model.mlp_down_act_scales[i].item() == pytest.approx(amax.item() * 1.8 / 448)
    model(inputs, targets, cu, sched())           # the next forward uses what the first left
    for i, (act, _, _) in enumerate(seen[11:]):
        assert act.item() == pytest.approx(first[i][2].item() * 1.8 / 448)
    noted = model.mlp_down_w_next_scales.clone()
    with torch.no_grad():
        model.mlp_bank[:, 1] *= 2
    model.refresh_mlp_down_scales(bootstrap=False)  # delayed: the previous refresh's note
    torch.testing.assert_close(model.mlp_down_w_scales, noted)
    torch.testing.assert_close(model.mlp_down_w_next_scales, 2 * w_amax * 1.12 / 448)
    # with the record's bf16 bank the bootstrap scale is rounded to bf16, as upstream computes it
    # (found by benchmarks/cpu_vs_upstream.py --fp8 against #89)
    model.cast_to_bf16().refresh_mlp_down_scales(bootstrap=True)
    bf16_amax = model.mlp_bank[:, 1].abs().amax(dim=(1, 2))
    assert torch.equal(model.mlp_down_w_scales, (bf16_amax / 448).float())
    assert not torch.equal(model.mlp_down_w_scales, bf16_amax.float() / 448)


def test_prefix_term_enters_the_training_loss_linearly_and_only_there():
    """Record #88: the training loss gains prefix_weight x (the rows' prefix-token losses): linear
    in the weight, nothing while the table is all -1 (as built; build_model fills it), and the
    validation loss never has it."""
    model = make_model(seed=6)
    inputs, targets, cu = batch()
    def loss(weight, train=True):
        model.train(train)
        config = ts.ForwardScheduleConfig(torch.tensor([1.0, 0.5]), 128, 384, prefix_weight=torch.tensor([weight]))
        with torch.no_grad():
            return model(inputs, targets, cu, config).double().item()
    base = loss(0.0)
    assert loss(0.25) == base                                  # the table is all -1: no prefix terms
    vocab = model.prefix_table.numel()
    model.prefix_table.copy_(torch.where(torch.arange(vocab) % 3 == 0, -1, torch.arange(vocab) // 2))
    assert loss(0.0) == base
    quarter, whole = loss(0.25) - base, loss(1.0) - base
    assert quarter > 0 and quarter == pytest.approx(whole / 4, rel=1e-3)
    assert loss(0.25, train=False) == loss(0.0, train=False)


def test_bigram_hash_matches_int32_arithmetic():
    tokens = torch.tensor([50256, 3, 50000, 12345, 7, 50255, 0], dtype=torch.int32)
    size = 50304 * 5
    prev, cur = tokens[:-1].numpy().astype(np.int64), tokens[1:].numpy().astype(np.int64)
    prev[0] = size - 1            # the record hashes position 1 with the reserved id before it
    wrap = lambda v: ((v + 2**31) % 2**32) - 2**31                     # int32 overflow
    mixed = np.bitwise_xor(wrap(36313 * cur), wrap(27191 * prev)) % (size - 1)   # floor mod
    expected = [size - 1] + mixed.tolist()
    assert ts.bigram_hash(tokens, size).tolist() == expected
    assert ts.bigram_hash(tokens.long(), size).tolist() == expected   # int64 input: same rows


# ---- paired heads, key offset, rotary against direct formulations -------------------------------

def layer_inputs(T=64, H=4, D=16, seed=0):
    g = torch.Generator().manual_seed(seed)
    d = H * D
    r = lambda *s: torch.randn(*s, generator=g)
    lam = dict(attn_lambdas=torch.tensor([0.5, 1.0]))
    return dict(x=r(T, d), lam=lam, qkv_w=r(3 * d, d) / d ** 0.5,
                ve=r(T, d), ve_gate_w=r(H, 12))


def rotate_direct(vec, angle_pos, freq):
    """Rotate adjacent pairs (2i, 2i+1) of vec by angle_pos * freq[2i] (fp32, no tables)."""
    out = vec.clone()
    for i in range(0, vec.numel(), 2):
        c, s = math.cos(angle_pos * freq[i]), math.sin(angle_pos * freq[i])
        a, b = vec[i].item(), vec[i + 1].item()
        out[i], out[i + 1] = a * c + b * s, b * c - a * s
    return out


def test_paired_head_layout_matches_direct_per_head_construction():
    T, H, D = 16, 4, 16
    kw = layer_inputs(T, H, D)
    yarn = ts.Yarn(D, 64, paired=True)
    cos, sin = yarn.tables(T)
    q, k, v = ts.attention_inputs(**kw, cos=cos, sin=sin, num_heads=H, paired=True,
                                        key_offset=False)
    # direct: per token t and head h
    h = ts.norm(kw["x"])
    qkv = (h @ (0.5 * kw["qkv_w"]).T).view(T, 3, H, D)
    q_heads, k_heads, v_heads = ts.norm(qkv[:, 0]), ts.norm(qkv[:, 1]), qkv[:, 2]
    ve_gate = 2 * torch.sigmoid(torch.cat([h[:, :6], kw["ve"][:, :6]], -1) @ kw["ve_gate_w"].T)   # #81
    freq = yarn.angular_freq.tolist()
    assert q.shape == k.shape == v.shape == (2 * T, H // 2, D)
    for t in range(T):
        for head in range(H):
            pos, lane = 2 * t + head // (H // 2), head % (H // 2)
            angle = 2 * t + head % 2
            torch.testing.assert_close(q[pos, lane], rotate_direct(q_heads[t, head], angle, freq),
                                       atol=2e-2, rtol=2e-2)
            torch.testing.assert_close(k[pos, lane], rotate_direct(k_heads[t, head], angle, freq),
                                       atol=2e-2, rtol=2e-2)
            expect_v = v_heads[t, head] + ve_gate[t, head] * kw["ve"][t].view(H, D)[head]
            torch.testing.assert_close(v[pos, lane], expect_v, atol=1e-5, rtol=1e-5)


def test_value_embedding_gate_reads_half_input_half_embedding_on_unpaired_layers():
    """Record #70: an unpaired layer's value-embedding gate is sigmoid-linear over the normed
    input's first 6 channels followed by the embedding's first 6 (paired layers too since #81:
    test_paired_head_layout_matches_direct_per_head_construction). Checked against that formula
    written out directly."""
    T, H, D = 12, 4, 16
    kw = layer_inputs(T, H, D, seed=3)
    yarn = ts.Yarn(D, 64)
    h = ts.norm(kw["x"])
    v_plain = (h @ (0.5 * kw["qkv_w"]).T).view(T, 3, H, D)[:, 2]
    gate_in = torch.cat([h[:, :6], kw["ve"][:, :6]], dim=-1)
    expect_gate = 2 * torch.sigmoid(gate_in @ kw["ve_gate_w"].T)              # (T, H)
    _, _, v = ts.attention_inputs(**kw, cos=yarn.cos[:T], sin=yarn.sin[:T], num_heads=H,
                                  paired=False, key_offset=False)
    torch.testing.assert_close(v, v_plain + expect_gate[..., None] * kw["ve"].view(T, H, D))
    # the embedding really enters the gate: changing only its first 6 channels moves v by more
    # than the direct (ungated) path does
    kw2 = dict(kw, ve=kw["ve"].clone())
    kw2["ve"][:, :6] += 1.0
    _, _, v2 = ts.attention_inputs(**kw2, cos=yarn.cos[:T], sin=yarn.sin[:T], num_heads=H,
                                   paired=False, key_offset=False)
    gate2 = 2 * torch.sigmoid(torch.cat([h[:, :6], kw2["ve"][:, :6]], -1) @ kw["ve_gate_w"].T)
    torch.testing.assert_close(v2, v_plain + gate2[..., None] * kw2["ve"].view(T, H, D))
    assert not torch.allclose(gate2, expect_gate)


def test_unpaired_rotary_and_key_offset():
    T, H, D = 12, 4, 16
    kw = layer_inputs(T, H, D, seed=1)
    yarn = ts.Yarn(D, 64)
    cos, sin = yarn.tables(T)
    common = dict(cos=cos, sin=sin, num_heads=H, paired=False)
    q, k, v = ts.attention_inputs(**kw, **common, key_offset=False)
    q2, k2, v2 = ts.attention_inputs(**kw, **common, key_offset=True)
    half = D // 2
    assert torch.equal(q, q2) and torch.equal(v, v2)
    assert torch.equal(k2[..., :half], k[..., :half])              # rotated half: untouched
    assert torch.equal(k2[1:, :, half:], k[:-1, :, half:])        # stationary half: from t-1
    assert torch.equal(k2[0, :, half:], k[0, :, half:])
    # rotation of the first half, identity on the stationary half
    h = ts.norm(kw["x"])
    q_heads = ts.norm((h @ (0.5 * kw["qkv_w"]).T).view(T, 3, H, D)[:, 0])
    freq = yarn.angular_freq.tolist()
    for t in (0, 5, 11):
        torch.testing.assert_close(q[t, 2], rotate_direct(q_heads[t, 2], t, freq), atol=2e-2, rtol=2e-2)
    torch.testing.assert_close(q[..., half:], q_heads[..., half:])


def layer_attention_weights(model, slot):
    """Attention layer `slot`'s [W_q; W_k; W_v; W_o] picked out of the two banks by index (record
    #80's layout: W_q then W_k of each layer as head-pair blocks, then W_v, W_o)."""
    pairs = model.cfg.num_heads // 2
    qk = [model.qk_bank[slot * 2 * pairs + j] for j in range(2 * pairs)]
    return torch.cat(qk + [model.vo_bank[2 * slot], model.vo_bank[2 * slot + 1]])


def mudd_reference(model, x, block, n):
    """Record #81's forward_mudd written out: 0.1 * (W2[:n] gelu(W1 x) + b2[:n]), one column each."""
    hidden = F.gelu(x @ model.mudd_w1[block].T)
    return ((hidden @ model.mudd_w2[block, :n].T + model.mudd_b2[block, :n]) * 0.1).split(1, dim=-1)


def gate_reference(model, x, block, n):
    """Record #85's forward_mudd_gate written out: scale * (W2[:n] gelu(W1 x) + b2[:n])."""
    hidden = F.gelu(x @ model.mudd_gate_w1[block].T)
    return (hidden @ model.mudd_gate_w2[block, :n].T + model.mudd_gate_b2[block, :n]) * model.mudd_gate_scale


def record_stream_reference(model, inputs, targets, cu, schedule):
    """Record #85's residual stream written out from its equations, layer by layer, reusing the
    model's own attention and MLP pieces; returns the stream the head normalizes. Gate offsets as
    the record's unpack functions read them (6 heads in the record; H here)."""
    d, H = model.cfg.model_dim, model.cfg.num_heads
    resid, post = model.resid_lambdas, model.post_lambdas          # [layer, attention/MLP]
    per_layer, wide = model.named_scalars()
    plan = model.plan_attention(cu, inputs.numel(), schedule)
    T = inputs.numel()
    x0, _, ve = ts.embed_inputs(inputs, model.embed.weight, model.bigram_embed.weight, model.bigram_signs,
                                model.value_embeds, model.smear_gate.weight, wide["smear_lambda"], model.vocab_size)
    # record #83: the hashed row times the sign row of (previous XOR current token), in the first
    # bigram_dim channels only
    prev = torch.cat([torch.zeros(1, dtype=torch.long), inputs[:-1].long()])
    sign_rows = torch.where(torch.arange(T) == 0, 0, torch.bitwise_xor(prev, inputs.long()) % 8192)
    b = model.cfg.bigram_dim
    xb = torch.zeros(T, d)
    xb[:, :b] = model.bigram_embed.weight[ts.bigram_hash(inputs, model.bigram_embed.weight.size(0))] * model.bigram_signs[sign_rows].float()
    # the pre gate from x0: XSA 1, 3, attention gate 3, (x0, bigram) of layers 0..3
    pre = gate_reference(model, x0, 0, 3 * H + 8)
    xsa = {1: pre[:, :H], 3: pre[:, H:2 * H]}
    attn_gate = {3: pre[:, 2 * H:3 * H]}
    x0_gate = {i: pre[:, 3 * H + 2 * j:3 * H + 2 * j + 1] for j, i in enumerate(range(4))}
    bigram_gate = {i: pre[:, 3 * H + 2 * j + 1:3 * H + 2 * j + 2] for j, i in enumerate(range(4))}
    x = x0 + bigram_gate[0] * xb                  # record #85: x0 itself keeps no bigram part
    cache0 = x
    layer3 = layer7 = layer9 = None
    for spec in model.layers:
        i = spec.index
        mu = None
        if i == 4:                                  # the post gate, from the stream entering layer 4
            post_g = gate_reference(model, x, 1, 7 * H + 11)
            xsa |= {4: post_g[:, :H], 7: post_g[:, H:2 * H]}
            attn_gate[10] = post_g[:, 2 * H:3 * H]
            for j, layer in enumerate((4, 5, 7, 8, 9)):
                x0_gate[layer] = post_g[:, 3 * H + 2 * j:3 * H + 2 * j + 1]
                bigram_gate[layer] = post_g[:, 3 * H + 2 * j + 1:3 * H + 2 * j + 2]
            skip = post_g[:, 3 * H + 10:3 * H + 11]
            dc_w1, dc_w2 = post_g[:, 3 * H + 11:4 * H + 11], post_g[:, 4 * H + 11:5 * H + 11]
        if i == 6:                                  # no attention: the gated skip from layer 3
            x = x + torch.sigmoid(wide["skip_lambda"]) * skip * layer3
        else:
            lam = {"attn_lambdas": per_layer["attn_lambdas"][i]}
            qkvo = layer_attention_weights(model, spec.attn_slot)
            yarn = model.yarn_paired_head if spec.paired else model.yarn
            cos, sin = yarn.tables(T)
            slot = spec.value_slot
            if i == 10:                             # MUDD: 14 per-token coefficients
                layer9 = x
                mu = mudd_reference(model, x, 0, 14)
                v_mudd = (mu[0] * cache0 + mu[1] * layer7 + mu[2] * x).view(T, H, -1)
                x = (1 + mu[5]) * x + mu[3] * cache0 + mu[4] * layer7
                ve_gate = torch.cat([mu[6], mu[7]], -1).repeat_interleave(H // 2, dim=-1).unsqueeze(-1)
                aux_v = (ve_gate * ve[slot].view(T, H, -1) + v_mudd).view(T, -1)
                q, k, v = ts.attention_inputs(
                    layer7, lam, qkvo[:3 * d], cos, sin, None, None,
                    num_heads=H, paired=spec.paired, key_offset=spec.long_window, v_extra=aux_v)
            else:
                q, k, v = ts.attention_inputs(
                    x if layer7 is None else layer7, lam, qkvo[:3 * d], cos, sin,
                    None if slot is None else ve[slot], None if slot is None else model.ve_gate_bank[slot],
                    num_heads=H, paired=spec.paired, key_offset=spec.long_window)
            y = model.attend(q, k, v, spec, plan)
            if i == 10:                             # record #85: DC on layer 10, window 112
                w1 = dc_w1 / dc_w1.square().mean(-1, keepdim=True).add(1e-6).sqrt()
                y = ts.dc_correction_reference(y, q, k, v, w1, dc_w2, plan.doc_ids,
                                               model.yarn.attn_scale, 112)
            if i in xsa:                            # record #82/#85: XSA, written out per head
                v_dir = v / v.norm(dim=-1, keepdim=True).clamp_min(1e-4)
                y = y - torch.tanh(xsa[i])[:, :, None] * (y * v_dir).sum(-1, keepdim=True) * v_dir
            if i in attn_gate:
                y = y * attn_gate[i][:, :, None]
            out = (lam["attn_lambdas"][1] * y.reshape(T, -1)) @ qkvo[3 * d:].T
            if mu is not None:
                x = mu[8] * x + mu[9] * out + mu[10] * cache0 + mu[11] * xb
            else:
                inject = x0 * x0_gate[i] + (0 if i == 0 else xb * bigram_gate[i])
                x = resid[i, 0] * x + post[i, 0] * out + inject
        out = ts.relu_square_mlp(ts.norm(x), model.mlp_bank[i, 0], model.mlp_bank[i, 1])
        x = (mu[12] * x + mu[13] * out) if mu is not None else (resid[i, 1] * x + post[i, 1] * out)
        if i == 3:
            layer3 = x
        if i == 7:
            layer7 = x
    mu = mudd_reference(model, x, 1, 5)
    return x + mu[0] * cache0 + mu[1] * layer7 + mu[2] * layer9 + mu[3] * ve[0] + mu[4] * layer3


def test_residual_stream_is_the_records_equations(monkeypatch):
    """Records #77, #81 and #85: one stream; attention layers 8-10 all read layer 7's output (the
    cached activation) instead of the stream; layer 3's output skips into layer 6; every sublayer
    writes with its own residual and post lambdas, except layer 10, whose lambdas, value gate and
    extra value/stream terms MUDD computes per token; a second MUDD mixes earlier states into the
    head's input; the MUDD gate gives XSA strengths, attention gates, x0/bigram injections, the
    skip and the DC weights per token. Every lambda and MUDD weight is perturbed from its init."""
    model = make_model(seed=5).eval()
    inputs, targets, cu = batch(T=128, docs=(70, 58))
    with torch.no_grad():
        for p in (model.resid_lambdas, model.post_lambdas):
            p.add_(0.3 * torch.randn_like(p))
        model.mudd_w2.add_(0.1 * torch.randn_like(model.mudd_w2))
        model.mudd_gate_w2.add_(0.3 * torch.randn_like(model.mudd_gate_w2))
        model.bigram_embed.weight.normal_()
        expected = record_stream_reference(model, inputs, targets, cu, sched())
        with monkeypatch.context() as patch:      # the model's final stream instead of its loss
            patch.setattr(ts, "output_loss", lambda x, *rest: x)
            got = model(inputs, targets, cu, sched())
            patch.setattr(ts, "ATTN_INPUT_LAYER", 8)   # (the check can tell: another cached input)
            other = model(inputs, targets, cu, sched())
    # fp32 rounding grows with the stream's size (hundreds here), so the tolerance does too
    torch.testing.assert_close(got, expected, rtol=1e-5, atol=1e-6 * expected.abs().max().item())
    assert (other - expected).abs().max() > 100 * (got - expected).abs().max()
    # the attention-free layer 6 reads none of its attention-side lambdas, layer 10 none of its
    # own (MUDD's replace them); the record keeps both
    model.train()
    model(inputs, targets, cu, sched()).backward()
    for p in (model.post_lambdas, model.resid_lambdas):
        assert p.grad[6, 0] == 0 and p.grad[10].abs().max() == 0
        assert p.grad[:6, 0].abs().min() > 0 and p.grad[7:10, 0].abs().min() > 0
        assert p.grad[:10, 1].abs().min() > 0
    assert model.ve_gate_bank.grad[4].abs().max() == 0 and (model.ve_gate_bank.grad[:4].abs().flatten(1).sum(1) > 0).all()
    assert model.mudd_w2.grad[0].abs().min() > 0 and model.mudd_w2.grad[1, :5].abs().min() > 0
    assert model.mudd_w2.grad[1, 5:].abs().max() == 0       # the head block uses 5 of its 14 rows
    # every gate output is used: the pre block's rows beyond its 3H + 8 outputs are padding
    H = model.cfg.num_heads
    gate_rows = model.mudd_gate_w2.grad.abs().sum(-1)
    assert (gate_rows[0, :3 * H + 8] > 0).all() and (gate_rows[0, 3 * H + 8:] == 0).all()
    assert (gate_rows[1] > 0).all() and model.mudd_gate_scale.grad != 0


@settings(max_examples=20, deadline=None)
@given(alpha=st.floats(-3, 3), seed=st.integers(0, 2**16))
def test_exclusive_self_attention_removes_tanh_alpha_of_the_own_value_direction(alpha, seed):
    """XSA (record #82): the output keeps its part orthogonal to the token's own value vector and
    1 - tanh(alpha) of its part along it; alpha is per token and head (#85)."""
    g = torch.Generator().manual_seed(seed)
    T, H, D = 7, 3, 8
    y, v = torch.randn(T, H, D, generator=g, dtype=torch.float64), torch.randn(T, H, D, generator=g, dtype=torch.float64)
    per_token = torch.linspace(0.5, 1.5, T, dtype=torch.float64)[:, None]
    alphas = torch.tensor([alpha, 0.0, -alpha], dtype=torch.float64) * per_token       # (T, H)
    out = ts.exclusive_self_attention(y, v, alphas)
    unit = v / v.norm(dim=-1, keepdim=True)
    along = lambda t: (t * unit).sum(-1)
    orth = lambda t: t - along(t)[..., None] * unit
    torch.testing.assert_close(orth(out), orth(y))
    torch.testing.assert_close(along(out), along(y) * (1 - torch.tanh(alphas)))
    assert torch.equal(out[:, 1], y[:, 1])                  # alpha 0: unchanged
    # record #86's algebraic form is #82's normalize form, the eps included (|v| < 1e-4 clamps)
    v[0, 0] *= 1e-7
    normalized = F.normalize(v, dim=-1, eps=1e-4)
    old_form = y - torch.tanh(alphas)[..., None] * (y * normalized).sum(-1, keepdim=True) * normalized
    torch.testing.assert_close(ts.exclusive_self_attention(y, v, alphas), old_form)


@settings(max_examples=25, deadline=None)
@given(T=st.integers(1, 24), H=st.integers(1, 3), window=st.integers(1, 30),
       cuts=st.sets(st.integers(1, 23), max_size=4), seed=st.integers(0, 2**16))
def test_dc_correction_reference_is_the_records_formula(T, H, window, cuts, seed):
    """Record #85's DC correction written out per query and head (float64): softmax of each head
    over the query's last `window` keys of its own document, mixed over heads with w1, applied to
    each head's values with weight w2, added to y."""
    g = torch.Generator().manual_seed(seed)
    D = 4
    r = lambda *shape: torch.randn(*shape, generator=g, dtype=torch.float64)
    y, q, k, v, w1, w2 = r(T, H, D), r(T, H, D), r(T, H, D), r(T, H, D), r(T, H), r(T, H)
    cu = torch.tensor([0] + sorted(c for c in cuts if c < T) + [T, T], dtype=torch.int32)
    doc = ts.document_ids(cu, T)
    scale = 0.7
    got = ts.dc_correction_reference(y, q, k, v, w1, w2, doc, scale, window)
    want = y.clone()
    for t in range(T):
        keys = [j for j in range(max(0, t - window + 1), t + 1) if doc[j] == doc[t]]
        probs = [torch.softmax(torch.stack([scale * q[t, h] @ k[j, h] for j in keys]), 0) for h in range(H)]
        mixed = sum(w1[t, h] * probs[h] for h in range(H))
        for h in range(H):
            want[t, h] += w2[t, h] * sum(mixed[n] * v[j, h] for n, j in enumerate(keys))
    torch.testing.assert_close(got, want)


def test_dc_weights_rms_norm_the_mixing_weights_over_heads():
    w1, w2 = torch.tensor([[3.0, 4.0], [1.0, 1.0]]), torch.tensor([[0.5, -2.0], [0.0, 1.0]])
    got1, got2 = ts.dc_weights(w1, w2)
    torch.testing.assert_close(got1, w1 / (w1.square().mean(-1, keepdim=True) + 1e-6).sqrt())
    assert got2 is w2


def test_mudd_gate_at_init_gives_the_records_starting_values():
    """The gate's output weights start at 0, so each output is its initial value for every token:
    XSA off, attention gates 0.25, bigram 0.05, x0 0, skip 0.5, DC w1 1 and w2 0 (DC off)."""
    model = make_model(seed=2, perturb=False)
    x = torch.randn(5, model.cfg.model_dim)
    for block, layout in enumerate(model.gate_layouts):
        gates = ts.mudd_gate(x, model.mudd_gate_w1[block], model.mudd_gate_w2[block], model.mudd_gate_b2[block],
                             model.mudd_gate_scale, layout)
        assert list(gates) == list(layout)
        for name, (width, init) in layout.items():
            torch.testing.assert_close(gates[name], torch.full((5, width), float(init)))


def test_mudd_at_init_is_the_old_backout():
    """At init (MUDD output weights 0) the head reads x - 0.5 * layer 7's output, the backout
    that MUDD replaced, and layer 10 writes with its old lambda values."""
    model = make_model(seed=2, perturb=False)
    x = torch.randn(5, model.cfg.model_dim)
    mu = ts.mudd_coefficients(x, model.mudd_w1[1], model.mudd_w2[1], model.mudd_b2[1],
                              ts.MUDD_HEAD_COEFFICIENTS)
    states = {name: torch.randn(5, model.cfg.model_dim) for name in ("input", "layer3", "layer7", "mudd_in")}
    got = ts.mudd_head_input(mu, states, x, torch.randn(5, model.cfg.model_dim))
    torch.testing.assert_close(got, x - 0.5 * states["layer7"])
    mu = ts.mudd_coefficients(x, model.mudd_w1[0], model.mudd_w2[0], model.mudd_b2[0],
                              ts.MUDD_LAYER_COEFFICIENTS)
    assert list(mu) == list(ts.MUDD_LAYER_COEFFICIENTS)
    for name, value in ts.MUDD_LAYER_COEFFICIENTS.items():
        torch.testing.assert_close(mu[name], torch.full((5, 1), float(value)))
    torch.testing.assert_close(ts.mudd_stream(mu, states, x), x)


# ---- YaRN ---------------------------------------------------------------------------------------

@pytest.mark.parametrize("paired", [False, True])
def test_yarn_apply_then_reset_round_trip(paired):
    yarn = ts.Yarn(32, 128, paired=paired)
    cos0, sin0, freq0 = yarn.cos.clone(), yarn.sin.clone(), yarn.angular_freq.clone()
    yarn.apply(3 * 128, 7 * 128)
    assert not torch.equal(yarn.cos, cos0)
    assert yarn.attn_scale == pytest.approx(0.1 * (0.2 * math.log(7 / 3) + 1))
    yarn.apply(7 * 128, 11 * 128)
    assert yarn.attn_scale == pytest.approx(0.1 * (0.2 * math.log(7 / 3) + 1) * (0.2 * math.log(11 / 7) + 1))
    yarn.reset()
    assert torch.equal(yarn.cos, cos0) and torch.equal(yarn.sin, sin0)
    assert torch.equal(yarn.angular_freq, freq0) and yarn.attn_scale == 0.1


def test_yarn_rescales_only_slow_frequencies():
    yarn = ts.Yarn(128, 16)
    old, new = 384, 896
    before = yarn.angular_freq.clone()
    yarn.apply(old, new)
    turns = old * before / (2 * math.pi)
    slow, fast = turns < 1, turns > 32
    assert slow.any() and fast.any()
    torch.testing.assert_close(yarn.angular_freq[slow], before[slow] * old / new)
    torch.testing.assert_close(yarn.angular_freq[fast], before[fast])
    ramp = ~slow & ~fast
    assert torch.all(yarn.angular_freq[ramp] <= before[ramp]) and torch.all(yarn.angular_freq[ramp] >= before[ramp] * old / new)
    # stationary half: frequency 0 -> cos 1, sin 0 in every row
    assert torch.all(yarn.cos[:, 64:] == 1) and torch.all(yarn.sin[:, 64:] == 0)


def test_yarn_tables_are_bf16_and_cover_max_seq_len():
    yarn = ts.Yarn(16, 100, paired=True)
    assert yarn.cos.shape == (100, 32) and yarn.cos.dtype == torch.bfloat16
    with pytest.raises(ValueError, match="max_seq_len"):
        yarn.tables(101)


def test_yarn_apply_still_works_as_module_apply():
    model = make_model(perturb=False)
    seen = []
    model.apply(lambda m: seen.append(type(m).__name__))
    assert "Yarn" in seen and "GPT" in seen


# ---- masks -------------------------------------------------------------------------------------

def brute_force_mask(cu, T, window):
    cu = cu.tolist()
    doc = [max(j for j in range(len(cu)) if cu[j] <= i) for i in range(T)]
    return torch.tensor([[doc[i] == doc[j] and 0 <= i - j <= window for j in range(T)] for i in range(T)])


@pytest.mark.parametrize("cu,window", [
    ([0, 5, 9, 16, 16, 16], 3),      # training style: padded with the length
    ([0, 0, 7, 12, 16], 2),          # validation style: a BOS at position 0 repeats offset 0
    ([0, 4, 16], 100),               # window longer than every document
    ([0, 16], 0),                    # window 0: only the diagonal
])
def test_dense_window_mask_semantics(cu, window):
    cu = torch.tensor(cu, dtype=torch.int32)
    assert torch.equal(ts.window_mask_dense(cu, 16, window), brute_force_mask(cu, 16, window))


@st.composite
def packed_docs(draw):
    block = draw(st.sampled_from([16, 32]))
    n_blocks = draw(st.integers(1, 8))
    T = block * n_blocks
    cuts = sorted(draw(st.sets(st.integers(1, T - 1), max_size=6))) if T > 1 else []
    cu = [0] + cuts + [T] * draw(st.integers(1, 3))
    window = draw(st.integers(0, T + 5))
    return block, T, torch.tensor(cu, dtype=torch.int32), window


def block_sets(bm):
    """Per query tile: (set of partial kv tiles, set of full kv tiles)."""
    rows = []
    for i in range(bm.kv_num_blocks.shape[-1]):
        n, nf = int(bm.kv_num_blocks[0, 0, i]), int(bm.full_kv_num_blocks[0, 0, i])
        rows.append((set(bm.kv_indices[0, 0, i, :n].tolist()),
                     set(bm.full_kv_indices[0, 0, i, :nf].tolist())))
    return rows


@settings(max_examples=40, deadline=None)
@given(packed_docs())
def test_block_mask_from_bounds_equals_create_block_mask(case):
    block, T, cu, window = case
    ours = ts.sliding_window_block_mask(cu, T, window, block_size=block)
    doc = ts.document_ids(cu, T)

    def mask_mod(b, h, q, k):
        return (doc[q] == doc[k]) & (q >= k) & (q - k <= window)

    reference = create_block_mask(mask_mod, None, None, T, T, device="cpu", BLOCK_SIZE=block)
    assert block_sets(ours) == block_sets(reference)
    # and the partial tiles' mask_mod agrees with the dense mask where it is evaluated
    q = torch.arange(T)[:, None]
    k = torch.arange(T)[None, :]
    dense = ours.mask_mod(0, 0, q, k)
    assert torch.equal(dense, ts.window_mask_dense(cu, T, window))


@settings(max_examples=15, deadline=None)
@given(packed_docs())
def test_block_mask_tables_trace_as_one_graph_and_match_the_library_transpose(case):
    """On the GPU the tables are built by a fullgraph compile; the backward's q tables must be
    what BlockMask.from_kv_blocks would derive from the kv tables."""
    block, T, cu, window = case
    window_t = torch.tensor(window)
    eager = ts._window_block_tables(cu, window_t, T, block, True)
    torch._dynamo.reset()
    traced = torch.compile(ts._window_block_tables, backend="eager", fullgraph=True, dynamic=False)
    compiled = traced(cu, window_t, T, block, True)
    for a, b in zip((eager[0], *eager[1], *eager[2]), (compiled[0], *compiled[1], *compiled[2])):
        assert torch.equal(a, b)
    doc, kv, q = eager
    library = BlockMask.from_kv_blocks(*kv, BLOCK_SIZE=block)
    assert torch.equal(q[0], library.q_num_blocks) and torch.equal(q[2], library.full_q_num_blocks)
    for ours, theirs, counts in ((q[1], library.q_indices, q[0]), (q[3], library.full_q_indices, q[2])):
        for i in range(counts.shape[-1]):   # only the first counts[i] entries of a row are meaningful
            n = int(counts[0, 0, i])
            assert torch.equal(ours[0, 0, i, :n], theirs[0, 0, i, :n])


def test_block_mask_rejects_ragged_length():
    with pytest.raises(ValueError, match="multiple of 128"):
        ts.sliding_window_block_mask(torch.tensor([0, 200], dtype=torch.int32), 200, 64)


def test_document_ids():
    cu = torch.tensor([0, 0, 3, 5, 8, 8], dtype=torch.int32)
    assert ts.document_ids(cu, 8).tolist() == [1, 1, 1, 2, 2, 3, 3, 3]


# ---- backends -----------------------------------------------------------------------------------

def varlen_attention(q, k, v, cu_seqlens, max_len, window_tokens, softmax_scale, backend):
    """One packed sequence (T, H, D) through one backend, building its mask on the spot."""
    length = q.size(0)
    if backend in ("fa3", "flash_attn"):
        return ts.flash_varlen_attention(q, k, v, cu_seqlens, max_len, window_tokens, softmax_scale, backend)
    if backend == "flex":
        mask = ts.sliding_window_block_mask(cu_seqlens, length, window_tokens, with_backward=torch.is_grad_enabled())
        scale = torch.full((), softmax_scale, dtype=torch.float32, device=q.device)
        return ts.flex_window_attention(q, k, v, mask, scale)
    assert backend == "sdpa"
    return ts.masked_sdpa_attention(q, k, v, ts.window_mask_dense(cu_seqlens, length, window_tokens), softmax_scale)


def qkv(T=256, H=2, D=16, seed=0):
    g = torch.Generator().manual_seed(seed)
    return [torch.randn(T, H, D, generator=g) for _ in range(3)]


@pytest.mark.filterwarnings("ignore:flex_attention called without torch.compile")
@pytest.mark.parametrize("window", [0, 40, 128, 1000])
def test_flex_matches_sdpa_reference(window):
    q, k, v = qkv()
    cu = torch.tensor([0, 37, 150, 256, 256], dtype=torch.int32)
    with torch.no_grad():   # FlexAttention has no CPU backward
        flex = varlen_attention(q, k, v, cu, 256, window, 0.3, "flex")
    sdpa = varlen_attention(q, k, v, cu, 256, window, 0.3, "sdpa")
    torch.testing.assert_close(flex, sdpa, atol=1e-5, rtol=1e-5)


def test_sdpa_reference_is_local_to_documents():
    """Changing a key/value in document 0 must not change outputs in document 1, and a key more
    than `window` behind a query must not influence it."""
    q, k, v = qkv(T=64)
    cu = torch.tensor([0, 20, 64], dtype=torch.int32)
    base = varlen_attention(q, k, v, cu, 64, 8, 0.25, "sdpa")
    k2, v2 = k.clone(), v.clone()
    k2[5] += 3
    v2[5] -= 3
    moved = varlen_attention(q, k2, v2, cu, 64, 8, 0.25, "sdpa")
    changed = (moved - base).abs().amax(dim=(1, 2)) > 0
    assert changed.nonzero().flatten().tolist() == list(range(5, 14))   # queries 5..5+8 only


@pytest.mark.filterwarnings("ignore:flex_attention called without torch.compile")
def test_model_flex_and_sdpa_backends_agree():
    inputs, targets, cu = batch()
    losses = {}
    for backend in ("sdpa", "flex"):
        model = make_model(attn_backend=backend)
        model.eval()
        with torch.no_grad():
            losses[backend] = model(inputs, targets, cu, sched())
    torch.testing.assert_close(losses["flex"], losses["sdpa"], atol=1e-5, rtol=1e-5)


def test_resolve_attention_backend_on_cpu():
    assert ts.resolve_attention_backend("auto", "cpu") == "sdpa"
    assert ts.resolve_attention_backend("sdpa", "cpu") == "sdpa"
    for bad in ("flex", "fa3", "flash_attn"):
        with pytest.raises(SystemExit, match="needs a CUDA GPU"):
            ts.resolve_attention_backend(bad, "cpu")
    with pytest.raises(SystemExit, match="not one of"):
        ts.resolve_attention_backend("xformers", "cpu")
    assert "sdpa" in ts.attention_backend_source("sdpa")


# ---- compilation --------------------------------------------------------------------------------

def graphs_after(fn):
    before = ts.compiled_graph_count()
    fn()
    return ts.compiled_graph_count() - before


def test_model_mode_traces_one_graph_and_matches_eager_with_grads():
    torch._dynamo.reset()
    model, eager_model = make_model(), make_model()
    ts.compile_gpt(model, "model", backend="eager")
    inputs, targets, cu = batch()
    added = graphs_after(lambda: model(inputs, targets, cu, sched()).backward())
    assert added == 1
    eager_model(inputs, targets, cu, sched()).backward()
    for (name, p), q in zip(model.named_parameters(), eager_model.parameters()):
        torch.testing.assert_close(p.grad, q.grad, msg=name)


@pytest.mark.slow
@pytest.mark.filterwarnings("ignore:flex_attention called without torch.compile")
def test_model_mode_with_flex_survives_a_stage_change_without_recompiling():
    torch._dynamo.reset()
    model = make_model(attn_backend="flex")
    ts.compile_gpt(model, "model", backend="eager")
    model.eval()
    inputs, targets, cu = batch()
    with torch.no_grad():
        assert graphs_after(lambda: model(inputs, targets, cu, sched(128, 384))) == 1
        model.yarn.apply(384, 896), model.yarn_paired_head.apply(384, 896)
        inputs2, targets2, cu2 = batch(docs=(30, 200, 26), seed=5)
        assert graphs_after(lambda: model(inputs2, targets2, cu2, sched(384, 896))) == 0


def test_compiled_follows_the_config():
    model = make_model(perturb=False, compile_mode="none")
    assert model.compiled() is model and model._compiled_body is None
    with pytest.raises(ValueError, match="compile_mode"):
        small_cfg(compile_mode="layers")


def test_compile_model_rejects_unknown_mode():
    with pytest.raises(ValueError, match="compile mode"):
        ts.compile_gpt(make_model(perturb=False), "layers")


# ---- GPU (run: python3 -m pytest -m gpu tests/test_speedrun_model.py) --------------------------

needs_gpu = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")


@pytest.mark.gpu
@needs_gpu
@pytest.mark.parametrize("paired_shape", [False, True])
def test_compiled_flex_matches_sdpa_with_grads_on_gpu(paired_shape):
    """Record head shapes in bf16: compiled FlexAttention (fwd + bwd) vs the dense fp32 reference."""
    T, H, D = (4096, 3, 128) if paired_shape else (2048, 6, 128)
    g = torch.Generator(device="cuda").manual_seed(0)
    q, k, v = (torch.randn(T, H, D, device="cuda", generator=g, dtype=torch.bfloat16).requires_grad_()
               for _ in range(3))
    cu = torch.tensor([0, 300, 1100, 1500, T, T], dtype=torch.int32, device="cuda")
    mask = ts.sliding_window_block_mask(cu, T, 384)
    scale = torch.full((), 0.12, device="cuda")
    out = ts.flex_window_attention(q, k, v, mask, scale, torch.compile(ts.flex_attention, fullgraph=True))
    grads = torch.autograd.grad(out.float().square().sum(), (q, k, v))
    q32, k32, v32 = (t.detach().float().requires_grad_() for t in (q, k, v))
    ref = ts.masked_sdpa_attention(q32, k32, v32, ts.window_mask_dense(cu, T, 384), 0.12)
    ref_grads = torch.autograd.grad(ref.square().sum(), (q32, k32, v32))
    torch.testing.assert_close(out.float(), ref, atol=2e-2, rtol=2e-2)
    for got, want in zip(grads, ref_grads):
        torch.testing.assert_close(got.float(), want, atol=5e-2, rtol=5e-2)


@pytest.mark.gpu
@needs_gpu
def test_compiled_gpt_matches_eager_reference_on_gpu():
    """Smoke-size GPT in bf16 on CUDA: compiled with Inductor + FlexAttention vs eager sdpa."""
    losses, grads = {}, {}
    for name, backend, compile_mode in (("ref", "sdpa", "none"), ("fast", "flex", "model")):
        torch._dynamo.reset()
        model = make_model(attn_backend=backend).cuda().cast_to_bf16()
        ts.compile_gpt(model, compile_mode)
        inputs, targets, cu = (t.cuda() for t in batch(T=512, docs=(100, 300, 112)))
        loss = model(inputs, targets, cu, sched(128, 384, device="cuda"))   # the loss kernel reads them on the GPU
        loss.backward()
        losses[name] = loss.item()
        grads[name] = {n: p.grad.float() for n, p in model.named_parameters()}
    assert losses["fast"] == pytest.approx(losses["ref"], rel=2e-2)
    for n, want in grads["ref"].items():
        got = grads["fast"][n]
        rel = (got - want).norm() / want.norm().clamp_min(1e-12)
        assert rel < 0.1, (n, rel.item())


@pytest.mark.gpu
@needs_gpu
def test_flash_backends_match_sdpa_on_gpu():
    """Every flash backend that loads here agrees with the dense reference (skips if none do)."""
    q, k, v = (torch.randn(1024, 6, 128, device="cuda", dtype=torch.bfloat16) for _ in range(3))
    cu = torch.tensor([0, 100, 700, 1024], dtype=torch.int32, device="cuda")
    ran = []
    for backend in ("fa3", "flash_attn"):
        if ts._load_flash_varlen(backend) is None:
            continue
        out = varlen_attention(q, k, v, cu, 1024, 256, 0.12, backend)
        ref = varlen_attention(q.float(), k.float(), v.float(), cu, 1024, 256, 0.12, "sdpa")
        torch.testing.assert_close(out.float(), ref, atol=2e-2, rtol=2e-2)
        ran.append(backend)
    if not ran:
        pytest.skip("no flash-attn backend installed")
