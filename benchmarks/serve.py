"""`m3d serve` speed: warm query latency per kind (mesh upload, image upload, text), then N concurrent
clients for S seconds on loopback, against a real server started on a store (or one already running).

    python benchmarks/serve.py --store .m3d --meshes ../shared/datasets/lpsb --out benchmarks/results/serve.json

The store needs a collection that answers mesh and image queries (e.g. hog) and one with a text tower
(a CLIP checkpoint). Before the server starts, the one-shot `m3d query` is timed on the same store for
comparison. Client-side times include HTTP on loopback; "server_ms" is the server's own figure. The
load (`uptime`) is recorded beside every number: on a shared machine it moves them.
"""

from __future__ import annotations

import argparse
import http.client
import json
import os
import random
import statistics
import subprocess
import sys
import threading
import time
import urllib.parse
from pathlib import Path

SENTENCES = ["a wooden chair", "an airplane with two wings", "a cup with a handle", "a pair of glasses",
             "a human figure standing", "a table with four legs", "an octopus", "a teddy bear", "a vase", "a fish"]


def load() -> str:
    return Path("/proc/loadavg").read_text().split(" ")[0] if Path("/proc/loadavg").exists() else "?"


def percentile(values: list[float], q: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, int(round(q / 100 * (len(ordered) - 1))))] if ordered else float("nan")


class Client:
    """One keep-alive HTTP connection (as a browser tab or a script would hold)."""

    def __init__(self, url: str, token: str | None):
        parsed = urllib.parse.urlparse(url)
        self.host, self.port = parsed.hostname, parsed.port
        self.headers = {"authorization": f"Bearer {token}"} if token else {}
        self.conn = self._connect()

    def _connect(self) -> http.client.HTTPConnection:
        """TCP_NODELAY, as browsers and curl set it: without it the body waits for the ACK of the
        headers (Nagle against delayed ACK), 40 ms per upload that no server can remove."""
        import socket

        conn = http.client.HTTPConnection(self.host, self.port, timeout=120)
        conn.connect()
        conn.sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        return conn

    def request(self, method: str, route: str, body: bytes | None = None) -> tuple[int, bytes, float]:
        start = time.perf_counter()
        headers = dict(self.headers, **({"content-type": "application/octet-stream"} if body is not None else {}))
        try:
            self.conn.request(method, route, body=body, headers=headers)
            response = self.conn.getresponse()
            data = response.read()
        except (OSError, http.client.HTTPException):
            self.conn.close()
            self.conn = self._connect()
            raise
        return response.status, data, (time.perf_counter() - start) * 1000


def queries(meshes: list[Path], images: list[bytes], k: int) -> dict[str, list[tuple[str, str, bytes | None]]]:
    """(method, route, body) per kind, cycled through by every client."""
    return {
        "mesh": [("POST", f"/api/search/mesh?{urllib.parse.urlencode({'filename': m.name, 'k': k})}", m.read_bytes())
                 for m in meshes],
        "image": [("POST", f"/api/search/image?k={k}", data) for data in images],
        "text": [("GET", f"/api/search/text?{urllib.parse.urlencode({'q': s, 'k': k})}", None) for s in SENTENCES],
    }


def sequential(client: Client, work: dict, rounds: int) -> dict:
    """Warm latency, one request at a time, per kind (after one warm-up request each), and the floor:
    GET /api/health, which does no search (HTTP on loopback and the server's thread hand-offs)."""
    floor = [client.request("GET", "/api/health")[2] for _ in range(rounds)]
    out = {"floor_health": {"requests": rounds, "p50_ms": round(statistics.median(floor), 1), "load": load()}}
    for kind, items in work.items():
        client.request(*items[0])
        wall, server = [], []
        for i in range(rounds):
            status, data, ms = client.request(*items[i % len(items)])
            if status != 200:
                raise SystemExit(f"{kind} query failed: {status} {data[:200]!r}")
            wall.append(ms)
            server.append(json.loads(data)["ms"])
        out[kind] = {"requests": rounds, "p50_ms": round(statistics.median(wall), 1),
                     "p90_ms": round(percentile(wall, 90), 1), "server_p50_ms": round(statistics.median(server), 1),
                     "load": load()}
    return out


def concurrent(url: str, token: str | None, work: dict, clients: int, seconds: float) -> dict:
    """`clients` threads, each with its own connection, each cycling mesh -> image -> text for `seconds`."""
    results: dict[str, list[float]] = {kind: [] for kind in work}
    errors: list[str] = []
    lock = threading.Lock()
    deadline = time.monotonic() + seconds

    def run(n: int) -> None:
        client = Client(url, token)
        rng = random.Random(n)
        kinds = list(work)
        i = n
        while time.monotonic() < deadline:
            kind = kinds[i % len(kinds)]
            i += 1
            try:
                status, data, ms = client.request(*rng.choice(work[kind]))
            except (OSError, http.client.HTTPException) as exc:
                with lock:
                    errors.append(f"{kind}: {type(exc).__name__}: {exc}")
                continue
            with lock:
                if status == 200:
                    results[kind].append(ms)
                else:
                    errors.append(f"{kind}: {status} {data[:120]!r}")

    load_before = load()
    started = time.monotonic()
    threads = [threading.Thread(target=run, args=(n,)) for n in range(clients)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    elapsed = time.monotonic() - started
    every = [ms for values in results.values() for ms in values]
    return {"clients": clients, "seconds": round(elapsed, 1), "requests": len(every), "errors": len(errors),
            "first_errors": errors[:5], "throughput_rps": round(len(every) / elapsed, 2),
            "p50_ms": round(percentile(every, 50), 1), "p99_ms": round(percentile(every, 99), 1),
            "per_kind": {k: {"requests": len(v), "p50_ms": round(percentile(v, 50), 1),
                             "p99_ms": round(percentile(v, 99), 1)} for k, v in results.items()},
            "load_before": load_before, "load_after": load()}


def one_shot(store: Path, mesh: Path, runs: int) -> dict:
    """`m3d query MESH` as a new process each time (what a query cost before the server)."""
    times = []
    for _ in range(runs):
        start = time.perf_counter()
        subprocess.run([sys.executable, "-m", "m3d.cli", "query", str(mesh), "--store", str(store)], check=True,
                       capture_output=True)
        times.append((time.perf_counter() - start) * 1000)
    return {"runs": runs, "p50_ms": round(statistics.median(times), 1), "load": load()}


def start(store: Path, token: str | None) -> tuple[subprocess.Popen, str]:
    env = dict(os.environ, **({"M3D_TOKEN": token} if token else {}))
    process = subprocess.Popen([sys.executable, "-m", "m3d.cli", "serve", "--store", str(store), "--port", "0"],
                               env=env, stderr=subprocess.PIPE)
    for _ in range(3000):
        try:
            info = json.loads((store / "serve.json").read_text())
            if info["pid"] == process.pid:
                return process, info["url"]
        except (OSError, ValueError, KeyError):
            pass
        if process.poll() is not None:
            raise SystemExit(f"m3d serve exited: {process.stderr.read().decode()[-2000:]}")
        time.sleep(0.1)
    raise SystemExit("m3d serve did not start")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--store", type=Path, default=Path(".m3d"))
    parser.add_argument("--meshes", type=Path, required=True, help="folder of query meshes (e.g. the synced one)")
    parser.add_argument("--url", help="a server already running (else one is started on --store)")
    parser.add_argument("--token", help="its token, if it has one")
    parser.add_argument("--queries", type=int, default=20, help="different query meshes")
    parser.add_argument("--rounds", type=int, default=60, help="sequential requests per kind")
    parser.add_argument("--clients", type=int, default=20)
    parser.add_argument("--seconds", type=float, default=60)
    parser.add_argument("--k", type=int, default=12)
    parser.add_argument("--one-shot", type=int, default=3, help="`m3d query` runs before the server starts")
    parser.add_argument("--out", type=Path)
    args = parser.parse_args()

    meshes = sorted(args.meshes.rglob("*.off"))
    meshes = random.Random(0).sample(meshes, min(args.queries, len(meshes)))
    result = {"cpus": os.cpu_count(), "store": str(args.store), "query_meshes": len(meshes), "k": args.k}
    if args.url is None and args.one_shot:
        result["one_shot_m3d_query"] = one_shot(args.store, meshes[0], args.one_shot)
    process = None
    url = args.url
    if url is None:
        started = time.perf_counter()
        process, url = start(args.store, args.token)
        result["server_start_s"] = round(time.perf_counter() - started, 1)
    try:
        client = Client(url, args.token)
        # pictures to search with: the first view of each query mesh's nearest stored object (a render)
        images = []
        for mesh in meshes[:10]:
            route = f"/api/search/mesh?{urllib.parse.urlencode({'filename': mesh.name, 'k': 1})}"
            hit = json.loads(client.request("POST", route, mesh.read_bytes())[1])["hits"][0]
            images.append(client.request("GET", hit["thumbnail"])[1])
        work = queries(meshes, images, args.k)
        result["sequential"] = sequential(client, work, args.rounds)
        result["concurrent"] = concurrent(url, args.token, work, args.clients, args.seconds)
    finally:
        if process is not None:
            process.terminate()
            process.wait(timeout=60)
    text = json.dumps(result, indent=2)
    print(text)
    if args.out:
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.write_text(text + "\n")


if __name__ == "__main__":
    main()
