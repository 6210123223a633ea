"""A job for node cache tests, run *under hep-exec*: reads /cvmfs files like any program would.

``hep-exec … -- python3 tests/support/node_cache_job.py JSON`` with ``{"root": "/cvmfs/<fqrn>",
"paths": [...], "hold_after": n | null}`` (stdlib only: it runs as the traced command).
Prints ``ready`` and waits for a line on stdin; with ``hold_after`` prints ``holding`` after
that many files and waits for another line. Keeps every file open, re-reads them all at the
end (pread on the open fds), prints one JSON line with each file's sha256 and fd number, and holds
its files open until stdin gives one more line or closes.
"""

from __future__ import annotations

import hashlib
import json
import os
import sys
from typing import BinaryIO


def main() -> int:
    job = json.loads(sys.argv[1])
    print(json.dumps({"ready": os.getpid()}), flush=True)
    sys.stdin.readline()
    held: dict[str, BinaryIO] = {}
    out: dict[str, dict[str, object]] = {}
    for i, path in enumerate(job["paths"]):
        if i == job.get("hold_after"):
            print(json.dumps({"holding": i}), flush=True)
            sys.stdin.readline()
        try:
            f = open(job["root"] + path, "rb")  # noqa: SIM115 - held open on purpose
        except OSError as e:
            out[path] = {"error": f"{type(e).__name__}: {e}"}
            continue
        data = f.read()
        held[path] = f
        # the fd's number, not its fstat: under hep-exec fstat shows the /cvmfs file, and the
        # test looks at the memfd behind it from outside (/proc/<pid>/fd/<n>)
        out[path] = {"sha256": hashlib.sha256(data).hexdigest(), "fd": f.fileno()}
    for path, g in held.items():  # still readable at the end, whatever happened meanwhile
        size = os.fstat(g.fileno()).st_size
        again = hashlib.sha256(os.pread(g.fileno(), size + 1, 0)).hexdigest()
        out[path]["again"] = again == out[path]["sha256"]
    print(json.dumps({"files": out}), flush=True)
    sys.stdin.readline()  # keep holding until told (or stdin closes)
    for g in held.values():
        g.close()
    return 0


if __name__ == "__main__":
    sys.exit(main())
