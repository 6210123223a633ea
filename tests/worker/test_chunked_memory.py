"""``--ram`` bounds memory for chunked files too: chunks stream into the RAM file one by one.

A 600 MiB chunked file (150 chunks of 4 MiB, compressing poorly) is published with our
publisher, served by nginx on loopback and read through the real hep-exec under ``--ram 1G``,
once with a private cache and once through the node cache service. The RAM file itself lives
on a tmpfs or in a memfd that neither process maps, so it is not in their RSS; what is, is
every chunk the loader holds in Python memory at once. Before the fix the loader held all of
them, compressed and inflated (1.3 GB peak in hep-exec or the service for this file); now it
holds a few at a time. The peak is VmHWM (less shared memory mapped, which is not a chunk).

A corrupt chunk in the middle fails the open with EIO and leaves nothing behind: the next open
fetches again, and once the proxy serves the right bytes it succeeds. In-process tests pin
down the pieces: a few chunks in flight, no half-written file after a failure, room made for
the file before it fills.
"""

from __future__ import annotations

import contextlib
import errno
import functools
import hashlib
import os
import re
import secrets
import shutil
import signal
import subprocess
import sys
import tempfile
import threading
import time
import zlib
from collections.abc import Callable, Iterator
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path

import pytest

from cvmfs_format.catalog import Chunk
from cvmfs_format.hashes import ContentHash
from cvmfs_format.objects import Suffix, make_object
from tests.support.hep_exec import CLI, Served, corrupt_copy, hep_exec_cmd
from tests.support.repos import PROJECT
from tests.support.tracing import ensure_built, env_with, needs_ptrace
from tests.support.waiting import wait_until
from worker.node.cache_client import CacheClient
from worker.node.rendezvous import SOCKET_NAME
from worker.ram.ramcache import CachedObject, RamCache
from worker.ram.ramfiles import RamFiles, RamFilesError, RamFileWriter
from worker.repo.fetcher import FetchError, object_url
from worker.repo.repository import RepositoryError, fill_chunks, fill_whole

pytestmark = [needs_ptrace, pytest.mark.slow]

FQRN = "chunky.test.org"
MiB = 1 << 20
CHUNK = 4 * MiB  # the publisher's chunk size
SIZE = 600 * MiB
FILE = f"/cvmfs/{FQRN}/big/file.bin"
RAM = "1G"
MIDDLE = SIZE // CHUNK // 2  # the chunk the corruption test spoils
# hep-exec (Python, aiohttp, the tracer) and the service start at 40-70 MiB; a streaming
# load adds a few chunks, compressed and inflated; holding all 150 of them is 1.2 GB more
PEAK_LIMIT = 150 * MiB + 8 * CHUNK


@dataclass
class Big:
    """The published 600 MiB file: store, key, its sha256 and the middle chunk's object."""

    served: Served
    base: Path
    master_pub: Path
    proxy: str
    sha256: str
    middle_object: str  # relative to the store: FQRN/data/XX/NAMEP


def _block(i: int, block: bytes, ones: int) -> bytes:
    """1 MiB number i: the random block XOR the counter in every 8 bytes (never repeats)."""
    mask = (i + 1) * ones
    return (int.from_bytes(block, "little") ^ mask).to_bytes(MiB, "little")


@pytest.fixture(scope="module")
def big(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Big]:
    ensure_built()
    base = tmp_path_factory.mktemp("chunked-memory")
    src = base / "src" / "big"
    src.mkdir(parents=True)
    block = secrets.token_bytes(MiB)
    ones = int.from_bytes(b"\x01\x00\x00\x00\x00\x00\x00\x00" * (MiB // 8), "little")
    digest = hashlib.sha256()
    middle = bytearray()
    with open(src / "file.bin", "wb") as f:
        for i in range(SIZE // MiB):
            data = _block(i, block, ones)
            digest.update(data)
            if i // (CHUNK // MiB) == MIDDLE:
                middle += data
            f.write(data)
    served = Served(base / "store", base / "keys")
    repo = served.publish(base / "src", FQRN)
    (src / "file.bin").unlink()  # 600 MiB less on disk; the store has it
    content, _ = make_object(bytes(middle))
    middle_object = f"{FQRN}/{content.object_path(Suffix.PARTIAL)}"
    assert (served.store / middle_object).is_file()
    proxy = served.serve(base / "nginx")
    try:
        yield Big(served, base, repo.master_pub, proxy, digest.hexdigest(), middle_object)
    finally:
        served.stop()


@pytest.fixture
def cache_dir() -> Iterator[Path]:
    """A private runtime directory in /tmp (short: it holds the socket)."""
    d = Path(tempfile.mkdtemp(prefix="hepcm-"))
    yield d
    shutil.rmtree(d, ignore_errors=True)


@contextlib.contextmanager
def service(big: Big, cache_dir: Path, proxy: str) -> Iterator[int]:
    """The node cache service, started explicitly (a fresh interpreter): its pid."""
    daemon = subprocess.Popen(
        [
            *(sys.executable, "-m", "worker.node.cache_service"),
            *cache_options(proxy, big, cache_dir),
            *("--cache-idle", "600"),
        ],
        env=env_with(),
        cwd=PROJECT,
        stderr=subprocess.PIPE,
        text=True,
    )
    try:

        def up() -> bool:
            assert daemon.poll() is None, daemon.communicate()[1]
            return (cache_dir / SOCKET_NAME).exists()

        wait_until(up, 30, what="the cache service's socket")
        yield daemon.pid
    finally:
        daemon.send_signal(signal.SIGTERM)
        try:
            daemon.wait(timeout=20)
        except subprocess.TimeoutExpired:
            daemon.kill()
            daemon.wait()


def shared_cmd(proxy: str, big: Big, cache_dir: Path, argv: list[str]) -> list[str]:
    """hep-exec through the node cache service in ``cache_dir``."""
    return [*CLI, *cache_options(proxy, big, cache_dir), "--stats", "--", *argv]


def cache_options(proxy: str, big: Big, cache_dir: Path) -> list[str]:
    """What the service and the jobs using it are both given."""
    return ["--server", proxy, "--keys", str(big.master_pub), "--cache-dir", str(cache_dir),
            "--ram", RAM]  # fmt: skip


def run(cmd: list[str], timeout: float = 300) -> tuple[int, str, str, int]:
    """Run hep-exec; (status, stdout, stderr, its pid)."""
    proc = subprocess.Popen(
        cmd, env=env_with(), cwd=PROJECT, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True
    )
    try:
        out, err = proc.communicate(timeout=timeout)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
    return proc.returncode, out, err, proc.pid


def status_fields(text: str) -> dict[str, int]:
    """kB fields of a /proc/<pid>/status text, in bytes."""
    return {m[1]: int(m[2]) * 1024 for m in re.finditer(r"^(\w+):\s+(\d+) kB$", text, re.MULTILINE)}


def peak_private(fields: dict[str, int]) -> int:
    """Peak RSS without the shared memory mapped at the end (not chunks held by Python)."""
    return fields["VmHWM"] - fields.get("RssShmem", 0)


def mib(n: int) -> str:
    return f"{n / MiB:.1f} MiB"


# a traced script that hashes the file, then shows hep-exec's (its parent's) memory
HASH_AND_STATUS = f"sha256sum {FILE}; echo parent=$PPID; echo ==status; cat /proc/$PPID/status"


def hashed_and_status(out: str) -> tuple[str, int, dict[str, int]]:
    digest = out.split()[0]
    parent = int(re.search(r"^parent=(\d+)$", out, re.MULTILINE)[1])  # type: ignore[index]
    return digest, parent, status_fields(out.split("==status", 1)[1])


@pytest.mark.parametrize("ram_files", ["auto", "memfd"])
def test_private_cache_peak_rss_stays_a_few_chunks(big: Big, ram_files: str) -> None:
    """--no-shared-cache: hep-exec reads 600 MiB chunked under --ram 1G in a few chunks of RAM
    (the file on the private tmpfs, or in a sealed memfd)."""
    status, out, err, pid = run(
        hep_exec_cmd(
            big.proxy,
            ["bash", "-c", HASH_AND_STATUS],
            keys=big.master_pub,
            options=["--ram", RAM, "--ram-files", ram_files, "--stats"],
        )
    )
    assert status == 0, err
    digest, parent, fields = hashed_and_status(out)
    assert digest == big.sha256
    assert parent == pid, "the traced command is hep-exec's child"
    peak = peak_private(fields)
    print(
        f"\nhep-exec --no-shared-cache --ram-files {ram_files}, {mib(SIZE)} chunked: "
        f"VmHWM {mib(fields['VmHWM'])}, "
        f"RssShmem {mib(fields.get('RssShmem', 0))}, RssAnon {mib(fields['RssAnon'])}, "
        f"peak without shmem {mib(peak)}"
    )
    assert peak < PEAK_LIMIT, f"hep-exec peak {mib(peak)} (limit {mib(PEAK_LIMIT)})"
    assert re.search(r"cache: 0 hits, 1 misses", err), err  # loaded once, whole


def test_cache_service_peak_rss_stays_a_few_chunks(big: Big, cache_dir: Path) -> None:
    """The node cache service loads the 600 MiB chunked file for a job in a few chunks of RAM;
    the job's hep-exec holds only the fd."""
    with service(big, cache_dir, big.proxy) as svc:
        status, out, err, pid = run(
            shared_cmd(big.proxy, big, cache_dir, ["bash", "-c", HASH_AND_STATUS])
        )
        assert status == 0, err
        svc_fields = status_fields(Path(f"/proc/{svc}/status").read_text())
        client = CacheClient.attach(cache_dir).start()
        try:
            stats = client.stats()
        finally:
            client.close()
    assert stats is not None
    digest, parent, job_fields = hashed_and_status(out)
    assert digest == big.sha256 and parent == pid
    assert "1 objects received" in err and "0 private fallbacks" in err, err
    peak = peak_private(svc_fields)
    print(
        f"\ncache service, {mib(SIZE)} chunked: VmHWM {mib(svc_fields['VmHWM'])}, "
        f"RssShmem {mib(svc_fields.get('RssShmem', 0))}, RssAnon {mib(svc_fields['RssAnon'])}, "
        f"peak without shmem {mib(peak)}; the job's hep-exec {mib(peak_private(job_fields))}"
    )
    assert peak < PEAK_LIMIT, f"service peak {mib(peak)} (limit {mib(PEAK_LIMIT)})"
    assert peak_private(job_fields) < PEAK_LIMIT
    # the object counts its size once: nothing else is cached there
    assert stats["objects"] == 1 and stats["used_bytes"] == SIZE, stats


# the traced script of the corruption test: a failed open, a failed retry, what the loading
# process holds in between, the proxy repaired, a good read
CORRUPT_SCRIPT = """
cat {file} > /dev/null; echo "first=$?"
grep -c {name} {log}
cat {file} > /dev/null; echo "second=$?"
grep -c {name} {log}
echo ==fds
for p in {loaders}; do
  ls -l /proc/$p/fd/
  for d in /proc/$p/fd/*; do [ -d "$d" ] && ls -a "$d"; done 2>/dev/null
done
echo ==repair
cp {good} {bad}
sha256sum {file}
"""


@pytest.mark.parametrize("shared", [False, True], ids=["private", "service"])
def test_corrupt_middle_chunk_fails_with_eio_and_leaves_nothing(
    big: Big, cache_dir: Path, tmp_path: Path, shared: bool
) -> None:
    """A proxy serving one bad chunk: EIO, twice (refetched, not served from a half-written
    file), no RAM file of it left behind; once the proxy has it right, the read succeeds."""
    bad_root = tmp_path / "bad-store"
    corrupt_copy(big.served.store, bad_root, big.middle_object)
    bad = big.served.serve(tmp_path / "bad", root=bad_root)
    name = Path(big.middle_object).name
    access_log = tmp_path / "bad" / "access.log"
    script = CORRUPT_SCRIPT.format(
        file=FILE,
        name=name,
        log=access_log,
        good=big.served.store / big.middle_object,
        bad=bad_root / big.middle_object,
        loaders="{loaders}",
    )
    with contextlib.ExitStack() as stack:
        if shared:
            svc = stack.enter_context(service(big, cache_dir, bad))
            cmd = shared_cmd(
                bad, big, cache_dir, ["bash", "-c", script.format(loaders=f"{svc} $PPID")]
            )
        else:
            cmd = hep_exec_cmd(
                bad,
                ["bash", "-c", script.format(loaders="$PPID")],
                keys=big.master_pub,
                options=["--ram", RAM, "--stats"],
            )
        status, out, err, _pid = run(cmd)
    assert status == 0, err
    lines = out.splitlines()
    assert "first=1" in lines and "second=1" in lines, out
    eio = [ln for ln in err.splitlines() if ln.startswith("cat:")]
    assert len(eio) == 2 and all("Input/output error" in ln for ln in eio), err
    # the bad chunk was asked for again on the second open (not served from what the first
    # left); in the shared case the job fetches it too, after the service failed
    requests = [int(lines[lines.index(f"{k}=1") + 1]) for k in ("first", "second")]
    assert 0 < requests[0] < requests[1], out
    held = out.split("==fds", 1)[1].split("==repair", 1)[0]
    assert "chunked-" not in held, held  # no fd, no name on the tmpfs: nothing half-written
    assert out.split("==repair", 1)[1].split()[0] == big.sha256, out


# ------------------------------------------------------------------ the pieces, in-process


class CountingSource:
    """An ObjectSource over a dict of stored chunks: counts fetches in flight at once."""

    def __init__(self, stored: dict[str, bytes]) -> None:
        self.stored = stored
        self.pool = ThreadPoolExecutor(16)
        self.lock = threading.Lock()
        self.running = 0
        self.most = 0

    def _one(self, url_path: str) -> bytes:
        with self.lock:
            self.running += 1
            self.most = max(self.most, self.running)
        try:
            time.sleep(0.01)
            if url_path not in self.stored:
                raise FetchError(url_path, ["test: never there"])
            return self.stored[url_path]
        finally:
            with self.lock:
                self.running -= 1

    def submit(
        self,
        url_path: str,
        expected: ContentHash | None = None,
        what: str = "",
        *,
        size: int | None = None,
    ) -> Future[bytes]:
        return self.pool.submit(self._one, url_path)

    def ahead(self, url_path: str) -> None:
        pass

    def get(
        self,
        url_path: str,
        expected: ContentHash | None = None,
        what: str = "",
        check: Callable[[bytes], None] | None = None,
        *,
        size: int | None = None,
    ) -> bytes:
        return self._one(url_path)

    def stream(
        self, url_path: str, expected: ContentHash, what: str = "", *, size: int | None = None
    ) -> Iterator[bytes | None]:
        stored = self._one(url_path)
        for at in range(0, len(stored), 100_000):  # as a socket hands them on
            yield stored[at : at + 100_000]


def chunked(n: int, size: int) -> tuple[bytes, list[Chunk], dict[str, bytes]]:
    """A file of n chunks: its bytes, chunk list and stored (compressed) chunks by URL."""
    raw = secrets.token_bytes(n * size - 7)
    chunks, stored = [], {}
    for off in range(0, len(raw), size):
        h, obj = make_object(raw[off : off + size])
        chunks.append(Chunk(off, len(raw[off : off + size]), h))
        stored[object_url(FQRN, h.object_path(Suffix.PARTIAL))] = obj
    return raw, chunks, stored


def files_on_tmpfs(files: RamFiles) -> list[str]:
    """Names on the cache's read-write tmpfs (half-written files included)."""
    if files.backing != "tmpfs":
        return []
    assert files._dirs is not None
    return os.listdir(f"/proc/self/fd/{files._dirs[0]}")


def test_fill_chunks_keeps_a_few_in_flight_and_writes_every_byte() -> None:
    raw, chunks, stored = chunked(40, 64 * 1024)
    source = CountingSource(stored)
    cache = RamCache(64 * MiB)
    try:
        obj = cache.acquire_filled(
            "chunked-x",
            len(raw),
            lambda out: fill_chunks(source, FQRN, "/f", chunks, True, len(raw), out, ahead=3),
        )
        assert Path(obj.path).read_bytes() == raw and obj.size == len(raw)
        assert 1 < source.most <= 3, source.most  # concurrent, but only a few ahead
        assert cache.used_bytes == len(raw) and cache.stats.bytes_loaded == len(raw)
        cache.release(obj)
        assert cache.used_bytes == len(raw)  # counted once, pinned or not
    finally:
        cache.close()
        source.pool.shutdown()


@pytest.mark.parametrize(
    ("damage", "said"),
    [
        ("none", ""),
        ("long", "decompresses to more than"),  # stopped at the catalog's size, not at 64 MiB
        ("short", "object has 5 bytes, catalog says"),
        ("not zlib", "corrupt zlib data"),  # its hash matches: a publisher's fault
        ("cut", "truncated zlib stream"),
    ],
)
def test_a_whole_object_is_written_in_pieces_and_exactly_its_catalog_size(
    damage: str, said: str
) -> None:
    """Objects are inflated straight into their RAM file; one that makes anything but the
    catalog's size is EIO, with one line, and leaves no file."""
    raw = secrets.token_bytes(300_000) + bytes(700_000)  # several pieces, some compressible
    content, stored = make_object(raw)
    if damage == "long":
        stored = zlib.compress(raw + bytes(64 * MiB))
    elif damage == "short":
        stored = zlib.compress(b"short")
    elif damage == "not zlib":
        stored = b"plain bytes, not a zlib stream" * 100
    elif damage == "cut":
        stored = stored[: len(stored) // 2]
    content = ContentHash.of(stored) if damage != "none" else content
    source = CountingSource({object_url(FQRN, content.object_path()): stored})
    files = RamFiles()
    cache = RamCache(256 * MiB, files=files)
    fill = functools.partial(fill_whole, source, FQRN, "/f", content, True, len(raw))
    try:
        if not said:
            obj = cache.acquire_filled("whole", len(raw), fill)
            assert Path(obj.path).read_bytes() == raw and obj.size == len(raw)
            return
        with pytest.raises(RepositoryError) as e:
            cache.acquire_filled("whole", len(raw), fill)
        assert e.value.errno == errno.EIO
        assert str(e.value).startswith(f"{FQRN}:/f: {said}"), str(e.value)
        assert "\n" not in str(e.value)
        assert "whole" not in cache and cache.used_bytes == 0
        assert not files_on_tmpfs(files), "a half-written file stayed on the tmpfs"
    finally:
        cache.close()
        source.pool.shutdown()


@pytest.mark.parametrize("backing", ["tmpfs", "memfd"])
@pytest.mark.parametrize("damage", ["missing", "short"])
def test_failed_chunk_leaves_no_file_and_the_next_open_loads_again(
    damage: str, backing: str
) -> None:
    raw, chunks, stored = chunked(12, 64 * 1024)
    source = CountingSource(dict(stored))
    victim = object_url(FQRN, chunks[6].hash.object_path(Suffix.PARTIAL))
    if damage == "missing":
        del source.stored[victim]
    else:  # verified bytes that inflate to the wrong length (a bad chunk list)
        source.stored[victim] = make_object(b"short")[1]
    try:
        files = RamFiles(backing)
    except RamFilesError as refused:
        pytest.skip(str(refused))
    cache = RamCache(64 * MiB, files=files)
    before = set(os.listdir("/proc/self/fd"))
    try:

        def load() -> CachedObject:
            return cache.acquire_filled(
                "chunked-y",
                len(raw),
                lambda out: fill_chunks(source, FQRN, "/f", chunks, True, len(raw), out),
            )

        with pytest.raises(RepositoryError) as e:
            load()
        assert e.value.errno == errno.EIO
        assert "chunked-y" not in cache and cache.used_bytes == 0
        assert cache.stats.load_errors == 1
        assert not files_on_tmpfs(files), "a half-written file stayed on the tmpfs"
        ours = before | {str(d) for d in files._dirs or ()}
        # the fetches still in flight when it failed end, and leave no fd behind
        wait_until(lambda: set(os.listdir("/proc/self/fd")) <= ours, 10, what="no fd left")
        source.stored = stored  # the proxy has it right now
        obj = load()
        assert Path(obj.path).read_bytes() == raw
        assert cache.used_bytes == len(raw) and len(files_on_tmpfs(files)) in (0, 1)
        cache.release(obj)
    finally:
        cache.close()
        files.close()
        source.pool.shutdown()


def test_unpinned_objects_make_room_before_the_file_fills() -> None:
    """The file grows during the load: older unpinned objects go first, so the cache's files
    never hold more than the limit."""
    cache = RamCache(10 * MiB)
    try:
        for i in range(4):
            cache.release(cache.acquire(f"old{i}", lambda: b"x" * (2 * MiB)))
        assert cache.used_bytes == 8 * MiB
        seen = []

        def fill(out: RamFileWriter) -> None:
            seen.append(cache.used_bytes)
            out.write_at(0, b"y" * (6 * MiB))

        obj = cache.acquire_filled("new", 6 * MiB, fill)
        assert seen == [4 * MiB], seen  # two old objects evicted before the fill
        assert cache.used_bytes == 10 * MiB and cache.stats.evictions == 2
        cache.release(obj)
    finally:
        cache.close()
