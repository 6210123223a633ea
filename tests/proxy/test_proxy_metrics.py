"""Every metric the README lists for hep-proxy's /metrics, against the real server: each name
is exported and moves by exactly what the test did. Each test has a proxy, a store and an
upstream of its own, so what it counts is only what it caused.

With one worker a scrape is exact at once (the worker publishes its own counters before
rendering, and counts a request before answering it); with two, the figures are summed over
workers and the other worker's part arrives within half a second."""

from __future__ import annotations

import socket
import urllib.request
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest

from tests.support.proxy_process import (
    ProxyProcess,
    raw_exchange,
    read_response,
    sample_key,
    start_proxy,
    status_of,
)
from tests.support.repos import Repo, publish_tree
from tests.support.store_server import StoreServer
from tests.support.waiting import wait_until

# every test here runs many real processes: left out of the fast subset (-m 'not slow')
pytestmark = pytest.mark.slow

LOCAL = "metrics.example.org"  # served from the store
FILLED = "filled.example.org"  # filled from the upstream
HEADER_TIMEOUT = 1.0
P = "hep_proxy_"


@dataclass
class Setup:
    proxy: ProxyProcess
    local: Repo
    upstream: StoreServer
    filled: Repo  # the upstream's copy


def _publish(base: Path, fqrn: str) -> Repo:
    src = base / f"src-{fqrn}"
    src.mkdir(parents=True)
    for i in range(3):
        (src / f"f{i}.txt").write_text(f"{fqrn} file {i}\n" * (50 + i))
    repo, _ = publish_tree(src, base / f"store-{fqrn}", fqrn, base / "keys")
    return repo


@pytest.fixture
def setup(request: pytest.FixtureRequest, tmp_path: Path) -> Iterator[Setup]:
    workers = getattr(request, "param", 1)
    local = _publish(tmp_path, LOCAL)
    filled = _publish(tmp_path, FILLED)
    upstream = StoreServer(filled.store)
    fill_store = tmp_path / "fill-store"  # first store: upstream-only repositories go here
    fill_store.mkdir()
    p = start_proxy(
        tmp_path,
        "--store", str(fill_store), "--store", str(local.store),
        "--upstream", f"{FILLED}={upstream.url}/cvmfs/@fqrn@",
        "--allow", "127.0.0.1/32", "--health-allow", "127.0.0.1/32",
        "--header-timeout", str(HEADER_TIMEOUT),
        workers=workers,
    )  # fmt: skip
    try:
        yield Setup(p, local, upstream, filled)
    finally:
        assert p.stop() == 0
        upstream.stop()
    assert "Traceback" not in p.errors(), p.errors()


def _file_objects(repo: Repo) -> list[str]:
    return [r for r in repo.objects() if not r.endswith(("C", "X"))]


def _get(p: ProxyProcess, target: str, extra: str = "") -> int:
    """One request on a connection of its own (so on either worker)."""
    raw = f"GET {target} HTTP/1.1\r\nHost: s1\r\n{extra}Connection: close\r\n\r\n"
    return status_of(raw_exchange(p.port, raw.encode()))


def _moves(
    p: ProxyProcess,
    action: Callable[[], None],
    exactly: dict[str, float],
    at_least: dict[str, float] | None = None,
) -> None:
    """Scrape, run ``action``, scrape again (one worker: exact at once): the samples in
    ``exactly`` grew by exactly their value, those in ``at_least`` by at least theirs."""
    before = p.metrics()
    action()
    after = p.metrics()
    wanted = {**exactly, **(at_least or {})}
    assert not [k for k in wanted if k not in after], sorted(after)
    delta = {k: after[k] - before.get(k, 0.0) for k in wanted}
    assert {k: delta[k] for k in exactly} == exactly
    for k, v in (at_least or {}).items():
        assert delta[k] >= v, (k, delta[k])


@pytest.mark.parametrize("setup", [2], indirect=True)
def test_requests_and_durations_summed_over_workers(setup: Setup) -> None:
    p = setup.proxy
    assert len(p.worker_pids()) == 2
    n = 32  # connections of their own: both workers answer some (SO_REUSEPORT spreads them)
    expected = {
        sample_key(f"{P}requests_total", kind="manifest", status="200"): n,
        sample_key(f"{P}requests_total", kind="other", status="404"): 3,
        sample_key(f"{P}request_duration_seconds_count", kind="manifest"): n,
        sample_key(f"{P}request_duration_seconds_bucket", kind="manifest", le="+Inf"): n,
    }
    before = p.metrics()
    for _ in range(n):
        assert _get(p, f"/cvmfs/{LOCAL}/.cvmfspublished") == 200
    for _ in range(3):
        assert _get(p, "/cvmfs/nothing.example.org/.cvmfspublished") == 404

    def summed() -> dict[str, float] | None:
        now = p.metrics()
        delta = {k: now.get(k, 0.0) - before.get(k, 0.0) for k in expected}
        return delta if all(delta[k] >= v for k, v in expected.items()) else None

    # the other worker publishes its part within half a second
    assert wait_until(summed, 10, what="both workers' counts in /metrics") == expected
    with urllib.request.urlopen(p.url("/metrics"), timeout=10) as r:
        assert r.headers["Content-Type"].startswith("text/plain; version=0.0.4")


def test_response_bytes_and_cache_results(setup: Setup) -> None:
    p = setup.proxy
    rel = _file_objects(setup.local)[0]
    size = (setup.local.dir / rel).stat().st_size

    def requests() -> None:
        # one connection, so one worker: a miss fills its memory cache, then hits
        with socket.create_connection(("127.0.0.1", p.port), timeout=10) as s:
            buf = bytearray()
            for method in ("GET", "GET", "HEAD"):
                s.sendall(f"{method} /cvmfs/{LOCAL}/{rel} HTTP/1.1\r\nHost: s1\r\n\r\n".encode())
                r = read_response(s, buf, head=method == "HEAD")
                assert r.status == 200 and r.header("Content-Length") == str(size)

    _moves(
        p,
        requests,
        {
            sample_key(f"{P}cache_total", result="miss"): 1,
            sample_key(f"{P}cache_total", result="hit"): 2,
            sample_key(f"{P}response_bytes_total", kind="data"): 2 * size,  # HEAD sends none
            sample_key(f"{P}requests_total", kind="data", status="200"): 3,
        },
    )


def test_store_misses(setup: Setup) -> None:
    p = setup.proxy
    absent = f"/cvmfs/{LOCAL}/data/00/{'0' * 38}"
    assert f"{P}store_misses_total" in p.metrics()  # exported before the first miss

    def requests() -> None:
        for _ in range(2):
            assert _get(p, absent) == 404

    _moves(
        p,
        requests,
        {
            f"{P}store_misses_total": 2,
            sample_key(f"{P}requests_total", kind="data", status="404"): 2,
        },
    )


def test_upstream_fetches_by_result_and_bytes(setup: Setup) -> None:
    p, up = setup.proxy, setup.upstream
    ok, corrupt, failing = _file_objects(setup.filled)
    size = (setup.filled.dir / ok).stat().st_size
    missing = f"data/00/{'0' * 38}"  # not in the upstream's store either
    delay = 0.3
    up.corrupt.add(f"/cvmfs/{FILLED}/{corrupt}")

    def requests() -> None:
        up.delay = delay
        assert _get(p, f"/cvmfs/{FILLED}/{ok}") == 200
        up.delay = 0.0
        assert _get(p, f"/cvmfs/{FILLED}/{missing}") == 404
        assert _get(p, f"/cvmfs/{FILLED}/{corrupt}") == 502
        up.fail_status = 500
        assert _get(p, f"/cvmfs/{FILLED}/{failing}") == 502
        up.fail_status = None

    _moves(
        p,
        requests,
        {
            sample_key(f"{P}upstream_fetches_total", result="ok"): 1,
            sample_key(f"{P}upstream_fetches_total", result="missing"): 1,
            sample_key(f"{P}upstream_fetches_total", result="corrupt"): 1,
            sample_key(f"{P}upstream_fetches_total", result="error"): 1,
            f"{P}upstream_bytes_total": size,
            # every answer, errors too (these with no time of their own)
            sample_key(f"{P}request_duration_seconds_count", kind="data"): 4,
        },
        # the answer that waited for the slow upstream took at least that long
        at_least={sample_key(f"{P}request_duration_seconds_sum", kind="data"): delay},
    )
    assert sum(up.requests.values()) == 4


def test_errors(setup: Setup) -> None:
    p, repo = setup.proxy, setup.local
    rel = _file_objects(repo)[0]
    good = (repo.dir / rel).read_bytes()
    (repo.dir / rel).chmod(0o644)
    (repo.dir / rel).write_bytes(good[:-1] + bytes([good[-1] ^ 1]))  # bit rot in the store

    def request() -> None:
        assert _get(p, f"/cvmfs/{LOCAL}/{rel}", "Cache-Control: no-cache\r\n") == 502

    _moves(p, request, {sample_key(f"{P}errors_total", type="corrupt_store"): 1})


def test_rejected_connections(setup: Setup) -> None:
    p = setup.proxy

    def not_allowed() -> None:
        req = b"GET /healthz HTTP/1.1\r\nHost: s1\r\nConnection: close\r\n\r\n"
        assert status_of(raw_exchange(p.port, req, source="127.0.0.2")) == 403

    _moves(p, not_allowed, {sample_key(f"{P}rejected_connections_total", reason="not_allowed"): 1})

    def slow_head() -> None:
        with socket.create_connection(("127.0.0.1", p.port), timeout=HEADER_TIMEOUT + 10) as s:
            s.sendall(b"GET /healthz HTTP/1.1\r\nHost: s1\r\n")  # never finished
            assert s.recv(100) == b""  # the server hangs up

    _moves(p, slow_head, {sample_key(f"{P}rejected_connections_total", reason="header_timeout"): 1})
