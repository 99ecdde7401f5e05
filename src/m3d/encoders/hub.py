"""Where a checkpoint comes from and what it is called: hub ids, local directories, the HF cache.

A checkpoint's identity (``Source.model_id``, stored in every point's payload) is never a local path:
a hub id stays the hub id; a local directory becomes ``local:<name>@sha256:<digest>``, the name of
its folder (for an HF cache snapshot, the repo's) and a digest of the files that decide its vectors.
The directory itself (``Source.location``) is only used to load it and is kept on this machine.
"""

from __future__ import annotations

import functools
import hashlib
import json
import os
import re
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

from m3d.errors import ModelLoadError, one_line

from .registry import ALIASES

ALLOW_DOWNLOAD_ENV = "M3D_ALLOW_DOWNLOAD"
LOCAL_PREFIX = "local:"
DIGEST_CHARS = 16  # 64 bits of sha256: tells checkpoints apart, short enough to read in `m3d info`
#: Files of a checkpoint directory that decide its image vectors (weights, architecture, preprocessing).
DIGEST_FILES = ("config.json", "preprocessor_config.json", "*.safetensors", "*.bin")
#: A tokenizer's own files: without one, transformers builds an empty default tokenizer silently.
TOKENIZER_FILES = ("tokenizer.json", "vocab.json", "tokenizer.model", "spiece.model")
_HUB_ID = re.compile(r"[A-Za-z0-9][\w.\-]*(/[A-Za-z0-9][\w.\-]*)?")
_LOCAL_ID = re.compile(r"local:([a-z0-9_]+)@sha256:([0-9a-f]+)")


def slug(text: str) -> str:
    """Lowercase ``[a-z0-9_]`` form of an id or directory name, for collection names."""
    s = re.sub(r"[^a-z0-9]+", "_", text.lower()).strip("_")
    return s or "encoder"


@dataclass(frozen=True)
class Source:
    """Where from_pretrained reads (``location``: a local dir, or a hub id read from the HF cache unless
    downloads are on) and the identity that is stored (``model_id``: never a local path once
    ``identified``)."""

    location: str
    model_id: str
    name: str
    local_only: bool
    is_dir: bool


def is_local_id(model_id: str) -> bool:
    return model_id.startswith(LOCAL_PREFIX)


def local_name(model_id: str) -> str:
    """The model name inside a ``local:<name>@sha256:<digest>`` id."""
    m = _LOCAL_ID.fullmatch(model_id)
    return m.group(1) if m else model_id


def weights_digest(directory: Path) -> str:
    """sha256 over the names and bytes of a checkpoint's ``DIGEST_FILES`` (cached per file signature,
    so a second load in one process does not read the weights again)."""
    files = sorted({p for pattern in DIGEST_FILES for p in directory.glob(pattern) if p.is_file()})
    if not any(p.suffix in (".safetensors", ".bin") for p in files):
        raise ModelLoadError(f"{directory} has no weights (*.safetensors or *.bin): not a checkpoint directory")
    signature = tuple((p.name, p.stat().st_size, p.stat().st_mtime_ns) for p in files)
    return _digest(str(directory), signature)


@functools.lru_cache(maxsize=32)
def _digest(directory: str, signature: tuple[tuple[str, int, int], ...]) -> str:
    h = hashlib.sha256()
    for name, _, _ in signature:
        h.update(name.encode() + b"\0")
        with open(Path(directory) / name, "rb") as handle:
            for block in iter(lambda: handle.read(1 << 22), b""):
                h.update(block)
    return h.hexdigest()


def identified(source: Source) -> Source:
    """A local directory's stored identity, ``local:<name>@sha256:<digest>`` (reads its weights once)."""
    if not source.is_dir:
        return source
    digest = weights_digest(Path(source.location))[:DIGEST_CHARS]
    return replace(source, model_id=f"{LOCAL_PREFIX}{source.name}@sha256:{digest}")


def offline_message(hub_id: str) -> str:
    hint = "" if "/" in hub_id else f" (named encoders: {', '.join(ALIASES)})"  # likely a typo of a name
    return (
        f"weights for {hub_id} are not available offline{hint} (not in the Hugging Face cache, hub not "
        f"reachable): run `hf download {hub_id}` on a connected machine, point --encoders at a "
        "local checkpoint directory, or use a weight-free encoder: `gradhist` (or `hog`)"
    )


def _dir_name(path: Path) -> str:
    """A checkpoint directory's name; for an HF cache snapshot (.../models--org--name/snapshots/<sha>)
    the repo's, not the commit hash."""
    if path.parent.name == "snapshots" and path.parent.parent.name.startswith("models--"):
        return slug(path.parent.parent.name[len("models--") :].replace("--", "/"))
    return slug(path.name)


def resolve_source(target: str, name: str | None) -> Source:
    """A hub id or a checkpoint directory -> where to load it from and what to call it."""
    path = Path(target).expanduser()
    if path.is_dir():
        full = path.resolve()
        if not (full / "config.json").is_file():
            raise ModelLoadError(f"{full} has no config.json: not a Hugging Face checkpoint directory")
        return Source(str(full), str(full), name or _dir_name(full), True, True)  # model_id: see identified()
    looks_like_path = target.startswith(("/", ".", "~")) or target.count("/") > 1 or os.sep != "/" and os.sep in target
    if path.exists():
        raise ModelLoadError(f"{target} is a file, not a checkpoint directory")
    if looks_like_path:
        raise ModelLoadError(f"checkpoint directory {target} not found")
    if not _HUB_ID.fullmatch(target):
        raise ModelLoadError(
            f"{target!r} is neither a checkpoint directory nor a Hugging Face hub id; "
            f"named encoders: {', '.join(ALIASES)}"
        )
    return Source(target, target, name or slug(target), not downloads_allowed(), False)


def downloads_allowed() -> bool:
    """Download from the hub only when it answers: one 2 s probe instead of the hub client's retries
    (23-93 s on a machine without network). M3D_ALLOW_DOWNLOAD=1/0 forces either way; HF_HUB_OFFLINE
    forbids it."""
    import socket
    from urllib.parse import urlsplit

    forced = os.environ.get(ALLOW_DOWNLOAD_ENV)
    if forced in ("0", "1"):
        return forced == "1"
    if os.environ.get("HF_HUB_OFFLINE", "").strip().lower() in ("1", "true", "yes", "on"):
        return False
    endpoint = urlsplit(os.environ.get("HF_ENDPOINT", "https://huggingface.co"))
    try:
        socket.create_connection((endpoint.hostname, endpoint.port or 443), timeout=2).close()
        return True
    except OSError:
        return False


def read_config(source: Source) -> dict[str, Any]:
    """config.json as a dict, without importing transformers (so wrong specs fail in milliseconds)."""
    if source.is_dir:
        file = str(Path(source.location) / "config.json")  # resolve_source checked that it is there
    else:
        from huggingface_hub import try_to_load_from_cache

        cached = try_to_load_from_cache(source.location, "config.json")
        if isinstance(cached, str):
            file = cached
        elif source.local_only:
            raise ModelLoadError(offline_message(source.location))
        else:
            from huggingface_hub import hf_hub_download

            try:
                file = hf_hub_download(source.location, "config.json")
            except Exception as e:  # network/auth/404 errors come in many classes; all mean "cannot fetch"
                raise ModelLoadError(f"cannot download {source.location}: {one_line(str(e))}") from e
    try:
        data = json.loads(Path(file).read_text())
    except (OSError, ValueError) as e:
        raise ModelLoadError(f"cannot read {file}: {one_line(str(e))}") from e
    if not isinstance(data, dict):
        raise ModelLoadError(f"{file} is not a JSON object")
    return data


def has_file(source: Source, names: tuple[str, ...]) -> bool:
    """Whether the checkpoint has one of these files (a hub id: in the cache, or downloads are on)."""
    if source.is_dir:
        return any((Path(source.location) / n).is_file() for n in names)
    if not source.local_only:
        return True  # from_pretrained fetches it, or says why not
    from huggingface_hub import try_to_load_from_cache

    return any(isinstance(try_to_load_from_cache(source.location, n), str) for n in names)


def transformers_quiet() -> Any:
    """Context manager: transformers' load reports and progress bars (unused text-tower weights, a
    "Loading weights" bar per model) are not news for m3d's users."""
    from contextlib import contextmanager

    from transformers.utils import logging as hf_logging

    @contextmanager
    def quiet() -> Any:
        level, bars = hf_logging.get_verbosity(), hf_logging.is_progress_bar_enabled()
        hf_logging.set_verbosity_error()
        hf_logging.disable_progress_bar()
        try:
            yield
        finally:
            hf_logging.set_verbosity(level)
            if bars:
                hf_logging.enable_progress_bar()

    return quiet()


def from_pretrained(load: Any, source: Source, what: str, **kwargs: Any) -> Any:
    """Call a from_pretrained with one-line errors: offline hub ids say how to fix it."""
    try:
        with transformers_quiet():
            return load(source.location, local_files_only=source.local_only, **kwargs)
    except OSError as e:
        if not source.is_dir and source.local_only:
            raise ModelLoadError(offline_message(source.location)) from e
        raise ModelLoadError(f"{source.model_id}: cannot load the {what}: {one_line(str(e))}") from e
    except (ValueError, KeyError, TypeError, RuntimeError) as e:
        raise ModelLoadError(f"{source.model_id}: cannot load the {what}: {one_line(str(e))}") from e


