"""`m3d serve` over real HTTP: a real server in a subprocess on a loopback port, a real store synced from
LPSB meshes (HOG and a tiny random CLIP checkpoint), uploads of a real mesh and a real picture, a text
query, errors, the token, and a sync handed to the server while a client keeps querying."""

from __future__ import annotations

import io
import json
import subprocess
import sys
import threading
import urllib.parse
import uuid
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from helpers import make_tree
from m3d.pipeline import SyncOptions, sync
from m3d.search import query, render_views
from m3d.serve import ServeOptions
from m3d.store import open_session
from serving import CONTROL_CLASS, HOSTILE_CLASS, dev_tree, start_server

CLASSES = {"Airplane": 2, "Chair": 2, "Cup": 2, "Table": 2}
HOG, CLIP = "m3d_hog_mean", "m3d_tiny_clip_mean"
TOKEN = "test-token-0123456789"
SENTENCE = "a chair with four legs"


@pytest.fixture(scope="module")
def served(lpsb, ckpts, tmp_path_factory):
    """A synced store, the answers the one-shot `query` gives on it, and a server over it (token on,
    a 2 MB upload limit, its own TMPDIR to see that uploads leave nothing behind)."""
    root = tmp_path_factory.mktemp("serve")
    tree = dev_tree(lpsb, root / "meshes", CLASSES)
    mesh = sorted((tree / "Chair").rglob("*.off"))[0]
    options = SyncOptions(encoders=("hog", str(ckpts["clip"])), pools=("mean",), workers=0, precision="fp32")
    with open_session(root / "store") as session:
        sync(session, tree, options)
        stored = {r.payload["path"]: r.payload for r in session.vectors.records(HOG)}
        fp = session.fingerprint(HOG)
        Image.fromarray(render_views(mesh, fp, stored["Chair/train/" + mesh.name]["pose"])[2]).save(root / "photo.png")
        expected = {
            "mesh": query(session, mesh, collection=HOG, k=6, exact=True),
            "image": query(session, image=root / "photo.png", collection=HOG, k=6, exact=True),
            "text": query(session, text=SENTENCE, k=6, exact=True),
        }
    (root / "tmp").mkdir()
    server = start_server(root / "store", "--max-upload-mb", "2", token=TOKEN, tmpdir=root / "tmp")
    yield {"server": server, "root": root, "tree": tree, "mesh": mesh, "expected": expected}
    assert server.stop() == 0, server.log.read_text()[-2000:]
    assert not (root / "store" / "serve.json").exists()  # a stopped server no longer says it listens


def q(params: dict) -> str:
    return urllib.parse.urlencode(params)


def test_mesh_image_and_text_answers_are_the_one_shot_query_answers(served) -> None:
    """Uploading the mesh, the picture and the sentence gives what `m3d query` gave on the same store:
    the same collection, ids in the same order, the same scores."""
    server, exp = served["server"], served["expected"]
    answers = {
        "mesh": server.json("POST", f"/api/search/mesh?{q({'filename': served['mesh'].name, 'k': 6, 'exact': 'true', 'collection': HOG})}",
                            served["mesh"].read_bytes()),
        "image": server.json("POST", f"/api/search/image?{q({'k': 6, 'exact': 'true', 'collection': HOG})}",
                             (served["root"] / "photo.png").read_bytes()),
        "text": server.json("GET", f"/api/search/text?{q({'q': SENTENCE, 'k': 6, 'exact': 'true'})}"),
    }
    for kind, (status, answer) in answers.items():
        assert status == 200, answer
        assert (answer["kind"], answer["collection"], answer["engine"]) == (kind, exp[kind].collection, "faiss")
        assert [h["id"] for h in answer["hits"]] == [h.id for h in exp[kind].hits], kind
        np.testing.assert_allclose([h["score"] for h in answer["hits"]], [h.score for h in exp[kind].hits], atol=1e-5)
    assert answers["mesh"][1]["hits"][0]["path"] == f"Chair/train/{served['mesh'].name}"
    assert answers["mesh"][1]["hits"][0]["score"] == pytest.approx(1.0, abs=1e-4)  # a stored mesh finds itself
    assert answers["text"][1]["collection"] == CLIP  # the collection with a text tower answers text


def test_qdrant_answers_and_class_filter(served) -> None:
    server = served["server"]
    status, answer = server.json("POST", f"/api/search/mesh?{q({'filename': 'chair.off', 'k': 3, 'class': 'Table'})}",
                                 served["mesh"].read_bytes())
    assert status == 200 and answer["engine"] == "qdrant"
    assert [h["class"] for h in answer["hits"]] == ["Table", "Table"]  # two tables, and nothing else
    status, facets = server.json("GET", f"/api/collections/{HOG}/facets")
    assert status == 200 and facets["counts"] == {**CLASSES, HOSTILE_CLASS: 1, CONTROL_CLASS: 1}
    status, listing = server.json("GET", "/api/collections")
    rows = {c["name"]: c for c in listing["collections"]}
    assert rows[HOG]["points"] == 10 and rows[HOG]["text"] is False and rows[CLIP]["text"] is True
    assert rows[HOG]["view"]["views"] == 8


def test_an_object_its_views_and_more_like_this(served) -> None:
    server = served["server"]
    hit = server.json("POST", f"/api/search/mesh?{q({'filename': 'c.off', 'k': 1, 'collection': HOG})}",
                      served["mesh"].read_bytes())[1]["hits"][0]
    status, obj = server.json("GET", f"/api/collections/{HOG}/objects/{hit['id']}")
    assert status == 200 and obj["payload"]["path"] == hit["path"] and len(obj["views"]) == 8
    status, headers, png = server.call("GET", obj["views"][3])
    assert status == 200 and headers["content-type"] == "image/png"
    image = np.asarray(Image.open(io.BytesIO(png)))
    assert image.shape == (224, 224, 3) and (image < 200).any()  # the object drawn, not a blank tile
    cached = list((server.store / "thumbnails").rglob("*.png"))
    assert len([p for p in cached if p.parent.name != "thumbnails"]) >= 8
    assert server.call("GET", obj["views"][3])[2] == png  # from the cache: the same bytes
    status, more = server.json("GET", f"/api/collections/{HOG}/objects/{hit['id']}/similar?k=4")
    assert status == 200 and len(more["hits"]) == 4 and hit["id"] not in [h["id"] for h in more["hits"]]


def test_the_token_is_needed_on_every_api_call(served) -> None:
    server = served["server"]
    for token in (None, "wrong-token-123456"):
        for method, route in (("GET", "/api/health"), ("GET", f"/api/collections/{HOG}/facets"),
                              ("GET", "/api/search/text?q=chair"), ("POST", "/api/sync")):
            status, headers, body = server.call(method, route, b"{}" if method == "POST" else None, token=token)
            assert status == 401 and "Bearer" in json.loads(body)["error"], (route, token)
    assert server.call("GET", "/api/health")[0] == 200
    status, headers, page = server.call("GET", "/", token=None)  # the page holds no data: it asks for the token
    assert status == 200 and b"m3d" in page and "script-src 'self'" in headers["content-security-policy"]
    assert "access-control-allow-origin" not in {k.lower() for k in headers}  # no CORS unless asked
    status, schema = server.json("GET", "/openapi.json", token=None)
    assert status == 200 and {"/api/search/mesh", "/api/search/image", "/api/search/text", "/api/health"} <= set(schema["paths"])
    status, _, docs = server.call("GET", "/docs", token=None)
    assert status == 200 and b"/static-offline-docs/swagger-ui-bundle.js" in docs  # no CDN
    assert server.call("GET", "/static-offline-docs/swagger-ui-bundle.js", token=None)[0] == 200
    # starting a sync needs the server's sync key, not the token page users hold
    status, error = server.json("POST", "/api/sync", json.dumps({"root": "/"}).encode())
    assert status == 403 and "sync key" in error["error"]


def test_bad_requests_are_one_json_line_with_their_status(served) -> None:
    server = served["server"]
    cases = [
        ("POST", "/api/search/mesh?filename=notes.txt", b"hello", 400, "a mesh upload is one of"),
        ("POST", "/api/search/mesh?filename=broken.off", b"OFF\n3 1 0\n0 0 0\n", 400, "broken.off"),
        ("POST", "/api/search/mesh?filename=empty.off", b"", 400, "empty"),
        ("POST", "/api/search/mesh?filename=big.off", b"x" * (3 << 20), 413, "limit"),
        ("POST", "/api/search/image", b"not an image", 400, "not an image"),
        ("GET", "/api/search/text?q=%20", None, 400, "empty"),
        ("GET", "/api/search/text?q=chair&k=0", None, 400, "k"),
        ("GET", "/api/search/text?q=chair&k=100000", None, 400, "k must be"),
        ("GET", "/api/search/text?q=chair&class=Sofa", None, 400, "no class 'Sofa'"),
        ("GET", "/api/search/text?q=chair&collection=m3d_nope_mean", None, 404, "no collection"),
        ("GET", f"/api/search/text?q=chair&collection={HOG}", None, 400, "text tower"),
        ("GET", f"/api/collections/{HOG}/objects/{uuid.uuid4()}", None, 404, "no object"),
        ("GET", f"/api/collections/{HOG}/objects/not-an-id", None, 404, "UUID"),
        ("GET", f"/api/collections/{HOG}/facets?field=pipeline", None, 400, "facets"),
        ("GET", "/api/jobs/99", None, 404, "no sync job"),
        ("GET", "/api/nowhere", None, 404, "no such"),
    ]
    for method, route, body, code, words in cases:
        status, headers, data = server.call(method, route, body)
        error = json.loads(data)["error"]
        assert status == code and words in error, (route, status, error)
        assert "\n" not in error and "m3d-upload-" not in error  # one line; never the private copy's path


def test_no_route_reads_outside_the_store_or_the_dataset(served, tmp_path) -> None:
    """Ids, names and asset paths that climb out are refused; a stored path that would lead out of its
    dataset's folder is never followed."""
    server = served["server"]
    for route in ("/static/..%2f..%2fpyproject.toml", "/static/%2e%2e/app.py", "/static/index.html%00.js",
                  f"/api/collections/..%2f..%2fqdrant/facets", f"/api/collections/{HOG}/objects/..%2f..%2flock",
                  f"/api/collections/{HOG}/objects/{uuid.uuid4()}/views/..%2f0.png", "/../../etc/passwd"):
        status, _, body = server.call("GET", route)
        assert status in (400, 404) and b"root:" not in body, route
    with open_session(tmp_path / "s") as session:
        session.claim_root("lib", tmp_path)
        assert session.source_path({"dataset": "lib", "path": "Chair/a.off"}) == tmp_path / "Chair/a.off"
        for path in ("../../etc/passwd", "/etc/passwd", "Chair/../../x.off", "a\0b.off"):
            assert session.source_path({"dataset": "lib", "path": path}) is None, path


def test_uploads_leave_nothing_behind(served) -> None:
    server = served["server"]
    for name, body in (("a.off", served["mesh"].read_bytes()), ("b.off", b"OFF\nbroken"), ("c.off", b"x" * (3 << 20))):
        server.call("POST", f"/api/search/mesh?filename={name}", body)
    assert list((served["root"] / "tmp").iterdir()) == []


def test_a_second_server_or_a_one_shot_command_on_a_served_store_says_busy(served) -> None:
    store = served["server"].store
    for command in (["serve", "--port", "0"], ["info"]):
        done = subprocess.run([sys.executable, "-m", "m3d.cli", *command, "--store", str(store)],
                              capture_output=True, text=True, timeout=300)
        assert done.returncode == 3 and "busy" in done.stderr, done.stderr


def sync_while_querying(served, ckpts, tree: Path, *options: str) -> tuple[subprocess.CompletedProcess, list, dict]:
    """`m3d sync TREE` on the served store while a client thread keeps listing and searching: the
    finished command, what the client saw ((status, points per collection) per request), and the
    points before."""
    server = served["server"]
    points_before = {c["name"]: c["points"] for c in server.json("GET", "/api/collections")[1]["collections"]}
    seen: list[tuple[int, dict]] = []
    stop = threading.Event()

    def client() -> None:
        while not stop.is_set():
            status, listing = server.json("GET", "/api/collections")
            seen.append((status, {c["name"]: c["points"] for c in listing.get("collections", [])}))
            status, answer = server.json("POST", f"/api/search/mesh?{q({'filename': 'c.off', 'k': 3})}",
                                         served["mesh"].read_bytes())
            seen.append((status, {}))

    thread = threading.Thread(target=client)
    thread.start()
    try:
        done = subprocess.run([sys.executable, "-m", "m3d.cli", "sync", str(tree), "--encoders", f"hog,{ckpts['clip']}",
                               "--pools", "mean", "--precision", "fp32", "--store", str(server.store), *options],
                              capture_output=True, text=True, timeout=900)
    finally:
        stop.set()
        thread.join()
    return done, seen, points_before


def test_a_sync_is_handed_to_the_server_and_searching_goes_on(served, lpsb, ckpts) -> None:
    """`m3d sync` on a served store runs in the server while a client keeps searching: every search
    answers, and each sees the collection before the new objects' write or after it, never between."""
    server = served["server"]
    more = make_tree(lpsb, served["root"] / "more", {"Glasses": 3, "Hand": 2}, split=None)
    done, seen, before = sync_while_querying(served, ckpts, more, "--workers", "0")
    assert done.returncode == 0, done.stderr
    assert "served by m3d serve" in done.stderr and "5 meshes: 5 added" in done.stdout
    assert seen and all(status == 200 for status, _ in seen)
    for _, points in seen:
        for name, count in points.items():
            assert count in (before[name], before[name] + 5), (name, count)
    status, facets = server.json("GET", f"/api/collections/{HOG}/facets")
    assert facets["counts"]["Glasses"] == 3 and facets["counts"]["Hand"] == 2
    status, jobs = server.json("GET", "/api/jobs")
    assert jobs["jobs"][0]["state"] == "done" and jobs["jobs"][0]["report"]["added"] == 5


@pytest.mark.slow
def test_a_sync_on_the_ray_engine_is_handed_over_too(served, lpsb, ckpts) -> None:
    """The same with --engine ray: the server starts a local Ray for the job, searching goes on."""
    pytest.importorskip("ray", reason="pip install 'm3d[ray]'")
    server = served["server"]
    tree = make_tree(lpsb, served["root"] / "ray", {"Bird": 2}, split=None)
    done, seen, before = sync_while_querying(served, ckpts, tree, "--engine", "ray", "--workers", "1")
    assert done.returncode == 0, done.stderr
    assert "2 meshes: 2 added" in done.stdout and "engine: ray" in done.stdout
    assert seen and all(status == 200 for status, _ in seen)
    for _, points in seen:
        for name, count in points.items():
            assert count in (before[name], before[name] + 2), (name, count)
    assert server.json("GET", f"/api/collections/{HOG}/facets")[1]["counts"]["Bird"] == 2


def test_readers_never_see_half_a_write(lpsb, tmp_path) -> None:
    """Library level: while a writer upserts batches of 7 points, every read under the guard's read
    side finds Qdrant and FAISS holding the same whole batches, and FAISS trusted."""
    from m3d.search import Searcher

    rng = np.random.default_rng(0)
    with open_session(tmp_path / "store") as session:
        session.vectors.ensure_collection("m3d_x_mean", 16)
        searcher = Searcher(session)
        counts, errors = [], []

        def writer() -> None:
            for _ in range(40):
                vectors = rng.normal(size=(7, 16)).astype(np.float32)
                vectors /= np.linalg.norm(vectors, axis=1, keepdims=True)
                session.upsert("m3d_x_mean", [str(uuid.uuid4()) for _ in range(7)], vectors, [{"class": "a"}] * 7)

        thread = threading.Thread(target=writer)
        thread.start()
        while thread.is_alive():
            with session.guard.reading():
                n = session.vectors.count("m3d_x_mean")
                held = session.held_exact("m3d_x_mean")
                if held is not None:
                    counts.append(n)
                    if len(held) != n or n % 7:
                        errors.append((n, len(held)))
        thread.join()
        assert counts and not errors
        searcher.close()


def test_serve_options_are_safe_by_default() -> None:
    assert ServeOptions().host == "127.0.0.1" and ServeOptions().warning() is None
    assert "no --token" in ServeOptions(host="0.0.0.0").warning()
    assert ServeOptions(host="0.0.0.0", token="long-enough-token").warning() is None
    from m3d.errors import UsageError

    for bad in (dict(token="short"), dict(port=70000), dict(max_upload_mb=0), dict(cors_origins=("example.org",))):
        with pytest.raises(UsageError):
            ServeOptions(**bad)


def test_the_guide_curl_examples_run_as_written(served, tmp_path) -> None:
    """docs/serve.md's curl block, line by line from the repository root, against this server: only its
    URL is this server's (M3D=...), and the token comes from a .curlrc, so each line is the guide's."""
    import re
    import shutil

    if shutil.which("curl") is None:
        pytest.skip("curl is not installed")
    server = served["server"]
    repo = Path(__file__).resolve().parents[1]
    guide = (repo / "docs" / "serve.md").read_text()
    block = next(b for b in re.findall(r"```bash\n(.*?)```", guide, re.S) if "curl " in b)
    lines = [line for line in block.splitlines() if line.startswith("curl ")]
    assert len(lines) >= 5 and any("search/mesh" in line for line in lines) and any("search/text" in line for line in lines)
    (tmp_path / ".curlrc").write_text(f'header = "Authorization: Bearer {TOKEN}"\n')
    env = {"PATH": "/usr/bin:/bin", "CURL_HOME": str(tmp_path), "HOME": str(tmp_path), "M3D": server.url}
    for line in lines:
        done = subprocess.run(["bash", "-c", line], cwd=repo, env=env, capture_output=True, text=True, timeout=300)
        assert done.returncode == 0, (line, done.stderr)
        answer = json.loads(done.stdout)
        assert "error" not in answer, (line, answer)


def test_a_handed_over_sync_is_checked_before_it_runs(served) -> None:
    """With the sync key (what `m3d sync` reads from serve.json): a relative folder, another Qdrant
    than the server's, or an unknown option is refused with one line, and no job starts."""
    server = served["server"]
    key = json.loads((server.store / "serve.json").read_text())["sync_key"]
    assert oct((server.store / "serve.json").stat().st_mode & 0o777) == "0o600"
    jobs_before = len(server.json("GET", "/api/jobs")[1]["jobs"])
    for request, words in (({"root": "meshes"}, "absolute"),
                           ({"root": "/tmp", "qdrant_url": "http://elsewhere:6333"}, "--qdrant-url"),
                           ({"root": "/tmp", "options": {"colour": "red"}}, "unknown sync option"),
                           ({"root": "/tmp", "options": {"pools": ["median"]}}, "unknown pool")):
        status, answer = server.json("POST", "/api/sync", json.dumps(request).encode(), token=key)
        assert status == 400 and words in answer["error"], (request, answer)
    assert len(server.json("GET", "/api/jobs")[1]["jobs"]) == jobs_before


def test_every_store_write_takes_the_write_side() -> None:
    """A VectorStore method added later that writes must join guard.WRITES, or readers could see half
    of it: the protocol's methods are either known writes or known reads."""
    from m3d.connector import VectorStore
    from m3d.connector.guard import WRITES

    reads = {"collections", "index_info", "physical", "dim", "views", "require_space", "count", "records",
             "retrieve", "generation", "metadata", "signature", "search", "facet", "problems"}
    methods = {n for n in vars(VectorStore) if not n.startswith("_") and callable(getattr(VectorStore, n))}
    assert methods - reads == WRITES, methods ^ (reads | WRITES)
