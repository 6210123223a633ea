"""The node's cache service itself: start and idle exit, its private directory, other users,
access lists and prefetch through a WorkerSession in this process, preload of an access list.
"""

from __future__ import annotations

import functools
import hashlib
import json
import os
import pwd
import secrets
import stat
import subprocess
import sys
import tempfile
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from cvmfs_format.access_list import parse_access_list
from tests.support.node_cache import (
    BLOB,
    ENV,
    FQRN,
    HEP_EXEC,
    RAM,
    Job,
    file_objects,
    is_ram_file,
    job_argv,
    kill_service,
    read_all,
    running_service,
    service_stats,
    shared_line,
)
from tests.support.repos import PROJECT, Repo
from tests.support.store_server import StoreServer
from tests.support.waiting import wait_until
from worker.config import ConfigError, parse_exec_args
from worker.node.cache_client import CacheClient
from worker.node.rendezvous import (
    SOCKET_NAME,
    CacheDirError,
    default_runtime_dir,
    ensure_private_dir,
)
from worker.repo.namespace import Node
from worker.session import WorkerSession

# every test here runs many real processes: left out of the fast subset (-m 'not slow')
pytestmark = pytest.mark.slow


def test_idle_exit_and_explicit_start(tree, server, cache_dir, tmp_path: Path) -> None:
    """``python -m worker.node.cache_service``: a second start leaves the live one alone; a
    connected client keeps it past ``--cache-idle``; it exits that long after the last one
    left, removing its socket."""
    argv = job_argv(server, cache_dir, "--cache-idle", "0.5")
    with running_service(argv, cache_dir) as daemon:
        client = CacheClient.attach(cache_dir)
        assert client.server_pid == daemon.pid
        # a second explicit start sees the live one and leaves it alone
        second = subprocess.run(
            [sys.executable, "-m", "worker.node.cache_service", *argv],
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
