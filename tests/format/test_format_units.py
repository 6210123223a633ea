"""Unit tests of the sans-I/O format cores against the spec's worked values."""

from __future__ import annotations

import contextlib
import zlib
from collections.abc import Iterator

import pytest
from hypothesis import given
from hypothesis import strategies as st

from cvmfs_format import objects
from cvmfs_format.errors import FormatError, IntegrityError
from cvmfs_format.hashes import Algorithm, ContentHash
from cvmfs_format.manifest import parse_manifest
from cvmfs_format.objects import (
    INFLATE_IN,
    INFLATE_OUT,
    StreamVerifier,
    Suffix,
    compress,
    inflate_pieces,
    make_object,
    parse_object_path,
    verify_object,
)
from cvmfs_format.paths import is_within, normalize, path_key
from cvmfs_format.proxies import parse_proxies, parse_server_urls
from cvmfs_format.symlinks import expand_symlink
from cvmfs_format.xattrs import decode_xattrs, encode_xattrs


@pytest.mark.parametrize(
    ("algorithm", "data", "expected"),
    [
        (Algorithm.SHA1, b"", "da39a3ee5e6b4b0d3255bfef95601890afd80709"),
        (Algorithm.RMD160, b"", "9c1185a5c5e9fc54612808977ee8f548b2258d31-rmd160"),
        (Algorithm.SHAKE128, b"", "7f9c2ba4e88f827d616045507605853ed73b8093-shake128"),
        (Algorithm.SHAKE128, b"abc", "5881092dd818bf5cf8a3ddb793fbcba74097d5c5-shake128"),
    ],
)
def test_hash_vectors(algorithm: Algorithm, data: bytes, expected: str) -> None:
    h = ContentHash.of(data, algorithm)
    assert h.hex == expected
    assert ContentHash.parse(expected) == h


def test_object_names_and_suffixes() -> None:
    h = ContentHash.parse("6ed3d49a5c64f21f36936ab350d49aaf57585b9a")
    assert h.object_path(Suffix.CATALOG) == "data/6e/d3d49a5c64f21f36936ab350d49aaf57585b9aC"
    rmd = ContentHash.parse("2e5beea626f6ddef63d56405371f80732782086f-rmd160")
    assert rmd.object_path("P") == "data/2e/5beea626f6ddef63d56405371f80732782086f-rmd160P"
    for path in [
        "data/6e/d3d49a5c64f21f36936ab350d49aaf57585b9aC",
        "data/2e/5beea626f6ddef63d56405371f80732782086f-rmd160P",
        "data/7f/9c2ba4e88f827d616045507605853ed73b8093-shake128",
    ]:
        assert parse_object_path(path).path == path
    for bad in [
        "data/6e/../d3d49a5c64f21f36936ab350d49aaf57585b9aC",
        "data/6E/d3d49a5c64f21f36936ab350d49aaf57585b9aC",
        "data/6e/d3d49a5c64f21f36936ab350d49aaf57585b9aZ",
        "data/6e/d3d49a5c64f21f36936ab350d49aaf57585b9",
        "/etc/passwd",
        "data/6e/d3d49a5c64f21f36936ab350d49aaf57585b9a-md5",
    ]:
        with pytest.raises(FormatError):
            parse_object_path(bad)


@pytest.mark.parametrize("bad", ["", "xyz", "g" * 40, "a" * 39, "a" * 40 + "-sha3", "A" * 40])
def test_bad_hex_is_refused(bad: str) -> None:
    with pytest.raises(FormatError, match="bad content hash"):
        ContentHash.parse(bad)


def test_known_objects() -> None:
    assert compress(b"") == bytes.fromhex("789c030000000001")
    h, stored = make_object(b"")
    assert h.hex == "e8ec3d88b62ebf526e4e5a4ff6162a3aa48a6b78"
    h, stored = make_object(b"foo\n")
    assert stored == bytes.fromhex("789c4bcbcfe7020003d1014f")
    assert h.hex == "d85ab7e835750785b0535d4fbba7d59e921b1f48"


@contextlib.contextmanager
def inflating_with(backend: str) -> Iterator[None]:
    """Objects inflated by ISA-L (``isal``, the default) or by zlib (the fallback where isal
    cannot be imported): both must give the same bytes and the same errors."""
    if backend == "isal":
        pytest.importorskip("isal", reason="isal not installed (pip install isal)")
    saved = objects._backend
    objects._backend = None
    if backend == "zlib":
        objects._backend = (zlib.decompressobj, (zlib.error,))
    try:
        yield
    finally:
        objects._backend = saved


BACKENDS = pytest.mark.parametrize("backend", ["isal", "zlib"])


@BACKENDS
@given(st.binary(max_size=50_000), st.integers(1, 5000), st.sampled_from(list(Algorithm)))
def test_stream_verifier_any_chunking(
    backend: str, data: bytes, step: int, algorithm: Algorithm
) -> None:
    h, stored = make_object(data, algorithm)
    with inflating_with(backend):
        v = StreamVerifier(h)
        out = b"".join(v.feed(stored[i : i + step]) for i in range(0, len(stored), step))
        assert out + v.finish() == data


@BACKENDS
def test_stream_verifier_mismatch_raises(backend: str) -> None:
    h, stored = make_object(b"payload" * 100)
    bad = bytearray(stored)
    bad[-1] ^= 1
    with inflating_with(backend):
        with pytest.raises(IntegrityError, match="content hash mismatch"):
            verify_object(bytes(bad), h, "obj")
        with pytest.raises(IntegrityError, match="truncated|mismatch"):
            verify_object(stored[:-3], h)
        wrong = ContentHash.of(zlib.compress(b"x"))
        with pytest.raises(IntegrityError):
            verify_object(zlib.compress(b"y"), wrong)
        # its hash is right, its stream is not: said as corrupt data, in one line
        not_zlib = b"not zlib" + stored
        with pytest.raises(IntegrityError, match=r"^obj: corrupt zlib data \("):
            verify_object(not_zlib, ContentHash.of(not_zlib), "obj")


@BACKENDS
@given(
    st.one_of(
        st.binary(max_size=3 * INFLATE_IN),
        st.integers(0, 3 * INFLATE_OUT).map(bytes),  # zeros: one stored byte, ~1,000 out
    ),
    st.binary(max_size=8),
)
def test_inflate_pieces_equal_the_whole(backend: str, data: bytes, trailer: bytes) -> None:
    stored = zlib.compress(data, 6)
    with inflating_with(backend):
        pieces = list(inflate_pieces(stored + trailer, "obj", len(data)))
        assert b"".join(pieces) == data
        assert all(len(p) <= INFLATE_OUT for p in pieces)  # memory for one piece at a time
        if data:
            with pytest.raises(
                FormatError, match=f"^obj: decompresses to more than {len(data) - 1} "
            ):
                list(inflate_pieces(stored, "obj", len(data) - 1))


@BACKENDS
def test_inflate_pieces_refuses_bad_streams_in_one_line(backend: str) -> None:
    with inflating_with(backend):
        refuses_bad_streams()


def refuses_bad_streams() -> None:
    stored = zlib.compress(bytes(range(256)) * 1000)
    with pytest.raises(FormatError, match="^a/b: truncated zlib stream$"):
        list(inflate_pieces(stored[:-10], "a/b"))
    with pytest.raises(FormatError, match=r"^a/b: corrupt zlib data \("):
        list(inflate_pieces(b"not zlib" + stored, "a/b"))
    with pytest.raises(FormatError, match="truncated"):
        list(inflate_pieces(b"", "a/b"))
    bomb = zlib.compress(bytes(64 << 20))  # 64 MiB of zeros in ~64 KiB
    got = 0
    with pytest.raises(FormatError, match="more than 4096 bytes"):
        for piece in inflate_pieces(bomb, "bomb", 4096):
            got += len(piece)
    assert got == 0  # stopped at its first piece, before handing out a byte too many


def test_path_keys_worked_values() -> None:
    assert path_key("") == (338333539836370388, 9098107892288553193)
    assert path_key("/foo") == (5745132282796244766, -5819618580357280866)
    assert path_key("/needs_migration") == (2409901422405569183, 2813813991256840431)
    assert normalize("//a/./b/") == "/a/b"
    assert is_within("/a/b", "/a") and not is_within("/ab", "/a") and is_within("/x", "")


@pytest.mark.parametrize(
    ("raw", "env", "expected"),
    [
        ("$(FOO:-hello.txt)", {}, "hello.txt"),
        ("$(FOO:-hello.txt)", {"FOO": "x"}, "x"),
        ("$(FOO:-hello.txt)", {"FOO": ""}, ""),
        ("$(FOO)", {}, ""),
        ("a/$(A)/b/$(B:-d)/c", {"A": "1"}, "a/1/b/d/c"),
        ("x$(UNCLOSED", {"UNCLOSED": "v"}, "x$(UNCLOSED"),
        ("tail$(", {}, "tail$("),
        ("cost$", {}, "cost$"),
        ("$(A:-x:-y)", {}, "x:-y"),
        ("$(A:-(x)", {}, "(x"),
        ("plain", {"plain": "no"}, "plain"),
    ],
)
def test_variant_symlinks(raw: str, env: dict[str, str], expected: str) -> None:
    assert expand_symlink(raw, env) == expected


@given(
    st.dictionaries(
        st.binary(min_size=1, max_size=40).filter(lambda k: b"\0" not in k),
        st.binary(max_size=60),
        max_size=10,
    )
)
def test_xattr_roundtrip(attrs: dict[bytes, bytes]) -> None:
    blob = encode_xattrs(attrs)
    assert (blob is None) == (not attrs)
    assert decode_xattrs(blob) == attrs


def test_manifest_tolerates_unknown_and_legacy_keys() -> None:
    raw = (
        b"C6ed3d49a5c64f21f36936ab350d49aaf57585b9a\nB14336\nRd41d8cd98f00b204e9800998ecf8427e\n"
        b"D900\nS2\nGno\nNlegacy_aufs.cern.ch\nV2.2.0\nZa\nZb\nQfuture\nT1445428515\n"
    )
    m = parse_manifest(raw).manifest
    assert m.revision == 2 and m.ttl == 900 and m.root_catalog_size == 14336
    assert ("Q", "future") in m.extra
    assert parse_manifest(raw).signature is None


@pytest.mark.parametrize(
    ("raw", "message"),
    [
        (b"", "required key C missing"),
        (b"Cxyz\nR\nD1\nS1\n", "key C: bad hash"),
        (b"C" + b"a" * 40 + b"\nRd\nDx\nS1\n", "key D: not a number"),
        (b"C" + b"a" * 40 + b"\nB1\nRd\nD1\nS1\n--\n", "truncated"),
    ],
)
def test_malformed_manifest(raw: bytes, message: str) -> None:
    with pytest.raises(FormatError, match=message):
        parse_manifest(raw)


def test_server_and_proxy_syntax() -> None:
    urls = parse_server_urls("http://s1/cvmfs/@fqrn@;http://s2:8000/cvmfs/@org@/", "atlas.cern.ch")
    assert urls == ["http://s1/cvmfs/atlas.cern.ch", "http://s2:8000/cvmfs/atlas"]
    groups = parse_proxies("http://p1:3128|http://p2:3128;p3:3128;DIRECT")
    assert groups.groups == (("http://p1:3128", "http://p2:3128"), ("http://p3:3128",), (None,))
    order = groups.order()
    assert set(order[:2]) == {"http://p1:3128", "http://p2:3128"} and order[2:] == [
        "http://p3:3128",
        None,
    ]
    assert parse_proxies(None).groups == ((None,),)
    with pytest.raises(FormatError, match="proxy"):
        parse_proxies("ftp://x:1")
    with pytest.raises(FormatError, match="not an http"):
        parse_server_urls("gopher://x/cvmfs/@fqrn@", "a.b")
