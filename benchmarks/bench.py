"""m3d sync benchmark: the reference pipeline vs `m3d sync` vs encode-only, on the same meshes, in one run.

    python benchmarks/bench.py --data ../shared/datasets/lpsb [--out benchmarks/results]
        [--neural-per-class 2] [--scale 10] [--skip-reference] [--skip-neural] [--skip-scale] [--skip-tables]

Every mode runs in its own process; a sampler here sums the resident memory of that process and all
its children (render workers included) every 50 ms, so each mode's peak is its own. Prints a
markdown report and writes it (results.md) with all raw numbers (results.json) to --out.

Modes, all on the same files:
  reference    benchmarks/reference.py in benchmarks/.venv-ref (Open3D 0.19 OffscreenRenderer one view at a
               time, HF processor on PIL images, one forward pass per object per encoder, one upsert per
               object per collection)
  m3d          the real `m3d sync` command into a fresh store
  encode-only  the same number of views pushed through the same encoders, nothing else: the floor
The weight-free encoder (hog) runs on every mesh; the full-size CLIP ViT-B/32 + DINOv2 ViT-B/14
(random weights, same compute as the pretrained ones; saved once under benchmarks/.cache) on the
first --neural-per-class meshes of every class. Times exclude one-off start-up (interpreter,
imports, model load, GL start) except where a column says wall; the m3d time is the sync's
stream from worker spawn to the last write (FAISS rebuild and model load are in its wall time).
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import resource
import shutil
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
REPO = HERE.parent
sys.path.insert(0, str(REPO / "src"))
sys.path.insert(0, str(REPO / "tests"))  # the random-checkpoint fixture lives with the tests, not in the package

REF_PYTHON = HERE / ".venv-ref" / "bin" / "python"
CACHE = HERE / ".cache"
POOLS = "mean,max,attn"


# -- measuring one mode ---------------------------------------------------------------------------
class TreeSampler(threading.Thread):
    """Peak of the summed RSS of a process and all its descendants, sampled every `interval` s."""

    def __init__(self, pid: int, interval: float = 0.05):
        super().__init__(daemon=True)
        self.pid, self.interval = pid, interval
        self.peak = 0  # the summed RSS of the tree
        self.peak_processes = 0
        self.peak_root = 0  # the child process alone (the main process of the mode)
        self.peak_root_private = 0  # the same less file-backed pages (mapped store files, libraries): its own memory
        self.peak_others = 0  # its descendants together (render workers)
        self._halt = threading.Event()

    def run(self) -> None:
        import psutil

        try:
            root = psutil.Process(self.pid)
        except psutil.Error:
            return
        while not self._halt.is_set():
            total, count, own = 0, 0, 0
            try:
                procs = [root, *root.children(recursive=True)]
            except psutil.Error:
                break
            for proc in procs:
                try:
                    info = proc.memory_info()
                except psutil.Error:
                    continue
                total += info.rss
                count += 1
                if proc is root:
                    own = info.rss
                    self.peak_root_private = max(self.peak_root_private, info.rss - info.shared)
            self.peak_root = max(self.peak_root, own)
            self.peak_others = max(self.peak_others, total - own)
            if total > self.peak:
                self.peak, self.peak_processes = total, count
            self._halt.wait(self.interval)

    def stop(self) -> None:
        self._halt.set()
        self.join()


def run_mode(name: str, cmd: list[str], out_json: Path | None, env: dict | None = None,
             stdout_json: bool = False) -> dict:
    """Run one mode as a child process; its JSON result plus wall, CPU seconds and peak tree RSS."""
    print(f"[bench] {name}: {' '.join(map(str, cmd))}", file=sys.stderr, flush=True)
    before = resource.getrusage(resource.RUSAGE_CHILDREN)
    load_before = os.getloadavg()[0]
    start = time.perf_counter()
    proc = subprocess.Popen([str(c) for c in cmd], stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                            env={**os.environ, **(env or {})})
    sampler = TreeSampler(proc.pid)
    sampler.start()
    stdout, stderr = proc.communicate()
    wall = time.perf_counter() - start
    sampler.stop()
    after = resource.getrusage(resource.RUSAGE_CHILDREN)
    cpu = (after.ru_utime - before.ru_utime) + (after.ru_stime - before.ru_stime)
    if proc.returncode not in (0, 4):  # 4: m3d sync finished with some files skipped (listed)
        tail = "\n".join(stderr.strip().splitlines()[-15:])
        raise SystemExit(f"[bench] {name} failed with exit status {proc.returncode}:\n{tail}")
    if stdout_json:
        result = json.loads(stdout)
    else:
        result = json.loads(out_json.read_text()) if out_json else {}
    info = {"wall_s": wall, "cpu_s": cpu, "peak_rss_mb": sampler.peak / 2**20, "peak_processes": sampler.peak_processes,
            "peak_main_mb": sampler.peak_root / 2**20, "peak_main_private_mb": sampler.peak_root_private / 2**20,
            "peak_workers_mb": sampler.peak_others / 2**20,
            "loadavg_before": load_before, "loadavg_after": os.getloadavg()[0], "exit_status": proc.returncode}
    print(f"[bench] {name}: {wall:.1f} s wall, {cpu:.1f} CPU-s, peak {info['peak_rss_mb']:.0f} MB "
          f"({sampler.peak_processes} processes), load {load_before:.1f}->{info['loadavg_after']:.1f}",
          file=sys.stderr, flush=True)
    return {"result": result, **info}


# -- set-up ---------------------------------------------------------------------------------------
def machine() -> dict:
    import torch

    cpu = "unknown"
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    try:
        mem_gb = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES") / 2**30
    except (ValueError, OSError):
        mem_gb = None
    gpu = torch.cuda.get_device_name(0) if torch.cuda.is_available() else None
    try:
        usable = len(os.sched_getaffinity(0))
    except AttributeError:
        usable = os.cpu_count()
    from m3d.encoders import cpu_has_fast_bf16

    return {"cpu": cpu, "cores": os.cpu_count(), "usable_cores": usable, "memory_gb": mem_gb, "gpu": gpu,
            "cpu_native_bf16": cpu_has_fast_bf16(), "python": platform.python_version(), "torch": torch.__version__,
            "platform": platform.platform()}


def checkpoints() -> dict[str, Path]:
    """Full-size CLIP ViT-B/32 and DINOv2 ViT-B/14 with random weights, saved once (same compute as pretrained)."""
    from checkpoints import save_random_checkpoint  # tests/checkpoints.py (on sys.path above)

    out = {}
    for family in ("clip", "dinov2"):
        path = CACHE / "random-base" / family
        if not (path / "config.json").is_file() or not any(path.glob("*.safetensors")):
            print(f"[bench] saving a random full-size {family} checkpoint to {path}", file=sys.stderr, flush=True)
            save_random_checkpoint(family, path, size="base")
        out[family] = path
    return out


def file_list(data: Path, per_class: int | None, dest: Path) -> list[dict]:
    from m3d.dataset import discover

    files, _ = discover(data, per_class=per_class)
    items = [{"path": str(f.path), "rel_path": f.rel_path, "label": f.label} for f in files]
    dest.write_text(json.dumps(items))
    return items


def scaled_tree(data: Path, factor: int, dest: Path) -> Path:
    """`factor` symlinks per mesh under dest/<class>/ (distinct relative paths = distinct objects)."""
    from m3d.dataset import discover

    root = dest / f"{data.name}-x{factor}"
    if root.exists():
        shutil.rmtree(root)
    files, _ = discover(data)
    for f in files:
        folder = root / f.label
        folder.mkdir(parents=True, exist_ok=True)
        for k in range(factor):
            (folder / f"{Path(f.rel_path).stem}_c{k}{f.path.suffix}").symlink_to(f.path)
    return root


# -- the run --------------------------------------------------------------------------------------
def run(args: argparse.Namespace) -> dict:
    data = Path(args.data).resolve()
    out_dir = Path(args.out)
    out_dir.mkdir(parents=True, exist_ok=True)
    work = Path(tempfile.mkdtemp(prefix="m3d-bench-"))
    py, phases = sys.executable, str(HERE / "phases.py")
    script = Path(py).with_name("m3d")  # the installed console script; the module when not installed
    m3d = [str(script)] if script.exists() else [py, "-m", "m3d.cli"]
    env = {"HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1", "PYTHONPATH": str(REPO / "src")}
    have_ref = not args.skip_reference and Path(args.ref_python).exists()
    if not args.skip_reference and not have_ref:
        print(f"[bench] no reference environment at {args.ref_python}: reference modes skipped "
              f"(see benchmarks/README.md to make it)", file=sys.stderr)
    results: dict = {"machine": machine(), "data": str(data), "started": time.strftime("%Y-%m-%d %H:%M:%S"),
                     "settings": {"views": 8, "size": 224, "pools": POOLS.split(","),
                                  "neural_per_class": args.neural_per_class, "scale": args.scale},
                     "modes": {}}
    modes = results["modes"]
    all_files = file_list(data, None, work / "all.json")
    subset = file_list(data, args.neural_per_class, work / "subset.json")
    cost_meshes = file_list(data, 1, work / "cost.json")[: args.cost_meshes]
    (work / "cost.json").write_text(json.dumps(cost_meshes))
    results["settings"].update(objects_all=len(all_files), objects_subset=len(subset), objects_cost=len(cost_meshes))

    def phase(name: str, *extra: str) -> tuple[list[str], Path]:
        out = work / f"{name.replace('/', '_')}.json"
        return [py, phases, name.split("/")[0], "--data", str(data), *extra, "--out", str(out)], out

    def ref(command: str, tag: str, *extra: str) -> tuple[list[str], Path]:
        out = work / f"ref_{tag}.json"
        return [args.ref_python, str(HERE / "reference.py"), command, *extra, "--out", str(out)], out

    def sync(name: str, root: Path, *extra: str, rep: int = 0) -> dict:
        store = work / f"store_{name.replace('/', '_')}_{rep}"  # a fresh store every time
        return run_mode(name, [*m3d, "sync", str(root), "--store", str(store), "--json", *extra], None, env,
                        stdout_json=True)

    def median_of(name: str, make, key) -> dict:
        """The cheap modes run --repeat times (this machine is shared and noisy): the median run by `key`,
        with every run's key kept."""
        runs = [make(i) for i in range(args.repeat)]
        runs.sort(key=key)
        chosen = dict(runs[len(runs) // 2])
        chosen["repeats"] = [key(r) for r in runs]
        return chosen

    groups = set(args.only.split(",")) if args.only else {"render", "hog", "scale", "neural", "tables"}
    skip = {"scale": args.skip_scale, "neural": args.skip_neural, "tables": args.skip_tables}
    groups = {g for g in groups if not skip.get(g)}
    results["settings"]["groups"] = sorted(groups)

    # 1. rendering
    if "tables" in groups:
        cmd, out = phase("render-cost", "--per-class", "1", "--limit", str(args.cost_meshes))
        modes["render-cost/m3d"] = run_mode("render-cost/m3d", cmd, out, env)
        if have_ref:
            cmd, out = ref("render-cost", "render_cost", "--files", str(work / "cost.json"), "--sizes", "224", "1024")
            modes["render-cost/reference"] = run_mode("render-cost/reference", cmd, out)
    if "render" in groups:
        cmd, out = phase("render-stream/all")
        modes["render/m3d-all"] = median_of("render/m3d-all", lambda i: run_mode("render/m3d-all", cmd, out, env),
                                            lambda m: m["result"]["views_per_s"])
        cmd2, out2 = phase("render-stream/subset", "--per-class", str(args.neural_per_class))
        modes["render/m3d-subset"] = median_of("render/m3d-subset",
                                               lambda i: run_mode("render/m3d-subset", cmd2, out2, env),
                                               lambda m: m["result"]["views_per_s"])
        if have_ref:
            cmd, out = ref("render-only", "render_only", "--files", str(work / "subset.json"))
            modes["render/reference-subset"] = run_mode("render/reference-subset", cmd, out)

    # 2. weight-free encoder, every mesh
    if "hog" in groups:
        modes["hog/m3d"] = median_of("hog/m3d", lambda i: sync("hog/m3d", data, "--encoders", "hog", "--pools", POOLS,
                                                                rep=i), lambda m: m["result"]["objects_per_s"])
        hog_images = modes["hog/m3d"]["result"]["added"] * 8
        cmd3, out3 = phase("encode-only/hog", "--encoder", "hog", "--images", str(hog_images))
        modes["hog/encode-only"] = median_of("hog/encode-only", lambda i: run_mode("hog/encode-only", cmd3, out3, env),
                                             lambda m: -m["result"]["seconds"])
    if "scale" in groups:
        big = scaled_tree(data, args.scale, work)
        modes[f"hog/m3d-x{args.scale}"] = sync(f"hog/m3d-x{args.scale}", big, "--encoders", "hog", "--pools", POOLS)

    # 3. full-size CLIP + DINOv2 (random weights), the subset
    if "neural" in groups:
        ckpt = checkpoints()
        results["settings"]["checkpoints"] = {k: str(v) for k, v in ckpt.items()}
        if have_ref:
            cmd, out = ref("pipeline", "pipeline", "--files", str(work / "subset.json"), "--store", str(work / "ref_store"),
                           "--encoder", f"clip={ckpt['clip']}", "--encoder", f"dinov2={ckpt['dinov2']}")
            modes["neural/reference"] = run_mode("neural/reference", cmd, out)
        modes["neural/m3d"] = sync("neural/m3d", data, "--encoders", f"{ckpt['clip']},{ckpt['dinov2']}",
                                   "--pools", POOLS, "--per-class", str(args.neural_per_class))
        images = modes["neural/m3d"]["result"]["added"] * 8
        cmd, out = phase("encode-only/neural", "--per-class", str(args.neural_per_class), "--encoder", str(ckpt["clip"]),
                         "--encoder", str(ckpt["dinov2"]), "--images", str(images))
        modes["neural/encode-only"] = run_mode("neural/encode-only", cmd, out, env)
        if "tables" in groups:
            cmd, out = phase("encoder-cost", "--per-class", "1", "--encoder", "hog", "--encoder", str(ckpt["clip"]),
                             "--encoder", str(ckpt["dinov2"]), "--min-images", str(args.min_images),
                             "--save-sample", str(work / "sample.npy"))
            modes["encoders/m3d"] = run_mode("encoders/m3d", cmd, out, env)
            if have_ref:
                cmd, out = ref("encoder-cost", "encoder_cost", "--encoder", f"clip={ckpt['clip']}",
                               "--encoder", f"dinov2={ckpt['dinov2']}", "--min-images", str(args.min_images),
                               "--images", str(work / "sample.npy"))
                modes["encoders/reference"] = run_mode("encoders/reference", cmd, out)
    if not args.keep:
        shutil.rmtree(work, ignore_errors=True)
    results["finished"] = time.strftime("%Y-%m-%d %H:%M:%S")
    results["summary"], results["targets"] = summarise(results)
    return results


# -- numbers and report ---------------------------------------------------------------------------
def _m3d_time(mode: dict) -> float:
    """The sync's stream time (worker spawn to last write): embedded objects / the report's objects/s."""
    r = mode["result"]
    return r["added"] / r["objects_per_s"] if r.get("objects_per_s") else float("nan")


def _row(kind: str, mode: dict) -> dict:
    r = mode["result"]
    if kind == "m3d":
        objects, seconds = r["added"] + r["updated"], _m3d_time(mode)
        stages = {k: round(v, 2) for k, v in r["stages"].items() if k != "render_workers"}
        stages["workers"] = r["workers"]
    elif kind == "reference":
        objects, seconds = r["objects"], r["loop_s"]
        stages = {k: round(v, 2) for k, v in r["stages"].items()}
        stages["renderer"] = r["renderer"]
    else:
        objects, seconds = r["images"] // 8, r["seconds"]
        stages = {name: round(e["seconds"], 2) for name, e in r["encoders"].items()}
        stages["model_load"] = round(r["load_s"], 2)
    return {"objects": objects, "images": objects * 8, "seconds": seconds, "objects_per_s": objects / seconds,
            "wall_s": mode["wall_s"], "cpu_s": mode["cpu_s"], "peak_rss_mb": mode["peak_rss_mb"],
            "peak_main_mb": mode["peak_main_mb"], "peak_workers_mb": mode["peak_workers_mb"],
            "peak_processes": mode["peak_processes"], "loadavg": [mode["loadavg_before"], mode["loadavg_after"]],
            "stages": stages}


def summarise(results: dict) -> tuple[dict, list[dict]]:
    modes = results["modes"]
    s: dict = {}
    targets: list[dict] = []

    def target(name: str, measured: float | None, goal: float, unit: str = "") -> None:
        if measured is None:
            return
        targets.append({"target": name, "goal": goal, "measured": measured, "unit": unit, "met": measured >= goal,
                        "shortfall": None if measured >= goal else 1 - measured / goal})

    if "render/m3d-all" in modes:
        s["render_views_per_s_all"] = modes["render/m3d-all"]["result"]["views_per_s"]
        target("rendering alone (all meshes, load+render in the workers) views/s", s["render_views_per_s_all"], 300)
    if "render/reference-subset" in modes and "render/m3d-subset" in modes:
        s["render_views_per_s_subset"] = modes["render/m3d-subset"]["result"]["views_per_s"]
        s["reference_render_views_per_s"] = modes["render/reference-subset"]["result"]["views_per_s"]
        s["render_ratio"] = s["render_views_per_s_subset"] / s["reference_render_views_per_s"]
        target("rendering vs reference renderer (same meshes) x", s["render_ratio"], 10)
    for group in ("hog", "neural"):
        rows = {}
        for kind in ("reference", "m3d", "encode-only"):
            key = f"{group}/{kind}"
            if key in modes:
                rows[kind] = _row(kind, modes[key])
        scale_key = f"hog/m3d-x{results['settings']['scale']}"
        if group == "hog" and scale_key in modes:
            rows[f"m3d-x{results['settings']['scale']}"] = _row("m3d", modes[scale_key])
        if "m3d" in rows and "encode-only" in rows:
            rows["efficiency"] = rows["encode-only"]["seconds"] / rows["m3d"]["seconds"]
        if "m3d" in rows and "reference" in rows:
            rows["ratio"] = rows["m3d"]["objects_per_s"] / rows["reference"]["objects_per_s"]
            rows["ratio_wall"] = rows["reference"]["wall_s"] / rows["m3d"]["wall_s"]
        s[group] = rows
    hog, neural = s.get("hog", {}), s.get("neural", {})
    if "m3d" in hog:
        target("weight-free end to end (3 pools, all meshes) objects/s", hog["m3d"]["objects_per_s"], 20)
        target("weight-free end to end, wall clock incl. start-up and FAISS, objects/s",
               hog["m3d"]["objects"] / hog["m3d"]["wall_s"], 20)
    if "efficiency" in neural:
        target("CLIP+DINOv2 (6 collections) pipeline efficiency", neural["efficiency"], 0.8)
    if "ratio" in neural:
        target("CLIP+DINOv2 (6 collections) m3d / reference x", neural["ratio"], 3)
    scale = f"m3d-x{results['settings']['scale']}"
    if "m3d" in hog and scale in hog:
        s["memory_growth"] = hog[scale]["peak_rss_mb"] / hog["m3d"]["peak_rss_mb"]
        targets.append({"target": f"peak memory flat in dataset size ({scale} / x1)", "goal": "~1",
                        "measured": s["memory_growth"], "unit": "", "met": s["memory_growth"] < 1.25,
                        "shortfall": None})
    return s, targets


def _f(v, digits: int = 1) -> str:
    if v is None:
        return "-"
    if isinstance(v, float):
        return f"{v:.{digits}f}"
    return str(v)


def markdown(results: dict) -> str:
    m, st, s, modes = results["machine"], results["settings"], results["summary"], results["modes"]
    gl = modes.get("render-cost/m3d", {}).get("result", {}).get("gl_renderer", "")
    lines = [
        f"Machine: {m['cpu']}, {m['cores']} cores ({m['usable_cores']} usable), {m['memory_gb']:.0f} GB RAM, "
        f"GPU: {m['gpu'] or 'none'}{' (GL: ' + gl + ')' if gl else ''}; native bf16: {m['cpu_native_bf16']}; "
        f"Python {m['python']}, torch {m['torch']}. Run {results['started']} -> {results['finished']}.",
        f"Data: {results['data']}: {st['objects_all']} meshes; full-size neural modes on the first "
        f"{st['neural_per_class']} per class ({st['objects_subset']} meshes); {st['views']} views of {st['size']} px.",
        "",
    ]
    for group, title in (("hog", "Weight-free encoder (hog), 3 collections, every mesh"),
                         ("neural", "Full-size CLIP ViT-B/32 + DINOv2 ViT-B/14 (random weights), 6 collections")):
        rows = s.get(group)
        if not rows:
            continue
        lines += [f"### {title}", "",
                  "| mode | objects | time (s) | objects/s | wall (s) | CPU (s) | peak RSS, MB: all (main + children) | load avg | stage seconds |",
                  "|---|---:|---:|---:|---:|---:|---:|---|---|"]
        for kind, r in rows.items():
            if not isinstance(r, dict):
                continue
            stages = ", ".join(f"{k} {v}" for k, v in r["stages"].items())
            lines.append(f"| {kind} | {r['objects']} | {_f(r['seconds'])} | {_f(r['objects_per_s'], 2)} | "
                         f"{_f(r['wall_s'])} | {_f(r['cpu_s'])} | {_f(r['peak_rss_mb'], 0)} ({_f(r['peak_main_mb'], 0)} + "
                         f"{_f(r['peak_workers_mb'], 0)}, {r['peak_processes']} proc) | {_f(r['loadavg'][0])}->{_f(r['loadavg'][1])} | {stages} |")
        extra = []
        for key in (f"{group}/m3d", f"{group}/encode-only"):
            if "repeats" in modes.get(key, {}):
                vals = ", ".join(f"{abs(v):.2f}" for v in modes[key]["repeats"])
                what = "objects/s" if key.endswith("m3d") else "seconds"
                extra.append(f"{key}: median of {len(modes[key]['repeats'])} runs ({what}: {vals})")
        if "ratio" in rows:
            extra.append(f"m3d / reference = **{rows['ratio']:.2f}x** (wall clock incl. start-up: {rows['ratio_wall']:.2f}x)")
        if "efficiency" in rows:
            extra.append(f"pipeline efficiency = encode-only time / m3d time = **{rows['efficiency']:.2f}**" +
                         (" (the weight-free encoder is not the bottleneck: rendering is)" if group == "hog" else ""))
        lines += ["", "; ".join(extra), ""] if extra else [""]
    if "render/m3d-all" in modes:
        lines += ["### Rendering alone (load + render, views/s)", "", "| what | meshes | views/s | workers |", "|---|---:|---:|---:|"]
        for key in ("render/m3d-all", "render/m3d-subset", "render/reference-subset"):
            if key in modes:
                r = modes[key]["result"]
                who = r.get("renderer", f"m3d moderngl, {r.get('workers')} worker(s)")
                runs = modes[key].get("repeats")
                note = f" (median of {', '.join(f'{v:.0f}' for v in runs)})" if runs else ""
                lines.append(f"| {key} ({who}) | {r['objects']} | {_f(r['views_per_s'])}{note} | {r.get('workers', 1)} |")
        for key in ("render/m3d-all", "render/m3d-subset"):  # the sync's evidence pass, before its render stream
            r = modes.get(key, {}).get("result", {})
            if r.get("evidence_s") is not None:
                lines.append(f"| {key}: up evidence pass (--up {r['up']}, before the render stream) | {r['objects']} | "
                             f"{_f(r['evidence_objects_per_s'])} objects/s ({_f(r['evidence_s'])} s) | |")
        if "render_ratio" in s:
            lines.append(f"\nm3d / reference renderer on the same meshes: **{s['render_ratio']:.1f}x**")
        lines.append("")
    if "render-cost/m3d" in modes:
        r = modes["render-cost/m3d"]["result"]
        ref = modes.get("render-cost/reference", {}).get("result")
        lines += [f"### Render cost per view (warm, {r['meshes']} meshes, mean {r['mean_faces']:.0f} faces)", "",
                  "| renderer | 224 px (ms/view) | 1024 px (ms/view) |", "|---|---:|---:|"]
        for name in ("moderngl", "raycast"):
            if name in r:
                lines.append(f"| m3d {name} (all views of a mesh per call) | {_f(r[name]['224']['ms_per_view'], 2)} | "
                             f"{_f(r[name]['1024']['ms_per_view'], 2)} |")
        if ref:
            lines.append(f"| reference: {ref['renderer']} (one view per call) | {_f(ref['sizes']['224']['ms_per_view'], 2)} | "
                         f"{_f(ref['sizes']['1024']['ms_per_view'], 2)} |")
        lines.append("")
    if "encoders/m3d" in modes:
        r = modes["encoders/m3d"]["result"]
        ref = modes.get("encoders/reference", {}).get("result", {})
        sizes = list(next(iter(r.values()))["rows"])
        lines += ["### Encoder throughput, images/s, preprocessing included", "",
                  "| encoder | " + " | ".join(f"batch {b}" for b in sizes) + " |", "|---|" + "---:|" * len(sizes)]
        for name, e in r.items():
            lines.append(f"| m3d {name} ({e['device']}, {e['precision']}, tensor preprocessing) | " +
                         " | ".join(_f(e["rows"][b]["images_per_s"]) for b in sizes) + " |")
        for name, rows in ref.items():
            lines.append(f"| reference {name} (HF processor on PIL) | " +
                         " | ".join(_f(rows[b]["images_per_s"]) if b in rows else "-" for b in sizes) + " |")
        for name, rows in ref.items():
            lines.append(f"| (reference {name}: the HF processor alone) | " +
                         " | ".join(_f(rows[b]["images"] / rows[b]["preprocess_s"]) if b in rows else "-"
                                    for b in sizes) + " |")
        lines.append("")
    if results["targets"]:
        lines += ["### Targets", "", "| target | goal | measured | met |", "|---|---:|---:|---|"]
        for t in results["targets"]:
            miss = f" (short by {100 * t['shortfall']:.0f}%)" if t.get("shortfall") else ""
            lines.append(f"| {t['target']} | {t['goal']} | {_f(t['measured'], 2)} | {'yes' if t['met'] else 'no' + miss} |")
        lines.append("")
    return "\n".join(lines)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--data", help="dataset root (<class>/[<split>/]<name>.off)")
    ap.add_argument("--out", default=str(HERE / "results"), help="folder for results.json and results.md")
    ap.add_argument("--neural-per-class", type=int, default=2, help="meshes per class for the full-size neural modes")
    ap.add_argument("--scale", type=int, default=10, help="symlinks per mesh in the memory-flatness run")
    ap.add_argument("--cost-meshes", type=int, default=8, help="meshes in the render-cost table")
    ap.add_argument("--min-images", type=int, default=16, help="at least this many images per encoder-table cell")
    ap.add_argument("--repeat", type=int, default=3, help="runs of each cheap mode (render, hog); the median is reported")
    ap.add_argument("--ref-python", default=str(REF_PYTHON), help="python of the reference environment")
    ap.add_argument("--skip-reference", action="store_true")
    ap.add_argument("--skip-neural", action="store_true")
    ap.add_argument("--skip-scale", action="store_true")
    ap.add_argument("--skip-tables", action="store_true", help="skip the render-cost and encoder-throughput tables")
    ap.add_argument("--only", help="comma-separated groups to run: render, hog, scale, neural, tables (default: all)")
    ap.add_argument("--keep", action="store_true", help="keep the temporary stores and raw phase files")
    ap.add_argument("--from-json", help="only print (and write) the report of a saved results.json")
    args = ap.parse_args()
    if args.from_json:
        results = json.loads(Path(args.from_json).read_text())
    elif not args.data:
        ap.error("--data is required")
    else:
        results = run(args)
    text = markdown(results)
    out = Path(args.out)
    (out / "results.json").write_text(json.dumps(results, indent=2))
    (out / "results.md").write_text(text + "\n")
    print(text)
    print(f"\nwrote {out / 'results.json'} and {out / 'results.md'}", file=sys.stderr)


if __name__ == "__main__":
    main()
