"""Train upstream modded-nanogpt's own code and our train_speedrun.py side by side on CPU.

  python3 benchmarks/cpu_vs_upstream.py --upstream ref/upstream85/train_gpt.py [--ours-rev REV]
      [--steps 12 --ext 2] [--warmup both|none] [--sync-grads] [--fp8] [--micro 1] [--tokens 1024]
      [--seed 0] [--upstream-edit OLD NEW ...]

Handles upstream records #79-#89 with ours at the same record (upstream #82 = 8ee5feda with
--ours-rev 74ce5b6; #84 = a333be08 with --ours-rev c3bdc17; #85 = 748d4ef1 with --ours-rev 3ce9dc0;
#88 = ab8cf2d6 with --ours-rev c8f7074; #89 = 75d6867a with --ours-rev bfb2e69); a pairing where
only one side has #83's bigram sign table or #88's prefix-token table, or --fp8 where one side
lacks #84's FP8 MLP (or #89's FP8 down-projection), stops with one error line, as does a parameter
name (or shape) only one side has. From record #88 on both sides need GPT-2's vocabulary (tiktoken,
or offline GPT2_TIKTOKEN_FILE=/path/to/gpt2.tiktoken, read through ours' prepare_data.gpt2_encoding).

Both sides build the record's 11-layer model at a tiny width (heads of 16, vocab 1000, bigram table
5120 rows): d=64 with 4 heads, or with the head count upstream's GPT asserts (#85's MUDD gate
layout: 6 heads, d=96); bigram_dim (#83 on) the record's share of the width (#83-#84: 192 of 768,
so 16; #85: 768 of 768, the whole width). They get the same random weights (copied by parameter
name, NAME_MAP for renamed ones: #85's MUDD gate scale is upstream's _mudd_gate_scale; #83's random
sign-table buffer is copied from upstream into ours too), then train on the same synthetic batches
with their own optimizer, schedule, warm-up and reset (--warmup none skips the warm-ups). Every
step prints the loss of each side, the worst relative difference of the gradients (before the
optimizer step) and of the parameters (after it), and the parameter it occurs in; the last line
is the verdict: bit-identical at all steps, or the first step and tensor that differ. Before
training it also compares what needs no training: parameter names, shapes and dtypes, the
optimizer settings of every parameter and its update orders, and the schedule at every step
(at this run's length and at each side's record length).

Upstream side. Its train_gpt.py is read from --upstream (a file, or a checkout folder holding it)
and only its definitions are executed (classes, functions, the polar express coefficients, the
stage table and training schedule); data loading, Hyperparameters, the FP8 custom ops and the
main script are left out. What they would provide is injected: args (schedule, bigram table),
world size 1 with 8 micro-batches per step (grad_scale 1/8), a CPU device, and FlashAttention 3
from benchmarks/fa3_standin/ (the same stand-in vs_upstream.py uses). triton_kernels.py and (#85)
dc_triton_kernels.py are never imported (CUDA at import); each name upstream imports from them is
replaced by the plain PyTorch reference of the same math in train_speedrun.py, so both sides run
identical kernels (the lm_head loss without FP8 on both sides). #85's DC correction
(dc_attention_postonly_nodd_correction_add_base_triton: y + per-token mixed local attention over
keys t-111..t of the same document) runs ours' dc_correction_reference with document ids from
upstream's padded cu_seqlens and the softmax scale rounded to fp32 (the Triton kernel's float
argument; ours passes an fp32 tensor). Record #84's FP8 MLP up-projection is off on both sides
(upstream DISABLE_FP8=1, ours use_fp8=False) unless --fp8: then upstream's own quantize_mlp_fp8()
(after init, each optimizer step and the warm-up reset, as its main) and per-layer activation
quantization feed a stand-in that multiplies its FP8 operands in fp32, times the dequant factor,
rounded to bf16, with a straight-through gradient (ours: its relu_square_mlp_fp8_reference); the
float64 check then runs without FP8. Record #89 adds the down-projection in FP8 with delayed
scaling: upstream's quantize_mlp_fp8(bootstrap_down=...) runs as its main calls it (bootstrap at
init, in the warm-up, after the reset and at steps < N of its `bootstrap_down=(step < N)`, 16),
with plain-PyTorch stand-ins for quantize_transpose_mlp_down_weights (W_proj / next scale,
clipped to +-448, e4m3, transposed; used scale = next scale; next = largest |entry| x 1.12 / 448)
and reduce_mlp_activation_scales (max over the per-program largest post x headroom / 448), and
the MLP stand-in's epilogue (post_f8 = min(post x (1 / act_scale), 448) in e4m3, its largest post
into the layer's row of the partial-amax buffer, _scaled_mm as an fp32 product of the e4m3 values
x act_scale x W2_scale rounded to bf16, straight-through gradient); ours runs its own
relu_square_mlp_fp8_reference with its delayed scales and its optimizer_step(..., raw_model,
warmup=...) refreshing them (build_model's bootstrap refresh is done once the tool's weights are
in). Under --fp8 the three scale buffers (upstream _mlp_down_act_scales / _mlp_down_proj_scales /
_mlp_down_proj_next_scales, ours mlp_down_act_scales / mlp_down_w_scales / mlp_down_w_next_scales)
are compared with the parameters after every step.
Record #88's prefix-token loss: upstream's FusedSoftcappedCrossEntropy.apply takes (prefix_targets,
prefix_weight) after the MTP weights; the stand-in passes them to ours' softcapped_mtp_loss_reference.
Upstream's main fills the model's prefix_table after its warm-up (so its warm-up trains without the
term) and ours' build_model before it; the tool fills neither way: both builders (upstream's
build_prefix_table, ours' gpt2_prefix_token_table) run at the record's 50304 ids and are compared
(a static finding if they differ), and the tiny model's table, GPT-2's for ids < 1000 with every
prefix id >= 1000 (and the padding ids' rows) set to -1, is copied into both models before the
warm-up (which is discarded by the reset either way). The stage table's prefix weights are part of
the schedule check. A few text edits make upstream's code run eagerly on CPU; they are printed as
a unified diff before anything runs.

Our side: train_speedrun.py imported as is (the working tree's, or with --ours-rev REV the one
committed at REV), eager (compile_mode none), attention backend "fa3" served by the same stand-in
function, so both sides' attention is one identical call.

Telling bugs from rounding:
  * float64 check (always, before training): step 0's forward and backward once more on float64
    copies of both models holding bf16 values. Summation and gradient-accumulation order then move
    results by ~1e-15, so a difference above 1e-9 there is different math; bf16 differences that
    vanish there are rounding order (e.g. autograd summing a tensor's gradients in another order).
    Its line names the largest difference it saw (or "all bit-identical").
  * --sync-grads: ours' optimizer steps on upstream's gradients, so the parameters test the
    optimizer, the schedule, the embed/lm_head split and the warm-up/reset alone, bit for bit.
  * --upstream-edit OLD NEW (repeatable): a what-if text edit of upstream (shown in the diff), e.g.
    upstream written the way ours computes something, to confirm that this is the one difference.

Exit status: 0 bit-identical, 1 a difference was found, 2 error (one line `error: ...`).
"""
import os

# upstream decorates its optimizer math with torch.compile; eager on CPU is what we compare
os.environ.setdefault("TORCHDYNAMO_DISABLE", "1")

import argparse
import ast
import atexit
import copy
import dataclasses
import difflib
import importlib.util
import inspect
import math
import shutil
import subprocess
import sys
import tempfile
import threading
import time
import types
from dataclasses import dataclass
from itertools import accumulate, pairwise
from pathlib import Path

import numpy as np
import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import Tensor, nn

REPO = Path(__file__).resolve().parents[1]
OURS_SCRIPT = REPO / "train_speedrun.py"
STANDIN_FILE = Path(__file__).resolve().parent / "fa3_standin" / "kernels.py"

# the tiny model: the record's layout, narrow enough for a few minutes on 2 CPU cores. Heads of
# HEAD_DIM channels, DEFAULT_HEADS of them unless upstream's GPT asserts its head count (record
# #85's MUDD gate layout is written for 6 heads); the width is heads * HEAD_DIM (see TinyModel).
HEAD_DIM, VOCAB, NUM_LAYERS = 16, 1000, 11
DEFAULT_HEADS = 4
RECORD_MODEL_DIM = 768         # the record's width: the bigram table's width is scaled from it
BIGRAM_ROWS = 5 * 1024
SIGN_TABLE = ("bigram_sign_table", "bigram_signs")   # #83's random +-1 buffer: upstream's, ours' name
GRAD_ACCUM = 8                 # world size 1: 8 // world_size micro-batches make the record's step
GRAD_SCALE = 1 / GRAD_ACCUM    # each micro-batch's loss is scaled by this before backward (both sides)
TRAIN_MAX_SEQ_LEN = 2048       # flash-attn max_seqlen (the stand-in does not read it)

# ours' parameter name -> upstream's, where they differ (none up to record #84)
NAME_MAP: dict = {"mudd_gate_scale": "_mudd_gate_scale"}      # record #85's MUDD gate scale

# Noise added to upstream's initial value of each parameter (one draw, copied into both models):
# every weight non-zero (zero-initialized projections and gates too) so every path carries signal.
# Upstream names (#79-#84: attn_gate_bank, skip_gate, xsa_alphas; #85: the MUDD gate, whose
# output weights start at 0 and whose biases are stored divided by its scale 0.1: noise 0.5 on W2
# gives every gate output (DC's w2 too) a per-token spread of ~0.3, noise 1.0 on the biases moves
# each output's mean by ~0.1; the scale itself (0.1, it multiplies every output) gets 0.02: 0.158
# at seed 0).
NOISE = {"value_embeds": 0.3, "bigram_embed.weight": 0.3, "lm_head.weight": 0.1,
         "attn_gate_bank": 0.5, "ve_gate_bank": 0.5, "smear_gate.weight": 0.5,
         "skip_gate.weight": 0.5, "xsa_alphas": 0.5, "mudd_w2": 0.5, "mudd_b2": 1.0,
         "mudd_gate_w2": 0.5, "mudd_gate_b2": 1.0, "_mudd_gate_scale": 0.02}
MATRIX_NOISE = 0.5             # times width^-0.5: other parameters of 2+ dims (banks, mudd_w1, mudd_gate_w1)
VECTOR_NOISE = 0.2             # other 1-D (and 0-D) parameters (scalars, lambdas)

# Edits to upstream's source: (why, old text, new text, required). Each makes upstream's own code
# run eagerly on CPU with what compiled CUDA code computes; a required one that is missing stops
# the tool (upstream changed: check the edit still means the same).
UPSTREAM_EDITS = [
    ("key offset: the compiled semantics (eager copies the overlapping slices row by row, so every "
     "key would get row 0's stationary half; Inductor reads the original keys)",
     "k[:, 1:, :, self.head_dim // 2:] = k[:, :-1, :, self.head_dim // 2:]",
     "k[:, 1:, :, self.head_dim // 2:] = k[:, :-1, :, self.head_dim // 2:].clone()", True),
    ("mantissa update: CPU has no uint32 shifts; the same bits through int64",
     "p_precise_raw = (p.to(torch.uint32) << 16) | mantissa.to(torch.uint32)",
     "p_precise_raw = ((p.to(torch.int64) << 16) | mantissa.to(torch.int64)).to(torch.int32)", True),
    ("mantissa update: high half of the int32 bits (as the uint32 shift would)",
     "p.copy_((p_precise_raw >> 16).to(torch.uint16))",
     "p.copy_(((p_precise_raw.to(torch.int64) & 0xFFFFFFFF) >> 16).to(torch.uint16))", True),
    ("mantissa update: low half of the int32 bits",
     "mantissa.copy_(p_precise_raw.to(torch.uint16))",
     "mantissa.copy_((p_precise_raw.to(torch.int64) & 0xFFFF).to(torch.uint16))", True),
    ("bigram hash: no pinned memory without CUDA",
     "out = torch.empty_like(x, pin_memory=True)", "out = torch.empty_like(x)", True),
    ("annotation typo (8ee5feda): evaluated at class creation before Python 3.14",
     "sa_lambdas: torch.Tensora", "sa_lambdas: torch.Tensor", False),
    ("FP8 MLP down-projection (#89): no CUDA device to ask for its SM count; it only sizes the "
     "per-program amax buffer, which the CPU stand-in reduces whole",
     "num_sms = torch.cuda.get_device_properties(torch.cuda.current_device()).multi_processor_count",
     "num_sms = 132", False),
]

# upstream definitions left out: FP8 custom ops (CUDA), logging, data loading, Hyperparameters
SKIPPED_DEFS = {"mm_t_op", "_", "mm_t_backward_op", "backward_t", "setup_context_t", "nvidia_smi",
                "print0", "_load_data_shard", "Shard", "distributed_data_generator", "Hyperparameters"}
KEPT_ASSIGNS = {"polar_express_coeffs", "BOS_ID", "TRAIN_MAX_NUM_DOCS", "TRAINING_STAGES",
                "training_schedule"}
REQUIRED = ("GPT", "ForwardScheduleConfig", "NorMuonAndAdam", "TrainingManager", "TrainingSchedule",
            "TRAINING_STAGES", "training_schedule", "get_muon_momentum", "get_bigram_hash",
            "TRAIN_MAX_NUM_DOCS", "next_multiple_of_n")
FORWARD_ARGS = ["self", "input_seq", "target_seq", "seqlens", "bigram_input_seq", "schedule_cfg"]
HANDLED = ("records #79-#89 (per-row fused loss with grad_scale, qk/vo banks, MUDD, XSA, #83's bigram sign "
           "table, #84's FP8 MLP up-projection, #85's MUDD gate and DC correction, #88's prefix-token loss, "
           "#89's FP8 MLP down-projection)")
PREFIX_TABLE = "prefix_table"  # record #88: token id -> its prefix token (-1: none), a buffer on both sides
GPT2_IDS = 50304               # the record's padded vocabulary: both sides' GPT-2 prefix tables are compared at it
# upstream's kernel modules (CUDA at import): every name imported from them gets a CPU stand-in
KERNEL_MODULES = ("triton_kernels", "dc_triton_kernels")


class ToolError(Exception):
    """Printed as one line: error: <message>."""


# =============================================================================
# Loading both sides
# =============================================================================

def load_module_from(path: Path, name: str):
    spec = importlib.util.spec_from_file_location(name, path)
    module = importlib.util.module_from_spec(spec)
    sys.modules[name] = module        # dataclasses look their module up by name
    spec.loader.exec_module(module)
    return module


def upstream_file(arg: str) -> Path:
    path = Path(arg)
    if path.is_dir():
        path = path / "train_gpt.py"
    if not path.is_file():
        raise ToolError(f"--upstream {arg}: no such file (give upstream's train_gpt.py or the folder holding it)")
    return path


def edit_upstream(text: str, what_if: list) -> tuple:
    """Apply UPSTREAM_EDITS, then the --upstream-edit ones; returns (edited text, descriptions)."""
    applied = []
    extra = [("--upstream-edit (what-if)", old, new, True) for old, new in what_if]
    for why, old, new, required in UPSTREAM_EDITS + extra:
        count = text.count(old)
        if count == 0 and not required:
            continue
        if count != 1:
            raise ToolError(f"upstream train_gpt.py: expected the line `{old}` once, found it {count} times "
                            f"({why}); this tool handles {HANDLED}")
        text = text.replace(old, new)
        applied.append(why)
    return text, applied


def unified_diff(before: str, after: str) -> str:
    return "".join(difflib.unified_diff(before.splitlines(keepends=True), after.splitlines(keepends=True),
                                        "upstream/train_gpt.py", "upstream/train_gpt.py (as run here)", n=0))


def definitions_only(tree: ast.Module) -> ast.Module:
    """Upstream's classes, functions and the few module constants the training code reads."""
    body = []
    for node in tree.body:
        if isinstance(node, (ast.FunctionDef, ast.ClassDef)) and node.name not in SKIPPED_DEFS:
            body.append(node)
        elif isinstance(node, ast.Assign) and any(isinstance(t, ast.Name) and t.id in KEPT_ASSIGNS
                                                  for t in node.targets):
            body.append(node)
    return ast.Module(body=body, type_ignores=[])


def module_assign(tree: ast.Module, name: str):
    """The value expression of upstream's module-level `name = ...` (None if absent)."""
    for node in tree.body:
        if isinstance(node, ast.Assign) and any(isinstance(t, ast.Name) and t.id == name for t in node.targets):
            return node.value
    return None


@dataclass(frozen=True)
class TinyModel:
    """The width both sides build: num_heads heads of HEAD_DIM channels, and (record #83 on) the
    bigram embeddings' width, the record's fraction of the record's width (#83-#84: 192 of 768,
    so 16 of 64; #85: 768 of 768, the whole stream)."""
    num_heads: int
    bigram_dim: int

    @property
    def model_dim(self) -> int:
        return self.num_heads * HEAD_DIM


def tiny_model(tree: ast.Module) -> TinyModel:
    """DEFAULT_HEADS heads unless upstream asserts `self.num_heads == N` (record #85's MUDD gate
    layout: 6); bigram_dim from upstream's Hyperparameters default (192 where it has none)."""
    asserted = {n.test.comparators[0].value for n in ast.walk(tree)
                if isinstance(n, ast.Assert) and isinstance(n.test, ast.Compare)
                and ast.unparse(n.test.left) == "self.num_heads" and len(n.test.ops) == 1
                and isinstance(n.test.ops[0], ast.Eq) and isinstance(n.test.comparators[0], ast.Constant)}
    if len(asserted) > 1:
        raise ToolError(f"upstream asserts different head counts {sorted(asserted)}; this tool handles {HANDLED}")
    heads = asserted.pop() if asserted else DEFAULT_HEADS
    hits = [n.value.value for n in ast.walk(tree) if isinstance(n, ast.AnnAssign)
            and getattr(n.target, "id", None) == "bigram_dim" and isinstance(n.value, ast.Constant)]
    record_bigram_dim = hits[0] if len(hits) == 1 else 192
    return TinyModel(heads, max(1, heads * HEAD_DIM * record_bigram_dim // RECORD_MODEL_DIM))


def kernel_imports(tree: ast.Module) -> list:
    return [a.name for node in tree.body if isinstance(node, ast.ImportFrom) and node.module in KERNEL_MODULES
            for a in node.names]


def dc_correction_standin(O):
    """Record #85's dc_attention_postonly_nodd_correction_add_base_triton (dc_triton_kernels.py)
    on ours' dc_correction_reference: base_out (T, H, D) or (1, T, H, D) plus, per query t, the
    heads' softmaxes over keys t-window+1..t of its own document (`valid`: 0 <= t - key < window,
    doc_start <= key < doc_end from the padded cu_seqlens) mixed with w1, times w2 per head, times
    v; q, k, v (1, T, H, D) as upstream passes them (after rotary, key offset and value extras).
    The kernel takes `scaling` as an fp32 kernel argument: the same fp32 value here (and in ours)."""
    def dc_standin(base_out, q, k, v, dc_weights, softmax_lse, scaling, window=None, seq_lens=None,
                   block_m=16, block_n=32):
        B, T, H, D = q.shape
        assert B == 1 and (softmax_lse is None or softmax_lse.numel() == 0), "stand-in: B == 1, no softmax_lse"
        window = 112 if window is None else int(window)
        if seq_lens is None:
            seq_lens = torch.tensor([0, T], dtype=torch.int32)
        elif seq_lens.numel() == 1:
            seq_lens = torch.tensor([0, int(seq_lens[0])], dtype=torch.int32)
        w1, w2 = dc_weights
        scale = torch.tensor(float(scaling), dtype=torch.float32)
        base = base_out if base_out.dim() == 3 else base_out[0]
        out = O.dc_correction_reference(base, q[0], k[0], v[0], w1[0], w2[0], O.document_ids(seq_lens, T),
                                        scale, window)
        return out if base_out.dim() == 3 else out[None]
    return dc_standin


def kernel_standins(O) -> dict:
    """Plain PyTorch for every name upstream imports from its kernel modules, from OUR references."""
    class SoftcappedCrossEntropy:
        @staticmethod
        def apply(*args):
            # per-row losses, like upstream's kernel. Its backward ignores the incoming gradient and
            # scales by grad_scale itself; the caller's loss.sum() * grad_scale gives autograd of
            # these rows the same factor. No FP8: ours runs the same reference with use_fp8=False.
            # #79-#87: (x, targets, mtp, w, x_s, w_s, grad_s, grad_scale); #88 on: (x, targets, mtp,
            # prefix_targets, prefix_weight, w, ...): the kernel's prefix term is ours' (targets -1
            # or >= its vocabulary dropped; the tool's table has neither past the tiny vocabulary)
            if len(args) == 8:
                x, targets, mtp_weights, w, x_s, w_s, grad_s, _ = args
                return O.softcapped_mtp_loss_reference(x, targets, mtp_weights, w, x_s, w_s, grad_s, False)
            x, targets, mtp_weights, prefix_targets, prefix_weight, w, x_s, w_s, grad_s, _ = args
            return O.softcapped_mtp_loss_reference(x, targets, mtp_weights, w, x_s, w_s, grad_s, False,
                                                   prefix_targets, prefix_weight)

    class LinearReLUSquare:
        @staticmethod
        def apply(x, W1, W2, W1_f8=None, dequant_scale=None, x_f8=None, W2_f8=None, W2_scale=None,
                  activation_scale=None, partial_amax=None):
            if W1_f8 is None:
                return O.relu_square_mlp_reference(x, W1, W2)
            # record #84 (--fp8): the product of the FP8 operands upstream's own code quantized,
            # times its dequant factor, rounded to x's dtype; the gradient is the bf16 formula's at
            # that pre-activation (straight through), as its kernel's backward and ours' reference
            exact = x @ W1.mT
            f8 = ((x_f8.float() @ W1_f8.float().mT) * dequant_scale).to(exact.dtype)
            pre = exact + (f8 - exact).detach()
            post = F.relu(pre).square()
            if W2_f8 is None:
                return post @ W2
            # record #89: the epilogue's post_f8 = min(post * (1 / activation_scale), 448) in e4m3
            # (fp32 reciprocal, as the kernel), its per-program largest post (all in slot 0 here;
            # reduce_mlp_activation_scales takes the row's max), and _scaled_mm(post_f8, W2_f8,
            # scale_a=activation_scale, scale_b=W2_scale) in fp32 rounded to bf16; the gradient is
            # the bf16 formula's (straight through: its backward reads post and W2, not the FP8 copies)
            post_f8 = (post.detach().float() * (1.0 / activation_scale)).clamp(max=E4M3_MAX).to(torch.float8_e4m3fn)
            exact = post @ W2
            f8 = ((post_f8.float() @ W2_f8.float()) * (activation_scale * W2_scale)).to(exact.dtype)
            with torch.no_grad():
                partial_amax.zero_()
                partial_amax[0] = post.detach().float().amax()
            return exact + (f8 - exact).detach()

    standins = dict(
        FusedSoftcappedCrossEntropy=SoftcappedCrossEntropy,
        FusedLinearReLUSquareFunction=LinearReLUSquare,
        XXT=O.xxt_reference,
        XTX=lambda A, out: O.xxt_reference(A.mT, out),          # what ours' xtx does off-GPU
        ba_plus_cAA=O.ba_plus_caa_reference,
        transpose_add=lambda src, dst: O.transpose_add_(dst, src),      # upstream: (src, dst)
        transpose_copy=lambda src, dst: O.transpose_copy_(dst, src),
    )
    if hasattr(O, "dc_correction_reference"):      # ours at record #85 on
        standins["dc_attention_postonly_nodd_correction_add_base_triton"] = dc_correction_standin(O)
    standins["reduce_mlp_activation_scales"] = reduce_mlp_activation_scales_standin
    standins["quantize_transpose_mlp_down_weights"] = quantize_transpose_mlp_down_weights_standin
    return standins


E4M3_MAX = 448.0


@torch.no_grad()
def reduce_mlp_activation_scales_standin(partial_amax, scales, headroom=1.25):
    """Record #89's reduce_mlp_activation_scales (triton_kernels.py): per row (layer) of the
    per-program largest values, max(largest, 1e-12) * (headroom / 448) in fp32 into scales."""
    scales[:partial_amax.size(0)].copy_(partial_amax.amax(dim=1).clamp_min(1e-12) * (headroom / E4M3_MAX))


@torch.no_grad()
def quantize_transpose_mlp_down_weights_standin(weights, output_storage, next_scales, used_scales, partial_amax,
                                                headroom=1.12):
    """Record #89's quantize_transpose_mlp_down_weights: each layer's W_proj (hidden, d) in fp32 /
    next_scales[layer], clipped to +-448, e4m3, stored transposed (d, hidden); used_scales gets the
    scale it used, then next_scales = (its largest |entry|, 1e-12 at least) x headroom / 448."""
    values = weights.float()
    quantized = (values / next_scales.view(-1, 1, 1)).clamp(-E4M3_MAX, E4M3_MAX).to(torch.float8_e4m3fn)
    output_storage.copy_(quantized.transpose(1, 2))
    used_scales.copy_(next_scales)
    partial_amax.zero_()
    partial_amax[:, 0] = values.abs().amax(dim=(1, 2))
    reduce_mlp_activation_scales_standin(partial_amax, next_scales, headroom=headroom)


def upstream_globals(O, standin, kernels: dict, tiny: TinyModel, sched: int, ext: int, tokens: int) -> dict:
    """What upstream's definitions read from its module globals (main script, imports)."""
    args = types.SimpleNamespace(num_scheduled_iterations=sched, num_extension_iterations=ext,
                                 bigram_vocab_size=BIGRAM_ROWS, val_batch_size=tokens * GRAD_ACCUM,
                                 bigram_dim=tiny.bigram_dim, bigram_sign_table_rows=getattr(O, "BIGRAM_SIGN_ROWS", 8192),
                                 train_max_seq_len=TRAIN_MAX_SEQ_LEN)
    ns = dict(torch=torch, nn=nn, F=F, Tensor=Tensor, dist=dist, math=math, copy=copy, np=np, os=os,
              threading=threading, Path=Path, dataclass=dataclass, accumulate=accumulate, pairwise=pairwise,
              device=torch.device("cpu"), rank=0, world_size=1, master_process=True,
              grad_accum_steps=GRAD_ACCUM, grad_scale=GRAD_SCALE, args=args,
              flash_attn_interface=standin.flash_attn_interface, tiktoken=TiktokenStandin(O))
    ns.update(kernels)
    ns["ReLUSqrdMLP"] = kernels["FusedLinearReLUSquareFunction"].apply   # upstream: a module alias
    return ns


class TiktokenStandin:
    """Record #88's `tiktoken` global (read by build_prefix_table): get_encoding("gpt2") is ours'
    prepare_data.gpt2_encoding() (tiktoken, or offline the ranks file GPT2_TIKTOKEN_FILE names).
    Upstream's module-level tiktoken.get_encoding("gpt2") preload is not run (definitions only)."""

    def __init__(self, O):
        self.O = O

    def get_encoding(self, name: str):
        assert name == "gpt2", name
        try:
            return self.O.prepare_data.gpt2_encoding()
        except (RuntimeError, FileNotFoundError, ImportError) as e:
            raise ToolError(f"record #88's prefix-token table needs GPT-2's vocabulary: {e}".replace("\n", " ")) from None


def check_upstream_layout(U, tree: ast.Module) -> None:
    missing = [n for n in REQUIRED if not hasattr(U, n)]
    if missing:
        raise ToolError(f"upstream train_gpt.py has no {', '.join(missing)}; this tool handles {HANDLED}")
    params = list(inspect.signature(U.GPT.forward).parameters)
    if params != FORWARD_ARGS:
        raise ToolError(f"upstream GPT.forward takes ({', '.join(params)}), expected ({', '.join(FORWARD_ARGS)}); "
                        f"this tool handles {HANDLED}")
    calls = [n for n in ast.walk(tree) if isinstance(n, ast.Call) and isinstance(n.func, ast.Attribute)
             and n.func.attr == "apply" and getattr(n.func.value, "id", "") == "FusedSoftcappedCrossEntropy"]
    if len(calls) != 1 or len(calls[0].args) not in (8, 10):
        raise ToolError("upstream's FusedSoftcappedCrossEntropy.apply call is not the 8-argument one of record "
                        "#79 on (x, targets, mtp, w, x_s, w_s, grad_s, grad_scale) nor #88's 10-argument one "
                        f"(prefix_targets, prefix_weight after mtp); this tool handles {HANDLED}")


def load_upstream(path: Path, O, standin, sched: int, ext: int, tokens: int, what_if: list = ()):
    """Returns (module namespace, parsed tree, the tiny model's width, the diff of the edits,
    edit descriptions)."""
    original = path.read_text()
    text, applied = edit_upstream(original, list(what_if))
    try:
        tree = ast.parse(text, filename=str(path))
    except SyntaxError as e:
        raise ToolError(f"{path}: not Python ({e.msg}, line {e.lineno})") from None
    kernels = kernel_standins(O)
    unknown = [n for n in kernel_imports(tree) if n not in kernels]
    if unknown:
        hint = (" (ours has no dc_correction_reference: it predates record #85; pair upstream #85 with ours "
                "at #85, e.g. --ours-rev 3ce9dc0)" if not hasattr(O, "dc_correction_reference")
                and "dc_attention_postonly_nodd_correction_add_base_triton" in unknown else "")
        raise ToolError(f"upstream imports {', '.join(unknown)} from {'/'.join(KERNEL_MODULES)}: no CPU "
                        f"stand-in for it here (from ours' references){hint}; this tool handles {HANDLED}")
    tiny = tiny_model(tree)
    U = types.ModuleType("upstream_train_gpt")
    U.__dict__.update(upstream_globals(O, standin, kernels, tiny, sched, ext, tokens))
    sys.modules[U.__name__] = U
    exec(compile(definitions_only(tree), str(path), "exec"), U.__dict__)
    check_upstream_layout(U, tree)
    return U, tree, tiny, unified_diff(original, text), applied


def ours_source(rev: str | None) -> Path:
    """train_speedrun.py of the working tree, or (--ours-rev) of a git revision, written with that
    revision's prepare_data.py to a temporary folder (another edit in progress stays out)."""
    if rev is None:
        return OURS_SCRIPT
    folder = Path(tempfile.mkdtemp(prefix="cpu_vs_upstream_"))
    atexit.register(shutil.rmtree, folder, ignore_errors=True)
    for name in (OURS_SCRIPT.name, "prepare_data.py"):
        shown = subprocess.run(["git", "-C", str(REPO), "show", f"{rev}:{name}"], capture_output=True, text=True)
        if shown.returncode:
            raise ToolError(f"--ours-rev {rev}: git show {rev}:{name} failed ({shown.stderr.strip()})")
        (folder / name).write_text(shown.stdout)
    return folder / OURS_SCRIPT.name


def load_ours(path: Path, standin):
    """Our script unchanged; its "fa3" backend is served by the stand-in (as upstream's)."""
    sys.path.insert(0, str(path.parent))     # it imports prepare_data from its folder
    O = load_module_from(path, "train_speedrun_under_test")
    if not hasattr(O, "_FLASH_VARLEN"):
        raise ToolError(f"{path.name} has no _FLASH_VARLEN backend table to register the FA3 stand-in in")
    O._FLASH_VARLEN["fa3"] = (standin.flash_attn_varlen_func, "benchmarks/fa3_standin")
    return O


def ours_revision(rev: str | None) -> str:
    def git(*cmd):
        return subprocess.run(["git", "-C", str(REPO), *cmd], capture_output=True, text=True).stdout.strip()
    if rev is not None:
        return f"{OURS_SCRIPT.name} at {rev} = {git('rev-parse', '--short', rev) or '?'} (from git)"
    head = git("rev-parse", "--short", "HEAD") or "?"
    dirty = " + uncommitted edits" if git("status", "--porcelain", "--", OURS_SCRIPT.name) else ""
    return f"{OURS_SCRIPT.name} (working tree) at {head}{dirty}"


# =============================================================================
# Models: built by each side's code, the same random weights copied into both
# =============================================================================

def upstream_bf16_params(tree: ast.Module) -> list:
    """Names upstream's main casts to bf16 (`model.X.data = model.X.data.bfloat16()`), besides every
    nn.Embedding / nn.Linear weight (its `for m in model.modules()` loop)."""
    names = []
    for node in tree.body:
        if (isinstance(node, ast.Assign) and len(node.targets) == 1
                and ast.unparse(node.targets[0]).startswith("model.")
                and ast.unparse(node.value).endswith(".data.bfloat16()")):
            names.append(ast.unparse(node.targets[0])[len("model."):-len(".data")])
    loop = [n for n in tree.body if isinstance(n, ast.For) and "nn.Embedding, nn.Linear" in ast.unparse(n)]
    if not names or not loop:
        raise ToolError("could not find how upstream's main casts its parameters to bf16 "
                        f"(`model.X.data = model.X.data.bfloat16()` lines); this tool handles {HANDLED}")
    return names


def build_upstream(U, tree, tiny: TinyModel, tokens: int) -> nn.Module:
    model = U.GPT(vocab_size=VOCAB, num_layers=NUM_LAYERS, num_heads=tiny.num_heads, head_dim=HEAD_DIM,
                  model_dim=tiny.model_dim, max_seq_len=tokens)
    for m in model.modules():
        if isinstance(m, (nn.Embedding, nn.Linear)):
            m.weight.data = m.weight.data.bfloat16()
    for name in upstream_bf16_params(tree):
        p = model.get_parameter(name)
        p.data = p.data.bfloat16()
    U.model = model      # #84's quantize_mlp_fp8 reads the module global `model` (its main's)
    return model


def build_ours(O, tiny: TinyModel, tokens: int, fp8: bool) -> nn.Module:
    fields = {f.name for f in dataclasses.fields(O.ModelConfig)}
    extra = dict(bigram_dim=tiny.bigram_dim) if "bigram_dim" in fields else {}     # record #83 on
    try:
        cfg = O.ModelConfig(vocab_size=VOCAB, num_layers=NUM_LAYERS, num_heads=tiny.num_heads, head_dim=HEAD_DIM,
                            model_dim=tiny.model_dim, max_seq_len=tokens, bigram_vocab_size=BIGRAM_ROWS,
                            use_fp8=fp8, attn_backend="fa3", world_size=1,
                            train_max_seq_len=TRAIN_MAX_SEQ_LEN, val_max_len=tokens, compile_mode="none", **extra)
    except (TypeError, ValueError) as e:
        raise ToolError(f"ours' ModelConfig refused the tiny model: {e}") from None
    model = O.GPT(cfg).cast_to_bf16()
    model.lm_head.use_fp8 = False    # cfg.use_fp8 (--fp8) is for the MLP here: no FP8 lm_head on either side
    return model


def fp8_mode(U, O, fp8: bool) -> str:
    """Record #84's FP8 MLP up-projection: off on both sides (upstream: DISABLE_FP8=1, ours:
    use_fp8=False) unless --fp8, then on on both; refused where one side lacks it."""
    up_has = hasattr(U.GPT, "quantize_mlp_fp8")
    ours_has = hasattr(O, "mlp_up_fp8_operands")
    if fp8 and not (up_has and ours_has):
        raise ToolError(f"--fp8 needs record #84's FP8 MLP up-projection on both sides; it is missing in "
                        f"{' and '.join(n for n, has in (('upstream', up_has), ('ours', ours_has)) if not has)}")
    up_down, ours_down = upstream_has_fp8_down(U), hasattr(O.GPT, "refresh_mlp_down_scales")
    if fp8 and up_down != ours_down:
        raise ToolError(f"--fp8: record #89's FP8 MLP down-projection is only on the {'upstream' if up_down else 'ours'} "
                        "side (pair upstream #89 with ours at #89, e.g. --ours-rev bfb2e69, or leave --fp8 out)")
    if fp8:
        os.environ.pop("DISABLE_FP8", None)
        return ("FP8 MLP up-projection" + (" and down-projection (delayed scaling)" if up_down else "")
                + " ON on both sides (plain-PyTorch FP8 operands, straight-through gradient)")
    os.environ["DISABLE_FP8"] = "1"
    return "no FP8 on either side" + (" (upstream: DISABLE_FP8=1)" if up_has else "")


def upstream_has_fp8_down(U) -> bool:
    """Record #89: quantize_mlp_fp8(bootstrap_down=...) also quantizes the down-projection."""
    return hasattr(U.GPT, "quantize_mlp_fp8") and "bootstrap_down" in inspect.signature(U.GPT.quantize_mlp_fp8).parameters


def upstream_bootstrap_steps(tree: ast.Module) -> int:
    """N of upstream main's `model.quantize_mlp_fp8(bootstrap_down=(step < N))` in its training loop
    (record #89: 16); 0 where it has none."""
    hits = {kw.value.comparators[0].value for n in ast.walk(tree) if isinstance(n, ast.Call)
            and isinstance(n.func, ast.Attribute) and n.func.attr == "quantize_mlp_fp8"
            for kw in n.keywords if kw.arg == "bootstrap_down" and isinstance(kw.value, ast.Compare)
            and ast.unparse(kw.value.left) == "step" and isinstance(kw.value.ops[0], ast.Lt)
            and isinstance(kw.value.comparators[0], ast.Constant)}
    if len(hits) > 1:
        raise ToolError(f"upstream's main bootstraps the FP8 down-projection scales at steps < {sorted(hits)}; "
                        f"this tool handles {HANDLED}")
    return hits.pop() if hits else 0


def refresh_fp8(model: nn.Module, bootstrap: bool) -> None:
    """Upstream main's model.quantize_mlp_fp8() (record #84): after init, each optimizer step and
    the warm-up reset; from record #89 with bootstrap_down (init, warm-up, reset and the first
    steps: W_proj's scale from its current largest entry; later the one noted a step earlier)."""
    if hasattr(model, "quantize_mlp_fp8"):
        if "bootstrap_down" in inspect.signature(model.quantize_mlp_fp8).parameters:
            model.quantize_mlp_fp8(bootstrap_down=bootstrap)
        else:
            model.quantize_mlp_fp8()


# record #89's delayed FP8 scales of the MLP down-projection: upstream's buffer, ours' (per layer)
FP8_SCALE_BUFFERS = (("_mlp_down_act_scales", "mlp_down_act_scales"),
                     ("_mlp_down_proj_scales", "mlp_down_w_scales"),
                     ("_mlp_down_proj_next_scales", "mlp_down_w_next_scales"))


def fp8_scale_pairs(up: nn.Module, ours: nn.Module) -> list:
    """[(name, upstream buffer, ours' buffer)] of FP8_SCALE_BUFFERS present on both sides (compared
    with the parameters after every step under --fp8)."""
    a, b = dict(up.named_buffers()), dict(ours.named_buffers())
    return [(f"buffer {u}", a[u], b[o]) for u, o in FP8_SCALE_BUFFERS if u in a and o in b]


@torch.no_grad()
def share_prefix_table(U, O, up: nn.Module, ours: nn.Module) -> tuple:
    """Record #88's prefix-token table (a buffer over the padded vocabulary, filled by each side's
    main from GPT-2's BPE; upstream's GPT leaves it -1, ours' too outside build_model). Both
    builders run at the record's 50304 ids (compared: a static finding if they differ); the tiny
    model gets upstream's table's first rows with every entry >= VOCAB, and the rows of the padding
    ids, set to -1 (no prefix term there), copied into both. Returns (message, findings)."""
    a, b = (dict(m.named_buffers()).get(PREFIX_TABLE) for m in (up, ours))
    if a is None and b is None:
        return "", []
    if a is None or b is None or not hasattr(U, "build_prefix_table") or not hasattr(O, "gpt2_prefix_token_table"):
        raise ToolError(f"record #88's prefix-token table is only on the {'ours' if a is None else 'upstream'} side: "
                        "unsupported combination (pair upstream #88 with ours at #88, e.g. --ours-rev c8f7074, "
                        "#89 with --ours-rev bfb2e69)")
    if a.shape != b.shape or a.dtype != b.dtype:
        raise ToolError(f"prefix table: upstream {tuple(a.shape)} {a.dtype}, ours {tuple(b.shape)} {b.dtype}")
    full_up = U.build_prefix_table(GPT2_IDS)
    try:
        full_ours = O.gpt2_prefix_token_table(GPT2_IDS)
    except SystemExit as e:
        raise ToolError(str(e).removeprefix("error: ")) from None
    findings = []
    if not torch.equal(full_up, full_ours):
        ids = (full_up != full_ours).nonzero().flatten().tolist()
        findings.append(f"prefix table (GPT-2, {GPT2_IDS} ids): {len(ids)} entries differ, first ids {ids[:8]}")
    table = full_up[:a.numel()].clone()
    table[table >= VOCAB] = -1
    table[VOCAB:] = -1
    a.copy_(table)
    b.copy_(table)
    used = int((table[:VOCAB] >= 0).sum())
    return (f"; prefix table: GPT-2's ({GPT2_IDS} ids, upstream's and ours' builders "
            f"{'equal' if not findings else 'DIFFER'}) cut to ids < {VOCAB} ({used} of {VOCAB} have a prefix), "
            "copied into both"), findings


@torch.no_grad()
def share_sign_table(up: nn.Module, ours: nn.Module) -> str:
    """Record #83's random +-1 table (a buffer, not a parameter): ours gets upstream's copy."""
    a, b = (dict(m.named_buffers()).get(n) for m, n in zip((up, ours), SIGN_TABLE))
    if a is None and b is None:
        return ""
    if a is None or b is None:
        raise ToolError(f"record #83's bigram sign table is only on the {'ours' if a is None else 'upstream'} "
                        f"side (buffer {SIGN_TABLE[1] if a is None else SIGN_TABLE[0]}): unsupported combination "
                        "(pair upstream #83+ with ours at #83+, or upstream #82 with --ours-rev 74ce5b6)")
    if a.shape != b.shape or a.dtype != b.dtype:
        raise ToolError(f"bigram sign table: upstream {tuple(a.shape)} {a.dtype}, ours {tuple(b.shape)} {b.dtype}")
    b.copy_(a)
    return f"; sign table {SIGN_TABLE[0]} {tuple(a.shape)} copied into ours' {SIGN_TABLE[1]}"


def pair_parameters(up: nn.Module, ours: nn.Module) -> list:
    """[(name, upstream param, our param)] matched by name (NAME_MAP for renamed ones)."""
    up_params = dict(up.named_parameters())
    ours_params = {NAME_MAP.get(n, n): p for n, p in ours.named_parameters()}
    if set(up_params) != set(ours_params):
        raise ToolError(f"parameter names differ: upstream only {sorted(set(up_params) - set(ours_params))}, "
                        f"ours only {sorted(set(ours_params) - set(up_params))} (add a NAME_MAP entry?)")
    bad = [f"{n} {tuple(p.shape)} vs {tuple(ours_params[n].shape)}" for n, p in up_params.items()
           if p.shape != ours_params[n].shape]
    if bad:
        raise ToolError(f"parameter shapes differ (upstream vs ours): {'; '.join(bad)}")
    return [(n, p, ours_params[n]) for n, p in up_params.items()]


def dtype_findings(pairs: list) -> list:
    return [f"dtype of {n}: upstream {a.dtype}, ours {b.dtype}" for n, a, b in pairs if a.dtype != b.dtype]


@torch.no_grad()
def randomize(pairs: list, seed: int, model_dim: int) -> None:
    """One draw per parameter around upstream's initial value, copied into both; embed = lm_head^T
    (tied at the start on both sides)."""
    g = torch.Generator().manual_seed(seed)
    for name, a, b in pairs:
        if name == "embed.weight":
            continue
        scale = NOISE.get(name, MATRIX_NOISE * model_dim ** -0.5 if a.dim() >= 2 else VECTOR_NOISE)
        value = a.float() + scale * torch.randn(a.shape, generator=g)
        a.copy_(value)
        b.copy_(value)
    named = {n: (a, b) for n, a, b in pairs}
    for side in (0, 1):
        named["embed.weight"][side].copy_(named["lm_head.weight"][side].T)


# =============================================================================
# What needs no training: optimizer settings and the schedule
# =============================================================================

def optimizer_findings(tm, opt, pairs: list) -> list:
    """Per parameter: optimizer, betas, lr and wd multipliers (with NorMuon's shape factor), base lr,
    decay, eps, NorMuon beta2 and the per-matrix lr ratio; then the scatter and work orders."""
    found = []
    up_cfg = tm.optimizer.param_cfgs
    for name, a, b in pairs:
        u, o = up_cfg[a], opt.settings[b]
        ours_ratio = opt.state[b]["lr_ratio"].flatten().tolist() if o.optim == "normuon" else None
        up_ratio = u.per_matrix_lr_mul if u.optim == "normuon" else None
        if up_ratio is None and ours_ratio is not None:
            up_ratio = [1.0] * len(ours_ratio)
        fields = [("optim", u.optim, o.optim), ("betas", u.adam_betas, o.betas), ("lr_mul", u.lr_mul, o.lr_mul),
                  ("wd_mul", u.wd_mul, o.wd_mul), ("lr", u.initial_lr, o.initial_lr),
                  ("weight_decay", u.weight_decay, o.weight_decay), ("eps", u.eps, o.eps),
                  ("beta2", u.beta2, o.beta2), ("per-matrix lr", up_ratio, ours_ratio)]
        found += [f"optimizer {name}: {field} upstream {x}, ours {y}" for field, x, y in fields if x != y]
    up_names = {p: n for n, p, _ in pairs}
    ours_names = {p: n for n, _, p in pairs}
    for what, up_order, ours_order in (("scatter", tm.optimizer.scatter_order, opt.scatter_order),
                                       ("work", tm.optimizer.work_order, opt.work_order)):
        u = [up_names[tm.optimizer._param_by_label[label]] for label in up_order]
        o = [ours_names[opt.by_label[label]] for label in ours_order]
        if u != o:
            found.append(f"{what} order: upstream {u}, ours {o}")
    return found


def upstream_schedule(U, tree, sched: int, ext: int):
    """Upstream's module-level `training_schedule = TrainingSchedule(...)` for another length."""
    expr = module_assign(tree, "training_schedule")
    saved = (U.args.num_scheduled_iterations, U.args.num_extension_iterations)
    U.args.num_scheduled_iterations, U.args.num_extension_iterations = sched, ext
    try:
        return eval(compile(ast.Expression(expr), "upstream training_schedule", "eval"), U.__dict__)
    finally:
        U.args.num_scheduled_iterations, U.args.num_extension_iterations = saved


def ours_schedule(O, sched: int, ext: int):
    args = O.Hyperparameters(num_scheduled_iterations=sched, num_extension_iterations=ext)
    return O.training_schedule(args), args


def schedule_findings(U, O, tree, sched: int, ext: int) -> list:
    """Every step's stage settings, lr multiplier, NorMuon momentum, MTP weights and Adam parity;
    stage boundaries, split step and the final validation window."""
    ts = upstream_schedule(U, tree, sched, ext)
    os_, oargs = ours_schedule(O, sched, ext)
    saved, U.training_schedule = U.training_schedule, ts      # get_muon_momentum reads the global
    found = []
    try:
        for what, x, y in (("boundaries", ts.boundaries, os_.boundaries), ("split step", ts.split_step, os_.split_step),
                           ("final window", ts.ws_post_yarn_ext, os_.final_window_blocks)):
            if x != y:
                found.append(f"schedule {sched}+{ext}: {what} upstream {x}, ours {y}")
        for s in range(ts.total_steps + 1):
            ustage, _ = ts.lookup(s)
            ostage, _ = os_.lookup(s)
            ours_momentum = O.muon_momentum(s, os_.total_steps, oargs.muon_warmup_steps, oargs.muon_cooldown_steps)
            values = [("windows", tuple(ustage.window_sizes), tuple(ostage.window_blocks)),
                      ("batch", ustage.batch_size, ostage.batch_size),
                      ("max_seq_len", ustage.train_max_seq_len, ostage.max_seq_len),
                      ("lr", ts.get_lr(s), os_.lr_multiplier(s)),
                      ("momentum", U.get_muon_momentum(s), ours_momentum),
                      # upstream keeps fp32 tensors: compare ours' floats as fp32
                      ("mtp", ts.mtp_weights[s].tolist(), torch.tensor(os_.mtp_weights(s)).tolist()),
                      # record #88's prefix-token weight (fp32 (1,) tensors upstream)
                      ("prefix", ts.prefix_weights[s].tolist() if hasattr(ts, "prefix_weights") else None,
                       torch.tensor([os_.prefix_weight(s)]).tolist() if hasattr(os_, "prefix_weight") else None),
                      ("adam", s % 2 == 1, O.is_adam_step(s))]
            found += [f"schedule {sched}+{ext} step {s}: {what} upstream {x}, ours {y}"
                      for what, x, y in values if x != y]
    finally:
        U.training_schedule = saved
    return found


def record_length(tree: ast.Module, O) -> tuple:
    """(upstream's, ours') default scheduled + extension steps."""
    up = []
    for field in ("num_scheduled_iterations", "num_extension_iterations"):
        hits = [n.value for n in ast.walk(tree) if isinstance(n, ast.AnnAssign)
                and getattr(n.target, "id", None) == field and isinstance(n.value, ast.Constant)]
        up.append(hits[0].value if len(hits) == 1 else None)
    ours = O.Hyperparameters()
    return tuple(up), (ours.num_scheduled_iterations, ours.num_extension_iterations)


# =============================================================================
# Training: each side's own step, warm-up and reset
# =============================================================================

@dataclass
class Batch:
    inputs: Tensor
    targets: Tensor
    cu_seqlens: Tensor
    bigram_up: Tensor      # upstream's get_bigram_hash
    bigram_ours: Tensor    # ours' host-side hash (what its loader hands the model)


def make_batch(U, O, seed: int, tokens: int) -> Batch:
    """Documents of 20-300 tokens packed into one sequence, cu_seqlens padded as upstream's loader."""
    g = torch.Generator().manual_seed(seed)
    ends = torch.randint(20, 300, (tokens // 20,), generator=g).cumsum(0)
    ends = ends[ends < tokens]
    slots = U.TRAIN_MAX_NUM_DOCS.get(tokens, U.next_multiple_of_n(tokens // 300, n=128))
    cu = torch.full((slots,), tokens, dtype=torch.int32)
    cu[0] = 0
    cu[1:len(ends) + 1] = ends.to(torch.int32)
    tok = torch.randint(0, VOCAB, (tokens + 1,), generator=g)
    inputs = tok[:-1].to(torch.int32)
    return Batch(inputs, tok[1:].to(torch.int64), cu, U.get_bigram_hash(inputs),
                 torch.from_numpy(O.bigram_rows_host(inputs.numpy(), BIGRAM_ROWS)))


class UpstreamSide:
    """Upstream's TrainingManager and the body of its main loop (one rank)."""

    def __init__(self, U, tree, model):
        self.U, self.tree, self.model = U, tree, model
        self.tm = U.TrainingManager(model)
        self.bootstrap_steps = upstream_bootstrap_steps(tree)     # record #89: 16
        refresh_fp8(model, bootstrap=True)

    def forward_backward(self, step: int, batches: list) -> list:
        self.tm.advance_schedule(step)
        losses = []
        for b in batches:
            loss = self.model(b.inputs, b.targets, b.cu_seqlens, b.bigram_up, self.tm.get_forward_args()).sum()
            (loss * GRAD_SCALE).backward()
            losses.append(loss.detach())
        return losses

    def optimizer_step(self, step: int, warmup: bool = False) -> None:
        self.tm.step_optimizers(step)
        refresh_fp8(self.model, bootstrap=warmup or step < self.bootstrap_steps)

    def warmup_steps(self) -> list:
        """Upstream main's own `warmup_steps = sorted(...)` expression."""
        expr = module_assign(self.tree, "warmup_steps")
        if expr is None:
            raise ToolError(f"upstream's main has no `warmup_steps = ...` line; this tool handles {HANDLED}")
        scope = dict(self.U.__dict__, transition_steps=self.tm.get_transition_steps())
        return list(eval(compile(ast.Expression(expr), "upstream warmup_steps", "eval"), scope))

    def warm_up(self, batches_for) -> list:
        """As upstream's main: save, replay the warm-up steps, restore (its validation forwards are
        left out: a no-grad forward changes no state)."""
        initial = dict(model=copy.deepcopy(self.model.state_dict()), optimizer=self.tm.get_state())
        steps = self.warmup_steps()
        for step in steps:
            self.forward_backward(step, batches_for(step))
            self.optimizer_step(step, warmup=True)
        self.model.zero_grad(set_to_none=True)
        self.model.load_state_dict(initial["model"])
        self.tm.reset(initial["optimizer"])
        refresh_fp8(self.model, bootstrap=True)
        return steps

    def windows(self) -> tuple:
        return self.tm.ws_short, self.tm.ws_long


class OursSide:
    """Our optimizer, StageState and train_step's micro-batch loop (one rank)."""

    def __init__(self, O, model, sched: int, ext: int):
        self.O, self.model = O, model
        self.schedule, self.args = ours_schedule(O, sched, ext)
        self.opt = O.NorMuonAndAdam(model.named_parameters(), world_size=1, rank=0, compile=False)
        self.stage = O.StageState(self.schedule, model, torch.device("cpu"))
        # record #89 (FP8 runs): ours' optimizer_step refreshes W_proj's FP8 scale given raw_model;
        # build_model's first refresh (bootstrap), here after the tool's weights are in
        self.takes_model = "raw_model" in inspect.signature(O.optimizer_step).parameters
        if model.cfg.use_fp8 and hasattr(model, "refresh_mlp_down_scales"):
            model.refresh_mlp_down_scales(bootstrap=True)

    def forward_backward(self, step: int, batches: list) -> list:
        self.stage.advance(step)
        losses = []
        for b in batches:
            loss = self.model(b.inputs, b.targets, b.cu_seqlens, self.stage.forward_config(), b.bigram_ours)
            (loss * GRAD_SCALE).backward()
            losses.append(loss.detach())
        return losses

    def optimizer_step(self, step: int, warmup: bool = False) -> None:
        if self.takes_model:      # as ours' main and warm_up call it
            self.O.optimizer_step(self.opt, self.schedule, step, self.args, self.model, warmup=warmup)
        else:
            self.O.optimizer_step(self.opt, self.schedule, step, self.args)

    def warm_up(self, batches_for) -> list:
        """As ours' warm_up(): the steps warmup_plan picks for a compiled run, then the reset."""
        initial_model = copy.deepcopy(self.model.state_dict())
        initial_opt = self.opt.state_dict()
        steps, _, _ = self.O.warmup_plan(self.args, self.schedule)
        for step in steps:
            self.forward_backward(step, batches_for(step))
            self.optimizer_step(step, warmup=True)
        self.model.zero_grad(set_to_none=True)
        self.model.load_state_dict(initial_model)
        self.opt.load_state_dict(initial_opt)
        self.opt.reset()
        self.stage.reset()
        return steps

    def windows(self) -> tuple:
        return self.stage.ws_short, self.stage.ws_long


# =============================================================================
# Comparing tensors
# =============================================================================

def differing_rows(x: Tensor, y: Tensor, limit: int = 8) -> str:
    """Indices along dim 0 where x and y differ (a bank's matrices, a lambda's layers)."""
    if x.dim() == 0:            # a 0-dim parameter (#85's MUDD gate scale)
        return "scalar"
    diff = (x != y) if x.dim() < 2 else (x != y).flatten(1).any(1)
    rows = diff.nonzero().flatten().tolist()
    shown = ",".join(map(str, rows[:limit])) + (",..." if len(rows) > limit else "")
    return f"{len(rows)}/{x.size(0)} rows [{shown}]"


def tensor_differences(pairs: list, grads: bool) -> list:
    """[(relative difference, name, rows)] of every tensor not bit-identical, worst first.
    Relative: ||up - ours|| / ||up|| in fp32."""
    found = []
    for name, a, b in pairs:
        x, y = (a.grad, b.grad) if grads else (a.detach(), b.detach())
        if x is None and y is None:
            continue
        if (x is None) != (y is None):
            found.append((math.inf, name, f"gradient on the {'ours' if x is None else 'upstream'} side only"))
            continue
        if x.dtype == y.dtype and torch.equal(x, y):
            continue
        xf, yf = x.float(), y.float()
        rel = ((xf - yf).norm() / xf.norm().clamp_min(1e-30)).item()
        found.append((rel, name, differing_rows(xf, yf)))
    return sorted(found, key=lambda t: -t[0])


def worst(found: list) -> str:
    if not found:
        return "identical"
    rel, name, _ = found[0]
    return f"{rel:.1e} {name}" + (f" (+{len(found) - 1})" if len(found) > 1 else "")


# =============================================================================
# Math or rounding? The same step in float64
# =============================================================================

FLOAT64_AGREE = 1e-9    # relative; float64 summation-order effects are ~1e-15


def float64_check(up_side, ours_side, pairs: list, batch: Batch) -> list:
    """Step 0's forward and backward on float64 copies of both models whose weights hold bf16
    values. Upstream's explicit .bfloat16() casts (its lambdas) are then exact, and the order in
    which a sum or a gradient accumulation runs moves results by ~1e-15: what still differs by more
    than FLOAT64_AGREE is different math. Returns [(relative difference, what, rows)] of the loss
    and every gradient that is not bit-identical, worst first."""
    up64, ours64 = copy.deepcopy(up_side.model), copy.deepcopy(ours_side.model)
    for model in (up64, ours64):
        for p in model.parameters():
            p.data = p.data.bfloat16().double()
    # without FP8 (--fp8): quantizing float64 operands is not what the bf16 run does (upstream's
    # weight scales would be rounded to bf16, ours' not); the bf16 training compares the FP8 path
    ours64.cfg.use_fp8 = False
    saved_env = os.environ.get("DISABLE_FP8")
    os.environ["DISABLE_FP8"] = "1"
    up_side.tm.advance_schedule(0)
    ours_side.stage.advance(0)
    # upstream's forward casts its lambdas with .bfloat16() (ours: .type_as(x)): exact on bf16
    # values, but it would round their gradients to bf16 here; read it as float64 for this check
    # (in the bf16 training both sides round those gradients alike)
    bfloat16 = torch.Tensor.bfloat16
    torch.Tensor.bfloat16 = lambda t, *a, **k: t.double() if t.dtype == torch.float64 else bfloat16(t, *a, **k)
    try:
        lu = up64(batch.inputs, batch.targets, batch.cu_seqlens, batch.bigram_up, up_side.tm.get_forward_args()).sum()
        (lu * GRAD_SCALE).backward()
    finally:
        torch.Tensor.bfloat16 = bfloat16
        if saved_env is None:
            os.environ.pop("DISABLE_FP8", None)
    lo = ours64(batch.inputs, batch.targets, batch.cu_seqlens, ours_side.stage.forward_config(), batch.bigram_ours)
    (lo * GRAD_SCALE).backward()
    found = [(abs(lu.item() - lo.item()) / abs(lu.item()), "loss", "")]
    up_named = dict(up64.named_parameters())
    ours_named = {NAME_MAP.get(n, n): p for n, p in ours64.named_parameters()}
    grads64 = [(n, up_named[n], ours_named[n]) for n, _, _ in pairs]
    found += [(rel, f"grad {name}", rows) for rel, name, rows in tensor_differences(grads64, grads=True)]
    return sorted([f for f in found if f[0] > 0], key=lambda t: -t[0])


def report_float64(all_found: list) -> list:
    """Prints the check's line(s); returns the differences above FLOAT64_AGREE."""
    head = ("float64 check (step 0; both models in float64 holding bf16 values, so rounding order cannot "
            "matter):")
    found = [f for f in all_found if f[0] > FLOAT64_AGREE]
    if not found:
        largest = (f"largest {all_found[0][0]:.1e} in {all_found[0][1]}" if all_found
                   else "all bit-identical")
        print(f"{head} loss and every gradient agree within {FLOAT64_AGREE:.0e} ({largest}) -> the same math")
        return found
    print(f"{head} MATH DIFFERS in {len(found)} quantities")
    for rel, what, rows in found[:12]:
        print(f"    {what}: rel {rel:.2e}{', ' + rows if rows else ''}")
    return found


# =============================================================================
# main
# =============================================================================

def parse_args(argv):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--upstream", required=True, help="upstream's train_gpt.py (or its checkout folder)")
    p.add_argument("--ours-rev", metavar="REV", help="our train_speedrun.py as committed at this git revision "
                   "(e.g. HEAD) instead of the working tree's")
    p.add_argument("--upstream-edit", nargs=2, action="append", default=[], metavar=("OLD", "NEW"),
                   help="what-if: also replace this exact text (once) in upstream's source; repeatable")
    p.add_argument("--sync-grads", action="store_true",
                   help="copy upstream's gradients into ours before every optimizer step: checks the optimizer, "
                   "schedule and warm-up/reset bit for bit even when the gradients differ by rounding")
    p.add_argument("--fp8", action="store_true",
                   help="record #84's FP8 MLP up-projection forward (and #89's down-projection) on both sides "
                   "(plain-PyTorch FP8 stand-ins); default: off on both (upstream DISABLE_FP8=1, ours use_fp8=False)")
    p.add_argument("--steps", type=int, default=12, help="scheduled steps (the stages scale with it)")
    p.add_argument("--ext", type=int, default=2, help="extension steps after the schedule")
    p.add_argument("--warmup", choices=("both", "none"), default="both",
                   help="both: each side's warm-up and reset first (as its main does); none: skip them")
    p.add_argument("--micro", type=int, default=1, help=f"micro-batches per step (each scaled by 1/{GRAD_ACCUM})")
    p.add_argument("--tokens", type=int, default=1024, help="tokens per micro-batch (a multiple of 128)")
    p.add_argument("--seed", type=int, default=0, help="weights and batches")
    args = p.parse_args(argv)
    if args.steps < 3 or args.ext < 0 or args.micro < 1:
        p.error("--steps must be >= 3 (three stages), --ext >= 0, --micro >= 1")
    if args.tokens % 128 or args.tokens < 256:
        p.error("--tokens must be a multiple of 128, at least 256")
    return args


def init_process_group() -> None:
    """Upstream's model reads dist.get_world_size(): a one-rank gloo group, no network."""
    if not dist.is_initialized():
        dist.init_process_group("gloo", store=dist.HashStore(), rank=0, world_size=1)


def report_static(U, O, tree, pairs, up_side, ours_side, args, extra: list = ()) -> list:
    findings = dtype_findings(pairs) + list(extra)
    findings += optimizer_findings(up_side.tm, ours_side.opt, pairs)
    findings += schedule_findings(U, O, tree, args.steps, args.ext)
    (us, ue), (os_, oe) = record_length(tree, O)
    if (us, ue) != (os_, oe):
        findings.append(f"record length: upstream {us}+{ue} steps, ours {os_}+{oe}")
    elif us is not None:
        findings += schedule_findings(U, O, tree, us, ue)
    print(f"checked without training: {len(pairs)} parameters (names, shapes, dtypes, optimizer settings, "
          f"orders), schedule at {args.steps}+{args.ext} and {us}+{ue} steps: "
          f"{'all equal' if not findings else f'{len(findings)} differences'}")
    for line in findings[:40]:
        print(f"  DIFF {line}")
    if len(findings) > 40:
        print(f"  ... and {len(findings) - 40} more")
    return findings


@torch.no_grad()
def copy_grads(pairs: list) -> None:
    """--sync-grads: ours' optimizer gets upstream's gradients (Adam's pending even-step sums too)."""
    for _, a, b in pairs:
        b.grad = None if a.grad is None else a.grad.clone()


KINDS = ("bigram hash", "loss", "gradients", "parameters")


def train_and_compare(U, O, up_side, ours_side, pairs, args, buffers: list = ()) -> tuple:
    """Trains both sides; returns (steps, {kind: (step, [(rel, name, rows)])} of each kind's first
    difference). Gradients are compared before the optimizer step, parameters after it."""
    def batches_for(seed_base):
        return lambda step: [make_batch(U, O, seed_base + 16 * step + m, args.tokens) for m in range(args.micro)]

    first = {}
    if args.warmup == "both":
        up_steps = up_side.warm_up(batches_for(1_000_000))
        ours_steps = ours_side.warm_up(batches_for(1_000_000))
        print(f"warm-up then reset: upstream replayed steps {up_steps}, ours {ours_steps}")
        after = tensor_differences(pairs + list(buffers), grads=False)
        print(f"after the reset: parameters {worst(after)}")
        if after:
            first["parameters"] = ("after the warm-up reset", after)
    steps = args.steps + args.ext
    for step in range(steps):
        batches = batches_for(100_003 * args.seed)(step)
        hashes = [(1.0, f"micro-batch {i}", differing_rows(b.bigram_up, b.bigram_ours))
                  for i, b in enumerate(batches) if not torch.equal(b.bigram_up, b.bigram_ours)]
        lu = up_side.forward_backward(step, batches)
        lo = ours_side.forward_backward(step, batches)
        grads = tensor_differences(pairs, grads=True)
        if args.sync_grads:
            copy_grads(pairs)
        up_side.optimizer_step(step)
        ours_side.optimizer_step(step)
        params = tensor_differences(pairs + list(buffers), grads=False)
        losses = [(abs(a.item() - b.item()) / abs(a.item()), "loss", "")
                  for a, b in zip(lu, lo) if not torch.equal(a, b)]
        found = dict(zip(KINDS, (hashes, losses, grads, params)))
        per_token = lambda values: sum(v.item() for v in values) / (len(values) * args.tokens)
        print(f"step {step:3d} {'adam' if step % 2 else '    '} loss up {per_token(lu):.6f} ours {per_token(lo):.6f}"
              f"{' (differ)' if losses else ''}  grads {worst(grads)}  params {worst(params)}  "
              f"windows up {up_side.windows()} ours {ours_side.windows()}")
        for kind in KINDS:
            if found[kind] and kind not in first:
                first[kind] = (f"step {step}", found[kind])
                if kind in ("gradients", "parameters"):
                    for rel, name, rows in found[kind][:12]:
                        print(f"    first {kind} difference: {name}: rel {rel:.2e}, {rows}")
    return steps, first


def verdict(steps: int, first: dict, static: list, math_diffs: list, sync_grads: bool) -> str:
    if not first and not static:
        return f"verdict: bit-identical at all {steps} steps (losses, gradients, parameters)"
    parts = []
    for kind in KINDS:
        if kind in first:
            where, found = first[kind]
            rel, name, rows = found[0]
            if kind == "bigram hash":
                parts.append(f"bigram hash first differs at {where} ({name}: {rows.replace('rows', 'positions')})")
                continue
            what = "" if kind == "loss" else f" {name}"
            parts.append(f"{kind} first differ at {where}{what} (rel {rel:.1e}{', ' + rows if rows else ''})")
        elif kind == "parameters" and sync_grads:
            parts.append(f"parameters identical at all {steps} steps given upstream's gradients "
                         "(optimizer, schedule, warm-up/reset agree)")
    if static:
        parts.append(f"{len(static)} static differences (above)")
    if math_diffs:
        parts.append(f"float64 check: math differs ({math_diffs[0][1]} rel {math_diffs[0][0]:.1e})")
    elif first:
        parts.append("float64 check: same math, so the step-0 differences are rounding order")
    return "verdict: " + "; ".join(parts)


def run(argv) -> int:
    args = parse_args(argv)
    path = upstream_file(args.upstream)
    started = time.perf_counter()
    init_process_group()
    standin = load_module_from(STANDIN_FILE, "fa3_standin_kernels")
    O = load_ours(ours_source(args.ours_rev), standin)
    U, tree, tiny, diff, applied = load_upstream(path, O, standin, args.steps, args.ext, args.tokens,
                                                args.upstream_edit)
    what_if = f", {len(args.upstream_edit)} of them --upstream-edit what-ifs" if args.upstream_edit else ""
    print(f"upstream: {path} ({len(applied)} edits{what_if}, below); ours: {ours_revision(args.ours_rev)}")
    print(diff, end="")
    fp8 = fp8_mode(U, O, args.fp8)
    torch.manual_seed(args.seed)
    up_model = build_upstream(U, tree, tiny, args.tokens)
    ours_model = build_ours(O, tiny, args.tokens, args.fp8)
    shared = share_sign_table(up_model, ours_model)
    pairs = pair_parameters(up_model, ours_model)
    randomize(pairs, args.seed, tiny.model_dim)
    prefix, prefix_findings = share_prefix_table(U, O, up_model, ours_model)
    shared += prefix
    buffers = fp8_scale_pairs(up_model, ours_model) if args.fp8 else []
    print(f"tiny model: {NUM_LAYERS} layers, d={tiny.model_dim}, {tiny.num_heads} heads x {HEAD_DIM}, vocab {VOCAB}, "
          f"bigram table {BIGRAM_ROWS} x {tiny.bigram_dim}")
    print("upstream's kernel names -> ours' plain PyTorch: " + ", ".join(kernel_imports(tree))
          + f" ({fp8}); FlashAttention 3 -> benchmarks/fa3_standin (both sides){shared}"
          + ("; --sync-grads: ours' optimizer steps on upstream's gradients" if args.sync_grads else ""))
    up_side = UpstreamSide(U, tree, up_model)
    ours_side = OursSide(O, ours_model, args.steps, args.ext)
    static = report_static(U, O, tree, pairs, up_side, ours_side, args, prefix_findings)
    math_diffs = report_float64(float64_check(up_side, ours_side, pairs, make_batch(U, O, 7, args.tokens)))

    steps, first = train_and_compare(U, O, up_side, ours_side, pairs, args, buffers)
    print(f"({time.perf_counter() - started:.0f} s)")
    print(verdict(steps, first, static, math_diffs, args.sync_grads))
    return 0 if not first and not static else 1


def main(argv=None) -> int:
    try:
        return run(sys.argv[1:] if argv is None else argv)
    except ToolError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("error: interrupted", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
