"""How `m3d sync` reaches the server that holds its store, so a sync never needs the server stopped.

A running `m3d serve` holds the store's lock (one process per store) and writes `<store>/serve.json`
(mode 0600: its pid, a loopback URL, and a random sync key made at start). `m3d sync` that finds the
store busy reads that file and, when the server answers, hands its job over: POST /api/sync with the
sync key as bearer token, then it follows the job's progress until it ends, and prints and exits as a
local sync would. Only someone who can read the store's files can start a sync on it; the page and
the API's token holders can watch a job, never start one.
"""

from __future__ import annotations

import json
import os
import time
import urllib.error
import urllib.request
from dataclasses import asdict
from pathlib import Path
from typing import Callable

from ..errors import M3DError, StoreError, UsageError

SERVE_FILE = "serve.json"
POLL_S = 0.5


def register(store_dir: Path, url: str, sync_key: str) -> Path:
    """Write serve.json (0600 from its first byte, replaced atomically): where this server listens."""
    path = Path(store_dir) / SERVE_FILE
    tmp = path.with_suffix(".tmp")
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    with os.fdopen(fd, "w") as handle:
        json.dump({"pid": os.getpid(), "url": url, "sync_key": sync_key}, handle)
    os.chmod(tmp, 0o600)
    tmp.replace(path)
    return path


def unregister(store_dir: Path, sync_key: str) -> None:
    """Remove serve.json when it is still this server's."""
    path = Path(store_dir) / SERVE_FILE
    try:
        if json.loads(path.read_text()).get("sync_key") == sync_key:
            path.unlink()
    except (OSError, ValueError, AttributeError):
        pass


def find_server(store_dir: Path) -> dict | None:
    """The server that serve.json names, if it answers (a stale file from a killed one does not)."""
    try:
        info = json.loads((Path(store_dir) / SERVE_FILE).read_text())
        url, key = info["url"], info["sync_key"]
    except (OSError, ValueError, KeyError, TypeError):
        return None
    try:
        _call(url, key, "GET", "/api/health", timeout=5)
    except (M3DError, OSError):
        return None
    return {"url": url, "sync_key": key, "pid": info.get("pid")}


def sync_request(root: Path, options, selection: dict, qdrant_url: str | None = None) -> dict:
    """What a handed-over sync sends: the folder (absolute: the server has its own working directory),
    the Qdrant server it means (None: the embedded store), the SyncOptions as parsed here, and the
    selection (classes, split, per_class, limit, dataset)."""
    return {"root": str(Path(root).resolve()), "qdrant_url": qdrant_url, "options": asdict(options), **selection}


def hand_off(server: dict, request: dict, progress: Callable[[dict], None] | None = None) -> dict:
    """Start the sync on the server and follow it to its end; returns the finished job (report inside).
    A job that failed raises its error with its exit status."""
    job = _call(server["url"], server["sync_key"], "POST", "/api/sync", body=request)
    while job["state"] in ("queued", "running"):
        if progress:
            progress(job)
        time.sleep(POLL_S)
        job = _call(server["url"], server["sync_key"], "GET", f"/api/jobs/{job['id']}")
    if job["state"] == "failed":
        error = M3DError(f"sync on the server failed: {job['error']}")
        error.exit_code = job.get("exit_code") or 1
        raise error
    return job


def _call(url: str, key: str, method: str, route: str, body: dict | None = None, timeout: float = 30) -> dict:
    data = None if body is None else json.dumps(body).encode()
    request = urllib.request.Request(url + route, data=data, method=method,
                                     headers={"authorization": f"Bearer {key}", "content-type": "application/json"})
    opener = urllib.request.build_opener(urllib.request.ProxyHandler({}))  # loopback: never through a proxy
    try:
        with opener.open(request, timeout=timeout) as response:
            return json.loads(response.read())
    except urllib.error.HTTPError as exc:
        try:
            message = json.loads(exc.read()).get("error") or exc.reason
        except ValueError:
            message = exc.reason
        raise (UsageError if exc.code == 400 else StoreError)(f"m3d serve at {url}: {message}") from None
    except urllib.error.URLError as exc:
        raise StoreError(f"m3d serve at {url} does not answer ({exc.reason})") from None
