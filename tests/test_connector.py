"""Both Qdrant backends through the same protocol (real engines: qdrant-edge on disk and
qdrant-client's in-process mode), FAISS agreement, and the store lock across real processes."""

import subprocess
import sys
import textwrap

import numpy as np
import pytest

from m3d.connector.edge import EdgeStore
from m3d.connector.exact import ExactIndex
from m3d.connector.server import ServerStore
from m3d.dataset import point_id
from m3d.errors import StoreBusyError, StoreError
from m3d.store import open_session


def _points(n=60, dim=16, seed=0):
    rng = np.random.default_rng(seed)
    vectors = rng.normal(size=(n, dim)).astype(np.float32)
    vectors /= np.linalg.norm(vectors, axis=1, keepdims=True)
    ids = [point_id("d", f"c{i % 3}/obj_{i}.off") for i in range(n)]
    payloads = [{"class": f"c{i % 3}", "split": None, "path": f"c{i % 3}/obj_{i}.off", "dataset": "d"} for i in range(n)]
    return ids, vectors, payloads


@pytest.fixture(params=["edge", "server"])
def backend(request, tmp_path):
    store = EdgeStore(tmp_path / "qdrant") if request.param == "edge" else ServerStore(":memory:")
    yield store
    store.close()


def test_upsert_search_filter_facet_delete(backend):
    ids, vectors, payloads = _points()
    backend.ensure_collection("m3d_t_mean", 16)
    backend.upsert("m3d_t_mean", ids, vectors, payloads)
    backend.upsert("m3d_t_mean", ids[:10], vectors[:10], payloads[:10])  # re-run overwrites, never duplicates
    assert backend.collections() == ["m3d_t_mean"]
    assert backend.count("m3d_t_mean") == 60
    assert backend.dim("m3d_t_mean") == 16

    hits = backend.search("m3d_t_mean", vectors[:3], 5)
    assert [h[0].id for h in hits] == ids[:3]  # each vector finds itself first
    assert hits[0][0].score == pytest.approx(1.0, abs=1e-5)
    exact = ExactIndex(ids, vectors)
    _, faiss_ids = exact.search(vectors[:3], 5)
    assert [[h.id for h in row] for row in hits] == faiss_ids

    only_c1 = backend.search("m3d_t_mean", vectors[:1], 5, label="c1")[0]
    assert len(only_c1) == 5 and {h.payload["class"] for h in only_c1} == {"c1"}
    assert backend.facet("m3d_t_mean", "class") == {"c0": 20, "c1": 20, "c2": 20}

    backend.delete("m3d_t_mean", ids[:7])
    assert backend.count("m3d_t_mean") == 53
    assert {r.id for r in backend.records("m3d_t_mean")} == set(ids[7:])
    got = {r.id: r.vector for r in backend.records("m3d_t_mean", fields=["class"], vectors=True)}
    np.testing.assert_allclose(got[ids[20]], vectors[20], atol=1e-6)
    assert [r.payload["path"] for r in backend.retrieve("m3d_t_mean", [ids[30], ids[8]])] == [payloads[30]["path"], payloads[8]["path"]]


def test_dimension_mismatch_refused(backend):
    backend.ensure_collection("m3d_t_mean", 16)
    with pytest.raises(StoreError, match="16-d"):
        backend.ensure_collection("m3d_t_mean", 32)


def test_edge_store_survives_reopen(tmp_path):
    ids, vectors, payloads = _points()
    store = EdgeStore(tmp_path / "q")
    store.ensure_collection("m3d_t_mean", 16)
    store.upsert("m3d_t_mean", ids, vectors, payloads)
    store.close()
    again = EdgeStore(tmp_path / "q")
    assert again.count("m3d_t_mean") == 60
    assert again.search("m3d_t_mean", vectors[5:6], 1)[0][0].id == ids[5]
    again.close()


def test_exact_index_roundtrip(tmp_path):
    ids, vectors, _ = _points()
    ExactIndex(ids, vectors, collection="m3d_t_mean", generation="g1", path=tmp_path / "m3d_t_mean.faiss")
    loaded = ExactIndex.load(tmp_path, "m3d_t_mean")
    assert loaded.ids == ids and (loaded.collection, loaded.generation) == ("m3d_t_mean", "g1")
    np.testing.assert_allclose(loaded.vectors, vectors)
    assert ExactIndex.load(tmp_path, "missing") is None


def test_server_unreachable_is_one_line_after_retries():
    store = ServerStore("http://127.0.0.1:9", api_key="sekrit-key", retries=2, backoff_s=0.01)
    with pytest.raises(StoreError) as err:
        store.collections()
    message = str(err.value)
    assert "failed after 2 tries" in message and "\n" not in message
    assert "sekrit-key" not in message and "127.0.0.1:9" in message


def test_second_process_gets_store_busy(tmp_path):
    store_dir = tmp_path / "store"
    with open_session(store_dir):
        script = textwrap.dedent(f"""
            import sys, time
            from m3d.store import open_session
            from m3d.errors import StoreBusyError
            t = time.monotonic()
            try:
                open_session({str(store_dir)!r})
            except StoreBusyError as exc:
                print(f"{{time.monotonic() - t:.3f}}|{{exc}}")
                sys.exit(3)
        """)
        done = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=60)
        assert done.returncode == 3, done.stderr
        seconds, message = done.stdout.strip().split("|", 1)
        assert float(seconds) < 1.0
        assert "busy" in message and "pid" in message
    with open_session(store_dir):  # released on exit: the next opener gets in
        pass


def test_busy_inside_one_process_is_reported(tmp_path):
    with open_session(tmp_path / "s"):
        with pytest.raises(StoreBusyError):
            open_session(tmp_path / "s")


class _Garbage(__import__("http.server").server.BaseHTTPRequestHandler):
    """Answers every request 200 with bytes that are not UTF-8 (a proxy page, the wrong service)."""

    requests = 0

    def do_GET(self):
        type(self).requests += 1
        body = b"\xff\xfe\x00not json\x80"
        self.send_response(200)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)

    def log_message(self, *args):
        pass


def test_server_answering_garbage_is_one_line_without_retries():
    import http.server
    import threading

    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), _Garbage)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    try:
        store = ServerStore(f"http://127.0.0.1:{server.server_address[1]}", retries=3, backoff_s=0.01)
        with pytest.raises(StoreError) as err:
            store.collections()
    finally:
        server.shutdown()
    assert "not a Qdrant server" in str(err.value) and "\n" not in str(err.value)
    assert _Garbage.requests == 1  # not transient: asked once


def test_server_that_never_answers_fails_within_its_timeouts(caplog):
    import socket
    import threading

    listener = socket.create_server(("127.0.0.1", 0))
    held = []

    def accept_and_ignore():  # takes every connection, never says a word
        while True:
            try:
                held.append(listener.accept()[0])
            except OSError:
                return

    threading.Thread(target=accept_and_ignore, daemon=True).start()
    store = ServerStore(f"http://127.0.0.1:{listener.getsockname()[1]}", retries=2, backoff_s=0.01, timeout_s=1)
    with caplog.at_level("WARNING", logger="m3d"), pytest.raises(StoreError) as err:
        store.collections()
    listener.close()
    message = str(err.value)
    assert "failed after 2 tries" in message and "1 s timeout each" in message and "\n" not in message
    assert len(held) == 2  # one connection per try, each ended by the read timeout
    assert any("retrying" in r.message and "gives up within" in r.message for r in caplog.records)
