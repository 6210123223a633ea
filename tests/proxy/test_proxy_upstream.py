"""Upstream fill against a real Stratum-1 stand-in (an aiohttp server on loopback serving a
published repository): verified fill, corrupted objects refused, single upstream fetch for
200 concurrent misses across worker processes, manifest never ahead of the store."""

from __future__ import annotations

import asyncio
import os
from collections import Counter
from collections.abc import AsyncIterator
from dataclasses import dataclass, field
from pathlib import Path

import aiohttp
import pytest
from aiohttp import web

from cvmfs_format.manifest import parse_manifest
from cvmfs_format.objects import Suffix
from tests.support.proxy_process import ProxyProcess, start_proxy
from tests.support.repos import Repo, publish_tree

FQRN = "up.example.org"


@dataclass
class Stratum1:
    """A static server for ``store`` with request counting, delays and fault injection."""

    store: Path
    port: int = 0
    delay: float = 0.0
    hits: Counter[str] = field(default_factory=Counter)
    corrupt: set[str] = field(default_factory=set)
    missing: set[str] = field(default_factory=set)

    async def handle(self, request: web.Request) -> web.StreamResponse:
        path = request.path
        self.hits[path] += 1
        if self.delay and "/data/" in path:
            await asyncio.sleep(self.delay)
        rel = path.removeprefix("/cvmfs/")
        if rel in self.missing or ".." in rel:
            raise web.HTTPNotFound()
        try:
            body = (self.store / rel).read_bytes()
        except OSError:
            raise web.HTTPNotFound() from None
        if rel in self.corrupt:
            body = body[:-1] + bytes([body[-1] ^ 0xFF])
        return web.Response(body=body, content_type="application/octet-stream")

    def rel(self, relpath: str) -> str:
        return f"{FQRN}/{relpath}"


@pytest.fixture
async def upstream(tmp_path: Path) -> AsyncIterator[tuple[Stratum1, Repo, Path]]:
    src = tmp_path / "src"
    (src / "pkg").mkdir(parents=True)
    for i in range(4):
        (src / "pkg" / f"f{i}.dat").write_bytes(os.urandom(2000 + i))
    repo, _ = publish_tree(src, tmp_path / "s1", FQRN, tmp_path / "keys")
    s1 = Stratum1(repo.store)
    app = web.Application()
    app.router.add_get("/{tail:.*}", s1.handle)
    runner = web.AppRunner(app, access_log=None)
    await runner.setup()
    site = web.TCPSite(runner, "127.0.0.1", 0)
    await site.start()
    s1.port = runner.addresses[0][1]
    yield s1, repo, src
    await runner.cleanup()


def _objects(repo: Repo) -> list[str]:
    return sorted(
        str(p.relative_to(repo.dir)) for p in (repo.dir / "data").glob("??/*") if p.is_file()
    )


async def _start(tmp: Path, s1: Stratum1, *extra: str, workers: int = 1) -> ProxyProcess:
    store = tmp / "proxy-store"
    store.mkdir(exist_ok=True)
    return await asyncio.to_thread(
        start_proxy,
        tmp,
        "--store", str(store),
        "--upstream", f"{FQRN}=http://127.0.0.1:{s1.port}/cvmfs/@fqrn@",
        *extra,
        workers=workers,
    )  # fmt: skip


async def _stop(p: ProxyProcess) -> None:
    assert await asyncio.to_thread(p.stop) == 0
    assert "Traceback" not in p.errors(), p.errors()


async def test_fill_manifest_then_objects(upstream, tmp_path: Path) -> None:
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
            # what the manifest needs is in the store before it is served
            assert (local / m.root_catalog.object_path(Suffix.CATALOG)).is_file()
            assert m.certificate is not None
            assert (local / m.certificate.object_path(Suffix.CERTIFICATE)).is_file()
            assert (local / ".cvmfswhitelist").read_bytes() == (
                repo.dir / ".cvmfswhitelist"
            ).read_bytes()
            for rel in _objects(repo):
                for _ in range(2):
                    async with http.get(p.url(f"/cvmfs/{FQRN}/{rel}")) as r:
                        assert r.status == 200, rel
                        assert await r.read() == (repo.dir / rel).read_bytes()
                assert (local / rel).read_bytes() == (repo.dir / rel).read_bytes()
                assert s1.hits[f"/cvmfs/{s1.rel(rel)}"] == 1, rel
            async with http.get(
                p.url(f"/cvmfs/{FQRN}/data/00/00000000000000000000000000000000000000")
            ) as r:
                assert r.status == 404
    finally:
        await _stop(p)
    assert not [f for f in (local / "data" / "txn").iterdir()]


async def test_corrupted_upstream_object_is_refused(upstream, tmp_path: Path) -> None:
    s1, repo, _ = upstream
    rel = next(r for r in _objects(repo) if not r.endswith(("C", "X")))
    s1.corrupt.add(s1.rel(rel))
    p = await _start(tmp_path, s1)
    local = tmp_path / "proxy-store" / FQRN
    try:
        async with aiohttp.ClientSession() as http:
            async with http.get(p.url(f"/cvmfs/{FQRN}/{rel}")) as r:
                assert r.status == 502
                assert "error=" in r.headers.get("Proxy-Status", "")
            assert not (local / rel).exists()
            assert not [f for f in (local / "data" / "txn").iterdir()]
            s1.corrupt.clear()  # upstream repaired: no negative caching
            async with http.get(p.url(f"/cvmfs/{FQRN}/{rel}")) as r:
                assert r.status == 200
                assert await r.read() == (repo.dir / rel).read_bytes()
    finally:
        await _stop(p)
    assert "content hash mismatch" in p.errors()


async def test_200_concurrent_misses_make_one_upstream_fetch(upstream, tmp_path: Path) -> None:
    s1, repo, _ = upstream
    s1.delay = 0.5
    rel = next(r for r in _objects(repo) if not r.endswith(("C", "X")))
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
        assert s1.hits[f"/cvmfs/{s1.rel(rel)}"] == 1
    finally:
        await _stop(p)


async def test_manifest_never_ahead_of_the_store(upstream, tmp_path: Path) -> None:
    s1, repo, src = upstream
    p = await _start(tmp_path, s1, "--manifest-max-age", "1")
    url = p.url(f"/cvmfs/{FQRN}/.cvmfspublished")
    try:
        async with aiohttp.ClientSession() as http:
            async with http.get(url) as r:
                assert parse_manifest(await r.read()).manifest.revision == 1
            # upstream publishes revision 2, but its root catalog cannot be fetched yet
            (src / "pkg" / "new.dat").write_bytes(b"new in revision 2\n")
            await asyncio.to_thread(publish_tree, src, repo.store, FQRN, repo.keys_dir)
            new = parse_manifest((repo.dir / ".cvmfspublished").read_bytes()).manifest
            catalog = new.root_catalog.object_path(Suffix.CATALOG)
            s1.missing.add(s1.rel(catalog))
            await asyncio.sleep(1.2)
            async with http.get(url) as r:
                assert r.status == 200
                assert parse_manifest(await r.read()).manifest.revision == 1
            s1.missing.clear()
            await asyncio.sleep(1.2)
            async with http.get(url) as r:
                assert parse_manifest(await r.read()).manifest.revision == 2
            assert (tmp_path / "proxy-store" / FQRN / catalog).is_file()
    finally:
        await _stop(p)
