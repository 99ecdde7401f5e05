"""A real `m3d serve` in a subprocess on a loopback port, and a small HTTP client for it (stdlib only).

The server is started as users start it (`python -m m3d.cli serve --port 0`) and found the way `m3d
sync` finds it: through the serve.json it writes in the store once it listens."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
import urllib.error
import urllib.request
from dataclasses import dataclass
from pathlib import Path

from helpers import make_tree

#: Class and file names a hostile dataset could hold: markup, an event handler, control bytes, length.
HOSTILE_CLASS = '<img src=x onerror="window.pwned=1">'
HOSTILE_FILE = "<script>window.pwned=2<script>.off"
CONTROL_CLASS = "bell\x07\x1b[31mred"
LONG_FILE = "L" * 200 + ".off"


def hostile_tree(lpsb: Path, root: Path) -> Path:
    """Real meshes under names that are markup, escapes and a very long file name."""
    sources = sorted((lpsb / "Vase").glob("*.off"), key=lambda p: int(p.stem))
    for folder, name, src in ((HOSTILE_CLASS, HOSTILE_FILE, sources[0]), (CONTROL_CLASS, LONG_FILE, sources[1])):
        (root / folder).mkdir(parents=True, exist_ok=True)
        (root / folder / name).symlink_to(src)
    return root


def dev_tree(lpsb: Path, root: Path, classes: dict[str, int]) -> Path:
    make_tree(lpsb, root, classes)
    return hostile_tree(lpsb, root)


@dataclass
class Server:
    process: subprocess.Popen
    url: str
    store: Path
    token: str | None
    log: Path

    def call(self, method: str, route: str, body: bytes | None = None, *, token: str | None = "default",
             timeout: float = 120) -> tuple[int, dict, bytes]:
        """(status, headers, body) of one request; token "default" sends the server's own."""
        token = self.token if token == "default" else token
        headers = {"authorization": f"Bearer {token}"} if token else {}
        if body is not None:
            headers["content-type"] = "application/octet-stream"
        request = urllib.request.Request(self.url + route, data=body, method=method, headers=headers)
        opener = urllib.request.build_opener(urllib.request.ProxyHandler({}))
        try:
            with opener.open(request, timeout=timeout) as response:
                return response.status, dict(response.headers), response.read()
        except urllib.error.HTTPError as exc:
            return exc.code, dict(exc.headers), exc.read()

    def json(self, method: str, route: str, body: bytes | None = None, **kwargs) -> tuple[int, dict]:
        status, _, data = self.call(method, route, body, **kwargs)
        return status, json.loads(data)

    def stop(self) -> int:
        if self.process.poll() is None:
            self.process.terminate()
        try:
            return self.process.wait(timeout=60)
        except subprocess.TimeoutExpired:
            self.process.kill()
            return self.process.wait()


def start_server(store: Path, *args: str, token: str | None = None, tmpdir: Path | None = None,
                 timeout: float = 300) -> Server:
    """`m3d serve --store STORE --port 0 ARGS` in a subprocess, once it answers."""
    log = store.parent / f"serve-{time.monotonic_ns()}.log"
    env = dict(os.environ)
    if tmpdir is not None:
        env["TMPDIR"] = str(tmpdir)
    if token:
        env["M3D_TOKEN"] = token  # never on the command line (ps shows it)
    src = Path(__file__).resolve().parents[1] / "src"
    env["PYTHONPATH"] = os.pathsep.join([str(src), env.get("PYTHONPATH", "")])
    handle = open(log, "wb")
    process = subprocess.Popen([sys.executable, "-m", "m3d.cli", "serve", "--store", str(store), "--port", "0", *args],
                               stdout=handle, stderr=subprocess.STDOUT, env=env)
    serve_file = store / "serve.json"
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if process.poll() is not None:
            raise RuntimeError(f"m3d serve exited {process.returncode}: {log.read_text()[-2000:]}")
        if serve_file.exists():
            try:
                info = json.loads(serve_file.read_text())
            except ValueError:  # being written
                time.sleep(0.1)
                continue
            if info.get("pid") == process.pid:
                return Server(process, info["url"], store, token, log)
        time.sleep(0.2)
    process.kill()
    raise RuntimeError(f"m3d serve did not start within {timeout} s: {log.read_text()[-2000:]}")
