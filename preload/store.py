"""The local store: Stratum-1 layout per repository, a lock per store, atomic commits, prune.

Objects are fetched into ``<store>/.preload-tmp/<fqrn>/`` (outside ``data/``, so a crash never
leaves a partial file where a web server would serve it) and renamed into ``data/XX/`` only
after their hash verified. The manifest is replaced last.
"""

from __future__ import annotations

import asyncio
import contextlib
import fcntl
import os
import queue
import shutil
import threading
from dataclasses import dataclass
from pathlib import Path
from types import TracebackType

import aiofiles.os

from cvmfs_format.store import MANIFEST, WHITELIST, LocalRepository, atomic_write

LOCK_NAME = ".preload.lock"
TMP_NAME = ".preload-tmp"


class StoreLocked(Exception):
    """Another preload holds the store's lock."""


class StoreLock:
    """``flock`` on ``<store>/.preload.lock``; released by the kernel if the process dies."""

    def __init__(self, store: Path) -> None:
        self.path = store / LOCK_NAME
        self._fd: int | None = None

    def __enter__(self) -> StoreLock:
        self.path.parent.mkdir(parents=True, exist_ok=True)
        fd = os.open(self.path, os.O_RDWR | os.O_CREAT, 0o644)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            holder = _lock_holder(fd)
            os.close(fd)
            who = f"pid {holder}" if holder else "its pid is not known"
            raise StoreLocked(
                f"{self.path}: the store is locked by another preload ({who}); nothing was done"
            ) from None
        os.ftruncate(fd, 0)
        os.write(fd, f"{os.getpid()}\n".encode())
        self._fd = fd
        return self

    def __exit__(
        self,
        t: type[BaseException] | None,
        e: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        if self._fd is not None:
            os.ftruncate(self._fd, 0)
            os.close(self._fd)
            self._fd = None


def _lock_holder(fd: int) -> int | None:
    """The pid holding the flock on ``fd``'s file: the kernel's answer (/proc/locks), else
    the pid the holder wrote into the file (absent in the instant between lock and write)."""
    st = os.fstat(fd)
    ident = f"{os.major(st.st_dev):02x}:{os.minor(st.st_dev):02x}:{st.st_ino}"
    try:
        with open("/proc/locks") as f:
            for line in f:
                fields = line.split()
                # "1: FLOCK  ADVISORY  WRITE 1234 fd:01:5678 0 EOF" (a blocked waiter: "->")
                if len(fields) >= 6 and fields[1] == "FLOCK" and fields[5] == ident:
                    pid = int(fields[4])
                    if pid > 0:
                        return pid
    except (OSError, ValueError):
        pass
    text = os.read(fd, 64).decode(errors="replace").strip()
    return int(text) if text.isdigit() else None


@dataclass
class RepoStore:
    """One repository directory inside a store."""

    root: Path
    fqrn: str

    @property
    def dir(self) -> Path:
        return self.root / self.fqrn

    @property
    def tmp_dir(self) -> Path:
        return self.root / TMP_NAME / self.fqrn

    @property
    def local(self) -> LocalRepository:
        return LocalRepository(self.root, self.fqrn)

    def manifest_bytes(self) -> bytes | None:
        try:
            return (self.dir / MANIFEST).read_bytes()
        except FileNotFoundError:
            return None

    def prepare(self) -> None:
        """Create ``data/00..ff`` and a clean temp dir (leftovers of a killed run go away)."""
        for i in range(256):
            (self.dir / "data" / f"{i:02x}").mkdir(parents=True, exist_ok=True)
        if self.tmp_dir.exists():
            shutil.rmtree(self.tmp_dir)
        self.tmp_dir.mkdir(parents=True)

    def present(self) -> set[str]:
        """Relative paths of every object under ``data/XX/`` (one scandir per directory)."""
        out: set[str] = set()
        data = self.dir / "data"
        if not data.is_dir():
            return out
        for i in range(256):
            sub = f"{i:02x}"
            try:
                with os.scandir(data / sub) as it:
                    out.update(f"data/{sub}/{e.name}" for e in it)
            except FileNotFoundError:
                continue
        return out

    async def commit(self, tmp: Path, relpath: str) -> None:
        """Verified temp file -> its final name, atomically."""
        await aiofiles.os.replace(tmp, self.dir / relpath)

    def commit_now(self, tmp: str, relpath: str) -> None:
        """:meth:`commit` on the caller's thread (a rename costs less than a thread hop)."""
        os.replace(tmp, f"{self.dir}/{relpath}")

    def write_object(self, relpath: str, stored: bytes) -> None:
        target = self.dir / relpath
        if not target.exists():
            atomic_write(target, stored, self.tmp_dir)

    def write_ensemble(self, whitelist: bytes, manifest: bytes) -> None:
        """Whitelist, then manifest: the manifest is the switch to the new revision."""
        atomic_write(self.dir / WHITELIST, whitelist, self.tmp_dir, sync=True)
        atomic_write(self.dir / MANIFEST, manifest, self.tmp_dir, sync=True)

    def prune(self, keep: set[str]) -> tuple[int, int]:
        """Remove objects not in ``keep``; returns (objects, bytes) removed."""
        n = size = 0
        for rel in self.present() - keep:
            p = self.dir / rel
            try:
                size += p.stat().st_size
                p.unlink()
                n += 1
            except FileNotFoundError:
                continue
        return n, size

    def cleanup(self) -> None:
        shutil.rmtree(self.tmp_dir, ignore_errors=True)


class ObjectWriter:
    """Verified objects into the store from a thread of their own.

    Why: creating a file is the dearest step of a preload after the download itself (tens of
    µs in the kernel per object, far more on an ext4 without a journal that has just deleted
    many files), and on the event loop's thread it stops every download meanwhile; here it
    overlaps them.  Each object is written to a temp file outside ``data/`` and renamed into
    place, as :meth:`RepoStore.commit` does; at most ``max_pending`` bytes wait in memory.
    """

    def __init__(self, store: RepoStore, max_pending: int = 64 << 20) -> None:
        self.max_pending = max_pending
        self.error: OSError | None = None  # the first failure; nothing is written after it
        self._queued = 0  # bytes handed over (event loop's side)
        self._written = 0  # bytes done with (the writer's side)
        self._dir = str(store.dir)
        self._tmp = f"{store.tmp_dir}/{os.getpid()}-w"
        self._q: queue.SimpleQueue[list[tuple[str, bytes]] | None] = queue.SimpleQueue()
        self._batch: list[tuple[str, bytes]] = []
        self._thread = threading.Thread(target=self._run, name="preload-writer", daemon=True)
        self._thread.start()

    def put(self, relpath: str, data: bytes) -> None:
        """Hand one object over (from the event loop's thread).  Objects handed over in one
        turn of the loop go as one batch: one wake-up of the writer, not one each."""
        self._queued += len(data)
        if not self._batch:
            asyncio.get_running_loop().call_soon(self._flush)
        self._batch.append((relpath, data))

    def _flush(self) -> None:
        batch, self._batch = self._batch, []
        if batch:
            self._q.put(batch)

    async def room(self) -> None:
        """Wait while too many bytes are waiting to be written."""
        while self._queued - self._written > self.max_pending and self.error is None:
            await asyncio.sleep(0.002)

    async def close(self) -> None:
        """Everything handed over is in place (or :attr:`error` says why not)."""
        self._flush()
        self._q.put(None)
        await asyncio.to_thread(self._thread.join)

    def _run(self) -> None:
        flags = os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_CLOEXEC
        n = 0
        while (batch := self._q.get()) is not None:
            for relpath, data in batch:
                if self.error is None:
                    n += 1
                    tmp = f"{self._tmp}{n}"
                    try:
                        fd = os.open(tmp, flags, 0o644)
                        try:
                            view = memoryview(data)
                            while view:
                                view = view[os.write(fd, view) :]
                        finally:
                            os.close(fd)
                        os.replace(tmp, f"{self._dir}/{relpath}")
                    except OSError as e:  # named by the object it was for (a full disk...)
                        self.error = OSError(e.errno, e.strerror, f"{self._dir}/{relpath}")
                        with contextlib.suppress(OSError):
                            os.unlink(tmp)
                self._written += len(data)
