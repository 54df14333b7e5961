import os
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

# GPT-2 BPE ranks in tiktoken's format, shipped beside the repo for offline runs (see README).
_LOCAL_VOCAB = REPO.parent / "shared" / "data" / "gpt2.tiktoken"
if _LOCAL_VOCAB.exists():
    os.environ.setdefault("GPT2_TIKTOKEN_FILE", str(_LOCAL_VOCAB))

SHAKESPEARE = REPO.parent / "shared" / "data" / "tinyshakespeare.txt"


@pytest.fixture
def shakespeare_path():
    if not SHAKESPEARE.exists():
        pytest.skip(f"{SHAKESPEARE} not present")
    return SHAKESPEARE
