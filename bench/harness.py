"""Set-up that the benchmarks under bench/ share: one copy of how they stage what they measure.

The benchmarks are extensionless scripts, one command each, which cannot import one another
as modules (bench/seed_table used to load bench/worker by its file path). So each carried its
own copy of the same set-up: waiting for a server's port, nginx with the tuned static
configuration, wrk and its report, stopping what it started, the tools of ../shared/reference,
hep-exec's node cache service, the C load generator that bench/worker and bench/seed_table run
natively and under hep-exec; and the copies had begun to differ (one wrk parser exited on
output it could not read, the other raised; one service stop escalated to SIGKILL, the other
did not). This module is the one copy; what a benchmark measures and prints stays in its
script. What tests use too stays in tests/support and is used from there: publishing a tree
(``tests.support.repos.publish_tree``), nginx for a plain store (``tests.support.nginx``),
hep-proxy as a process (``tests.support.proxy_process.start_proxy``).

A script imports it after putting the project root on ``sys.path`` (its own directory,
bench/, is already there: Python puts a script's directory first).
"""

from __future__ import annotations

import contextlib
import os
import re
import shutil
import signal
import socket
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator, Mapping, Sequence
from pathlib import Path
from typing import TypeVar

from tests.support.hep_exec import CLI
from tests.support.nginx import NGINX, Nginx, Site
from tests.support.proxy_process import ProxyProcess, start_proxy
from tests.support.repos import SHARED, publish_tree

ROOT = Path(__file__).resolve().parent.parent
REFERENCE = SHARED / "reference"  # cvmfs2, cvmfs_preload and Parrot, unpacked by its ./unpack

T = TypeVar("T")


# ---------------------------------------------------------------------- processes and ports


@contextlib.contextmanager
def scratch(prefix: str) -> Iterator[Path]:
    """A new temporary directory for one run, removed afterwards."""
    work = Path(tempfile.mkdtemp(prefix=prefix))
    try:
        yield work
    finally:
        shutil.rmtree(work, ignore_errors=True)


def wait_port(
    port: int,
    proc: subprocess.Popen[bytes] | None = None,
    what: str = "server",
    timeout: float = 20,
) -> None:
    """Return once something accepts connections on 127.0.0.1:``port``; end the benchmark,
    saying why, if ``proc`` exits first or nothing listens within ``timeout`` seconds."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if proc is not None and proc.poll() is not None:
            sys.exit(f"bench: {what} exited with status {proc.returncode}")
        try:
            with socket.create_connection(("127.0.0.1", port), timeout=0.2):
                return
        except OSError:
            time.sleep(0.05)
    sys.exit(f"bench: {what} did not start listening on port {port}")


def stop(proc: subprocess.Popen[bytes], grace: float = 20) -> None:
    """SIGTERM, then SIGKILL if ``proc`` is still there after ``grace`` seconds."""
    if proc.poll() is None:
        proc.send_signal(signal.SIGTERM)
    try:
        proc.wait(timeout=grace)
    except subprocess.TimeoutExpired:
        proc.kill()
        proc.wait()


@contextlib.contextmanager
def server(argv: Sequence[str], port: int, what: str) -> Iterator[subprocess.Popen[bytes]]:
    """``argv`` started, waited for until it listens on ``port``, stopped with :func:`stop`
    afterwards."""
    proc = subprocess.Popen(argv)
    try:
        wait_port(port, proc, what)
        yield proc
    finally:
        stop(proc)


@contextlib.contextmanager
def hep_proxy(
    workdir: Path, *args: str, workers: int = 1, port: int | None = None
) -> Iterator[ProxyProcess]:
    """``hep-proxy serve ARGS`` as a process (tests/support's :func:`start_proxy`: waits for
    /healthz, access log and stderr in ``workdir``), stopped afterwards."""
    proxy = start_proxy(workdir, *args, workers=workers, port=port)
    try:
        yield proxy
    finally:
        with contextlib.suppress(subprocess.TimeoutExpired):  # killed by then
            proxy.stop(timeout=20)


# ---------------------------------------------------------------------- nginx


@contextlib.contextmanager
def nginx_serving(workdir: Path, store: Path, *, access_log: bool = True) -> Iterator[str]:
    """tests/support's plain nginx (one worker) serving ``store`` at /cvmfs/ on loopback, files
    in ``workdir``; yields its URL (``http://127.0.0.1:PORT``), stopped afterwards."""
    site = Site(root=store)
    nginx = Nginx(workdir, [site], access_log=access_log)
    try:
        yield f"http://127.0.0.1:{site.port}"
    finally:
        nginx.stop()


NGINX_CONF = """
daemon off;
master_process on;
worker_processes {workers};
{nofile}{user}
pid {tmp}/nginx.pid;
error_log {tmp}/nginx-error.log warn;
events {{ worker_connections {worker_connections}; }}
http {{
    access_log {tmp}/nginx-access.log combined buffer=64k flush=1s;
    open_file_cache max=10000 inactive=60s;
    open_file_cache_valid 60s;
    sendfile on;
    tcp_nopush on;
    keepalive_requests 10000000;
    keepalive_timeout 75s;
    etag off;
    server_tokens off;
    types {{ }}
    default_type application/octet-stream;
    client_body_temp_path {tmp}/client_body;
    proxy_temp_path {tmp}/proxy;
    fastcgi_temp_path {tmp}/fastcgi;
    uwsgi_temp_path {tmp}/uwsgi;
    scgi_temp_path {tmp}/scgi;
    server {{
        listen 127.0.0.1:{port} reuseport{backlog};
        location ~ ^/cvmfs/([^/]+)/\\.cvmfs {{
            root {parent};
            add_header Cache-Control "max-age=61";
            default_type application/x-cvmfs;
        }}
        location /cvmfs/ {{
            alias {store}/;
            add_header Cache-Control "max-age=259200";
        }}
    }}
}}
"""


def tuned_nginx(
    tmp: Path,
    port: int,
    store: Path,
    *,
    workers: int,
    worker_connections: int = 4096,
    nofile: int | None = None,
    backlog: int | None = None,
) -> contextlib.AbstractContextManager[subprocess.Popen[bytes]]:
    """nginx as the reference static server of a benchmark: ``store`` (its ``<fqrn>/``
    directories) at /cvmfs/ on 127.0.0.1:``port``, with sendfile, open_file_cache, a buffered
    access log and ``workers`` worker processes; files in ``tmp``. ``nofile``: the workers'
    RLIMIT_NOFILE; ``backlog``: the listen queue (both nginx's default if None)."""
    conf = tmp / "nginx.conf"
    conf.write_text(
        NGINX_CONF.format(
            workers=workers,
            nofile=f"worker_rlimit_nofile {nofile};\n" if nofile else "",
            user="user root root;" if os.geteuid() == 0 else "",
            worker_connections=worker_connections,
            backlog=f" backlog={backlog}" if backlog else "",
            tmp=tmp,
            port=port,
            store=store,
            parent=store.parent,
        )
    )
    argv = [NGINX, "-p", str(tmp), "-c", str(conf), "-e", str(tmp / "err.log")]
    return server(argv, port, "nginx")


# ---------------------------------------------------------------------- wrk

WRK_SCRIPT = """
local paths = {}
for line in io.lines("%s") do paths[#paths + 1] = line end
local i = 0
request = function()
  i = i + 1
  if i > #paths then i = 1 end
  return wrk.format("GET", paths[i]%s)
end
"""


def wrk_script(paths: list[str], listing: Path, user_agent: str | None = None) -> Path:
    """A wrk script (``listing`` with the suffix .lua) that asks for ``paths`` in turn, over and
    over; the paths are written to ``listing``."""
    listing.write_text("\n".join(paths) + "\n")
    headers = f', {{["User-Agent"] = "{user_agent}"}}' if user_agent else ""
    script = listing.with_suffix(".lua")
    script.write_text(WRK_SCRIPT % (listing, headers))
    return script


def run_wrk(
    port: int,
    script: Path,
    *options: str,
    threads: int,
    connections: int,
    duration: int,
    limit: float | None = None,
) -> str:
    """wrk's report of ``script`` against 127.0.0.1:``port``; ``options`` go before the script
    (``--latency``, ``--timeout 10s``); ``limit``: seconds before giving up [duration + 60]."""
    argv = ["wrk", f"-t{threads}", f"-c{connections}", f"-d{duration}s", *options,
            "-s", str(script), f"http://127.0.0.1:{port}"]  # fmt: skip
    limit = duration + 60 if limit is None else limit
    return subprocess.run(argv, capture_output=True, text=True, check=True, timeout=limit).stdout


def parse_wrk(out: str) -> dict[str, float]:
    """From a ``--latency`` report: rps, mbs (MB/s), p50 and p99 (ms), errors (socket errors
    and non-2xx/3xx answers)."""

    def num(pattern: str) -> re.Match[str]:
        m = re.search(pattern, out)
        if m is None:
            sys.exit(f"bench: cannot read wrk's output:\n{out}")
        return m

    unit = {"us": 1e-3, "ms": 1.0, "s": 1e3, "m": 6e4}
    scale = {"B": 1e-6, "KB": 1024 / 1e6, "MB": 1024**2 / 1e6, "GB": 1024**3 / 1e6}
    tr = num(r"Transfer/sec:\s+([\d.]+)(\w+)")
    p50 = num(r"50%\s+([\d.]+)(\w+)")
    p99 = num(r"99%\s+([\d.]+)(\w+)")
    errors = 0
    m = re.search(r"Socket errors: connect (\d+), read (\d+), write (\d+), timeout (\d+)", out)
    if m:
        errors += sum(int(x) for x in m.groups())
    m = re.search(r"Non-2xx or 3xx responses: (\d+)", out)
    if m:
        errors += int(m.group(1))
    return {
        "rps": float(num(r"Requests/sec:\s+([\d.]+)").group(1)),
        "mbs": float(tr.group(1)) * scale[tr.group(2)],
        "p50": float(p50.group(1)) * unit[p50.group(2)],
        "p99": float(p99.group(1)) * unit[p99.group(2)],
        "errors": errors,
    }


def alternating(rounds: int, names: Sequence[T]) -> Iterator[tuple[int, T]]:
    """(round, name) for every name in every round, the order reversed every other round."""
    for rnd in range(rounds):
        for name in names if rnd % 2 == 0 else names[::-1]:
            yield rnd, name


def print_header(header: str) -> None:
    """A table's header line and a rule as long."""
    print(header)
    print("-" * len(header))


# ---------------------------------------------------------------------- the analysis stack

STACK = ["numpy", "scipy", "pandas", "matplotlib", "awkward", "uproot", "hist"]


def build_stack(cache: Path) -> Path:
    """The application tree (``<cache>/src/app/site-packages``), built once: into a temp dir,
    renamed when complete, so an interrupted build is never mistaken for a finished one."""
    src = cache / "src"
    if (src / "app" / "site-packages").is_dir():
        return src / "app"
    tmp = cache / "src.tmp"
    shutil.rmtree(tmp, ignore_errors=True)
    site = tmp / "app" / "site-packages"
    print(f"building the tree once: pip install {' '.join(STACK)} ...", flush=True)
    pip = [sys.executable, "-m", "pip", "install", "--quiet", "--target", str(site)]
    subprocess.run([*pip, *STACK], check=True)
    # -f: pip already wrote timestamp pycs, which compileall would otherwise keep
    compile_ = [sys.executable, "-m", "compileall", "-q", "-f", "--invalidation-mode"]
    r = subprocess.run([*compile_, "unchecked-hash", str(site)], stdout=subprocess.DEVNULL)
    if r.returncode:
        print(f"compileall: some files did not compile (exit {r.returncode})")
    tmp.rename(src)
    return src / "app"


def analysis_stack(cache: Path, fqrn: str) -> tuple[Path, Path]:
    """A real Python analysis stack (STACK, pip-installed once into ``cache``) published as
    ``fqrn`` into ``cache/store`` (once): (the tree, the repository's public key).  Real
    programs over a real tree, for bench/app_startup and bench/tools alike."""
    tree = build_stack(cache)
    # hep-exec's own modules byte-compiled now: with PYTHONDONTWRITEBYTECODE set (some shells
    # do), a module edited since its .pyc was written is compiled again by every job (~8 ms)
    packages = ["worker", "cvmfs_format", "cvmfs_download", "hep_cli.py"]
    subprocess.run([sys.executable, "-m", "compileall", "-q", *packages], cwd=ROOT,
                   stdout=subprocess.DEVNULL, check=False)  # fmt: skip
    if not (cache / "store" / fqrn / ".cvmfspublished").exists():
        print(f"publishing {tree} as {fqrn} (once; kept in {cache}) ...", flush=True)
        publish_tree(tree, cache / "store", fqrn, cache / "keys")
    return tree, cache / "keys" / f"{fqrn}.pub"


# ---------------------------------------------------------------------- reference tools, hep-exec


def unpack_reference(dest: Path) -> dict[str, str] | None:
    """../shared/reference's tools unpacked into ``dest`` (its ``unpack`` skips what is there)
    and the environment its ``env.sh`` sets; None when ../shared has no reference."""
    if not (REFERENCE / "unpack").exists():
        return None
    subprocess.run([str(REFERENCE / "unpack"), str(dest)], check=True, stdout=subprocess.DEVNULL)
    out = subprocess.run(["sh", "-c", ". ./env.sh && env -0"], cwd=dest,
                         check=True, capture_output=True, text=True).stdout  # fmt: skip
    return dict(kv.split("=", 1) for kv in out.split("\0") if "=" in kv)


def cvmfs2_unavailable(ref: Mapping[str, str] | None) -> str:
    """Why the real cvmfs2 FUSE client cannot be mounted here ("" if it can)."""
    if ref is None:
        return f"{REFERENCE} absent"
    if os.geteuid() != 0:
        return "not root"
    if not os.path.exists("/dev/fuse"):
        return "no /dev/fuse"
    if not shutil.which("fusermount3", path=ref["PATH"]):
        return ("fusermount3 missing (Debian: apt-get install -y fuse3; not installed by "
                "this benchmark)")  # fmt: skip
    return ""


@contextlib.contextmanager
def cvmfs2_mounted(
    ref: Mapping[str, str], work: Path, fqrn: str, server: str, key: Path
) -> Iterator[tuple[Path, float]]:
    """The real cvmfs2 mounted from ``server`` (``http://host:port``, serving
    /cvmfs/<fqrn>) with a fresh private cache under ``work``: (mountpoint, seconds the mount
    took); unmounted and removed after."""
    d = Path(tempfile.mkdtemp(prefix="cvmfs2-", dir=work))
    (d / "cache").mkdir()
    (d / "mnt").mkdir()
    conf = d / "c.conf"
    conf.write_text(
        f"CVMFS_SERVER_URL={server}/cvmfs/@fqrn@\nCVMFS_HTTP_PROXY=DIRECT\n"
        f"CVMFS_PUBLIC_KEY={key}\nCVMFS_CACHE_BASE={d / 'cache'}\n"
        f"CVMFS_RELOAD_SOCKETS={d / 'cache'}\nCVMFS_USER=root\nCVMFS_SHARED_CACHE=no\n"
        "CVMFS_QUOTA_LIMIT=-1\n"
    )
    env = {**os.environ, **ref}
    cvmfs2 = shutil.which("cvmfs2", path=ref["PATH"]) or "cvmfs2"
    mount = [cvmfs2, "-o", f"config={conf},fsname=cvmfs2", fqrn, str(d / "mnt")]
    try:
        t = time.monotonic()
        r = subprocess.run(mount, env=env, capture_output=True, text=True, timeout=300)
        took = time.monotonic() - t
        if r.returncode != 0:
            raise RuntimeError(f"cvmfs2 mount: exit {r.returncode}\n{r.stderr[-2000:]}")
        yield d / "mnt", took
    finally:
        umount = subprocess.run(["fusermount3", "-u", str(d / "mnt")], env=env,
                                capture_output=True, text=True)  # fmt: skip
        if umount.returncode and os.path.ismount(d / "mnt"):
            print(f"fusermount3 -u {d / 'mnt'}: {umount.stderr.strip()}; lazy unmount")
            subprocess.run(["fusermount3", "-uz", str(d / "mnt")], env=env, check=False)
        shutil.rmtree(d, ignore_errors=True)


def stop_service(cache_dir: Path) -> None:
    """Kill the node cache service answering in ``cache_dir``, if any: nothing is left running."""
    from worker.node.cache_client import CacheClient, ServiceGone

    try:
        client = CacheClient.attach(cache_dir)
    except (OSError, ServiceGone):
        return
    client.close()
    with contextlib.suppress(ProcessLookupError):
        os.kill(client.server_pid, signal.SIGTERM)
        for _ in range(100):
            os.kill(client.server_pid, 0)
            time.sleep(0.05)
        os.kill(client.server_pid, signal.SIGKILL)


# ---------------------------------------------------------------------- the C load generator

# The clock and buffer of the C programs that time a loop of calls (the load generator here,
# bench/worker's trap floors), pasted after their #includes.
C_CLOCK = r"""static char buf[1 << 20];
static double now(void) {
    struct timespec t;
    clock_gettime(CLOCK_MONOTONIC, &t);
    return t.tv_sec + t.tv_nsec / 1e9;
}
"""

# argv: OP PATH SECONDS; prints "<ops/s> <MB/s>"
LOADGEN = (
    r"""
#define _GNU_SOURCE
#include <fcntl.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/mman.h>
#include <sys/socket.h>
#include <sys/stat.h>
#include <sys/wait.h>
#include <time.h>
#include <unistd.h>
"""
    + C_CLOCK
    + r"""static long long once(const char *op, const char *path) {
    long long bytes = 0;
    if (!strcmp(op, "open")) {
        int fd = open(path, O_RDONLY); if (fd < 0) { perror(path); exit(1); } close(fd);
    } else if (!strcmp(op, "stat")) {
        struct stat st; if (stat(path, &st)) { perror(path); exit(1); }
    } else {
        int fd = open(path, O_RDONLY); if (fd < 0) { perror(path); exit(1); }
        ssize_t r; while ((r = read(fd, buf, sizeof buf)) > 0) bytes += r;
        close(fd);
    }
    return bytes;
}
/* fd passing: the parent opens the file once and sends the fd over a Unix socket again and
 * again; the child receives it, preads it whole, closes it and acknowledges. */
static int send_fd(int s, int fd) {
    char c = 'f'; struct iovec io = {&c, 1};
    union { struct cmsghdr h; char b[CMSG_SPACE(sizeof(int))]; } u;
    struct msghdr m = {0}; m.msg_iov = &io; m.msg_iovlen = 1;
    m.msg_control = u.b; m.msg_controllen = sizeof u.b;
    struct cmsghdr *h = CMSG_FIRSTHDR(&m);
    h->cmsg_level = SOL_SOCKET; h->cmsg_type = SCM_RIGHTS; h->cmsg_len = CMSG_LEN(sizeof(int));
    memcpy(CMSG_DATA(h), &fd, sizeof fd);
    return sendmsg(s, &m, 0) == 1 ? 0 : -1;
}
static int recv_fd(int s) {
    char c; struct iovec io = {&c, 1};
    union { struct cmsghdr h; char b[CMSG_SPACE(sizeof(int))]; } u;
    struct msghdr m = {0}; m.msg_iov = &io; m.msg_iovlen = 1;
    m.msg_control = u.b; m.msg_controllen = sizeof u.b;
    if (recvmsg(s, &m, 0) != 1) return -1;
    int fd; memcpy(&fd, CMSG_DATA(CMSG_FIRSTHDR(&m)), sizeof fd);
    return fd;
}
static int to_memfd(int fd) {
    if (fcntl(fd, F_GET_SEALS) >= 0) return fd; /* already shmem (hep-exec's /cvmfs) */
    int m = memfd_create("shm", 0);
    ssize_t r;
    while ((r = read(fd, buf, sizeof buf)) > 0) if (write(m, buf, r) != r) return -1;
    close(fd);
    return m;
}
static int pass(const char *path, double secs, int shm) {
    int fd = open(path, O_RDONLY), sv[2];
    if (shm && fd >= 0) fd = to_memfd(fd);
    if (fd < 0 || socketpair(AF_UNIX, SOCK_STREAM, 0, sv)) { perror(path); return 1; }
    pid_t pid = fork();
    if (pid == 0) {
        close(sv[0]);
        for (int f; (f = recv_fd(sv[1])) >= 0;) {
            long long n = 0; ssize_t r;
            while ((r = pread(f, buf, sizeof buf, n)) > 0) n += r;
            close(f);
            if (write(sv[1], &n, sizeof n) != sizeof n) break;
        }
        _exit(0);
    }
    close(sv[1]);
    long n = 0; long long bytes = 0, got;
    double t0 = now(), t;
    do {
        if (send_fd(sv[0], fd) || read(sv[0], &got, sizeof got) != sizeof got) return 1;
        bytes += got; n++;
        t = now();
    } while (t - t0 < secs);
    close(sv[0]);
    waitpid(pid, NULL, 0);
    printf("%f %f\n", n / (t - t0), bytes / (t - t0) / 1e6);
    return 0;
}
/* read throughput of an open file: one pread of the whole file, again and again (the 2016
 * study's "file read" figure: reads only, no open per read) */
static int preadloop(const char *path, double secs) {
    int fd = open(path, O_RDONLY);
    if (fd < 0) { perror(path); return 1; }
    struct stat st;
    fstat(fd, &st);
    size_t len = (size_t)st.st_size < sizeof buf ? (size_t)st.st_size : sizeof buf;
    long n = 0; long long bytes = 0;
    double t0 = now(), t;
    do {
        for (int i = 0; i < 64; i++) { bytes += pread(fd, buf, len, 0); n++; }
        t = now();
    } while (t - t0 < secs);
    close(fd);
    printf("%f %f\n", n / (t - t0), bytes / (t - t0) / 1e6);
    return 0;
}
int main(int argc, char **argv) {
    const char *op = argv[1], *path = argv[2];
    double secs = atof(argv[3]);
    if (!strcmp(op, "pass")) return pass(path, secs, 0);
    if (!strcmp(op, "shm")) return pass(path, secs, 1);
    if (!strcmp(op, "preadloop")) return preadloop(path, secs);
    once(op, path); /* warm-up: the first open fetches */
    long n = 0; long long bytes = 0;
    double t0 = now(), t;
    do {
        for (int i = 0; i < 64; i++) { bytes += once(op, path); n++; }
        t = now();
    } while (t - t0 < secs);
    printf("%f %f\n", n / (t - t0), bytes / (t - t0) / 1e6);
    return 0;
}
"""
)

LOADGEN_FQRN = "bench.example.org"
LOADGEN_MOUNT = f"/cvmfs/{LOADGEN_FQRN}"
COLD_FILES, COLD_SIZE = 48, 1 << 20


class Modes:
    """The load generator's tree, natively on local disk and under hep-exec in its modes:
    native, host (the tracer with a host-directory policy), hep-exec and its variants -busy,
    -1cpu, -ptrace, -memfd, -trapped (bench/worker's docstring says what each is)."""

    def __init__(self, work: Path, data: Path, proxy: str) -> None:
        self.work, self.data, self.proxy = work, data, proxy
        self.env = dict(os.environ, PYTHONPATH=str(ROOT), PYTHONDONTWRITEBYTECODE="1")

    def prefix(self, mode: str) -> list[str]:
        """The command line that runs a command in ``mode`` (empty for native)."""
        if mode == "native":
            return []
        if mode == "host":
            return [sys.executable, "-m", "worker.trace.hostpolicy", "--map",
                    f"{LOADGEN_FQRN}={self.data}", "--"]  # fmt: skip
        cpu = ["taskset", "-c", str(min(os.sched_getaffinity(0)))] if mode.endswith("1cpu") else []
        return [*cpu, *CLI, "--server", self.proxy, "--no-shared-cache", "--ram", "1G", "--"]

    def where(self, mode: str) -> str:
        return str(self.data) if mode == "native" else LOADGEN_MOUNT

    def run(self, mode: str, argv: list[str]) -> str:
        env = dict(self.env, HEP_EXEC_TRAP="ptrace") if "ptrace" in mode else self.env
        if "memfd" in mode:
            env = dict(env, HEP_EXEC_RAM_FILES="memfd")
        if "trapped" in mode:
            env = dict(env, HEP_EXEC_IN_PROCESS="0")
        # busy: every other CPU kept busy, as on a full batch node (no idle CPU to wake)
        n_busy = len(os.sched_getaffinity(0)) - 1 if mode.endswith("busy") else 0
        spinners = [subprocess.Popen([sys.executable, "-c", "while True: pass"])
                    for _ in range(n_busy)]  # fmt: skip
        try:
            if spinners:
                time.sleep(0.1)
            r = subprocess.run([*self.prefix(mode), *argv], capture_output=True, text=True,
                               env=env)  # fmt: skip
        finally:
            for p in spinners:
                p.kill()
                p.wait()
        if r.returncode != 0:
            raise SystemExit(f"bench/worker: {mode} run failed ({r.returncode}): {r.stderr}")
        return r.stdout

    def medians(
        self, exe: Path, modes: list[str], op: str, fname: str, unit: str, repeat: int,
        seconds: float,
    ) -> dict[str, float]:  # fmt: skip
        """Median per mode of one load-generator figure (ops/s or MB/s); modes are interleaved
        in every round so that load changes on the machine hit all of them alike."""
        got: dict[str, list[float]] = {m: [] for m in modes}
        for _ in range(repeat):
            for mode in modes:
                out = self.run(mode, [str(exe), op, f"{self.where(mode)}/{fname}", str(seconds)])
                ops, mbs = (float(x) for x in out.split())
                got[mode].append(mbs if unit == "MB/s" else ops)
        return {m: statistics.median(v) for m, v in got.items()}


def import_tree(base: Path, n: int) -> None:
    """``base/bigpkg``: ``n`` modules in packages of 50, each importing the next level."""
    pkg = base / "bigpkg"
    for i in range(n // 50):
        sub = pkg / f"m{i:03d}"
        sub.mkdir(parents=True)
        (sub / "__init__.py").write_text("".join(f"from . import x{j}\n" for j in range(49)))
        for j in range(49):
            body = f"VALUE = {i * 100 + j}\ndef f(a):\n    return a + VALUE\n"
            (sub / f"x{j}.py").write_text(body)
    (pkg / "__init__.py").write_text("".join(f"from . import m{i:03d}\n" for i in range(n // 50)))


def compile_c(source: str, exe: Path) -> Path:
    """``source`` compiled with gcc -O2 into ``exe`` (the source beside it, ``exe.c``)."""
    src = exe.with_name(exe.name + ".c")
    src.write_text(source)
    subprocess.run(["gcc", "-O2", "-o", str(exe), str(src)], check=True)
    return exe


@contextlib.contextmanager
def loadgen_setup(
    prefix: str, programs: Mapping[str, str] | None = None
) -> Iterator[tuple[Modes, Path]]:
    """The load generator's world in a new work directory (removed afterwards): files of 4 KiB,
    128 KiB and 1 MiB, 2,000 modules and ``COLD_FILES`` files under cold/, published as
    ``LOADGEN_FQRN`` and served by nginx; the load generator and ``programs`` (name -> C
    source) compiled into the work directory. Yields the modes and the load generator."""
    if not shutil.which("nginx") and not Path("/usr/sbin/nginx").exists():
        raise SystemExit("bench: nginx not found (needed to serve the store)")
    with scratch(prefix) as work:
        subprocess.run([sys.executable, "setup.py", "-q", "build_ext", "--inplace"], cwd=ROOT,
                       check=True, capture_output=True)  # fmt: skip
        data = work / "data"
        data.mkdir()
        for name, size in (("f4k", 4096), ("f128k", 131072), ("f1m", 1 << 20)):
            (data / name).write_bytes(os.urandom(size))
        import_tree(data, 2000)
        (data / "cold").mkdir()
        for i in range(COLD_FILES):
            (data / "cold" / f"c{i:02d}").write_bytes(os.urandom(COLD_SIZE))
        exe = compile_c(LOADGEN, work / "loadgen")
        for name, source in (programs or {}).items():
            compile_c(source, work / name)
        t0 = time.perf_counter()
        publish_tree(data, work / "store", LOADGEN_FQRN, work / "keys")
        print(f"published {LOADGEN_FQRN} in {time.perf_counter() - t0:.1f} s; ", end="")
        with nginx_serving(work / "nginx", work / "store") as proxy:
            load = os.getloadavg()[0]
            print(f"nginx on {proxy}; load average {load:.2f} on {os.cpu_count()} CPUs")
            from worker.ram.ramfiles import RamFiles

            files = RamFiles()
            print(f"hep-exec's RAM files: {files.describe()}")
            files.close()
            yield Modes(work, data, proxy), exe
