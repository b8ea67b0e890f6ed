"""Time and memory of a signed pack update of the default pack over loopback.

Prints one JSON line. A fleet repository is made in a temp dir with the default pack
published and served by ``fleet.serve`` on loopback; a fresh device store installs it.
Run 1 stops after staging (download, verify, unpack): its peak RSS growth shows that
memory stays flat whatever the pack size (hashes are checked while streaming). Run 2
does the whole update (health gate in a shadow session, atomic switch).

    python bench/update.py
"""

from __future__ import annotations

import atexit
import json
import resource
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

CHILD = """
import json, resource, sys, time
from pathlib import Path
from agent import __version__
from agent.packs.store import PackStore
from agent.packs.updater import offline_updater, provision_trust
device, url, root, stop_at = Path(sys.argv[1]), sys.argv[2], Path(sys.argv[3]), sys.argv[4]
class Stop(Exception):
    pass
def hook(stage):
    if stage == stop_at:
        raise Stop
provision_trust(device / "tuf", root)
base = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
marks = {}
t0 = time.perf_counter()
def on_event(e):
    marks.setdefault(e.state, time.perf_counter() - t0)
try:
    up = offline_updater(PackStore(device), device / "tuf", url, __version__, on_event=on_event, hook=hook)
    up.install(sys.argv[5])
except Stop:
    pass
total = time.perf_counter() - t0
peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
print(json.dumps({"base_rss_mb": base, "peak_rss_mb": peak, "total_s": total, "marks": marks}))
"""


def _child(device: Path, url: str, root: Path, stop_at: str, target: str) -> dict[str, Any]:
    out = subprocess.run(
        [sys.executable, "-c", CHILD, str(device), url, str(root), stop_at, target],
        capture_output=True,
        text=True,
        check=True,
    )
    return json.loads(out.stdout.strip().splitlines()[-1])  # type: ignore[no-any-return]


def main() -> None:
    from fleet.repository import FleetRepository
    from fleet.serve import make_server, serve_in_thread
    from model_packs.format import default_pack_path, read_manifest

    pack = default_pack_path()
    manifest = read_manifest(pack)
    work = Path(tempfile.mkdtemp(prefix="bench-update-"))
    atexit.register(shutil.rmtree, work, True)  # nothing left behind in /tmp
    repo = FleetRepository(work / "repo", work / "keys")
    repo.init()
    published = repo.publish(pack)
    server = make_server(repo.dir, port=0)
    serve_in_thread(server)
    url = f"http://127.0.0.1:{server.server_address[1]}"
    target = f"{manifest.name}@{manifest.version}"
    root = repo.meta_dir / "1.root.json"
    staged = _child(work / "device1", url, root, "health", target)
    full = _child(work / "device2", url, root, "none", target)
    server.shutdown()
    m = full["marks"]
    print(
        json.dumps(
            {
                "bench": "update",
                "pack_mb": round(published.length / 1e6, 1),
                "download_s": round(m.get("verifying", 0.0), 3),
                "verify_and_unpack_s": round(m.get("staged", 0.0) - m.get("verifying", 0.0), 3),
                "health_gate_and_switch_s": round(m.get("activated", 0.0) - m.get("staged", 0.0), 3),
                "total_s": round(full["total_s"], 3),
                "transfer_rss_growth_mb": round(staged["peak_rss_mb"] - staged["base_rss_mb"], 1),
                "transfer_peak_rss_mb": round(staged["peak_rss_mb"], 1),
                "full_update_peak_rss_mb": round(full["peak_rss_mb"], 1),
                "bench_process_rss_mb": round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024, 1),
                "at": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
            }
        )
    )


if __name__ == "__main__":
    main()
