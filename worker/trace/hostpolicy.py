"""A policy backed by plain host directories: ``/cvmfs/<name>`` shows directory ``<dir>``.

It exists to prove and benchmark the tracer without the network data side, and as a debug
tool: ``python3 -m worker.trace.hostpolicy --map test.repo=/some/dir -- CMD ARGS``.
"""

from __future__ import annotations

import argparse
import errno
import logging
import os
import stat
import sys
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path

from cvmfs_format.symlinks import expand_symlink
from worker.trace.policy import Entry, Kind, Node, Opened
from worker.trace.tracee_env import read_environ


class HostDirPolicy:
    """Answers from ``os.lstat``/``os.scandir`` of the mapped host directories."""

    def __init__(self, repos: Mapping[str, str | Path], mount: bytes = b"/cvmfs") -> None:
        self.mount = mount
        self.repos = {os.fsencode(k): os.fsencode(str(Path(v).resolve())) for k, v in repos.items()}

    def _host(self, path: bytes) -> bytes | int:
        if path == self.mount:
            return errno.EISDIR
        if not path.startswith(self.mount + b"/"):
            return errno.ENOENT
        repo, _, sub = path[len(self.mount) + 1 :].partition(b"/")
        base = self.repos.get(repo)
        if base is None:
            return errno.ENOENT
        return base + b"/" + sub if sub else base

    def lookup(self, pid: int, path: bytes) -> Node | int:
        host = self._host(path)
        if host == errno.EISDIR:
            return Node(Kind.DIR, 0o755, 4096, 1, nlink=2 + len(self.repos))
        if isinstance(host, int):
            return host
        try:
            st = os.lstat(host)
        except OSError as e:
            return e.errno or errno.EIO
        target = b""
        volatile = False
        if stat.S_ISLNK(st.st_mode):
            target = os.readlink(host)
            if b"$(" in target:
                target = os.fsencode(expand_symlink(os.fsdecode(target), read_environ(pid)))
                volatile = True
        return Node(
            kind=Kind(stat.S_IFMT(st.st_mode)),
            mode=stat.S_IMODE(st.st_mode),
            size=len(target) if volatile else st.st_size,
            ino=st.st_ino,
            nlink=st.st_nlink,
            mtime_ns=st.st_mtime_ns,
            ctime_ns=st.st_ctime_ns,
            rdev=st.st_rdev,
            target=target,
            volatile=volatile,
        )

    def listdir(self, path: bytes) -> Sequence[Entry] | int:
        if path == self.mount:
            return [Entry(name, Kind.DIR, 0) for name in self.repos]
        host = self._host(path)
        if isinstance(host, int):
            return host
        try:
            with os.scandir(host) as it:
                return [
                    Entry(
                        e.name, Kind(stat.S_IFMT(e.stat(follow_symlinks=False).st_mode)), e.inode()
                    )
                    for e in it
                ]
        except OSError as e:
            return e.errno or errno.EIO

    def open(self, pid: int, path: bytes, node: Node) -> Opened | int:
        host = self._host(path)
        return host if isinstance(host, int) else Opened(host)

    def opens_ahead(self, pid: int, paths: Sequence[bytes]) -> dict[bytes, Opened]:
        return {}  # host files: opening them costs the same now or later

    def mounted(self) -> Sequence[str]:
        return [os.fsdecode(name) for name in self.repos]  # (every one, from the start)

    def magic_xattrs(self, pid: int, path: bytes) -> bytes:
        return b""  # (a host tree has none of CernVM-FS's)


@dataclass(frozen=True)
class Options:
    """Command line of the debug runner."""

    repos: dict[str, str]
    argv: list[str]
    stats: bool


def _parse(argv: Sequence[str]) -> Options:
    p = argparse.ArgumentParser(prog="python3 -m worker.trace.hostpolicy", description=__doc__)
    p.add_argument("--map", action="append", default=[], metavar="NAME=DIR")
    p.add_argument("--stats", action="store_true", help="print trapped syscalls at exit")
    p.add_argument("cmd", nargs=argparse.REMAINDER)
    a = p.parse_args(argv)
    cmd = a.cmd[1:] if a.cmd[:1] == ["--"] else a.cmd
    if not cmd:
        p.error("no command given")
    repos: dict[str, str] = {}
    for m in a.map:
        name, sep, d = m.partition("=")
        if not sep or not name or "/" in name:
            p.error(f"--map {m!r}: expected NAME=DIR")
        repos[name] = d
    return Options(repos, cmd, a.stats)


def main(argv: Sequence[str] | None = None) -> int:
    """Run a command with host directories mounted under /cvmfs."""
    from worker.trace.tracer import TracerUnavailable, run

    opts = _parse(sys.argv[1:] if argv is None else argv)
    logging.basicConfig(level=logging.WARNING, format="%(name)s: %(message)s")
    for name, d in opts.repos.items():
        if not Path(d).is_dir():
            print(f"hep-exec: --map {name}={d}: not a directory", file=sys.stderr)
            return 2
    try:
        result = run(opts.argv, HostDirPolicy(opts.repos))
    except TracerUnavailable as e:
        print(f"hep-exec: {e}", file=sys.stderr)
        return 2
    if opts.stats:
        print(result.stats.format(), file=sys.stderr)
    return result.status


if __name__ == "__main__":
    sys.exit(main())
