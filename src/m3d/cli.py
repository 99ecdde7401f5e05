"""The `m3d` command: a thin shell that parses options, calls the library and prints.

Library errors (m3d.errors.M3DError) become one line on stderr and a non-zero exit; heavy libraries
are imported inside commands so `m3d --help` stays instant.
"""

from __future__ import annotations

import errno
import functools
import json
import sys
from pathlib import Path
from typing import TYPE_CHECKING, Annotated, Optional

import typer

if TYPE_CHECKING:  # rich is imported where it prints: `m3d --help` stays instant
    from rich.table import Table
    from rich.text import Text

from .errors import M3DError, StoreBusyError, UsageError, no_space, one_line, printable

# m3d.dedup's defaults (not imported: `m3d --help` stays instant; a test checks they agree)
DEFAULT_DEDUP_NEAR = 0.01
DEFAULT_DEDUP_CANDIDATES = 5
DEDUP_SAMPLES = 4000

app = typer.Typer(
    help="Turn 3D meshes into search vectors and keep them in Qdrant.\n\n"
    "  m3d sync ./ModelNet40 --encoders gradhist  ingest a folder (<class>/[<split>/]<name>.off)\n\n"
    "  m3d query chair.off --k 5                  nearest objects to a mesh\n\n"
    "  m3d eval                                   precision per collection, Qdrant vs FAISS recall",
    no_args_is_help=True,
    rich_markup_mode=None,
    pretty_exceptions_enable=False,
)

@app.callback()
def main(verbose: Annotated[bool, typer.Option("--verbose", "-v", help="Log each stage's work to stderr.")] = False):
    """Turn 3D meshes into search vectors and keep them in Qdrant."""
    if verbose:
        import logging

        logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s %(message)s", stream=sys.stderr)


def _store_dir(value: str) -> Path:
    """--store as a Path; an empty one would silently mean the current directory."""
    if not value.strip():
        raise typer.BadParameter("an empty path; name the store directory (default .m3d)")
    return Path(value)


# str, so an empty value is seen before Path("") turns it into "."; commands receive the Path
StoreOpt = Annotated[str, typer.Option("--store", envvar="M3D_STORE", callback=_store_dir,
                                       help="Store directory (embedded Qdrant, FAISS, reports).")]
UrlOpt = Annotated[Optional[str], typer.Option("--qdrant-url", envvar="QDRANT_URL", help="Use a Qdrant server instead of the embedded store, e.g. http://localhost:6333.")]
KeyOpt = Annotated[Optional[str], typer.Option("--qdrant-api-key", envvar="QDRANT_API_KEY", show_default=False, help="API key of the Qdrant server (never printed).")]
JsonOpt = Annotated[bool, typer.Option("--json", help="Print JSON instead of a table.")]
# View settings shared by sync and render (one ViewSettings value; validated there).
ViewsOpt = Annotated[int, typer.Option(min=1, help="Cameras (ring: around the up axis; sphere: spread over the sphere).")]
ElevationOpt = Annotated[Optional[float], typer.Option(help="Ring camera elevation in degrees [default: 20; the sphere layout has none].")]
SizeOpt = Annotated[int, typer.Option(min=16, help="Render size in pixels (square).")]
RendererOpt = Annotated[str, typer.Option(help="moderngl (EGL; Mesa on CPU, NVIDIA on GPU) or raycast (Open3D, no GL).")]
UpOpt = Annotated[str, typer.Option(help="Mesh axis that is up: x, y, z, -x, -y, -z, or auto (decided from each object and its dataset).")]
LayoutOpt = Annotated[str, typer.Option(help="Cameras: ring (horizontal ring at --elevation) or sphere (evenly over the sphere).")]
AlignOpt = Annotated[str, typer.Option(help="Pose before rendering: none, or pca (principal axes; for arbitrarily rotated data).")]
DEFAULT_STORE = ".m3d"
PIPE_WIDTH = 200  # the widest a table is printed where nobody reads it at a width (pipes, CI logs)
INFO_VIEW_FIELDS = ("layout", "views", "elevation", "up", "align", "size", "renderer")


def friendly(command):
    """Turn library errors into one line on stderr and the error's exit status."""

    @functools.wraps(command)
    def wrapper(*args, **kwargs):
        try:
            return command(*args, **kwargs)
        except M3DError as exc:
            typer.echo(f"error: {printable(exc)}", err=True)
            raise typer.Exit(exc.exit_code) from None
        except OSError as exc:  # the environment said no (a full disk, a read-only folder, a file for a folder)
            if exc.errno == errno.ENOSPC and exc.filename:
                message = str(no_space(exc.filename))
            else:
                message = f"{exc.filename}: {exc.strerror}" if exc.filename else one_line(str(exc))
            typer.echo(f"error: {printable(message)}", err=True)
            raise typer.Exit(1) from None
        except KeyboardInterrupt:
            typer.echo("interrupted: run the same command again to finish the work", err=True)
            raise typer.Exit(130) from None

    return wrapper


def _session(store: Path, url: str | None, api_key: str | None, *, create: bool = False):
    """Commands that only read (create=False) refuse a store directory that does not exist."""
    from .store import open_session

    return open_session(store, url=url, api_key=api_key, create=create)


def _csv(value: str | None) -> list[str] | None:
    """Comma-separated values, CSV-quoted where a name holds a comma: --classes '"Chair, wooden",Table'."""
    if not value:
        return None
    import csv

    return [v.strip() for v in next(csv.reader([value], skipinitialspace=True), []) if v.strip()]


def _ints(option: str, value: str | None) -> list[int] | None:
    """A comma-separated list of integers (e.g. --hnsw-ef 16,32,64)."""
    try:
        return [int(v) for v in _csv(value)] if value else None
    except ValueError:
        raise UsageError(f"{option} takes integers separated by commas, got {value!r}") from None


def _table(title: str, rows: list[dict]):
    """A rich table whose cells are plain text: names like `x[/bold].off` are shown, never read as markup."""
    from rich.table import Table
    from rich.text import Text

    table = Table(title=Text(printable(title)))
    for i, key in enumerate(rows[0] if rows else []):
        table.add_column(str(key), justify="right" if isinstance(rows[0][key], (int, float)) else "left",
                         no_wrap=i == 0, overflow="fold")  # the first names the row; long names fold, never cut
    for row in rows:
        table.add_row(*[Text("-" if v is None else f"{v:.4f}" if isinstance(v, float) else printable(v))
                        for v in row.values()])  # None: a setting that does not apply (a sphere's elevation)
    return table


def _setting(value):
    """A setting as the user gave it: an elevation of 20 degrees reads 20, not 20.0000 (None stays None)."""
    return f"{value:g}" if isinstance(value, float) else value


def _records(table: Table) -> Text:
    """A table too wide for the terminal, as one block per row (`key: value` lines): cut cells say nothing."""
    from rich.text import Text

    columns = [(str(c.header), list(c.cells)) for c in table.columns]
    blocks = [str(table.title)] if table.title else []
    for i in range(table.row_count):
        (first, cells), rest = columns[0], columns[1:]
        blocks.append("\n".join([f"{first}: {cells[i]}"] + [f"  {key}: {values[i]}" for key, values in rest]))
    return Text("\n\n".join(blocks))


def _print(obj) -> None:
    """A table, or plain text line by line (never markup: every message may carry user text).

    A table wider than the terminal is printed whole where nobody reads it at a width (pipes, CI logs)
    and as one block per row on a terminal, never with its cells cut to an ellipsis. Text is never
    broken into lines by rich (a path cut at column 80 cannot be copied or grepped): the terminal wraps."""
    from rich.console import Console
    from rich.table import Table
    from rich.text import Text

    console = Console()
    if isinstance(obj, str):
        obj = Text("\n".join(printable(line) for line in obj.split("\n")))
    elif isinstance(obj, Table) and (natural := console.measure(obj, options=console.options.update_width(10**5)).maximum) > console.width:
        if console.is_terminal:
            obj = _records(obj)
        else:  # whole, but a 240-character file name wraps in its cell instead of widening every line
            console = Console(width=min(natural, PIPE_WIDTH))
    console.print(obj, soft_wrap=isinstance(obj, Text))


@app.command()
@friendly
def sync(
    root: Annotated[Path, typer.Argument(help="Folder of meshes: <class>/<split>/<name>.off or <class>/<name>.off")],
    encoders: Annotated[str, typer.Option(help="Comma-separated: clip, dinov2, gradhist or hog (weight-free), a Hugging Face id or a local checkpoint directory.")] = "clip,dinov2",
    pools: Annotated[str, typer.Option(help="Comma-separated pools: mean, max, attn, views (every view kept as one multivector, matched by MaxSim), ring (the ring's views in order under the best turn; --layout ring).")] = "mean,max,attn",
    views: ViewsOpt = 8,
    elevation: ElevationOpt = None,
    size: SizeOpt = 224,
    renderer: RendererOpt = "moderngl",
    up: UpOpt = "auto",
    layout: LayoutOpt = "ring",
    align: AlignOpt = "none",
    classes: Annotated[Optional[str], typer.Option(help='Only these classes (comma-separated; quote a name with a comma: \'"a, b",c\').')] = None,
    split: Annotated[Optional[str], typer.Option(help="Only this split (train/test).")] = None,
    per_class: Annotated[Optional[int], typer.Option(min=1, help="First N files per class, by name.")] = None,
    limit: Annotated[Optional[int], typer.Option(min=1, help="At most N files in all.")] = None,
    dataset: Annotated[Optional[str], typer.Option(help="Dataset name stored with every object (default: ROOT's folder name); keep it when the folder moves.")] = None,
    workers: Annotated[Optional[int], typer.Option(min=0, help="Render processes (0 = in this process), or render actors with --engine ray. Default: one per core (but one per GPU with encoders on a GPU).")] = None,
    batch_size: Annotated[Optional[int], typer.Option(min=1, help="Images per encoder call. Default: per device.")] = None,
    device: Annotated[Optional[str], typer.Option(help="cuda or cpu. Default: cuda when present.")] = None,
    precision: Annotated[Optional[str], typer.Option(help="fp32, fp16 or bf16 (recorded in the collection; queries use it). Default: fp16 on CUDA, fp32 on CPU.")] = None,
    max_faces: Annotated[int, typer.Option(min=1, help="Refuse meshes with more faces than this.")] = 2_000_000,
    rebuild: Annotated[bool, typer.Option(help="Replace collections built with other settings instead of refusing.")] = False,
    engine: Annotated[str, typer.Option(help="local (processes on this machine) or ray (actors on a Ray cluster; pip install 'm3d[ray]').")] = "local",
    ray_address: Annotated[Optional[str], typer.Option("--ray-address", help="Ray cluster to run on with --engine ray, e.g. ray://head:10001 (default: RAY_ADDRESS, else a local Ray).")] = None,
    verify: Annotated[bool, typer.Option(help="Hash every file, even those whose size, mtime, ctime and inode are unchanged.")] = False,
    hnsw_m: Annotated[Optional[int], typer.Option(help="HNSW edges per node (new collections; default 16).", rich_help_panel="Index")] = None,
    hnsw_ef_construct: Annotated[Optional[int], typer.Option(help="HNSW build candidates (default 100).", rich_help_panel="Index")] = None,
    index_threshold: Annotated[Optional[int], typer.Option(help="Build the HNSW graph once a collection segment holds this many points; 0 = always (default 10000).", rich_help_panel="Index")] = None,
    quantization: Annotated[Optional[str], typer.Option(help="none, int8 (scalar) or binary; searches rescore with the original vectors (default none).", rich_help_panel="Index")] = None,
    on_disk: Annotated[Optional[bool], typer.Option("--on-disk/--in-ram", show_default=False, help="Keep original vectors on disk (memory-mapped) instead of in RAM (default in RAM).", rich_help_panel="Index")] = None,
    shards: Annotated[Optional[int], typer.Option(help="Server only: shards per collection, fixed at creation (a multiple of the node count).", rich_help_panel="Server")] = None,
    replication_factor: Annotated[Optional[int], typer.Option(help="Server only: copies of each shard.", rich_help_panel="Server")] = None,
    write_consistency: Annotated[Optional[int], typer.Option(help="Server only: replicas that must acknowledge each write (at most --replication-factor).", rich_help_panel="Server")] = None,
    store: StoreOpt = DEFAULT_STORE,
    qdrant_url: UrlOpt = None,
    qdrant_api_key: KeyOpt = None,
    as_json: JsonOpt = False,
):
    """Embed every mesh under ROOT into one collection per (encoder, pool); only missing or changed
    files are rendered again, files gone from ROOT are removed.

    Exit status: 0 all files handled, 4 some files skipped (listed in the report), 1 failure,
    2 bad input, 3 store busy.

    Example: m3d sync ../shared/datasets/lpsb --encoders hog
    """
    from .connector import IndexSettings
    from .pipeline import SyncOptions
    from .pipeline import sync as run_sync
    from .render import ViewSettings

    index = IndexSettings(hnsw_m=hnsw_m, hnsw_ef_construct=hnsw_ef_construct, index_threshold=index_threshold,
                          quantization=quantization, on_disk=on_disk, shards=shards,
                          replication_factor=replication_factor, write_consistency=write_consistency)
    index.check_backend(server=bool(qdrant_url))
    options = SyncOptions(
        encoders=tuple(_csv(encoders) or []), pools=tuple(_csv(pools) or []),
        view=ViewSettings(views=views, elevation=elevation, size=size, renderer=renderer, up=up, layout=layout,
                          align=align), workers=workers,
        batch_size=batch_size, device=device, precision=precision, max_faces=max_faces, rebuild=rebuild, verify=verify,
        engine=engine, ray_address=ray_address,  # RAY_ADDRESS is read by ray.init itself, so a local sync ignores it
        index=index,
    )
    selection = dict(classes=_csv(classes), split=split, per_class=per_class, limit=limit, dataset=dataset)
    try:
        session = _session(store, qdrant_url, qdrant_api_key, create=True)
    except StoreBusyError:  # a running `m3d serve` holds the store: it runs the sync while it keeps answering
        from .serve.handoff import find_server, sync_request

        server = find_server(store)
        if server is None:
            raise
        report, indexes, location = _hand_off(server, sync_request(root, options, selection, qdrant_url), as_json)
        report_path = store / "reports" / "last-sync.json"
    else:
        with session, _progress(as_json) as progress:
            report = run_sync(session, root, options, progress=progress, **selection)
            report_path = session.reports_dir / "last-sync.json"
            location = session.vectors.location
            indexes = {name: session.vectors.index_info(name).state for name in report.collections}
    if as_json:
        typer.echo(json.dumps(report.summary(), indent=2))
    else:
        s = report
        _print(f"{s.discovered} meshes: {s.added} added, {s.updated} updated, {s.unchanged} unchanged, "
               f"{s.removed} removed, {len(s.skipped)} skipped  ({s.seconds:.1f} s, {s.objects_per_s:.1f} objects/s, "
               f"bottleneck: {s.stages.bottleneck()})")
        if s.resources:
            r = s.resources
            _print(f"engine: {s.engine} on {r['cpus']} CPUs, {r['gpus']} GPUs ({r['render_workers']} render, "
                   f"{r['encode_workers']} encode workers)")
        if s.orientation:
            for sfx, g in s.orientation["formats"].items():
                if "agree" not in g:
                    rule = f"{g['up']} ({g['objects']} file{'s' if g['objects'] != 1 else ''})"
                elif g["agree"]:
                    rule = (f"{g['up']} for every file: the dataset agrees (prior {g['prior'][g['up']]:.2f}, "
                            f"{g['sampled']} of {g['objects']} files measured)")
                else:
                    rule = (f"{g['up']} unless a file's own evidence is strong: a mixed library (prior "
                            f"{g['prior'][g['up']]:.2f}, {g['sampled']} of {g['objects']} files measured)")
                _print(f"up (auto), {printable(sfx or '(no suffix)')}: {rule}")
                if g.get("moved"):
                    _print(f"  up rule moved: {g['moved']}; {g['reoriented']} unchanged objects embedded again")
        for skip in s.skipped[:10]:
            _print(f"  skipped {skip['rel_path']}: {skip['reason']}")
        if len(s.skipped) > 10:
            _print(f"  ... {len(s.skipped) - 10} more")
        for name, state in indexes.items():
            built = s.index_seconds.get(name, 0.0)
            _print(f"  {name}: index {state}" + (f", built in {built:.1f} s" if built >= 0.05 else ""))
        _print(f"collections: {', '.join(s.collections)}\nstore: {location}\nreport: {report_path}")
    raise typer.Exit(report.exit_status)


def _hand_off(server: dict, request: dict, quiet: bool):
    """Run a sync on the server that holds the store, showing its progress here as a local one would."""
    from .pipeline import StageStats, SyncReport
    from .serve.handoff import hand_off

    if not quiet:
        typer.echo(f"the store is served by m3d serve (pid {server['pid']}) at {server['url']}: the sync runs "
                   "there while it keeps answering", err=True)
    with _progress(quiet) as progress:
        def follow(job: dict) -> None:
            if progress and job.get("total"):
                progress(job["done"], job["total"], SyncReport("", "", [], stages=StageStats(**job["stages"])))

        job = hand_off(server, request, follow)
    data = job["report"]
    indexes = data.pop("indexes", {})
    return SyncReport.from_dict(data), indexes, f"{server['url']} (m3d serve, pid {server['pid']})"


class _progress:
    """A rich progress bar fed by the pipeline's callback: objects/s and the busiest stage."""

    def __init__(self, quiet: bool):
        self.quiet = quiet or not sys.stderr.isatty()
        self.bar = None

    def __enter__(self):
        if self.quiet:
            return None
        from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeRemainingColumn

        self.bar = Progress(TextColumn("sync"), BarColumn(), MofNCompleteColumn(), TextColumn("{task.fields[info]}"),
                            TimeRemainingColumn(), transient=True)
        self.bar.__enter__()
        self.task = self.bar.add_task("sync", total=None, info="")
        return self.update

    def update(self, done: int, total: int, report) -> None:
        elapsed = max(self.bar.tasks[0].elapsed or 0.0, 1e-6)
        info = f"{done / elapsed:.1f} obj/s, bottleneck: {report.stages.bottleneck()}"
        self.bar.update(self.task, completed=done, total=total, info=info)

    def __exit__(self, *exc):
        if self.bar is not None:
            self.bar.__exit__(*exc)


@app.command()
@friendly
def query(
    mesh: Annotated[Optional[Path], typer.Argument(help="A mesh file (.off .obj .ply .stl .glb); or use --image / --text")] = None,
    image: Annotated[Optional[Path], typer.Option(help="Search with a picture (photo, sketch, render): encoded as one view.")] = None,
    text: Annotated[Optional[str], typer.Option(help="Search with a sentence through the encoder's text tower (CLIP collections).")] = None,
    k: Annotated[int, typer.Option("--k", min=1, max=1_000_000, help="How many neighbours.")] = 5,
    collection: Annotated[Optional[str], typer.Option(help="Collection to search (default: the first *_mean one that can answer this kind of query).")] = None,
    label: Annotated[Optional[str], typer.Option("--class", help="Only neighbours of this class (payload filter).")] = None,
    exact: Annotated[bool, typer.Option(help="Answer from the FAISS exact index instead of Qdrant.")] = False,
    up: Annotated[Optional[str], typer.Option(help="Up axis of MESH (x, y, z, -x, -y, -z, or auto: from its own shape, under the collection's consensus) when it differs from the collection's rule.")] = None,
    checkpoint: Annotated[Optional[Path], typer.Option(help="The checkpoint directory of a collection synced from a local checkpoint on another machine (its place is remembered where it was synced).")] = None,
    hnsw_ef: Annotated[Optional[int], typer.Option(help="Qdrant's HNSW search candidates (default: the engine's).")] = None,
    rescore: Annotated[bool, typer.Option(help="Re-rank quantized candidates with the original vectors.")] = True,
    oversampling: Annotated[float, typer.Option(help="Quantized collections: candidates per result that are rescored.")] = 2.0,
    gallery: Annotated[Optional[Path], typer.Option(help="Also write the query and its neighbours as one PNG.")] = None,
    store: StoreOpt = DEFAULT_STORE,
    qdrant_url: UrlOpt = None,
    qdrant_api_key: KeyOpt = None,
    as_json: JsonOpt = False,
):
    """Nearest stored objects to a MESH (rendered and encoded with the collection's own settings), to a
    picture (--image) or to a sentence (--text, collections with a text tower).

    Examples: m3d query chair.off --k 5 --class Chair;  m3d query --image photo.jpg;
    m3d query --text "a wooden chair with armrests"
    """
    from .connector import SearchSettings
    from .search import Query
    from .search import query as run_query

    q = Query(mesh=mesh, image=image, text=text, up=up)  # checked before the store is opened
    params = SearchSettings(hnsw_ef=hnsw_ef, rescore=rescore, oversampling=oversampling)
    with _session(store, qdrant_url, qdrant_api_key) as session:
        result = run_query(session, mesh, image=image, text=text, collection=collection, k=k, label=label,
                           exact=exact, up=up, checkpoint=checkpoint, params=params)
        if gallery is not None:
            from .report import query_gallery

            query_gallery(session, result, q.title, gallery)
    rows = [{"rank": i + 1, "score": h.score, "class": h.payload.get("class"), "path": h.payload.get("path")}
            for i, h in enumerate(result.hits)]
    if as_json:
        typer.echo(json.dumps({"collection": result.collection, "engine": result.engine, "kind": result.kind,
                               "hits": rows}, indent=2))
    else:
        _print(_table(f"{q.title} in {result.collection} ({result.engine})", rows))
        if gallery is not None:
            _print(f"gallery: {gallery}")


@app.command("eval", context_settings={"allow_extra_args": True})  # extras: see `stray` below
@friendly
def eval_(
    ctx: typer.Context,
    collection: Annotated[Optional[list[str]], typer.Option(help="Collection(s) to evaluate (default: all).")] = None,
    recall_k: Annotated[int, typer.Option(min=1, help="k of Qdrant-vs-FAISS recall.")] = 10,
    recall_queries: Annotated[int, typer.Option(min=1, help="Queries used for recall (spread over the collection).")] = 1000,
    hnsw_ef: Annotated[Optional[str], typer.Option(help="Qdrant's HNSW search candidates; several (16,32,64,128,256) sweep them and the report draws recall against latency.")] = None,
    rescore: Annotated[bool, typer.Option(help="Re-rank quantized candidates with the original vectors.")] = True,
    oversampling: Annotated[float, typer.Option(help="Quantized collections: candidates per result that are rescored.")] = 2.0,
    out: Annotated[Optional[Path], typer.Option(help="Where to write eval.csv / eval_per_class.csv / eval.json (default: STORE/eval).")] = None,
    report: Annotated[Optional[Path], typer.Option(help="Also write figures and index.html to this folder.")] = None,
    queries: Annotated[Optional[str], typer.Option(help="With --report: relative paths of the gallery queries (comma-separated).")] = None,
    exclude_duplicates: Annotated[bool, typer.Option(help="Also report the figures with each query's confirmed duplicates (m3d dedup's groups: exact, same geometry or near, decided on the meshes) removed from its candidates.")] = False,
    rotate: Annotated[Optional[int], typer.Option(min=1, help="Also re-embed N stored objects after a random rotation and query each against its collection.")] = None,
    rotation_seed: Annotated[int, typer.Option(help="Seed of the objects and rotations chosen by --rotate.")] = 0,
    rotation: Annotated[str, typer.Option(help="With --rotate: yaw (about the up axis) or any (uniform 3D rotation).")] = "yaw",
    store: StoreOpt = DEFAULT_STORE,
    qdrant_url: UrlOpt = None,
    qdrant_api_key: KeyOpt = None,
    as_json: JsonOpt = False,
):
    """Retrieval precision@5/@10, mAP and the Princeton Shape Benchmark's NN, first tier, second tier
    and DCG per collection (each object queries all others), per class, and recall@k of Qdrant's answers against FAISS's exact ones."""
    from dataclasses import asdict

    from .connector import SearchSettings
    from .evaluate import evaluate, require_writable, write_results

    stray = ctx.args  # `--exclude-duplicates 0.999`, the old cosine form, leaves its value here
    if stray:
        raise UsageError(f"unexpected argument {stray[0]!r}" + (": --exclude-duplicates takes no cosine now, it removes "
                         "the pairs m3d dedup confirms on the meshes (run `m3d eval --exclude-duplicates`)"
                         if exclude_duplicates else ""))
    search = tuple(SearchSettings(hnsw_ef=ef, rescore=rescore, oversampling=oversampling)
                   for ef in _ints("--hnsw-ef", hnsw_ef) or [None])
    with _session(store, qdrant_url, qdrant_api_key) as session:  # a mistyped --store is refused first
        require_writable(out or store / "eval", default=out is None)
        results = evaluate(session, collection, recall_k=recall_k, recall_queries=recall_queries,
                           exclude_duplicates=exclude_duplicates, search=search)
        if not results:
            raise M3DError("no collection with two or more objects to evaluate: run `m3d sync DIR` first")
        files = write_results(results, out or store / "eval")
        rotated = []
        if rotate is not None:
            from .evaluate import rotation_robustness

            rotated = rotation_robustness(session, [r.collection for r in results], objects=rotate,
                                          seed=rotation_seed, rotation=rotation)
            path = (out or store / "eval") / f"rotation_{rotation}.json"
            path.write_text(json.dumps([asdict(r) for r in rotated], indent=2))
            files.append(path)
        if report is not None:
            from .report import write_report

            files.append(write_report(session, results, report, queries=_csv(queries)))
    if as_json:
        data = [asdict(r) for r in results]
        typer.echo(json.dumps({"collections": data, "rotation": [asdict(r) for r in rotated]} if rotate else data,
                              indent=2))
        return
    _print(_table("retrieval quality (self excluded)", [r.row() for r in results]))
    if rotated:
        _print(_table(f"under a random {rotation} rotation (seed {rotation_seed})", [r.row() for r in rotated]))
    for path in files:
        _print(f"wrote {path}")


@app.command()
@friendly
def dedup(
    collection: Annotated[Optional[list[str]], typer.Option(help="Collection(s) whose vectors propose candidate pairs (default: the first *_mean one); several add their proposals up.")] = None,
    candidates: Annotated[int, typer.Option(help="Nearest neighbours per object proposed to the geometric check.")] = DEFAULT_DEDUP_CANDIDATES,
    min_cosine: Annotated[Optional[float], typer.Option(help="Also propose every neighbour at or above this cosine.")] = None,
    near: Annotated[float, typer.Option(help="Near copies: the aligned surfaces' Hausdorff distance at or below this fraction of the radius.")] = DEFAULT_DEDUP_NEAR,
    samples: Annotated[int, typer.Option(help="Surface samples per mesh for the geometric check.")] = DEDUP_SAMPLES,
    threshold: Annotated[Optional[float], typer.Option(hidden=True)] = None,
    report: Annotated[Optional[Path], typer.Option(help="Also write index.html with every group's views side by side after alignment, the CSV and JSON to this folder.")] = None,
    store: StoreOpt = DEFAULT_STORE,
    qdrant_url: UrlOpt = None,
    qdrant_api_key: KeyOpt = None,
    as_json: JsonOpt = False,
):
    """Duplicates confirmed on the meshes: exact (same bytes), same-geometry (re-saved, converted,
    re-ordered, re-meshed, turned or scaled) and near (small edits, Hausdorff <= NEAR), grouped, and
    test objects with a copy in train. The vectors only propose pairs. Never deletes or moves
    anything: review the groups (--report) before acting on them."""
    if threshold is not None:
        raise UsageError("--threshold (a cosine) no longer decides duplicates, geometry does: use --near for the "
                         "geometric bound, --candidates or --min-cosine to propose more pairs")
    from rich.markup import escape

    from .dedup import DedupOptions, find_duplicates, write_tables

    options = DedupOptions(collections=tuple(collection or ()), candidates=candidates, min_cosine=min_cosine,
                           near=near, samples=samples)
    with _session(store, qdrant_url, qdrant_api_key) as session:
        result = find_duplicates(session, options)
        files = []
        if report is not None:
            from .dedup_report import write_dedup_report

            files = [*write_tables(result, report), write_dedup_report(session, result, report)]
    if as_json:
        typer.echo(json.dumps(result.to_json(), indent=2))
        return
    s, c = result.summary(), result.cost
    _print(f"{', '.join(result.collections)}: {result.objects} objects; {c['proposed_pairs']} pairs proposed, "
           f"{c['measured_pairs']} measured on {c['meshes_loaded']} meshes; "
           + ", ".join(f"{s[f'{k}_groups']} {k} groups ({s[f'{k}_objects']} objects)" for k in ("exact", "same-geometry", "near")))
    rows = [{"group": n, "kind": g.kind, "objects": len(g.members), "hausdorff": f"{g.hausdorff:.2e}",
             "classes": ", ".join(g.classes), "paths": ", ".join(g.places[:3]) + (" ..." if len(g.members) > 3 else "")}
            for n, g in enumerate(result.groups, 1)]
    if rows:
        _print(_table("duplicate groups", rows[:30]))
        if len(rows) > 30:
            _print(f"... {len(rows) - 30} more groups (--json or --report for all)")
    if result.test_objects:
        _print(f"contamination: {len(result.contaminated)} of {result.test_objects} test objects have a copy in train")
    for path in files:
        _print(f"wrote {escape(str(path))}")


@app.command()
@friendly
def info(
    store: StoreOpt = DEFAULT_STORE,
    qdrant_url: UrlOpt = None,
    qdrant_api_key: KeyOpt = None,
    as_json: JsonOpt = False,
):
    """Collections, point counts, classes and pipeline settings, and where the store is."""
    with _session(store, qdrant_url, qdrant_api_key) as session:
        rows = []
        for name in session.collections():
            fp = session.fingerprint(name)
            classes = session.vectors.facet(name, "class")
            index = session.vectors.index_info(name)
            rows.append({"collection": name, "points": session.vectors.count(name), "dim": session.vectors.dim(name),
                         "vectors": session.vectors.views(name) or 1,  # per point: a views collection's multivector
                         "index": index.state, "threshold": index.settings.index_threshold,
                         "classes": len(classes), "encoder": fp.model_id if fp else "",
                         "precision": fp.precision if fp else "",
                         **{k: _setting(getattr(fp.view, k)) if fp else "" for k in INFO_VIEW_FIELDS}})
        location = session.vectors.location
    if as_json:
        typer.echo(json.dumps({"store": location, "collections": rows}, indent=2))
        return
    _print(f"store: {location}")
    _print(_table("collections", rows) if rows else "no collections yet: run `m3d sync DIR`")


@app.command()
@friendly
def check(
    repair: Annotated[bool, typer.Option(help="Rebuild FAISS indexes that are out of step with Qdrant.")] = False,
    store: StoreOpt = DEFAULT_STORE,
    qdrant_url: UrlOpt = None,
    qdrant_api_key: KeyOpt = None,
    as_json: JsonOpt = False,
):
    """Verify the store: per collection, Qdrant and FAISS hold the same points under one fingerprint."""
    with _session(store, qdrant_url, qdrant_api_key) as session:
        rows = session.check(repair=repair)
    if as_json:
        typer.echo(json.dumps(rows, indent=2))
    else:
        notes = {k: [(r["collection"], r[k]) for r in rows if r[k]] for k in ("problems", "repaired")}
        _print(_table("store check", [{k: v for k, v in r.items() if k not in notes} for r in rows])
               if rows else "no collections")
        for name, text in notes["problems"]:
            _print(f"{name}: {text}")
        for name, text in notes["repaired"]:
            _print(f"{name}: repaired: {text}")
    if not all(r["ok"] for r in rows):
        raise typer.Exit(1)


@app.command()
@friendly
def render(
    mesh: Annotated[Path, typer.Argument(help="A mesh file")],
    output: Annotated[Path, typer.Option("-o", "--output", help="PNG strip of all views.")] = Path("strip.png"),
    views: ViewsOpt = 8,
    elevation: ElevationOpt = None,
    size: SizeOpt = 224,
    renderer: RendererOpt = "moderngl",
    up: UpOpt = "auto",
    layout: LayoutOpt = "ring",
    align: AlignOpt = "none",
):
    """Render MESH the way sync does and write the views side by side: see what the encoder sees."""
    from .orientation import pose
    from .render import ViewSettings, create_renderer, posed, save_strip
    from .search import load_named

    view = ViewSettings(views=views, elevation=elevation, size=size, renderer=renderer, up=up, layout=layout,
                        align=align)
    loaded = load_named(mesh)
    placed = pose(loaded, view, suffix=mesh.suffix)
    engine = create_renderer(view)
    try:
        save_strip(engine.render(posed(loaded, placed.rotation)), output)
    finally:
        engine.close()
    _print(f"wrote {output} ({views} views on a {layout}, {size}px, {renderer}, up: {placed.up} ({placed.source}))")


@app.command()
@friendly
def serve(
    host: Annotated[str, typer.Option(help="Address to listen on: 127.0.0.1 is this machine only; 0.0.0.0 every interface (then set --token).")] = "127.0.0.1",
    port: Annotated[int, typer.Option(help="Port (0: any free one; serve.json in the store says which).")] = 8000,
    token: Annotated[Optional[str], typer.Option(envvar="M3D_TOKEN", show_default=False, help="Require `Authorization: Bearer TOKEN` on every API call (never printed).")] = None,
    max_upload_mb: Annotated[float, typer.Option(help="Refuse uploads larger than this (HTTP 413).")] = 64.0,
    max_faces: Annotated[int, typer.Option(min=1, help="Refuse query meshes with more faces than this (as sync does).")] = 2_000_000,
    cors_origin: Annotated[Optional[str], typer.Option(help="Let pages from these origins call the API (comma-separated, e.g. https://example.org). Default: none.")] = None,
    checkpoint: Annotated[Optional[Path], typer.Option(help="The checkpoint directory of a collection synced from a local checkpoint elsewhere.")] = None,
    device: Annotated[Optional[str], typer.Option(help="cuda or cpu for the query encoders. Default: cuda when present.")] = None,
    threads: Annotated[int, typer.Option(min=1, help="CPU threads per query encode (queries run side by side).")] = 1,
    store: StoreOpt = DEFAULT_STORE,
    qdrant_url: UrlOpt = None,
    qdrant_api_key: KeyOpt = None,
):
    """A warm search service over the store: a JSON API (docs at /docs) and a search page. It holds the
    store; `m3d sync` on the same store hands its sync to it, and searching goes on while it runs.

    Example: m3d serve --store .m3d   (then open http://127.0.0.1:8000/)
    """
    from .serve import ServeOptions
    from .serve.runner import serve as run_server

    options = ServeOptions(host=host, port=port, token=token, max_upload_mb=max_upload_mb, max_faces=max_faces,
                           cors_origins=tuple(_csv(cors_origin) or ()), threads=threads)
    if options.warning():
        typer.echo(options.warning(), err=True)
    run_server(store, options, url=qdrant_url, api_key=qdrant_api_key, checkpoint=checkpoint, device=device,
               say=lambda line: typer.echo(printable(line), err=True))


@app.command()
@friendly
def samples(
    output: Annotated[Path, typer.Argument(help="Folder to write the synthetic dataset to.")],
    per_class: Annotated[int, typer.Option(min=1, help="Meshes per shape class.")] = 8,
    seed: int = 0,
):
    """Write a small synthetic dataset (primitive shapes in 6 classes, ModelNet layout) to try m3d
    without downloading anything: m3d samples ./shapes && m3d sync ./shapes --encoders gradhist"""
    from .samples import write_samples

    paths = write_samples(output, per_class=per_class, seed=seed)
    _print(f"wrote {len(paths)} meshes to {output}")




def run() -> None:
    """The `m3d` command. Click's own usage errors (an unknown option, a value of the wrong type) become
    one line and exit 2, as every m3d error is one line: click would print a usage block around it."""
    try:  # typer >= 0.20 carries its own copy of click
        from typer._click import exceptions as click_errors
    except ImportError:
        from click import exceptions as click_errors

    try:
        code = app(standalone_mode=False)
    except getattr(click_errors, "NoArgsIsHelpError", ()) as exc:  # `m3d` alone: the help, as click shows it
        exc.show()
        sys.exit(exc.exit_code)
    except click_errors.UsageError as exc:
        where = exc.ctx.command_path if exc.ctx else "m3d"
        typer.echo(f"error: {printable(one_line(exc.format_message()))} (options: {where} --help)", err=True)
        sys.exit(2)
    except typer.Abort:  # ctrl-C at a prompt (typer >= 0.20's own click has no Abort: typer's is the one raised)
        sys.exit(130)
    sys.exit(code if isinstance(code, int) else 0)


if __name__ == "__main__":
    run()
