"""
Data preparation for both trainers: turns text into uint16 token files.

Two on-disk formats are produced and read here:
  * nanoGPT ".bin": a bare little-endian uint16 token array (train.bin / val.bin),
    plus meta.pkl {vocab_size, itos, stoi} for character-level vocabularies.
  * FineWeb shard (llm.c / modded-nanogpt): 256 little-endian int32 header
    [magic 20240520, version 1, num_tokens, 0, ...] followed by num_tokens uint16 tokens.

Subcommands (python3 prepare_data.py <sub> --out_dir DIR ...):
  shakespeare_char, shakespeare   tiny corpus, char-level or GPT-2 BPE, 90/10 split
  openwebtext                     nanoGPT's recipe through Hugging Face `datasets`
  fineweb10B, fineweb100B, finewebedu10B
                                  download pre-tokenized shards (modded-nanogpt's cache)
  text INPUT...                   tokenize your own files / folders / globs
"""

import argparse
import functools
import glob
import hashlib
import json
import math
import multiprocessing
import os
import pickle
import sys
import sysconfig
import time
from pathlib import Path

import numpy as np

BOS_TOKEN = 50256          # GPT-2 <|endoftext|>; we put it at the START of every document
FINEWEB_MAGIC = 20240520
FINEWEB_VERSION = 1
HEADER_INTS = 256
HEADER_BYTES = HEADER_INTS * 4
GPT2_VOCAB_SIZE = 50257
MANIFEST_NAME = "manifest.json"

# -----------------------------------------------------------------------------
# tokenizer


@functools.lru_cache(maxsize=None)
def gpt2_encoding():
    """GPT-2 BPE as a tiktoken Encoding, offline when GPT2_TIKTOKEN_FILE names the ranks file."""
    import tiktoken
    vocab_file = os.environ.get("GPT2_TIKTOKEN_FILE")
    if vocab_file:
        if not os.path.isfile(vocab_file):
            raise FileNotFoundError(f"GPT2_TIKTOKEN_FILE={vocab_file} does not exist; "
                                    "point it at a gpt2.tiktoken ranks file or unset it")
        from tiktoken.load import load_tiktoken_bpe
        from tiktoken_ext.openai_public import r50k_pat_str
        return tiktoken.Encoding(
            name="gpt2",
            explicit_n_vocab=GPT2_VOCAB_SIZE,
            pat_str=r50k_pat_str,
            mergeable_ranks=load_tiktoken_bpe(vocab_file),
            special_tokens={"<|endoftext|>": BOS_TOKEN},
        )
    try:
        return tiktoken.get_encoding("gpt2")
    except Exception as exc:  # usually no network: tiktoken fetches the vocab on first use
        raise RuntimeError(f"could not load the GPT-2 vocabulary through tiktoken ({type(exc).__name__}); offline, "
                           "set GPT2_TIKTOKEN_FILE=/path/to/gpt2.tiktoken") from exc


# -----------------------------------------------------------------------------
# token files: writing and reading


def _as_uint16(tokens):
    tokens = np.asarray(tokens)
    if tokens.dtype != np.uint16 and tokens.size:
        lo, hi = int(tokens.min()), int(tokens.max())
        if lo < 0 or hi >= 65536:
            raise ValueError(f"token ids must fit uint16 (0..65535), got range [{lo}, {hi}]")
    return tokens.astype(np.uint16, copy=False).ravel()


def _atomic_write(path, chunks):
    """Write byte chunks to path.tmp, fsync, then rename: readers never see half a file."""
    path = Path(path)
    tmp = path.with_name(path.name + ".tmp")
    with open(tmp, "wb") as f:
        for chunk in chunks:
            f.write(chunk)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)


def fineweb_header(num_tokens):
    header = np.zeros(HEADER_INTS, dtype="<i4")
    header[0], header[1], header[2] = FINEWEB_MAGIC, FINEWEB_VERSION, num_tokens
    return header


def write_fineweb_shard(path, tokens):
    tokens = _as_uint16(tokens)
    if len(tokens) >= 2**31:
        raise ValueError(f"{path}: {len(tokens)} tokens do not fit the int32 header; use smaller shards")
    _atomic_write(path, [fineweb_header(len(tokens)).tobytes(), tokens.astype("<u2").tobytes()])


def write_bin(path, tokens):
    _atomic_write(path, [_as_uint16(tokens).astype("<u2").tobytes()])


# First int32 of the headered token files we know of (llm.c's formats): what each one is.
SHARD_MAGICS = {
    FINEWEB_MAGIC: "a FineWeb shard (256-int32 header + GPT-2 tokens: train_speedrun.py's format)",
    20240801: "an llm.c Llama-3 shard (256-int32 header + uint32 tokens)",
}
MAKE_SHARDS = ("build FineWeb shards with `python3 prepare_data.py text FILES --format fineweb --out_dir DIR` "
               "or download them with `python3 prepare_data.py fineweb10B`")
MAKE_BIN = "build train.bin/val.bin with `python3 prepare_data.py text FILES --out_dir DIR` (--format bin)"


def read_magic(path):
    """The first little-endian int32 of a file, or None when it is shorter than 4 bytes."""
    with open(path, "rb") as f:
        first = f.read(4)
    return int.from_bytes(first, "little", signed=True) if len(first) == 4 else None


def read_fineweb_header(path):
    """(version, num_tokens) of a FineWeb shard; ValueError if the file is not one."""
    with open(path, "rb") as f:
        raw = f.read(HEADER_BYTES)
    header = np.frombuffer(raw[:len(raw) // 4 * 4], dtype="<i4")
    if len(header) and header[0] != FINEWEB_MAGIC:
        what = SHARD_MAGICS.get(int(header[0]), "a raw token file (a nanoGPT .bin?) or something else")
        raise ValueError(f"{path}: magic number {header[0]} is not {FINEWEB_MAGIC}, so it is not a FineWeb shard "
                         f"but {what}; {MAKE_SHARDS}")
    if len(raw) < HEADER_BYTES:
        raise ValueError(f"{path}: {len(raw)} bytes is shorter than the {HEADER_BYTES}-byte FineWeb "
                         "header; delete it and re-run prepare_data.py")
    return int(header[1]), int(header[2])


def check_fineweb_file(path):
    """Raise ValueError unless path is a complete FineWeb shard; returns num_tokens."""
    version, num_tokens = read_fineweb_header(path)
    if version != FINEWEB_VERSION:
        raise ValueError(f"{path}: FineWeb version {version} is unsupported (expected {FINEWEB_VERSION})")
    held = (os.path.getsize(path) - HEADER_BYTES) / 2
    if num_tokens < 0 or held != num_tokens:
        raise ValueError(f"{path}: header says {num_tokens} tokens but file holds {held:g}; "
                         "delete it and re-run prepare_data.py")
    return num_tokens


def load_tokens(path, fmt=None):
    """Memory-mapped uint16 tokens of a FineWeb shard or a raw nanoGPT .bin.

    fmt None: detected by the magic. A raw GPT-2 .bin cannot start with it: as uint16 pairs it
    reads 54856, 308, and 54856 is outside GPT-2's 50257-token vocabulary. fmt "bin": only a raw
    .bin (a file that starts with a known shard magic is refused, never read as tokens); fmt
    "fineweb": only a FineWeb shard.
    """
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"{path}: no such token file; run prepare_data.py first")
    size = path.stat().st_size
    magic = read_magic(path)
    if fmt == "bin" and magic in SHARD_MAGICS:
        raise ValueError(f"{path} is {SHARD_MAGICS[magic]}, not a nanoGPT .bin of raw uint16 tokens; "
                         f"train_baseline.py reads .bin files: {MAKE_BIN}")
    if fmt == "fineweb" or magic == FINEWEB_MAGIC:
        num_tokens = check_fineweb_file(path)
        if num_tokens == 0:
            return np.zeros(0, dtype=np.uint16)
        return np.memmap(path, dtype="<u2", mode="r", offset=HEADER_BYTES, shape=(num_tokens,))
    if size % 2:
        raise ValueError(f"{path}: {size} bytes is not a whole number of uint16 tokens (truncated?); "
                         "delete it and re-run prepare_data.py")
    if size == 0:
        return np.zeros(0, dtype=np.uint16)
    return np.memmap(path, dtype="<u2", mode="r")


# -----------------------------------------------------------------------------
# offline default corpus: the Python standard library's own sources

_SKIP_DIRS = {"test", "tests", "idle_test", "site-packages", "dist-packages", "__pycache__"}


def python_stdlib_files(max_bytes=None):
    """Sorted .py files of this interpreter's stdlib (no tests, no third-party packages).

    With max_bytes, keeps the sorted prefix whose sizes add up to at most max_bytes.
    """
    root = Path(sysconfig.get_paths()["stdlib"])
    found = []
    for dirpath, dirnames, filenames in os.walk(root):
        dirnames[:] = [d for d in dirnames if d not in _SKIP_DIRS and not d.startswith(".")]
        found += [Path(dirpath) / name for name in filenames if name.endswith(".py")]
    found.sort(key=lambda p: p.relative_to(root).as_posix())
    if max_bytes is None:
        return found
    kept, total = [], 0
    for path in found:
        size = path.stat().st_size
        if total + size > max_bytes:
            break
        kept.append(path)
        total += size
    return kept


# -----------------------------------------------------------------------------
# text -> tokens


def expand_inputs(inputs, exclude_dir=None):
    """Files named by inputs (files, folders walked recursively, globs), in a stable order.

    Hidden entries and __pycache__ inside folders are skipped; so is anything a folder walk or a
    glob finds under exclude_dir (the output folder, so a re-run never tokenizes its own outputs).
    A file named explicitly is always kept.
    """
    if isinstance(inputs, (str, os.PathLike)):  # one path given bare, not in a list
        inputs = [inputs]
    exclude = Path(exclude_dir).resolve() if exclude_dir is not None else None
    files = []
    for item in inputs:
        item = str(item)
        if any(ch in item for ch in "*?["):
            matches = sorted(glob.glob(item, recursive=True))
            if not matches:
                raise FileNotFoundError(f"input pattern {item!r} matches no files")
            paths = [Path(m) for m in matches if not _inside(Path(m), exclude)]
        else:
            path = Path(item)
            if not path.exists():
                raise FileNotFoundError(f"input {item} does not exist; check the path")
            paths = [path]
        for path in paths:
            if path.is_file():
                files.append(path)
            elif path.is_dir():
                for dirpath, dirnames, filenames in os.walk(path):
                    dirnames[:] = sorted(d for d in dirnames
                                         if not d.startswith(".") and d != "__pycache__")
                    found = [Path(dirpath) / n for n in sorted(filenames) if not n.startswith(".")]
                    files += [f for f in found if not _inside(f, exclude)]
    unique = list(dict.fromkeys(f.resolve() for f in files))  # same file named twice: once
    return unique


def _inside(path, folder):
    return folder is not None and folder in path.resolve().parents


def _read_text(path):
    """(text, content digest) or (None, reason) when the file is unreadable or not UTF-8."""
    try:
        raw = Path(path).read_bytes()
        return raw.decode("utf-8"), hashlib.blake2b(raw, digest_size=8).hexdigest()
    except (OSError, UnicodeDecodeError) as exc:
        return None, f"{path}: {type(exc).__name__}: {exc}".splitlines()[0][:200]


def _encode_gpt2_file(path):
    """Worker: one file -> (digest, uint16 tokens without BOS) or (None, reason)."""
    text, digest = _read_text(path)
    if text is None:
        return None, digest
    return digest, np.array(gpt2_encoding().encode_ordinary(text), dtype=np.uint16)


class _Progress:
    """One self-overwriting stderr line, refreshed at most twice a second."""

    def __init__(self, label, total, enabled=True):
        self.label, self.total, self.enabled = label, total, enabled
        self.start = self.last = time.time()

    def update(self, done, extra=""):
        now = time.time()
        if self.enabled and (now - self.last > 0.5 or done == self.total):
            self.last = now
            rate = done / max(now - self.start, 1e-9)
            print(f"\r{self.label}: {done}/{self.total} ({rate:.0f}/s) {extra}   ",
                  end="", file=sys.stderr, flush=True)

    def close(self):
        if self.enabled:
            print(file=sys.stderr, flush=True)


_SMALL_INPUT_BYTES = 4_000_000  # below this a process pool costs more than it saves


def tokenize_files(files, tokenizer, workers=None, progress=True):
    """Returns (docs, skipped, vocab): docs = [(digest, path, tokens)], skipped = [reason].

    gpt2 docs carry no BOS yet (added when pieces are built); char vocab is the sorted character set.
    """
    if tokenizer == "char":
        return _tokenize_char(files)
    if tokenizer != "gpt2":
        raise ValueError(f"unknown tokenizer {tokenizer!r}; use gpt2 or char")
    gpt2_encoding()  # load once in the parent so forked workers inherit it
    workers = workers or min(os.cpu_count() or 1, 16)
    small = sum(f.stat().st_size for f in files) < _SMALL_INPUT_BYTES
    docs, skipped = [], []
    bar = _Progress("tokenizing files", len(files), progress)
    if workers == 1 or small or len(files) == 1:
        results = map(_encode_gpt2_file, files)
        pool = None
    else:
        pool = multiprocessing.get_context("fork").Pool(workers)
        results = pool.imap(_encode_gpt2_file, files, chunksize=16)
    try:
        for i, (path, (digest, tokens_or_reason)) in enumerate(zip(files, results), 1):
            if digest is None:
                skipped.append(tokens_or_reason)
            else:
                docs.append((digest, str(path), tokens_or_reason))
            bar.update(i)
    except BaseException:
        if pool is not None:
            pool.terminate()  # do not wait for workers after Ctrl-C or a crash
        raise
    if pool is not None:
        pool.close()
        pool.join()
    bar.close()
    return docs, skipped, None


def _tokenize_char(files):
    texts, skipped = [], []
    for path in files:
        text, digest = _read_text(path)
        if text is None:
            skipped.append(digest)
        else:
            texts.append((digest, str(path), text))
    vocab = sorted(set().union(*(set(t) for _, _, t in texts))) if texts else []
    if len(vocab) > 65536:
        raise ValueError(f"{len(vocab)} distinct characters do not fit uint16 token ids")
    # code point -> id by binary search over the sorted vocabulary's code points
    codepoints = np.array([ord(c) for c in vocab], dtype=np.uint32)
    docs = []
    for digest, path, text in texts:
        points = np.frombuffer(text.encode("utf-32-le"), dtype="<u4")
        docs.append((digest, path, np.searchsorted(codepoints, points).astype(np.uint16)))
    return docs, skipped, vocab


def split_document(tokens, max_doc_tokens, bos=BOS_TOKEN):
    """Cut one document into pieces of at most max_doc_tokens tokens, each starting with BOS.

    The speedrun loader only reads the first 2048 tokens after each BOS, so long documents
    must be cut or their tails are never trained on.
    """
    if max_doc_tokens is not None and max_doc_tokens < 2:
        raise ValueError(f"max_doc_tokens={max_doc_tokens} leaves no room for text after BOS; use >= 2")
    tokens = np.asarray(tokens, dtype=np.uint16)
    step = len(tokens) if max_doc_tokens is None else max_doc_tokens - 1
    step = max(step, 1)
    bos_arr = np.array([bos], dtype=np.uint16)
    if len(tokens) == 0:
        return [bos_arr]
    return [np.concatenate([bos_arr, tokens[i:i + step]]) for i in range(0, len(tokens), step)]


def build_pieces(docs, max_doc_tokens=None, min_doc_tokens=0, bos=BOS_TOKEN):
    """BOS-prefixed pieces from a list of BOS-less token arrays.

    Consecutive documents shorter than min_doc_tokens are joined under one BOS (until the group
    reaches min_doc_tokens), so many tiny files do not turn a batch into mostly BOS tokens.
    """
    pieces, group, group_len = [], [], 0
    limit = None if max_doc_tokens is None else max_doc_tokens - 1

    def flush():
        nonlocal group, group_len
        if group:
            pieces.extend(split_document(np.concatenate(group), max_doc_tokens, bos))
            group, group_len = [], 0

    for tokens in docs:
        if len(tokens) >= min_doc_tokens:
            flush()
            pieces.extend(split_document(tokens, max_doc_tokens, bos))
            continue
        if limit is not None and group_len + len(tokens) > limit:
            flush()
        group.append(np.asarray(tokens, dtype=np.uint16))
        group_len += len(tokens)
        if group_len >= min_doc_tokens:
            flush()
    flush()
    return pieces


def split_train_val(docs, val_fraction):
    """(train_docs, val_docs) from token arrays in their final order.

    The last val_fraction of all tokens goes to val; the document on the boundary is cut in two
    (so a single file such as tinyshakespeare gets nanoGPT's first-90%/last-10% split).
    """
    if not 0.0 <= val_fraction < 1.0:
        raise ValueError(f"val_fraction={val_fraction} must be in [0, 1)")
    total = sum(len(d) for d in docs)
    train_left = int(total * (1.0 - val_fraction))
    train, val = [], []
    for tokens in docs:
        if train_left >= len(tokens):
            train.append(tokens)
            train_left -= len(tokens)
        elif train_left > 0:
            train.append(tokens[:train_left])
            val.append(tokens[train_left:])
            train_left = 0
        else:
            val.append(tokens)
    return train, val


def _chunk_pieces(pieces, shard_tokens):
    """Group pieces into shards of at most shard_tokens, cutting between pieces where possible."""
    shards, current, current_len = [], [], 0
    for piece in pieces:
        while len(piece):
            room = shard_tokens - current_len
            if len(piece) > room and current:  # start a fresh shard rather than cut the piece
                shards.append(np.concatenate(current))
                current, current_len = [], 0
                continue
            take = piece[:shard_tokens]
            current.append(take)
            current_len += len(take)
            piece = piece[len(take):]
    if current:
        shards.append(np.concatenate(current))
    return shards


# -----------------------------------------------------------------------------
# prepare_text: the one entry point that writes token files


def _manifest_inputs(files):
    return [[str(f), f.stat().st_size, f.stat().st_mtime_ns] for f in files]


def _outputs_valid(out_dir, manifest):
    for name, size in manifest.get("outputs", {}).items():
        path = out_dir / name
        if not path.is_file() or path.stat().st_size != size:
            return False
        try:
            load_tokens(path) if name.endswith(".bin") else None
        except ValueError:
            return False
    return True


def prepare_text(inputs, out_dir, *, tokenizer="gpt2", fmt="bin", val_fraction=0.1,
                 shard_tokens=100_000_000, max_doc_tokens=None, min_doc_tokens=None,
                 workers=None, name_prefix="text", force=False, progress=True):
    """Tokenize text files into train/val token files under out_dir; returns a summary dict.

    tokenizer: "gpt2" (every document starts with BOS 50256) or "char" (meta.pkl, no BOS).
    fmt: "bin" -> train.bin/val.bin; "fineweb" -> {prefix}_val_000000.bin, {prefix}_train_000001.bin...
    max_doc_tokens: cut documents into BOS-led pieces of at most this many tokens (gpt2 only).
    min_doc_tokens: join consecutive shorter documents under one BOS; default max_doc_tokens // 8
      when max_doc_tokens is set, else 0 (no joining).
    Documents are ordered by a hash of their contents (a deterministic shuffle) and the last
    val_fraction of tokens becomes val. Re-running with the same inputs and options is a no-op.
    """
    if tokenizer not in ("gpt2", "char"):
        raise ValueError(f"unknown tokenizer {tokenizer!r}; use gpt2 or char")
    if fmt not in ("bin", "fineweb"):
        raise ValueError(f"unknown format {fmt!r}; use bin or fineweb")
    if tokenizer == "char" and (max_doc_tokens or min_doc_tokens):
        raise ValueError("max_doc_tokens/min_doc_tokens need BOS-delimited documents; use tokenizer=gpt2")
    if shard_tokens < 1:
        raise ValueError(f"shard_tokens={shard_tokens} must be positive")
    if min_doc_tokens is None:
        min_doc_tokens = max_doc_tokens // 8 if max_doc_tokens else 0
    out_dir = Path(out_dir)
    files = expand_inputs(inputs, exclude_dir=out_dir)
    if not files:
        raise FileNotFoundError(f"no input files found in {inputs}")

    options = dict(tokenizer=tokenizer, fmt=fmt, val_fraction=val_fraction, shard_tokens=shard_tokens,
                   max_doc_tokens=max_doc_tokens, min_doc_tokens=min_doc_tokens, name_prefix=name_prefix)
    inputs_sig = _manifest_inputs(files)
    manifest_path = out_dir / MANIFEST_NAME
    if manifest_path.exists() and not force:
        try:
            old = json.loads(manifest_path.read_text())
        except (OSError, ValueError):
            old = {}
        if old.get("options") == options and old.get("inputs") == inputs_sig and _outputs_valid(out_dir, old):
            if progress:
                print(f"{out_dir}: up to date ({old['summary']['train_tokens']:,} train tokens); "
                      "pass --force to rebuild", file=sys.stderr)
            return dict(old["summary"], reused=True)

    docs, skipped, vocab = tokenize_files(files, tokenizer, workers, progress)
    if not docs:  # one error line, naming the first file and why, instead of a warning per file
        raise ValueError(f"none of the {len(files)} input files is readable UTF-8 text ({skipped[0]})")
    for reason in skipped[:5]:
        print(f"warning: skipped {reason}", file=sys.stderr)
    if len(skipped) > 5:
        print(f"warning: skipped {len(skipped) - 5} more unreadable or non-UTF-8 files", file=sys.stderr)

    docs.sort(key=lambda d: (d[0], d[1]))  # content-hash order: deterministic and mixes folders
    train_docs, val_docs = split_train_val([d[2] for d in docs], val_fraction)
    if tokenizer == "gpt2":
        train = build_pieces(train_docs, max_doc_tokens, min_doc_tokens)
        val = build_pieces(val_docs, max_doc_tokens, min_doc_tokens) if val_docs else []
    else:
        train, val = train_docs, val_docs

    out_dir.mkdir(parents=True, exist_ok=True)
    manifest_path.unlink(missing_ok=True)  # stale until the new outputs are all in place
    outputs = _write_outputs(out_dir, fmt, train, val, shard_tokens, name_prefix)
    if vocab is not None:
        meta = {"vocab_size": len(vocab), "itos": dict(enumerate(vocab)),
                "stoi": {ch: i for i, ch in enumerate(vocab)}}
        _atomic_write(out_dir / "meta.pkl", [pickle.dumps(meta)])
        outputs.append(out_dir / "meta.pkl")

    summary = dict(
        out_dir=str(out_dir), tokenizer=tokenizer, format=fmt, files=len(docs),
        skipped_files=len(skipped), documents=len(docs),
        pieces=len(train) + len(val), train_tokens=int(sum(len(p) for p in train)),
        val_tokens=int(sum(len(p) for p in val)),
        vocab_size=len(vocab) if vocab is not None else GPT2_VOCAB_SIZE,
        outputs=[str(p) for p in outputs], reused=False,
    )
    manifest = dict(options=options, inputs=inputs_sig, summary=summary,
                    outputs={p.name: p.stat().st_size for p in outputs})
    _atomic_write(manifest_path, [json.dumps(manifest, indent=1).encode()])
    if progress:
        print(f"{out_dir}: {summary['files']} files -> {summary['train_tokens']:,} train / "
              f"{summary['val_tokens']:,} val tokens", file=sys.stderr)
    return summary


def _write_outputs(out_dir, fmt, train, val, shard_tokens, prefix):
    def concat(pieces):
        return np.concatenate(pieces) if pieces else np.zeros(0, dtype=np.uint16)

    if fmt == "bin":
        write_bin(out_dir / "train.bin", concat(train))
        write_bin(out_dir / "val.bin", concat(val))
        return [out_dir / "train.bin", out_dir / "val.bin"]
    # fineweb: val shards count from 000000, train shards from 000001 (modded-nanogpt's naming)
    paths = []
    val_shards = _chunk_pieces(val, shard_tokens) or [np.zeros(0, dtype=np.uint16)]
    for i, tokens in enumerate(val_shards):
        paths.append(out_dir / f"{prefix}_val_{i:06d}.bin")
        write_fineweb_shard(paths[-1], tokens)
    for i, tokens in enumerate(_chunk_pieces(train, shard_tokens), 1):
        paths.append(out_dir / f"{prefix}_train_{i:06d}.bin")
        write_fineweb_shard(paths[-1], tokens)
    # shards left over from an earlier, larger run would be picked up by the trainers' globs
    for stale in out_dir.glob(f"{prefix}_*.bin"):
        if stale not in paths and ("_train_" in stale.name or "_val_" in stale.name):
            stale.unlink()
    return paths


# -----------------------------------------------------------------------------
# downloads: resumable, retried, validated before they land under their final name

SHAKESPEARE_URL = "https://raw.githubusercontent.com/karpathy/char-rnn/master/data/tinyshakespeare/input.txt"
HF_DATASETS = "https://huggingface.co/datasets"
# subcommand -> (Hugging Face dataset repo, shard file prefix, train shards available); each
# train shard holds 100M GPT-2 tokens (~200 MB), the val shard 100M as well (modded-nanogpt's cache)
FINEWEB_SOURCES = {
    "fineweb10B": ("kjj0/fineweb10B-gpt2", "fineweb", 103),
    "fineweb100B": ("kjj0/fineweb100B-gpt2", "fineweb", 1030),
    "finewebedu10B": ("kjj0/finewebedu10B-gpt2", "finewebedu", 99),
}


DOWNLOAD_CHUNK_BYTES = 1 << 20  # what a dropped connection can lose; the rest resumes via Range


class DownloadError(RuntimeError):
    pass


class _Retryable(Exception):
    pass


def download_file(url, dest, *, validate=None, retries=5, timeout=30.0, backoff=1.0, progress=True):
    """Stream url to dest via dest.part, resuming with HTTP Range after dropped connections.

    validate(path) may raise ValueError: the download is then deleted and reported, never renamed
    into place. A dest that already exists and validates is kept as is. Returns dest.
    """
    import requests
    dest = Path(dest)
    if dest.exists():
        try:
            if validate is not None:
                validate(dest)
            return dest
        except ValueError as exc:
            print(f"warning: {exc}; downloading it again", file=sys.stderr)
            dest.unlink()
    new_folders = [d for d in (dest.parent, *dest.parent.parents) if not d.exists()]  # deepest first
    dest.parent.mkdir(parents=True, exist_ok=True)
    part = dest.with_name(dest.name + ".part")
    last_error = None
    for attempt in range(retries + 1):
        if attempt:
            time.sleep(backoff * 2 ** (attempt - 1))
        try:
            _fetch_into(requests, url, part, timeout, progress)
            break
        except (_Retryable, requests.ConnectionError, requests.Timeout,
                requests.exceptions.ChunkedEncodingError) as exc:
            last_error = str(exc).splitlines()[0][:200] if str(exc) else type(exc).__name__
            if progress and attempt < retries:  # the last failure is the DownloadError's one line
                print(f"\nwarning: {dest.name}: attempt {attempt + 1} failed ({last_error}); retrying",
                      file=sys.stderr)
    else:
        failed = f"{url}: failed after {retries + 1} attempt{'s' if retries else ''} ({last_error})"
        kept = part.stat().st_size if part.exists() else 0
        if kept:
            raise DownloadError(f"{failed}; re-run to resume from {part} ({kept:,} bytes kept)")
        # nothing arrived: leave no empty .part or folder behind that looks like a half-done download
        part.unlink(missing_ok=True)
        for folder in new_folders:
            try:
                folder.rmdir()
            except OSError:
                break
        raise DownloadError(f"{failed}; nothing was downloaded: check the network connection and the URL")
    if validate is not None:
        try:
            validate(part)
        except ValueError as exc:
            part.unlink()
            raise DownloadError(f"{url}: downloaded file is corrupt ({exc}); it was deleted") from None
    with open(part, "rb") as f:
        os.fsync(f.fileno())
    os.replace(part, dest)
    return dest


def _fetch_into(requests, url, part, timeout, progress):
    """One HTTP attempt: append to part (or restart it); raises _Retryable on transient trouble."""
    offset = part.stat().st_size if part.exists() else 0
    headers = {"Range": f"bytes={offset}-"} if offset else {}
    with requests.get(url, headers=headers, stream=True, timeout=timeout) as response:
        status = response.status_code
        if status == 404:
            raise DownloadError(f"{url}: 404 not found; check the URL (--base_url) and the file name")
        if status == 416 and offset:  # nothing left past our offset: the .part may be complete
            return
        if status >= 500 or status == 429:
            raise _Retryable(f"HTTP {status}")
        if status not in (200, 206):
            raise DownloadError(f"{url}: HTTP {status} {response.reason}")
        if offset and status == 200:  # server ignored Range: start over from byte 0
            offset = 0
        elif status == 206 and not response.headers.get("Content-Range", "").startswith(f"bytes {offset}-"):
            part.unlink()
            raise _Retryable(f"unexpected Content-Range {response.headers.get('Content-Range')!r}")
        length = response.headers.get("Content-Length")
        total = offset + int(length) if length is not None else None
        done, start, shown = offset, time.time(), 0.0
        with open(part, "ab" if offset else "wb") as f:
            for chunk in response.iter_content(chunk_size=DOWNLOAD_CHUNK_BYTES):
                f.write(chunk)
                done += len(chunk)
                now = time.time()
                if progress and (now - shown > 0.5):
                    shown = now
                    _show_download(part.name[:-5], done, total, offset, now - start)
        if progress:
            _show_download(part.name[:-5], done, total, offset, time.time() - start)
            print(file=sys.stderr)
        if total is not None and done != total:
            raise _Retryable(f"connection closed at {done} of {total} bytes")


def _show_download(name, done, total, offset, seconds):
    rate = (done - offset) / 1e6 / max(seconds, 1e-9)
    of_total = f"/{total / 1e6:.1f}" if total is not None else ""
    print(f"\r{name}: {done / 1e6:.1f}{of_total} MB ({rate:.1f} MB/s)   ", end="", file=sys.stderr, flush=True)


def download_fineweb(which, out_dir, chunks=9, base_url=None, retries=5, timeout=30.0, backoff=1.0,
                     progress=True, force=False):
    """Val shard plus the first `chunks` train shards of a pre-tokenized FineWeb cache."""
    repo, prefix, available = FINEWEB_SOURCES[which]
    if not 1 <= chunks <= available:
        raise ValueError(f"--chunks {chunks} is out of range; {which} has train shards 1..{available}")
    base_url = (base_url or f"{HF_DATASETS}/{repo}/resolve/main").rstrip("/")
    names = [f"{prefix}_val_{0:06d}.bin"] + [f"{prefix}_train_{i:06d}.bin" for i in range(1, chunks + 1)]
    paths = []
    for i, name in enumerate(names, 1):
        if progress:
            print(f"[{i}/{len(names)}] {name}", file=sys.stderr)
        if force:
            (Path(out_dir) / name).unlink(missing_ok=True)
        paths.append(download_file(f"{base_url}/{name}", Path(out_dir) / name, validate=check_fineweb_file,
                                   retries=retries, timeout=timeout, backoff=backoff, progress=progress))
    return paths


# -----------------------------------------------------------------------------
# openwebtext: nanoGPT's recipe (HF datasets, 0.05% val with seed 2357), BOS-first documents


def prepare_openwebtext(out_dir, workers=None, force=False):
    try:
        from datasets import load_dataset
    except ImportError:
        raise SystemExit("error: openwebtext needs Hugging Face datasets: pip install datasets") from None
    out_dir = Path(out_dir)
    done_marker = out_dir / MANIFEST_NAME
    if done_marker.exists() and not force and _outputs_valid(out_dir, json.loads(done_marker.read_text())):
        print(f"{out_dir}: up to date; pass --force to rebuild", file=sys.stderr)
        return
    workers = workers or max(1, min(os.cpu_count() or 1, 16) // 2)
    encoding = gpt2_encoding()

    def encode(example):  # runs in the datasets worker processes
        ids = [BOS_TOKEN] + encoding.encode_ordinary(example["text"])
        return {"ids": ids, "len": len(ids)}

    splits = load_dataset("openwebtext", num_proc=workers)["train"].train_test_split(
        test_size=0.0005, seed=2357, shuffle=True)
    splits = {"train": splits["train"], "val": splits["test"]}
    out_dir.mkdir(parents=True, exist_ok=True)
    sizes = {}
    for split, dataset in splits.items():
        tokenized = dataset.map(encode, remove_columns=["text"], num_proc=workers, desc=f"tokenizing {split}")
        total = int(np.sum(tokenized["len"], dtype=np.uint64))
        path = out_dir / f"{split}.bin"
        tmp = path.with_name(path.name + ".tmp")
        out = np.memmap(tmp, dtype="<u2", mode="w+", shape=(total,))
        pos, batches = 0, min(1024, len(tokenized))
        for b in range(batches):  # contiguous slices keep memory flat while filling the memmap
            ids = np.concatenate(tokenized.shard(batches, b, contiguous=True).with_format("numpy")["ids"])
            out[pos:pos + len(ids)] = ids
            pos += len(ids)
            print(f"\rwriting {path}: {b + 1}/{batches}", end="", file=sys.stderr, flush=True)
        out.flush()
        del out
        os.replace(tmp, path)
        sizes[path.name] = path.stat().st_size
        print(f"\n{path}: {total:,} tokens", file=sys.stderr)
    _atomic_write(done_marker, [json.dumps({"outputs": sizes}).encode()])


# -----------------------------------------------------------------------------
# command line


class OneLineErrorParser(argparse.ArgumentParser):
    """argparse whose usage errors are one `error: ...` line on stderr (exit 2), like ours."""

    def error(self, message):
        self.exit(2, f"error: {message} (see {self.prog} --help)\n")


def output_folder_problem(folder):
    """Why `folder` cannot take output files (a file, under a file, not writable), else None.

    Creates nothing: a command that fails later must not leave empty folders behind.
    """
    path = Path(folder)
    if path.exists() and not path.is_dir():
        return f"{folder} is a file, not a folder"
    existing = path
    while not existing.exists():
        existing = existing.parent
    if not existing.is_dir():
        return f"{folder} cannot be created: {existing} is a file, not a folder"
    if not os.access(existing, os.W_OK | os.X_OK):
        return f"{folder} is not writable (no write permission on {existing}, or a read-only file system)"
    return None


def _shakespeare(args, tokenizer):
    out_dir = Path(args.out_dir)
    if args.input:
        source = Path(args.input)
    else:
        try:
            source = download_file(args.url, out_dir / "input.txt", retries=args.retries, timeout=args.timeout)
        except DownloadError as exc:
            raise DownloadError(f"{exc}; or give a local copy of the text with --input FILE") from None
    return prepare_text([source], out_dir, tokenizer=tokenizer, val_fraction=0.1, force=args.force)


def build_parser():
    parser = OneLineErrorParser(prog="prepare_data.py",
                                description="Prepare token files for train_baseline.py / train_speedrun.py")
    subs = parser.add_subparsers(dest="command", required=True)

    def add(name, help_text, default_out):
        sub = subs.add_parser(name, help=help_text)
        sub.add_argument("--out_dir", default=default_out, help=f"output folder (default {default_out})")
        sub.add_argument("--force", action="store_true", help="rebuild even if outputs are up to date")
        return sub

    def add_download_options(sub):
        sub.add_argument("--retries", type=int, default=5, help="attempts after the first one (default 5)")
        sub.add_argument("--timeout", type=float, default=30.0, help="seconds per connection attempt (default 30)")

    for name, tok in (("shakespeare_char", "character-level"), ("shakespeare", "GPT-2 BPE")):
        sub = add(name, f"tinyshakespeare, {tok}, 90/10 split -> train.bin/val.bin", f"data/{name}")
        sub.add_argument("--url", help=f"where to download the text from (default {SHAKESPEARE_URL})")
        sub.add_argument("--input", help="use this local copy instead of downloading")
        add_download_options(sub)

    sub = add("openwebtext", "OpenWebText via Hugging Face datasets (~54 GB cache, 17 GB train.bin)",
              "data/openwebtext")
    sub.add_argument("--workers", type=int, default=None)

    for name, (repo, _, available) in FINEWEB_SOURCES.items():
        sub = add(name, f"download pre-tokenized shards of {repo} (100M tokens each)", f"data/{name}")
        sub.add_argument("--chunks", type=int, default=9, help=f"train shards to fetch, 1..{available} (default 9)")
        sub.add_argument("--base_url", default=None, help=f"default {HF_DATASETS}/{repo}/resolve/main")
        add_download_options(sub)

    sub = add("text", "tokenize your own files, folders or globs", None)
    sub.add_argument("inputs", nargs="+", help="files, folders (recursive) or quoted globs")
    sub.add_argument("--tokenizer", choices=["gpt2", "char"], default="gpt2")
    sub.add_argument("--format", dest="fmt", choices=["bin", "fineweb"], default="bin",
                     help="bin: train.bin/val.bin (baseline); fineweb: headered shards (speedrun)")
    sub.add_argument("--shard_tokens", type=int, default=None,
                     help="--format fineweb: tokens per shard (default 100000000)")
    sub.add_argument("--max_doc_tokens", type=int, default=None,
                     help="cut documents into BOS-led pieces of at most N tokens (2048 for the speedrun)")
    sub.add_argument("--min_doc_tokens", type=int, default=None,
                     help="join shorter consecutive documents (default max_doc_tokens // 8)")
    sub.add_argument("--val_fraction", type=float, default=0.1)
    sub.add_argument("--workers", type=int, default=None)
    sub.add_argument("--name_prefix", default=None, help="--format fineweb: shard names PREFIX_train_000001.bin "
                                                         "(default text)")
    return parser


def check_args(args):
    """Every option's range and combination, before any work: a one-line SystemExit otherwise."""
    def fail(message):
        raise SystemExit(f"error: {message}")

    if args.command == "text" and args.out_dir is None:
        fail("text needs --out_dir DIR (where train/val files go)")
    problem = output_folder_problem(args.out_dir)
    if problem:
        fail(f"--out_dir {problem}; pass a folder you can write to")
    if getattr(args, "retries", 0) < 0:
        fail(f"--retries must be >= 0 (got {args.retries})")
    if hasattr(args, "timeout") and not (math.isfinite(args.timeout) and args.timeout > 0):
        fail(f"--timeout must be a positive number of seconds (got {args.timeout})")
    if getattr(args, "workers", None) is not None and args.workers < 1:
        fail(f"--workers must be at least 1 (got {args.workers}); leave it out for one per CPU core")
    for option in ("url", "base_url"):
        url = getattr(args, option, None)
        if url is not None and not url.startswith(("http://", "https://")):
            fail(f"--{option} {url!r} is not an http:// or https:// URL")
    if getattr(args, "input", None):
        if args.url is not None:
            fail("--input and --url exclude each other: --input reads a local copy, --url downloads one")
        if not Path(args.input).is_file():
            fail(f"--input {args.input} " + ("is a folder" if Path(args.input).is_dir() else "does not exist")
                 + "; pass a tinyshakespeare text file")
    elif hasattr(args, "url") and args.url is None:
        args.url = SHAKESPEARE_URL
    if args.command != "text":
        return
    if not (math.isfinite(args.val_fraction) and 0.0 <= args.val_fraction < 1.0):
        fail(f"--val_fraction must lie in [0, 1) (got {args.val_fraction})")
    if args.fmt == "bin":
        given = [name for name in ("shard_tokens", "name_prefix") if getattr(args, name) is not None]
        if given:
            fail(f"--{given[0]} applies to --format fineweb only (--format bin writes train.bin and val.bin)")
    else:
        if args.tokenizer == "char":
            fail("--format fineweb needs --tokenizer gpt2: train_speedrun.py reads BOS-delimited GPT-2 tokens")
        if args.shard_tokens is not None and args.shard_tokens < 1:
            fail(f"--shard_tokens must be at least 1 (got {args.shard_tokens})")
        if args.name_prefix is not None and (not args.name_prefix or any(c in args.name_prefix for c in "/\\*?[")):
            fail(f"--name_prefix {args.name_prefix!r} must be a plain file name part (no '/' or glob characters)")
    if args.tokenizer == "char" and (args.max_doc_tokens is not None or args.min_doc_tokens is not None):
        fail("--max_doc_tokens/--min_doc_tokens need BOS-delimited documents: use --tokenizer gpt2")
    if args.max_doc_tokens is not None and args.max_doc_tokens < 2:
        fail(f"--max_doc_tokens must be at least 2 (BOS plus one token; got {args.max_doc_tokens})")
    if args.min_doc_tokens is not None and args.min_doc_tokens < 0:
        fail(f"--min_doc_tokens cannot be negative (got {args.min_doc_tokens})")
    args.shard_tokens = 100_000_000 if args.shard_tokens is None else args.shard_tokens
    args.name_prefix = "text" if args.name_prefix is None else args.name_prefix


def main(argv=None):
    args = build_parser().parse_args(argv)
    check_args(args)
    try:
        if args.command == "shakespeare_char":
            summary = _shakespeare(args, "char")
        elif args.command == "shakespeare":
            summary = _shakespeare(args, "gpt2")
        elif args.command == "openwebtext":
            return prepare_openwebtext(args.out_dir, args.workers, args.force)
        elif args.command in FINEWEB_SOURCES:
            paths = download_fineweb(args.command, args.out_dir, args.chunks, args.base_url,
                                     args.retries, args.timeout, force=args.force)
            total = sum(p.stat().st_size for p in paths)
            print(f"{args.out_dir}: {len(paths)} shards, {total / 1e9:.2f} GB", file=sys.stderr)
            return paths
        else:
            summary = prepare_text(args.inputs, args.out_dir, tokenizer=args.tokenizer, fmt=args.fmt,
                                   val_fraction=args.val_fraction, shard_tokens=args.shard_tokens,
                                   max_doc_tokens=args.max_doc_tokens, min_doc_tokens=args.min_doc_tokens,
                                   workers=args.workers, name_prefix=args.name_prefix, force=args.force)
    except (ValueError, OSError, RuntimeError) as exc:  # DownloadError is a RuntimeError
        raise SystemExit(f"error: {str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__}") \
            from None
    except KeyboardInterrupt:
        raise SystemExit("error: interrupted (Ctrl-C); outputs are written atomically, so re-running the same "
                         "command continues from what is complete") from None
    return summary


if __name__ == "__main__":
    main()
