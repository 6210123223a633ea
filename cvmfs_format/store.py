"""A repository in the Stratum-1 layout on local disk: ``<root>/<fqrn>/{.cvmfs*,data/}``.

Writes are atomic (temp file in ``data/txn`` + rename), and the manifest goes last, so a
reader or a static web server never sees a half-written object or a manifest that points at
missing objects.

``.cvmfs_master_replica`` beside the manifest says that the directory holds every object of
the revision it publishes, so it can be replicated from (``cvmfs_preload`` and
``cvmfs_swissknife pull`` ask for it and refuse a server that 404s it). Whoever changes the
published revision removes it first unless the new revision is complete too, and writes it
only once the revision is complete and published.
"""

from __future__ import annotations

import contextlib
import os
from pathlib import Path

from cvmfs_format.errors import FormatError

MANIFEST = ".cvmfspublished"
WHITELIST = ".cvmfswhitelist"
REPLICA_MARKER = ".cvmfs_master_replica"


def atomic_write(path: Path, data: bytes, tmp_dir: Path | None = None, sync: bool = False) -> None:
    """Write ``data`` to ``path`` so that ``path`` holds either the old or the new bytes."""
    import tempfile  # (here: not on the start of a job, which reads stores only)

    tmp_dir = tmp_dir or path.parent
    fd, tmp = tempfile.mkstemp(dir=tmp_dir, prefix=".tmp-")
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(data)
            if sync:
                f.flush()
                os.fsync(f.fileno())
        os.chmod(tmp, 0o644)
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(tmp)
        raise


def _sync_dir(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY | os.O_DIRECTORY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def mark_replica(repo_dir: Path, tmp_dir: Path | None = None) -> None:
    """Mark ``repo_dir`` as holding its whole published revision (temp file + rename)."""
    if (repo_dir / REPLICA_MARKER).is_file():
        return
    atomic_write(repo_dir / REPLICA_MARKER, b"", tmp_dir, sync=True)
    _sync_dir(repo_dir)


def unmark_replica(repo_dir: Path) -> bool:
    """Remove the marker, durably (before the caller changes the published revision);
    returns whether there was one."""
    try:
        os.unlink(repo_dir / REPLICA_MARKER)
    except FileNotFoundError:
        return False
    _sync_dir(repo_dir)
    return True


class LocalRepository:
    """One repository directory; ``read`` is the Reader used by :mod:`cvmfs_format.verify`."""

    def __init__(self, root: Path, fqrn: str) -> None:
        self.fqrn = fqrn
        self.dir = Path(root) / fqrn

    @property
    def exists(self) -> bool:
        return (self.dir / MANIFEST).is_file()

    def read(self, relpath: str) -> bytes:
        try:
            return (self.dir / relpath).read_bytes()
        except FileNotFoundError:
            raise FormatError(f"{self.dir / relpath}: missing") from None
        except OSError as e:
            raise FormatError(f"{self.dir / relpath}: cannot read ({e.strerror})") from None

    def read_manifest(self) -> bytes:
        if not self.exists:
            raise FormatError(f"{self.dir}: not a CVMFS repository (no {MANIFEST})")
        return self.read(MANIFEST)

    def has(self, relpath: str) -> bool:
        return (self.dir / relpath).exists()

    def prepare(self) -> None:
        (self.dir / "data" / "txn").mkdir(parents=True, exist_ok=True)
        for i in range(256):
            (self.dir / "data" / f"{i:02x}").mkdir(exist_ok=True)

    def write_object(self, relpath: str, stored: bytes) -> bool:
        """Store an object unless present; returns True if it was written."""
        target = self.dir / relpath
        if target.exists():
            return False
        atomic_write(target, stored, self.dir / "data" / "txn")
        return True

    def write_whitelist(self, raw: bytes) -> None:
        atomic_write(self.dir / WHITELIST, raw, self.dir / "data" / "txn", sync=True)

    def write_manifest(self, raw: bytes) -> None:
        """Last step of any update: makes the new revision visible at once."""
        atomic_write(self.dir / MANIFEST, raw, self.dir / "data" / "txn", sync=True)

    def mark_replica(self) -> None:
        """After :meth:`write_manifest` of a revision whose every object is stored."""
        mark_replica(self.dir, self.dir / "data" / "txn")
