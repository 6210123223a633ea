"""Name space resolution against the source tree: the kernel's answers are the oracle.

The tree is published with our publisher, served by a real HTTP server on 127.0.0.1 and
mounted through the real fetcher, RAM cache and repository code.
"""

from __future__ import annotations

import errno
import logging
import os
import stat
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest

from cvmfs_format.proxies import parse_server_templates
from tests.support.repos import publish_tree
from tests.support.store_server import StoreServer
from tests.support.trees import make_odd_tree, make_variant_links
from worker.ram.ramcache import RamCache
from worker.repo.fetcher import Fetcher
from worker.repo.namespace import (
    DT_DIR,
    DT_LNK,
    DT_REG,
    Namespace,
    Node,
    access_decision,
    open_decision,
)
from worker.repo.repository import Repositories

FQRN = "odd.example.org"


@dataclass
class Mounted:
    src: Path
    ns: Namespace
    repos: Repositories
    server: StoreServer
    fetcher: Fetcher

    def path(self, rel: str) -> bytes:
        return os.fsencode(f"/cvmfs/{FQRN}" + (f"/{rel}" if rel else ""))


@pytest.fixture(scope="module")
def mounted(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Mounted]:
    base = tmp_path_factory.mktemp("ns")
    src = make_odd_tree(base / "src")
    make_variant_links(src)
    publish_tree(src, base / "store", FQRN, base / "keys")
    server = StoreServer(base / "store")
    fetcher = Fetcher(parse_server_templates(server.url)).start()
    repos = Repositories(fetcher, cache=RamCache(64 << 20))
    try:
        yield Mounted(src, Namespace(repos), repos, server, fetcher)
    finally:
        fetcher.close()
        server.stop()


def source_paths(src: Path) -> list[str]:
    out = [""]
    for dirpath, dirnames, filenames in os.walk(src):
        for name in dirnames + filenames:
            out.append(os.path.relpath(os.path.join(dirpath, name), src))
    return sorted(out)


def kernel(src: Path, rel: str, follow: bool) -> os.stat_result | int:
    try:
        return os.stat(os.path.join(src, rel) if rel else src, follow_symlinks=follow)
    except OSError as e:
        return e.errno or -1


def escapes(src: Path, rel: str) -> bool:
    """True when the source path climbs out of ``src`` by '..' (where /cvmfs would differ)."""
    real = os.path.realpath(os.path.join(src, rel))
    base = str(src.parent)
    if real == base or real.startswith(base + "/"):
        return not (real == str(src) or real.startswith(str(src) + "/"))
    return str(src).startswith(real + "/") and real not in ("/tmp", "/")


def assert_same(m: Mounted, rel: str, follow: bool) -> None:
    want = kernel(m.src, rel, follow)
    got = m.ns.resolve(m.path(rel), follow)
    where = f"{rel!r} follow={follow}"
    if isinstance(got, Node) and got.kind == "outside":
        assert got.outside_path is not None
        real = kernel(Path("/"), os.fsdecode(got.outside_path), follow)
        if isinstance(want, int) or isinstance(real, int):
            assert real == want, where
        else:
            assert (real.st_dev, real.st_ino) == (want.st_dev, want.st_ino), where
        return
    if isinstance(want, int):
        assert got == want, f"{where}: want {errno.errorcode[want]}, got {got}"
        return
    assert isinstance(got, Node), f"{where}: want a node, got {errno.errorcode.get(got, got)}"
    st = m.ns.stat_values(got)
    assert stat.filemode(st.st_mode) == stat.filemode(want.st_mode), where
    assert st.st_mode == want.st_mode, where
    assert st.st_size == want.st_size, where
    assert st.st_nlink == want.st_nlink, where
    assert st.st_mtime * 10**9 + st.st_mtime_nsec == want.st_mtime_ns, where
    assert (st.st_uid, st.st_gid) == (os.getuid(), os.getgid())


def test_every_path_like_the_kernel(mounted: Mounted) -> None:
    checked = 0
    for rel in source_paths(mounted.src):
        if rel.startswith("variant"):
            continue
        variants = [rel]
        if rel:
            base = os.path.basename(rel)
            variants += [
                f"{rel}/",
                f"{rel}/.",
                f"{rel}/..",
                f"{rel}/../{base}",
                f"{rel}//.//",
                f"{rel}/nonexistent",
                f"./{rel}",
            ]
        for v in variants:
            if escapes(mounted.src, v):
                continue
            for follow in (False, True):
                assert_same(mounted, v, follow)
                checked += 1
    assert checked > 400


def test_symlink_kinds(mounted: Mounted) -> None:
    ns, p = mounted.ns, mounted.path
    node = ns.resolve(p("links/chain2"), follow=True)
    assert isinstance(node, Node) and node.kind == "file"
    assert node.path == p("dir/sub/deep/leaf.txt")
    link = ns.resolve(p("links/chain2"), follow=False)
    assert isinstance(link, Node) and link.kind == "symlink" and link.target == b"chain"
    assert ns.resolve(p("links/loop_a")) == errno.ELOOP
    assert ns.resolve(p("links/self/x")) == errno.ELOOP
    out = ns.resolve(p("links/outside/hostname"))
    assert isinstance(out, Node) and out.kind == "outside"
    assert out.outside_path == b"/etc/hostname"
    # '..' after a symlink to a directory is the parent of the target, not of the link
    up = ns.resolve(p("links/todir/.."))
    assert isinstance(up, Node) and up.path == p("dir")
    # leaving the repository and the mount point with '..'
    assert ns.resolve(p("..")) == ns.resolve(b"/cvmfs")
    top = ns.resolve(p("../.."))
    assert isinstance(top, Node) and top.kind == "outside" and top.outside_path == b"/"
    esc = ns.resolve(p("links/up_and_out/x"))
    assert isinstance(esc, Node) and esc.outside_path == b"/tmp/x"
    # nested catalogs are transparent, also for symlinks leaving them
    back = ns.resolve(p("nested/inner/deeper/back_to_root"))
    assert isinstance(back, Node) and back.path == p("hello.txt")


def test_absolute_symlink_into_another_path_of_the_mount(mounted: Mounted) -> None:
    # symlink targets naming /cvmfs/<fqrn>/… resolve inside, across the mount root
    ns = mounted.ns
    node = ns.resolve(f"/cvmfs/{FQRN}/links/dotdot/links/dot/rel".encode())
    assert isinstance(node, Node) and node.path == mounted.path("hello.txt")


def test_variant_symlinks_use_the_callers_environment(mounted: Mounted) -> None:
    ns, p = mounted.ns, mounted.path
    a = ns.resolve(p("variant/pick"), env={})
    b = ns.resolve(p("variant/pick"), env={"WHICH": "b"})
    assert isinstance(a, Node) and a.path == p("variant/a.txt") and a.env_dependent
    assert isinstance(b, Node) and b.path == p("variant/b.txt")
    # $(NAME) unset -> empty string -> ".txt" does not exist; set -> picks
    assert ns.resolve(p("variant/bare"), env={}) == errno.ENOENT
    bare = ns.resolve(p("variant/bare"), env={"WHICH": "a"})
    assert isinstance(bare, Node) and bare.path == p("variant/a.txt")
    # lstat shows the expanded target and its length
    link = ns.resolve(p("variant/pick"), follow=False, env={"WHICH": "bb"})
    assert isinstance(link, Node) and link.target == b"bb.txt" and link.size == 6
    again = ns.resolve(p("variant/pick"), follow=False, env={"WHICH": "b"})
    assert isinstance(again, Node) and again.target == b"b.txt"  # not the cached bb.txt
    top = ns.resolve(p("variant/top/hostname"), env={})
    assert isinstance(top, Node) and top.outside_path == b"/etc/hostname"
    plain = ns.resolve(p("hello.txt"))
    assert isinstance(plain, Node) and not plain.env_dependent


def test_hardlinks_share_an_inode(mounted: Mounted) -> None:
    nodes = [mounted.ns.resolve(mounted.path(f"hard/{n}")) for n in ("h1", "h2", "h3", "single")]
    assert all(isinstance(n, Node) for n in nodes)
    inos = [n.ino for n in nodes if isinstance(n, Node)]
    assert inos[0] == inos[1] == inos[2] != inos[3]
    assert [n.nlink for n in nodes if isinstance(n, Node)] == [3, 3, 3, 1]


def test_inodes_stable_and_distinct(mounted: Mounted) -> None:
    seen: dict[int, str] = {}
    for rel in source_paths(mounted.src):
        node = mounted.ns.resolve(mounted.path(rel), follow=False)
        assert isinstance(node, Node), rel
        again = mounted.ns.resolve(mounted.path(rel), follow=False)
        assert isinstance(again, Node) and again.ino == node.ino
        if rel.startswith("hard/h"):
            continue
        assert node.ino not in seen, (rel, seen.get(node.ino))
        seen[node.ino] = rel


def test_listdir_like_scandir(mounted: Mounted) -> None:
    ns = mounted.ns
    dirs = [
        d
        for d in source_paths(mounted.src)
        if os.path.isdir(full := os.path.join(mounted.src, d)) and not os.path.islink(full)
    ]
    for rel in [*dirs, "links/todir", "links/dotdot"]:
        got = ns.listdir(mounted.path(rel))
        assert not isinstance(got, int), rel
        names = [n for n, _, _ in got]
        assert names[:2] == [b".", b".."]
        with os.scandir(os.path.join(mounted.src, rel)) as it:
            want = sorted(
                (
                    os.fsencode(e.name),
                    DT_DIR
                    if e.is_dir(follow_symlinks=False)
                    else DT_LNK
                    if e.is_symlink()
                    else DT_REG
                    if e.is_file(follow_symlinks=False)
                    else 1,
                )
                for e in it
            )
        assert sorted((n, t) for n, t, _ in got[2:]) == want, rel
        me = ns.resolve(mounted.path(rel))
        parent = ns.resolve(mounted.path(rel) + b"/..")
        assert isinstance(me, Node) and isinstance(parent, Node)
        assert got[0][2] == me.ino and got[1][2] == parent.ino, rel
        for name, _, ino in got[2:]:
            child = ns.resolve(mounted.path(rel) + b"/" + name, follow=False)
            assert isinstance(child, Node) and child.ino == ino, (rel, name)
    assert ns.listdir(mounted.path("hello.txt")) == errno.ENOTDIR
    assert ns.listdir(mounted.path("nope")) == errno.ENOENT
    assert ns.listdir(mounted.path("links/outside")) == errno.EXDEV


def test_mount_root_and_unknown_repositories(
    mounted: Mounted, caplog: pytest.LogCaptureFixture
) -> None:
    ns = mounted.ns
    root = ns.resolve(b"/cvmfs")
    assert isinstance(root, Node) and root.kind == "dir" and stat.S_ISDIR(root.mode)
    listing = ns.listdir(b"/cvmfs/")
    assert not isinstance(listing, int)
    assert (FQRN.encode(), DT_DIR) in [(n, t) for n, t, _ in listing]
    with caplog.at_level(logging.INFO, logger="hep_exec"):
        assert ns.resolve(b"/cvmfs/unknown.example.org/x") == errno.ENOENT
        assert ns.resolve(b"/cvmfs/unknown.example.org") == errno.ENOENT
    lines = [r.getMessage() for r in caplog.records]
    assert any("/cvmfs/unknown.example.org" in line for line in lines)
    assert mounted.server.count("unknown.example.org/.cvmfspublished") == 1  # remembered
    assert ns.resolve(b"/usr/bin/env") == Node(
        "outside", b"/usr/bin/env", outside_path=b"/usr/bin/env"
    )
    assert ns.resolve(b"relative") == errno.EINVAL
    assert ns.resolve(b"") == errno.ENOENT
    assert ns.is_inside(b"/cvmfs/x") and ns.is_inside(b"/cvmfs")
    assert not ns.is_inside(b"/cvmfsx") and not ns.is_inside(b"/usr")


def test_configured_repositories_only(mounted: Mounted) -> None:
    repos = Repositories(mounted.fetcher, configured=[FQRN, "later.example.org"])
    ns = Namespace(repos)
    listing = ns.listdir(b"/cvmfs")
    assert not isinstance(listing, int)
    assert [n for n, _, _ in listing[2:]] == [FQRN.encode(), b"later.example.org"]
    before = mounted.server.count("/.cvmfspublished")
    assert ns.resolve(b"/cvmfs/other.example.org") == errno.ENOENT
    assert mounted.server.count("/.cvmfspublished") == before  # not even asked
    assert isinstance(ns.resolve(f"/cvmfs/{FQRN}/hello.txt".encode()), Node)


def test_file_contents_through_the_cache(mounted: Mounted) -> None:
    repo = mounted.repos.get(FQRN)
    for rel in source_paths(mounted.src):
        full = os.path.join(mounted.src, rel)
        if not rel or os.path.islink(full) or not os.path.isfile(full):
            continue
        node = mounted.ns.resolve(mounted.path(rel))
        assert isinstance(node, Node) and node.entry is not None
        obj = repo.open_object(node.entry)
        try:
            fd = os.open(obj.path, os.O_RDONLY)
            try:
                assert os.fstat(fd).st_size == node.size
                data = os.read(fd, node.size + 1) if node.size < 1 << 20 else b""
                if node.size >= 1 << 20:
                    with open(obj.path, "rb") as f:
                        data = f.read()
            finally:
                os.close(fd)
            assert data == Path(full).read_bytes(), rel
        finally:
            mounted.repos.cache.release(obj)
    assert mounted.server.count("P") == 3  # big.bin: three chunks, each fetched once


def test_open_and_access_decisions(mounted: Mounted) -> None:
    ns, p = mounted.ns, mounted.path
    f = ns.resolve(p("hello.txt"))
    d = ns.resolve(p("dir"))
    ln = ns.resolve(p("links/rel"), follow=False)
    fifo = ns.resolve(p("fifo"))
    private = ns.resolve(p("private"))
    assert isinstance(f, Node) and isinstance(d, Node) and isinstance(ln, Node)
    assert isinstance(fifo, Node) and fifo.kind == "special" and isinstance(private, Node)
    assert open_decision(os.O_RDONLY, f) is None
    assert open_decision(os.O_RDONLY | os.O_CLOEXEC, f) is None
    for flags in (os.O_WRONLY, os.O_RDWR, os.O_RDONLY | os.O_TRUNC, os.O_WRONLY | os.O_APPEND):
        assert open_decision(flags, f) == errno.EROFS
    assert open_decision(os.O_WRONLY | os.O_CREAT, errno.ENOENT) == errno.EROFS
    assert open_decision(os.O_RDONLY, errno.ENOENT) == errno.ENOENT
    assert open_decision(os.O_CREAT | os.O_EXCL | os.O_WRONLY, f) == errno.EEXIST
    assert open_decision(os.O_RDONLY | os.O_DIRECTORY, f) == errno.ENOTDIR
    assert open_decision(os.O_RDONLY | os.O_DIRECTORY, d) is None
    assert open_decision(os.O_WRONLY, d) == errno.EISDIR
    assert open_decision(os.O_RDONLY | os.O_NOFOLLOW, ln) == errno.ELOOP
    assert open_decision(os.O_PATH | os.O_NOFOLLOW, ln) is None
    assert open_decision(os.O_RDONLY, fifo) == errno.ENXIO
    assert open_decision(os.O_RDONLY, private, uid=1000) is None  # 0600, owner = caller
    assert access_decision(os.R_OK, f) is None
    assert access_decision(os.W_OK, f) == errno.EROFS
    assert access_decision(os.X_OK, f, uid=1000) == errno.EACCES
    ex = ns.resolve(p("exec.sh"))
    assert access_decision(os.X_OK | os.R_OK, ex, uid=1000) is None
    assert access_decision(os.X_OK, d, uid=1000) is None
    assert access_decision(os.F_OK, errno.ENOENT) == errno.ENOENT


def test_lookups_are_cheap_after_the_first(mounted: Mounted) -> None:
    """Catalog lookups are cached per repository: resolving twice asks nothing new."""
    repo = mounted.repos.get(FQRN)
    path = mounted.path("nested/inner/deeper/y.txt")
    mounted.ns.resolve(path)
    catalogs = repo.catalogs_loaded
    requests = sum(mounted.server.requests.values())
    for _ in range(100):
        assert isinstance(mounted.ns.resolve(path), Node)
    assert repo.catalogs_loaded == catalogs == 3
    assert sum(mounted.server.requests.values()) == requests
