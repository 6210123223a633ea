"""A real squid (Debian package) between a client and hep-proxy: data objects are cached,
``.cvmfspublished`` is fetched again once its max-age has passed."""

from __future__ import annotations

import os
import shutil
import signal
import subprocess
import tempfile
import time
import urllib.request
from collections.abc import Iterator
from pathlib import Path

import pytest

from cvmfs_format.manifest import parse_manifest
from tests.support.network import free_port
from tests.support.proxy_process import ProxyProcess, start_proxy
from tests.support.repos import Repo, publish_tree

FQRN = "squid.example.org"
SQUID = shutil.which("squid") or "/usr/sbin/squid"

CONF = """
http_port 127.0.0.1:{port}
pid_filename {tmp}/squid.pid
access_log stdio:{tmp}/access.log squid
cache_log {tmp}/cache.log
cache_store_log none
coredump_dir {tmp}
netdb_filename none
cache_mem 64 MB
maximum_object_size_in_memory 8 MB
maximum_object_size 64 MB
acl clients src 127.0.0.1/32
http_access allow clients
http_access deny all
cache allow all
refresh_pattern . 0 20% 4320
shutdown_lifetime 1 seconds
"""


@pytest.fixture
def squid() -> Iterator[int]:
    if not Path(SQUID).exists():
        pytest.skip("squid is not installed (Debian package squid)")
    # squid drops privileges to its own user: pytest's tmp_path (mode 0700) is out of reach
    d = Path(tempfile.mkdtemp(prefix="hep-proxy-squid-"))
    os.chmod(d, 0o777)
    port = free_port()
    (d / "squid.conf").write_text(CONF.format(port=port, tmp=d))
    proc = subprocess.Popen(
        [SQUID, "-N", "-f", str(d / "squid.conf")],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    try:
        deadline = time.monotonic() + 30
        while True:
            if proc.poll() is not None:
                log = (d / "cache.log").read_text() if (d / "cache.log").exists() else ""
                pytest.fail(f"squid exited with {proc.returncode}: {log[-2000:]}")
            try:
                urllib.request.urlopen(f"http://127.0.0.1:{port}/", timeout=1).close()
            except urllib.error.HTTPError:
                break  # squid answers (with an error page for a non-proxy request)
            except OSError:
                if time.monotonic() > deadline:
                    pytest.fail("squid did not start")
                time.sleep(0.2)
        yield port
    finally:
        proc.send_signal(signal.SIGTERM)
        try:
            proc.wait(15)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()
        shutil.rmtree(d, ignore_errors=True)


def _via(squid_port: int, url: str) -> tuple[bytes, dict[str, str]]:
    opener = urllib.request.build_opener(
        urllib.request.ProxyHandler({"http": f"http://127.0.0.1:{squid_port}"})
    )
    req = urllib.request.Request(url, headers={"User-Agent": "cvmfs Fuse 2.11.2"})
    with opener.open(req, timeout=10) as r:
        return r.read(), dict(r.headers)


def _origin_hits(p: ProxyProcess, path: str) -> int:
    time.sleep(0.8)  # access log is flushed twice a second
    return sum(
        f'"GET {path} HTTP/1.1" 200' in line for line in p.access_log.read_text().splitlines()
    )


def test_squid_caches_objects_and_refetches_manifest(squid: int, tmp_path: Path) -> None:
    src = tmp_path / "src"
    src.mkdir()
    (src / "a.txt").write_text("revision one\n" * 100)
    repo: Repo
    repo, _ = publish_tree(src, tmp_path / "store", FQRN, tmp_path / "keys")
    p = start_proxy(tmp_path, "--store", str(repo.store), "--manifest-max-age", "4")
    try:
        base = f"http://127.0.0.1:{p.port}/cvmfs/{FQRN}"
        objects = [
            str(x.relative_to(repo.dir)) for x in (repo.dir / "data").glob("??/*") if x.is_file()
        ]
        for rel in objects:
            want = (repo.dir / rel).read_bytes()
            first, h1 = _via(squid, f"{base}/{rel}")
            second, h2 = _via(squid, f"{base}/{rel}")
            assert first == second == want
            assert "MISS" in h1.get("X-Cache", "") and "HIT" in h2.get("X-Cache", ""), (h1, h2)
            assert _origin_hits(p, f"/cvmfs/{FQRN}/{rel}") == 1

        manifest_path = f"/cvmfs/{FQRN}/.cvmfspublished"
        raw, h = _via(squid, base + "/.cvmfspublished")
        assert parse_manifest(raw).manifest.revision == 1
        assert h.get("Cache-Control") == "max-age=4"
        (src / "b.txt").write_text("revision two\n")
        publish_tree(src, repo.store, FQRN, repo.keys_dir)
        raw, h = _via(squid, base + "/.cvmfspublished")
        assert parse_manifest(raw).manifest.revision == 1  # still fresh in squid
        assert "HIT" in h.get("X-Cache", "")
        assert _origin_hits(p, manifest_path) == 1
        time.sleep(4.5)
        raw, h = _via(squid, base + "/.cvmfspublished")
        assert parse_manifest(raw).manifest.revision == 2  # stale: squid went to the origin
        assert _origin_hits(p, manifest_path) == 2
    finally:
        assert p.stop() == 0
