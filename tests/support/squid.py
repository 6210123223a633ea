"""A real squid (Debian package ``squid``) on loopback, as a forward proxy or an accelerator.

:func:`start_squid` writes a ``squid.conf`` from the directives that differ between uses (the
``http_port`` line's options, caching, peers) plus the common ones (logs, pid file, loopback
ACL, a quick shutdown), starts ``squid -N`` and waits until it answers HTTP. Tests skip,
saying so, where squid is not installed. squid drops privileges to its own user when started
as root, so it runs in a world-writable directory of its own (pytest's ``tmp_path`` is 0700).
"""

from __future__ import annotations

import os
import shutil
import signal
import subprocess
import tempfile
import urllib.error
import urllib.request
from dataclasses import dataclass
from pathlib import Path

import pytest

from tests.support.network import free_port
from tests.support.waiting import wait_until

SQUID = shutil.which("squid") or "/usr/sbin/squid"

COMMON = """
pid_filename {dir}/squid.pid
access_log stdio:{dir}/access.log squid
cache_log {dir}/cache.log
cache_store_log none
coredump_dir {dir}
netdb_filename none
acl clients src 127.0.0.1/32
http_access allow clients
http_access deny all
shutdown_lifetime 1 seconds
"""

# a caching forward proxy, as a site squid that clients name as their HTTP proxy
FORWARD = """
cache_mem 64 MB
maximum_object_size_in_memory 8 MB
maximum_object_size 64 MB
cache allow all
refresh_pattern . 0 20% 4320
"""


@dataclass
class Squid:
    proc: subprocess.Popen[bytes]
    port: int
    dir: Path
    service: str  # squid -n: names its shared-memory segments in /dev/shm

    def _remove_shm(self) -> None:
        """A killed squid leaves its segments behind, and a later squid (another user's, too)
        of the same service name could not start."""
        for seg in Path("/dev/shm").glob(f"{self.service}-*.shm"):
            seg.unlink(missing_ok=True)

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def log(self) -> list[str]:
        """The access log's lines (squid writes a line when a transaction ends)."""
        log = self.dir / "access.log"
        return log.read_text(errors="replace").splitlines() if log.exists() else []

    def cache_log(self) -> str:
        log = self.dir / "cache.log"
        return log.read_text(errors="replace") if log.exists() else ""

    def kill(self) -> None:
        """SIGKILL, as a crashed squid."""
        if self.proc.poll() is None:
            self.proc.kill()
        self.proc.wait()
        self._remove_shm()

    def stop(self) -> None:
        """SIGTERM (and SIGKILL if it lingers), then remove its directory."""
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(15)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
        self._remove_shm()
        shutil.rmtree(self.dir, ignore_errors=True)


def _answers(s: Squid) -> bool:
    if s.proc.poll() is not None:
        raise AssertionError(f"squid exited with {s.proc.returncode}: {s.cache_log()[-2000:]}")
    try:
        urllib.request.urlopen(f"{s.url}/", timeout=1).close()
    except urllib.error.HTTPError:
        return True  # an error page (a non-proxy request, a peer's 404) is an answer
    except OSError:
        return False
    return True


def start_squid(directives: str = FORWARD, *, port_options: str = "") -> Squid:
    """Start squid on a free loopback port with ``directives`` (plus :data:`COMMON`);
    ``port_options`` go on the ``http_port`` line (e.g. ``accel defaultsite=x no-vhost``)."""
    if not Path(SQUID).exists():
        pytest.skip("squid is not installed (Debian package squid)")
    d = Path(tempfile.mkdtemp(prefix="hep-test-squid-"))
    os.chmod(d, 0o777)  # squid drops privileges to its own user
    port = free_port()
    conf = f"http_port 127.0.0.1:{port} {port_options}\n{directives}\n{COMMON.format(dir=d)}"
    (d / "squid.conf").write_text(conf)
    service = f"heptestsquid{port}"  # alphanumeric only
    proc = subprocess.Popen(
        [SQUID, "-N", "-n", service, "-f", str(d / "squid.conf")],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    s = Squid(proc, port, d, service)
    try:
        wait_until(lambda: _answers(s), 30, what=f"squid answering on port {port}", interval=0.1)
    except BaseException:
        s.stop()
        raise
    return s
