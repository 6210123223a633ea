"""RAM files: sealed memfds and the private huge-page tmpfs, both unchangeable by a tracee."""

from __future__ import annotations

import errno
import fcntl
import hashlib
import mmap
import os
import re
import shutil
import subprocess
from collections.abc import Iterator
from pathlib import Path

import pytest

from worker.ram.ramfiles import (
    SEALS,
    RamFiles,
    RamFilesError,
    choose_backing,
    make_sealed_memfd,
    shmem_setting,
)

THP = Path("/sys/kernel/mm/transparent_hugepage")


def test_shmem_setting_reads_the_selected_word() -> None:
    assert shmem_setting("always within_size advise [never] deny force\n") == "never"
    assert shmem_setting("[always] madvise never") == "always"
    assert shmem_setting("never") == "never"


@pytest.mark.parametrize(
    ("requested", "shmem", "backing"),
    [
        ("auto", "always within_size advise [never] deny force", "tmpfs"),
        ("auto", "always within_size [advise] never deny force", "tmpfs"),
        ("auto", "[always] within_size advise never deny force", "memfd"),
        ("auto", "always [within_size] advise never deny force", "memfd"),
        ("auto", "always within_size advise never [deny] force", "memfd"),
        ("auto", None, "memfd"),
        ("memfd", "always within_size advise [never] deny force", "memfd"),
        ("tmpfs", "[always] within_size advise never deny force", "tmpfs"),
    ],
)
def test_choose_backing(requested: str, shmem: str | None, backing: str) -> None:
    got, why = choose_backing(requested, shmem)
    assert got == backing and why


def test_choose_backing_refuses_unknown_kinds() -> None:
    with pytest.raises(ValueError, match="'disk'"):
        choose_backing("disk", None)


@pytest.fixture(scope="module")
def tmpfs_files() -> Iterator[RamFiles]:
    try:
        files = RamFiles("tmpfs")
    except RamFilesError as e:
        pytest.skip(f"no private tmpfs on this machine: {e}")
    yield files
    files.close()


@pytest.fixture(params=["memfd", "tmpfs"])
def files(request: pytest.FixtureRequest, tmpfs_files: RamFiles) -> RamFiles:
    return tmpfs_files if request.param == "tmpfs" else RamFiles("memfd")


def test_memfd_is_sealed_against_every_change() -> None:
    fd, size = make_sealed_memfd("t", [b"hello ", b"world"])
    try:
        assert size == 11
        assert fcntl.fcntl(fd, fcntl.F_GET_SEALS) & SEALS == SEALS
        # a tracee gets its own fd through /proc/<pid>/fd/<n>; even O_RDWR cannot change it
        rw = os.open(f"/proc/{os.getpid()}/fd/{fd}", os.O_RDWR)
        try:
            for change in (
                lambda: os.write(rw, b"X"),
                lambda: os.ftruncate(rw, 0),
                lambda: os.ftruncate(rw, 100),
                lambda: mmap.mmap(rw, 11, mmap.MAP_SHARED, mmap.PROT_WRITE | mmap.PROT_READ),
                lambda: fcntl.fcntl(rw, fcntl.F_ADD_SEALS, 0),  # F_SEAL_SEAL: seals are final
            ):
                with pytest.raises(PermissionError):
                    change()
        finally:
            os.close(rw)
    finally:
        os.close(fd)


def test_tmpfs_file_cannot_be_reopened_for_writing_or_chmodded(tmpfs_files: RamFiles) -> None:
    """Handed out through a read-only bind mount: the EROFS a /cvmfs file should give (for an
    ordinary user the file's mode, r-x, refuses a write open first, EACCES, unless O_TRUNC
    makes the kernel ask the mount for write access before it checks the mode)."""
    assert tmpfs_files.backing == "tmpfs"
    f = tmpfs_files.make("ro", b"hello world")
    root = os.geteuid() == 0
    try:
        for path in (f.path, f"/proc/{os.getpid()}/fd/{f.fd}"):
            for flags in (os.O_RDWR, os.O_WRONLY, os.O_WRONLY | os.O_TRUNC):
                with pytest.raises(OSError) as e:
                    os.open(path, flags)
                refused = errno.EROFS if root or flags & os.O_TRUNC else errno.EACCES
                assert e.value.errno == refused
            with pytest.raises(OSError) as e:
                os.chmod(path, 0o777)
            assert e.value.errno == errno.EROFS
            with pytest.raises(OSError) as e:
                os.truncate(path, 0)
            assert e.value.errno == (errno.EROFS if root else errno.EACCES)
        with pytest.raises(OSError) as e:
            os.write(f.fd, b"X")
        assert e.value.errno == errno.EBADF
        with pytest.raises(PermissionError):
            mmap.mmap(f.fd, 11, mmap.MAP_SHARED, mmap.PROT_WRITE | mmap.PROT_READ)
        assert os.pread(f.fd, 100, 0) == b"hello world"
    finally:
        tmpfs_files.discard(f.fd, f.name)


def _kernel_at_least(major: int, minor: int) -> bool:
    m = re.match(r"(\d+)\.(\d+)", os.uname().release)
    return m is not None and (int(m.group(1)), int(m.group(2))) >= (major, minor)


@pytest.mark.parametrize("classic", [False, True], ids=["default", "classic"])
def test_both_ways_of_holding_the_tmpfs_give_the_same_two_views(
    tmpfs_files: RamFiles, tmp_path: Path, classic: bool
) -> None:
    """worker/trace/_tmpfs.c holds the tmpfs as two clones in mount namespaces of their own
    where the kernel has the new mount API (Linux 5.12), else as the classic mount and
    read-only bind whose namespace is gone: either way a read-write view to make files in and
    a read-only, nosuid, nodev view that the kernel names from the tmpfs's own root."""
    from worker.trace import _tmpfs

    rw, ro, way = _tmpfs.mount(os.fsencode(tmp_path), b"size=0,mode=0755", classic)
    try:
        if classic:
            assert way == "mounts"
        elif _kernel_at_least(5, 12):  # (a container's seccomp profile may still refuse it)
            assert way == "clones", "the new mount API is there but was not used"
        fd = os.open("f", os.O_WRONLY | os.O_CREAT, 0o644, dir_fd=rw)
        os.write(fd, b"bytes")
        os.close(fd)
        os.mkdir(f"/proc/self/fd/{rw}/d")
        fd = os.open("f", os.O_RDONLY, dir_fd=ro)
        try:
            assert os.read(fd, 10) == b"bytes"
            assert os.readlink(f"/proc/self/fd/{fd}") == "/f"
        finally:
            os.close(fd)
        assert sorted(os.listdir(f"/proc/self/fd/{ro}")) == ["d", "f"]
        for refused in (
            lambda: os.open("g", os.O_WRONLY | os.O_CREAT, 0o644, dir_fd=ro),
            lambda: os.chmod(f"/proc/self/fd/{ro}/f", 0o600),
            lambda: os.unlink("f", dir_fd=ro),
            lambda: os.rmdir(f"/proc/self/fd/{ro}/d"),
        ):
            with pytest.raises(OSError) as e:
                refused()
            assert e.value.errno == errno.EROFS
        flags = os.statvfs(f"/proc/self/fd/{ro}").f_flag
        assert flags & (os.ST_RDONLY | os.ST_NOSUID | os.ST_NODEV) == (
            os.ST_RDONLY | os.ST_NOSUID | os.ST_NODEV
        )
        flags = os.statvfs(f"/proc/self/fd/{rw}").f_flag
        assert flags & (os.ST_RDONLY | os.ST_NOSUID | os.ST_NODEV) == os.ST_NOSUID | os.ST_NODEV
    finally:
        os.close(rw)
        os.close(ro)
    with pytest.raises(OSError) as e:  # what the kernel refuses: one step named, either way
        _tmpfs.mount(os.fsencode(tmp_path), b"huge=sometimes", classic)
    assert (e.value.errno, e.value.filename) == (errno.EINVAL, "mount -t tmpfs")


def test_tmpfs_file_is_opened_by_a_name_that_dies_with_it(tmpfs_files: RamFiles) -> None:
    """A tracee opens /proc/<pid>/fd/<dir>/<name>: right while the object lives, ENOENT
    after (never another object's bytes: names are not reused)."""
    f = tmpfs_files.make("named", b"one")
    g = tmpfs_files.make("named", b"two")
    assert f.name and g.name and f.name != g.name
    assert f.path.startswith(f"/proc/{os.getpid()}/fd/") and f.path.endswith("/" + f.name)
    with open(f.path, "rb") as r:
        assert r.read() == b"one"
        assert os.fstat(r.fileno())[:2] == os.fstat(f.fd)[:2]  # the same file
    tmpfs_files.discard(f.fd, f.name)
    with pytest.raises(FileNotFoundError):
        Path(f.path).read_bytes()
    assert Path(g.path).read_bytes() == b"two"
    tmpfs_files.discard(g.fd, g.name)


def test_memfd_path_reopens_its_fd() -> None:
    f = RamFiles("memfd").make("m", b"bytes")
    assert f.name is None and f.path == f"/proc/{os.getpid()}/fd/{f.fd}"
    assert Path(f.path).read_bytes() == b"bytes"
    os.close(f.fd)


def test_every_backing_reads_maps_and_passes_to_a_child(files: RamFiles) -> None:
    pieces = [os.urandom(5000), b"", os.urandom(300_000)]
    f = files.make("blob", pieces)
    try:
        assert f.size == 305_000 == os.fstat(f.fd).st_size
        assert os.pread(f.fd, f.size + 1, 0) == b"".join(pieces)
        with mmap.mmap(f.fd, f.size, mmap.MAP_SHARED, mmap.PROT_READ) as m:
            assert m[:] == b"".join(pieces)
        out = subprocess.run(["sha256sum", f.path], capture_output=True, check=True)
        assert out.stdout.split()[0].decode() == hashlib.sha256(b"".join(pieces)).hexdigest()
    finally:
        files.discard(f.fd, f.name)
    f = files.make("empty", b"")
    assert f.size == 0 == os.fstat(f.fd).st_size
    files.discard(f.fd, f.name)


def test_every_backing_executes_binaries_and_scripts(files: RamFiles) -> None:
    """exec of the file's path is how hep-exec runs /cvmfs programs."""
    true = shutil.which("true")
    assert true
    binary = files.make("true", Path(true).read_bytes())
    script = files.make("script", b"#!/bin/sh\necho from a RAM file\n")
    try:
        subprocess.run([binary.path], check=True)
        out = subprocess.run([script.path], capture_output=True, check=True)
        assert out.stdout == b"from a RAM file\n"
    finally:
        files.discard(binary.fd, binary.name)
        files.discard(script.fd, script.name)


def test_tmpfs_gives_large_files_huge_pages(tmpfs_files: RamFiles) -> None:
    """The point of the tmpfs: a 4 MiB file is backed by 2 MiB pages, mapped as such."""
    enabled = (THP / "enabled").read_text() if (THP / "enabled").exists() else "[never]"
    if "[never]" in enabled or "[deny]" in (THP / "shmem_enabled").read_text():
        pytest.skip(f"transparent huge pages are off on this node ({enabled.strip()})")
    f = tmpfs_files.make("big", os.urandom(4 << 20))
    try:
        with mmap.mmap(f.fd, f.size, mmap.MAP_SHARED, mmap.PROT_READ) as m:
            assert m[: 1 << 20] == os.pread(f.fd, 1 << 20, 0)
            assert m[f.size - 1] == os.pread(f.fd, 1, f.size - 1)[0]  # the whole mapping
            smaps = Path("/proc/self/smaps").read_text()
        pmd = [int(k) for k in re.findall(r"ShmemPmdMapped:\s+(\d+) kB", smaps)]
        assert max(pmd) >= 2048, "no huge page mapped for a 4 MiB tmpfs file"
    finally:
        tmpfs_files.discard(f.fd, f.name)


def test_unknown_backing_is_refused() -> None:
    with pytest.raises(ValueError, match="expected one of auto, tmpfs, memfd"):
        RamFiles("hugetlb")


def test_memfd_never_tries_the_tmpfs() -> None:
    """``--ram-files memfd`` never mounts a tmpfs, even where ``auto`` would (4 KiB shmem
    pages): sealed memfds, reached by fd number, no directory for a service to share."""
    files = RamFiles("memfd", shmem_enabled="always within_size advise [never] deny force")
    f = files.make("only-memfds", b"x")
    try:
        assert files.backing == "memfd" and files.shared_dir is None
        assert files.describe() == "sealed memfds (memfd requested)"
        assert f.name is None and os.readlink(f.path).startswith("/memfd:only-memfds")
        assert fcntl.fcntl(f.fd, fcntl.F_GET_SEALS) & SEALS == SEALS
    finally:
        files.discard(f.fd, f.name)
        files.close()
