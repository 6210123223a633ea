"""Process semantics under the tracer: exit status, signals, EROFS, EXITKILL, no ptrace.

The tests taking ``driver`` run with both drivers (tests/worker/conftest.py): the
host-directory policy in both trap modes and the real hep-exec over the same tree published
and served by nginx on loopback; the others drive the tracer with the host-directory policy
(``repo``, in both trap modes) or call it in-process.
"""

from __future__ import annotations

import os
import re
import signal
import subprocess
import sys
import time
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from pathlib import Path

import pytest

from tests.support.drivers import Driver
from tests.support.processes import (
    DENY_PTRACE,
    comm,
    descendants,
    gone,
    mirror_of,
    remove_mirror,
    started,
    waiting_in,
)
from tests.support.tracing import (
    MOUNT,
    compile_c,
    ensure_built,
    env_with,
    hep_cmd,
    in_child,
    needs_ptrace,
    traced,
)
from tests.support.waiting import wait_until
from worker.trace.hostpolicy import HostDirPolicy
from worker.trace.policy import Node, Opened
from worker.trace.tracer import forget, run

pytestmark = needs_ptrace


@pytest.fixture
def repo(programs_tree: Path, trap_mode: str) -> Path:
    """The programs tree (its ``dir/file``, ``link``, ``up`` and ``variant`` corner) for the
    host-directory policy, in both trap modes."""
    return programs_tree


# ------------------------------------------------------------------------ both drivers


def test_exit_status_is_the_commands(driver: Driver) -> None:
    assert driver.run(["sh", "-c", "exit 3"]).returncode == 3
    assert driver.run(["true"]).returncode == 0
    r = driver.run(["cat", f"{driver.root}/dir/file"])
    assert (r.returncode, r.stdout) == (0, "content\n"), r.stderr


def test_killed_by_signal_gives_128_plus_n(driver: Driver) -> None:
    assert driver.run(["sh", "-c", "kill -TERM $$"]).returncode == 128 + signal.SIGTERM
    assert driver.run(["sh", "-c", "kill -KILL $$"]).returncode == 128 + signal.SIGKILL


WRITES = [
    "touch {root}/dir/new",
    "echo x > {root}/dir/file",
    "mkdir {root}/dir/d",
    "rm {root}/dir/file",
    "mv {root}/dir/file {root}/dir/f2",
    "chmod 777 {root}/dir/file",
    "ln -s x {root}/dir/s",
    "cd {root}/dir && touch rel",
    "truncate -s 0 {root}/dir/file",
]


def test_writes_fail_with_erofs(driver: Driver) -> None:
    """Each write (in a subshell of its own) fails with EROFS; afterwards /cvmfs and the
    source directory are as they were."""
    root = driver.root
    script = "".join(
        f'( {cmd.format(root=root)} ) 2>&1; echo "== {i} rc=$?"\n' for i, cmd in enumerate(WRITES)
    )
    r = driver.run(["bash", "-c", f"{script}cat {root}/dir/file; ls {root}/dir"])
    assert r.returncode == 0, r.stderr
    out = r.stdout
    for i, cmd in enumerate(WRITES):
        said, marker, out = out.partition(f"== {i} rc=")
        assert marker, (cmd, r.stdout)
        rc, _, out = out.partition("\n")
        assert rc != "0" and "Read-only file system" in said, (cmd, rc, said)
    assert out == "content\nfile\nother\n", r.stdout
    assert (driver.source / "dir/file").read_text() == "content\n"
    assert sorted(p.name for p in (driver.source / "dir").iterdir()) == ["file", "other"]


@contextmanager
def killed_tracer(driver: Driver) -> Iterator[tuple[dict[int, int | None], Path | None]]:
    """Runs a script that changes into /cvmfs and leaves three sleeps (two in the background,
    one in a subshell); SIGKILLs the tracer once they all sleep.  Yields the tracees and the
    tracer's mirror directory they stood in; afterwards kills any tracee still alive and
    removes the mirror (a killed tracer leaves it behind)."""
    script = f"cd {driver.root}/dir && cat file; sleep 300 & sleep 300 & (sleep 300); wait"
    proc = subprocess.Popen(
        driver.cmd(["bash", "-c", script]), env=env_with(), stdout=subprocess.PIPE
    )
    kids: set[int] = set()
    starts: dict[int, int | None] = {}
    mirror = None
    try:
        assert proc.stdout is not None and proc.stdout.readline() == b"content\n"

        def three_sleeping() -> set[int]:
            found = descendants(proc.pid)
            sleeping = [
                k for k in found if comm(k) == "sleep" and waiting_in(k) == "hrtimer_nanosleep"
            ]
            return found if len(sleeping) == 3 else set()

        kids = wait_until(three_sleeping, 30, what="three sleeps under the tracer")
        starts.update({k: started(k) for k in kids})
        mirror = mirror_of(kids)
        proc.kill()
        proc.wait()
        yield {k: starts[k] for k in kids}, mirror
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
        for k in kids:
            if not gone(k, starts.get(k)):  # never a process that got the pid since
                os.kill(k, signal.SIGKILL)
        remove_mirror(mirror)


def test_sigkill_of_the_tracer_leaves_no_tracee(driver: Driver) -> None:
    with killed_tracer(driver) as (kids, _):
        assert len(kids) >= 4  # bash, its subshell, three sleeps
        wait_until(lambda: all(gone(k, t) for k, t in kids.items()), 10, what="every tracee to die")


@pytest.mark.slow
@pytest.mark.parametrize("driver", ["hostpolicy-notify", "hep-exec"], indirect=True)
def test_sigkill_leaves_no_mirror_behind(driver: Driver) -> None:
    """The shadow tree lives on a private tmpfs that exists only through the tracer's fds: it
    goes with the tracer, however it ends (batch systems end jobs with SIGKILL)."""
    with killed_tracer(driver) as (kids, mirror):
        assert mirror is not None, "the tracees stood in no hep-exec-* directory"
        if mirror.exists():
            pytest.xfail(f"no private tmpfs here: the shadow tree is {mirror}, left behind")
        wait_until(lambda: all(gone(k, t) for k, t in kids.items()), 10, what="every tracee to die")
        assert not [d for d in os.listdir("/dev/shm") if d == mirror.name]


def test_no_ptrace_says_so_in_one_line_and_exits_2(driver: Driver, tmp_path: Path) -> None:
    deny = compile_c(DENY_PTRACE, tmp_path / "deny")
    r = subprocess.run(
        [str(deny), *driver.cmd(["true"])], env=env_with(), capture_output=True, text=True
    )
    assert r.returncode == 2
    lines = r.stderr.strip().splitlines()
    assert len(lines) == 1 and "ptrace" in lines[0], r.stderr


@pytest.mark.usefixtures("trap_mode")
def test_check_says_ptrace_is_denied_in_one_line(tmp_path: Path) -> None:
    ensure_built()
    deny = compile_c(DENY_PTRACE, tmp_path / "deny")
    r = subprocess.run(
        [str(deny), sys.executable, "-c", "from worker.trace.tracer import check; print(check())"],
        env=env_with(),
        capture_output=True,
        text=True,
    )
    assert "ptrace" in r.stdout and r.stdout.count("\n") == 1, r.stdout + r.stderr


# ------------------------------------------------------------- the host-directory policy


def test_processes_left_behind_are_killed_with_the_command(repo: Path) -> None:
    t0 = time.monotonic()
    r = traced(repo, ["bash", "-c", "sleep 30 & echo $!"])
    assert r.returncode == 0
    assert time.monotonic() - t0 < 20  # the tracer did not wait for the sleep
    pid = int(r.stdout)
    wait_until(lambda: gone(pid), 10, what=f"the left-behind sleep {pid} to be killed")


def test_command_not_found_is_127(repo: Path) -> None:
    r = traced(repo, ["/nonexistent/cmd"])
    assert r.returncode == 127
    assert "/nonexistent/cmd" in r.stderr


def _script(path: Path, body: str, mode: int = 0o755) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(body)
    path.chmod(mode)


def test_the_command_is_found_where_execvp_finds_it(trap_mode: str, tmp_path: Path) -> None:
    # The tracer looks along PATH with access() (a notification answered in C), not with
    # failed execve calls (each a ptrace stop); what it runs must be what execvp runs.
    tree, a, b, c = (tmp_path / d for d in ("tree", "a", "b", "c"))
    _script(tree / "bin" / "tool", "#!/bin/sh\necho cvmfs\n")
    _script(a / "tool", "#!/bin/sh\necho a\n", 0o644)  # there, but not executable
    _script(b / "tool", "#!/bin/sh\necho b\n")
    _script(c / "plain", "echo c\n")  # no #!: execvp runs it with /bin/sh
    for path, cmd, cwd, says in (
        (f"{MOUNT}/bin:{b}", "tool", None, "cvmfs"),  # /cvmfs first
        (f"/nonexistent:{a}:{b}", "tool", None, "b"),  # a's has no x bit: on to b's
        (f"/nonexistent:{c}", "plain", None, "c"),
        (f"/nonexistent::{b}", "plain", c, "c"),  # an empty entry: the working directory
    ):
        r = traced(tree, [cmd], env={"PATH": path}, cwd=cwd)
        assert (r.returncode, r.stdout.strip()) == (0, says), (path, r.stderr)
    r = traced(tree, ["tool"], env={"PATH": f"/n1:/n2/x:{a}/tool/x:{b}"}, stats=True)
    assert r.stdout.strip() == "b", r.stderr
    execs = re.search(r"^\s*execve\s+(\d+)$", r.stderr, re.MULTILINE)
    assert execs and execs[1] == "1", r.stderr  # one stop: the exec that ran
    r = traced(tree, ["nosuchtool"], env={"PATH": f"/n1:{b}"})
    assert r.returncode == 127, r.stderr


STOP_AND_SIGNALS = """
import os, signal, subprocess
p = subprocess.Popen(["sleep", "5"])
os.kill(p.pid, signal.SIGSTOP)
_, st = os.waitpid(p.pid, os.WUNTRACED)  # returns once the group stop is reported
print("stopped", os.WIFSTOPPED(st) and os.WSTOPSIG(st))
print("state", open(f"/proc/{p.pid}/stat").read().rsplit(")", 1)[1].split()[0])
os.kill(p.pid, signal.SIGCONT)
os.kill(p.pid, signal.SIGTERM)
_, st = os.waitpid(p.pid, 0)
print("terminated", os.WIFSIGNALED(st) and os.WTERMSIG(st))
got = []
signal.signal(signal.SIGUSR1, lambda *a: got.append("usr1"))
os.kill(os.getpid(), signal.SIGUSR1)
print("handled", *got)
"""


def test_signals_and_group_stop_are_delivered(repo: Path) -> None:
    """SIGSTOP stops a traced child for good (its parent's waitpid sees the group stop), then
    SIGCONT and SIGTERM end it, and a handler gets the signal sent to itself."""
    r = traced(repo, [sys.executable, "-c", STOP_AND_SIGNALS], timeout=30)
    assert r.returncode == 0, r.stderr
    stopped, state_, terminated, handled = r.stdout.splitlines()
    assert stopped == f"stopped {signal.SIGSTOP}"
    assert state_ in ("state T", "state t")  # "t": stopped while traced
    assert terminated == f"terminated {signal.SIGTERM}"
    assert handled == "handled usr1"


def test_ctrl_c_goes_to_the_command_not_the_tracer(repo: Path) -> None:
    proc = subprocess.Popen(
        hep_cmd(
            repo, ["bash", "-c", "trap 'echo caught; exit 0' INT; sleep 20 & echo ready; wait"]
        ),
        env=env_with(),
        stdout=subprocess.PIPE,
        text=True,
        start_new_session=True,
        # as a terminal's shell starts a foreground job: ^C at its default, even when this
        # test runs in a background job (which inherits SIGINT ignored)
        preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_DFL),
    )
    try:
        assert proc.stdout is not None
        assert proc.stdout.readline() == "ready\n"

        # the ^C must come while the script waits for its background sleep
        def in_wait() -> bool:
            kids = descendants(proc.pid)
            shells = [k for k in kids if comm(k) == "bash"]
            return any(comm(k) == "sleep" for k in kids) and any(
                waiting_in(b) == "do_wait" for b in shells
            )

        wait_until(in_wait, 10, what="the script in wait with its sleep running")
        os.killpg(proc.pid, signal.SIGINT)  # what a terminal does
        out, _ = proc.communicate(timeout=20)
        assert proc.returncode == 0
        assert out == "caught\n"
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()


def test_opath_symlink_and_trailing_slash(repo: Path, tmp_path: Path) -> None:
    prog = compile_c(OPATH, tmp_path / "opath")
    r = traced(repo, [str(prog), f"{MOUNT}/link"])
    assert r.returncode == 0, r.stderr
    assert r.stdout == "islnk=1 target=dir/file\nfile/: 20\ndir/: 0\n"


OPATH = r"""
#define _GNU_SOURCE
#include <errno.h>
#include <fcntl.h>
#include <stdio.h>
#include <sys/stat.h>
#include <unistd.h>
int main(int c, char **v) {
    int fd = open(v[1], O_PATH | O_NOFOLLOW);
    struct stat st;
    char b[256];
    if (fd < 0) { perror("open"); return 1; }
    fstatat(fd, "", &st, AT_EMPTY_PATH);
    ssize_t n = readlinkat(fd, "", b, sizeof b);
    printf("islnk=%d target=%.*s\n", S_ISLNK(st.st_mode), (int)n, b);
    printf("file/: %d\n", open("/cvmfs/test.repo/dir/file/", O_RDONLY) < 0 ? errno : 0);
    printf("dir/: %d\n", open("/cvmfs/test.repo/dir/", O_RDONLY) < 0 ? errno : 0);
    return 0;
}
"""


def test_coreutils_basics(repo: Path) -> None:
    script = (
        f"cat {MOUNT}/link; readlink {MOUNT}/link; test -r {MOUNT}/dir/file && echo readable; "
        f"test -e {MOUNT}/missing || echo missing; test -d {MOUNT}/dir && echo isdir; "
        f"ls /cvmfs; ls {MOUNT}/up/hostname >/dev/null && echo out-of-mount; "
        f"cat {MOUNT}/variant; HEP_VARIANT=other cat {MOUNT}/variant; "
        f"cd {MOUNT}/dir && cat ../dir/./file && pwd && /bin/pwd"
    )
    r = traced(repo, ["bash", "-c", script])
    assert r.returncode == 0, r.stderr
    assert r.stdout.split("\n") == [
        "content", "dir/file", "readable", "missing", "isdir", "test.repo", "out-of-mount",
        "content", "other", "content", f"{MOUNT}/dir", f"{MOUNT}/dir", "",
    ]  # fmt: skip


@pytest.mark.usefixtures("trap_mode")
def test_check_reports_a_working_tracer() -> None:
    from worker.trace.tracer import check

    ensure_built()
    assert in_child(check) is None


def test_stats_count_trapped_syscalls(repo: Path) -> None:
    r = traced(repo, ["cat", f"{MOUNT}/dir/file"], stats=True)
    assert r.returncode == 0
    assert "trapped syscalls:" in r.stderr and "openat" in r.stderr
    assert os.path.basename(MOUNT) not in r.stderr


def test_stats_say_how_calls_were_answered(repo: Path, trap_mode: str) -> None:
    from worker.trace.tracer import check_mode

    r = traced(repo, ["sh", "-c", f"cat {MOUNT}/dir/file; test -e {MOUNT}/dir"], stats=True)
    assert r.returncode == 0, r.stderr
    _, mode = in_child(check_mode)
    if trap_mode == "ptrace":
        assert "trap mode: ptrace (0 answered by notification" in r.stderr
    else:
        if not mode.startswith("seccomp-notify"):
            pytest.skip(f"no seccomp user notification on this kernel (trap mode: {mode})")
        # opens and stats by notification; only the execs (sh's PATH search) by ptrace stop
        lines = r.stderr.splitlines()
        line = next(x for x in lines if x.startswith("trap mode"))
        execs = next(int(x.split()[1]) for x in lines if x.split()[:1] == ["execve"])
        notified = int(line.split("(")[1].split()[0])
        assert line.startswith("trap mode: seccomp-notify") and notified > 10, line
        assert line.endswith(f", {execs} by ptrace stop)"), line


EINTR_PROBE = r"""
#define _GNU_SOURCE
#include <errno.h>
#include <fcntl.h>
#include <signal.h>
#include <stdio.h>
#include <string.h>
#include <sys/stat.h>
#include <sys/time.h>
#include <unistd.h>
static volatile long ticks;
static void on_alarm(int s) { (void)s; ticks++; }
int main(int argc, char **argv) {
    struct sigaction sa;
    memset(&sa, 0, sizeof sa);
    sa.sa_handler = on_alarm; /* no SA_RESTART: an interrupted call would fail with EINTR */
    sigaction(SIGALRM, &sa, NULL);
    struct itimerval it = {{0, 100}, {0, 100}};
    setitimer(ITIMER_REAL, &it, NULL);
    long eintr = 0, other = 0;
    struct stat st;
    for (int i = 0; i < 20000; i++) {
        const char *p = argv[1 + i % (argc - 1)];
        int fd = open(p, O_RDONLY);
        if (fd < 0) { if (errno == EINTR) eintr++; else other++; } else close(fd);
        if (stat(p, &st) < 0) { if (errno == EINTR) eintr++; else other++; }
        if (access(p, R_OK) < 0) { if (errno == EINTR) eintr++; else other++; }
    }
    printf("eintr=%ld other=%ld ticked=%d\n", eintr, other, ticks > 0);
    return 0;
}
"""

FIFO_OPEN = r"""
#include <errno.h>
#include <fcntl.h>
#include <signal.h>
#include <stdio.h>
#include <string.h>
#include <unistd.h>
static void on_alarm(int s) { (void)s; }
int main(int argc, char **argv) {
    struct sigaction sa;
    memset(&sa, 0, sizeof sa);
    sa.sa_handler = on_alarm;
    sigaction(SIGALRM, &sa, NULL);
    alarm(1);
    int fd = open(argv[1], O_RDONLY); /* no writer: blocks until the alarm */
    printf("%s\n", fd < 0 && errno == EINTR ? "EINTR" : "opened");
    return 0;
}
"""


@pytest.mark.slow
def test_signals_never_make_answered_calls_fail_with_eintr(repo: Path, tmp_path: Path) -> None:
    """A handler without SA_RESTART firing every 100 us: open/stat/access of /cvmfs and host
    files never fail (a notification interrupted before it was read is restarted)."""
    prog = compile_c(EINTR_PROBE, tmp_path / "eintr")
    r = traced(repo, [str(prog), f"{MOUNT}/dir/file", f"{MOUNT}/link", "/etc/hostname"])
    assert r.returncode == 0, r.stderr
    assert r.stdout.strip() == "eintr=0 other=0 ticked=1"


@pytest.mark.slow
def test_blocking_fifo_open_is_still_interrupted(repo: Path, tmp_path: Path) -> None:
    """Native semantics where the kernel really blocked: open of a FIFO with no writer is
    ended by a signal with EINTR, not restarted forever."""
    prog = compile_c(FIFO_OPEN, tmp_path / "fifo_open")
    fifo = tmp_path / "fifo"
    os.mkfifo(fifo)
    for target in (str(fifo), fifo.name):
        r = traced(repo, [str(prog), target], cwd=tmp_path, timeout=20)
        assert r.returncode == 0, r.stderr
        assert r.stdout.strip() == "EINTR"


FD_FLAGS = r"""
#define _GNU_SOURCE
#include <fcntl.h>
#include <stdio.h>
#include <unistd.h>
int main(int argc, char **argv) {
    int a = open(argv[1], O_RDONLY), b = open(argv[1], O_RDONLY | O_CLOEXEC);
    int h = open(argv[2], O_RDONLY); /* a host file reached through a symlink out of /cvmfs */
    char x[4] = {0}, y[4] = {0};
    if (a < 0 || b < 0 || h < 0) { perror("open"); return 1; }
    if (read(a, x, 3) != 3 || read(b, y, 3) != 3) { perror("read"); return 1; }
    printf("own offsets=%d\n", x[0] == y[0] && lseek(a, 0, SEEK_CUR) == 3);
    printf("cloexec a=%d b=%d\n", fcntl(a, F_GETFD) & FD_CLOEXEC, fcntl(b, F_GETFD) & FD_CLOEXEC);
    printf("host nonblock=%d\n", (fcntl(h, F_GETFL) & O_NONBLOCK) != 0);
    printf("lowest=%d\n", a == 3 && b == 4 && h == 5);
    return 0;
}
"""


def test_open_gives_a_fresh_description_with_the_callers_flags(repo: Path, tmp_path: Path):
    """Each open is its own open file description (own offset), O_CLOEXEC as asked and no
    other flag added, on the lowest free fd; in notify mode the fd is installed by ADDFD."""
    prog = compile_c(FD_FLAGS, tmp_path / "fdflags")
    r = traced(repo, [str(prog), f"{MOUNT}/dir/file", f"{MOUNT}/up/hostname"])
    assert r.returncode == 0, r.stderr
    assert r.stdout.splitlines() == [
        "own offsets=1", "cloexec a=0 b=1", "host nonblock=0", "lowest=1",
    ]  # fmt: skip


class _Evicting(HostDirPolicy):
    """Serves /cvmfs/test.repo/a from a new file each time the policy is asked, and
    withdraws its answer for ``a`` whenever ``b`` is opened (as a cache eviction would)."""

    def __init__(self, root: Path, versions: Path) -> None:
        super().__init__({"test.repo": root})
        self.versions = versions
        self.asked = 0

    def open(self, pid: int, path: bytes, node: Node) -> Opened | int:
        if path.endswith(b"/a"):
            self.asked += 1
            return Opened(os.fsencode(self.versions / f"v{self.asked}"), stable=True)
        forget(b"/cvmfs/test.repo/a")
        return super().open(pid, path, node)


@pytest.mark.usefixtures("trap_mode")
def test_forget_withdraws_a_stable_open_answer(tmp_path: Path, capfd: pytest.CaptureFixture[str]):
    ensure_built()
    root, versions = tmp_path / "root", tmp_path / "versions"
    root.mkdir()
    versions.mkdir()
    for name in ("a", "b"):
        (root / name).write_text(name)
    for i in (1, 2, 3):
        (versions / f"v{i}").write_text(str(i))
    t = "/cvmfs/test.repo"
    script = f"cat {t}/a {t}/a {t}/b {t}/a {t}/a"

    def traced_in_process() -> tuple[int, int]:
        policy = _Evicting(root, versions)
        return run(["/bin/sh", "-c", script], policy).status, policy.asked

    status, asked = in_child(traced_in_process)
    assert status == 0
    assert capfd.readouterr().out == "11b22"
    assert asked == 2


class _NamedAhead(HostDirPolicy):
    """Offers /cvmfs/test.repo/d/x ahead of any open by a name in a directory of ours, as
    the node cache service's objects are offered; with ``evict``, that name goes when
    /cvmfs/test.repo/d/a is opened (the service evicting an object nobody pinned)."""

    def __init__(self, root: Path, store: Path, evict: bool) -> None:
        super().__init__({"test.repo": root})
        self.store = store
        self.evict = evict
        self.dir_fd = os.open(store, os.O_RDONLY | os.O_DIRECTORY)
        self.asked: list[str] = []

    def opens_ahead(self, pid: int, paths: Sequence[bytes]) -> dict[bytes, Opened]:
        named = f"/proc/{os.getpid()}/fd/{self.dir_fd}/x.1".encode()
        return {p: Opened(named) for p in paths if p.endswith(b"/x")}

    def magic_xattrs(self, pid: int, path: bytes) -> bytes:
        return b""

    def open(self, pid: int, path: bytes, node: Node) -> Opened | int:
        self.asked.append(os.fsdecode(path.rsplit(b"/", 1)[1]))
        if path.endswith(b"/a") and self.evict:
            (self.store / "x.1").unlink()
        return super().open(pid, path, node)


@pytest.mark.usefixtures("trap_mode")
@pytest.mark.parametrize("evict", [False, True], ids=["held", "evicted"])
def test_an_open_answered_ahead_is_asked_again_when_its_name_is_gone(
    tmp_path: Path, capfd: pytest.CaptureFixture[str], evict: bool
) -> None:
    """An open offered ahead (the node cache holds the object) needs no question; if the
    object is evicted before the open, the open is asked of the policy, never ENOENT."""
    ensure_built()
    root, store = tmp_path / "root", tmp_path / "store"
    (root / "d").mkdir(parents=True)
    store.mkdir()
    (root / "d" / "a").write_text("a")
    (root / "d" / "x").write_text("x")
    (store / "x.1").write_text("x")  # the same bytes, held elsewhere
    t = "/cvmfs/test.repo/d"

    def traced_ahead() -> tuple[int, list[str]]:
        policy = _NamedAhead(root, store, evict)
        return run(["/bin/sh", "-c", f"cat {t}/a {t}/x {t}/x; cat {t}/x"], policy).status, (
            policy.asked
        )

    status, asked = in_child(traced_ahead)
    assert status == 0
    assert capfd.readouterr().out == "axxx"
    assert asked == (["a", "x"] if evict else ["a"])


LISTED_PROBE = """
import os, sys
root = sys.argv[1]
os.listdir(root + "/d")  # the directory is listed: its entries are answered ahead
names = ["a", "missing", "missing/x", "a/x", ".", "..", "sub", "sub/", "sub/.", "sub/missing",
         "/a", "./a", "a/", ".hidden", "link", "link/x", "link/missing", "sub/b"]
for n in names:
    p = root + "/d/" + n
    out = []
    for f in (os.stat, os.lstat):
        try:
            st = f(p)
            out.append(oct(st.st_mode))
        except OSError as e:
            out.append(e.strerror)
    try:
        os.close(os.open(p, os.O_RDONLY))
        out.append("opened")
    except OSError as e:
        out.append(e.strerror)
    out.append(str(os.access(p, os.R_OK)))
    print(n, *out)
"""


@pytest.mark.usefixtures("trap_mode")
def test_names_a_listed_directory_does_not_have_are_enoent_like_natively(
    tmp_path: Path, capfd: pytest.CaptureFixture[str]
) -> None:
    """ENOENT for a name absent from a listed directory is answered without asking Python
    (worker/trace/trap/upcall.c, C_LISTED): every spelling must still get what the kernel says
    of the same tree (ENOTDIR under a file, the directory itself for ``.``, symlinks
    followed)."""
    ensure_built()
    root = tmp_path / "root"
    (root / "d" / "sub").mkdir(parents=True)
    (root / "d" / "a").write_text("a")
    (root / "d" / "sub" / "b").write_text("b")
    (root / "d" / "link").symlink_to("sub")
    argv = [sys.executable, "-S", "-c", LISTED_PROBE]
    native = subprocess.run([*argv, str(root)], capture_output=True, text=True, check=True)

    def probe() -> int:
        policy = HostDirPolicy({"test.repo": root})
        return run([*argv, "/cvmfs/test.repo"], policy).status

    assert in_child(probe) == 0
    assert capfd.readouterr().out == native.stdout


CWD_FLIP = r"""
#include <fcntl.h>
#include <stdio.h>
#include <string.h>
#include <unistd.h>
static int check(const char *want) {
    char b[64] = "";
    int fd = open("file", O_RDONLY);
    ssize_t n = fd < 0 ? -1 : read(fd, b, sizeof b - 1);
    if (fd >= 0) close(fd);
    return n < 0 || strncmp(b, want, strlen(want)) != 0;
}
int main(int argc, char **argv) {
    int bad = 0, host = open(argv[1], O_RDONLY | O_DIRECTORY);
    int cv = open("/cvmfs/test.repo/dir", O_RDONLY | O_DIRECTORY);
    for (int i = 0; i < 50; i++) {
        chdir("/cvmfs/test.repo/dir"); bad += check("content");
        fchdir(host); bad += check("host");
        fchdir(cv); bad += check("content");
        chdir(argv[1]); bad += check("host");
    }
    printf("bad=%d\n", bad);
    return 0;
}
"""


def test_relative_paths_follow_chdir_and_fchdir(repo: Path, tmp_path: Path) -> None:
    prog = compile_c(CWD_FLIP, tmp_path / "flip")
    host = tmp_path / "host"
    host.mkdir()
    (host / "file").write_text("host\n")
    r = traced(repo, [str(prog), str(host)])
    assert (r.returncode, r.stdout) == (0, "bad=0\n"), r.stderr
