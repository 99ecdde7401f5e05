"""Run the server: open the store (this process then holds it), warm the searcher, listen, say where
(serve.json, for `m3d sync`), and let go of everything on the way out, also on ctrl-C."""

from __future__ import annotations

import logging
import secrets
import signal
import socket
from pathlib import Path
from typing import Callable

from ..errors import UsageError
from .handoff import register, unregister
from .options import ServeOptions

log = logging.getLogger("m3d")


def listen(options: ServeOptions) -> socket.socket:
    """The listening socket, bound before anything is announced (port 0: the kernel picks one).
    TCP_NODELAY here is inherited by every accepted connection: without it uvicorn's response (headers,
    then body, two writes) waited on the client's delayed ACK, 44 ms per request on loopback for a bare
    ASGI app (0.3 ms with it)."""
    family = socket.AF_INET6 if ":" in options.host else socket.AF_INET
    sock = socket.socket(family, socket.SOCK_STREAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
    try:
        sock.bind((options.host, options.port))
    except OSError as exc:
        sock.close()
        raise UsageError(f"cannot listen on {options.host}:{options.port} ({exc.strerror or exc})") from None
    sock.listen(128)
    return sock


class Stopped(Exception):
    """SIGINT or SIGTERM, raised again by uvicorn once it has stopped serving."""


def stopping() -> None:
    """uvicorn stops on SIGINT/SIGTERM and then raises the signal again under the handler it found:
    with Python's defaults SIGTERM would end the process there, before serve.json is removed and the
    store closed. This handler turns it into an orderly return that runs every `finally` on the way."""
    def stop(*_) -> None:
        raise Stopped()

    signal.signal(signal.SIGTERM, stop)
    signal.signal(signal.SIGINT, stop)


def reclaim_signals(server) -> None:
    """After a sync job: give SIGINT/SIGTERM back to uvicorn. Ray's core worker (the ray engine, started
    in the job's thread) installs its own SIGTERM handler below Python's, and after it a SIGTERM killed
    the server outright (exit -15, serve.json left behind). Handlers are set on the main thread."""
    if server.servers:
        server.servers[0].get_loop().call_soon_threadsafe(
            lambda: [signal.signal(sig, server.handle_exit) for sig in (signal.SIGINT, signal.SIGTERM)])


def serve(store: Path, options: ServeOptions, *, url: str | None = None, api_key: str | None = None,
          checkpoint: Path | None = None, device: str | None = None,
          say: Callable[[str], None] = print) -> None:
    import uvicorn

    from .. import __version__
    from ..store import open_session
    from .app import create_app
    from .service import Service

    import torch

    torch.set_num_threads(options.threads)
    sock = listen(options)
    port = sock.getsockname()[1]
    try:
        with open_session(store, url=url, api_key=api_key, create=False) as session:
            service = Service(session, options, checkpoint=checkpoint, device=device, qdrant_url=url)
            try:
                service.warm()
                sync_key = secrets.token_urlsafe(32)
                app = create_app(service, sync_key=sync_key, version=__version__)
                host = "127.0.0.1" if options.host in ("0.0.0.0", "::", "") else options.host
                local = f"http://{'[' + host + ']' if ':' in host else host}:{port}"
                config = uvicorn.Config(app, log_level="warning", access_log=False, lifespan="off",
                                        timeout_graceful_shutdown=5)
                server = uvicorn.Server(config)
                service.after_job = lambda: reclaim_signals(server)
                register(session.store_dir, local, sync_key)
                stopping()
                try:
                    say(f"m3d serve: {local}/  (API docs {local}/docs; store {session.vectors.location})")
                    if options.token:
                        say(f"the page asks for the token once; or open {local}/#token=TOKEN")
                    server.run(sockets=[sock])
                except Stopped:
                    say("m3d serve: stopped")
                finally:
                    unregister(session.store_dir, sync_key)
            finally:
                service.close()
    finally:
        sock.close()
