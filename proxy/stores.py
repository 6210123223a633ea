"""Store roots on disk: find the repositories in them and open their files safely.

The routing core only ever hands over canonical relative paths; here we additionally make
sure the file actually opened lies inside the repository directory (no symlink leads out)
and is a regular file.
"""

from __future__ import annotations

import errno
import os
import stat
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from pathlib import Path

from cvmfs_format.store import MANIFEST, LocalRepository
from proxy.routing import valid_fqrn


class StoreError(Exception):
    """A store that cannot be served; ``str()`` is a one-line message."""


@dataclass(frozen=True)
class RepoDir:
    """One repository being served: its real directory and optional upstream base URLs."""

    fqrn: str
    dir: Path
    upstream: tuple[str, ...] = ()

    @property
    def prefix(self) -> str:
        return str(self.dir) + "/"


def discover(
    stores: Iterable[Path], upstreams: Mapping[str, tuple[str, ...]]
) -> dict[str, RepoDir]:
    """Repositories = ``STORE/*/.cvmfspublished``; upstream-only ones go to the first store."""
    repos: dict[str, RepoDir] = {}
    first: Path | None = None
    for store in stores:
        if not store.exists():
            raise StoreError(f"{store}: store directory does not exist")
        if not store.is_dir():
            raise StoreError(f"{store}: store is not a directory")
        if not os.access(store, os.R_OK | os.X_OK):
            raise StoreError(f"{store}: store directory is not readable")
        root = store.resolve()
        first = first or root
        found = 0
        for entry in sorted(root.iterdir()):
            if not valid_fqrn(entry.name) or not (entry / MANIFEST).is_file():
                continue
            real = entry.resolve()
            if entry.name in repos:
                raise StoreError(
                    f"repository {entry.name} is in two stores: {repos[entry.name].dir} and {real}"
                )
            if not os.access(real / MANIFEST, os.R_OK):
                raise StoreError(f"{real / MANIFEST}: not readable")
            repos[entry.name] = RepoDir(entry.name, real, upstreams.get(entry.name, ()))
            found += 1
        if not found and not upstreams:
            raise StoreError(f"{store}: no repositories in store (no {store}/*/{MANIFEST})")
    for fqrn, urls in upstreams.items():
        if fqrn in repos or first is None:
            continue
        local = LocalRepository(first, fqrn)
        try:
            local.prepare()
        except OSError as e:
            raise StoreError(
                f"{local.dir}: cannot create repository for upstream fill ({e.strerror})"
            ) from None
        repos[fqrn] = RepoDir(fqrn, local.dir.resolve(), urls)
    for repo in repos.values():
        if repo.upstream:
            (repo.dir / "data" / "txn").mkdir(parents=True, exist_ok=True)
    return repos


def open_file(repo: RepoDir, relpath: str) -> tuple[int, int] | None:
    """Open ``relpath`` inside ``repo`` → (fd, size), or None if absent or not servable.

    Refuses a symlink as the last component, anything but a regular file, and any file whose
    real location is outside the repository directory (a symlinked ``data/XX`` leading out).
    """
    path = repo.prefix + relpath
    try:
        fd = os.open(path, os.O_RDONLY | os.O_NOFOLLOW | os.O_CLOEXEC)
    except OSError as e:
        if e.errno in (errno.ENOENT, errno.ELOOP, errno.ENOTDIR, errno.EISDIR):
            return None
        raise
    try:
        st = os.fstat(fd)
        if not stat.S_ISREG(st.st_mode):
            os.close(fd)
            return None
        real = os.readlink(f"/proc/self/fd/{fd}")
        if not real.startswith(repo.prefix):
            os.close(fd)
            return None
        return fd, st.st_size
    except BaseException:
        os.close(fd)
        raise


def read_file(repo: RepoDir, relpath: str) -> bytes | None:
    """Whole file via :func:`open_file` (small objects and root files)."""
    opened = open_file(repo, relpath)
    if opened is None:
        return None
    fd, size = opened
    try:
        chunks: list[bytes] = []
        while True:
            chunk = os.read(fd, max(size, 65536))
            if not chunk:
                break
            chunks.append(chunk)
        return b"".join(chunks)
    finally:
        os.close(fd)
