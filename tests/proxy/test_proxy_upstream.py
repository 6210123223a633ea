"""Upstream fill against a real Stratum-1 stand-in (tests.support.store_server.StoreServer on
loopback serving a published repository): verified fill with one upstream request per object,
corrupted objects refused, single upstream fetch for 200 concurrent misses across worker
processes, manifest never ahead of the store (and a replica marker dropped when it moves on)."""

from __future__ import annotations

import asyncio
import os
from collections.abc import Awaitable, Callable, Iterator
from pathlib import Path

import aiohttp
import pytest

from cvmfs_format.manifest import parse_manifest
from cvmfs_format.objects import Suffix
from cvmfs_format.store import REPLICA_MARKER
from tests.support.proxy_process import ProxyProcess, start_proxy
from tests.support.repos import Repo, publish_tree
from tests.support.store_server import StoreServer
from tests.support.waiting import async_wait_until

FQRN = "up.example.org"
NOWHERE = "data/00/00000000000000000000000000000000000000"


def _up(rel: str) -> str:
    """The URL path the Stratum-1 sees for ``rel``."""
    return f"/cvmfs/{FQRN}/{rel}"


@pytest.fixture
def upstream(tmp_path: Path) -> Iterator[tuple[StoreServer, Repo, Path]]:
    src = tmp_path / "src"
    (src / "pkg").mkdir(parents=True)
    for i in range(4):
        (src / "pkg" / f"f{i}.dat").write_bytes(os.urandom(2000 + i))
    repo, _ = publish_tree(src, tmp_path / "s1", FQRN, tmp_path / "keys")
    s1 = StoreServer(repo.store)
    yield s1, repo, src
    s1.stop()


def _file_object(repo: Repo) -> str:
    """A regular file's object (not a catalog, not the certificate)."""
    return next(r for r in repo.objects() if not r.endswith(("C", "X")))


async def _start(tmp: Path, s1: StoreServer, *extra: str, workers: int = 1) -> ProxyProcess:
    store = tmp / "proxy-store"
    store.mkdir(exist_ok=True)
    return await asyncio.to_thread(
        start_proxy,
        tmp,
        "--store", str(store),
        "--upstream", f"{FQRN}={s1.url}/cvmfs/@fqrn@",
        *extra,
        workers=workers,
    )  # fmt: skip


async def _stop(p: ProxyProcess) -> None:
    assert await asyncio.to_thread(p.stop) == 0
    assert "Traceback" not in p.errors(), p.errors()


async def test_fill_manifest_then_objects(
    upstream: tuple[StoreServer, Repo, Path], tmp_path: Path
) -> None:
    s1, repo, _ = upstream
    p = await _start(tmp_path, s1)
    local = tmp_path / "proxy-store" / FQRN
    try:
        async with aiohttp.ClientSession() as http:
            async with http.get(p.url(f"/cvmfs/{FQRN}/.cvmfspublished")) as r:
                assert r.status == 200
                raw = await r.read()
            assert raw == (repo.dir / ".cvmfspublished").read_bytes()
            m = parse_manifest(raw).manifest
            assert m.certificate is not None
            catalog = m.root_catalog.object_path(Suffix.CATALOG)
            certificate = m.certificate.object_path(Suffix.CERTIFICATE)
            # the manifest came from upstream, with what it needs, each asked for once ...
            assert dict(s1.requests) == {
                _up(".cvmfspublished"): 1,
                _up(".cvmfswhitelist"): 1,
                _up(catalog): 1,
                _up(certificate): 1,
            }
            # ... and in the store before the manifest was served
            assert (local / catalog).is_file() and (local / certificate).is_file()
            assert (local / ".cvmfswhitelist").read_bytes() == (
                repo.dir / ".cvmfswhitelist"
            ).read_bytes()
            for rel in repo.objects():
                for _ in range(2):
                    async with http.get(p.url(f"/cvmfs/{FQRN}/{rel}")) as r:
                        assert r.status == 200, rel
                        assert await r.read() == (repo.dir / rel).read_bytes()
                assert (local / rel).read_bytes() == (repo.dir / rel).read_bytes()
                # filled with one upstream request; the second answer came from the store
                assert s1.requests[_up(rel)] == 1, rel
            async with http.get(p.url(f"/cvmfs/{FQRN}/{NOWHERE}")) as r:
                assert r.status == 404
            assert s1.requests[_up(NOWHERE)] == 1  # asked upstream, which has no such object
            # the workers' lock file (a byte per object): there, and never served
            assert (local / "data" / ".fill.lock").is_file()
            async with http.get(p.url(f"/cvmfs/{FQRN}/data/.fill.lock")) as r:
                assert r.status in (400, 404), r.status
            assert sum(s1.requests.values()) == 2 + len(repo.objects()) + 1
    finally:
        await _stop(p)
    assert not [f for f in (local / "data" / "txn").iterdir()]


async def test_corrupted_upstream_object_is_refused(
    upstream: tuple[StoreServer, Repo, Path], tmp_path: Path
) -> None:
    s1, repo, _ = upstream
    rel = _file_object(repo)
    s1.corrupt.add(_up(rel))
    p = await _start(tmp_path, s1)
    local = tmp_path / "proxy-store" / FQRN
    try:
        async with aiohttp.ClientSession() as http:
            async with http.get(p.url(f"/cvmfs/{FQRN}/{rel}")) as r:
                assert r.status == 502
                assert "error=" in r.headers.get("Proxy-Status", "")
            assert s1.requests[_up(rel)] == 1  # the corrupt bytes did come from upstream
            assert not (local / rel).exists()
            assert not [f for f in (local / "data" / "txn").iterdir()]
            s1.corrupt.clear()  # upstream repaired: no negative caching, upstream asked again
            async with http.get(p.url(f"/cvmfs/{FQRN}/{rel}")) as r:
                assert r.status == 200
                assert await r.read() == (repo.dir / rel).read_bytes()
            assert s1.requests[_up(rel)] == 2
            async with http.get(p.url(f"/cvmfs/{FQRN}/{rel}")) as r:
                assert r.status == 200
            assert s1.requests[_up(rel)] == 2  # stored now: served without upstream
    finally:
        await _stop(p)
    assert "content hash mismatch" in p.errors()


async def test_200_concurrent_misses_make_one_upstream_fetch(
    upstream: tuple[StoreServer, Repo, Path], tmp_path: Path
) -> None:
    s1, repo, _ = upstream
    s1.delay, s1.delay_data_only = 0.5, True
    rel = _file_object(repo)
    body = (repo.dir / rel).read_bytes()
    p = await _start(tmp_path, s1, workers=2)
    try:
        connector = aiohttp.TCPConnector(limit=0, force_close=True)
        async with aiohttp.ClientSession(connector=connector) as http:

            async def one() -> tuple[int, bytes]:
                async with http.get(p.url(f"/cvmfs/{FQRN}/{rel}")) as r:
                    return r.status, await r.read()

            results = await asyncio.gather(*(one() for _ in range(200)))
        assert all(r == (200, body) for r in results)
        assert s1.requests[_up(rel)] == 1
        assert sum(s1.requests.values()) == 1  # nothing else was asked for
    finally:
        await _stop(p)


@pytest.mark.slow  # two manifest_max_age periods
async def test_manifest_never_ahead_of_the_store(
    upstream: tuple[StoreServer, Repo, Path], tmp_path: Path
) -> None:
    s1, repo, src = upstream
    p = await _start(tmp_path, s1, "--manifest-max-age", "1")
    url = p.url(f"/cvmfs/{FQRN}/.cvmfspublished")
    local = tmp_path / "proxy-store" / FQRN
    try:
        async with aiohttp.ClientSession() as http:

            async def served_revision() -> int:
                async with http.get(url) as r:
                    assert r.status == 200
                    return parse_manifest(await r.read()).manifest.revision

            assert await served_revision() == 1
            # say the store held all of revision 1 (as a whole-repository preload leaves it)
            (local / REPLICA_MARKER).write_bytes(b"")
            # upstream publishes revision 2, but its root catalog cannot be fetched yet
            (src / "pkg" / "new.dat").write_bytes(b"new in revision 2\n")
            await asyncio.to_thread(publish_tree, src, repo.store, FQRN, repo.keys_dir)
            new = parse_manifest((repo.dir / ".cvmfspublished").read_bytes()).manifest
            catalog = new.root_catalog.object_path(Suffix.CATALOG)
            s1.missing.add(_up(catalog))

            async def tried_revision_2() -> bool:
                assert await served_revision() == 1  # never the manifest the store lacks
                return s1.requests[_up(catalog)] >= 1

            # once manifest_max_age has passed, a manifest request makes the proxy look
            # upstream, see revision 2 and ask for its catalog (in vain)
            tried: Callable[[], bool | Awaitable[bool]] = tried_revision_2  # (typed for mypy)
            await async_wait_until(
                tried,
                10,
                what="the proxy asking upstream for the new catalog",
                interval=0.05,
            )
            assert await served_revision() == 1
            assert (local / REPLICA_MARKER).is_file()  # still all of revision 1
            tries = s1.requests[_up(catalog)]
            s1.missing.clear()

            async def adopted_revision_2() -> bool:
                revision = await served_revision()
                if revision == 2:
                    assert (local / catalog).is_file()  # the store backs what was served
                return revision == 2

            adopted: Callable[[], bool | Awaitable[bool]] = adopted_revision_2
            await async_wait_until(adopted, 10, what="the proxy adopting revision 2", interval=0.05)
            assert s1.requests[_up(catalog)] == tries + 1  # filled with one request
            # the store now publishes a revision it holds only some objects of
            assert not (local / REPLICA_MARKER).exists()
            async with http.get(p.url(f"/cvmfs/{FQRN}/{REPLICA_MARKER}")) as r:
                assert r.status == 404
    finally:
        await _stop(p)


@pytest.mark.slow
async def test_an_upstream_that_times_out_is_said_so_in_words(
    upstream: tuple[StoreServer, Repo, Path], tmp_path: Path
) -> None:
    """The log said `TimeoutError: ` (an exception's name and its empty message)."""
    s1, repo, _ = upstream
    s1.delay, s1.delay_data_only = 2.0, True
    conf = tmp_path / "proxy.yaml"
    conf.write_text("upstream_timeout: 0.5\n")
    p = await _start(tmp_path, s1, "--config", str(conf))
    rel = _file_object(repo)
    try:
        async with aiohttp.ClientSession() as http, http.get(p.url(f"/cvmfs/{FQRN}/{rel}")) as r:
            assert r.status == 502
    finally:
        await _stop(p)
    assert f"{s1.url}/cvmfs/{FQRN}/{rel}: no data for 0.5 s" in p.errors(), p.errors()
    assert "TimeoutError" not in p.errors()


async def test_fill_through_a_forward_proxy(
    upstream: tuple[StoreServer, Repo, Path], tmp_path: Path
) -> None:
    """``--upstream-proxy``: the fill goes through the site squid (absolute-URI requests,
    CVMFS_HTTP_PROXY syntax), and the bytes are still verified and the same."""
    from tests.support.squid import start_squid

    s1, repo, _ = upstream
    squid = await asyncio.to_thread(start_squid)
    try:
        p = await _start(tmp_path, s1, "--upstream-proxy", f"{squid.url};DIRECT")
        obj = _file_object(repo)
        try:
            async with (
                aiohttp.ClientSession() as http,
                http.get(p.url(f"/cvmfs/{FQRN}/{obj}")) as r,
            ):
                assert r.status == 200
                assert await r.read() == (repo.dir / obj).read_bytes()
        finally:
            await _stop(p)
        await async_wait_until(
            lambda: any(_up(obj) in line for line in squid.log()), what="squid's log line"
        )
        assert any(f"{s1.url}{_up(obj)}" in line for line in squid.log()), squid.log()
    finally:
        await asyncio.to_thread(squid.stop)
