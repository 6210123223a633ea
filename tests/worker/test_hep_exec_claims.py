"""What the README, docs/deployment.md and worker/trace/README.md say hep-exec does, where no other
test checked it: an expired whitelist, extended attributes and statfs, a nested hep-exec, a
program's own seccomp filters, and a libc call site patched while other threads call it.

Real parts only: the CLI as a process, repositories published by our publisher and served by
nginx on 127.0.0.1, C programs compiled here. Where the program does not do what the docs say,
the test is marked ``xfail(strict=True)`` with the defect in one line.
"""

from __future__ import annotations

import datetime as dt
import os
import re
import subprocess
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from functools import cache
from pathlib import Path

import pytest

from cvmfs_format.whitelist import make_whitelist
from publish.keys import load_or_create_keys
from tests.support.hep_exec import CLI, Served, hep_exec, hep_exec_cmd
from tests.support.network import dead_url
from tests.support.repos import Repo
from tests.support.tracing import compile_c, ensure_built, env_with, needs_ptrace, ram_dir

pytestmark = [needs_ptrace, pytest.mark.slow]  # real processes: not in the fast subset

FQRN = "claims.test.org"
MOUNT = f"/cvmfs/{FQRN}"
EXPIRED = "expired.test.org"  # its whitelist is re-signed to have expired 30 days ago
INNER = "inner.test.org"  # served only by the second nginx (the nested hep-exec's proxy)

# A tiny tool: each operation prints one line, the same natively and under hep-exec, so the
# two can be compared line by line.  `statfs` prints the free counts after a `|` (they move
# while other programs write to the same file system).
PROBE = r"""
#define _GNU_SOURCE
#include <errno.h>
#include <fcntl.h>
#include <stdio.h>
#include <string.h>
#include <sys/statfs.h>
#include <sys/statvfs.h>
#include <sys/xattr.h>
#include <unistd.h>

int main(int argc, char **argv) {
    char buf[4096];
    for (int i = 1; i + 1 < argc;) {
        const char *op = argv[i++], *path = argv[i++];
        if (!strcmp(op, "read")) {
            int fd = open(path, O_RDONLY);
            if (fd < 0) { printf("read %s\n", strerror(errno)); continue; }
            unsigned long long h = 1469598103934665603ULL;
            long long size = 0;
            ssize_t n;
            while ((n = read(fd, buf, sizeof buf)) > 0)
                for (ssize_t k = 0; k < n; k++, size++)
                    h = (h ^ (unsigned char)buf[k]) * 1099511628211ULL;
            close(fd);
            printf("read %016llx %lld\n", h, size);
        } else if (!strcmp(op, "list") || !strcmp(op, "llist")) {
            ssize_t n = op[1] == 'l' ? llistxattr(path, buf, sizeof buf)
                                     : listxattr(path, buf, sizeof buf);
            if (n < 0) { printf("%s %s\n", op, strerror(errno)); continue; }
            printf("%s %zd", op, n);
            for (char *p = buf; p < buf + n; p += strlen(p) + 1) printf(" %s", p);
            printf("\n");
        } else if (!strcmp(op, "sizes")) { /* the length queries and a short buffer */
            const char *name = argv[i++];
            ssize_t a = getxattr(path, name, NULL, 0), b = listxattr(path, NULL, 0);
            ssize_t c = getxattr(path, name, buf, 1);
            printf("sizes %zd %zd %zd %s\n", a, b, c, c < 0 ? strerror(errno) : "");
        } else if (!strcmp(op, "get") || !strcmp(op, "lget")) {
            const char *name = argv[i++];
            ssize_t n = op[0] == 'l' ? lgetxattr(path, name, buf, sizeof buf)
                                     : getxattr(path, name, buf, sizeof buf);
            if (n < 0) { printf("%s %s %s\n", op, name, strerror(errno)); continue; }
            printf("%s %s %zd ", op, name, n);
            for (ssize_t k = 0; k < n; k++) printf("%02x", (unsigned char)buf[k]);
            printf("\n");
        } else if (!strcmp(op, "statfs")) {
            struct statfs s;
            if (statfs(path, &s)) { printf("statfs %s\n", strerror(errno)); continue; }
            int fsid[2];
            memcpy(fsid, &s.f_fsid, sizeof fsid);
            printf("statfs type=%lx flags=%lx bsize=%ld blocks=%lu files=%lu fsid=%x:%x "
                   "namelen=%ld | bfree=%lu bavail=%lu ffree=%lu\n",
                   (unsigned long)s.f_type, (unsigned long)s.f_flags, (long)s.f_bsize,
                   (unsigned long)s.f_blocks, (unsigned long)s.f_files, fsid[0], fsid[1],
                   (long)s.f_namelen, (unsigned long)s.f_bfree, (unsigned long)s.f_bavail,
                   (unsigned long)s.f_ffree);
        } else if (!strcmp(op, "statvfs")) {
            struct statvfs v;
            if (statvfs(path, &v)) { printf("statvfs %s\n", strerror(errno)); continue; }
            printf("statvfs rdonly=%d\n", (v.f_flag & ST_RDONLY) != 0);
        } else {
            printf("bad operation %s\n", op);
            return 2;
        }
    }
    return 0;
}
"""

# argv[1]: "listener" (a filter with SECCOMP_FILTER_FLAG_NEW_LISTENER) or "plain" (a filter
# without one that makes getppid fail with EXDEV); then files to read afterwards.
SECCOMP = r"""
#define _GNU_SOURCE
#include <errno.h>
#include <fcntl.h>
#include <linux/audit.h>
#include <linux/filter.h>
#include <linux/seccomp.h>
#include <stddef.h>
#include <stdio.h>
#include <string.h>
#include <sys/prctl.h>
#include <sys/syscall.h>
#include <unistd.h>

static long install(unsigned flags, int nr, unsigned action) {
    struct sock_filter f[] = {
        BPF_STMT(BPF_LD | BPF_W | BPF_ABS, offsetof(struct seccomp_data, arch)),
        BPF_JUMP(BPF_JMP | BPF_JEQ | BPF_K, AUDIT_ARCH_X86_64, 1, 0),
        BPF_STMT(BPF_RET | BPF_K, SECCOMP_RET_ALLOW),
        BPF_STMT(BPF_LD | BPF_W | BPF_ABS, offsetof(struct seccomp_data, nr)),
        BPF_JUMP(BPF_JMP | BPF_JEQ | BPF_K, (unsigned)nr, 0, 1),
        BPF_STMT(BPF_RET | BPF_K, action),
        BPF_STMT(BPF_RET | BPF_K, SECCOMP_RET_ALLOW),
    };
    struct sock_fprog prog = {sizeof f / sizeof f[0], f};
    return syscall(SYS_seccomp, SECCOMP_SET_MODE_FILTER, flags, &prog);
}

int main(int argc, char **argv) {
    if (prctl(PR_SET_NO_NEW_PRIVS, 1, 0, 0, 0)) { perror("PR_SET_NO_NEW_PRIVS"); return 2; }
    if (!strcmp(argv[1], "listener")) {
        /* notifications for a call nobody here makes: only the listener matters */
        long fd = install(SECCOMP_FILTER_FLAG_NEW_LISTENER, SYS_getpriority,
                          SECCOMP_RET_USER_NOTIF);
        printf("listener %s\n", fd >= 0 ? "fd" : strerror(errno));
    } else {
        long rc = install(0, SYS_getppid, SECCOMP_RET_ERRNO | EXDEV);
        printf("plain %s\n", rc == 0 ? "installed" : strerror(errno));
        errno = 0;
        rc = syscall(SYS_getppid);
        printf("getppid %ld %s\n", rc, strerror(errno));
    }
    for (int i = 2; i < argc; i++) {
        char buf[256];
        int fd = open(argv[i], O_RDONLY);
        ssize_t n = fd < 0 ? -1 : read(fd, buf, sizeof buf);
        if (n < 0) printf("read %s\n", strerror(errno));
        else printf("read %.*s\n", (int)n, buf);
        if (fd >= 0) close(fd);
    }
    return 0;
}
"""

# Runs a command below a seccomp listener it holds (as a container runtime would): installs a
# filter with a listener, forks, the child execs argv[1..]; the parent keeps the listener fd
# open (closing it would free the listener) and exits with the child's status.
UNDER_LISTENER = r"""
#define _GNU_SOURCE
#include <linux/audit.h>
#include <linux/filter.h>
#include <linux/seccomp.h>
#include <stddef.h>
#include <stdio.h>
#include <sys/prctl.h>
#include <sys/syscall.h>
#include <sys/wait.h>
#include <unistd.h>

int main(int argc, char **argv) {
    struct sock_filter f[] = {
        BPF_STMT(BPF_LD | BPF_W | BPF_ABS, offsetof(struct seccomp_data, arch)),
        BPF_JUMP(BPF_JMP | BPF_JEQ | BPF_K, AUDIT_ARCH_X86_64, 1, 0),
        BPF_STMT(BPF_RET | BPF_K, SECCOMP_RET_ALLOW),
        BPF_STMT(BPF_LD | BPF_W | BPF_ABS, offsetof(struct seccomp_data, nr)),
        BPF_JUMP(BPF_JMP | BPF_JEQ | BPF_K, SYS_getpriority, 0, 1),
        BPF_STMT(BPF_RET | BPF_K, SECCOMP_RET_USER_NOTIF),
        BPF_STMT(BPF_RET | BPF_K, SECCOMP_RET_ALLOW),
    };
    struct sock_fprog prog = {sizeof f / sizeof f[0], f};
    if (argc < 2 || prctl(PR_SET_NO_NEW_PRIVS, 1, 0, 0, 0)) return 120;
    long fd = syscall(SYS_seccomp, SECCOMP_SET_MODE_FILTER, SECCOMP_FILTER_FLAG_NEW_LISTENER,
                      &prog);
    if (fd < 0) { perror("seccomp listener"); return 121; }
    pid_t c = fork();
    if (c == 0) {
        execvp(argv[1], argv + 1);
        perror(argv[1]);
        _exit(122);
    }
    int st;
    if (c < 0 || waitpid(c, &st, 0) != c) return 123;
    return WIFEXITED(st) ? WEXITSTATUS(st) : 128 + WTERMSIG(st);
}
"""

# Worker threads open+read, stat (/cvmfs) and readlink (a host symlink) in a loop; each
# iteration notes whether glibc's readlink site (`mov $89,%eax; syscall`, read from this
# process's own copy of libc) was already patched when it started.  Once every thread has done
# `rounds` iterations, the main thread makes the first readlink of a /cvmfs path, which gets
# that very site patched while the workers keep calling it; then it waits until every thread
# has done `rounds` more with the site patched.  Every result is checked against the answer
# before the threads started.  argv: file cvmfs_link link_target host_link host_target
# threads rounds.
PATCHER = r"""
#define _GNU_SOURCE
#include <dlfcn.h>
#include <errno.h>
#include <fcntl.h>
#include <pthread.h>
#include <sched.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/stat.h>
#include <time.h>
#include <unistd.h>

#define MAXT 16
static const char *file, *cvmfs_link, *link_target, *host_link, *host_target;
static unsigned long long want_sum;
static struct stat want_st;
static volatile unsigned char *site;
static int nthreads, stop;
static struct { long before, after, errors; } count[MAXT];

static unsigned long long sum(const char *path) {
    int fd = open(path, O_RDONLY | O_CLOEXEC);
    if (fd < 0) return 0;
    unsigned long long h = 1469598103934665603ULL;
    unsigned char buf[8192];
    ssize_t n;
    while ((n = read(fd, buf, sizeof buf)) > 0)
        for (ssize_t i = 0; i < n; i++) h = (h ^ buf[i]) * 1099511628211ULL;
    close(fd);
    return h;
}

static int link_is(const char *path, const char *target) {
    char t[256];
    errno = 0;
    ssize_t n = readlink(path, t, sizeof t);
    if (!*path) return n < 0 && errno == ENOENT; /* "" names nothing */
    return n == (ssize_t)strlen(target) && memcmp(t, target, (size_t)n) == 0;
}

static void *worker(void *arg) {
    long k = (long)arg;
    while (!__atomic_load_n(&stop, __ATOMIC_ACQUIRE)) {
        int patched = *site == 0xe9;
        struct stat st;
        int bad = sum(file) != want_sum;
        bad |= stat(file, &st) != 0 || st.st_ino != want_st.st_ino ||
               st.st_size != want_st.st_size || st.st_mode != want_st.st_mode;
        bad |= !link_is(host_link, host_target);
        if (patched) __atomic_add_fetch(&count[k].after, 1, __ATOMIC_RELAXED);
        else __atomic_add_fetch(&count[k].before, 1, __ATOMIC_RELAXED);
        if (bad) __atomic_add_fetch(&count[k].errors, 1, __ATOMIC_RELAXED);
    }
    return NULL;
}

static long fewest(int after) {
    long m = -1;
    for (int k = 0; k < nthreads; k++) {
        long c = __atomic_load_n(after ? &count[k].after : &count[k].before, __ATOMIC_RELAXED);
        if (m < 0 || c < m) m = c;
    }
    return m;
}

static int waited(time_t deadline) { return time(NULL) > deadline; }

int main(int argc, char **argv) {
    if (argc != 8) return 2;
    file = argv[1]; cvmfs_link = argv[2]; link_target = argv[3];
    host_link = argv[4]; host_target = argv[5];
    nthreads = atoi(argv[6]);
    long rounds = atol(argv[7]);
    if (nthreads < 1 || nthreads > MAXT) return 2;
    want_sum = sum(file);
    if (stat(file, &want_st)) { perror(file); return 3; }
    const unsigned char *fn = dlsym(RTLD_NEXT, "readlink");
    for (int i = 0; fn && i < 32 && !site; i++)
        if (!memcmp(fn + i, "\xb8\x59\x00\x00\x00\x0f\x05", 7)) site = (unsigned char *)fn + i;
    if (!site) { printf("no glibc readlink site\n"); return 0; }
    printf("site before %02x\n", *site);
    pthread_t th[MAXT];
    for (long k = 0; k < nthreads; k++) pthread_create(&th[k], NULL, worker, (void *)k);
    time_t deadline = time(NULL) + 60;
    while (fewest(0) < rounds && !waited(deadline)) sched_yield();
    int tries = 0, wrong = 0;
    while (*site != 0xe9 && tries < 1000) { /* normally the first call */
        wrong += !link_is(cvmfs_link, link_target);
        tries++;
    }
    printf("site after %02x\n", *site);
    while (*site == 0xe9 && fewest(1) < rounds && !waited(deadline)) sched_yield();
    __atomic_store_n(&stop, 1, __ATOMIC_RELEASE);
    for (int k = 0; k < nthreads; k++) pthread_join(th[k], NULL);
    for (int k = 0; k < 10; k++) wrong += !link_is(cvmfs_link, link_target); /* patched now */
    long errors = 0;
    for (int k = 0; k < nthreads; k++) {
        errors += count[k].errors;
        printf("thread %d: %s before the patch, %s after it\n", k,
               count[k].before >= rounds ? "busy" : "idle",
               count[k].after >= rounds ? "busy" : "idle");
    }
    printf("wrong answers: main %d, threads %ld\n", wrong, errors);
    return 0;
}
"""


@dataclass
class World:
    served: Served
    inner: Served  # INNER only, behind its own nginx
    proxy: str
    inner_proxy: str
    src: Path  # publisher sources of FQRN, on tmpfs
    host: Path  # a host directory that FQRN's `out` symlink leads to
    host_xattrs: bool  # the host file system took a user.* xattr
    src_xattrs: bool  # the source file system took user.* xattrs (published with them)
    bin: Path  # the compiled programs

    def key(self, fqrn: str) -> Path:
        return self.served.repos[fqrn].master_pub

    def prog(self, name: str) -> str:
        return str(self.bin / name)


def expire_whitelist(repo: Repo, days_ago: int = 30) -> None:
    """Re-sign the repository's whitelist with its master key so that it expired ``days_ago``
    days ago (made 30 days before that, valid for 30); everything else stays as published."""
    now = dt.datetime.now(dt.UTC)
    keys, created = load_or_create_keys(repo.keys_dir, repo.fqrn, now)
    assert not created, "the publisher's keys should be reused"
    created_at = now - dt.timedelta(days=30 + days_ago)
    wl = make_whitelist(repo.fqrn, keys.certificate_der, keys.master_key, created_at)
    (repo.dir / ".cvmfswhitelist").write_bytes(wl)


def try_setxattr(path: Path, name: str, value: bytes) -> bool:
    try:
        os.setxattr(path, name, value)
    except OSError:
        return False
    return True


@pytest.fixture(scope="module")
def world(tmp_path_factory: pytest.TempPathFactory) -> Iterator[World]:
    ensure_built()
    base = tmp_path_factory.mktemp("claims")
    host = base / "host"
    host.mkdir()
    (host / "h").write_text("a host file\n")
    host_xattrs = try_setxattr(host / "h", "user.where", b"on the host")
    with ram_dir() as src:
        tree = src / "tree"
        tree.mkdir()
        for i, size in enumerate([1000, 50_000, 200_000, 7]):
            (tree / f"f{i:02d}").write_bytes(os.urandom(size))
        (tree / "word").write_text("word")  # no newline: one line when printed
        (tree / "tagged").write_bytes(b"a file with extended attributes\n")
        src_xattrs = try_setxattr(tree / "tagged", "user.colour", b"blue") and try_setxattr(
            tree / "tagged", "user.origin", b"hep-publish test"
        )
        (tree / "link").symlink_to("f00")
        (tree / "sub").mkdir()
        (tree / "sub" / "g").write_text("below\n")
        (tree / "out").symlink_to(host)  # leaves /cvmfs, to a host directory
        (src / "exp").mkdir()
        (src / "exp" / "f").write_text("signed long ago\n")
        (src / "inner").mkdir()
        (src / "inner" / "hello").write_text("seen through the inner hep-exec\n")

        served = Served(base / "store", base / "keys")
        served.publish(tree, FQRN)
        expire_whitelist(served.publish(src / "exp", EXPIRED))
        inner = Served(base / "inner-store", base / "keys")
        inner.publish(src / "inner", INNER)

        bin_dir = base / "bin"
        bin_dir.mkdir()
        compile_c(PROBE, bin_dir / "probe")
        compile_c(SECCOMP, bin_dir / "seccomp")
        compile_c(UNDER_LISTENER, bin_dir / "under-listener")
        compile_c(PATCHER, bin_dir / "patcher", "-pthread")
        try:
            proxy = served.serve(base / "nginx")
            inner_proxy = inner.serve(base / "nginx-inner")
            yield World(
                served, inner, proxy, inner_proxy, tree, host, host_xattrs, src_xattrs, bin_dir
            )
        finally:
            served.stop()
            inner.stop()


@cache
def trap_mode_here() -> str:
    """What ``--check`` says the tracer runs in on this machine by default, e.g.
    ``seccomp-notify, in-process opens and stats`` or ``ptrace``."""
    r = subprocess.run(
        [*CLI, "--check", "--server", dead_url(), "--no-shared-cache"],
        env=env_with(),
        capture_output=True,
        text=True,
        timeout=60,
    )
    m = re.search(r"trap mode: ([^)]*)\)", r.stdout)
    assert m, r.stdout + r.stderr
    return m[1]


def needs_notify() -> None:
    if not trap_mode_here().startswith("seccomp-notify"):
        pytest.skip(f"no seccomp-notify mode here ({trap_mode_here()})")


def fnv(data: bytes) -> str:
    h = 1469598103934665603
    for b in data:
        h = ((h ^ b) * 1099511628211) & (2**64 - 1)
    return f"{h:016x}"


def read_line(path: Path) -> str:
    data = path.read_bytes()
    return f"read {fnv(data)} {len(data)}"


def probe(
    w: World,
    ops: Sequence[str],
    *,
    options: Sequence[str] = (),
    env: dict[str, str] | None = None,
) -> subprocess.CompletedProcess[str]:
    """The probe under hep-exec."""
    return hep_exec(w.proxy, [w.prog("probe"), *ops], options=options, env=env)


def native_probe(w: World, ops: Sequence[str]) -> list[str]:
    r = subprocess.run([w.prog("probe"), *ops], capture_output=True, text=True, timeout=30)
    precondition(r.returncode == 0, f"the probe failed natively: {r.stderr}")
    return r.stdout.splitlines()


def lines_of(r: subprocess.CompletedProcess[str]) -> list[str]:
    assert r.returncode == 0, r.stderr
    return r.stdout.splitlines()


def without_free_counts(lines: list[str]) -> list[str]:
    return [ln.partition(" | ")[0] for ln in lines]


def precondition(ok: object, what: str) -> None:
    """A broken test set-up must not pass for the defect an xfail test expects (those are
    marked ``raises=AssertionError``; this raises RuntimeError)."""
    if not ok:
        raise RuntimeError(what)


# ------------------------------------------------------------------ 1. expired whitelist


def test_check_reports_an_expired_whitelist_and_exits_1(world: World) -> None:
    """README: ``--check`` checks freshness; docs/deployment.md: an expired whitelist shows as
    ``FAIL repository …: … expired``, and --check exits 1 unless every line is ok.  The same
    check of a repository with a valid whitelist (same publisher, same proxy) is all ok."""
    common = ["--server", world.proxy, "--no-shared-cache", "--ram", "64M", "--check"]
    r = subprocess.run(
        [*CLI, *common, "--keys", str(world.key(EXPIRED)), "--repositories", EXPIRED],
        env=env_with(),
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert r.returncode == 1, r.stdout + r.stderr
    fails = [ln for ln in r.stdout.splitlines() if ln.startswith("FAIL")]
    assert len(fails) == 1, r.stdout
    assert re.fullmatch(
        rf"FAIL repository {re.escape(EXPIRED)}: .*\.cvmfswhitelist: expired on "
        r"\d{4}-\d\d-\d\d \d\d:\d\d UTC",
        fails[0],
    ), fails[0]

    r = subprocess.run(
        [*CLI, *common, "--keys", str(world.key(FQRN)), "--repositories", FQRN],
        env=env_with(),
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert r.returncode == 0, r.stdout + r.stderr
    assert not [ln for ln in r.stdout.splitlines() if not ln.startswith("ok  ")], r.stdout
    assert re.search(
        rf"^ok   repository {re.escape(FQRN)}: revision 1, published .* ago, signature verified$",
        r.stdout,
        re.M,
    ), r.stdout


def test_job_gets_eio_and_a_log_line_from_a_repository_whose_whitelist_expired(
    world: World,
) -> None:
    """README: paths that cannot be fetched fail with ENOENT/EIO and a log line naming the
    path; the repository with the expired whitelist is not mounted (the log says why), while a
    valid one in the same job reads fine."""
    keys = ["--keys", f"{world.key(EXPIRED)}:{world.key(FQRN)}"]  # both repositories' keys
    r = probe(world, ["read", f"/cvmfs/{EXPIRED}/f", "read", f"{MOUNT}/f00"], options=keys)
    assert lines_of(r) == ["read Input/output error", read_line(world.src / "f00")]
    log = r.stderr.splitlines()
    assert any(f"/cvmfs/{EXPIRED}" in ln and "expired on" in ln for ln in log), r.stderr
    assert any(f"/cvmfs/{EXPIRED}/f:" in ln for ln in log), r.stderr


# ------------------------------------------------------------------ 2. xattrs and statfs


def test_xattr_calls_on_cvmfs_paths_answer_as_on_the_source(world: World, trap_mode: str) -> None:
    """getxattr/lgetxattr/listxattr/llistxattr are trapped (README, TRACER.md): on a file, a
    directory and a symlink without xattrs, and on a missing path, they answer what they
    answer on the source tree (natively /cvmfs does not exist: ENOENT for all)."""
    names = ["f00", "sub", "link", "missing"]
    ops: list[str] = []
    for n in names:
        ops += ["list", f"@/{n}", "llist", f"@/{n}", "get", f"@/{n}", "user.colour"]
        ops += ["lget", f"@/{n}", "user.colour"]
    under = lines_of(probe(world, [o.replace("@", MOUNT) for o in ops]))
    native = native_probe(world, [o.replace("@", str(world.src)) for o in ops])
    assert under == native
    nodata = "user.colour No data available"
    assert native[:4] == ["list 0", "llist 0", f"get {nodata}", f"lget {nodata}"]
    assert native[-1] == "lget user.colour No such file or directory"


def test_published_user_xattrs_are_seen_as_on_the_source(world: World, trap_mode: str) -> None:
    """README (hep-publish): ``user.*`` extended attributes are published into the repository;
    a command under hep-exec reading them gets what the source tree has."""
    if not world.src_xattrs:
        pytest.skip("the source tree's file system does not take user.* xattrs")
    tagged = "tagged"
    ops = ["get", f"@/{tagged}", "user.colour", "get", f"@/{tagged}", "user.origin"]
    ops += ["lget", f"@/{tagged}", "user.colour", "get", f"@/{tagged}", "user.none"]
    ops += ["get", "@/f00", "user.colour", "sizes", f"@/{tagged}", "user.colour"]
    ops += ["list", f"@/{tagged}", "llist", f"@/{tagged}"]
    under = lines_of(probe(world, [o.replace("@", MOUNT) for o in ops]))
    native = native_probe(world, [o.replace("@", str(world.src)) for o in ops])
    precondition(native[0] == f"get user.colour 4 {b'blue'.hex()}", f"source: {native}")
    assert under[:6] == native[:6]
    for i in (6, 7):  # the same names, in the source file system's order or the catalog's
        assert sorted(under[i].split()[2:]) == sorted(native[i].split()[2:])


def test_xattrs_and_statfs_through_a_symlink_leaving_cvmfs_are_the_targets(
    world: World, trap_mode: str
) -> None:
    """TRACER.md: redirected stat/access/readlink/statfs/xattr calls (symlinks leaving /cvmfs)
    are done on the target: through ``out`` -> a host directory, xattrs and statfs are the
    host's, as natively."""
    if not world.host_xattrs:
        pytest.skip("the host test directory's file system does not take user.* xattrs")
    ops = ["list", "@/h", "llist", "@/h", "get", "@/h", "user.where", "lget", "@/h", "user.where"]
    ops += ["get", "@/h", "user.none", "statfs", "@/h", "statfs", "@", "statvfs", "@"]
    under = lines_of(probe(world, [o.replace("@", f"{MOUNT}/out") for o in ops]))
    native = native_probe(world, [o.replace("@", str(world.host)) for o in ops])
    assert without_free_counts(under) == without_free_counts(native)
    assert native[0] == "list 11 user.where"
    assert native[2] == f"get user.where 11 {b'on the host'.hex()}"


def statfs_fields(line: str) -> dict[str, str]:
    assert line.startswith("statfs type="), line
    head = line.partition(" | ")[0].split()[1:]
    return dict(field.split("=", 1) for field in head)


def test_statfs_answers_one_file_system_for_a_repository(world: World, trap_mode: str) -> None:
    """README: /cvmfs/<fqrn>/… appears as a file system: statfs of the repository's root, a
    file, a directory, a file below it and a symlink all answer (natively: ENOENT), with one
    f_type and f_fsid; a path the repository does not have is ENOENT."""
    paths = ["", "/f00", "/sub", "/sub/g", "/link"]
    ops = [x for p in paths for x in ("statfs", f"{MOUNT}{p}")]
    out = lines_of(probe(world, [*ops, "statfs", f"{MOUNT}/missing"]))
    assert out[-1] == "statfs No such file or directory"
    fields = [statfs_fields(ln) for ln in out[:-1]]
    assert {(f["type"], f["fsid"]) for f in fields} == {(fields[0]["type"], fields[0]["fsid"])}
    assert all(int(f["bsize"]) > 0 and int(f["namelen"]) >= 255 for f in fields), out


def test_statvfs_of_a_repository_says_read_only(world: World) -> None:
    """README: the command sees /cvmfs/<fqrn>/… as a read-only file system; statvfs is how a
    program asks (``ST_RDONLY`` in f_flag)."""
    paths = ["", "/f00", "/sub"]
    out = lines_of(probe(world, [x for p in paths for x in ("statvfs", f"{MOUNT}{p}")]))
    precondition(all(ln.startswith("statvfs rdonly=") for ln in out), f"statvfs failed: {out}")
    assert out == ["statvfs rdonly=1"] * len(paths)


# ------------------------------------------------------------------ 3. nested hep-exec


def test_nested_hep_exec_runs_its_command_in_the_outer_jobs_cvmfs(world: World) -> None:
    """worker/trace/README.md: a hep-exec inside a hep-exec job runs its command as it is, with
    the outer job's /cvmfs (a second tracer cannot trace inside the first).  The inner one is
    given only INNER's proxy, which does not serve FQRN: the bytes come through the outer job.
    Options that only a tracing hep-exec has say so."""
    read = [world.prog("probe"), "read", f"{MOUNT}/f00"]
    inner = hep_exec_cmd(world.inner_proxy, read, options=["--stats-internals"])
    r = hep_exec(world.proxy, inner)
    assert r.returncode == 0, r.stderr
    assert r.stdout.splitlines() == [read_line(world.src / "f00")]
    notes = [ln for ln in r.stderr.splitlines() if ln.startswith("hep-exec:")]
    assert len(notes) == 1 and "--stats of this hep-exec do not apply" in notes[0], r.stderr
    assert "trap mode" not in r.stderr, "the inner hep-exec traced nothing"


def test_nested_hep_exec_says_what_the_outer_job_does_not_serve(world: World) -> None:
    """A command inside a hep-exec job that names a repository the outer job cannot serve (its
    proxy does not have INNER; the inner hep-exec's does): one line says why and what to do,
    and the command runs all the same, finding INNER missing as the outer job answers."""
    read = [world.prog("probe"), "read", f"/cvmfs/{INNER}/hello"]
    alone = hep_exec(world.inner_proxy, read)
    want = read_line(world.src.parent / "inner" / "hello")
    precondition(alone.stdout.splitlines() == [want], f"INNER not served: {alone.stderr}")
    r = hep_exec(world.proxy, hep_exec_cmd(world.inner_proxy, read))
    assert lines_of(r) == ["read No such file or directory"]
    said = [ln for ln in r.stderr.splitlines() if "inside another hep-exec job" in ln]
    assert len(said) == 1, r.stderr
    assert f"not {INNER}" in said[0] and "give the outer hep-exec the servers" in said[0], said


def test_a_stale_job_marker_is_ignored(world: World) -> None:
    """An environment copied from inside a job (its HEP_EXEC_JOB naming a process that does
    not trace us) changes nothing: hep-exec traces its command and serves /cvmfs itself."""
    r = probe(world, ["read", f"{MOUNT}/f00"], env={"HEP_EXEC_JOB": f"{os.getpid()} /cvmfs"})
    assert lines_of(r) == [read_line(world.src / "f00")]


# ------------------------------------------------------------------ 4. a program's own seccomp


@pytest.mark.parametrize("mode", ["notify", "ptrace"])
def test_own_seccomp_listener_gets_ebusy_in_notify_mode_only(world: World, mode: str) -> None:
    """README/TRACER.md: in notify mode a program that installs its own seccomp listener gets
    EBUSY (one listener per filter chain); natively, and when hep-exec uses ptrace stops, it
    gets its listener fd.  /cvmfs works afterwards either way."""
    if mode == "notify":
        needs_notify()
    argv = [world.prog("seccomp"), "listener", f"{MOUNT}/word"]
    native = subprocess.run(argv[:2], capture_output=True, text=True, timeout=30)
    assert native.stdout.splitlines() == ["listener fd"], native.stderr
    r = hep_exec(world.proxy, argv, options=["--stats-internals"], env={"HEP_EXEC_TRAP": mode})
    expected = "listener Device or resource busy" if mode == "notify" else "listener fd"
    assert lines_of(r) == [expected, "read word"]
    shown = "seccomp-notify" if mode == "notify" else "ptrace"
    assert re.search(rf"^hep-exec: trap mode: {shown} ", r.stderr, re.M), r.stderr


def test_own_seccomp_filter_without_listener_works(world: World) -> None:
    """A plain filter (no listener) installs under hep-exec and does what it does natively
    (getppid -> EXDEV), and hep-exec still serves /cvmfs below it, through the tracer and
    through the patched call site (the file is read twice)."""
    argv = [world.prog("seccomp"), "plain", f"{MOUNT}/word", f"{MOUNT}/word"]
    native = subprocess.run(argv[:2], capture_output=True, text=True, timeout=30)
    want = ["plain installed", "getppid -1 Invalid cross-device link"]
    assert native.stdout.splitlines() == want, native.stderr
    r = hep_exec(world.proxy, argv)
    assert lines_of(r) == [*want, "read word", "read word"]


def test_hep_exec_below_a_seccomp_listener_runs_in_ptrace_mode(world: World) -> None:
    """README: a seccomp listener already installed above hep-exec gets ptrace stops for
    everything (hep-exec could not install its own); the command still sees /cvmfs."""
    needs_notify()  # otherwise ptrace mode proves nothing
    cmd = hep_exec_cmd(
        world.proxy, [world.prog("probe"), "read", f"{MOUNT}/f01"], options=["--stats-internals"]
    )
    r = subprocess.run(
        [world.prog("under-listener"), *cmd],
        env=env_with(),
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert lines_of(r) == [read_line(world.src / "f01")]
    assert re.search(r"^hep-exec: trap mode: ptrace ", r.stderr, re.M), r.stderr
    assert "in-process" not in r.stderr


# ------------------------------------------------------------------ 5. patching under threads

RUNS = 4
THREADS = 4


@pytest.mark.slow
def test_call_site_patched_while_other_threads_call_it(world: World, tmp_path: Path) -> None:
    """TRACER.md: a glibc `mov; syscall` site is patched with int3 first, then the jump's
    offset, then its opcode, so threads running meanwhile are safe.  Four threads open, read
    and stat a /cvmfs file and call glibc's readlink site in a loop (with an empty path, which
    names nothing: a host path's first call, absolute or relative, would patch the site
    itself); the main thread's first readlink of a /cvmfs symlink gets that site patched.  In
    each of four fresh program images: every thread called before and after the site changed from
    `mov` (b8) to `jmp` (e9), i.e. the patch landed during their calls, every answer was
    right, and --stats counts the patched sites."""
    if "in-process" not in trap_mode_here():
        pytest.skip(f"no in-process answers here ({trap_mode_here()})")
    argv = [world.prog("patcher"), f"{MOUNT}/f02", f"{MOUNT}/link", "f00"]
    argv += ["", "", str(THREADS), "200"]
    script = f'for i in {" ".join(map(str, range(RUNS)))}; do "$@" || exit $?; done'
    sh = ["/bin/sh", "-c", script, "sh", *argv]
    r = hep_exec(world.proxy, sh, options=["--stats-internals"], cwd=tmp_path)
    out = lines_of(r)
    if "no glibc readlink site" in out:
        pytest.skip("this libc's readlink is not `mov $89,%eax; syscall`")
    one = ["site before b8", "site after e9"]
    one += [f"thread {k}: busy before the patch, busy after it" for k in range(THREADS)]
    one += ["wrong answers: main 0, threads 0"]
    assert out == one * RUNS, r.stderr
    m = re.search(r"stats: (\d+) .*; (\d+) call sites patched in (\d+) program images", r.stderr)
    assert m, r.stderr
    stats, sites, images = (int(g) for g in m.groups())
    assert images >= RUNS  # sh's image too
    assert sites >= 2 * RUNS  # at least stat's and readlink's in each image
    assert stats >= RUNS * THREADS * 200  # the workers' stats, answered in-process
