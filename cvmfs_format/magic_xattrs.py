"""CernVM-FS's magic extended attributes: what its client (2.11) answers for getxattr of
``user.revision``, ``user.hash`` and the like on a /cvmfs path, the ones that follow from the
catalog (``attr -g revision /cvmfs/<repository>`` is how a site asks which revision a node
sees).  The client's run-time ones (``user.host``, ``user.expires``, ``user.pid`` …) are not
here: they describe that client process.  Values as the client writes them; each fits the
one-byte lengths of an xattr blob (cvmfs_format.xattrs) or is left out."""

from __future__ import annotations

from cvmfs_format.catalog import DirEntry

NAMES = (
    b"user.fqrn", b"user.revision", b"user.root_hash",  # files and directories
    b"user.hash", b"user.chunks", b"user.compression", b"user.external_file",  # files
)  # fmt: skip


def magic_xattrs(
    fqrn: str, revision: int, root_hash: str, entry: DirEntry | None, chunks: int
) -> dict[bytes, bytes]:
    """Name -> value for the entry (None: the repository's root as the mount shows it);
    ``chunks``: how many the entry's file is stored in (1 when not chunked).  Nothing for a
    symlink or a FIFO: the kernel answers ENODATA for user.* names of anything but files and
    directories before a file system is asked (its ``user.rawlink`` never reaches anyone)."""
    if entry is not None and not (entry.is_regular or entry.is_dir):
        return {}
    out = {
        b"user.fqrn": fqrn.encode(),
        b"user.revision": b"%d" % revision,
        b"user.root_hash": root_hash.encode(),
    }
    if entry is not None and entry.is_regular:
        if entry.hash is not None:  # (a chunked file's whole-file hash is not published)
            out[b"user.hash"] = entry.hash.hex.encode()
        out[b"user.chunks"] = b"%d" % chunks
        out[b"user.compression"] = b"zlib" if entry.is_compressed else b"none"
        out[b"user.external_file"] = b"1" if entry.is_external else b"0"
    return {k: v for k, v in out.items() if len(v) <= 255}
