"""Peak private (RssAnon) and file-backed (RssFile) memory of one in-process `m3d sync`, with both
printed after each planning stage (not a test). File-backed pages are the store's memory-mapped files
and libraries: page cache the kernel can drop, not memory the sync holds.

    python benchmarks/sync_memory.py sync TREE --store STORE --encoders hog --pools mean,max,attn --json
"""

from __future__ import annotations

import sys
import threading
import time


def status() -> dict[str, int]:
    """MB of this process now: VmRSS, RssAnon, RssFile, VmHWM."""
    found = {}
    with open("/proc/self/status") as handle:
        for line in handle:
            key, _, value = line.partition(":")
            if key in ("VmRSS", "RssAnon", "RssFile", "VmHWM"):
                found[key] = int(value.split()[0]) // 1024
    return found


def main() -> None:
    peak = {"RssAnon": 0, "RssFile": 0}

    def sample() -> None:
        while True:
            now = status()
            for key in peak:
                peak[key] = max(peak[key], now[key])
            time.sleep(0.01)

    threading.Thread(target=sample, daemon=True).start()
    import m3d.pipeline as pipeline
    from m3d.cli import app

    for name in ("prepare_collections", "plan_sync", "plan_orientation", "finalize"):
        def traced(*args, _fn=getattr(pipeline, name), _name=name, **kwargs):
            result = _fn(*args, **kwargs)
            print(f"after {_name}: {status()} peak {peak}", file=sys.stderr)
            return result
        setattr(pipeline, name, traced)
    try:
        app(sys.argv[1:])
    except SystemExit:
        pass
    print(f"final {status()} peak {peak}", file=sys.stderr)


if __name__ == "__main__":
    main()
