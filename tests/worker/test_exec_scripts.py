"""exec of ``#!`` scripts in /cvmfs with many arguments (issue "hep-exec defects", item 1).

The rewritten exec (interpreter, script path, the caller's arguments) used to be built below
the caller's stack pointer, which is memory the program owns: a vfork child's stack is its
parent's, a goroutine's a few KiB, a thread's does not grow.  Go programs died, bash and xargs
got "Bad address", Python raised EFAULT.  Now it lives in a mapping of its own, which must not
outlive the exec.  Real hep-exec against a repository published by our publisher and served
by nginx on loopback; each case runs in both trap modes.
"""

from __future__ import annotations

import os
import re
import shutil
import subprocess
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest

from tests.support.hep_exec import hep_exec_cmd, serving
from tests.support.tracing import compile_c, ensure_built, env_with

# every test here runs many real processes: left out of the fast subset (-m 'not slow')
pytestmark = pytest.mark.slow

FQRN = "scripts.test.org"
ROOT = f"/cvmfs/{FQRN}"
SCRIPT = f"{ROOT}/bin/script"

# What every script here prints: its number of arguments and the last one.
COUNT = 'eval "last=\\${$#}"\necho "$# $last"\n'


@dataclass(frozen=True)
class Job:
    proxy: str
    key: Path
    src: Path

    def run(
        self, argv: list[str], *, stdin: str | None = None, env: dict[str, str] | None = None
    ) -> subprocess.CompletedProcess[str]:
        return subprocess.run(
            hep_exec_cmd(self.proxy, argv, keys=self.key),
            env=env_with(env),
            input=stdin,
            stdin=None if stdin is not None else subprocess.DEVNULL,
            capture_output=True,
            text=True,
            timeout=600,
        )


@pytest.fixture(scope="module")
def job(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Job]:
    ensure_built()
    base = tmp_path_factory.mktemp("scripts")
    src = base / "src"
    (src / "bin").mkdir(parents=True)
    files = {
        "script": "#!/bin/sh\n" + COUNT,
        # an interpreter that is itself a script under /cvmfs (binfmt_script nests these)
        "interp": "#!/bin/sh\nprintf 'interp '\nexec /bin/sh \"$@\"\n",
        "chained": f"#!{ROOT}/bin/interp\n" + COUNT,
        # a host interpreter that does not exist: the rewritten exec fails with ENOENT
        "badinterp": "#!/nonexistent/interp\necho never\n",
    }
    for name, text in files.items():
        (src / "bin" / name).write_text(text)
        (src / "bin" / name).chmod(0o755)
    with serving(src, FQRN, base) as (proxy, repo):
        yield Job(proxy, repo.master_pub, src)


def test_bash_passes_many_arguments_to_a_script(job: Job, trap_mode: str) -> None:
    """`$S $(seq 16000)` said "bad interpreter: Bad address"; bash's own process, forked, its
    stack not grown that far.  Also 100,000 arguments, and a script whose interpreter is a
    script under /cvmfs."""
    cmd = f"S={SCRIPT}; C={ROOT}/bin/chained; $S $(seq 16000); $S $(seq 100000); $C $(seq 16000)"
    r = job.run(["bash", "-c", cmd])
    assert r.returncode == 0, r.stderr
    assert r.stdout == "16000 16000\n100000 100000\ninterp 16000 16000\n"


def test_xargs_fills_command_lines_for_a_script(job: Job, trap_mode: str) -> None:
    """`seq 100000 | xargs script` exited 126 with "Bad address"."""
    r = job.run(["xargs", SCRIPT], stdin="".join(f"{i}\n" for i in range(1, 100001)))
    assert r.returncode == 0, r.stderr
    lines = [line.split() for line in r.stdout.splitlines()]
    assert len(lines) > 1  # xargs had to split them
    assert sum(int(n) for n, _last in lines) == 100000
    assert lines[-1][1] == "100000"


PY_THREAD = """
import subprocess, sys, threading
threading.stack_size(256 * 1024)
out = []
def run():
    try:
        p = subprocess.run([sys.argv[1], *map(str, range(40000))], capture_output=True, text=True)
        out.append(f"{p.returncode} {p.stdout.strip()} {p.stderr.strip()}")
    except OSError as e:
        out.append(repr(e))
t = threading.Thread(target=run)
t.start()
t.join()
print(out[0])
"""


def test_python_subprocess_from_a_thread_with_a_small_stack(job: Job, trap_mode: str) -> None:
    """subprocess.run with 40,000 arguments from a thread with a 256 KiB stack raised EFAULT:
    _posixsubprocess's vfork child runs on that stack."""
    r = job.run(["python3", "-c", PY_THREAD, SCRIPT])
    assert r.returncode == 0, r.stderr
    assert r.stdout == "0 40000 39999 \n"


GO_SPAWNER = """
package main

import (
	"fmt"
	"os"
	"os/exec"
	"strconv"
	"sync"
)

// Four goroutines run the script with 3,000 arguments, 20 times each, and check every output.
func main() {
	script := os.Args[1]
	var wg sync.WaitGroup
	var mu sync.Mutex
	bad := 0
	for w := 0; w < 4; w++ {
		wg.Add(1)
		go func(w int) {
			defer wg.Done()
			for r := 0; r < 20; r++ {
				args := make([]string, 3000)
				for i := range args {
					args[i] = strconv.Itoa(w*1000000 + r*10000 + i)
				}
				out, err := exec.Command(script, args...).Output()
				want := fmt.Sprintf("3000 %s\\n", args[2999])
				if err != nil || string(out) != want {
					mu.Lock()
					bad++
					fmt.Printf("goroutine %d run %d: %v %q\\n", w, r, err, out)
					mu.Unlock()
				}
			}
		}(w)
	}
	wg.Wait()
	if bad > 0 {
		os.Exit(1)
	}
	fmt.Println("ok")
}
"""


@pytest.fixture(scope="module")
def go_spawner(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A static Go program (os/exec: a CLONE_VM|CLONE_VFORK child on a goroutine's stack)."""
    go = shutil.which("go")
    if not go:
        pytest.skip("no Go toolchain (Debian: golang-go)")
    d = tmp_path_factory.mktemp("go")
    (d / "main.go").write_text(GO_SPAWNER)
    (d / "go.mod").write_text("module spawner\n\ngo 1.19\n")
    env = {
        **os.environ,
        "CGO_ENABLED": "0",
        "GOCACHE": str(d / "cache"),
        "GOPATH": str(d / "gopath"),
        "GOFLAGS": "",
        "GOPROXY": "off",
        "GOTOOLCHAIN": "local",
    }
    subprocess.run([go, "build", "-o", "spawner", "."], cwd=d, env=env, check=True)
    return d / "spawner"


def test_go_program_execs_a_script_from_goroutines(
    job: Job, go_spawner: Path, trap_mode: str
) -> None:
    """Go died with "fatal error: unexpected signal" (the vfork child's arguments overwrote
    memory below its goroutine's stack)."""
    r = job.run([str(go_spawner), SCRIPT])
    assert r.returncode == 0, r.stdout + r.stderr
    assert r.stdout == "ok\n"


EXECMAPS = r"""
/* execmaps MODE N NARGS SCRIPT: run SCRIPT N times with NARGS arguments, counting this
 * process's mappings before and after.  MODE spawn (posix_spawn) or vfork (vfork+execve): each
 * run must exit 0; fail (execve) or vforkfail (vfork+execve): each must fail, with the same
 * errno.  Prints "errno=E before=B after=A signals=S resent=R".  With TICK_US, SIGALRM comes
 * every TICK_US µs to a handler that counts the ones that do not come from the timer. */
#define _GNU_SOURCE
#include <errno.h>
#include <fcntl.h>
#include <signal.h>
#include <spawn.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/resource.h>
#include <sys/time.h>
#include <sys/wait.h>
#include <unistd.h>

extern char **environ;
static volatile sig_atomic_t ticks, resent;
static void tick(int s, siginfo_t *si, void *uc)
{
    (void)s;
    (void)uc;
    ticks++;
    if (si->si_code != SI_KERNEL) /* the timer's; SI_TKILL: the tracer's own tkill */
        resent++;
}

static int maps(void)
{
    char buf[65536];
    int fd = open("/proc/self/maps", O_RDONLY), n = 0;
    ssize_t r;
    while ((r = read(fd, buf, sizeof buf)) > 0)
        for (ssize_t i = 0; i < r; i++)
            n += buf[i] == '\n';
    close(fd);
    return n;
}

int main(int argc, char **argv)
{
    if (argc < 5)
        return 2;
    const char *mode = argv[1];
    int fail = !strcmp(mode, "fail") || !strcmp(mode, "vforkfail");
    int vf = !strncmp(mode, "vfork", 5);
    long n = atol(argv[2]), nargs = atol(argv[3]);
    char *script = argv[4];
    /* execve's limit for arguments is a quarter of RLIMIT_STACK: the same here and natively */
    struct rlimit rl;
    getrlimit(RLIMIT_STACK, &rl);
    rl.rlim_cur = 8 << 20;
    if (rl.rlim_max != RLIM_INFINITY && rl.rlim_max < rl.rlim_cur)
        rl.rlim_cur = rl.rlim_max;
    setrlimit(RLIMIT_STACK, &rl);
    char **av = calloc((size_t)nargs + 2, sizeof *av);
    av[0] = script;
    for (long i = 1; i <= nargs; i++)
        av[i] = "x";
    if (getenv("TICK_US")) {
        struct sigaction sa;
        memset(&sa, 0, sizeof sa);
        sa.sa_sigaction = tick;
        sa.sa_flags = SA_RESTART | SA_SIGINFO;
        sigaction(SIGALRM, &sa, NULL);
        long us = atol(getenv("TICK_US"));
        struct itimerval it = {{0, us}, {0, us}};
        setitimer(ITIMER_REAL, &it, NULL);
    }
    posix_spawn_file_actions_t fa;
    posix_spawn_file_actions_init(&fa);
    posix_spawn_file_actions_addopen(&fa, 1, "/dev/null", O_WRONLY, 0);
    int before = maps(), err = 0;
    for (long i = 0; i < n; i++) {
        pid_t pid;
        volatile int child_errno = 0;
        int e;
        if (fail && !vf) {
            execve(script, av, environ);
            e = errno;
        } else {
            if (vf) {
                pid = vfork();
                if (pid == 0) {
                    if (!fail)
                        dup2(open("/dev/null", O_WRONLY), 1);
                    execve(script, av, environ);
                    child_errno = errno; /* the parent's memory: shared until _exit */
                    _exit(127);
                }
            } else if ((err = posix_spawn(&pid, script, &fa, NULL, av, environ)) != 0) {
                fprintf(stderr, "posix_spawn: %s\n", strerror(err));
                return 1;
            }
            int st;
            while (waitpid(pid, &st, 0) < 0 && errno == EINTR) {}
            if (!fail && (!WIFEXITED(st) || WEXITSTATUS(st) != 0)) {
                fprintf(stderr, "run %ld: status %#x\n", i, st);
                return 1;
            }
            e = child_errno;
        }
        if (fail && i && e != err) {
            fprintf(stderr, "run %ld: errno %d, before %d\n", i, e, err);
            return 1;
        }
        err = e;
    }
    int after = maps();
    printf("errno=%d before=%d after=%d signals=%d resent=%d\n", err, before, after, (int)ticks,
           (int)resent);
    return 0;
}
"""


@pytest.fixture(scope="module")
def execmaps(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return compile_c(EXECMAPS, tmp_path_factory.mktemp("execmaps") / "execmaps")


def _counts(out: str) -> dict[str, int]:
    m = re.fullmatch(r"errno=(\d+) before=(\d+) after=(\d+) signals=(\d+) resent=(\d+)\n", out)
    assert m, out
    names = ["errno", "before", "after", "signals", "resent"]
    return dict(zip(names, map(int, m.groups()), strict=True))


@pytest.mark.parametrize("mode", ["fail", "vforkfail"])
@pytest.mark.parametrize(
    ("name", "nargs"),
    [
        ("badinterp", 30000),  # the interpreter is missing: ENOENT from the rewritten exec
        ("script", 300000),  # 2.4 MB of pointers > RLIMIT_STACK / 4: E2BIG from it
        ("script", 800000),  # more pointers than any execve takes: E2BIG before rewriting
    ],
)
def test_failed_exec_fails_as_natively_and_leaves_no_mapping(
    job: Job, execmaps: Path, trap_mode: str, mode: str, name: str, nargs: int
) -> None:
    native = subprocess.run(
        [str(execmaps), mode, "3", str(nargs), str(job.src / "bin" / name)],
        capture_output=True,
        text=True,
        check=True,
    )
    want = _counts(native.stdout)
    assert want["errno"] in (2, 7)  # ENOENT, E2BIG: what the kernel says
    r = job.run([str(execmaps), mode, "3", str(nargs), f"{ROOT}/bin/{name}"])
    assert r.returncode == 0, r.stderr
    got = _counts(r.stdout)
    assert got["errno"] == want["errno"]
    assert got["after"] == got["before"]  # the rewritten exec's mapping is gone


@pytest.mark.parametrize("mode", ["spawn", "vfork"])
def test_spawning_a_script_leaks_no_mapping_into_the_parent(
    job: Job, execmaps: Path, trap_mode: str, mode: str
) -> None:
    """A vfork child's exec leaves its old address space, which is its parent's: the mapping
    it exec'd from must not stay there (1,000 runs, posix_spawn and vfork+execve).  (3,000
    arguments: posix_spawn's child stack is only as large as its argv.)"""
    r = job.run([str(execmaps), mode, "1000", "3000", SCRIPT])
    assert r.returncode == 0, r.stderr
    got = _counts(r.stdout)
    assert got["errno"] == 0
    assert got["after"] == got["before"]


@pytest.mark.parametrize(("mode", "n"), [("vfork", 200), ("fail", 500), ("vforkfail", 300)])
def test_signals_during_a_rewritten_exec_come_after_it(
    job: Job, execmaps: Path, trap_mode: str, mode: str, n: int
) -> None:
    """A timer signal every 200 µs: the tracer's steps around the exec (mmap, the exec again,
    munmap) pass through user mode, where a signal would run the handler with our registers
    or, undone and redone, never let the exec finish.  Held back and sent again after the
    exec, each reaches the handler as the timer sent it, and nothing is left mapped."""
    name = "script" if mode == "vfork" else "badinterp"
    argv = [str(execmaps), mode, str(n), "30000", f"{ROOT}/bin/{name}"]
    r = job.run(argv, env={"TICK_US": "200"})
    assert r.returncode == 0, r.stderr
    got = _counts(r.stdout)
    assert got["errno"] == (0 if mode == "vfork" else 2)
    assert got["after"] == got["before"]
    assert got["signals"] > 0
    assert got["resent"] == 0  # every one with the timer's siginfo
