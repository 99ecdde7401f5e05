"""`m3d dedup --report DIR`: a page to review duplicate groups by eye before anyone acts on them.

Why each pair was paired: a scatter of every proposed pair's cosine against its measured surface
distance (the bounds drawn: the vectors proposed, geometry decided), the contamination table, then
every group with its pairs' kind, distances, turn and cosine, and the views side by side: the first
member as the collection rendered it, the second rendered again with the rotation that aligned it
(report.Renders, the collection's own settings). Nothing is deleted or moved.
"""

from __future__ import annotations

import html
from pathlib import Path

import numpy as np

from .dedup import KINDS, SAME_FRACTION, DedupResult, Group, Member, Pair
from .errors import printable
from .report import (_CSS, _SCRIPT, QUERY, WRONG, Renders, _draw_tiles, _figure, _save, _short, _table, _text_is_data,
                     _Tile)
from .store import Session

MAX_GROUPS = 40  # groups drawn as pictures (every group is in the tables and the CSV/JSON)
MAX_PAIRS = 3  # pairs drawn per group picture
VIEWS_SHOWN = 4  # views per member, spread around the ring
COLOURS = {"exact": "#2e86ab", "same-geometry": "#55a868", "near": "#dd8452", None: "#9a9a9a"}


def plot_checked(result: DedupResult, path: Path) -> Path:
    """Each measured pair: the cosine that proposed it against the Hausdorff distance geometry found
    (log), coloured by the kind it got. The near bound is a line; the same-geometry bound depends on
    each pair's sample spacing, so it is drawn as the band the pairs' bounds span."""
    from matplotlib.lines import Line2D
    from matplotlib.ticker import FuncFormatter, LogLocator, NullFormatter

    fig = _figure(9, 4.6)
    ax = fig.add_axes((0.12, 0.12, 0.62, 0.76))
    measured = [c for c in result.checked if c.hausdorff is not None]
    floor = 1e-9  # float32 copies measure ~1e-8: keep them on a log axis
    for kind in (None, "near", "same-geometry"):
        pts = [(c.cosine, max(c.hausdorff, floor)) for c in measured if c.kind == kind]
        if pts:
            xs, ys = zip(*pts)
            ax.scatter(xs, ys, s=14, color=COLOURS[kind], alpha=0.8, linewidths=0, zorder=3)
    ax.set_yscale("log")
    ax.set_ylim(floor if not measured else None, 1.0 if not measured else None)
    ax.set_xlim(*((0.0, 1.0) if not measured else (None, None)))
    ax.yaxis.set_major_locator(LogLocator(base=10))
    ax.yaxis.set_major_formatter(FuncFormatter(lambda v, _: f"1e{round(np.log10(v)):d}"))  # math text is off here
    ax.yaxis.set_minor_formatter(NullFormatter())
    ax.axhline(result.options.near, color=WRONG, linewidth=1.4)
    spacings = [c.spacing for c in measured]
    if spacings:
        ax.axhspan(SAME_FRACTION * min(spacings), SAME_FRACTION * max(spacings), color=COLOURS["same-geometry"],
                   alpha=0.18, linewidth=0)
    ax.set_xlabel("cosine of the proposing collection")
    ax.set_ylabel("Hausdorff distance after alignment\n(fraction of the radius, log)")
    ax.grid(alpha=0.25, which="major")
    handles = [Line2D([], [], marker="o", linestyle="none", color=COLOURS[k], label=k or "not a duplicate")
               for k in ("same-geometry", "near", None)]
    handles += [Line2D([], [], color=WRONG, label=f"near bound {result.options.near:g}"),
                Line2D([], [], color=COLOURS["same-geometry"], alpha=0.4, linewidth=6,
                       label=f"same-geometry bounds\n({SAME_FRACTION:g} x sample spacing)")]
    ax.legend(handles=handles, fontsize=8, loc="upper left", bbox_to_anchor=(1.01, 1.0), frameon=False)
    if not measured:
        ax.text(0.5, 0.5, "no pair needed measuring (byte copies only)", ha="center", va="center", transform=ax.transAxes)
    fig.suptitle(f"{len(measured)} proposed pairs measured on the meshes: the vectors propose, the surface "
                 "distance decides", fontsize=11)
    return _save(fig, path)


def _own(member: Member) -> np.ndarray:
    return np.asarray(member.pose["rotation"], dtype=np.float64) if member.pose else np.eye(3)


def _row(member: Member, renders: Renders, caption: str, rotation: np.ndarray | None = None) -> list[_Tile]:
    """VIEWS_SHOWN views of one member, in its stored pose or with `rotation` instead."""
    payload = {"path": member.path, "dataset": member.dataset,
               "pose": member.pose if rotation is None else {"rotation": rotation.tolist()}}
    views = renders.views(payload)
    picks = np.linspace(0, len(views), VIEWS_SHOWN, endpoint=False).astype(int) if views is not None else range(VIEWS_SHOWN)
    return [_Tile(views[v] if views is not None else None,
                  f"{caption}\n{_short(member.path, 24)}" if n == 0 else f"view {v}",
                  colour=QUERY if n == 0 else "black", missing=renders.why(payload)) for n, v in enumerate(picks)]


def plot_group(group: Group, renders: Renders, path: Path, title: str) -> Path:
    """Per pair (the first MAX_PAIRS): the first member's views, then the second's turned onto it."""
    rows = []
    for p in group.pairs[:MAX_PAIRS]:
        a, b = group.members[p.a], group.members[p.b]
        rows.append(_row(a, renders, f"{_short(a.label, 14)} / {a.split or '-'}"))
        if p.match is None:
            rows.append(_row(b, renders, f"same bytes: {_short(b.label, 10)} / {b.split or '-'}"))
        else:
            # b turned onto a, then a's own pose: both seen from the same cameras
            rows.append(_row(b, renders, f"turned {p.match.angle:.0f} deg onto it", _own(a) @ p.match.rotation))
    return _draw_tiles(rows, path, title)


def _pair_row(group: Group, p: Pair) -> list:
    a, b, m = group.members[p.a], group.members[p.b], p.match
    if m is None:
        return [p.kind, a.path, b.path, "0", "0", "", "", "same bytes"]
    return [p.kind, a.path, b.path, f"{m.hausdorff:.2e}", f"{m.chamfer:.2e}", f"{m.angle:.1f}", f"{p.cosine:.5f}",
            p.proposed_by or ""]


@_text_is_data
def write_dedup_report(session: Session, result: DedupResult, out_dir: Path) -> Path:
    """index.html with the scatter, contamination per class and every group; returns its path."""
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    def esc(value) -> str:  # as the tables show user text: control bytes (ESC of a file name) visible, never raw
        return html.escape(printable(value))

    plot_checked(result, out_dir / "checked_pairs.png")
    renders = Renders(session, session.fingerprint(result.collections[0]))
    s, c = result.summary(), result.cost
    rejected = [x for x in result.checked if x.kind is None]
    out = ["<!doctype html><html><head><meta charset='utf-8'>", "<title>m3d duplicates report</title>",
           f"<style>{_CSS}</style></head><body>", "<h1>Duplicates</h1>",
           f"<p class='meta'>{result.objects} objects; candidates from {esc(', '.join(result.collections))} "
           f"({result.options.candidates} nearest per object"
           + (f", and every pair at cosine {result.options.min_cosine:g} or above" if result.options.min_cosine is not None else "")
           + f"); {c['proposed_pairs']} pairs proposed, {c['measured_pairs']} measured on {c['meshes_loaded']} meshes "
           f"({c['geometry_seconds']:.1f} s). Near bound: Hausdorff {result.options.near:g} of the radius. m3d never "
           "deletes or moves anything: look at each group before acting on it.</p>",
           _table([f"{k} groups" for k in KINDS] + ["objects in groups", "test objects", "test objects with a copy in train"],
                  [[s[f"{k}_groups"] for k in KINDS] + [sum(s[f"{k}_objects"] for k in KINDS), s["test_objects"],
                                                       s["contaminated_test_objects"]]], left_cols=0),
           "<h2>How pairs were decided</h2>",
           "<figure><img src='checked_pairs.png' alt='proposed pairs: cosine against surface distance'><figcaption>"
           "Every proposed pair: the cosine of the vectors that proposed it, against the largest distance between "
           "the two surfaces after the second was turned onto the first (Hausdorff, a fraction of the radius). "
           f"Same geometry: under {SAME_FRACTION:g} of the sample spacing (green band); near: under the red line; "
           "grey: proposed but a different shape.</figcaption></figure>"]
    if result.per_class:
        out.append("<h2>Cross-split contamination</h2><p>Test objects with a confirmed copy (any kind) in train, per class.</p>")
        out.append(_table(["class", "test objects", "with a copy in train"],
                          [[label, row["test"], row["contaminated"]] for label, row in result.per_class.items()]))
    out.append(f"<h2>Groups ({len(result.groups)})</h2>")
    if not result.groups:
        out.append("<p>No duplicates confirmed.</p>")
    for number, group in enumerate(result.groups, 1):
        heading = f"group {number}: {group.kind}, {len(group.members)} objects"
        out.append(f"<h3>{esc(heading)}</h3>")
        out.append(_table(["path", "dataset", "class", "split"],
                          [[m.path, m.dataset, m.label, m.split or ""] for m in group.members], left_cols=4))
        out.append(_table(["kind", "first", "second", "Hausdorff", "Chamfer", "turned (deg)", "cosine", "proposed by"],
                          [_pair_row(group, p) for p in group.pairs], left_cols=3))
        out.append("<ul class='note'>" + "".join(f"<li>{esc(p.why(result.options))}</li>" for p in group.pairs[:MAX_PAIRS])
                   + "</ul>")
        if number <= MAX_GROUPS:
            image = f"group_{number:03d}.png"
            plot_group(group, renders, out_dir / image, heading)
            out.append(f"<figure><img src='{image}' alt='{esc(heading)}'></figure>")
    if len(result.groups) > MAX_GROUPS:
        out.append(f"<p class='note'>Pictures of the first {MAX_GROUPS} groups only; all are listed above and in "
                   "dedup_pairs.csv / dedup.json.</p>")
    if rejected:
        out.append(f"<h2>Proposed, not duplicates ({len(rejected)})</h2><p>The closest {min(len(rejected), 20)} by "
                   "surface distance (all are in dedup.json).</p>")
        closest = sorted(rejected, key=lambda x: (x.hausdorff is None, x.hausdorff or 0.0))[:20]
        out.append(_table(["first", "second", "Hausdorff", "Chamfer", "cosine", "problem"],
                          [[x.a, x.b, f"{x.hausdorff:.2e}" if x.hausdorff is not None else "",
                            f"{x.chamfer:.2e}" if x.chamfer is not None else "", f"{x.cosine:.5f}", x.problem or ""]
                           for x in closest], left_cols=2))
    out.append(f"<script>{_SCRIPT}</script></body></html>")
    page = out_dir / "index.html"
    page.write_text("\n".join(out), encoding="utf-8")
    return page
