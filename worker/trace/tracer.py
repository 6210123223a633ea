"""Run a command so that it sees /cvmfs: the trap loop, its shadow tree and its statistics.

The C extension (``worker.trace._trap``) stops the tracee only on path syscalls, lets paths
outside the mount through by itself and remembers every cacheable answer; on a miss it asks
:class:`worker.trace.answers.Session`, which walks the path through the policy.

Directories need real directory fds (fstat says S_IFDIR, fchdir works, getdents64 lists the
entries with the right d_type): every /cvmfs directory a tracee touches is mirrored, empty
files and all, in a private RAM-backed *shadow* tree made here; opens, chdir and stat of
directories are redirected there, and the C side maps shadow paths (fd links, cwd) back to
/cvmfs.
"""

from __future__ import annotations

import errno
import logging
import os
import stat
import threading
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from typing import NamedTuple

from worker.trace import _tmpfs
from worker.trace.answers import Session
from worker.trace.node_answers import NodeAnswers
from worker.trace.policy import Entry, Kind, Node, Opened, Policy
from worker.trace.trap_abi import NodeOps

log = logging.getLogger("hep-exec")

TRAP_MODES = {"ptrace": 0, "notify": 1, "auto": 2}


class TracerUnavailable(RuntimeError):
    """ptrace or seccomp cannot be used here (container policy, Yama, old kernel)."""


class Stats(NamedTuple):
    """What the trap loop did: trapped syscalls per name, and how each was answered."""

    trapped: dict[str, int]
    passed: int  # outside the mount, let through in C
    hits: int  # answered from the C table
    upcalls: int  # answered by Python
    cached: int  # answers in the C table at exit
    absent: int = 0  # answered in C from answers at hand (ENOENT, ENOTDIR, access, readlink)
    ahead: int = 0  # opens offered before they were asked (objects the node cache held)
    mode: str = "ptrace"  # how hot calls stopped: "seccomp-notify" or "ptrace"
    notified: int = 0  # of the trapped calls, those answered through the notification fd
    inproc_opens: int = 0  # opens done inside tracees from published answers (no trap)
    inproc_misses: int = 0  # opens from patched call sites handed on to the tracer
    inproc_stats: int = 0  # stat, lstat, fstat answered inside tracees
    inproc_stat_misses: int = 0  # the same handed on to the tracer
    inproc_sites: int = 0  # call sites patched to call the in-process handler
    inproc_images: int = 0  # exec'd images the handler was mapped into
    inproc_host: int = 0  # calls on host paths made inside tracees (no trap)
    node_dirs: int = 0  # directory opens answered in C from the node's listings
    inproc_answers: int = 0  # answers in the in-process table at exit (live at its last move)
    inproc_slots: int = 0  # its size: it grows as a job learns more
    inproc_moves: int = 0  # times it grew (its answers moved to a bigger one)
    inproc_given: bool = False  # its file was one the node's service made ahead

    def summary(self) -> str:
        """``--stats``: what a user can read (and compare between runs)."""
        total = sum(self.trapped.values())
        inside = self.inproc_opens + self.inproc_stats
        return (
            f"system calls: {total - self.passed} on /cvmfs answered by stopping the program "
            f"({self.mode}), {inside} answered inside it without a stop, {self.passed} stopped "
            "that were not for /cvmfs"
        )

    def format(self) -> str:
        """``--stats-internals``: the trap loop's own counters (for developers)."""
        total = sum(self.trapped.values())
        lines = [
            f"trapped syscalls: {total} (passed through {self.passed}, C-cache hits "
            f"{self.hits}, derived in C {self.absent}, Python upcalls {self.upcalls}, "
            f"cached answers {self.cached}, opens answered ahead {self.ahead}, directories "
            f"opened from the node's listings {self.node_dirs})",
            f"trap mode: {self.mode} ({self.notified} answered by notification, "
            f"{total - self.notified} by ptrace stop)",
        ]
        lines += [f"  {n:<14} {c}" for n, c in sorted(self.trapped.items(), key=lambda x: -x[1])]
        if self.inproc_images:
            lines.append(
                f"in-process opens: {self.inproc_opens} (not trapped; {self.inproc_misses} "
                f"handed to the tracer), stats: {self.inproc_stats} ({self.inproc_stat_misses} "
                f"handed to the tracer), host paths: {self.inproc_host}; {self.inproc_sites} "
                f"call sites patched in {self.inproc_images} program images"
            )
            lines.append(
                f"in-process table: {self.inproc_answers} answers in {self.inproc_slots} slots "
                f"(grown {self.inproc_moves} times)"
                + (", its memory made ahead by the node's service" if self.inproc_given else "")
            )
        return "\n".join(lines)


class Result(NamedTuple):
    """Exit status of the command (128+N if killed by signal N) and the loop's statistics."""

    status: int
    stats: Stats


def forget(path: bytes) -> int:
    """Withdraw a ``stable`` :class:`~worker.trace.policy.Opened` answer for /cvmfs ``path`` (e.g.
    its RAM file was evicted), so the next open asks the policy again.  Call it only from
    policy methods, which run on a tracer thread holding the answer table's lock; returns the
    number of answers dropped."""
    from worker.trace import _trap

    return _trap.forget(path)


def _env_switch(name: str, default: bool) -> bool:
    """An on/off environment variable (the tracer reads its own: config imports this module)."""
    value = os.environ.get(name, "").strip().lower()
    if not value:
        return default
    return value not in ("0", "no", "false", "off")


# huge pages for files that fill them: the in-process table lives there too
# (worker/trace/_fastopen.c)
SHADOW_TMPFS_OPTIONS = b"huge=within_size,size=0,nr_inodes=0,mode=0755"
SHADOW_TMPFS_PLAIN = b"size=0,nr_inodes=0,mode=0755"  # a kernel without huge pages for tmpfs


class _ShadowTree(NamedTuple):
    """The shadow tree of one run, under the three names it goes by.

    Where unprivileged user namespaces allow it, it lives on a private tmpfs that exists only
    through two fds of ours (worker/trace/_tmpfs.c): we write through the read-write one, tracees
    are sent through the read-only one (/proc/<our pid>/fd/<n>/...: a create, chmod or
    utimes through a path or fd into it is EROFS from the kernel itself), and nothing of it
    outlives us, however we end (SIGKILL too).  The kernel spells such paths from the mount's
    own root ("/hep-exec-<pid>-<random>/cvmfs/...") in /proc/<pid>/cwd and fd links: a name
    no host path has, which the C side maps back to the mount.  Elsewhere: a directory in
    /dev/shm, removed at the end (left behind if we are killed).
    """

    access: bytes  # what tracees are sent to
    write: bytes  # where we create its entries
    rendered: bytes  # how /proc/<pid>/{cwd,fd/N} links name it
    close: Callable[[Callable[[int], bool] | None], None]  # (given: dispose, see run)

    @classmethod
    def make(cls, mount: bytes) -> _ShadowTree:
        leaf = mount.strip(b"/").replace(b"/", b"_")
        try:
            try:
                rw, ro, _ = _tmpfs.mount(tmpfs_mount_dir(), SHADOW_TMPFS_OPTIONS)
            except OSError as e:
                if e.errno != errno.EINVAL:
                    raise
                rw, ro, _ = _tmpfs.mount(tmpfs_mount_dir(), SHADOW_TMPFS_PLAIN)
        except OSError as e:
            log.debug("shadow tree in %s: no private tmpfs (%s)", _shadow_parent(), e)
            import tempfile  # (a shadow tree on disk: the fallback where no tmpfs could be mounted)

            private = tempfile.mkdtemp(prefix="hep-exec-", dir=_shadow_parent())
            plain = os.fsencode(private) + b"/" + leaf
            os.mkdir(plain, 0o755)
            return cls(plain, plain, plain, lambda _dispose: _remove_tree(Path(private)))
        top = b"/hep-exec-%d-%s/%s" % (os.getpid(), os.urandom(6).hex().encode(), leaf)
        write = b"/proc/self/fd/%d%s" % (rw, top)
        try:
            os.makedirs(write, 0o755)
        except OSError:
            os.close(rw)
            os.close(ro)
            raise

        def close(dispose: Callable[[int], bool] | None) -> None:
            # the last references, closed elsewhere: the teardown too (each view's own, where
            # it is a clone in a mount namespace of its own: see worker/trace/_tmpfs.c)
            if dispose is not None and dispose(rw):
                dispose(ro)
            os.close(rw)
            os.close(ro)

        return cls(b"/proc/%d/fd/%d%s" % (os.getpid(), ro, top), write, top, close)


def tmpfs_mount_dir() -> bytes:
    """The directory a private tmpfs is mounted on (``_tmpfs.mount``), in a mount namespace of
    its own: any existing one does, nothing is written there.  /tmp, found without tempfile's
    probe (its import and a file made and removed: ~2 ms of every job's start)."""
    if os.path.isdir("/tmp"):
        return b"/tmp"
    import tempfile

    return os.fsencode(tempfile.gettempdir())


def _shadow_parent() -> str:
    for cand in ("/dev/shm", os.environ.get("XDG_RUNTIME_DIR", "")):
        if cand and os.path.isdir(cand) and os.access(cand, os.W_OK | os.X_OK):
            return cand
    import tempfile

    return tempfile.gettempdir()


def _expect_on(session: Session) -> Callable[[int], None]:
    """Size the in-process table for a mount's answers, from the thread answering a call only
    (the table is that thread's to change; a mount on another thread is sized at the put)."""
    from worker.trace import _trap

    def expect(nbytes: int) -> None:
        if session.answering == threading.get_ident():
            _trap.expect(nbytes)

    return expect


def run(
    argv: Sequence[str | bytes],
    policy: Policy,
    env: Mapping[str, str] | None = None,
    *,
    mount: bytes = b"/cvmfs",
    spin_us: int = int(os.environ.get("HX_SPIN", "100")),
    trap: str | None = None,
    in_process: bool | None = None,
    io_uring: bool | None = None,
    node_answers: NodeAnswers | None = None,
    table_fd: int = -1,
    alongside: Callable[[], None] | None = None,
    dispose: Callable[[int], bool] | None = None,
    object_dirs: Sequence[bytes] = (),
) -> Result:
    """Run ``argv`` with ``mount`` served by ``policy``; returns its exit status and stats.

    ``trap``: how hot path calls (open, stat, access, readlink) reach us. ``"notify"``: a
    seccomp user-notification fd answered by a second C thread; no ptrace stop, and with
    Linux 6.6's synchronous wake-up the answering thread runs on the caller's CPU (3x the
    rate of a ptrace stop on the 2-vCPU test VM).  ``"ptrace"``: every trapped call is a
    ptrace stop.  ``"auto"`` (default, or ``$HEP_EXEC_TRAP``): notify where the kernel has
    the synchronous wake-up and no other listener sits above us, else ptrace.  exec, chdir,
    O_PATH opens, openat2 and the ``*xattrat`` calls always take a ptrace stop.

    ``spin_us``: poll this long before sleeping in waitpid while tracees trap in quick
    succession (0 disables it). Waking a tracer that sleeps on an idle CPU costs far more than
    the round trip itself: on the 2-vCPU test VM, stat ran at 9.6k/s without polling and
    27k/s with 100 us when the other CPU was idle, and 38k/s vs 35k/s when it was busy.

    ``in_process`` (notify mode; default on, ``$HEP_EXEC_IN_PROCESS=0`` turns it off): once
    an open, stat, access or readlink of a /cvmfs path has been answered, tracees answer it
    themselves through a handler mapped into every program image and the patched libc call
    site, with no trap at all (worker/trace/_fastopen.c, worker/trace/README.md).

    ``table_fd``: a file for the in-process table that the node's service made and faulted
    in ahead (``_trap.make_table``; the run closes it, used or not).

    ``alongside``: work for a thread of its own while the command starts (the mount of the
    repositories it names).  Not waited for: a mount of a repository the command names but
    never touches, from a server that does not answer, must not hold the job's end.

    ``dispose``: takes the last reference to the shadow tree's private tmpfs at the end (True)
    or not (False), so that its teardown (~4 ms for a warm import's mirrors) happens in
    another process (the node's service), not on the job's way out.

    ``object_dirs``: directories of RAM files (``/proc/<us>/fd/<n>``) that open answers name,
    besides the node's: tracees open files there with openat on an fd of their own.

    ``io_uring`` (default off, ``$HEP_EXEC_IO_URING=1`` turns it on): let the command set up
    io_uring rings.  Off, io_uring_setup fails with ENOSYS, which programs and libraries take
    for "no io_uring" and fall back: a ring's opens and stats are made by kernel workers that
    no filter sees, so they would reach the mirror behind /cvmfs instead of the repository.

    Raises :class:`TracerUnavailable` (one line) if ptrace or seccomp is refused.
    """
    from worker.trace import _trap

    _trap.give_table(table_fd)
    trap = trap or os.environ.get("HEP_EXEC_TRAP") or "auto"
    if in_process is None:
        in_process = _env_switch("HEP_EXEC_IN_PROCESS", True)
    if io_uring is None:
        io_uring = _env_switch("HEP_EXEC_IO_URING", False)
    if trap not in TRAP_MODES:
        raise ValueError(f"trap mode {trap!r}: expected one of {', '.join(TRAP_MODES)}")
    envl = [os.fsencode(f"{k}={v}") for k, v in (os.environ if env is None else env).items()]
    args = [os.fsencode(a) for a in argv]
    mirror = _ShadowTree.make(mount)
    try:
        session = Session(policy, mount.rstrip(b"/"), mirror.access, mirror.write, _trap.put)
        if node_answers is not None:
            session.node_answers = node_answers
            session.node_ops = NodeOps(
                _trap.pack,
                _trap.put_table,
                _trap.put_staged,
                _trap.take_notes,
                _trap.node_listing,
                _trap.opens_looked,
                _trap.mirrored,
                _trap.take_mirrored,
                _trap.expect,
                _trap.holding,
                _trap.running,
            )
            node_answers.arrived = session.put_node_answers
            node_answers.put_ahead = session.put_node_answers_ahead
            node_answers.mounting = _expect_on(session)  # (none held: nothing)
        node_dirs = [node_answers.prefix] if node_answers and node_answers.prefix else []
        if alongside is not None:
            threading.Thread(target=alongside, name="hep-exec-alongside", daemon=True).start()
        try:
            status, exec_errno, raw = _trap.run(
                args,
                envl,
                session.mount,
                mirror.access,
                session.answer,
                spin_us,
                TRAP_MODES[trap],
                in_process,
                io_uring,
                mirror.rendered,
                mirror.write,
                [*node_dirs, *object_dirs],
            )
        except PermissionError as e:
            raise TracerUnavailable(f"cannot trace the command: {e} (ptrace/seccomp denied)") from e
        finally:
            session.exec_files.close()
            session.table_files.close()
        if exec_errno:
            log.error("%s: %s", os.fsdecode(args[0]), os.strerror(exec_errno))
    finally:
        mirror.close(dispose)
    if node_answers is not None:
        node_answers.put = raw["node_puts"]
    stats = Stats(
        trapped=dict(raw["trapped"]),  # names from the C list of trapped calls
        passed=raw["passed"],
        hits=raw["hits"],
        upcalls=raw["upcalls"],
        cached=raw["cached"],
        absent=raw["absent"],
        ahead=raw["opens_put"],
        mode=raw["mode"],
        notified=raw["notified"],
        inproc_opens=raw["inproc_opens"],
        inproc_misses=raw["inproc_misses"],
        inproc_stats=raw["inproc_stats"],
        inproc_stat_misses=raw["inproc_stat_misses"],
        inproc_sites=raw["inproc_sites"],
        inproc_images=raw["inproc_images"],
        inproc_host=raw["inproc_host"],
        node_dirs=raw["node_dirs"],
        inproc_answers=raw["inproc_answers"],
        inproc_slots=raw["inproc_slots"],
        inproc_moves=raw["inproc_moves"],
        inproc_given=bool(raw["inproc_given"]),
    )
    return Result(status, stats)


class _NoRepositories:
    """An empty /cvmfs, for :func:`check`."""

    def lookup(self, pid: int, path: bytes) -> Node | int:
        return Node(Kind.DIR, 0o755, 4096, 1, nlink=2) if path == b"/cvmfs" else errno.ENOENT

    def listdir(self, path: bytes) -> list[Entry] | int:
        return [] if path == b"/cvmfs" else errno.ENOENT

    def open(self, pid: int, path: bytes, node: Node) -> Opened | int:
        return errno.ENOENT

    def opens_ahead(self, pid: int, paths: Sequence[bytes]) -> dict[bytes, Opened]:
        return {}

    def mounted(self) -> Sequence[str]:
        return []

    def magic_xattrs(self, pid: int, path: bytes) -> bytes:
        return b""


def check() -> str | None:
    """Can this host trace? None if yes, else the one-line reason (for ``hep-exec --check``)."""
    return check_mode()[0]


def check_mode(trap: str | None = None, in_process: bool | None = None) -> tuple[str | None, str]:
    """:func:`check`, and the trap mode the test command ran in ("seccomp-notify", "ptrace"),
    with ", in-process opens and stats" when the handler was mapped into it."""
    try:
        result = run(
            ["/bin/sh", "-c", "test -d /cvmfs && ! test -e /cvmfs/x"],
            _NoRepositories(),
            trap=trap,
            in_process=in_process,
        )
    except TracerUnavailable as e:
        return str(e), ""
    except (ImportError, OSError) as e:
        return f"tracer unusable: {e}", ""
    if result.status != 0:
        return f"traced test command failed ({result.status})", result.stats.mode
    extra = ", in-process opens and stats" if result.stats.inproc_images else ""
    return None, result.stats.mode + extra


def _remove_tree(path: Path) -> None:
    """Remove the shadow tree even where its directories were made read-only."""

    for root, dirs, _files in os.walk(path):
        for d in dirs:
            p = os.path.join(root, d)
            if not os.path.islink(p):
                os.chmod(p, stat.S_IRWXU)
    import shutil  # (a shadow tree on disk: the fallback where no tmpfs could be mounted)

    shutil.rmtree(path, ignore_errors=True)
