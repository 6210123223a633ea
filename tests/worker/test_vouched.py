"""A node's jobs vouch for the repository signatures they verified (worker.repo.repository).

The first job that mounts a revision verifies the whole chain (master key, whitelist,
certificate, manifest) and tells the node's cache service; a later job that gets the same
manifest and whitelist and has the same master keys rechecks only what time can change.
Other keys, other bytes or an expired whitelist are verified (or refused) as if nobody had
vouched.
"""

from __future__ import annotations

import datetime as dt
import shutil
import subprocess
import tempfile
from pathlib import Path

import pytest

from cvmfs_format.errors import FormatError
from cvmfs_format.verify import recheck_ensemble, verify_ensemble
from cvmfs_format.whitelist import load_public_key
from tests.support.hep_exec import CLI
from tests.support.node_cache import kill_service, service_stats
from tests.support.repos import Repo, publish_tree
from tests.support.store_server import StoreServer
from tests.support.tracing import env_with, needs_ptrace
from worker.repo.repository import ensemble_digest

FQRN = "vouch.example.org"
NOW = dt.datetime.now(dt.UTC)
BY_NODE = "signature verified by an earlier job of the node"


@pytest.fixture
def repo(tmp_path: Path) -> Repo:
    src = tmp_path / "src"
    (src / "d").mkdir(parents=True)
    (src / "d" / "f").write_bytes(b"vouched for\n")
    return publish_tree(src, tmp_path / "store", FQRN, tmp_path / "keys")[0]


def _ensemble(repo: Repo) -> tuple[bytes, bytes]:
    return (repo.dir / ".cvmfspublished").read_bytes(), (repo.dir / ".cvmfswhitelist").read_bytes()


def test_a_recheck_takes_what_the_full_check_took_and_what_time_changes_it_refuses(
    repo: Repo,
) -> None:
    raw, whitelist = _ensemble(repo)

    def read(path: str) -> bytes:
        return (repo.dir / path).read_bytes()

    key = load_public_key(repo.master_pub.read_bytes(), str(repo.master_pub))
    full = verify_ensemble(raw, whitelist, read, FQRN, [key], NOW)
    assert recheck_ensemble(raw, whitelist, FQRN, NOW) == full
    with pytest.raises(FormatError, match="expired on"):
        recheck_ensemble(raw, whitelist, FQRN, NOW + dt.timedelta(days=400))
    assert recheck_ensemble(raw, whitelist, FQRN, NOW + dt.timedelta(days=400), True) == full
    with pytest.raises(FormatError, match="repository name"):
        recheck_ensemble(raw, whitelist, "other.example.org", NOW)


def test_the_digest_names_bytes_and_keys(repo: Repo, tmp_path: Path) -> None:
    from worker.repo.keys import load_master_keys

    raw, whitelist = _ensemble(repo)
    keys = load_master_keys([repo.master_pub])
    digest = ensemble_digest(FQRN, raw, whitelist, keys)
    assert digest is not None and len(digest) == 64
    assert ensemble_digest(FQRN, raw, whitelist, load_master_keys([repo.master_pub])) == digest
    other = publish_tree(tmp_path / "src", tmp_path / "store2", FQRN, tmp_path / "k2")[0]
    others = {
        ensemble_digest(FQRN, raw + b"\n", whitelist, keys),
        ensemble_digest(FQRN, raw, whitelist + b"\n", keys),
        ensemble_digest("x.example.org", raw, whitelist, keys),
        ensemble_digest(FQRN, raw, whitelist, load_master_keys([other.master_pub])),
    }
    assert digest not in others and len(others) == 4
    # keys that cannot say who they are without parsing: nothing is vouched for
    key = load_public_key(repo.master_pub.read_bytes(), "key")
    assert ensemble_digest(FQRN, raw, whitelist, [key]) is None


@needs_ptrace
def test_a_later_job_takes_what_an_earlier_one_verified_and_only_that(
    repo: Repo, tmp_path: Path
) -> None:
    # a node cache dir with a path short enough for its unix socket
    node = Path(
        tempfile.mkdtemp(prefix="hepv-", dir="/dev/shm" if Path("/dev/shm").is_dir() else None)
    )
    server = StoreServer(repo.store)
    other = publish_tree(tmp_path / "src", tmp_path / "store2", FQRN, tmp_path / "k2")[0]

    def job(keys: Path) -> subprocess.CompletedProcess[str]:
        argv = [*CLI, "--server", server.url, "--keys", str(keys), "--cache-dir", str(node)]
        argv += ["--log-level", "info", "--", "cat", f"/cvmfs/{FQRN}/d/f"]
        return subprocess.run(argv, env=env_with(), capture_output=True, text=True, timeout=120)

    try:
        first, second = job(repo.master_pub), job(repo.master_pub)
        for r in (first, second):
            assert r.returncode == 0 and r.stdout == "vouched for\n", r.stderr
        assert "signature verified)" in first.stderr and BY_NODE not in first.stderr
        assert BY_NODE in second.stderr, second.stderr
        # the first job asked whether its ensemble was vouched for; the second was told at
        # its hello, with no question (a round trip of its mount)
        assert service_stats(node).get("vouched_asked") == 1
        # a job with other master keys verifies for itself: and these do not verify it
        stranger = job(other.master_pub)
        assert stranger.returncode != 0 and stranger.stdout == "", stranger.stderr
        assert "does not verify" in stranger.stderr and BY_NODE not in stranger.stderr
        assert service_stats(node).get("vouched_asked") == 2  # not vouched for: it asked
        # a manifest changed on the server is not the one vouched for: verified, refused
        published = repo.dir / ".cvmfspublished"
        good = published.read_bytes()
        body, sep, signature = good.partition(b"\n--\n")
        published.write_bytes(body.replace(b"\nS1\n", b"\nS2\n") + sep + signature)
        tampered = job(repo.master_pub)
        assert tampered.returncode != 0 and tampered.stdout == "", tampered.stderr
        assert BY_NODE not in tampered.stderr
        published.write_bytes(good)
        assert BY_NODE in job(repo.master_pub).stderr
    finally:
        server.stop()
        kill_service(node)
        shutil.rmtree(node, ignore_errors=True)
