"""The site path at scale: workers → squid (collapsed forwarding) → two hep-proxy instances.

Workers name ``squid;p1|p2``: the squid first, the two proxies load-balanced behind it as the
fall-back group. A first job runs through the whole chain; during a second job the squid and
one proxy are killed, and the job still completes with correct output.
"""

from __future__ import annotations

import hashlib
import os
import random
import shutil
import signal
import subprocess
import sys
import tempfile
import time
import urllib.error
import urllib.request
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest

from tests.support.network import free_port
from tests.support.proxy_process import ProxyProcess, start_proxy
from tests.support.repos import PROJECT, Repo, publish_tree

FQRN = "scale.example.org"
SQUID = shutil.which("squid") or "/usr/sbin/squid"

# Reverse-proxy (accelerator) squid: the workers' first proxy group, in front of p1|p2.
SQUID_CONF = """
http_port 127.0.0.1:{port} accel defaultsite=hep-proxy no-vhost
cache_peer 127.0.0.1 parent {p1} 0 {peer} name=p1
cache_peer 127.0.0.1 parent {p2} 0 {peer} name=p2
collapsed_forwarding on
pid_filename {tmp}/squid.pid
access_log stdio:{tmp}/access.log squid
cache_log {tmp}/cache.log
cache_store_log none
coredump_dir {tmp}
netdb_filename none
cache_mem 128 MB
maximum_object_size_in_memory 16 MB
maximum_object_size 64 MB
acl clients src 127.0.0.1/32
http_access allow clients
http_access deny all
never_direct allow all
refresh_pattern . 0 20% 4320
shutdown_lifetime 1 seconds
"""
PEER_OPTIONS = "no-query no-digest originserver round-robin connect-fail-limit=1"


def _tree(root: Path) -> dict[str, str]:
    rng = random.Random(7)
    digests: dict[str, str] = {}
    for i in range(120):
        d = root / f"pkg{i % 6}" / ("sub" if i % 3 else "")
        d.mkdir(parents=True, exist_ok=True)
        data = rng.randbytes(rng.choice([100, 3000, 70_000, 600_000]))
        (d / f"f{i:03d}.bin").write_bytes(data)
    (root / "pkg1" / ".cvmfscatalog").touch()
    for p in sorted(root.rglob("*")):
        if p.is_file():
            digests[str(p.relative_to(root))] = hashlib.sha256(p.read_bytes()).hexdigest()
    return digests


@dataclass
class Chain:
    repo: Repo
    digests: dict[str, str]
    p1: ProxyProcess
    p2: ProxyProcess
    squid: subprocess.Popen[bytes]
    squid_port: int
    squid_dir: Path


@pytest.fixture
def chain(tmp_path: Path) -> Iterator[Chain]:
    if not Path(SQUID).exists():
        pytest.skip("squid is not installed (Debian package squid)")
    src = tmp_path / "src"
    digests = _tree(src)
    repo, _ = publish_tree(src, tmp_path / "store", FQRN, tmp_path / "keys")
    p1 = start_proxy(tmp_path / "p1", "--store", str(repo.store))
    p2 = start_proxy(tmp_path / "p2", "--store", str(repo.store))
    d = Path(tempfile.mkdtemp(prefix="hep-scaleout-squid-"))
    os.chmod(d, 0o777)  # squid drops privileges
    port = free_port()
    (d / "squid.conf").write_text(
        SQUID_CONF.format(port=port, p1=p1.port, p2=p2.port, tmp=d, peer=PEER_OPTIONS)
    )
    squid = subprocess.Popen(
        [SQUID, "-N", "-f", str(d / "squid.conf")],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    try:
        url = f"http://127.0.0.1:{port}/cvmfs/{FQRN}/.cvmfspublished"
        deadline = time.monotonic() + 30
        while True:
            try:
                urllib.request.urlopen(url, timeout=2).read()
                break
            except (urllib.error.URLError, OSError):
                if squid.poll() is not None or time.monotonic() > deadline:
                    log = (d / "cache.log").read_text() if (d / "cache.log").exists() else ""
                    pytest.fail(f"squid did not come up: {log[-1500:]}")
                time.sleep(0.2)
        yield Chain(repo, digests, p1, p2, squid, port, d)
    finally:
        if squid.poll() is None:
            squid.send_signal(signal.SIGTERM)
            try:
                squid.wait(15)
            except subprocess.TimeoutExpired:
                squid.kill()
        for p in (p1, p2):
            if p.proc.poll() is None:
                p.stop()
        shutil.rmtree(d, ignore_errors=True)


JOB = """
set -e
cd /cvmfs/{fqrn}
files=$(find . -type f -name '*.bin' | sort)
n=0
for f in $files; do
  echo "$(sha256sum < "$f" | cut -d' ' -f1) ${{f#./}}"
  n=$((n + 1))
  if [ "$n" = 40 ] && [ -n "{mark}" ]; then
    touch "{mark}"
    while [ ! -e "{go}" ]; do sleep 0.05; done
  fi
done
"""


def _hep_exec(repo: Repo, proxies: str, job: str, tmp: Path) -> subprocess.Popen[str]:
    env = {**os.environ, "PYTHONPATH": str(PROJECT)}
    return subprocess.Popen(
        [
            sys.executable,
            "-m",
            "worker.cli",
            "--proxy",
            proxies,
            "--keys",
            str(repo.master_pub),
            "--no-shared-cache",
            "--timeout",
            "3",
            "--stats",
            "--",
            "bash",
            "-c",
            job,
        ],
        env=env,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        cwd=tmp,
    )


def _check_output(out: str, digests: dict[str, str]) -> None:
    got = {}
    for line in out.splitlines():
        digest, name = line.split(" ", 1)
        got[name] = digest
    expected = {k: v for k, v in digests.items() if k.endswith(".bin")}
    assert got == expected


def _requests(p: ProxyProcess) -> int:
    return sum(1 for line in p.access_log.read_text().splitlines() if "/data/" in line)


def test_jobs_through_squid_and_two_proxies_survive_kills(chain: Chain, tmp_path: Path) -> None:
    c = chain
    repo, digests, p1, p2, squid, squid_port, squid_dir = (
        c.repo,
        c.digests,
        c.p1,
        c.p2,
        c.squid,
        c.squid_port,
        c.squid_dir,
    )
    proxies = f"http://127.0.0.1:{squid_port};http://127.0.0.1:{p1.port}|http://127.0.0.1:{p2.port}"

    first = _hep_exec(repo, proxies, JOB.format(fqrn=FQRN, mark="", go=""), tmp_path)
    out, err = first.communicate(timeout=240)
    assert first.returncode == 0, err
    _check_output(out, digests)
    time.sleep(1.0)  # hep-proxy flushes its access log twice a second
    squid_log = (squid_dir / "access.log").read_text().splitlines()
    assert sum("/data/" in line for line in squid_log) >= len(digests) - 1  # the job used squid
    behind = _requests(p1) + _requests(p2)
    assert 0 < behind <= len(digests) + 5  # squid fetched each object from p1|p2 about once
    p2_before = _requests(p2)

    mark, go = tmp_path / "half-way", tmp_path / "go-on"
    second = _hep_exec(repo, proxies, JOB.format(fqrn=FQRN, mark=mark, go=go), tmp_path)
    deadline = time.monotonic() + 120
    while not mark.exists():
        assert second.poll() is None, second.stderr.read() if second.stderr else ""
        assert time.monotonic() < deadline, "the second job never got half-way"
        time.sleep(0.05)
    squid.send_signal(signal.SIGKILL)
    squid.wait()
    p1.proc.send_signal(signal.SIGKILL)
    p1.proc.wait()
    go.touch()
    out, err = second.communicate(timeout=240)
    assert second.returncode == 0, err
    _check_output(out, digests)
    assert "Traceback" not in err
    time.sleep(1.0)
    assert _requests(p2) > p2_before  # the rest came from the surviving proxy
