import hashlib
import os
import sys
import tempfile
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

# GPT-2 BPE ranks in tiktoken's format, shipped beside the repo for offline runs (see README).
# A GPT2_TIKTOKEN_FILE set by the caller wins; one that names no file is dropped, so the code under
# test falls back to tiktoken's own cache (how a bare clone without ../shared runs).
_LOCAL_VOCAB = Path(os.environ.get("GPT2_TIKTOKEN_FILE") or REPO.parent / "shared" / "data" / "gpt2.tiktoken")
if _LOCAL_VOCAB.is_file():
    os.environ["GPT2_TIKTOKEN_FILE"] = str(_LOCAL_VOCAB)
else:
    os.environ.pop("GPT2_TIKTOKEN_FILE", None)

SHAKESPEARE = REPO.parent / "shared" / "data" / "tinyshakespeare.txt"

# the files tiktoken.get_encoding("gpt2") reads (tiktoken_ext.openai_public.gpt2)
_TIKTOKEN_GPT2_URLS = ("https://openaipublic.blob.core.windows.net/gpt-2/encodings/main/vocab.bpe",
                       "https://openaipublic.blob.core.windows.net/gpt-2/encodings/main/encoder.json")


def gpt2_vocabulary_source():
    """Where prepare_data.gpt2_encoding() finds the GPT-2 vocabulary without a network, or None."""
    if os.environ.get("GPT2_TIKTOKEN_FILE"):
        return os.environ["GPT2_TIKTOKEN_FILE"]
    # tiktoken's cache: TIKTOKEN_CACHE_DIR, else DATA_GYM_CACHE_DIR, else <tmp>/data-gym-cache ("" = none)
    cache = os.environ.get("TIKTOKEN_CACHE_DIR", os.environ.get(
        "DATA_GYM_CACHE_DIR", os.path.join(tempfile.gettempdir(), "data-gym-cache")))
    if cache and all((Path(cache) / hashlib.sha1(url.encode()).hexdigest()).is_file()
                     for url in _TIKTOKEN_GPT2_URLS):
        return cache
    return None


@pytest.fixture
def gpt2_vocab():
    """For tests that tokenize with GPT-2 BPE: skipped, with the reason, when no vocabulary is at hand
    (no ../shared/data/gpt2.tiktoken, no GPT2_TIKTOKEN_FILE, not in tiktoken's cache)."""
    source = gpt2_vocabulary_source()
    if source is None:
        pytest.skip(f"GPT-2 vocabulary not available offline: {_LOCAL_VOCAB} does not exist, and tiktoken's cache "
                    "does not hold it; set GPT2_TIKTOKEN_FILE=/path/to/gpt2.tiktoken")
    return source


@pytest.fixture
def shakespeare_path():
    if not SHAKESPEARE.exists():
        pytest.skip(f"{SHAKESPEARE} not present")
    return SHAKESPEARE
