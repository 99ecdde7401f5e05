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
    from checkpoints import save_random_checkpoint

    root = tmp_path_factory.mktemp("ckpt")
    return {fam: save_random_checkpoint(fam, root / f"tiny-{fam}", tokenizer=fam == "clip") for fam in ("clip", "dinov2")}


@pytest.fixture(scope="session", autouse=True)
def shared_data_untouched():
    """The dev meshes are shared research data: fail the run if any test wrote through a symlink."""
    if not LPSB.is_dir():
        yield
        return
    before = {p: (p.stat().st_size, p.stat().st_mtime_ns) for p in LPSB.rglob("*") if p.is_file()}
    yield
    changed = [str(p) for p, sig in before.items() if (p.stat().st_size, p.stat().st_mtime_ns) != sig]
    assert not changed, f"tests modified shared data: {changed[:5]}"
