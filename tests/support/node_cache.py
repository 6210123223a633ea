"""The node cache tests' parts: a published tree, real hep-exec jobs, the service's state.

Shared by tests/worker/node_cache/ (jobs sharing a node's cache; the service itself).  The jobs
run ``python3 -m worker.cli … -- python3 tests/support/node_cache_job.py``, reading /cvmfs files
through the tracer; ``HEP_TEST_NODECACHE_MB`` sets the tree size (64; the issue's figure is 500).
"""

from __future__ import annotations

import contextlib
import json
import os
import re
import signal
import stat
import subprocess
import sys
from collections import Counter
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any, ClassVar

from tests.support.proxy_process import ProxyProcess
from tests.support.repos import PROJECT, Repo
from tests.support.store_server import StoreServer
from tests.support.waiting import wait_until
from worker.node.cache_client import CacheClient
from worker.node.rendezvous import (
    SOCKET_NAME,
)

FQRN = "nodecache.example.org"
TREE_MB = int(os.environ.get("HEP_TEST_NODECACHE_MB", "64"))
RAM = f"{max(1024, 3 * TREE_MB)}M"
ENV = {**os.environ, "PYTHONPATH": str(PROJECT)}
JOB = str(PROJECT / "tests" / "support" / "node_cache_job.py")
HEP_EXEC = [sys.executable, "-m", "worker.cli"]


BLOB = 512 * 1024  # the size of each /data/dN/blobM.bin


@dataclass(frozen=True)
class Tree:
    """The published repository and its files: path in the repository -> sha256."""

    repo: Repo
    digests: dict[str, str]

    @property
    def store(self) -> Path:
        return self.repo.store


def service_pid(d: Path) -> int | None:
    with contextlib.suppress(OSError):
        client = CacheClient.attach(d)
        client.close()
        return client.server_pid
    return None


def service_stats(d: Path) -> dict[str, Any]:
    client = CacheClient.attach(d).start()
    try:
        stats = client.stats()
        assert stats is not None
        return stats
    finally:
        client.close()


def kill_service(d: Path) -> None:
    pid = service_pid(d)
    if pid is not None:
        with contextlib.suppress(ProcessLookupError):
            os.kill(pid, signal.SIGKILL)


def file_objects(repo: Repo) -> list[str]:
    """Every file object of a repository (whole files, and chunks with suffix P; not catalogs
    or the certificate), as ``data/XX/NAME``."""
    return [o for o in repo.objects() if not o.endswith(("C", "X"))]


@contextlib.contextmanager
def running_service(
    argv: list[str],
    directory: Path,
    env: dict[str, str] = ENV,
    command: tuple[str, ...] = (sys.executable, "-m", "worker.node.cache_service"),
) -> Iterator[subprocess.Popen[str]]:
    """The cache service as our child, in the foreground, answering in ``directory``;
    stopped (SIGTERM) at the end if it has not exited by itself."""
    daemon = subprocess.Popen(
        [*command, *argv],
        env=env,
        cwd=PROJECT,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    try:
        wait_until(
            lambda: daemon.poll() is not None or service_pid(directory) == daemon.pid,
            30,
            what=f"the service to answer at {directory / SOCKET_NAME}",
        )
        assert daemon.poll() is None, daemon.communicate()
        yield daemon
    finally:
        if daemon.poll() is None:
            daemon.terminate()
        try:
            daemon.communicate(timeout=10)
        except subprocess.TimeoutExpired:
            daemon.kill()
            daemon.communicate()


def requests_in(access_log: Path) -> Counter[str]:
    """GET requests per URL path in a Combined Log Format access log."""
    counts: Counter[str] = Counter()
    for m in re.finditer(r'"GET (\S+) HTTP/[0-9.]+" (\d+)', access_log.read_text()):
        counts[m.group(1)] += 1
    return counts


class Job:
    """One real hep-exec job running tests/support/node_cache_job.py as its traced command.

    Every job started is killed at the end of its test if it is still running (``reap_jobs``).
    """

    started: ClassVar[list[Job]] = []

    def __init__(self, argv: list[str], paths: list[str], hold_after: int | None = None) -> None:
        spec = {"root": f"/cvmfs/{FQRN}", "paths": paths, "hold_after": hold_after}
        self.proc = subprocess.Popen(
            [*HEP_EXEC, *argv, "--stats-internals", "--", sys.executable, JOB, json.dumps(spec)],
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
            env=ENV,
            cwd=PROJECT,
        )
        Job.started.append(self)
        self.tracee = 0

    def expect(self, key: str) -> dict[str, Any]:
        assert self.proc.stdout is not None
        line = self.proc.stdout.readline()
        if not line:
            raise AssertionError(f"job died: {self.proc.communicate(timeout=30)[1]}")
        msg: dict[str, Any] = json.loads(line)
        assert key in msg, msg
        if key == "ready":
            self.tracee = int(msg["ready"])
        return msg

    def go(self) -> None:
        assert self.proc.stdin is not None
        self.proc.stdin.write("go\n")
        self.proc.stdin.flush()

    def finish(self) -> str:
        """Let the job end; its stderr (hep-exec's log and --stats lines)."""
        _, err = self.proc.communicate(timeout=120)
        assert self.proc.returncode == 0, err
        return err


def job_argv(proxy: ProxyProcess | StoreServer, cache_dir: Path, *extra: str) -> list[str]:
    url = proxy.url("") if isinstance(proxy, ProxyProcess) else proxy.url
    return ["--server", url, "--cache-dir", str(cache_dir), "--ram", RAM, *extra]


# a file on a cache's private tmpfs, as /proc/<pid>/fd links name it: /<key>.<pid>.<n>, or
# /<key> once a node's service has named it by its key
_TMPFS_OBJECT = re.compile(r"/[^/ ]+( \(deleted\))?")


def is_ram_file(fd_path: str) -> bool:
    """Is this /proc/<pid>/fd/<n> one of a cache's RAM files (a memfd, or a file of its
    private tmpfs)?  Raises OSError if the fd went away."""
    link = os.readlink(fd_path)
    if link.startswith("/memfd:hep-exec-fastopen"):
        return False  # the in-process open table (worker/trace/_fastopen.c), not a cached object
    if link.startswith("/memfd:"):
        return True
    return bool(_TMPFS_OBJECT.fullmatch(link)) and stat.S_ISREG(os.stat(fd_path).st_mode)


def ram_files(pids: list[int]) -> dict[tuple[int, int], tuple[int, int]]:
    """Distinct RAM files open in these processes: (dev, inode) -> (size, bytes of memory
    allocated to it, from st_blocks)."""
    seen: dict[tuple[int, int], tuple[int, int]] = {}
    for pid in pids:
        with contextlib.suppress(OSError):
            for fd in os.listdir(f"/proc/{pid}/fd"):
                with contextlib.suppress(OSError):
                    if is_ram_file(f"/proc/{pid}/fd/{fd}"):
                        st = os.stat(f"/proc/{pid}/fd/{fd}")
                        seen[(st.st_dev, st.st_ino)] = (st.st_size, st.st_blocks * 512)
    return seen


def read_all(job: Job, tree: Tree) -> str:
    """Let a job read its files at once; check their bytes; its stderr once it has ended."""
    job.expect("ready")
    job.go()
    out = job.expect("files")["files"]
    assert all(f.get("sha256") == tree.digests[p] for p, f in out.items()), out
    return job.finish()


def answered_ahead(stderr: str) -> int:
    """``--stats``: opens offered before they were asked (objects the node held)."""
    m = re.search(r"opens answered ahead (\d+)", stderr)
    assert m, stderr
    return int(m.group(1))


def shared_line(stderr: str) -> str:
    lines = [ln for ln in stderr.splitlines() if "shared cache:" in ln]
    assert len(lines) == 1, stderr
    return lines[0]


def upcalls(stderr: str) -> int:
    """``--stats``: calls the C side handed to Python."""
    m = re.search(r"Python upcalls (\d+)", stderr)
    assert m, stderr
    return int(m.group(1))


def put_from_node(stderr: str) -> int:
    """``--stats``: answers put from what the node's earlier jobs learnt."""
    m = re.search(r"answers ahead from the node: (\d+) put", stderr)
    assert m, stderr
    return int(m.group(1))
