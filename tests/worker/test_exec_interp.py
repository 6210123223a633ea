"""Programs whose ELF interpreter lives under /cvmfs, as every program of EESSI's and Compute
Canada's stacks does (``/cvmfs/…/compat/…/ld-linux-x86-64.so.2``): the kernel opens PT_INTERP
itself, inside execve, and /cvmfs is not there on a worker node.  They failed with "No such
file or directory", from /cvmfs and from the host alike; now they run from a copy that names
the interpreter's file (worker/trace/exec_files.py).  Real hep-exec, a repository published by
our publisher and served by nginx on loopback, programs compiled here against the system's
ld.so copied into the repository; the oracle is the same program linked against that copy
where it lies on the host."""

from __future__ import annotations

import os
import shutil
import subprocess
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest

from tests.support.hep_exec import World, world_of
from tests.support.tracing import compile_c, ensure_built
from worker.trace.exec_files import interp_span

FQRN = "compat.test.org"
ROOT = f"/cvmfs/{FQRN}"
LDSO = "lib64/ld-linux-x86-64.so.2"

# argv, /proc/self/exe, and a function of a library found through $ORIGIN/../lib
PROGRAM = r"""
#include <limits.h>
#include <stdio.h>
#include <unistd.h>
int lib_answer(void);
int main(int argc, char **argv) {
    char exe[PATH_MAX];
    ssize_t n = readlink("/proc/self/exe", exe, sizeof exe - 1);
    exe[n < 0 ? 0 : n] = 0;
    printf("argv0=%s argc=%d exe=%s lib=%d\n", argv[0], argc, exe, lib_answer());
    return argc - 1;
}
"""
LIBRARY = "int lib_answer(void) { return 42; }\n"
# the process's name, as ps, top, pgrep and killall see it
SHOW_COMM = r"""
#include <stdio.h>
int main(void) {
    char name[64] = "";
    FILE *f = fopen("/proc/self/comm", "r");
    if (!f || !fgets(name, sizeof name, f)) return 1;
    fputs(name, stdout);
    return 0;
}
"""
NAMED = "a-program-with-a-long-name"  # the kernel keeps 15 bytes of it


def _link(out: Path, interp: str, lib_dir: Path) -> None:
    """PROGRAM linked against libanswer in lib_dir, its interpreter ``interp``."""
    compile_c(
        PROGRAM, out, f"-L{lib_dir}", "-lanswer", "-Wl,-rpath,$ORIGIN/../lib",
        f"-Wl,--dynamic-linker={interp}",
    )  # fmt: skip


@pytest.fixture(scope="module")
def world(tmp_path_factory: pytest.TempPathFactory) -> Iterator[World]:
    ensure_built()
    base = tmp_path_factory.mktemp("interp")
    src = base / "src"
    for d in ("bin", "lib", "lib64", "sbin"):
        (src / d).mkdir(parents=True)
    shutil.copy(os.path.realpath("/" + LDSO), src / LDSO)
    compile_c(LIBRARY, src / "lib" / "libanswer.so", "-shared", "-fPIC")
    _link(src / "bin" / "prog", f"{ROOT}/{LDSO}", src / "lib")
    _link(src / "bin" / "noldso", f"{ROOT}/lib64/missing.so.2", src / "lib")
    (src / "sbin" / "ld.so").write_bytes((src / LDSO).read_bytes())  # not executable
    _link(src / "bin" / "noexec", f"{ROOT}/sbin/ld.so", src / "lib")
    compile_c(SHOW_COMM, src / "bin" / NAMED)
    compile_c(SHOW_COMM, src / "bin" / "compatcomm", f"-Wl,--dynamic-linker={ROOT}/{LDSO}")
    (src / "bin" / "comm-script.sh").write_text("#!/bin/sh\ncat /proc/$$/comm\n")
    (src / "bin" / "comm-script.sh").chmod(0o755)
    (src / "bin" / "script").write_text(f"#!{ROOT}/bin/prog one\n")
    (src / "bin" / "script").chmod(0o755)
    host = base / "host"  # a program of the user's, built against the stack in /cvmfs
    (host / "bin").mkdir(parents=True)
    (host / "lib").symlink_to(src / "lib")
    _link(host / "bin" / "hostprog", f"{ROOT}/{LDSO}", src / "lib")
    oracle = base / "oracle"  # the same program, its interpreter where the host has it
    (oracle / "bin").mkdir(parents=True)
    (oracle / "lib").symlink_to(src / "lib")
    _link(oracle / "bin" / "prog", str(src / LDSO), src / "lib")
    _link(oracle / "bin" / "noldso", str(src / "lib64" / "missing.so.2"), src / "lib")
    _link(oracle / "bin" / "noexec", str(src / "sbin" / "ld.so"), src / "lib")
    with world_of(src, FQRN, base) as w:
        w.tools.update(hostprog=host / "bin" / "hostprog", oracle=oracle / "bin" / "prog")
        w.tools.update(oracle_bin=oracle / "bin")
        yield w


def _reader(data: bytes) -> Callable[[int, int], bytes]:
    return lambda offset, size: data[offset : offset + size]


def _run(world: World, argv: list[str], *options: str) -> subprocess.CompletedProcess[str]:
    return world.run(argv, keys=world.key(FQRN), options=options)


@pytest.mark.parametrize("in_process", ["", "--no-in-process"])
def test_a_program_whose_interpreter_is_under_cvmfs_runs(
    world: World, trap_mode: str, in_process: str
) -> None:
    """From /cvmfs, from the host, from a shell, from a #! line: argv, exit status,
    /proc/self/exe and $ORIGIN as natively (the oracle: the same program, interpreter on the
    host)."""
    opts = [o for o in (in_process,) if o]
    native = subprocess.run([str(world.tools["oracle"]), "a", "b"], capture_output=True, text=True)
    assert native.returncode == 2
    oracle_exe = str(world.tools["oracle"])
    assert native.stdout == f"argv0={oracle_exe} argc=3 exe={oracle_exe} lib=42\n"

    r = _run(world, [f"{ROOT}/bin/prog", "a", "b"], *opts)
    assert r.returncode == 2, r.stderr
    assert r.stdout == f"argv0={ROOT}/bin/prog argc=3 exe={ROOT}/bin/prog lib=42\n"

    hostprog = str(world.tools["hostprog"])
    r = _run(world, [hostprog, "x"], *opts)
    assert r.returncode == 1, r.stderr
    assert r.stdout == f"argv0={hostprog} argc=2 exe={hostprog} lib=42\n"

    # a shell's fork and exec, 20 times (one copy of each program for the run), and a script
    loop = f"PATH={ROOT}/bin:$PATH; for i in $(seq 20); do prog; done; {hostprog}; script x"
    r = _run(world, ["sh", "-c", loop], *opts)
    want = [f"argv0=prog argc=1 exe={ROOT}/bin/prog lib=42"] * 20
    want += [f"argv0={hostprog} argc=1 exe={hostprog} lib=42"]
    want += [f"argv0={ROOT}/bin/prog argc=4 exe={ROOT}/bin/prog lib=42"]
    assert r.stdout.splitlines() == want, r.stderr

    # fexecve: execveat(fd, "", AT_EMPTY_PATH) of an fd opened on the program
    fexecve = f"import os; os.execve(os.open('{ROOT}/bin/prog', os.O_RDONLY), ['viafd'], {{}})"
    r = _run(world, ["python3", "-c", fexecve], *opts)
    assert r.returncode == 0, r.stderr
    assert r.stdout == f"argv0=viafd argc=1 exe={ROOT}/bin/prog lib=42\n"


def test_a_missing_or_unusable_interpreter_fails_as_natively(world: World, trap_mode: str) -> None:
    """ENOENT for an interpreter that is not there, EACCES for one that is not executable:
    what the kernel says of the same programs where their interpreters' paths are the host's
    (bash's words for each: \"required file not found\", \"Permission denied\")."""
    script = "{0}/noldso; echo $?; {0}/noexec; echo $?"
    oracle = str(world.tools["oracle_bin"])
    native = subprocess.run(["bash", "-c", script.format(oracle)], capture_output=True, text=True)
    r = _run(world, ["bash", "-c", script.format(f"{ROOT}/bin")])
    assert r.stdout.splitlines() == native.stdout.splitlines() == ["127", "126"], r.stderr
    assert r.stderr == native.stderr.replace(oracle, f"{ROOT}/bin"), r.stderr
    r = _run(world, [f"{ROOT}/bin/noldso"])
    assert r.returncode == 127 and "No such file or directory" in r.stderr


def test_exec_copies_are_made_once_and_never_written(world: World) -> None:
    """One copy per program for the whole run, whatever the number of execs, sealed: a
    program of the job cannot change what the next exec runs."""
    probe = (
        "import os, subprocess, sys\n"
        "status = open('/proc/self/status').read()\n"
        "tracer = status.split('TracerPid:')[1].split()[0]\n"
        "fds = lambda: len(os.listdir(f'/proc/{tracer}/fd'))\n"
        f"subprocess.run(['{ROOT}/bin/prog'], stdout=subprocess.DEVNULL)\n"
        "before = fds()\n"
        f"for _ in range(30): subprocess.run(['{ROOT}/bin/prog'], stdout=subprocess.DEVNULL)\n"
        "after = fds()\n"
        "copies = [f'/proc/{tracer}/fd/{n}' for n in os.listdir(f'/proc/{tracer}/fd')\n"
        "          if os.readlink(f'/proc/{tracer}/fd/{n}').startswith('/memfd:hep-exec prog')]\n"
        "refused = 0\n"
        "for c in copies:\n"
        "    try: os.write(os.open(c, os.O_WRONLY), b'x')\n"
        "    except PermissionError: refused += 1\n"
        "print(after - before, len(copies), refused)\n"
    )
    r = _run(world, ["python3", "-c", probe])
    assert r.returncode == 0, r.stderr
    grown, copies, refused = map(int, r.stdout.split())
    assert grown <= 2 and copies == 1 and refused == 1, r.stdout


def test_interp_span_reads_what_the_kernel_reads(world: World) -> None:
    """The parse against readelf's, and the programs it must leave alone."""
    prog = world.src / "bin" / "prog"
    data = prog.read_bytes()
    span = interp_span(_reader(data))
    assert span is not None
    off, size = span
    assert data[off : off + size] == f"{ROOT}/{LDSO}\0".encode()
    out = subprocess.run(["readelf", "-lW", str(prog)], capture_output=True, text=True).stdout
    assert f"[Requesting program interpreter: {ROOT}/{LDSO}]" in out
    library = (world.src / "lib" / "libanswer.so").read_bytes()
    static = Path(shutil.which("ldconfig") or "/sbin/ldconfig").read_bytes()  # static-pie
    for plain in (b"", b"#!/bin/sh\n", data[:40], library, static):
        assert interp_span(_reader(plain)) is None


def test_processes_are_named_as_natively(world: World, ram_files: str, trap_mode: str) -> None:
    """The kernel names a process after the path it was exec'd by: a /cvmfs program run from
    its RAM file was a content hash or an fd number to ps, top, pgrep and killall.  Now its
    own name, as natively: a program's (15 bytes of it), a #! script's own, a program whose
    interpreter is under /cvmfs, one found along PATH, one run through fexecve (its fd)."""
    fexecve = (
        f"import os; fd = os.open('{ROOT}/bin/compatcomm', os.O_RDONLY); os.execve(fd, ['x'], {{}})"
    )
    script = (
        f"{ROOT}/bin/{NAMED}; {ROOT}/bin/comm-script.sh; {ROOT}/bin/compatcomm;"
        f' PATH={ROOT}/bin:$PATH; compatcomm; comm-script.sh; python3 -c "{fexecve}"'
    )
    r = _run(world, ["sh", "-c", script])
    assert r.returncode == 0, r.stderr
    names = r.stdout.splitlines()
    assert names[:5] == [NAMED[:15], "comm-script.sh", "compatcomm", "compatcomm", "comm-script.sh"]
    assert names[5].isdigit(), names  # /dev/fd/N's last component, natively
