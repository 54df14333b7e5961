"""
Baseline trainer: Karpathy's nanoGPT (GPT-2 on OpenWebText), same model and training math, one file.

Read top to bottom in data-flow order:
config -> model -> optimizer and schedule -> data -> distributed setup -> checkpoints -> training
-> benchmark -> sampling -> default run -> command line.

  python3 train_baseline.py                               # tiny offline demo on CPU (a few minutes)
  python3 train_baseline.py --preset shakespeare_char     # nanoGPT's baby GPT, 1 GPU
  torchrun --standalone --nproc_per_node 8 train_baseline.py --preset gpt2   # GPT-2 124M
  python3 train_baseline.py --preset gpt2 --bench         # timed throughput run: ms/iter, tok/s, MFU
  python3 train_baseline.py sample --out_dir out/shakespeare_char

Every config field is an option (--batch_size 8, --compile false); a preset is applied first and
explicit options override it. On SIGUSR1/SIGTERM/SIGINT the run checkpoints and exits 0; the same
command plus --init_from resume continues it exactly.
"""

import argparse
import dataclasses
import gc
import inspect
import json
import math
import os
import pickle
import re
import signal
import sys
import threading
import time
from contextlib import nullcontext
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch
import torch.distributed as dist
import torch.nn as nn
from torch.nn import functional as F
from torch.nn.parallel import DistributedDataParallel as DDP

import prepare_data


class UsageError(ValueError):
    """Bad configuration or input; the command line turns it into one 'error: ...' line."""


# =============================================================================
# config
# =============================================================================

def opt(default, doc):
    return field(default=default, metadata={"help": doc})


@dataclass
class TrainConfig:
    # The defaults are nanoGPT's train.py defaults: GPT-2 124M on OpenWebText.
    # I/O
    out_dir: str = opt("out", "checkpoint, metrics.jsonl and meta.pkl go here")
    eval_interval: int = opt(2000, "evaluate (and maybe checkpoint) every this many iterations")
    log_interval: int = opt(1, "print a loss line every this many iterations (each one syncs the GPU)")
    eval_iters: int = opt(200, "batches per split in each evaluation")
    eval_only: bool = opt(False, "evaluate once and exit")
    always_save_checkpoint: bool = opt(True, "checkpoint at every eval, not only when val loss improves")
    overwrite: bool = opt(False, "start a new run in an out_dir that holds one (its ckpt.pt is replaced at the "
                                 "first checkpoint); without it that is refused")
    init_from: str = opt("scratch", "scratch | resume | gpt2 | gpt2-medium | gpt2-large | gpt2-xl")
    # data
    data_dir: str = opt("data/openwebtext", "folder with train.bin, val.bin (+ meta.pkl for char vocab)")
    gradient_accumulation_steps: int = opt(40, "micro-steps per optimizer step for the WHOLE job "
                                                "(divided by the number of GPUs)")
    batch_size: int = opt(12, "micro-batch size per GPU")
    block_size: int = opt(1024, "context length")
    # model
    n_layer: int = opt(12, "transformer blocks")
    n_head: int = opt(12, "attention heads")
    n_embd: int = opt(768, "model width")
    dropout: float = opt(0.0, "dropout rate (0 for pretraining, 0.1+ for finetuning)")
    bias: bool = opt(False, "biases in Linear and LayerNorm layers (GPT-2 had them)")
    # AdamW
    learning_rate: float = opt(6e-4, "peak learning rate")
    max_iters: int = opt(600000, "optimizer steps to train for")
    weight_decay: float = opt(0.1, "AdamW weight decay, applied to 2-D parameters only")
    beta1: float = opt(0.9, "AdamW beta1")
    beta2: float = opt(0.95, "AdamW beta2")
    grad_clip: float = opt(1.0, "clip the global gradient norm to this (0 disables)")
    # learning-rate schedule
    decay_lr: bool = opt(True, "linear warmup then cosine decay; false = constant learning_rate")
    warmup_iters: int = opt(2000, "linear warmup steps")
    lr_decay_iters: int = opt(600000, "step at which the cosine reaches min_lr (~max_iters)")
    min_lr: float = opt(6e-5, "final learning rate (~learning_rate / 10)")
    # system
    device: str = opt("auto", "auto | cpu | cuda | cuda:N (under torchrun each rank takes its local GPU)")
    dtype: str = opt("auto", "auto | float32 | bfloat16 | float16 (auto: bf16 on GPUs that have it, "
                             "else fp16 + GradScaler; fp32 on CPU)")
    compile: bool = opt(True, "torch.compile the model")
    compile_mode: str = opt("default", "torch.compile mode: default | max-autotune-no-cudagraphs | max-autotune | "
                                       "reduce-overhead (the autotuning ones compile much longer)")
    backend: str = opt("auto", "torch.distributed backend: auto (nccl on GPUs, gloo on CPU), nccl, gloo")
    seed: int = opt(1337, "random seed (init, data order, dropout)")
    gpu_type: str = opt("auto", "h100 | h200 | a100 | auto (from the device name): the peak bf16 FLOP/s "
                                "MFU divides by; other names run without MFU")
    time_limit: float = opt(0.0, "stop training after this many seconds, then evaluate and save (0 = off)")
    # benchmark
    bench: bool = opt(False, "timed throughput run instead of training (no eval, no checkpoint)")
    bench_warmup: int = opt(10, "untimed iterations before timing (compilation happens here)")
    bench_iters: int = opt(20, "timed iterations")
    bench_data: str = opt("auto", "auto | real | random: auto uses data_dir/train.bin when it exists")
    # offline default run
    corpus_bytes: int = opt(5_000_000, "size of the stdlib corpus the default preset prepares")
    # set by parse_config, not options of their own
    preset: str = field(default="", metadata={"internal": True})
    resume_fallback: str = field(default="scratch", metadata={"internal": True})


MODEL_SIZES = {  # GPT-2 family: n_layer, n_head, n_embd
    "gpt2": dict(n_layer=12, n_head=12, n_embd=768),           # 124M
    "gpt2-medium": dict(n_layer=24, n_head=16, n_embd=1024),   # 350M
    "gpt2-large": dict(n_layer=36, n_head=20, n_embd=1280),    # 774M
    "gpt2-xl": dict(n_layer=48, n_head=25, n_embd=1600),       # 1558M
}

# ~0.5M tokens per optimizer step, 300B tokens in all (nanoGPT's config/train_gpt2.py).
_GPT2_TRAINING = dict(
    data_dir="data/openwebtext", batch_size=12, block_size=1024, gradient_accumulation_steps=40,
    max_iters=600000, lr_decay_iters=600000, eval_interval=1000, eval_iters=200, log_interval=10,
    weight_decay=0.1,
)

PRESETS = {
    # nanoGPT's config/train_shakespeare_char.py: a baby GPT that overfits tinyshakespeare quickly.
    "shakespeare_char": dict(
        out_dir="out/shakespeare_char", data_dir="data/shakespeare_char",
        eval_interval=250, eval_iters=200, log_interval=10, always_save_checkpoint=False,
        gradient_accumulation_steps=1, batch_size=64, block_size=256,
        n_layer=6, n_head=6, n_embd=384, dropout=0.2,
        learning_rate=1e-3, max_iters=5000, lr_decay_iters=5000, min_lr=1e-4, beta2=0.99,
        warmup_iters=100,
    ),
    "gpt2": dict(out_dir="out/gpt2", **_GPT2_TRAINING, **MODEL_SIZES["gpt2"]),
    # From scratch at the bigger sizes: micro-batches shrink to fit 80 GB, accumulation grows to
    # keep ~0.5M tokens per step; learning rates follow the GPT-3 paper's table for these sizes.
    "gpt2-medium": dict(_GPT2_TRAINING, out_dir="out/gpt2-medium", **MODEL_SIZES["gpt2-medium"],
                        learning_rate=3e-4, min_lr=3e-5),
    "gpt2-large": dict(_GPT2_TRAINING, out_dir="out/gpt2-large", **MODEL_SIZES["gpt2-large"],
                       batch_size=6, gradient_accumulation_steps=80, learning_rate=2.5e-4, min_lr=2.5e-5),
    "gpt2-xl": dict(_GPT2_TRAINING, out_dir="out/gpt2-xl", **MODEL_SIZES["gpt2-xl"],
                    batch_size=4, gradient_accumulation_steps=120, learning_rate=2e-4, min_lr=2e-5),
    # nanoGPT's config/finetune_shakespeare.py: GPT-2 XL weights, BPE shakespeare, constant tiny lr.
    "finetune_shakespeare": dict(
        out_dir="out/finetune_shakespeare", data_dir="data/shakespeare", init_from="gpt2-xl",
        eval_interval=5, eval_iters=40, always_save_checkpoint=False,
        batch_size=1, gradient_accumulation_steps=32, max_iters=20,
        learning_rate=3e-5, decay_lr=False,
    ),
    # What `python3 train_baseline.py` runs: a tiny char model on 2 CPU cores in under ~4 minutes.
    # data_dir "" means: data/shakespeare_char if prepared, else the stdlib corpus (prepared once).
    "default": dict(
        out_dir="out/default", data_dir="", eval_interval=100, eval_iters=20, log_interval=10,
        gradient_accumulation_steps=1, batch_size=32, block_size=128,
        n_layer=4, n_head=4, n_embd=128, dropout=0.0,
        learning_rate=2e-3, max_iters=600, lr_decay_iters=600, min_lr=2e-4, beta2=0.99,
        warmup_iters=50, compile=False, time_limit=200.0,
    ),
}

# --bench measures what nanoGPT's bench.py measures unless these are given explicitly:
# one micro-batch per optimizer step and no gradient clipping.
BENCH_DEFAULTS = dict(gradient_accumulation_steps=1, grad_clip=0.0)

PEAK_BF16_FLOPS = {"h100": 989e12, "h200": 989e12, "a100": 312e12}  # dense, SXM
DEVICE_PATTERN = re.compile(r"auto|cpu|cuda(:\d+)?")
MAX_SEED = 2**62  # torch and numpy take seeds up to 2**64 - 1; the run adds ranks and splits to it
MIN_CORPUS_BYTES = 100_000
INIT_CHOICES = ("scratch", "resume", *MODEL_SIZES)
COMPILE_MODES = ("default", "max-autotune-no-cudagraphs", "max-autotune", "reduce-overhead")


def parse_bool(text):
    value = text.strip().lower()
    if value in ("true", "1", "yes", "on"):
        return True
    if value in ("false", "0", "no", "off"):
        return False
    raise argparse.ArgumentTypeError(f"expected true/false/1/0, got {text!r}")


def build_train_parser():
    parser = prepare_data.OneLineErrorParser(
        prog="train_baseline.py", description=__doc__.split("\n\n")[0].strip(),
        epilog="Subcommand: `train_baseline.py sample --help`. Without --preset the default preset applies "
               "(a tiny CPU demo); --preset gpt2 is nanoGPT's GPT-2 124M.",
        argument_default=argparse.SUPPRESS)  # only options actually given land in the namespace
    parser.add_argument("--preset", choices=sorted(PRESETS), help="start from this configuration (default: default)")
    for f in dataclasses.fields(TrainConfig):
        if f.metadata.get("internal"):
            continue
        help_text = f"{f.metadata['help']} (default {f.default})"
        if f.name == "init_from":  # every value is kept: see resume_fallback in parse_config
            parser.add_argument("--init_from", action="append", metavar="STR", help=help_text)
        elif f.type is bool:
            # `--compile false`, `--compile=0`, and a bare `--bench` all work
            parser.add_argument(f"--{f.name}", type=parse_bool, nargs="?", const=True,
                                metavar="BOOL", help=help_text)
        else:
            parser.add_argument(f"--{f.name}", type=f.type, metavar=f.type.__name__.upper(), help=help_text)
    return parser


def parse_config(argv):
    """Defaults, then the preset (`default` unless --preset names another), then the options given.

    So `--device cpu` or `--max_iters 50` alone still run the default demo, on its data.
    """
    given = vars(build_train_parser().parse_args(argv))
    preset = given.pop("preset", "default")
    values = dict(PRESETS[preset])
    if given.get("bench"):
        values.update(BENCH_DEFAULTS)
    # A requeued job re-runs its command plus `--init_from resume`; if no checkpoint exists yet it
    # must start the way the original command would have (e.g. from GPT-2 weights, not scratch).
    init_history = [values.pop("init_from", "scratch")] + given.pop("init_from", [])
    values.update(given)
    cfg = TrainConfig(**values, init_from=init_history[-1], preset=preset,
                      resume_fallback=next((v for v in reversed(init_history) if v != "resume"), "scratch"))
    validate_config(cfg)
    check_given_options(cfg, set(given))
    return cfg


# --bench times bench_warmup + bench_iters training steps at the constant --learning_rate: no eval, no
# checkpoint, no schedule. These options would be ignored there.
TRAINING_ONLY = ("max_iters", "eval_interval", "eval_iters", "log_interval", "always_save_checkpoint", "overwrite",
                 "time_limit", "decay_lr", "warmup_iters", "lr_decay_iters", "min_lr")


def check_given_options(cfg, given):
    """Options typed on the command line that this run would silently ignore: refused."""
    ignored_without_bench = sorted(name for name in given if name.startswith("bench_"))
    if ignored_without_bench and not cfg.bench:
        raise UsageError(f"--{ignored_without_bench[0]} only applies with --bench")
    ignored_by_bench = [name for name in TRAINING_ONLY if name in given]
    if ignored_by_bench and cfg.bench:
        raise UsageError(f"--{ignored_by_bench[0]} does not apply to --bench (it times --bench_warmup + "
                         "--bench_iters steps at the constant --learning_rate: no eval, no checkpoint, no schedule)")
    if "compile_mode" in given and not cfg.compile:
        raise UsageError(f"--compile_mode {cfg.compile_mode} has no effect with --compile false; "
                         "add --compile true or drop it")
    if "corpus_bytes" in given and (cfg.preset != "default" or cfg.data_dir):
        raise UsageError("--corpus_bytes sizes the default preset's stdlib corpus, which this run does not use "
                         "(it has --preset or --data_dir)")
    if cfg.resume_fallback in MODEL_SIZES:  # the architecture comes with OpenAI's weights
        pretrained = dict(MODEL_SIZES[cfg.resume_fallback], bias=True)
        clashes = [f"--{name} {getattr(cfg, name)}" for name in pretrained
                   if name in given and getattr(cfg, name) != pretrained[name]]
        if clashes:
            raise UsageError(f"--init_from {cfg.resume_fallback} loads OpenAI's {cfg.resume_fallback} "
                             f"({', '.join(f'{k} {v}' for k, v in pretrained.items())}), which {', '.join(clashes)} "
                             "contradicts; drop it, or train from scratch")


def validate_config(cfg):
    positive = ["eval_interval", "log_interval", "eval_iters", "gradient_accumulation_steps", "batch_size",
                "block_size", "n_layer", "n_head", "n_embd", "bench_iters"]
    for name in positive:
        if getattr(cfg, name) < 1:
            raise UsageError(f"--{name} must be at least 1 (got {getattr(cfg, name)})")
    if cfg.bench_warmup < 0 or cfg.warmup_iters < 0:
        raise UsageError("--warmup_iters and --bench_warmup cannot be negative")
    if cfg.max_iters < 1 and not (cfg.eval_only or cfg.bench):
        raise UsageError(f"--max_iters must be at least 1 (got {cfg.max_iters}); to only evaluate use --eval_only")
    for f in dataclasses.fields(cfg):
        if f.type is float and not math.isfinite(getattr(cfg, f.name)):
            raise UsageError(f"--{f.name} must be a finite number (got {getattr(cfg, f.name)})")
    if cfg.learning_rate <= 0:
        raise UsageError(f"--learning_rate must be positive (got {cfg.learning_rate})")
    if not (0.0 <= cfg.beta1 < 1.0 and 0.0 <= cfg.beta2 < 1.0):
        raise UsageError(f"--beta1 and --beta2 must lie in [0, 1) (got {cfg.beta1}, {cfg.beta2})")
    if cfg.weight_decay < 0 or cfg.grad_clip < 0:
        raise UsageError(f"--weight_decay and --grad_clip cannot be negative (got {cfg.weight_decay}, "
                         f"{cfg.grad_clip}); --grad_clip 0 turns clipping off")
    if cfg.time_limit < 0:
        raise UsageError(f"--time_limit cannot be negative (got {cfg.time_limit}); 0 turns it off")
    if cfg.n_embd % cfg.n_head:
        raise UsageError(f"--n_embd {cfg.n_embd} is not divisible by --n_head {cfg.n_head}")
    if not 0.0 <= cfg.dropout < 1.0:
        raise UsageError(f"--dropout must be in [0, 1) (got {cfg.dropout})")
    if cfg.decay_lr and cfg.lr_decay_iters <= cfg.warmup_iters:
        raise UsageError(f"--lr_decay_iters ({cfg.lr_decay_iters}) must be greater than "
                         f"--warmup_iters ({cfg.warmup_iters})")
    if cfg.decay_lr and not 0.0 <= cfg.min_lr <= cfg.learning_rate:
        raise UsageError(f"--min_lr ({cfg.min_lr}) must lie between 0 and --learning_rate ({cfg.learning_rate})")
    for value in (cfg.init_from, cfg.resume_fallback):
        if value not in INIT_CHOICES:
            raise UsageError(f"--init_from {value!r} is not one of {', '.join(INIT_CHOICES)}")
    if cfg.dtype not in ("auto", "float32", "bfloat16", "float16"):
        raise UsageError(f"--dtype {cfg.dtype!r}: use auto, float32, bfloat16 or float16")
    cfg.gpu_type = cfg.gpu_type.lower()  # other names are allowed: MFU is then not reported
    if cfg.bench_data not in ("auto", "real", "random"):
        raise UsageError(f"--bench_data {cfg.bench_data!r}: use auto, real or random")
    if cfg.compile_mode not in COMPILE_MODES:
        raise UsageError(f"--compile_mode {cfg.compile_mode!r}: use {', '.join(COMPILE_MODES)}")
    if cfg.backend not in ("auto", "nccl", "gloo"):
        raise UsageError(f"--backend {cfg.backend!r}: use auto, nccl or gloo")
    if not DEVICE_PATTERN.fullmatch(cfg.device):
        raise UsageError(f"--device {cfg.device!r}: use auto, cpu, cuda or cuda:N")
    if cfg.backend == "nccl" and cfg.device == "cpu":
        raise UsageError("--backend nccl needs CUDA GPUs; with --device cpu use --backend gloo (or auto)")
    if not 0 <= cfg.seed <= MAX_SEED:
        raise UsageError(f"--seed must lie in [0, 2**62] (got {cfg.seed})")
    if cfg.corpus_bytes < MIN_CORPUS_BYTES:
        raise UsageError(f"--corpus_bytes must be at least {MIN_CORPUS_BYTES:,} (got {cfg.corpus_bytes:,}): "
                         "the corpus needs a few files and a validation split longer than a block")
    if cfg.bench and cfg.eval_only:
        raise UsageError("--bench and --eval_only exclude each other: --bench times training steps, it never evaluates")
    if cfg.resume_fallback in MODEL_SIZES and cfg.block_size > 1024:
        raise UsageError(f"--block_size {cfg.block_size} exceeds the 1024-token context of OpenAI's "
                         f"{cfg.resume_fallback} (--init_from); use at most 1024")


# =============================================================================
# model: GPT-2 (pre-norm blocks, GELU MLP, learned positions, tied embedding / output head)
# =============================================================================

@dataclass
class GPTConfig:
    block_size: int = 1024
    vocab_size: int = 50304  # GPT-2's 50257 padded up to a multiple of 64: faster matmuls
    n_layer: int = 12
    n_head: int = 12
    n_embd: int = 768
    dropout: float = 0.0
    bias: bool = True


class CausalSelfAttention(nn.Module):
    def __init__(self, config):
        super().__init__()
        self.n_head = config.n_head
        self.dropout = config.dropout
        self.c_attn = nn.Linear(config.n_embd, 3 * config.n_embd, bias=config.bias)  # q, k, v at once
        self.c_proj = nn.Linear(config.n_embd, config.n_embd, bias=config.bias)
        self.resid_dropout = nn.Dropout(config.dropout)

    def forward(self, x):
        batch, seq, width = x.shape
        # (batch, seq, 3*width) -> three (batch, heads, seq, head_dim) tensors
        q, k, v = self.c_attn(x).view(batch, seq, 3, self.n_head, width // self.n_head).permute(2, 0, 3, 1, 4)
        y = F.scaled_dot_product_attention(q, k, v, is_causal=True,
                                           dropout_p=self.dropout if self.training else 0.0)
        y = y.transpose(1, 2).reshape(batch, seq, width)  # heads side by side again
        return self.resid_dropout(self.c_proj(y))


class MLP(nn.Module):
    def __init__(self, config):
        super().__init__()
        self.c_fc = nn.Linear(config.n_embd, 4 * config.n_embd, bias=config.bias)
        self.c_proj = nn.Linear(4 * config.n_embd, config.n_embd, bias=config.bias)
        self.dropout = nn.Dropout(config.dropout)

    def forward(self, x):
        return self.dropout(self.c_proj(F.gelu(self.c_fc(x))))


class Block(nn.Module):
    def __init__(self, config):
        super().__init__()
        self.ln_1 = nn.LayerNorm(config.n_embd, bias=config.bias)
        self.attn = CausalSelfAttention(config)
        self.ln_2 = nn.LayerNorm(config.n_embd, bias=config.bias)
        self.mlp = MLP(config)

    def forward(self, x):
        x = x + self.attn(self.ln_1(x))
        return x + self.mlp(self.ln_2(x))


class GPT(nn.Module):
    def __init__(self, config):
        super().__init__()
        self.config = config
        self.transformer = nn.ModuleDict(dict(
            wte=nn.Embedding(config.vocab_size, config.n_embd),
            wpe=nn.Embedding(config.block_size, config.n_embd),
            drop=nn.Dropout(config.dropout),
            h=nn.ModuleList(Block(config) for _ in range(config.n_layer)),
            ln_f=nn.LayerNorm(config.n_embd, bias=config.bias),
        ))
        self.lm_head = nn.Linear(config.n_embd, config.vocab_size, bias=False)
        self.transformer.wte.weight = self.lm_head.weight  # tied: one matrix embeds and un-embeds
        self.apply(self._init_weights)
        # GPT-2's residual scaling: each block adds two projections into the residual stream, so
        # shrink them to keep the stream's variance independent of depth
        for name, param in self.named_parameters():
            if name.endswith("c_proj.weight"):
                nn.init.normal_(param, mean=0.0, std=0.02 / math.sqrt(2 * config.n_layer))

    @staticmethod
    def _init_weights(module):
        if isinstance(module, (nn.Linear, nn.Embedding)):
            nn.init.normal_(module.weight, mean=0.0, std=0.02)
        if isinstance(module, nn.Linear) and module.bias is not None:
            nn.init.zeros_(module.bias)

    def num_params(self, non_embedding=True):
        """Parameter count; position embeddings excluded by default (token ones double as the head)."""
        total = sum(p.numel() for p in self.parameters())
        return total - self.transformer.wpe.weight.numel() if non_embedding else total

    def forward(self, idx, targets=None):
        seq = idx.shape[1]
        if seq > self.config.block_size:
            raise ValueError(f"sequence of {seq} tokens exceeds block_size {self.config.block_size}")
        pos = torch.arange(seq, device=idx.device)
        x = self.transformer.drop(self.transformer.wte(idx) + self.transformer.wpe(pos))
        for block in self.transformer.h:
            x = block(x)
        x = self.transformer.ln_f(x)
        if targets is None:
            return self.lm_head(x[:, -1:, :]), None  # generation only needs the last position
        logits = self.lm_head(x)
        loss = F.cross_entropy(logits.view(-1, logits.size(-1)), targets.view(-1), ignore_index=-1)
        return logits, loss

    def crop_block_size(self, block_size):
        """Shorten the context (e.g. GPT-2's 1024 -> a smaller block_size) by dropping positions."""
        self.config.block_size = block_size
        self.transformer.wpe.weight = nn.Parameter(self.transformer.wpe.weight[:block_size])

    @torch.no_grad()
    def generate(self, idx, max_new_tokens, temperature=1.0, top_k=None, generator=None, vocab_size=None):
        """Append max_new_tokens sampled tokens to idx (batch, seq), re-reading the last block each time.

        vocab_size: sample only ids below it (the rows padding 50257 up to 50304 are no tokens).
        """
        for _ in range(max_new_tokens):
            logits, _ = self(idx[:, -self.config.block_size:])
            logits = logits[:, -1, :vocab_size].float() / temperature
            if top_k is not None:
                kth_best = torch.topk(logits, min(top_k, logits.size(-1))).values[:, [-1]]
                logits[logits < kth_best] = -float("inf")
            next_token = torch.multinomial(F.softmax(logits, dim=-1), num_samples=1, generator=generator)
            idx = torch.cat((idx, next_token), dim=1)
        return idx


def flops_per_token(config, num_params):
    """nanoGPT's estimate (PaLM appendix B): 6N for the weights' fwd+bwd + 12*L*H*Q*T for attention."""
    head_dim = config.n_embd // config.n_head
    return 6 * num_params + 12 * config.n_layer * config.n_head * head_dim * config.block_size


def model_flops_utilization(flops_per_tok, tokens_per_second_per_gpu, peak_flops):
    return flops_per_tok * tokens_per_second_per_gpu / peak_flops if peak_flops else None


# OpenAI's checkpoints store these as Conv1D weights, (in, out): transposed relative to nn.Linear.
_CONV1D_SUFFIXES = ("attn.c_attn.weight", "attn.c_proj.weight", "mlp.c_fc.weight", "mlp.c_proj.weight")


def convert_hf_gpt2_state_dict(hf_state, model):
    """Our state dict filled from a Hugging Face GPT2LMHeadModel state dict (same key names)."""
    ours = model.state_dict()
    theirs = {k: v for k, v in hf_state.items() if not k.endswith((".attn.bias", ".attn.masked_bias"))}
    if set(theirs) != set(ours):
        missing, extra = sorted(set(ours) - set(theirs)), sorted(set(theirs) - set(ours))
        raise ValueError(f"GPT-2 checkpoint keys do not match the model: missing {missing[:3]}, extra {extra[:3]}")
    converted = {}
    for key, value in theirs.items():
        if key.endswith(_CONV1D_SUFFIXES):
            value = value.t()
        if value.shape != ours[key].shape:
            raise ValueError(f"GPT-2 checkpoint {key} has shape {tuple(value.shape)}, model wants "
                             f"{tuple(ours[key].shape)}")
        converted[key] = value
    return converted


def gpt_from_pretrained(model_type, dropout=0.0):
    """GPT-2 weights from OpenAI (via Hugging Face `transformers`): 50257 vocab, 1024 context, biases."""
    try:
        from transformers import GPT2LMHeadModel
    except ImportError:
        raise UsageError(f"--init_from {model_type} needs the `transformers` package: pip install transformers")
    print(f"loading OpenAI weights: {model_type}")
    config = GPTConfig(vocab_size=50257, block_size=1024, bias=True, dropout=dropout, **MODEL_SIZES[model_type])
    model = GPT(config)
    hf_state = GPT2LMHeadModel.from_pretrained(model_type).state_dict()
    model.load_state_dict(convert_hf_gpt2_state_dict(hf_state, model))
    return model


# =============================================================================
# optimizer, learning-rate schedule, batch arithmetic
# =============================================================================

def configure_optimizer(model, cfg, device_type):
    """AdamW; weight decay only on matrices (matmul weights, embeddings), not on biases or norms."""
    params = [p for p in model.parameters() if p.requires_grad]
    groups = [
        {"params": [p for p in params if p.dim() >= 2], "weight_decay": cfg.weight_decay},
        {"params": [p for p in params if p.dim() < 2], "weight_decay": 0.0},
    ]
    fused = device_type == "cuda" and "fused" in inspect.signature(torch.optim.AdamW).parameters
    return torch.optim.AdamW(groups, lr=cfg.learning_rate, betas=(cfg.beta1, cfg.beta2),
                             **({"fused": True} if fused else {}))


def learning_rate_at(it, cfg):
    """Linear warmup to learning_rate, cosine down to min_lr at lr_decay_iters, then flat."""
    if not cfg.decay_lr:
        return cfg.learning_rate
    if it < cfg.warmup_iters:
        return cfg.learning_rate * (it + 1) / (cfg.warmup_iters + 1)
    if it > cfg.lr_decay_iters:
        return cfg.min_lr
    progress = (it - cfg.warmup_iters) / (cfg.lr_decay_iters - cfg.warmup_iters)
    weight = 0.5 * (1.0 + math.cos(math.pi * progress))  # 1 -> 0
    if weight == 1.0:  # the peak exactly, whatever rounding would make of the formula below
        return cfg.learning_rate
    # nanoGPT's formula; monotone in `it` since weight is, clamped so rounding never leaves the range
    return min(cfg.learning_rate, max(cfg.min_lr, cfg.min_lr + weight * (cfg.learning_rate - cfg.min_lr)))


def accumulation_per_rank(total_accumulation, world_size):
    """gradient_accumulation_steps is for the whole job: each of world_size ranks does its share."""
    if total_accumulation % world_size:
        raise UsageError(
            f"--gradient_accumulation_steps {total_accumulation} is not divisible by the world size "
            f"{world_size}; it counts micro-batches for the whole job, so pick a multiple of {world_size}")
    return total_accumulation // world_size


def tokens_per_step(batch_size, block_size, total_accumulation):
    return batch_size * block_size * total_accumulation


# =============================================================================
# data: random block_size windows of a uint16 token file
# =============================================================================

class _PlainDataUnpickler(pickle.Unpickler):
    """Unpickles dicts, lists, strings and numbers only: loading a meta.pkl someone handed you must
    not run code (a pickle can name any importable function), just as checkpoints load weights_only."""

    def find_class(self, module, name):
        raise pickle.UnpicklingError(f"it refers to {module}.{name}, and only plain data is loaded")


def read_meta(data_dir):
    """meta.pkl of a char-level dataset ({vocab_size, itos, stoi}), or None for GPT-2 BPE data."""
    path = Path(data_dir) / "meta.pkl"
    if not path.exists():
        return None
    how_to_fix = "re-create it with `python3 prepare_data.py text FILES --tokenizer char --out_dir DIR`"
    try:
        with open(path, "rb") as f:
            meta = _PlainDataUnpickler(f).load()
    except Exception as exc:  # corrupt, truncated, or not plain data: pickle raises many types
        reason = str(exc).strip().splitlines()[0][:160] if str(exc).strip() else type(exc).__name__
        raise UsageError(f"{path} is not a readable vocabulary file ({reason}); {how_to_fix}") from None
    if not (isinstance(meta, dict) and isinstance(meta.get("vocab_size"), int) and meta["vocab_size"] > 0
            and isinstance(meta.get("itos"), dict) and isinstance(meta.get("stoi"), dict)):
        raise UsageError(f"{path} is not a char vocabulary ({{vocab_size, itos, stoi}}); {how_to_fix}")
    return meta


_PREPARE_RECIPES = ("shakespeare_char", "shakespeare", "openwebtext")  # prepare_data.py subcommands


def load_split(data_dir, split, block_size):
    path = Path(data_dir) / f"{split}.bin"
    try:
        tokens = prepare_data.load_tokens(path, fmt="bin")  # a headered shard is refused, never read as tokens
    except FileNotFoundError:
        recipe = Path(data_dir).name if Path(data_dir).name in _PREPARE_RECIPES else "text YOUR_FILES"
        raise UsageError(f"{path} not found; prepare it with "
                         f"`python3 prepare_data.py {recipe} --out_dir {data_dir}` or pass --data_dir")
    except ValueError as e:
        raise UsageError(str(e))
    if len(tokens) <= block_size:
        raise UsageError(f"{path} holds {len(tokens)} tokens, not enough for one window of "
                         f"block_size {block_size}; lower --block_size or add data")
    return tokens


def draw_window_starts(num_tokens, block_size, shape, generator):
    """Random window starts such that inputs and their shifted targets both stay inside the file."""
    return torch.randint(num_tokens - block_size, shape, generator=generator)


def gather_windows(tokens, starts, block_size):
    """(inputs, targets) int64 CPU tensors; targets are the inputs shifted one token ahead."""
    offsets = starts.numpy()[:, None] + np.arange(block_size + 1)
    windows = torch.from_numpy(tokens[offsets].astype(np.int64))
    return windows[:, :-1].contiguous(), windows[:, 1:].contiguous()


def to_device(x, y, device):
    if device.type == "cuda":  # pinned memory lets the copy overlap with the GPU's current work
        return x.pin_memory().to(device, non_blocking=True), y.pin_memory().to(device, non_blocking=True)
    return x.to(device), y.to(device)


class TrainBatches:
    """This rank's training micro-batches, one micro-batch ahead of the model.

    Every rank holds the same generator and draws the windows of a whole optimizer step for all
    ranks at once; rank r keeps micro-batches r, r + world, r + 2*world, ... . So what a step trains
    on does not depend on the number of GPUs, and one generator state (equal on all ranks) is all
    a checkpoint needs to continue the exact sequence.
    """

    def __init__(self, tokens, block_size, batch_size, total_accumulation, rank, world_size, seed, device):
        self.tokens, self.block_size, self.device = tokens, block_size, device
        self.step_shape = (total_accumulation, batch_size)
        self.rank, self.world_size = rank, world_size
        self.generator = torch.Generator().manual_seed(seed)
        self._draw_step()
        self.micro = 0
        self.current = self._load(0)

    def _draw_step(self):
        self.state_before_draw = self.generator.get_state()  # what a checkpoint stores
        starts = draw_window_starts(len(self.tokens), self.block_size, self.step_shape, self.generator)
        self.step_starts = starts[self.rank::self.world_size]

    def _load(self, micro):
        return to_device(*gather_windows(self.tokens, self.step_starts[micro], self.block_size), self.device)

    def advance(self):
        """Move to the next micro-batch (drawing the next step's windows after the last one)."""
        self.micro += 1
        if self.micro == len(self.step_starts):
            self._draw_step()
            self.micro = 0
        self.current = self._load(self.micro)

    def state(self):
        """Generator state that redraws the step the pending micro-batch belongs to."""
        return self.state_before_draw

    def restore(self, state):
        self.generator.set_state(state.cpu())
        self._draw_step()
        self.micro = 0
        self.current = self._load(0)


# =============================================================================
# distributed setup, precision, device
# =============================================================================

@dataclass
class Runtime:
    ddp: bool
    rank: int
    local_rank: int
    world_size: int
    device: torch.device
    dtype: torch.dtype

    @property
    def master(self):
        return self.rank == 0

    def autocast(self):
        if self.dtype == torch.float32:
            return nullcontext()
        return torch.autocast(device_type=self.device.type, dtype=self.dtype)


def pick_device(requested, local_rank, ddp):
    if not DEVICE_PATTERN.fullmatch(requested):
        raise UsageError(f"--device {requested!r}: use auto, cpu, cuda or cuda:N")
    if requested == "auto":
        requested = "cuda" if torch.cuda.is_available() else "cpu"
    if requested.startswith("cuda"):
        if not torch.cuda.is_available():
            raise UsageError(f"--device {requested} but no CUDA GPU is visible; use --device cpu")
        if ddp:  # torchrun starts one process per GPU; each takes the GPU of its local rank
            requested = f"cuda:{local_rank}"
        elif requested == "cuda":  # torch.cuda.set_device needs an explicit index
            requested = "cuda:0"
        if int(requested.split(":")[1]) >= torch.cuda.device_count():
            raise UsageError(f"{requested} does not exist: {torch.cuda.device_count()} GPU(s) visible")
    return torch.device(requested)


def pick_dtype(requested, device):
    if requested != "auto":
        return getattr(torch, requested)
    if device.type != "cuda":
        return torch.float32
    return torch.bfloat16 if torch.cuda.is_bf16_supported() else torch.float16


def torchrun_environment():
    """(ddp, rank, local_rank, world_size) from torchrun's variables, checked: one line if they are off."""
    values = {}
    for name, default in (("RANK", "0"), ("LOCAL_RANK", "0"), ("WORLD_SIZE", "1")):
        text = os.environ.get(name, default)
        if not text.isdigit():
            raise UsageError(f"environment variable {name}={text!r} is not a whole number (torchrun sets it; "
                             "unset it for a single-process run)")
        values[name] = int(text)
    ddp, rank, world_size = "RANK" in os.environ, values["RANK"], values["WORLD_SIZE"]
    if world_size < 1 or rank >= world_size:
        raise UsageError(f"RANK={rank} and WORLD_SIZE={world_size} do not fit together (0 <= RANK < WORLD_SIZE); "
                         "start the processes with torchrun")
    if world_size > 1 and not ddp:
        raise UsageError(f"WORLD_SIZE={world_size} but RANK is not set: start {world_size} processes with "
                         f"torchrun --nproc_per_node {world_size} (or unset WORLD_SIZE)")
    if ddp and not ("MASTER_ADDR" in os.environ and "MASTER_PORT" in os.environ):
        raise UsageError("RANK is set but MASTER_ADDR/MASTER_PORT are not: start the processes with torchrun "
                         "(or unset RANK for a single-process run)")
    return ddp, rank, values["LOCAL_RANK"], world_size


def setup_runtime(cfg):
    """Join the torchrun process group if there is one; pick device and precision."""
    ddp, rank, local_rank, world_size = torchrun_environment()
    device = pick_device(cfg.device, local_rank, ddp)
    if cfg.backend == "nccl" and device.type != "cuda":
        raise UsageError("--backend nccl needs CUDA GPUs; on the CPU use --backend gloo (or auto)")
    if cfg.dtype == "bfloat16" and device.type == "cuda" and not torch.cuda.is_bf16_supported():
        raise UsageError(f"--dtype bfloat16 but {torch.cuda.get_device_name(device)} has no bf16; "
                         "use --dtype float16 (or auto)")
    if device.type == "cuda":
        torch.cuda.set_device(device)
        torch.backends.cuda.matmul.allow_tf32 = True  # only affects fp32 matmuls
        torch.backends.cudnn.allow_tf32 = True
    if ddp:
        backend = cfg.backend if cfg.backend != "auto" else ("nccl" if device.type == "cuda" else "gloo")
        dist.init_process_group(backend=backend, device_id=device if device.type == "cuda" else None)
    return Runtime(ddp, rank, local_rank, world_size, device, pick_dtype(cfg.dtype, device))


def peak_flops_for(gpu_type, device):
    """Peak dense bf16 FLOP/s of one GPU, from --gpu_type or the device name; None when unknown."""
    if gpu_type == "auto":
        if device.type != "cuda":
            return None
        name = torch.cuda.get_device_name(device).upper()
        gpu_type = next((kind for kind in PEAK_BF16_FLOPS if kind.upper() in name), None)
    return PEAK_BF16_FLOPS.get(gpu_type)


def format_mfu(mfu):
    return f"{mfu * 100:.2f}%" if mfu is not None else "n/a"


def describe_peak(peak, gpu_type, device):
    if peak:
        return f"MFU against {peak / 1e12:.0f} TFLOP/s"
    if device.type != "cuda" and gpu_type == "auto":
        return "no MFU on CPU"
    known = ", ".join(PEAK_BF16_FLOPS)
    return f"no MFU (peak FLOP/s unknown for --gpu_type {gpu_type}; known: {known})"


def leave_process_group(rt):
    """Tear down the process group cleanly; call once the DDP-wrapped model is no longer referenced.

    DDP's reducer sits in reference cycles; if the garbage collector frees it only after the group
    is destroyed (at interpreter exit), gloo can abort ("terminate called without an active exception").
    """
    if rt.ddp:
        gc.collect()
        dist.barrier()
        dist.destroy_process_group()


STOP_POLL_EVERY = 10  # DDP: ranks agree on a stop signal / time limit every this many iterations


def all_ranks_max(value, rt):
    """The largest int any rank holds (every rank must call this at the same point)."""
    if not rt.ddp:
        return value
    flag = torch.tensor([value], device=rt.device)
    dist.all_reduce(flag, op=dist.ReduceOp.MAX)
    return int(flag.item())


def all_ranks_mean(total, count, rt):
    """Mean over all ranks of per-rank sums (tensor total, python int count)."""
    if not rt.ddp:
        return total.item() / count
    both = torch.stack([total.float().to(rt.device), torch.tensor(float(count), device=rt.device)])
    dist.all_reduce(both)
    return (both[0] / both[1]).item()


# =============================================================================
# checkpoints
# =============================================================================

def save_checkpoint(path, checkpoint):
    """Write via a temporary file and os.replace, so a crash mid-write never leaves a torn ckpt.pt."""
    path = Path(path)
    tmp = path.with_name(path.name + ".tmp")
    with open(tmp, "wb") as f:
        torch.save(checkpoint, f)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)


# What load_checkpoint needs: sampling reads the model; resuming needs the training state too.
SAMPLE_KEYS = ("model", "model_args")
RESUME_KEYS = SAMPLE_KEYS + ("optimizer", "scaler", "config", "iter_num", "best_val_loss", "last_eval_iter",
                             "batch_generator", "rng_states")


def load_checkpoint(path, device, required=RESUME_KEYS):
    """A checkpoint of this trainer (or nanoGPT's), checked; anything else is one UsageError line.

    weights_only=True always: a checkpoint is a file someone handed you, and unpickling arbitrary
    objects runs arbitrary code.
    """
    path = Path(path)
    how_to_fix = "delete it to start over, or pass the --out_dir of another run"
    if path.stat().st_size == 0:
        raise UsageError(f"{path} is empty (a crash while it was copied?); {how_to_fix}")
    try:
        checkpoint = torch.load(path, map_location=device, weights_only=True)
    except Exception as exc:  # torch raises several types here, with multi-line texts
        unsafe = re.search(r"unsupported GLOBAL (\S+)", str(exc))  # what weights_only refused to import
        if unsafe:
            raise UsageError(f"{path} holds Python objects besides tensors and plain data ({unsafe.group(1)}); "
                             f"they are not loaded, since unpickling them could run code: not a train_baseline.py "
                             f"checkpoint; {how_to_fix}") from None
        raise UsageError(f"{path} is not a readable checkpoint: corrupt or truncated "
                         f"(torch.load: {type(exc).__name__}); {how_to_fix}") from None
    if not isinstance(checkpoint, dict):
        raise UsageError(f"{path} holds a {type(checkpoint).__name__}, not a train_baseline.py checkpoint; {how_to_fix}")
    if "model_args" not in checkpoint and {"step", "args"} <= checkpoint.keys():
        raise UsageError(f"{path} is a train_speedrun.py checkpoint; train_baseline.py cannot load it")
    missing = [key for key in required if key not in checkpoint]
    if missing:
        raise UsageError(f"{path} is not a complete train_baseline.py checkpoint (missing {', '.join(missing)}); "
                         f"{how_to_fix}")
    # checkpoints of a compiled model (e.g. nanoGPT's) carry this prefix on every key
    prefix = "_orig_mod."
    checkpoint["model"] = {k.removeprefix(prefix): v for k, v in checkpoint["model"].items()}
    return checkpoint


def rng_state(device):
    state = {"cpu": torch.get_rng_state()}
    if device.type == "cuda":
        state["cuda"] = torch.cuda.get_rng_state(device)
    return state


def restore_rng_state(state, device):
    # RNG states must be CPU byte tensors; loading with map_location may have moved them
    torch.set_rng_state(state["cpu"].cpu())
    if device.type == "cuda" and "cuda" in state:
        torch.cuda.set_rng_state(state["cuda"].cpu(), device)


def gather_rng_states(rt):
    """Every rank's dropout RNG state, in rank order (collective under DDP)."""
    mine = rng_state(rt.device)
    if not rt.ddp:
        return [mine]
    mine = {k: v.cpu() for k, v in mine.items()}
    everyone = [None] * rt.world_size
    dist.all_gather_object(everyone, mine)
    return everyone


# =============================================================================
# training
# =============================================================================

class StopSignal:
    """SIGTERM / SIGUSR1 (Slurm preemption or time limit) and SIGINT (Ctrl-C): stop cleanly.

    The signals are blocked in the main thread before torch.distributed starts its C++ threads,
    which inherit the block: an asynchronous signal landing in a gloo or NCCL thread interrupts its
    socket calls and can abort the process. A watcher thread (blocked too) takes them with
    sigtimedwait. Until the first training step is done (`interruptible`: setup, data, compile, the
    first eval) there is nothing to lose, so the process ends at once with one line: a compile of
    many minutes does not delay the stop. (Raising into the main thread instead was tried: an
    exception unwinding through torch.compile aborted the process.) After that the loop polls
    `received` once per iteration and checkpoints. Checkpoints are written atomically, so an exit
    mid-write leaves the previous one whole.
    """

    SIGNALS = {signal.SIGTERM, signal.SIGUSR1, signal.SIGINT}

    def __init__(self, stopped_early="before the first training step: nothing to save"):
        self._received = None
        self.interruptible = True
        self.stopped_early = stopped_early
        self.previous_handlers = {sig: signal.signal(sig, self._handle) for sig in self.SIGNALS}
        self.previous_mask = signal.pthread_sigmask(signal.SIG_BLOCK, self.SIGNALS)
        self._closing = threading.Event()
        self._watcher = threading.Thread(target=self._watch, name="stop-signal-watcher", daemon=True)
        self._watcher.start()

    def _watch(self):
        while not self._closing.is_set():
            info = signal.sigtimedwait(self.SIGNALS, 0.2)
            if info is not None:
                self._note(info.si_signo)

    def _handle(self, signum, frame):
        """A signal delivered to a thread that never blocked it (one started before this object)."""
        self._note(signum)

    def _note(self, signum):
        name = signal.Signals(signum).name
        if self.interruptible or (name == "SIGINT" and self._received is not None):
            if int(os.environ.get("RANK", 0)) == 0:
                what = self.stopped_early if self.interruptible else "second Ctrl-C: exiting without waiting"
                print(f"stopped by {name} {what}", flush=True)
            sys.stdout.flush()
            os._exit(0 if self.interruptible else 130)
        self._received = self._received or name

    @property
    def received(self):
        """Name of the first stop signal seen, else None."""
        return self._received

    def uninstall(self):
        """Stop the watcher, drop what is pending (it was acted on), restore the mask and handlers."""
        self._closing.set()
        self._watcher.join()
        while signal.sigpending() & self.SIGNALS:
            signal.sigtimedwait(self.SIGNALS, 0)
        signal.pthread_sigmask(signal.SIG_SETMASK, self.previous_mask)
        for sig, handler in self.previous_handlers.items():
            signal.signal(sig, handler)


def build_model(cfg, rt, meta):
    """Model (on the device) plus the checkpoint it came from, if resuming."""
    checkpoint = None
    init_from = cfg.init_from
    ckpt_path = Path(cfg.out_dir) / "ckpt.pt"
    if init_from == "resume":
        if ckpt_path.exists():
            checkpoint = load_checkpoint(ckpt_path, rt.device)
        else:
            init_from = cfg.resume_fallback
        if rt.master:
            print(f"resuming from {ckpt_path}" if checkpoint else
                  f"note: --init_from resume but {ckpt_path} does not exist yet; starting from {init_from}")
    if checkpoint is not None:
        check_resume_matches(cfg, checkpoint, ckpt_path, rt, meta)
        model = model_from_checkpoint(checkpoint, ckpt_path, dropout=cfg.dropout)
    elif init_from == "scratch":
        vocab_size = meta["vocab_size"] if meta else 50304
        model = GPT(GPTConfig(block_size=cfg.block_size, vocab_size=vocab_size, n_layer=cfg.n_layer,
                              n_head=cfg.n_head, n_embd=cfg.n_embd, dropout=cfg.dropout, bias=cfg.bias))
    else:
        model = gpt_from_pretrained(init_from, cfg.dropout)
    if cfg.block_size < model.config.block_size:
        model.crop_block_size(cfg.block_size)
    elif cfg.block_size > model.config.block_size:
        raise UsageError(f"--block_size {cfg.block_size} exceeds the model's context "
                         f"{model.config.block_size}; lower it")
    return model.to(rt.device), checkpoint


def model_from_checkpoint(checkpoint, path, dropout):
    """The checkpoint's model (its architecture, with this run's dropout); bad contents are one line."""
    try:
        model = GPT(GPTConfig(**dict(checkpoint["model_args"], dropout=dropout)))
        model.load_state_dict(checkpoint["model"])
    except (TypeError, RuntimeError, AttributeError) as exc:
        first_line = str(exc).strip().splitlines()[0][:160] if str(exc).strip() else type(exc).__name__
        raise UsageError(f"{path}: its model does not load ({first_line}); delete it to start over") from None
    return model


# Resuming keeps the checkpoint's architecture; these options must then agree with it.
ARCHITECTURE_OPTIONS = ("n_layer", "n_head", "n_embd", "bias", "block_size")
# These may change on resume (e.g. a longer max_iters); the run says which did.
RESUMABLE_CHANGES = ("data_dir", "gradient_accumulation_steps", "batch_size", "learning_rate", "max_iters",
                     "weight_decay", "beta1", "beta2", "grad_clip", "decay_lr", "warmup_iters", "lr_decay_iters",
                     "min_lr", "seed", "dropout", "eval_interval", "eval_iters", "always_save_checkpoint", "dtype")


def check_resume_matches(cfg, checkpoint, path, rt, meta=None):
    """Refuse a resume whose command asks for another model or vocabulary; say which training
    settings changed, and when there is nothing left to train."""
    model_args = checkpoint["model_args"]
    # what the command would build without the checkpoint: OpenAI's sizes when it starts from them
    wanted = {name: getattr(cfg, name) for name in ARCHITECTURE_OPTIONS}
    if cfg.resume_fallback in MODEL_SIZES:
        wanted.update(MODEL_SIZES[cfg.resume_fallback], bias=True)
    clashes = [f"--{name} {wanted[name]} (checkpoint: {model_args[name]})" for name in ARCHITECTURE_OPTIONS
               if name in model_args and wanted[name] != model_args[name]]
    if clashes:
        raise UsageError(f"--init_from resume: {path} holds another model than the command asks for: "
                         f"{', '.join(clashes)}; drop those options to resume it, or use a new --out_dir")
    if "meta" in checkpoint and checkpoint["meta"] != meta:
        saved = f"a char vocabulary of {checkpoint['meta']['vocab_size']}" if checkpoint["meta"] else "GPT-2 tokens"
        now = f"a char vocabulary of {meta['vocab_size']}" if meta else "GPT-2 tokens"
        raise UsageError(f"--init_from resume: {path} was trained on {saved}, but --data_dir {cfg.data_dir} holds "
                         f"{now}; resume with the checkpoint's --data_dir, or use a new --out_dir")
    saved = checkpoint["config"]
    changed = [f"{name} {saved[name]} -> {getattr(cfg, name)}" for name in RESUMABLE_CHANGES
               if name in saved and saved[name] != getattr(cfg, name)]
    if changed and rt.master:
        print(f"note: resuming with settings that differ from the checkpoint's: {', '.join(changed)}")
    if checkpoint["iter_num"] >= cfg.max_iters and not (cfg.eval_only or cfg.bench) and rt.master:
        print(f"note: {path} is at iter {checkpoint['iter_num']}, not below --max_iters {cfg.max_iters}: "
              "nothing left to train; raise --max_iters to continue")


def check_vocab(tokens, vocab_size, path):
    """A token id >= vocab_size would crash deep inside CUDA; check a prefix of the data up front."""
    largest = int(tokens[: 1 << 20].max())
    if largest >= vocab_size:
        raise UsageError(f"{path} holds token id {largest} but the model's vocabulary has {vocab_size}; "
                         "was the data prepared with another tokenizer?")


class Metrics:
    """out_dir/metrics.jsonl: one JSON object per log line (rank 0 only)."""

    def __init__(self, out_dir, enabled, resume_iter=None, resume_evaluated=False, fresh=False):
        self.path = Path(out_dir) / "metrics.jsonl"
        self.enabled = enabled
        if enabled and resume_iter is not None and self.path.exists():
            self._trim(resume_iter, resume_evaluated)
        elif enabled and fresh and self.path.exists():
            self.path.write_text("")  # a run started over: its records must not follow the old run's

    def _trim(self, resume_iter, keep_eval_at_resume):
        """Drop records a crashed or preempted run wrote past its checkpoint, so the file reads as one run."""
        kept = []
        for line in self.path.read_text().splitlines():
            try:
                record = json.loads(line)
            except ValueError:
                continue  # a line torn by a crash mid-write
            at_resume_eval = record["iter"] == resume_iter and "val_loss" in record and keep_eval_at_resume
            if record["iter"] < resume_iter or at_resume_eval:
                kept.append(line)
        self.path.write_text("".join(line + "\n" for line in kept))

    def write(self, **record):
        if self.enabled:
            with open(self.path, "a") as f:
                f.write(json.dumps(record) + "\n")


@torch.no_grad()
def estimate_loss(model, splits, cfg, rt):
    """Mean loss over eval_iters fixed batches per split (the same batches at every eval, any world size)."""
    model.eval()
    losses = {}
    for split_index, (name, tokens) in enumerate(splits.items()):
        generator = torch.Generator().manual_seed(cfg.seed + 1 + split_index)
        starts = draw_window_starts(len(tokens), cfg.block_size, (cfg.eval_iters, cfg.batch_size), generator)
        total = torch.zeros((), device=rt.device)
        mine = starts[rt.rank::rt.world_size]  # ranks share the batches out
        for batch_starts in mine:
            x, y = to_device(*gather_windows(tokens, batch_starts, cfg.block_size), rt.device)
            with rt.autocast():
                _, loss = model(x, y)
            total += loss.float()
        losses[name] = all_ranks_mean(total, len(mine), rt)
    model.train()
    return losses


def train_step(model, optimizer, scaler, batches, accumulation, rt, grad_clip, want_loss):
    """One optimizer step over `accumulation` micro-batches. No GPU sync unless want_loss.

    Returns (sum of micro-batch losses or None, gradient norm tensor or None).
    """
    loss_sum = torch.zeros((), device=rt.device) if want_loss else None
    for micro in range(accumulation):
        last = micro == accumulation - 1
        # DDP all-reduces gradients only on the last micro-step; the others just accumulate locally
        sync = model.no_sync() if rt.ddp and not last else nullcontext()
        x, y = batches.current
        with sync:
            with rt.autocast():
                _, loss = model(x, y)
            batches.advance()  # build the next micro-batch while the GPU works on this one
            scaler.scale(loss / accumulation).backward()
        if want_loss:
            loss_sum += loss.detach().float()
    grad_norm = None
    if grad_clip > 0.0:
        scaler.unscale_(optimizer)
        grad_norm = torch.nn.utils.clip_grad_norm_(model.parameters(), grad_clip)
    scaler.step(optimizer)
    scaler.update()
    optimizer.zero_grad(set_to_none=True)
    return loss_sum, grad_norm


def set_learning_rate(optimizer, lr):
    for group in optimizer.param_groups:
        group["lr"] = lr


def prepare_out_dir(cfg):
    """Before any work: out_dir must take a checkpoint, and starting must not silently replace one.

    Creates nothing (the first checkpoint makes the folder): a run that fails later leaves no trace.
    """
    out_dir = Path(cfg.out_dir)
    problem = prepare_data.output_folder_problem(out_dir)
    if problem:
        raise UsageError(f"--out_dir {problem}; pass a folder for the checkpoint that you can write to")
    ckpt_path = out_dir / "ckpt.pt"
    if ckpt_path.exists() and cfg.init_from != "resume" and not cfg.overwrite and not cfg.eval_only:
        raise UsageError(f"{ckpt_path} already holds a run; continue it with --init_from resume, or start over "
                         f"with --overwrite (it is replaced at the first checkpoint) or another --out_dir")
    if ckpt_path.exists() and cfg.eval_only and cfg.init_from == "scratch":
        raise UsageError(f"--eval_only would evaluate a freshly initialized model, not {ckpt_path}; add "
                         "--init_from resume to evaluate the checkpoint")


def start_run(cfg):
    """What train() and bench() share: runtime, seed, per-rank accumulation, the data's vocabulary."""
    # checked before joining the process group, so a bad combination fails at once on every rank
    accumulation = accumulation_per_rank(cfg.gradient_accumulation_steps, torchrun_environment()[3])
    rt = setup_runtime(cfg)
    torch.manual_seed(cfg.seed + rt.rank)  # rank 0's init wins (DDP broadcasts it); dropout differs per rank
    if cfg.preset == "default" and not cfg.data_dir:
        cfg.data_dir = ensure_default_corpus(cfg, rt)
    meta = read_meta(cfg.data_dir) if cfg.data_dir else None
    return rt, accumulation, meta


def warn_if_slow_on_cpu(cfg, rt, meta):
    """Printed once the data is known to be there, before the model is built and compiled."""
    warning = cpu_time_warning(cfg, rt, meta["vocab_size"] if meta else 50304)
    if warning and rt.master:
        print(warning, file=sys.stderr, flush=True)


CPU_FLOPS = 100e9  # training FLOP/s of this file's CPU runs, measured on 2 cores (README's CPU recipe)
CPU_RECIPE = ("python3 train_baseline.py --preset shakespeare_char --device cpu --compile false --eval_iters 20 "
              "--block_size 64 --batch_size 12 --n_layer 4 --n_head 4 --n_embd 128 --max_iters 2000 "
              "--lr_decay_iters 2000 --dropout 0.0 --out_dir out/shakespeare_char_cpu")


def cpu_time_warning(cfg, rt, vocab_size):
    """One line when a run on the CPU is GPU-sized (hours) or compiles first (minutes); else None."""
    if rt.device.type != "cpu":
        return None
    model = GPTConfig(block_size=cfg.block_size, vocab_size=vocab_size, n_layer=cfg.n_layer, n_head=cfg.n_head,
                      n_embd=cfg.n_embd)
    params = 12 * cfg.n_layer * cfg.n_embd ** 2 + vocab_size * cfg.n_embd  # blocks + tied embedding
    steps = cfg.bench_warmup + cfg.bench_iters if cfg.bench else cfg.max_iters
    total_flops = flops_per_token(model, params) * tokens_per_step(
        cfg.batch_size, cfg.block_size, cfg.gradient_accumulation_steps) * steps
    hours = total_flops / CPU_FLOPS / 3600
    compiling = "; torch.compile alone takes minutes on a CPU before the first step" if cfg.compile else ""
    if hours > 0.5:
        return (f"warning: this run is sized for a GPU: about {hours:,.1f} h on a CPU at ~{CPU_FLOPS / 1e9:.0f} "
                f"GFLOP/s{compiling}. A CPU-sized run (under 2 min): {CPU_RECIPE}")
    if cfg.compile:
        return ("warning: torch.compile on a CPU takes minutes before the first step and gains little for "
                "small models; --compile false skips it")
    return None


def training_state(raw_model, tokens, cfg, rt):
    """Optimizer, GradScaler (active only for fp16) and the training batch stream of a run."""
    optimizer = configure_optimizer(raw_model, cfg, rt.device.type)
    scaler = torch.amp.GradScaler(rt.device.type, enabled=rt.dtype == torch.float16)
    batches = TrainBatches(tokens, cfg.block_size, cfg.batch_size, cfg.gradient_accumulation_steps,
                           rt.rank, rt.world_size, cfg.seed, rt.device)
    return optimizer, scaler, batches


def compile_and_wrap(model, cfg, rt):
    """(model for training, possibly DDP-wrapped; compiled model for evaluation)."""
    if cfg.compile:
        if rt.master:
            print("compiling the model (about a minute on the first step)...")
        model = torch.compile(model, mode=cfg.compile_mode)
    train_model = DDP(model, device_ids=[rt.device.index] if rt.device.type == "cuda" else None) if rt.ddp else model
    return train_model, model


class Trainer:
    """One training run: set up from cfg (or a checkpoint), then run() the loop."""

    def __init__(self, cfg):
        self.cfg = cfg
        prepare_out_dir(cfg)
        rt, self.accumulation, self.meta = start_run(cfg)
        self.rt = rt
        self.splits = {name: load_split(cfg.data_dir, name, cfg.block_size) for name in ("train", "val")}
        warn_if_slow_on_cpu(cfg, rt, self.meta)
        self.raw_model, checkpoint = build_model(cfg, rt, self.meta)
        self.ckpt_path = Path(cfg.out_dir) / "ckpt.pt"
        if rt.master:
            self.ckpt_path.parent.mkdir(parents=True, exist_ok=True)
        check_vocab(self.splits["train"], self.raw_model.config.vocab_size, Path(cfg.data_dir) / "train.bin")
        self.optimizer, self.scaler, self.batches = training_state(self.raw_model, self.splits["train"], cfg, rt)
        self.iter_num, self.best_val_loss, self.last_eval_iter = 0, float("inf"), None
        if checkpoint is not None:
            self._restore(checkpoint)
        self.metrics = Metrics(cfg.out_dir, rt.master, self.iter_num if checkpoint else None,
                               self.last_eval_iter == self.iter_num, fresh=checkpoint is None and not cfg.eval_only)
        self.model, self.eval_model = compile_and_wrap(self.raw_model, cfg, rt)
        self.step_tokens = tokens_per_step(cfg.batch_size, cfg.block_size, cfg.gradient_accumulation_steps)
        self.flops_per_token = flops_per_token(self.raw_model.config, self.raw_model.num_params())
        self.peak_flops = peak_flops_for(cfg.gpu_type, rt.device)
        self.losses = {}
        if rt.master:
            print(f"{self.raw_model.num_params() / 1e6:.2f}M parameters; world size {rt.world_size}, "
                  f"{self.accumulation} micro-steps per rank; {self.step_tokens:,} tokens per step; "
                  f"{rt.device}, {str(rt.dtype).removeprefix('torch.')}, compile {cfg.compile}; "
                  f"{describe_peak(self.peak_flops, cfg.gpu_type, rt.device)}")

    def _restore(self, checkpoint):
        self.optimizer.load_state_dict(checkpoint["optimizer"])
        if checkpoint["scaler"] and self.scaler.is_enabled():  # an fp16 run's loss scale (not bf16/fp32's)
            self.scaler.load_state_dict(checkpoint["scaler"])
        self.iter_num, self.best_val_loss = checkpoint["iter_num"], checkpoint["best_val_loss"]
        self.last_eval_iter = checkpoint["last_eval_iter"]
        self.batches.restore(checkpoint["batch_generator"])
        rng_states = checkpoint["rng_states"]
        if len(rng_states) == self.rt.world_size:
            restore_rng_state(rng_states[self.rt.rank], self.rt.device)
        elif self.rt.master:
            print(f"note: checkpoint from {len(rng_states)} ranks, now {self.rt.world_size}; dropout RNG reseeded")

    def save(self):
        """Collective under DDP (every rank's RNG state is gathered); only rank 0 writes."""
        rng_states = gather_rng_states(self.rt)
        if self.rt.master:
            save_checkpoint(self.ckpt_path, {
                "model": self.raw_model.state_dict(), "optimizer": self.optimizer.state_dict(),
                "scaler": self.scaler.state_dict(), "model_args": dataclasses.asdict(self.raw_model.config),
                "config": dataclasses.asdict(self.cfg), "iter_num": self.iter_num,
                "best_val_loss": self.best_val_loss, "last_eval_iter": self.last_eval_iter,
                "batch_generator": self.batches.state(), "rng_states": rng_states, "meta": self.meta,
                "world_size": self.rt.world_size,
            })

    def evaluate(self, lr):
        self.losses = estimate_loss(self.eval_model, self.splits, self.cfg, self.rt)
        self.last_eval_iter = self.iter_num
        train_loss, val_loss = self.losses["train"], self.losses["val"]
        if self.rt.master:
            print(f"step {self.iter_num}: train loss {train_loss:.4f}, val loss {val_loss:.4f}")
        self.metrics.write(iter=self.iter_num, train_loss=train_loss, val_loss=val_loss, lr=lr)
        improved = val_loss < self.best_val_loss
        self.best_val_loss = min(self.best_val_loss, val_loss)
        if self.iter_num > 0 and (improved or self.cfg.always_save_checkpoint) and not self.cfg.eval_only:
            self.save()
            if self.rt.master:
                print(f"saved checkpoint to {self.ckpt_path}")

    def log(self, loss, grad_norm, lr, step_seconds):
        tokens_per_s = self.step_tokens / step_seconds
        mfu = model_flops_utilization(self.flops_per_token, tokens_per_s / self.rt.world_size, self.peak_flops)
        if self.rt.master:
            print(f"iter {self.iter_num}: loss {loss:.4f}, lr {lr:.3e}, {step_seconds * 1000:.2f} ms/iter, "
                  f"{tokens_per_s:,.0f} tok/s, mfu {format_mfu(mfu)}")
        self.metrics.write(iter=self.iter_num, loss=loss, lr=lr, ms_per_iter=step_seconds * 1000,
                           tokens_per_s=tokens_per_s, mfu=mfu,
                           grad_norm=grad_norm.item() if grad_norm is not None else None)

    def stop_code(self, stop_signal, start_time):
        """2: a stop signal reached some rank; 1: time limit; 0: go on. The same on every rank."""
        time_up = self.cfg.time_limit > 0 and time.time() - start_time > self.cfg.time_limit
        return all_ranks_max(2 if stop_signal.received else 1 if time_up else 0, self.rt)

    def run(self, stop_signal):
        """The loop; returns True when it stopped for a signal (checkpoint written), False when done."""
        cfg = self.cfg
        start_time = time.time()
        window_start, window_iters = time.perf_counter(), 0  # ms/iter averages over each log window
        time_up = False
        while True:
            lr = learning_rate_at(self.iter_num, cfg)
            set_learning_rate(self.optimizer, lr)
            finished = self.iter_num >= cfg.max_iters or time_up or cfg.eval_only
            # a resumed run skips the eval its checkpoint was written at
            due = (self.iter_num % cfg.eval_interval == 0 or finished) and self.last_eval_iter != self.iter_num
            if due or cfg.eval_only:
                self.evaluate(lr)
                window_start, window_iters = time.perf_counter(), 0  # eval time stays out of ms/iter
            if finished:
                if time_up:  # a time-limited run stays resumable whatever its val loss did
                    self.save()
                return False
            want_log = self.iter_num % cfg.log_interval == 0
            loss_sum, grad_norm = train_step(self.model, self.optimizer, self.scaler, self.batches,
                                             self.accumulation, self.rt, cfg.grad_clip, want_log)
            stop_signal.interruptible = False  # from here on a stop signal saves a checkpoint first
            window_iters += 1
            if want_log:
                loss = all_ranks_mean(loss_sum, self.accumulation, self.rt)  # .item() waits for the GPU...
                now = time.perf_counter()  # ...so the clock is read after the queued work is done
                self.log(loss, grad_norm, lr, (now - window_start) / window_iters)
                window_start, window_iters = now, 0
            self.iter_num += 1
            if self.rt.ddp and self.iter_num % STOP_POLL_EVERY:
                continue  # under DDP the poll is a collective + host sync: not on every step
            stop = self.stop_code(stop_signal, start_time)
            if stop == 2:
                self.save()
                if self.rt.master:
                    print(f"preempted: checkpoint saved at iter {self.iter_num} to {self.ckpt_path}", flush=True)
                return True
            time_up = stop == 1
            if time_up and self.rt.master:
                print(f"time limit: --time_limit {cfg.time_limit:g} s reached at iter {self.iter_num}; evaluating and "
                      f"saving (continue with --init_from resume)", flush=True)


def train(cfg):
    """Train per cfg; returns a summary dict (final iteration, losses, whether preempted, the model)."""
    stop_signal = StopSignal()
    try:
        trainer = Trainer(cfg)
        preempted = trainer.run(stop_signal)
    finally:
        stop_signal.uninstall()
    result = {"iter": trainer.iter_num, "preempted": preempted, "losses": trainer.losses,
              "model": trainer.raw_model, "meta": trainer.meta}
    rt = trainer.rt
    del trainer
    leave_process_group(rt)
    return result


# =============================================================================
# benchmark
# =============================================================================

def bench(cfg):
    """nanoGPT bench.py's measurement with our training step: untimed warm-up, then timed steps."""
    rt, accumulation, meta = start_run(cfg)
    use_real = cfg.bench_data == "real" or (
        cfg.bench_data == "auto" and (Path(cfg.data_dir) / "train.bin").exists())
    tokens = load_split(cfg.data_dir, "train", cfg.block_size) if use_real else None
    warn_if_slow_on_cpu(cfg, rt, meta)
    raw_model, _ = build_model(cfg, rt, meta)
    if use_real:
        check_vocab(tokens, raw_model.config.vocab_size, Path(cfg.data_dir) / "train.bin")
    else:  # random tokens through the same loading path, so host-to-device copies are still timed
        tokens = np.random.default_rng(cfg.seed).integers(0, raw_model.config.vocab_size, 1 << 20,
                                                          dtype=np.uint16)
    warmup_seconds, seconds = time_training_steps(cfg, rt, raw_model, tokens, accumulation)
    step_tokens = tokens_per_step(cfg.batch_size, cfg.block_size, cfg.gradient_accumulation_steps)
    tokens_per_s = step_tokens * cfg.bench_iters / seconds
    peak = peak_flops_for(cfg.gpu_type, rt.device)
    mfu = model_flops_utilization(flops_per_token(raw_model.config, raw_model.num_params()),
                                  tokens_per_s / rt.world_size, peak)
    result = {
        "bench": "train_baseline", "ms_per_iter": seconds / cfg.bench_iters * 1000, "tokens_per_s": tokens_per_s,
        "mfu": mfu, "peak_flops": peak, "warmup_s": warmup_seconds, "params": raw_model.num_params(),
        "batch_size": cfg.batch_size, "block_size": cfg.block_size,
        "gradient_accumulation_steps": cfg.gradient_accumulation_steps, "grad_clip": cfg.grad_clip,
        "world_size": rt.world_size,
        "device": torch.cuda.get_device_name(rt.device) if rt.device.type == "cuda" else str(rt.device),
        "dtype": str(rt.dtype).removeprefix("torch."), "compile": cfg.compile, "data": "real" if use_real else "random",
    }
    if rt.master:
        print(f"bench: {result['ms_per_iter']:.2f} ms/iter, {tokens_per_s:,.0f} tok/s, mfu {format_mfu(mfu)} "
              f"({describe_peak(peak, cfg.gpu_type, rt.device)}; warm-up {warmup_seconds:.1f} s)")
        print(json.dumps(result))
    leave_process_group(rt)
    return result


def time_training_steps(cfg, rt, raw_model, tokens, accumulation):
    """Seconds for bench_warmup untimed-purpose steps (compilation happens here), then for bench_iters."""
    optimizer, scaler, batches = training_state(raw_model, tokens, cfg, rt)
    set_learning_rate(optimizer, cfg.learning_rate)
    model, _ = compile_and_wrap(raw_model, cfg, rt)
    durations = []
    for steps in (cfg.bench_warmup, cfg.bench_iters):
        synchronize(rt.device)
        start = time.perf_counter()
        for _ in range(steps):  # no loss read-back: nothing syncs the GPU inside the timed loop
            train_step(model, optimizer, scaler, batches, accumulation, rt, cfg.grad_clip, want_loss=False)
        synchronize(rt.device)
        durations.append(time.perf_counter() - start)
    return durations


def synchronize(device):
    if device.type == "cuda":
        torch.cuda.synchronize(device)


# =============================================================================
# sampling
# =============================================================================

def make_codec(meta):
    """(encode, decode, vocab_size) for a char vocabulary from meta.pkl, or GPT-2 BPE when meta is None."""
    if meta is not None:
        stoi, itos = meta["stoi"], meta["itos"]

        def encode(text):
            unknown = sorted({ch for ch in text if ch not in stoi})
            if unknown:
                raise UsageError(f"the prompt has characters outside the model's vocabulary: {unknown[:10]}")
            return [stoi[ch] for ch in text]

        return encode, lambda ids: "".join(itos[i] for i in ids), len(itos)
    try:
        enc = prepare_data.gpt2_encoding()
    except (RuntimeError, OSError) as exc:  # offline without GPT2_TIKTOKEN_FILE, or it names no file
        raise UsageError(str(exc)) from None
    return (lambda text: enc.encode(text, allowed_special={"<|endoftext|>"})), enc.decode, enc.n_vocab


def generate_text(model, codec, start, num_samples, max_new_tokens, temperature, top_k, seed, device,
                  dtype=torch.float32):
    """num_samples continuations of the prompt `start` (a list of strings, prompt included)."""
    encode, decode, vocab_size = codec
    model.eval()
    generator = torch.Generator(device=device).manual_seed(seed)
    prompt = encode(start)
    if not prompt:
        raise UsageError("the prompt encodes to no tokens; pass a non-empty --start")
    idx = torch.tensor([prompt], dtype=torch.long, device=device)
    autocast = torch.autocast(device.type, dtype=dtype) if dtype != torch.float32 else nullcontext()
    samples = []
    with autocast:
        for _ in range(num_samples):
            out = model.generate(idx, max_new_tokens, temperature=temperature, top_k=top_k, generator=generator,
                                 vocab_size=vocab_size)
            samples.append(decode(out[0].tolist()))
    return samples


def build_sample_parser():
    parser = prepare_data.OneLineErrorParser(
        prog="train_baseline.py sample", description="Generate text from a checkpoint (or OpenAI's GPT-2 weights).")
    parser.add_argument("--out_dir", default="out/default", help="folder holding ckpt.pt (default out/default)")
    parser.add_argument("--init_from", default="resume", choices=["resume", *MODEL_SIZES],
                        help="resume = out_dir/ckpt.pt; gpt2* = OpenAI weights (needs transformers)")
    parser.add_argument("--start", default="\n", help="prompt text, or FILE:path to read it from a file")
    parser.add_argument("--num_samples", type=int, default=10)
    parser.add_argument("--max_new_tokens", type=int, default=500)
    parser.add_argument("--temperature", type=float, default=0.8, help="<1 sharper, >1 more random")
    parser.add_argument("--top_k", type=int, default=200, help="sample among the k likeliest tokens (0 = all)")
    parser.add_argument("--seed", type=int, default=1337)
    parser.add_argument("--device", default="auto", help="auto | cpu | cuda | cuda:N")
    parser.add_argument("--dtype", default="auto", choices=["auto", "float32", "bfloat16", "float16"])
    return parser


def sample_main(argv):
    args = build_sample_parser().parse_args(argv)
    if args.num_samples < 1 or args.max_new_tokens < 1:
        raise UsageError("--num_samples and --max_new_tokens must be at least 1")
    if not (math.isfinite(args.temperature) and args.temperature > 0):
        raise UsageError(f"--temperature must be a positive number (got {args.temperature})")
    if args.top_k < 0:
        raise UsageError(f"--top_k must be >= 0 (got {args.top_k}); 0 samples among all tokens")
    if not 0 <= args.seed <= MAX_SEED:
        raise UsageError(f"--seed must lie in [0, 2**62] (got {args.seed})")
    start = args.start
    if start.startswith("FILE:"):  # read before the model loads: a typo fails at once
        try:
            start = Path(start[5:]).read_text(encoding="utf-8")
        except (OSError, UnicodeDecodeError) as e:
            raise UsageError(f"cannot read the prompt file {start[5:]}: {getattr(e, 'strerror', None) or e.reason}")
    device = pick_device(args.device, 0, ddp=False)
    if args.init_from == "resume":
        ckpt_path = Path(args.out_dir) / "ckpt.pt"
        if not ckpt_path.exists():
            raise UsageError(f"{ckpt_path} not found; train first or pass --out_dir of a finished run")
        checkpoint = load_checkpoint(ckpt_path, device, required=SAMPLE_KEYS)
        model = model_from_checkpoint(checkpoint, ckpt_path, dropout=0.0)
        meta = checkpoint.get("meta") or read_meta(args.out_dir)
    else:
        model, meta = gpt_from_pretrained(args.init_from), None
    samples = generate_text(model.to(device), make_codec(meta), start, args.num_samples, args.max_new_tokens,
                            args.temperature, args.top_k or None, args.seed, device, pick_dtype(args.dtype, device))
    for text in samples:
        print(text)
        print("---------------")


# =============================================================================
# default run: offline, CPU, a few minutes
# =============================================================================

def ensure_default_corpus(cfg, rt):
    """data/shakespeare_char if it is prepared, else a char corpus of stdlib sources (prepared once)."""
    def prepared(folder):
        return all((folder / name).exists() for name in ("train.bin", "val.bin", "meta.pkl"))

    shakespeare, stdlib = Path("data/shakespeare_char"), Path("data/stdlib_char")
    if prepared(shakespeare):
        return str(shakespeare)
    if rt.master:
        problem = prepare_data.output_folder_problem(stdlib)
        if problem:
            raise UsageError(f"the default corpus folder {problem}; run from a folder you can write to, "
                             "or pass --data_dir")
        # a no-op when it is up to date; rebuilt when --corpus_bytes (or the stdlib) changed
        fresh = not prepared(stdlib)
        if fresh:
            print(f"preparing a character-level corpus from the Python standard library in {stdlib} (once)")
        summary = prepare_data.prepare_text(prepare_data.python_stdlib_files(max_bytes=cfg.corpus_bytes), stdlib,
                                            tokenizer="char", progress=fresh)
        if not fresh and not summary["reused"]:
            print(f"rebuilt the corpus in {stdlib} for --corpus_bytes {cfg.corpus_bytes:,}")
    if rt.ddp:
        dist.barrier()
    return str(stdlib)


def print_default_sample(result, cfg):
    """The default run ends by showing what the model learned."""
    model = result["model"]
    device = next(model.parameters()).device
    text = generate_text(model, make_codec(result["meta"]), "\n", num_samples=1, max_new_tokens=300, temperature=0.8,
                         top_k=200, seed=cfg.seed, device=device)[0]
    print(f"sample from {cfg.out_dir}/ckpt.pt:\n{text}\n---------------")
    print(f"more: python3 train_baseline.py sample --out_dir {cfg.out_dir} --num_samples 3")


# =============================================================================
# command line
# =============================================================================

def main(argv):
    try:
        if argv and argv[0] == "sample":
            sample_main(argv[1:])
            return
        cfg = parse_config(argv)
        torchrun_environment()  # checked before anything starts
        if cfg.bench:
            stop_signal = StopSignal(stopped_early="before the bench finished")  # nothing to save: ends at once
            try:
                bench(cfg)
            finally:
                stop_signal.uninstall()
            return
        result = train(cfg)
        if cfg.preset == "default" and not result["preempted"] and int(os.environ.get("RANK", 0)) == 0:
            print_default_sample(result, cfg)
    except UsageError as e:
        raise SystemExit(f"error: {e}")
    except KeyboardInterrupt:  # Ctrl-C outside training (sampling, start-up): nothing to save
        print("stopped by SIGINT", flush=True)
        raise SystemExit(130) from None


if __name__ == "__main__":
    main(sys.argv[1:])
