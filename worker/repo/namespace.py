"""The /cvmfs name space: path resolution and stat answers, sans I/O.

Given absolute paths as bytes (what the tracer reads from tracee memory), :meth:`Namespace.resolve`
walks them like the kernel does — ``.``/``..``/``//``, trailing slashes, symlinks (variant ones
expanded with the *tracee's* environment), ELOOP after 40 links, ENOTDIR/ENOENT — and returns a
:class:`Node` or an errno. Repository contents come from a :class:`RepoSet` (catalog lookups;
the only place where I/O can happen, behind the protocol). A symlink that leads out of /cvmfs
yields an ``outside`` node whose ``outside_path`` the kernel resolves itself.
"""

from __future__ import annotations

import errno
import hashlib
import logging
import os
import stat
import time
from collections.abc import Mapping
from typing import Literal, NamedTuple, Protocol

from lru import LRU

from cvmfs_format.catalog import FLAG_DIR, FLAG_LINK, DirEntry
from cvmfs_format.symlinks import expand_symlink
from worker.trace.policy import ASKED

log = logging.getLogger("hep_exec.namespace")

NodeKind = Literal["dir", "file", "symlink", "special", "outside"]
MAX_SYMLINKS = 40  # the kernel's limit for one path walk
DEFAULT_DEV = os.makedev(0, 0xCF)
_EMPTY_ENV: Mapping[str, str] = {}
_ENC = "utf-8"
_ERRORS = "surrogateescape"


class RepoView(Protocol):
    """One repository's catalog, as the name space needs it."""

    @property
    def fqrn(self) -> str: ...

    def lookup(self, relpath: str) -> DirEntry | None: ...

    def listing(self, relpath: str) -> list[DirEntry]: ...


class RepoSet(Protocol):
    """The repositories under the mount; ``get`` raises OSError (errno set) for unusable names."""

    def get(self, fqrn: str) -> RepoView: ...

    def names(self) -> list[str]: ...


class Node(NamedTuple):
    """What the tracer needs to answer for one path.

    ``path`` is the canonical path of the node (inside the mount), ``outside_path`` the path the
    kernel should resolve instead (kind ``outside``). ``env_dependent`` says the answer came
    through a variant symlink and must not be cached across different environments.
    """

    kind: NodeKind
    path: bytes
    ino: int = 0
    mode: int = 0
    nlink: int = 1
    size: int = 0
    mtime: int = 0
    mtime_ns: int = 0
    uid: int = 0
    gid: int = 0
    rdev: int = 0
    target: bytes | None = None
    repo: str | None = None
    entry: DirEntry | None = None
    outside_path: bytes | None = None
    env_dependent: bool = False

    @property
    def is_dir(self) -> bool:
        return self.kind == "dir"

    @property
    def d_type(self) -> int:
        return d_type_of(self.mode)


class StatValues(NamedTuple):
    """``struct stat`` fields for a node (times: seconds + nanoseconds)."""

    st_dev: int
    st_ino: int
    st_mode: int
    st_nlink: int
    st_uid: int
    st_gid: int
    st_rdev: int
    st_size: int
    st_blksize: int
    st_blocks: int
    st_atime: int
    st_atime_nsec: int
    st_mtime: int
    st_mtime_nsec: int
    st_ctime: int
    st_ctime_nsec: int


DT_UNKNOWN, DT_FIFO, DT_CHR, DT_DIR, DT_BLK, DT_REG, DT_LNK, DT_SOCK = 0, 1, 2, 4, 6, 8, 10, 12


def _show(p: bytes) -> str:
    return p.decode(_ENC, _ERRORS)


def d_type_of(mode: int) -> int:
    return (mode >> 12) & 0xF  # the DT_* values are exactly the S_IFMT bits shifted


ROOT_INODE = 256  # a repository's root, as the real client numbers it (and statx's MOUNT_ROOT)


def inode_number(repo: str, relpath: str, entry: DirEntry | None = None) -> int:
    """Stable per path, shared by a hardlink group (one directory, one catalog), per repo."""
    if not relpath:
        return ROOT_INODE
    if entry is not None and entry.hardlink_group and not entry.is_dir:
        parent = relpath.rsplit("/", 1)[0]
        key = f"{repo}\0h\0{parent}\0{entry.hardlink_group}"
    else:
        key = f"{repo}\0{relpath}"
    digest = hashlib.blake2b(key.encode(_ENC, _ERRORS), digest_size=8).digest()
    return (int.from_bytes(digest, "little") >> 1) or 1


class Namespace:
    """Resolve absolute paths under ``mount`` against the repositories in ``repos``."""

    def __init__(
        self,
        repos: RepoSet,
        mount: bytes = b"/cvmfs",
        *,
        uid: int | None = None,
        gid: int | None = None,
        dev: int = DEFAULT_DEV,
        parent_ino: int = 2,
        mount_mtime: int | None = None,
        max_symlinks: int = MAX_SYMLINKS,
        answer_cache_size: int = 1 << 16,
    ) -> None:
        if not mount.startswith(b"/") or mount == b"/":
            raise ValueError(f"mount point must be an absolute directory, not {mount!r}")
        self.repos = repos
        self.mount = b"/" + b"/".join(p for p in mount.split(b"/") if p)
        self._mount_parts = [p for p in self.mount.split(b"/") if p]
        self._depth = len(self._mount_parts)
        self.uid = os.getuid() if uid is None else uid
        self.gid = os.getgid() if gid is None else gid
        self.dev = dev
        self.parent_ino = parent_ino
        self.mount_mtime = int(time.time()) if mount_mtime is None else mount_mtime
        self.max_symlinks = max_symlinks
        self.mount_ino = inode_number("", "/")
        self._answers: LRU[tuple[bytes, bool], Node | int] = LRU(answer_cache_size)

    # ------------------------------------------------------------------ queries

    def is_inside(self, path: bytes) -> bool:
        """Lexical test: does ``path`` start with the mount point (the tracer's cheap filter)?"""
        return path.startswith(self.mount) and (
            len(path) == len(self.mount) or path[len(self.mount)] == 0x2F
        )

    def resolve(
        self, path: bytes, follow: bool = True, env: Mapping[str, str] = _EMPTY_ENV
    ) -> Node | int:
        """Node for an absolute path, or an errno (ENOENT, ENOTDIR, ELOOP, EIO, EINVAL …).

        ``follow`` decides whether a symlink in the *last* component is followed (stat vs
        lstat); a trailing slash always follows it and requires a directory. Answers that
        depend neither on the environment nor on I/O trouble are remembered (catalogs are
        immutable), so a repeated path costs one dictionary lookup.
        """
        key = (path, follow)
        hit = self._answers.get(key)
        if hit is not None:
            return hit
        result, cacheable = self._walk(path, follow, env)
        if cacheable and not (isinstance(result, Node) and result.env_dependent):
            self._answers[key] = result
        return result

    def _walk(self, path: bytes, follow: bool, env: Mapping[str, str]) -> tuple[Node | int, bool]:
        """The path walk; returns (answer, whether it may be cached)."""
        if not path.startswith(b"/") or b"\0" in path:
            return (errno.EINVAL if path else errno.ENOENT), True
        stack = [p for p in reversed(path.split(b"/")) if p]
        if len(path) > 1 and path.endswith(b"/"):
            stack.insert(0, b".")
        mount, depth = self._mount_parts, self._depth
        cur: list[bytes] = []
        ents: list[DirEntry] = []  # entries of cur[depth:] (repo root first)
        repo: RepoView | None = None
        links = 0
        variant = False
        while stack:
            comp = stack.pop()
            n = len(cur)
            if comp == b".":
                continue
            if comp == b"..":
                if n > depth:
                    ents.pop()
                if cur:
                    cur.pop()
                if len(cur) <= depth:
                    repo = None
                continue
            if n < depth:
                if comp == mount[n]:
                    cur.append(comp)
                    continue
                rest = [comp, *reversed(stack)]
                return self._outside(b"/" + b"/".join(cur + rest), variant), not variant
            if n == depth:
                name = comp.decode(_ENC, _ERRORS)
                try:
                    repo = self.repos.get(name)
                    root = repo.lookup("")
                except OSError as e:
                    if not getattr(e, "reported", False):  # once per failed mount
                        where = self.mount + b"/" + comp
                        asked = _show(ASKED.get() or path)
                        log.warning("%s: cannot mount %s: %s", asked, _show(where), e)
                        e.reported = True  # type: ignore[attr-defined]  # it comes back, remembered
                    return (e.errno or errno.EIO), False
                if root is None:
                    return errno.EIO, False
                cur.append(comp)
                ents.append(root)
                continue
            assert repo is not None
            rel = ents[-1].path + "/" + comp.decode(_ENC, _ERRORS)
            try:
                entry = repo.lookup(rel)
            except OSError as e:
                if not getattr(e, "reported", False):
                    at = self.mount.decode(_ENC, _ERRORS) + rel
                    by = ASKED.get()
                    log.warning(
                        "%s: %s", at if by is None or _show(by) == at else f"{_show(by)}: {at}", e
                    )
                return (e.errno or errno.EIO), False
            if entry is None:
                return errno.ENOENT, not variant
            if entry.is_symlink and (stack or follow):
                links += 1
                if links > self.max_symlinks:
                    return errno.ELOOP, not variant
                if "$(" in entry.symlink:
                    variant = True
                target = expand_symlink(entry.symlink, env).encode(_ENC, _ERRORS)
                if not target:
                    return errno.ENOENT, not variant
                if target.startswith(b"/"):
                    cur, ents, repo = [], [], None
                comps = [p for p in target.split(b"/") if p]
                if target.endswith(b"/") and comps:
                    comps.append(b".")  # a trailing slash in the target: must be a directory
                stack.extend(reversed(comps))
                continue
            if entry.is_dir:
                cur.append(comp)
                ents.append(entry)
                continue
            if stack:
                return errno.ENOTDIR, not variant
            return self._entry_node(repo.fqrn, rel, entry, env, variant), not variant
        n = len(cur)
        if n < depth:
            return self._outside(b"/" + b"/".join(cur), variant), not variant
        if n == depth:
            return self._mount_node(variant), False  # nlink follows what gets mounted
        assert repo is not None
        last = ents[-1]
        return self._entry_node(repo.fqrn, last.path, last, env, variant), not variant

    def listdir(
        self, path: bytes, env: Mapping[str, str] = _EMPTY_ENV
    ) -> list[tuple[bytes, int, int]] | int:
        """``(name, d_type, ino)`` of a directory, ``.`` and ``..`` first; or an errno.

        EXDEV means the path resolves outside the mount (not ours to list).
        """
        got = self.children(path, env)
        if isinstance(got, int):
            return got
        node, kids = got
        if node.repo is None:
            out = [(b".", DT_DIR, self.mount_ino), (b"..", DT_DIR, self.parent_ino)]
            for name in self.repos.names():
                out.append((name.encode(_ENC, _ERRORS), DT_DIR, inode_number(name, "")))
            return out
        assert node.entry is not None
        rel = node.entry.path
        parent_rel = rel.rsplit("/", 1)[0]
        parent_ino = self.mount_ino if rel == "" else inode_number(node.repo, parent_rel)
        out = [(b".", DT_DIR, node.ino), (b"..", DT_DIR, parent_ino)]
        out += [(name, d_type_of(kid.mode), kid.ino) for name, kid in kids]
        return out

    def children(
        self, path: bytes, env: Mapping[str, str] = _EMPTY_ENV
    ) -> tuple[Node, list[tuple[bytes, Node]]] | int:
        """A directory and the nodes of its entries (none for the mount itself, whose
        entries are the repositories); or an errno (EXDEV: outside the mount)."""
        node = self.resolve(path, True, env)
        if isinstance(node, int):
            return node
        if node.kind == "outside":
            return errno.EXDEV
        if node.kind != "dir":
            return errno.ENOTDIR
        if node.repo is None:
            return node, []
        assert node.entry is not None
        try:
            children = self.repos.get(node.repo).listing(node.entry.path)
        except OSError as e:
            if not getattr(e, "reported", False):
                log.warning("%s: cannot list: %s", path.decode(_ENC, _ERRORS), e)
            return e.errno or errno.EIO
        # whoever lists a directory looks at its entries next (ls -l, an import, the
        # tracer answering them ahead): their answers are in this listing already, so
        # resolving them must not ask the catalog again, one by one
        prefill = not node.env_dependent and is_normal_path(path)
        kids: list[tuple[bytes, Node]] = []
        for c in children:
            cname = c.path.rpartition("/")[2].encode(_ENC, _ERRORS)  # (c.name, inlined)
            child = self._entry_node(node.repo, c.path, c, env, False)
            kids.append((cname, child))
            if prefill and not child.env_dependent:
                self._answers[(path + b"/" + cname, False)] = child
        return node, kids

    def stat_values(self, node: Node, uid: int | None = None, gid: int | None = None) -> StatValues:
        """``struct stat`` for a node; uid/gid default to the node's (the caller's)."""
        if node.kind == "outside":
            raise ValueError("stat of an outside node is the kernel's business")
        blocks = 1 + node.size // 512  # as the real client counts them
        return StatValues(
            st_dev=self.dev,
            st_ino=node.ino,
            st_mode=node.mode,
            st_nlink=node.nlink,
            st_uid=node.uid if uid is None else uid,
            st_gid=node.gid if gid is None else gid,
            st_rdev=node.rdev,
            st_size=node.size,
            st_blksize=4096,
            st_blocks=blocks,
            st_atime=node.mtime,
            st_atime_nsec=node.mtime_ns,
            st_mtime=node.mtime,
            st_mtime_nsec=node.mtime_ns,
            st_ctime=node.mtime,
            st_ctime_nsec=node.mtime_ns,
        )

    # ------------------------------------------------------------------ node builders

    def _outside(self, path: bytes, variant: bool) -> Node:
        return Node("outside", path, outside_path=path, env_dependent=variant)

    def _mount_node(self, variant: bool) -> Node:
        return Node(
            "dir",
            self.mount,
            ino=self.mount_ino,
            mode=stat.S_IFDIR | 0o755,
            nlink=2 + len(self.repos.names()),
            size=4096,
            mtime=self.mount_mtime,
            uid=self.uid,
            gid=self.gid,
            env_dependent=variant,
        )

    def _entry_node(
        self, fqrn: str, rel: str, entry: DirEntry, env: Mapping[str, str], variant: bool
    ) -> Node:
        # positional, the flags tested here: a listing makes one per entry
        path = self.mount + b"/" + (fqrn + rel).encode(_ENC, _ERRORS)
        target = None
        size = entry.size
        rdev = 0
        kind: NodeKind
        flags = entry.flags
        if flags & FLAG_DIR:
            kind = "dir"
        elif flags & FLAG_LINK:
            kind = "symlink"
            if "$(" in entry.symlink:
                variant = True
            target = expand_symlink(entry.symlink, env).encode(_ENC, _ERRORS)
            size = len(target)
        elif stat.S_ISREG(entry.mode):
            kind = "file"
        else:
            kind = "special"
            if stat.S_ISCHR(entry.mode) or stat.S_ISBLK(entry.mode):
                rdev, size = entry.size, 0
            else:
                size = 0
        return Node(
            kind,
            path,
            inode_number(fqrn, rel, entry),
            entry.mode,
            entry.linkcount,
            size,
            entry.mtime,
            entry.mtime_ns,
            self.uid,
            self.gid,
            rdev,
            target,
            fqrn,
            entry,
            None,
            variant,
        )


# ---------------------------------------------------------------------- decisions (pure)

_WRITE_FLAGS = os.O_CREAT | os.O_TRUNC | os.O_APPEND


def open_decision(flags: int, node: Node | int, uid: int | None = None) -> int | None:
    """errno an ``open`` with ``flags`` must fail with on this (resolved) node, else None.

    ``node`` is what :meth:`Namespace.resolve` returned, resolved with
    ``follow = not flags & O_NOFOLLOW``. Outside nodes are the kernel's (None).
    """
    if isinstance(node, int):
        if node == errno.ENOENT and flags & os.O_CREAT:
            return errno.EROFS
        return node
    if node.kind == "outside":
        return None
    acc = flags & os.O_ACCMODE
    writes = acc in (os.O_WRONLY, os.O_RDWR) or bool(flags & _WRITE_FLAGS)
    if flags & os.O_CREAT and flags & os.O_EXCL:
        return errno.EEXIST
    if node.kind == "symlink":  # only reached with O_NOFOLLOW
        return None if flags & os.O_PATH else errno.ELOOP
    if node.kind == "dir":
        if flags & os.O_CREAT or acc in (os.O_WRONLY, os.O_RDWR):
            return errno.EISDIR
        return None
    if flags & os.O_DIRECTORY:
        return errno.ENOTDIR
    if writes:
        return errno.EROFS
    if flags & os.O_PATH:
        return None
    if node.kind == "special":
        return errno.ENXIO
    if (uid if uid is not None else node.uid) != 0 and not node.mode & stat.S_IRUSR:
        return errno.EACCES
    return None


def access_decision(mode: int, node: Node | int, uid: int | None = None) -> int | None:
    """errno for ``access``/``faccessat`` with R_OK/W_OK/X_OK ``mode``, else None (success)."""
    if isinstance(node, int):
        return node
    if node.kind == "outside":
        return None
    if mode & os.W_OK:
        return errno.EROFS
    root = (uid if uid is not None else node.uid) == 0
    if mode & os.R_OK and not root and not node.mode & stat.S_IRUSR:
        return errno.EACCES
    if mode & os.X_OK:
        if root:
            if node.kind != "dir" and not node.mode & 0o111:
                return errno.EACCES
        elif not node.mode & stat.S_IXUSR:
            return errno.EACCES
    return None


def is_normal_path(path: bytes) -> bool:
    """An absolute path with no empty, ``.`` or ``..`` component and no trailing slash: one
    that names what its string says, so answers may be filed under it."""
    return (
        path.startswith(b"/")
        and not path.endswith(b"/")
        and b"//" not in path
        and b"/./" not in path
        and b"/../" not in path
        and not path.endswith((b"/.", b"/.."))
    )
