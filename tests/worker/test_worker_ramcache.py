"""RAM cache: byte-limited LRU of RAM files with pins, single-flight loads."""

from __future__ import annotations

import errno
import os
import re
import subprocess
import sys
import threading
from collections.abc import Iterable

import pytest

from tests.support.waiting import wait_until
from worker.ram.ramcache import CacheFull, RamCache

K = 1024


def blob(n: int, fill: int = 0x61) -> bytes:
    return bytes([fill]) * n


def own_files(cache: RamCache, keys: Iterable[str]) -> list[int]:
    """Our fds on RAM files the cache made for these keys (a memfd shows as ``/memfd:<key>``,
    a private tmpfs file as ``/<key>.<pid>.<n>``): what the cache holds, not what other
    threads of this process happen to have open."""
    wanted = set(keys)
    pattern = (
        r"/memfd:(.+?)( \(deleted\))?"
        if cache.files.backing == "memfd"
        else rf"/(.+)\.{os.getpid()}\.\d+( \(deleted\))?"
    )
    mine = []
    for fd in os.listdir("/proc/self/fd"):
        try:
            link = os.readlink(f"/proc/self/fd/{fd}")
        except FileNotFoundError:
            continue  # closed while we looked: another thread's, not the cache's
        m = re.fullmatch(pattern, link)
        if m and m.group(1) in wanted:
            mine.append(int(fd))
    return sorted(mine)


def test_empty_object() -> None:
    cache = RamCache(1 << 20)
    obj = cache.acquire("empty", lambda: b"")
    assert obj.size == 0 and os.fstat(obj.fd).st_size == 0
    with open(obj.path, "rb") as f:
        assert f.read() == b""
    cache.release(obj)
    cache.close()


def test_hits_misses_and_pins() -> None:
    cache = RamCache(100 * K)
    a = cache.acquire("a", lambda: blob(10 * K))
    a2 = cache.acquire("a", lambda: pytest.fail("loaded twice"))
    assert a is a2 and a.refs == 2
    assert (cache.stats.hits, cache.stats.misses, cache.stats.bytes_loaded) == (1, 1, 10 * K)
    cache.release(a)
    cache.release(a)
    assert "a" in cache and cache.pinned_bytes == 0
    with pytest.raises(ValueError):
        cache.release(a)
    cache.close()


def test_limit_smaller_than_working_set_evicts_lru_never_pinned() -> None:
    cache = RamCache(100 * K)
    pinned = cache.acquire("pinned", lambda: blob(30 * K, 0x70))
    loads = 0
    for round_ in range(3):
        for i in range(10):  # 10 x 20 KiB = 200 KiB through a 100 KiB cache
            key = f"k{i}"

            def load(i: int = i) -> bytes:
                nonlocal loads
                loads += 1
                return blob(20 * K, i)

            obj = cache.acquire(key, load)
            with open(obj.path, "rb") as f:
                assert f.read() == blob(20 * K, i), (round_, i)
            cache.release(obj)
            assert cache.used_bytes <= cache.limit
    assert cache.stats.evictions >= 25
    assert loads == 30  # LRU over a cyclic scan larger than the cache: every access misses
    assert "pinned" in cache
    with open(pinned.path, "rb") as f:
        assert f.read() == blob(30 * K, 0x70)
    cache.release(pinned)
    cache.close()


def test_lru_order_keeps_recently_used() -> None:
    cache = RamCache(50 * K)
    for key in ("a", "b", "c"):
        cache.release(cache.acquire(key, lambda: blob(15 * K)))
    cache.release(cache.acquire("a", lambda: pytest.fail("a was evicted")))  # touch a
    cache.release(cache.acquire("d", lambda: blob(15 * K)))  # evicts b, the LRU one
    assert "a" in cache and "b" not in cache and "c" in cache and "d" in cache
    cache.close()


def test_cache_full_when_everything_is_pinned(caplog: pytest.LogCaptureFixture) -> None:
    cache = RamCache(64 * K)
    held = [cache.acquire(f"p{i}", lambda: blob(20 * K)) for i in range(3)]
    # the size hint refuses before anything is fetched
    with pytest.raises(CacheFull) as info:
        cache.acquire("big", lambda: pytest.fail("fetched although it cannot fit"), 10 * K)
    assert info.value.errno == errno.ENOMEM
    assert "RAM cache full" in str(info.value) and "big" in str(info.value)
    assert any("RAM cache full" in r.getMessage() for r in caplog.records)
    # without a hint: loaded, found not to fit, dropped (fd closed), error raised
    assert own_files(cache, ["big"]) == []
    with pytest.raises(CacheFull):
        cache.acquire("big", lambda: blob(10 * K))
    assert own_files(cache, ["big"]) == []
    assert sorted(o.fd for o in held) == own_files(cache, [f"p{i}" for i in range(3)])
    assert cache.stats.full == 2 and "big" not in cache
    # releasing one pin makes room again
    cache.release(held.pop())
    obj = cache.acquire("big", lambda: blob(10 * K))
    assert obj.size == 10 * K
    cache.release(obj)
    for h in held:
        cache.release(h)
    cache.close()


def test_concurrent_acquires_make_one_load() -> None:
    cache = RamCache(1 << 20)
    calls = 0
    gate = threading.Event()

    def slow_load() -> bytes:
        nonlocal calls
        calls += 1
        gate.wait(5)
        return blob(1000)

    results = []

    def worker() -> None:
        results.append(cache.acquire("same", slow_load))

    threads = [threading.Thread(target=worker) for _ in range(16)]
    for t in threads:
        t.start()
    wait_until(lambda: cache.stats.waits == 15, what="15 acquires waiting for the one load")
    gate.set()
    for t in threads:
        t.join(5)
    assert calls == 1
    assert len(results) == 16 and all(r is results[0] for r in results)
    assert results[0].refs == 16
    for r in results:
        cache.release(r)
    assert cache.pinned_bytes == 0
    cache.close()


def test_an_object_being_loaded_is_known_as_such() -> None:
    """``held_or_loading``: the node's service asks it before fetching a prefetch, so that an
    object whose load is under way is waited for, not fetched a second time; ``in`` says
    only what is held."""
    cache = RamCache(1 << 20)
    gate = threading.Event()

    def slow_load() -> bytes:
        gate.wait(5)
        return blob(1000)

    loader = threading.Thread(target=lambda: cache.release(cache.acquire("k", slow_load)))
    loader.start()
    wait_until(lambda: cache.stats.misses == 1, what="the load under way")
    assert cache.held_or_loading("k") and "k" not in cache
    assert not cache.held_or_loading("other")
    gate.set()
    loader.join(5)
    assert cache.held_or_loading("k") and "k" in cache  # held (unpinned, in the LRU)
    cache.close()


def test_loader_error_reaches_every_waiter_and_is_not_cached() -> None:
    cache = RamCache(1 << 20)
    gate = threading.Event()
    errors: list[OSError] = []

    def failing() -> bytes:
        gate.wait(5)
        raise OSError(errno.EIO, "proxy said no")

    def worker() -> None:
        try:
            cache.acquire("x", failing)
        except OSError as e:
            errors.append(e)

    threads = [threading.Thread(target=worker) for _ in range(4)]
    for t in threads:
        t.start()
    wait_until(lambda: cache.stats.waits == 3, what="3 acquires waiting for the failing load")
    gate.set()
    for t in threads:
        t.join(5)
    assert len(errors) == 4 and all(e.errno == errno.EIO for e in errors)
    assert cache.stats.misses == 1 and cache.stats.load_errors == 1 and "x" not in cache
    obj = cache.acquire("x", lambda: b"second try works")
    assert obj.size == 16
    cache.release(obj)
    cache.close()


def test_catalog_charge_counts_against_the_limit() -> None:
    cache = RamCache(100 * K)
    cache.release(cache.acquire("a", lambda: blob(40 * K)))
    cache.charge(70 * K)
    assert "a" not in cache and cache.stats.evictions == 1
    with pytest.raises(CacheFull):
        cache.acquire("b", lambda: blob(40 * K), 40 * K)
    cache.close()


def test_fd_survives_eviction_for_whoever_opened_it() -> None:
    """A tracee's own fd (opened via /proc/<pid>/fd/<n>) outlives eviction of the memfd."""
    cache = RamCache(30 * K)
    obj = cache.acquire("a", lambda: blob(20 * K, 0x41))
    own = os.open(obj.path, os.O_RDONLY)
    cache.release(obj)
    cache.release(cache.acquire("b", lambda: blob(20 * K)))  # evicts a, closes its memfd
    assert "a" not in cache
    assert os.pread(own, 5, 0) == b"AAAAA"
    os.close(own)
    cache.close()


def test_sealed_memfd_passes_to_a_child_and_reads_natively(tmp_path: object) -> None:
    cache = RamCache(1 << 20)
    obj = cache.acquire("code", lambda: b"print('from a memfd')\n")
    out = subprocess.run([sys.executable, obj.path], capture_output=True, text=True, check=True)
    assert out.stdout == "from a memfd\n"
    cache.release(obj)
    cache.close()


def test_object_count_stays_below_the_fd_limit() -> None:
    """Each object is one fd of ours: ``max_objects`` bounds them, the LRU ones go first."""
    cache = RamCache(1 << 30, max_objects=5)
    keys = [f"o{i}" for i in range(20)]
    objs = []
    for key in keys:
        obj = cache.acquire(key, lambda: b"tiny")
        objs.append(obj)
        cache.release(obj)
    assert len(cache) == 5 and cache.stats.evictions == 15
    assert own_files(cache, keys) == sorted(o.fd for o in objs[-5:])
    assert [k for k in keys if k in cache] == keys[-5:]
    cache.close()
    assert own_files(cache, keys) == []
