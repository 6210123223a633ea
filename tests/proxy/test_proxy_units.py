"""Unit tests of hep-proxy's sans-I/O cores: routing, simple-request parsing, cache, limits,
configuration."""

from __future__ import annotations

from pathlib import Path

import pytest

from proxy.access import ClientFilter, RateLimiter, parse_networks
from proxy.cache import ObjectCache
from proxy.config import ConfigError, build
from proxy.fastpath import parse_simple
from proxy.routing import Kind, Reject, Target, route

REPOS = {"demo.example.org", "atlas.cern.ch"}
OBJ = "data/12/3456789012345678901234567890123456789a"


@pytest.mark.parametrize(
    ("target", "kind", "relpath"),
    [
        ("/cvmfs/demo.example.org/.cvmfspublished", Kind.MANIFEST, ".cvmfspublished"),
        ("/cvmfs/demo.example.org/.cvmfswhitelist", Kind.WHITELIST, ".cvmfswhitelist"),
        # served where the store has it (a complete revision), else 404 by the store
        ("/cvmfs/demo.example.org/.cvmfs_master_replica", Kind.ROOT_FILE, ".cvmfs_master_replica"),
        (
            "http://s1/cvmfs/atlas.cern.ch/.cvmfs_master_replica",
            Kind.ROOT_FILE,
            ".cvmfs_master_replica",
        ),
        (f"/cvmfs/atlas.cern.ch/{OBJ}", Kind.DATA, OBJ),
        (f"/cvmfs/atlas.cern.ch/{OBJ}C", Kind.DATA, OBJ + "C"),
        (f"/cvmfs/atlas.cern.ch/{OBJ}-rmd160P", Kind.DATA, OBJ + "-rmd160P"),
        (f"http://s1.example:8000/cvmfs/atlas.cern.ch/{OBJ}X", Kind.DATA, OBJ + "X"),
        (f"HTTP://S1/cvmfs/atlas.cern.ch/{OBJ}?x=1", Kind.DATA, OBJ),
        ("/cvmfs/atlas.cern.ch/data/12/%33456789012345678901234567890123456789a", Kind.DATA, OBJ),
        ("/healthz", Kind.HEALTH, ""),
        ("/metrics", Kind.METRICS, ""),
        ("/cvmfs/info/v1/repositories.json", Kind.REPOSITORIES, ""),
    ],
)
def test_route_accepts(target: str, kind: Kind, relpath: str) -> None:
    t = route("GET", target, REPOS)
    assert isinstance(t, Target)
    assert (t.kind, t.relpath) == (kind, relpath)


TRAVERSALS = [
    "/cvmfs/demo.example.org/../../etc/passwd",
    "/cvmfs/demo.example.org/data/../../../etc/passwd",
    "/cvmfs/demo.example.org/data/12/../../.cvmfspublished",
    "/cvmfs/demo.example.org/%2e%2e/%2e%2e/etc/passwd",
    "/cvmfs/demo.example.org/data%2f..%2f..%2fetc%2fpasswd",
    "/cvmfs/demo.example.org/data/%252e%252e/x",
    "/cvmfs/demo.example.org/data/%c0%ae%c0%ae/x",
    "/cvmfs/demo.example.org/data/12/3456789012345678901234567890123456789a%00",
    "/cvmfs/demo.example.org/data\\..\\..\\etc\\passwd",
    "/cvmfs/../etc/passwd",
    "/cvmfs/%2e%2e/etc/passwd",
    "/cvmfs/demo.example.org%2f..%2fatlas.cern.ch/.cvmfspublished",
    "/cvmfs//etc/passwd",
    "/cvmfs/demo.example.org//etc/passwd",
    "/cvmfs/demo.example.org/.cvmfspublished/../../../etc/passwd",
    "/cvmfs/demo.example.org/data/12/3456789012345678901234567890123456789a/",
    "/cvmfs/demo.example.org/data/12",
    "/cvmfs/demo.example.org/data/",
    "/cvmfs/demo.example.org/data/txn/x",
    "/cvmfs/demo.example.org/",
    "/cvmfs/demo.example.org",
    "/cvmfs/demo.example.org/.cvmfs_master_replica/",
    "/cvmfs/demo.example.org/.cvmfs_master_replica/../../etc/passwd",
    "/cvmfs/demo.example.org/.cvmfs_master_replica%00",
    "/cvmfs/demo.example.org/.cvmfs_master_replicas",
    "/cvmfs/demo.example.org/data/.cvmfs_master_replica",
    "/cvmfs/.cvmfs_master_replica",
    "/cvmfs/unknown.example.org/.cvmfs_master_replica",
    "/cvmfs/demo.example.org/DATA/12/3456789012345678901234567890123456789a",
    "/cvmfs/demo.example.org/data/12/3456789012345678901234567890123456789A",
    "/cvmfs/unknown.example.org/.cvmfspublished",
    "/cvmfs/./demo.example.org/.cvmfspublished",
    "/etc/passwd",
    "//etc/passwd",
    "/CVMFS/demo.example.org/.cvmfspublished",
    "http://x/cvmfs/demo.example.org/../../etc/passwd",
    "https://x/cvmfs/demo.example.org/.cvmfspublished",
    "file:///etc/passwd",
    "etc/passwd",
    "*",
    "demo.example.org:80",
]


@pytest.mark.parametrize("target", TRAVERSALS)
def test_route_rejects(target: str) -> None:
    assert route("GET", target, REPOS) == Reject(404, "not found")


def test_route_methods() -> None:
    assert isinstance(route("HEAD", "/healthz", REPOS), Target)
    for method in ("POST", "PUT", "DELETE", "OPTIONS", "CONNECT", "get"):
        r = route(method, "/cvmfs/demo.example.org/.cvmfspublished", REPOS)
        assert isinstance(r, Reject) and r.status == 405


def test_parse_simple() -> None:
    r = parse_simple(b"GET /x HTTP/1.1\r\nHost: a\r\nUser-Agent: cvmfs Fuse 2.11\r\n\r\n")
    assert r is not None and (r.method, r.target, r.user_agent, r.close) == (
        "GET",
        "/x",
        "cvmfs Fuse 2.11",
        False,
    )
    r = parse_simple(b"HEAD /x HTTP/1.1\r\nConnection: Close\r\nPragma: no-cache\r\n\r\n")
    assert r is not None and r.close and r.no_cache
    for bad in (
        b"GET /x HTTP/1.1\r\nHost: a\r\n",  # incomplete
        b"GET /x HTTP/1.0\r\n\r\n",  # HTTP/1.0 keep-alive rules: leave to aiohttp
        b"POST /x HTTP/1.1\r\nContent-Length: 3\r\n\r\n",
        b"GET /x HTTP/1.1\r\nTransfer-Encoding: chunked\r\n\r\n",
        b"GET /x HTTP/1.1\r\n\r\nGET /y HTTP/1.1\r\n\r\n",  # pipelined
        b"GET /x HTTP/1.1\r\n folded\r\n\r\n",
        b"GET /x y HTTP/1.1\r\n\r\n",
        b"GET /\x00 HTTP/1.1\r\n\r\n",
        b"GET /x HTTP/1.1\r\nBad Header: 1\r\n\r\n",
        b"GET /x HTTP/1.1\r\nUpgrade: websocket\r\n\r\n",
        b"GET /" + b"a" * 9000 + b" HTTP/1.1\r\n\r\n",
    ):
        assert parse_simple(bad) is None, bad


def test_cache_bounded_by_bytes() -> None:
    c = ObjectCache(max_bytes=10_000, max_object=3_000)
    for i in range(20):
        assert c.put(("r", str(i)), bytes(2_000))
        assert c.bytes <= 10_000
    assert not c.put(("r", "big"), bytes(3_001))
    assert c.get(("r", "19")) is not None and c.get(("r", "0")) is None
    c.get(("r", "15"))
    c.put(("r", "new"), bytes(2_000))
    assert c.get(("r", "15")) is not None  # recently used survives
    assert c.bytes == sum(len(c.get(("r", k)) or b"") for k in [*map(str, range(20)), "new"])


def test_client_filter() -> None:
    f = ClientFilter(parse_networks(["10.0.0.0/8", "127.0.0.1/32", "::1"]))
    assert f.allowed("10.1.2.3") and f.allowed("127.0.0.1") and f.allowed("::1")
    assert f.allowed("::ffff:127.0.0.1")
    assert not f.allowed("127.0.0.2") and not f.allowed("192.168.1.1") and not f.allowed(None)
    assert not f.allowed("garbage")
    assert ClientFilter(()).allowed("8.8.8.8")
    with pytest.raises(ValueError, match="not an IP network"):
        parse_networks(["10.0.0.0/33"])


def test_rate_limiter() -> None:
    r = RateLimiter(rate=2, burst=3)
    assert [r.allow("a", 0.0) for _ in range(4)] == [True, True, True, False]
    assert r.allow("b", 0.0)  # per client
    assert r.allow("a", 0.5) and not r.allow("a", 0.5)
    assert RateLimiter(0, 0).allow("a", 0.0)


def test_config_file_and_flags(tmp_path: Path) -> None:
    cfg_file = tmp_path / "proxy.yaml"
    cfg_file.write_text(
        "stores: [/srv/a]\nlisten: 0.0.0.0:3128\nworkers: 3\nallow: 10.0.0.0/8\n"
        "upstreams:\n  demo.example.org: http://s1.example/cvmfs/@fqrn@\n"
        "manifest-max-age: 30\nupstream-proxy: [http://sq1:3128|http://sq2:3128, DIRECT]\n"
    )
    cfg = build(cfg_file, {"listen": "127.0.0.1:9000", "stores": [], "manifest_max_age": 5})
    assert str(cfg.upstream_proxy) == "http://sq1:3128|http://sq2:3128;DIRECT"
    assert str(build(cfg_file, {"upstream_proxy": "DIRECT"}).upstream_proxy) == "DIRECT"
    assert (cfg.host, cfg.port, cfg.workers, cfg.manifest_max_age) == ("127.0.0.1", 9000, 3, 5)
    assert cfg.stores == (Path("/srv/a"),)
    assert cfg.upstreams == {"demo.example.org": ("http://s1.example/cvmfs/demo.example.org",)}
    cfg = build(cfg_file, {"stores": ["/b"], "allow": ["::1"]})
    assert cfg.stores == (Path("/b"),) and len(cfg.allow) == 1 and cfg.port == 3128


@pytest.mark.parametrize(
    ("text", "message"),
    [
        ("listen: nowhere\n", "expected HOST:PORT"),
        ("workers: -1\n", "not a non-negative number"),
        ("workers: 0\n", "workers must be 1 or more \\(default: one per core\\)"),
        ("health-allow: [x]\n", "not an IP network"),
        ("log_level: loud\n", "'loud' is not one of debug, info, warning, error"),
        ("colour: blue\n", "unknown setting 'colour'"),
        ("stores: [a\n", "not valid YAML"),
        ("- a\n", "mapping of settings"),
        ("upstreams: [nonsense]\n", "expected FQRN=URL"),
        ("allow: [300.0.0.1]\n", "not an IP network"),
        ("upstream_proxy: not a proxy\n", "upstream_proxy: proxy 'not a proxy'"),
        ("upstream_proxy: http://s1/cvmfs/@fqrn@\n", "a forward proxy is http://host:port"),
    ],
)
def test_config_errors(tmp_path: Path, text: str, message: str) -> None:
    f = tmp_path / "bad.yaml"
    f.write_text(text)
    with pytest.raises(ConfigError, match=message) as e:
        build(f, {"stores": ["/srv"]})
    assert "\n" not in str(e.value) and str(f) in str(e.value)


def test_health_networks() -> None:
    """/healthz and /metrics: loopback and the allow-list by default, or exactly health_allow;
    everyone when the allow-list is empty (everyone may connect anyway)."""
    assert build(None, {"stores": ["/s"]}).health_networks == ()
    cfg = build(None, {"stores": ["/s"], "allow": ["10.0.0.0/8"]})
    assert [str(n) for n in cfg.health_networks] == ["10.0.0.0/8", "127.0.0.0/8", "::1/128"]
    cfg = build(None, {"stores": ["/s"], "allow": ["10.0.0.0/8"], "health_allow": ["10.9.9.9"]})
    assert [str(n) for n in cfg.health_networks] == ["10.9.9.9/32"]


def test_config_requires_store(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="no store"):
        build(None, {})
    with pytest.raises(ConfigError, match="cannot read config"):
        build(tmp_path / "missing.yaml", {})
