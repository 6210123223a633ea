"""Fetcher against real loopback servers: fail-over, corruption, single-flight, retries."""

from __future__ import annotations

import random
import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest

from cvmfs_format.errors import FormatError
from cvmfs_format.hashes import ContentHash
from cvmfs_format.objects import parse_object_path
from cvmfs_format.proxies import parse_server_templates
from tests.support.network import dead_url
from tests.support.repos import publish_tree
from tests.support.store_server import BlackHole, StoreServer
from tests.support.trees import make_random_tree
from tests.support.waiting import wait_until
from worker.repo.fetcher import Fetcher, FetchError, NotFound

FQRN = "fetch.example.org"


@dataclass
class Store:
    root: Path
    objects: list[tuple[str, ContentHash, bytes]]  # url path, hash, stored bytes


@pytest.fixture(scope="module")
def store(tmp_path_factory: pytest.TempPathFactory) -> Store:
    base = tmp_path_factory.mktemp("fetch")
    src = make_random_tree(base / "src", random.Random(1), files=40)
    repo, _ = publish_tree(src, base / "store", FQRN, base / "keys")
    objects = [
        (f"/cvmfs/{FQRN}/{rel}", parse_object_path(rel).hash, (repo.dir / rel).read_bytes())
        for rel in repo.objects()
    ]
    return Store(repo.store, objects)


@pytest.fixture
def servers(store: Store) -> Iterator[list[StoreServer]]:
    started = [StoreServer(store.root) for _ in range(2)]
    yield started
    for s in started:
        s.stop()


def fetcher(spec: str, **kw: object) -> Fetcher:
    kw.setdefault("timeout", 2.0)
    return Fetcher(parse_server_templates(spec), **kw).start()  # type: ignore[arg-type]


def test_get_verifies_and_returns_stored_bytes(store: Store, servers: list[StoreServer]) -> None:
    with fetcher(servers[0].url) as f:
        for url, h, stored in store.objects:
            assert f.get(url, h) == stored
        manifest = f.get(f"/cvmfs/{FQRN}/.cvmfspublished")
        assert manifest.startswith(b"C")
        assert f.stats.requests == len(store.objects) + 1
    ua = {h.get("User-Agent", "") for h in servers[0].headers}
    assert all(u.startswith("hep-exec") for u in ua)


def test_dead_first_group_costs_one_attempt(store: Store, servers: list[StoreServer]) -> None:
    dead = dead_url()
    with fetcher(f"{dead};{servers[0].url}") as f:
        for url, h, stored in store.objects[:20]:
            assert f.get(url, h) == stored
        assert f.stats.by_proxy[dead].requests == 1  # then avoided
        assert f.stats.failures == 1


def test_black_hole_proxy_costs_one_timeout(store: Store, servers: list[StoreServer]) -> None:
    hole = BlackHole()
    try:
        with fetcher(f"{hole.url};{servers[0].url}", timeout=0.5) as f:
            for url, h, stored in store.objects[:10]:
                assert f.get(url, h) == stored
            assert f.stats.by_proxy[hole.url].requests == 1
    finally:
        hole.close()


def test_failed_proxy_is_avoided_then_tried_again_after_reset(
    store: Store, servers: list[StoreServer]
) -> None:
    """A proxy that failed is skipped for ``proxy_reset_after`` seconds, then asked again."""
    first, second = servers
    first.fail_first = 1  # its first answer is a 503, later ones are fine
    url, h, stored = store.objects[0]
    with fetcher(f"{first.url};{second.url}", proxy_reset_after=0.3) as f:
        assert f.get(url, h) == stored
        assert (first.requests[url], second.requests[url]) == (1, 1)
        assert f.get(url, h) == stored  # inside the reset time: straight to the second
        assert (first.requests[url], second.requests[url]) == (1, 2)
        state = f.stats.by_proxy[first.url]
        wait_until(lambda: state.dead_until <= time.monotonic(), what="the reset time to pass")
        assert f.get(url, h) == stored  # asked again, and it answers now
        assert (first.requests[url], second.requests[url]) == (2, 2)
        assert state.requests == 2 and state.failures == 1


def test_corrupt_object_is_refetched_elsewhere(store: Store, servers: list[StoreServer]) -> None:
    bad, good = servers
    url, h, stored = store.objects[3]
    bad.corrupt.add(url)
    with fetcher(f"{bad.url};{good.url}") as f:
        assert f.get(url, h) == stored
        assert f.stats.corrupt == 1
    assert bad.requests[url] == 1 and good.requests[url] == 1
    # the retry elsewhere bypasses caches
    assert good.headers[-1].get("Cache-Control") == "no-cache"


@pytest.mark.parametrize("how", ["get", "stream"])
def test_corrupt_everywhere_never_returns_wrong_bytes(
    store: Store, servers: list[StoreServer], how: str
) -> None:
    """``stream``: each answer wrong in its middle, its chunks handed on before its hash said
    so; after the last one too the receiver is told to drop them (None), then the error."""
    url, h, _ = store.objects[4]
    for s in servers:
        (s.corrupt if how == "get" else s.corrupt_middle).add(url)
    seen: list[bytes | None] = []
    with fetcher(f"{servers[0].url}|{servers[1].url}", retries=1, backoff_init=0.01) as f:
        with pytest.raises(FetchError) as info:
            if how == "get":
                f.get(url, h, "the object")
            else:
                seen.extend(f.stream(url, h, "the object"))
        msg = str(info.value)
        assert "the object" in msg and "hash mismatch" in msg and "\n" not in msg
        assert f.stats.corrupt == 4  # two proxies, two rounds
    assert how == "get" or (seen.count(None) == 4 and seen[-1] is None)


def test_stream_hands_on_each_answer_whole_and_ends_once_verified(
    store: Store, servers: list[StoreServer]
) -> None:
    with fetcher(servers[0].url) as f:
        for url, h, stored in store.objects:
            pieces = list(f.stream(url, h, size=len(stored)))
            assert None not in pieces and b"".join(pieces) == stored  # type: ignore[arg-type]


def test_stream_starts_again_when_an_answer_it_handed_on_was_wrong(
    store: Store, servers: list[StoreServer]
) -> None:
    """The wrong answer's chunks were handed on before its hash said so: None tells the
    receiver to start again, and the next server's answer follows whole."""
    bad, good = servers
    url, h, stored = max(store.objects, key=lambda o: len(o[2]))
    bad.corrupt_middle.add(url)
    with fetcher(f"{bad.url};{good.url}") as f:
        pieces = list(f.stream(url, h))
        assert f.stats.corrupt == 1
    assert pieces.count(None) == 1
    cut = pieces.index(None)
    wrong, right = pieces[:cut], pieces[cut + 1 :]
    assert b"".join(wrong) != stored and len(b"".join(wrong)) == len(stored)  # type: ignore[arg-type]
    assert b"".join(right) == stored  # type: ignore[arg-type]
    assert bad.requests[url] == 1 and good.requests[url] == 1


def test_http_errors_fail_over(store: Store, servers: list[StoreServer]) -> None:
    failing, good = servers
    failing.fail_status = 503
    url, h, stored = store.objects[5]
    with fetcher(f"{failing.url};{good.url}") as f:
        assert f.get(url, h) == stored
        # the failing proxy was asked first (it is the first group), then the next one
        assert failing.requests[url] == 1 and good.requests[url] == 1
        assert f.stats.by_proxy[failing.url].failures == 1 and f.stats.failures == 1


def test_not_found_everywhere(store: Store, servers: list[StoreServer]) -> None:
    with fetcher(f"{servers[0].url};{servers[1].url}", retries=3) as f:
        with pytest.raises(NotFound) as info:
            f.get(f"/cvmfs/{FQRN}/data/00/{'0' * 38}")
        assert "not found" in str(info.value)
        assert f.stats.retries == 0  # a 404 everywhere is not retried


def test_load_balancing_inside_a_group(store: Store, servers: list[StoreServer]) -> None:
    with fetcher(f"{servers[0].url}|{servers[1].url}", rng=random.Random(3)) as f:
        for url, h, _ in store.objects:
            f.get(url, h)
    a, b = (sum(s.requests.values()) for s in servers)
    assert a + b == len(store.objects) and a > 5 and b > 5


def test_single_flight(store: Store, servers: list[StoreServer]) -> None:
    """12 threads ask for one object while its answer is held: one request, 11 collapsed."""
    server = servers[0]
    url, h, stored = store.objects[6]
    server.gated.add(url)
    with fetcher(server.url) as f:
        out: list[bytes] = []
        threads = [threading.Thread(target=lambda: out.append(f.get(url, h))) for _ in range(12)]
        for t in threads:
            t.start()
        wait_until(lambda: f.stats.collapsed == 11, what="11 gets joining the one in flight")
        assert server.held[url] == 1 and server.requests[url] == 1
        server.open_gate()
        for t in threads:
            t.join(10)
        assert out == [stored] * 12
        assert server.requests[url] == 1 and f.stats.requests == 1


def test_proxy_killed_mid_run(store: Store, servers: list[StoreServer]) -> None:
    first, second = servers
    with fetcher(f"{first.url};{second.url}") as f:
        for i, (url, h, stored) in enumerate(store.objects):
            if i == len(store.objects) // 2:
                first.stop()
            assert f.get(url, h) == stored
    assert sum(first.requests.values()) > 0 and sum(second.requests.values()) > 0


def test_retry_with_backoff_after_a_transient_failure(
    store: Store, servers: list[StoreServer]
) -> None:
    """The only proxy fails twice (503), then answers: two rounds of retry, then the bytes."""
    only = servers[0]
    only.fail_first = 2
    url, h, stored = store.objects[7]
    with fetcher(only.url, retries=6, backoff_init=0.01, backoff_max=0.05) as f:
        assert f.get(url, h) == stored
        assert only.requests[url] == 3
        assert f.stats.retries == 2 and f.stats.failures == 2


def test_get_many_and_prefetch(store: Store, servers: list[StoreServer]) -> None:
    items: list[tuple[str, ContentHash | None, str]] = [(u, h, "") for u, h, _ in store.objects]
    items.append((f"/cvmfs/{FQRN}/data/00/{'1' * 38}", None, "missing"))
    with fetcher(servers[0].url) as f:
        results = f.get_many(items)
        assert results[:-1] == [s for _, _, s in store.objects]
        assert isinstance(results[-1], NotFound)
        before = sum(servers[0].requests.values())
        fut = f.prefetch(items[:5])
        assert fut.result(10)[:5] == [s for _, _, s in store.objects[:5]]
        assert sum(servers[0].requests.values()) == before + 5


def test_probe(store: Store, servers: list[StoreServer]) -> None:
    dead = dead_url()
    with fetcher(f"{servers[0].url};{dead}") as f:
        report = dict((u, ok) for u, ok, _ in f.probe(f"/cvmfs/{FQRN}/.cvmfspublished"))
    assert report == {servers[0].url: True, dead: False}


def test_direct_is_not_a_server() -> None:
    with pytest.raises(FormatError, match="not an http"):
        Fetcher(parse_server_templates("DIRECT"))


def test_a_blocking_get_hears_why_its_event_loop_could_not_run_it(
    store: Store, servers: list[StoreServer]
) -> None:
    """The hand-back from the fetcher's event loop is a bare lock: a call the loop cannot start
    (it is closing) raises in the caller, never leaves it waiting."""
    url, h, stored = store.objects[0]
    with fetcher(servers[0].url) as f:
        assert f.get(url, h) == stored  # the loop runs
        loop = f._loop
        assert loop is not None

        def refuse(loop: object, coro: object, **kw: object) -> None:
            raise RuntimeError("the event loop is closing")

        loop.call_soon_threadsafe(loop.set_task_factory, refuse)  # type: ignore[arg-type]
        time.sleep(0.1)
        heard: list[BaseException] = []

        def call() -> None:
            try:
                f.get(url, h)
            except RuntimeError as e:
                heard.append(e)

        caller = threading.Thread(target=call, daemon=True)
        caller.start()
        caller.join(10)
        assert not caller.is_alive(), "the caller was left waiting"
        assert [str(e) for e in heard] == ["the event loop is closing"]
        loop.call_soon_threadsafe(loop.set_task_factory, None)
        time.sleep(0.1)
        assert f.get(url, h) == stored  # and the next call goes through
