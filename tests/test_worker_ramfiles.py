"""RAM files: sealed memfds and the private huge-page tmpfs, both unchangeable by a tracee."""

from __future__ import annotations

import errno
import fcntl
import hashlib
import mmap
import os
import re
import shutil
import stat
import subprocess
from collections.abc import Iterator
from pathlib import Path

import pytest

from worker.ramfiles import (
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
    """Handed out through a read-only bind mount: the EROFS a /cvmfs file should give."""
    assert tmpfs_files.backing == "tmpfs"
    fd, _ = tmpfs_files.make("ro", b"hello world")
    path = f"/proc/{os.getpid()}/fd/{fd}"
    try:
        for flags in (os.O_RDWR, os.O_WRONLY, os.O_WRONLY | os.O_TRUNC):
            with pytest.raises(OSError) as e:
                os.open(path, flags)
            assert e.value.errno == errno.EROFS
        with pytest.raises(OSError) as e:
            os.chmod(path, 0o777)
        assert e.value.errno == errno.EROFS
        with pytest.raises(OSError) as e:
            os.truncate(path, 0)
        assert e.value.errno == errno.EROFS
        with pytest.raises(OSError) as e:
            os.write(fd, b"X")
        assert e.value.errno == errno.EBADF
        with pytest.raises(PermissionError):
            mmap.mmap(fd, 11, mmap.MAP_SHARED, mmap.PROT_WRITE | mmap.PROT_READ)
        assert os.pread(fd, 100, 0) == b"hello world"
        # nothing of it is left by name: only fds keep it
        st = os.fstat(fd)
        assert stat.S_ISREG(st.st_mode) and st.st_nlink == 0
        assert os.readlink(path).endswith(" (deleted)")
    finally:
        os.close(fd)


def test_every_backing_reads_maps_and_passes_to_a_child(files: RamFiles) -> None:
    pieces = [os.urandom(5000), b"", os.urandom(300_000)]
    fd, size = files.make("blob", pieces)
    try:
        assert size == 305_000 == os.fstat(fd).st_size
        assert os.pread(fd, size + 1, 0) == b"".join(pieces)
        with mmap.mmap(fd, size, mmap.MAP_SHARED, mmap.PROT_READ) as m:
            assert m[:] == b"".join(pieces)
        out = subprocess.run(
            ["sha256sum", f"/proc/{os.getpid()}/fd/{fd}"],
            capture_output=True,
            pass_fds=(fd,),
            check=True,
        )
        assert out.stdout.split()[0].decode() == hashlib.sha256(b"".join(pieces)).hexdigest()
    finally:
        os.close(fd)
    fd, size = files.make("empty", b"")
    assert size == 0 == os.fstat(fd).st_size
    os.close(fd)


def test_every_backing_executes_binaries_and_scripts(files: RamFiles) -> None:
    """exec of /proc/<pid>/fd/<n> is how hep-exec runs /cvmfs programs."""
    true = shutil.which("true")
    assert true
    fd, _ = files.make("true", Path(true).read_bytes())
    script, _ = files.make("script", b"#!/bin/sh\necho from a RAM file\n")
    try:
        subprocess.run([f"/proc/{os.getpid()}/fd/{fd}"], pass_fds=(fd,), check=True)
        out = subprocess.run(
            [f"/proc/{os.getpid()}/fd/{script}"], pass_fds=(script,), capture_output=True
        )
        assert out.stdout == b"from a RAM file\n"
    finally:
        os.close(fd)
        os.close(script)


def test_tmpfs_gives_large_files_huge_pages(tmpfs_files: RamFiles) -> None:
    """The point of the tmpfs: a 4 MiB file is backed by 2 MiB pages, mapped as such."""
    enabled = (THP / "enabled").read_text() if (THP / "enabled").exists() else "[never]"
    if "[never]" in enabled or "[deny]" in (THP / "shmem_enabled").read_text():
        pytest.skip(f"transparent huge pages are off on this node ({enabled.strip()})")
    fd, size = tmpfs_files.make("big", os.urandom(4 << 20))
    try:
        with mmap.mmap(fd, size, mmap.MAP_SHARED, mmap.PROT_READ) as m:
            assert m[: 1 << 20] == os.pread(fd, 1 << 20, 0)
            assert m[size - 1] == os.pread(fd, 1, size - 1)[0]  # the whole mapping
            smaps = Path("/proc/self/smaps").read_text()
        pmd = [int(k) for k in re.findall(r"ShmemPmdMapped:\s+(\d+) kB", smaps)]
        assert max(pmd) >= 2048, "no huge page mapped for a 4 MiB tmpfs file"
    finally:
        os.close(fd)


def test_unknown_backing_is_refused() -> None:
    with pytest.raises(ValueError, match="expected one of auto, tmpfs, memfd"):
        RamFiles("hugetlb")
