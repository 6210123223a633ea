"""A real squid (Debian package) between a client and hep-proxy: data objects are cached,
``.cvmfspublished`` is fetched again once its max-age has passed."""

from __future__ import annotations

import time
import urllib.request
from collections.abc import Iterator
from pathlib import Path

import pytest

from cvmfs_format.manifest import parse_manifest
from tests.support.proxy_process import ProxyProcess, start_proxy
from tests.support.repos import Repo, publish_tree
from tests.support.squid import Squid, start_squid
from tests.support.waiting import wait_until

FQRN = "squid.example.org"
MAX_AGE = 4


@pytest.fixture
def squid() -> Iterator[Squid]:
    s = start_squid()
    yield s
    s.stop()


def _via(squid: Squid, url: str) -> tuple[bytes, dict[str, str]]:
    opener = urllib.request.build_opener(urllib.request.ProxyHandler({"http": squid.url}))
    req = urllib.request.Request(url, headers={"User-Agent": "cvmfs Fuse 2.11.2"})
    with opener.open(req, timeout=10) as r:
        return r.read(), dict(r.headers)


def _origin_hits(p: ProxyProcess, path: str) -> int:
    """Requests for ``path`` hep-proxy answered so far (all of them: the log is flushed)."""
    return sum(f'"GET {path} HTTP/1.1" 200' in line for line in p.flushed_log())


@pytest.mark.slow
def test_squid_caches_objects_and_refetches_manifest(squid: Squid, tmp_path: Path) -> None:
    src = tmp_path / "src"
    src.mkdir()
    (src / "a.txt").write_text("revision one\n" * 100)
    repo: Repo
    repo, _ = publish_tree(src, tmp_path / "store", FQRN, tmp_path / "keys")
    p = start_proxy(tmp_path, "--store", str(repo.store), "--manifest-max-age", str(MAX_AGE))
    try:
        base = f"http://127.0.0.1:{p.port}/cvmfs/{FQRN}"
        for rel in repo.objects():
            want = (repo.dir / rel).read_bytes()
            first, h1 = _via(squid, f"{base}/{rel}")
            second, h2 = _via(squid, f"{base}/{rel}")
            assert first == second == want
            assert "MISS" in h1.get("X-Cache", "") and "HIT" in h2.get("X-Cache", ""), (h1, h2)
            assert _origin_hits(p, f"/cvmfs/{FQRN}/{rel}") == 1

        manifest_path = f"/cvmfs/{FQRN}/.cvmfspublished"
        raw, h = _via(squid, base + "/.cvmfspublished")
        fetched = time.monotonic()
        assert parse_manifest(raw).manifest.revision == 1
        assert h.get("Cache-Control") == f"max-age={MAX_AGE}"
        (src / "b.txt").write_text("revision two\n")
        publish_tree(src, repo.store, FQRN, repo.keys_dir)
        raw, h = _via(squid, base + "/.cvmfspublished")
        assert parse_manifest(raw).manifest.revision == 1  # still fresh in squid
        assert "HIT" in h.get("X-Cache", "")
        assert _origin_hits(p, manifest_path) == 1

        last_old = fetched  # when squid last answered revision 1

        def revision_2_via_squid() -> bool:
            nonlocal last_old
            raw, _ = _via(squid, base + "/.cvmfspublished")
            if parse_manifest(raw).manifest.revision == 1:
                last_old = time.monotonic()
                return False
            return True

        # squid serves revision 1 from its cache until the max-age has passed, then asks again
        wait_until(
            revision_2_via_squid,
            MAX_AGE + 10,
            what="squid fetching the stale manifest again",
            interval=0.2,
        )
        # and not long before the max-age (squid counts ages in whole seconds: 1 s of slack)
        assert last_old - fetched > MAX_AGE - 1.5
        assert _origin_hits(p, manifest_path) == 2
    finally:
        assert p.stop() == 0
