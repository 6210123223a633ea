"""Process side of ``hep-proxy serve``: bind the port, run N workers sharing it via SO_REUSEPORT.

The parent binds one SO_REUSEPORT socket per worker (so a port-in-use error is reported once,
clearly, before anything forks), forks the workers, restarts a worker that dies, and on
SIGTERM/SIGINT passes the signal on and waits for in-flight responses to finish.
"""

from __future__ import annotations

import ctypes
import errno
import os
import signal
import socket
import sys
import time
import traceback

import uvloop

from proxy.app import run_worker
from proxy.config import ProxyConfig
from proxy.stores import RepoDir, discover


class ServeError(Exception):
    """Cannot start serving; ``str()`` is a one-line message."""


def bind_sockets(host: str, port: int, count: int, backlog: int) -> list[socket.socket]:
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    where = f"[{host}]:{port}" if family == socket.AF_INET6 else f"{host}:{port}"
    probe = socket.socket(family, socket.SOCK_STREAM)
    try:
        probe.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        probe.bind((host, port))
        port = probe.getsockname()[1]
    except OSError as e:
        if e.errno == errno.EADDRINUSE:
            raise ServeError(f"cannot listen on {where}: address already in use") from None
        if e.errno == errno.EACCES:
            raise ServeError(f"cannot listen on {where}: permission denied") from None
        raise ServeError(f"cannot listen on {where}: {e.strerror or e}") from None
    except (socket.gaierror, OverflowError) as e:
        raise ServeError(f"cannot listen on {where}: {e}") from None
    finally:
        probe.close()
    socks: list[socket.socket] = []
    try:
        for _ in range(count):
            s = socket.socket(family, socket.SOCK_STREAM)
            socks.append(s)
            s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
            s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEPORT, 1)
            s.bind((host, port))
            s.listen(backlog)
            s.setblocking(False)
    except OSError as e:
        for s in socks:
            s.close()
        raise ServeError(f"cannot listen on {where}: {e.strerror or e}") from None
    return socks


def _die_with_parent() -> None:
    with_libc = ctypes.CDLL(None, use_errno=True)
    pr_set_pdeathsig = 1
    with_libc.prctl(pr_set_pdeathsig, signal.SIGTERM)


def _worker(cfg: ProxyConfig, repos: dict[str, RepoDir], sock: socket.socket) -> None:
    uvloop.run(run_worker(cfg, repos, sock))


def serve(cfg: ProxyConfig) -> int:
    """Run until SIGTERM/SIGINT; returns the exit status."""
    repos = discover(cfg.stores, cfg.upstreams)
    if cfg.access_log not in ("-", "off"):
        try:
            os.close(os.open(cfg.access_log, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o644))
        except OSError as e:
            raise ServeError(f"{cfg.access_log}: cannot open access log ({e.strerror})") from None
    n = cfg.worker_count
    socks = bind_sockets(cfg.host, cfg.port, n, cfg.backlog)
    host, port = socks[0].getsockname()[:2]
    shown = f"[{host}]" if ":" in host else host
    print(
        f"hep-proxy: serving {', '.join(sorted(repos))} on http://{shown}:{port}/cvmfs/ "
        f"with {n} worker{'s' if n > 1 else ''}",
        file=sys.stderr,
        flush=True,
    )
    if n == 1:
        _worker(cfg, repos, socks[0])
        return 0
    return _supervise(cfg, repos, socks)


def _supervise(cfg: ProxyConfig, repos: dict[str, RepoDir], socks: list[socket.socket]) -> int:
    mask = {signal.SIGTERM, signal.SIGINT, signal.SIGCHLD}
    signal.pthread_sigmask(signal.SIG_BLOCK, mask)
    children: dict[int, int] = {}
    restarts: list[float] = []
    parent = os.getpid()

    def spawn(index: int) -> None:
        sys.stdout.flush()
        sys.stderr.flush()
        pid = os.fork()
        if pid == 0:
            code = 0
            try:
                signal.pthread_sigmask(signal.SIG_UNBLOCK, mask)
                _die_with_parent()
                if os.getppid() != parent:
                    os._exit(0)
                for i, s in enumerate(socks):
                    if i != index:
                        s.close()
                _worker(cfg, repos, socks[index])
            except BaseException:
                traceback.print_exc()
                code = 1
            finally:
                sys.stdout.flush()
                sys.stderr.flush()
                os._exit(code)
        children[pid] = index

    for i in range(len(socks)):
        spawn(i)
    stopping = False
    status = 0
    deadline = 0.0
    while children:
        timeout = max(0.1, deadline - time.monotonic()) if stopping else None
        info = signal.sigtimedwait(mask, timeout) if timeout else signal.sigwaitinfo(mask)
        if info is None:
            for pid in children:
                os.kill(pid, signal.SIGKILL)
            deadline = time.monotonic() + 5
            continue
        if info.si_signo in (signal.SIGTERM, signal.SIGINT) and not stopping:
            stopping = True
            deadline = time.monotonic() + cfg.shutdown_timeout + 5
            # the parent's copies of the listening sockets would keep the port accepting
            # connections that no worker serves any more (they hang until exit): drop them
            for s in socks:
                s.close()
            for pid in children:
                os.kill(pid, signal.SIGTERM)
            continue
        while children:
            try:
                pid, wstatus = os.waitpid(-1, os.WNOHANG)
            except ChildProcessError:
                children.clear()
                break
            if pid == 0:
                break
            index = children.pop(pid, None)
            _mark_dead(pid)
            if index is None or stopping:
                continue
            print(
                f"hep-proxy: worker {pid} exited ({_describe(wstatus)}); restarting it",
                file=sys.stderr,
                flush=True,
            )
            now = time.monotonic()
            restarts[:] = [t for t in restarts if now - t < 10] + [now]
            if len(restarts) > 5:
                print("hep-proxy: workers keep dying; stopping", file=sys.stderr, flush=True)
                stopping, status = True, 1
                deadline = now + cfg.shutdown_timeout + 5
                for s in socks:
                    s.close()
                for other in children:
                    os.kill(other, signal.SIGTERM)
                continue
            spawn(index)
    return status


def _describe(wstatus: int) -> str:
    if os.WIFSIGNALED(wstatus):
        return f"signal {os.WTERMSIG(wstatus)}"
    return f"status {os.waitstatus_to_exitcode(wstatus)}"


def _mark_dead(pid: int) -> None:
    if os.environ.get("PROMETHEUS_MULTIPROC_DIR"):
        from prometheus_client import multiprocess

        multiprocess.mark_process_dead(pid)  # type: ignore[no-untyped-call]
