"""preload against real nginx servers on loopback, with published repositories and the fixture."""

from __future__ import annotations

import datetime as dt
import fcntl
import json
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from cvmfs_format.catalog import CatalogTree
from cvmfs_format.manifest import parse_manifest
from cvmfs_format.objects import Suffix, parse_object_path, verify_object, verify_stored
from cvmfs_format.store import LocalRepository
from cvmfs_format.verify import loading, open_tree, verify_ensemble, verify_repository, walk
from cvmfs_format.whitelist import load_public_key
from tests.support.network import free_port
from tests.support.nginx import Nginx, Site
from tests.support.repos import PROJECT, Repo, publish_tree, unpack_fixture

FQRN = "sel.example.org"


def run_preload(spec: Path, *args: str, timeout: float = 120) -> subprocess.CompletedProcess[str]:
    env = {**os.environ, "PYTHONPATH": str(PROJECT)}
    return subprocess.run(
        [sys.executable, "-m", "preload.cli", "--spec", str(spec), *args],
        env=env,
        capture_output=True,
        text=True,
        timeout=timeout,
    )


def write_spec(
    path: Path, store: Path, repo: Repo, servers: list[str], rules: str = "", extra: str = ""
) -> Path:
    server_lines = "".join(f"      - {s}\n" for s in servers)
    path.write_text(
        f"store: {store}\nconcurrency: 4\ntimeout: 5\nretries: 1\nbackoff_init: 0.05\n"
        f"backoff_max: 0.1\nrepositories:\n  - name: {repo.fqrn}\n    servers:\n{server_lines}"
        f"    keys: {repo.keys_dir}\n{rules}{extra}"
    )
    return path


def data_files(repo_dir: Path) -> set[str]:
    return {str(p.relative_to(repo_dir)) for p in (repo_dir / "data").rglob("*") if p.is_file()}


def snapshot(d: Path) -> dict[str, bytes]:
    return {str(p.relative_to(d)): p.read_bytes() for p in d.rglob("*") if p.is_file()}


def check_objects_named_right(repo_dir: Path) -> None:
    """Every file under data/ is a complete object: its bytes hash to its name."""
    for rel in data_files(repo_dir):
        name = parse_object_path(rel)
        verify_stored((repo_dir / rel).read_bytes(), name.hash, rel)


def verify_selected(store: Path, repo: Repo, paths: set[str]) -> None:
    """Signature chain of the stored ensemble, and every selected file readable and intact."""
    local = LocalRepository(store, repo.fqrn)
    key = load_public_key(repo.master_pub.read_bytes(), str(repo.master_pub))
    manifest = verify_ensemble(
        local.read_manifest(),
        local.read(".cvmfswhitelist"),
        local.read,
        repo.fqrn,
        [key],
        dt.datetime.now(dt.UTC),
    )
    tree = open_tree(local.read, manifest)

    def attach(ref):
        stored = local.read(ref.hash.object_path(Suffix.CATALOG))
        from cvmfs_format.catalog import Catalog

        tree.attach(ref.path, Catalog(verify_object(stored, ref.hash), ref.path))

    for path in paths:
        entry = loading(attach, lambda p=path: tree.lookup(p))  # type: ignore[misc]
        assert entry is not None and entry.is_regular, path
        if entry.is_chunked:
            parts = [(c.hash, Suffix.PARTIAL) for c in tree.chunks(path)]
        else:
            assert entry.hash is not None
            parts = [(entry.hash, Suffix.FILE)]
        data = b"".join(verify_object(local.read(h.object_path(s)), h, path) for h, s in parts)
        assert len(data) == entry.size
    check_objects_named_right(local.dir)


def expected_objects(repo: Repo, paths: set[str], mountpoints: set[str]) -> set[str]:
    """Object paths a selection of ``paths`` needs, computed from the source repository."""
    local = repo.local
    manifest = parse_manifest(local.read_manifest()).manifest
    tree = open_tree(local.read, manifest)
    out = set()
    for e in walk(tree, local.read):
        if e.path in paths:
            if e.is_chunked:
                out |= {c.hash.object_path(Suffix.PARTIAL) for c in tree.chunks(e.path)}
            else:
                assert e.hash is not None
                out.add(e.hash.object_path())
    cats: dict[str, str] = {"": manifest.root_catalog.object_path(Suffix.CATALOG)}
    assert isinstance(tree, CatalogTree)
    for mp in tree.catalogs:
        for ref in tree.nested_refs(mp):
            cats[ref.path] = ref.hash.object_path(Suffix.CATALOG)
    out |= {cats[m] for m in mountpoints}
    assert manifest.certificate is not None
    out.add(manifest.certificate.object_path(Suffix.CERTIFICATE))
    return out


def make_tree(root: Path) -> Path:
    files = {
        "a.txt": b"top level\n",
        "b.txt": b"not selected\n",
        "sw/.cvmfscatalog": b"",
        "sw/README": b"sw readme\n",
        "sw/v1/.cvmfscatalog": b"",
        "sw/v1/bin/tool": b"#!/bin/sh\necho v1\n",
        "sw/v1/lib/libx.so": b"libx" * 1000,
        "sw/v1/share/doc.txt": b"docs v1\n",
        "sw/v2/.cvmfscatalog": b"",
        "sw/v2/bin/tool": b"#!/bin/sh\necho v2\n",
        "sw/v2/lib/liby.so": b"liby" * 1000,
        "etc/conf": b"key=value\n",
        "etc/sub/x": b"deeper\n",
        "data/.cvmfscatalog": b"",
        "data/events.dat": os.urandom(20000),
    }
    for rel, data in files.items():
        p = root / rel
        p.parent.mkdir(parents=True, exist_ok=True)
        p.write_bytes(data)
    (root / "sw/v1/lib/big.bin").write_bytes(os.urandom(5 * 1024 * 1024))  # 2 chunks
    os.symlink("bin/tool", root / "sw/v1/tool-link")
    return root


SELECT_RULES = """    include:
      - /sw/v1/*
      - ^/etc/*
      - /sw/v2/bin/tool
      - /a.txt
    exclude:
      - /sw/v1/share
"""
SELECTED = {
    "/a.txt",
    "/etc/conf",
    "/sw/v1/.cvmfscatalog",
    "/sw/v1/bin/tool",
    "/sw/v1/lib/libx.so",
    "/sw/v1/lib/big.bin",
    "/sw/v2/bin/tool",
}


@pytest.fixture
def published(tmp_path: Path) -> Repo:
    repo, _ = publish_tree(
        make_tree(tmp_path / "src"), tmp_path / "origin", FQRN, tmp_path / "keys"
    )
    return repo


def test_selection_from_published_repo_is_exact_and_verifies(
    tmp_path: Path, published: Repo
) -> None:
    nginx = Nginx(tmp_path / "nginx", [Site(root=published.store)])
    try:
        spec = write_spec(
            tmp_path / "s.yaml", tmp_path / "store", published, [nginx.sites[0].url()], SELECT_RULES
        )
        dry = run_preload(spec, "--dry-run", "--json")
        assert dry.returncode == 0, dry.stderr
        (r,) = json.loads(dry.stdout)["repositories"]
        assert r["status"] == "dry-run" and r["files"] == len(SELECTED)
        assert r["to_fetch_objects"] == r["objects"] == 8  # 6 distinct files + 2 chunks
        assert not (tmp_path / "store" / FQRN).exists()

        p = run_preload(spec)
        assert p.returncode == 0, p.stderr
        assert "selected 7 files" in p.stdout
        store_dir = tmp_path / "store" / FQRN
        assert data_files(store_dir) == expected_objects(
            published, SELECTED, {"", "/sw", "/sw/v1", "/sw/v2"}
        )
        assert (store_dir / ".cvmfspublished").read_bytes() == (
            published.dir / ".cvmfspublished"
        ).read_bytes()
        verify_selected(tmp_path / "store", published, SELECTED)
        assert not any(p.endswith("data/") for p in nginx.requests())
    finally:
        nginx.stop()


def test_fixture_selection_with_nested_catalogs(tmp_path: Path, fixture_repo: Repo) -> None:
    nginx = Nginx(tmp_path / "nginx", [Site(root=fixture_repo.store)])
    rules = """    include:
      - /needs_migration/*
      - ^/needs_commit_due_to_child/*
      - /foo
    exclude:
      - /needs_migration/doesnt_need_migration
"""
    selected = {
        "/foo",
        "/needs_migration/.cvmfscatalog",
        "/needs_migration/bar",
        "/needs_migration/baz",
        "/needs_migration/foo",
        "/needs_migration/hardlink_bar",
        "/needs_migration/simple_directory/bar",
        "/needs_migration/simple_directory/baz",
        "/needs_migration/simple_directory/foo",
        "/needs_migration/simple_directory/hardlink_foo",
        "/needs_commit_due_to_child/.cvmfscatalog",
        "/needs_commit_due_to_child/bar",
        "/needs_commit_due_to_child/baz",
        "/needs_commit_due_to_child/foo",
    }
    try:
        spec = write_spec(
            tmp_path / "s.yaml", tmp_path / "store", fixture_repo, [nginx.sites[0].url()], rules
        )
        p = run_preload(spec, "--json")
        assert p.returncode == 0, p.stderr
        (r,) = json.loads(p.stdout)["repositories"]
        assert r["files"] == len(selected) and r["catalogs"] == 3
        store_dir = tmp_path / "store" / fixture_repo.fqrn
        assert data_files(store_dir) == expected_objects(
            fixture_repo, selected, {"", "/needs_migration", "/needs_commit_due_to_child"}
        )
        verify_selected(tmp_path / "store", fixture_repo, selected)

        # everything: the store is a full replica and passes the full verification
        full = write_spec(
            tmp_path / "all.yaml", tmp_path / "all", fixture_repo, [nginx.sites[0].url()]
        )
        assert run_preload(full).returncode == 0
        local = LocalRepository(tmp_path / "all", fixture_repo.fqrn)
        report = verify_repository(local.read, parse_manifest(local.read_manifest()).manifest)
        assert report.catalogs == 7
    finally:
        nginx.stop()


@pytest.mark.parametrize("failure", ["down", "http500", "corrupt"])
def test_failover_to_second_server(tmp_path: Path, published: Repo, failure: str) -> None:
    sites = [Site(root=published.store)]
    if failure == "http500":
        sites.append(Site(status=500))
    elif failure == "corrupt":
        bad = tmp_path / "bad"
        shutil.copytree(published.store, bad)
        victim = expected_objects(published, {"/sw/v1/lib/libx.so"}, set()) - {
            x for x in data_files(bad / FQRN) if x.endswith("X")
        }
        (rel,) = victim
        (bad / FQRN / rel).write_bytes(b"\x78\x9cnot the right bytes")
        sites.append(Site(root=bad))
    nginx = Nginx(tmp_path / "nginx", sites)
    try:
        first = (
            f"http://127.0.0.1:{free_port()}/cvmfs/@fqrn@" if failure == "down" else sites[1].url()
        )
        spec = write_spec(
            tmp_path / "s.yaml",
            tmp_path / "store",
            published,
            [first, sites[0].url()],
            SELECT_RULES,
        )
        p = run_preload(spec, "--json")
        assert p.returncode == 0, p.stderr
        (r,) = json.loads(p.stdout)["repositories"]
        reason = {"down": "connection refused", "http500": "HTTP 500", "corrupt": "hash mismatch"}[
            failure
        ]
        assert any(reason in f and "switched to server" in f for f in r["failover"]), r
        assert reason in p.stderr
        verify_selected(tmp_path / "store", published, SELECTED)
    finally:
        nginx.stop()


def test_all_servers_down_fails_cleanly_and_store_is_unchanged(
    tmp_path: Path, published: Repo
) -> None:
    nginx = Nginx(tmp_path / "nginx", [Site(root=published.store), Site(status=503)])
    try:
        spec = write_spec(
            tmp_path / "ok.yaml",
            tmp_path / "store",
            published,
            [nginx.sites[0].url()],
            SELECT_RULES,
        )
        assert run_preload(spec).returncode == 0
        before = snapshot(tmp_path / "store" / FQRN)
        dead = f"http://127.0.0.1:{free_port()}/cvmfs/@fqrn@"
        bad = write_spec(
            tmp_path / "bad.yaml",
            tmp_path / "store",
            published,
            [dead, nginx.sites[1].url()],
            SELECT_RULES,
        )
        p = run_preload(bad)
        assert p.returncode == 1
        lines = p.stderr.strip().splitlines()
        assert len(lines) == 1, p.stderr
        assert dead.replace("@fqrn@", FQRN) in lines[0]
        assert nginx.sites[1].url().replace("@fqrn@", FQRN) in lines[0] and "HTTP 503" in lines[0]
        assert snapshot(tmp_path / "store" / FQRN) == before
        fresh = write_spec(tmp_path / "fresh.yaml", tmp_path / "fresh", published, [dead])
        assert run_preload(fresh).returncode == 1
        assert not (tmp_path / "fresh" / FQRN).exists()
    finally:
        nginx.stop()


def test_kill_9_mid_run_then_resume(tmp_path: Path) -> None:
    src = tmp_path / "src"
    for i in range(60):
        (src / "small").mkdir(parents=True, exist_ok=True)
        (src / "small" / f"f{i}").write_bytes(os.urandom(2000))
    (src / "big.bin").write_bytes(os.urandom(12 * 1024 * 1024))  # 3 chunks of 4 MiB
    repo, _ = publish_tree(src, tmp_path / "origin", FQRN, tmp_path / "keys")
    nginx = Nginx(
        tmp_path / "nginx", [Site(root=repo.store, limit_rate="1m"), Site(root=repo.store)]
    )
    store = tmp_path / "store"
    try:
        slow = write_spec(tmp_path / "slow.yaml", store, repo, [nginx.sites[0].url()])
        env = {**os.environ, "PYTHONPATH": str(PROJECT)}
        proc = subprocess.Popen(
            [sys.executable, "-m", "preload.cli", "--spec", str(slow)],
            env=env,
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
        )
        tmp_dir = store / ".preload-tmp" / FQRN

        def sizes(d: Path) -> list[int]:
            out = []
            for p in d.glob("*") if d.is_dir() else []:
                try:
                    out.append(p.stat().st_size)
                except FileNotFoundError:  # renamed meanwhile
                    continue
            return out

        deadline = time.monotonic() + 60
        going = False
        while not going and time.monotonic() < deadline:
            # a chunk half-way through its download, and some small objects already committed
            going = any(s > 100_000 for s in sizes(tmp_dir)) and len(data_files(store / FQRN)) >= 5
            time.sleep(0.05)
        assert going, "the preload never got going"
        proc.send_signal(signal.SIGKILL)
        proc.wait()
        repo_dir = store / FQRN
        assert not (repo_dir / ".cvmfspublished").exists()
        check_objects_named_right(repo_dir)  # nothing partial under data/

        fast = write_spec(tmp_path / "fast.yaml", store, repo, [nginx.sites[1].url()])
        p = run_preload(fast, "--json")
        assert p.returncode == 0, p.stderr
        (r,) = json.loads(p.stdout)["repositories"]
        assert r["objects_present"] > 0 and r["objects_fetched"] > 0
        local = LocalRepository(store, FQRN)
        verify_repository(local.read, parse_manifest(local.read_manifest()).manifest)
        assert not any(tmp_dir.iterdir()) if tmp_dir.exists() else True
    finally:
        nginx.stop()


def test_incremental_fetches_only_new_objects(tmp_path: Path) -> None:
    src = tmp_path / "src"
    for i in range(100):
        (src / f"d{i % 4}").mkdir(parents=True, exist_ok=True)
        (src / f"d{i % 4}" / f"f{i}").write_bytes(os.urandom(1000))
    (src / "d3" / ".cvmfscatalog").write_bytes(b"")
    repo, _ = publish_tree(src, tmp_path / "origin", FQRN, tmp_path / "keys")
    nginx = Nginx(tmp_path / "nginx", [Site(root=repo.store)])
    store = tmp_path / "store"
    try:
        spec = write_spec(tmp_path / "s.yaml", store, repo, [nginx.sites[0].url()])
        assert run_preload(spec).returncode == 0
        after_first = data_files(store / FQRN)
        (src / "d1" / "f5").write_bytes(os.urandom(1000))  # 1% of the files change
        publish_tree(src, tmp_path / "origin", FQRN, tmp_path / "keys")
        everything = {
            e.path
            for e in walk(
                open_tree(repo.local.read, parse_manifest(repo.local.read_manifest()).manifest),
                repo.local.read,
            )
            if e.is_regular
        }
        new = expected_objects(repo, everything, {"", "/d3"}) - after_first
        assert len([n for n in new if not n.endswith(("C", "X"))]) == 1
        n_before = len(nginx.requests())
        p = run_preload(spec, "--json")
        assert p.returncode == 0, p.stderr
        (r,) = json.loads(p.stdout)["repositories"]
        assert r["revision"] == 2 and r["previous_revision"] == 1
        assert r["objects_fetched"] == 1
        fetched = {q.split(f"/cvmfs/{FQRN}/", 1)[1] for q in nginx.requests()[n_before:]}
        assert {f for f in fetched if f.startswith("data/")} == new
        local = LocalRepository(store, FQRN)
        verify_repository(local.read, parse_manifest(local.read_manifest()).manifest)
        # a narrower selection with --prune drops what is no longer referenced
        narrow = write_spec(
            tmp_path / "n.yaml", store, repo, [nginx.sites[0].url()], "    include: [/d0/*]\n"
        )
        p = run_preload(narrow, "--prune", "--json")
        (r,) = json.loads(p.stdout)["repositories"]
        assert r["pruned_objects"] > 0
        left = data_files(store / FQRN)
        assert left == expected_objects(repo, {f for f in everything if f.startswith("/d0/")}, {""})
    finally:
        nginx.stop()


def test_lock_bad_spec_expired_whitelist_proxy_and_file_source(tmp_path: Path) -> None:
    repo = unpack_fixture(tmp_path / "fx", resign=False)  # whitelist expired in 2015
    file_url = f"file://{repo.store}/@fqrn@"
    spec = write_spec(tmp_path / "s.yaml", tmp_path / "store", repo, [file_url])
    p = run_preload(spec)
    assert p.returncode == 1 and "expired" in p.stderr
    assert not (tmp_path / "store" / repo.fqrn).exists()
    assert run_preload(spec, "--allow-expired-whitelist").returncode == 0

    # a dead proxy group falls over to DIRECT
    dead_proxy = f"http://127.0.0.1:{free_port()}"
    nginx = Nginx(tmp_path / "nginx", [Site(root=repo.store)])
    try:
        via = write_spec(
            tmp_path / "p.yaml",
            tmp_path / "store2",
            repo,
            [nginx.sites[0].url()],
            extra=f'    proxies: "{dead_proxy};DIRECT"\n',
        )
        p = run_preload(via, "--allow-expired-whitelist")
        assert p.returncode == 0, p.stderr
        assert "switched to proxy DIRECT" in p.stderr
    finally:
        nginx.stop()

    # a second preload of a locked store is refused
    lock = tmp_path / "store" / ".preload.lock"
    with open(lock, "a+") as f:
        fcntl.flock(f, fcntl.LOCK_EX)
        p = run_preload(spec, "--allow-expired-whitelist")
    assert p.returncode == 3 and "locked" in p.stderr

    bad = tmp_path / "bad.yaml"
    bad.write_text(spec.read_text().replace("concurrency: 4", "concurrency: lots"))
    p = run_preload(bad)
    assert p.returncode == 2
    assert p.stderr.strip() == (
        f"preload: {bad}:2: concurrency: expected an integer in [1, 1024], got 'lots'"
    )
