"""prepare_data.py: token file formats, text pipeline, downloads (local HTTP server), CLI errors."""

import http.server
import os
import pickle
import subprocess
import sys
import threading
from pathlib import Path

import numpy as np
import pytest
from hypothesis import given, settings, strategies as st

import prepare_data as pd
from prepare_data import BOS_TOKEN

REPO = Path(__file__).resolve().parents[1]


def split_at_bos(tokens):
    """Documents of a BOS-led stream, BOS removed."""
    starts = np.flatnonzero(np.asarray(tokens) == BOS_TOKEN).tolist() + [len(tokens)]
    assert starts[0] == 0, "stream must start with BOS"
    return [np.asarray(tokens[a + 1:b]) for a, b in zip(starts, starts[1:])]


# -----------------------------------------------------------------------------
# file formats


def test_raw_bin_round_trip(tmp_path):
    tokens = np.array([0, 1, 65535, 50256, 7], dtype=np.uint16)
    pd.write_bin(tmp_path / "a.bin", tokens)
    loaded = pd.load_tokens(tmp_path / "a.bin")
    assert loaded.dtype == np.uint16 and loaded.tolist() == tokens.tolist()
    assert not (tmp_path / "a.bin.tmp").exists()


def test_fineweb_round_trip_and_header(tmp_path):
    tokens = np.arange(1000, dtype=np.int64) * 37 % 50257
    pd.write_fineweb_shard(tmp_path / "s.bin", tokens)
    assert (tmp_path / "s.bin").stat().st_size == pd.HEADER_BYTES + 2 * len(tokens)
    assert pd.read_fineweb_header(tmp_path / "s.bin") == (pd.FINEWEB_VERSION, 1000)
    assert pd.load_tokens(tmp_path / "s.bin").tolist() == tokens.tolist()


def test_empty_files_load_as_empty(tmp_path):
    pd.write_bin(tmp_path / "e.bin", [])
    pd.write_fineweb_shard(tmp_path / "f.bin", [])
    assert len(pd.load_tokens(tmp_path / "e.bin")) == 0
    assert len(pd.load_tokens(tmp_path / "f.bin")) == 0


def test_writers_reject_out_of_range_tokens(tmp_path):
    with pytest.raises(ValueError, match="uint16"):
        pd.write_bin(tmp_path / "x.bin", [1, 65536])
    with pytest.raises(ValueError, match="uint16"):
        pd.write_fineweb_shard(tmp_path / "y.bin", [-1])
    assert not list(tmp_path.iterdir())


def _shard_with_header(path, version=1, claimed=10, actual=10):
    header = pd.fineweb_header(claimed)
    header[1] = version
    path.write_bytes(header.tobytes() + np.zeros(actual, dtype="<u2").tobytes())
    return path


def test_wrong_version_rejected(tmp_path):
    with pytest.raises(ValueError, match="version 2"):
        pd.load_tokens(_shard_with_header(tmp_path / "v.bin", version=2))


@pytest.mark.parametrize("actual", [9, 11])
def test_token_count_mismatch_rejected(tmp_path, actual):
    path = _shard_with_header(tmp_path / "m.bin", claimed=10, actual=actual)
    with pytest.raises(ValueError, match=f"header says 10 tokens but file holds {actual}.*re-run"):
        pd.load_tokens(path)


def test_a_format_can_be_required(tmp_path):
    """The baseline asks for a raw .bin: a headered shard is refused by name, never read as tokens."""
    pd.write_fineweb_shard(tmp_path / "s.bin", np.arange(10))
    pd.write_bin(tmp_path / "r.bin", np.arange(600))
    assert pd.load_tokens(tmp_path / "r.bin", fmt="bin").tolist() == list(range(600))
    with pytest.raises(ValueError, match=r"s.bin is a FineWeb shard .* build train.bin/val.bin with `python3 "):
        pd.load_tokens(tmp_path / "s.bin", fmt="bin")
    assert pd.load_tokens(tmp_path / "s.bin", fmt="fineweb").tolist() == list(range(10))
    with pytest.raises(ValueError, match=r"magic number 65536 is not 20240520, so it is not a FineWeb shard but a "
                                         r"raw token file .*`python3 prepare_data.py text FILES --format fineweb"):
        pd.load_tokens(tmp_path / "r.bin", fmt="fineweb")


def test_truncated_files_rejected(tmp_path):
    full = _shard_with_header(tmp_path / "t.bin").read_bytes()
    (tmp_path / "short_header.bin").write_bytes(full[:100])
    with pytest.raises(ValueError, match="shorter than"):
        pd.load_tokens(tmp_path / "short_header.bin")
    (tmp_path / "odd.bin").write_bytes(b"\x01\x00\x02")
    with pytest.raises(ValueError, match="whole number"):
        pd.load_tokens(tmp_path / "odd.bin")
    with pytest.raises(FileNotFoundError):
        pd.load_tokens(tmp_path / "missing.bin")


# -----------------------------------------------------------------------------
# document / split / shard math (properties)

token_lists = st.lists(st.integers(0, BOS_TOKEN - 1), max_size=300)


@settings(max_examples=60, deadline=None)
@given(doc=token_lists, max_doc=st.integers(2, 64))
def test_split_document_pieces(doc, max_doc):
    pieces = pd.split_document(np.array(doc, dtype=np.uint16), max_doc)
    assert all(len(p) <= max_doc and p[0] == BOS_TOKEN for p in pieces)
    assert all(len(p) >= 2 for p in pieces) or doc == []
    assert np.concatenate([p[1:] for p in pieces]).tolist() == doc


@settings(max_examples=60, deadline=None)
@given(docs=st.lists(token_lists, min_size=1, max_size=12), max_doc=st.none() | st.integers(2, 64),
       min_doc=st.integers(0, 40))
def test_build_pieces_keeps_every_token(docs, max_doc, min_doc):
    arrays = [np.array(d, dtype=np.uint16) for d in docs]
    pieces = pd.build_pieces(arrays, max_doc, min_doc)
    assert all(p[0] == BOS_TOKEN and (max_doc is None or len(p) <= max_doc) for p in pieces)
    assert np.concatenate([p[1:] for p in pieces]).tolist() == [t for d in docs for t in d]
    assert len(pieces) <= sum(max(1, -(-len(d) // ((max_doc or 10**9) - 1))) for d in docs)
    if min_doc == 0:  # no joining: every document starts its own piece
        assert len(pieces) >= len(docs)


def test_build_pieces_joins_tiny_documents():
    tiny = [np.array([1, 2], dtype=np.uint16)] * 10
    pieces = pd.build_pieces(tiny, max_doc_tokens=2048, min_doc_tokens=8)
    assert [len(p) for p in pieces] == [9, 9, 5]  # 4 docs (8 tokens) + BOS, twice, then the rest


@settings(max_examples=60, deadline=None)
@given(sizes=st.lists(st.integers(0, 50), min_size=1, max_size=10), frac=st.floats(0, 0.99))
def test_split_train_val_is_tail_fraction(sizes, frac):
    docs, start = [], 0
    for n in sizes:
        docs.append(np.arange(start, start + n))
        start += n
    train, val = pd.split_train_val(docs, frac)
    joined = [np.zeros(0, dtype=int)] + train + val
    assert np.concatenate(joined).tolist() == list(range(start))
    assert sum(map(len, train)) == int(start * (1 - frac))


@settings(max_examples=60, deadline=None)
@given(sizes=st.lists(st.integers(1, 40), min_size=1, max_size=12), shard=st.integers(1, 60))
def test_chunk_pieces(sizes, shard):
    pieces = [np.full(n, i, dtype=np.uint16) for i, n in enumerate(sizes)]
    shards = pd._chunk_pieces(pieces, shard)
    assert all(0 < len(s) <= shard for s in shards)
    assert np.concatenate(shards).tolist() == np.concatenate(pieces).tolist()
    # a piece that fits a shard is never cut across two shards
    for i, n in enumerate(sizes):
        if n <= shard:
            assert sum(int((s == i).any()) for s in shards) == 1


# -----------------------------------------------------------------------------
# prepare_text

TEXTS = {
    "a.txt": "Hello world.\nSecond line of the first file.\n",
    "sub/b.py": "def f(x):\n    return x * 2  # é ü ∑\n",
    "sub/deeper/c.md": "# Title\n\n" + "lorem ipsum dolor sit amet " * 60,
    "d.txt": "x",
}


@pytest.fixture
def corpus(tmp_path, gpt2_vocab):
    """A small text tree; the tests using it tokenize with GPT-2 BPE (skipped without the vocabulary)."""
    root = tmp_path / "corpus"
    for name, text in TEXTS.items():
        (root / name).parent.mkdir(parents=True, exist_ok=True)
        (root / name).write_text(text, encoding="utf-8")
    return root


def test_gpt2_round_trip(corpus, tmp_path):
    summary = pd.prepare_text([corpus], tmp_path / "out", val_fraction=0.0, progress=False)
    tokens = pd.load_tokens(tmp_path / "out" / "train.bin")
    enc = pd.gpt2_encoding()
    decoded = sorted(enc.decode(d.tolist()) for d in split_at_bos(tokens))
    assert decoded == sorted(TEXTS.values())
    assert summary["files"] == 4 and summary["val_tokens"] == 0
    assert summary["train_tokens"] == len(tokens)


def test_gpt2_fineweb_shards_with_doc_limit(corpus, tmp_path):
    out = tmp_path / "fw"
    summary = pd.prepare_text([corpus], out, fmt="fineweb", val_fraction=0.2, max_doc_tokens=16,
                              min_doc_tokens=0, shard_tokens=40, name_prefix="mini", progress=False)
    val = sorted(out.glob("mini_val_*.bin"))
    train = sorted(out.glob("mini_train_*.bin"))
    assert val[0].name == "mini_val_000000.bin" and train[0].name == "mini_train_000001.bin"
    all_docs = []
    for shard in val + train:
        tokens = pd.load_tokens(shard)
        assert 0 < len(tokens) <= 40 and tokens[0] == BOS_TOKEN
        pieces = split_at_bos(tokens)
        assert all(len(p) <= 15 for p in pieces)
        all_docs += pieces
    enc = pd.gpt2_encoding()
    n_doc_tokens = sum(len(enc.encode_ordinary(t)) for t in TEXTS.values())
    assert sum(map(len, all_docs)) == n_doc_tokens
    assert summary["train_tokens"] + summary["val_tokens"] == n_doc_tokens + len(all_docs)
    # a smaller rebuild removes shards the earlier run left behind
    (out / "mini_train_000099.bin").write_bytes(b"")
    pd.prepare_text([corpus / "a.txt"], out, fmt="fineweb", name_prefix="mini", progress=False)
    assert sorted(p.name for p in out.glob("mini_*.bin")) == ["mini_train_000001.bin", "mini_val_000000.bin"]


def test_char_round_trip_and_meta(shakespeare_path, tmp_path):
    summary = pd.prepare_text(str(shakespeare_path), tmp_path, tokenizer="char", val_fraction=0.1,
                              progress=False)
    meta = pickle.loads((tmp_path / "meta.pkl").read_bytes())
    text = shakespeare_path.read_text()
    assert meta["vocab_size"] == len(set(text)) == 65
    assert [meta["itos"][i] for i in range(65)] == sorted(set(text))
    assert all(meta["stoi"][c] == i for i, c in meta["itos"].items())
    train, val = (pd.load_tokens(tmp_path / f"{s}.bin") for s in ("train", "val"))
    assert "".join(meta["itos"][int(t)] for t in np.concatenate([train, val])) == text
    assert summary["vocab_size"] == 65


def test_unreadable_files_skipped_then_error(corpus, tmp_path, capsys):
    (corpus / "blob.bin").write_bytes(b"\xff\xfe\x00bad")
    summary = pd.prepare_text([corpus], tmp_path / "o1", val_fraction=0.0, progress=False)
    assert summary["skipped_files"] == 1 and summary["files"] == 4
    assert "blob.bin" in capsys.readouterr().err
    with pytest.raises(ValueError, match="none of the 1 input files"):
        pd.prepare_text([corpus / "blob.bin"], tmp_path / "o2", progress=False)


def test_idempotent_and_force(corpus, tmp_path):
    out = tmp_path / "out"
    first = pd.prepare_text([corpus], out, progress=False)
    assert not first["reused"]
    assert pd.prepare_text([corpus], out, progress=False)["reused"]
    assert not pd.prepare_text([corpus], out, force=True, progress=False)["reused"]
    assert not pd.prepare_text([corpus], out, val_fraction=0.5, progress=False)["reused"]
    (corpus / "a.txt").write_text("changed contents, longer than before\n")
    assert not pd.prepare_text([corpus], out, val_fraction=0.5, progress=False)["reused"]
    (out / "train.bin").write_bytes(b"\x00")  # damaged output: rebuilt, not trusted
    assert not pd.prepare_text([corpus], out, val_fraction=0.5, progress=False)["reused"]


def test_globs_and_parallel_workers_match_serial(corpus, tmp_path, monkeypatch):
    pattern = str(corpus / "**" / "*.*")
    serial = pd.prepare_text([pattern], tmp_path / "s", workers=1, progress=False)
    monkeypatch.setattr(pd, "_SMALL_INPUT_BYTES", 0)  # force the process pool on a tiny corpus
    parallel = pd.prepare_text([pattern], tmp_path / "p", workers=2, progress=False)
    assert serial["files"] == parallel["files"] == 4
    for name in ("train.bin", "val.bin"):
        assert (tmp_path / "s" / name).read_bytes() == (tmp_path / "p" / name).read_bytes()


def test_output_dir_inside_input_is_not_tokenized(corpus):
    pd.prepare_text([corpus], corpus / "out", progress=False)
    assert pd.prepare_text([corpus], corpus / "out", progress=False)["reused"]


def test_python_stdlib_files():
    files = pd.python_stdlib_files()
    assert len(files) > 100 and all(f.suffix == ".py" for f in files)
    assert not any({"test", "tests", "site-packages"} & set(f.parts) for f in files)
    limited = pd.python_stdlib_files(max_bytes=200_000)
    assert limited == files[:len(limited)]
    assert sum(f.stat().st_size for f in limited) <= 200_000 < sum(f.stat().st_size for f in files)


# -----------------------------------------------------------------------------
# downloads from a local HTTP server


class FakeHub(http.server.BaseHTTPRequestHandler):
    """Serves FakeHub.files; knobs: drop_once (names cut mid-body on first GET), ignore_range."""
    files, drop_once, ignore_range, log = {}, set(), False, []

    def do_GET(self):
        name = self.path.lstrip("/")
        range_header = self.headers.get("Range")
        FakeHub.log.append((name, range_header))
        if name not in self.files:
            self.send_error(404)
            return
        body, start = self.files[name], 0
        if range_header and not self.ignore_range:
            start = int(range_header.split("=")[1].split("-")[0])
            self.send_response(206)
            self.send_header("Content-Range", f"bytes {start}-{len(body) - 1}/{len(body)}")
        else:
            self.send_response(200)
        self.send_header("Content-Length", str(len(body) - start))
        self.end_headers()
        if name in self.drop_once:
            FakeHub.drop_once = self.drop_once - {name}
            self.wfile.write(body[start:start + (len(body) - start) // 2])
            self.wfile.flush()
            self.close_connection = True
            return
        self.wfile.write(body[start:])

    def log_message(self, *args):
        pass


@pytest.fixture
def hub(monkeypatch):
    monkeypatch.setattr(pd, "DOWNLOAD_CHUNK_BYTES", 4096)
    rng = np.random.default_rng(0)
    shards = {}
    for name, n in (("fineweb_val_000000.bin", 5000), ("fineweb_train_000001.bin", 20000),
                    ("fineweb_train_000002.bin", 7000)):
        tokens = rng.integers(0, 50257, n).astype("<u2")
        shards[name] = pd.fineweb_header(n).tobytes() + tokens.tobytes()
    FakeHub.files, FakeHub.drop_once, FakeHub.ignore_range, FakeHub.log = shards, set(), False, []
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), FakeHub)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    yield f"http://127.0.0.1:{server.server_address[1]}"
    server.shutdown()
    server.server_close()


def fetch(base_url, out_dir, chunks=2):
    return pd.download_fineweb("fineweb10B", out_dir, chunks=chunks, base_url=base_url, retries=2,
                               timeout=5, backoff=0.01, progress=False)


def test_download_complete_and_idempotent(hub, tmp_path):
    paths = fetch(hub, tmp_path)
    assert [p.name for p in paths] == ["fineweb_val_000000.bin", "fineweb_train_000001.bin",
                                       "fineweb_train_000002.bin"]
    for p in paths:
        assert p.read_bytes() == FakeHub.files[p.name]
    FakeHub.log.clear()
    fetch(hub, tmp_path)
    assert FakeHub.log == []  # valid files are not fetched again
    assert not list(tmp_path.glob("*.part"))


@pytest.mark.parametrize("ignore_range", [False, True])
def test_download_resumes_after_dropped_connection(hub, tmp_path, ignore_range):
    FakeHub.drop_once, FakeHub.ignore_range = {"fineweb_train_000001.bin"}, ignore_range
    paths = fetch(hub, tmp_path)
    assert paths[1].read_bytes() == FakeHub.files["fineweb_train_000001.bin"]
    ranges = [r for name, r in FakeHub.log if name == "fineweb_train_000001.bin"]
    assert ranges[0] is None and len(ranges) == 2
    assert int(ranges[1].split("=")[1].split("-")[0]) > 0  # resumed from what had arrived


def test_download_404_is_a_clear_error(hub, tmp_path):
    with pytest.raises(pd.DownloadError, match="404.*") as info:
        fetch(hub, tmp_path, chunks=3)
    assert f"{hub}/fineweb_train_000003.bin" in str(info.value)


def test_corrupt_download_is_not_renamed_into_place(hub, tmp_path):
    good = FakeHub.files["fineweb_val_000000.bin"]
    FakeHub.files["fineweb_val_000000.bin"] = good[:-2]  # header promises one token more
    with pytest.raises(pd.DownloadError, match="corrupt.*header says 5000 tokens"):
        fetch(hub, tmp_path)
    assert not (tmp_path / "fineweb_val_000000.bin").exists()
    assert not (tmp_path / "fineweb_val_000000.bin.part").exists()
    FakeHub.files["fineweb_val_000000.bin"] = good
    (tmp_path / "fineweb_val_000000.bin").write_bytes(good[:-2])  # a bad file already in place
    fetch(hub, tmp_path)
    assert (tmp_path / "fineweb_val_000000.bin").read_bytes() == good


def test_download_gives_up_after_bounded_retries(tmp_path):
    (tmp_path / "kept").mkdir()
    with pytest.raises(pd.DownloadError, match="failed after 2 attempts .*nothing was downloaded: check the network"):
        pd.download_file("http://127.0.0.1:9/x.bin", tmp_path / "new" / "deeper" / "x.bin", retries=1, timeout=2,
                         backoff=0.01, progress=False)
    assert [p.name for p in tmp_path.iterdir()] == ["kept"]   # the folders it made are gone again


def test_download_failure_after_some_bytes_says_how_to_resume(hub, tmp_path, monkeypatch):
    name = "fineweb_train_000001.bin"
    real_fetch = pd._fetch_into

    def fetch_then_fail(requests, url, part, timeout, progress):
        if not part.exists():
            part.write_bytes(FakeHub.files[name][:1000])
        raise pd._Retryable("connection reset")
    monkeypatch.setattr(pd, "_fetch_into", fetch_then_fail)
    with pytest.raises(pd.DownloadError, match=r"re-run to resume from .*\.part \(1,000 bytes kept\)"):
        pd.download_file(f"{hub}/{name}", tmp_path / name, retries=1, backoff=0.01, progress=False)
    monkeypatch.setattr(pd, "_fetch_into", real_fetch)
    pd.download_file(f"{hub}/{name}", tmp_path / name, progress=False)   # the re-run resumes
    assert (tmp_path / name).read_bytes() == FakeHub.files[name]
    assert FakeHub.log[-1] == (name, "bytes=1000-")


def test_shakespeare_download_failure_names_the_local_option(tmp_path):
    out_dir = tmp_path / "data" / "shakespeare_char"
    with pytest.raises(SystemExit) as exc:
        pd.main(["shakespeare_char", "--url", "http://127.0.0.1:9/input.txt", "--retries", "0",
                 "--timeout", "2", "--out_dir", str(out_dir)])
    message = str(exc.value.code)   # main() exits with the one line; Python prints it to stderr
    assert message.startswith("error: ") and "\n" not in message, message
    assert "nothing was downloaded" in message and message.endswith("with --input FILE"), message
    assert not (tmp_path / "data").exists()


def test_fineweb_cli(hub, tmp_path):
    paths = pd.main(["fineweb10B", "--base_url", hub, "--chunks", "1", "--out_dir", str(tmp_path)])
    assert [p.name for p in paths] == ["fineweb_val_000000.bin", "fineweb_train_000001.bin"]
    assert len(pd.load_tokens(paths[1])) == 20000


# -----------------------------------------------------------------------------
# command line


def test_shakespeare_char_cli(shakespeare_path, tmp_path):
    summary = pd.main(["shakespeare_char", "--input", str(shakespeare_path), "--out_dir", str(tmp_path)])
    assert summary["vocab_size"] == 65
    assert len(pd.load_tokens(tmp_path / "train.bin")) == 1003854
    assert len(pd.load_tokens(tmp_path / "val.bin")) == 111540


def test_shakespeare_gpt2_cli(shakespeare_path, tmp_path, gpt2_vocab):
    pd.main(["shakespeare", "--input", str(shakespeare_path), "--out_dir", str(tmp_path)])
    train, val = (pd.load_tokens(tmp_path / f"{s}.bin") for s in ("train", "val"))
    assert train[0] == val[0] == BOS_TOKEN
    assert abs(len(train) / (len(train) + len(val)) - 0.9) < 0.001
    assert not (tmp_path / "meta.pkl").exists()


@pytest.mark.parametrize("argv, message", [
    (["text", "/no/such/dir", "--out_dir", "X"], "error: input /no/such/dir does not exist"),
    (["text", "/no/such/*.txt", "--out_dir", "X"], "matches no files"),
    (["text", "."], "error: text needs --out_dir"),
    (["shakespeare_char", "--input", "/no/file.txt", "--out_dir", "X"], "error: --input /no/file.txt"),
    (["fineweb10B", "--chunks", "0", "--out_dir", "X"], "error: --chunks 0 is out of range"),
])
def test_cli_errors(argv, message, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    with pytest.raises(SystemExit) as info:
        pd.main(argv)
    assert message in str(info.value) and "\n" not in str(info.value)


def test_gpt2_tests_skip_without_the_vocabulary(tmp_path):
    """A bare clone (no ../shared, no network): tests that need the GPT-2 vocabulary are skipped with
    the reason instead of failing with `could not load the GPT-2 vocabulary`."""
    tests = ["tests/test_prepare_data.py::test_gpt2_round_trip",
             "tests/test_prepare_data.py::test_shakespeare_gpt2_cli",
             "tests/test_baseline.py::test_gpt2_codec_round_trip"]
    (tmp_path / "cache").mkdir()
    env = dict(os.environ, GPT2_TIKTOKEN_FILE=str(tmp_path / "missing.tiktoken"),
               TIKTOKEN_CACHE_DIR=str(tmp_path / "cache"),
               HTTPS_PROXY="http://127.0.0.1:9", HTTP_PROXY="http://127.0.0.1:9")  # and no network
    result = subprocess.run([sys.executable, "-m", "pytest", "-q", "-rs", "-p", "no:cacheprovider", *tests], cwd=REPO,
                            env=env, capture_output=True, text=True, timeout=300)
    assert result.returncode == 0 and "3 skipped" in result.stdout, result.stdout[-3000:]
    reasons = [line for line in result.stdout.splitlines() if line.startswith("SKIPPED")]
    vocabulary = [line for line in reasons if "GPT-2 vocabulary not available offline" in line]
    assert len(vocabulary) >= 2 and all(line in vocabulary or "tinyshakespeare" in line for line in reasons)


def test_cli_error_as_subprocess_is_one_line(tmp_path):
    result = subprocess.run([sys.executable, str(REPO / "prepare_data.py"), "text", str(tmp_path / "nope"),
                             "--out_dir", str(tmp_path / "o")], capture_output=True, text=True)
    assert result.returncode == 1
    assert result.stderr.strip().splitlines() == [f"error: input {tmp_path / 'nope'} does not exist; check the path"]
