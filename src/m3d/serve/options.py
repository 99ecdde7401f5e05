"""What `m3d serve` is asked to do, checked before the store is opened."""

from __future__ import annotations

import ipaddress
from dataclasses import dataclass

from ..errors import UsageError
from ..meshio import DEFAULT_MAX_FACES

DEFAULT_PORT = 8000
DEFAULT_MAX_UPLOAD_MB = 64.0
#: Query suffixes an upload may have: every format sync reads, less .gltf (its buffers are other
#: files, which an upload does not bring and the server never reads for it).
UPLOAD_MESH_SUFFIXES = (".off", ".obj", ".ply", ".stl", ".glb")


@dataclass(frozen=True)
class ServeOptions:
    host: str = "127.0.0.1"
    port: int = DEFAULT_PORT  # 0: any free port (written to the store's serve.json)
    token: str | None = None  # every /api/ call needs `Authorization: Bearer <token>`
    max_upload_mb: float = DEFAULT_MAX_UPLOAD_MB
    max_faces: int = DEFAULT_MAX_FACES  # the same limit sync applies
    cors_origins: tuple[str, ...] = ()  # none unless asked for
    max_k: int = 200  # results per query: a page of thumbnails, never the collection
    #: torch threads per query encode. Requests run side by side, so one each: measured on 2 busy cores,
    #: a tiny CLIP text query took 450-660 ms p50 with torch's 2 threads and 55-85 ms with 1
    threads: int = 1

    def __post_init__(self) -> None:
        if not self.host.strip():
            raise UsageError("--host is empty: use 127.0.0.1 (this machine only) or 0.0.0.0 (every interface)")
        if int(self.port) != self.port or not 0 <= self.port <= 65535:
            raise UsageError(f"--port must be an integer in [0, 65535], got {self.port!r}")
        if self.token is not None and len(self.token) < 8:
            raise UsageError("--token is shorter than 8 characters: use a long random one, e.g. "
                             "`python -c 'import secrets; print(secrets.token_urlsafe())'`")
        if not self.max_upload_mb > 0:
            raise UsageError(f"--max-upload-mb must be positive, got {self.max_upload_mb!r}")
        if int(self.threads) != self.threads or self.threads < 1:
            raise UsageError(f"--threads must be a positive integer, got {self.threads!r}")
        if int(self.max_faces) != self.max_faces or self.max_faces < 1:
            raise UsageError(f"--max-faces must be a positive integer, got {self.max_faces!r}")
        for origin in self.cors_origins:
            if not origin.startswith(("http://", "https://")) and origin != "*":
                raise UsageError(f"--cors-origin {origin!r} is not an origin (http://host[:port] or https://...)")

    @property
    def max_upload_bytes(self) -> int:
        return int(self.max_upload_mb * 1024 * 1024)

    @property
    def loopback(self) -> bool:
        """Whether only this machine can reach the server."""
        if self.host == "localhost":
            return True
        try:
            return ipaddress.ip_address(self.host).is_loopback
        except ValueError:  # a host name: it may resolve to anything
            return False

    def warning(self) -> str | None:
        """The line printed when the server is reachable from other machines without a token."""
        if self.loopback or self.token:
            return None
        return (f"warning: --host {self.host} lets other machines search this store and see its objects, "
                "and no --token is set: anyone who reaches this port can use it")
