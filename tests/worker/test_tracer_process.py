"""Process semantics under the tracer: exit status, signals, EROFS, EXITKILL, no ptrace."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from tests.support.tracing import (
    MOUNT,
    compile_c,
    ensure_built,
    env_with,
    hep_cmd,
    needs_ptrace,
    traced,
)
from worker.hostpolicy import HostDirPolicy
from worker.policy import Node, Opened
from worker.tracer import forget, run

pytestmark = [needs_ptrace, pytest.mark.usefixtures("trap_mode")]


@pytest.fixture(scope="module")
def repo(tmp_path_factory: pytest.TempPathFactory) -> Path:
    ensure_built()
    root = tmp_path_factory.mktemp("repo")
    (root / "dir").mkdir()
    (root / "dir/file").write_text("content\n")
    (root / "link").symlink_to("dir/file")
    (root / "up").symlink_to("../../../../../../../../etc")
    (root / "variant").symlink_to("dir/$(HEP_VARIANT:-file)")
    (root / "dir/other").write_text("other\n")
    return root


def test_exit_status_is_the_commands(repo: Path) -> None:
    assert traced(repo, ["sh", "-c", "exit 3"]).returncode == 3
    assert traced(repo, ["true"]).returncode == 0


def test_killed_by_signal_gives_128_plus_n(repo: Path) -> None:
    r = traced(repo, ["sh", "-c", "kill -TERM $$"])
    assert r.returncode == 128 + signal.SIGTERM
    r = traced(repo, ["sh", "-c", "kill -KILL $$"])
    assert r.returncode == 128 + signal.SIGKILL


def test_processes_left_behind_are_killed_with_the_command(repo: Path) -> None:
    t0 = time.monotonic()
    r = traced(repo, ["bash", "-c", "sleep 30 & echo $!"])
    assert r.returncode == 0
    assert time.monotonic() - t0 < 20
    pid = int(r.stdout)
    for _ in range(100):
        if _state(pid) == "Z" or not Path(f"/proc/{pid}").exists():
            break
        time.sleep(0.05)
    assert _state(pid) == "Z" or not Path(f"/proc/{pid}").exists()


def test_command_not_found_is_127(repo: Path) -> None:
    r = traced(repo, ["/nonexistent/cmd"])
    assert r.returncode == 127
    assert "/nonexistent/cmd" in r.stderr


def test_signals_and_group_stop_are_delivered(repo: Path) -> None:
    script = (
        "trap 'echo got-usr1' USR1; sleep 5 & p=$!; kill -STOP $p; sleep 0.2; "
        "ps -o stat= -p $p | cut -c1; kill -CONT $p; kill -TERM $p; wait $p; echo rc=$?; "
        "kill -USR1 $$; echo end"
    )
    r = traced(repo, ["bash", "-c", script])
    assert r.returncode == 0, r.stderr
    state, *rest = r.stdout.split()
    assert state in ("T", "t")  # stopped ("t": stopped while traced)
    assert rest == ["rc=143", "got-usr1", "end"]


def test_ctrl_c_goes_to_the_command_not_the_tracer(repo: Path) -> None:
    proc = subprocess.Popen(
        hep_cmd(
            repo, ["bash", "-c", "trap 'echo caught; exit 0' INT; echo ready; sleep 20 & wait"]
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
        # the script must be in `wait` (its background sleep started) before the ^C
        deadline = time.monotonic() + 10
        while (
            not subprocess.run(
                ["pgrep", "-g", str(proc.pid), "-x", "sleep"], capture_output=True
            ).stdout
            and time.monotonic() < deadline
        ):
            time.sleep(0.05)
        time.sleep(0.2)
        os.killpg(proc.pid, signal.SIGINT)  # what a terminal does
        out, _ = proc.communicate(timeout=20)
        assert proc.returncode == 0
        assert out == "caught\n"
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)


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


@pytest.mark.parametrize(
    "cmd",
    [
        f"touch {MOUNT}/dir/new",
        f"echo x > {MOUNT}/dir/file",
        f"mkdir {MOUNT}/dir/d",
        f"rm {MOUNT}/dir/file",
        f"mv {MOUNT}/dir/file {MOUNT}/dir/f2",
        f"chmod 777 {MOUNT}/dir/file",
        f"ln -s x {MOUNT}/dir/s",
        f"cd {MOUNT}/dir && touch rel",
        f"truncate -s 0 {MOUNT}/dir/file",
    ],
)
def test_writes_fail_with_erofs(repo: Path, cmd: str) -> None:
    r = traced(repo, ["bash", "-c", cmd])
    assert r.returncode != 0
    assert "Read-only file system" in r.stderr
    assert (repo / "dir/file").read_text() == "content\n"
    assert sorted(p.name for p in (repo / "dir").iterdir()) == ["file", "other"]


def _descendants(pid: int) -> set[int]:
    out: set[int] = set()
    todo = [pid]
    while todo:
        p = todo.pop()
        for task in Path(f"/proc/{p}/task").glob("*"):
            try:
                kids = (task / "children").read_text().split()
            except OSError:
                continue
            for k in map(int, kids):
                if k not in out:
                    out.add(k)
                    todo.append(k)
    return out


def test_sigkill_of_tracer_leaves_no_tracee(repo: Path) -> None:
    proc = subprocess.Popen(
        hep_cmd(repo, ["bash", "-c", "sleep 300 & sleep 300 & (sleep 300) ; wait"]),
        env=env_with(),
    )
    try:
        kids: set[int] = set()
        for _ in range(100):
            kids = _descendants(proc.pid)
            if len(kids) >= 4:
                break
            time.sleep(0.05)
        assert len(kids) >= 4
        proc.kill()
        proc.wait()
        for _ in range(100):
            alive = {k for k in kids if Path(f"/proc/{k}").exists() and _state(k) != "Z"}
            if not alive:
                break
            time.sleep(0.05)
        assert not alive
    finally:
        if proc.poll() is None:
            proc.kill()


def _state(pid: int) -> str:
    try:
        return Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
    except OSError:
        return "Z"


DENY_PTRACE = r"""
#include <linux/filter.h>
#include <linux/seccomp.h>
#include <stddef.h>
#include <errno.h>
#include <stdio.h>
#include <sys/prctl.h>
#include <sys/syscall.h>
#include <unistd.h>
int main(int argc, char **argv) {
    struct sock_filter f[] = {
        BPF_STMT(BPF_LD | BPF_W | BPF_ABS, offsetof(struct seccomp_data, nr)),
        BPF_JUMP(BPF_JMP | BPF_JEQ | BPF_K, SYS_ptrace, 0, 1),
        BPF_STMT(BPF_RET | BPF_K, SECCOMP_RET_ERRNO | EPERM),
        BPF_STMT(BPF_RET | BPF_K, SECCOMP_RET_ALLOW),
    };
    struct sock_fprog p = {4, f};
    if (prctl(PR_SET_NO_NEW_PRIVS, 1, 0, 0, 0) || prctl(PR_SET_SECCOMP, SECCOMP_MODE_FILTER, &p))
        return 99;
    execvp(argv[1], argv + 1);
    return 98;
}
"""


def test_no_ptrace_says_so_and_exits_2(repo: Path, tmp_path: Path) -> None:
    deny = compile_c(DENY_PTRACE, tmp_path / "deny")
    r = subprocess.run(
        [str(deny), *hep_cmd(repo, ["true"])], env=env_with(), capture_output=True, text=True
    )
    assert r.returncode == 2
    lines = r.stderr.strip().splitlines()
    assert len(lines) == 1 and "ptrace" in lines[0], r.stderr
    r = subprocess.run(
        [str(deny), sys.executable, "-c", "from worker.tracer import check; print(check())"],
        env=env_with(),
        capture_output=True,
        text=True,
    )
    assert "ptrace" in r.stdout and r.stdout.count("\n") == 1


def test_check_reports_a_working_tracer() -> None:
    from worker.tracer import check

    ensure_built()
    assert check() is None


def test_stats_count_trapped_syscalls(repo: Path) -> None:
    r = traced(repo, ["cat", f"{MOUNT}/dir/file"], stats=True)
    assert r.returncode == 0
    assert "trapped syscalls:" in r.stderr and "openat" in r.stderr
    assert os.path.basename(MOUNT) not in r.stderr


def test_stats_say_how_calls_were_answered(repo: Path, trap_mode: str) -> None:
    from worker.tracer import check_mode

    r = traced(repo, ["sh", "-c", f"cat {MOUNT}/dir/file; test -e {MOUNT}/dir"], stats=True)
    assert r.returncode == 0, r.stderr
    _, auto = check_mode()
    if trap_mode == "ptrace":
        assert "trap mode: ptrace (0 answered by notification" in r.stderr
    elif auto.startswith("seccomp-notify"):
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


def test_signals_never_make_answered_calls_fail_with_eintr(repo: Path, tmp_path: Path) -> None:
    """A handler without SA_RESTART firing every 100 us: open/stat/access of /cvmfs and host
    files never fail (a notification interrupted before it was read is restarted)."""
    prog = compile_c(EINTR_PROBE, tmp_path / "eintr")
    r = traced(repo, [str(prog), f"{MOUNT}/dir/file", f"{MOUNT}/link", "/etc/hostname"])
    assert r.returncode == 0, r.stderr
    assert r.stdout.strip() == "eintr=0 other=0 ticked=1"


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
    policy = _Evicting(root, versions)
    result = run(["/bin/sh", "-c", script], policy)
    assert result.status == 0
    assert capfd.readouterr().out == "11b22"
    assert policy.asked == 2


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
