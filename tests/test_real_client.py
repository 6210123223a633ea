"""The real CernVM-FS client (2.11.5, from ``../shared/reference``) against what we write and
serve: ``cvmfs2`` mounts hep-publish's repositories through hep-proxy (as the server, and as
the forward proxy in front of a static Stratum-1), ``cvmfs_swissknife check`` passes on them,
and ``cvmfs_preload`` replicates from hep-proxy serving a complete preload store and refuses
a partial one. Each test skips, saying why, without the reference or a usable FUSE."""

from __future__ import annotations

import hashlib
import json
import os
import random
import re
import stat
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path

import pytest

from cvmfs_format.magic_xattrs import NAMES as MAGIC_NAMES
from cvmfs_format.manifest import parse_manifest
from cvmfs_format.objects import Suffix, make_object, parse_object_path, verify_object
from cvmfs_format.store import REPLICA_MARKER
from tests.support.nginx import Nginx, Site
from tests.support.preloading import run_preload, write_spec
from tests.support.proxy_process import ProxyProcess, sample_key, start_proxy
from tests.support.reference import Reference, mounted
from tests.support.repos import Repo, add_metainfo, publish_tree
from tests.support.stores import expected_objects, replica
from tests.support.tracing import env_with
from tests.support.trees import make_odd_tree, make_random_tree, make_variant_links

pytestmark = pytest.mark.slow  # real programs and servers

FQRN = "client.example.org"
CLIENT_AGENT = "cvmfs Fuse 2.11.5"
# variant symlinks as the client resolves them: $(WHICH) from cvmfs2's environment, else
# the default after ":-"
VARIANT_ENV = {"WHICH": "b"}
VARIANTS = {"variant/pick": "b.txt", "variant/bare": "b.txt", "variant/top": "/etc"}
XATTR = ("user.project", b"hep-cvmfs-hpc")
EMPTY_OBJECT = make_object(b"")[0].hex  # the object of an empty file


def _hex(relpath: str) -> str:
    """``data/XX/<rest><suffix>`` -> the object's hash in hex."""
    return parse_object_path(relpath).hash.hex


@dataclass(frozen=True)
class Published:
    src: Path
    repo: Repo
    xattr_on: str | None  # a file carrying XATTR (None: the file system has no user xattrs)
    metainfo: str  # the meta-information object (``data/XX/…M``)


@pytest.fixture(scope="module")
def published(tmp_path_factory: pytest.TempPathFactory) -> Published:
    """Every kind of entry: files of many sizes and modes (setuid, 0600, 0444), empty files,
    directories 0700/0750, hardlink groups, relative/absolute/dangling/looping and variant
    symlinks, a FIFO, nested catalogs two deep, a 9 MiB file in three chunks, an xattr; and
    a meta-information object as real repositories have (cvmfs_preload fetches it)."""
    base = tmp_path_factory.mktemp("client")
    src = make_odd_tree(base / "src")
    make_variant_links(src)
    make_random_tree(src / "rnd", random.Random(11), 50, every_kind=True, catalogs=True)
    xattr_on: str | None = "hello.txt"
    try:
        os.setxattr(src / "hello.txt", *XATTR)
    except OSError:
        xattr_on = None
    repo, _ = publish_tree(src, base / "store", FQRN, base / "keys")
    assert (repo.dir / REPLICA_MARKER).is_file()
    metainfo = add_metainfo(repo, b'{"administrator": "tests", "description": "real client"}\n')
    return Published(src, repo, xattr_on, metainfo.object_path(Suffix.METAINFO))


def _entries(root: Path) -> dict[str, tuple[object, ...]]:
    """Path -> what the client must show: type and mode bits, size, link count and bytes of
    regular files, symlink targets (and that a symlink's size is its target's length)."""
    paths = [root]
    for dirpath, dirnames, filenames in os.walk(root):
        paths += [Path(dirpath) / name for name in dirnames + filenames]
    out: dict[str, tuple[object, ...]] = {}
    for p in paths:
        rel = "" if p == root else str(p.relative_to(root))
        st = os.lstat(p)
        if stat.S_ISLNK(st.st_mode):
            target = os.readlink(p)
            out[rel] = ("symlink", st.st_mode, target, st.st_size == len(os.fsencode(target)))
        elif stat.S_ISREG(st.st_mode):
            digest = hashlib.sha256(p.read_bytes()).hexdigest()
            out[rel] = ("file", st.st_mode, st.st_size, st.st_nlink, digest)
        else:  # directories (their size is the source file system's), the FIFO
            out[rel] = ("other", st.st_mode)
    return out


def assert_same_tree(mnt: Path, published: Published) -> None:
    """The mounted tree equals the source tree: names, types, full ``st_mode`` (cvmfs2 shows
    the catalog's mode as it is, setuid bit included; the mount itself is nosuid), sizes,
    link counts, symlink targets (variant ones resolved), bytes, user xattrs."""
    expected = _entries(published.src)
    for rel, target in VARIANTS.items():
        mode = expected[rel][1]
        expected[rel] = ("symlink", mode, target, True)
    got = _entries(mnt)
    assert sorted(got) == sorted(expected)
    wrong = {rel: (got[rel], expected[rel]) for rel in expected if got[rel] != expected[rel]}
    assert not wrong
    modes = {p.lstat().st_mode for p in published.src.rglob("*")}  # all this was compared:
    assert any(m & stat.S_ISUID for m in modes) and stat.S_IFDIR | 0o700 in modes
    if published.xattr_on:
        assert os.getxattr(mnt / published.xattr_on, XATTR[0]) == XATTR[1]


def _client_requests(proxy: ProxyProcess) -> list[tuple[str, int]]:
    """(request target, status) of every access-log line the reference client caused."""
    out = []
    for line in proxy.flushed_log():
        if CLIENT_AGENT in line:
            m = re.search(r'"(?:GET|HEAD) (\S+) HTTP/1\.1" (\d+)', line)
            assert m, line
            out.append((m[1], int(m[2])))
    return out


def test_cvmfs2_mounts_a_published_repository_from_hep_proxy(
    fuse: Reference, published: Published, tmp_path: Path
) -> None:
    proxy = start_proxy(tmp_path / "proxy", "--store", str(published.repo.store))
    try:
        with mounted(
            fuse,
            tmp_path / "client",
            FQRN,
            published.repo.master_pub,
            proxy.url("/cvmfs/@fqrn@"),
            env=VARIANT_ENV,
        ) as mnt:
            assert_same_tree(mnt, published)
        requests = _client_requests(proxy)
    finally:
        assert proxy.stop() == 0
    assert "Traceback" not in proxy.errors()
    assert all(status == 200 for _, status in requests), requests
    served = {target.removeprefix(f"/cvmfs/{FQRN}/") for target, _ in requests}
    # the client took everything from hep-proxy: the signed files, every catalog, and every
    # object but the empty files' (a client never fetches the content of an empty file) and
    # the meta-information (a client has no use for it)
    assert {".cvmfspublished", ".cvmfswhitelist"} <= served
    missing = [o for o in published.repo.objects() if o not in served]
    assert all(_hex(o) == EMPTY_OBJECT or o == published.metainfo for o in missing), missing


def test_cvmfs2_through_hep_proxy_as_forward_proxy_of_a_static_stratum1(
    fuse: Reference, published: Published, tmp_path: Path
) -> None:
    """nginx serves the publisher's output as a plain Stratum-1; the client names it as its
    server and hep-proxy (empty store, upstream fill from nginx) as its HTTP proxy."""
    nginx = Nginx(tmp_path / "nginx", [Site(root=published.repo.store)])
    s1 = nginx.sites[0].url()
    empty = tmp_path / "proxy-store"
    empty.mkdir()
    proxy = start_proxy(tmp_path / "proxy", "--store", str(empty), "--upstream", f"{FQRN}={s1}")
    try:
        with mounted(
            fuse,
            tmp_path / "client",
            FQRN,
            published.repo.master_pub,
            s1,
            proxy=proxy.url(""),
            env=VARIANT_ENV,
        ) as mnt:
            assert_same_tree(mnt, published)
        requests = _client_requests(proxy)
        metrics = proxy.metrics()
        nginx_log = (nginx.dir / "access.log").read_text().splitlines()
    finally:
        nginx.stop()
        assert proxy.stop() == 0
    assert "Traceback" not in proxy.errors()
    # the client's requests reached hep-proxy as absolute URIs naming the Stratum-1 ...
    origin = f"http://127.0.0.1:{nginx.sites[0].port}/cvmfs/{FQRN}/"
    assert requests and all(t.startswith(origin) for t, _ in requests), requests[:5]
    assert all(status == 200 for _, status in requests), requests
    assert {origin + ".cvmfspublished", origin + ".cvmfswhitelist"} <= {t for t, _ in requests}
    # ... which filled its store from nginx; nothing reached nginx but hep-proxy's fills
    assert metrics[sample_key("hep_proxy_upstream_fetches_total", result="ok")] >= len(
        [t for t, _ in requests if "/data/" in t]
    )
    assert nginx_log and not [line for line in nginx_log if CLIENT_AGENT in line]


def test_swissknife_check_passes_on_published_revisions(
    reference: Reference, published: Published, tmp_path: Path
) -> None:
    """Two revisions of the tree (the second with files changed, added and removed), each
    checked over HTTP from hep-proxy, signatures included; a broken whitelist signature is
    caught (so the signatures really are checked)."""
    src = tmp_path / "src"
    make_odd_tree(src)
    make_random_tree(src / "rnd", random.Random(5), 40, catalogs=True)
    store = tmp_path / "store"
    repo, first = publish_tree(src, store, FQRN, published.repo.keys_dir)
    proxy = start_proxy(tmp_path / "proxy", "--store", str(store))
    url = proxy.url(f"/cvmfs/{FQRN}")
    try:
        p = reference.check(url, FQRN, repo.master_pub, tmp_path / "t1")
        assert p.returncode == 0, p.stdout + p.stderr
        (src / "hello.txt").write_bytes(b"changed\n")
        (src / "dir" / "a.txt").unlink()
        (src / "nested" / "inner" / "new.bin").write_bytes(os.urandom(5 << 20))
        _, second = publish_tree(src, store, FQRN, published.repo.keys_dir)
        assert (first.revision, second.revision) == (1, 2)
        p = reference.check(url, FQRN, repo.master_pub, tmp_path / "t2")
        assert p.returncode == 0, p.stdout + p.stderr
        info = reference.run("cvmfs_swissknife", "info", "-r", url, "-v", "-m")
        assert sorted(info.stdout.split()) == ["2", "true"], info  # revision; replica marker
        wl = repo.dir / ".cvmfswhitelist"
        good = wl.read_bytes()
        wl.write_bytes(good[:-5] + bytes([good[-5] ^ 1]) + good[-4:])
        try:
            p = reference.check(url, FQRN, repo.master_pub, tmp_path / "t3")
        finally:
            wl.write_bytes(good)
        assert p.returncode != 0 and "whitelist" in p.stdout + p.stderr, p.stdout + p.stderr
    finally:
        assert proxy.stop() == 0


def _preload_into(store: Path, origin: Repo, rules: str = "") -> None:
    spec = write_spec(
        store.parent / f"{store.name}.yaml", store, origin, [f"file://{origin.store}/@fqrn@"], rules
    )
    p = run_preload(spec, timeout=60)
    assert p.returncode == 0, p.stderr


def _cvmfs_preload(
    reference: Reference, proxy: ProxyProcess, origin: Repo, alien: Path
) -> tuple[subprocess.CompletedProcess[str], list[str]]:
    """``cvmfs_preload`` of FQRN from ``proxy`` into the alien cache ``alien``; its result
    and hep-proxy's access-log lines for the replica marker."""
    scratch = alien.parent / f"{alien.name}-tmp"
    alien.mkdir()
    scratch.mkdir()
    # fmt: off
    p = reference.run(
        "cvmfs_preload", "-u", proxy.url(f"/cvmfs/{FQRN}"), "-r", alien,
        "-k", origin.master_pub, "-m", FQRN, "-x", scratch, "-t", "10",
    )
    # fmt: on
    return p, [line for line in proxy.flushed_log() if REPLICA_MARKER in line]


def _alien_objects(alien: Path) -> dict[str, bytes]:
    """An alien cache's objects (``XX/rest``, stored uncompressed) by full hex name."""
    return {
        p.parent.name + p.name: p.read_bytes()
        for p in alien.glob("??/*")
        if p.is_file() and re.fullmatch(r"[0-9a-f]{38}", p.name)
    }


def test_cvmfs_preload_replicates_from_hep_proxy_serving_a_complete_store(
    reference: Reference, published: Published, tmp_path: Path
) -> None:
    """A store preload wrote from a whole-repository spec is marked; hep-proxy serves the
    marker, and cvmfs_preload replicates the revision: exactly the revision's objects and its
    meta-information (which preload stored for it), each the bytes of the publisher's object
    (an alien cache keeps them uncompressed)."""
    origin = published.repo
    store = tmp_path / "store"
    _preload_into(store, origin)
    assert (store / FQRN / REPLICA_MARKER).is_file()
    proxy = start_proxy(tmp_path / "proxy", "--store", str(store))
    alien = tmp_path / "alien"
    try:
        p, requests = _cvmfs_preload(reference, proxy, origin, alien)
    finally:
        assert proxy.stop() == 0
    assert p.returncode == 0, p.stdout + p.stderr
    assert "Serving revision 1" in p.stdout, p.stdout
    assert requests and all('" 200 ' in line for line in requests), requests
    got = _alien_objects(alien)
    want = {_hex(rel): rel for rel in expected_objects(replica(origin, store))}
    want[_hex(published.metainfo)] = published.metainfo
    assert set(got) == set(want)
    for name, rel in want.items():
        stored = origin.local.read(rel)
        assert got[name] == verify_object(stored, parse_object_path(rel).hash), rel
    manifest = parse_manifest((origin.dir / ".cvmfspublished").read_bytes()).manifest
    breadcrumb = (alien / f"cvmfschecksum.{FQRN}").read_text()
    assert breadcrumb.startswith(manifest.root_catalog.hex)


def test_cvmfs_preload_refuses_a_partial_store(
    reference: Reference, published: Published, tmp_path: Path
) -> None:
    """A store preload wrote from a partial spec is not marked: hep-proxy 404s the marker and
    cvmfs_preload stops, saying the server is not one to replicate from."""
    origin = published.repo
    store = tmp_path / "store"
    _preload_into(store, origin, "    include: [/dir/*]\n")
    assert not (store / FQRN / REPLICA_MARKER).exists()
    proxy = start_proxy(tmp_path / "proxy", "--store", str(store))
    alien = tmp_path / "alien"
    try:
        p, requests = _cvmfs_preload(reference, proxy, origin, alien)
    finally:
        assert proxy.stop() == 0
    assert p.returncode != 0
    assert "This is not a CernVM-FS server for replication" in p.stdout + p.stderr
    assert requests and all('" 404 ' in line for line in requests), requests
    assert not _alien_objects(alien)


# what a program sees of a tree: every regular file's mode, size and bytes, symlink targets
WALK = r"""
import hashlib, json, os, stat, sys
root, out = sys.argv[1], {}
for d, dirs, files in os.walk(root):
    for name in dirs + files:
        p = os.path.join(d, name)
        st, rel = os.lstat(p), os.path.relpath(p, root)
        if stat.S_ISREG(st.st_mode):
            with open(p, "rb") as f:
                digest = hashlib.sha256(f.read()).hexdigest()
            out[rel] = ["file", stat.S_IMODE(st.st_mode), st.st_size, digest]
        elif stat.S_ISLNK(st.st_mode):
            out[rel] = ["symlink", os.readlink(p)]
        else:
            out[rel] = ["other", stat.S_IFMT(st.st_mode)]
print(json.dumps(out, sort_keys=True))
"""


def _site_dir(etc: Path, server: str, published: Published) -> Path:
    """A site's CernVM-FS configuration as a site writes it: proxy for everyone, servers per
    domain (through a variable), the repository's keys directory in its own file."""
    keys = etc / "keys" / "example.org"
    for d in (etc / "domain.d", etc / "config.d", keys):
        d.mkdir(parents=True)
    (keys / f"{FQRN}.pub").write_bytes(published.repo.master_pub.read_bytes())
    (etc / "default.conf").write_text("CVMFS_TIMEOUT=10\nCVMFS_TIMEOUT_DIRECT=10\n")
    (etc / "default.local").write_text("# this site has no squid\nCVMFS_HTTP_PROXY=DIRECT\n")
    (etc / "domain.d" / "example.org.conf").write_text(
        f'SITE_SERVER="{server}"\nCVMFS_SERVER_URL="${{SITE_SERVER}}/cvmfs/@fqrn@"\n'
    )
    (etc / "config.d" / f"{FQRN}.conf").write_text(f"CVMFS_KEYS_DIR={keys}\n")
    return etc


def _under_both(
    fuse: Reference, published: Published, tmp_path: Path, script: str, *args: str
) -> tuple[str, str, set[str]]:
    """``python -c script <root> args`` over the repository under the real client and under
    hep-exec, both through one site configuration and one hep-proxy: (their output, ours,
    the user agents that asked hep-proxy)."""
    proxy = start_proxy(tmp_path / "proxy", "--store", str(published.repo.store))
    try:
        etc = _site_dir(tmp_path / "etc-cvmfs", proxy.url(""), published)
        with mounted(
            fuse, tmp_path / "client", FQRN, published.repo.master_pub, "unused",
            env=VARIANT_ENV, site=etc,
        ) as mnt:  # fmt: skip
            theirs = subprocess.run(
                [sys.executable, "-c", script, str(mnt), *args], capture_output=True, text=True,
                timeout=120, check=True,
            ).stdout  # fmt: skip
        ours = subprocess.run(
            [
                sys.executable, "-m", "worker.cli", "--cvmfs-config", str(etc),
                "--no-shared-cache", "--", sys.executable, "-c", script, f"/cvmfs/{FQRN}", *args,
            ],
            env={**env_with(), **VARIANT_ENV}, capture_output=True, text=True, timeout=180,
        )  # fmt: skip
        assert ours.returncode == 0 and ours.stderr == "", ours.stderr
        agents = {ln.split('"')[-2] for ln in proxy.flushed_log() if "/cvmfs/" in ln}
    finally:
        assert proxy.stop() == 0
    return theirs, ours.stdout, agents


def test_hep_exec_and_cvmfs2_read_the_same_through_one_site_configuration(
    fuse: Reference, published: Published, tmp_path: Path
) -> None:
    """Issue 17: one configuration directory (default.local, domain.d/, config.d/, keys),
    read by the real client and by hep-exec: every file's mode, size and bytes and every
    symlink's target are the same under both, and match the source."""
    theirs, ours, agents = _under_both(fuse, published, tmp_path, WALK)
    # both asked hep-proxy, as the one configuration says
    assert CLIENT_AGENT in agents and any(a.startswith("hep-exec/") for a in agents), agents
    under_cvmfs2, under_hep_exec = json.loads(theirs), json.loads(ours)
    assert under_hep_exec == under_cvmfs2
    files = [rel for rel, what in under_cvmfs2.items() if what[0] == "file"]
    assert len(files) > 50
    for rel in files:
        assert (
            under_cvmfs2[rel][3] == hashlib.sha256((published.src / rel).read_bytes()).hexdigest()
        )


STATS = r"""
import json, os, stat, sys
root, out = sys.argv[1], {}
paths = [root]
for d, dirs, files in os.walk(root):
    paths += [os.path.join(d, name) for name in dirs + files]
for p in paths:
    st, rel = os.lstat(p), os.path.relpath(p, root)
    out[rel] = [st.st_mode, st.st_nlink, st.st_size, st.st_blocks, st.st_blksize, int(st.st_mtime)]
    if stat.S_ISDIR(st.st_mode):
        out[rel + "/"] = os.listdir(p)  # in the order getdents64 gives them
# one file system of its own: one st_dev for every entry, the root a mount point
out["(mount)"] = [
    len({os.lstat(p).st_dev for p in paths}), os.path.ismount(root), os.lstat(root).st_ino
]
print(json.dumps(out, sort_keys=True))
"""


def test_hep_exec_stats_every_entry_as_the_real_client(
    fuse: Reference, published: Published, tmp_path: Path
) -> None:
    """lstat of every entry (files, directories, symlinks, the FIFO, nested catalogs' roots):
    mode, link count, size, st_blocks, st_blksize and mtime as cvmfs2 shows them (2.11.5
    shows whole seconds: the catalog's nanoseconds came with 2.12, as hep-exec shows them),
    every directory's entries in the order it lists them (find, glob, tar), one st_dev for
    the repository, its root a mount point (os.path.ismount, find -xdev) of inode 256.
    Before: st_blocks was rounded up from the size, where the real client counts 1 + size /
    512 (an empty file 1 block, a directory 9: ``du`` said less); directories listed their
    entries last first; the repository had the st_dev of /cvmfs."""
    theirs, ours, _ = _under_both(fuse, published, tmp_path, STATS)
    under_cvmfs2, under_hep_exec = json.loads(theirs), json.loads(ours)
    wrong = {k: (v, under_hep_exec.get(k)) for k, v in under_cvmfs2.items()
             if under_hep_exec.get(k) != v}  # fmt: skip
    assert not wrong
    assert under_hep_exec == under_cvmfs2
    blocks = {v[3] for k, v in under_cvmfs2.items() if len(v) == 6 and not k.endswith("/")}
    assert 1 in blocks and len(under_cvmfs2) > 100  # empty files, and the whole tree
    assert any(len(v) > 2 for k, v in under_cvmfs2.items() if k.endswith("/"))
    assert under_cvmfs2["(mount)"] == [1, True, 256]


MAGIC = r"""
import json, os, sys
root, names, out = sys.argv[1], sys.argv[2].split(","), {}
paths = [root]
for d, dirs, files in os.walk(root):
    paths += [os.path.join(d, name) for name in dirs + files]
for p in paths:
    for name in names:
        try:
            value = os.getxattr(p, name, follow_symlinks=False).decode()
        except OSError as e:
            value = e.strerror
        out[os.path.relpath(p, root) + " " + name] = value
    listed = sorted(set(os.listxattr(p, follow_symlinks=False)))
    out[os.path.relpath(p, root) + " (listed)"] = ",".join(listed)
print(json.dumps(out, sort_keys=True))
"""


def test_hep_exec_shows_the_magic_xattrs_of_the_real_client(
    fuse: Reference, published: Published, tmp_path: Path
) -> None:
    """CernVM-FS's magic extended attributes that follow from the catalog (``attr -g revision
    /cvmfs/<repository>`` tells which revision a node sees; ``user.hash`` an object's hash):
    the same values from hep-exec as from the real client, for every entry of a repository
    with nested catalogs, chunked files, symlinks and a FIFO (none: the kernel's ENODATA for
    user.* names there) and a published attribute; a name neither has is ENODATA under both.
    listxattr lists the same names everywhere but at the repository's root, where the client
    lists its magic ones (twice, in 2.11.5) and hep-exec those of them it answers."""
    names = ",".join(n.decode() for n in MAGIC_NAMES) + f",{XATTR[0]},user.no-such-name"
    theirs, ours, _ = _under_both(fuse, published, tmp_path, MAGIC, names)
    under_cvmfs2, under_hep_exec = json.loads(theirs), json.loads(ours)
    root_theirs, root_ours = under_cvmfs2.pop(". (listed)"), under_hep_exec.pop(". (listed)")
    assert root_ours == "user.fqrn,user.revision,user.root_hash"
    assert set(root_ours.split(",")) <= set(root_theirs.split(",")), root_theirs
    assert under_hep_exec == under_cvmfs2
    values = set(under_cvmfs2.values())  # what was compared
    assert {"zlib", "1", "0", FQRN} <= values
    assert published.xattr_on is None or XATTR[1].decode() in values
    assert any(k.endswith(" user.chunks") and v == "3" for k, v in under_cvmfs2.items())
