"""The tracer's path walk and shebang parsing, without running a tracee."""

from __future__ import annotations

import errno
import os
from pathlib import Path

import pytest

from worker.trace.answers import Session
from worker.trace.hostpolicy import HostDirPolicy
from worker.trace.policy import Found, Kind, Outside
from worker.trace.shebang import parse_shebang

M = b"/cvmfs/test.repo"


@pytest.fixture
def session(tmp_path: Path) -> Session:
    repo = tmp_path / "repo"
    (repo / "dir/sub").mkdir(parents=True)
    (repo / "dir/file").write_text("x")
    (repo / "rel").symlink_to("dir/sub")
    (repo / "abs").symlink_to("/cvmfs/test.repo/dir")
    (repo / "chain").symlink_to("rel")
    (repo / "loop1").symlink_to("loop2")
    (repo / "loop2").symlink_to("loop1")
    (repo / "out").symlink_to("/etc")
    (repo / "variant").symlink_to("$(HEP_NO_SUCH_VAR:-dir)/file")
    shadow = tmp_path / "shadow"
    shadow.mkdir()
    return Session(HostDirPolicy({"test.repo": repo}), b"/cvmfs", os.fsencode(shadow))


def found(res: object) -> Found:
    assert isinstance(res, Found), res
    return res


def test_symlinks_resolve_inside_the_mount(session: Session) -> None:
    res, cacheable = session.resolve(1, M + b"/chain", True)
    assert found(res).path == M + b"/dir/sub" and cacheable
    assert found(session.resolve(1, M + b"/abs/file", True)[0]).node.kind == Kind.REG
    assert found(session.resolve(1, M + b"/rel", False)[0]).node.kind == Kind.LNK
    assert found(session.resolve(1, M + b"/rel/../file", True)[0]).path == M + b"/dir/file"


def test_errors(session: Session) -> None:
    assert session.resolve(1, M + b"/loop1", True)[0] == errno.ELOOP
    assert session.resolve(1, M + b"/dir/file/x", True)[0] == errno.ENOTDIR
    assert session.resolve(1, M + b"/dir/file/", False)[0] == errno.ENOTDIR
    assert session.resolve(1, M + b"/missing/x", True)[0] == errno.ENOENT
    assert session.resolve(1, b"/cvmfs/other.repo", True)[0] == errno.ENOENT


def test_leaving_the_mount(session: Session) -> None:
    assert session.resolve(1, M + b"/out/hostname", True)[0] == Outside(b"/etc/hostname")
    assert session.resolve(1, M + b"/../../etc", True)[0] == Outside(b"/etc")
    assert session.resolve(1, b"/cvmfs/..", True)[0] == Outside(b"/")
    assert found(session.resolve(1, b"/cvmfs", True)[0]).node.kind == Kind.DIR


def test_variant_symlinks_are_expanded_and_never_cached(session: Session) -> None:
    res, cacheable = session.resolve(os.getpid(), M + b"/variant", True)
    assert found(res).path == M + b"/dir/file"
    assert not cacheable


def test_materialize_mirrors_entries(session: Session) -> None:
    shadow = session.materialize(1, M + b"/dir")
    assert isinstance(shadow, bytes)
    assert sorted(os.listdir(shadow)) == [b"file", b"sub"]
    assert os.path.isdir(shadow + b"/sub") and os.path.isfile(shadow + b"/file")
    assert sorted(os.listdir(session.shadow)) == [b"test.repo"]


@pytest.mark.parametrize(
    ("head", "want"),
    [
        (b"#!/bin/sh\necho", (b"/bin/sh", b"")),
        (b"#! /usr/bin/env python3 -u\n", (b"/usr/bin/env", b"python3 -u")),
        (b"#!/cvmfs/r/bin/python\t-E\n", (b"/cvmfs/r/bin/python", b"-E")),
        (b"\x7fELF", None),
        (b"#!\n", None),
    ],
)
def test_shebang(head: bytes, want: tuple[bytes, bytes] | None) -> None:
    assert parse_shebang(head) == want
