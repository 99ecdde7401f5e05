import os
from pathlib import Path

import pytest

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")

LPSB = Path(__file__).resolve().parents[1].parent / "shared" / "datasets" / "lpsb"


@pytest.fixture(scope="session")
def lpsb() -> Path:
    """The real dev meshes (../shared/datasets/lpsb), never copied into the repo."""
    if not LPSB.is_dir():
        pytest.skip(f"dev dataset not found at {LPSB}")
    return LPSB
