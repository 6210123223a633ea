"""Running the real ``hep-exec`` against published repositories served by nginx on loopback."""

from __future__ import annotations

import os
import re
import shutil
import subprocess
import sys
from collections.abc import Iterator, Mapping, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pytest

from tests.support.nginx import Nginx, Site
from tests.support.repos import Repo, publish_tree
from tests.support.tracing import env_with

CLI = [sys.executable, "-m", "worker.cli"]


@dataclass
class Served:
    """A store of published repositories behind one or more nginx sites."""

    store: Path
    keys_dir: Path
    repos: dict[str, Repo] = field(default_factory=dict)
    servers: list[Nginx] = field(default_factory=list)

    def publish(self, source: Path, fqrn: str) -> Repo:
        repo, _ = publish_tree(source, self.store, fqrn, self.keys_dir)
        self.repos[fqrn] = repo
        return repo

    def serve(self, workdir: Path, root: Path | None = None) -> str:
        """Start one more nginx serving ``root`` (default: the store); its proxy URL."""
        site = Site(root=root or self.store)
        self.servers.append(Nginx(workdir, [site]))
        return f"http://127.0.0.1:{site.port}"

    def stop(self) -> None:
        for s in self.servers:
            s.stop()


@contextmanager
def serving(src: Path, fqrn: str, base: Path) -> Iterator[tuple[str, Repo]]:
    """``src`` published as ``fqrn`` into a store under ``base`` and served by nginx there:
    (proxy URL, repository), for a module's fixture."""
    served = Served(base / "store", base / "keys")
    repo = served.publish(src, fqrn)
    proxy = served.serve(base / "nginx")
    try:
        yield proxy, repo
    finally:
        served.stop()


@contextmanager
def world_of(src: Path, fqrn: str, base: Path) -> Iterator[World]:
    """``src`` published as ``fqrn`` into a store under ``base`` and served by nginx there,
    as a :class:`World` (for a module's fixture)."""
    served = Served(base / "store", base / "keys")
    served.publish(src, fqrn)
    proxy = served.serve(base / "nginx")
    try:
        yield World(served, proxy, src)
    finally:
        served.stop()


def cvmfs_stops(stderr: str) -> int:
    """From ``--stats``: the calls on /cvmfs paths that stopped the program."""
    got = re.search(r"(\d+) on /cvmfs answered by stopping the program", stderr)
    assert got, stderr
    return int(got[1])


def stops(stderr: str) -> int:
    """From ``--stats``: the calls that stopped the program, on /cvmfs paths and others."""
    other = re.search(r"(\d+) stopped that were not for /cvmfs", stderr)
    assert other, stderr
    return cvmfs_stops(stderr) + int(other[1])


def hep_exec_cmd(
    proxy: str,
    argv: Sequence[str],
    *,
    keys: Path | None = None,
    options: Sequence[str] = (),
) -> list[str]:
    """``hep-exec --server … [--keys …] --no-shared-cache OPTIONS -- ARGV``."""
    key_opt = ["--keys", str(keys)] if keys else []
    return [*CLI, "--server", proxy, *key_opt, "--no-shared-cache", *options, "--", *argv]


def hep_exec(
    proxy: str,
    argv: Sequence[str],
    *,
    keys: Path | None = None,
    options: Sequence[str] = (),
    env: Mapping[str, str] | None = None,
    cwd: str | Path | None = None,
    timeout: float = 120,
) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        hep_exec_cmd(proxy, argv, keys=keys, options=options),
        env=env_with(env),
        cwd=cwd,
        capture_output=True,
        text=True,
        timeout=timeout,
    )


def in_and_out_of_process(
    proxy: str, argv: Sequence[str]
) -> tuple[list[str], dict[str, subprocess.CompletedProcess[str]]]:
    """``argv`` under hep-exec with in-process answers and with ``--no-in-process`` (both
    ``--stats-internals``): its output lines, which must be the same both ways (the tracer's
    own answers are the oracle), and each run by its option."""
    runs = {}
    for opt in ("--stats-internals", "--no-in-process"):
        r = hep_exec(proxy, argv, options=[opt, "--stats-internals"])
        assert r.returncode == 0, r.stderr
        runs[opt] = r
    lines = runs["--stats-internals"].stdout.splitlines()
    assert lines == runs["--no-in-process"].stdout.splitlines()
    return lines, runs


def corrupt_copy(store: Path, dest: Path, object_relpath: str) -> None:
    """A copy of ``store`` (hard links, cheap) in which one object's bytes are flipped."""
    shutil.copytree(store, dest, copy_function=os.link)
    victim = dest / object_relpath
    data = bytearray(victim.read_bytes())
    data[len(data) // 2] ^= 0xFF
    victim.unlink()  # break the hard link: the original store stays intact
    victim.write_bytes(bytes(data))


def ram_files_backing(kind: str | None = None) -> str:
    """What hep-exec's RAM files are made of here for ``--ram-files KIND`` (default: the
    environment's HEP_EXEC_RAM_FILES, else auto): "tmpfs" or "memfd"."""
    from worker.ram.ramfiles import RamFiles

    files = RamFiles(kind or os.environ.get("HEP_EXEC_RAM_FILES", "auto"))
    try:
        return files.backing
    finally:
        files.close()


def ram_files_refused(kind: str) -> str | None:
    """Why this machine cannot give RAM files of ``kind`` ("tmpfs", "memfd"), or None."""
    from worker.ram.ramfiles import RamFiles, RamFilesError

    try:
        RamFiles(kind).close()
    except RamFilesError as e:
        return str(e)
    return None


@dataclass
class World:
    """Repositories published by our publisher and served by nginx on loopback, for a test
    module: their sources, the programs it compiled, the RAM files hep-exec makes here."""

    served: Served
    proxy: str
    src: Path  # the publisher's sources (on tmpfs, like the tracer's mirror, where possible)
    tools: dict[str, Path] = field(default_factory=dict)  # programs compiled for the module
    backing: str = field(default_factory=ram_files_backing)  # "tmpfs" or "memfd"

    @property
    def store(self) -> Path:
        return self.served.store

    def key(self, fqrn: str) -> Path:
        """The master public key of repository ``fqrn`` (for ``--keys``)."""
        return self.served.repos[fqrn].master_pub

    def run(self, argv: Sequence[str], **kw: Any) -> subprocess.CompletedProcess[str]:
        """:func:`hep_exec` through this world's proxy."""
        return hep_exec(self.proxy, argv, **kw)

    def needs_named_files(self) -> None:
        """Skip unless RAM files are tmpfs files: the handler answers opens in-process for
        files it can name; memfds are handed out by fd number, and numbers are reused."""
        if self.backing != "tmpfs":
            pytest.skip(f"RAM files here are {self.backing}s: opens stay with the tracer")
