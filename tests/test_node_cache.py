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
import pwd
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
from worker.config import ConfigError, parse_exec_args
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


def test_sigkill_service_jobs_finish(tree, server, cache_dir) -> None:
    """4 jobs started together (one starts the service on demand); kill -9 it mid-run."""
    _store, digests = tree
    paths = sorted(digests)
    half = len(paths) // 2
    jobs = [Job(job_argv(server, cache_dir), paths, hold_after=half) for _ in range(4)]
    pids = {j.expect("ready")["server_pid"] for j in jobs}
    assert len(pids) == 1 and None not in pids, "racing starters made one service"
    (pid,) = pids
    for j in jobs:
        j.go()
    for j in jobs:
        j.expect("holding")
    os.kill(pid, signal.SIGKILL)
    for j in jobs:
        j.go()
    for j in jobs:
        out, err = j.result()
        for i, p in enumerate(paths):
            f = out["files"][p]
            assert f["sha256"] == digests[p] and f["again"], p
            assert f["shared"] == (i < half), p  # before the kill shared, then private
        assert out["fallbacks"] == len(paths) - half
        assert err.count("gone") == 1 and "private RAM cache" in err  # one line, no traceback
        assert "Traceback" not in err


def test_idle_exit_and_explicit_start(tree, server, cache_dir) -> None:
    argv = job_argv(server, cache_dir, "--cache-idle", "0.5")
    daemon = subprocess.Popen(
        [sys.executable, "-m", "worker.cache_service", *argv],
        env=ENV,
        cwd=PROJECT,
        stderr=subprocess.PIPE,
        text=True,
    )
    try:
        for _ in range(100):
            if (cache_dir / SOCKET_NAME).exists():
                break
            time.sleep(0.05)
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
        time.sleep(1.0)
        assert daemon.poll() is None, "a connected client keeps the service alive"
        client.close()
        assert daemon.wait(timeout=10) == 0
        assert not (cache_dir / SOCKET_NAME).exists()
    finally:
        if daemon.poll() is None:
            daemon.kill()
            daemon.wait()


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


def test_record_then_prefetch(tree, server, cache_dir, tmp_path: Path) -> None:
    """A recorded run's list, prefetched by the next run: everything there before it asks."""
    _store, digests = tree
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
                want = len(order)
                deadline = time.monotonic() + 30
                while shared and time.monotonic() < deadline:
                    st = s.shared.stats() if s.shared else None
                    if st and st.get("prefetched", 0) >= want:
                        break
                    time.sleep(0.05)
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


def test_bad_access_list_is_one_line(server, cache_dir, tmp_path: Path) -> None:
    bad = tmp_path / "bad.list"
    bad.write_text("# hep-exec access list v1\nrepo\t/a\tkey\n")
    cfg = parse_exec_args(job_argv(server, cache_dir, "--prefetch", str(bad), "--", "x"), {})
    with pytest.raises(ConfigError, match=r"bad.list:2: expected 4 tab-separated fields"):
        WorkerSession(cfg)


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
    if os.geteuid() != 0:
        pytest.skip("creating a second user needs root")
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


def test_other_user_cannot_connect_or_read(tree, server, cache_dir, other_user) -> None:
    """Another user can neither reach our service nor read its objects; SO_PEERCRED backstop."""
    _, digests = tree
    me, uid_b = os.getuid(), other_user
    paths = sorted(digests)[:3]
    job = Job(job_argv(server, cache_dir), paths)
    try:
        service_pid = job.expect("ready")["server_pid"]
        job.go()
        held = job.expect("files")
        assert all(held["files"][p]["sha256"] == digests[p] for p in paths)
        targets = [
            f"/proc/{pid}/fd/{fd}"
            for pid in (service_pid, job.proc.pid)
            for fd in os.listdir(f"/proc/{pid}/fd")
            if os.readlink(f"/proc/{pid}/fd/{fd}").startswith("/memfd:")
        ]
        assert len(targets) >= 2 * len(paths)

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
        # and our own clients refuse the loosened directory rather than trust it
        with pytest.raises(CacheDirError, match="mode 0711, must be 0700"):
            ensure_private_dir(cache_dir)
        stats = CacheClient.attach(cache_dir).stats()
        assert stats is not None and stats["refused"] == 1 and me != uid_b
    finally:
        job.proc.kill()
        job.proc.communicate()


def test_preload_selects_exactly_an_access_list(tree, server, tmp_path: Path) -> None:
    """``access_list:`` in a preload spec: exactly the recorded files (and their catalogs)."""
    store, _digests = tree
    picked = ["/lib/pkg3/mod8.py", "/data/d1/blob1.bin", "/big/chunked.bin"]
    record = tmp_path / "job.list"
    cfg = parse_exec_args(
        ["--proxy", server.url, "--no-shared-cache", "--record", str(record), "--", "x"], {}
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
    want = {o.split(f"/cvmfs/{FQRN}/")[1] for o in data_objects(store)}
    src = store.parent / "src"
    got = {
        str(p.relative_to(tmp_path / "out" / FQRN))
        for p in (tmp_path / "out" / FQRN / "data").rglob("*")
        if p.is_file() and p.name[-1] not in "CX"
    }
    assert got <= want and len(got) == 2 + 3  # two whole files, three chunks
    stored = StoreServer(tmp_path / "out")
    try:
        cfg = parse_exec_args(["--proxy", stored.url, "--no-shared-cache", "--", "x"], {})
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
