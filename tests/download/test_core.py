"""The download manager's decisions (cvmfs_download.core), as values: no I/O."""

from __future__ import annotations

import random

import pytest

from cvmfs_download.core import (
    Attempts,
    Blame,
    Failover,
    GiB,
    Kind,
    MiB,
    Route,
    Settings,
    backoff_delay,
    body_limit,
    classify_status,
    deadline,
)
from cvmfs_format.proxies import parse_proxies

S1, S2, S3 = "http://s1/cvmfs/r", "http://s2/cvmfs/r", "http://s3/cvmfs/r"
P1, P2, P3 = "http://p1:3128", "http://p2:3128", "http://p3:3128"


def walk(a: Attempts, outcomes: dict[Route, Blame], now: float = 0.0) -> list[Route]:
    """Drive a request: every route tried fails as ``outcomes`` says (missing: success)."""
    tried = []
    while (step := a.next(now)) is not None:
        route, _delay = step
        tried.append(route)
        blame = outcomes.get(route)
        if blame is None:
            break
        a.failed(route, blame, "x", "data/ab/cd", now)
    return tried


@pytest.mark.parametrize(
    ("status", "headers", "via_proxy", "blame"),
    [
        (200, {}, False, None),
        (206, {}, True, None),
        (404, {}, False, Blame.NOBODY),
        (404, {}, True, Blame.NOBODY),
        (503, {}, False, Blame.HOST),
        (503, {}, True, Blame.HOST),  # passed on by the proxy: the server's
        (503, {"x-squid-error": "ERR_CONNECT_FAIL 111"}, True, Blame.PROXY),
        (500, {"proxy-status": "squid; error=connection_refused"}, True, Blame.PROXY),
        (503, {"proxy-status": "squid; error=x"}, False, Blame.HOST),  # no proxy: the server
        (502, {}, True, Blame.HOST),  # 5xx: the server's, unless the proxy says it made it
        (400, {}, True, Blame.HOST),
        (429, {}, True, Blame.HOST),
        (407, {}, True, Blame.PROXY),  # any other status: the proxy's
        (403, {}, True, Blame.PROXY),
        (403, {}, False, Blame.HOST),
        (301, {}, True, Blame.HOST),
    ],
)
def test_whom_a_status_blames(
    status: int, headers: dict[str, str], via_proxy: bool, blame: Blame | None
) -> None:
    assert classify_status(status, headers, via_proxy) is blame


def test_limits_and_deadlines() -> None:
    for kind in (Kind.MANIFEST, Kind.WHITELIST, Kind.CERTIFICATE):
        assert body_limit(kind, None) == 4 * MiB
        assert body_limit(kind, 10 * GiB) == 4 * MiB  # whatever a catalog claims
    assert body_limit(Kind.OBJECT, 100) == 200 + 64 * 1024
    assert body_limit(Kind.OBJECT, None) == 1 * GiB
    assert body_limit(Kind.CATALOG, None) == 512 * MiB
    s = Settings(timeout=10, connect_timeout=5, min_rate=1024)
    assert deadline(s, 100, body_limit(Kind.OBJECT, 100)) == pytest.approx(15.1, abs=0.01)
    assert deadline(s, 1 << 20, 0) == pytest.approx(15 + 1024)
    assert deadline(Settings(timeout=60, max_time=60), 1 << 30, 0) == 60  # hep-proxy's cap
    # unknown size: at most 64 MiB at min_rate
    assert deadline(s, None, 1 * GiB) == pytest.approx(15 + 64 * 1024)


def test_backoff_is_jittered_doubling_and_capped() -> None:
    rng = random.Random(1)
    for attempt in range(8):
        for _ in range(20):
            d = backoff_delay(attempt, 0.5, 5.0, rng)
            assert 0 <= d <= min(5.0, 0.5 * 2**attempt)


def test_routes_servers_then_proxies_groups_load_balanced() -> None:
    proxies = parse_proxies(f"{P1}|{P2};{P3}")
    f = Failover([[S1], [S2]], proxies, rng=random.Random(3))
    routes = f.routes(0)
    assert [r.server for r in routes] == [S1, S1, S1, S2, S2, S2]
    first_group = {routes[0].proxy, routes[1].proxy}
    assert first_group == {P1, P2} and routes[2].proxy == P3
    # load-balanced: request after request starts on either member of the first group
    assert {f.routes(0)[0].proxy for _ in range(20)} == {P1, P2}
    # a server group (hep-exec's list of hep-proxies "a|b"): members load-balanced too
    f = Failover([[S1, S2], [S3]], rng=random.Random(1))
    assert {f.routes(0)[0].server for _ in range(20)} == {S1, S2}
    assert all(f.routes(0)[2].server == S3 for _ in range(20))


def test_a_failed_proxy_is_tried_last_until_its_reset() -> None:
    s = Settings(proxy_reset_after=300, host_reset_after=1800, retries=0)
    f = Failover([[S1], [S2]], parse_proxies(f"{P1};{P2}"), s, random.Random(0))
    a = Attempts(f, 0)
    tried = walk(a, {Route(S1, P1): Blame.PROXY})
    # the proxy's failure: the next proxy, same server; that proxy is not used for S2 either
    assert tried == [Route(S1, P1), Route(S1, P2)]
    line = a.switched(Route(S1, P2))
    assert line == f"switched to proxy {P2} after: {S1}/data/ab/cd via {P1}: x"
    assert [r.proxy for r in f.routes(10)][:2] == [P2, P1]  # avoided: last
    assert [r.proxy for r in f.routes(301)][:2] == [P1, P2]  # reset


def test_a_failed_server_is_left_for_the_next_with_the_same_proxies() -> None:
    s = Settings(retries=0)
    f = Failover([[S1], [S2]], parse_proxies(f"{P1};{P2}"), s, random.Random(0))
    tried = walk(Attempts(f, 0), {Route(S1, P1): Blame.HOST})
    assert tried == [Route(S1, P1), Route(S2, P1)]  # not S1 through P2: the server failed
    assert [r.server for r in f.routes(1)] == [S2, S2, S1, S1]
    assert [r.server for r in f.routes(1801)] == [S1, S1, S2, S2]


def test_direct_failures_are_the_servers() -> None:
    f = Failover([[S1], [S2]], None, Settings(retries=0), random.Random(0))
    a = Attempts(f, 0)
    tried = walk(a, {Route(S1, None): Blame.PROXY})  # a broken connection, DIRECT
    assert tried == [Route(S1, None), Route(S2, None)]
    assert f.routes(1)[0].server == S2


def test_not_found_everywhere_ends_at_once_and_blames_nobody() -> None:
    f = Failover([[S1], [S2]], None, Settings(retries=3), random.Random(0))
    a = Attempts(f, 0)
    tried = walk(a, {Route(S1, None): Blame.NOBODY, Route(S2, None): Blame.NOBODY})
    assert tried == [Route(S1, None), Route(S2, None)]  # no further rounds
    assert a.not_found
    assert [r.server for r in f.routes(1)] == [S1, S2]  # nobody avoided


def test_bad_bytes_are_asked_for_again_without_caches_then_blamed_on_the_server() -> None:
    f = Failover([[S1], [S2]], parse_proxies(P1), Settings(retries=0), random.Random(0))
    a = Attempts(f, 0)
    assert a.next(0) == (Route(S1, P1), 0.0) and not a.no_cache
    a.failed(Route(S1, P1), Blame.DATA, "content hash mismatch", "p", 0)
    assert a.next(0) == (Route(S1, P1), 0.0) and a.no_cache  # the proxy's cache, bypassed
    a.failed(Route(S1, P1), Blame.DATA, "content hash mismatch", "p", 0)
    assert a.next(0) == (Route(S2, P1), 0.0) and a.no_cache  # the server is to blame
    assert not a.not_found and f.avoided_until(S1) > 0 and f.avoided_until(P1) == 0
    # DIRECT: no cache in between to bypass: the next server at once (without caches)
    f = Failover([[S1], [S2]], None, Settings(retries=0), random.Random(0))
    a = Attempts(f, 0)
    a.next(0)
    a.failed(Route(S1, None), Blame.DATA, "content hash mismatch", "p", 0)
    assert a.next(0) == (Route(S2, None), 0.0) and a.no_cache


def test_rounds_after_everything_failed_wait_a_jittered_backoff() -> None:
    s = Settings(retries=2, backoff_init=1.0, backoff_max=1.5)
    f = Failover([[S1]], None, s, random.Random(0))
    a = Attempts(f, 0)
    steps = []
    while (step := a.next(0)) is not None:
        steps.append(step)
        a.failed(step[0], Blame.HOST, "cannot connect (connection refused)", "p", 0)
    assert [r for r, _ in steps] == [Route(S1, None)] * 3
    assert steps[0][1] == 0 and 0 <= steps[1][1] <= 1.0 and 0 <= steps[2][1] <= 1.5
    assert a.failures == [f"{S1}/p: cannot connect (connection refused)"] * 3
