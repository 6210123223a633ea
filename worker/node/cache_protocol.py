"""Messages between hep-exec and the node's cache service (sans-I/O).

Transport: an AF_UNIX SOCK_SEQPACKET socket, so every message is one datagram-sized packet
(no framing to get wrong) holding one JSON object; an object's RAM file travels as SCM_RIGHTS
ancillary data. Requests carry ``op``; every message from the service carries the ``op`` it
answers, so a client can keep several requests in flight and read them on one thread:

- ``hello`` {version} -> {op, ok, pid, version, named, table, vouched, …} (+ with ``named``,
  one fd: the service's read-only tmpfs directory, where its objects can be opened by name;
  a finished object is also found there under its key, which a job may try with no request
  at all; then, with ``table``, one fd: a file for the job's in-process answers table, made and
  faulted in while no job ran, the job's to use or close: worker/node/table_pool.py)
- ``open`` {object} -> {op, ok, key, size, name} + one fd, or {op, ok: false, key, errno,
  error}; answered out of order (a miss does not hold up later requests); ``name``: the
  object's name in that directory, or null for a memfd
- ``release`` {keys: [...]} -> no reply (drops one of this connection's pins per key)
- ``prefetch`` {objects: [...], push} -> no reply; fetched in the background. With ``push``
  objects are sent as soon as they are in RAM, as {op: "ready", objects: [[key, size, name], …]}
  + one fd each (those ready together travel in one message), pinned for this connection
  like an ``open`` (so the job's later open needs no round trip)
- ``answers`` {fqrn, root} -> {op, ok, fqrn, root, size} (+ one fd, a sealed memfd of
  ``size`` bytes, when size > 0): the answers ahead earlier jobs learnt for this revision
  (worker.trace.node_answers)
- ``answers_add`` {fqrn, root, size} + one fd -> no reply: a job's own answers ahead, framed
- ``vouch`` {digest} -> no reply: the job verified the signatures of a repository's manifest
  and whitelist with its master keys (worker.repo.repository.ensemble_digest names all three)
- ``vouched`` {digest} -> {op, ok, digest, known}: did a job of the node vouch for it?  (The
  service is the user's own: a job that trusts it with objects may trust it with this.)  The
  ``hello`` reply names the newest ensembles vouched for (``vouched``: [digest, …]), so a job
  mounting one of those asks nothing
- ``stats`` -> {op, ok, ...counters}
- ``dispose`` {} + one fd -> no reply: the last reference to something of the job's whose
  teardown takes time (its shadow tree's private tmpfs: ~4 ms for a warm import's), closed
  by the service on a thread of its own, off the job's exit; sent only to a service whose
  ``hello`` said ``dispose`` (older ones do not know it)

An object is described by how to load it, never by a key the client chose: the service
derives the key itself (content hash, or the digest of the chunk list) and verifies every
byte against the content hashes, so even a confused client cannot plant wrong content.
"""

from __future__ import annotations

import array
import json
import mmap
import os
import socket
import threading
from collections.abc import Mapping
from typing import TYPE_CHECKING, Any, NamedTuple

from cvmfs_format.catalog import Chunk, DirEntry
from cvmfs_format.errors import FormatError
from cvmfs_format.hashes import ContentHash
from worker.repo.repository import chunked_key

if TYPE_CHECKING:
    from worker.config import ExecConfig

VERSION = 6  # 4: vouch and vouched; an answer table is one memfd shared by the jobs
# 5: catalogs handed over inflated, one sealed memfd per catalog for all the node's jobs
# 6: the answer table's stats have st_blocks 1 + size/512, each repository's own st_dev and
# inode 256 for its root
# (a job of 6 must not take a 5 service's answers: its stats would disagree with its own)
MAX_MESSAGE = 1 << 20  # bytes per packet; prefetch batches stay far below
PREFETCH_BATCH = 256
MAX_FDS = 250  # fds per message (the kernel's SCM_MAX_FD is 253)


class ProtocolError(ValueError):
    """A message that does not follow this protocol."""


class ObjectSpec(NamedTuple):
    """Everything the service needs to load one file object."""

    fqrn: str
    path: str
    size: int
    compressed: bool
    hash: ContentHash | None = None
    chunks: tuple[Chunk, ...] = ()

    @property
    def key(self) -> str:
        if self.chunks:
            return chunked_key(self.chunks)
        assert self.hash is not None
        return self.hash.hex

    @classmethod
    def of_entry(cls, fqrn: str, entry: DirEntry, chunks: tuple[Chunk, ...] = ()) -> ObjectSpec:
        return cls(fqrn, entry.path, entry.size, entry.is_compressed, entry.hash, chunks)

    def to_wire(self) -> dict[str, Any]:
        d: dict[str, Any] = {
            "fqrn": self.fqrn,
            "path": self.path,
            "size": self.size,
            "compressed": self.compressed,
        }
        if self.chunks:
            d["chunks"] = [[c.hash.hex, c.offset, c.size] for c in self.chunks]
        else:
            assert self.hash is not None
            d["hash"] = self.hash.hex
        return d

    @classmethod
    def from_wire(cls, d: Any) -> ObjectSpec:
        if not isinstance(d, Mapping):
            raise ProtocolError("object: expected a mapping")
        try:
            fqrn, path, size, compressed = d["fqrn"], d["path"], d["size"], d["compressed"]
            if not (
                isinstance(fqrn, str)
                and fqrn
                and "/" not in fqrn
                and isinstance(path, str)
                and isinstance(size, int)
                and size >= 0
                and isinstance(compressed, bool)
            ):
                raise ProtocolError("object: bad fqrn, path, size or compressed")
            if "chunks" in d:
                chunks = tuple(
                    Chunk(int(off), int(sz), ContentHash.parse(str(h)))
                    for h, off, sz in d["chunks"]
                )
                if not chunks:
                    raise ProtocolError("object: empty chunk list")
                return cls(fqrn, path, size, compressed, None, chunks)
            return cls(fqrn, path, size, compressed, ContentHash.parse(str(d["hash"])))
        except (KeyError, TypeError, ValueError, FormatError) as e:
            if isinstance(e, ProtocolError):
                raise
            raise ProtocolError(f"object: {type(e).__name__}: {e}") from None


def encode(msg: Mapping[str, Any]) -> bytes:
    data = json.dumps(msg, separators=(",", ":")).encode()
    if len(data) > MAX_MESSAGE:
        raise ProtocolError(f"message of {len(data)} bytes exceeds {MAX_MESSAGE}")
    return data


def decode(data: bytes) -> dict[str, Any]:
    try:
        msg = json.loads(data)
    except (UnicodeDecodeError, json.JSONDecodeError):
        raise ProtocolError("not a JSON message") from None
    if not isinstance(msg, dict):
        raise ProtocolError("message is not a JSON object")
    return msg


# each receiving thread's buffer, mapped once and its pages touched only as far as messages
# reach: recvmsg(MAX_MESSAGE) made each message an mmap, an mremap and an munmap, which wait
# for the process's mmap lock (a tracer faulting in its table holds it for milliseconds)
_received = threading.local()


def recv_message(sock: socket.socket, max_fds: int = MAX_FDS) -> tuple[bytes, list[int]]:
    """One message and the fds that came with it; ProtocolError if either was cut short
    (the one piece of socket I/O here: both ends receive the same way)."""
    buf = getattr(_received, "buf", None)
    if buf is None:
        buf = _received.buf = mmap.mmap(-1, MAX_MESSAGE)
    n, anc, flags, _ = sock.recvmsg_into(
        [buf], socket.CMSG_SPACE(4 * max_fds), socket.MSG_CMSG_CLOEXEC
    )
    data = buf[:n]
    fds: list[int] = []
    for level, kind, payload in anc:
        if level == socket.SOL_SOCKET and kind == socket.SCM_RIGHTS:
            arr = array.array("i")
            arr.frombytes(payload[: len(payload) - len(payload) % arr.itemsize])
            fds.extend(arr)
    if flags & (socket.MSG_TRUNC | socket.MSG_CTRUNC):
        for fd in fds:
            os.close(fd)
        raise ProtocolError("truncated message")
    return data, fds


def fetch_settings(config: ExecConfig) -> str:
    """What decides where and how a service fetches, as one string: a job uses a service only
    if the service's is the same (never another job's servers, proxies or timeouts)."""
    return json.dumps(
        {
            "servers": [list(g) for g in config.servers],
            "proxies": str(config.proxies),
            "cvmfs_config": str(config.cvmfs_config),
            "timeout": config.timeout,
            "connect_timeout": config.connect_timeout,
            "retries": config.retries,
            "reset": config.proxy_reset_after,
        },
        sort_keys=True,
    )
