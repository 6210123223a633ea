"""preload against real nginx servers on loopback, with published repositories and the fixture."""

from __future__ import annotations

import fcntl
import json
import os
import shutil
import signal
from pathlib import Path

import pytest

from cvmfs_format.verify import verify_repository
from tests.support.network import dead_url
from tests.support.nginx import Nginx, Site
from tests.support.preloading import object_requests, run_preload, start_preload, write_spec
from tests.support.repos import Repo, publish_tree, unpack_fixture
from tests.support.stores import (
    check_objects_named_right,
    expected_objects,
    regular_files,
    replica,
    verify_selected,
)
from tests.support.waiting import wait_until

# preload against real nginx sites, most with several runs: not in the fast subset
pytestmark = pytest.mark.slow

FQRN = "sel.example.org"


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


def snapshot(d: Path) -> dict[str, bytes]:
    return {str(p.relative_to(d)): p.read_bytes() for p in d.rglob("*") if p.is_file()}


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
        stored = replica(published, tmp_path / "store")
        assert set(stored.objects()) == expected_objects(
            published, SELECTED, {"", "/sw", "/sw/v1", "/sw/v2"}
        )
        assert (stored.dir / ".cvmfspublished").read_bytes() == (
            published.dir / ".cvmfspublished"
        ).read_bytes()
        assert verify_selected(stored, SELECTED) == 1
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
        stored = replica(fixture_repo, tmp_path / "store")
        assert set(stored.objects()) == expected_objects(
            fixture_repo, selected, {"", "/needs_migration", "/needs_commit_due_to_child"}
        )
        assert verify_selected(stored, selected) == 2

        # everything: the store is a full replica and passes the full verification
        full = write_spec(
            tmp_path / "all.yaml", tmp_path / "all", fixture_repo, [nginx.sites[0].url()]
        )
        p = run_preload(full)
        assert p.returncode == 0, p.stderr
        whole = replica(fixture_repo, tmp_path / "all")
        report = verify_repository(whole.local.read, whole.verified_manifest())
        assert report.catalogs == 7 and report.revision == 2
        assert set(whole.objects()) == expected_objects(fixture_repo)
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
        certificate = {x for x in replica(published, bad).objects() if x.endswith("X")}
        (rel,) = expected_objects(published, {"/sw/v1/lib/libx.so"}, set()) - certificate
        (bad / FQRN / rel).write_bytes(b"\x78\x9cnot the right bytes")
        sites.append(Site(root=bad))
    nginx = Nginx(tmp_path / "nginx", sites)
    try:
        first = f"{dead_url()}/cvmfs/@fqrn@" if failure == "down" else sites[1].url()
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
        assert verify_selected(replica(published, tmp_path / "store"), SELECTED) == 1
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
        p = run_preload(spec)
        assert p.returncode == 0, p.stderr
        before = snapshot(tmp_path / "store" / FQRN)
        dead = f"{dead_url()}/cvmfs/@fqrn@"
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
        assert lines[0].startswith(f"preload: {FQRN}: ")
        assert dead.replace("@fqrn@", FQRN) in lines[0]
        assert nginx.sites[1].url().replace("@fqrn@", FQRN) in lines[0] and "HTTP 503" in lines[0]
        assert snapshot(tmp_path / "store" / FQRN) == before
        fresh = write_spec(tmp_path / "fresh.yaml", tmp_path / "fresh", published, [dead])
        p = run_preload(fresh)
        assert p.returncode == 1 and "connection refused" in p.stderr
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
    stored = replica(repo, store)
    tmp_dir = store / ".preload-tmp" / FQRN

    def sizes(d: Path) -> list[int]:
        out = []
        for p in d.glob("*") if d.is_dir() else []:
            try:
                out.append(p.stat().st_size)
            except FileNotFoundError:  # renamed meanwhile
                continue
        return out

    try:
        slow = write_spec(tmp_path / "slow.yaml", store, repo, [nginx.sites[0].url()])
        proc = start_preload(slow)
        try:
            # a chunk half-way through its download, and some small objects already committed
            wait_until(
                lambda: (
                    proc.poll() is not None
                    or (any(s > 100_000 for s in sizes(tmp_dir)) and len(stored.objects()) >= 5)
                ),
                60,
                what="a chunk half-downloaded and five objects committed",
            )
            proc.send_signal(signal.SIGKILL)
        finally:
            proc.communicate()
        assert proc.returncode == -signal.SIGKILL, "preload finished before it was killed"
        assert not (stored.dir / ".cvmfspublished").exists()
        check_objects_named_right(stored)  # nothing partial under data/
        committed = set(stored.objects())

        fast = write_spec(tmp_path / "fast.yaml", store, repo, [nginx.sites[1].url()])
        since = len(nginx.requests())
        p = run_preload(fast, "--json")
        assert p.returncode == 0, p.stderr
        (r,) = json.loads(p.stdout)["repositories"]
        assert r["objects_present"] > 0 and r["objects_fetched"] > 0
        # resumed: nothing the killed run committed is fetched again
        assert not committed & set(object_requests(nginx, FQRN, since))
        stored.verify()
        assert not tmp_dir.exists() or not any(tmp_dir.iterdir())
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
    stored = replica(repo, store)
    try:
        spec = write_spec(tmp_path / "s.yaml", store, repo, [nginx.sites[0].url()])
        p = run_preload(spec)
        assert p.returncode == 0, p.stderr
        after_first = set(stored.objects())
        (src / "d1" / "f5").write_bytes(os.urandom(1000))  # 1% of the files change
        _, second = publish_tree(src, tmp_path / "origin", FQRN, tmp_path / "keys")
        assert second.revision == 2
        everything = regular_files(repo)
        new = expected_objects(repo, everything, {"", "/d3"}) - after_first
        assert len([n for n in new if not n.endswith(("C", "X"))]) == 1
        n_before = len(nginx.requests())
        p = run_preload(spec, "--json")
        assert p.returncode == 0, p.stderr
        (r,) = json.loads(p.stdout)["repositories"]
        assert r["revision"] == 2 and r["previous_revision"] == 1
        assert r["objects_fetched"] == 1
        assert set(object_requests(nginx, FQRN, n_before)) == new
        assert stored.verify().revision == 2
        # a narrower selection with --prune drops what is no longer referenced
        narrow = write_spec(
            tmp_path / "n.yaml", store, repo, [nginx.sites[0].url()], "    include: [/d0/*]\n"
        )
        p = run_preload(narrow, "--prune", "--json")
        assert p.returncode == 0, p.stderr
        (r,) = json.loads(p.stdout)["repositories"]
        d0 = {f for f in everything if f.startswith("/d0/")}
        left = set(stored.objects())
        assert left == expected_objects(repo, d0, {""})
        assert r["pruned_objects"] == len(after_first | new) - len(left) > 0
        assert verify_selected(stored, d0) == 2
    finally:
        nginx.stop()


def test_expired_whitelist_proxy_and_file_source(tmp_path: Path) -> None:
    repo = unpack_fixture(tmp_path / "fx", resign=False)  # whitelist expired in 2015 (../shared)
    file_url = f"file://{repo.store}/@fqrn@"
    spec = write_spec(tmp_path / "s.yaml", tmp_path / "store", repo, [file_url])
    p = run_preload(spec)
    assert p.returncode == 1 and "expired" in p.stderr
    assert not (tmp_path / "store" / repo.fqrn).exists()
    p = run_preload(spec, "--allow-expired-whitelist")
    assert p.returncode == 0, p.stderr
    assert set(replica(repo, tmp_path / "store").objects()) == expected_objects(repo)

    # a dead proxy group falls over to DIRECT
    dead_proxy = dead_url()
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
        assert set(replica(repo, tmp_path / "store2").objects()) == expected_objects(repo)
    finally:
        nginx.stop()


def test_lock_and_bad_spec(tmp_path: Path, published: Repo) -> None:
    """Needs no ../shared (split from the fixture test above, which skips without it)."""
    spec = write_spec(tmp_path / "s.yaml", tmp_path / "store", published, [dead_url()])
    # a second preload of a locked store is refused, naming the holder
    lock = tmp_path / "store" / ".preload.lock"
    lock.parent.mkdir()
    with open(lock, "a+") as f:
        fcntl.flock(f, fcntl.LOCK_EX)
        p = run_preload(spec)
    assert p.returncode == 3 and "locked" in p.stderr
    assert f"(pid {os.getpid()})" in p.stderr and "another process" not in p.stderr

    bad = tmp_path / "bad.yaml"
    bad.write_text(spec.read_text().replace("concurrency: 4", "concurrency: lots"))
    p = run_preload(bad)
    assert p.returncode == 2
    assert p.stderr.strip() == (
        f"preload: {bad}:2: concurrency: expected an integer in [1, 1024], got 'lots'"
    )
