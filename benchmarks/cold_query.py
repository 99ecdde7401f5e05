"""What a cold `m3d query` pays for the up rules as a store grows (not a test).

    python benchmarks/cold_query.py                     # lpsb (380), grown to 30x = 11,400 points
    python benchmarks/cold_query.py --factor 10 --repeat 3

One `sync --encoders hog --pools mean` of the dataset (default --up auto) into a temporary store (its
seconds and the plan's seconds on the up rules are kept: what the up decision cost that first sync), then
the store is grown by upserting copies of its points under new ids (the vectors and payloads of the
real objects, each copy's path moved under copyN/: a query cannot tell them from synced objects, and
nothing renders). At each size, in fresh processes (cold: nothing imported, nothing cached): the up
rules as a query reads them (`search.collection_consensus`, timed in process), and a whole `m3d query
FILE --json`. Then the same with the stored rules removed, as a store synced before rules were stored
(the fallback scan of every point's pose). Load average recorded beside every figure.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
import uuid
from pathlib import Path

HERE = Path(__file__).resolve().parent
SRC = HERE.parent / "src"
sys.path.insert(0, str(SRC))
COLLECTION = "m3d_hog_mean"
PROBE = """
import sys, time
from pathlib import Path
t = time.perf_counter()
from m3d.search import collection_consensus
from m3d.store import open_session
with open_session(Path(sys.argv[1]), create=False) as session:
    opened = time.perf_counter()
    rules = collection_consensus(session, sys.argv[2])
    print(time.perf_counter() - opened, rules is not None and rules.rule_of(".off") is not None)
"""


def cold(cmd: list[str], env: dict) -> tuple[float, str]:
    start = time.perf_counter()
    out = subprocess.run(cmd, env=env, capture_output=True, text=True, check=True).stdout
    return time.perf_counter() - start, out


def grow(store: Path, factor: int) -> int:
    """Copies 1..factor-1 of every original point, under new ids and paths; returns the point count."""
    from m3d.store import open_session

    with open_session(store) as session:
        originals = [r for r in session.vectors.records(COLLECTION, vectors=True) if not r.payload["path"].startswith("copy")]
        import numpy as np

        for k in range(1, factor):
            ids = [str(uuid.uuid5(uuid.NAMESPACE_URL, f"copy{k}/{r.id}")) for r in originals]
            payloads = [{**r.payload, "path": f"copy{k}/{r.payload['path']}"} for r in originals]
            session.upsert(COLLECTION, ids, np.stack([r.vector for r in originals]).astype(np.float32), payloads)
        session.finish(COLLECTION)
        return session.vectors.count(COLLECTION)


def main() -> None:
    from m3d.orientation import UP_KEY
    from m3d.pipeline import SyncOptions, sync
    from m3d.store import open_session

    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--data", type=Path, default=HERE.parent.parent / "shared" / "datasets" / "lpsb")
    ap.add_argument("--factor", type=int, default=30)
    ap.add_argument("--repeat", type=int, default=3)
    ap.add_argument("--out", type=Path, default=HERE / "results" / "cold-query.json")
    args = ap.parse_args()
    env = {**os.environ, "PYTHONPATH": str(SRC), "HF_HUB_OFFLINE": "1"}
    query_file = sorted(args.data.glob("*/*.off"))[0]
    work = Path(tempfile.mkdtemp(prefix="m3d-cold-"))
    rows = []
    try:
        store = work / "store"
        with open_session(store) as session:
            load = os.getloadavg()[0]
            report = sync(session, args.data, SyncOptions(encoders=("hog",), pools=("mean",)))
        first = {"sync_s": round(report.seconds, 2), "plan_up_s": report.orientation["seconds"],
                 "measured_in_plan": report.orientation["measured"], "load": round(load, 1)}
        print(json.dumps({"first_sync": first}), flush=True)
        for size in (1, args.factor):
            points = grow(store, size) if size > 1 else None
            for stored in (True, False):
                if not stored:  # a store from before rules were stored: the query scans every pose
                    with open_session(store) as session:
                        saved = session.vectors.metadata(COLLECTION, UP_KEY)
                        session.vectors.set_metadata(COLLECTION, UP_KEY, None)
                for _ in range(args.repeat):
                    load = os.getloadavg()[0]
                    _, out = cold([sys.executable, "-c", PROBE, str(store), COLLECTION], env)
                    rules_s, found = out.split()
                    query_s, _ = cold([sys.executable, "-m", "m3d.cli", "query", str(query_file), "--store", str(store),
                                       "--json"], env)
                    row = {"points": points or 0, "rules": "stored" if stored else "scanned (old store)",
                           "consensus_s": round(float(rules_s), 4), "query_s": round(query_s, 2), "load": round(load, 1),
                           "rule_found": found == "True"}
                    if points is None:
                        with open_session(store, create=False) as session:
                            row["points"] = points = session.vectors.count(COLLECTION)
                    rows.append(row)
                    print(json.dumps(row), flush=True)
                if not stored:
                    with open_session(store) as session:
                        session.vectors.set_metadata(COLLECTION, UP_KEY, saved)
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.write_text(json.dumps({"query": str(query_file), "first_sync": first, "rows": rows}, indent=2))
    finally:
        shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    main()
