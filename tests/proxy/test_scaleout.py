"""The site path at scale: workers → squid (collapsed forwarding) → two hep-proxy instances.

Workers name ``squid;p1|p2``: the squid first, the two proxies load-balanced behind it as the
fall-back group. A first job runs through the whole chain; during a second job the squid and
one proxy are killed, and the job still completes with correct output.
"""

from __future__ import annotations

import hashlib
import random
import signal
import subprocess
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest

from tests.support.hep_exec import hep_exec_cmd
from tests.support.proxy_process import ProxyProcess, start_proxy
from tests.support.repos import Repo, publish_tree
from tests.support.squid import Squid, start_squid
from tests.support.tracing import env_with
from tests.support.waiting import wait_until

FQRN = "scale.example.org"

# Reverse-proxy (accelerator) squid: the workers' first proxy group, in front of p1|p2.
ACCEL = "accel defaultsite=hep-proxy no-vhost"
PEERS = """
cache_peer 127.0.0.1 parent {p1} 0 {peer} name=p1
cache_peer 127.0.0.1 parent {p2} 0 {peer} name=p2
collapsed_forwarding on
cache_mem 128 MB
maximum_object_size_in_memory 16 MB
maximum_object_size 64 MB
never_direct allow all
refresh_pattern . 0 20% 4320
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
    squid: Squid


@pytest.fixture
def chain(tmp_path: Path) -> Iterator[Chain]:
    src = tmp_path / "src"
    digests = _tree(src)
    repo, _ = publish_tree(src, tmp_path / "store", FQRN, tmp_path / "keys")
    p1 = start_proxy(tmp_path / "p1", "--store", str(repo.store))
    p2 = start_proxy(tmp_path / "p2", "--store", str(repo.store))
    try:
        squid = start_squid(
            PEERS.format(p1=p1.port, p2=p2.port, peer=PEER_OPTIONS), port_options=ACCEL
        )
        try:
            yield Chain(repo, digests, p1, p2, squid)
        finally:
            squid.stop()
    finally:
        for p in (p1, p2):
            if p.proc.poll() is None:
                p.stop()


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
    cmd = hep_exec_cmd(
        proxies, ["bash", "-c", job], keys=repo.master_pub, options=["--timeout", "3", "--stats"]
    )
    return subprocess.Popen(
        cmd, env=env_with(), stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, cwd=tmp
    )


def _check_output(out: str, digests: dict[str, str]) -> None:
    got = {}
    for line in out.splitlines():
        digest, name = line.split(" ", 1)
        got[name] = digest
    expected = {k: v for k, v in digests.items() if k.endswith(".bin")}
    assert got == expected


def _data_requests(lines: list[str]) -> int:
    return sum("/data/" in line for line in lines)


@pytest.mark.slow
def test_jobs_through_squid_and_two_proxies_survive_kills(chain: Chain, tmp_path: Path) -> None:
    c = chain
    repo, digests, p1, p2, squid = c.repo, c.digests, c.p1, c.p2, c.squid
    proxies = f"{squid.url};http://127.0.0.1:{p1.port}|http://127.0.0.1:{p2.port}"

    first = _hep_exec(repo, proxies, JOB.format(fqrn=FQRN, mark="", go=""), tmp_path)
    out, err = first.communicate(timeout=240)
    assert first.returncode == 0, err
    _check_output(out, digests)
    # the job used squid: squid logs each object it answered (when the transaction ends)
    wait_until(
        lambda: _data_requests(squid.log()) >= len(digests) - 1,
        10,
        what="squid's access log naming the job's objects",
    )
    # squid fetched each object from p1|p2 about once (collapsed forwarding)
    behind = _data_requests(p1.flushed_log()) + _data_requests(p2.flushed_log())
    assert 0 < behind <= len(digests) + 5
    p2_before = _data_requests(p2.flushed_log())

    mark, go = tmp_path / "half-way", tmp_path / "go-on"
    second = _hep_exec(repo, proxies, JOB.format(fqrn=FQRN, mark=mark, go=go), tmp_path)

    def half_way() -> bool:
        assert second.poll() is None, second.stderr.read() if second.stderr else ""
        return mark.exists()

    wait_until(half_way, 120, what="the second job getting half-way", interval=0.05)
    squid.kill()
    p1.proc.send_signal(signal.SIGKILL)
    p1.proc.wait()
    go.touch()
    out, err = second.communicate(timeout=240)
    assert second.returncode == 0, err
    _check_output(out, digests)
    assert "Traceback" not in err
    # the rest came from the surviving proxy
    assert _data_requests(p2.flushed_log()) > p2_before
