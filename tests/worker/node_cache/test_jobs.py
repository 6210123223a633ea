"""Jobs sharing a node's RAM cache service: real hep-exec processes against a real hep-proxy.

Each test runs real ``hep-exec`` jobs (tests/support/node_cache.py) against a hep-proxy on
127.0.0.1 whose access log counts the requests; the service is the real daemon, started on
demand by the first job (a fork of it).
"""

from __future__ import annotations

import errno
import hashlib
import json
import os
import re
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import pytest

from cvmfs_format.access_list import parse_access_list
from tests.support.network import dead_url
from tests.support.node_cache import (
    BLOB,
    ENV,
    FQRN,
    HEP_EXEC,
    RAM,
    Job,
    answered_ahead,
    file_objects,
    job_argv,
    kill_service,
    put_from_node,
    ram_files,
    read_all,
    requests_in,
    running_service,
    service_pid,
    service_stats,
    shared_line,
    upcalls,
)
from tests.support.repos import PROJECT, publish_tree
from tests.support.store_server import StoreServer
from tests.support.waiting import wait_until
from worker.config import parse_exec_args
from worker.repo.namespace import Node
from worker.session import WorkerSession

# every test here runs many real processes: left out of the fast subset (-m 'not slow')
pytestmark = pytest.mark.slow


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


def test_a_job_s_shadow_tree_is_torn_down_by_the_service(tracing, tree, proxy, cache_dir) -> None:
    """A job hands the last references to its shadow tree's tmpfs to the node's service at its
    end, which closes them on a thread of its own (the teardown of a warm import's mirrors took
    ~4 ms of the job's exit): the service takes both views' per job (each a mount of its own
    where the kernel has the new mount API), and holds none of them after."""
    paths = sorted(p for p in tree.digests if "/lib/" in p)
    read_all(Job(job_argv(proxy, cache_dir), paths), tree)  # starts the service
    pid = int(service_stats(cache_dir)["pid"])

    def fds() -> int:
        return len(os.listdir(f"/proc/{pid}/fd"))

    def steady() -> int:
        """The fd count once the first job's teardown there is over: it closes what it was
        handed on a thread of its own, after the job has gone."""
        wait_until(lambda: service_stats(cache_dir)["disposed"] == 2, 10, what="2 disposed")
        seen = [fds()]
        while len(seen) < 4 or len(set(seen[-4:])) > 1:  # the same for 0.3 s
            time.sleep(0.1)
            seen.append(fds())
        return seen[-1]

    before = steady()
    for _ in range(3):
        read_all(Job(job_argv(proxy, cache_dir), paths), tree)
    assert service_stats(cache_dir)["disposed"] == 4 * 2  # read-write and read-only views
    wait_until(lambda: fds() <= before, 10, what=f"the service back at {before} fds")


def test_a_new_job_on_a_warm_node_asks_nothing_for_what_the_node_holds(
    tracing, tree, proxy, cache_dir
) -> None:
    """The objects the node's service holds are named to a new job ahead of its opens, a
    directory at a time: a second job reads the same files with no round trip to the service
    and no fetch, and the right bytes; neither job fetches anything itself."""
    paths = sorted(p for p in tree.digests if "/lib/pkg1/" in p or "/data/d3/" in p)
    for expect_received in (True, False):
        err = read_all(Job(job_argv(proxy, cache_dir), paths), tree)
        m = re.search(r"(\d+) objects received, .*?(\d+) pushed by prefetch", shared_line(err))
        assert m, err
        received, pushed, ahead = int(m.group(1)), int(m.group(2)), answered_ahead(err)
        # the job has no HTTP client of its own: the service fetched the catalog for it too
        assert "fetch: 0 requests" in err, err
        assert "2 repository files handed over" in shared_line(err), err  # manifest, catalog
        if expect_received:  # a cold node: everything came through the service (a directory's
            # files after its first one pushed to the job, read ahead: worker/node/readahead.py)
            assert (received + pushed, ahead) == (len(paths), 0), err
        else:
            assert (received, ahead) == (0, len(paths)), err
    # each object fetched once; and per job the manifest, the catalog once (kept, inflated
    # once: each job mapped the service's copy, neither inflated its own)
    stats = service_stats(cache_dir)
    assert stats["requests"] == len(paths) + 2 + 1
    assert (stats["catalog"], stats["meta"]) == (2, 2), stats


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


def test_the_node_answers_are_put_while_the_command_starts(tracing, tree, proxy, cache_dir) -> None:
    """A job whose command names the repository mounts it while the command starts, and puts
    the node's answers then, not at the command's first call on /cvmfs: a command that comes
    to the repository after that makes no upcall at all (before, its first call did, and
    put them: ~6 ms of a warm import's first touch)."""
    paths = sorted(p for p in tree.digests if "/lib/" in p)

    def run(wait: float) -> str:
        job = Job(job_argv(proxy, cache_dir), paths)
        job.expect("ready")
        time.sleep(wait)  # (the mount of a warm node's repository takes ~20 ms)
        job.go()
        out = job.expect("files")["files"]
        assert all(out[p].get("sha256") == tree.digests[p] for p in paths), out
        return job.finish()

    run(0)
    second = run(2.0)
    assert put_from_node(second) >= 2 * len(paths), second
    assert upcalls(second) == 0, second


# argv: a writable directory, then /cvmfs paths; prints what it read, as JSON
OWN_FD_JOB = r"""
import ctypes, hashlib, json, mmap, os, sys
scratch, paths = sys.argv[1], sys.argv[2:]

def kernel_name(fd):
    # the file behind fd, by the name its RAM file system has for it: readlink of
    # /proc/self/fd/N and /proc/self/maps say the /cvmfs path (as natively); the kernel's own
    # maps, reopened through an O_PATH fd, the file mapped
    m = mmap.mmap(fd, 0, access=mmap.ACCESS_COPY)
    view = ctypes.c_char.from_buffer(m)
    addr = ctypes.addressof(view)
    del view
    kernels = os.open("/proc/self/maps", os.O_PATH)
    try:
        for line in open(f"/proc/self/fd/{kernels}"):
            span, *rest = line.split(None, 5)
            lo, hi = (int(x, 16) for x in span.split("-"))
            if lo <= addr < hi:
                return rest[4].strip().removesuffix(" (deleted)")
    finally:
        os.close(kernels)
        m.close()

def digest(p):
    fd = os.open(p, os.O_RDONLY)
    try:
        name = kernel_name(fd)
        data = b"".join(iter(lambda: os.read(fd, 1 << 20), b""))
    finally:
        os.close(fd)
    return name, hashlib.sha256(data).hexdigest()

dirs = [int(n) for n in os.listdir("/proc/self/fd")
        if int(n) > 2 and os.path.isdir(f"/proc/self/fd/{n}")]
first = {p: digest(p) for p in paths[0::3]}
os.closerange(3, 1 << 16)  # a program that closes every fd it did not open itself
closed = {p: digest(p) for p in paths[1::3]}
# ... and then opens a directory of its own at that number, holding a file by the name of
# an object it read, with other bytes
decoys = {}
for p in paths[2::3]:
    name = digest(p)[0].lstrip("/")
    with open(os.path.join(scratch, name), "wb") as f:
        f.write(b"not the object")
    decoys[p] = name
fd = os.open(scratch, os.O_RDONLY | os.O_DIRECTORY)
for d in dirs:
    os.dup2(fd, d)
os.close(fd)
replaced = {p: digest(p) for p in paths[2::3]}
print(json.dumps({"dirs": dirs, "first": first, "closed": closed, "replaced": replaced,
                  "decoys": decoys}))
"""


@pytest.mark.parametrize("cache", ["node", "private"])
def test_a_warm_node_job_opens_objects_through_its_own_fd_and_only_ours(
    tracing, tree, proxy, cache_dir, tmp_path: Path, cache: str
) -> None:
    """A new job on a warm node opens the node's objects with openat on an fd of the node's
    directory that each of its processes holds (high in the fd table, close-on-exec), not by
    the kernel's walk through /proc; so does a job without the node's service
    (``--no-shared-cache``) with its own RAM files.  A program that closes that fd, or puts a
    directory of its own at its number holding a file named like an object, still reads the
    object's bytes: what opens there is used only if it is a file of our RAM file systems."""
    paths = sorted(p for p in tree.digests if "/lib/" in p)[:30]
    private = ["--no-shared-cache"] if cache == "private" else []
    argv = [*HEP_EXEC, *job_argv(proxy, cache_dir, *private), "--stats-internals", "--",
            sys.executable, "-c", OWN_FD_JOB, str(tmp_path)]  # fmt: skip
    cvmfs = [f"/cvmfs/{FQRN}{p}" for p in paths]
    for job in ("warming", "warm"):
        scratch = tmp_path / job
        scratch.mkdir()
        run = subprocess.run([*argv[:-1], str(scratch), *cvmfs], env=ENV, capture_output=True,
                             text=True, timeout=120)  # fmt: skip
        assert run.returncode == 0, run.stderr
    out = json.loads(run.stdout)
    assert len(out["dirs"]) == 1 and out["dirs"][0] >= 16, out  # the objects' directory
    for part in ("first", "closed", "replaced"):
        for p, (_name, digest) in out[part].items():
            assert digest == tree.digests[p.removeprefix(f"/cvmfs/{FQRN}")], (part, p)
    assert all(out["replaced"][p][0].lstrip("/") == n for p, n in out["decoys"].items())
    assert all((scratch / n).read_bytes() == b"not the object" for n in out["decoys"].values())
    # the opens of those files were made inside the job (but the first, before its call site
    # was patched, and one more at most); a private cache's first open of each is the
    # tracer's, which makes its RAM file: the second opens of a third of them, here
    m = re.search(r"in-process opens: (\d+) \(not trapped", run.stderr)
    first_opens = 0 if cache == "node" else len(paths)
    assert m and int(m.group(1)) >= len(paths) + len(paths) // 3 - 2 - first_opens, run.stderr


# argv: a /cvmfs directory, then files under it: the first file read, a pause, then each of
# the others read once; prints their sha256, as JSON
PAUSED_JOB = r"""
import hashlib, json, os, sys, time
root, paths = sys.argv[1], sys.argv[2:]

def read(p):
    with open(root + p, "rb") as f:
        return hashlib.sha256(f.read()).hexdigest()

out = {paths[0]: read(paths[0])}
time.sleep(0.5)
out.update((p, read(p)) for p in paths[1:])
print(json.dumps(out))
"""


def test_a_warm_node_job_has_every_directory_s_opens_put_ahead(
    tracing, tree, proxy, cache_dir
) -> None:
    """The opens of the node's objects come with the node's answers when a job mounts the
    revision, and from the program's first open on a thread of the job puts them while the
    program runs: a program that opens files in many directories finds, after its first,
    every open answered in its own process, with no stop for any directory."""
    one_per_data_dir = {p.rsplit("/", 1)[0]: p for p in sorted(tree.digests) if "/data/" in p}
    paths = sorted(p for p in tree.digests if "/lib/" in p) + sorted(one_per_data_dir.values())
    assert len({p.rsplit("/", 1)[0] for p in paths}) >= 12  # directories
    argv = [*HEP_EXEC, *job_argv(proxy, cache_dir), "--stats-internals", "--", sys.executable,
            "-c", PAUSED_JOB, f"/cvmfs/{FQRN}", *paths]  # fmt: skip
    for _job in ("warming", "warm"):
        run = subprocess.run(argv, env=ENV, capture_output=True, text=True, timeout=120)
        assert run.returncode == 0, run.stderr
        assert json.loads(run.stdout) == {p: tree.digests[p] for p in paths}
    assert put_from_node(run.stderr) >= len(paths), run.stderr
    # of the opens of those files the first is the tracer's (handed to it: the host calls of
    # the interpreter's start patched its call site) and one other at most; without the
    # thread, the first open in every fifth directory stops (3 here)
    m = re.search(r"in-process opens: (\d+) \(not trapped; (\d+) handed", run.stderr)
    assert m and int(m[1]) >= len(paths) - 2 and int(m[2]) <= 2, run.stderr
    hits = re.search(r"C-cache hits (\d+)", run.stderr)
    assert hits and int(hits[1]) <= 2, run.stderr


def test_a_warm_node_job_has_every_staged_directory_put_ahead(
    tracing, tree, proxy, cache_dir
) -> None:
    """With none of the node's answers put at the mount (--eager-answers 1: every directory
    staged, as most are on a node whose jobs touched a big tree), the thread that puts the
    node's answers ahead goes on from the program's first call to the staged directories: a
    program that stats and opens files in every directory, after a pause, stops for none."""
    paths = sorted(p for p in tree.digests if "/lib/" in p or "/data/" in p)
    assert len({p.rsplit("/", 1)[0] for p in paths}) >= 13  # directories
    argv = [*HEP_EXEC, *job_argv(proxy, cache_dir, "--eager-answers", "1"), "--stats-internals",
            "--", sys.executable, "-c", PAUSED_JOB, f"/cvmfs/{FQRN}", *paths]  # fmt: skip
    for _job in ("warming", "warm"):
        run = subprocess.run(argv, env=ENV, capture_output=True, text=True, timeout=120)
        assert run.returncode == 0, run.stderr
        assert json.loads(run.stdout) == {p: tree.digests[p] for p in paths}
    # the first open is the tracer's, handed to it (and the staged directories on its path
    # are put then), and one other at most; without the thread, the first call in every
    # ninth directory stops (put_staged_ancestors puts eight more with it)
    m = re.search(r"in-process opens: (\d+) \(not trapped; (\d+) handed", run.stderr)
    assert m and int(m[1]) >= len(paths) - 2 and int(m[2]) <= 2, run.stderr
    hits = re.search(r"C-cache hits (\d+)", run.stderr)
    assert hits and int(hits[1]) <= 2, run.stderr


# argv: a /cvmfs directory, then directories under it: each listed, opened, fstat'ed and
# stat'ed; prints what was seen, as JSON
LISTING_JOB = r"""
import json, os, sys, time
root, dirs = sys.argv[1], sys.argv[2:]
os.listdir(root)
time.sleep(0.5)
out = {}
for d in dirs:
    fd = os.open(root + d, os.O_RDONLY | os.O_DIRECTORY)
    by_fd, by_path = os.fstat(fd), os.stat(root + d)
    os.close(fd)
    same = [getattr(by_fd, a) == getattr(by_path, a) for a in
            ("st_ino", "st_mode", "st_nlink", "st_mtime_ns", "st_size", "st_dev")]
    out[d] = {"names": sorted(os.listdir(root + d)), "fstat is stat": all(same)}
print(json.dumps(out))
"""


def test_a_warm_node_job_opens_the_node_s_directories_in_its_own_process(
    tracing, tree, proxy, cache_dir
) -> None:
    """The directories a node's jobs listed are mirrored ahead in a new job, and their opens
    are answered inside the program once mirrored: listing each of them (Python lists every
    package directory on its path once) stops the program at most for the first, and the
    listings and the fstat of each directory's fd are what the repository says."""
    dirs = sorted({p.rsplit("/", 1)[0] for p in tree.digests})
    argv = [*HEP_EXEC, *job_argv(proxy, cache_dir), "--stats-internals", "--", sys.executable,
            "-c", LISTING_JOB, f"/cvmfs/{FQRN}", *dirs]  # fmt: skip
    for _job in ("warming", "warm"):
        run = subprocess.run(argv, env=ENV, capture_output=True, text=True, timeout=120)
        assert run.returncode == 0, run.stderr
        out = json.loads(run.stdout)
        for d in dirs:
            want = sorted(p.rsplit("/", 1)[1] for p in tree.digests if p.rsplit("/", 1)[0] == d)
            assert out[d] == {"names": want, "fstat is stat": True}, (d, out[d])
    # the warm job: every directory open but the first from a call site in-process (two a
    # directory: os.open and os.listdir); the tracer answered that first one at most (handed
    # to it: the call site was patched by a host call before)
    m = re.search(r"in-process opens: (\d+) \(not trapped; (\d+) handed", run.stderr)
    assert m and int(m[1]) >= 2 * len(dirs) - 2 and int(m[2]) <= 1, run.stderr
    by_tracer = re.search(r"directories opened from the node's listings (\d+)", run.stderr)
    assert by_tracer and int(by_tracer[1]) <= 2, run.stderr


def test_directories_mirrored_before_the_mount_was_are_opened_in_process(
    tracing, tree, proxy, cache_dir
) -> None:
    """The thread making the node's mirrors ahead may finish before Python has mirrored the
    mount itself (a program that only stats at first), when no open can be answered from
    them yet: they are offered again once it has, so the program's directory opens after
    the first still never stop."""
    dirs = sorted({p.rsplit("/", 1)[0] for p in tree.digests})
    first_file = sorted(tree.digests)[0]
    job = LISTING_JOB.replace("os.listdir(root)", f"os.stat(root + {first_file!r})")
    argv = [*HEP_EXEC, *job_argv(proxy, cache_dir), "--stats-internals", "--", sys.executable,
            "-c", job, f"/cvmfs/{FQRN}", *dirs]  # fmt: skip
    for _job in ("warming", "warm"):
        run = subprocess.run(argv, env=ENV, capture_output=True, text=True, timeout=120)
        assert run.returncode == 0, run.stderr
        assert sorted(json.loads(run.stdout)) == dirs
    m = re.search(r"in-process opens: (\d+) \(not trapped; (\d+) handed", run.stderr)
    assert m and int(m[1]) >= 2 * len(dirs) - 2, run.stderr
    by_tracer = re.search(r"directories opened from the node's listings (\d+)", run.stderr)
    assert by_tracer and int(by_tracer[1]) <= 1, run.stderr


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
                b"worker.node.cache_service" in cmdline
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
