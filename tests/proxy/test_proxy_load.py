"""hep-proxy under load: 2,000 concurrent keep-alive connections from wrk (5 s by default,
HEP_SOAK_SECONDS=30 for the full soak) with no failed request and bounded memory; slow
clients (slowloris) are cut off without holding up anyone else."""

from __future__ import annotations

import contextlib
import os
import re
import shutil
import socket
import subprocess
import threading
import time
import urllib.request
from pathlib import Path

import pytest

from tests.support.proxy_process import start_proxy
from tests.support.repos import Repo, publish_tree

FQRN = "load.example.org"
WRK = shutil.which("wrk") or ""
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


def _rss_kib(pids: list[int]) -> int:
    total = 0
    for pid in pids:
        try:
            for line in Path(f"/proc/{pid}/status").read_text().splitlines():
                if line.startswith("VmRSS:"):
                    total += int(line.split()[1])
        except OSError:
            pass
    return total


def _urls(repo: Repo) -> list[str]:
    paths = [f"/cvmfs/{FQRN}/.cvmfspublished", f"/cvmfs/{FQRN}/.cvmfswhitelist"]
    paths += [
        f"/cvmfs/{FQRN}/{p.relative_to(repo.dir)}"
        for p in sorted((repo.dir / "data").glob("??/*"))
        if p.is_file()
    ]
    return paths


@pytest.mark.skipif(not WRK, reason="wrk is not installed (Debian package wrk)")
def test_2000_keepalive_connections(repo: Repo, tmp_path: Path) -> None:
    seconds = int(os.environ.get("HEP_SOAK_SECONDS", "5"))
    p = start_proxy(tmp_path, "--store", str(repo.store), workers=2)
    try:
        paths = tmp_path / "paths.txt"
        paths.write_text("\n".join(_urls(repo)) + "\n")
        script = tmp_path / "paths.lua"
        script.write_text(LUA % paths)
        pids = p.worker_pids()
        warm = subprocess.run(
            [WRK, "-t1", "-c20", "-d1s", "-s", str(script), p.url("")],
            capture_output=True, text=True, timeout=60,
        )  # fmt: skip
        assert warm.returncode == 0, warm.stderr
        baseline = _rss_kib(pids)
        peak = [baseline]
        stop = threading.Event()

        def sample() -> None:
            while not stop.wait(0.25):
                peak.append(_rss_kib(pids))

        sampler = threading.Thread(target=sample)
        sampler.start()
        try:
            out = subprocess.run(
                [WRK, "-t2", "-c2000", f"-d{seconds}s", "--timeout", "20s",
                 "-s", str(script), p.url("")],
                capture_output=True, text=True, timeout=seconds + 120,
            )  # fmt: skip
        finally:
            stop.set()
            sampler.join()
        assert out.returncode == 0, out.stderr
        text = out.stdout
        print(text, f"RSS baseline {baseline} KiB, peak {max(peak)} KiB")
        total = int(re.search(r"(\d+) requests in", text).group(1))  # type: ignore[union-attr]
        assert total > 2000, text
        assert "Socket errors" not in text, text
        assert "Non-2xx" not in text, text
        # memory: bounded by the object cache and per-connection buffers, not by traffic
        grown_mib = (max(peak) - baseline) / 1024
        assert grown_mib < 300, (baseline, max(peak))
        after = _rss_kib(pids)
        assert after < baseline + 300 * 1024
        # all workers still alive and serving
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


def test_slowloris_cannot_hold_the_server(repo: Repo, tmp_path: Path) -> None:
    p = start_proxy(tmp_path, "--store", str(repo.store), "--header-timeout", "2", workers=1)
    slow: list[socket.socket] = []
    try:
        for _ in range(300):
            slow.append(_slow_client(p.port, FQRN))
        idle = [socket.create_connection(("127.0.0.1", p.port)) for _ in range(50)]
        started = time.monotonic()
        served = 0
        while time.monotonic() - started < 4:
            for s in slow:
                with contextlib.suppress(OSError):
                    s.send(b"X")  # a byte at a time, never finishing the head
            with urllib.request.urlopen(p.url(f"/cvmfs/{FQRN}/.cvmfspublished"), timeout=5) as r:
                assert r.status == 200 and r.read()
                served += 1
            time.sleep(0.25)
        assert served >= 5
        deadline = time.monotonic() + 15
        pending = slow + idle
        while pending and time.monotonic() < deadline:
            pending = [s for s in pending if not _closed_by_server(s)]
            time.sleep(0.2)
        assert not pending, f"{len(pending)} slow connections still open"
    finally:
        for s in slow:
            s.close()
        assert p.stop() == 0
