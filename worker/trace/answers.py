"""Answering the C trap loop's misses: walk a path through the policy, return an action.

On a miss the C side (``worker.trace._trap``) calls :meth:`Session.answer` with ``(tid, class,
flags, path)``; this module walks the path through the :class:`~worker.trace.policy.Policy`
(symlinks, variant symlinks, ``..``, leaving the mount) and returns an action tuple, which the
C side applies and, if cacheable, remembers.  Directories are mirrored, empty files and all, in
the run's shadow tree (:mod:`worker.trace.tracer` makes it), so that tracees get real directory
fds.  The class and action numbers here must match worker/trace/_trap.c.
"""

from __future__ import annotations

import errno
import logging
import os
import threading
from collections.abc import Callable

from worker.trace import _tmpfs
from worker.trace.exec_files import ExecFiles
from worker.trace.mount_table import MountTables
from worker.trace.node_answers import (
    LISTING,
    OPENED,
    OPENS_LOOKED,
    NodeAnswers,
    encode_listing,
)
from worker.trace.policy import (
    ASKED,
    Found,
    Kind,
    Node,
    Outside,
    Policy,
    access_allowed,
    repository_dev,
)
from worker.trace.proc_maps import OpenedFiles, maps_with_cvmfs_paths
from worker.trace.said import EVERYDAY_ERRNOS, SAID
from worker.trace.shebang import file_head
from worker.trace.table_files import TableFiles
from worker.trace.trap_abi import (
    F_MAPS,
    F_MOUNTS,
    F_NOFOLLOW,
    F_OPATH,
    F_PROCEXE,
    F_USERXATTR,
    F_WRITE,
    MAX_AHEAD,
    SAFE,
    Act,
    Action,
    Cls,
    NodeOps,
)

log = logging.getLogger("hep-exec")

MAX_SYMLINKS = 40


class Session:
    """One run: the policy, the shadow tree and the answers given so far.  (A plain class, not
    a dataclass: every job's start defines it, and its generated methods were ~0.8 ms of that.)"""

    def __init__(
        self,
        policy: Policy,
        mount: bytes,
        shadow: bytes,  # where tracees find the shadow tree (redirect targets)
        shadow_write: bytes = b"",  # where we write it (a read-write view; default: ``shadow``)
        # hands the C side answers before they are asked for (worker.trace._trap.put in a run)
        put: Callable[[list[tuple[int, int, bytes, Action]]], int] | None = None,
    ) -> None:
        self.policy = policy
        self.mount = mount
        self.shadow = shadow
        self.shadow_write = shadow_write or shadow
        self.put = put
        # answers shared with the node's other jobs, and the C side's packing: set by the run
        self.node_answers: NodeAnswers | None = None
        self.node_ops: NodeOps | None = None
        self.uid = os.getuid()
        self.gid = os.getgid()
        self.dev = os.stat(shadow).st_dev
        self._mparts = mount.strip(b"/").split(b"/")
        self._nodes: dict[bytes, Node | int] = {}
        self._populated: set[bytes] = set()
        self._answered_ahead: set[bytes] = set()  # directories given to ``put``
        self._opened_ahead: set[bytes] = set()  # ... with their files' opens
        self._resolved: dict[tuple[bytes, bool], Found | Outside | int] = {}
        self.opened = OpenedFiles()
        self.exec_files = ExecFiles(self._in_mount, shadow, self.shadow_write)  # (run closes)
        self.table_files = TableFiles()  # (run closes)
        self.mount_tables = MountTables(
            mount,
            self.dev,
            lambda: [(n, repository_dev(n)) for n in policy.mounted()],
            self.table_files,
        )
        self.answering = 0  # the thread answering a call, while it does
        # opens put from the node's answers: (object file, /cvmfs path) lists, and those of
        # them put during the call being answered
        self._notes_put: list[list[tuple[bytes, bytes]]] = []
        self._just_put: list[list[tuple[bytes, bytes]]] = []

    # ---- the walk -------------------------------------------------------------------

    def _lookup(self, pid: int, path: bytes) -> Node | int:
        hit = self._nodes.get(path)
        if hit is not None:
            return hit
        node = self.policy.lookup(pid, path)
        if isinstance(node, int) or not node.volatile:
            self._nodes[path] = node
        return node

    def resolve(self, pid: int, path: bytes, follow: bool) -> tuple[Found | Outside | int, bool]:
        """Resolve an absolute path; returns the outcome and whether it may be cached.

        Usually one lookup: the parent's resolution is remembered, so only the last
        component is new; paths with ``..`` or a symlink at the end take the full walk.
        """
        key = (path, follow)
        hit = self._resolved.get(key)
        if hit is not None:
            return hit, True
        res, cacheable = self._resolve(pid, path, follow)
        if cacheable:
            self._resolved[key] = res
        return res, cacheable

    def _resolve(self, pid: int, path: bytes, follow: bool) -> tuple[Found | Outside | int, bool]:
        if b"/.." in path or path.endswith(b"/") or path.count(b"/") <= len(self._mparts):
            return self.walk(pid, path, follow)
        parent, _, name = path.rpartition(b"/")
        pres, cacheable = self.resolve(pid, parent, True)
        if isinstance(pres, int):
            return pres, cacheable
        if isinstance(pres, Outside):
            return Outside(pres.path + b"/" + name), cacheable
        if pres.node.kind != Kind.DIR:
            return errno.ENOTDIR, cacheable
        canon = pres.path + b"/" + name
        got = self._lookup(pid, canon)
        if isinstance(got, int):
            return got, cacheable
        if got.kind == Kind.LNK and follow:
            res, c2 = self.walk(pid, canon, follow)
            return res, cacheable and c2
        return Found(canon, got), cacheable and not got.volatile

    def walk(self, pid: int, path: bytes, follow: bool) -> tuple[Found | Outside | int, bool]:
        """Walk an absolute path component by component (symlinks, ``..``, leaving the mount)."""
        cacheable = True
        if path.endswith(b"/"):
            follow = True
        todo = [c for c in reversed(path.split(b"/")) if c and c != b"."]
        done: list[bytes] = []
        links = 0
        nm = len(self._mparts)
        node: Node | None = None
        while todo:
            c = todo.pop()
            if c == b".":
                continue
            if c == b"..":
                if done:
                    done.pop()
                node = None
                continue
            done.append(c)
            if done[: min(len(done), nm)] != self._mparts[: min(len(done), nm)]:
                rest = done + todo[::-1]
                return Outside(b"/" + b"/".join(rest) + (b"/" if path.endswith(b"/") else b"")), (
                    cacheable
                )
            if len(done) < nm:
                node = None
                continue
            got = self._lookup(pid, b"/" + b"/".join(done))
            if isinstance(got, int):
                return got, cacheable
            node = got
            if node.kind == Kind.LNK and (todo or follow):
                links += 1
                if links > MAX_SYMLINKS:
                    return errno.ELOOP, cacheable
                if node.volatile:
                    cacheable = False
                if not node.target:
                    return errno.ENOENT, cacheable
                done.pop()
                if node.target.startswith(b"/"):
                    done = []
                todo.extend(c for c in reversed(node.target.split(b"/")) if c and c != b".")
                node = None
                continue
            if todo and node.kind != Kind.DIR:
                return errno.ENOTDIR, cacheable
        if len(done) < nm or done[:nm] != self._mparts:
            return Outside(b"/" + b"/".join(done)), cacheable
        canon = b"/" + b"/".join(done)
        if node is None:
            got = self._lookup(pid, canon)
            if isinstance(got, int):
                return got, cacheable
            node = got
        if path.endswith(b"/") and node.kind != Kind.DIR:
            return errno.ENOTDIR, cacheable
        return Found(canon, node), cacheable and not node.volatile

    # ---- the shadow tree --------------------------------------------------------------

    def shadow_of(self, path: bytes) -> bytes:
        return self.shadow + path[len(self.mount) :]

    def _writable(self, shadow_path: bytes) -> bytes:
        """The same place in the read-write view of the shadow tree."""
        return self.shadow_write + shadow_path[len(self.shadow) :]

    def materialize(self, pid: int, path: bytes) -> bytes | int:
        """Make the shadow directory for /cvmfs directory ``path`` (and its parents) exist
        and hold one empty entry per catalog entry; returns its host path."""
        self._sync_mirrored()
        parts = path[len(self.mount) :].split(b"/")
        cur = self.mount
        for i, part in enumerate(parts):
            if i:
                cur = cur + b"/" + part
            if cur in self._populated:
                continue
            err = self._populate(pid, cur)
            if err:
                return err
        return self.shadow_of(path)

    def _sync_mirrored(self) -> None:
        """Directories the C side mirrored from the node's listings since we last looked."""
        if self.node_ops is not None:
            self._populated.update(self.node_ops.take_mirrored())

    def _populate(self, pid: int, path: bytes) -> int:
        got = self._listing(pid, path)
        if isinstance(got, int):
            return got
        listing, from_node = got
        target = self._writable(self.shadow_of(path))
        try:
            try:
                _tmpfs.mirror(target, listing)  # one call, without the GIL (worker/trace/_tmpfs.c)
            except OSError as e:
                if e.errno != errno.EINVAL or not from_node:
                    raise
                log.debug("%s: the node's listing does not parse", os.fsdecode(path))
                got = self._listing(pid, path, node=False)
                if isinstance(got, int):
                    return got
                _tmpfs.mirror(target, got[0])
        except OSError as e:
            log.warning("shadow tree: %s: %s", os.fsdecode(target), e.strerror)
            return errno.EIO
        self._populated.add(path)
        if self.node_ops is not None:
            self.node_ops.mirrored(path)  # the C side mirrors its subdirectories from here
        return 0

    def _listing(self, pid: int, path: bytes, node: bool = True) -> tuple[bytes, bool] | int:
        """A directory's listing (worker.trace.node_answers.encode_listing) and whether it came
        from the node: as the node's earlier jobs saw it, else from the catalog (and then
        kept for the node's next jobs)."""
        shared = self.node_answers
        if self.node_ops is not None and node:
            known = self.node_ops.node_listing(path)
            if known is not None:
                return known, True
        entries = self.policy.listdir(path)
        if isinstance(entries, int):
            return entries
        found = self._lookup(pid, path)
        if isinstance(found, int):
            return found
        listing = encode_listing(
            found.mode, found.mtime_ns, [(e.name, int(e.kind)) for e in entries]
        )
        if shared is not None and path != self.mount and self._plain_directory(pid, path):
            shared.keep(path + LISTING, listing)
        return listing, False

    def _opened_files(self) -> OpenedFiles:
        """Which /cvmfs path each RAM file stands for, the opens the C side put from the
        node's answers in it."""
        if self.node_ops is not None:
            self._notes_put.append(self.node_ops.take_notes())
        for opens in self._notes_put:
            for target, cvmfs_path in opens:
                self.opened.note(target, cvmfs_path)
        self._notes_put.clear()
        return self.opened

    def _plain_directory(self, pid: int, path: bytes) -> bool:
        """Is ``path`` a directory under the mount, named by itself (no symlink on the way,
        nothing that depends on the process)?  Only then do its entries' answers hold for
        every path spelled ``path/name``."""
        res, cache = self.resolve(pid, path, True)
        return cache and isinstance(res, Found) and res.path == path and res.node.kind == Kind.DIR

    def _ahead_directory(self, pid: int, path: bytes) -> bytes:
        """The directory whose entries' answers go ahead for a call on ``path``: its parent;
        or, where that is no directory named by itself, the nearest directory above it, named
        as resolved.  ld.so's library probes go through "$ORIGIN/../lib" and into directories
        that do not exist ("<lib>/glibc-hwcaps/x86-64-v4"): once the directory that does exist
        is listed, the C side answers every later probe below it (ENOENT for the names it
        does not have) and its paths spelt with ".." (worker/trace/_fastopen_tracee_paths.c)."""
        parent = path.rpartition(b"/")[0]
        if parent in self._answered_ahead:
            return parent
        d = parent
        while d.startswith(self.mount + b"/"):
            res, cache = self.resolve(pid, d, True)
            if isinstance(res, Found) and res.node.kind == Kind.DIR:
                return res.path if cache else parent
            if not isinstance(res, int):
                return parent  # outside the mount
            d = d.rpartition(b"/")[0]
        return parent

    def _ahead_dotdot(self, pid: int, path: bytes) -> None:
        """The entries of each directory a ".." of ``path`` goes up into, ahead: their lstat
        answers are what lets the C side take the ".." out of a later path (the name before
        it must be a directory)."""
        names: list[bytes] = []
        for name in path.split(b"/"):
            if name == b"..":
                if len(names) > 1:
                    self._ahead(pid, Cls.STAT, b"/" + b"/".join(names[:-1]))
                if names:
                    names.pop()
            elif name and name != b".":
                names.append(name)

    def _ahead(self, pid: int, cls: int, parent: bytes) -> dict[bytes, Action]:
        """On the first touch of a directory, its entries' answers (and on its first open,
        their opens) before they are asked; the open answers given."""
        if not parent.startswith(self.mount + b"/"):
            return {}
        if parent in self._answered_ahead and (cls != Cls.OPEN or parent in self._opened_ahead):
            return {}
        plain = self._plain_directory(pid, parent)  # may mount (and put the node's answers)
        if plain and self.node_answers is not None and self.node_ops is not None:
            got = self.node_ops.put_staged(parent)  # what the node knows of it
            if got is not None:
                self._took_from_node(got)
        first = parent not in self._answered_ahead
        opens = cls == Cls.OPEN and parent not in self._opened_ahead
        self._answered_ahead.add(parent)
        self._sync_mirrored()
        if opens:
            self._opened_ahead.add(parent)
            if plain and self.node_ops is not None and self.node_ops.opens_looked(parent):
                opens = False  # an earlier job of the node looked: what it found was put
        if not plain or (not first and not opens):
            return {}
        listed = parent in self._populated
        return self._answer_entries_ahead(pid, parent, listed, first, opens)

    def _answer_entries_ahead(
        self, pid: int, directory: bytes, listed: bool, stats: bool, opens_too: bool
    ) -> dict[bytes, Action]:
        """A directory whose entries are being looked at one by one (ls -l, find, a Python
        import scanning a package or opening its ``__pycache__``): answer stat, lstat, statx,
        the extended attributes of those that have any, a symlink's target and what it
        leads to, for all its entries at once; the C side derives from those the names it
        does not have (ENOENT), access, ENOTDIR below a file, readlink and xattrs of the
        others; and the opens of the files whose bytes are already at hand (the node cache
        holds them), so that none of those calls needs Python again (and most need no
        trap).  Variant symlinks depend on the process.  A directory nobody listed is done only up
        to MAX_AHEAD entries (one open in a huge directory should not cost a scan).  The
        stats come with the first touch, the opens with the first open (a program that only
        looks at a directory never costs a look-up of its objects).  Returns the open answers
        given."""
        entries = self.policy.listdir(directory)
        if isinstance(entries, int) or self.put is None:
            return {}
        if not listed and len(entries) > MAX_AHEAD:
            return {}
        known: Action = (True, Act.RETURN, 0, None, None, None)
        answers: list[tuple[int, int, bytes, Action]] = []
        if stats:
            answers.append((Cls.LISTED, 0, directory, known))
        files: dict[bytes, Node] = {}
        # (a directory may hold tens of thousands: enum members and methods looked up once)
        named, stat_cls, reg, lnk, act_stat = Cls.NAMED, Cls.STAT, Kind.REG, Kind.LNK, Act.STAT
        lookup, stat_tuple, append = self._lookup, self._stat_tuple, answers.append
        prefix = directory + b"/"
        lstat_only, both = (F_NOFOLLOW,), (F_NOFOLLOW, 0)
        for e in entries:
            key = prefix + e.name
            if stats:  # every name it has, whatever becomes of its answers below
                append((named, 0, key, known))
            elif e.kind != reg:
                continue
            node = lookup(pid, key)
            if isinstance(node, int) or node.volatile:
                continue
            kind = node.kind
            if kind == reg:
                files[key] = node
            if not stats:
                continue
            st: Action = (True, act_stat, 0, None, stat_tuple(node), None)
            for flags in lstat_only if kind == lnk else both:
                append((stat_cls, flags, key, st))
                if node.xattrs:
                    xa: Action = (True, Act.XATTRS, 0, node.xattrs, None, None)
                    answers += [(Cls.XATTR_GET, flags, key, xa), (Cls.XATTR_LIST, flags, key, xa)]
            if kind == lnk:
                answers += self._symlink_ahead(pid, key, node)
        if stats:  # after the entries' answers (worker/trace/_trap.c, put_one)
            answers.append((Cls.NOXATTR, 0, directory, known))
        opens: dict[bytes, Action] = {}
        if files and opens_too:
            for key, opened in self.policy.opens_ahead(pid, list(files)).items():
                st_tuple = self._stat_tuple(files[key])
                opens[key] = (True, Act.REDIRECT, SAFE, opened.path, st_tuple, None)
                self.opened.note(opened.path, key)
            answers += [(Cls.OPEN, 0, key, a) for key, a in opens.items()]
        self.put(answers)
        shared = self.node_answers
        if shared is not None and self.node_ops is not None:
            part = directory + b"\0" + bytes((stats, opens_too))
            data = self.node_ops.pack(answers, shared.prefix, self.uid, self.gid, self.dev)
            shared.keep(part, data)
            if opens_too:
                shared.keep(directory + OPENS_LOOKED, b"1")
        return opens

    def _symlink_ahead(
        self, pid: int, key: bytes, node: Node
    ) -> list[tuple[int, int, bytes, Action]]:
        """A symlink's readlink, and its followed stat where it stays under the mount and
        depends on nothing of the process."""
        out: list[tuple[int, int, bytes, Action]] = [
            (Cls.READLINK, 0, key, (True, Act.READLINK, 0, node.target, None, None))
        ]
        res, cache = self.resolve(pid, key, True)
        if not cache or isinstance(res, Outside):
            return out
        if isinstance(res, int):
            out.append((Cls.STAT, 0, key, (True, Act.RETURN, -res, None, None, None)))
        elif not res.node.volatile:
            out.append(
                (Cls.STAT, 0, key, (True, Act.STAT, 0, None, self._stat_tuple(res.node), None))
            )
        return out

    def _keep_open(self, pid: int, path: bytes, action: Action) -> None:
        """An open of an object the node's service holds by name, for the node's next jobs
        (its answers ahead only name the objects held at the time)."""
        shared = self.node_answers
        target = action[3]
        if (
            shared is None
            or self.node_ops is None
            or not shared.prefix
            or not isinstance(target, bytes)
            or not target.startswith(shared.prefix)
        ):
            return
        parent = path.rpartition(b"/")[0]
        if self._plain_directory(pid, parent):
            data = self.node_ops.pack(
                [(Cls.OPEN, 0, path, action)], shared.prefix, self.uid, self.gid, self.dev
            )
            shared.append(parent + OPENED, data)

    def put_node_answers(self) -> None:
        """Put what the node's earlier jobs learnt about a repository revision just mounted
        (worker/trace/node_answers.py): from now on its paths are answered without Python.  Called
        by the thread answering a call (the C side's rule for putting answers): at once when
        that call mounted the repository, else at the next call on /cvmfs (which mirrors
        /cvmfs first: the C side's mirrors made ahead need it, worker/trace/trap/mirror_ahead.c),
        unless the mount's own thread put them first (:meth:`put_node_answers_ahead`)."""
        if self.answering == threading.get_ident():
            for root in self._put_node_answers():
                self._root_ahead(root)  # (as a mount ahead does: a listing's ".." asks it)

    def _put_node_answers(self) -> list[bytes]:
        """The roots of the repositories whose answers it put; the caller holds the C side's
        lock (it answers a call, or puts them ahead)."""
        shared = self.node_answers
        if shared is None or self.node_ops is None:
            return []
        ops = self.node_ops
        revisions = shared.take()
        for rev in revisions:
            ops.expect(len(rev.table))  # (a mount on another thread could not: not its table)
            got = ops.put_table(
                rev.table,
                rev.within,
                shared.eager_bytes,
                shared.prefix,
                self.uid,
                self.gid,
                self.dev,
                shared.prefix_fd,
            )
            if got is None:
                log.debug("%s: the node's answers are not frames", os.fsdecode(rev.within))
            else:
                self._took_from_node(got)
        return [rev.within for rev in revisions]

    def put_node_answers_ahead(self) -> None:
        """The same, from a thread that answers no call (the session's mount while the command
        starts, once that mount is over: no call waits for it then), holding the C side's lock
        as a thread answering a call does: the command's first call on the repository finds
        the answers put (else it put them itself, ~6 ms of a warm import's first touch)."""
        ops = self.node_ops
        if ops is None or self.node_answers is None or not self.node_answers.pending:
            return

        def put() -> None:
            roots = self._put_node_answers()
            self._just_put = []  # (put by no call: see _put_during_this_call)
            if not ops.running():
                return  # it ended while the put gave way to the calls it answered
            # and /cvmfs mirrored, as the first call would: the C side offers the mirrors it
            # makes ahead from then on (else the first directory opens stopped); no process's
            # environment is needed there, nor for a repository's root
            self.materialize(0, self.mount)
            for root in roots:
                self._root_ahead(root)

        try:
            ops.holding(put)
        except Exception as e:  # (out of memory): the calls then get Python's answers
            log.debug("the node's answers not put ahead: %r", e)

    def _root_ahead(self, root: bytes) -> None:
        """A repository root's stat and lstat answers, as a call on it would get them: the
        node's answers are of the entries of its directories, not of the root itself (the
        first touch of a job, in-process once put)."""
        answers: list[tuple[int, int, bytes, Action]] = []
        for flags in (0, F_NOFOLLOW):
            res, cache = self.resolve(0, root, not flags)
            if cache and isinstance(res, Found):
                st: Action = (True, Act.STAT, 0, None, self._stat_tuple(res.node), None)
                answers.append((Cls.STAT, flags, root, st))
        if answers and self.put is not None:
            self.put(answers)

    def _put_during_this_call(self, path: bytes) -> bytes | None:
        """The object file of an open of ``path`` put from the node's answers by this very
        call (it mounted the repository), or None."""
        for opens in self._just_put:
            for target, cvmfs_path in opens:
                if cvmfs_path == path:
                    return target
        return None

    def _took_from_node(self, got: tuple[int, list[bytes], list[tuple[bytes, bytes]]]) -> None:
        """Python's side of the C side's put: directories answered, opens (for fexecve)."""
        _n, listed, opens = got  # (counted by the C side: --stats)
        self._answered_ahead.update(listed)
        self._opened_ahead.update({path.rpartition(b"/")[0] for _target, path in opens})
        # which /cvmfs path each object file stands for: needed by few calls (the one that
        # mounted the repository, /proc/self/exe after fexecve), so worked out when asked
        self._notes_put.append(opens)
        self._just_put.append(opens)

    # ---- answers ------------------------------------------------------------------------

    def _stat_tuple(self, node: Node) -> tuple[int, ...]:
        m_s, m_ns = divmod(node.mtime_ns, 1_000_000_000)
        c_s, c_ns = (m_s, m_ns) if node.ctime_ns is None else divmod(node.ctime_ns, 10**9)
        size = len(node.target) if node.kind == Kind.LNK else node.size
        return (
            node.kind | (node.mode & 0o7777),
            node.ino,
            node.nlink,
            self.uid,
            self.gid,
            size,
            1 + size // 512,  # st_blocks as the real client counts them (du agrees with it)
            node.rdev,
            node.dev or self.dev,
            m_s,
            m_ns,
            m_s,
            m_ns,
            c_s,
            c_ns,
        )

    def answer(self, tid: int, cls: int, flags: int, path: bytes) -> Action:
        """The C side's upcall: never raises (a policy bug becomes EIO and one log line)."""
        self.answering = threading.get_ident()
        asked = ASKED.set(path)
        said = SAID.count
        try:
            shared = self.node_answers if self._in_mount(path) else None
            if shared is not None:  # a mount on another thread: it ends, its answers go in
                shared.settle(path)  # (on a call on /cvmfs, which mirrors /cvmfs: put_node_answers)
                if shared.pending:
                    self.put_node_answers()
            got = self._answer(tid, cls, flags, path)
            if got[1] == Act.RETURN and got[2] < 0 and SAID.count == said:
                err = -got[2]  # the policy said nothing: one line naming the path
                if err not in EVERYDAY_ERRNOS:
                    log.warning("%s: %s", os.fsdecode(path), os.strerror(err))
            if shared is not None and shared.pending:
                self.put_node_answers()  # (mounted on another thread during the call)
            return got
        except Exception as e:
            log.error("%s: internal error answering class %d: %r", os.fsdecode(path), cls, e)
            return (False, Act.RETURN, -errno.EIO, None, None, None)
        finally:
            ASKED.reset(asked)
            self.answering = 0
            self._just_put = []

    def _answer(self, tid: int, cls: int, flags: int, path: bytes) -> Action:
        if cls == Cls.OPEN and flags == F_NOFOLLOW:  # tar, grep -r: with no symlink there,
            res = self.resolve(tid, path, False)[0]  # the plain open (ahead, kept for the node)
            flags = 0 if isinstance(res, Found) and res.node.kind != Kind.LNK else flags
        if self.put is not None and (
            cls in (Cls.STAT, Cls.XATTR_GET, Cls.XATTR_LIST) or (cls == Cls.OPEN and not flags)
        ):
            if b"/../" in path:
                self._ahead_dotdot(tid, path)
            ahead = self._ahead(tid, cls, self._ahead_directory(tid, path))
            if cls == Cls.OPEN and path in ahead:
                return ahead[path]  # the node cache holds it: no round trip either
            target = self._put_during_this_call(path) if cls == Cls.OPEN and not flags else None
            if target is not None:  # this call mounted the repository: the node's answer
                node = self._lookup(tid, path)
                if not isinstance(node, int) and node.kind == Kind.REG:
                    return (True, Act.REDIRECT, SAFE, target, self._stat_tuple(node), None)
        if cls == Cls.EXEC:
            return self._exec(tid, path)
        if flags & (F_MOUNTS | F_MAPS):
            if flags & F_MOUNTS:
                table = self.mount_tables.file_for(path)
            elif (maps := maps_with_cvmfs_paths(path, self._opened_files())) is not None:
                table = self.table_files.file_of(maps, "maps")
            else:
                table = None
            return (False, Act.PASS if table is None else Act.REDIRECT, SAFE, table, None, None)
        if flags & F_PROCEXE:
            try:
                real = os.readlink(path)
            except OSError:
                return (False, Act.PASS, 0, None, None, None)
            # exec'd by its /cvmfs path, or (fexecve) through an fd opened from one
            exe = self.exec_files.exe_paths.get(real) or self._opened_files().by_name.get(real)
            if exe is None:
                return (False, Act.PASS, 0, None, None, None)
            return (False, Act.READLINK, 0, exe, None, None)
        follow = not flags & F_NOFOLLOW and cls != Cls.READLINK
        res, cache = self.resolve(tid, path, follow)
        if isinstance(res, int):  # the policy said why, where it was not plain ENOENT & co
            if res not in (errno.ENOENT, errno.ENOTDIR, errno.ELOOP):
                log.debug("%s: %s", os.fsdecode(path), os.strerror(res))
            return (cache, Act.RETURN, -res, None, None, None)
        if isinstance(res, Outside):
            return (cache, Act.REDIRECT, 0, res.path, None, None)
        node = res.node
        if cls == Cls.OPEN and flags & F_WRITE and not flags & F_OPATH:
            # as the kernel on a read-only mount (trap/readonly.c): a FIFO's other end opens
            if node.kind == Kind.REG:
                return (cache, Act.RETURN, -errno.EROFS, None, None, None)
            if node.kind == Kind.DIR:
                return (cache, Act.RETURN, -errno.EISDIR, None, None, None)
        if cls == Cls.OPEN:
            if node.kind == Kind.LNK:
                if flags & F_OPATH:
                    return self._symlink_in_shadow(tid, res, cache)
                return (cache, Act.RETURN, -errno.ELOOP, None, None, None)
            if node.kind == Kind.DIR:  # with its stat: what fstat of the fd must say
                return self._to_shadow(tid, res, cache, self._stat_tuple(node))
            if node.kind == Kind.FIFO:
                return self._entry_in_shadow(tid, res, cache, 0)
            opened = self.policy.open(tid, res.path, node)
            if isinstance(opened, int):
                log.debug("%s: %s", os.fsdecode(res.path), os.strerror(opened))
                return (False, Act.RETURN, -opened, None, None, None)
            # the stat tuple: what fstat of the fd must say (C records it per RAM file)
            st = self._stat_tuple(node)
            self.opened.note(opened.path, res.path)
            action: Action = (cache and opened.stable, Act.REDIRECT, SAFE, opened.path, st, None)
            if flags == 0 and action[0]:
                self._keep_open(tid, res.path, action)
            return action
        if cls == Cls.STAT:  # directories too: the catalog's size and inode, not the mirror's
            return (cache, Act.STAT, 0, None, self._stat_tuple(node), None)
        if cls == Cls.ACCESS:
            want = flags & 7
            if want & os.W_OK:
                return (cache, Act.RETURN, -errno.EROFS, None, None, None)
            ok = access_allowed(node, want, self.uid)
            return (cache, Act.RETURN, 0 if ok else -errno.EACCES, None, None, None)
        if cls == Cls.READLINK:
            if node.kind != Kind.LNK:
                return (cache, Act.RETURN, -errno.EINVAL, None, None, None)
            return (cache and not node.volatile, Act.READLINK, 0, node.target, None, None)
        if cls == Cls.CHDIR:
            if node.kind != Kind.DIR:
                return (cache, Act.RETURN, -errno.ENOTDIR, None, None, None)
            return self._to_shadow(tid, res, cache)
        if cls == Cls.STATFS:
            return (cache, Act.REDIRECT, 0, self.shadow, None, None)
        if cls == Cls.WATCH:  # an inotify watch on the path's place in the shadow tree
            return self._watched(tid, res, cache)
        if cls == Cls.XATTR_GET and flags & F_USERXATTR:  # CernVM-FS's magic ones too
            blob = self.policy.magic_xattrs(tid, res.path)
            return (
                (cache, Act.XATTRS, 0, blob, None, None)
                if blob
                else (cache, Act.RETURN, -errno.ENODATA, None, None, None)
            )
        if cls == Cls.XATTR_LIST and res.path.count(b"/") == len(self._mparts) + 1:
            # a repository's root lists the client's magic names (its default visibility,
            # root only), those that follow from the catalog: getfattr -d shows them
            blob = self.policy.magic_xattrs(tid, res.path)
            if blob:
                return (cache, Act.XATTRS, 0, blob, None, None)
        if node.xattrs:  # the user.* attributes hep-publish stored
            return (cache, Act.XATTRS, 0, node.xattrs, None, None)
        if cls == Cls.XATTR_GET:
            return (cache, Act.RETURN, -errno.ENODATA, None, None, None)
        return (cache, Act.RETURN, 0, None, None, None)  # XATTR_LIST: none

    def _symlink_in_shadow(self, tid: int, res: Found, cache: bool) -> Action:
        """open(O_PATH|O_NOFOLLOW) of a symlink: a real symlink in the shadow tree, so that
        fstatat/readlinkat on the fd work natively."""
        parent = self.materialize(tid, res.path.rpartition(b"/")[0])
        if isinstance(parent, int):
            return (False, Act.RETURN, -parent, None, None, None)
        link = self.shadow_of(res.path)
        try:
            writable = self._writable(link)
            if os.readlink(writable) != res.node.target:
                os.unlink(writable)
                os.symlink(res.node.target, writable)
        except OSError as e:
            log.warning("shadow tree: %s: %s", os.fsdecode(link), e.strerror)
            return (False, Act.RETURN, -errno.EIO, None, None, None)
        return (cache and not res.node.volatile, Act.REDIRECT, SAFE, link, None, None)

    def _entry_in_shadow(self, tid: int, res: Found, cache: bool, safe: int = SAFE) -> Action:
        """A file's own entry in its directory's mirror: empty, or for a FIFO published in the
        repository the job's own FIFO, opened as natively (a reader waits for a writer;
        O_NONBLOCK and O_PATH do not wait: not ``SAFE``, the open may block and restart)."""
        parent = self.materialize(tid, res.path.rpartition(b"/")[0] or self.mount)
        if isinstance(parent, int):
            return (False, Act.RETURN, -parent, None, None, None)
        return (cache, Act.REDIRECT, safe, self.shadow_of(res.path), None, None)

    def _watched(self, tid: int, res: Found, cache: bool) -> Action:
        """inotify_add_watch: on the directory's mirror, the symlink itself (IN_DONT_FOLLOW),
        or the file's empty entry in its directory's mirror.  The watch then succeeds as on a
        read-only mount (tail -f, file watchers), and nothing there ever changes."""
        if res.node.kind == Kind.DIR:
            return self._to_shadow(tid, res, cache)
        if res.node.kind == Kind.LNK:
            return self._symlink_in_shadow(tid, res, cache)
        return self._entry_in_shadow(tid, res, cache)

    def _to_shadow(
        self, tid: int, res: Found, cache: bool, st: tuple[int, ...] | None = None
    ) -> Action:
        """A /cvmfs directory's mirror, for opens and chdir; ``st``: for an open, its stat,
        which C makes fstat of the fd say (as for RAM files)."""
        target = self.materialize(tid, res.path)
        if isinstance(target, int):
            return (False, Act.RETURN, -target, None, None, None)
        return (cache, Act.REDIRECT, SAFE, target, st, None)

    # ---- execve ---------------------------------------------------------------------------

    def _in_mount(self, path: bytes) -> bool:
        return path == self.mount or path.startswith(self.mount + b"/")

    def _exec_target(self, tid: int, path: bytes) -> tuple[bytes, bytes] | int:
        """(file the kernel can exec, its first bytes) for a /cvmfs path."""
        res, _ = self.resolve(tid, path, True)
        if isinstance(res, int):
            return res
        if isinstance(res, Outside):
            return res.path, file_head(res.path)
        if res.node.kind != Kind.REG or not res.node.mode & 0o111:
            return errno.EACCES
        opened = self.policy.open(tid, res.path, res.node)
        if isinstance(opened, int):
            log.debug("%s: %s", os.fsdecode(res.path), os.strerror(opened))
            return opened
        return opened.path, file_head(opened.path)

    def _exec(self, tid: int, path: bytes) -> Action:
        """execve: what to run instead, as the kernel would have run it (exec_files.py)."""
        got = self.exec_files.decide(path, lambda p: self._exec_target(tid, p), self.opened.by_name)
        if isinstance(got, int):
            return (False, Act.RETURN, -got, None, None, None)
        if got is None:
            return (False, Act.PASS, 0, None, None, None)
        return (False, Act.EXEC, 0, got[0], None, got[1] or None)
