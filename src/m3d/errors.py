"""Errors a user can act on. Each carries a one-line message; the CLI prints it and exits non-zero."""


def one_line(text: str, limit: int = 300) -> str:
    """Whitespace folded to single spaces and cut at limit characters: what a terminal line can hold."""
    text = " ".join(text.split())
    return text if len(text) <= limit else text[: limit - 3] + "..."


def printable(value: object) -> str:
    """User text made safe to show: control characters (terminal escape sequences, undecodable bytes
    of a file name) become visible escapes instead of acting."""
    text = str(value)
    return text if text.isprintable() else "".join(c if c.isprintable() else ascii(c)[1:-1] for c in text)


def spreadsheet_cell(value: object) -> object:
    """A CSV cell a spreadsheet shows as text: user text starting with = + - @ (or a tab/CR) is a formula
    there, so it gets a leading apostrophe. Numbers and None pass unchanged."""
    if isinstance(value, str) and value[:1] in ("=", "+", "-", "@", "\t", "\r"):
        return "'" + value
    return value


class M3DError(Exception):
    """Base class: a problem with the user's input or environment, never a bug. The message is
    always one line, whatever the library underneath said."""

    exit_code = 1

    def __init__(self, message: object = ""):
        super().__init__(one_line(str(message)))


class UsageError(M3DError):
    """Bad options or arguments: a path that is not there, an unknown name, a filter that matches nothing."""

    exit_code = 2


class NotFoundError(UsageError):
    """A collection or object asked for by name or id that is not there."""


class TooLargeError(UsageError):
    """An input over a configured size limit (an upload to `m3d serve`)."""


class MeshError(M3DError):
    """A mesh file that cannot be read or used (malformed, empty, degenerate, too large)."""

    exit_code = 2


class ModelLoadError(M3DError):
    """An encoder checkpoint that cannot be loaded (offline hub id, bad directory, unknown family)."""


class StoreBusyError(M3DError):
    """Another process holds the store."""

    exit_code = 3


class StoreError(M3DError):
    """The store refused an operation (unreachable server, incompatible collection, ...)."""


def no_space(path, spare: int = 0) -> StoreError:
    """The one line for a full disk: where, how much is left, and how much the write needs."""
    import shutil
    from pathlib import Path

    where = Path(path)
    while not where.exists() and where != where.parent:
        where = where.parent
    try:
        free = f"{shutil.disk_usage(where).free / 1e6:.0f} MB free"
    except OSError:
        free = "free space unknown"
    keep = f"; this write needs {spare / 1e6:.0f} MB" if spare else ""
    return StoreError(f"store {path}: no space left ({free}{keep})")
