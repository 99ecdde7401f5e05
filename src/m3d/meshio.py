"""Load a mesh file and normalise it to the unit sphere.

OFF (ModelNet's format) has its own vectorised reader: ModelNet ships files with a broken header
(``OFF490 518 0``) and the stage must not spend Python-level time per line. Every other format goes
through trimesh. All formats share one validation + normalisation step, and every failure becomes a
one-line :class:`MeshError` (the caller adds the file name), never a raw exception.
"""

from __future__ import annotations

import errno
import os
import re
import stat
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import numpy as np

from m3d.errors import MeshError, one_line

DEFAULT_MAX_FACES = 2_000_000
MESH_EXTENSIONS: frozenset[str] = frozenset({".off", ".obj", ".ply", ".stl", ".glb", ".gltf"})

__all__ = ["DEFAULT_MAX_FACES", "MESH_EXTENSIONS", "Mesh", "load_mesh", "write_off"]

# Smallest possible vertex line ("0 0 0\n") and face line ("3 0 1 2\n"): a header whose counts need
# more bytes than the file has is refused before anything is allocated.
_MIN_VERTEX_BYTES = 6
_MIN_FACE_BYTES = 8
# An OFF file bigger than this per allowed face is not a mesh we would accept anyway.
_MAX_OFF_BYTES_PER_FACE = 1024
_MAX_MESSAGE = 240

_HEADER_RE = re.compile(rb"\s*(?P<kw>(?:ST)?C?N?4?n?OFF)")
_BINARY_RE = re.compile(rb"\s*(?:ST)?C?N?4?n?OFF[ \t]*BINARY")
_COMMENT_RE = re.compile(rb"#[^\n]*")
_INT_RE = re.compile(rb"[+-]?\d+")
# Bytes a text mesh may contain: printable ASCII, whitespace, and UTF-8 multibyte sequences.
_CONTROL = bytes(c for c in range(32) if c not in (9, 10, 11, 12, 13)) + b"\x7f"
_POW10 = 10.0 ** np.arange(23)


@dataclass(frozen=True, eq=False)
class Mesh:
    """A triangle mesh centred on its bounding-box centre and scaled so max |v| == 1."""

    vertices: np.ndarray  # (V, 3) float32
    faces: np.ndarray  # (F, 3) int32, all indices < V

    def __repr__(self) -> str:
        return f"Mesh(vertices={len(self.vertices)}, faces={len(self.faces)})"


def write_off(mesh: Mesh, path: Path) -> Path:
    """The mesh as an ASCII OFF file (folders made): how tests and benchmarks hand m3d a turned or
    synthetic mesh as a real file. Seven significant digits keep float32 vertices exact enough."""
    path.parent.mkdir(parents=True, exist_ok=True)
    lines = ["OFF", f"{len(mesh.vertices)} {len(mesh.faces)} 0"]
    lines += [" ".join(f"{c:.7g}" for c in v) for v in mesh.vertices]
    lines += [f"3 {a} {b} {c}" for a, b, c in mesh.faces]
    path.write_text("\n".join(lines) + "\n")
    return path


def load_mesh(path: str | Path, *, max_faces: int = DEFAULT_MAX_FACES,
              on_bytes: Callable[[bytes], object] | None = None, standalone: bool = False) -> Mesh:
    """Read, validate and normalise one mesh file; any problem raises a one-line MeshError.
    on_bytes, when given, sees the file's bytes if this reader read them whole (OFF), so a caller
    can hash them without reading the file a second time. standalone (an upload from someone else):
    the file is read alone, never the files it names (an OBJ's mtllib, a glTF's buffers), which
    could point anywhere on this machine."""
    try:
        p = Path(path)
        suffix = p.suffix.lower()
        if suffix not in MESH_EXTENSIONS:
            raise MeshError(
                f"unsupported extension {suffix or '(none)'!r}; expected one of "
                + ", ".join(sorted(MESH_EXTENSIONS))
            )
        size = _check_file(p)
        if suffix == ".off":
            cap = _MAX_OFF_BYTES_PER_FACE * max_faces + (1 << 20)
            if size > cap:
                raise MeshError(f"file is {size} bytes, too large for the limit max_faces={max_faces}")
            data = _read_bytes(p)
            if on_bytes is not None:
                on_bytes(data)
            vertices, faces = _parse_off(data, max_faces)
        else:
            _precheck_face_count(p, suffix, size, max_faces)
            vertices, faces = _load_with_trimesh(p, suffix, max_faces, standalone)
        return _validate_and_normalise(vertices, faces, max_faces)
    except MeshError as exc:
        raise MeshError(one_line(str(exc), _MAX_MESSAGE)) from None
    except MemoryError:
        raise MeshError("out of memory while reading the mesh (file too large?)") from None
    except RecursionError:
        raise MeshError("mesh structure too deeply nested to read") from None
    except Exception as exc:  # the stage's contract: a bad file is a MeshError, never a crash
        raise MeshError(one_line(f"unreadable mesh ({type(exc).__name__}: {exc})", _MAX_MESSAGE)) from None


# ---------------------------------------------------------------------------------------------
# file access


def _check_file(p: Path) -> int:
    """Stat the path (following symlinks) and name what is wrong with it; return its size."""
    try:
        st = os.stat(p)
    except FileNotFoundError:
        if os.path.islink(p):
            raise MeshError("broken symlink (its target does not exist)") from None
        raise MeshError("no such file") from None
    except PermissionError:
        raise MeshError("permission denied") from None
    except OSError as exc:
        if exc.errno == errno.ELOOP:
            raise MeshError("symlink loop (too many levels of symbolic links)") from None
        raise MeshError(f"cannot access file: {exc.strerror or exc}") from None
    if stat.S_ISDIR(st.st_mode):
        raise MeshError("is a directory, not a mesh file")
    if not stat.S_ISREG(st.st_mode):
        raise MeshError("not a regular file")
    if st.st_size == 0:
        raise MeshError("empty file")
    return st.st_size


def _read_bytes(p: Path) -> bytes:
    try:
        with open(p, "rb") as fh:
            return fh.read()
    except PermissionError:
        raise MeshError("permission denied") from None
    except IsADirectoryError:
        raise MeshError("is a directory, not a mesh file") from None
    except OSError as exc:
        raise MeshError(f"read error: {exc.strerror or exc}") from None


# ---------------------------------------------------------------------------------------------
# OFF


def _parse_off(data: bytes, max_faces: int) -> tuple[np.ndarray, np.ndarray]:
    """Parse OFF text into float64 vertices (V, 3) and int64 triangles (T, 3)."""
    if not data or data.isspace():  # isspace stops at the first non-space: no copy
        raise MeshError("empty file")
    if _BINARY_RE.match(data):
        raise MeshError("binary OFF is not supported (only text OFF)")
    if b"\x00" in data or data.translate(None, _CONTROL) != data:
        raise MeshError("binary data (control bytes), not a text OFF file")
    if not data.isascii():
        try:
            data.decode("utf-8")
        except UnicodeDecodeError:
            raise MeshError("not UTF-8 text (binary data?)") from None
        if data.startswith(b"\xef\xbb\xbf"):
            data = data[3:]
    if b"\n" not in data and b"\r" in data:  # classic Mac line ends
        data = data.replace(b"\r", b"\n")
    if b"#" in data:
        data = _COMMENT_RE.sub(b"", data)

    n_vertices, n_faces, body = _parse_off_header(data)
    if n_vertices == 0:
        raise MeshError("no vertices (header declares 0)")
    if n_faces == 0:
        raise MeshError("no faces (header declares 0)")
    need = n_vertices * _MIN_VERTEX_BYTES + n_faces * _MIN_FACE_BYTES
    if need > len(body) + _MIN_FACE_BYTES:  # last line may lack its newline
        raise MeshError(
            f"header claims {n_vertices} vertices and {n_faces} faces, more than the "
            f"{len(data)}-byte file can hold (truncated file or corrupt header)"
        )
    if n_faces > max_faces:
        raise MeshError(f"{n_faces} faces exceed the limit max_faces={max_faces}")

    a = np.frombuffer(body, dtype=np.uint8)
    # whitespace (<= 32) padded at both ends: its edges alternate token start, token end
    ws = np.ones(len(a) + 2, dtype=bool)
    np.less_equal(a, 32, out=ws[1:-1])
    edges = np.flatnonzero(ws[1:] != ws[:-1])
    del ws
    tok_start, tok_end = edges[0::2].copy(), edges[1::2].copy()
    newlines = np.flatnonzero(a == 10)
    # bounds[i] = index of the first token of line i; line i has bounds[i+1] - bounds[i] tokens
    bounds = np.empty(len(newlines) + 2, dtype=np.int64)
    bounds[0] = 0
    bounds[1:-1] = np.searchsorted(tok_start, newlines)
    bounds[-1] = len(tok_start)
    per_line = np.diff(bounds)
    lines = np.flatnonzero(per_line)  # non-empty lines
    if len(lines) < n_vertices + n_faces:
        raise MeshError(
            f"truncated: header says {n_vertices} vertices and {n_faces} faces, "
            f"the body has only {len(lines)} non-empty lines"
        )

    v_counts = per_line[lines[:n_vertices]]
    k = int(v_counts[0])
    if k < 3 or not np.all(v_counts == k):
        bad = int(np.argmax(v_counts != k)) if k >= 3 else 0
        raise MeshError(
            f"header counts disagree with the body: vertex line {bad + 1} has "
            f"{int(v_counts[bad])} values where {max(k, 3)} are expected"
        )
    n_vtok = n_vertices * k
    vtok = (tok_start[:n_vtok], tok_end[:n_vtok])
    values = _parse_floats(a, body, *vtok)
    if values is None:
        raise MeshError("non-numeric value in the vertex section")
    vertices = values.reshape(n_vertices, k)[:, :3]

    f_counts = per_line[lines[n_vertices : n_vertices + n_faces]]
    f_end = n_vtok + int(f_counts.sum())
    fvals = _fromstring(body[tok_start[n_vtok] : tok_end[f_end - 1]], np.int64, f_end - n_vtok)
    if fvals is None:
        fvals = _fromstring(body[tok_start[n_vtok] : tok_end[f_end - 1]], np.float64, f_end - n_vtok)
        if fvals is None:
            raise MeshError("non-numeric value in the face section")

    if len(lines) > n_vertices + n_faces:
        nxt = lines[n_vertices + n_faces]
        _refuse_extra_face(body, tok_start, tok_end, bounds[nxt], bounds[nxt + 1], n_vertices)

    if np.all(f_counts == 4):
        quads = fvals.reshape(n_faces, 4)
        if np.all(quads[:, 0] == 3):
            return vertices, _as_indices(quads[:, 1:], n_vertices)
    at_eof = len(lines) == n_vertices + n_faces
    return vertices, _triangulate(fvals, f_counts, n_vertices, max_faces, last_is_eof=at_eof)


def _parse_off_header(data: bytes) -> tuple[int, int, bytes]:
    """Return (V, F, body after the counts line); accepts ``OFF490 518 0`` and ``OFF 8 6 0``."""
    m = _HEADER_RE.match(data)
    if m is None:
        head = data.lstrip()[:12].decode("ascii", "replace")
        raise MeshError(f"missing OFF header keyword (file starts with {head!r})")
    kw = m.group("kw").decode()
    if "4" in kw or "n" in kw:
        raise MeshError(f"unsupported OFF variant {kw} (only OFF, COFF, NOFF, CNOFF, STOFF)")
    eol = data.find(b"\n", m.end())
    eol = len(data) if eol < 0 else eol
    rest = data[m.end() : eol]
    if rest.split()[:1] == [b"BINARY"]:
        raise MeshError("binary OFF is not supported (only text OFF)")
    if rest[:1].isalpha():  # e.g. 'OFFSET', not a header keyword
        found = (kw + rest.decode("ascii", "replace"))[:16]
        raise MeshError(f"missing OFF header keyword (found {found!r})")
    tokens = rest.split()
    pos = eol + 1
    while not tokens and pos < len(data):
        eol = data.find(b"\n", pos)
        eol = len(data) if eol < 0 else eol
        tokens = data[pos:eol].split()
        pos = eol + 1
    if not tokens:
        raise MeshError("truncated: no vertex/face counts after the OFF keyword")
    if len(tokens) < 2 or len(tokens) > 3 or not all(_INT_RE.fullmatch(t) for t in tokens):
        shown = b" ".join(tokens[:4]).decode("ascii", "replace")[:40]
        raise MeshError(f"malformed header: expected 'vertices faces [edges]' counts, found {shown!r}")
    counts = [int(t) for t in tokens]
    if min(counts) < 0:
        raise MeshError(f"negative count in header ({' '.join(map(str, counts))})")
    return counts[0], counts[1], data[pos:]


def _fromstring(buf: bytes, dtype: type, expected: int) -> np.ndarray | None:
    """np.fromstring over a whitespace-separated region; None unless exactly `expected` values."""
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("error", DeprecationWarning)
            out = np.fromstring(buf, dtype=dtype, sep=" ")
    except (ValueError, DeprecationWarning):
        return None
    return out if len(out) == expected else None


def _parse_floats(a: np.ndarray, body: bytes, s: np.ndarray, e: np.ndarray) -> np.ndarray | None:
    """Decimal tokens body[s:e] -> float64 equal to strtod's, 2-3x faster than np.fromstring.

    Tokens are parsed by shape (see _parse_by_shape); a few odd ones (exponents, two dots) go
    through float(); nan, inf, long mantissas or many odd tokens fall back to np.fromstring.
    None means a token is not a number.
    """
    n = len(s)
    lo, hi = int(s[0]), int(e[-1])
    sub = a[lo:hi]
    if int((e - s).max()) > 17:
        return _fromstring(body[lo:hi], np.float64, n)
    special = np.zeros(n, dtype=bool)  # tokens parsed one by one with float()
    exp_at = np.flatnonzero((sub | 0x20) == 101) + lo
    if len(exp_at) > n // 8 + 16:  # an exponent-formatted file
        return _fromstring(body[lo:hi], np.float64, n)
    special[np.searchsorted(s, exp_at, side="right") - 1] = True
    dot_at = np.flatnonzero(sub == 46) + lo
    if len(dot_at) == n and np.all(dot_at < e) and np.all(dot_at >= s):
        dot = dot_at - s  # the usual case: exactly one dot in every token
    else:
        tok = np.searchsorted(s, dot_at, side="right") - 1
        special[tok[1:][tok[1:] == tok[:-1]]] = True  # two dots
        dot = e - s  # no dot: an integer token
        dot[tok] = dot_at - s[tok]
    values = _parse_by_shape(a, s, e, dot, special)
    if values is None:
        return _fromstring(body[lo:hi], np.float64, n)
    neg = a[s] == 45
    values[neg] = -values[neg]
    for t in np.flatnonzero(special).tolist():
        try:
            values[t] = float(body[int(s[t]) : int(e[t])])
        except ValueError:
            return None
    return values


def _parse_by_shape(
    a: np.ndarray, s: np.ndarray, e: np.ndarray, dot: np.ndarray, special: np.ndarray
) -> np.ndarray | None:
    """|value| of decimal tokens grouped by shape (length, dot position, sign).

    Within a group the digit columns are fixed, so the mantissa is one small matrix product,
    exact below 2**53, then one correctly rounded division by a power of ten.
    """
    n = len(s)
    lengths = e - s
    first = a[s]
    sign = (first == 45) | (first == 43)
    key = ((lengths * 32 + dot) * 2 + sign).astype(np.int16)  # < 1200: radix-sortable
    key[special] = -1
    order = np.argsort(key, kind="stable")
    counts = np.bincount(key[~special], minlength=1)
    shapes = np.flatnonzero(counts)
    if len(shapes) > 48:
        return None
    values = np.zeros(n, dtype=np.float64)
    pos = int(special.sum())  # the -1 keys sort first
    for k in shapes.tolist():
        sg, rest = k & 1, k >> 1
        length, d = rest >> 5, rest & 31
        cols = [c for c in range(sg, length) if c != d]
        if not cols or len(cols) > 15:
            return None
        idx = order[pos : pos + counts[k]]
        pos += int(counts[k])
        rows = np.lib.stride_tricks.sliding_window_view(a, length)[s[idx]]
        digits = rows[:, cols] - np.uint8(48)
        if np.any(digits > 9):
            return None
        mantissa = digits.astype(np.float64) @ _POW10[: len(cols)][::-1]
        values[idx] = mantissa / _POW10[max(length - d - 1, 0)]
    return values


def _refuse_extra_face(
    body: bytes, s: np.ndarray, e: np.ndarray, t0: int, t1: int, n_vertices: int
) -> None:
    """Trailing junk is tolerated, but a trailing line that is a valid face means F is wrong."""
    vals = _fromstring(body[s[t0] : e[t1 - 1]], np.int64, t1 - t0)
    if vals is None:
        return
    n = int(vals[0])
    if not (n >= 3 and n + 1 <= len(vals) <= n + 5):
        return
    if vals[1 : n + 1].min() >= 0 and vals[1 : n + 1].max() < n_vertices:
        raise MeshError("header counts disagree with the body: more face lines than the header declares")


def _as_indices(idx: np.ndarray, n_vertices: int) -> np.ndarray:
    """Float/int index values -> int64, refusing non-integers and out-of-range values first."""
    if idx.dtype.kind == "f":
        if not np.all(np.isfinite(idx)) or not np.all(idx == np.floor(idx)):
            raise MeshError("non-integer face index")
        lo, hi = float(idx.min()), float(idx.max())
        if lo < 0:
            raise MeshError(f"negative face index ({lo:g})")
        if hi >= n_vertices:
            raise MeshError(f"face index {hi:g} out of range ({n_vertices} vertices)")
        return idx.astype(np.int64)
    return np.ascontiguousarray(idx, dtype=np.int64)


def _triangulate(
    fvals: np.ndarray, counts: np.ndarray, n_vertices: int, max_faces: int, *, last_is_eof: bool
) -> np.ndarray:
    """Fan-triangulate face records 'n i1..in [colour]' laid out back to back in fvals."""
    offsets = np.cumsum(counts) - counts
    n = fvals[offsets]
    if fvals.dtype.kind == "f" and (not np.all(np.isfinite(n)) or not np.all(n == np.floor(n))):
        bad = int(np.argmax(~np.isfinite(n) | (n != np.floor(n))))
        raise MeshError(
            f"header counts disagree with the body: face line {bad + 1} starts with "
            f"{fvals[offsets[bad]]:g}, not a vertex count"
        )
    n = np.clip(n, -1, int(counts.max()) + 1).astype(np.int64)
    extra = counts - 1 - n
    bad_mask = (n < 3) | (extra < 0) | (extra > 4)
    if np.any(bad_mask):
        bad = int(np.argmax(bad_mask))
        nb, vb = int(n[bad]), int(counts[bad]) - 1
        if nb < 3:
            what = f"face line {bad + 1} declares {nb} vertices (a face needs at least 3)"
        else:
            what = f"face line {bad + 1} declares {nb} vertices but has {vb} values"
        if extra[bad] < 0 and last_is_eof and bad == len(counts) - 1:
            raise MeshError(f"truncated: {what}")
        raise MeshError(f"header counts disagree with the body: {what}")
    ntri = n - 2
    total = int(ntri.sum())
    if total > max_faces:
        raise MeshError(f"{total} triangles exceed the limit max_faces={max_faces}")
    poly = np.repeat(np.arange(len(n)), ntri)
    j = np.arange(total) - np.repeat(np.cumsum(ntri) - ntri, ntri)
    base = offsets[poly] + 1
    tri = np.stack([fvals[base], fvals[base + 1 + j], fvals[base + 2 + j]], axis=1)
    return _as_indices(tri, n_vertices)


# ---------------------------------------------------------------------------------------------
# everything else


#: OBJ indices start at 1: a face that names vertex 0 is invalid (trimesh would quietly wrap it).
_OBJ_INDEX_ZERO = re.compile(rb"^f[ \t](?:[^\n]*[ \t])?0(?:/[^ \t\r\n]*)?[ \t\r]*(?:$|[ \t])", re.MULTILINE)


def _precheck_face_count(p: Path, suffix: str, size: int, max_faces: int) -> None:
    """Refuse from what the header claims, before trimesh reads the whole file: an over-limit STL/PLY,
    a binary STL or PLY whose counts the file cannot hold (truncated, or lying), an OBJ index 0."""
    if suffix == ".obj":
        if _OBJ_INDEX_ZERO.search(p.read_bytes()):
            raise MeshError("face index 0: OBJ vertex indices start at 1")
        return
    if suffix not in (".stl", ".ply"):
        return
    with open(p, "rb") as fh:
        head = fh.read(4096)
    n_faces = None
    if suffix == ".stl" and len(head) >= 84:
        count = int(np.frombuffer(head[80:84], dtype="<u4")[0])
        if size == 84 + 50 * count:  # binary STL whose size agrees with its face count
            n_faces = count
        elif not (head.lstrip().startswith(b"solid") and b"facet" in head):  # binary, not ASCII
            raise MeshError(f"binary STL header says {count} faces but the file holds {(size - 84) / 50:g} "
                            "(truncated, or the count is wrong)")
    elif suffix == ".ply":
        m = re.search(rb"^element[ \t]+face[ \t]+(\d+)", head, re.MULTILINE)
        n_faces = int(m.group(1)) if m else None
        v = re.search(rb"^element[ \t]+vertex[ \t]+(\d+)", head, re.MULTILINE)
        if v and int(v.group(1)) * 6 > size:  # even ASCII "0 0 0\n" takes 6 bytes a vertex
            raise MeshError(f"PLY header declares {int(v.group(1))} vertices, more than a {size}-byte file holds")
    if n_faces is not None and n_faces > max_faces:
        raise MeshError(f"{n_faces} faces exceed the limit max_faces={max_faces}")


def _load_with_trimesh(p: Path, suffix: str, max_faces: int, standalone: bool = False) -> tuple[np.ndarray, np.ndarray]:
    import io

    import trimesh

    try:  # bytes without a name give trimesh no folder to resolve other files from
        source = io.BytesIO(_read_bytes(p)) if standalone else str(p)
        loaded = trimesh.load(source, file_type=suffix[1:], force="mesh", process=False)
    except MeshError:
        raise
    except MemoryError:
        raise
    except Exception as exc:
        raise MeshError(f"cannot parse {suffix[1:].upper()}: {type(exc).__name__}: {exc}") from None
    faces = getattr(loaded, "faces", None)
    vertices = getattr(loaded, "vertices", None)
    if faces is None or vertices is None or len(faces) == 0:
        raise MeshError("no faces")
    faces = np.asarray(faces)
    if faces.ndim != 2 or faces.shape[1] != 3 or faces.dtype.kind not in "iu":
        raise MeshError(
            f"unexpected face array {faces.dtype}{faces.shape} from the {suffix[1:].upper()} reader"
        )
    if len(faces) > max_faces:
        raise MeshError(f"{len(faces)} faces exceed the limit max_faces={max_faces}")
    return np.asarray(vertices, dtype=np.float64), faces.astype(np.int64, copy=False)


# ---------------------------------------------------------------------------------------------
# shared validation


def _validate_and_normalise(vertices: np.ndarray, faces: np.ndarray, max_faces: int) -> Mesh:
    """One gate for every format: indices, finiteness, size, degeneracy; then unit-sphere scale."""
    if vertices.ndim != 2 or vertices.shape[1] != 3 or len(vertices) == 0:
        raise MeshError("no vertices")
    if faces.ndim != 2 or faces.shape[1] != 3 or len(faces) == 0:
        raise MeshError("no faces")
    if len(faces) > max_faces:
        raise MeshError(f"{len(faces)} faces exceed the limit max_faces={max_faces}")
    n_vertices = len(vertices)
    if n_vertices > np.iinfo(np.int32).max:
        raise MeshError(f"{n_vertices} vertices exceed the int32 index range")
    lo_i, hi_i = int(faces.min()), int(faces.max())
    if lo_i < 0:
        raise MeshError(f"negative face index ({lo_i})")
    if hi_i >= n_vertices:
        raise MeshError(f"face index {hi_i} out of range ({n_vertices} vertices)")
    if not np.all(np.isfinite(vertices)):
        raise MeshError("non-finite vertex coordinate (NaN or inf)")

    used = np.zeros(n_vertices, dtype=bool)
    used[faces.ravel()] = True
    if not used.all():  # stray vertices would distort centre and scale: drop them
        remap = np.cumsum(used) - 1
        vertices = vertices[used]
        faces = remap[faces]

    v = vertices.astype(np.float64, copy=False)
    centred, extent = _centre(v)
    if not np.isfinite(extent):  # coordinates near the float64 limit: pre-scale, then centre
        centred, extent = _centre(v / float(np.abs(v).max()))
    if not extent > 0.0 or not np.isfinite(extent):
        raise MeshError("degenerate: all vertices at one point (zero-size bounding sphere)")
    centred /= extent
    radius = float(np.sqrt(np.einsum("ij,ij->i", centred, centred).max()))
    centred /= radius
    if not _has_area(centred, faces):
        raise MeshError("degenerate: every face has zero area")
    return Mesh(
        vertices=np.ascontiguousarray(centred, dtype=np.float32),
        faces=np.ascontiguousarray(faces, dtype=np.int32),
    )


def _centre(v: np.ndarray) -> tuple[np.ndarray, float]:
    """Subtract the bounding-box centre; return the result and its largest |coordinate|."""
    # per-column reductions: min(axis=0) on an (N, 3) array is ~30x slower
    lo = np.array([v[:, i].min() for i in range(3)])
    hi = np.array([v[:, i].max() for i in range(3)])
    centred = v - (lo * 0.5 + hi * 0.5)
    return centred, float(np.abs(centred).max())


def _has_area(v: np.ndarray, faces: np.ndarray) -> bool:
    """True if some face has non-negligible area (checks a sample first: usually enough)."""
    for chunk in (faces[:256], faces):
        tri = v[chunk]
        cross = np.cross(tri[:, 1] - tri[:, 0], tri[:, 2] - tri[:, 0])
        if float(np.einsum("ij,ij->i", cross, cross).max()) > 1e-24:
            return True
        if len(chunk) == len(faces):
            break
    return False
