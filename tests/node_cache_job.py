"""A job process for node cache tests: a WorkerSession opening /cvmfs files like a traced job.

``python -m tests.node_cache_job JSON`` with ``{"argv": [hep-exec options], "fqrn": …,
"paths": [...], "hold_after": n | null}``. Prints ``ready`` after the session is up and waits
for a line on stdin; with ``hold_after`` prints ``holding`` after that many opens and waits for
another line. Keeps every object pinned, re-reads them all at the end, prints one JSON line,
and holds on until stdin gives one more line or closes.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import sys

from worker.cache_client import SharedObject
from worker.config import parse_exec_args
from worker.namespace import Node
from worker.ramcache import CachedObject
from worker.session import WorkerSession


def main() -> int:
    job = json.loads(sys.argv[1])
    logging.basicConfig(level=logging.WARNING, format="job %(levelname)s %(message)s")
    session = WorkerSession(parse_exec_args([*job["argv"], "--", "true"], {}))
    server_pid = session.shared.server_pid if session.shared else None
    print(json.dumps({"ready": os.getpid(), "server_pid": server_pid}), flush=True)
    sys.stdin.readline()
    held: dict[str, CachedObject] = {}
    out: dict[str, dict[str, object]] = {}
    for i, path in enumerate(job["paths"]):
        if i == job.get("hold_after"):
            print(json.dumps({"holding": i}), flush=True)
            sys.stdin.readline()
        node = session.namespace.resolve(f"/cvmfs/{job['fqrn']}{path}".encode())
        assert isinstance(node, Node), (path, node)
        obj = session.open_file(node)
        if isinstance(obj, int):
            out[path] = {"errno": obj}
            continue
        with open(obj.path, "rb") as f:  # what a tracee does with the rewritten path
            data = f.read()
        held[path] = obj
        out[path] = {
            "sha256": hashlib.sha256(data).hexdigest(),
            "ino": os.fstat(obj.fd).st_ino,
            "shared": isinstance(obj, SharedObject),
        }
    for path, obj in held.items():  # still readable at the end, whatever happened meanwhile
        data = os.pread(obj.fd, obj.size + 1, 0)
        out[path]["again"] = hashlib.sha256(data).hexdigest() == out[path]["sha256"]
    fallbacks = session.shared.fallbacks if session.shared else None
    print(json.dumps({"files": out, "fallbacks": fallbacks, "stats": session.stats_lines()}))
    sys.stdout.flush()
    sys.stdin.readline()  # keep holding until told (or stdin closes)
    for obj in held.values():
        session.release(obj)
    session.close()
    return 0


if __name__ == "__main__":
    sys.exit(main())
