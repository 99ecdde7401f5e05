"""The HTTP face of a ``Service``: FastAPI routes, the bearer token, upload limits, and m3d's errors as
JSON with one message and the status that fits (400 bad input, 401 no token, 404 not there, 409 a sync
already running, 413 too large, 503 store unavailable).

Every route under /api/ needs the token when one is set; the page, its two assets and the API docs
hold no store data and are served to anyone who reaches the port (the page asks for the token).

No `from __future__ import annotations` here: FastAPI reads the route signatures' annotations, which
name classes imported inside create_app (fastapi stays out of `m3d --help`)."""

import hmac
import json
import shutil
import tempfile
from importlib import resources
from pathlib import Path
from typing import Annotated, Optional

from ..errors import (M3DError, MeshError, ModelLoadError, NotFoundError, StoreBusyError, StoreError, TooLargeError,
                      UsageError, one_line, printable)
from ..search import Query
from .options import UPLOAD_MESH_SUFFIXES
from .service import JobConflict, Service

#: m3d's errors -> HTTP status, most specific first (the first class in an error's MRO that is here wins).
STATUS = {NotFoundError: 404, TooLargeError: 413, JobConflict: 409, UsageError: 400, MeshError: 400,
          StoreBusyError: 503, ModelLoadError: 503, StoreError: 503, M3DError: 400}
#: The page's own files: fixed names, never a path taken from a request.
ASSETS = {"app.js": "text/javascript; charset=utf-8", "app.css": "text/css; charset=utf-8"}
PAGE_POLICY = ("default-src 'none'; script-src 'self'; style-src 'self'; img-src 'self' blob: data:; "
               "connect-src 'self'; base-uri 'none'; form-action 'none'; frame-ancestors 'none'")


def status_of(exc: M3DError) -> int:
    return next(STATUS[c] for c in type(exc).__mro__ if c in STATUS)


def error_body(message: str) -> bytes:
    return json.dumps({"error": one_line(printable(message))}).encode()


class TokenGate:
    """Pure ASGI: /api/ requests without `Authorization: Bearer <token>` get 401 before any route runs.
    The server's sync key (known only to whoever can read the store's serve.json) passes too."""

    def __init__(self, app, tokens: list[str]):
        self.app = app
        self.tokens = [t.encode() for t in tokens]

    async def __call__(self, scope, receive, send):
        if scope["type"] == "http" and scope["path"].startswith("/api/") and scope["method"] != "OPTIONS":
            given = dict(scope["headers"]).get(b"authorization", b"")
            scheme, _, value = given.partition(b" ")
            if scheme.lower() != b"bearer" or not any(hmac.compare_digest(value.strip(), t) for t in self.tokens):
                body = error_body("this server needs a token: send the header `Authorization: Bearer TOKEN`")
                await send({"type": "http.response.start", "status": 401,
                            "headers": [(b"content-type", b"application/json"), (b"www-authenticate", b"Bearer"),
                                        (b"content-length", str(len(body)).encode())]})
                await send({"type": "http.response.body", "body": body})
                return
        await self.app(scope, receive, send)


def create_app(service: Service, *, sync_key: str, version: str = ""):
    from fastapi import Depends, Query as Param, Request
    from fastapi.exceptions import RequestValidationError
    from fastapi.responses import FileResponse, JSONResponse, Response
    from fastapi.security import HTTPBearer
    from fastapi_offline import FastAPIOffline
    from starlette.concurrency import run_in_threadpool
    from starlette.exceptions import HTTPException

    options = service.options
    bearer = HTTPBearer(auto_error=False, description="--token of `m3d serve` (only when it was started with one)")
    app = FastAPIOffline(title="m3d", version=version, dependencies=[Depends(bearer)],
                         description="Search a store of 3D objects by mesh, picture or text. Every /api/ call needs "
                                     "`Authorization: Bearer TOKEN` when the server was started with --token.")

    @app.exception_handler(M3DError)
    async def m3d_error(request, exc: M3DError):
        return Response(error_body(str(exc)), status_code=status_of(exc), media_type="application/json")

    @app.exception_handler(RequestValidationError)
    async def bad_request(request, exc: RequestValidationError):
        first = exc.errors()[0] if exc.errors() else {}
        where = ".".join(str(p) for p in first.get("loc", ())[1:]) or "request"
        return Response(error_body(f"{where}: {first.get('msg', 'invalid')}"), status_code=400,
                        media_type="application/json")

    @app.exception_handler(HTTPException)
    async def http_error(request, exc: HTTPException):
        message = "no such page or API route" if exc.status_code == 404 else str(exc.detail)
        return Response(error_body(message), status_code=exc.status_code, media_type="application/json",
                        headers=getattr(exc, "headers", None))

    K = Annotated[int, Param(ge=1, description=f"How many neighbours (at most {options.max_k}).")]
    Collection = Annotated[Optional[str], Param(description="Collection to search (default: the first *_mean one "
                                                            "that can answer this kind of query).")]
    Label = Annotated[Optional[str], Param(alias="class", description="Only neighbours of this class.")]
    Exact = Annotated[bool, Param(description="Answer from the FAISS exact index instead of Qdrant.")]
    Preview = Annotated[bool, Param(description="Also return the query's first view as a PNG data URL.")]

    # -- the page ---------------------------------------------------------------------------------
    static = resources.files("m3d.serve") / "static"

    @app.get("/", include_in_schema=False)
    def page():
        return Response((static / "index.html").read_bytes(), media_type="text/html; charset=utf-8",
                        headers={"content-security-policy": PAGE_POLICY, "x-content-type-options": "nosniff",
                                 "referrer-policy": "no-referrer", "cache-control": "no-cache"})

    @app.get("/static/{name}", include_in_schema=False)
    def asset(name: str):
        if name not in ASSETS:
            raise NotFoundError("no such page asset")
        return Response((static / name).read_bytes(), media_type=ASSETS[name],
                        headers={"x-content-type-options": "nosniff", "cache-control": "no-cache"})

    # -- reads ------------------------------------------------------------------------------------
    @app.get("/api/health", summary="The server answers; its store, collections and the sync running now")
    def health():
        return service.health()

    @app.get("/api/collections", summary="Collections with their settings, point and class counts")
    def collections():
        return {"collections": service.collections()}

    @app.get("/api/collections/{name}/facets", summary="Points per value of a keyword field (class by default)")
    def facets(name: str, field: Annotated[str, Param(description="class, split or dataset")] = "class"):
        return {"collection": name, "field": field, "counts": service.facets(name, field)}

    @app.get("/api/collections/{name}/objects/{object_id}", summary="One object: its payload and its views")
    def get_object(name: str, object_id: str):
        return service.object(name, object_id)

    @app.get("/api/collections/{name}/objects/{object_id}/views/{view}.png", summary="One view of an object (PNG)",
             response_class=FileResponse)
    def get_view(name: str, object_id: str, view: int):
        return FileResponse(service.view_png(name, object_id, view), media_type="image/png",
                            headers={"cache-control": "private, max-age=3600"})

    @app.get("/api/collections/{name}/objects/{object_id}/similar", summary="More like this object")
    def similar(name: str, object_id: str, k: K = 12, label: Label = None, exact: Exact = False):
        return service.similar(name, object_id, k=k, label=label, exact=exact)

    # -- searches ---------------------------------------------------------------------------------
    @app.get("/api/search/text", summary="Search with a sentence (collections whose encoder has a text tower)")
    def search_text(q: Annotated[str, Param(description="What to look for, e.g. a wooden chair")],
                    k: K = 12, collection: Collection = None, label: Label = None, exact: Exact = False):
        return service.search(Query(text=q), collection=collection, k=k, label=label, exact=exact)

    upload_body = {"requestBody": {"required": True, "content": {
        "application/octet-stream": {"schema": {"type": "string", "format": "binary"}}}}}

    @app.post("/api/search/mesh", openapi_extra=upload_body,
              summary="Search with a mesh file sent as the request body (.off .obj .ply .stl .glb)")
    async def search_mesh(request: Request,
                          filename: Annotated[str, Param(description="The file's name: its suffix says its format "
                                                                     "(and, with --up auto, its convention).")],
                          k: K = 12, collection: Collection = None, label: Label = None, exact: Exact = False,
                          up: Annotated[Optional[str], Param(description="The mesh's up axis when it differs from "
                                                                         "the collection's rule.")] = None,
                          preview: Preview = False):
        suffix = Path(filename).suffix.lower()
        if suffix not in UPLOAD_MESH_SUFFIXES:
            raise UsageError(f"{filename}: a mesh upload is one of {', '.join(UPLOAD_MESH_SUFFIXES)}")
        with Upload(options.max_upload_bytes) as upload:
            path = await upload.receive(request, "query" + suffix)
            try:
                return await run_in_threadpool(service.search, Query(mesh=path, up=up), collection=collection,
                                               k=k, label=label, exact=exact, preview=preview)
            except M3DError as exc:  # name the user's file, not the private copy
                raise type(exc)(str(exc).replace(str(path), filename)) from None

    @app.post("/api/search/image", openapi_extra=upload_body,
              summary="Search with a picture sent as the request body (PNG, JPEG, ...): encoded as one view")
    async def search_image(request: Request, k: K = 12, collection: Collection = None, label: Label = None,
                           exact: Exact = False, preview: Preview = False):
        with Upload(options.max_upload_bytes) as upload:
            path = await upload.receive(request, "image")
            try:
                return await run_in_threadpool(service.search, Query(image=path), collection=collection, k=k,
                                               label=label, exact=exact, preview=preview)
            except M3DError as exc:
                raise type(exc)(str(exc).replace(str(path), "the uploaded image")) from None

    # -- syncs handed to the server -----------------------------------------------------------------
    @app.post("/api/sync", summary="Run a sync as a job while searches go on (`m3d sync` does this by itself "
                                   "when a server holds its store)")
    async def start_sync(request: Request):
        given = request.headers.get("authorization", "").partition(" ")[2].strip()
        if not hmac.compare_digest(given.encode(), sync_key.encode()):
            return Response(error_body("starting a sync needs the server's sync key (in the store's serve.json): "
                                       "run `m3d sync` against the same --store"), status_code=403,
                            media_type="application/json")
        try:
            body = await request.json()
        except ValueError:
            raise UsageError("a sync request is a JSON object") from None
        job = service.start_sync(body)
        return JSONResponse(job.to_json(), status_code=202)

    @app.get("/api/jobs", summary="Sync jobs run by this server, newest first")
    def jobs():
        return {"jobs": [j.to_json() for j in sorted(service.jobs.values(), key=lambda j: -j.id)]}

    @app.get("/api/jobs/{job_id}", summary="One sync job: state, progress, report")
    def job(job_id: int):
        return service.job(job_id).to_json()

    outer = app
    if options.cors_origins:
        from starlette.middleware.cors import CORSMiddleware

        outer = CORSMiddleware(outer, allow_origins=list(options.cors_origins), allow_methods=["GET", "POST"],
                               allow_headers=["authorization", "content-type"])
    tokens = [options.token] if options.token else []
    return TokenGate(outer, tokens + [sync_key]) if options.token else outer


class Upload:
    """A request body streamed into a private temporary folder (mode 0700), refused with 413 as soon as
    it passes the limit, removed with everything in it when the request ends."""

    def __init__(self, limit: int):
        self.limit = limit
        self.folder: Optional[Path] = None

    def __enter__(self) -> "Upload":
        self.folder = Path(tempfile.mkdtemp(prefix="m3d-upload-"))
        return self

    async def receive(self, request, name: str) -> Path:
        declared = request.headers.get("content-length")
        if declared is not None and declared.isdigit() and int(declared) > self.limit:
            raise TooLargeError(f"upload of {int(declared)} bytes is over this server's limit of {self.limit} bytes "
                                "(--max-upload-mb)")
        path = self.folder / name
        size = 0
        with open(path, "wb") as out:
            async for chunk in request.stream():
                size += len(chunk)
                if size > self.limit:
                    raise TooLargeError(f"upload is over this server's limit of {self.limit} bytes (--max-upload-mb)")
                out.write(chunk)
        if not size:
            raise UsageError("the request body is empty: send the file's bytes as the body")
        return path

    def __exit__(self, *exc) -> None:
        shutil.rmtree(self.folder, ignore_errors=True)
