"""Speedrun trainer: our own implementation of the modded-nanogpt record #84 (see README: Records).

One file, read top to bottom in data-flow order:
config -> what you tune -> model -> optimizer -> data -> schedule -> runtime -> loop -> warm-up -> main.
Each piece of math comes first as plain PyTorch (the reference, and what runs on CPU); the Triton
kernels that speed it up on a GPU follow the code they serve (end of the model and optimizer
sections), and the compile/warm-up machinery follows the training loop.

Run:  python3 train_speedrun.py --smoke --device cpu       (tiny, every code path, CPU)
      torchrun --nproc_per_node 8 train_speedrun.py         (the record configuration)
"""

# =============================================================================
# SECTION: config
# =============================================================================

import argparse
import copy
import dataclasses
import gc
import glob
import json
import math
import os
import platform
import signal
import subprocess
import sys
import threading
import time
import uuid
import warnings
from dataclasses import dataclass, field
from itertools import accumulate, pairwise
from pathlib import Path
from typing import Callable, NamedTuple

import numpy as np
import torch
import torch._functorch.config   # AOTAutograd cache settings (configure_compile_cache)
import torch.distributed as dist
import torch.nn.functional as F
import triton
import triton.language as tl
from torch import Tensor, nn
from torch.nn.attention.flex_attention import BlockMask, flex_attention
from torch.nn.attention.flex_attention import _transpose_ordered   # (private) kv tables -> q tables

import prepare_data   # the shared data script: FineWeb shard reader/writer (same folder as this file)

MICRO_BATCHES_PER_STEP = 8  # the record's step: 8 micro-batches (one per GPU at 8 GPUs, accumulated below)
SUPPORTED_WORLD_SIZES = (1, 2, 4, 8)
WINDOW_BLOCK = 128          # attention windows are counted in blocks of this many tokens
GPU_TYPES = ("auto", "h100", "h200", "a100", "other")
ATTN_BACKENDS = ("fa3", "flash_attn", "flex", "sdpa")   # sdpa: the dense-mask reference (CPU, tests)
ATTN_CHOICES = ("auto",) + ATTN_BACKENDS[:3]            # --attn: auto picks fa3 > flash_attn > flex
COMPILE_MODES = ("none", "model")                       # none: eager (what --no-compile gives)
INIT_CHOICES = ("scratch", "resume")


def option(default, help: str, choices: tuple | None = None, cli: bool = True, show_default: bool = True):
    """A Hyperparameters field and its command-line option (build_arg_parser reads the metadata)."""
    return field(default=default, metadata=dict(help=help, choices=choices, cli=cli, show_default=show_default))


@dataclass
class Hyperparameters:
    """Everything a researcher changes from the command line: build_arg_parser makes one option
    per field (--name), with the help and choices given here."""
    # data: FineWeb-format shards (prepare_data.py writes them)
    train_files: str = option("data/fineweb10B/fineweb_train_*.bin", "glob of training shards (under $DATA_PATH if set)")
    val_files: str = option("data/fineweb10B/fineweb_val_*.bin", "glob of validation shards (under $DATA_PATH if set)")
    val_tokens: int = option(10_485_760, "validation tokens: fixed, so val losses of different runs compare")
    val_batch_size: int = option(4 * 64 * 1024 * 8, "validation tokens per 8 micro-batch forwards over all ranks")
    train_max_seq_len: int = option(128 * 16, "longest document piece a training batch holds: caps STAGE_TABLE's "
                                                "per-stage max_seq_len")
    # stage batch = stage_seqs[i] x batch_seq_len x 8 tokens (8 micro-batches over all ranks); set
    # by --smoke, edited with STAGE_TABLE below rather than on the command line
    stage_seqs: tuple = option((8, 16, 24), "sequences per micro-batch in each stage", cli=False)
    batch_seq_len: int = option(2048, "tokens per sequence of a training micro-batch", cli=False)
    # schedule
    num_scheduled_iterations: int = option(1270, "steps of the 3-stage schedule; stage boundaries scale with it")
    num_extension_iterations: int = option(15, "steps after the schedule at final lr and windows")
    muon_warmup_steps: int = option(300, "NorMuon momentum warmup, in steps (absolute: not scaled with the schedule)")
    muon_cooldown_steps: int = option(50, "NorMuon momentum cooldown at the end, in steps")
    # evaluation, logging, checkpoints
    val_loss_every: int = option(250, "validate every N steps, 0 = only at the end")
    seed: int = option(0, "parameter init seed")
    max_steps: int = option(0, "stop training after N steps (timing runs; the final validation is skipped)",
                            show_default=False)
    save_checkpoint: bool = option(False, "also save a checkpoint at the end or at --max_steps "
                                          "(a SIGTERM/SIGUSR1 stop always saves one)")
    init_from: str = option("scratch", "resume: continue the run --run_id from its latest checkpoint in "
                                       "--log_dir/RUN_ID/ (written when SIGTERM/SIGUSR1 stops a run, or by "
                                       "--save_checkpoint)", choices=INIT_CHOICES)
    log_dir: str = option("logs", "where the run log (RUN_ID.txt, RUN_ID.json) and checkpoints go")
    run_id: str = option("", "name of the log file (default: a fresh uuid)", show_default=False)
    # hardware and compilation
    device: str = option("cuda", "cuda, or cpu (tiny runs and tests)", choices=("cuda", "cpu"))
    gpu_type: str = option("auto", "card family (auto: from the device name); FP8 lm_head and MLP projections wherever the card "
                                   "supports FP8 (compute capability >= 8.9), never with a100", choices=GPU_TYPES)
    attn: str = option("auto", "attention backend", choices=ATTN_CHOICES)
    compile: bool = option(True, "torch.compile the model and optimizer math (default on for cuda, off for cpu)",
                           show_default=False)
    compile_cache: str = option("", "persist Inductor/Triton caches in this folder so the next run starts fast",
                                show_default=False)
    parallel_compile: bool = option(True, "one GPU: compile the later stages' and the validation graphs in helper "
                                          "processes while this one compiles stage 1")
    smoke: bool = option(False, "tiny model and schedule that runs every code path (2-4 minutes on 2 CPU cores)",
                         show_default=False)


# --smoke: a tiny schedule with tiny batches that still crosses every stage boundary, the
# embed/lm_head split, periodic and final validation. Explicit flags still win over these.
SMOKE_OVERRIDES = dict(
    val_tokens=8 * 256,
    val_batch_size=8 * 256,
    train_max_seq_len=128,
    stage_seqs=(1, 2, 3),
    batch_seq_len=128,
    num_scheduled_iterations=6,
    num_extension_iterations=2,
    muon_warmup_steps=3,
    muon_cooldown_steps=2,
    val_loss_every=4,
)


# =============================================================================
# WHAT YOU TUNE: every number and list of the record's recipe, in one place; a record attempt
# edits these (or the command-line options in Hyperparameters above); the code reads them when it
# builds the model, the optimizer and the schedule.
# =============================================================================

# ---- the record's layer layout (11 layers) ----
NO_ATTENTION_LAYER = 6            # layer 6 only has its MLP
PAIRED_HEAD_LAYERS = (0, 2, 5, 9)
LONG_WINDOW_LAYERS = (3, 10)      # long window + partial key offset; all others use the short one
VALUE_EMBED_LAYERS = (1, 2, 8, 9, 10)   # value embeddings 0..4 (and their gates) feed these
SKIP_FROM_LAYER, SKIP_TO_LAYER = 3, 6   # U-net style gated skip: layer 3's output, added where
                                        # layer 6 starts (in place of its attention)
QK_HEADS_PER_MATRIX = 2           # NorMuon orthogonalizes W_q and W_k per pair of heads (#80)
XSA_LAYERS = (1, 3, 4, 7)         # gated exclusive self-attention (#82; 8 and 10 dropped in #85):
                                  # unpaired layers only (a paired layer's values do not line up
                                  # with its heads); strengths per token from the MUDD gate
ATTN_GATE_LAYERS = (3, 10)        # attention outputs gated per token and head (MUDD gate, #85);
                                  # every other layer's output goes ungated since #85
DC_LAYER = 10                     # "dynamically composable" correction of this layer's attention
DC_WINDOW = 112                   # output (record #85): keys t-111..t, heads' probabilities mixed
GATE_INPUTS = 12                  # the smear gate reads only the first 12 channels of its input;
VE_GATE_SPLIT = 6                 # the value-embedding gates the first 6 channels of the input
                                  # and the first 6 of the embedding (#70; paired layers too since #81)

# ---- model constants (rotary, YaRN, bigram hash, FP8 scales, init) ----
ROPE_MIN_FREQ = 1 / 1024          # rotary frequencies run from 1 down to this, log-spaced
YARN_ALPHA, YARN_BETA = 1, 32     # YaRN ramp: <1 rotation per window is rescaled fully, >32 kept
INITIAL_ATTN_SCALE = 0.1          # softmax scale on QK-normed heads, grown on each YaRN extension
BIGRAM_HASH_A, BIGRAM_HASH_B = 36313, 27191
BIGRAM_SIGN_ROWS = 8192           # random +-1 rows: position t's bigram row is multiplied by row
                                  # (token[t-1] XOR token[t]) % 8192 of them, so bigrams sharing a
                                  # hashed row mostly cancel in it (record #83, "sign trick")
LM_HEAD_X_SCALE = 100 / 448       # FP8 scales of the lm_head inputs, weight and (per micro-batch
LM_HEAD_W_SCALE = 1.6 / 448       # accumulation) gradient, as in the record
LM_HEAD_GRAD_SCALE = 0.75 / 448
MLP_DOWN_ACT_HEADROOM = 1.80      # FP8 MLP down-projection (record #89), delayed scaling: a layer's
MLP_DOWN_W_HEADROOM = 1.12        # post is quantized with (its largest value in the previous
MLP_DOWN_BOOTSTRAP_STEPS = 16     # forward) x 1.80 / 448; W_proj with (its largest entry before
                                  # the last optimizer step) x 1.12 / 448, except in the first 16
                                  # steps, which use the current weights' largest entry / 448
INIT_STD_FACTOR = 0.5             # bank init: uniform with std 0.5 / sqrt(model_dim)
LM_HEAD_INIT_STD = 0.005
VALUE_EMBED_INIT_STD = 0.01       # value embeddings start as small gaussians (zeros before #70)

# ---- learned scalars: one fp32 vector `scalars` (PARAM_TABLE["scalars"]), read by name ----
# Per layer: name -> initial value (a tuple: that many per layer). Each layer function gets its
# layer's values in a dict (GPT.body), so a new per-layer gate is a row here plus its use in one
# layer function. Then the model-wide ones. Stored in this order, as the record lays them out.
LAYER_SCALARS = dict(
    attn_lambdas=(0.5, 1.0),      # (qkv, out) projection scales of an attention layer
)
MODEL_SCALARS = dict(
    smear_lambda=0.0,             # strength of the smear gate (previous token into x0)
    skip_lambda=-1.5,             # skip strength sigmoid(-1.5) ~ 0.18, times the MUDD gate's "skip"
)

# ---- residual stream: per-layer lambdas, each its own parameter (records #73-#77) ----
# Every sublayer (attention, then MLP) writes  x <- resid * x + post * output  into the residual
# stream; x0 and the hashed-bigram embedding enter with each attention output, scaled per token
# by the MUDD gate (below; per-layer lambdas before #85; layer 0 takes its bigram part into the
# stream before it). The attention layers after ATTN_INPUT_LAYER all read that layer's output
# instead of the current stream, so they never see the last MLPs' prediction-oriented writes
# (record #77, replacing #73's two-lane stream).
ATTN_INPUT_LAYER = 7
RESID_LAMBDA_INIT = 1.1 ** 0.5    # per sublayer, so 1.1 per layer as before #73
POST_LAMBDA_INIT = 1.0
X0_INJECT_INIT = 0.0              # x0 and bigram injection strengths at the start
BIGRAM_INJECT_INIT = 0.05
LAYER_LAMBDA_PARAMS = ("post_lambdas", "resid_lambdas")

# ---- dense connections into the last layer and the head (record #81: MUDD, arXiv 2502.12170) ----
# Where MUDD_LAYER starts, a small MLP of the stream (d -> MUDD_HIDDEN, GELU, -> one number per
# coefficient, times MUDD_SCALE) gives every token its own coefficients: how much of earlier
# stream states goes into that layer's attention values and into its stream, its value-embedding
# gate (one per half of the heads), and its residual lambdas (replacing the per-layer ones). After
# the layer a second one mixes earlier states into the stream the head reads; its layer-7 term
# starts at -0.5, the backout it replaces (before #81: x - 0.5 * layer 7's output).
# States: "input" = the stream entering layer 0 (its bigram part included), "layer3" / "layer7" =
# the outputs of SKIP_FROM_LAYER / ATTN_INPUT_LAYER, "x" or "mudd_in" = the stream entering
# MUDD_LAYER (layer 9's output), "ve0" = the first value embedding (layer 1's).
# name -> initial value: the output weights start at 0, so these are the coefficients at init.
MUDD_LAYER = 10
MUDD_HIDDEN = 64
MUDD_SCALE = 0.1                  # the biases are stored divided by it
MUDD_LAYER_COEFFICIENTS = dict(
    v_input=0.0, v_layer7=0.0, v_x=0.0,        # added into the attention values (V)
    x_input=0.0, x_layer7=0.0, x_self=0.0,     # stream <- (1 + x_self) x + x_input input + x_layer7 layer7
    ve_gate_first_heads=2.0, ve_gate_last_heads=2.0,   # value-embedding gate (2 = 2 sigmoid's top)
    resid_attn=RESID_LAMBDA_INIT, post_attn=POST_LAMBDA_INIT,        # the attention write, ...
    input_inject=X0_INJECT_INIT, bigram_inject=BIGRAM_INJECT_INIT,   # ... injecting input (not x0)
    resid_mlp=RESID_LAMBDA_INIT, post_mlp=POST_LAMBDA_INIT,          # and the bigram embedding
)
MUDD_HEAD_COEFFICIENTS = dict(input=0.0, layer7=-0.5, mudd_in=0.0, ve0=0.0, layer3=0.0)

# ---- the MUDD gate: per-token gates of the other layers (record #85) ----
# Two more small MLPs of the same shape (d -> MUDD_GATE_HIDDEN, GELU, -> outputs, times a learned
# scale that starts at MUDD_GATE_SCALE_INIT) give every token its XSA strengths, attention-output
# gates, x0/bigram injection strengths, the skip strength and the DC weights: the "pre" gate reads
# x0 and serves the layers before MUDD_GATE_POST_LAYER, the "post" gate reads the stream entering
# that layer and serves the rest (mudd_gate_layout lists both). Initial values by kind (per head
# where the kind is per head): the output weights start at 0, so the gates start at these.
MUDD_GATE_HIDDEN = 64
MUDD_GATE_SCALE_INIT = 0.1        # the biases are stored divided by it
MUDD_GATE_POST_LAYER = 4
MUDD_GATE_INITS = dict(
    xsa=0.0,                      # tanh(0): XSA off
    attn_gate=0.25,               # attention output times 0.25 (ATTN_GATE_LAYERS)
    x0=X0_INJECT_INIT, bigram=BIGRAM_INJECT_INIT,
    skip=0.5,                     # layer 3's output into layer 6: sigmoid(skip_lambda) * 0.5
    dc_w1=1.0,                    # DC: each head's share of the mixed probabilities (RMS-normed over heads)
    dc_w2=0.0,                    # DC: how much of the correction each head adds (0: off at init)
)

# ---- schedule: one row per stage; the last row is the extension after the scheduled steps ----
# duration: fraction of --num_scheduled_iterations; lr_mul: learning-rate multiplier; windows:
# (short, long) attention windows in WINDOW_BLOCK-token blocks (layers in LONG_WINDOW_LAYERS get
# the long one); mtp_start / mtp_end: multi-token-prediction weights (next token, +2, +3), linear
# over the stage; prefix_start / prefix_end: weight of the prefix-token term (record #88: each
# position also predicts the longest vocabulary token that is a proper prefix of its next token),
# linear over the stage; max_seq_len: longest document piece in the stage's batches (short sequences
# first, record #72; --train_max_seq_len caps it). A stage's batch is stage_seqs[i] x
# batch_seq_len x 8 tokens (Hyperparameters fields; the extension keeps the last); its lr_mul
# follows the batch (about (batch ratio)^0.5-0.6).
STAGE_TABLE = [
    dict(duration=1 / 3, lr_mul=1.00, windows=(1, 3), mtp_start=(1.0, 0.5, 0.25), mtp_end=(1.0, 0.5, 0.0),
         prefix_start=0.25, prefix_end=0.25, max_seq_len=896),
    dict(duration=1 / 3, lr_mul=1.52, windows=(3, 7), mtp_start=(1.0, 0.5), mtp_end=(1.0, 0.0),
         prefix_start=0.25, prefix_end=0.0, max_seq_len=2048),
    dict(duration=1 / 3, lr_mul=1.73, windows=(5, 11), mtp_start=(1.0,), mtp_end=(1.0,),
         prefix_start=0.0, prefix_end=0.0, max_seq_len=2048),
    dict(duration=None, lr_mul=1.00, windows=(6, 13), mtp_start=(1.0,), mtp_end=(1.0,),
         prefix_start=0.0, prefix_end=0.0, max_seq_len=2048),
]
FINAL_WINDOW_BLOCKS = 20          # long window of the final validation only (longer than training saw)
COOLDOWN_FRAC = 0.60              # the last 60% of the scheduled steps blend lr_mul linearly into ...
LR_FLOOR = 0.15                   # ... this multiplier (held through the extension; 0.1 before #72)
SPLIT_EMBED_STAGE = 2             # embed and lm_head are untied at this stage's first (odd) step
MUON_MOMENTUM_RANGE = (0.85, 0.95)   # NorMuon momentum ramps low -> high, and back at the end
                                     # (over --muon_warmup_steps / --muon_cooldown_steps)
# Documents a micro-batch may hold, by its tokens per rank (the length of its cu_seqlens, a fixed
# shape for the compiled graph): the record's three training sizes get room for just what FineWeb
# needs (record #78); other sizes ~1 per 300 tokens, rounded up to a multiple of 128.
MAX_DOCS_PER_MICRO_BATCH = {16384: 64, 32768: 96, 49152: 128}

# ---- optimizer: base rates, then per-parameter multipliers ----
# Which optimizer, communication pattern and multipliers each labelled parameter gets.
# "sharded": reduce-scatter the grad, update this rank's slice, all-gather the result.
# "sparse": the same result for a table whose steps touch few rows: each rank sends every other
# rank only the rows it touched that the other owns (record #71, the hashed-bigram table).
# "replicated": all-reduce the grad, every rank updates the whole tensor.
# Dict order is the order gradient reductions are launched (big banks first: their backward
# finished first and their comms take longest).
PARAM_TABLE = {
    "qk":             dict(optim="normuon", comms="sharded"),
    "vo":             dict(optim="normuon", comms="sharded"),
    "mlp":            dict(optim="normuon", comms="sharded"),
    "scalars":        dict(optim="adam", comms="replicated", betas=(0.9, 0.99), lr_mul=5.0, wd_mul=0.0),
    "smear_gate":     dict(optim="adam", comms="replicated", betas=(0.9, 0.99), lr_mul=0.01, wd_mul=0.0),
    "ve_gate_bank":   dict(optim="adam", comms="replicated", betas=(0.9, 0.99)),
    "lm_head":        dict(optim="adam", comms="sharded", betas=(0.5, 0.95), wd_mul=150.0),
    "bigram_embed":   dict(optim="adam", comms="sparse", betas=(0.75, 0.95), lr_mul=75.0, wd_mul=5.0),
    "post_lambdas":   dict(optim="adam", comms="replicated", betas=(0.9, 0.95), lr_mul=1.0, wd_mul=0.0),
    "resid_lambdas":  dict(optim="adam", comms="replicated", betas=(0.9, 0.95), lr_mul=5.0, wd_mul=0.0),
    "value_embed":    dict(optim="adam", comms="sharded", betas=(0.75, 0.95), lr_mul=75.0, wd_mul=5.0),
    "embed":          dict(optim="adam", comms="sharded", betas=(0.5, 0.95), wd_mul=150.0),
    "mudd_w1":        dict(optim="adam", comms="replicated", betas=(0.9, 0.99), lr_mul=0.25),
    "mudd_w2":        dict(optim="adam", comms="replicated", betas=(0.9, 0.99), lr_mul=0.25),
    "mudd_b2":        dict(optim="adam", comms="replicated", betas=(0.9, 0.99), lr_mul=0.25, wd_mul=0.0),
    "mudd_gate_w1":   dict(optim="adam", comms="replicated", betas=(0.9, 0.99), lr_mul=0.1),
    "mudd_gate_w2":   dict(optim="adam", comms="replicated", betas=(0.9, 0.99), lr_mul=0.1),
    "mudd_gate_b2":   dict(optim="adam", comms="replicated", betas=(0.9, 0.99), lr_mul=0.1, wd_mul=0.0),
    "mudd_gate_scale": dict(optim="adam", comms="replicated", betas=(0.9, 0.99), lr_mul=0.1, wd_mul=0.0),
}
# Order the updates run in: small tensors first while the big reductions are still in flight;
# lm_head before embed (the tied embed copies lm_head); the Polar Express banks last.
WORK_ORDER = ["scalars", "smear_gate", "ve_gate_bank", "mudd_b2", "mudd_gate_b2", "mudd_gate_scale",
              "post_lambdas", "resid_lambdas", "mudd_w2", "mudd_gate_w2", "value_embed", "bigram_embed",
              "mudd_w1", "mudd_gate_w1", "lm_head", "embed", "qk", "vo", "mlp"]
ADAM_DEFAULTS = dict(lr=0.008, eps=1e-10, weight_decay=0.005)
NORMUON_DEFAULTS = dict(lr=0.023, momentum=0.95, beta2=0.9, weight_decay=1.2)   # momentum: replaced every
                                                       # step by muon_momentum (MUON_MOMENTUM_RANGE);
                                                       # beta2 (NorMuon's second moment): 0.95 before #78
# The mlp bank alternates c_fc, c_proj: c_proj matrices get this multiple of the NorMuon lr;
# every NorMuon matrix also gets sqrt(rows / cols) when taller than wide (NorMuonAndAdam).
MLP_OUTPUT_LR_RATIO = 2.0


# =============================================================================
# SECTION: model
# The record's GPT: 11 layers over a 768-wide residual stream, weights held in banks the optimizer
# shards, extra inputs at every layer (x0, hashed bigrams, value embeddings), gates everywhere.
# In order: shapes, layout, rotary; the building blocks (MLP, softcapped loss, attention) as
# plain PyTorch; the forward as small pure functions; GPT; then the Triton kernels of the
# building blocks and torch.compile.
# =============================================================================

@dataclass
class ModelConfig:
    """What GPT needs to know: shapes (defaults = the record) and how this run executes it.

    The layer layout (which layers skip attention, use paired heads, long windows, value
    embeddings, the skip connection, MUDD) is the record's and is written for exactly
    11 layers; width, heads and vocabularies can shrink for tests and --smoke.
    """
    vocab_size: int = 50257              # GPT-2 tokens; padded to a multiple of 128 inside GPT
    num_layers: int = 11
    num_heads: int = 6
    head_dim: int = 128
    model_dim: int = 768
    max_seq_len: int = 262144            # rows of the rotary tables: the longest forward (val) input
    bigram_vocab_size: int = 50304 * 15 // 2  # hashed bigram embedding rows (x5 before #83, x15 in #83-#84)
    bigram_dim: int = 768                # their width: they enter the first bigram_dim channels (192 in #83-#84)
    use_fp8: bool = False                # FP8 lm_head and MLP projections in training (the card must support it)
    attn_backend: str = "sdpa"           # one of ATTN_BACKENDS (see resolve_attention_backend)
    world_size: int = 1                  # pads `scalars` and the banks like the record
    train_max_seq_len: int = 2048        # longest document piece in training (flash-attn max_seqlen)
    val_max_len: int = 262144            # tokens per rank in one validation forward
    compile_mode: str = "model"          # GPT.compiled(): one of COMPILE_MODES (compile_gpt)
    compile_dynamic: bool | None = False # torch.compile's dynamic= for those graphs

    def __post_init__(self):
        problems = []
        if self.num_layers != 11:
            problems.append(f"num_layers={self.num_layers}: the record's layer layout needs 11")
        if self.num_heads * self.head_dim != self.model_dim:
            problems.append(f"num_heads*head_dim={self.num_heads * self.head_dim} must equal "
                            f"model_dim={self.model_dim}")
        if self.num_heads % 2:
            problems.append(f"num_heads={self.num_heads} must be even (paired-head layers)")
        if self.num_heads % QK_HEADS_PER_MATRIX:
            problems.append(f"num_heads={self.num_heads} must be a multiple of QK_HEADS_PER_MATRIX="
                            f"{QK_HEADS_PER_MATRIX} (the optimizer's W_q/W_k blocks)")
        if self.head_dim % 4:
            problems.append(f"head_dim={self.head_dim} must be a multiple of 4 (half-truncated RoPE)")
        if self.model_dim < 12:
            problems.append("model_dim must be >= 12 (gates read the first 12 channels)")
        if not 0 < self.bigram_dim <= self.model_dim:
            problems.append(f"bigram_dim={self.bigram_dim} must be in 1..model_dim={self.model_dim}")
        if any(i in PAIRED_HEAD_LAYERS or i == NO_ATTENTION_LAYER or not 0 <= i < self.num_layers
               for i in XSA_LAYERS):
            problems.append(f"XSA_LAYERS={XSA_LAYERS} must be unpaired attention layers")
        attention_layers = [i for i in range(self.num_layers) if i != NO_ATTENTION_LAYER]
        if any(i not in attention_layers for i in ATTN_GATE_LAYERS):
            problems.append(f"ATTN_GATE_LAYERS={ATTN_GATE_LAYERS} must be attention layers")
        if DC_LAYER not in attention_layers or DC_LAYER in PAIRED_HEAD_LAYERS or DC_WINDOW < 1:
            problems.append(f"DC_LAYER={DC_LAYER} must be an unpaired attention layer and "
                            f"DC_WINDOW={DC_WINDOW} at least 1")
        if not 0 < MUDD_GATE_POST_LAYER < self.num_layers:
            problems.append(f"MUDD_GATE_POST_LAYER={MUDD_GATE_POST_LAYER} must be a layer after 0")
        if not max(SKIP_FROM_LAYER, ATTN_INPUT_LAYER) < MUDD_LAYER < self.num_layers or MUDD_LAYER == NO_ATTENTION_LAYER:
            problems.append(f"MUDD_LAYER={MUDD_LAYER} must be an attention layer after layers "
                            f"{SKIP_FROM_LAYER} and {ATTN_INPUT_LAYER}, whose outputs it reads")
        if self.compile_mode not in COMPILE_MODES:
            problems.append(f"compile_mode={self.compile_mode!r} is not one of {COMPILE_MODES}")
        if self.attn_backend not in ATTN_BACKENDS:
            problems.append(f"attn_backend={self.attn_backend!r} is not one of {ATTN_BACKENDS}")
        if problems:
            raise ValueError("bad ModelConfig: " + "; ".join(problems))

    @classmethod
    def smoke(cls, **overrides) -> "ModelConfig":
        """A tiny model with the record's 11-layer layout (4 heads so head pairing is non-trivial)."""
        values = dict(model_dim=64, num_heads=4, head_dim=16, bigram_vocab_size=50304, bigram_dim=16,
                      max_seq_len=4096, val_max_len=4096, train_max_seq_len=128)
        values.update(overrides)
        return cls(**values)

def norm(x: Tensor) -> Tensor:
    return F.rms_norm(x, (x.size(-1),))


def next_multiple_of_n(v: int, n: int) -> int:
    return -(-v // n) * n


@dataclass(frozen=True)
class LayerSpec:
    """Static structure of one layer."""
    index: int
    has_attn: bool
    paired: bool              # paired-head attention
    long_window: bool         # long window and the partial key offset
    attn_slot: int | None     # which attention layer: its matrices in qk_bank/vo_bank, its gate
    value_slot: int | None    # which value embedding (and ve gate) this layer adds to v
    xsa: bool = False         # exclusive self-attention on this layer's output


def record_layer_layout(num_layers: int = 11) -> list[LayerSpec]:
    specs, attn_slot = [], 0
    for i in range(num_layers):
        has_attn = i != NO_ATTENTION_LAYER
        specs.append(LayerSpec(
            index=i, has_attn=has_attn, paired=i in PAIRED_HEAD_LAYERS,
            long_window=i in LONG_WINDOW_LAYERS, attn_slot=attn_slot if has_attn else None,
            value_slot=VALUE_EMBED_LAYERS.index(i) if i in VALUE_EMBED_LAYERS else None,
            xsa=i in XSA_LAYERS))
        attn_slot += has_attn
    return specs


@dataclass
class ForwardScheduleConfig:
    """What the schedule changes between steps: MTP weights (tensor), windows (tokens), the
    longest training document piece (flash-attn's max_seqlen; None: ModelConfig's) and the
    prefix-token weight ((1,) tensor; None: no prefix term)."""
    mtp_weights: Tensor
    ws_short: int
    ws_long: int
    max_seq_len: int | None = None
    prefix_weight: Tensor | None = None


# ---- rotary embedding -------------------------------------------------------------------------

class Yarn(nn.Module):
    """Half-truncated rotary tables (cos, signed sin), rescaled YaRN-style when the window grows.

    A quarter of head_dim frequencies, each rotating one adjacent pair of dims, cover the first
    half of every head; the second half has frequency 0 and never rotates ("stationary" dims).
    paired=True: for paired-head layers a token's two heads get rotary positions 2t and 2t+1, so a
    table row holds both (2 * head_dim columns). Tables are bf16 like the record's.
    """

    def __init__(self, head_dim: int, max_seq_len: int, paired: bool = False):
        super().__init__()
        self.head_dim = head_dim
        self.max_seq_len = max_seq_len
        self.paired = paired
        width = head_dim * (2 if paired else 1)
        self.register_buffer("cos", torch.empty(max_seq_len, width, dtype=torch.bfloat16), persistent=False)
        self.register_buffer("sin", torch.empty(max_seq_len, width, dtype=torch.bfloat16), persistent=False)
        self.reset()

    def reset(self) -> None:
        """Back to the initial frequencies and softmax scale (start of training)."""
        device = self.cos.device
        freq = ROPE_MIN_FREQ ** torch.linspace(0, 1, steps=self.head_dim // 4, dtype=torch.float32,
                                               device=device)
        freq = freq.repeat_interleave(2)
        # fp32 and not a buffer: model.to(dtype) must not round it; it follows cos to its device
        self.angular_freq = torch.cat([freq, freq.new_zeros(self.head_dim // 2)])
        self.attn_scale = INITIAL_ATTN_SCALE
        self._fill_tables()

    def apply(self, old_window: int, new_window: int = None, alpha: int = YARN_ALPHA,
              beta: int = YARN_BETA):
        """YaRN: the long window grew old_window -> new_window tokens. Frequencies that turn less
        than alpha times across the old window are slowed by old/new, those that turn more than
        beta times are kept, a linear ramp in between; the softmax scale grows with log(new/old).

        (Named like the record's method; called with a function it is nn.Module.apply.)
        """
        if callable(old_window):
            return super().apply(old_window)
        freq = self.angular_freq.to(self.cos.device)
        rotations = old_window * freq / (2 * math.pi)
        shrink = old_window / new_window
        ramp = torch.clamp((rotations - alpha) / (beta - alpha), 0, 1)
        freq *= shrink + ramp * (1 - shrink)
        self.angular_freq = freq
        self._fill_tables()
        self.attn_scale *= 0.2 * math.log(new_window / old_window) + 1
        return self

    def _fill_tables(self) -> None:
        freq = self.angular_freq.to(self.cos.device)
        t = torch.arange(self.max_seq_len, dtype=torch.float32, device=freq.device)
        if self.paired:
            theta = torch.cat([torch.outer(2 * t, freq), torch.outer(2 * t + 1, freq)], dim=-1)
        else:
            theta = torch.outer(t, freq)
        self.cos.copy_(theta.cos())
        self.sin.copy_(theta.sin())
        # rotate pairs (a, b) -> (a cos + b sin, b cos - a sin): the sign lives in the table
        self.sin[..., 1::2] *= -1

    def tables(self, length: int) -> tuple[Tensor, Tensor]:
        if length > self.max_seq_len:
            raise ValueError(f"sequence of {length} tokens is longer than the rotary tables "
                             f"({self.max_seq_len}); raise ModelConfig.max_seq_len")
        return self.cos[:length], self.sin[:length]


def apply_rotary(x: Tensor, cos: Tensor, sin: Tensor) -> Tensor:
    """x (T, heads, width) with width = cos.size(-1); rotates adjacent pairs of dims."""
    swapped = x.unflatten(-1, (-1, 2)).flip(-1).flatten(-2)   # (a, b) -> (b, a)
    return cos[:, None] * x + sin[:, None] * swapped


# ---- building blocks: plain PyTorch here, Triton on CUDA (kernels after GPT) ------------------
# Each op below picks its Triton kernel when `tensor.is_cuda and USE_TRITON_KERNELS`, else its plain
# PyTorch reference. Tests flip this switch to compare the two on the same inputs.
USE_TRITON_KERNELS = torch.cuda.is_available()


def _use_triton(t: Tensor) -> bool:
    return t.is_cuda and USE_TRITON_KERNELS


def fp8_supported(device) -> bool:
    """FP8 matmuls (torch._scaled_mm) need compute capability 8.9 (Ada) or 9.0+ (Hopper)."""
    device = torch.device(device)
    if device.type != "cuda" or not torch.cuda.is_available():
        return False
    return torch.cuda.get_device_capability(device) >= (8, 9)


# ---- MLP: relu(x W_fc^T)^2 W_proj -----------------------------------------------------------------
# Weights come from the MLP bank slices: w_fc (hidden, d) and w_proj (hidden, d), hidden = 4d.

def relu_square_mlp_reference(x: Tensor, w_fc: Tensor, w_proj: Tensor) -> Tensor:
    pre = x @ w_fc.mT
    return F.relu(pre).square() @ w_proj


E4M3_MAX = 448.0   # largest float8_e4m3fn


def mlp_up_fp8_operands(x: Tensor, w_fc: Tensor) -> tuple[Tensor, Tensor, Tensor]:
    """FP8 operands of the MLP up-projection (record #84): x scaled so its largest entry is
    448 (one scale per micro-batch), W_fc by its own largest entry (one per matrix), both in
    their dtype as recorded, and the fp32 factor (1,) that undoes both scales after the product.
    Quantized in every forward (the record refreshes an FP8 weight copy after each optimizer
    step instead: same values, as the weights only change at steps, and nothing can go stale)."""
    x, w_fc = x.detach(), w_fc.detach()
    x_amax = x.abs().max().clamp(min=1e-12)
    x_f8 = (x * (E4M3_MAX / x_amax)).to(torch.float8_e4m3fn)
    w_scale = w_fc.abs().amax().clamp(min=1e-12) / E4M3_MAX
    w_f8 = (w_fc / w_scale).to(torch.float8_e4m3fn)
    dequant = (w_scale.float() * x_amax.float() / E4M3_MAX).reshape(1)
    return x_f8, w_f8, dequant


def mlp_down_fp8_weight(w_proj: Tensor, w_scale: Tensor) -> Tensor:
    """W_proj (hidden, d) / w_scale clipped to +-448, e4m3, column-major (as _scaled_mm wants its
    second operand); quantized in every forward like W_fc (record #89)."""
    w_t = (w_proj.detach().float() / w_scale).clamp(-E4M3_MAX, E4M3_MAX).to(torch.float8_e4m3fn).T
    return w_t.contiguous().T


def mlp_down_fp8_operands(post: Tensor, w_proj: Tensor, act_scale: Tensor, w_scale: Tensor):
    """FP8 operands of the MLP down-projection (record #89): post / act_scale (post >= 0, so only
    the top is clipped, at 448) and mlp_down_fp8_weight, with scales decided before this forward
    (delayed scaling: GPT.refresh_mlp_down_scales, GPT.body)."""
    # times the reciprocal, as the kernel's epilogue (and the record's) computes it: same rounding
    post_f8 = (post.detach().float() * (1.0 / act_scale)).clamp(max=E4M3_MAX).to(torch.float8_e4m3fn)
    return post_f8, mlp_down_fp8_weight(w_proj, w_scale)


def relu_square_mlp_fp8_reference(x: Tensor, w_fc: Tensor, w_proj: Tensor, down_scales=None):
    """The FP8 forward in plain PyTorch. Its gradient is the bf16 formula's taken at the FP8
    values (straight through the quantizations), as the fused backward computes it. down_scales
    (act_scale, w_scale), each (1,) fp32: the down-projection in FP8 too (record #89); then
    returns (out, largest post (1,) fp32)."""
    x_f8, w_f8, dequant = mlp_up_fp8_operands(x, w_fc)
    exact = x @ w_fc.mT
    fp8 = ((x_f8.float() @ w_f8.float().mT) * dequant).to(exact.dtype)
    pre = exact + (fp8 - exact).detach()
    post = F.relu(pre).square()
    if down_scales is None:
        return post @ w_proj
    act_scale, w_scale = down_scales
    post_f8, w_proj_f8 = mlp_down_fp8_operands(post, w_proj, act_scale, w_scale)
    exact = post @ w_proj
    fp8 = ((post_f8.float() @ w_proj_f8.float()) * (act_scale * w_scale)).to(exact.dtype)
    return exact + (fp8 - exact).detach(), post.detach().float().amax().reshape(1)


def relu_square_mlp(x: Tensor, w_fc: Tensor, w_proj: Tensor, use_fp8: bool = False, down_scales=None):
    """relu(x @ w_fc^T)^2 @ w_proj with autograd; fused Triton linear+ReLU^2 on CUDA. use_fp8:
    the up-projection's forward product in FP8 (record #84; training on FP8 cards); down_scales
    (act_scale, w_scale) as well: the down-projection's too (record #89), and the result is
    (out, the largest post (1,) fp32, for the next forward's act_scale)."""
    if _use_triton(x):
        if down_scales is None:
            return _FusedReluSquareMLP.apply(x, w_fc, w_proj, use_fp8)
        return _FusedReluSquareMLP.apply(x, w_fc, w_proj, use_fp8, *down_scales)
    if use_fp8:
        return relu_square_mlp_fp8_reference(x, w_fc, w_proj, down_scales)
    return relu_square_mlp_reference(x, w_fc, w_proj)


# ---- lm_head: transposed weight (d, vocab); FP8 only inside the fused training loss ------------

def _fp8_quantize_reference(t: Tensor, scale: float, dtype) -> Tensor:
    """What the FP8 path sees: t / scale rounded to the FP8 format, scaled back (fp32)."""
    return t.div(scale).to(dtype).float() * scale


def lm_head_logits_reference(x, lm_head_weight_t, x_s, w_s, grad_s, use_fp8) -> Tensor:
    """x (T, d) @ w (d, V). With use_fp8 the operands are FP8-rounded like the GPU path (fp32 out)."""
    if use_fp8:
        xq = _fp8_quantize_reference(x, x_s, torch.float8_e4m3fn)
        wq = _fp8_quantize_reference(lm_head_weight_t, w_s, torch.float8_e4m3fn)
        return (xq @ wq).to(torch.bfloat16)
    return x @ lm_head_weight_t.type_as(x)


def lm_head_logits(x: Tensor, lm_head_weight_t: Tensor) -> Tensor:
    """Logits x @ W for W stored transposed (d, vocab), in x's dtype: the eval path (the record
    never evaluates in FP8; training goes through softcapped_mtp_loss_sum)."""
    return x @ lm_head_weight_t.type_as(x)


# ---- Softcapped cross-entropy with multi-token prediction ----------------------------------------
# z = 23 * sigmoid((logit + 5) / 7.5) caps logits to (0, 23). Row i's loss is
#   sum_k w_k * (logsumexp(z_i) - z_i[target_{i+k}])   over k with i + k < T,
# i.e. position i also predicts the tokens k steps further along the (flattened) target stream;
# terms that would run past the end of the micro-batch are dropped. Document ends are not special.
# Record #88 adds one more term in training: prefix_weight * (logsumexp(z_i) - z_i[prefix_i]),
# prefix_i the longest vocabulary token that is a proper prefix of target_i (prefix_token_table;
# none: -1, no term).
SOFTCAP_SCALE = 23.0
SOFTCAP_SHIFT = 5.0
SOFTCAP_DIVISOR = 7.5


def softcap(logits: Tensor) -> Tensor:
    return SOFTCAP_SCALE * torch.sigmoid((logits + SOFTCAP_SHIFT) / SOFTCAP_DIVISOR)


def mtp_losses_from_logits(logits: Tensor, targets: Tensor, mtp_weights: Tensor,
                           prefix_targets: Tensor | None = None, prefix_weight: Tensor | None = None) -> Tensor:
    """Per-row MTP-weighted softcapped cross-entropy (fp32), differentiable w.r.t. logits, plus
    the prefix-token term where prefix_targets (rows,) is >= 0."""
    z = softcap(logits.to(torch.promote_types(logits.dtype, torch.float32)))
    lse = torch.logsumexp(z, dim=-1)
    num_rows = z.size(0)
    losses = torch.zeros_like(lse)
    for k in range(mtp_weights.size(0)):
        rows = num_rows - k
        if rows <= 0:
            break
        z_target = z[:rows].gather(1, targets[k:].long().unsqueeze(1)).squeeze(1)
        term = mtp_weights[k].to(z.dtype) * (lse[:rows] - z_target)
        losses = losses + F.pad(term, (0, k))
    if prefix_targets is not None:
        has_prefix = prefix_targets >= 0
        z_prefix = z.gather(1, prefix_targets.clamp_min(0).long().unsqueeze(1)).squeeze(1)
        losses = losses + torch.where(has_prefix, prefix_weight.to(z.dtype) * (lse - z_prefix), 0.0)
    return losses


def softcapped_mtp_loss_reference(x, targets, mtp_weights, lm_head_weight_t, x_s, w_s, grad_s,
                                  use_fp8, prefix_targets=None, prefix_weight=None) -> Tensor:
    logits = lm_head_logits_reference(x, lm_head_weight_t, x_s, w_s, grad_s, use_fp8)
    return mtp_losses_from_logits(logits, targets, mtp_weights, prefix_targets, prefix_weight)


def softcapped_mtp_loss_sum(x: Tensor, targets: Tensor, mtp_weights: Tensor, lm_head_weight_t: Tensor,
                            x_s: float, w_s: float, grad_s: float, use_fp8: bool,
                            prefix_targets: Tensor | None = None, prefix_weight: Tensor | None = None) -> Tensor:
    """The training loss: sum over positions of the MTP-weighted losses and the prefix-token terms
    (fp32 scalar), for normed hidden x (T, d) and lm_head W (d, vocab).

    mtp_weights (n_predict,) fp32; trailing zeros change nothing, so callers may pad it to a fixed
    length to keep one compiled graph across stages. On CUDA one Triton kernel computes the loss
    and, in the same pass, the logits gradient (FP8 e5m2 in units of grad_s when use_fp8).
    """
    if _use_triton(x):
        return _FusedSoftcappedMTPLoss.apply(x, targets, mtp_weights, lm_head_weight_t,
                                             x_s, w_s, grad_s, use_fp8, prefix_targets, prefix_weight)
    return softcapped_mtp_loss_reference(x, targets, mtp_weights, lm_head_weight_t,
                                         x_s, w_s, grad_s, use_fp8, prefix_targets, prefix_weight).sum()


def prefix_token_table(ranks: dict, size: int) -> Tensor:
    """(size,) int64: for each token id, the token whose bytes are the longest proper prefix of its
    bytes that is itself a token; -1 where none (single bytes, special and padding ids). ranks:
    bytes -> id, the BPE's mergeable ranks (record #88; only the vocabulary, never the corpus)."""
    table = [-1] * size
    for token_bytes, token in ranks.items():
        for end in range(len(token_bytes) - 1, 0, -1):
            prefix = ranks.get(token_bytes[:end])
            if prefix is not None:
                table[token] = prefix
                break
    return torch.tensor(table, dtype=torch.int64)


def gpt2_prefix_token_table(size: int) -> Tensor:
    """prefix_token_table of GPT-2's BPE (through prepare_data.gpt2_encoding: tiktoken, or the
    GPT2_TIKTOKEN_FILE ranks file offline); a missing vocabulary is a one-line error."""
    try:
        ranks = prepare_data.gpt2_encoding()._mergeable_ranks
    except (RuntimeError, FileNotFoundError) as exc:
        raise SystemExit(f"error: the prefix-token loss (record #88) needs GPT-2's vocabulary: {exc}")
    return prefix_token_table(ranks, size)


# ---- attention ----------------------------------------------------------------------------------
# Packed variable-length causal attention with a sliding window, four interchangeable backends.
# Every call sees ONE packed sequence (B = 1): documents laid end to end, described by cu_seqlens
# (document start offsets, then the total length, possibly repeated as padding). A query at
# position i sees the keys j of its own document with i - window <= j <= i: flash-attn's
# causal=True, window_size=(window, 0).

FLEX_BLOCK_SIZE = 128        # FlexAttention's tile; flex sequences must be a multiple of it


def document_ids(cu_seqlens: Tensor, length: int) -> Tensor:
    """(length,) int32: which document each packed position belongs to (ids rise monotonically).

    Plain tensor code: the FlexAttention mask_mod reads these ids as an input of the model's graph
    (they come out of the separately compiled block-mask tables), never as a tensor computed
    inside that graph, which is what failed to lower in compiled no-grad graphs (GPU-NOTES)."""
    positions = torch.arange(length, device=cu_seqlens.device, dtype=cu_seqlens.dtype)
    # index of the last document start <= position; repeated offsets (empty documents) are skipped
    return (torch.searchsorted(cu_seqlens, positions, right=True) - 1).clamp_min(0).to(torch.int32)


def window_mask_dense(cu_seqlens: Tensor, length: int, window: int) -> Tensor:
    """(length, length) bool: query i may see key j (same document, i - window <= j <= i)."""
    doc = document_ids(cu_seqlens, length)
    pos = torch.arange(length, device=cu_seqlens.device)
    behind = pos[:, None] - pos[None, :]
    return (doc[:, None] == doc[None, :]) & (behind >= 0) & (behind <= window)


def _ceil_div(a: Tensor, b: int) -> Tensor:
    return -torch.div(-a, b, rounding_mode="floor")


def _window_block_tables(cu_seqlens: Tensor, window: Tensor, length: int, block_size: int,
                         with_backward: bool) -> tuple:
    """The index tensors of a document-causal sliding-window BlockMask, from per-tile bounds.

    Plain tensor math with static shapes, so on the GPU it runs as one compiled graph: built
    eagerly it was ~40 small launches per mask, 3 masks per micro-batch, and that host time
    showed up in the step time (the GPU was waiting for it). Returns document ids (for the
    mask_mod) and kv/full_kv (and, with_backward, q/full_q) block counts and indices.
    """
    device = cu_seqlens.device
    doc = document_ids(cu_seqlens, length)
    doc_start = cu_seqlens.long()[doc.long()]                # first position of each one's document
    n = length // block_size
    tile = torch.arange(n, device=device)
    first_row = tile * block_size
    last_row = first_row + block_size - 1
    # lowest key any row of the tile sees: both bounds rise with the row, so the first row has it
    lowest_key = torch.maximum(doc_start[first_row], first_row - window).clamp_min(0)
    lowest_tile = torch.div(lowest_key, block_size, rounding_mode="floor")
    # a key tile strictly left of the diagonal is full when the LAST row still reaches its first key
    # within the window and its first key is in the last row's document (so every row shares it)
    first_full = torch.maximum(_ceil_div(doc_start[last_row], block_size),
                               _ceil_div(last_row - window, block_size)).clamp_min(0)
    has_full = first_full < tile
    num_full = torch.where(has_full, tile - first_full, 0)
    # partial tiles: the run from lowest_tile up to the first full tile, then the diagonal tile
    leading_end = torch.where(has_full, first_full, tile + 1)
    num_leading = leading_end - lowest_tile
    col = torch.arange(n, device=device)[None, :]
    partial_idx = torch.where(col < num_leading[:, None], lowest_tile[:, None] + col, tile[:, None])
    num_partial = num_leading + has_full.long()
    full_idx = (first_full[:, None] + col).clamp_max(n - 1)

    def as_blocks(t: Tensor) -> Tensor:            # (1 batch, 1 head-group, ...) int32
        return t[None, None].to(torch.int32).contiguous()

    kv = (as_blocks(num_partial), as_blocks(partial_idx), as_blocks(num_full), as_blocks(full_idx))
    q = (None, None, None, None)
    if with_backward:      # the backward walks the mask by key tile: the transposed tables
        q = (*_transpose_ordered(kv[0], kv[1]), *_transpose_ordered(kv[2], kv[3]))
    return doc, kv, q


_compiled_window_block_tables = None


def _window_block_tables_for(device: torch.device) -> Callable:
    global _compiled_window_block_tables
    if device.type != "cuda":
        return _window_block_tables
    if _compiled_window_block_tables is None:
        _compiled_window_block_tables = torch.compile(_window_block_tables, dynamic=False, fullgraph=True)
    return _compiled_window_block_tables


def sliding_window_block_mask(cu_seqlens: Tensor, length: int, window: int,
                              block_size: int = FLEX_BLOCK_SIZE,
                              with_backward: bool = True) -> BlockMask:
    """FlexAttention block mask for document-causal sliding-window attention, built from bounds.

    create_block_mask would evaluate the mask at every (query, key) pair (~2.7e11 at the
    validation length). Here each query tile only needs three numbers: its first row's lowest
    visible key, and for its last row the document start and the window's reach. The visible keys
    of a tile form one contiguous run of key tiles ending at the diagonal; inside it, tiles that
    every row sees completely are "full" (no mask evaluated), the rest are "partial".
    """
    if length % block_size:
        raise ValueError(f"flex attention needs a sequence length that is a multiple of "
                         f"{block_size}, got {length}")
    # the window as a tensor: a new window is a new value, not a new graph (here or in the model)
    window_t = torch.full((), window, dtype=torch.int64, device=cu_seqlens.device)
    build = _window_block_tables_for(cu_seqlens.device)
    doc, kv, q = build(cu_seqlens, window_t, length, block_size, with_backward)

    def same_doc_in_window(b, h, q_idx, kv_idx):   # evaluated only inside partial tiles
        behind = q_idx - kv_idx
        return (doc[q_idx] == doc[kv_idx]) & (behind >= 0) & (behind <= window_t)

    return BlockMask(seq_lengths=(length, length), kv_num_blocks=kv[0], kv_indices=kv[1],
                     full_kv_num_blocks=kv[2], full_kv_indices=kv[3], q_num_blocks=q[0], q_indices=q[1],
                     full_q_num_blocks=q[2], full_q_indices=q[3], BLOCK_SIZE=(block_size, block_size),
                     mask_mod=same_doc_in_window)


def flex_window_attention(q: Tensor, k: Tensor, v: Tensor, block_mask: BlockMask, scale: Tensor,
                          flex_fn: Callable = flex_attention) -> Tensor:
    """(T, H, D) q, k, v -> (T, H, D) through FlexAttention with a prebuilt block mask.

    The softmax scale enters as a tensor through score_mod (scale=1.0 to the kernel): the kernel
    multiplies the fp32 scores by it either way, and a tensor changes at a stage boundary without
    recompiling. flex_fn: flex_attention itself inside a compiled graph, else a compiled wrapper.
    """
    def scaled(score, b, h, q_idx, kv_idx):
        return score * scale

    to_bhtd = lambda t: t.transpose(0, 1).unsqueeze(0)
    out = flex_fn(to_bhtd(q), to_bhtd(k), to_bhtd(v), score_mod=scaled, block_mask=block_mask,
                  scale=1.0)
    return out[0].transpose(0, 1)


def masked_sdpa_attention(q: Tensor, k: Tensor, v: Tensor, allowed: Tensor, scale: float) -> Tensor:
    """Plain PyTorch reference (CPU, tests): dense boolean mask, same math as the fast backends."""
    out = F.scaled_dot_product_attention(q.transpose(0, 1), k.transpose(0, 1), v.transpose(0, 1),
                                         attn_mask=allowed, scale=float(scale))
    return out.transpose(0, 1)


# ---- DC correction (record #85): heads' local attention probabilities mixed per token ----------
# On one layer (DC_LAYER), after whichever backend computed its attention output y: each query t
# recomputes every head's softmax over only its last `window` keys (same document), mixes the
# heads' probabilities with per-token weights w1 into one pattern A[t, :], and each head h adds
# w2[t, h] * (A[t, :] @ v_h) to its output: heads read values through each other's patterns
# ("dynamically composable" attention, post-mixing only). A Triton kernel on CUDA (kernels section).

def dc_correction_reference(y: Tensor, q: Tensor, k: Tensor, v: Tensor, w1: Tensor, w2: Tensor,
                            doc_ids: Tensor, scale, window: int) -> Tensor:
    """Plain PyTorch: y, q, k, v (T, heads, head_dim); w1, w2 (T, heads); doc_ids (T,). Scores,
    probabilities and A in fp32 (or wider), w2 * A rounded to v's dtype before the product with v
    (as the record's kernel does), y + correction rounded to y's dtype."""
    T, H, D = q.shape
    acc = torch.promote_types(q.dtype, torch.float32)
    # the keys each query may see, as windows over a left-padded copy: (T, H, D, window)
    pad = lambda t: F.pad(t, (0, 0, 0, 0, window - 1, 0))
    k_win = pad(k).unfold(0, window, 1)
    v_win = pad(v).unfold(0, window, 1)
    key_pos = torch.arange(T, device=q.device)[:, None] - (window - 1) + torch.arange(window, device=q.device)
    doc_win = F.pad(doc_ids, (window - 1, 0), value=-1).unfold(0, window, 1)        # (T, window)
    visible = (key_pos >= 0) & (doc_win == doc_ids[:, None])
    scores = torch.einsum("thd,thdw->thw", q.to(acc), k_win.to(acc)) * scale
    probs = scores.masked_fill(~visible[:, None, :], float("-inf")).softmax(-1)     # (T, H, window)
    mixed = (w1.to(acc).unsqueeze(-1) * probs).sum(1)                                # A: (T, window)
    weights = (w2.to(acc).unsqueeze(-1) * mixed.unsqueeze(1)).to(v.dtype)           # (T, H, window)
    correction = torch.einsum("thw,thdw->thd", weights.to(acc), v_win.to(acc))
    return (y.to(acc) + correction).to(y.dtype)


def dc_correction(y: Tensor, q: Tensor, k: Tensor, v: Tensor, w1: Tensor, w2: Tensor,
                  doc_ids: Tensor, scale: Tensor, window: int) -> Tensor:
    """y plus the DC correction (see dc_correction_reference): the Triton kernel on CUDA."""
    if _use_triton(y):
        return _DCCorrection.apply(y, q, k, v, w1, w2, doc_ids, scale, window)
    return dc_correction_reference(y, q, k, v, w1, w2, doc_ids, scale, window)


# ---- flash-attn backends (CUDA only) ----------------------------------------------------------
# name -> (flash_attn_varlen_func, where it came from), and name -> why it did not load
_FLASH_VARLEN: dict = {}
_FLASH_FAILURES: dict = {}


def _load_fa3_hub():
    from kernels import get_kernel
    return get_kernel("varunneal/flash-attention-3").flash_attn_interface.flash_attn_varlen_func


def _load_fa3_local():
    import flash_attn_interface
    return flash_attn_interface.flash_attn_varlen_func


def _load_fa2():
    from flash_attn import flash_attn_varlen_func
    return flash_attn_varlen_func


_FLASH_SOURCES = {
    "fa3": (("kernels hub varunneal/flash-attention-3", _load_fa3_hub),
            ("local flash_attn_interface", _load_fa3_local)),
    "flash_attn": (("flash_attn (FA2)", _load_fa2),),
}


def _load_flash_varlen(backend: str):
    """Import the varlen function of a flash backend; None (with the reasons kept) if none loads."""
    if backend in _FLASH_VARLEN:
        return _FLASH_VARLEN[backend][0]
    failures = []
    for source, loader in _FLASH_SOURCES[backend]:
        try:
            fn = loader()
        except Exception as exc:   # ImportError, no network for the hub, missing CUDA symbols ...
            first_line = (str(exc).splitlines() or [""])[0]
            failures.append(f"{source}: {type(exc).__name__} {first_line}".strip())
            continue
        _FLASH_VARLEN[backend] = (fn, source)
        return fn
    _FLASH_FAILURES[backend] = failures
    return None


def attention_backend_source(backend: str) -> str:
    """Where a resolved backend's kernel came from, for the run log."""
    if backend in _FLASH_VARLEN:
        return f"{backend} ({_FLASH_VARLEN[backend][1]})"
    return {"flex": "flex (PyTorch FlexAttention, document-causal sliding-window block mask)",
            "sdpa": "sdpa (PyTorch scaled_dot_product_attention with a dense mask; reference)"}.get(
        backend, backend)


def resolve_attention_backend(requested: str, device) -> str:
    """'auto' | 'fa3' | 'flash_attn' | 'flex' | 'sdpa' -> the backend this run uses.

    auto on CUDA: FA3 (kernels hub, then a local flash_attn_interface; Hopper only), then FA2
    varlen, then FlexAttention, which always works. auto on CPU: sdpa (FlexAttention has no CPU
    backward). A backend that was asked for by name but cannot run here is a one-line error.
    """
    device = torch.device(device)
    choices = ("auto",) + ATTN_BACKENDS
    if requested not in choices:
        raise SystemExit(f"error: --attn {requested!r} is not one of {', '.join(choices)}")
    if device.type != "cuda":
        if requested in ("auto", "sdpa"):
            return "sdpa"
        raise SystemExit(f"error: --attn {requested} needs a CUDA GPU; on CPU use --attn auto (sdpa)")
    if requested in ("flex", "sdpa"):
        return requested
    hopper = torch.cuda.get_device_capability(device) >= (9, 0)
    candidates = ["fa3", "flash_attn"] if requested == "auto" else [requested]
    for backend in candidates:
        if backend == "fa3" and not hopper:
            continue
        if _load_flash_varlen(backend) is not None:
            return backend
    if requested == "auto":
        return "flex"
    why = "; ".join(_FLASH_FAILURES.get(requested) or ["FA3 needs a Hopper GPU"])
    raise SystemExit(f"error: --attn {requested} is not available here ({why}); "
                     "use --attn auto or --attn flex")


def flash_varlen_attention(q: Tensor, k: Tensor, v: Tensor, cu_seqlens: Tensor, max_len: int,
                           window: int, scale: float, backend: str) -> Tensor:
    fn = _load_flash_varlen(backend)
    if fn is None:
        raise RuntimeError(f"attention backend {backend} is not available (resolve it first)")
    out = fn(q, k, v, cu_seqlens_q=cu_seqlens, cu_seqlens_k=cu_seqlens, max_seqlen_q=max_len,
             max_seqlen_k=max_len, causal=True, softmax_scale=scale, window_size=(window, 0))
    return out[0] if isinstance(out, tuple) else out   # some FA3 builds also return the lse


# ---- the forward, as pure functions of tensors ------------------------------------------------
# Weights come in as arguments and a layer's learned scalars as one dict `lam` (its rows of
# LAYER_SCALARS and of the residual lambdas), so tests can call each piece alone. Python bool/int arguments are structure;
# everything that changes during training (windows, scales, lambdas, rotary tables) is a tensor,
# so a stage change never specializes the compiled graph.

def bigram_hash(tokens: Tensor, table_size: int) -> Tensor:
    """Row of the bigram table for each position: hash of (previous, current) token.

    int32 arithmetic that wraps like the record's; position 0 has no previous token and gets the
    reserved last row, and position 1 hashes with that reserved id as its previous token (the
    record overwrites token 0 before hashing, since #71). Document starts hash with the previous
    document's last token (as recorded).
    """
    t = tokens.to(torch.int32)
    reserved = table_size - 1
    prev = t[:-1].clone()
    prev[:1] = reserved
    mixed = torch.bitwise_xor(BIGRAM_HASH_A * t[1:], BIGRAM_HASH_B * prev) % reserved
    return torch.cat([mixed.new_full((1,), reserved), mixed])


def bigram_sign_rows(tokens: Tensor, num_rows: int) -> Tensor:
    """Row of the sign table for each position: previous token XOR current token, mod num_rows;
    position 0 (no previous token) gets row 0. Document starts are not special (as recorded)."""
    t = tokens.to(torch.int32)
    return torch.cat([t.new_zeros(1), torch.bitwise_xor(t[:-1], t[1:]) % num_rows])


def embed_inputs(input_seq: Tensor, embed_w: Tensor, bigram_w: Tensor, bigram_signs: Tensor,
                 value_embeds: Tensor, smear_w: Tensor, smear_lambda: Tensor, vocab_size: int,
                 bigram_rows: Tensor | None = None):
    """Tokens -> (x0, bigram embeddings (T, bigram_dim), the 5 value embeddings (5, T, d)).

    x0 is the normed token embedding after the smear gate mixed a gated part of the previous
    token's embedding into each position. Each bigram embedding is its hashed row times a row of
    +-1 signs (bigram_signs, record #83). bigram_rows: bigram_hash(input_seq) precomputed (the
    training loader hashes on the host, record #71); None hashes here.
    """
    x = F.embedding(input_seq, embed_w)
    if bigram_rows is None:
        bigram_rows = bigram_hash(input_seq, bigram_w.size(0))
    signs = bigram_signs[bigram_sign_rows(input_seq, bigram_signs.size(0))]
    x_bigram = F.embedding(bigram_rows, bigram_w) * signs.type_as(bigram_w)
    ve = value_embeds.view(5, vocab_size, -1)[:, input_seq]
    smear = smear_lambda * torch.sigmoid(F.linear(x[1:, :GATE_INPUTS], smear_w.type_as(x)))
    x = torch.cat([x[:1], x[1:] + smear * x[:-1]])
    return norm(x), x_bigram, ve


def attention_inputs(x: Tensor, lam: dict, qkv_w: Tensor, cos: Tensor, sin: Tensor,
                     ve: Tensor | None, ve_gate_w: Tensor | None, num_heads: int, paired: bool,
                     key_offset: bool, v_extra: Tensor | None = None):
    """First half of an attention layer: norm the stream it reads, project, QK-norm, rotate, add
    value embeddings (gated here; or v_extra (T, hdim), already gated: the MUDD layer's).
    Returns q, k, v in the attention layout.

    Attention layout: (T, heads, head_dim); for paired heads (2T, heads/2, head_dim), where a
    token's head h sits at position 2t + h // (heads/2), lane h % (heads/2) — exactly the record's
    reshapes — and its rotary angle is that of position 2t + h % 2 (the paired tables).
    """
    h = norm(x)
    T = h.size(0)
    qkv = F.linear(h, lam["attn_lambdas"][0] * qkv_w.type_as(h)).view(T, 3 * num_heads, -1)
    q, k, v = qkv.chunk(3, dim=1)
    q, k = norm(q), norm(k)                                   # QK norm
    head_dim = q.size(-1)
    # values gain their extras per token and head, before any paired-head reshape
    if ve is not None:
        # the gate of the value embedding sees part of the embedding itself
        ve_gate_in = torch.cat([h[:, :VE_GATE_SPLIT], ve[:, :VE_GATE_SPLIT].type_as(h)], -1)
        ve_gate = 2 * torch.sigmoid(F.linear(ve_gate_in, ve_gate_w.type_as(h)))   # (T, heads)
        v = v + ve_gate.unsqueeze(-1) * ve.view_as(v)
    if v_extra is not None:
        v = v + v_extra.view_as(v)
    if paired:
        # each token's heads become two consecutive positions of half as many heads
        q = apply_rotary(q.reshape(T, num_heads // 2, 2 * head_dim), cos, sin)
        k = apply_rotary(k.reshape(T, num_heads // 2, 2 * head_dim), cos, sin)
        q = q.reshape(2 * T, num_heads // 2, head_dim)
        k = k.reshape(2 * T, num_heads // 2, head_dim)
        v = v.reshape(2 * T, num_heads // 2, head_dim)
    else:
        q, k = apply_rotary(q, cos, sin), apply_rotary(k, cos, sin)
        if key_offset:
            # keys take their stationary (non-rotated) half from the previous position, so one
            # layer can match "the token after the previous occurrence" (induction)
            half = head_dim // 2
            still = k[..., half:]
            k = torch.cat([k[..., :half], torch.cat([still[:1], still[:-1]])], dim=-1)
    # v may still be a strided view of the projection: hand every layer kind the same layout
    return q, k, v.contiguous()


def attention_output(y: Tensor, gate: Tensor | None, out_w: Tensor, lam: dict) -> Tensor:
    """Second half of an attention layer: gate each head's output (T, heads) if the layer has a
    gate (ATTN_GATE_LAYERS), project back to the stream."""
    if gate is not None:
        y = y * gate.type_as(y).unsqueeze(-1)
    return F.linear(y.reshape(y.size(0), -1), lam["attn_lambdas"][1] * out_w.type_as(y))


def exclusive_self_attention(y: Tensor, v: Tensor, alpha: Tensor) -> Tensor:
    """Gated XSA (arXiv 2603.09078, record #82): each head's output (T, heads, head_dim) loses
    tanh(alpha) of its component along the token's own value vector, which attention would
    otherwise largely copy back; alpha (T, heads) from the MUDD gate (#85), 0 at init: off.
    Written (record #86) as y - tanh(alpha) (y.v / |v|^2) v: no normalized copy of v; the clamp
    of |v|^2 at 1e-8 is normalize's clamp of |v| at 1e-4."""
    along = (y * v).sum(-1, keepdim=True) / v.square().sum(-1, keepdim=True).clamp_min(1e-8)
    return y - torch.tanh(alpha).type_as(y).unsqueeze(-1) * along * v


def dc_weights(w1: Tensor, w2: Tensor) -> tuple[Tensor, Tensor]:
    """The DC correction's per-token head weights from the MUDD gate's outputs (T, heads) each:
    the mixing weights RMS-normed over the heads (in fp32), the output weights as they are."""
    return F.rms_norm(w1.float(), (w1.size(-1),), eps=1e-6).type_as(w1), w2


def mlp_output(x: Tensor, fc_w: Tensor, proj_w: Tensor, use_fp8: bool = False, down_scales=None):
    return relu_square_mlp(norm(x), fc_w.type_as(x), proj_w.type_as(x), use_fp8, down_scales)


def add_bigram(x: Tensor, x_bigram: Tensor, weight: Tensor) -> Tensor:
    """x plus weight * the bigram embeddings in its first bigram_dim channels (record #83). Added
    after the rest of a write, in the record's order of additions."""
    return x + F.pad(x_bigram * weight.type_as(x_bigram), (0, x.size(-1) - x_bigram.size(-1)))


def residual_write(x: Tensor, out: Tensor, resid: Tensor, post: Tensor, inject: Tensor | None = None) -> Tensor:
    """One sublayer's write into the residual stream: resid * x + post * out (+ inject)."""
    x = resid.type_as(x) * x + out * post.type_as(out)
    return x if inject is None else x + inject


def mudd_coefficients(x: Tensor, w1: Tensor, w2: Tensor, b2: Tensor, names) -> dict:
    """MUDD's per-token coefficients of stream x (T, d), by name: (T, 1) each, the first
    len(names) outputs of MUDD_SCALE * (W2 gelu(W1 x) + b2)."""
    n = len(names)
    mu = (F.linear(F.gelu(F.linear(x, w1.type_as(x))), w2[:n].type_as(x)) + b2[:n].type_as(x)) * MUDD_SCALE
    return dict(zip(names, mu.split(1, dim=-1)))


def mudd_values(mu: dict, states: dict, x: Tensor, ve: Tensor, num_heads: int) -> Tensor:
    """What the MUDD layer adds to its attention values (T, hdim): its value embedding gated per
    half of the heads, plus earlier stream states mixed per token."""
    T = x.size(0)
    gate = torch.cat([mu["ve_gate_first_heads"], mu["ve_gate_last_heads"]], dim=-1)
    gate = gate.repeat_interleave(num_heads // 2, dim=-1).unsqueeze(-1)          # (T, heads, 1)
    mixed = mu["v_input"] * states["input"] + mu["v_layer7"] * states["layer7"] + mu["v_x"] * x
    return (gate * ve.view(T, num_heads, -1) + mixed.view(T, num_heads, -1)).view(T, -1)


def mudd_stream(mu: dict, states: dict, x: Tensor) -> Tensor:
    """The MUDD layer's stream before its attention: x scaled and earlier states mixed in."""
    return (1 + mu["x_self"]) * x + mu["x_input"] * states["input"] + mu["x_layer7"] * states["layer7"]


def mudd_head_input(mu: dict, states: dict, x: Tensor, ve0: Tensor) -> Tensor:
    """The stream the head reads: the last layer's output plus earlier states, per token."""
    return (x + mu["input"] * states["input"] + mu["layer7"] * states["layer7"]
            + mu["mudd_in"] * states["mudd_in"] + mu["ve0"] * ve0.type_as(x) + mu["layer3"] * states["layer3"])


def mudd_gate_layout(num_heads: int, num_layers: int = 11) -> tuple[dict, dict]:
    """The MUDD gate's outputs (record #85): (pre, post), each name -> (width, initial value) in
    the order stored. A layer's gates come from the pre gate if it comes before
    MUDD_GATE_POST_LAYER, else from the post gate. Each lists XSA strengths (per head), attention
    gates (per head), the x0 then bigram strength of each attention layer written with them (all
    but MUDD_LAYER, which has its own), the skip strength and the DC weights (per head) of the
    layers it serves: the record's 26 and 41 outputs."""
    blocks = []
    for layers in (range(MUDD_GATE_POST_LAYER), range(MUDD_GATE_POST_LAYER, num_layers)):
        block = {f"xsa_{i}": (num_heads, MUDD_GATE_INITS["xsa"]) for i in XSA_LAYERS if i in layers}
        block |= {f"attn_gate_{i}": (num_heads, MUDD_GATE_INITS["attn_gate"])
                  for i in ATTN_GATE_LAYERS if i in layers}
        for i in layers:
            if i not in (NO_ATTENTION_LAYER, MUDD_LAYER):
                block |= {f"x0_{i}": (1, MUDD_GATE_INITS["x0"]), f"bigram_{i}": (1, MUDD_GATE_INITS["bigram"])}
        if SKIP_TO_LAYER in layers:
            block["skip"] = (1, MUDD_GATE_INITS["skip"])
        if DC_LAYER in layers:
            block |= {"dc_w1": (num_heads, MUDD_GATE_INITS["dc_w1"]), "dc_w2": (num_heads, MUDD_GATE_INITS["dc_w2"])}
        blocks.append(block)
    return tuple(blocks)


def mudd_gate(x: Tensor, w1: Tensor, w2: Tensor, b2: Tensor, scale: Tensor, layout: dict) -> dict:
    """One MUDD gate on stream x (T, d): name -> (T, width), the outputs of
    scale * (W2 gelu(W1 x) + b2) split as layout says (mudd_gate_layout)."""
    widths = [width for width, _ in layout.values()]
    n = sum(widths)
    g = (F.linear(F.gelu(F.linear(x, w1.type_as(x))), w2[:n].type_as(x)) + b2[:n].type_as(x)) * scale.type_as(x)
    return dict(zip(layout, g.split(widths, dim=-1)))


def output_loss(x: Tensor, lm_head_w: Tensor, targets: Tensor, mtp_weights: Tensor, x_s: float,
                w_s: float, grad_s: float, use_fp8: bool, training: bool,
                prefix_targets: Tensor | None = None, prefix_weight: Tensor | None = None) -> Tensor:
    """Norm, and score with the softcapped head. Training: sum over positions of the
    MTP-weighted losses and prefix-token terms. Eval: mean next-token loss."""
    x = norm(x)
    if training:
        return softcapped_mtp_loss_sum(x, targets, mtp_weights, lm_head_w, x_s, w_s, grad_s, use_fp8,
                                       prefix_targets, prefix_weight)
    logits = softcap(lm_head_logits(x, lm_head_w))
    return F.cross_entropy(logits.float(), targets.long(), reduction="mean")


# ---- attention inputs shared by all layers of one forward -------------------------------------

@dataclass
class LayerAttention:
    """Everything one kind of layer (window x paired) needs from the attention backend."""
    cu_seqlens: Tensor          # document offsets in this layer's sequence (doubled when paired)
    max_len: int                # flash-attn max_seqlen
    window: int                 # tokens
    scale: float                # softmax scale (python: flash backends, sdpa)
    scale_tensor: Tensor        # the same as a device tensor (flex, the DC correction)
    mask: object                # BlockMask (flex), dense bool mask (sdpa), None (flash)


@dataclass
class AttentionPlan:
    backend: str
    kinds: dict                 # (long_window, paired) -> LayerAttention
    doc_ids: Tensor             # (T,) int32 document of each position (the DC correction)


# ---- the model ----------------------------------------------------------------------------------

class TransposedLMHead(nn.Module):
    """lm_head with its weight stored (model_dim, vocab): the transpose of nn.Linear's layout,
    which the record found faster to accumulate gradients into. GPT.body hands the weight and the
    FP8 scales to the training loss (softcapped_mtp_loss_sum) and the weight to the eval logits."""

    def __init__(self, model_dim: int, vocab_size: int, use_fp8: bool):
        super().__init__()
        self.use_fp8 = use_fp8
        self.x_s = LM_HEAD_X_SCALE
        self.w_s = LM_HEAD_W_SCALE
        # per unit gradient of the summed loss: the 1/accum the loop scales the loss by reaches
        # the backward's matmul scales, not the e5m2 values, so those match at every world size
        self.grad_s = LM_HEAD_GRAD_SCALE
        self.weight = nn.Parameter(torch.zeros(model_dim, vocab_size, dtype=torch.bfloat16))


class GPT(nn.Module):
    """The record's GPT. Parameter names, shapes, labels and init match the record; construct,
    move to the device, then call cast_to_bf16() for the record's dtypes (the caller's job)."""

    def __init__(self, cfg: ModelConfig):
        super().__init__()
        self.cfg = cfg
        self.num_layers = L = cfg.num_layers
        self.vocab_size = next_multiple_of_n(cfg.vocab_size, 128)   # 50257 -> 50304
        d, hdim, H = cfg.model_dim, cfg.num_heads * cfg.head_dim, cfg.num_heads
        self.layers = record_layer_layout(L)
        self.attention_kinds = sorted({(s.long_window, s.paired) for s in self.layers if s.has_attn})
        self._compiled_body = None
        # Parameters are created in the record's order and with its RNG draws (nn.Linear and
        # nn.Embedding draw their default init before being overwritten), so one seed gives the
        # record's initial weights. Record #81's order: head and embedding, attention, MLP, the
        # small parameters, MUDD, then (#85) the MUDD gate.
        self.lm_head = TransposedLMHead(d, self.vocab_size, cfg.use_fp8)
        nn.init.normal_(self.lm_head.weight, mean=0, std=LM_HEAD_INIT_STD)
        self.lm_head.weight.label = "lm_head"
        self.embed = nn.Embedding(self.vocab_size, d)
        self.embed.weight.label = "embed"
        with torch.no_grad():
            self.embed.weight.copy_(self.lm_head.weight.T)   # tied until the optimizer splits them
        self.yarn = Yarn(cfg.head_dim, cfg.max_seq_len)
        self.yarn_paired_head = Yarn(cfg.head_dim, cfg.max_seq_len, paired=True)
        self.value_embeds = nn.Parameter(
            VALUE_EMBED_INIT_STD * torch.randn(5 * self.vocab_size, d, dtype=torch.bfloat16))
        self.value_embeds.label = "value_embed"
        num_attn = sum(s.has_attn for s in self.layers)
        # (the MUDD layer's value-embedding gate comes from MUDD: its row here goes unused, as recorded)
        self.ve_gate_bank = nn.Parameter(torch.zeros(len(VALUE_EMBED_LAYERS), H, 2 * VE_GATE_SPLIT))
        self.ve_gate_bank.label = "ve_gate_bank"
        # banks the optimizer orthogonalizes matrix by matrix (record #80): qk_bank holds each
        # attention layer's W_q then W_k as row blocks of QK_HEADS_PER_MATRIX heads, (pair, d);
        # vo_bank its W_v and W_o, (hdim, hdim) each. Both padded with zero matrices to a multiple
        # of the world size (60 -> 64 and 20 -> 24 at 8 ranks), like `scalars`. MLP layer ->
        # (W_fc, W_proj), each (4d, d), plus one padding layer so 2*(L+1) = 24 matrices split
        # evenly over 8 ranks.
        self.num_qk_matrices = num_attn * 2 * (H // QK_HEADS_PER_MATRIX)
        self.num_vo_matrices = num_attn * 2
        qk_rows = QK_HEADS_PER_MATRIX * cfg.head_dim
        self.qk_bank = nn.Parameter(torch.empty(next_multiple_of_n(self.num_qk_matrices, cfg.world_size), qk_rows, d))
        self.qk_bank.label = "qk"
        self.qk_bank.reshape = tuple(self.qk_bank.shape)
        self.vo_bank = nn.Parameter(torch.empty(next_multiple_of_n(self.num_vo_matrices, cfg.world_size), hdim, hdim))
        self.vo_bank.label = "vo"
        self.vo_bank.reshape = tuple(self.vo_bank.shape)
        bound = 3 ** 0.5 * INIT_STD_FACTOR * d ** -0.5       # uniform with that std
        with torch.no_grad():
            self.qk_bank[:self.num_qk_matrices].uniform_(-bound, bound)
            self.qk_bank[self.num_qk_matrices:].zero_()
            self.vo_bank[:self.num_vo_matrices].uniform_(-bound, bound)
            self.vo_bank[self.num_vo_matrices:].zero_()
        self.mlp_bank = nn.Parameter(torch.empty(L + 1, 2, 4 * d, d))
        self.mlp_bank.label = "mlp"
        self.mlp_bank.reshape = ((L + 1) * 2, 4 * d, d)
        with torch.no_grad():
            self.mlp_bank[:, 0].uniform_(-bound, bound)
            self.mlp_bank[:, 1].zero_()                       # MLP output projections start at 0
        self.smear_gate = nn.Linear(GATE_INPUTS, 1, bias=False)
        nn.init.zeros_(self.smear_gate.weight)
        self.smear_gate.weight.label = "smear_gate"
        self.bigram_embed = nn.Embedding(cfg.bigram_vocab_size, cfg.bigram_dim)
        self.bigram_embed.weight.label = "bigram_embed"
        nn.init.zeros_(self.bigram_embed.weight)
        # fixed random signs (a buffer: saved in checkpoints, broadcast from rank 0)
        self.register_buffer("bigram_signs", torch.randn(BIGRAM_SIGN_ROWS, cfg.bigram_dim).sign().bfloat16())
        # residual-stream lambdas (record #73 on), indexed [layer(, sublayer: 0 attention, 1 MLP)]
        # as the record stores them. The attention-free layer never reads its attention entries,
        # the MUDD layer none of its own (MUDD gives it per-token ones); the record keeps them.
        self.post_lambdas = nn.Parameter(torch.full((L, 2), POST_LAMBDA_INIT))
        self.resid_lambdas = nn.Parameter(torch.full((L, 2), RESID_LAMBDA_INIT))
        for name in LAYER_LAMBDA_PARAMS:
            getattr(self, name).label = name
        # LAYER_SCALARS (each repeated per layer), then MODEL_SCALARS, then padding to a multiple
        # of the world size (replicated anyway; the record pads the same way).
        inits = [torch.tensor(v, dtype=torch.float32).repeat(L) for v in LAYER_SCALARS.values()]
        inits += [torch.tensor([v], dtype=torch.float32) for v in MODEL_SCALARS.values()]
        pad = -sum(t.numel() for t in inits) % cfg.world_size
        self.scalars = nn.Parameter(torch.cat(inits + [torch.ones(pad)]))
        self.scalars.label = "scalars"
        # MUDD (record #81): block 0 where MUDD_LAYER starts, block 1 before the head; both
        # padded to the longer coefficient list, as the record stores them
        width = max(len(MUDD_LAYER_COEFFICIENTS), len(MUDD_HEAD_COEFFICIENTS))
        self.mudd_w1 = nn.Parameter(torch.empty(2, MUDD_HIDDEN, d))
        for block in range(2):
            nn.init.kaiming_uniform_(self.mudd_w1.data[block], a=math.sqrt(5))   # nn.Linear's init
        self.mudd_w2 = nn.Parameter(torch.zeros(2, width, MUDD_HIDDEN))
        biases = torch.zeros(2, width)
        for block, table in enumerate((MUDD_LAYER_COEFFICIENTS, MUDD_HEAD_COEFFICIENTS)):
            biases[block, :len(table)] = torch.tensor(list(table.values())) / MUDD_SCALE
        self.mudd_b2 = nn.Parameter(biases)
        # the MUDD gate (record #85): block 0 the pre gate, block 1 the post gate, padded alike
        self.gate_layouts = mudd_gate_layout(H, L)
        sizes = [sum(width for width, _ in layout.values()) for layout in self.gate_layouts]
        self.mudd_gate_w1 = nn.Parameter(torch.empty(2, MUDD_GATE_HIDDEN, d))
        for block in range(2):
            nn.init.kaiming_uniform_(self.mudd_gate_w1.data[block], a=math.sqrt(5))
        self.mudd_gate_w2 = nn.Parameter(torch.zeros(2, max(sizes), MUDD_GATE_HIDDEN))
        biases = torch.zeros(2, max(sizes), dtype=torch.float64)
        for block, layout in enumerate(self.gate_layouts):
            values = [init for width, init in layout.values() for _ in range(width)]
            biases[block, :len(values)] = torch.tensor(values, dtype=torch.float64) / MUDD_GATE_SCALE_INIT
        self.mudd_gate_b2 = nn.Parameter(biases.float())
        self.mudd_gate_scale = nn.Parameter(torch.tensor(MUDD_GATE_SCALE_INIT))
        for name in ("mudd_w1", "mudd_w2", "mudd_b2", "mudd_gate_w1", "mudd_gate_w2", "mudd_gate_b2",
                     "mudd_gate_scale"):
            getattr(self, name).label = name
        # record #89: delayed FP8 scales of the MLP down-projection, per MLP bank layer (saved in
        # checkpoints: a resumed run continues with them). act: for each layer's post, from its
        # previous forward; w: for W_proj in use, and the next one (refresh_mlp_down_scales)
        for name in ("mlp_down_act_scales", "mlp_down_w_scales", "mlp_down_w_next_scales"):
            self.register_buffer(name, torch.ones(L + 1))
        # record #88: each token id's prefix token (prefix_token_table), -1 = none. Filled from the
        # tokenizer by whoever builds the model (build_model); all -1 turns the prefix term off.
        # Not saved in checkpoints: it is a function of the vocabulary.
        self.register_buffer("prefix_table", torch.full((self.vocab_size,), -1, dtype=torch.int64),
                             persistent=False)

    def compiled(self) -> "GPT":
        """This model with its forward compiled as cfg.compile_mode says (see compile_gpt).

        For compile-time experiments, SPEEDRUN_COMPILE_DYNAMIC=0|1|auto overrides
        cfg.compile_dynamic (auto: a second sequence length compiles one graph with a symbolic
        length that the later stages share).
        """
        dynamic = {"0": False, "1": True, "auto": None}.get(
            os.environ.get("SPEEDRUN_COMPILE_DYNAMIC", ""), self.cfg.compile_dynamic)
        return compile_gpt(self, self.cfg.compile_mode, dynamic)

    def named_scalars(self, flat: Tensor | None = None) -> tuple[dict, dict]:
        """Views into `scalars` (or a tensor laid out like it, e.g. its grad) by name:
        ({LAYER_SCALARS name: (L,) or (L, k)}, {MODEL_SCALARS name: 0-dim})."""
        flat = self.scalars if flat is None else flat
        L, start, per_layer, model_wide = self.num_layers, 0, {}, {}
        for name, init in LAYER_SCALARS.items():
            width = len(init) if isinstance(init, tuple) else 1
            values = flat[start:start + L * width]
            per_layer[name] = values.view(L, width) if isinstance(init, tuple) else values
            start += L * width
        for name in MODEL_SCALARS:
            model_wide[name] = flat[start]
            start += 1
        return per_layer, model_wide

    def layer_lambdas(self, i: int, layer_scalars: dict) -> dict:
        """Layer i's learned scalars by name: its LAYER_SCALARS values and its entries of the
        residual lambdas (resid and post: [sublayer])."""
        lam = {name: values[i] for name, values in layer_scalars.items()}
        lam.update({name: getattr(self, name)[i] for name in LAYER_LAMBDA_PARAMS})
        return lam

    @torch.no_grad()
    def refresh_mlp_down_scales(self, bootstrap: bool) -> None:
        """After init and after every optimizer step (record #89): W_proj's FP8 scale for the
        coming forwards. bootstrap (the first MLP_DOWN_BOOTSTRAP_STEPS steps, init, after the
        warm-up): the current weights' largest entry / 448; else the one noted at the previous
        refresh. Either way the current largest entry x MLP_DOWN_W_HEADROOM / 448 is noted."""
        amax = self.mlp_bank[:, 1].abs().amax(dim=(1, 2))
        # the bootstrap scale in the bank's dtype (bf16), as the record computes it; the noted one in fp32
        current = (amax.clamp_min(1e-12) / E4M3_MAX).float()
        self.mlp_down_w_scales.copy_(current if bootstrap else self.mlp_down_w_next_scales)
        self.mlp_down_w_next_scales.copy_(amax.float().clamp_min(1e-12) * (MLP_DOWN_W_HEADROOM / E4M3_MAX))

    def cast_to_bf16(self) -> "GPT":
        """The record's dtypes: embeddings, gates, linears, banks and MUDD bf16; lambdas and the
        MUDD gate's scale stay fp32."""
        for p in (self.smear_gate.weight, self.embed.weight, self.bigram_embed.weight, self.ve_gate_bank,
                  self.qk_bank, self.vo_bank, self.mlp_bank, self.mudd_w1, self.mudd_w2, self.mudd_b2,
                  self.mudd_gate_w1, self.mudd_gate_w2, self.mudd_gate_b2):
            p.data = p.data.bfloat16()
        return self

    # -- forward --

    def forward(self, input_seq: Tensor, target_seq: Tensor, cu_seqlens: Tensor,
                sched: ForwardScheduleConfig, bigram_rows: Tensor | None = None) -> Tensor:
        if input_seq.ndim != 1:
            raise ValueError(f"input_seq must be one packed sequence (T,), got {tuple(input_seq.shape)}")
        plan = self.plan_attention(cu_seqlens, input_seq.size(0), sched)
        body = self._compiled_body or self.body
        return body(input_seq, target_seq, plan, sched.mtp_weights, bigram_rows, sched.prefix_weight)

    def plan_attention(self, cu_seqlens: Tensor, length: int,
                       sched: ForwardScheduleConfig) -> AttentionPlan:
        """Masks, offsets and scales for every kind of layer, built once per forward outside any
        compiled graph, so windows and scales never specialize a graph."""
        backend = self.cfg.attn_backend
        max_len = (sched.max_seq_len or self.cfg.train_max_seq_len) if self.training else self.cfg.val_max_len
        with_backward = self.training and torch.is_grad_enabled()
        kinds = {}
        for long_window, paired in self.attention_kinds:
            yarn = self.yarn_paired_head if paired else self.yarn
            window = sched.ws_long if long_window else sched.ws_short
            factor = 2 if paired else 1           # paired layers attend over twice the positions
            cu = cu_seqlens * factor if paired else cu_seqlens
            mask = None
            scale_t = torch.full((), yarn.attn_scale, dtype=torch.float32, device=cu_seqlens.device)
            if backend == "flex":
                mask = sliding_window_block_mask(cu, factor * length, window,
                                                 with_backward=with_backward)
            elif backend == "sdpa":
                mask = window_mask_dense(cu, factor * length, window)
            kinds[(long_window, paired)] = LayerAttention(cu, factor * max_len, window,
                                                          yarn.attn_scale, scale_t, mask)
        return AttentionPlan(backend, kinds, document_ids(cu_seqlens, length))

    def attend(self, q: Tensor, k: Tensor, v: Tensor, spec: LayerSpec, plan: AttentionPlan) -> Tensor:
        """Attention in the layer's layout -> (T, heads, head_dim), contiguous, for every layer
        kind (the same layout for every layer kind)."""
        a = plan.kinds[(spec.long_window, spec.paired)]
        if plan.backend == "flex":
            y = flex_window_attention(q, k, v, a.mask, a.scale_tensor)
        elif plan.backend == "sdpa":
            y = masked_sdpa_attention(q, k, v, a.mask, a.scale)
        else:
            y = flash_varlen_attention(q, k, v, a.cu_seqlens, a.max_len, a.window, a.scale,
                                       plan.backend)
        heads = self.cfg.num_heads
        return y.reshape(-1, heads, y.size(-1)).contiguous()

    def body(self, input_seq: Tensor, target_seq: Tensor, plan: AttentionPlan,
             mtp_weights: Tensor, bigram_rows: Tensor | None = None,
             prefix_weight: Tensor | None = None) -> Tensor:
        """The forward after attention planning (compile_gpt compiles this as one graph)."""
        H = self.cfg.num_heads
        layer_scalars, model_scalars = self.named_scalars()
        x0, x_bigram, ve = embed_inputs(input_seq, self.embed.weight, self.bigram_embed.weight,
                                        self.bigram_signs, self.value_embeds, self.smear_gate.weight,
                                        model_scalars["smear_lambda"], self.vocab_size, bigram_rows)
        # each attention layer's [W_q; W_k; W_v; W_o] (4d, hdim) out of the two banks, then unbind
        # once (per-layer indexing would add select-backward kernels)
        num_attn = self.num_vo_matrices // 2
        qk = self.qk_bank[:self.num_qk_matrices].view(num_attn, -1, self.qk_bank.size(-1))
        vo = self.vo_bank[:self.num_vo_matrices].view(num_attn, -1, self.vo_bank.size(-1))
        attn_w = torch.cat([qk, vo], dim=1).unbind(0)
        ve_gates = self.ve_gate_bank.unbind(0)
        fc_w = self.mlp_bank[:, 0].unbind(0)
        proj_w = self.mlp_bank[:, 1].unbind(0)
        d = x0.size(-1)
        T = input_seq.size(0)
        gate_weights = (self.mudd_gate_w1, self.mudd_gate_w2, self.mudd_gate_b2)
        gates = mudd_gate(x0, *(w[0] for w in gate_weights), self.mudd_gate_scale, self.gate_layouts[0])
        x = add_bigram(x0, x_bigram, gates["bigram_0"])   # layer 0's bigram part (not in x0 since #85)
        states = {"input": x}                # stream states later layers read (MUDD, skip, attention)
        mlp_fp8 = self.cfg.use_fp8 and self.training   # FP8 MLP forward (records #84, #89)
        for spec in self.layers:
            i = spec.index
            lam = self.layer_lambdas(i, layer_scalars)
            mudd = None
            if i == MUDD_GATE_POST_LAYER:
                gates |= mudd_gate(x, *(w[1] for w in gate_weights), self.mudd_gate_scale, self.gate_layouts[1])
            if i == SKIP_TO_LAYER:
                x = x + torch.sigmoid(model_scalars["skip_lambda"]) * gates["skip"] * states["layer3"]
            if spec.has_attn:
                yarn = self.yarn_paired_head if spec.paired else self.yarn
                cos, sin = yarn.tables(T)
                qkvo = attn_w[spec.attn_slot]
                slot = spec.value_slot
                attn_input = states.get("layer7", x)
                if i == MUDD_LAYER:   # per-token coefficients replace the gate and the lambdas
                    states["mudd_in"] = x
                    mudd = mudd_coefficients(x, self.mudd_w1[0], self.mudd_w2[0], self.mudd_b2[0],
                                             MUDD_LAYER_COEFFICIENTS)
                    v_extra = mudd_values(mudd, states, x, ve[slot], H)
                    x = mudd_stream(mudd, states, x)
                    slot = None
                q, k, v = attention_inputs(
                    attn_input, lam, qkvo[:3 * d], cos, sin, None if slot is None else ve[slot],
                    None if slot is None else ve_gates[slot], num_heads=H, paired=spec.paired,
                    key_offset=spec.long_window, v_extra=None if mudd is None else v_extra)
                y = self.attend(q, k, v, spec, plan)
                if i == DC_LAYER:
                    w1, w2 = dc_weights(gates["dc_w1"], gates["dc_w2"])
                    scale = plan.kinds[(spec.long_window, spec.paired)].scale_tensor
                    y = dc_correction(y, q, k, v, w1, w2, plan.doc_ids, scale, DC_WINDOW)
                if spec.xsa:
                    y = exclusive_self_attention(y, v, gates[f"xsa_{i}"])
                out = attention_output(y, gates.get(f"attn_gate_{i}"), qkvo[3 * d:], lam)
                if mudd is None:
                    x = residual_write(x, out, lam["resid_lambdas"][0], lam["post_lambdas"][0],
                                       inject=x0 * gates[f"x0_{i}"])
                    if i > 0:     # layer 0's bigram part entered before it
                        x = add_bigram(x, x_bigram, gates[f"bigram_{i}"])
                else:
                    x = residual_write(x, out, mudd["resid_attn"], mudd["post_attn"],
                                       inject=mudd["input_inject"] * states["input"])
                    x = add_bigram(x, x_bigram, mudd["bigram_inject"])
            resid, post = (lam["resid_lambdas"][1], lam["post_lambdas"][1]) if mudd is None else (
                mudd["resid_mlp"], mudd["post_mlp"])
            if mlp_fp8:
                down_scales = (self.mlp_down_act_scales[i:i + 1], self.mlp_down_w_scales[i:i + 1])
                out, post_amax = mlp_output(x, fc_w[i], proj_w[i], True, down_scales)
                # delayed scaling: the next forward quantizes this layer's post by this one's top
                self.mlp_down_act_scales[i:i + 1].copy_(
                    post_amax.clamp_min(1e-12) * (MLP_DOWN_ACT_HEADROOM / E4M3_MAX))
            else:
                out = mlp_output(x, fc_w[i], proj_w[i])
            x = residual_write(x, out, resid, post)
            if i == SKIP_FROM_LAYER:
                states["layer3"] = x
            if i == ATTN_INPUT_LAYER:
                states["layer7"] = x      # the attention layers after it read this (record #77)
        mudd = mudd_coefficients(x, self.mudd_w1[1], self.mudd_w2[1], self.mudd_b2[1], MUDD_HEAD_COEFFICIENTS)
        x = mudd_head_input(mudd, states, x, ve[0])
        head = self.lm_head
        prefix_targets = self.prefix_table[target_seq] if self.training and prefix_weight is not None else None
        return output_loss(x, head.weight, target_seq, mtp_weights, head.x_s, head.w_s, head.grad_s,
                           head.use_fp8, self.training, prefix_targets, prefix_weight)


# ---- Triton kernels of the building blocks above (CUDA) ----------------------------------------

try:  # host-side TMA descriptors (triton >= 3.4); without them the portable MLP kernel runs
    from triton.tools.tensor_descriptor import TensorDescriptor
except ImportError:
    TensorDescriptor = None


# ---- Triton: linear + ReLU^2 (MLP up-projection) -------------------------------------------------
# Forward: post = relu(x W^T)^2, the only activation stored (record #87: pre is not written);
# with EMIT_FP8 also post / act_scale in e4m3 for the FP8 down-projection and each program's
# largest post (record #89). Backward: dpre = 2 (g W_proj^T) relu(pre), the same matmul with
# another epilogue, relu(pre) read back as sqrt(post).

@triton.jit
def _relu_square_epilogue(acc, post_in, FORWARD: tl.constexpr, dtype: tl.constexpr):
    """Forward: relu(pre)^2 of the product; backward: dpre from the product and the saved post."""
    c = acc.to(dtype)
    if FORWARD:
        relu = tl.maximum(c, 0)
        return relu * relu
    else:
        return (2 * c * tl.sqrt(post_in.to(tl.float32))).to(dtype)


@triton.jit
def _post_to_e4m3(post, act_scale):
    """post / act_scale as e4m3, clipped at 448 (post >= 0), fp32 in between (record #89)."""
    return tl.minimum(post.to(tl.float32) * (1.0 / act_scale), 448.0).to(tl.float8e4nv)


@triton.jit
def _linear_relu_square_kernel(
    a_ptr, b_ptr, out_ptr, post_ptr, dequant_ptr, post_f8_ptr, act_scale_ptr, amax_ptr, M, N, K,
    stride_am, stride_ak, stride_bn, stride_bk, stride_om, stride_on,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, GROUP_M: tl.constexpr,
    FORWARD: tl.constexpr, FP8: tl.constexpr, EMIT_FP8: tl.constexpr,
):
    """Portable (pointer-based) version; out and post (read in backward) share strides. a (M, K),
    b (N, K). FP8: a and b are e4m3 and the product is multiplied by *dequant_ptr before the
    epilogue."""
    pid = tl.program_id(0)
    blocks_m = tl.cdiv(M, BLOCK_M)
    blocks_n = tl.cdiv(N, BLOCK_N)
    block_m, block_n = tl.swizzle2d(pid // blocks_n, pid % blocks_n, blocks_m, blocks_n, GROUP_M)
    rows = block_m * BLOCK_M + tl.arange(0, BLOCK_M)
    cols = block_n * BLOCK_N + tl.arange(0, BLOCK_N)
    ks = tl.arange(0, BLOCK_K)
    a_ptrs = a_ptr + (rows % M).to(tl.int64)[:, None] * stride_am + ks[None, :] * stride_ak
    b_ptrs = b_ptr + (cols % N)[None, :] * stride_bn + ks[:, None] * stride_bk
    acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    for k0 in range(0, K, BLOCK_K):
        a = tl.load(a_ptrs, mask=ks[None, :] < K - k0, other=0.0)
        b = tl.load(b_ptrs, mask=ks[:, None] < K - k0, other=0.0)
        acc = tl.dot(a, b, acc)
        a_ptrs += BLOCK_K * stride_ak
        b_ptrs += BLOCK_K * stride_bk
    if FP8:
        acc *= tl.load(dequant_ptr)

    offsets = rows.to(tl.int64)[:, None] * stride_om + cols[None, :] * stride_on
    in_bounds = (rows[:, None] < M) & (cols[None, :] < N)
    post_in = acc  # placeholder, only read in backward
    if not FORWARD:
        post_in = tl.load(post_ptr + offsets, mask=in_bounds, other=0.0)
    result = _relu_square_epilogue(acc, post_in, FORWARD, out_ptr.dtype.element_ty)
    tl.store(out_ptr + offsets, result, mask=in_bounds)
    if EMIT_FP8:   # the tile's post for the FP8 down-projection, and its largest value
        tl.store(post_f8_ptr + offsets, _post_to_e4m3(result, tl.load(act_scale_ptr)), mask=in_bounds)
        tl.store(amax_ptr + pid, tl.max(tl.max(tl.where(in_bounds, result.to(tl.float32), 0.0), axis=1), axis=0))


@triton.jit
def _relu_square_store_tma(acc, out_desc, post_desc, post_f8_desc, act_scale, amax, row0, col0,
                           FORWARD: tl.constexpr, EMIT_FP8: tl.constexpr):
    """Stores one half tile; returns the running largest post (EMIT_FP8; rows past M are zeros)."""
    post_in = acc  # placeholder, only read in backward
    if not FORWARD:
        post_in = post_desc.load([row0, col0])
    result = _relu_square_epilogue(acc, post_in, FORWARD, out_desc.dtype)
    out_desc.store([row0, col0], result)
    if EMIT_FP8:
        post_f8_desc.store([row0, col0], _post_to_e4m3(result, act_scale))
        amax = tl.maximum(amax, tl.max(tl.max(result.to(tl.float32), axis=1), axis=0))
    return amax


@triton.jit
def _linear_relu_square_tma_kernel(
    a_desc, b_desc, out_desc, post_desc, dequant_ptr, post_f8_desc, act_scale_ptr, amax_ptr, M, N, K,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr,
    NUM_PROGRAMS: tl.constexpr, FORWARD: tl.constexpr, FP8: tl.constexpr, EMIT_FP8: tl.constexpr,
):
    """Hopper version: TMA tensor descriptors, persistent programs striding over output tiles.
    The epilogue handles the tile as two column halves so fewer registers are live at once."""
    tiles_n = tl.cdiv(N, BLOCK_N)
    num_tiles = tl.cdiv(M, BLOCK_M) * tiles_n
    HALF_N: tl.constexpr = BLOCK_N // 2
    act_scale = 1.0
    if EMIT_FP8:
        act_scale = tl.load(act_scale_ptr)
    amax = 0.0   # the largest post this program stores (EMIT_FP8)
    for tile in tl.range(tl.program_id(0), num_tiles, NUM_PROGRAMS, flatten=True):
        row0 = (tile // tiles_n) * BLOCK_M
        col0 = (tile % tiles_n) * BLOCK_N
        acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
        for k0 in range(0, K, BLOCK_K):
            a = a_desc.load([row0, k0])
            b = b_desc.load([col0, k0])
            acc = tl.dot(a, b.T, acc)
        if FP8:
            acc *= tl.load(dequant_ptr)
        left, right = tl.split(tl.permute(tl.reshape(acc, (BLOCK_M, 2, HALF_N)), (0, 2, 1)))
        amax = _relu_square_store_tma(left, out_desc, post_desc, post_f8_desc, act_scale, amax,
                                      row0, col0, FORWARD, EMIT_FP8)
        amax = _relu_square_store_tma(right, out_desc, post_desc, post_f8_desc, act_scale, amax,
                                      row0, col0 + HALF_N, FORWARD, EMIT_FP8)
    if EMIT_FP8:
        tl.store(amax_ptr + tl.program_id(0), amax)


def _tma_usable(a: Tensor, b: Tensor) -> bool:
    """TMA descriptors need Hopper+ and 16-byte aligned row strides (inputs made contiguous)."""
    if not a.is_cuda or TensorDescriptor is None:
        return False  # CPU interpreter tests choose explicitly
    # rows of a, b and of the (M, N = b rows) outputs must be multiples of 16 bytes
    aligned = all((t.size(-1) * t.element_size()) % 16 == 0 for t in (a, b))
    aligned = aligned and (b.size(0) * a.element_size()) % 16 == 0
    return torch.cuda.get_device_properties(a.device).major >= 9 and aligned


def _num_programs(device: torch.device) -> int:
    """Persistent kernels launch one program per SM (a few on the CPU interpreter)."""
    if device.type != "cuda":
        return 4
    return torch.cuda.get_device_properties(device).multi_processor_count


def _linear_relu_square_triton(a: Tensor, b: Tensor, post: Tensor | None = None,
                               use_tma: bool | None = None, dequant: Tensor | None = None,
                               out_dtype: torch.dtype | None = None, act_scale: Tensor | None = None):
    """Forward (post is None): returns post = relu(a @ b^T)^2. Backward (the forward's post given,
    a = upstream gradient, b = w_proj): returns dpre = 2 (a @ b^T) sqrt(post). With dequant (fp32
    (1,)): a and b are e4m3, the product is scaled by it, and the output is out_dtype (record #84).
    With act_scale (fp32 (1,), forward): returns (post, post / act_scale in e4m3 clipped at 448,
    the largest post (1,) fp32) for the FP8 down-projection (record #89)."""
    a, b = a.contiguous(), b.contiguous()
    M, K = a.shape
    N = b.size(0)
    assert b.size(1) == K, f"inner dims differ: a {tuple(a.shape)}, b {tuple(b.shape)}"
    forward = post is None
    fp8 = dequant is not None
    emit_fp8 = act_scale is not None
    assert forward or not (fp8 or emit_fp8), "FP8 is for the forward products only"
    out = a.new_empty((M, N), dtype=out_dtype or a.dtype)
    post_f8 = out.new_empty((M, N), dtype=torch.float8_e4m3fn) if emit_fp8 else out   # else unused
    if use_tma is None:   # (TMA stores of e4m3 rows need N to be a multiple of 16)
        use_tma = _tma_usable(a, b) and (not emit_fp8 or N % 16 == 0)
    dequant = dequant if fp8 else out   # a pointer the kernel never reads
    act_scale = act_scale if emit_fp8 else out
    if use_tma:
        block_m, block_n, block_k = 128, 256, 128 if fp8 else 64   # 128 bytes of K either way
        a_desc = TensorDescriptor.from_tensor(a, [block_m, block_k])
        b_desc = TensorDescriptor.from_tensor(b, [block_n, block_k])
        out_desc = TensorDescriptor.from_tensor(out, [block_m, block_n // 2])
        # forward: a one-tile stand-in the kernel never reads (a second descriptor on `out`
        # itself could alias in the compiler's view, as upstream notes)
        post = post.contiguous() if post is not None else out.new_empty((block_m, block_n // 2))
        post_desc = TensorDescriptor.from_tensor(post, [block_m, block_n // 2])
        post_f8_desc = TensorDescriptor.from_tensor(post_f8, [block_m, block_n // 2]) if emit_fp8 else post_desc
        programs = min(_num_programs(a.device), triton.cdiv(M, block_m) * triton.cdiv(N, block_n))
        amax = out.new_empty(programs, dtype=torch.float32)
        _linear_relu_square_tma_kernel[(programs,)](
            a_desc, b_desc, out_desc, post_desc, dequant, post_f8_desc, act_scale, amax, M, N, K,
            BLOCK_M=block_m, BLOCK_N=block_n, BLOCK_K=block_k,
            NUM_PROGRAMS=programs, FORWARD=forward, FP8=fp8, EMIT_FP8=emit_fp8,
            num_stages=3 if emit_fp8 else 4 if forward else 3, num_warps=8,
        )
    else:
        block_m, block_n, block_k = 128, 128, 64
        grid = (triton.cdiv(M, block_m) * triton.cdiv(N, block_n),)
        amax = out.new_empty(grid[0], dtype=torch.float32)
        _linear_relu_square_kernel[grid](
            a, b, out, out if forward else post.contiguous(), dequant, post_f8, act_scale, amax, M, N, K,
            a.stride(0), a.stride(1), b.stride(0), b.stride(1), out.stride(0), out.stride(1),
            BLOCK_M=block_m, BLOCK_N=block_n, BLOCK_K=block_k, GROUP_M=8, FORWARD=forward, FP8=fp8,
            EMIT_FP8=emit_fp8, num_stages=3, num_warps=8,
        )
    if emit_fp8:
        return out, post_f8, amax.amax().reshape(1)
    return out


class _FusedReluSquareMLP(torch.autograd.Function):
    """relu(x W_fc^T)^2 W_proj. Under torch.compile, Dynamo traces the Triton launches like the
    matmuls, so Inductor's wrapper launches them with no per-call Python dispatch (an opaque
    torch.library custom op here cost ~0.35 ms of CPU per call on the H100 host)."""

    @staticmethod
    def forward(ctx, x, w_fc, w_proj, use_fp8=False, act_scale=None, w_scale=None):
        """act_scale, w_scale ((1,) fp32, with use_fp8): the down-projection in FP8 too (record
        #89); returns (out, the largest post) then. The backward stays bf16 either way."""
        x2d = x.reshape(-1, x.size(-1))
        if use_fp8:   # the up-projection's forward product in FP8 (record #84)
            x_f8, w_f8, dequant = mlp_up_fp8_operands(x2d, w_fc)
            post = _linear_relu_square_triton(x_f8, w_f8, dequant=dequant, out_dtype=x.dtype, act_scale=act_scale)
        else:
            post = _linear_relu_square_triton(x2d, w_fc)
        if act_scale is None:
            ctx.save_for_backward(x2d, w_fc, w_proj, post)
            return (post @ w_proj).view(x.shape)
        post, post_f8, post_amax = post
        out = torch._scaled_mm(post_f8, mlp_down_fp8_weight(w_proj, w_scale), scale_a=act_scale, scale_b=w_scale,
                               out_dtype=x.dtype, use_fast_accum=True)
        ctx.save_for_backward(x2d, w_fc, w_proj, post)
        ctx.mark_non_differentiable(post_amax)
        return out.view(x.shape), post_amax

    @staticmethod
    def backward(ctx, grad_out, grad_amax=None):
        x2d, w_fc, w_proj, post = ctx.saved_tensors
        grad2d = grad_out.reshape(-1, grad_out.size(-1))
        grad_w_proj = post.mT @ grad2d
        grad_pre = _linear_relu_square_triton(grad2d, w_proj, post=post)
        grad_w_fc = grad_pre.mT @ x2d
        grad_x = grad_pre @ w_fc
        return grad_x.view(grad_out.shape), grad_w_fc, grad_w_proj, None, None, None


# ---- Triton: fused softcapped cross-entropy with multi-token prediction ----------------------------
# Softcapped logits lie in (0, 23), so exp(z) <= e^23 and a plain fp32 sum of exponentials over the
# vocabulary cannot overflow: logsumexp needs no running maximum.

@triton.jit
def _softcap_sigmoid_tl(logit, SHIFT: tl.constexpr, DIVISOR: tl.constexpr):
    """sigmoid((logit + SHIFT) / DIVISOR) as one multiply-add: a float division costs several
    instructions per element in these bandwidth-bound loops (record #69)."""
    return tl.sigmoid(logit * (1.0 / DIVISOR) + SHIFT / DIVISOR)


@triton.jit
def _softcap_tl(logit, SCALE: tl.constexpr, SHIFT: tl.constexpr, DIVISOR: tl.constexpr):
    return SCALE * _softcap_sigmoid_tl(logit, SHIFT, DIVISOR)


@triton.jit
def _softcapped_ce_fwd_bwd_kernel(
    logits_ptr, targets_ptr, weights_ptr, prefix_targets_ptr, prefix_weight_ptr, losses_ptr, grad_ptr,
    n_rows, n_cols, stride_row, stride_grad_row, grad_multiplier,
    N_PREDICT: tl.constexpr, K_BLOCK: tl.constexpr, BLOCK: tl.constexpr, PREFIX: tl.constexpr,
    SCALE: tl.constexpr, SHIFT: tl.constexpr, DIVISOR: tl.constexpr,
):
    """Loss and d(sum of losses)/d logits of whole rows, in one launch (record #79). A program
    takes rows pid, pid + P, ...: pass 1 sums the row's exponentials, pass 2 reads the row again
    (still in L2: only P rows are in flight) and writes
        (W_row p - sum_k w_k onehot(target_{row+k}) - w_p onehot(prefix_row)) * dz/dlogit * grad_multiplier,
    W_row = sum of the weights of the row's terms, p = softmax(z); the prefix term (record #88)
    only with PREFIX and where the row has a prefix target. The logits are read from HBM once
    and need not be kept for the backward."""
    ks = tl.arange(0, K_BLOCK)
    for row in range(tl.program_id(0), n_rows, tl.num_programs(0)):
        row64 = tl.cast(row, tl.int64)   # 49152 x 50304 elements overflow int32 offsets
        row_ptr = logits_ptr + row64 * stride_row
        cols = tl.arange(0, BLOCK)
        sum_exp = tl.zeros((BLOCK,), dtype=tl.float32)
        for start in range(0, n_cols, BLOCK):
            in_row = start + cols < n_cols
            logit = tl.load(row_ptr + start + cols, mask=in_row, other=0.0).to(tl.float32)
            sum_exp += tl.where(in_row, tl.exp(_softcap_tl(logit, SCALE, SHIFT, DIVISOR)), 0.0)
        lse = tl.log(tl.sum(sum_exp, axis=0))

        # the row's MTP terms: target k steps ahead; none past the end of the batch
        inside = (ks < N_PREDICT) & (row + ks < n_rows)
        weight = tl.load(weights_ptr + ks, mask=ks < N_PREDICT, other=0.0).to(tl.float32)
        target = tl.load(targets_ptr + row + ks, mask=inside, other=-1).to(tl.int64)
        used = inside & (weight > 0) & (target >= 0) & (target < n_cols)
        weight = tl.where(used, weight, 0.0)
        target_logit = tl.load(row_ptr + target, mask=used, other=0.0).to(tl.float32)
        loss = tl.sum(weight * (lse - _softcap_tl(target_logit, SCALE, SHIFT, DIVISOR)), axis=0)
        weight_sum = tl.sum(weight, axis=0)
        prefix, prefix_weight = -1, 0.0
        if PREFIX:   # one more term: the prefix token of the row's next token, if it has one
            prefix = tl.load(prefix_targets_ptr + row).to(tl.int64)
            prefix_weight = tl.load(prefix_weight_ptr).to(tl.float32)
            prefix_used = (prefix >= 0) & (prefix < n_cols) & (prefix_weight > 0)
            prefix_weight = tl.where(prefix_used, prefix_weight, 0.0)
            prefix_logit = tl.load(row_ptr + prefix, mask=prefix_used, other=0.0).to(tl.float32)
            loss += prefix_weight * (lse - _softcap_tl(prefix_logit, SCALE, SHIFT, DIVISOR))
            weight_sum += prefix_weight
        tl.store(losses_ptr + row, loss)

        # dz/dlogit = (SCALE / DIVISOR) sig (1 - sig); the constant joins the multiplier
        row_scale = tl.cast(grad_multiplier, tl.float32) * (SCALE / DIVISOR)
        grad_row_ptr = grad_ptr + row64 * stride_grad_row
        for start in range(0, n_cols, BLOCK):
            in_row = start + cols < n_cols
            logit = tl.load(row_ptr + start + cols, mask=in_row, other=0.0).to(tl.float32)
            sig = _softcap_sigmoid_tl(logit, SHIFT, DIVISOR)
            prob = tl.exp(SCALE * sig - lse)
            target_weight = tl.zeros((BLOCK,), dtype=tl.float32)
            for k in tl.static_range(N_PREDICT):   # term k's (target, weight) as two scalars
                target_k = tl.sum(tl.where(ks == k, target, 0), axis=0)
                weight_k = tl.sum(tl.where(ks == k, weight, 0.0), axis=0)
                target_weight += tl.where(start + cols == target_k, weight_k, 0.0)
            if PREFIX:
                target_weight += tl.where(start + cols == prefix, prefix_weight, 0.0)
            grad = row_scale * (weight_sum * prob - target_weight) * (sig * (1.0 - sig))
            tl.store(grad_row_ptr + start + cols, grad.to(grad_ptr.dtype.element_ty), mask=in_row)


@triton.jit
def _transpose_kernel(src_ptr, dst_ptr, n_rows, n_cols, src_stride, dst_stride,
                      BLOCK_R: tl.constexpr, BLOCK_C: tl.constexpr, ADD: tl.constexpr):
    """dst (n_cols, n_rows) = src (n_rows, n_cols)^T (ADD: +=), rows of both contiguous; tiles go
    through registers (tl.trans) so loads and stores are both coalesced."""
    rows = tl.program_id(0) * BLOCK_R + tl.arange(0, BLOCK_R)
    cols = tl.program_id(1) * BLOCK_C + tl.arange(0, BLOCK_C)
    ok = (rows < n_rows)[:, None] & (cols < n_cols)[None, :]
    tile = tl.trans(tl.load(src_ptr + rows.to(tl.int64)[:, None] * src_stride + cols[None, :], mask=ok))
    dst_ptrs = dst_ptr + cols.to(tl.int64)[:, None] * dst_stride + rows[None, :]
    if ADD:
        tile = (tl.load(dst_ptrs, mask=tl.trans(ok)).to(tl.float32) + tile.to(tl.float32)).to(tile.dtype)
    tl.store(dst_ptrs, tile, mask=tl.trans(ok))


def _softcapped_ce_fwd_bwd_triton(logits: Tensor, targets: Tensor, mtp_weights: Tensor,
                                  grad_multiplier: float, grad_dtype: torch.dtype, block: int = 4096,
                                  num_warps: int = 8, programs_per_sm: int = 2,
                                  prefix_targets: Tensor | None = None, prefix_weight: Tensor | None = None):
    """(losses fp32 (rows,), grad_multiplier * d sum(losses) / d logits as grad_dtype) for logits
    (rows, vocab); with prefix_targets (rows,) and prefix_weight (1,) the prefix-token terms too. programs_per_sm bounds the rows in flight so pass 2 finds them in L2: 2 x 8
    warps per SM like the record's CUDA kernel (2 blocks of 256 threads, its row in shared
    memory); 132 SMs x 2 rows x 100 KB stay well inside a 50 MB L2. Not yet timed on a GPU:
    `benchmarks/speedrun_kernels.py` times these settings and others."""
    logits = logits.contiguous()
    n_rows, n_cols = logits.shape
    losses = logits.new_empty(n_rows, dtype=torch.float32)
    grad = logits.new_empty((n_rows, n_cols), dtype=grad_dtype)
    programs = max(1, min(n_rows, _num_programs(logits.device) * programs_per_sm))
    n_predict = mtp_weights.numel()
    prefix = prefix_targets is not None
    _softcapped_ce_fwd_bwd_kernel[(programs,)](
        logits, targets.long().contiguous(), mtp_weights.contiguous(),
        prefix_targets.long().contiguous() if prefix else targets, prefix_weight.float() if prefix else mtp_weights,
        losses, grad, n_rows, n_cols, logits.stride(0), grad.stride(0), float(grad_multiplier),
        N_PREDICT=n_predict, K_BLOCK=max(2, triton.next_power_of_2(n_predict)), BLOCK=block, PREFIX=prefix,
        SCALE=SOFTCAP_SCALE, SHIFT=SOFTCAP_SHIFT, DIVISOR=SOFTCAP_DIVISOR, num_warps=num_warps,
    )
    return losses, grad


def _transpose_triton(src: Tensor, dst: Tensor | None = None, add: bool = False, tile=(64, 128),
                      num_warps: int = 8) -> Tensor:
    """dst = src^T (a new contiguous tensor if dst is None), or dst += src^T: 0.6 ms for
    16384 x 50304 fp8 on H100 (4 warps; upstream measured 8 faster, record #76). The optimizer's
    tied embedding uses it too (record #74)."""
    src = src if src.stride(-1) == 1 else src.contiguous()
    n_rows, n_cols = src.shape
    if dst is None:
        dst = src.new_empty((n_cols, n_rows))
    assert dst.shape == (n_cols, n_rows) and dst.stride(-1) == 1, "dst must be src^T-shaped, rows contiguous"
    grid = (triton.cdiv(n_rows, tile[0]), triton.cdiv(n_cols, tile[1]))
    _transpose_kernel[grid](src, dst, n_rows, n_cols, src.stride(0), dst.stride(0),
                            BLOCK_R=tile[0], BLOCK_C=tile[1], ADD=add, num_warps=num_warps)
    return dst


def _fp8_scale(like: Tensor, value: float) -> Tensor:
    return torch.tensor(value, dtype=torch.float32, device=like.device)


class _FusedSoftcappedMTPLoss(torch.autograd.Function):
    """Logits (FP8 e4m3 _scaled_mm, or a bf16 matmul) -> the summed loss. The forward already
    computes the logits gradient (e5m2 in units of grad_s with FP8; record #79): the loss is a sum,
    so the backward's incoming gradient is one number, applied through the two matmuls' scales."""

    @staticmethod
    def forward(ctx, x, targets, mtp_weights, w_t, x_s, w_s, grad_s, use_fp8, prefix_targets=None,
                prefix_weight=None):
        if use_fp8:
            logits, lhs, rhs = _fp8_lm_head_forward(x, w_t, x_s, w_s)   # and the e4m3 operands
            grad_multiplier, grad_dtype = 1.0 / grad_s, torch.float8_e5m2
        else:
            logits = x @ w_t.type_as(x)
            lhs, rhs = x, w_t
            grad_multiplier, grad_dtype = 1.0, logits.dtype
        losses, grad_logits = _softcapped_ce_fwd_bwd_triton(logits, targets, mtp_weights,
                                                            grad_multiplier, grad_dtype,
                                                            prefix_targets=prefix_targets,
                                                            prefix_weight=prefix_weight)
        ctx.save_for_backward(grad_logits, lhs, rhs)
        ctx.scales = (x_s, w_s, grad_s, use_fp8)
        ctx.w_dtype = w_t.dtype
        return losses.sum()

    @staticmethod
    def backward(ctx, grad_loss):
        grad_logits, x_saved, w_saved = ctx.saved_tensors
        x_s, w_s, grad_s, use_fp8 = ctx.scales
        if use_fp8:
            # one e5m2 unit of the logits gradient is grad_s times the incoming gradient
            grad_unit = grad_loss.float() * grad_s
            # FP8 GEMMs want both operands K-major: grad_w needs the gradient transposed (a tiled
            # Triton transpose: byte-wide .T.contiguous() is ~10x slower in eager) and the saved
            # e4m3 input too (record #76: a byte-wide strided copy was the slow part)
            grad_x = torch._scaled_mm(grad_logits, w_saved.T, out_dtype=torch.bfloat16,
                                      scale_a=grad_unit, scale_b=_fp8_scale(grad_logits, w_s),
                                      use_fast_accum=False)
            grad_w = torch._scaled_mm(_transpose_triton(x_saved), _transpose_triton(grad_logits).T,
                                      out_dtype=torch.float32, scale_a=_fp8_scale(grad_logits, x_s),
                                      scale_b=grad_unit, use_fast_accum=False)
        else:
            grad_x = (grad_logits @ w_saved.type_as(grad_logits).T) * grad_loss
            grad_w = (x_saved.T @ grad_logits) * grad_loss
        return grad_x, None, None, grad_w.to(ctx.w_dtype), None, None, None, None, None, None


def _fp8_lm_head_forward(x, w_t, x_s, w_s):   # (_FusedSoftcappedMTPLoss)
    """bf16 logits of the e4m3-rounded operands, and those operands (kept for the backward)."""
    x_f8 = x.div(x_s).to(torch.float8_e4m3fn)
    w_f8 = w_t.div(w_s).to(torch.float8_e4m3fn)
    # _scaled_mm wants its second operand column-major: copy W^T's rows, view back
    out = torch._scaled_mm(x_f8, w_f8.T.contiguous().T, out_dtype=torch.bfloat16,
                           scale_a=_fp8_scale(x, x_s), scale_b=_fp8_scale(x, w_s),
                           use_fast_accum=True)
    return out, x_f8, w_f8



# ---- Triton: the DC correction (record #85) --------------------------------------------------------
# One program per BLOCK_M queries; they reach the keys [q0 - WINDOW + 1, q0 + BLOCK_M), all of which
# fit one BLOCK_K-wide tile, so every head's window softmax is a single (BLOCK_M, BLOCK_K) tile and
# needs no running maximum. q, k, v, y and the gradients are contiguous (T, H, D); w1, w2, lse (T, H).
# The loops over heads are runtime loops: unrolled (tl.static_range), ptxas spilled 37 KB per thread
# in the forward at H 6, D 128, BLOCK_M 16 (sm_90, triton 3.6, compiled offline), none as a loop.

@triton.jit
def _head_offsets(tokens, head, H: tl.constexpr, D: tl.constexpr):
    """Element offsets (len(tokens), D) of one head's rows in a contiguous (T, H, D) tensor. int32
    (the launchers check T H D < 2^31): int64 offset tiles cost the backward 3.5 KB/thread of spills."""
    return (tokens[:, None] * H + head) * D + tl.arange(0, D)[None, :]


@triton.jit
def _dc_block_layout(doc_ptr, T, WINDOW: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_K: tl.constexpr):
    """This program's queries and the keys they reach, which of each exist, and the visible
    (query, key) pairs: 0..WINDOW-1 positions back, both in the sequence, same document."""
    q_start = tl.program_id(0) * BLOCK_M
    queries = q_start + tl.arange(0, BLOCK_M)
    keys = q_start - (WINDOW - 1) + tl.arange(0, BLOCK_K)
    query_in = queries < T
    key_in = (keys >= 0) & (keys < T)
    query_doc = tl.load(doc_ptr + queries, mask=query_in, other=-1)
    key_doc = tl.load(doc_ptr + keys, mask=key_in, other=-1)
    back = queries[:, None] - keys[None, :]
    visible = ((back >= 0) & (back < WINDOW) & query_in[:, None] & key_in[None, :]
               & (query_doc[:, None] == key_doc[None, :]))
    return queries, keys, query_in, key_in, visible


@triton.jit
def _dc_head_probs(q_ptr, k_ptr, lse_ptr, scale, head, queries, keys, query_in, key_in, visible,
                   H: tl.constexpr, D: tl.constexpr, FORWARD: tl.constexpr):
    """One head's window softmax P (BLOCK_M, BLOCK_K) fp32, 0 where not visible, with the head's
    q and k tiles. FORWARD: computes each row's log-sum-exp and stores it; backward: loads it, so
    exp(scores - lse) gives back the forward's P from the same scores."""
    q = tl.load(q_ptr + _head_offsets(queries, head, H, D), mask=query_in[:, None], other=0.0)
    k = tl.load(k_ptr + _head_offsets(keys, head, H, D), mask=key_in[:, None], other=0.0)
    scores = tl.where(visible, tl.dot(q, tl.trans(k)) * scale, float("-inf"))
    lse_ptrs = lse_ptr + queries * H + head
    if FORWARD:
        # rows past T see no key: give them lse 0 so their P is exp(-inf) = 0, not NaN
        row_max = tl.where(query_in, tl.max(scores, axis=1), 0.0)
        row_sum = tl.sum(tl.exp(scores - row_max[:, None]), axis=1)
        lse = row_max + tl.log(tl.where(query_in, row_sum, 1.0))
        tl.store(lse_ptrs, lse, mask=query_in)
    else:
        lse = tl.load(lse_ptrs, mask=query_in, other=0.0)
    return tl.exp(scores - lse[:, None]), q, k


@triton.jit
def _dc_mixed_probs(q_ptr, k_ptr, w1_ptr, lse_ptr, scale, queries, keys, query_in, key_in, visible,
                    H: tl.constexpr, D: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_K: tl.constexpr,
                    FORWARD: tl.constexpr):
    """A = sum_h w1_h P_h over the block's queries and keys, fp32 (FORWARD: storing each head's
    log-sum-exp; backward: from the stored ones, see _dc_head_probs)."""
    mix = tl.zeros((BLOCK_M, BLOCK_K), dtype=tl.float32)
    for head in range(H):
        probs, _q, _k = _dc_head_probs(q_ptr, k_ptr, lse_ptr, scale, head, queries, keys, query_in,
                                       key_in, visible, H, D, FORWARD)
        w1 = tl.load(w1_ptr + queries * H + head, mask=query_in, other=0.0).to(tl.float32)
        mix += w1[:, None] * probs
    return mix


@triton.jit
def _dc_correction_fwd_kernel(
    y_ptr, q_ptr, k_ptr, v_ptr, w1_ptr, w2_ptr, doc_ptr, scale_ptr, out_ptr, lse_ptr, T,
    H: tl.constexpr, D: tl.constexpr, WINDOW: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_K: tl.constexpr,
):
    """out = y + corr for BLOCK_M queries. Pass 1 mixes the heads' probabilities into A (and stores
    their log-sum-exps for the backward); pass 2 gives each head its y + (w2 A) v."""
    queries, keys, query_in, key_in, visible = _dc_block_layout(doc_ptr, T, WINDOW, BLOCK_M, BLOCK_K)
    scale = tl.load(scale_ptr)   # a tensor: a new value between stages recompiles nothing
    weight_offsets = queries * H
    mix = _dc_mixed_probs(q_ptr, k_ptr, w1_ptr, lse_ptr, scale, queries, keys, query_in, key_in, visible,
                          H, D, BLOCK_M, BLOCK_K, FORWARD=True)
    for head in range(H):
        w2 = tl.load(w2_ptr + weight_offsets + head, mask=query_in, other=0.0).to(tl.float32)
        v = tl.load(v_ptr + _head_offsets(keys, head, H, D), mask=key_in[:, None], other=0.0)
        corr = tl.dot((w2[:, None] * mix).to(v.dtype), v)   # tensor-core operands, fp32 sum
        offsets = _head_offsets(queries, head, H, D)
        y = tl.load(y_ptr + offsets, mask=query_in[:, None], other=0.0).to(tl.float32)
        tl.store(out_ptr + offsets, (y + corr).to(out_ptr.dtype.element_ty), mask=query_in[:, None])


@triton.jit
def _dc_correction_bwd_kernel(
    grad_ptr, q_ptr, k_ptr, v_ptr, w1_ptr, w2_ptr, doc_ptr, scale_ptr, lse_ptr,
    dq_ptr, dk_ptr, dv_ptr, dw1_ptr, dw2_ptr, T,
    H: tl.constexpr, D: tl.constexpr, WINDOW: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_K: tl.constexpr,
):
    """Gradients through BLOCK_M queries' corrections (y's is the incoming G itself). P comes
    back from the stored log-sum-exp, in three passes over the heads:
      1. A = sum_h w1 P_h
      2. M_h = G_h v_h^T:  dw2 = rowsum(A M_h),  dv_h += (w2 A)^T G_h,  dA = sum_h w2 M_h
      3. dw1 = rowsum(P_h dA),  dS_h = w1 P_h (dA - dw1):  dq_h = scale dS_h k_h,  dk_h += scale dS_h^T q_h
    dk and dv are fp32 atomics: each key lies in the windows of several query blocks."""
    queries, keys, query_in, key_in, visible = _dc_block_layout(doc_ptr, T, WINDOW, BLOCK_M, BLOCK_K)
    scale = tl.load(scale_ptr)
    weight_offsets = queries * H
    mix = _dc_mixed_probs(q_ptr, k_ptr, w1_ptr, lse_ptr, scale, queries, keys, query_in, key_in, visible,
                          H, D, BLOCK_M, BLOCK_K, FORWARD=False)

    d_mix = tl.zeros((BLOCK_M, BLOCK_K), dtype=tl.float32)
    for head in range(H):
        grad = tl.load(grad_ptr + _head_offsets(queries, head, H, D), mask=query_in[:, None], other=0.0)
        key_offsets = _head_offsets(keys, head, H, D)
        v = tl.load(v_ptr + key_offsets, mask=key_in[:, None], other=0.0)
        grad_dot_v = tl.dot(grad, tl.trans(v))   # M_h; A is 0 wherever a key is not visible
        w2 = tl.load(w2_ptr + weight_offsets + head, mask=query_in, other=0.0).to(tl.float32)
        dw2 = tl.sum(mix * grad_dot_v, axis=1)
        tl.store(dw2_ptr + weight_offsets + head, dw2.to(dw2_ptr.dtype.element_ty), mask=query_in)
        # the forward's rounded weights, so dv is the exact gradient of what it multiplied
        dv = tl.dot(tl.trans((w2[:, None] * mix).to(grad.dtype)), grad)
        tl.atomic_add(dv_ptr + key_offsets, dv, mask=key_in[:, None], sem="relaxed")
        d_mix += w2[:, None] * grad_dot_v

    for head in range(H):
        probs, q, k = _dc_head_probs(q_ptr, k_ptr, lse_ptr, scale, head, queries, keys, query_in,
                                     key_in, visible, H, D, FORWARD=False)
        w1 = tl.load(w1_ptr + weight_offsets + head, mask=query_in, other=0.0).to(tl.float32)
        dw1 = tl.sum(probs * d_mix, axis=1)
        tl.store(dw1_ptr + weight_offsets + head, dw1.to(dw1_ptr.dtype.element_ty), mask=query_in)
        d_scores = w1[:, None] * probs * (d_mix - dw1[:, None])   # softmax backward of w1 dA
        dq = tl.dot(d_scores.to(k.dtype), k) * scale   # dS rounded to the inputs' dtype for the tensor cores
        tl.store(dq_ptr + _head_offsets(queries, head, H, D), dq.to(dq_ptr.dtype.element_ty),
                 mask=query_in[:, None])
        dk = tl.dot(tl.trans(d_scores.to(q.dtype)), q) * scale
        tl.atomic_add(dk_ptr + _head_offsets(keys, head, H, D), dk, mask=key_in[:, None], sem="relaxed")


def _dc_launch_shape(q: Tensor, window: int, block_m: int):
    """(T, H, D, BLOCK_K, grid), after checking what tl.dot and tl.arange need."""
    T, H, D = q.shape
    if D < 16 or D & (D - 1):
        raise ValueError(f"DC correction kernels need the head dim D to be a power of two >= 16 "
                         f"(tl.dot, tl.arange); got D = {D}")
    if block_m < 16 or block_m & (block_m - 1):
        raise ValueError(f"block_m must be a power of two >= 16 (tl.dot); got {block_m}")
    if window < 1:
        raise ValueError(f"window must be >= 1; got {window}")
    if T * H * D >= 2 ** 31:
        raise ValueError(f"DC correction kernels use int32 offsets: T H D = {T * H * D} >= 2^31")
    block_k = max(16, triton.next_power_of_2(window + block_m - 1))
    return T, H, D, block_k, (triton.cdiv(T, block_m),)


def _dc_scale_tensor(scale, like: Tensor) -> Tensor:
    """The kernels load the softmax scale (fp32) through a pointer: Inductor would pass a Python
    float as fp64, and a tensor's new value between training stages recompiles nothing."""
    return torch.as_tensor(scale, dtype=torch.float32, device=like.device)


def _dc_correction_triton_forward(y: Tensor, q: Tensor, k: Tensor, v: Tensor, w1: Tensor, w2: Tensor,
                                  doc_ids: Tensor, scale, window: int, block_m: int = 16):
    """(out in y's dtype, lse (T, H) fp32: each head's window log-sum-exp, for the backward)."""
    y, q, k, v, w1, w2 = (t.contiguous() for t in (y, q, k, v, w1, w2))
    T, H, D, block_k, grid = _dc_launch_shape(q, window, block_m)
    out = torch.empty_like(y)
    lse = q.new_empty((T, H), dtype=torch.float32)
    _dc_correction_fwd_kernel[grid](
        y, q, k, v, w1, w2, doc_ids.to(torch.int32).contiguous(), _dc_scale_tensor(scale, q), out, lse, T,
        H=H, D=D, WINDOW=window, BLOCK_M=block_m, BLOCK_K=block_k, num_warps=4,
    )
    return out, lse


def _dc_correction_triton_backward(grad_out: Tensor, q: Tensor, k: Tensor, v: Tensor, w1: Tensor,
                                   w2: Tensor, doc_ids: Tensor, scale, lse: Tensor, window: int,
                                   block_m: int = 16):
    """(dq, dk, dv, dw1, dw2) in the inputs' dtypes; dy is grad_out itself."""
    grad_out, q, k, v, w1, w2, lse = (t.contiguous() for t in (grad_out, q, k, v, w1, w2, lse))
    T, H, D, block_k, grid = _dc_launch_shape(q, window, block_m)
    dq = torch.empty_like(q)
    dk = torch.zeros(q.shape, dtype=torch.float32, device=q.device)   # atomic sums
    dv = torch.zeros_like(dk)
    dw1, dw2 = torch.empty_like(w1), torch.empty_like(w2)
    _dc_correction_bwd_kernel[grid](
        grad_out, q, k, v, w1, w2, doc_ids.to(torch.int32).contiguous(), _dc_scale_tensor(scale, q),
        lse, dq, dk, dv, dw1, dw2, T,
        H=H, D=D, WINDOW=window, BLOCK_M=block_m, BLOCK_K=block_k, num_warps=8,
    )
    return dq, dk.to(k.dtype), dv.to(v.dtype), dw1, dw2


class _DCCorrection(torch.autograd.Function):
    """y + DC correction through the Triton kernels; the forward keeps only the (T, H) fp32
    log-sum-exps besides its inputs, and the backward recomputes the probabilities."""

    @staticmethod
    def forward(ctx, y, q, k, v, w1, w2, doc_ids, scale, window):
        scale = _dc_scale_tensor(scale, q)
        y, q, k, v, w1, w2 = (t.contiguous() for t in (y, q, k, v, w1, w2))   # saved as the kernels read them
        out, lse = _dc_correction_triton_forward(y, q, k, v, w1, w2, doc_ids, scale, window)
        ctx.save_for_backward(q, k, v, w1, w2, doc_ids, scale, lse)
        ctx.window = window
        return out

    @staticmethod
    def backward(ctx, grad_out):
        q, k, v, w1, w2, doc_ids, scale, lse = ctx.saved_tensors
        dq, dk, dv, dw1, dw2 = _dc_correction_triton_backward(grad_out, q, k, v, w1, w2, doc_ids,
                                                              scale, lse, ctx.window)
        return grad_out, dq, dk, dv, dw1, dw2, None, None, None


# ---- compilation ---------------------------------------------------------------------------------

def compile_gpt(model: GPT, mode: str = "model", dynamic: bool | None = False,
                backend: str = "inductor") -> GPT:
    """Compile GPT's forward as the mode says; returns the model (call it as usual).
    GPT.compiled() calls this with the ModelConfig's compile_mode / compile_dynamic.

    "model":  the whole forward (after attention planning) as ONE fullgraph graph, like the record.
              One graph per (sequence length, train/eval); windows, YaRN tables and scales are
              tensors, so a stage change recompiles only when the batch shape changes.
              (Compiling each kind of layer on its own and reusing it compiled faster but ran
              ~1.6x slower per step on an H100: benchmarks/RESULTS.md.)
    "none":   eager (CPU tests; FlexAttention is then the slow unfused fallback).
    dynamic:  passed to torch.compile; None lets a second sequence length compile a graph with a
              symbolic length that the later stages reuse.
    backend:  torch.compile backend; tests use "eager" to check tracing (fullgraph) in seconds.
    """
    if mode not in COMPILE_MODES:
        raise ValueError(f"compile mode {mode!r} is not one of {COMPILE_MODES}")
    model._compiled_body = None
    if mode == "model":
        _allow_many_graphs()
        model._compiled_body = torch.compile(model.body, fullgraph=True, dynamic=dynamic, backend=backend)
    return model


def _allow_many_graphs(limit: int = 64) -> None:
    # one code object serves several shapes x train/eval: lift dynamo's default of 8
    for name in ("recompile_limit", "cache_size_limit"):
        if hasattr(torch._dynamo.config, name):
            setattr(torch._dynamo.config, name, max(getattr(torch._dynamo.config, name), limit))


# =============================================================================
# SECTION: optimizer
# =============================================================================

# ---- Polar Express orthogonalization (arXiv 2505.16932) -----------------------------------------
# Five odd-polynomial steps X <- a X + (b A + c A A) X with A = X X^T, drive every singular value of
# X towards 1. A tall X multiplies from the right instead, X <- a X + X (b A + c A A) with
# A = X^T X (the same map, transposed; record #74: no transposed copies of the MLP matrices). Coefficients as in the record: optimized for 5 iterations, safety factor 2e-2,
# cushion 2. The safety factor also inflates the Frobenius norm used to pre-scale X, so the
# spectral norm starts safely below 1.
POLAR_EXPRESS_COEFFS = (
    (8.156554524902461, -22.48329292557795, 15.878769915207462),
    (4.042929935166739, -2.808917465908714, 0.5000178451051316),
    (3.8916678022926607, -2.772484153217685, 0.5060648178503393),
    (3.285753657755655, -2.3681294933425376, 0.46449024233003106),
    (2.3465413258596377, -1.7097828382687081, 0.42323551169305323),
)
POLAR_EXPRESS_SAFETY = 2e-2
POLAR_EXPRESS_EPS = 1e-6


def xxt_reference(A: Tensor, out: Tensor) -> Tensor:
    """out = A @ A^T for (m, k) or batched (b, m, k) A, accumulated in fp32 and rounded once."""
    out.copy_(A.float() @ A.float().mT)
    return out


def ba_plus_caa_reference(A: Tensor, alpha: float, beta: float, out: Tensor) -> Tensor:
    """out = alpha * A @ A^T + beta * A for square (batched) A, fp32 math, one rounding."""
    A32 = A.float()
    out.copy_(alpha * (A32 @ A32.mT) + beta * A32)
    return out


def xxt(A: Tensor, out: Tensor) -> Tensor:
    if _use_triton(A):
        return _xxt_triton(A, out)
    return xxt_reference(A, out)


def xtx(A: Tensor, out: Tensor) -> Tensor:
    """out = A^T @ A: the Gram kernel on the transposed view (no copy)."""
    if _use_triton(A):
        return _xtx_triton(A, out)
    return xxt_reference(A.mT, out)


def ba_plus_caa(A: Tensor, alpha: float, beta: float, out: Tensor) -> Tensor:
    if _use_triton(A):
        return _ba_plus_caa_triton(A, alpha, beta, out)
    return ba_plus_caa_reference(A, alpha, beta, out)


def polar_express(G: Tensor, split_baddbmm: bool = False) -> Tensor:
    """Approximate orthogonal polar factor U V^T of G (..., m, n), computed in bf16 like the record.

    split_baddbmm: do C = X B (or B X) then C += a X as two ops instead of one baddbmm; faster for
    the tall MLP matrices, where baddbmm reading X twice forces a defensive copy.
    """
    X = G.bfloat16()
    tall = G.size(-2) > G.size(-1)   # multiply from the side that keeps the Gram matrix small
    X = X / (X.norm(dim=(-2, -1), keepdim=True) * (1 + POLAR_EXPRESS_SAFETY) + POLAR_EXPRESS_EPS)
    X = X.contiguous()
    side = X.size(-1) if tall else X.size(-2)
    gram = X.new_empty((*X.shape[:-2], side, side))
    poly = torch.empty_like(gram)
    nxt = torch.empty_like(X)
    batched = X.ndim > 2
    for a, b, c in POLAR_EXPRESS_COEFFS:
        if tall:
            xtx(X, out=gram)                              # gram = X^T X
        else:
            xxt(X, out=gram)                              # gram = X X^T
        ba_plus_caa(gram, alpha=c, beta=b, out=poly)      # poly = b gram + c gram^2 (symmetric)
        left, right = (X, poly) if tall else (poly, X)
        if split_baddbmm:
            torch.matmul(left, right, out=nxt)
            nxt.add_(X, alpha=a)
        elif batched:
            torch.baddbmm(X, left, right, beta=a, out=nxt)    # nxt = a X + left right
        else:
            torch.addmm(X, left, right, beta=a, out=nxt)
        X, nxt = nxt, X                                   # ping-pong the two buffers
    return X


COMPILED_ADAM_MIN_NUMEL = 1 << 16   # smaller Adam tensors (gates, scalars) update eagerly


@dataclass
class ParamSettings:
    """Per-parameter optimizer settings; lr (and momentum) are rewritten every step."""
    label: str
    optim: str                       # "adam" or "normuon"
    comms: str                       # "none", "replicated", "sharded" or "sparse" (PARAM_TABLE)
    lr: float
    initial_lr: float
    weight_decay: float
    lr_mul: float = 1.0
    wd_mul: float = 1.0
    betas: tuple | None = None       # Adam
    eps: float | None = None         # Adam
    chunk_size: int | None = None    # rows (Adam) or matrices (NorMuon) this rank updates
    reshape: tuple | None = None     # NorMuon: bank viewed as a stack of matrices
    momentum: float | None = None    # NorMuon
    beta2: float | None = None       # NorMuon second-moment decay


# ---- update math: plain functions so tests can compare them with a textbook version ----

def adam_update_(p, grad, exp_avg, exp_avg_sq, beta1: float, beta2: float, eps: float,
                 step_size: Tensor, decay: Tensor) -> None:
    """Adam with bias correction folded into step_size, and cautious weight decay:
    decay only the coordinates the update is already pushing toward zero."""
    exp_avg.mul_(beta1).add_(grad, alpha=1 - beta1)
    exp_avg_sq.mul_(beta2).addcmul_(grad, grad, value=1 - beta2)
    update = exp_avg.div(exp_avg_sq.sqrt().add_(eps)).mul_(step_size)
    same_sign = (update * p) > 0
    update = update + p.float() * same_sign * decay
    p.sub_(update)


def nesterov_momentum_(grad: Tensor, buffer: Tensor, momentum: Tensor | float) -> Tensor:
    """buffer <- lerp(buffer, grad, 1 - momentum); returns grad <- lerp(grad, buffer, momentum),
    the Nesterov look-ahead NorMuon orthogonalizes (both in place, fp32). momentum: a 0-D host
    tensor inside torch.compile (a new value is not a recompile), a float in eager mode."""
    if isinstance(momentum, Tensor):
        momentum = momentum.to(grad.dtype)
    buffer.lerp_(grad, 1 - momentum)
    return grad.lerp_(buffer, momentum)


def normuon_normalize_(v: Tensor, second_moment: Tensor, beta2: float, red_dim: int) -> Tensor:
    """NorMuon: divide each row (or column) of the orthogonalized update by the running RMS of
    that row, then rescale so every matrix keeps the Frobenius norm it had before."""
    n = v.size(red_dim)
    mean_sq = v.float().square().mean(dim=red_dim, keepdim=True)
    norm_before = (mean_sq.sum(dim=(-2, -1), keepdim=True) * n).sqrt()
    second_moment.lerp_(mean_sq, 1 - beta2)
    inv_rms = second_moment.clamp_min(1e-10).rsqrt()
    norm_after = ((mean_sq * n) * inv_rms.square()).sum(dim=(-2, -1), keepdim=True).sqrt()
    scale = inv_rms * (norm_before / norm_after.clamp_min(1e-10))
    return v.mul_(scale.to(v.dtype))


def transpose_copy_(dst: Tensor, src: Tensor) -> None:
    """dst = src^T (tied embedding <- lm_head). Triton on CUDA: PyTorch's strided copy writes
    uncoalesced and occupies every SM while the gathers run (record #74)."""
    if _use_triton(src):
        _transpose_triton(src, dst)
    else:
        dst.copy_(src.T)


def transpose_add_(dst: Tensor, src: Tensor) -> None:
    """dst += src^T (lm_head's gradient collects the tied embedding's), Triton on CUDA."""
    if _use_triton(src):
        _transpose_triton(src, dst, add=True)
    else:
        dst.add_(src.T)


def cautious_update_bf16_(p: Tensor, mantissa: Tensor, update: Tensor, decay: Tensor, lr: Tensor) -> None:
    """p -= lr * (update + decay * p on coordinates where update and p agree in sign), done in
    fp32: the bf16 parameter plus a uint16 buffer of its lost low mantissa bits form an exact
    fp32 number, so small updates accumulate instead of rounding away.

    Bit work uses int32 (sign-extended int16 << 16), which every backend supports, not uint32.
    """
    high = p.view(torch.int16).to(torch.int32) << 16
    low = mantissa.view(torch.int16).to(torch.int32) & 0xFFFF
    precise = (high | low).view(torch.float32)
    update = update.float()
    same_sign = (update * precise) >= 0
    precise = precise - (precise * same_sign * decay * lr) - (update * lr)
    bits = precise.view(torch.int32)
    p.view(torch.int16).copy_((bits >> 16).to(torch.int16))
    mantissa.view(torch.int16).copy_(bits.to(torch.int16))


def cautious_update_fp32_(p: Tensor, update: Tensor, decay: Tensor, lr: Tensor) -> None:
    """Same update for fp32 parameters (CPU tests), which need no mantissa buffer."""
    update = update.float()
    same_sign = (update * p) >= 0
    p.copy_(p - (p * same_sign * decay * lr) - (update * lr))


class NorMuonAndAdam:
    """NorMuon (Polar Express + row-normalized second moment) on the attn/mlp banks, Adam on the
    rest; gradients reduced explicitly in PARAM_TABLE order, updates run in WORK_ORDER so
    communication overlaps with update math.

    Not a torch.optim.Optimizer: every parameter carries a `.label` naming its PARAM_TABLE row.
    While embed and lm_head are tied, only lm_head is reduced and updated (with embed's grad
    added, transposed) and embed is then overwritten with lm_head.T; `copy_lm_state_to_embed`
    unties them.
    """

    def __init__(self, named_params, world_size: int = 1, rank: int = 0, compile: bool = False):
        param_table, work_order = PARAM_TABLE, WORK_ORDER       # the tunables, read when built
        adam_defaults, normuon_defaults = ADAM_DEFAULTS, NORMUON_DEFAULTS
        self.world_size, self.rank = world_size, rank
        self.scatter_order = list(param_table)
        self.work_order = list(work_order)
        self.by_label: dict = {}
        self.settings: dict = {}       # param -> ParamSettings
        self.state: dict = {}          # param -> dict of tensors (and Adam's step count)
        for name, param in named_params:
            label = getattr(param, "label", None)
            if label not in param_table:
                raise ValueError(f"parameter {name} has label {label!r}, not one of {sorted(param_table)}")
            if label in self.by_label:
                raise ValueError(f"two parameters carry the label {label!r}")
            self.by_label[label] = param
            self.settings[param] = self._settings_for(param, label, param_table[label],
                                                      adam_defaults, normuon_defaults)
        present = set(self.by_label)
        if set(self.scatter_order) != present or set(self.work_order) != present:
            missing = (set(self.scatter_order) | set(self.work_order)) ^ present
            raise ValueError(f"parameter labels and optimizer tables differ: {sorted(missing)}")
        self._init_state()
        # Host-side 0-D tensors carry per-step numbers into the (compiled) update math, so a new
        # learning rate is a new value, not a recompile.
        self._step_size = torch.zeros((), dtype=torch.float32)
        self._decay = torch.zeros((), dtype=torch.float32)
        self._lr = torch.zeros((), dtype=torch.float32)
        self._momentum = torch.zeros((), dtype=torch.float32)
        maybe_compile = (lambda f: torch.compile(f, dynamic=False, fullgraph=True)) if compile else (lambda f: f)
        if compile:   # one graph per shape: 3 Adam (embeddings, lm_head), 2 x 2 NorMuon; stay clear of the limit
            _allow_many_graphs()
        # Adam on the gates/scalars is a few microseconds eager; compiling it would add a graph per
        # shape to the start-up, so only the embedding-sized tensors get the fused, compiled update.
        self._adam_update_big = maybe_compile(adam_update_)
        self._normalize = maybe_compile(normuon_normalize_)
        # one fused fp32 kernel when compiled (record #74); eager lerp_ wants a float weight
        self._nesterov = maybe_compile(nesterov_momentum_) if compile else \
            (lambda grad, buffer, momentum: nesterov_momentum_(grad, buffer, momentum.item()))
        self._cautious_bf16 = maybe_compile(cautious_update_bf16_)
        self._cautious_fp32 = maybe_compile(cautious_update_fp32_)
        self._pending_reduce: dict = {}
        # sparse tables: which rows this rank's batches touched since the table's last update
        self.touched_rows = {p: np.zeros(p.shape[0], dtype=bool) for p, cfg in self.settings.items()
                             if cfg.comms == "sparse"}
        self.split_embed = False
        self.lm_head = self.by_label.get("lm_head")
        self.embed = self.by_label.get("embed")

    # ---- construction ----

    def _settings_for(self, param, label, row, adam_defaults, normuon_defaults) -> ParamSettings:
        comms = row["comms"] if self.world_size > 1 else "none"
        if row["optim"] == "adam":
            chunk = None
            if comms in ("sharded", "sparse"):
                if param.shape[0] % self.world_size:
                    raise ValueError(f"{label}: {param.shape[0]} rows do not split over {self.world_size} ranks")
                chunk = param.shape[0] // self.world_size
            return ParamSettings(label, "adam", comms, lr=adam_defaults["lr"], initial_lr=adam_defaults["lr"],
                                 weight_decay=adam_defaults["weight_decay"], lr_mul=row.get("lr_mul", 1.0),
                                 wd_mul=row.get("wd_mul", 1.0), betas=tuple(row["betas"]),
                                 eps=adam_defaults["eps"], chunk_size=chunk)
        reshape = getattr(param, "reshape", None)
        if not isinstance(reshape, tuple) or len(reshape) != 3:
            raise ValueError(f"NorMuon parameter {label} needs a .reshape (matrices, rows, cols) attribute")
        if reshape[0] % self.world_size:
            raise ValueError(f"{label}: {reshape[0]} matrices do not split over {self.world_size} ranks")
        chunk = reshape[0] // self.world_size
        rows, cols = reshape[1], reshape[2]
        # tall matrices get a larger step: sqrt(rows / cols) when rows > cols
        shape_mul = max(1.0, rows / cols) ** 0.5
        return ParamSettings(label, "normuon", comms, lr=normuon_defaults["lr"],
                             initial_lr=normuon_defaults["lr"], weight_decay=normuon_defaults["weight_decay"],
                             lr_mul=shape_mul * row.get("lr_mul", 1.0), wd_mul=row.get("wd_mul", 1.0),
                             chunk_size=chunk, reshape=tuple(reshape), momentum=normuon_defaults["momentum"],
                             beta2=normuon_defaults["beta2"])

    def _init_state(self) -> None:
        for param, cfg in self.settings.items():
            if cfg.optim == "adam":
                local = param[:cfg.chunk_size] if cfg.chunk_size is not None else param
                zeros = torch.zeros(local.shape, dtype=torch.float32, device=param.device)
                self.state[param] = dict(step=0, exp_avg=zeros, exp_avg_sq=torch.zeros_like(zeros))
                continue
            shape = (cfg.chunk_size, *cfg.reshape[1:])
            rows, cols = shape[-2:]
            # second moment keeps one number per row of a tall/square matrix, per column of a wide one
            moment_shape = (cfg.chunk_size, rows, 1) if rows >= cols else (cfg.chunk_size, 1, cols)
            # the mlp bank holds c_fc, c_proj, c_fc, ...: every c_proj (odd global index) gets 2x lr
            ratio = torch.ones(cfg.chunk_size, 1, 1, dtype=torch.float32)
            if cfg.label == "mlp":
                first = self.rank * cfg.chunk_size
                ratio[:, 0, 0] = torch.tensor([MLP_OUTPUT_LR_RATIO if (first + i) % 2 else 1.0
                                               for i in range(cfg.chunk_size)])
            self.state[param] = dict(
                momentum_buffer=torch.zeros(shape, dtype=torch.float32, device=param.device),
                second_moment=torch.zeros(moment_shape, dtype=torch.float32, device=param.device),
                mantissa=torch.zeros(shape, dtype=torch.uint16, device=param.device),
                lr_ratio=ratio.to(param.device),
            )

    # ---- communication ----

    def _launch_reduce(self, param: Tensor) -> None:
        cfg, grad = self.settings[param], param.grad
        if cfg.optim == "normuon":
            grad = grad.view(cfg.reshape)
        if cfg.comms == "none":
            self._pending_reduce[param] = (None, grad)
        elif cfg.comms == "replicated":
            work = dist.all_reduce(grad, op=dist.ReduceOp.AVG, async_op=True)
            self._pending_reduce[param] = (work, grad)
        elif cfg.comms == "sparse":
            self._pending_reduce[param] = self._launch_sparse_exchange(param, grad, cfg)
        else:
            local = torch.empty((cfg.chunk_size, *grad.shape[1:]), dtype=grad.dtype, device=grad.device)
            work = dist.reduce_scatter_tensor(local, grad.contiguous(), op=dist.ReduceOp.AVG, async_op=True)
            self._pending_reduce[param] = (work, local)

    def note_touched_rows(self, label: str, rows: np.ndarray) -> None:
        """A micro-batch read these rows of a sparse table (the loader's host-side bigram rows)."""
        param = self.by_label.get(label)
        if param in self.touched_rows:
            self.touched_rows[param][rows] = True

    def _launch_sparse_exchange(self, param: Tensor, grad: Tensor, cfg: ParamSettings):
        """The reduce-scatter (average) of a table's gradient when each rank touched few rows: its
        grad is zero elsewhere, so each rank sends every other rank just the touched rows that
        rank owns (row counts first, then row numbers and rows) and adds what it receives to its
        own slice. Returns (work, finish): finish() gives the averaged slice once work is done."""
        touched = np.flatnonzero(self.touched_rows[param]).astype(np.int64)
        if touched.size == 0:   # every batch reads the table: nothing noted means a caller forgot
            raise RuntimeError(f"{cfg.label}: no touched rows were noted since its last update; pass the "
                               "optimizer to train_step (it calls note_touched_rows for each micro-batch)")
        self.touched_rows[param][:] = False
        owner_starts = np.arange(self.world_size + 1) * cfg.chunk_size
        bounds = np.searchsorted(touched, owner_starts)
        send_counts = np.diff(bounds)
        send_counts[self.rank] = 0                        # our own rows are already in our slice
        mine = slice(bounds[self.rank], bounds[self.rank + 1])
        send_rows = np.concatenate([touched[:mine.start], touched[mine.stop:]])
        # the counts travel on the host (gloo) so nothing waits for the GPU
        recv_counts = torch.empty(self.world_size, dtype=torch.int64)
        dist.all_to_all_single(recv_counts, torch.from_numpy(send_counts), group=self._host_group())
        send_counts, recv_counts = send_counts.tolist(), recv_counts.tolist()
        send_idx = torch.from_numpy(send_rows).to(grad.device, non_blocking=True)
        recv_idx = torch.empty(sum(recv_counts), dtype=torch.int64, device=grad.device)
        dist.all_to_all_single(recv_idx, send_idx, recv_counts, send_counts)
        width = grad.shape[1]
        send_vals = grad[send_idx].contiguous()
        recv_vals = torch.empty((sum(recv_counts), width), dtype=grad.dtype, device=grad.device)
        work = dist.all_to_all_single(recv_vals.view(-1), send_vals.view(-1),
                                      [c * width for c in recv_counts], [c * width for c in send_counts],
                                      async_op=True)
        local = grad[self.rank * cfg.chunk_size:(self.rank + 1) * cfg.chunk_size]

        def finish() -> Tensor:
            local.index_add_(0, recv_idx - self.rank * cfg.chunk_size, recv_vals)
            return local.mul_(1.0 / self.world_size)     # exact for 2, 4, 8 ranks, like AVG
        return work, finish

    def _host_group(self):
        """A gloo group for small host tensors (the default group is NCCL on GPUs)."""
        if dist.get_backend() == "gloo":
            return None
        if not hasattr(self, "_gloo_group"):
            self._gloo_group = dist.new_group(backend="gloo")
        return self._gloo_group

    def _launch_gather(self, param: Tensor, local: Tensor):
        cfg = self.settings[param]
        full = param.data.view(cfg.reshape) if cfg.optim == "normuon" else param.data
        return dist.all_gather_into_tensor(full, local.contiguous(), async_op=True)

    def _local_slice(self, param: Tensor) -> Tensor:
        cfg = self.settings[param]
        full = param.data.view(cfg.reshape) if cfg.optim == "normuon" else param.data
        if cfg.chunk_size is None or cfg.comms == "none":
            return full
        return full[self.rank * cfg.chunk_size:(self.rank + 1) * cfg.chunk_size]

    # ---- the step ----

    @torch.no_grad()
    def step(self, do_adam: bool = True) -> None:
        """1) launch reductions in scatter order, 2) per param in work order: wait, update, launch
        the gather of sharded results, 3) wait for gathers (lm_head's first, to refresh a tied embed)."""
        tied = not self.split_embed
        for label in self.scatter_order:
            param = self.by_label[label]
            cfg = self.settings[param]
            if (cfg.optim == "adam" and not do_adam) or param.grad is None:
                continue
            if tied and label == "embed":
                continue    # its gradient rides on lm_head's, below
            if tied and label == "lm_head" and self.embed is not None and self.embed.grad is not None:
                transpose_add_(param.grad, self.embed.grad)
            self._launch_reduce(param)

        gathers, lm_head_gather = [], None
        for label in self.work_order:
            param = self.by_label[label]
            if param not in self._pending_reduce:
                continue
            work, grad = self._pending_reduce.pop(param)
            if work is not None:
                work.wait()
            if callable(grad):
                grad = grad()                 # a sparse exchange's averaged slice
            cfg = self.settings[param]
            if cfg.optim == "adam":
                local = self._adam_step(param, grad, cfg)
            else:
                local = self._normuon_step(param, grad, cfg)
            if cfg.comms in ("sharded", "sparse"):
                handle = self._launch_gather(param, local)
                if label == "lm_head":
                    lm_head_gather = handle
                else:
                    gathers.append(handle)

        if lm_head_gather is not None:
            lm_head_gather.wait()
        if do_adam and tied and self.embed is not None and self.lm_head is not None:
            transpose_copy_(self.embed.data, self.lm_head.data)
        for handle in gathers:
            handle.wait()

        for param, cfg in self.settings.items():
            if cfg.optim == "normuon" or do_adam:
                param.grad = None    # Adam grads survive even steps and add up with the next

    def _adam_step(self, param: Tensor, grad: Tensor, cfg: ParamSettings) -> Tensor:
        beta1, beta2 = cfg.betas
        lr = cfg.lr * cfg.lr_mul
        state = self.state[param]
        state["step"] += 1
        t = state["step"]
        self._step_size.fill_(lr * ((1 - beta2 ** t) ** 0.5 / (1 - beta1 ** t)))
        self._decay.fill_(lr * lr * cfg.weight_decay * cfg.wd_mul)
        local = self._local_slice(param)
        update = self._adam_update_big if local.numel() >= COMPILED_ADAM_MIN_NUMEL else adam_update_
        update(local, grad, state["exp_avg"], state["exp_avg_sq"], beta1, beta2, cfg.eps,
               self._step_size, self._decay)
        return local

    def _normuon_step(self, param: Tensor, grad: Tensor, cfg: ParamSettings) -> Tensor:
        state = self.state[param]
        self._momentum.fill_(cfg.momentum)
        blended = self._nesterov(grad.float(), state["momentum_buffer"], self._momentum)
        rows, cols = blended.shape[-2:]
        update = polar_express(blended, split_baddbmm=rows > 1024)   # split: faster for tall mlp matrices
        update = self._normalize(update, state["second_moment"], cfg.beta2, -1 if rows >= cols else -2)
        self._lr.fill_(cfg.lr_mul * cfg.lr)
        self._decay.fill_(cfg.wd_mul * cfg.weight_decay * cfg.lr)
        # x2 on c_proj matrices is exact in fp32, so lr * ratio equals the per-matrix product
        lr = self._lr * state["lr_ratio"]
        local = self._local_slice(param)
        if local.dtype == torch.bfloat16:
            self._cautious_bf16(local, state["mantissa"], update, self._decay, lr)
        else:
            self._cautious_fp32(local, update, self._decay, lr)
        return local

    # ---- state ----

    def set_schedule(self, lr_multiplier: float, muon_momentum_value: float) -> None:
        for cfg in self.settings.values():
            cfg.lr = cfg.initial_lr * lr_multiplier
            if cfg.optim == "normuon":
                cfg.momentum = muon_momentum_value

    def copy_lm_state_to_embed(self) -> None:
        """Untie: embed continues from lm_head's Adam moments (transposed, resharded by rows)."""
        lm_cfg, embed_cfg = self.settings[self.lm_head], self.settings[self.embed]
        lm_state, embed_state = self.state[self.lm_head], self.state[self.embed]
        embed_state["step"] = lm_state["step"]
        for key in ("exp_avg", "exp_avg_sq"):
            full = lm_state[key]
            if lm_cfg.comms in ("sharded", "sparse"):
                full = torch.empty(self.lm_head.shape, dtype=full.dtype, device=full.device)
                dist.all_gather_into_tensor(full, lm_state[key].contiguous())
            full_t = full.T
            if embed_cfg.comms in ("sharded", "sparse"):
                full_t = full_t[self.rank * embed_cfg.chunk_size:(self.rank + 1) * embed_cfg.chunk_size]
            embed_state[key].copy_(full_t)
        self.split_embed = True

    def reset(self) -> None:
        """Back to a fresh NorMuon state and tied embeddings (after the compile warm-up)."""
        self.split_embed = False
        for touched in self.touched_rows.values():
            touched[:] = False
        for param, cfg in self.settings.items():
            if cfg.optim == "normuon":
                for key in ("momentum_buffer", "second_moment", "mantissa"):
                    self.state[param][key].zero_()

    def state_dict(self) -> dict:
        """A copy of this rank's state, keyed by label (sharded state is this rank's slice)."""
        states = {self.settings[p].label: {k: (v.clone() if isinstance(v, Tensor) else v) for k, v in s.items()}
                  for p, s in self.state.items()}
        # rows a sparse table's pending (even-step) gradient holds: the next exchange sends them
        touched = {self.settings[p].label: torch.from_numpy(np.flatnonzero(mask)) for p, mask in self.touched_rows.items()}
        return dict(states=states, split_embed=self.split_embed, touched_rows=touched)

    def load_state_dict(self, saved: dict) -> None:
        for label, saved_state in saved["states"].items():
            state = self.state[self.by_label[label]]
            for key, value in saved_state.items():
                if isinstance(value, Tensor):
                    state[key].copy_(value)
                else:
                    state[key] = value
        self.split_embed = saved.get("split_embed", False)
        for param, mask in self.touched_rows.items():
            mask[:] = False
            mask[saved.get("touched_rows", {}).get(self.settings[param].label, torch.zeros(0, dtype=torch.long)).numpy()] = True


# ---- Triton: symmetric Gram products for Polar Express -------------------------------------------
# X X^T and A A^T are symmetric, so only blocks touching the lower triangle are computed and each is
# written twice (as itself and mirrored), halving the matmul work of the two products per step.

@triton.jit
def _symmetric_gram_kernel(
    a_ptr, out_ptr, M, K,
    stride_ab, stride_am, stride_ak,
    stride_ob, stride_om, stride_on,
    alpha, beta,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr,
    GROUP_M: tl.constexpr, ADD_SELF: tl.constexpr,
):
    """out[b] = A[b] A[b]^T; with ADD_SELF (A square, symmetric): alpha * A A^T + beta * A."""
    pid = tl.program_id(0)
    blocks_m = tl.cdiv(M, BLOCK_M)
    blocks_n = tl.cdiv(M, BLOCK_N)
    blocks_per_matrix = blocks_m * blocks_n
    matrix = pid // blocks_per_matrix
    tile = pid % blocks_per_matrix
    # grouped ordering keeps the rows of A reused by neighbouring programs in L2
    block_m, block_n = tl.swizzle2d(tile // blocks_n, tile % blocks_n, blocks_m, blocks_n, GROUP_M)
    row0 = block_m * BLOCK_M
    col0 = block_n * BLOCK_N
    if row0 + BLOCK_M <= col0:  # entirely above the diagonal: a mirrored store fills it
        return

    a_ptr += matrix.to(tl.int64) * stride_ab
    out_ptr += matrix.to(tl.int64) * stride_ob
    rows = row0 + tl.arange(0, BLOCK_M)
    cols = col0 + tl.arange(0, BLOCK_N)
    ks = tl.arange(0, BLOCK_K)
    # out-of-range rows/cols wrap around instead of being masked; their results are never stored
    # both operands are read as row blocks of A (consecutive k are adjacent in memory, so the loads
    # coalesce); the right one is transposed in registers (record #69)
    lhs_ptrs = a_ptr + (rows % M)[:, None] * stride_am + ks[None, :] * stride_ak   # A[rows, k]
    rhs_ptrs = a_ptr + (cols % M)[:, None] * stride_am + ks[None, :] * stride_ak   # A[cols, k]
    acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    for k0 in range(0, K, BLOCK_K):
        k_left = K - k0
        lhs = tl.load(lhs_ptrs, mask=ks[None, :] < k_left, other=0.0)
        rhs = tl.load(rhs_ptrs, mask=ks[None, :] < k_left, other=0.0)
        acc = tl.dot(lhs, tl.trans(rhs), acc)
        lhs_ptrs += BLOCK_K * stride_ak
        rhs_ptrs += BLOCK_K * stride_ak

    in_bounds = (rows[:, None] < M) & (cols[None, :] < M)
    if ADD_SELF:
        # floats may arrive as fp64 when Inductor launches the kernel; keep the epilogue in fp32
        a_block = tl.load(a_ptr + rows[:, None] * stride_am + cols[None, :] * stride_ak,
                          mask=in_bounds, other=0.0)
        acc = acc * tl.cast(alpha, tl.float32) + a_block.to(tl.float32) * tl.cast(beta, tl.float32)
    result = acc.to(out_ptr.dtype.element_ty)
    tl.store(out_ptr + rows[:, None] * stride_om + cols[None, :] * stride_on, result, mask=in_bounds)
    tl.store(out_ptr + cols[:, None] * stride_om + rows[None, :] * stride_on, tl.trans(result),
             mask=tl.trans(in_bounds))


def _launch_symmetric_gram(A: Tensor, out: Tensor, alpha: float, beta: float, add_self: bool,
                           blocks=None) -> Tensor:
    if A.ndim > 3:  # fold leading batch dims
        _launch_symmetric_gram(A.flatten(0, -3), out.flatten(0, -3), alpha, beta, add_self, blocks)
        return out
    M, K = A.shape[-2:]
    assert out.shape[-2:] == (M, M), f"output must be ({M}, {M}), got {tuple(out.shape)}"
    assert not add_self or M == K, "ba_plus_caa needs a square (symmetric) A"
    batch = A.size(0) if A.ndim == 3 else 1
    # block shapes and 8 warps from H100 tuning of the record (#69): K=768 (attention, and every
    # A A^T) vs K=3072
    if blocks is None:
        blocks = (128, 128, 64) if (add_self or K == 768) else (64, 128, 128)
    block_m, block_n, block_k = blocks
    grid = (batch * triton.cdiv(M, block_m) * triton.cdiv(M, block_n),)
    _symmetric_gram_kernel[grid](
        A, out, M, K,
        A.stride(0) if A.ndim == 3 else 0, A.stride(-2), A.stride(-1),
        out.stride(0) if out.ndim == 3 else 0, out.stride(-2), out.stride(-1),
        float(alpha), float(beta),
        BLOCK_M=block_m, BLOCK_N=block_n, BLOCK_K=block_k, GROUP_M=8, ADD_SELF=add_self,
        num_stages=4, num_warps=8,
    )
    return out


def _xxt_triton(A: Tensor, out: Tensor, blocks=None) -> Tensor:
    return _launch_symmetric_gram(A, out, 1.0, 0.0, add_self=False, blocks=blocks)


def _xtx_triton(A: Tensor, out: Tensor, blocks=None) -> Tensor:
    # rows of A^T are columns of A: the kernel reads them through the strides; upstream's tile
    # choice for a 768-wide output (#74)
    return _launch_symmetric_gram(A.mT, out, 1.0, 0.0, add_self=False,
                                  blocks=blocks or ((128, 128, 64) if A.size(-1) == 768 else None))


def _ba_plus_caa_triton(A: Tensor, alpha: float, beta: float, out: Tensor, blocks=None) -> Tensor:
    return _launch_symmetric_gram(A, out, alpha, beta, add_self=True, blocks=blocks)



# =============================================================================
# SECTION: data
# =============================================================================

BOS_ID = prepare_data.BOS_TOKEN
QUICK_INDEX_TOKENS = 6_000_000   # BOS positions found up front; the rest of a shard is scanned in a thread


def find_shards(pattern: str, what: str) -> list:
    files = sorted(glob.glob(pattern))
    if not files:
        raise SystemExit(f"error: no {what} shards match {pattern!r}; build them with `python3 prepare_data.py "
                         f"fineweb10B` (or `prepare_data.py text DIR --format fineweb`) or pass --{what}_files")
    return [Path(f) for f in files]


def open_shard(path: Path) -> np.ndarray:
    """Memory-mapped uint16 tokens of a FineWeb shard (header checked: magic, version, size)."""
    try:
        prepare_data.check_fineweb_file(path)
        return prepare_data.load_tokens(path)
    except (ValueError, OSError) as e:
        raise SystemExit(f"error: {e}")


def read_shard(path: Path) -> np.ndarray:
    """All tokens of one FineWeb shard, read into memory."""
    return np.array(open_shard(path))


def cu_seqlens_slots(tokens_per_rank: int) -> int:
    """Fixed length of the cu_seqlens vector (a fixed shape keeps the compiled graph reusable):
    MAX_DOCS_PER_MICRO_BATCH where it names this size, else room for documents of ~300 tokens on
    average, rounded up to a multiple of 128."""
    if tokens_per_rank in MAX_DOCS_PER_MICRO_BATCH:
        return MAX_DOCS_PER_MICRO_BATCH[tokens_per_rank]
    return max(128, -(-(tokens_per_rank // 300) // 128) * 128)


def pad_cu_seqlens(boundaries: np.ndarray, tokens_per_rank: int) -> np.ndarray:
    """[0, boundaries..., tokens_per_rank, tokens_per_rank, ...]: padding repeats the end, so the
    extra 'documents' are empty."""
    slots = cu_seqlens_slots(tokens_per_rank)
    if len(boundaries) + 1 > slots:
        raise SystemExit(f"error: a micro-batch of {tokens_per_rank} tokens holds {len(boundaries)} "
                         f"documents, more than the {slots - 1} the model is built for (cu_seqlens_slots, "
                         "MAX_DOCS_PER_MICRO_BATCH); join short documents when building the shards, or "
                         "raise that entry")
    cu = np.full(slots, tokens_per_rank, dtype=np.int32)
    cu[0] = 0
    cu[1:len(boundaries) + 1] = boundaries
    return cu


class BosIndexedShard:
    """One shard plus the positions of its BOS tokens, and a cursor: the next document to use."""

    def __init__(self, tokens: np.ndarray):
        self.tokens = tokens
        self.size = len(tokens)
        self.next_doc = 0
        # the first few million positions now, so the first batch does not wait for a full scan
        self._quick = np.flatnonzero(tokens[:QUICK_INDEX_TOKENS] == BOS_ID)
        self._full = None
        self._scanner = threading.Thread(target=self._scan, daemon=True)
        self._scanner.start()

    def _scan(self) -> None:
        self._full = np.flatnonzero(self.tokens == BOS_ID)

    def _bos_positions(self, doc: int) -> np.ndarray:
        """An index that is exact for documents doc and doc + 1: the quick one when it reaches that
        far (its last entry's successor is unknown), otherwise the full one."""
        if self._full is None and doc + 1 < len(self._quick):
            return self._quick
        self._scanner.join()
        return self._full

    def take(self, tokens_per_rank: int, max_seq_len: int, world_size: int):
        """Cut the next documents into world_size runs of tokens_per_rank + 1 tokens (inputs plus
        the one extra target), each piece starting at a BOS and at most max_seq_len long; the last
        piece of a run is cut to fit. Returns [(starts, ends)] per rank, or None when the shard
        runs out (its tail is dropped, as the reference does)."""
        doc = self.next_doc
        runs = []
        for _ in range(world_size):
            starts, ends, filled = [], [], 0
            while filled <= tokens_per_rank:
                bos = self._bos_positions(doc)
                if doc >= len(bos):
                    return None
                start = int(bos[doc])
                doc_end = int(bos[doc + 1]) if doc + 1 < len(bos) else self.size
                end = min(doc_end, start + max_seq_len, start + tokens_per_rank + 1 - filled)
                starts.append(start)
                ends.append(end)
                filled += end - start
                doc += 1
            runs.append((starts, ends))
        self.next_doc = doc
        return runs


class _Prefetch:
    """Reads (and BOS-indexes) the next shard in a background thread."""

    def __init__(self, path: Path):
        self.path, self.result, self.error = path, None, None
        self.thread = threading.Thread(target=self._run, daemon=True)
        self.thread.start()

    def _run(self):
        try:
            self.result = BosIndexedShard(read_shard(self.path))
        except BaseException as e:       # SystemExit from a bad shard must reach the main thread
            self.error = e

    def get(self) -> BosIndexedShard:
        self.thread.join()
        if self.error is not None:
            raise self.error
        return self.result


def bigram_rows_host(tokens: np.ndarray, table_size: int) -> np.ndarray:
    """bigram_hash on the host: the same rows from the same int32 arithmetic (token ids are below
    2^16, so the products fit in int32 and neither side wraps)."""
    t = tokens.astype(np.int32)
    reserved = np.int32(table_size - 1)
    prev = t[:-1].copy()
    prev[:1] = reserved                   # position 1's previous token: the reserved id (as recorded)
    rows = np.empty_like(t)
    rows[0] = reserved
    rows[1:] = np.bitwise_xor(np.int32(BIGRAM_HASH_A) * t[1:], np.int32(BIGRAM_HASH_B) * prev) % reserved
    return rows


class MicroBatch(NamedTuple):
    """One rank's micro-batch on the device; bigram_rows also stays on the host (bigram_rows_host)
    for the optimizer's sparse exchange. Both None when the loader was given no table size."""
    inputs: Tensor
    targets: Tensor
    cu_seqlens: Tensor
    bigram_rows: Tensor | None = None
    bigram_rows_host: np.ndarray | None = None


def _to_device(inputs: np.ndarray, targets: np.ndarray, cu: np.ndarray, device: torch.device,
               bigram_table_size: int | None = None) -> MicroBatch:
    """int32 inputs, int64 targets, int32 cu_seqlens (converted on the host; pinned for async
    copies), and with a table size the inputs' bigram rows, hashed here on the host (record #71:
    the GPU no longer waits for the hash)."""
    host = [torch.from_numpy(inputs.astype(np.int32)), torch.from_numpy(targets.astype(np.int64)),
            torch.from_numpy(cu)]
    rows = None
    if bigram_table_size is not None:
        rows = bigram_rows_host(inputs, bigram_table_size)
        host.append(torch.from_numpy(rows))
    if device.type == "cuda":
        host = [t.pin_memory().to(device, non_blocking=True) for t in host]
    return MicroBatch(*host, bigram_rows_host=rows)


class BosAlignedLoader:
    """Training batches as the record builds them: every micro-batch is a run of whole
    documents (each starting at BOS, cut at max_seq_len) for each rank, with cu_seqlens marking
    document starts. Rank r of W takes the r-th of W consecutive runs, so the tokens consumed per
    step do not depend on the world size. The next shard is loaded while this one is used."""

    def __init__(self, pattern: str, batch_size: int, max_seq_len: int, grad_accum_steps: int,
                 rank: int = 0, world_size: int = 1, device: torch.device = torch.device("cpu"),
                 bigram_table_size: int | None = None):
        self.pattern, self.max_seq_len, self.bigram_table_size = pattern, max_seq_len, bigram_table_size
        self.grad_accum_steps, self.rank, self.world_size, self.device = grad_accum_steps, rank, world_size, device
        self.batch_size = batch_size
        self._check(batch_size)
        self._open(shard_index=0, next_doc=0)

    def _open(self, shard_index: int, next_doc: int) -> None:
        paths = find_shards(self.pattern, "train")
        if shard_index >= len(paths):
            raise SystemExit(f"error: the checkpoint's loader is at training shard {shard_index + 1}, but only "
                             f"{len(paths)} shard(s) match {self.pattern!r}; resume with the same --train_files")
        self._files = iter(paths[shard_index + 1:])
        self.shards_used = shard_index + 1
        self.shard = BosIndexedShard(read_shard(paths[shard_index]))
        self.shard.next_doc = next_doc
        self._prefetch = self._start_next()

    def state_dict(self) -> dict:
        """Where the next batch starts: shard number, document in it, batch size (for a resume)."""
        return dict(shard_index=self.shards_used - 1, next_doc=self.shard.next_doc, batch_size=self.batch_size)

    def load_state_dict(self, state: dict) -> None:
        self._check(state["batch_size"])
        self.batch_size = state["batch_size"]
        self._open(state["shard_index"], state["next_doc"])

    def _check(self, batch_size: int) -> None:
        per_rank, rem = divmod(batch_size, self.grad_accum_steps * self.world_size)
        if rem or per_rank % 16:
            raise SystemExit(f"error: batch of {batch_size} tokens does not split into {self.grad_accum_steps} "
                             f"micro-batches x {self.world_size} ranks of a multiple of 16 tokens")

    def _start_next(self):
        path = next(self._files, None)
        return _Prefetch(path) if path is not None else None

    def next_batch(self, batch_size: int | None = None, max_seq_len: int | None = None):
        """This rank's next MicroBatch (inputs, targets, cu_seqlens, bigram rows); batch_size
        (tokens per optimizer step, all ranks) and max_seq_len (longest document piece) change
        them from now on, as at a stage change."""
        if batch_size is not None and batch_size != self.batch_size:
            self._check(batch_size)
            self.batch_size = batch_size
        if max_seq_len is not None:
            self.max_seq_len = max_seq_len
        tokens_per_rank = self.batch_size // (self.grad_accum_steps * self.world_size)
        runs = self.shard.take(tokens_per_rank, self.max_seq_len, self.world_size)
        while runs is None:
            if self._prefetch is None:
                raise SystemExit(f"error: training data ran out after {self.shards_used} shard(s) of "
                                 f"{self.pattern!r}; add shards or shorten the schedule")
            self.shard = self._prefetch.get()
            self.shards_used += 1
            self._prefetch = self._start_next()
            runs = self.shard.take(tokens_per_rank, self.max_seq_len, self.world_size)
        starts, ends = runs[self.rank]
        buf = np.concatenate([self.shard.tokens[s:e] for s, e in zip(starts, ends)])
        lengths = np.array(ends) - np.array(starts)
        lengths[-1] -= 1            # the run's extra token is only a target
        cu = pad_cu_seqlens(np.cumsum(lengths), tokens_per_rank)
        return _to_device(buf[:-1], buf[1:], cu, self.device, self.bigram_table_size)


class SequentialLoader:
    """Validation batches: contiguous token runs, not BOS-aligned (documents may start
    mid-way), each rank taking its slice of every global micro-batch; cu_seqlens marks the BOS
    tokens inside. A fixed token budget from the start of the files: comparable across runs."""

    def __init__(self, pattern: str, batch_size: int, grad_accum_steps: int, rank: int = 0,
                 world_size: int = 1, device: torch.device = torch.device("cpu")):
        self.pattern = pattern
        self.tokens_per_micro = batch_size // grad_accum_steps
        self.tokens_per_rank = self.tokens_per_micro // world_size
        if batch_size % (grad_accum_steps * world_size) or self.tokens_per_rank % 16:
            raise SystemExit(f"error: validation batch of {batch_size} tokens does not split into "
                             f"{grad_accum_steps} micro-batches x {world_size} ranks of a multiple of 16 tokens")
        self.rank, self.device = rank, device
        self._files = iter(find_shards(pattern, "val"))
        self.tokens = open_shard(next(self._files))   # memmap: only what is used is read
        self.pos = 0

    def next_batch(self):
        while self.pos + self.tokens_per_micro + 1 >= len(self.tokens):
            path = next(self._files, None)
            if path is None:
                raise SystemExit(f"error: validation data in {self.pattern!r} ran out; lower --val_tokens")
            self.tokens, self.pos = open_shard(path), 0
        start = self.pos + self.rank * self.tokens_per_rank
        buf = np.asarray(self.tokens[start:start + self.tokens_per_rank + 1])
        self.pos += self.tokens_per_micro
        inputs = buf[:-1]
        cu = pad_cu_seqlens(np.flatnonzero(inputs == BOS_ID), self.tokens_per_rank)
        return _to_device(inputs, buf[1:], cu, self.device)


def write_synthetic_corpus(folder: Path, seed: int = 0, train_tokens: int = 300_000,
                           val_tokens: int = 60_000) -> tuple:
    """FineWeb shards of made-up 'documents' (BOS + a noisy Markov chain over 1024 token ids,
    so the loss can fall) for --smoke when no data is given. Returns (train glob, val glob)."""
    rng = np.random.default_rng(seed)
    vocab = rng.choice(BOS_ID, size=1024, replace=False)
    successors = rng.integers(0, len(vocab), size=(len(vocab), 4))

    def documents(num_tokens):
        out, total = [], 0
        while total < num_tokens:
            length = int(rng.integers(20, 600))
            picks = rng.integers(0, 4, size=length)
            noise = rng.random(length) < 0.1
            state = int(rng.integers(len(vocab)))
            doc = np.empty(length, dtype=np.uint16)
            doc[0] = BOS_ID
            for i in range(1, length):
                state = int(rng.integers(len(vocab))) if noise[i] else int(successors[state, picks[i]])
                doc[i] = vocab[state]
            out.append(doc)
            total += length
        return np.concatenate(out)

    folder.mkdir(parents=True, exist_ok=True)
    half = train_tokens // 2
    for i in range(2):     # two shards, so the background loading of the next one is exercised
        prepare_data.write_fineweb_shard(folder / f"synthetic_train_{i:06d}.bin", documents(half))
    prepare_data.write_fineweb_shard(folder / "synthetic_val_000000.bin", documents(val_tokens))
    return str(folder / "synthetic_train_*.bin"), str(folder / "synthetic_val_*.bin")


# =============================================================================
# SECTION: schedule
# =============================================================================

@dataclass(frozen=True)
class TrainingStage:
    lr_mul: float
    batch_size: int                  # tokens per optimizer step, over all ranks and micro-batches
    window_blocks: tuple             # (short, long) attention windows in WINDOW_BLOCK-token blocks
    mtp_start: tuple                 # multi-token-prediction weights at the stage's first step ...
    mtp_end: tuple                   # ... and at its end (linear in between)
    duration: float | None = None    # fraction of the scheduled iterations; None = extension stage
    max_seq_len: int = 2048          # longest document piece in a training batch
    prefix_start: float = 0.0        # prefix-token loss weight at the stage's first step ...
    prefix_end: float = 0.0          # ... and at its end (record #88)


def reference_stages(batch_seq_len: int = 2048, stage_seqs=(8, 16, 24), max_seq_len: int = 2048) -> list:
    """STAGE_TABLE's stages with their batch sizes: stage i holds stage_seqs[i] sequences of
    batch_seq_len tokens per micro-batch (the extension keeps the last), MICRO_BATCHES_PER_STEP
    micro-batches per step whatever the world size; document pieces of at most the row's
    max_seq_len, capped by max_seq_len (--train_max_seq_len)."""
    tokens_per_seq_slot = batch_seq_len * MICRO_BATCHES_PER_STEP   # one more sequence per micro-batch
    return [TrainingStage(row["lr_mul"], stage_seqs[min(i, len(stage_seqs) - 1)] * tokens_per_seq_slot,
                          tuple(row["windows"]), tuple(row["mtp_start"]), tuple(row["mtp_end"]), row["duration"],
                          min(row["max_seq_len"], max_seq_len), row.get("prefix_start", 0.0),
                          row.get("prefix_end", 0.0))
            for i, row in enumerate(STAGE_TABLE)]


class TrainingSchedule:
    """Pure step -> setting functions of the record's schedule (no tensors, no model)."""

    def __init__(self, stages: list, scheduled_iterations: int, extension_iterations: int):
        self.stages = stages
        self.scheduled_iterations = scheduled_iterations
        self.total_steps = scheduled_iterations + extension_iterations
        self.cooldown_frac, self.lr_floor = COOLDOWN_FRAC, LR_FLOOR
        # validation at the very end uses a longer long-window than training ever saw
        self.final_window_blocks = FINAL_WINDOW_BLOCKS
        fractions = accumulate(stage.duration for stage in stages[:-1])
        ends = [0] + [round(f * scheduled_iterations) for f in fractions] + [self.total_steps]
        assert ends[-2] == scheduled_iterations, "stage durations must add up to 1"
        self.boundaries = list(pairwise(ends))          # [start, end) of every stage
        # embed and lm_head are untied at a stage start, moved to an odd step so Adam runs on it
        self.split_step = self.boundaries[SPLIT_EMBED_STAGE][0] | 1

    def lookup(self, step: int) -> tuple:
        """(stage, fraction of it done) at step; past the end: the last stage, fully done."""
        for stage, (start, end) in zip(self.stages, self.boundaries):
            if step < end:
                return stage, (step - start) / (end - start)
        return self.stages[-1], 1.0

    def lr_multiplier(self, step: int) -> float:
        """Stage lr_mul, blended linearly into lr_floor over the last cooldown_frac of the schedule."""
        stage, _ = self.lookup(step)
        cooldown_start = int(self.scheduled_iterations * (1 - self.cooldown_frac))
        if step < cooldown_start:
            return stage.lr_mul
        t = min(1.0, (step - cooldown_start) / (self.scheduled_iterations - cooldown_start))
        return stage.lr_mul * (1 - t) + self.lr_floor * t

    def mtp_weights(self, step: int) -> list:
        stage, t = self.lookup(step)
        return [a + (b - a) * t for a, b in zip(stage.mtp_start, stage.mtp_end)]

    def prefix_weight(self, step: int) -> float:
        stage, t = self.lookup(step)
        return stage.prefix_start + (stage.prefix_end - stage.prefix_start) * t

    def transition_steps(self) -> list:
        """First step of every stage after the first."""
        return [start for start, _ in self.boundaries[1:]]

    def warmup_steps(self) -> list:
        """Steps the untimed warm-up replays: the first three and each stage change +-1,
        so every shape (and the split step) is compiled before the clock starts."""
        around = {s + d for s in self.transition_steps() for d in (-1, 0, 1) if s + d >= 0}
        return sorted({0, 1, 2} | around)

    def stage_index(self, step: int) -> int:
        stage, _ = self.lookup(step)
        return self.stages.index(stage)


def training_schedule(args: Hyperparameters) -> TrainingSchedule:
    return TrainingSchedule(reference_stages(args.batch_seq_len, args.stage_seqs, args.train_max_seq_len),
                            args.num_scheduled_iterations, args.num_extension_iterations)


def muon_momentum(step: int, total_steps: int, warmup_steps: int = 300, cooldown_steps: int = 50) -> float:
    """NorMuon momentum: ramps low->high (MUON_MOMENTUM_RANGE) over warmup_steps, back to low over
    the last cooldown_steps."""
    low, high = MUON_MOMENTUM_RANGE
    cooldown_start = total_steps - cooldown_steps
    if step < warmup_steps:
        return low + (step / warmup_steps) * (high - low)
    if step > cooldown_start:
        return high - ((step - cooldown_start) / cooldown_steps) * (high - low)
    return high


def is_adam_step(step: int) -> bool:
    """Adam (embeddings, gates, scalars) only updates on odd steps; its grads add up over two."""
    return step % 2 == 1


def padded(values: list, width: int) -> list:
    return list(values) + [0.0] * (width - len(values))


class StageState:
    """What the model sees of the schedule at the current step: windows, MTP and prefix-token
    weights, batch size and longest document piece.

    Owns the side effects of a stage change: YaRN rescaling of the rotary tables when the long
    window grows, and the loader's new batch size and sequence length.
    """

    def __init__(self, schedule: TrainingSchedule, model: nn.Module, device: torch.device):
        self.schedule = schedule
        self.model = model
        # one tensor per step, made once: the forward pass gets a device tensor without a copy.
        # Zero-padded to the longest stage's length: a zero weight adds nothing to the loss or its
        # gradient, and a fixed shape means a stage change alters only the batch length.
        width = max(len(stage.mtp_start) for stage in schedule.stages)
        self._mtp = [torch.tensor(padded(schedule.mtp_weights(s), width), dtype=torch.float32, device=device)
                     for s in range(schedule.total_steps + 1)]
        self._prefix = [torch.tensor([schedule.prefix_weight(s)], dtype=torch.float32, device=device)
                        for s in range(schedule.total_steps + 1)]
        self.reset()

    def reset(self) -> None:
        first = self.schedule.stages[0]
        self.ws_short, self.ws_long = first.window_blocks
        self.batch_size, self.max_seq_len = first.batch_size, first.max_seq_len
        self.mtp_weights, self.prefix_weight = self._mtp[0], self._prefix[0]
        self.model.yarn.reset()
        self.model.yarn_paired_head.reset()

    def advance(self, step: int) -> None:
        stage, _ = self.schedule.lookup(step)
        new_short, new_long = stage.window_blocks
        if new_long != self.ws_long:
            old_tokens, new_tokens = self.ws_long * WINDOW_BLOCK, new_long * WINDOW_BLOCK
            self.model.yarn.apply(old_tokens, new_tokens)
            self.model.yarn_paired_head.apply(old_tokens, new_tokens)
        self.ws_short, self.ws_long = new_short, new_long
        self.batch_size, self.max_seq_len = stage.batch_size, stage.max_seq_len
        self.mtp_weights = self._mtp[min(step, len(self._mtp) - 1)]
        self.prefix_weight = self._prefix[min(step, len(self._prefix) - 1)]

    def use_final_window(self) -> None:
        """Final validation only: a longer long-window, rotary tables left as trained."""
        self.ws_long = self.schedule.final_window_blocks

    def forward_config(self):
        return ForwardScheduleConfig(mtp_weights=self.mtp_weights,
                                     ws_short=self.ws_short * WINDOW_BLOCK,
                                     ws_long=self.ws_long * WINDOW_BLOCK,
                                     max_seq_len=self.max_seq_len, prefix_weight=self.prefix_weight)


# =============================================================================
# SECTION: runtime
# Processes, devices, seeds and caches: what the loop and main need to know about where they run.
# =============================================================================

@dataclass
class DistEnv:
    """Who this process is. world_size 1 without torchrun runs with no process group."""
    rank: int = 0
    local_rank: int = 0
    world_size: int = 1
    device: torch.device = field(default_factory=lambda: torch.device("cpu"))
    backend: str | None = None       # "nccl", "gloo" or None (no process group)

    @property
    def master(self) -> bool:
        return self.rank == 0

    @property
    def grad_accum_steps(self) -> int:
        return grad_accum_steps_for(self.world_size)

    @property
    def distributed(self) -> bool:
        return self.backend is not None


def grad_accum_steps_for(world_size: int) -> int:
    """The record is defined for 8 GPUs; fewer GPUs accumulate the step's micro-batches."""
    if world_size not in SUPPORTED_WORLD_SIZES:
        raise SystemExit(f"error: world size {world_size} is not supported; run 1, 2, 4 or 8 "
                         f"processes (each step is {MICRO_BATCHES_PER_STEP} micro-batches split over the ranks)")
    return MICRO_BATCHES_PER_STEP // world_size


def init_distributed(device_kind: str) -> DistEnv:
    """Read torchrun's environment (or none: world size 1), pick the device, start the process group."""
    world_size = environment_int("WORLD_SIZE", 1)
    rank = environment_int("RANK", 0)
    local_rank = environment_int("LOCAL_RANK", 0)
    grad_accum_steps_for(world_size)   # fail early on 3, 5, 6, 7 ... processes
    if world_size > 1 and not ("RANK" in os.environ and "MASTER_ADDR" in os.environ):
        raise SystemExit(f"error: WORLD_SIZE={world_size} but RANK/MASTER_ADDR are not set: start several "
                         f"processes with torchrun --nproc_per_node {world_size} (or unset WORLD_SIZE)")
    if rank >= world_size or local_rank >= world_size:
        raise SystemExit(f"error: RANK={rank}, LOCAL_RANK={local_rank} but WORLD_SIZE={world_size} (one node: "
                         "0 <= LOCAL_RANK = RANK < WORLD_SIZE); start the processes with torchrun")
    if device_kind == "cuda":
        if not torch.cuda.is_available():
            raise SystemExit("error: --device cuda but no CUDA GPU is visible; use --device cpu")
        if local_rank >= torch.cuda.device_count():
            raise SystemExit(f"error: LOCAL_RANK {local_rank} but only {torch.cuda.device_count()} GPUs")
        # growable segments: the batch grows per stage, and fragmentation would otherwise cost memory.
        # Read when CUDA's allocator starts, i.e. at the first allocation below.
        for name in ("PYTORCH_ALLOC_CONF", "PYTORCH_CUDA_ALLOC_CONF"):
            os.environ.setdefault(name, "expandable_segments:True")
        device = torch.device("cuda", local_rank)
        torch.cuda.set_device(device)
        # start autograd's worker for this device before anything else runs (the record does this
        # to dodge a start-up bug seen on some systems)
        torch.empty(1, device=device, requires_grad=True).backward()
    else:
        device = torch.device("cpu")
    env = DistEnv(rank=rank, local_rank=local_rank, world_size=world_size, device=device)
    if world_size > 1:
        env.backend = "nccl" if device.type == "cuda" else "gloo"
        kwargs = dict(device_id=device) if device.type == "cuda" else {}
        dist.init_process_group(backend=env.backend, **kwargs)
        dist.barrier()
    # torch 2.13 renamed all_gather_into_tensor; the old name is what older torch (the GPU) has
    warnings.filterwarnings("ignore", message=".*all_gather_into_tensor.*")
    return env


def seed_everything(seed: int) -> None:
    """Same seed on every rank: parameters start identical (rank 0 also broadcasts them)."""
    torch.manual_seed(seed)
    np.random.seed(seed % 2**32)


def configure_compile_cache(cache_dir: str) -> None:
    """Make compiled graphs reusable across processes: a second run on the same machine, and the
    helper processes of a cold start (see CompileHelpers), load graphs instead of compiling.
    With cache_dir, Inductor's and Triton's on-disk caches live there (default: /tmp, ~/.triton).

    Must run before the first compile: the caches read these settings when first needed.
    """
    # AOTAutograd's cache skips tracing the joint forward+backward graph (~13 s per train graph
    # on a warm start), but by default it refuses graphs holding a custom autograd.Function,
    # and our fused MLP and loss kernels are two of them; their forward and backward are traced
    # into the graph, so the cache key covers their code.
    if hasattr(torch._functorch.config, "autograd_cache_allow_custom_autograd_functions"):
        torch._functorch.config.autograd_cache_allow_custom_autograd_functions = True
    # compile the backward graph together with the forward (instead of at the first backward),
    # so a process that only runs a forward (a compile helper) caches both
    if hasattr(torch._functorch.config, "force_non_lazy_backward_lowering"):
        torch._functorch.config.force_non_lazy_backward_lowering = True
    if not cache_dir:
        return
    root = Path(cache_dir).expanduser().resolve()
    (root / "inductor").mkdir(parents=True, exist_ok=True)
    (root / "triton").mkdir(parents=True, exist_ok=True)
    os.environ["TORCHINDUCTOR_CACHE_DIR"] = str(root / "inductor")
    os.environ["TRITON_CACHE_DIR"] = str(root / "triton")
    # FX-graph and AOTAutograd caches are what skip recompiling a graph; make sure they are on
    os.environ.setdefault("TORCHINDUCTOR_FX_GRAPH_CACHE", "1")
    os.environ.setdefault("TORCHINDUCTOR_AUTOGRAD_CACHE", "1")


def detect_gpu_type(requested: str, device: torch.device) -> str:
    """'auto' -> the card's family from its name (h100, h200, a100, other); cpu -> 'cpu'."""
    if device.type != "cuda":
        return "cpu"
    if requested != "auto":
        return requested
    name = torch.cuda.get_device_name(device).lower()
    for family in ("h100", "h200", "a100"):
        if family in name:
            return family
    return "other"


def use_fp8_for(gpu_type: str, device: torch.device) -> bool:
    """FP8 (lm_head, MLP up-projection) only where the card has FP8 tensor cores and the user did not
    name an older card."""
    if device.type != "cuda" or gpu_type == "a100":
        return False
    return fp8_supported(device)


# =============================================================================
# SECTION: loop
# =============================================================================

class RunLog:
    """Rank 0 writes every line to <log_dir>/<run_id>.txt and, unless quiet, to the console."""

    def __init__(self, env: DistEnv, log_dir: str, run_id: str):
        self.enabled = env.master
        self.path = Path(log_dir) / f"{run_id}.txt"
        if self.enabled:
            self.path.parent.mkdir(parents=True, exist_ok=True)

    def __call__(self, message: str, console: bool = True) -> None:
        if not self.enabled:
            return
        with open(self.path, "a") as f:
            print(message, file=f)
        if console:
            print(message, flush=True)


def write_summary_json(path: Path, summary: dict) -> None:
    """Atomic (temp file + rename): a run killed while writing never leaves half a summary."""
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(json.dumps(summary, indent=1) + "\n")
    os.replace(tmp, path)


def environment_report() -> str:
    import triton
    lines = [f"Python {sys.version}",
             f"torch {torch.__version__} (CUDA {torch.version.cuda}), triton {triton.__version__}, "
             f"numpy {np.__version__}, platform {platform.platform()}"]
    try:
        smi = subprocess.run(["nvidia-smi"], capture_output=True, text=True, timeout=30).stdout
    except (OSError, subprocess.TimeoutExpired):
        smi = "(nvidia-smi not available)"
    return "\n".join(lines) + "\n" + smi


def model_config_for(args: Hyperparameters, env: DistEnv, use_fp8: bool, backend: str):
    """The record's model (or the smoke model), sized for this world size and these batches."""
    val_len = args.val_batch_size // (env.grad_accum_steps * env.world_size)   # tokens per rank per val forward
    train_len = max(args.stage_seqs) * args.batch_seq_len                       # largest training micro-batch
    base = ModelConfig.smoke() if args.smoke else ModelConfig()
    return dataclasses.replace(base, use_fp8=use_fp8, attn_backend=backend, world_size=env.world_size,
                               train_max_seq_len=args.train_max_seq_len,
                               val_max_len=val_len, max_seq_len=max(val_len, train_len),
                               compile_mode="model" if args.compile else "none")


def ensure_smoke_data(args: Hyperparameters, env: DistEnv, log) -> None:
    """--smoke without data: rank 0 writes a small synthetic corpus under the log folder."""
    user_path = not args.train_files.endswith(Hyperparameters.train_files)
    if not args.smoke or user_path or glob.glob(args.train_files):
        return
    folder = Path(args.log_dir) / "smoke_data"
    if env.master:
        args.train_files, args.val_files = write_synthetic_corpus(folder, seed=args.seed)
    else:
        args.train_files, args.val_files = (str(folder / "synthetic_train_*.bin"),
                                            str(folder / "synthetic_val_*.bin"))
    if env.distributed:
        dist.barrier()
    log(f"smoke: no shards at the default path; using a synthetic corpus in {folder}")


def build_model(cfg, env: DistEnv) -> nn.Module:
    model = GPT(cfg).to(env.device)
    model.cast_to_bf16()          # banks, embeddings, gates in bf16 as the record trains them (CPU too)
    model.prefix_table.copy_(gpt2_prefix_token_table(model.vocab_size))   # record #88
    if env.distributed:
        for tensor in [*model.parameters(), model.bigram_signs]:
            dist.broadcast(tensor.detach(), 0)    # identical start on every rank
    if cfg.use_fp8:
        model.refresh_mlp_down_scales(bootstrap=True)   # record #89
    return model


def compile_model(model: nn.Module, enabled: bool):
    """GPT.compiled() compiles the whole forward (cfg.compile_mode); without --compile the
    eager model runs."""
    return model.compiled() if enabled else model


@dataclass
class TrainingRun:
    """What one run trains with (built by build_training_run)."""
    cfg: "ModelConfig"
    gpu_type: str
    raw_model: nn.Module
    model: Callable            # raw_model, or its compiled forward
    optimizer: "NorMuonAndAdam"
    schedule: "TrainingSchedule"
    stage: "StageState"


def build_training_run(args: Hyperparameters, env: DistEnv) -> TrainingRun:
    """Seed, pick card features and attention backend, build model, optimizer and schedule, as
    main does before its warm-up (benchmarks/speedrun_step_profile.py reuses it)."""
    seed_everything(args.seed)
    gpu_type = detect_gpu_type(args.gpu_type, env.device)
    backend = resolve_attention_backend(args.attn, env.device)
    cfg = model_config_for(args, env, use_fp8_for(gpu_type, env.device), backend)
    raw_model = build_model(cfg, env)
    model = compile_model(raw_model, args.compile)
    optimizer = NorMuonAndAdam(raw_model.named_parameters(), world_size=env.world_size, rank=env.rank,
                               compile=args.compile)
    schedule = training_schedule(args)
    return TrainingRun(cfg, gpu_type, raw_model, model, optimizer, schedule,
                       StageState(schedule, raw_model, env.device))


def compiled_graph_count() -> int:
    """Distinct graphs Dynamo has built in this process (logged: fewer graphs, faster start)."""
    from torch._dynamo.utils import counters
    return int(counters["stats"]["unique_graphs"])


# (label, Dynamo's timer names): where compile time goes, summed over every graph built so far
COMPILE_PHASES = (
    ("dynamo trace", ("bytecode_tracing",)),
    ("aot joint trace + partition", ("aot_trace_joint_graph", "min_cut_rematerialization_partition")),
    ("inductor lowering + codegen", ("GraphLowering.run", "GraphLowering.codegen")),
    ("kernel compile wait", ("async_compile.wait",)),
    ("inductor fwd total", ("compile_fx.<locals>.fw_compiler_base",)),
    ("inductor bwd total", ("compile_fx.<locals>.bw_compiler",)),
)


def compile_time_breakdown() -> str:
    """One log line: seconds per compile phase and per graph (slowest first), from Dynamo's timers."""
    from torch._dynamo.utils import compilation_time_metrics as timers, counters
    phases = ", ".join(f"{label} {sum(sum(timers.get(n, [])) for n in names):.1f}s"
                       for label, names in COMPILE_PHASES)
    per_graph = sorted(timers.get("compile_attempt_0", []), reverse=True)
    aot, inductor = counters["aot_autograd"], counters["inductor"]
    caches = (f"AOTAutograd cache hit {aot['autograd_cache_hit']} miss {aot['autograd_cache_miss']} "
              f"bypass {aot['autograd_cache_bypass']}, FX graph cache hit {inductor['fxgraph_cache_hit']} "
              f"miss {inductor['fxgraph_cache_miss']}")
    return (f"compile time: {phases}; {caches}; "
            f"per graph (s): {' '.join(f'{t:.1f}' for t in per_graph)}")


def optimizer_step(optimizer: NorMuonAndAdam, schedule: TrainingSchedule, step: int,
                   args: Hyperparameters, raw_model: nn.Module | None = None, warmup: bool = False) -> None:
    """One optimizer step; with raw_model (FP8 runs) also W_proj's FP8 scale for the coming
    forwards (record #89: current-weight scales in the warm-up and the first steps)."""
    momentum = muon_momentum(step, schedule.total_steps, args.muon_warmup_steps, args.muon_cooldown_steps)
    optimizer.set_schedule(schedule.lr_multiplier(step), momentum)
    optimizer.step(do_adam=is_adam_step(step))
    if step == schedule.split_step:
        optimizer.copy_lm_state_to_embed()
    if raw_model is not None and raw_model.cfg.use_fp8:
        raw_model.refresh_mlp_down_scales(bootstrap=warmup or step < MLP_DOWN_BOOTSTRAP_STEPS)


def training_loader(args: Hyperparameters, env: DistEnv, batch_size: int, raw_model: nn.Module) -> BosAlignedLoader:
    """This rank's training loader, hashing bigrams on the host for raw_model's table."""
    return BosAlignedLoader(args.train_files, batch_size, args.train_max_seq_len, env.grad_accum_steps,
                            env.rank, env.world_size, env.device, raw_model.cfg.bigram_vocab_size)


def train_step(model, loader: BosAlignedLoader, stage: StageState, env: DistEnv,
               optimizer: "NorMuonAndAdam | None" = None) -> Tensor:
    """Forward/backward over this rank's micro-batches. Returns the summed training loss per
    token, on the device (no sync). The optimizer learns which bigram rows the batches touched."""
    grad_scale = 1.0 / env.grad_accum_steps      # same gradient magnitude for every world size
    total = None
    for _ in range(env.grad_accum_steps):
        batch = loader.next_batch(stage.batch_size, stage.max_seq_len)
        if optimizer is not None and batch.bigram_rows_host is not None:
            optimizer.note_touched_rows("bigram_embed", batch.bigram_rows_host)
        loss = model(batch.inputs, batch.targets, batch.cu_seqlens, stage.forward_config(), batch.bigram_rows)
        (loss * grad_scale).backward()
        per_token = loss.detach() / batch.inputs.numel()
        total = per_token if total is None else total + per_token
    return total / env.grad_accum_steps


@torch.no_grad()
def evaluate(model, args: Hyperparameters, env: DistEnv, stage: StageState, val_steps: int | None = None) -> Tensor:
    """Mean validation loss over the fixed --val_tokens (or the first val_steps micro-batches),
    averaged over ranks."""
    model.eval()
    loader = SequentialLoader(args.val_files, args.val_batch_size, env.grad_accum_steps, env.rank,
                              env.world_size, env.device)
    if val_steps is None:
        val_steps = env.grad_accum_steps * args.val_tokens // args.val_batch_size
    total = torch.zeros((), dtype=torch.float32, device=env.device)
    for _ in range(val_steps):
        batch = loader.next_batch()
        total += model(batch.inputs, batch.targets, batch.cu_seqlens, stage.forward_config()).float()
    total /= val_steps
    if env.distributed:
        dist.all_reduce(total, op=dist.ReduceOp.AVG)
    model.train()
    return total


def last_step_of(args: Hyperparameters, schedule: TrainingSchedule) -> int:
    """Steps this run trains: the whole schedule, or fewer with --max_steps."""
    return min(args.max_steps, schedule.total_steps) if args.max_steps else schedule.total_steps


def warmup_plan(args: Hyperparameters, schedule: TrainingSchedule) -> tuple:
    """(steps to replay, steps that also run a validation forward, final-window validation?).

    From the record's warm-up steps (first steps, each stage change +-1) keep those that build
    something new: the first step of each stage (its batch shape, windows), the first Adam step
    while tied, the split step, and the first Adam step after it. A --max_steps run keeps only
    the stages it reaches, and validates (compiling eval) only if it validates at all.
    """
    last_step = last_step_of(args, schedule)
    steps, seen = [], set()
    for step in schedule.warmup_steps():
        if step >= last_step:
            continue
        adam = is_adam_step(step)
        tying = "tied" if step < schedule.split_step else ("split" if step == schedule.split_step else "untied")
        news = {("stage", schedule.stage_index(step))} | ({("adam", tying)} if adam else set())
        if news - seen:
            steps.append(step)
            seen |= news
    if not args.compile:
        steps = steps[:1]     # eager: nothing to compile; one step still exercises the reset
    reaches_end = last_step == schedule.total_steps
    validates = args.val_loss_every > 0 or reaches_end
    first_of_stage = {}
    for step in steps:
        first_of_stage.setdefault(schedule.stage_index(step), step)
    return steps, sorted(first_of_stage.values()) if validates else [], reaches_end


CHECKPOINT_FORMAT = "train_speedrun checkpoint v1"
# options a resumed run must share with the run that wrote the checkpoint: they fix the data
# stream, the model and the schedule (logging, compile and hardware options may change)
RESUME_MUST_MATCH = ("train_files", "val_files", "val_tokens", "val_batch_size", "train_max_seq_len",
                     "stage_seqs", "batch_seq_len", "num_scheduled_iterations", "num_extension_iterations",
                     "muon_warmup_steps", "muon_cooldown_steps", "val_loss_every", "seed", "smoke")


def checkpoint_folder(args: Hyperparameters) -> Path:
    return Path(args.log_dir) / args.run_id


def checkpoint_name(step: int, rank: int) -> str:
    return f"state_step{step:06d}" + (f"_rank{rank}" if rank else "") + ".pt"


def save_checkpoint(raw_model: nn.Module, optimizer: NorMuonAndAdam, args: Hyperparameters, env: DistEnv,
                    step: int, log: RunLog, progress: dict | None = None) -> None:
    """Everything a resume needs, one file per rank (rank 0's also holds the model), each written
    atomically (temp file + rename). progress (from train): the loader position, the Adam gradients
    still accumulating, the clock and the losses so far. Once every rank has written this step's
    file, each removes its older ones."""
    folder = checkpoint_folder(args)
    folder.mkdir(parents=True, exist_ok=True)
    name = checkpoint_name(step, env.rank)
    payload = dict(format=CHECKPOINT_FORMAT, step=step, args=dataclasses.asdict(args),
                   world_size=env.world_size, rank=env.rank, optimizer=optimizer.state_dict(),
                   progress=progress, rng=torch.get_rng_state())
    if env.master:
        payload["model"] = raw_model.state_dict()
    tmp = folder / (name + ".tmp")
    torch.save(payload, tmp)
    os.replace(tmp, folder / name)
    if env.distributed:
        dist.barrier()          # the set for this step is whole before anything older goes
    for old in folder.glob("state_step*.pt"):
        parsed = parse_checkpoint_name(old.name)
        if parsed and parsed[1] == env.rank and parsed[0] != step:
            old.unlink(missing_ok=True)
    log(f"checkpoint: {folder / name} (step {step}; continue with --init_from resume --run_id {args.run_id})")


def parse_checkpoint_name(name: str) -> tuple | None:
    """state_step000012_rank3.pt -> (12, 3); anything else -> None."""
    if not (name.startswith("state_step") and name.endswith(".pt")):
        return None
    stem = name[len("state_step"):-len(".pt")]
    step_text, _, rank_text = stem.partition("_rank")
    if not step_text.isdigit() or (rank_text and not rank_text.isdigit()):
        return None
    return int(step_text), int(rank_text or 0)


def find_resume_checkpoint(args: Hyperparameters, world_size: int) -> int:
    """The latest step with a checkpoint file for every rank, or a one-line error."""
    folder = checkpoint_folder(args)
    ranks_by_step: dict = {}
    for path in folder.glob("state_step*.pt") if folder.is_dir() else []:
        parsed = parse_checkpoint_name(path.name)
        if parsed:
            ranks_by_step.setdefault(parsed[0], set()).add(parsed[1])
    if not ranks_by_step:
        raise SystemExit(f"error: --init_from resume: no checkpoint in {folder}/ (a run writes one when SIGTERM "
                         "or SIGUSR1 stops it, or at its end with --save_checkpoint); check --log_dir and "
                         "--run_id, or start from scratch")
    whole = [step for step, ranks in ranks_by_step.items() if ranks == set(range(world_size))]
    if not whole:
        step = max(ranks_by_step)
        raise SystemExit(f"error: --init_from resume: the checkpoint in {folder}/ (step {step}) has files for "
                         f"ranks {sorted(ranks_by_step[step])}, this run has {world_size} rank(s); resume with the "
                         "world size that wrote it")
    return max(whole)


def load_checkpoint(args: Hyperparameters, env: DistEnv, step: int) -> tuple:
    """(this rank's payload, the model state) of the checkpoint at step, checked against this run."""
    def read(path: Path) -> dict:
        try:
            payload = torch.load(path, map_location="cpu", weights_only=False)
        except Exception as e:    # truncated, not a torch file, ...: one line, not a traceback
            raise SystemExit(f"error: checkpoint {path} cannot be read ({type(e).__name__}: "
                             f"{str(e).splitlines()[0] if str(e) else 'no detail'}); delete it to resume from an "
                             "older one or start from scratch") from None
        if not isinstance(payload, dict) or payload.get("format") != CHECKPOINT_FORMAT:
            raise SystemExit(f"error: {path} is not a resumable train_speedrun.py checkpoint (written by an older "
                             "version or another program); start from scratch")
        return payload
    folder = checkpoint_folder(args)
    mine = read(folder / checkpoint_name(step, env.rank))
    model_state = mine.get("model") if env.master else read(folder / checkpoint_name(step, 0)).get("model")
    if not isinstance(mine.get("progress"), dict):
        raise SystemExit(f"error: checkpoint {folder / checkpoint_name(step, env.rank)} holds no training progress "
                         "(loader position, losses): it cannot be resumed; start from scratch")
    if mine["world_size"] != env.world_size or mine["step"] != step or model_state is None:
        raise SystemExit(f"error: checkpoint {folder / checkpoint_name(step, env.rank)} does not match its name "
                         f"or this run (world size {mine['world_size']} vs {env.world_size}); start from scratch")
    current = dataclasses.asdict(args)
    for key in RESUME_MUST_MATCH:
        saved = mine["args"].get(key)
        saved = tuple(saved) if isinstance(saved, list) else saved
        now = tuple(current[key]) if isinstance(current[key], list) else current[key]
        if saved != now:
            raise SystemExit(f"error: --init_from resume: the checkpoint was written with --{key} {saved!r}, "
                             f"this run has {now!r}; resume with the same value")
    return mine, model_state


def read_resume_checkpoint(args: Hyperparameters, env: DistEnv) -> tuple:
    step = find_resume_checkpoint(args, env.world_size)
    if args.max_steps and args.max_steps <= step:
        raise SystemExit(f"error: --max_steps {args.max_steps} is not past the checkpoint's step {step}; raise it "
                         "or leave it out to run to the end of the schedule")
    return (step, *load_checkpoint(args, env, step))


def model_state_mismatch(model_state: dict, raw_model: nn.Module) -> str | None:
    """What differs between a checkpoint's model and this file's (names and shapes), or None."""
    mine = {name: tuple(t.shape) for name, t in raw_model.state_dict().items()}
    saved = {name: tuple(t.shape) for name, t in model_state.items() if isinstance(t, Tensor)}
    problems = []
    if missing := sorted(mine.keys() - saved.keys()):
        problems.append(f"missing {', '.join(missing)}")
    if extra := sorted(saved.keys() - mine.keys()):
        problems.append(f"not in this model {', '.join(extra)}")
    problems += [f"{name} {saved[name]} here {mine[name]}" for name in sorted(mine.keys() & saved.keys())
                 if saved[name] != mine[name]]
    return "; ".join(problems) or None


def restore_checkpoint(payload: dict, model_state: dict, raw_model: nn.Module, optimizer: NorMuonAndAdam) -> None:
    """Model, optimizer and RNG back to the checkpoint (in place: compiled graphs keep their tensors)."""
    if mismatch := model_state_mismatch(model_state, raw_model):
        raise SystemExit(f"error: the checkpoint holds another model than this train_speedrun.py builds ({mismatch}): "
                         "it was written by another version (a record that changed the parameters?); resume with "
                         "the file that wrote it, or start from scratch")
    raw_model.load_state_dict(model_state)
    optimizer.load_state_dict(payload["optimizer"])
    torch.set_rng_state(payload["rng"])


class StopFlag:
    """Set by SIGTERM or SIGUSR1 (Slurm's time-limit warning, which run.sbatch passes on to the
    workers) or SIGINT (Ctrl-C): the loop ends after the current step instead of the process dying
    mid-step. Before training starts (data, compile, warm-up: minutes on a cold cache) there is
    nothing to keep, so `exit_before_training` ends the process at once instead of after the
    warm-up. A second Ctrl-C during training exits without waiting for the step (status 130)."""

    SIGNALS = (signal.SIGTERM, signal.SIGUSR1, signal.SIGINT)
    SIGNAL_NAMES = tuple(sig.name for sig in SIGNALS)

    def __init__(self, exit_before_training: Callable[[str], None] | None = None):
        self.requested = False
        self.signal_name = "SIGTERM"     # what the log reports; ranks that got no signal say this too
        self.training = False            # set by main once the warm-up is over
        self.exit_before_training = exit_before_training

    def install(self):
        """Returns the handlers it replaced (None off the main thread, where signals cannot be set)."""
        if threading.current_thread() is not threading.main_thread():
            return None
        return {sig: signal.signal(sig, self._handle) for sig in self.SIGNALS}

    def uninstall(self, previous) -> None:
        for sig, handler in (previous or {}).items():
            signal.signal(sig, handler)

    def _handle(self, signum, frame):
        name = signal.Signals(signum).name
        if not self.training and self.exit_before_training is not None:
            self.exit_before_training(name)
        if self.requested and name == "SIGINT":
            print("second Ctrl-C: exiting without waiting for the step", flush=True)
            os._exit(130)
        self.requested = True
        self.signal_name = name

    def agreed(self, step: int, env: DistEnv) -> bool:
        """Whether to stop before this step. Ranks must stop at the same step (or the others hang
        in the next collective), so with several ranks the flags are OR-ed every
        STOP_CHECK_EVERY steps: one small all-reduce, not a host sync per step."""
        if not env.distributed:
            return self.requested
        if step % STOP_CHECK_EVERY:
            return False
        flag = torch.tensor([float(self.requested)], device=env.device)
        dist.all_reduce(flag, op=dist.ReduceOp.MAX)
        return bool(flag.item())


STOP_CHECK_EVERY = 10


def sync(env: DistEnv) -> None:
    if env.device.type == "cuda":
        torch.cuda.synchronize()


def pending_adam_grads(optimizer: NorMuonAndAdam) -> dict:
    """Adam's gradients of an even step wait for the next (odd) step: a checkpoint keeps them."""
    return {cfg.label: param.grad.detach().clone() for param, cfg in optimizer.settings.items()
            if cfg.optim == "adam" and param.grad is not None}


def train(model, raw_model: nn.Module, optimizer: NorMuonAndAdam, schedule: TrainingSchedule,
          stage: StageState, args: Hyperparameters, env: DistEnv, log: RunLog, stop: StopFlag,
          resume: dict | None = None) -> dict:
    """The timed run. The clock stops during validation, as the record's does.
    resume: a checkpoint's progress (restore_checkpoint has set model and optimizer): the run
    continues at its step with the same loader position, losses and clock."""
    total_steps = schedule.total_steps
    last_step = last_step_of(args, schedule)
    loader = training_loader(args, env, stage.batch_size, raw_model)
    progress = resume or dict(step=0, training_ms=0.0, stage_ms=[0.0] * len(schedule.stages),
                              stage_steps=[0] * len(schedule.stages), val_losses=[], train_losses=[],
                              train_loss_sum=None, train_loss_n=0)
    first_step = progress["step"]
    stage_ms, stage_steps = list(progress["stage_ms"]), list(progress["stage_steps"])
    val_losses, train_losses = [tuple(v) for v in progress["val_losses"]], [tuple(v) for v in progress["train_losses"]]
    train_loss_sum, train_loss_n = progress["train_loss_sum"], progress["train_loss_n"]
    training_ms = progress["training_ms"]
    if resume:
        for step in range(first_step):      # windows, YaRN tables, MTP weights, batch size as they were
            stage.advance(step)
        loader.load_state_dict(resume["loader"])
        for label, grad in resume["adam_grads"].items():
            optimizer.by_label[label].grad = grad.to(env.device)
        if train_loss_sum is not None:
            train_loss_sum = train_loss_sum.to(env.device)
    stopped_by = None
    sync(env)
    t0 = time.perf_counter()
    step_start_ms = training_ms
    step = first_step
    for step in range(first_step, last_step + 1):
        final = step == total_steps
        stage.advance(step)
        resumed_here = resume is not None and step == first_step   # its validation is in the log already
        if (final or (args.val_loss_every and step % args.val_loss_every == 0)) and not resumed_here:
            if final:
                stage.use_final_window()
            sync(env)
            training_ms += 1000 * (time.perf_counter() - t0)
            val_loss = evaluate(model, args, env, stage).item()
            train_part = ""
            if train_loss_n:
                train_loss = (train_loss_sum / train_loss_n).item()
                train_losses.append((step, train_loss))
                train_part = f" train_loss_per_token:{train_loss:.4f}"
                train_loss_sum, train_loss_n = None, 0
            val_losses.append((step, val_loss))
            log(f"step:{step}/{total_steps} val_loss:{val_loss:.4f}{train_part} "
                f"train_time:{training_ms:.0f}ms step_avg:{training_ms / max(step, 1):.2f}ms")
            sync(env)
            t0 = time.perf_counter()
            step_start_ms = training_ms
        if final:
            break
        if step == last_step:
            stopped_by = "max_steps"
            break
        if stop.agreed(step, env):
            stopped_by = stop.signal_name
            break
        loss = train_step(model, loader, stage, env, optimizer)
        optimizer_step(optimizer, schedule, step, args, raw_model)
        train_loss_sum = loss if train_loss_sum is None else train_loss_sum + loss
        train_loss_n += 1
        now_ms = training_ms + 1000 * (time.perf_counter() - t0)
        index = schedule.stage_index(step)
        stage_ms[index] += now_ms - step_start_ms
        stage_steps[index] += 1
        step_start_ms = now_ms
        log(f"step:{step + 1}/{total_steps} train_time:{now_ms:.0f}ms step_avg:{now_ms / (step + 1):.2f}ms")
    sync(env)
    steps_done = sum(stage_steps)
    if stopped_by is not None:
        training_ms += 1000 * (time.perf_counter() - t0)
        train_part = ""
        if train_loss_n:
            partial = (train_loss_sum / train_loss_n).item()
            train_part = f"; train_loss_per_token over the last {train_loss_n} steps {partial:.4f}"
        log(f"stopped by {stopped_by} after {step} steps (final validation skipped){train_part}")
    for i, (ms, n) in enumerate(zip(stage_ms, stage_steps)):
        if n:
            name = f"stage {i + 1}" if i < len(schedule.stages) - 1 else "extension"
            log(f"{name}: {n} steps, step_avg {ms / n:.2f}ms")
    # a signal stop always leaves a checkpoint (that is what a requeued job resumes from)
    if args.save_checkpoint or stopped_by in StopFlag.SIGNAL_NAMES:
        at_stop = dict(step=step, training_ms=training_ms, stage_ms=stage_ms, stage_steps=stage_steps,
                       val_losses=val_losses, train_losses=train_losses,
                       train_loss_sum=None if train_loss_sum is None else train_loss_sum.detach().cpu(),
                       train_loss_n=train_loss_n, loader=loader.state_dict(),
                       adam_grads={k: v.cpu() for k, v in pending_adam_grads(optimizer).items()})
        save_checkpoint(raw_model, optimizer, args, env, step, log, at_stop)
    return dict(steps=steps_done, train_time_ms=training_ms, step_avg_ms=training_ms / max(steps_done, 1),
                stage_step_avg_ms=[ms / n if n else None for ms, n in zip(stage_ms, stage_steps)],
                val_losses=val_losses, train_losses=train_losses, stopped_by=stopped_by,
                final_val_loss=val_losses[-1][1] if val_losses and val_losses[-1][0] == total_steps else None)


# =============================================================================
# SECTION: warm-up
# Compiling every graph before the clock starts, and on one GPU in parallel helper processes.
# =============================================================================

# ---- cold start: compile the later stages in helper processes ----------------------------------
# Every (stage batch shape, train/eval) pair is its own graph, ~1 minute of compile each on an
# H100, and one process compiles them one after another. With one GPU, helper processes compile
# the later stages' and the validation graphs while this process compiles stage 1. They share
# the on-disk caches (configure_compile_cache), so the warm-up then loads those graphs in seconds.

COMPILE_JOB_ENV = "SPEEDRUN_COMPILE_JOB"     # in a helper's environment: "train:STEP" or "eval:STEP"
HELPER_MEMORY_MARGIN = 1 << 30               # bytes a helper may allocate beyond its model


def helper_compile_jobs(args: Hyperparameters, schedule: TrainingSchedule) -> list:
    """(kind, step) for each graph the warm-up would compile after stage 1's training graph:
    ("train", first step of each later stage with a new batch size) and ("eval", step) once."""
    steps, eval_steps, final_window = warmup_plan(args, schedule)
    if not steps:
        return []
    jobs, batch_sizes = [], {schedule.lookup(steps[0])[0].batch_size}
    for step in steps:
        batch_size = schedule.lookup(step)[0].batch_size
        if batch_size not in batch_sizes:
            jobs.append(("train", step))
            batch_sizes.add(batch_size)
    if eval_steps or final_window:
        jobs.append(("eval", eval_steps[0] if eval_steps else schedule.total_steps))
    return jobs


def use_compile_helpers(args: Hyperparameters, env: DistEnv) -> bool:
    # several ranks already compile side by side, one per GPU; helpers are for the one-GPU case
    return args.parallel_compile and args.compile and env.world_size == 1


def run_compile_helper(args: Hyperparameters, job: str) -> None:
    """A helper process: build the same model, compile the graph of one (kind, step), exit.

    The forward that follows the compile is not wanted (several helpers running full forwards at
    once would not fit in GPU memory): GPU memory is capped at what the model holds plus
    HELPER_MEMORY_MARGIN, so the forward stops at an early activation with an out-of-memory
    error after the graph was compiled and cached. The backward graph is compiled and cached
    together with the forward (configure_compile_cache)."""
    kind, step = job.split(":")
    step = int(step)
    env = init_distributed(args.device)
    run = build_training_run(args, env)
    # the stage changes the warm-up makes before this step, in its order: YaRN rescales the rotary
    # tables at each, so the tables (and a backend's float softmax scale) match the main process
    for earlier in [s for s in warmup_plan(args, run.schedule)[0] if s < step] + [step]:
        run.stage.advance(earlier)
    if env.device.type == "cuda":
        total = torch.cuda.get_device_properties(env.device).total_memory
        cap = torch.cuda.memory_reserved(env.device) + HELPER_MEMORY_MARGIN
        torch.cuda.set_per_process_memory_fraction(min(1.0, cap / total), env.device)
    started = time.perf_counter()
    outcome = "ran to the end"
    try:
        if kind == "eval":
            if step >= run.schedule.total_steps:
                run.stage.use_final_window()
            evaluate(run.model, args, env, run.stage, val_steps=1)
        else:
            batch = training_loader(args, env, run.stage.batch_size, run.raw_model).next_batch(
                run.stage.batch_size, run.stage.max_seq_len)
            run.model(batch.inputs, batch.targets, batch.cu_seqlens, run.stage.forward_config(), batch.bigram_rows)
    except torch.OutOfMemoryError:
        outcome = "forward stopped at the helper's memory cap, as intended"
    print(f"compile helper {job}: compiled in {time.perf_counter() - started:.1f}s "
          f"({compiled_graph_count()} graphs); {outcome}", flush=True)


class CompileHelpers:
    """The running helper processes of a cold start, one per (kind, step) job; wait() blocks
    until the job's graph is in the cache (or its helper failed: the caller then compiles it)."""

    def __init__(self, jobs: list, argv: list, args: Hyperparameters, log: Callable):
        self.log = log
        self.running = {}
        # this run's command line, with the data it resolved (--smoke may have made a corpus)
        argv = [*argv, "--train_files", args.train_files, "--val_files", args.val_files]
        for kind, step in jobs:
            output = Path(args.log_dir) / f"{args.run_id}.compile_{kind}_{step}.txt"
            output.parent.mkdir(parents=True, exist_ok=True)
            with open(output, "w") as out:
                proc = subprocess.Popen([sys.executable, str(Path(__file__).resolve()), *argv],
                                        env={**os.environ, COMPILE_JOB_ENV: f"{kind}:{step}"},
                                        stdout=out, stderr=subprocess.STDOUT)
            self.running[(kind, step)] = (proc, output)
        if jobs:
            log(f"compile helpers: {len(jobs)} processes compile {', '.join(f'{k} {s}' for k, s in jobs)} "
                f"(output in {Path(args.log_dir) / args.run_id}.compile_*.txt)")

    def wait(self, kind: str, step: int | None = None) -> None:
        """Wait for the helper of (kind, step); step None: any helper of that kind."""
        for key in [k for k in self.running if k[0] == kind and (step is None or k[1] == step)]:
            proc, output = self.running.pop(key)
            t0 = time.perf_counter()
            code = proc.wait()
            lines = output.read_text(errors="replace").strip().splitlines() or ["(no output)"]
            waited = f"waited {time.perf_counter() - t0:.1f}s"
            if code == 0:
                self.log(f"{lines[-1]} [{waited}]")
            else:
                self.log(f"warning: compile helper {key[0]}:{key[1]} failed (exit {code}): {lines[-1]} "
                         f"[{waited}; full output in {output}]; this process compiles that graph itself")

    def close(self) -> None:
        """Stop helpers still running (the run ended early, e.g. a SIGTERM during the warm-up)."""
        for proc, _ in self.running.values():
            proc.terminate()
        for proc, _ in self.running.values():
            proc.wait()
        self.running.clear()


class NoCompileHelpers:
    def wait(self, kind: str, step: int | None = None) -> None:
        pass

    def close(self) -> None:
        pass


def warm_up(model, raw_model: nn.Module, optimizer: NorMuonAndAdam, schedule: TrainingSchedule,
            stage: StageState, args: Hyperparameters, env: DistEnv, log: RunLog,
            helpers=None) -> None:
    """Untimed: run the schedule's warm-up steps (first steps, every stage change +-1, so every
    train and eval shape is compiled), one final-window validation forward, then put model,
    optimizer and schedule back to their initial state so the timed run starts fresh.
    helpers (CompileHelpers): graphs compiled elsewhere; each is waited for before first use."""
    helpers = helpers or NoCompileHelpers()
    initial_model = copy.deepcopy(raw_model.state_dict())
    initial_optimizer = optimizer.state_dict()
    loader = training_loader(args, env, stage.batch_size, raw_model)
    steps, eval_steps, final_window = warmup_plan(args, schedule)
    log(f"warm-up: replaying steps {steps} (validation forward at {eval_steps}"
        f"{' and with the final window' if final_window else ''}) to compile every shape this run uses")
    for step in steps:
        t0 = time.perf_counter()
        stage.advance(step)
        helpers.wait("train", step)
        train_step(model, loader, stage, env, optimizer)
        optimizer_step(optimizer, schedule, step, args, raw_model, warmup=True)
        if step in eval_steps:     # after the step: stage 1 compiles here while a helper does eval
            helpers.wait("eval")
            evaluate(model, args, env, stage, val_steps=1)
        if env.device.type == "cuda":
            torch.cuda.synchronize()
        log(f"warm-up step {step} (stage {schedule.stage_index(step) + 1}): "
            f"{time.perf_counter() - t0:.1f}s, graphs so far {compiled_graph_count()}")
    if final_window:
        stage.advance(schedule.total_steps)
        stage.use_final_window()
        helpers.wait("eval")
        evaluate(model, args, env, stage, val_steps=1)
    del loader
    model.zero_grad(set_to_none=True)
    raw_model.load_state_dict(initial_model)
    optimizer.load_state_dict(initial_optimizer)
    optimizer.reset()
    stage.reset()


# =============================================================================
# SECTION: main
# The command line (generated from Hyperparameters), the checks before anything starts, main().
# =============================================================================

# True/False options that are on by default get a --no-NAME form; the others are plain switches
TOGGLED_OPTIONS = ("compile", "parallel_compile")


def build_arg_parser(prog: str = "train_speedrun.py", description: str | None = None) -> argparse.ArgumentParser:
    """One option per Hyperparameters field; an option not given stays None (parse_args then
    keeps the default, or the --smoke / --device cpu one). Tools that take the trainer's options
    pass their own prog and description."""
    p = prepare_data.OneLineErrorParser(   # usage errors: one `error: ...` line
        prog=prog, description=description or "modded-nanogpt record #84, our implementation (see README: speedrun)")
    for f in dataclasses.fields(Hyperparameters):
        meta = f.metadata
        if not meta.get("cli", True):
            continue
        help_text = meta["help"] + (f" (default {f.default})" if meta["show_default"] else "")
        name = "--" + f.name
        if f.type is bool or f.type == "bool":
            action = argparse.BooleanOptionalAction if f.name in TOGGLED_OPTIONS else "store_true"
            p.add_argument(name, action=action, default=None, help=help_text)
        elif meta["choices"]:
            p.add_argument(name, choices=meta["choices"], help=help_text)
        else:
            kind = int if f.type in (int, "int") else str
            metavar = "DIR" if f.name.endswith(("_dir", "_cache")) else None
            p.add_argument(name, type=kind, metavar=metavar, help=help_text)
    return p


def parse_args(argv=None, parser: argparse.ArgumentParser | None = None) -> Hyperparameters:
    """Command line -> validated Hyperparameters. Bad values exit with a one-line error."""
    given = {k: v for k, v in vars((parser or build_arg_parser()).parse_args(argv)).items() if v is not None}
    values = dataclasses.asdict(Hyperparameters())
    if given.get("smoke"):
        values.update(SMOKE_OVERRIDES)
    if given.get("device") == "cpu" and "compile" not in given:
        values["compile"] = False   # Inductor on CPU costs minutes and buys nothing for tests
    values.update(given)
    if not values["train_files"] or not values["val_files"]:
        raise SystemExit("error: --train_files and --val_files must be non-empty globs")
    if "train_files" not in given and "DATA_PATH" in os.environ:
        values["train_files"] = os.path.join(os.environ["DATA_PATH"], values["train_files"])
    if "val_files" not in given and "DATA_PATH" in os.environ:
        values["val_files"] = os.path.join(os.environ["DATA_PATH"], values["val_files"])
    if given.get("max_steps") == 0:
        raise SystemExit("error: --max_steps 0 would train no step; give N >= 1, or leave it out to run "
                         "the whole schedule")
    if values["device"] == "cpu":   # options that only act on a GPU: refused rather than ignored
        for option in ("gpu_type", "attn"):
            if given.get(option, "auto") != "auto":
                raise SystemExit(f"error: --{option} {given[option]} needs a CUDA GPU; with --device cpu "
                                 f"leave it out ({'attention runs sdpa' if option == 'attn' else 'no FP8, no MFU'})")
    if values["init_from"] == "resume" and "run_id" not in given:
        raise SystemExit("error: --init_from resume needs the --run_id of the run to continue (its checkpoints "
                         "are in --log_dir/RUN_ID/)")
    args = Hyperparameters(**values)
    if not args.run_id:
        args.run_id = str(uuid.uuid4())
    validate_args(args)
    return args


def validate_args(args: Hyperparameters) -> None:
    def fail(msg):
        raise SystemExit(f"error: {msg}")
    if args.num_scheduled_iterations < 3:
        fail(f"--num_scheduled_iterations {args.num_scheduled_iterations} is too small: "
             "the schedule has 3 stages, give at least 3 steps")
    if args.num_extension_iterations < 0:
        fail("--num_extension_iterations must be >= 0")
    if args.muon_warmup_steps < 0 or args.muon_cooldown_steps < 0:
        fail("--muon_warmup_steps and --muon_cooldown_steps must be >= 0")
    if args.val_loss_every < 0 or args.max_steps < 0:
        fail(f"--val_loss_every and --max_steps must be >= 0 (got {args.val_loss_every}, {args.max_steps}); "
             "--val_loss_every 0 validates only at the end, --max_steps takes N >= 1 (leave it out for the "
             "whole schedule)")
    if args.train_max_seq_len <= 0 or args.train_max_seq_len % 16:
        fail(f"--train_max_seq_len {args.train_max_seq_len} must be a positive multiple of 16")
    if args.batch_seq_len <= 0 or args.batch_seq_len % 16:
        fail(f"batch_seq_len {args.batch_seq_len} must be a positive multiple of 16")
    # every rank's validation micro-batch (val_batch_size / 8 for all world sizes) must be a
    # multiple of FlexAttention's 128-token tile, the strictest backend (flex is the fallback)
    if args.val_batch_size <= 0 or args.val_batch_size % (8 * 128):
        fail(f"--val_batch_size {args.val_batch_size} must be a positive multiple of 1024 "
             "(8 micro-batches x 128-token attention tiles)")
    if not 0 <= args.seed <= 2**62:
        fail(f"--seed must lie in [0, 2**62] (got {args.seed})")
    if not args.run_id or "/" in args.run_id or args.run_id in (".", "..") or len(args.run_id) > 200:
        fail(f"--run_id {args.run_id!r} must be a plain file name (no '/', at most 200 characters), "
             "the log goes to --log_dir")
    for option, folder in (("--log_dir", args.log_dir), ("--compile_cache", args.compile_cache)):
        if folder:
            check_writable_folder(option, folder)
    if args.val_tokens <= 0 or args.val_tokens % args.val_batch_size:
        fail(f"--val_tokens {args.val_tokens} must be a positive multiple of "
             f"--val_batch_size {args.val_batch_size}")


def check_writable_folder(option: str, folder: str) -> None:
    """Before any work: the folder exists or can be made, and takes a file (one-line error if not).
    Creates nothing (the run makes it): parsing the arguments leaves no empty folder behind."""
    problem = prepare_data.output_folder_problem(folder)
    if problem:
        raise SystemExit(f"error: {option} {problem}; pass a folder you can write to")


def environment_int(name: str, default: int) -> int:
    """torchrun's WORLD_SIZE / RANK / LOCAL_RANK as a number, or a one-line error."""
    text = os.environ.get(name, str(default))
    if not text.isdigit():
        raise SystemExit(f"error: environment variable {name}={text!r} is not a whole number "
                         "(torchrun sets it; unset it for a single-process run)")
    return int(text)


def check_data(args: Hyperparameters, world_size: int) -> None:
    """Before the log, the model or a compile: every shard's header is whole (magic, version, size),
    and the validation shards hold the --val_tokens the final validation reads. One line if not."""
    train, val = find_shards(args.train_files, "train"), find_shards(args.val_files, "val")
    sizes = {path: len(open_shard(path)) for path in train + val}   # header checks; memmaps read nothing
    micro = args.val_batch_size // grad_accum_steps_for(world_size)  # tokens of one validation micro-batch
    needed = args.val_tokens // micro
    usable = sum(max(0, (sizes[path] - 2) // micro) for path in val)   # SequentialLoader drops shard tails
    if usable < needed:
        raise SystemExit(f"error: the validation shards {args.val_files!r} hold {usable * micro:,} usable tokens, "
                         f"fewer than --val_tokens {args.val_tokens:,}; lower --val_tokens or add validation data")


def smoke_data_pending(args: Hyperparameters) -> bool:
    """--smoke without shards at the default path: ensure_smoke_data writes a synthetic corpus."""
    return (args.smoke and args.train_files.endswith(Hyperparameters.train_files)
            and not glob.glob(args.train_files))


def cpu_warning(args: Hyperparameters) -> str | None:
    """A line for a CPU run that would take hours (the record's sizes) or compile for minutes."""
    if args.device != "cpu":
        return None
    if not args.smoke:
        return ("warning: --device cpu with the record's model and batches is sized for 8 GPUs: days on a CPU; "
                "the CPU run is `python3 train_speedrun.py --smoke --device cpu` (about 2 minutes)")
    if args.compile:
        return "warning: --compile on a CPU spends minutes compiling before the first step; the smoke run is eager"
    return None


def main(argv=None) -> dict | None:
    argv = sys.argv[1:] if argv is None else list(argv)
    args = parse_args(argv)
    configure_compile_cache(args.compile_cache)          # before anything compiles
    if os.environ.get(COMPILE_JOB_ENV):                  # a helper process of a cold start
        return run_compile_helper(args, os.environ[COMPILE_JOB_ENV])
    env = init_distributed(args.device)
    if not smoke_data_pending(args):
        check_data(args, env.world_size)                 # bad data fails before the log and the model
    if args.attn != "auto":
        resolve_attention_backend(args.attn, env.device)  # a backend asked for by name: its error comes now
    if env.master and cpu_warning(args):
        print(cpu_warning(args), file=sys.stderr, flush=True)
    checkpoint = None      # (step, this rank's payload, model state) when resuming
    if args.init_from == "resume":    # a missing or bad checkpoint fails before the log and the compile
        if smoke_data_pending(args):
            find_resume_checkpoint(args, env.world_size)  # read once the smoke corpus exists, below
        else:
            checkpoint = read_resume_checkpoint(args, env)
    log = RunLog(env, args.log_dir, args.run_id)
    helpers = NoCompileHelpers()

    def exit_before_training(signal_name: str) -> None:
        # os._exit: unwinding an exception through a running torch.compile can abort the process
        helpers.close()
        log(f"stopped by {signal_name} before the first training step: nothing to save")
        os._exit(0)

    stop = StopFlag(exit_before_training)
    previous_handler = stop.install()
    started = time.perf_counter()
    try:
        log(f"log: {log.path}")
        if args.init_from == "resume":    # the log already starts with the code and the environment
            log(f"resuming: args: {json.dumps(dataclasses.asdict(args))}", console=False)
        else:
            log(Path(__file__).read_text(), console=False)   # the exact code of this run
            log("=" * 100, console=False)
            log(environment_report(), console=False)
            log(f"args: {json.dumps(dataclasses.asdict(args))}", console=False)
            log("=" * 100, console=False)

        ensure_smoke_data(args, env, log)
        check_data(args, env.world_size)                 # again: the smoke corpus may be new
        if args.init_from == "resume" and checkpoint is None:
            checkpoint = read_resume_checkpoint(args, env)
        if use_compile_helpers(args, env):   # started first: their start-up overlaps ours
            helpers = CompileHelpers(helper_compile_jobs(args, training_schedule(args)), argv, args, log)
        run = build_training_run(args, env)
        raw_model, model, optimizer, schedule, stage = (run.raw_model, run.model, run.optimizer,
                                                        run.schedule, run.stage)
        gpu_type, backend, use_fp8 = run.gpu_type, run.cfg.attn_backend, run.cfg.use_fp8
        card = torch.cuda.get_device_name(env.device) if env.device.type == "cuda" else "cpu"
        log(f"world_size {env.world_size} x grad_accum {env.grad_accum_steps} on {card} ({gpu_type}); "
            f"attention {attention_backend_source(backend)}; fp8 {use_fp8}; compile {args.compile}; "
            f"schedule {schedule.boundaries}, split step {schedule.split_step}")

        warm_start = time.perf_counter()
        warm_up(model, raw_model, optimizer, schedule, stage, args, env, log, helpers)
        helpers.close()
        sync(env)
        warmup_s = time.perf_counter() - warm_start
        graphs = compiled_graph_count()
        log(f"warm-up done in {warmup_s:.1f}s ({time.perf_counter() - started:.1f}s since start), "
            f"{graphs} graphs compiled")
        if args.compile:
            log(compile_time_breakdown())
        gc.collect()
        if env.device.type == "cuda":
            torch.cuda.reset_peak_memory_stats(env.device)

        resume = None
        if checkpoint is not None:
            resume_step, payload, model_state = checkpoint
            restore_checkpoint(payload, model_state, raw_model, optimizer)
            resume = payload["progress"]
            checkpoint = None
            log(f"resumed from {checkpoint_folder(args) / checkpoint_name(resume_step, env.rank)}: step "
                f"{resume_step} of {schedule.total_steps}, train time so far {resume['training_ms']:.0f}ms")

        stop.training = True
        result = train(model, raw_model, optimizer, schedule, stage, args, env, log, stop, resume)

        new_graphs = compiled_graph_count() - graphs
        if new_graphs:
            log(f"note: {new_graphs} graphs were compiled after the warm-up (during the run)")
        peak = dict(allocated=0, reserved=0)
        if env.device.type == "cuda":
            peak = dict(allocated=torch.cuda.max_memory_allocated(env.device) // 2**20,
                        reserved=torch.cuda.max_memory_reserved(env.device) // 2**20)
            log(f"peak memory allocated: {peak['allocated']} MiB reserved: {peak['reserved']} MiB")
        summary = dict(final_val_loss=result["final_val_loss"], train_time_ms=round(result["train_time_ms"], 1),
                       step_avg_ms=round(result["step_avg_ms"], 2), steps=result["steps"],
                       stage_step_avg_ms=[None if v is None else round(v, 2) for v in result["stage_step_avg_ms"]],
                       val_losses=result["val_losses"], stopped_by=result["stopped_by"], warmup_s=round(warmup_s, 1),
                       graphs_compiled=compiled_graph_count(), attn_backend=backend, world_size=env.world_size,
                       card=card, gpu_type=gpu_type, fp8=use_fp8, compile=args.compile,
                       peak_memory_mib=peak["allocated"], run_id=args.run_id, seed=args.seed)
        log("summary: " + json.dumps(summary))
        if env.master:   # <run_id>.json beside the log: what record_stats.py and run.sbatch's attempts read
            write_summary_json(log.path.with_suffix(".json"), summary)
        return summary
    finally:
        helpers.close()
        stop.uninstall(previous_handler)
        if env.distributed:
            dist.destroy_process_group()


if __name__ == "__main__":
    try:
        main()
    except KeyboardInterrupt:   # Ctrl-C while the stop handler is not installed (start-up, the end)
        print("stopped by SIGINT", flush=True)
        raise SystemExit(130) from None
