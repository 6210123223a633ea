"""The node's shared RAM cache service, access lists and prefetch: real processes and sockets.

The Must-show tests run real ``hep-exec`` jobs (``python3 -m worker.cli … -- python3
tests/support/node_cache_job.py``, reading /cvmfs files through the tracer) against a real
hep-proxy on 127.0.0.1 whose access log counts the requests; the service is the real daemon,
started on demand by the first job (a fork of it) or explicitly. Session-level tests (record,
prefetch, preload) use a WorkerSession in this process and a StoreServer (which counts requests).
``HEP_TEST_NODECACHE_MB`` sets the tree size of the 16-job test (64; the issue's figure is 500).
"""

from __future__ import annotations

import contextlib
import errno
import functools
import hashlib
import json
import os
import pwd
import random
import re
import secrets
import shutil
import signal
import stat
import subprocess
import sys
import tempfile
from collections import Counter
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any, ClassVar

import pytest

from tests.support.network import dead_url
from tests.support.proxy_process import ProxyProcess, start_proxy
from tests.support.repos import PROJECT, Repo, publish_tree
from tests.support.store_server import StoreServer
from tests.support.tracing import ensure_built
from tests.support.waiting import wait_until
from worker.access_list import parse_access_list
from worker.cache_client import CacheClient
from worker.cache_service import (
    SOCKET_NAME,
    CacheDirError,
    default_runtime_dir,
    ensure_private_dir,
)
from worker.config import ConfigError, parse_exec_args
from worker.namespace import Node
from worker.session import WorkerSession

# every test here runs many real processes: left out of the fast subset (-m 'not slow')
pytestmark = pytest.mark.slow

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


@pytest.fixture(scope="module")
def tree(tmp_path_factory: pytest.TempPathFactory) -> Tree:
    """A published tree: many 512 KiB files, small ones, one chunked file."""
    base = tmp_path_factory.mktemp("nodecache")
    src = base / "src"
    rng = random.Random(11)
    files: dict[str, bytes] = {}
    big = max(1, (TREE_MB - 10) * 2)  # 512 KiB each, the rest: chunked file + small ones
    for i in range(big):
        files[f"/data/d{i % 8}/blob{i}.bin"] = rng.randbytes(BLOB)
    for i in range(100):
        files[f"/lib/pkg{i % 5}/mod{i}.py"] = f"x = {i}\n".encode() * rng.randint(1, 200)
    files["/big/chunked.bin"] = rng.randbytes(9 * 1024 * 1024 + 77)
    for rel, data in files.items():
        p = src / rel.lstrip("/")
        p.parent.mkdir(parents=True, exist_ok=True)
        p.write_bytes(data)
    repo, _ = publish_tree(src, base / "store", FQRN, base / "keys")
    os.chmod(base, 0o755)  # a second user reads nothing here, but the service user may
    return Tree(repo, {k: hashlib.sha256(v).hexdigest() for k, v in files.items()})


@pytest.fixture(scope="module")
def tracing() -> None:
    """Skip where ptrace/seccomp are forbidden; first, before this process has children (the
    tracer's self-check waits for any child)."""
    ensure_built()


@pytest.fixture
def server(tree: Tree) -> Iterator[StoreServer]:
    s = StoreServer(tree.store)
    yield s
    s.stop()


@pytest.fixture
def proxy(tree: Tree, tmp_path: Path) -> Iterator[ProxyProcess]:
    """hep-proxy serving the tree on 127.0.0.1, with an access log."""
    p = start_proxy(tmp_path / "proxy", "--store", str(tree.store))
    yield p
    p.stop()


@pytest.fixture
def cache_dir() -> Iterator[Path]:
    """A private runtime directory; any service started in it is killed at the end."""
    d = Path(tempfile.mkdtemp(prefix="hepnc-", dir="/dev/shm"))
    yield d
    kill_service(d)
    subprocess.run(["rm", "-rf", str(d)], check=False)


@pytest.fixture(autouse=True)
def reap_jobs() -> Iterator[None]:
    """Kill the hep-exec jobs a test left running (a failed test), and reap them all."""
    yield
    while Job.started:
        job = Job.started.pop()
        if job.proc.poll() is None:
            job.proc.kill()  # its traced command dies with it (PTRACE_O_EXITKILL)
        job.proc.communicate()


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
    command: tuple[str, ...] = (sys.executable, "-m", "worker.cache_service"),
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


# ---------------------------------------------------------------------------- tests


@pytest.mark.slow
def test_sixteen_hep_exec_jobs_one_fetch_per_object(tracing, tree, proxy, cache_dir) -> None:
    """16 concurrent hep-exec jobs, same files at the same moment: fetched once, held once."""
    digests = tree.digests
    paths = sorted(digests)
    tree_bytes = sum((tree.store.parent / "src" / p.lstrip("/")).stat().st_size for p in paths)
    jobs = [Job(job_argv(proxy, cache_dir), paths) for _ in range(16)]
    for j in jobs:
        j.expect("ready")
    svc = service_stats(cache_dir)
    assert svc["clients"] == 16 + 1, "all 16 jobs (and this probe) share one service"
    for j in jobs:
        j.go()
    outs = [j.expect("files")["files"] for j in jobs]  # every job still holds its files
    for j, out in zip(jobs, outs, strict=True):  # the kernel's file behind each job's fd
        for f in out.values():
            st = os.stat(f"/proc/{j.tracee}/fd/{f['fd']}")
            f["ino"] = [st.st_dev, st.st_ino]
    service = int(svc["pid"])
    in_service = ram_files([service])
    everywhere = ram_files([service] + [j.proc.pid for j in jobs] + [j.tracee for j in jobs])
    errs = [j.finish() for j in jobs]
    for out in outs:
        for p in paths:
            f = out[p]
            assert f.get("sha256") == digests[p] and f["again"], (p, f)
    # every job's fd of a file is the service's RAM file: one copy per node
    for p in paths:
        assert len({tuple(out[p]["ino"]) for out in outs}) == 1, p
    assert {tuple(out[p]["ino"]) for out in outs for p in paths} <= set(in_service)
    held = sum(size for size, _ in in_service.values())
    total = sum(size for size, _ in everywhere.values())
    memory = sum(allocated for _, allocated in everywhere.values())
    print(
        f"\n16 jobs x {tree_bytes / 2**20:.1f} MiB: service holds {len(in_service)} files, "
        f"{held / 2**20:.1f} MiB; all RAM files of service, hep-exec and tracees "
        f"{total / 2**20:.1f} MiB in {len(everywhere)} files, {memory / 2**20:.1f} MiB of RAM"
    )
    assert tree_bytes <= held <= tree_bytes * 1.01, (held, tree_bytes)
    assert total <= tree_bytes * 1.02, (total, tree_bytes)  # 16 private caches: 16x
    # the memory behind those files (pages, rounded up per file), not 16 copies of it
    assert memory <= tree_bytes * 1.02 + len(everywhere) * 4096, (memory, tree_bytes)
    for err in errs:
        assert "0 private fallbacks" in shared_line(err) and "Traceback" not in err
        assert re.search(r"fallbacks, (tmpfs files opened by name|memfds)", shared_line(err))
    # the proxy saw each file object exactly once
    assert proxy.stop() == 0
    counts = requests_in(proxy.access_log)
    objects = [f"/cvmfs/{FQRN}/{o}" for o in file_objects(tree.repo)]
    assert objects and all(counts[o] == 1 for o in objects), {
        o: counts[o] for o in objects if counts[o] != 1
    }


@pytest.mark.slow
def test_sigkill_service_hep_exec_jobs_finish(tracing, tree, proxy, cache_dir) -> None:
    """4 hep-exec jobs started together (one starts the service); kill -9 it mid-run."""
    digests = tree.digests
    paths = sorted(digests)
    half = len(paths) // 2
    jobs = [Job(job_argv(proxy, cache_dir), paths, hold_after=half) for _ in range(4)]
    for j in jobs:
        j.expect("ready")
    svc = service_stats(cache_dir)
    assert svc["clients"] == 4 + 1, "racing starters made one service"
    for j in jobs:
        j.go()
    for j in jobs:
        j.expect("holding")
    os.kill(int(svc["pid"]), signal.SIGKILL)
    for j in jobs:
        j.go()
    for j in jobs:
        out = j.expect("files")["files"]
        for p in paths:
            f = out[p]
            assert f.get("sha256") == digests[p] and f["again"], (p, f)
        err = j.finish()
        # before the kill from the service (or named by it ahead of the open: no round
        # trip), then privately: one log line, no traceback
        m = re.search(r"(\d+) objects received, .* (\d+) private fallbacks", shared_line(err))
        assert m, shared_line(err)
        received, fallbacks = int(m.group(1)), int(m.group(2))
        assert 0 < received <= half and len(paths) - half <= fallbacks, shared_line(err)
        assert received + fallbacks <= len(paths) + 1, shared_line(err)  # +1: one in flight
        assert err.count("new opens use a private RAM cache") == 1, err
        assert "Traceback" not in err


def test_record_then_prefetch_hep_exec(tracing, tree, proxy, cache_dir, tmp_path: Path) -> None:
    """hep-exec --record, then a cold hep-exec --prefetch: objects arrive pushed, before use."""
    digests = tree.digests
    paths = [*[p for p in sorted(digests) if "/lib/" in p][::-1], "/big/chunked.bin"]
    record = tmp_path / "job.list"
    first = Job(job_argv(proxy, cache_dir, "--no-shared-cache", "--record", str(record)), paths)
    first.expect("ready")
    first.go()
    first.expect("files")
    first.finish()
    entries = parse_access_list(record.read_text())
    assert [e.path for e in entries] == paths
    job = Job(job_argv(proxy, cache_dir, "--prefetch", str(record)), paths)
    job.expect("ready")
    wait_until(  # the prefetch has pushed everything before the job opens anything
        lambda: service_stats(cache_dir).get("pushed", 0) >= len(paths),
        30,
        what=f"{len(paths)} objects pushed to the job",
    )
    job.go()
    out = job.expect("files")["files"]
    assert all(out[p].get("sha256") == digests[p] for p in paths)
    err = job.finish()
    line = shared_line(err)
    # every open was answered from what the service had pushed (its fds, or the same objects
    # by their keys, offered ahead of the open): no round trip, no fetch
    assert "0 objects received" in line and f"{len(paths)} pushed by prefetch" in line, line
    hits = re.search(r"(\d+) local hits", line)
    assert hits and int(hits.group(1)) + answered_ahead(err) >= len(paths), err


def test_a_new_job_on_a_warm_node_asks_nothing_for_what_the_node_holds(
    tracing, tree, proxy, cache_dir
) -> None:
    """The objects the node's service holds are named to a new job ahead of its opens, a
    directory at a time: a second job reads the same files with no round trip to the service
    and no fetch, and the right bytes; neither job fetches anything itself."""
    paths = sorted(p for p in tree.digests if "/lib/pkg1/" in p or "/data/d3/" in p)
    for expect_received in (True, False):
        err = read_all(Job(job_argv(proxy, cache_dir), paths), tree)
        m = re.search(r"(\d+) objects received", shared_line(err))
        assert m, err
        received, ahead = int(m.group(1)), answered_ahead(err)
        # the job has no HTTP client of its own: the service fetched the catalog for it too
        assert "fetch: 0 requests" in err, err
        assert "2 repository files handed over" in shared_line(err), err  # manifest, catalog
        if expect_received:  # a cold node: everything came through the service
            assert (received, ahead) == (len(paths), 0), err
        else:
            assert (received, ahead) == (0, len(paths)), err
    # each object fetched once; and per job the manifest, the catalog once (kept)
    assert service_stats(cache_dir)["requests"] == len(paths) + 2 + 1


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


def test_a_new_job_on_a_warm_node_answers_paths_without_python(
    tracing, tree, proxy, cache_dir
) -> None:
    """What a node's jobs learnt about a revision (every entry's stat, the names a directory
    does not have, the opens of objects the node holds) is handed to the next job when it
    mounts that revision: its stats and opens of those paths need no upcall into Python and
    no round trip to the service, only the mount itself does."""
    paths = sorted(p for p in tree.digests if "/lib/" in p)
    missing = {"/lib/pkg1/nothing.py": "FileNotFoundError", "/lib/pkg3/mod3.py/x": "NotADirectory"}

    def run() -> str:
        job = Job(job_argv(proxy, cache_dir), paths + list(missing))
        job.expect("ready")
        job.go()
        out = job.expect("files")["files"]
        assert all(out[p].get("sha256") == tree.digests[p] for p in paths), out
        assert all(out[p]["error"].startswith(e) for p, e in missing.items()), out
        return job.finish()

    first = run()
    assert put_from_node(first) == 0
    before = service_stats(cache_dir)
    second = run()
    after = service_stats(cache_dir)
    assert put_from_node(second) >= 2 * len(paths), second
    assert "0 objects received" in shared_line(second) and answered_ahead(second) == len(paths)
    assert after["opens"] == before["opens"], (before, after)  # no object asked for
    assert after["answers_given"] == before["answers_given"] + 1
    # the mount (the first touch of /cvmfs/<fqrn>) and the job's own directories: the test
    # program, its interpreter and libraries are host paths, never asked of Python
    assert upcalls(second) <= 3 and upcalls(first) > len(paths) // 5, (first, second)


def test_a_service_of_other_servers_is_never_used(tracing, tree, server, cache_dir) -> None:
    """A service started with other servers (here: one that is down) at the directory a job
    names is not that job's: it says so in one line and keeps a private cache, fetching only
    through its own server, never the service's."""
    paths = sorted(p for p in tree.digests if "/lib/pkg2/" in p)
    dead = dead_url()
    with running_service(
        ["--server", dead, "--cache-dir", str(cache_dir), "--ram", RAM], cache_dir
    ):
        err = read_all(Job(job_argv(server, cache_dir), paths), tree)
        said = [ln for ln in err.splitlines() if "shared RAM cache service" in ln]
        assert len(said) == 1 and "fetches with other settings" in said[0], err
        assert dead in said[0] and server.url in said[0] and "private RAM cache" in said[0]
        assert "shared cache:" not in err and "Traceback" not in err, err
        m = re.search(r"fetch: (\d+) requests, .* (\d+) failures", err)
        assert m and int(m.group(1)) == len(paths) + 2 and m.group(2) == "0", err


def test_jobs_with_other_servers_get_a_service_of_their_own(tracing, tree, tmp_path: Path) -> None:
    """Issue 18's surprise: two jobs of one user on one node, each with its own server list,
    share no service: each fetches only through its own servers (the default runtime
    directory; the second service lives beside the first)."""
    runtime = Path(tempfile.mkdtemp(prefix="hx-"))  # a socket path has at most 107 bytes
    env = {k: v for k, v in ENV.items() if not k.startswith("HEP_EXEC_")}
    env["XDG_RUNTIME_DIR"] = str(runtime)
    paths = sorted(p for p in tree.digests if "/lib/pkg1/" in p)
    first, second = StoreServer(tree.store), StoreServer(tree.store)
    try:
        outs = []
        for s in (first, second):
            argv = [
                *HEP_EXEC,
                "--server",
                s.url,
                "--ram",
                RAM,
                "--stats-internals",
                "--",
                "sha256sum",
            ]
            r = subprocess.run(
                [*argv, *(f"/cvmfs/{FQRN}{p}" for p in paths)],
                env=env,
                cwd=PROJECT,
                capture_output=True,
                text=True,
                timeout=120,
            )
            assert r.returncode == 0, r.stderr
            assert [ln.split()[0] for ln in r.stdout.splitlines()] == [
                tree.digests[p] for p in paths
            ]
            outs.append(shared_line(r.stderr))
        assert f"at {runtime / 'hep-exec'}:" in outs[0], outs
        assert f"at {runtime / 'hep-exec'}/s-" in outs[1], outs
        # ps shows the services by their own name, not as the job that started them
        for d in (runtime / "hep-exec", *runtime.glob("hep-exec/s-*")):
            pid = service_pid(d)
            assert pid is not None
            cmdline = Path(f"/proc/{pid}/cmdline").read_bytes()
            assert cmdline.startswith(f"hep-exec-cache {d}".encode()) or (
                b"worker.cache_service" in cmdline
            ), cmdline
        # each server was asked for each object once: by its own job's service
        objects = [u for u in first.requests if "/data/" in u and not u.endswith("C")]
        assert len(objects) >= len(paths)
        for s in (first, second):
            assert all(s.requests[u] == 1 for u in objects), (s.url, s.requests)
    finally:
        first.stop()
        second.stop()
        for d in (runtime / "hep-exec", *runtime.glob("hep-exec/s-*")):
            if service_pid(d) is not None:
                kill_service(d)
        shutil.rmtree(runtime, ignore_errors=True)


def test_a_new_revision_reaches_new_jobs_and_never_a_running_one(
    tracing, tmp_path: Path, cache_dir: Path
) -> None:
    """A revision published while a job runs: the running job keeps the revision it mounted
    (its later opens and its answers ahead included), a new job on the same node gets the new
    one, though the node's service keeps catalogs and names objects by content."""
    src, store, keys = tmp_path / "src", tmp_path / "store", tmp_path / "keys"
    (src / "d").mkdir(parents=True)
    (src / "d" / "f").write_bytes(b"one\n")
    (src / "d" / "h").write_bytes(b"first\n")
    publish_tree(src, store, FQRN, keys)
    paths = ["/d/f", "/d/h", "/d/g"]
    server = StoreServer(store)
    try:
        # a finished job hands the node its answers for revision 1 (/d has f and h only)
        Job(job_argv(server, cache_dir), paths).proc.communicate("go\n", timeout=120)
        running = Job(job_argv(server, cache_dir), paths, hold_after=1)
        running.expect("ready")
        running.go()
        running.expect("holding")  # /d/f read: revision 1 mounted, /d answered ahead
        (src / "d" / "f").write_bytes(b"two, longer\n")
        (src / "d" / "h").write_bytes(b"second\n")
        (src / "d" / "g").write_bytes(b"new\n")
        publish_tree(src, store, FQRN, keys)
        new = Job(job_argv(server, cache_dir), paths)
        new.expect("ready")
        new.go()
        later = new.expect("files")["files"]
        assert put_from_node(new.finish()) == 0  # revision 1's answers are not revision 2's
        again = Job(job_argv(server, cache_dir), paths)  # revision 2's, from the node
        again.expect("ready")
        again.go()
        last = again.expect("files")["files"]
        assert put_from_node(again.finish()) > 0
        running.go()
        first = running.expect("files")["files"]
        assert put_from_node(running.finish()) > 0  # revision 1's, put when it mounted
    finally:
        server.stop()

    def digest(data: bytes) -> str:
        return hashlib.sha256(data).hexdigest()

    assert first["/d/f"]["sha256"] == digest(b"one\n")
    assert first["/d/h"]["sha256"] == digest(b"first\n")  # opened after the new revision
    assert "FileNotFoundError" in first["/d/g"]["error"]
    for got in (later, last):
        assert [got[p]["sha256"] for p in paths] == [
            digest(b"two, longer\n"),
            digest(b"second\n"),
            digest(b"new\n"),
        ]


def test_idle_exit_and_explicit_start(tree, server, cache_dir, tmp_path: Path) -> None:
    """``python -m worker.cache_service``: a second start leaves the live one alone; a
    connected client keeps it past ``--cache-idle``; it exits that long after the last one
    left, removing its socket."""
    argv = job_argv(server, cache_dir, "--cache-idle", "0.5")
    with running_service(argv, cache_dir) as daemon:
        client = CacheClient.attach(cache_dir)
        assert client.server_pid == daemon.pid
        # a second explicit start sees the live one and leaves it alone
        second = subprocess.run(
            [sys.executable, "-m", "worker.cache_service", *argv],
            env=ENV,
            cwd=PROJECT,
            capture_output=True,
            text=True,
            timeout=60,
        )
        assert second.returncode == 0 and "already running" in second.stdout
        # a twin started after it, with no client, exits once idle: by then ours would have too
        twin_dir = tmp_path / "twin"
        with running_service(job_argv(server, twin_dir, "--cache-idle", "0.5"), twin_dir) as twin:
            assert twin.wait(timeout=30) == 0
        assert daemon.poll() is None, "a connected client keeps the service alive"
        client.close()
        assert daemon.wait(timeout=10) == 0
        assert not (cache_dir / SOCKET_NAME).exists()


def test_private_dir_checks(tmp_path: Path) -> None:
    d = tmp_path / "rt"
    assert ensure_private_dir(d) == d and (d.stat().st_mode & 0o777) == 0o700
    os.chmod(d, 0o755)
    with pytest.raises(CacheDirError, match="mode 0755, must be 0700"):
        ensure_private_dir(d)
    link = tmp_path / "link"
    link.symlink_to(d)
    with pytest.raises(CacheDirError, match="not a directory"):
        ensure_private_dir(link)
    with pytest.raises(CacheDirError, match="owned by uid"):
        ensure_private_dir(d, uid=os.getuid() + 12345)


def prefetched_all(client: CacheClient, want: int) -> bool:
    """Has the service (as its stats say) prefetched ``want`` objects?"""
    stats = client.stats() or {}
    return int(stats.get("prefetched", 0)) >= want


def test_record_then_prefetch(tree, server, cache_dir, tmp_path: Path) -> None:
    """A recorded run's list, prefetched by the next run: everything there before it asks."""
    digests = tree.digests
    order = [*[p for p in sorted(digests) if "/lib/" in p][::-1], "/big/chunked.bin"]
    record = tmp_path / "access.list"
    cfg = parse_exec_args(job_argv(server, cache_dir, "--record", str(record), "--", "x"), {})
    with WorkerSession(cfg) as s:
        for p in order + order[:3]:  # repeats are recorded once, first use first
            node = s.namespace.resolve(f"/cvmfs/{FQRN}{p}".encode())
            assert isinstance(node, Node)
            obj = s.open_file(node)
            assert not isinstance(obj, int)
            s.release(obj)
    entries = parse_access_list(record.read_text())
    assert [e.path for e in entries] == order and {e.fqrn for e in entries} == {FQRN}
    assert entries[-1].key.startswith("chunked-") and entries[-1].size == 9 * 1024 * 1024 + 77
    for shared in (True, False):
        fresh = Path(tempfile.mkdtemp(prefix="hepnc-", dir="/dev/shm"))
        server.requests.clear()
        extra = ["--prefetch", str(record)] + ([] if shared else ["--no-shared-cache"])
        cfg = parse_exec_args(job_argv(server, fresh, *extra, "--", "x"), {})
        try:
            with WorkerSession(cfg) as s:
                assert s.prefetch is not None and s.prefetch.wait(30)
                if shared:
                    client = s.shared
                    assert client is not None
                    wait_until(
                        functools.partial(prefetched_all, client, len(order)),
                        30,
                        what=f"the service to prefetch {len(order)} objects",
                    )
                fetched = sum(server.requests.values())
                for p in order:
                    node = s.namespace.resolve(f"/cvmfs/{FQRN}{p}".encode())
                    assert isinstance(node, Node)
                    obj = s.open_file(node)
                    assert not isinstance(obj, int)
                    with open(obj.path, "rb") as f:
                        assert hashlib.sha256(f.read()).hexdigest() == digests[p]
                    s.release(obj)
                assert sum(server.requests.values()) == fetched, "all opens hit RAM"
                if not shared:
                    assert s.cache.stats.hits == len(order)
        finally:
            kill_service(fresh)
            subprocess.run(["rm", "-rf", str(fresh)], check=False)


def test_released_objects_stay_idle_up_to_a_budget(tree, server, cache_dir) -> None:
    """Released objects keep their fds (re-open: no round trip) up to a quarter of --ram; the
    least recently used beyond it go back to the service, which may then evict them."""
    digests = tree.digests
    blobs = [p for p in sorted(digests) if "/data/" in p][:8]  # 512 KiB each
    argv = ["--server", server.url, "--cache-dir", str(cache_dir), "--ram", "8M", "--", "x"]
    cfg = parse_exec_args(argv, {})
    with WorkerSession(cfg) as s:
        assert s.shared is not None and s.shared.idle_budget == 2 * 2**20
        objs = []
        for p in blobs:
            node = s.namespace.resolve(f"/cvmfs/{FQRN}{p}".encode())
            assert isinstance(node, Node)
            obj = s.open_file(node)
            assert not isinstance(obj, int)
            objs.append(obj)
        for obj in objs:
            s.release(obj)
        kept = [s.shared.holds(o.key) for o in objs]
        assert kept == [False] * 4 + [True] * 4, kept  # the 4 most recent fit in 2 MiB
        st = s.shared.stats()
        assert st is not None and st["pinned_bytes"] == 4 * BLOB, st
        node = s.namespace.resolve(f"/cvmfs/{FQRN}{blobs[-1]}".encode())
        assert isinstance(node, Node)
        hits = s.shared.local_hits
        again = s.open_file(node)
        assert not isinstance(again, int) and s.shared.local_hits == hits + 1
        with open(again.path, "rb") as f:
            assert hashlib.sha256(f.read()).hexdigest() == digests[blobs[-1]]
        s.release(again)


def test_bad_access_list_is_one_line(server, cache_dir, tmp_path: Path) -> None:
    bad = tmp_path / "bad.list"
    bad.write_text("# hep-exec access list v1\nrepo\t/a\tkey\n")
    cfg = parse_exec_args(job_argv(server, cache_dir, "--prefetch", str(bad), "--", "x"), {})
    with pytest.raises(ConfigError, match=r"bad.list:2: expected 4 tab-separated fields"):
        WorkerSession(cfg)


def open_all(argv: list[str], paths: list[str]) -> list[int | str]:
    """Open these files in one WorkerSession of this process, all at once (then close it):
    ``sha256`` of each, or the errno the open gave."""
    out: list[int | str] = []
    with WorkerSession(parse_exec_args([*argv, "--", "x"], {})) as s:
        assert s.shared is not None, "the session uses the service"
        held = []
        for p in paths:
            node = s.namespace.resolve(f"/cvmfs/{FQRN}{p}".encode())
            assert isinstance(node, Node)
            obj = s.open_file(node)
            if isinstance(obj, int):
                out.append(obj)
                continue
            held.append(obj)
            out.append(hashlib.sha256(Path(obj.path).read_bytes()).hexdigest())
        for obj in held:
            s.release(obj)
    return out


def test_a_killed_jobs_pins_are_dropped(tracing, tree, server, cache_dir) -> None:
    """Pins are counted per connection and dropped when a job dies (README): a hep-exec job
    SIGKILLed while it holds files leaves nothing pinned at the service, and the objects it
    held give way to others' under the RAM limit."""
    digests = tree.digests
    blobs = [p for p in sorted(digests) if "/data/" in p]
    held, others = blobs[:4], blobs[4:8]
    # the service's limit: 3 MiB, so the job's 2 MiB pinned leave room for two more blobs
    with running_service(["--server", server.url, "--cache-dir", str(cache_dir), "--ram", "3M"],
                         cache_dir) as daemon:  # fmt: skip
        # the job's own --ram is large: it keeps everything it handed out pinned
        job = Job(["--server", server.url, "--cache-dir", str(cache_dir), "--ram", "64M"], held)
        job.expect("ready")
        job.go()
        files = job.expect("files")["files"]
        assert all(files[p]["sha256"] == digests[p] for p in held)
        st = service_stats(cache_dir)
        assert st["pid"] == daemon.pid and st["pinned_bytes"] == 4 * BLOB, st
        # while the job lives, its pins hold: only two of four more blobs fit
        session = ["--server", server.url, "--cache-dir", str(cache_dir), "--ram", "64M"]
        before = open_all(session, others)
        assert before[:2] == [digests[p] for p in others[:2]], before
        assert before[2:] == [errno.ENOMEM, errno.ENOMEM], before
        st = service_stats(cache_dir)  # the session's own pins went when it closed
        assert st["pinned_bytes"] == 4 * BLOB and st["clients"] == 2, st
        os.kill(job.proc.pid, signal.SIGKILL)
        assert job.proc.wait(30) == -signal.SIGKILL
        st = wait_until(
            lambda: (s := service_stats(cache_dir))["pinned_bytes"] == 0 and s,
            what="the killed job's pins to be dropped",
        )
        assert st["clients"] == 1, st  # only this probe
        evictions = st["evictions"]
        after = open_all(session, others)
        assert after == [digests[p] for p in others], after
        st = service_stats(cache_dir)
        assert st["evictions"] >= evictions + 2, st  # the dead job's objects made room
        assert st["used_bytes"] <= 3 * 2**20, st


def test_default_runtime_dir() -> None:
    """README: ``$XDG_RUNTIME_DIR/hep-exec`` when that directory exists, else
    ``/dev/shm/hep-exec-UID`` (computed only: nothing is created)."""
    here = Path(tempfile.gettempdir())
    assert default_runtime_dir({"XDG_RUNTIME_DIR": str(here)}, 4321) == here / "hep-exec"
    for env in ({}, {"XDG_RUNTIME_DIR": "run/user"}, {"XDG_RUNTIME_DIR": str(here / "absent")}):
        assert default_runtime_dir(env, 4321) == Path("/dev/shm/hep-exec-4321"), env


def test_default_socket_location_is_used_by_service_and_job(
    tracing, tree, server, tmp_path: Path
) -> None:
    """Without --cache-dir, ``hep-exec --cache-daemon`` listens at
    ``$XDG_RUNTIME_DIR/hep-exec/cache.sock`` (a private 0700 directory it creates), and a
    job given no --cache-dir either finds it there. XDG_RUNTIME_DIR points into tmp_path, so
    nothing outside it is touched."""
    runtime = tmp_path / "run"
    runtime.mkdir(mode=0o700)
    env = {k: v for k, v in ENV.items() if not k.startswith("HEP_EXEC_")}
    env["XDG_RUNTIME_DIR"] = str(runtime)
    where = runtime / "hep-exec"
    path = sorted(p for p in tree.digests if "/lib/" in p)[0]
    argv = ["--cache-daemon", "--server", server.url, "--ram", RAM]
    with running_service(argv, where, env=env, command=tuple(HEP_EXEC)) as daemon:
        assert stat.S_ISSOCK((where / SOCKET_NAME).stat().st_mode)
        assert stat.S_IMODE(where.stat().st_mode) == 0o700
        r = subprocess.run(
            [*HEP_EXEC, "--server", server.url, "--ram", RAM, "--stats-internals", "--",
             "sha256sum", f"/cvmfs/{FQRN}{path}"],
            env=env,
            cwd=PROJECT,
            capture_output=True,
            text=True,
            timeout=120,
        )  # fmt: skip
        assert r.returncode == 0, r.stderr
        assert r.stdout.split()[0] == tree.digests[path]
        line = shared_line(r.stderr)
        assert f"service pid {daemon.pid} at {where}:" in line, line
        assert "1 objects received" in line, line
        assert service_stats(where)["opens"] == 1
        assert daemon.poll() is None


# stdlib only: the project's interpreter may sit where another user cannot run it
INTRUDER = r"""
import json, os, socket, sys
d, targets = sys.argv[1], json.loads(sys.argv[2])
out = {"uid": os.getuid()}
s = socket.socket(socket.AF_UNIX, socket.SOCK_SEQPACKET)
try:
    s.settimeout(10)
    s.connect(os.path.join(d, "cache.sock"))
    s.send(b'{"op":"hello","version":1}')
    answer = s.recv(4096)
    out["connect"] = "answered: %r" % answer if answer else "closed by the service"
except OSError as e:
    out["connect"] = type(e).__name__
out["reads"] = {}
for t in targets:
    try:
        with open(t, "rb") as f:
            out["reads"][t] = "read %d bytes" % len(f.read())
    except OSError as e:
        out["reads"][t] = type(e).__name__
print(json.dumps(out))
"""
SYSTEM_PYTHON = "/usr/bin/python3"


@pytest.fixture
def other_user() -> Iterator[int]:
    """A second user (``useradd``: root only; its tests are marked ``needs_root``)."""
    if not os.access(SYSTEM_PYTHON, os.X_OK):
        pytest.skip(f"{SYSTEM_PYTHON} (for the second user's stdlib-only probe) not found")
    name = f"hepnc{secrets.token_hex(4)}"
    try:
        subprocess.run(["useradd", "-M", "-N", "-s", "/usr/sbin/nologin", name], check=True)
    except (OSError, subprocess.CalledProcessError) as e:
        pytest.skip(f"useradd failed: {e}")
    try:
        yield pwd.getpwnam(name).pw_uid
    finally:
        subprocess.run(["userdel", name], check=False, capture_output=True)


def _ram_file_paths(pid: int) -> list[str]:
    """/proc paths of the RAM files ``pid`` holds (fds closed while we look are skipped)."""
    out = []
    for fd in os.listdir(f"/proc/{pid}/fd"):
        path = f"/proc/{pid}/fd/{fd}"
        try:
            if is_ram_file(path):
                out.append(path)
        except FileNotFoundError:
            continue
    return out


@pytest.mark.needs_root
def test_other_user_cannot_connect_or_read(tracing, tree, proxy, cache_dir, other_user) -> None:
    """Another user can neither reach our service nor read its objects; SO_PEERCRED backstop."""
    digests = tree.digests
    me, uid_b = os.getuid(), other_user
    paths = sorted(digests)[:3]
    job = Job(job_argv(proxy, cache_dir), paths)
    try:
        job.expect("ready")
        job.go()
        held = job.expect("files")["files"]
        assert all(held[p]["sha256"] == digests[p] for p in paths)
        service = int(service_stats(cache_dir)["pid"])
        targets = [
            path for pid in (service, job.proc.pid, job.tracee) for path in _ram_file_paths(pid)
        ]
        assert len(targets) >= 3 * len(paths)

        def intrude() -> dict[str, Any]:
            r = subprocess.run(
                [SYSTEM_PYTHON, "-c", INTRUDER, str(cache_dir), json.dumps(targets)],
                capture_output=True,
                text=True,
                timeout=60,
                cwd="/",
                user=uid_b,
                group=65534,
                extra_groups=[],
            )
            assert r.returncode == 0, r.stderr
            out: dict[str, Any] = json.loads(r.stdout)
            assert out["uid"] == uid_b
            assert set(out["reads"].values()) == {"PermissionError"}, out["reads"]
            return out

        assert intrude()["connect"] == "PermissionError"  # the 0700 directory
        # even with directory and socket opened up, the service refuses them (SO_PEERCRED)
        os.chmod(cache_dir, 0o711)
        os.chmod(cache_dir / SOCKET_NAME, 0o777)
        assert intrude()["connect"] in (
            "closed by the service",
            "ConnectionResetError",
            "BrokenPipeError",
        )
        # and our own hep-exec refuses the loosened directory rather than trust it
        with pytest.raises(CacheDirError, match="mode 0711, must be 0700"):
            ensure_private_dir(cache_dir)
        r = subprocess.run(
            [*HEP_EXEC, *job_argv(proxy, cache_dir), "--", "sha256sum", f"/cvmfs/{FQRN}{paths[0]}"],
            env=ENV,
            capture_output=True,
            text=True,
            timeout=60,
        )
        assert r.returncode == 0 and r.stdout.split()[0] == digests[paths[0]], r.stderr
        assert "mode 0711, must be 0700" in r.stderr and "private RAM cache" in r.stderr
        stats = service_stats(cache_dir)
        assert stats["refused"] == 1 and me != uid_b
    finally:
        job.proc.kill()
        job.proc.communicate()


ASK_ANSWERS = r"""
import json, os, socket, sys
d, fqrn, root = sys.argv[1:4]
s = socket.socket(socket.AF_UNIX, socket.SOCK_SEQPACKET)
try:
    s.settimeout(10)
    s.connect(os.path.join(d, "cache.sock"))
    s.send(json.dumps({"op": "answers", "fqrn": fqrn, "root": root}).encode())
    answer = s.recv(4096)
    print("answered: %r" % answer if answer else "closed by the service")
except OSError as e:
    print(type(e).__name__)
"""


@pytest.mark.needs_root
def test_a_node_table_is_never_given_to_another_user(
    tracing, tree, proxy, cache_dir, other_user
) -> None:
    """The answers a user's jobs learnt stay that user's: the service that keeps them answers
    no other user, even with its directory and socket opened up."""
    paths = sorted(p for p in tree.digests if "/lib/pkg2/" in p)
    read_all(Job(job_argv(proxy, cache_dir), paths), tree)
    root = tree.repo.verified_manifest().root_catalog.hex
    mine = CacheClient.attach(cache_dir).start()
    try:
        assert mine.answers(FQRN, root)  # the owner's next job gets them
    finally:
        mine.close()
    os.chmod(cache_dir, 0o711)
    os.chmod(cache_dir / SOCKET_NAME, 0o777)
    r = subprocess.run(
        [SYSTEM_PYTHON, "-c", ASK_ANSWERS, str(cache_dir), FQRN, root],
        capture_output=True,
        text=True,
        timeout=60,
        cwd="/",
        user=other_user,
        group=65534,
        extra_groups=[],
    )
    os.chmod(cache_dir, 0o700)
    assert r.stdout.strip() in (
        "closed by the service",
        "ConnectionResetError",
        "BrokenPipeError",
    ), (r.stdout, r.stderr)


def test_preload_selects_exactly_an_access_list(tree, server, tmp_path: Path) -> None:
    """``access_list:`` in a preload spec: exactly the recorded files (and their catalogs)."""
    store = tree.store
    picked = ["/lib/pkg3/mod8.py", "/data/d1/blob1.bin", "/big/chunked.bin"]
    record = tmp_path / "job.list"
    cfg = parse_exec_args(
        ["--server", server.url, "--no-shared-cache", "--record", str(record), "--", "x"], {}
    )
    with WorkerSession(cfg) as s:
        for p in picked:
            node = s.namespace.resolve(f"/cvmfs/{FQRN}{p}".encode())
            assert isinstance(node, Node)
            obj = s.open_file(node)
            assert not isinstance(obj, int)
            s.release(obj)
    spec = tmp_path / "spec.yaml"
    spec.write_text(
        f"store: {tmp_path / 'out'}\nrepositories:\n  - name: {FQRN}\n"
        f"    servers: [{server.url}/cvmfs/@fqrn@]\n    keys: {store.parent / 'keys'}\n"
        f"    access_list: {record}\n"
    )
    r = subprocess.run(
        [sys.executable, "-m", "preload.cli", "--spec", str(spec)],
        env=ENV,
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert r.returncode == 0, r.stderr
    assert "selected 3 files" in r.stdout, r.stdout
    # the store holds exactly the objects of those files: what a job re-opening them needs
    want = set(file_objects(tree.repo))
    src = store.parent / "src"
    got = set(file_objects(Repo(tmp_path / "out", FQRN, tree.repo.master_pub, tree.repo.keys_dir)))
    assert got <= want and len(got) == 2 + 3  # two whole files, three chunks
    stored = StoreServer(tmp_path / "out")
    try:
        cfg = parse_exec_args(["--server", stored.url, "--no-shared-cache", "--", "x"], {})
        with WorkerSession(cfg) as s:
            for p in picked:
                node = s.namespace.resolve(f"/cvmfs/{FQRN}{p}".encode())
                assert isinstance(node, Node)
                obj = s.open_file(node)
                assert not isinstance(obj, int)
                data = Path(obj.path).read_bytes()
                assert data == (src / p.lstrip("/")).read_bytes()
                s.release(obj)
    finally:
        stored.stop()
    bad = tmp_path / "bad.yaml"
    bad.write_text(spec.read_text().replace(str(record), str(tmp_path / "missing.list")))
    r = subprocess.run(
        [sys.executable, "-m", "preload.cli", "--spec", str(bad)],
        env=ENV,
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert r.returncode != 0 and "missing.list: cannot read access list" in r.stderr
    assert "Traceback" not in r.stderr
