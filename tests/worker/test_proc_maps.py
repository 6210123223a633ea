"""/proc/<pid>/maps and smaps name a mapped /cvmfs file (a library, an mmap'ed data file) by
its /cvmfs path, as under the real client, not by the RAM file that holds its bytes (before:
``/6a9ecf61…`` on a tmpfs no path reaches, or ``/memfd:… (deleted)``)."""

from __future__ import annotations

import os
import re
import subprocess
import sys
import tempfile
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest

from tests.support.hep_exec import CLI, hep_exec, serving
from tests.support.node_cache import kill_service
from tests.support.tracing import ensure_built, env_with
from worker.trace.proc_maps import OpenedFiles, with_cvmfs_paths

FQRN = "maps.test.org"
ROOT = f"/cvmfs/{FQRN}"
RAM = os.makedev(0, 0x28)
NAME = b"/" + b"6a9ecf6100d21488dba5964b2ab69852c9449d9d"

MAPS = (
    b"55d0c0a00000-55d0c0a01000 r--p 00000000 fd:01 1234                       /usr/bin/prog\n"
    b"7f4390700000-7f4390705000 r--p 00000000 00:28 113                        " + NAME + b"\n"
    b"7f4390705000-7f4390708000 r-xp 00005000 00:28 113                        " + NAME + b"\n"
    b"7f4390708000-7f4390709000 r--p 00000000 fd:01 113                        " + NAME + b"\n"
    b"7f439070a000-7f439070b000 r--s 00000000 00:01 2048                       "
    b"/memfd:ram (deleted)\n"
    b"7f439070c000-7f439070d000 r--p 00000000 00:28 114                        "
    + NAME[:-1]
    + b"0 (deleted)\n"
    b"7ffc4d3f0000-7ffc4d411000 rw-p 00000000 00:00 0                          [stack]"
)
SMAPS_TAIL = b"Size:                 12 kB\nVmFlags: rd mr mw me sd\n"


def known(dev: int, name: bytes) -> bytes | None:
    files = {
        (RAM, NAME): b"/cvmfs/a.org/lib/libx.so",
        (RAM, NAME[:-1] + b"0"): b"/cvmfs/a.org/evicted\nname",
        (os.makedev(0, 1), b"/memfd:ram (deleted)"): b"/cvmfs/a.org/data.bin",
    }
    return files.get((dev, name.removesuffix(b" (deleted)")), files.get((dev, name)))


def test_ram_files_get_their_paths_and_nothing_else_changes() -> None:
    """Each line of a RAM file (its device and name) names the /cvmfs path instead, where the
    kernel put the name (the columns before it as they were); a file of the same name on
    another device, the program's own files, anonymous mappings stay; a name the kernel
    marks deleted (evicted from the node cache while mapped) gets the path (the real client
    never shows one so); a newline in a path is written as the kernel writes one."""
    out = with_cvmfs_paths(MAPS, known, [b" 00:28 ", b" /memfd:"])
    assert out is not None
    lines = out.split(b"\n")
    before = MAPS.split(b"\n")
    assert lines[0] == before[0] and lines[3] == before[3] and lines[6] == before[6]
    assert lines[1] == before[1].replace(NAME, b"/cvmfs/a.org/lib/libx.so")
    assert lines[2].endswith(b"                        /cvmfs/a.org/lib/libx.so")
    assert lines[4].endswith(b" 2048                       /cvmfs/a.org/data.bin")
    assert lines[5].endswith(b" 114                        /cvmfs/a.org/evicted\\012name")
    assert len(lines) == len(before)  # (the last line had no newline, and has none)


def test_smaps_lines_between_mappings_stay() -> None:
    smaps = b"".join(line + b"\n" + SMAPS_TAIL for line in MAPS.split(b"\n"))
    out = with_cvmfs_paths(smaps, known, [b" 00:28 "])
    assert out is not None
    assert out.count(SMAPS_TAIL) == 7 and out.count(b"/cvmfs/a.org/lib/libx.so") == 2


def test_a_table_that_maps_none_of_them_is_the_kernels() -> None:
    assert with_cvmfs_paths(MAPS, known, [b" 00:77 "]) is None
    assert with_cvmfs_paths(MAPS, lambda dev, name: None, [b" 00:28 "]) is None


def test_opened_files_know_the_device_of_files_by_name(tmp_path: Path) -> None:
    """A file handed out by name (/proc/<pid>/fd/<dir>/<name>) is known on its directory's
    device only: the same name on another file system is somebody else's."""
    fd = os.open(tmp_path, os.O_RDONLY | os.O_DIRECTORY)
    try:
        opened = OpenedFiles()
        opened.note(b"/proc/%d/fd/%d/%s" % (os.getpid(), fd, NAME[1:]), b"/cvmfs/a.org/f")
        dev = os.stat(tmp_path).st_dev
        assert opened.mapped(dev, NAME) == b"/cvmfs/a.org/f"
        assert opened.mapped(dev, NAME + b" (deleted)") == b"/cvmfs/a.org/f"
        assert opened.mapped(dev + 1, NAME) is None
        assert opened.marks() == [b" %02x:%02x " % (os.major(dev), os.minor(dev))]
    finally:
        os.close(fd)


@dataclass(frozen=True)
class Served:
    proxy: str
    key: Path


LIBRARY = "int maps_test_answer(void) { return 42; }\n"


@pytest.fixture(scope="module")
def served(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Served]:
    ensure_built()
    base = tmp_path_factory.mktemp("maps")
    src = base / "src"
    (src / "lib").mkdir(parents=True)
    (base / "lib.c").write_text(LIBRARY)
    subprocess.run(
        ["gcc", "-shared", "-fPIC", "-o", str(src / "lib" / "libanswer.so"), str(base / "lib.c")],
        check=True,
    )
    (src / "data.bin").write_bytes(os.urandom(3 * 4096))
    with serving(src, FQRN, base) as (proxy, repo):
        yield Served(proxy, repo.master_pub)


# maps the library and the data file, then prints each table's lines of /cvmfs files, and
# any line that names a file the way RAM files are named
PROGRAM = rf"""
import ctypes, mmap, os, re, subprocess, sys
lib = ctypes.CDLL("{ROOT}/lib/libanswer.so")
assert lib.maps_test_answer() == 42
f = open("{ROOT}/data.bin", "rb")
m = mmap.mmap(f.fileno(), 0, prot=mmap.PROT_READ)
ram = re.compile(r" /([0-9a-f]{{40}}|memfd:)")
tables = ["/proc/self/maps", "/proc/self/smaps", "/proc/thread-self/maps",
          f"/proc/{{os.getpid()}}/task/{{os.getpid()}}/maps"]
for table in tables:
    text = open(table).read()
    paths = sorted({{ln.split()[-1] for ln in text.splitlines() if "{ROOT}" in ln}})
    print(table.replace(str(os.getpid()), "PID"), paths, ram.findall(text))
# another process of the job reads ours
child = subprocess.run(["cat", f"/proc/{{os.getpid()}}/maps"], capture_output=True, text=True)
print("cat", sorted({{ln.split()[-1] for ln in child.stdout.splitlines() if "{ROOT}" in ln}}))
"""


def run_program(served: Served, where: str) -> subprocess.CompletedProcess[str]:
    """PROGRAM in a job with its own RAM files (``own``: on its tmpfs; ``memfd``) or with the
    node's service's (``node``)."""
    argv = [sys.executable, "-c", PROGRAM]
    if where != "node":
        options = ["--ram-files", "memfd" if where == "memfd" else "auto"]
        return hep_exec(served.proxy, argv, keys=served.key, options=options)
    with tempfile.TemporaryDirectory(prefix="maps-", dir="/dev/shm") as d:
        os.chmod(d, 0o700)
        job = [*CLI, "--server", served.proxy, "--keys", str(served.key), "--cache-dir", d]
        try:
            return subprocess.run(
                [*job, "--cache-idle", "5", "--", *argv],
                env=env_with(),
                capture_output=True,
                text=True,
                timeout=120,
            )
        finally:
            kill_service(Path(d))


@pytest.mark.parametrize("where", ["own", "memfd", "node"])
def test_a_program_sees_its_cvmfs_files_by_path_in_its_maps(served: Served, where: str) -> None:
    r = run_program(served, where)
    assert r.returncode == 0, r.stderr
    both = [f"{ROOT}/data.bin", f"{ROOT}/lib/libanswer.so"]
    lines = r.stdout.splitlines()
    assert lines == [
        f"/proc/self/maps {both} []",
        f"/proc/self/smaps {both} []",
        f"/proc/thread-self/maps {both} []",
        f"/proc/PID/task/PID/maps {both} []",
        f"cat {both}",
    ], r.stdout


def test_maps_of_a_program_without_cvmfs_files_are_the_kernels(served: Served) -> None:
    """Nothing of /cvmfs mapped: the table is the kernel's own, read as the program reads it
    (same lines as a second read of it gives)."""
    code = "a = open('/proc/self/maps').read(); b = open('/proc/self/maps').read(); "
    code += f"print(a.splitlines()[0] == b.splitlines()[0], '{ROOT}' in a)"
    r = hep_exec(served.proxy, [sys.executable, "-c", code], keys=served.key)
    assert r.returncode == 0, r.stderr
    assert r.stdout.split() == ["True", "False"]
    assert not re.search(r"Traceback", r.stderr)
