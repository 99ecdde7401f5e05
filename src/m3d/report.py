"""Figures and a self-contained HTML page for `m3d eval --report`, and the `m3d query --gallery` picture.

Numbers come from evaluate (CollectionEval) and from the stored vectors; pictures of stored objects
are rendered again on demand from their source files with the collection's own fingerprint (same
renderer, views, elevation, resolution as the vectors), so the report shows exactly what the encoder
saw and no views are kept on disk. A source file that is gone becomes a grey tile, never a failure.

Matplotlib is driven through `Figure` + the Agg canvas directly (never pyplot), so writing a report
changes no global backend state of the caller.
"""

from __future__ import annotations

import functools
import html
from dataclasses import dataclass, field
from datetime import datetime, timezone
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

from .errors import M3DError, printable
from .schemas import COLLECTION_PREFIX, Fingerprint
from .store import Session

if TYPE_CHECKING:
    from matplotlib.axes import Axes
    from matplotlib.figure import Figure

    from .evaluate import CollectionEval
    from .search import QueryResult

K = 5  # precision@K is the headline number; galleries show K neighbours
DEFAULT_GALLERY = 4  # queries in the default gallery (each costs K + 1 renders)
HEATMAP_DIMS = 64
TSNE_MAX_POINTS = 3000  # t-SNE on more costs minutes on a laptop; a class-stratified sample reads the same
TSNE_SEED = 0
DPI = 110

WRONG = "#c62828"  # wrong-class neighbour titles and frames
QUERY = "#1f4e9a"
MISSING_GREY = 190  # fill of the "source not available" tile (a value no render uses as a flat area)
PAYLOAD_FIELDS = ["class", "split", "path", "dataset", "pose"]  # pose: re-render as stored

FIGURES: dict[str, tuple[str, str]] = {  # file -> (heading, how to read it)
    "precision_by_encoder.png": (
        "precision@5 by encoder and pool",
        "Each group is one encoder, each bar one pooling of its per-view vectors; the height is the mean "
        "fraction of an object's 5 nearest neighbours (itself excluded) that share its class. The star marks "
        "the best pool of each encoder."),
    "per_class_precision.png": (
        "precision@5 per class",
        "For one pool (the best collection's), each class's mean precision@5 with the encoders side by "
        "side; classes are sorted from easiest (top) to hardest. Short bars are the classes an encoder "
        "confuses with others."),
    "neighbours.png": (
        "nearest neighbours of a few objects",
        "Each row is a stored object (left, blue frame) and its 5 nearest stored objects from the exact "
        "index, best first, titled with class and cosine score. Titles and frames in red are neighbours "
        "of another class. Tiles are view 0, rendered again with the collection's own settings."),
    "tsne.png": (
        "2-D map of the objects (t-SNE)",
        "Every point is one object, coloured (and shaped) by class. Tight same-coloured clumps mean the "
        "vectors separate that class. t-SNE keeps local neighbourhoods only: distances between clusters, "
        "cluster sizes and empty space on this map mean little."),
    "view_activations.png": (
        "per-view activations of one object",
        "Rows are the object's views (thumbnails left), columns the first 64 dimensions of the encoder's "
        "per-view vector before pooling. The bars below give each dimension's standard deviation across "
        "views: grey bars are dimensions that stay (nearly) constant whatever the viewpoint, dark bars are "
        "the view-dependent ones that pooling has to average out."),
    "recall_latency.png": (
        "Qdrant against FAISS: recall and latency",
        "Left: recall@k of Qdrant's answers against the FAISS exact index for the same query vectors "
        "(1.0 = identical neighbour sets). Right: single-query latency percentiles (p50, p95, p99; log "
        "scale) for both engines, one query at a time as `m3d query` runs them. A collection without an "
        "HNSW graph is searched exactly by Qdrant as well: its recall only shows that both hold the same rows."),
    "recall_vs_latency.png": (
        "Qdrant's recall against its latency, per search setting",
        "One line per collection: each point is one HNSW search setting (hnsw_ef, written beside it) of "
        "`m3d eval --hnsw-ef 16,32,64,128,256`, at its recall@k against FAISS (up) and its median "
        "single-query latency (right, log scale); the star is FAISS's exact search of the same collection. "
        "Up and to the left is better. Dashed lines: collections without an HNSW graph (exact either way)."),
}


# ----------------------------------------------------------------------------------------------
# Data: what the figures show


@dataclass
class Neighbour:
    id: str
    score: float
    payload: dict
    correct: bool | None  # same class as the query; None when the query's class is unknown


@dataclass
class GalleryRow:
    id: str
    payload: dict
    neighbours: list[Neighbour] = field(default_factory=list)


def collection_parts(name: str, fp: Fingerprint | None) -> tuple[str, str]:
    """(encoder label, pool) of a collection named m3d_<encoder slug>_<pool>."""
    stem = name[len(COLLECTION_PREFIX) + 1:] if name.startswith(COLLECTION_PREFIX + "_") else name
    if fp is not None and stem.endswith("_" + fp.pool):
        return stem[: -len(fp.pool) - 1], fp.pool
    encoder, _, pool = stem.rpartition("_")
    return (encoder or stem), pool


def best_result(results: list[CollectionEval]) -> CollectionEval:
    """The collection with the highest precision@5 (the first one on ties)."""
    return max(results, key=lambda r: (r.precision.get(K, 0.0), -results.index(r)))


def default_queries(payloads: dict[str, dict], count: int = DEFAULT_GALLERY) -> list[str]:
    """Ids of `count` objects spread over the classes (evenly spaced in sorted class order; the first
    object of each by path), more than one per class only when there are fewer classes than count."""
    by_class: dict[str, list[str]] = {}
    for pid, p in sorted(payloads.items(), key=lambda kv: (str(kv[1].get("class")), str(kv[1].get("path")), kv[0])):
        by_class.setdefault(str(p.get("class")), []).append(pid)
    classes = sorted(by_class)
    if not classes or count <= 0:
        return []
    picks = np.linspace(0, len(classes) - 1, min(count, len(classes)))
    spread = list(dict.fromkeys(classes[int(round(i))] for i in picks))
    cycle = spread + [c for c in classes if c not in spread]
    chosen: list[str] = []
    for depth in range(max(len(v) for v in by_class.values())):
        for label in cycle:
            if len(chosen) < count and depth < len(by_class[label]):
                chosen.append(by_class[label][depth])
    return chosen


def resolve_queries(payloads: dict[str, dict], queries: list[str]) -> list[str]:
    """Ids of the objects named by relative path (exact, else a unique path suffix); M3DError if not."""
    by_path = {str(p.get("path")): pid for pid, p in payloads.items()}
    ids = []
    for q in queries:
        q_norm = q if q in by_path else q.replace("\\", "/").strip("/")  # a name may hold a backslash
        if q_norm in by_path:
            ids.append(by_path[q_norm])
            continue
        matches = [pid for path, pid in by_path.items() if path.endswith("/" + q_norm) or q_norm.endswith("/" + path)]
        if len(matches) != 1:
            examples = ", ".join(sorted(by_path)[:3])
            what = "matches several objects" if matches else "is not a stored object"
            raise M3DError(f"--queries {q!r} {what}; give a path relative to the dataset root, e.g. {examples}")
        ids.append(matches[0])
    return ids


def gallery_rows(session: Session, name: str, query_ids: list[str], k: int = K,
                 payloads: dict[str, dict] | None = None) -> list[GalleryRow]:
    """Each query's k nearest stored objects from the FAISS exact index (the query itself excluded)."""
    index = session.exact(name)
    if payloads is None:
        payloads = {r.id: r.payload for r in session.vectors.records(name, fields=PAYLOAD_FIELDS)}
    row_of = {pid: i for i, pid in enumerate(index.ids)}
    query_ids = [q for q in query_ids if q in row_of]
    if not query_ids:
        return []
    scores, ids = index.search(index.vectors[[row_of[q] for q in query_ids]], k + 1)
    rows = []
    for qid, q_scores, q_ids in zip(query_ids, scores, ids):
        label = payloads.get(qid, {}).get("class")
        neighbours = [Neighbour(pid, float(s), payloads.get(pid, {}),
                                None if label is None else payloads.get(pid, {}).get("class") == label)
                      for pid, s in zip(q_ids, q_scores) if pid != qid][:k]
        rows.append(GalleryRow(qid, payloads.get(qid, {}), neighbours))
    return rows


def tsne_perplexity(n: int) -> float:
    """sklearn's 30 for big collections; (n - 1) / 3 for small ones, since t-SNE looks at about
    3 x perplexity neighbours and the perplexity must stay below the number of points."""
    return float(min(30.0, max(1.0, (n - 1) / 3.0)))


def tsne_embedding(vectors: np.ndarray, *, seed: int = TSNE_SEED) -> tuple[np.ndarray, float]:
    """2-D t-SNE of unit vectors (Euclidean on unit rows ranks like cosine; PCA to 50 dims first when
    wider, as usual for t-SNE), fixed seed so a report is reproducible: (points, perplexity)."""
    from sklearn.decomposition import PCA
    from sklearn.manifold import TSNE

    x = np.asarray(vectors, dtype=np.float32)
    if x.shape[1] > 50 and len(x) > 50:
        x = PCA(n_components=50, random_state=seed).fit_transform(x)
    perplexity = tsne_perplexity(len(x))
    tsne = TSNE(n_components=2, perplexity=perplexity, init="pca", learning_rate="auto", random_state=seed)
    return tsne.fit_transform(x), perplexity


def class_styles(classes: list[str]) -> dict[str, tuple[tuple[float, ...], str]]:
    """(colour, marker) per class, distinct for up to 40 classes: tab20's strong then light halves,
    then tab20b by shade, with the marker changing every 10 classes so similar hues differ in shape."""
    import matplotlib

    tab20 = list(matplotlib.colormaps["tab20"].colors)
    tab20b = list(matplotlib.colormaps["tab20b"].colors)
    colours = tab20[0::2] + tab20[1::2] + tab20b[0::4] + tab20b[2::4] + tab20b[1::4] + tab20b[3::4]
    if len(classes) <= 10:
        colours = list(matplotlib.colormaps["tab10"].colors)
    markers = ["o", "s", "^", "D", "v", "P", "X", "*"]
    return {c: (colours[i % len(colours)], markers[(i // 10) % len(markers)]) for i, c in enumerate(sorted(classes))}


class Renders:
    """Views of stored objects rendered on demand with one fingerprint, cached by object; None (and a
    reason in `problems`) when the source file is missing or cannot be rendered."""

    def __init__(self, session: Session, fp: Fingerprint | None):
        self.session = session
        self.fp = fp
        self.cache: dict[tuple[str, str, str], np.ndarray | None] = {}
        self.problems: dict[str, str] = {}  # relative path -> why it has no picture

    def views(self, payload: dict) -> np.ndarray | None:
        from .search import render_views

        pose = payload.get("pose")  # one object drawn in two poses (a duplicate turned onto its pair) is two entries
        key = (str(payload.get("dataset")), str(payload.get("path")), repr(pose["rotation"]) if pose else "")
        if key not in self.cache:
            path = self.session.source_path(payload) if payload.get("path") else None
            views = None
            if self.fp is None:
                self.problems[key[1]] = "no stored fingerprint"
            elif path is None or not path.is_file():
                self.problems[key[1]] = "source not available" + (f" ({path})" if path else "")
            else:
                try:
                    views = render_views(path, self.fp, payload.get("pose"))
                except (M3DError, OSError) as exc:
                    self.problems[key[1]] = f"cannot render: {exc}"
            self.cache[key] = views
        return self.cache[key]

    def tile(self, payload: dict) -> np.ndarray | None:
        views = self.views(payload)
        return None if views is None else views[0]

    def why(self, payload: dict) -> str:
        """A tile-sized reason for a missing picture."""
        problem = self.problems.get(str(payload.get("path")), "source not available")
        return problem.split(":")[0].split(" (")[0]


# ----------------------------------------------------------------------------------------------
# Drawing helpers


def _figure(width: float, height: float) -> Figure:
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    fig = Figure(figsize=(width, height), dpi=DPI)
    FigureCanvasAgg(fig)
    return fig


def _save(fig: Figure, path: Path) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=DPI, facecolor="white")
    return path


def _note_figure(path: Path, title: str, message: str) -> Path:
    """A placeholder figure that says why the real one could not be drawn."""
    fig = _figure(7, 2.6)
    ax = fig.add_axes((0.03, 0.06, 0.94, 0.72))
    _placeholder(ax, message)
    fig.suptitle(title, fontsize=12, y=0.94)
    return _save(fig, path)


def _placeholder(ax: Axes, message: str, size: int = 224) -> None:
    """A grey tile with a short message (a missing source, a failed render, too little data)."""
    import textwrap

    ax.imshow(np.full((size, size, 3), MISSING_GREY, np.uint8), aspect="auto")
    ax.text(0.5, 0.5, "\n".join(textwrap.wrap(message, 22)), ha="center", va="center", fontsize=9,
            color="#333333", transform=ax.transAxes)
    ax.set_xticks([])
    ax.set_yticks([])


def _frame(ax: Axes, colour: str | None, width: float = 3.0) -> None:
    for spine in ax.spines.values():
        spine.set_visible(colour is not None)
        if colour is not None:
            spine.set_edgecolor(colour)
            spine.set_linewidth(width)


def _wrap_name(name: str, width: int = 14) -> str:
    """A long collection/encoder slug broken at underscores into lines of about `width` characters."""
    lines: list[str] = []
    for part in name.split("_"):
        if lines and len(lines[-1]) + 1 + len(part) <= width:
            lines[-1] += "_" + part
        else:
            lines.append(part)
    return "_\n".join(lines)


def _short(text: str, limit: int = 26) -> str:
    text = printable(text)
    return text if len(text) <= limit else "\u2026" + text[-(limit - 1):]


@dataclass
class _Tile:
    image: np.ndarray | None
    title: str
    colour: str = "black"
    frame: str | None = None
    missing: str = "source not available"


def _draw_tiles(rows: list[list[_Tile]], path: Path, title: str) -> Path:
    """Rows of square tiles, each with a two-line title; laid out in inches so titles never collide."""
    cols = max(len(r) for r in rows)
    tile, title_h, hgap, vgap, top, margin = 1.9, 0.42, 0.1, 0.14, 0.5, 0.1
    width = 2 * margin + cols * tile + (cols - 1) * hgap
    height = top + len(rows) * (title_h + tile) + (len(rows) - 1) * vgap + margin
    fig = _figure(width, height)
    for r, row in enumerate(rows):
        y = height - top - r * (title_h + tile + vgap) - title_h - tile
        for c, t in enumerate(row):
            x = margin + c * (tile + hgap)
            ax = fig.add_axes((x / width, y / height, tile / width, tile / height))
            if t.image is None:
                _placeholder(ax, t.missing)
            else:
                ax.imshow(t.image)
                ax.set_xticks([])
                ax.set_yticks([])
            _frame(ax, t.frame)
            ax.set_title(t.title, fontsize=8.5, color=t.colour, pad=4)
    fig.suptitle(title, fontsize=11, y=1 - 0.12 / height, va="top")
    return _save(fig, path)


# ----------------------------------------------------------------------------------------------
# Figures


def plot_precision(results: list[CollectionEval], parts: dict[str, tuple[str, str]], path: Path) -> Path:
    import matplotlib
    from matplotlib.lines import Line2D
    from matplotlib.patches import Patch

    encoders = list(dict.fromkeys(parts[r.collection][0] for r in results))
    pools = list(dict.fromkeys(parts[r.collection][1] for r in results))
    value = {parts[r.collection]: r.precision.get(K, 0.0) for r in results}
    colours = matplotlib.colormaps["Set2"].colors
    plot_w = max(3.5, 0.45 * len(encoders) * (len(pools) + 1))
    legend_in = 2.2
    width_in, height_in, left_in = plot_w + 0.8 + legend_in, 4.4, 0.8
    fig = _figure(width_in, height_in)
    ax = fig.add_axes((left_in / width_in, 0.6 / height_in, plot_w / width_in, 3.1 / height_in))
    width = 0.8 / len(pools)
    for e, enc in enumerate(encoders):
        present = {p: value[(enc, p)] for p in pools if (enc, p) in value}
        best = max(present, key=present.get)
        for j, pool in enumerate(pools):
            if pool not in present:
                continue
            x, v = e - 0.4 + width * (j + 0.5), present[pool]
            ax.bar(x, v, width * 0.92, color=colours[j % len(colours)],
                   edgecolor="black" if pool == best else "none", linewidth=1.6)
            ax.text(x, v + 0.012, f"{v:.2f}", ha="center", va="bottom", fontsize=8)
            if pool == best:
                ax.plot(x, v + 0.1, marker="*", markersize=12, color="#b8860b", linestyle="none")
    handles = [Patch(facecolor=colours[j % len(colours)], label=p) for j, p in enumerate(pools)]
    handles.append(Line2D([], [], linestyle="none", marker="*", markersize=12, color="#b8860b",
                          label="best pool of\nthe encoder"))
    ax.legend(handles=handles, title="pool", fontsize=8, title_fontsize=8, loc="upper left",
              bbox_to_anchor=(1.02, 1.0), frameon=False)
    ax.set_xticks(range(len(encoders)), [_wrap_name(e) for e in encoders], fontsize=9)
    ax.set_xlim(-0.6, len(encoders) - 0.4)
    ax.set_ylim(0, 1.15)
    ax.set_yticks(np.linspace(0, 1, 6))
    ax.set_ylabel(f"precision@{K} (self excluded)")
    ax.grid(axis="y", alpha=0.3)
    ax.set_axisbelow(True)
    for side in ("top", "right"):
        ax.spines[side].set_visible(False)
    n = max(r.objects for r in results)
    classes = max(r.classes for r in results)
    fig.suptitle(f"precision@{K} by encoder and pool ({n} objects, {classes} classes)", fontsize=11,
                 y=1 - 0.15 / height_in, va="top")
    return _save(fig, path)


def plot_per_class(results: list[CollectionEval], parts: dict[str, tuple[str, str]], pool: str, path: Path) -> Path:
    chosen = [r for r in results if parts[r.collection][1] == pool]
    classes = sorted({c for r in chosen for c in r.per_class})
    if not chosen or not classes:
        return _note_figure(path, f"precision@{K} per class", "no per-class numbers")
    mean = {c: np.mean([r.per_class[c][f"p@{K}"] for r in chosen if c in r.per_class]) for c in classes}
    classes.sort(key=lambda c: (-mean[c], c))
    import matplotlib

    colours = matplotlib.colormaps["tab10"].colors
    n_enc = len(chosen)
    band = 0.8
    height = max(3.0, 0.9 + len(classes) * (0.22 + 0.11 * n_enc))
    fig = _figure(8.0, height)
    left = 0.05 + min(0.3, 0.0125 * max(len(c) for c in classes) + 0.04)
    ax = fig.add_axes((left, 0.55 / height, 0.95 - left - 0.02, 1 - 1.2 / height))
    y = np.arange(len(classes))
    for j, r in enumerate(chosen):
        vals = [r.per_class.get(c, {}).get(f"p@{K}", np.nan) for c in classes]
        offset = -band / 2 + band / n_enc * (j + 0.5)
        ax.barh(y + offset, vals, band / n_enc * 0.9, color=colours[j % len(colours)],
                label=f"{parts[r.collection][0]} (all classes {r.precision.get(K, 0.0):.2f})")
    ax.set_yticks(y, classes, fontsize=8.5)
    ax.invert_yaxis()
    ax.set_xlim(0, 1)
    ax.set_ylim(len(classes) - 0.5, -0.5)
    ax.set_xlabel(f"precision@{K}")
    ax.grid(axis="x", alpha=0.3)
    ax.set_axisbelow(True)
    for side in ("top", "right"):
        ax.spines[side].set_visible(False)
    ax.legend(fontsize=8, loc="lower center", bbox_to_anchor=(0.5, 1.0), ncol=min(n_enc, 4), frameon=False)
    fig.suptitle(f"precision@{K} per class, pool {pool}", fontsize=11, y=1 - 0.12 / height)
    return _save(fig, path)


def plot_gallery(rows: list[GalleryRow], renders: Renders, path: Path, title: str) -> Path:
    if not rows:
        return _note_figure(path, "nearest neighbours", "no objects to query (the collection needs 2 or more)")
    grid = []
    for row in rows:
        q = row.payload
        tiles = [_Tile(renders.tile(q), f"query: {_short(q.get('class', '?'), 18)}\n{_short(q.get('path', row.id))}",
                       colour=QUERY, frame=QUERY, missing=renders.why(q))]
        for i, nb in enumerate(row.neighbours, 1):
            wrong = nb.correct is False
            mark = "  \u2717" if wrong else ""
            tiles.append(_Tile(renders.tile(nb.payload),
                               f"#{i} {_short(nb.payload.get('class', '?'), 18)}{mark}\nscore {nb.score:.3f}",
                               colour=WRONG if wrong else "black", frame=WRONG if wrong else None,
                               missing=renders.why(nb.payload)))
        grid.append(tiles)
    return _draw_tiles(grid, path, title)


def plot_tsne(points: np.ndarray, labels: list[str], perplexity: float, path: Path, title: str,
              sampled_from: int | None = None) -> Path:
    classes = sorted(set(labels))
    styles = class_styles(classes)
    ncol = 1 if len(classes) <= 20 else 2
    fig = _figure(8.4 + 1.4 * (ncol - 1), 6.6)
    ax = fig.add_axes((0.04, 0.1, 0.66 - 0.1 * (ncol - 1), 0.8))
    labels_arr = np.array(labels)
    size = 34 if len(points) < 300 else 14 if len(points) < 3000 else 7
    for c in classes:
        mask = labels_arr == c
        colour, marker = styles[c]
        ax.scatter(points[mask, 0], points[mask, 1], s=size, color=colour, marker=marker, label=c,
                   edgecolors="white", linewidths=0.3, alpha=0.9)
    ax.set_xticks([])
    ax.set_yticks([])
    ax.legend(fontsize=7.5, loc="upper left", bbox_to_anchor=(1.01, 1.0), ncol=ncol, frameon=False,
              markerscale=1.2 if size > 20 else 1.8, handletextpad=0.3, columnspacing=0.8)
    n = len(points)
    sample = f", a class-stratified sample of {sampled_from}" if sampled_from else ""
    ax.set_title(f"{title}\nt-SNE of {n} objects{sample}, perplexity {perplexity:.1f}, seed {TSNE_SEED}", fontsize=10)
    fig.text(0.04, 0.03, "Read clusters, not distances: t-SNE keeps local neighbourhoods only; distances between "
             "clusters and cluster sizes mean little.", fontsize=8, color="#444444", style="italic")
    return _save(fig, path)


def plot_activations(views: np.ndarray, per_view: np.ndarray, path: Path, title: str, first_dim: int = 0) -> Path:
    """Heatmap (views x dims first_dim..) with view thumbnails as row labels and a per-dimension std strip."""
    n_views = per_view.shape[0]
    dims = per_view.shape[1]
    width_in, heat_h = 11.0, max(3.0, 0.62 * n_views)
    std_h, top_pad, bottom_pad, gap = 1.3, 0.6, 0.55, 0.6
    height_in = top_pad + heat_h + gap + std_h + bottom_pad
    fig = _figure(width_in, height_in)
    thumb_w, thumb_x = heat_h / n_views, 0.6
    left_in, cbar_in = thumb_x + thumb_w + 0.1, 0.9
    heat_w = width_in - left_in - cbar_in - 0.2

    def box(x: float, y: float, w: float, h: float) -> tuple[float, float, float, float]:
        return (x / width_in, y / height_in, w / width_in, h / height_in)

    heat_y = bottom_pad + std_h + gap
    ax_thumb = fig.add_axes(box(thumb_x, heat_y, thumb_w, heat_h))
    ax_heat = fig.add_axes(box(left_in, heat_y, heat_w, heat_h))
    ax_cbar = fig.add_axes(box(left_in + heat_w + 0.15, heat_y, 0.15, heat_h))
    ax_std = fig.add_axes(box(left_in, bottom_pad, heat_w, std_h))

    ax_thumb.imshow(np.concatenate(list(views), axis=0), aspect="auto")
    ax_thumb.set_xticks([])
    ax_thumb.set_yticks((np.arange(n_views) + 0.5) * views.shape[1], [f"view {i}" for i in range(n_views)], fontsize=7)
    for i in range(1, n_views):
        ax_thumb.axhline(i * views.shape[1] - 0.5, color="white", linewidth=1.5)

    lo, hi = float(per_view.min()), float(per_view.max())
    if lo < 0 < hi:
        bound = max(-lo, hi)
        image = ax_heat.imshow(per_view, aspect="auto", cmap="RdBu_r", vmin=-bound, vmax=bound, interpolation="nearest")
    else:
        image = ax_heat.imshow(per_view, aspect="auto", cmap="viridis", interpolation="nearest")
    ax_heat.set_yticks([])
    ax_heat.set_xticks(np.arange(0, dims, 8), [str(first_dim + t) for t in range(0, dims, 8)])
    ax_heat.tick_params(labelsize=7)
    fig.colorbar(image, cax=ax_cbar).ax.tick_params(labelsize=7)
    ax_cbar.set_ylabel("activation", fontsize=8)

    std = per_view.std(axis=0)
    threshold = 0.1 * float(std.max()) if std.max() > 0 else 0.0
    flat = std <= threshold
    ax_std.bar(np.arange(dims), std, width=0.85, color=np.where(flat, "#b0b0b0", "#333333"))
    ax_std.set_xlim(-0.5, dims - 0.5)
    ax_std.set_xticks(np.arange(0, dims, 8), [str(first_dim + t) for t in range(0, dims, 8)])
    ax_std.tick_params(labelsize=7)
    ax_std.set_xlabel("dimension", fontsize=8)
    ax_std.set_ylabel("std across\nviews", fontsize=8)
    for side in ("top", "right"):
        ax_std.spines[side].set_visible(False)
    zero = int((np.abs(per_view).max(axis=0) == 0).sum())
    zero_note = f"; {zero} of them are 0 in every view" if zero else ""
    ax_std.set_title(f"{int(flat.sum())} of {dims} dimensions nearly constant across views "
                     f"(grey: std \u2264 10% of the largest){zero_note}", fontsize=8.5, color="#444444", loc="left")
    fig.suptitle(title, fontsize=10.5, y=1 - 0.12 / height_in, va="top")
    return _save(fig, path)


def plot_recall_latency(results: list[CollectionEval], path: Path) -> Path:
    names = [r.collection for r in results]
    label_in = 0.35 + 0.068 * max(len(n) for n in names)
    recall_in, gap_in, lat_in, legend_in = 2.8, 0.5, 4.6, 1.2
    width = label_in + recall_in + gap_in + lat_in + legend_in
    plot_h = max(1.2, 0.42 * len(results))
    height = plot_h + 1.35
    fig = _figure(width, height)
    bottom = 0.6 / height
    ax_r = fig.add_axes((label_in / width, bottom, recall_in / width, plot_h / height))
    ax_l = fig.add_axes(((label_in + recall_in + gap_in) / width, bottom, lat_in / width, plot_h / height))
    y = np.arange(len(results))
    ax_r.barh(y, [r.recall for r in results], 0.6, color="#4c72b0")
    for yi, r in zip(y, results):
        shown = r.shown_recall(r.recall)
        ax_r.text(0.03, yi, shown if isinstance(shown, str) else f"{shown:.4f}", ha="left", va="center",
                  fontsize=8, color="white")
    ax_r.set_yticks(y, names, fontsize=8)
    ax_r.set_xlim(0, 1)
    ax_r.set_ylim(len(results) - 0.5, -0.5)
    ks = sorted({r.recall_k for r in results})
    queries = sorted({r.recall_queries for r in results})
    ax_r.set_xlabel(f"recall@{'/'.join(map(str, ks))}", fontsize=9)
    ax_r.set_title(f"Qdrant recall vs FAISS ({'/'.join(map(str, queries))} queries)", fontsize=10)

    from matplotlib.lines import Line2D

    engines = {"qdrant": ("#d1495b", -0.15), "faiss": ("#2e86ab", 0.15)}
    markers = {"p50": "o", "p95": "s", "p99": "^"}
    any_latency = False
    for yi, r in zip(y, results):
        for engine, (colour, dy) in engines.items():
            lat = r.latency_ms.get(engine)
            if not lat:
                continue
            any_latency = True
            xs = [lat[p] for p in markers if p in lat]
            ax_l.plot(xs, [yi + dy] * len(xs), color=colour, linewidth=1.2, alpha=0.7)
            for p, m in markers.items():
                if p in lat:
                    ax_l.plot(lat[p], yi + dy, marker=m, color=colour, markersize=6, linestyle="none")
    ax_l.set_ylim(len(results) - 0.5, -0.5)
    ax_l.set_yticks(y, [""] * len(y))
    if any_latency:
        ax_l.set_xscale("log")
    else:
        ax_l.text(0.5, 0.5, "no latency measured", ha="center", va="center", transform=ax_l.transAxes)
    ax_l.set_xlabel("single-query latency, ms (log scale)", fontsize=9)
    ax_l.set_title("latency percentiles", fontsize=10)
    ax_l.grid(axis="x", which="both", alpha=0.25)
    handles = [Line2D([], [], color=c, linewidth=2, label=e) for e, (c, _) in engines.items()]
    handles += [Line2D([], [], color="#555555", marker=m, linestyle="none", label=p) for p, m in markers.items()]
    ax_l.legend(handles=handles, fontsize=8, loc="upper left", bbox_to_anchor=(1.01, 1.0), frameon=False)
    fig.suptitle("Qdrant against the FAISS exact index", fontsize=11, y=1 - 0.08 / height, va="top")
    return _save(fig, path)


def plot_recall_vs_latency(results: list[CollectionEval], path: Path) -> Path:
    """The recall-latency curve of an ef sweep, per collection, with FAISS's exact search as a star."""
    title = FIGURES["recall_vs_latency.png"][0]
    if not any(len(r.sweep) > 1 for r in results):
        return _note_figure(path, title, "one search setting only: run m3d eval --hnsw-ef 16,32,64,128,256 --report "
                                         "DIR to draw recall against latency")
    fig = _figure(9.0, 5.2)
    ax = fig.add_axes((0.09, 0.11, 0.60, 0.76))
    colours = ["#4c72b0", "#dd8452", "#55a868", "#c44e52", "#8172b3", "#937860", "#da8bc3", "#8c8c8c"]
    for i, r in enumerate(results):
        colour = colours[i % len(colours)]
        points = [p for p in r.sweep if "p50" in p]
        xs, ys = [p["p50"] for p in points], [p["recall"] for p in points]
        label = r.collection + ("" if r.indexed else " (no index)")
        ax.plot(xs, ys, color=colour, marker="o", markersize=4, linewidth=1.4, label=label,
                linestyle="-" if r.indexed else "--")
        for p, x, y in zip(points, xs, ys):
            ax.annotate(f"{p['hnsw_ef']}" if p["hnsw_ef"] is not None else "default", (x, y), fontsize=7,
                        xytext=(3, -9), textcoords="offset points", color=colour)
        faiss = r.latency_ms.get("faiss", {}).get("p50")
        if faiss is not None:
            ax.plot([faiss], [1.0], marker="*", markersize=11, color=colour, linestyle="none")
    ax.set_xscale("log")
    from matplotlib.ticker import FuncFormatter

    plain = FuncFormatter(lambda v, _: f"{v:g}")
    ax.xaxis.set_major_formatter(plain)
    ax.xaxis.set_minor_formatter(plain)
    ax.tick_params(axis="x", which="minor", labelsize=7)
    low = min(min(p["recall"] for p in r.sweep) for r in results)
    ax.set_ylim(max(0.0, low - 0.05 * max(1 - low, 0.02)) if low < 1 else 0.95, 1.0 + 0.01 * max(1 - low, 0.5))
    ax.set_xlabel("median single-query latency, ms (log scale)", fontsize=9)
    ks = sorted({r.recall_k for r in results})
    ax.set_ylabel(f"recall@{'/'.join(map(str, ks))} against FAISS", fontsize=9)
    ax.grid(which="both", alpha=0.25)
    from matplotlib.lines import Line2D

    handles, _ = ax.get_legend_handles_labels()
    handles.append(Line2D([], [], marker="*", color="#555555", linestyle="none", markersize=10, label="FAISS (exact)"))
    ax.legend(handles=handles, fontsize=8, loc="upper left", bbox_to_anchor=(1.02, 1.0), frameon=False)
    fig.suptitle(title, fontsize=11, y=0.97)
    return _save(fig, path)


# ----------------------------------------------------------------------------------------------
# The report


def _text_is_data(draw):
    """Every string on these figures is data (class and file names): `$\\bogus$` is drawn as typed,
    never parsed as mathtext."""

    @functools.wraps(draw)
    def plain(*args, **kwargs):
        import matplotlib

        with matplotlib.rc_context({"text.parse_math": False}):
            return draw(*args, **kwargs)

    return plain


@_text_is_data
def write_report(session: Session, results: list[CollectionEval], out_dir: Path, *,
                 queries: list[str] | None = None, k: int = K) -> Path:
    """Figures (PNG), the eval numbers (CSV/JSON) and index.html showing them, in out_dir; returns
    the index.html path. queries: relative paths of the gallery's query objects (default: a spread
    over the classes)."""
    from .evaluate import write_results

    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    write_results(results, out_dir)
    if not results:
        for name, (heading, _) in FIGURES.items():
            _note_figure(out_dir / name, heading, "no collections evaluated")
        return _write_html(session, results, out_dir, {}, None, {}, [])

    prints = {r.collection: session.fingerprint(r.collection) for r in results}
    parts = {r.collection: collection_parts(r.collection, prints[r.collection]) for r in results}
    best = best_result(results)
    fp = prints[best.collection]
    notes: list[str] = []

    plot_precision(results, parts, out_dir / "precision_by_encoder.png")
    plot_per_class(results, parts, parts[best.collection][1], out_dir / "per_class_precision.png")

    payloads = {r.id: r.payload for r in session.vectors.records(best.collection, fields=PAYLOAD_FIELDS)}
    query_ids = resolve_queries(payloads, queries) if queries else default_queries(payloads, DEFAULT_GALLERY)
    rows = gallery_rows(session, best.collection, query_ids, k, payloads)
    renders = Renders(session, fp)
    plot_gallery(rows, renders, out_dir / "neighbours.png",
                 f"{best.collection}: {k} nearest stored objects (exact index, query excluded)")

    _tsne_figure(session, best.collection, payloads, out_dir / "tsne.png")
    notes += _activation_figure(fp, rows, payloads, renders, out_dir / "view_activations.png")
    plot_recall_latency(results, out_dir / "recall_latency.png")
    plot_recall_vs_latency(results, out_dir / "recall_vs_latency.png")
    if renders.problems:
        shown = "; ".join(f"{p}: {why}" for p, why in list(renders.problems.items())[:5])
        more = f" (and {len(renders.problems) - 5} more)" if len(renders.problems) > 5 else ""
        notes.append(f"{len(renders.problems)} object(s) drawn as grey tiles: {shown}{more}")
    return _write_html(session, results, out_dir, parts, best, prints, notes)


def _tsne_figure(session: Session, name: str, payloads: dict[str, dict], path: Path) -> Path:
    index = session.exact(name)
    n = len(index.ids)
    if n < 4:
        return _note_figure(path, "2-D map of the objects (t-SNE)", f"t-SNE needs at least 4 objects; {name} has {n}")
    labels = [str(payloads.get(pid, {}).get("class")) for pid in index.ids]
    rows = np.arange(n)
    sampled_from = None
    if n > TSNE_MAX_POINTS:  # sorted by class, evenly spaced: every class keeps its share
        order = np.argsort(np.array(labels), kind="stable")
        rows = order[np.linspace(0, n - 1, TSNE_MAX_POINTS).astype(int)]
        sampled_from = n
    points, perplexity = tsne_embedding(index.vectors[rows])
    return plot_tsne(points, [labels[i] for i in rows], perplexity, path, name, sampled_from)


def _activation_figure(fp: Fingerprint | None, rows: list[GalleryRow], payloads: dict[str, dict],
                       renders: Renders, path: Path) -> list[str]:
    """The first gallery query that renders (else any object that does) through the fingerprint's encoder."""
    heading = FIGURES["view_activations.png"][0]
    if fp is None:
        _note_figure(path, heading, "the collection has no stored fingerprint")
        return []
    candidates = [(r.id, r.payload) for r in rows] + list(payloads.items())[:20]
    chosen = next(((pid, p) for pid, p in candidates if renders.views(p) is not None), None)
    if chosen is None:
        _note_figure(path, heading, "no source file of this collection is available here to render")
        return []
    from .search import collection_encoder

    views = renders.views(chosen[1])
    try:
        per_view = collection_encoder(renders.session, fp).encode(views).float().cpu().numpy()
    except M3DError as exc:
        _note_figure(path, heading, f"encoder {fp.encoder} not available: {exc}")
        return [f"per-view activations skipped: encoder {fp.encoder} not available ({exc})"]
    # Descriptors such as HOG are 0 wherever the image is background (its first blocks are the top-left
    # corner): start the window at the first dimension that is non-zero in some view.
    live = np.flatnonzero(np.abs(per_view).max(axis=0) > 0)
    first = int(min(live[0] if len(live) else 0, max(per_view.shape[1] - HEATMAP_DIMS, 0)))
    dims = min(HEATMAP_DIMS, per_view.shape[1])
    which = (f"first {dims} of {per_view.shape[1]} dimensions" if first == 0 else
             f"dimensions {first}-{first + dims - 1} of {per_view.shape[1]} (0-{first - 1} are 0 in every view)")
    title = f"{chosen[1].get('path', chosen[0])} ({chosen[1].get('class', '?')}): per-view vectors of {fp.model_id}, {which}"
    plot_activations(views, per_view[:, first:first + dims], path, title, first_dim=first)
    return []


@_text_is_data
def query_gallery(session: Session, result: QueryResult, title: str, path: Path) -> Path:
    """`m3d query --gallery`: the query's view 0 and its neighbours' view 0 in one row, titled with
    class and score (neighbours rendered again from their sources with the collection's settings)."""
    path = Path(path)
    renders = Renders(session, session.fingerprint(result.collection))
    query_view = result.views[0] if result.views is not None and len(result.views) else None
    tiles = [_Tile(query_view, f"query\n{_short(title)}", colour=QUERY, frame=QUERY,
                   missing=f"text: {title}" if result.kind == "text" else "source not available")]
    for i, hit in enumerate(result.hits, 1):
        tiles.append(_Tile(renders.tile(hit.payload),
                           f"#{i} {_short(hit.payload.get('class', '?'), 18)}\nscore {hit.score:.3f}",
                           missing=renders.why(hit.payload)))
    return _draw_tiles([tiles], path, f"{title} in {result.collection} ({result.engine})")


# ----------------------------------------------------------------------------------------------
# HTML


_CSS = """
body { font-family: system-ui, -apple-system, 'Segoe UI', sans-serif; margin: 2em auto; max-width: 1200px;
       padding: 0 1em; color: #222; }
h1 { font-size: 1.5em; } h2 { font-size: 1.15em; margin-top: 2em; border-bottom: 1px solid #ddd; }
table { border-collapse: collapse; font-size: 0.85em; margin: 0.5em 0; }
th, td { padding: 0.25em 0.6em; border-bottom: 1px solid #eee; text-align: right; }
th { background: #f4f4f4; } td.l, th.l { text-align: left; }
tr.best td { font-weight: bold; }
figure { margin: 1em 0; } figure img { max-width: 100%; border: 1px solid #eee; }
figcaption { font-size: 0.9em; color: #444; max-width: 60em; }
.note { background: #fff6e0; border-left: 4px solid #e0a800; padding: 0.4em 0.8em; font-size: 0.9em; }
.meta { color: #666; font-size: 0.85em; }
"""

# Sets data-images="loaded/total" on <body> once every image has finished (loaded or failed), so a
# headless browser (and the tests) can tell a page with broken images from a good one.
_SCRIPT = """
window.addEventListener("load", function () {
  var imgs = Array.prototype.slice.call(document.images);
  var ok = imgs.filter(function (i) { return i.complete && i.naturalWidth > 0; }).length;
  document.body.setAttribute("data-images", ok + "/" + imgs.length);
  if (ok === imgs.length) { document.title = document.title + " (ready)"; }
});
"""


def _cell(value: Any, left: bool = False) -> str:
    if isinstance(value, float):
        text = f"{value:.4f}"
    else:
        text = html.escape(printable(value))  # control bytes of a file name shown as escapes, never raw
    return f'<td class="l">{text}</td>' if left else f"<td>{text}</td>"


def _table(headers: list[str], rows: list[list[Any]], best_row: int | None = None, left_cols: int = 1) -> str:
    head = "".join(f'<th class="l">{html.escape(h)}</th>' if i < left_cols else f"<th>{html.escape(h)}</th>"
                   for i, h in enumerate(headers))
    body = []
    for i, row in enumerate(rows):
        cls = ' class="best"' if i == best_row else ""
        body.append(f"<tr{cls}>" + "".join(_cell(v, j < left_cols) for j, v in enumerate(row)) + "</tr>")
    return f"<table><thead><tr>{head}</tr></thead><tbody>{''.join(body)}</tbody></table>"


def _write_html(session: Session, results: list[CollectionEval], out_dir: Path, parts: dict[str, tuple[str, str]],
                best: CollectionEval | None, prints: dict[str, Fingerprint | None], notes: list[str]) -> Path:
    esc = html.escape
    now = datetime.now(timezone.utc).strftime("%Y-%m-%d %H:%M UTC")
    out = ["<!doctype html>", '<html lang="en"><head><meta charset="utf-8">',
           '<meta name="viewport" content="width=device-width, initial-scale=1">',
           "<title>m3d evaluation report</title>", f"<style>{_CSS}</style></head><body>",
           "<h1>m3d evaluation report</h1>",
           f'<p class="meta">store: {esc(session.vectors.location)} &middot; {len(results)} collection(s) &middot; '
           f"written {esc(now)} &middot; numbers: <a href=\"eval.csv\">eval.csv</a>, "
           f'<a href="eval_per_class.csv">eval_per_class.csv</a>, <a href="eval.json">eval.json</a></p>']
    out += [f'<p class="note">{esc(n)}</p>' for n in notes]

    out.append("<h2>Retrieval quality per collection</h2>")
    out.append(f"<p>Every object queries its collection with itself excluded; precision@k is the fraction of the "
               f"k nearest that share its class, map the mean average precision over the whole ranking, nn_acc "
               f"whether the single nearest shares the class, ft / st (first / second tier) the share of its class "
               f"found within the first C-1 / 2(C-1) results (C: class size), dcg the discounted cumulative gain "
               f"over the ideal ranking's, recall@k the overlap of Qdrant's answers with the "
               f"FAISS exact ones. The best collection by precision@{K} is in bold.</p>")
    if results:
        rows = [r.row() for r in results]
        lat_cols = [(e, p) for e in ("qdrant", "faiss") for p in ("p50", "p95", "p99")
                    if any(p in r.latency_ms.get(e, {}) for r in results)]
        headers = list(rows[0]) + [f"{e} {p} ms" for e, p in lat_cols]
        body = [list(row.values()) + [r.latency_ms.get(e, {}).get(p, "") for e, p in lat_cols]
                for row, r in zip(rows, results)]
        out.append(_table(headers, body, best_row=results.index(best) if best else None))
        settings = [[name, fp.model_id, fp.pool, fp.view.layout, fp.view.views, "-" if fp.view.elevation is None else f"{fp.view.elevation:g}", fp.view.up,
                     fp.view.align, fp.view.size, fp.view.renderer] for name, fp in prints.items() if fp is not None]
        if settings:
            out.append("<p>Pipeline settings (the renders below use exactly these):</p>")
            out.append(_table(["collection", "model", "pool", "layout", "views", "elevation", "up", "align",
                               "resolution", "renderer"],
                              settings, left_cols=3))

        classes = sorted({c for r in results for c in r.per_class})
        out.append(f"<h2>precision@{K} per class</h2>")
        objects = {c: next((r.per_class[c]["objects"] for r in results if c in r.per_class), "") for c in classes}
        body = [[c, objects[c], *[r.per_class.get(c, {}).get(f"p@{K}", "") for r in results]] for c in classes]
        out.append(_table(["class", "objects", *[r.collection for r in results]], body))

    for name, (heading, caption) in FIGURES.items():
        out.append(f"<h2>{esc(heading[0].upper() + heading[1:])}</h2>")
        out.append(f'<figure><img src="{esc(name)}" alt="{esc(heading)}" loading="eager">'
                   f"<figcaption>{esc(caption)}</figcaption></figure>")
    out.append(f"<script>{_SCRIPT}</script></body></html>")
    index = out_dir / "index.html"
    index.write_text("\n".join(out), encoding="utf-8")
    return index
