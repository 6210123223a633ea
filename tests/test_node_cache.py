"""The node's shared RAM cache service, access lists and prefetch: real processes and sockets.

Jobs are real processes running a WorkerSession (tests/node_cache_job.py), the store is
served by a real HTTP server on 127.0.0.1 that counts requests, the service is the real
daemon (started on demand by the first job, double-forked, or explicitly).
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import random
import secrets
import signal
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from tests.repos import PROJECT, publish_tree
from tests.store_server import StoreServer
from worker.access_list import parse_access_list
from worker.cache_client import CacheClient
from worker.cache_service import SOCKET_NAME, CacheDirError, ensure_private_dir
from worker.config import parse_exec_args
from worker.namespace import Node
from worker.session import WorkerSession

FQRN = "nodecache.example.org"
TREE_MB = int(os.environ.get("HEP_TEST_NODECACHE_MB", "32"))
ENV = {**os.environ, "PYTHONPATH": str(PROJECT)}


@pytest.fixture(scope="module")
def tree(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, dict[str, str]]:
    """A published tree: many 512 KiB files, small ones, one chunked file; path -> sha256."""
    base = tmp_path_factory.mktemp("nodecache")
    src = base / "src"
    rng = random.Random(11)
    files: dict[str, bytes] = {}
    big = max(1, (TREE_MB - 10) * 2)  # 512 KiB each, the rest: chunked file + small ones
    for i in range(big):
        files[f"/data/d{i % 8}/blob{i}.bin"] = rng.randbytes(512 * 1024)
    for i in range(100):
        files[f"/lib/pkg{i % 5}/mod{i}.py"] = f"x = {i}\n".encode() * rng.randint(1, 200)
    files["/big/chunked.bin"] = rng.randbytes(9 * 1024 * 1024 + 77)
    for rel, data in files.items():
        p = src / rel.lstrip("/")
        p.parent.mkdir(parents=True, exist_ok=True)
        p.write_bytes(data)
    publish_tree(src, base / "store", FQRN, base / "keys")
    os.chmod(base, 0o755)  # a second user reads nothing here, but the service user may
    return base / "store", {k: hashlib.sha256(v).hexdigest() for k, v in files.items()}


@pytest.fixture
def server(tree: tuple[Path, dict[str, str]]) -> Iterator[StoreServer]:
    s = StoreServer(tree[0])
    yield s
    s.stop()


@pytest.fixture
def cache_dir() -> Iterator[Path]:
    """A private runtime directory; any service started in it is killed at the end."""
    d = Path(tempfile.mkdtemp(prefix="hepnc-", dir="/dev/shm"))
    yield d
    kill_service(d)
    subprocess.run(["rm", "-rf", str(d)], check=False)


def service_pid(d: Path) -> int | None:
    with contextlib.suppress(OSError):
        client = CacheClient.attach(d)
        client.close()
        return client.server_pid
    return None


def kill_service(d: Path) -> None:
    pid = service_pid(d)
    if pid is not None:
        with contextlib.suppress(ProcessLookupError):
            os.kill(pid, signal.SIGKILL)


def data_objects(store: Path) -> list[str]:
    """URL paths of every file object (data/XX/… without suffix, or P chunks)."""
    out = []
    for p in (store / FQRN / "data").rglob("*"):
        if p.is_file() and (p.name[-1] != "C" and p.name[-1] != "X"):
            out.append(f"/cvmfs/{FQRN}/" + str(p.relative_to(store / FQRN)))
    return out


class Job:
    def __init__(
        self, argv: list[str], paths: list[str], hold_after: int | None = None, **kw: Any
    ) -> None:
        spec = {"argv": argv, "fqrn": FQRN, "paths": paths, "hold_after": hold_after}
        self.proc = subprocess.Popen(
            [sys.executable, "-m", "tests.node_cache_job", json.dumps(spec)],
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
            env=ENV,
            cwd=PROJECT,
            **kw,
        )
        self.hello: dict[str, Any] = {}

    def expect(self, key: str) -> dict[str, Any]:
        assert self.proc.stdout is not None
        line = self.proc.stdout.readline()
        if not line:
            raise AssertionError(f"job died: {self.proc.communicate(timeout=30)[1]}")
        msg: dict[str, Any] = json.loads(line)
        assert key in msg, msg
        return msg

    def go(self) -> None:
        assert self.proc.stdin is not None
        self.proc.stdin.write("go\n")
        self.proc.stdin.flush()

    def result(self) -> tuple[dict[str, Any], str]:
        out, err = self.proc.communicate(timeout=120)
        assert self.proc.returncode == 0, err
        return json.loads(out.splitlines()[-1]), err


def job_argv(server: StoreServer, cache_dir: Path, *extra: str) -> list[str]:
    return ["--proxy", server.url, "--cache-dir", str(cache_dir), "--ram", "1G", *extra]


def memfd_census(pids: list[int]) -> tuple[int, int]:
    """(memfd fds open in these processes, bytes of the distinct memfds behind them)."""
    seen: dict[tuple[int, int], int] = {}
    count = 0
    for pid in pids:
        for fd in os.listdir(f"/proc/{pid}/fd"):
            with contextlib.suppress(OSError):
                if os.readlink(f"/proc/{pid}/fd/{fd}").startswith("/memfd:"):
                    st = os.stat(f"/proc/{pid}/fd/{fd}")
                    seen[(st.st_dev, st.st_ino)] = st.st_size
                    count += 1
    return count, sum(seen.values())


def shmem_bytes() -> int:
    for line in Path("/proc/meminfo").read_text().splitlines():
        if line.startswith("Shmem:"):
            return int(line.split()[1]) * 1024
    return 0


# ---------------------------------------------------------------------------- tests


def test_sixteen_jobs_one_fetch_per_object(tree, server, cache_dir) -> None:
    """16 concurrent jobs, same files at the same moment: each object fetched once, held once."""
    store, digests = tree
    paths = sorted(digests)
    tree_bytes = sum((store.parent / "src" / p.lstrip("/")).stat().st_size for p in paths)
    shm0 = shmem_bytes()
    jobs = [Job(job_argv(server, cache_dir), paths) for _ in range(16)]
    hellos = [j.expect("ready") for j in jobs]
    servers = {h["server_pid"] for h in hellos}
    assert len(servers) == 1 and None not in servers, "all 16 jobs share one service"
    for j in jobs:
        j.go()
    outs = []
    for j in jobs:
        assert j.proc.stdout is not None
        line = j.proc.stdout.readline()  # the result line: the job still holds its objects
        outs.append(json.loads(line))
    pids = [j.proc.pid for j in jobs] + [next(iter(servers))]
    census = memfd_census(pids)
    shm_delta = shmem_bytes() - shm0
    for j in jobs:
        _, err = j.proc.communicate(timeout=60)
        assert j.proc.returncode == 0, err
    for out in outs:
        for p in paths:
            f = out["files"][p]
            assert f["sha256"] == digests[p] and f["again"] and f["shared"], p
    # one service-side object per file, every job's fd pointing at the same memfd
    for p in paths:
        assert len({out["files"][p]["ino"] for out in outs}) == 1, p
    fds, held = census
    assert fds >= 16 * len(paths)
    assert tree_bytes <= held <= tree_bytes * 1.01, (held, tree_bytes)
    print(f"memfds: {fds} fds over {held} bytes (tree {tree_bytes}); Shmem +{shm_delta}")
    assert shm_delta < 4 * tree_bytes  # 16 private caches would be 16x
    # the proxy saw each file object exactly once
    objects = data_objects(store)
    assert objects and all(server.requests[o] == 1 for o in objects), {
        o: server.requests[o] for o in objects if server.requests[o] != 1
    }
