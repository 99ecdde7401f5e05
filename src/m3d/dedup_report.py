"""`m3d dedup --report DIR`: a page to review duplicate groups by eye before anyone acts on them.

The nearest-neighbour histogram with the threshold marked (where copies separate from neighbours),
the contamination table, then every group with its members' views side by side, rendered again from
their sources with the collection's own settings (report.Renders). Nothing is deleted or moved.
"""

from __future__ import annotations

import html
from pathlib import Path

import numpy as np

from .dedup import DedupResult, Group
from .report import (_CSS, _SCRIPT, QUERY, WRONG, Renders, _draw_tiles, _figure, _save, _short, _table, _text_is_data,
                     _Tile)
from .store import Session

MAX_GROUPS = 40  # groups drawn as pictures (every group is in the tables and the CSV/JSON)
MAX_MEMBERS = 6  # rows per group picture
VIEWS_SHOWN = 4  # views per member, spread around the ring


def plot_nn_histogram(result: DedupResult, path: Path) -> Path:
    """Each object's cosine to its nearest other object, with the threshold drawn: duplicates are the
    bump at the right of the line, ordinary neighbours the mass to its left. The right panel zooms on
    the tail next to the threshold, where the choice is made."""
    from matplotlib.ticker import FuncFormatter, NullFormatter

    sims = np.asarray(result.nn_similarity, dtype=np.float64)
    t = result.threshold
    above = int((sims >= t).sum())
    fig = _figure(10, 3.8)
    zoom_lo = max(1.0 - 10 * (1.0 - t), -1.0) if t < 1.0 else 0.999
    panels = [(fig.add_axes((0.08, 0.15, 0.5, 0.7)), min(float(sims.min(initial=t)), t - 0.02), "all objects"),
              (fig.add_axes((0.66, 0.15, 0.32, 0.7)), zoom_lo, f"zoom: {zoom_lo:g} to 1")]
    for ax, lo, label in panels:
        shown = np.minimum(sims[sims >= lo], 1.0)  # float32 copies score 1.0000001: past the last bin edge
        if len(shown):
            ax.hist(shown, bins=np.linspace(lo, 1.0, 60), color="#7a8fb8", edgecolor="white", linewidth=0.4)
            ax.set_yscale("log")
            ax.yaxis.set_major_formatter(FuncFormatter(lambda v, _: f"{v:g}"))  # counts, not 4x10^0
            ax.yaxis.set_minor_formatter(NullFormatter())
        ax.axvline(t, color=WRONG, linewidth=1.6)
        ax.set_xlim(lo, 1.0 + (1.0 - lo) * 0.02)
        ax.set_xlabel("cosine to the nearest other object")
        ax.set_title(label, fontsize=10)
    panels[0][0].set_ylabel("objects (log)")
    fig.suptitle(f"nearest-neighbour similarity in {result.collection}: threshold {t:g} (red), "
                 f"{above} of {len(sims)} objects at or above", fontsize=11)
    return _save(fig, path)


def plot_group(group: Group, renders: Renders, path: Path, title: str) -> Path:
    """One row per member: VIEWS_SHOWN of its views around the ring, the first titled with what it is."""
    rows = []
    for member in group.members[:MAX_MEMBERS]:
        payload = {"path": member.path, "dataset": member.dataset}
        views = renders.views(payload)
        picks = (np.linspace(0, len(views), VIEWS_SHOWN, endpoint=False).astype(int) if views is not None
                 else range(VIEWS_SHOWN))
        row = []
        for n, v in enumerate(picks):
            label = f"{_short(member.label, 14)} / {member.split or '-'}\n{_short(member.path, 24)}" if n == 0 else f"view {v}"
            row.append(_Tile(views[v] if views is not None else None, label, colour=QUERY if n == 0 else "black",
                             missing=renders.why(payload)))
        rows.append(row)
    return _draw_tiles(rows, path, title)


@_text_is_data
def write_dedup_report(session: Session, result: DedupResult, out_dir: Path) -> Path:
    """index.html with the histogram, contamination per class and every group; returns its path."""
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    esc = html.escape
    plot_nn_histogram(result, out_dir / "nn_similarity.png")
    renders = Renders(session, session.fingerprint(result.collection))
    s = result.summary()
    out = ["<!doctype html><html><head><meta charset='utf-8'>", "<title>m3d duplicates report</title>",
           f"<style>{_CSS}</style></head><body>", "<h1>Duplicates</h1>",
           f"<p class='meta'>collection {esc(result.collection)}, {result.objects} objects, cosine threshold "
           f"{result.threshold:g}. m3d never deletes or moves anything: look at each group before acting on it.</p>",
           _table(["exact groups", "objects in them", "near groups", "objects in them", "test objects",
                   "test objects with a copy in train"],
                  [[s["exact_groups"], s["exact_objects"], s["near_groups"], s["near_objects"], s["test_objects"],
                    s["contaminated_test_objects"]]], left_cols=0),
           "<h2>Choosing the threshold</h2>",
           "<figure><img src='nn_similarity.png' alt='nearest-neighbour similarity'><figcaption>Each object's cosine "
           "to its nearest other object. Copies sit at the right end, ordinary neighbours form the mass to the "
           "left; put the threshold in the gap between them (the red line is the one used here).</figcaption></figure>"]
    if result.per_class:
        out.append("<h2>Cross-split contamination</h2><p>Test objects with an exact or near copy in train, per class.</p>")
        out.append(_table(["class", "test objects", "with a copy in train"],
                          [[label, row["test"], row["contaminated"]] for label, row in result.per_class.items()]))
    groups = result.exact + result.near
    out.append(f"<h2>Groups ({len(groups)})</h2>")
    if not groups:
        out.append("<p>No duplicates at this threshold.</p>")
    for number, group in enumerate(groups, 1):
        heading = (f"group {number}: {group.kind}, {len(group.members)} objects, cosine "
                   f"{group.min_score:.5f}-{group.max_score:.5f}")
        out.append(f"<h3>{esc(heading)}</h3>")
        out.append(_table(["path", "dataset", "class", "split"],
                          [[m.path, m.dataset, m.label, m.split or ""] for m in group.members], left_cols=4))
        if number <= MAX_GROUPS:
            image = f"group_{number:03d}.png"
            plot_group(group, renders, out_dir / image, heading)
            out.append(f"<figure><img src='{image}' alt='{esc(heading)}'></figure>")
    if len(groups) > MAX_GROUPS:
        out.append(f"<p class='note'>Pictures of the first {MAX_GROUPS} groups only; all are listed above and in "
                   "dedup_pairs.csv / dedup.json.</p>")
    out.append(f"<script>{_SCRIPT}</script></body></html>")
    page = out_dir / "index.html"
    page.write_text("\n".join(out), encoding="utf-8")
    return page
