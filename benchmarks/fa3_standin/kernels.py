"""Stand-in for the Hugging Face `kernels` package, as far as modded-nanogpt uses it.

Upstream's train_gpt.py (record #68) loads FlashAttention 3 with
    get_kernel('varunneal/flash-attention-3').flash_attn_interface
and calls its flash_attn_varlen_func on one packed sequence of documents. Machines without that
package (no network, no FA3 build) can put this folder on PYTHONPATH: the same call then runs the
same math on PyTorch FlexAttention. benchmarks/vs_upstream.py does that automatically.

Semantics reproduced (FA3's varlen contract, self-attention only):
  * q, k, v: (total_tokens, heads, head_dim); k/v may have fewer heads (grouped-query attention).
  * cu_seqlens_q: int32 document offsets [0, end_1, end_2, ..., total]; trailing repeats of the
    total (empty documents, as upstream's loader pads them) are allowed. Attention never crosses a
    document boundary. cu_seqlens_k must describe the same packing (it is not read).
  * causal=True; window_size=(left, right): a query at position i sees keys i-left .. i (left=-1:
    the whole document so far); with causal=True the right bound is 0 whatever `right` says.
  * softmax_scale: multiplies q.k before the softmax (None: 1/sqrt(head_dim)).
  * returns the output as a contiguous (total_tokens, heads, head_dim) tensor, like FA3.

Block mask. FlexAttention skips 128x128 tiles that a BlockMask marks empty. `create_block_mask`
finds them by evaluating the mask at every (query, key) pair, T^2 work: 2.7e11 pairs at upstream's
524k-token validation sequence (paired-head layers double the length). The default here
("bounds") instead derives each query tile's visible key tiles from three per-tile numbers (see
_bounds_block_tables), O(T + (T/128)^2). FA3_STANDIN_MASK=dense selects create_block_mask (small
sequences only; the tests check that both give the same tiles).

Inside torch.compile: the document ids that the mask_mod reads come out of a custom op. A
mask_mod reading a tensor computed by ordinary ops inside a compiled no-grad graph failed to lower
on torch 2.11 ("convert FlexibleLayout to FixedLayout first"; on CPU, torch 2.13 fails too); an
opaque op's output avoids it. The block tables are ordinary ops in the caller's graph (Inductor
fuses them); FA3_STANDIN_TABLES=op moves them into a custom op too, should a torch version refuse
that.

On CPU, FlexAttention has no backward: a call that needs gradients there runs the same mask_mod
densely through SDPA (CPU tests only; on the GPU every call is flex_attention).
"""
import inspect
import os
from types import SimpleNamespace

import torch
import torch._inductor.config
import torch.nn.functional as F
from torch import Tensor
from torch.nn.attention.flex_attention import (BlockMask, create_block_mask, create_mask,
                                               flex_attention)

# Not attention, but part of running upstream unchanged on torch 2.11: Inductor passes Python-float
# arguments of user Triton kernels as fp64, and upstream's softcapped cross-entropy kernel then
# fails to compile ("Loop-carried variable max_val has initial type fp32 but is re-assigned to
# fp64", seen on the H200 with record #68). Upstream imports this module before it compiles.
if hasattr(torch._inductor.config, "_use_fp64_for_unbacked_floats"):
    torch._inductor.config._use_fp64_for_unbacked_floats = False

BLOCK = 128                       # FlexAttention's default tile, in tokens
DENSE_MAX_TOKENS = 32768          # the dense path's (T, T) mask evaluation above this is refused
MASK_METHODS = ("bounds", "dense")
KNOWN_KERNELS = ("flash-attention-3", "flash-attn3", "flash_attn3")


# ---- document ids ----------------------------------------------------------------------------

def _document_ids_eager(cu_seqlens: Tensor, length: int) -> Tensor:
    positions = torch.arange(length, device=cu_seqlens.device, dtype=cu_seqlens.dtype)
    # the last offset <= position names the document; repeated offsets (empty documents) skip
    ids = torch.searchsorted(cu_seqlens.contiguous(), positions, right=True) - 1
    return ids.clamp_min(0).to(torch.int32)


def _document_ids_fake(cu_seqlens: Tensor, length: int) -> Tensor:
    return cu_seqlens.new_empty(length, dtype=torch.int32)


# registered once per process, whatever name this file was imported under (tests load it by path)
if not hasattr(torch.ops.fa3_standin, "document_ids"):
    torch.library.custom_op("fa3_standin::document_ids", _document_ids_eager,
                            mutates_args=()).register_fake(_document_ids_fake)


def document_ids(cu_seqlens: Tensor, length: int) -> Tensor:
    """(length,) int32 document index of every packed position; positions at or past the last
    offset belong to one trailing document (the padding to a whole tile lives there)."""
    return torch.ops.fa3_standin.document_ids(cu_seqlens, length)


# ---- block masks -----------------------------------------------------------------------------

def _mask_mod_for(doc: Tensor, left: int):
    """Same document, causal, at most `left` positions back (left < 0: no limit)."""
    if left < 0:
        def mask_mod(b, h, q_idx, kv_idx):
            return (doc[q_idx] == doc[kv_idx]) & (q_idx >= kv_idx)
    else:
        def mask_mod(b, h, q_idx, kv_idx):
            back = q_idx - kv_idx
            return (doc[q_idx] == doc[kv_idx]) & (back >= 0) & (back <= left)
    return mask_mod


def _ceil_div(x: Tensor, d: int) -> Tensor:
    return torch.div(x + (d - 1), d, rounding_mode="floor")


def _bounds_block_tables(cu_seqlens: Tensor, doc: Tensor, length: int, left: int,
                         block: int) -> tuple:
    """kv tables (counts, indices) of partial and of full tiles, each (1, 1, n, ...) int32.

    A row r sees keys lo(r) .. r with lo(r) = max(start of r's document, r - left). lo never
    decreases with r, so for query tile t (rows t*block .. t*block+block-1):
      * its lowest visible key tile is lo(first row) // block, and every tile from there to the
        diagonal t holds some visible key (the first row alone reaches all of them);
      * a key tile c < t is seen whole by every row iff lo(last row) <= c*block, i.e. from
        ceil(lo(last row) / block) on: those are "full" tiles (no mask_mod evaluated);
      * the rest of the run, and always the diagonal tile, is "partial".
    """
    n = length // block
    device = cu_seqlens.device
    tile = torch.arange(n, device=device)
    first_row, last_row = tile * block, tile * block + (block - 1)
    cu = cu_seqlens.to(torch.int64)
    start_first = cu[doc[first_row].to(torch.int64)]
    start_last = cu[doc[last_row].to(torch.int64)]
    if left >= 0:
        start_first = torch.maximum(start_first, first_row - left)
        start_last = torch.maximum(start_last, last_row - left)
    lowest = torch.div(start_first.clamp_min(0), block, rounding_mode="floor")
    first_full = torch.minimum(_ceil_div(start_last.clamp_min(0), block), tile)   # == tile: none
    num_full = tile - first_full
    num_partial = first_full - lowest + 1            # lowest .. first_full-1, then the diagonal
    col = torch.arange(n, device=device)[None, :]
    partial_idx = torch.where(col < (first_full - lowest)[:, None], lowest[:, None] + col,
                              tile[:, None])
    # entries past a row's count are never read; keep them in range
    full_idx = (first_full[:, None] + col).clamp_max(n - 1)

    def table(x: Tensor) -> Tensor:
        return x.to(torch.int32)[None, None].contiguous()

    return table(num_partial), table(partial_idx), table(num_full), table(full_idx)


# FA3_STANDIN_TABLES=op: the tables come out of a custom op as well (opaque buffers to the model's
# graph; on the GPU its body is one separately compiled graph). A fallback in case a torch version
# fails to lower the flex call on tables computed inside the model's graph, the default ("graph").
TABLE_MODES = ("graph", "op")


def _bounds_tables_op_eager(cu_seqlens: Tensor, doc: Tensor, length: int, left: int,
                            block: int) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    build = _bounds_block_tables
    if cu_seqlens.is_cuda:
        global _compiled_tables
        if _compiled_tables is None:
            _compiled_tables = torch.compile(_bounds_block_tables, dynamic=False, fullgraph=True)
        build = _compiled_tables
    return tuple(build(cu_seqlens, doc, length, left, block))     # fresh tensors: no aliasing


def _bounds_tables_op_fake(cu_seqlens: Tensor, doc: Tensor, length: int, left: int,
                           block: int) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    n = length // block
    new = lambda *shape: cu_seqlens.new_empty(shape, dtype=torch.int32)
    return new(1, 1, n), new(1, 1, n, n), new(1, 1, n), new(1, 1, n, n)


_compiled_tables = None
if not hasattr(torch.ops.fa3_standin, "bounds_tables"):
    torch.library.custom_op("fa3_standin::bounds_tables", _bounds_tables_op_eager,
                            mutates_args=()).register_fake(_bounds_tables_op_fake)


def table_mode() -> str:
    """FA3_STANDIN_TABLES: graph (default) or op."""
    mode = os.environ.get("FA3_STANDIN_TABLES", "graph").strip().lower() or "graph"
    if mode not in TABLE_MODES:
        raise ValueError(f"fa3_standin: FA3_STANDIN_TABLES={mode!r}; expected one of {', '.join(TABLE_MODES)}")
    return mode


# keyword options of BlockMask.from_kv_blocks in this torch (read once, outside any traced code)
_FROM_KV_OPTIONS = frozenset(inspect.signature(BlockMask.from_kv_blocks).parameters)


def build_block_mask(cu_seqlens: Tensor, length: int, left: int, method: str = "bounds",
                     block: int = BLOCK, with_backward: bool = True, tables: str = "graph") -> BlockMask:
    """Document-causal sliding-window BlockMask for a packed sequence of `length` positions
    (a multiple of `block`). with_backward=False leaves out the transposed (query) tables that
    only the backward pass reads (bounds method)."""
    if length % block:
        raise ValueError(f"fa3_standin: block mask length {length} is not a multiple of {block}")
    doc = document_ids(cu_seqlens, length)
    mask_mod = _mask_mod_for(doc, left)
    if method == "dense":
        if length > DENSE_MAX_TOKENS:
            raise ValueError(f"fa3_standin: the dense block mask evaluates {length}^2 pairs; "
                             f"use FA3_STANDIN_MASK=bounds above {DENSE_MAX_TOKENS} tokens")
        return create_block_mask(mask_mod, None, None, length, length, device=cu_seqlens.device,
                                 BLOCK_SIZE=block)
    if method != "bounds":
        raise ValueError(f"fa3_standin: unknown block mask method {method!r} "
                         f"(one of {', '.join(MASK_METHODS)})")
    if tables == "op":
        kv_num, kv_idx, full_num, full_idx = torch.ops.fa3_standin.bounds_tables(
            cu_seqlens, doc, length, left, block)
    else:
        kv_num, kv_idx, full_num, full_idx = _bounds_block_tables(cu_seqlens, doc, length, left, block)
    options = dict(seq_lengths=(length, length), compute_q_blocks=with_backward)
    return BlockMask.from_kv_blocks(kv_num, kv_idx, full_num, full_idx, BLOCK_SIZE=block,
                                    mask_mod=mask_mod,
                                    **{k: v for k, v in options.items() if k in _FROM_KV_OPTIONS})


def mask_method() -> str:
    """FA3_STANDIN_MASK: bounds (default) or dense."""
    method = os.environ.get("FA3_STANDIN_MASK", "bounds").strip().lower() or "bounds"
    if method not in MASK_METHODS:
        raise ValueError(f"fa3_standin: FA3_STANDIN_MASK={method!r}; expected one of "
                         f"{', '.join(MASK_METHODS)}")
    return method


# read once at import: the traced attention reads a plain module constant, not the environment
MASK_METHOD = mask_method()
TABLE_MODE = table_mode()


# ---- the FA3 entry point ---------------------------------------------------------------------

def flash_attn_varlen_func(q: Tensor, k: Tensor, v: Tensor, cu_seqlens_q: Tensor,
                           cu_seqlens_k: Tensor, max_seqlen_q: int = None, max_seqlen_k: int = None,
                           softmax_scale: float = None, causal: bool = False,
                           window_size: tuple = (-1, -1), **unsupported) -> Tensor:
    """FA3's packed-varlen attention on FlexAttention (see the module docstring)."""
    if not causal:
        raise NotImplementedError("fa3_standin: only causal=True is implemented")
    extra = [key for key, val in unsupported.items()     # FA3 options left at their defaults pass
             if not (val is None or (isinstance(val, (bool, int, float)) and not val))]
    if extra:
        raise NotImplementedError(f"fa3_standin: unsupported arguments {sorted(extra)}")
    if q.dim() != 3 or k.dim() != 3 or v.dim() != 3:
        raise ValueError(f"fa3_standin: q, k, v must be (total_tokens, heads, head_dim), got "
                         f"{tuple(q.shape)}, {tuple(k.shape)}, {tuple(v.shape)}")
    if not (q.size(0) == k.size(0) == v.size(0)):
        raise ValueError("fa3_standin: q, k and v must hold the same packed positions "
                         "(cross-attention is not implemented)")
    left = int(window_size[0])
    length, heads, head_dim = q.shape
    scale = head_dim ** -0.5 if softmax_scale is None else softmax_scale
    padded = -(-length // BLOCK) * BLOCK
    if padded != length:     # the padding forms its own trailing document; its rows are dropped
        q, k, v = (F.pad(t, (0, 0, 0, 0, 0, padded - length)) for t in (q, k, v))
    needs_grad = torch.is_grad_enabled() and any(t.requires_grad for t in (q, k, v))

    def to_bhtd(t: Tensor) -> Tensor:            # (T, H, D) -> (1, H, T, D), a view on the GPU
        t = t.transpose(0, 1).unsqueeze(0)
        # Inductor's CPU flex template reads the sizes of the buffer under a view and expects 4
        # dims (torch 2.13: "not enough values to unpack"): give it a real 4-d tensor there
        return t.contiguous() if t.device.type == "cpu" else t

    gqa = k.size(1) != heads
    if needs_grad and q.device.type == "cpu":
        # FlexAttention has no backward on CPU: the same mask_mod, evaluated densely, drives SDPA
        # (CPU tests of the training path; the GPU always takes flex_attention below)
        doc = document_ids(cu_seqlens_q, padded)
        allowed = create_mask(_mask_mod_for(doc, left), None, None, padded, padded, device=q.device)
        out = F.scaled_dot_product_attention(to_bhtd(q), to_bhtd(k), to_bhtd(v), attn_mask=allowed,
                                             scale=scale, enable_gqa=gqa)
    else:
        if not needs_grad:   # no autograd graph either way; CPU flex refuses inputs that want grads
            q, k, v = q.detach(), k.detach(), v.detach()
        block_mask = build_block_mask(cu_seqlens_q, padded, left, MASK_METHOD,
                                      with_backward=needs_grad, tables=TABLE_MODE)
        out = flex_attention(to_bhtd(q), to_bhtd(k), to_bhtd(v), block_mask=block_mask,
                             scale=scale, enable_gqa=gqa)
    return out[0].transpose(0, 1)[:length].contiguous()


flash_attn_interface = SimpleNamespace(flash_attn_varlen_func=flash_attn_varlen_func)


def get_kernel(repo_id: str, *args, **kwargs) -> SimpleNamespace:
    """`kernels.get_kernel` for FlashAttention 3 only; any other kernel name is refused."""
    if not any(name in repo_id.lower() for name in KNOWN_KERNELS):
        raise ValueError(f"fa3_standin: no stand-in for kernel {repo_id!r} (only FlashAttention 3: "
                         f"{', '.join(KNOWN_KERNELS)})")
    return SimpleNamespace(flash_attn_interface=flash_attn_interface, standin=True)
