"""hep-proxy under load: 2,000 concurrent keep-alive connections from wrk (5 s by default,
HEP_SOAK_SECONDS=30 for the full soak) all taken at once, no failed request or timeout, memory
bounded, the workers alive; slow clients (slowloris) are cut off without holding up anyone else.

Behaviour only: the figures (requests/s, latency, memory, beside nginx) are bench/proxy_load's.
"""

from __future__ import annotations

import contextlib
import os
import re
import resource
import shutil
import socket
import subprocess
import time
import urllib.request
from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.support.proxy_process import start_proxy
from tests.support.repos import Repo, publish_tree
from tests.support.waiting import WaitTimeout, wait_until

FQRN = "load.example.org"
WRK = shutil.which("wrk") or ""
CONNECTIONS = 2000
NOFILE_NEEDED = 4096  # wrk's 2,000 sockets in one process, the workers' share in theirs
LUA = """
local paths = {}
for line in io.lines("%s") do paths[#paths + 1] = line end
local i = 0
request = function()
  i = i + 1
  if i > #paths then i = 1 end
  return wrk.format("GET", paths[i], {["User-Agent"] = "cvmfs Fuse 2.11.2"})
end
"""


@pytest.fixture(scope="module")
def repo(tmp_path_factory: pytest.TempPathFactory) -> Repo:
    base = tmp_path_factory.mktemp("load")
    src = base / "src"
    src.mkdir()
    for i in range(200):
        (src / f"f{i:03d}.bin").write_bytes(os.urandom(512 + 37 * i))
    (src / "big.bin").write_bytes(os.urandom(600_000))
    r, _ = publish_tree(src, base / "store", FQRN, base / "keys")
    return r


@pytest.fixture
def nofile_raised() -> Iterator[int]:
    """RLIMIT_NOFILE's soft limit raised to the hard limit for this test (processes started
    meanwhile inherit it), restored afterwards; skips when the hard limit is too low."""
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if hard == resource.RLIM_INFINITY:
        target = max(soft, int(Path("/proc/sys/fs/nr_open").read_text()))
    else:
        target = hard
    if target < NOFILE_NEEDED:
        pytest.skip(
            f"{CONNECTIONS} connections need RLIMIT_NOFILE >= {NOFILE_NEEDED}, and the hard "
            f"limit here is {hard} (raise it, e.g. `ulimit -Hn {NOFILE_NEEDED}` as root)"
        )
    resource.setrlimit(resource.RLIMIT_NOFILE, (target, hard))
    try:
        yield target
    finally:
        resource.setrlimit(resource.RLIMIT_NOFILE, (soft, hard))


def _kib(pid: int, field: str) -> int:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith(field + ":"):
            return int(line.split()[1])
    raise AssertionError(f"no {field} for {pid}")


def _established(port: int) -> int:
    """Connections to ``port`` the kernel has established (accepted by the server process or
    waiting in its listen queue)."""
    n = 0
    for line in Path("/proc/net/tcp").read_text().splitlines()[1:]:
        fields = line.split()  # sl local_address rem_address st …
        n += fields[3] == "01" and int(fields[1].rsplit(":", 1)[1], 16) == port
    return n


def _paths(repo: Repo) -> list[str]:
    files = [".cvmfspublished", ".cvmfswhitelist", *repo.objects()]
    return [f"/cvmfs/{FQRN}/{f}" for f in files]


@pytest.mark.load
@pytest.mark.slow
@pytest.mark.skipif(not WRK, reason="wrk is not installed (Debian package wrk)")
def test_2000_keepalive_connections(repo: Repo, tmp_path: Path, nofile_raised: int) -> None:
    seconds = int(os.environ.get("HEP_SOAK_SECONDS", "5"))
    p = start_proxy(tmp_path, "--store", str(repo.store), workers=2)
    try:
        paths = tmp_path / "paths.txt"
        paths.write_text("\n".join(_paths(repo)) + "\n")
        script = tmp_path / "paths.lua"
        script.write_text(LUA % paths)
        pids = p.worker_pids()
        assert len(pids) == 2
        warm = subprocess.run(
            [WRK, "-t1", "-c20", "-d1s", "-s", str(script), p.url("")],
            capture_output=True, text=True, timeout=60,
        )  # fmt: skip
        assert warm.returncode == 0, warm.stderr
        baseline = sum(_kib(pid, "VmRSS") for pid in pids)
        wrk = subprocess.Popen(
            [WRK, "-t2", f"-c{CONNECTIONS}", f"-d{seconds}s", "--timeout", "20s",
             "-s", str(script), p.url("")],
            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
        )  # fmt: skip
        try:
            # all connections are taken at once: the listen backlog queues every one of them
            # (none refused or dropped), to be accepted as the workers get to them
            most = [0]

            def all_established() -> bool:
                assert wrk.poll() is None, f"wrk ended first; most connections at once: {most}"
                most[0] = max(most[0], _established(p.port))
                return most[0] >= CONNECTIONS

            try:
                wait_until(all_established, seconds, what=f"{CONNECTIONS} connections at once")
            except WaitTimeout as e:
                out, err = wrk.communicate(timeout=seconds + 120)
                raise AssertionError(f"{e}; most at once: {most[0]}; wrk: {out}{err}") from None
            out, err = wrk.communicate(timeout=seconds + 120)
        finally:
            if wrk.poll() is None:
                wrk.kill()
                wrk.wait()
        assert wrk.returncode == 0, err
        assert f"{CONNECTIONS} connections" in out, out
        total = int(re.search(r"(\d+) requests in", out).group(1))  # type: ignore[union-attr]
        assert total > CONNECTIONS, out  # the connections were kept alive and reused
        assert "Socket errors" not in out, out  # no connect/read/write error, no timeout
        assert "Non-2xx" not in out, out
        # memory: bounded by the object cache and per-connection buffers, not by traffic
        peak = sum(_kib(pid, "VmHWM") for pid in pids)
        assert (peak - baseline) / 1024 < 300, (baseline, peak)
        # the same workers still alive and serving
        assert p.worker_pids() == pids
        with urllib.request.urlopen(p.url("/healthz"), timeout=5) as r:
            assert r.status == 200
    finally:
        assert p.stop() == 0
    assert "Traceback" not in p.errors(), p.errors()[-3000:]


def _slow_client(port: int, fqrn: str) -> socket.socket:
    s = socket.create_connection(("127.0.0.1", port), timeout=30)
    s.sendall(f"GET /cvmfs/{fqrn}/.cvmfspublished HTTP/1.1\r\nHost: x\r\n".encode())
    return s


def _closed_by_server(s: socket.socket) -> bool:
    s.setblocking(False)
    try:
        data = s.recv(4096)
    except BlockingIOError:
        return False
    except OSError:
        return True
    return data == b"" or data.startswith(b"HTTP/1.1 4")


@pytest.mark.slow
def test_slowloris_cannot_hold_the_server(repo: Repo, tmp_path: Path) -> None:
    header_timeout = 2.0
    p = start_proxy(
        tmp_path, "--store", str(repo.store), "--header-timeout", str(header_timeout), workers=1
    )
    slow: list[socket.socket] = []
    idle: list[socket.socket] = []
    try:
        connected = time.monotonic()
        for _ in range(300):
            slow.append(_slow_client(p.port, FQRN))
        idle += [socket.create_connection(("127.0.0.1", p.port)) for _ in range(50)]
        served = 0
        while time.monotonic() - connected < 2 * header_timeout:
            for s in slow:
                with contextlib.suppress(OSError):
                    s.send(b"X")  # a byte at a time, never finishing the head
            with urllib.request.urlopen(p.url(f"/cvmfs/{FQRN}/.cvmfspublished"), timeout=5) as r:
                assert r.status == 200 and r.read()
                served += 1
            time.sleep(0.25)  # the slow clients' pace
        assert served >= 5  # others were answered all along
        pending = slow + idle

        def all_closed() -> bool:
            pending[:] = [s for s in pending if not _closed_by_server(s)]
            return not pending

        wait_until(all_closed, 15, what="the server closing the slow and idle connections")
    finally:
        for s in slow + idle:
            s.close()
        assert p.stop() == 0
