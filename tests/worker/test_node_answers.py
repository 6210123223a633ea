"""Answers ahead shared by a node's jobs (worker/trace/node_answers.py).

The store and the frames as plain values; then real jobs: a random published tree (nested
catalogs, hardlinks, symlinks, variant symlinks, a chunked file, a FIFO) walked by find, ls,
stat, sha256sum, du, tar, cp -a, a C walker and a Python probe of every path (lstat, stat,
readlink, access, xattrs, a missing name and a name under a file) three ways: by a job on a
cold node (its own answers, from Python, handed to the node's service at its end), by a new
job on that node (the same answers put by the C side before it asks), and by a job with no
node service at all.  The three print the same; and a variant symlink still follows each
job's own environment.
"""

from __future__ import annotations

import errno
import os
import random
import re
import struct
import subprocess
import sys
from pathlib import Path

import pytest

from tests.support.hep_exec import CLI, Served
from tests.support.node_cache import put_from_node, upcalls
from tests.support.oracle import SCRIPT, SECTIONS, WALKER, compare
from tests.support.tracing import compile_c, ensure_built, env_with, native, needs_ptrace, ram_dir
from tests.support.trees import make_random_tree, make_variant_links
from worker.trace import _trap
from worker.trace.node_answers import (
    LISTING,
    OPENED,
    OPENS_LOOKED,
    AnswerTables,
    FrameError,
    NodeAnswers,
    Revision,
    encode_listing,
    frames,
    join_frames,
    packed_records,
    valid_table_name,
)

ROOT = "0123456789abcdef0123456789abcdef01234567"

# ---------------------------------------------------------------------- values


def test_frames_round_trip_and_refuse_garbage() -> None:
    items = [(b"/cvmfs/r/a\0\1\0\0", b"x" * 10), (b"/cvmfs/r/b\0\0\1\0", b"")]
    assert list(frames(join_frames(items))) == items
    data = join_frames(items)
    for bad in (data[:-1], data[:5], b"\0" * 8 + b"tail", data + b"\1"):
        with pytest.raises(FrameError):
            list(frames(bad))


def test_tables_newest_answers_per_directory_and_bounds() -> None:
    t = AnswerTables(max_bytes=1000, max_table=600)
    assert t.get("r.org", ROOT) == b""
    assert t.add("r.org", ROOT, join_frames([(b"/cvmfs/r.org/a", b"1" * 100)])) == 1
    assert t.add("r.org", ROOT, join_frames([(b"/cvmfs/r.org/a", b"2" * 100)])) == 1
    # a directory's newer answers replace older
    assert t.get("r.org", ROOT) == join_frames([(b"/cvmfs/r.org/a", b"2" * 100)])
    # a table takes no more than its bound; what it had stays
    assert t.add("r.org", ROOT, join_frames([(b"/cvmfs/r.org/b", b"3" * 600)])) == 0
    assert list(frames(t.get("r.org", ROOT))) == [(b"/cvmfs/r.org/a", b"2" * 100)]
    # a directory's opens add up, job after job, each open once (ld.so's own opens are made
    # again by every job); a job that brings nothing new leaves the table as it was given
    opened = b"/cvmfs/r.org/a" + OPENED
    o1, o2 = _open_record(b"/cvmfs/r.org/a/x"), _open_record(b"/cvmfs/r.org/a/y")
    t.add("r.org", ROOT, join_frames([(opened, o1)]))
    assert t.add("r.org", ROOT, join_frames([(opened, o2 + o1)])) == 1
    given = t.get("r.org", ROOT)
    assert dict(frames(given))[opened] == o1 + o2
    assert list(packed_records(o1 + o2 + b"\1")) == [o1, o2]
    again = [(opened, o1), (b"/cvmfs/r.org/a", b"2" * 100)]
    assert t.add("r.org", ROOT, join_frames(again)) == 0
    assert t.given("r.org", ROOT) is given
    # garbage: nothing taken
    with pytest.raises(FrameError):
        t.add("r.org", ROOT, b"\1\0\0\0")
    # other revisions push the least recently used table out beyond max_bytes
    for i in range(3):
        t.add("r.org", f"{i:040x}", join_frames([(b"/cvmfs/r.org/c", b"4" * 400)]))
    assert t.get("r.org", ROOT) == b""
    assert t.stats()[1] <= 1000


def _open_record(key: bytes) -> bytes:
    """One packed open answer as worker.trace._trap.pack writes it (cls 1, a redirect with a
    stat)."""
    target = b"/objects/" + key[-1:]
    head = struct.pack("<BBHB3xIIq", 1, 2, 0, 1 | 2 | 4, len(key), len(target), 1)
    return head + bytes(120) + key + target


def test_a_mirror_holds_an_empty_entry_per_listed_entry(tmp_path: Path) -> None:
    """worker/trace/_tmpfs.c mirror: what getdents of a /cvmfs directory shows, from its listing;
    bytes that are not a listing (from a confused service) make nothing up."""
    from worker.trace import _tmpfs

    entries = [(b"f.py", 0o100000), (b"sub", 0o40000), (b"ln", 0o120000), (b"p", 0o10000),
               (b"dev", 0o20000), (b"\xe9t\xe9", 0o100000)]  # fmt: skip
    listing = encode_listing(0o40555, 1_600_000_000_123_456_789, entries)
    target = tmp_path / "d"
    _tmpfs.mirror(os.fsencode(target), listing)
    _tmpfs.mirror(os.fsencode(target), listing)  # again: what exists stays, no error
    kinds = {e.name.encode("utf-8", "surrogateescape"): os.lstat(e.path).st_mode & 0o170000
             for e in os.scandir(target)}  # fmt: skip
    assert kinds == {b"f.py": 0o100000, b"sub": 0o40000, b"ln": 0o120000, b"p": 0o10000,
                     b"dev": 0o100000, b"\xe9t\xe9": 0o100000}  # fmt: skip
    st = os.stat(target)
    assert st.st_mode & 0o7777 == 0o555
    assert st.st_mtime_ns == 1_600_000_000_123_456_789
    older = encode_listing(0o40755, -1_500_000_000, [])  # before 1970
    _tmpfs.mirror(os.fsencode(tmp_path / "old"), older)
    assert os.stat(tmp_path / "old").st_mtime_ns == -1_500_000_000
    for i, bad in enumerate((
        b"",
        listing[:-1],
        listing + b"\1",
        encode_listing(0o40755, 0, [(b"a/b", 0o100000)]),
        encode_listing(0o40755, 0, [(b"..", 0o40000)]),
        encode_listing(0o40755, 0, [(b"x\0y", 0o100000)]),
        encode_listing(0o40755, 0, [(b"", 0o100000)]),
        encode_listing(0o40755, 0, [(b"k", 0o170000)]),
    )):  # fmt: skip
        with pytest.raises(OSError) as e:
            _tmpfs.mirror(os.fsencode(tmp_path / f"bad{i}"), bad)
        assert e.value.errno == errno.EINVAL
    with pytest.raises(OSError) as e:
        _tmpfs.mirror(os.fsencode(tmp_path / "no" / "parent"), listing)
    assert e.value.errno == errno.ENOENT and "no/parent" in str(e.value)


def test_table_names_and_a_jobs_answers_by_revision() -> None:
    assert valid_table_name("cms.cern.ch", ROOT)
    for fqrn, root in (("", ROOT), ("a/b", ROOT), ("..", ROOT), ("r", "../x"), ("r", 7)):
        assert not valid_table_name(fqrn, root)
    sent: list[tuple[str, str, bytes]] = []
    listing = encode_listing(0o40755, 12, [(b"f", 0o100000), (b"d", 0o40000)])
    given = {
        ("a.org", ROOT): join_frames(
            [
                (b"/cvmfs/a.org/x\0\1\0", b"pack"),
                (b"/cvmfs/a.org/x" + LISTING, listing),
                (b"/cvmfs/a.org/x" + OPENS_LOOKED, b"1"),
                (b"/cvmfs/b.org/y\0\1\0", b"evil"),  # another repository's: never taken
                (b"/cvmfs/a.org/z\0\1\0", b"ed"),
            ]
        ),
        ("b.org", "f" * 40): b"\1\2",  # not frames: nothing taken
    }

    def store(fqrn: str, root: str, data: bytes) -> bool:
        sent.append((fqrn, root, data))
        return True

    na = NodeAnswers(b"/cvmfs", b"/proc/1/fd/3/", lambda f, r: given.get((f, r)), store)
    na.mounted("a.org", ROOT)
    na.mounted("b.org", "f" * 40)
    assert na.take() == [
        Revision(b"/cvmfs/a.org", given[("a.org", ROOT)]),
        Revision(b"/cvmfs/b.org", b"\1\2"),
    ]
    assert not na.pending
    # what the C side makes of a table: b"pack" at once (4 bytes), b"ed" staged; the listing
    # (for the mirrors) and the directory whose opens were looked for; nothing of b.org's
    a_org = given[("a.org", ROOT)]
    assert _trap.read_table(a_org, b"/cvmfs/a.org", 4) == (
        [b"/cvmfs/a.org/x"],
        [b"/cvmfs/a.org/z"],
        {b"/cvmfs/a.org/x": listing},
        [b"/cvmfs/a.org/x"],
    )
    six = _trap.read_table(a_org, b"/cvmfs/a.org", 6)
    assert six is not None and six[:2] == ([b"/cvmfs/a.org/x", b"/cvmfs/a.org/z"], [])
    assert _trap.read_table(a_org, b"/cvmfs/a", 6) == ([], [], {}, [])  # a.org is not a
    assert _trap.read_table(b"\1\2", b"/cvmfs/b.org", 6) is None  # not frames: nothing
    assert _trap.read_table(a_org[:-1], b"/cvmfs/a.org", 6) is None
    na.keep(b"/cvmfs/a.org/x\0\1\0\0", b"A")
    na.keep(b"/cvmfs/b.org/y\0\1\0\0", b"B")
    na.keep(b"/cvmfs/c.org/z\0\1\0\0", b"C")  # never mounted here: not handed over
    na.append(b"/cvmfs/a.org/x\0opened", b"1")
    na.append(b"/cvmfs/a.org/x\0opened", b"2")
    na.send()
    assert sorted((f, r, list(frames(d))) for f, r, d in sent) == [
        ("a.org", ROOT, [(b"/cvmfs/a.org/x\0\1\0\0", b"A"), (b"/cvmfs/a.org/x\0opened", b"12")]),
        ("b.org", "f" * 40, [(b"/cvmfs/b.org/y\0\1\0\0", b"B")]),
    ]


# ---------------------------------------------------------------------- real jobs

PROBE = r"""
import errno, os, sys
top = sys.argv[1]
def show(p):
    out = []
    for follow in (False, True):
        try:
            s = os.stat(p, follow_symlinks=follow)
            out.append("%o %d %d %d %d %d %d" % (s.st_mode, s.st_size if not os.path.isdir(p)
                       else 0, s.st_nlink, s.st_uid, s.st_gid, s.st_mtime_ns, s.st_ino))
        except OSError as e:
            out.append(errno.errorcode[e.errno])
    try:
        out.append("-> " + os.readlink(p))
    except OSError as e:
        out.append(errno.errorcode[e.errno])
    out.append("".join("rwx"[i] if os.access(p, m) else "-"
                       for i, m in enumerate((os.R_OK, os.W_OK, os.X_OK))))
    for follow in (False, True):
        try:
            out.append(",".join(sorted(os.listxattr(p, follow_symlinks=follow))) or "noxattr")
        except OSError as e:
            out.append(errno.errorcode[e.errno])
        for name in ("user.tag", "user.none"):
            try:
                out.append(name + "=" + os.getxattr(p, name, follow_symlinks=follow).hex())
            except OSError as e:
                out.append(errno.errorcode[e.errno])
    for extra in ("/x", "_missing"):
        try:
            os.stat(p + extra)
            out.append("exists")
        except OSError as e:
            out.append(errno.errorcode[e.errno])
    return " ".join(out)
for d, dirs, files in os.walk(top):
    dirs.sort()
    for name in sorted(dirs + files):
        p = os.path.join(d, name)
        print(os.path.relpath(p, top), show(p))
"""


def _tag_some(top: Path) -> list[Path]:
    """A few files and a directory with a user.* xattr (published by the publisher); none
    where the source's file system takes none."""
    picked = sorted(p for p in top.rglob("*") if not p.is_symlink() and p.is_file())[::9]
    picked += [d for d in sorted(top.rglob("*")) if d.is_dir() and not d.is_symlink()][:1]
    try:
        for p in picked:
            os.setxattr(p, "user.tag", b"v")
    except OSError:
        return []
    return picked


@pytest.fixture(scope="module")
def walker(tmp_path_factory: pytest.TempPathFactory) -> Path:
    ensure_built()
    return compile_c(WALKER, tmp_path_factory.mktemp("walker") / "walker")


@pytest.fixture
def node(cache_dir: Path) -> Path:
    return cache_dir


@needs_ptrace
@pytest.mark.slow
@pytest.mark.parametrize(("seed", "eager"), [(3, "4M"), (4, "0")])
def test_answers_from_the_node_equal_the_jobs_own(
    seed: int, eager: str, walker: Path, node: Path, tmp_path: Path
) -> None:
    """``eager``: how much of the node's answers a job puts at once (``--eager-answers``);
    0: every directory's when the job first comes to it."""
    fqrn = f"answers{seed}.test.org"
    served = Served(tmp_path / "store", tmp_path / "keys")
    with ram_dir() as src:
        make_random_tree(
            src / "top",
            random.Random(seed),
            70,
            every_kind=True,
            catalogs=True,
            fifo=True,
            chunked=seed == 3,
        )
        tagged = _tag_some(src / "top")
        want = native(["bash", "-c", SCRIPT, "x", str(src), str(walker)])
        make_variant_links(src / "top")  # not resolvable on the source side: not in `want`
        served.publish(src, fqrn)
    proxy = served.serve(tmp_path / "nginx")
    mount = f"/cvmfs/{fqrn}"
    try:

        def job(
            script: list[str], *options: str, env: dict[str, str] | None = None
        ) -> subprocess.CompletedProcess[str]:
            argv = [*CLI, "--server", proxy, "--keys", str(served.keys_dir), "--stats-internals"]
            argv += ["--cache-dir", str(node), "--eager-answers", eager, *options, "--", *script]
            r = subprocess.run(argv, env=env_with(env), capture_output=True, text=True, timeout=300)
            assert r.returncode == 0, r.stderr[-3000:]
            return r

        tools = ["bash", "-c", SCRIPT, "x", mount, str(walker)]
        probe = [sys.executable, "-c", PROBE, f"{mount}/top"]
        runs = {}
        for name, options in (("cold", ()), ("warm", ()), ("private", ("--no-shared-cache",))):
            p = job(probe, *options)  # first: on a cold node, the job's own answers
            runs[name] = (job(tools, *options), p)
        # the variant symlinks follow each job's environment, whatever the node learnt
        variant = [sys.executable, "-c", f"print(open('{mount}/top/variant/pick').read())"]
        picked = [job(variant, env={"WHICH": w}).stdout.strip() for w in ("b", "a", "b")]
    finally:
        served.stop()

    cold, warm, private = runs["cold"], runs["warm"], runs["private"]
    assert put_from_node(cold[1].stderr) == 0
    assert put_from_node(warm[0].stderr) > 0 and put_from_node(warm[1].stderr) > 0
    # what is left for Python: listing directories (each job makes its own), variant
    # symlinks, paths through symlinks; and with nothing put at once, the first touch of
    # each directory (which then puts the node's answers instead of reading the catalog)
    up_cold, up_warm = upcalls(cold[1].stderr), upcalls(warm[1].stderr)
    assert up_warm < up_cold if eager != "0" else up_warm <= up_cold, (up_cold, up_warm)
    assert picked == ["B", "A", "B"]
    # the probe of every path: the same answers, whoever gave them
    assert warm[1].stdout == cold[1].stdout == private[1].stdout
    assert cold[1].stdout.count("\n") > 70
    assert not tagged or cold[1].stdout.count("user.tag=76") >= 2 * len(tagged)
    # every tool's output, section by section; and the same as on the source tree (but for
    # the variant symlinks, which only the repository resolves)
    w = compare(want.stdout, want.stdout, str(src), mount)[0]
    outs = {name: compare(want.stdout, r[0].stdout, str(src), mount)[1] for name, r in runs.items()}
    for section in SECTIONS:
        assert outs["warm"][section] == outs["cold"][section] == outs["private"][section], section
        kept = [
            ln
            for ln in outs["warm"][section].splitlines()
            if "variant" not in ln and not ln.startswith(("pick", "bare", "top ->"))
        ]
        if section in ("sha256", "tar"):  # (sizes and links of `top` changed with `variant`)
            assert kept == w[section].splitlines(), section


WALK = """
import os, sys
for d in range(40):  # by name, as a program that knows its files does: no listing
    for f in range(5):
        st = os.stat(os.path.join(sys.argv[1], f"d{d:02d}", f"f{f}"))
        print(d, f, st.st_size, oct(st.st_mode))
"""


def two_jobs(
    node: Path, tmp_path: Path, fqrn: str, src: Path, script: str, *options: str
) -> list[subprocess.CompletedProcess[str]]:
    """Publish ``src`` as ``fqrn`` and run ``python -c script /cvmfs/<fqrn>`` as two jobs of
    the node: the first teaches it, the second puts from it."""
    served = Served(tmp_path / "store", tmp_path / "keys")
    served.publish(src, fqrn)
    proxy = served.serve(tmp_path / "nginx")
    try:
        argv = [*CLI, "--server", proxy, "--keys", str(served.keys_dir), "--stats-internals"]
        argv += ["--cache-dir", str(node), *options, "--"]
        runs = []
        for _ in range(2):
            job = [*argv, sys.executable, "-c", script, f"/cvmfs/{fqrn}"]
            r = subprocess.run(job, env=env_with(), capture_output=True, text=True, timeout=120)
            assert r.returncode == 0, r.stderr[-3000:]
            runs.append(r)
        return runs
    finally:
        served.stop()


def test_a_miss_in_a_staged_directory_puts_the_next_ones_too(node: Path, tmp_path: Path) -> None:
    """With all of the node's answers staged (``--eager-answers 1``), a job walking the tree
    in the order the node's earlier job did traps in far fewer directories than it visits:
    each miss puts the directory and the few the earlier job came to next, and the answers
    are the same."""
    with ram_dir() as src:
        for d in range(40):
            for f in range(5):
                path = src / f"d{d:02d}" / f"f{f}"
                path.parent.mkdir(exist_ok=True)
                path.write_bytes(b"x" * (d * 5 + f))
        want = native([sys.executable, "-c", WALK, str(src)])
        runs = two_jobs(node, tmp_path, "ahead.test.org", src, WALK, "--eager-answers", "1")
    for r in runs:
        assert r.stdout == want.stdout
        assert "after mounting" not in r.stderr, r.stderr  # staging views of the table
    assert put_from_node(runs[1].stderr) > 0
    m = re.search(r"C-cache hits (\d+)", runs[1].stderr)
    assert m, runs[1].stderr
    assert int(m[1]) <= 40 // 4, runs[1].stderr  # 40 directories, one miss per nine or so


WALK_DIRS = """
import os, sys
root = sys.argv[1]
for d, dirs, files in os.walk(root):  # opens and lists each directory (scandir)
    dirs.sort()
    fd = os.open(d, os.O_RDONLY | os.O_DIRECTORY)
    a, b = os.fstat(fd), os.stat(d)
    os.close(fd)
    key = lambda s: (s.st_ino, s.st_mode, s.st_mtime_ns, s.st_nlink)
    same = key(a) == key(b)
    print(os.path.relpath(d, root), sorted(os.listdir(d)), oct(b.st_mode), same)
"""


def test_directories_the_node_listed_are_opened_without_python(node: Path, tmp_path: Path) -> None:
    """A new job's first open of each directory an earlier job of the node listed is answered
    from the node's listing (its mirror made there, ancestors first), by the C side or, once
    the mirror is made ahead, inside the program, with no upcall: what it lists, and what
    fstat of the directory fd says, are what the first job saw and what the source tree
    holds."""
    with ram_dir() as src:
        for a in range(4):
            for b in range(3):
                leaf = src / f"a{a}" / f"b{b}"
                (leaf / "c").mkdir(parents=True)
                (leaf / "f.py").write_text(f"{a}{b}")
                (leaf / "c" / "g").write_text("g")
                os.symlink("f.py", leaf / "ln")
            os.chmod(src / f"a{a}", 0o750)
        want = native([sys.executable, "-c", WALK_DIRS, str(src)])
        runs = two_jobs(node, tmp_path, "dirs.test.org", src, WALK_DIRS)
    dirs = 1 + 4 + 4 * 3 + 4 * 3  # the root, a*, a*/b*, a*/b*/c
    assert want.stdout.count("\n") == dirs
    for r in runs:
        assert r.stdout == want.stdout
    assert "False" not in want.stdout
    from_node = re.search(r"directories opened from the node's listings (\d+)", runs[1].stderr)
    inproc = re.search(r"in-process opens: (\d+) \(not trapped; (\d+) handed", runs[1].stderr)
    assert from_node and inproc, runs[1].stderr
    # all but the repository's root (its parent, the mount, is mirrored by Python first); each
    # is opened three times (os.walk's scandir, os.open, os.listdir), by the tracer where the
    # program came before the thread making the mirrors ahead or before the call site was
    # patched, else inside the program
    assert int(from_node[1]) <= dirs - 1, runs[1].stderr
    assert int(from_node[1]) + int(inproc[1]) >= 3 * (dirs - 1) - 3, runs[1].stderr
    assert re.search(r"directories opened from the node's listings 0\b", runs[0].stderr)
    assert upcalls(runs[1].stderr) < upcalls(runs[0].stderr) - (dirs - 1), runs[1].stderr


WALK_NOFOLLOW = """
import hashlib, os, sys
root = sys.argv[1]
for d, dirs, files in os.walk(root):  # as tar and grep -r read a tree: O_NOFOLLOW opens
    dirs.sort()
    for name in sorted(files):
        path = os.path.join(d, name)
        try:
            fd = os.open(path, os.O_RDONLY | os.O_NOFOLLOW)
        except OSError as e:
            print(os.path.relpath(path, root), os.strerror(e.errno))
            continue
        data = os.read(fd, 1 << 20)
        os.close(fd)
        print(os.path.relpath(path, root), hashlib.sha1(data).hexdigest())
"""


def test_a_new_job_opens_with_o_nofollow_inside_the_program(node: Path, tmp_path: Path) -> None:
    """The node keeps a job's O_NOFOLLOW opens of files (no symlink there: the plain open)
    as it keeps its plain ones, so that a new job makes them inside the program: before, the
    next job's tar of a release stopped on every file and asked Python (5.2 s for 11,000
    files against 0.5 s).  A symlink stays ELOOP."""
    with ram_dir() as src:
        for d in range(8):
            for f in range(8):
                path = src / f"d{d}" / f"f{f}"
                path.parent.mkdir(exist_ok=True)
                path.write_bytes(os.urandom(100 + d * 8 + f))
        os.symlink("f0", src / "d0" / "ln")
        want = native([sys.executable, "-c", WALK_NOFOLLOW, str(src)])
        runs = two_jobs(node, tmp_path, "nofollow.test.org", src, WALK_NOFOLLOW)
    assert "ln Too many levels of symbolic links" in want.stdout
    for r in runs:
        assert r.stdout == want.stdout
    inproc = re.search(r"in-process opens: (\d+) \(not trapped", runs[1].stderr)
    assert inproc and int(inproc[1]) >= 64 - 8, runs[1].stderr  # (each site's first stops)
    assert upcalls(runs[1].stderr) < 64 // 4, runs[1].stderr


WALK_DIRS_NOFOLLOW = """
import os, sys
def walk(d):  # as du, find and tar go down a tree: each directory opened with O_NOFOLLOW
    fd = os.open(d, os.O_RDONLY | os.O_NOFOLLOW | os.O_DIRECTORY)
    names = sorted(os.listdir(fd))
    print(d, names)
    os.close(fd)
    for name in names:
        if os.path.isdir(os.path.join(d, name)):
            walk(os.path.join(d, name))
walk(sys.argv[1])
"""


def test_directories_the_node_listed_open_with_o_nofollow_without_python(
    node: Path, tmp_path: Path
) -> None:
    """A new job's O_NOFOLLOW opens of directories an earlier job of the node listed are the
    tracer's from the node's listings, as plain ones are, not Python's (du of a release: 528
    upcalls -> 16); with in-process answers off, so that every open reaches the tracer."""
    with ram_dir() as src:
        for d in range(6):
            (src / f"d{d}" / "sub").mkdir(parents=True)
            (src / f"d{d}" / "f").write_text("f")
        runs = two_jobs(node, tmp_path, "dirs-nofollow.test.org", src, WALK_DIRS_NOFOLLOW,
                        "--no-in-process")  # fmt: skip
    assert runs[0].stdout == runs[1].stdout and runs[0].stdout.count("\n") == 1 + 6 * 2
    from_node = re.search(r"directories opened from the node's listings (\d+)", runs[1].stderr)
    assert from_node and int(from_node[1]) >= 6 * 2, runs[1].stderr


@pytest.mark.parametrize("mode", [["--no-in-process"], ["--trap", "ptrace"]])
def test_o_nofollow_opens_the_tracer_answers_need_no_python(
    mode: list[str], node: Path, tmp_path: Path
) -> None:
    """Where every open reaches the tracer (in-process answers off, or ptrace mode on an old
    kernel), a new job's O_NOFOLLOW opens of what the node answered ahead are answered by the
    C side (lstat no symlink: the plain open's answer), not by Python: tar of
    bench/app_startup's tree 6.2 s -> 1.0 s with --no-in-process, 6.8 s -> 2.0 s in ptrace
    mode (10,937 upcalls -> 1)."""
    with ram_dir() as src:
        for d in range(8):
            for f in range(8):
                path = src / f"d{d}" / f"f{f}"
                path.parent.mkdir(exist_ok=True)
                path.write_bytes(os.urandom(50 + f))
        want = native([sys.executable, "-c", WALK_NOFOLLOW, str(src)])
        runs = two_jobs(node, tmp_path, "nofollow-c.test.org", src, WALK_NOFOLLOW, *mode)
    for r in runs:
        assert r.stdout == want.stdout
    assert upcalls(runs[1].stderr) < 64 // 4, runs[1].stderr
