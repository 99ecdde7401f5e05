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


@pytest.fixture(scope="session")
def ckpts(tmp_path_factory) -> dict[str, Path]:
    """Tiny randomly initialised CLIP and DINOv2 checkpoints saved to disk: loaded through the same
    load_encoder(path) code as hub checkpoints (no hub is reachable in tests)."""
    from m3d.encoders import save_random_checkpoint

    root = tmp_path_factory.mktemp("ckpt")
    return {fam: save_random_checkpoint(fam, root / f"tiny-{fam}") for fam in ("clip", "dinov2")}
