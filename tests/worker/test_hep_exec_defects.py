"""Regression tests for hep-exec defects found by an adversarial run (each failed before its fix).

Real hep-exec against a repository published by our publisher and served by nginx on loopback.
"""

from __future__ import annotations

import os
import re
import select
import shutil
import signal
import subprocess
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from subprocess import Popen

import pytest

from tests.support.hep_exec import hep_exec_cmd, serving
from tests.support.tracing import compile_c, ensure_built, env_with
from tests.support.waiting import wait_until

# every test here runs many real processes: left out of the fast subset (-m 'not slow')
pytestmark = pytest.mark.slow

FQRN = "defects.test.org"
MANY = 3000  # entries of the large directory
ROOT = f"/cvmfs/{FQRN}"


def _default_signals() -> None:
    """In the job: SIGINT and SIGHUP as a terminal's foreground job has them."""
    for sig in (signal.SIGINT, signal.SIGHUP):
        signal.signal(sig, signal.SIG_DFL)


@dataclass(frozen=True)
class Job:
    proxy: str
    key: Path
    src: Path

    def popen(self, argv: list[str], *, new_session: bool = False) -> subprocess.Popen[str]:
        return subprocess.Popen(
            hep_exec_cmd(self.proxy, argv, keys=self.key),
            env=env_with(),
            stdin=subprocess.DEVNULL,
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
            start_new_session=new_session,
            # as a terminal's foreground job: a suite run in the background inherits SIGINT
            # ignored, and one run under nohup SIGHUP, which hep-exec (rightly) leaves
            # ignored for itself and the command
            preexec_fn=_default_signals,
        )

    @contextmanager
    def started(self, argv: list[str], *, new_session: bool = False) -> Iterator[Popen[str]]:
        """:meth:`popen`, and the job killed if the test leaves it running."""
        p = self.popen(argv, new_session=new_session)
        try:
            yield p
        finally:
            if p.poll() is None:
                p.kill()
            p.communicate()


SHOW_EXE = r"""
#include <stdio.h>
#include <unistd.h>
int main(void) {
    char b[4096];
    ssize_t n = readlink("/proc/self/exe", b, sizeof b - 1);
    if (n < 0) { perror("readlink"); return 1; }
    b[n] = 0;
    puts(b);
    return 0;
}
"""


@pytest.fixture(scope="module")
def job(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Job]:
    ensure_built()
    base = tmp_path_factory.mktemp("defects")
    src = base / "src"
    (src / "data").mkdir(parents=True)
    (src / "data" / "h1").write_bytes(b"hello\n")
    (src / "pipes").mkdir()
    os.mkfifo(src / "pipes" / "fifo")
    (src / "many").mkdir()
    for i in range(MANY):
        (src / "many" / f"entry-{i:05d}").write_bytes(b"%d\n" % i)
    (base / "build").mkdir()
    (src / "bin").mkdir()
    shutil.copy(compile_c(SHOW_EXE, base / "build" / "showexe"), src / "bin" / "showexe")
    with serving(src, FQRN, base) as (proxy, repo):
        yield Job(proxy, repo.master_pub, src)


# A command that handles the signal like a payload writing its output in the grace period: it
# reads a /cvmfs file first (so it runs traced), says it is ready, and on the signal writes a
# file and exits with a status of its own choosing.  (`wait`, not a foreground sleep: bash
# runs an INT trap during a foreground child only if the child died of SIGINT too.)
HANDLER = """
trap 'echo "got {sig}" > {out}; exit 7' {sig}
cd {root}/data && cat h1 >/dev/null || exit 99
echo ready
while :; do sleep 0.05 & wait $!; done
"""


@pytest.mark.parametrize("sig", ["TERM", "HUP", "INT", "USR1", "USR2", "XCPU"])
def test_signal_to_hep_exec_reaches_the_command_which_finishes_its_handler(
    job: Job, tmp_path: Path, sig: str
) -> None:
    """A batch system's SIGTERM (then SIGKILL after a grace period) goes to hep-exec: the
    command's own handler must run, and hep-exec exits with the command's status."""
    out = tmp_path / "written-by-handler"
    script = HANDLER.format(sig=sig, root=ROOT, out=out)
    with job.started(["bash", "-c", script], new_session=True) as p:
        assert p.stdout is not None
        assert p.stdout.readline() == "ready\n", p.stderr.read() if p.stderr else ""
        mirror = _private_dir_of(p.pid)
        p.send_signal(getattr(signal, f"SIG{sig}"))
        assert p.wait(30) == 7, p.stderr.read() if p.stderr else ""
    assert out.read_text() == f"got {sig}\n"
    assert not mirror.exists()  # nothing of hep-exec's on the host (or it cleaned up)


def _private_dir_of(hep_exec_pid: int) -> Path:
    """The job's private directory (the shadow tree, where the traced command's /cvmfs cwd
    really is), seen from outside: /dev/shm/hep-exec-XXXX or the like."""
    (child,) = subprocess.run(
        ["pgrep", "-P", str(hep_exec_pid)], capture_output=True, text=True
    ).stdout.split()
    cwd = Path(os.readlink(f"/proc/{child}/cwd"))
    (private,) = [p for p in (cwd, *cwd.parents) if p.name.startswith("hep-exec-")]
    return private


def test_sigterm_without_a_handler_ends_the_command_as_natively(job: Job) -> None:
    with job.started(
        ["bash", "-c", f"cat {ROOT}/data/h1 >/dev/null; echo ready; exec sleep 60"]
    ) as p:
        assert p.stdout is not None
        assert p.stdout.readline() == "ready\n"
        p.send_signal(signal.SIGTERM)
        assert p.wait(30) == 128 + signal.SIGTERM


def test_sigterm_handler_gets_its_grace_period_and_hep_exec_waits(job: Job, tmp_path: Path) -> None:
    """The issue's case: the command traps SIGTERM, writes a file in its handler (taking its
    time) and exits 0; the file is there and hep-exec exits 0."""
    out = tmp_path / "result"
    code = (
        "import os, signal, sys, time\n"
        f"open({ROOT!r} + '/data/h1').read()\n"
        "def term(*_):\n"
        "    time.sleep(0.5)\n"
        f"    with open({str(out)!r} + '.tmp', 'w') as f: f.write('saved')\n"
        f"    os.rename({str(out)!r} + '.tmp', {str(out)!r})\n"
        "    sys.exit(0)\n"
        "signal.signal(signal.SIGTERM, term)\n"
        "print('ready', flush=True)\n"
        "while True: time.sleep(0.05)\n"
    )
    with job.started(["python3", "-c", code]) as p:
        assert p.stdout is not None
        assert p.stdout.readline() == "ready\n"
        p.send_signal(signal.SIGTERM)
        assert p.wait(30) == 0, p.stderr.read() if p.stderr else ""
    assert out.read_text() == "saved"
    assert not os.path.exists(str(out) + ".tmp")


COUNTER = r"""
#include <fcntl.h>
#include <signal.h>
#include <unistd.h>
static volatile sig_atomic_t n;
static void one(int s)
{
    char out[2] = {(char)('0' + (++n > 9 ? 9 : n)), '\n'};
    (void)s;
    (void)!write(1, out, 2);
}
int main(int argc, char **argv)
{
    int fd = open(argv[1], O_RDONLY); /* traced: the file is in /cvmfs */
    if (argc < 2 || fd < 0)
        return 99;
    close(fd);
    struct sigaction a = {0};
    a.sa_handler = one;
    sigaction(SIGUSR1, &a, 0);
    (void)!write(1, "ready\n", 6);
    for (;;)
        pause();
}
"""


@pytest.mark.parametrize("how", ["hep-exec only", "whole group", "each, command first"])
def test_a_signal_reaches_the_command_once(job: Job, tmp_path: Path, how: str) -> None:
    """Sent to hep-exec alone it is passed on; sent to every process of the job (kill -PGID,
    Slurm signalling each task) the command also gets it directly: either way the command's
    handler runs once, as natively. (The second, if it came, would follow within
    milliseconds: a second of silence is the check.)"""
    prog = compile_c(COUNTER, tmp_path / "counter")
    with job.started([str(prog), f"{ROOT}/data/h1"], new_session=True) as p:
        assert p.stdout is not None
        assert p.stdout.readline() == "ready\n", p.stderr.read() if p.stderr else ""
        if how == "whole group":
            os.killpg(p.pid, signal.SIGUSR1)
        elif how == "each, command first":  # as a batch system signalling every task may
            os.kill(_command_pid(p.pid, prog.name), signal.SIGUSR1)
            assert p.stdout.readline() == "1\n"
            p.send_signal(signal.SIGUSR1)
        else:
            p.send_signal(signal.SIGUSR1)
        if how != "each, command first":
            assert p.stdout.readline() == "1\n"
        more, _, _ = select.select([p.stdout], [], [], 1.0)
        assert not more, p.stdout.readline()
        p.send_signal(signal.SIGTERM)
        assert p.wait(30) == 128 + signal.SIGTERM


def _command_pid(hep_exec_pid: int, name: str) -> int:
    """The traced command: hep-exec's child running ``name``."""
    out = subprocess.run(
        ["pgrep", "-P", str(hep_exec_pid), "-x", name], capture_output=True, text=True
    ).stdout.split()
    assert len(out) == 1, out
    return int(out[0])


PROBE = """
import os, sys
root = sys.argv[1]
def access(q):
    if not os.access(q, os.F_OK):
        raise OSError(0, "access says no")
calls = (os.stat, os.lstat, lambda q: os.close(os.open(q, os.O_RDONLY)), access)
for rel in ["data/h1/.", "data/h1/./", "data/h1/", "data/h1/..", "data/h1/./x", "data/.",
            "data/./", "data/..", "data/../data/h1", "nope/.", "data/h1/../h1"]:
    out = []
    for call in calls:
        try:
            call(os.path.join(root, rel))
            out.append("ok")
        except OSError as e:
            out.append(str(e.errno))
    print(rel, *out)
"""


def test_dot_and_dotdot_after_a_file_fail_with_enotdir(job: Job, trap_mode: str) -> None:
    """`[ -e file/. ]` was true and `cat file/.` printed the file; natively: ENOTDIR."""
    native = subprocess.run(
        ["python3", "-c", PROBE, str(job.src)], capture_output=True, text=True, check=True
    ).stdout
    assert "data/h1/. 20 20 20 0" in native.splitlines()  # what the kernel says
    p = job.popen(["python3", "-c", PROBE, ROOT])
    out, err = p.communicate(timeout=60)
    assert p.returncode == 0, err
    assert out == native
    for shell_test in (f"[ -e {ROOT}/data/h1/. ]", f"cat {ROOT}/data/h1/."):
        q = job.popen(["sh", "-c", shell_test])
        q.communicate(timeout=60)
        assert q.returncode != 0, shell_test


def test_stats_name_every_trapped_call(job: Job) -> None:
    """`--stats` printed fchdir as `81`: the names now come with the C list of trapped calls."""
    script = f"cd {ROOT}/data && python3 -c 'import os; os.fchdir(os.open(\"{ROOT}\", 0))'"
    r = subprocess.run(
        hep_exec_cmd(
            job.proxy, ["bash", "-c", script], keys=job.key, options=["--stats-internals"]
        ),
        env=env_with(),
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert r.returncode == 0, r.stderr
    assert re.search(r"^hep-exec:\s+fchdir\s+\d+$", r.stderr, re.M), r.stderr
    assert not re.search(r"^hep-exec:\s+\d+\s+\d+$", r.stderr, re.M), r.stderr  # no numbers


def test_a_name_that_is_no_repository_is_enoent_silently(job: Job) -> None:
    """Python probing /cvmfs/lib printed `cannot mount: lib` into the job's stderr."""
    code = "import os\nfor n in ('lib', 'lib64', 'python3.11'): print(os.path.exists('/cvmfs/'+n))"
    r = subprocess.run(
        hep_exec_cmd(job.proxy, ["python3", "-c", code], keys=job.key),
        env=env_with(),
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert r.returncode == 0, r.stderr
    assert r.stdout.split() == ["False"] * 3
    assert r.stderr == ""


URING = r"""
#include <errno.h>
#include <fcntl.h>
#include <liburing.h>
#include <stdio.h>
#include <string.h>
#include <unistd.h>
/* Open and read argv[1] through io_uring if there is one, else as any program falls back. */
int main(int argc, char **argv)
{
    struct io_uring ring;
    char buf[64] = {0};
    int fd, r = argc > 1 ? io_uring_queue_init(4, &ring, 0) : -EINVAL;
    if (r < 0) {
        printf("no io_uring (%s)\n", strerror(-r));
        fd = open(argv[1], O_RDONLY);
    } else {
        struct io_uring_sqe *sqe = io_uring_get_sqe(&ring);
        io_uring_prep_openat(sqe, AT_FDCWD, argv[1], O_RDONLY, 0);
        io_uring_submit(&ring);
        struct io_uring_cqe *cqe;
        io_uring_wait_cqe(&ring, &cqe);
        fd = cqe->res;
        io_uring_cqe_seen(&ring, cqe);
        printf("io_uring open: %s\n", fd < 0 ? strerror(-fd) : "ok");
    }
    if (fd < 0)
        return 1;
    if (read(fd, buf, sizeof buf - 1) < 0)
        return 2;
    printf("read: %s", buf);
    return 0;
}
"""


def test_io_uring_is_refused_and_programs_fall_back(job: Job, tmp_path: Path) -> None:
    """IORING_OP_OPENAT of a /cvmfs path gave ENOENT (and relative to a /cvmfs directory fd,
    the mirror's empty file): io_uring's path calls are made where no filter sees them, so
    io_uring_setup is refused with ENOSYS, which liburing and programs take as "no io_uring"."""
    if not Path("/usr/include/liburing.h").exists():
        pytest.skip("liburing-dev not installed (Debian package liburing-dev)")
    prog = compile_c(URING, tmp_path / "uring", "-luring")
    native = subprocess.run([str(prog), str(job.src / "data" / "h1")], capture_output=True)
    if b"no io_uring" in native.stdout:
        pytest.skip(f"io_uring unavailable on this host: {native.stdout!r}")
    assert native.stdout == b"io_uring open: ok\nread: hello\n"
    p = job.popen([str(prog), f"{ROOT}/data/h1"])
    out, err = p.communicate(timeout=60)
    assert p.returncode == 0, err
    assert out == "no io_uring (Function not implemented)\nread: hello\n"
    r = subprocess.run(
        hep_exec_cmd(
            job.proxy, [str(prog), str(job.src / "data" / "h1")], keys=job.key,
            options=["--allow-io-uring"],
        ),
        env=env_with(),
        capture_output=True,
        text=True,
        timeout=60,
    )  # fmt: skip
    assert r.returncode == 0, r.stderr
    assert r.stdout == "io_uring open: ok\nread: hello\n"  # allowed: host files as natively


MAGIC = """
import os, sys
root = sys.argv[1]
os.chdir(root + "/data")
d = os.open(root + "/data", os.O_RDONLY | os.O_DIRECTORY)
me = os.getpid()
for p in ("/proc/self/cwd/h1", f"/proc/{me}/cwd/h1", f"/proc/self/fd/{d}/h1",
          f"/dev/fd/{d}/h1", f"/proc/thread-self/cwd/h1", f"/proc/{me}/task/{me}/fd/{d}/h1"):
    with open(p, "rb") as f:
        print(p.replace(str(me), "PID").replace(f"/{d}/", "/D/"), f.read())
def refused(what, call):
    try:
        call()
        print(what, "succeeded")
    except OSError as e:
        print(what, e.errno)
for base in ("/proc/self/cwd", f"/dev/fd/{d}", f"/proc/{me}/fd/{d}"):
    refused("create", lambda: os.open(base + "/new", os.O_CREAT | os.O_WRONLY, 0o644))
    refused("mkdir", lambda: os.mkdir(base + "/newdir"))
    refused("unlink", lambda: os.unlink(base + "/h1"))
    refused("chmod", lambda: os.chmod(base + "/h1", 0o777))
    refused("symlink", lambda: os.symlink("x", base + "/lnk"))
    refused("truncate", lambda: os.truncate(base + "/h1", 0))
print(sorted(os.listdir(root + "/data")))
print(os.stat("/proc/self/cwd").st_size == os.stat(root + "/data").st_size)
"""


def test_paths_through_proc_and_dev_fd_links_see_the_repository(job: Job) -> None:
    """`cd /cvmfs/R/data; cp /proc/$$/cwd/big.bin x` copied 0 bytes from the private mirror,
    and creates, mkdir, unlink... through those prefixes succeeded there."""
    p = job.popen(["python3", "-c", MAGIC, ROOT])
    out, err = p.communicate(timeout=60)
    assert p.returncode == 0, err
    lines = out.splitlines()
    reads = [line for line in lines if line.startswith("/")]
    assert len(reads) == 6 and all(line.endswith(" b'hello\\n'") for line in reads), out
    refusals = [
        line
        for line in lines
        if line.split()[0] in {"create", "mkdir", "unlink", "chmod", "symlink", "truncate"}
    ]
    assert len(refusals) == 18 and all(line.endswith(" 30") for line in refusals), out  # EROFS
    assert lines[-2] == "['h1']"  # nothing was created in the mirror
    assert lines[-1] == "True"


FD_METADATA = """
import ctypes, os, sys
root, uid = sys.argv[1], os.getuid()
libc = ctypes.CDLL(None, use_errno=True)
def refused(what, call):
    try:
        call()
        print(what, "succeeded")
    except OSError as e:
        print(what, e.errno)
def fchmodat2(fd):
    if libc.syscall(452, fd, b"", 0o700, 0x1000) != 0:  # AT_EMPTY_PATH
        e = ctypes.get_errno()
        raise OSError(e, os.strerror(e))
for path in (root + "/data", root + "/data/h1"):
    before = os.stat(path)
    fd = os.open(path, os.O_RDONLY)
    refused("fchmod", lambda: os.fchmod(fd, 0o700))
    refused("fchown", lambda: os.fchown(fd, uid, uid))
    refused("futimens", lambda: os.utime(fd, (1, 1)))
    refused("fsetxattr", lambda: os.setxattr(fd, "user.x", b"1"))
    refused("fremovexattr", lambda: os.removexattr(fd, "user.x"))
    refused("fchmodat2", lambda: fchmodat2(fd))
    after = os.stat(path)
    print("unchanged", (before.st_mode, before.st_uid, before.st_mtime_ns)
          == (after.st_mode, after.st_uid, after.st_mtime_ns))
"""


def test_metadata_changes_through_a_cvmfs_fd_fail_with_erofs(job: Job, ram_files: str) -> None:
    """fchmod, fchown, futimens, fsetxattr, fchmodat2(fd, "", AT_EMPTY_PATH) on a /cvmfs
    directory fd returned 0 and changed what later stats said (with memfd files, on file fds
    too)."""
    p = job.popen(["python3", "-c", FD_METADATA, ROOT])
    out, err = p.communicate(timeout=60)
    assert p.returncode == 0, err
    lines = out.splitlines()
    calls = [line for line in lines if not line.startswith("unchanged")]
    assert len(calls) == 12 and all(line.endswith(" 30") for line in calls), out  # EROFS
    assert lines.count("unchanged True") == 2, out


FIFO = """
import os, stat, sys, threading
p = sys.argv[1] + "/pipes/fifo"
print(stat.S_ISFIFO(os.stat(p).st_mode))
os.close(os.open(p, os.O_RDONLY | os.O_NONBLOCK))
os.close(os.open(p, os.O_PATH))
def writer():
    w = os.open(p, os.O_WRONLY)
    os.write(w, b"through the fifo")
    os.close(w)
t = threading.Thread(target=writer)
t.start()
r = os.open(p, os.O_RDONLY)  # waits for the writer, as natively
print(os.read(r, 100).decode())
os.close(r)
t.join()
for flags in (os.O_WRONLY, os.O_RDWR, os.O_WRONLY | os.O_TRUNC):
    try:
        os.open(sys.argv[1] + "/data/h1", flags)
    except OSError as e:
        print(e.errno)
# a reader that nobody writes to waits (in its own thread), and other calls go on meanwhile
threading.Thread(target=lambda: os.open(p, os.O_RDONLY), daemon=True).start()
print(os.stat(sys.argv[1] + "/data/h1").st_size)
sys.stdout.flush()
os._exit(0)
"""


def test_a_published_fifo_opens_as_natively(job: Job, trap_mode: str) -> None:
    """Opening a published FIFO failed with EINVAL (O_NONBLOCK and O_PATH too) and logged a
    line for every call; natively it opens (a reader waits for a writer)."""
    p = job.popen(["python3", "-c", FIFO, ROOT])
    out, err = p.communicate(timeout=60)
    assert p.returncode == 0, err
    assert out.split("\n") == ["True", "through the fifo", "30", "30", "30", "6", ""], out
    assert err == "", err


def test_ls_l_of_a_large_directory_needs_no_python_per_entry(job: Job) -> None:
    """`ls -l` of a 60,000-entry directory took 21.9 s cold (native 0.12 s): statx and two
    lgetxattr per entry, each an upcall into Python.  Now the directory's entries are answered
    in bulk once it is being looked at entry by entry."""
    r = subprocess.run(
        hep_exec_cmd(
            job.proxy, ["ls", "-l", f"{ROOT}/many"], keys=job.key, options=["--stats-internals"]
        ),
        env=env_with(),
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert r.returncode == 0, r.stderr
    native = subprocess.run(["ls", "-l", str(job.src / "many")], capture_output=True, text=True)
    names = [line.split()[-1] for line in r.stdout.splitlines()[1:]]
    assert names == [line.split()[-1] for line in native.stdout.splitlines()[1:]]
    sizes = {line.split()[4] for line in r.stdout.splitlines()[1:]}
    assert sizes == {"2", "3", "4", "5"}  # "0\n" ... "2999\n": the catalog's sizes
    upcalls = int(re.search(r"Python upcalls (\d+)", r.stderr).group(1))  # type: ignore[union-attr]
    assert upcalls < 100, r.stderr  # was 3 per entry
    # and in notify mode no trap per entry either: statx and both getxattr calls are answered
    # inside ls from the first entry on (they were one trap each, answered from the C cache)
    if "trap mode: seccomp-notify" in r.stderr:
        trapped = int(re.search(r"trapped syscalls: (\d+)", r.stderr).group(1))  # type: ignore[union-attr]
        assert trapped < 300, r.stderr


@pytest.mark.parametrize("disposition", ["default", "handler"])
def test_a_reader_waiting_on_a_published_fifo_is_ended_by_a_signal(
    job: Job, trap_mode: str, disposition: str
) -> None:
    """Natively a signal reaches a process whose FIFO open waits for a writer: it dies of
    SIGTERM, or its handler runs (and Python goes back to waiting).  It must not leave the job
    hanging with the signal undelivered."""
    code = (
        "import os, signal\n"
        + ("signal.signal(signal.SIGTERM, lambda *_: print('handled', flush=True))\n"
           if disposition == "handler" else "")
        + "print('ready', flush=True)\n"
        f"os.open({ROOT!r} + '/pipes/fifo', os.O_RDONLY)\n"
        "print('opened', flush=True)\n"
    )  # fmt: skip
    with job.started(["python3", "-c", code], new_session=True) as p:
        assert p.stdout is not None and p.stdout.readline() == "ready\n"
        child = _command_pid(p.pid, "python3")

        def waiting() -> bool:  # in the FIFO's open: natively, or for hep-exec's answer
            wchan = Path(f"/proc/{child}/wchan").read_text()
            return "wait_for_partner" in wchan or "seccomp_do_user_notif" in wchan

        wait_until(waiting, 10, what="the command waiting in its open")
        os.kill(child, signal.SIGTERM)  # to the command itself, as a batch system may
        if disposition == "default":
            assert p.wait(30) == 128 + signal.SIGTERM
        else:
            assert p.stdout.readline() == "handled\n"
            assert p.poll() is None  # and waits for a writer again, as natively


EXECS = """
for i in $(seq {n}); do /bin/true; done; echo {mark}; read _
"""


def test_memory_stays_flat_over_many_execs(job: Job) -> None:
    """hep-exec grew by ~85 bytes per exec (57.2 -> 59.6 MB over 20,000 execs): its table of
    threads kept the dead ones' slots and doubled whenever they filled it.  After a warm-up,
    16,000 more short processes must not make it grow."""
    script = "".join(EXECS.format(n=n, mark=m) for n, m in ((2000, "a"), (8000, "b"), (16000, "c")))
    p = subprocess.Popen(
        hep_exec_cmd(job.proxy, ["bash", "-c", script], keys=job.key),
        env=env_with(),
        stdin=subprocess.PIPE,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    assert p.stdout is not None and p.stdin is not None
    rss: dict[str, int] = {}
    try:
        for mark in "abc":
            assert p.stdout.readline().strip() == mark
            with open(f"/proc/{p.pid}/status") as f:
                rss[mark] = next(int(ln.split()[1]) for ln in f if ln.startswith("VmRSS:"))
            p.stdin.write("\n")
            p.stdin.flush()
        assert p.wait(timeout=120) == 0
    finally:
        if p.poll() is None:
            p.kill()
        p.communicate()
    assert rss["c"] - rss["b"] < 256, rss  # KiB; was 848 KiB here (the table doubled again)


DIR_STATS = """
import os, sys
out = []
for d in sys.argv[1:]:
    st = os.stat(d)
    fd = os.open(d, os.O_RDONLY | os.O_DIRECTORY)
    f, p = os.fstat(fd), os.stat(f"/proc/self/fd/{fd}")
    os.chdir(d)
    dot = os.stat(".")
    out.append((st.st_size, st.st_nlink, oct(st.st_mode),
                {(x.st_dev, x.st_ino, x.st_size, x.st_nlink) for x in (st, f, p, dot)} == {
                    (st.st_dev, st.st_ino, st.st_size, st.st_nlink)}))
print(out)
"""


def test_a_directorys_stat_is_the_catalogs_and_fstat_agrees(job: Job, trap_mode: str) -> None:
    """stat of a /cvmfs directory said the private mirror's size (tmpfs: 20 bytes an entry:
    120, 480, 2040 ...) where the source says its own; fstat of an fd on it, stat of its
    /proc/self/fd link and of "." after chdir must say the same as stat of the path."""
    dirs = ["data", "many", "pipes"]
    r = subprocess.run(
        hep_exec_cmd(
            job.proxy, ["python3", "-c", DIR_STATS, *[f"{ROOT}/{d}" for d in dirs]], keys=job.key
        ),
        env=env_with(),
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert r.returncode == 0, r.stderr
    native = subprocess.run(
        ["python3", "-c", DIR_STATS, *[str(job.src / d) for d in dirs]],
        capture_output=True,
        text=True,
        check=True,
    )
    assert r.stdout == native.stdout


FEXECVE = """
import os, sys
fd = os.open(sys.argv[1], os.O_RDONLY)
os.execve(fd, ["showexe"], dict(os.environ))  # fexecve: execveat(fd, "", AT_EMPTY_PATH)
"""


def test_proc_self_exe_after_fexecve_names_the_cvmfs_path(job: Job) -> None:
    """A program exec'd through an fd opened from /cvmfs (fexecve) saw /proc/self/exe name the
    RAM file; natively it names the file the fd was opened from."""
    exe = f"{ROOT}/bin/showexe"
    r = subprocess.run(
        hep_exec_cmd(job.proxy, ["python3", "-c", FEXECVE, exe], keys=job.key),
        env=env_with(),
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert (r.returncode, r.stdout) == (0, exe + "\n"), r.stderr
    native = subprocess.run(
        ["python3", "-c", FEXECVE, str(job.src / "bin" / "showexe")],
        capture_output=True,
        text=True,
        check=True,
    )
    assert native.stdout == str(job.src / "bin" / "showexe") + "\n"


FD_LINKS = """
import os, sys
root, host = sys.argv[1], sys.argv[2]
fds = [os.open(p, os.O_RDONLY) for p in (root + "/data/h1", root + "/data", host)]
for fd in fds:
    print(os.readlink(f"/proc/self/fd/{fd}"), os.readlink(f"/proc/{os.getpid()}/fd/{fd}"))
print(os.path.realpath(f"/proc/self/fd/{fds[0]}"))
print(os.readlink(f"/proc/self/task/{os.getpid()}/fd/{fds[0]}"))
"""


def test_proc_self_fd_links_name_the_cvmfs_paths(job: Job, ram_files: str) -> None:
    """readlink of /proc/self/fd/N of a file opened from /cvmfs named its RAM file (a content
    hash, or a memfd); natively, and under the FUSE client, the path it was opened by (lsof,
    ``ls -l /proc/self/fd``, realpath of /dev/stdin, a program finding its own input)."""
    host = job.src / "data" / "h1"
    r = subprocess.run(
        hep_exec_cmd(job.proxy, ["python3", "-c", FD_LINKS, ROOT, str(host)], keys=job.key),
        env=env_with(), capture_output=True, text=True, timeout=60,
    )  # fmt: skip
    assert r.returncode == 0, r.stderr
    want = [f"{p} {p}" for p in (f"{ROOT}/data/h1", f"{ROOT}/data", str(host))]
    assert r.stdout.splitlines() == [*want, f"{ROOT}/data/h1", f"{ROOT}/data/h1"]


HOST_PATHS = """
import os, sys
root, host = sys.argv[1], sys.argv[2]
for _ in range(3):  # the second call of each is answered from the C cache: its site is patched
    os.stat(root + "/data/h1")
    os.close(os.open(root + "/data/h1", os.O_RDONLY))
out = []
for p in (host + "/plain", host + "/into", host + "/into-dir/h1", host + "/missing"):
    try:
        st = os.stat(p)
        with open(p, "rb") as f:
            out.append(f"{os.path.basename(p)} {st.st_size} {f.read()!r}")
    except OSError as e:
        out.append(f"{os.path.basename(p)} {e.strerror}")
for p in (host + "/into", host + "/into-dir/new"):
    try:
        os.close(os.open(p, os.O_WRONLY | os.O_CREAT, 0o644))
        out.append("created " + os.path.basename(p))
    except OSError as e:
        out.append(f"write {os.path.basename(p)} {e.strerror}")
print(out)
"""


def test_host_paths_from_patched_call_sites_keep_the_tracers_meaning(
    job: Job, tmp_path: Path, trap_mode: str
) -> None:
    """Calls on host paths from a patched call site are made inside the program (no trap);
    a host symlink into /cvmfs (which the kernel cannot follow) must still read the
    repository, a missing host path still be ENOENT, and a write through such a link EROFS."""
    host = tmp_path / "host"
    host.mkdir()
    (host / "plain").write_bytes(b"on the host\n")
    (host / "into").symlink_to(f"{ROOT}/data/h1")
    (host / "into-dir").symlink_to(f"{ROOT}/data")
    r = subprocess.run(
        hep_exec_cmd(
            job.proxy,
            ["python3", "-c", HOST_PATHS, ROOT, str(host)],
            keys=job.key,
            options=["--stats-internals"],
        ),
        env=env_with(),
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert r.returncode == 0, r.stderr
    assert r.stdout.strip() == str(
        [
            "plain 12 b'on the host\\n'",
            "into 6 b'hello\\n'",
            "h1 6 b'hello\\n'",
            "missing No such file or directory",
            "write into Read-only file system",
            "write new Read-only file system",
        ]
    )
    if "trap mode: seccomp-notify" in r.stderr:
        m = re.search(r"host paths: (\d+)", r.stderr)
        assert m and int(m.group(1)) > 0, r.stderr
