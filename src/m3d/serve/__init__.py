"""`m3d serve`: one warm process that owns a store and answers searches over HTTP (a JSON API and a
search page), and runs the syncs handed to it while it keeps answering.

- ``options``: what the server is asked to do (``ServeOptions``), validated where it is defined;
- ``service``: the library side (a ``search.Searcher`` over the open session, thumbnails, sync jobs);
- ``thumbnails``: renders of stored objects, cached in the store by content hash and view settings;
- ``app``: the FastAPI routes, the error mapping, the token; ``static/``: the page (no build step);
- ``handoff``: where a running server says it listens, and `m3d sync` handing its job to it.

FastAPI and uvicorn are imported only by the command that serves: `m3d --help` stays instant.
"""

from .options import ServeOptions

__all__ = ["ServeOptions"]
