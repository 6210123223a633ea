"""Real HTTP servers on loopback for the preload tests: nginx started in a temp dir."""

from __future__ import annotations

import os
import shutil
import socket
import subprocess
import time
from dataclasses import dataclass
from pathlib import Path

import pytest

from tests.support.network import free_port

NGINX = shutil.which("nginx") or "/usr/sbin/nginx"


@dataclass
class Site:
    """One nginx ``server`` block: serves ``root`` under /cvmfs/, or answers ``status``."""

    root: Path | None = None
    status: int | None = None
    limit_rate: str | None = None
    port: int = 0

    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}/cvmfs/@fqrn@"

    def block(self) -> str:
        if self.status is not None:
            body = f"location / {{ return {self.status}; }}"
        else:
            rate = f"limit_rate {self.limit_rate};" if self.limit_rate else ""
            body = f"location /cvmfs/ {{ alias {self.root}/; {rate} }}"
        return f"server {{ listen 127.0.0.1:{self.port}; {body} }}"


class Nginx:
    """nginx with several server blocks, one process tree, stopped by :meth:`stop`.

    ``access_log``: False for none (:meth:`requests` then sees nothing)."""

    def __init__(self, workdir: Path, sites: list[Site], *, access_log: bool = True) -> None:
        if not os.path.exists(NGINX):
            pytest.skip("nginx not installed (Debian package nginx-light)")
        self.dir = workdir
        self.sites = sites
        workdir.mkdir(parents=True, exist_ok=True)
        for s in sites:
            s.port = s.port or free_port()
        user = "user root root;" if os.geteuid() == 0 else ""
        temps = " ".join(
            f"{k}_temp_path {workdir}/{k};"
            for k in ("client_body", "proxy", "fastcgi", "uwsgi", "scgi")
        )
        log = f"{workdir}/access.log" if access_log else "off"
        conf = f"""
daemon off; worker_processes 1; {user}
pid {workdir}/nginx.pid; error_log {workdir}/error.log warn;
events {{ worker_connections 1024; }}
http {{
  access_log {log}; {temps}
  default_type application/octet-stream; keepalive_requests 100000; sendfile on;
  {" ".join(s.block() for s in sites)}
}}
"""
        (workdir / "nginx.conf").write_text(conf)
        self.proc = subprocess.Popen(
            [
                NGINX,
                "-p",
                str(workdir),
                "-c",
                str(workdir / "nginx.conf"),
                "-e",
                str(workdir / "error.log"),
            ],
            stdout=subprocess.DEVNULL,
            stderr=subprocess.PIPE,
        )
        deadline = time.monotonic() + 10
        for s in sites:
            while True:
                try:
                    socket.create_connection(("127.0.0.1", s.port), 0.2).close()
                    break
                except OSError:
                    if self.proc.poll() is not None or time.monotonic() > deadline:
                        err = self.proc.stderr.read().decode() if self.proc.stderr else ""
                        self.stop()
                        raise RuntimeError(f"nginx did not start: {err}") from None
                    time.sleep(0.05)

    def requests(self) -> list[str]:
        """Request paths from the access log, in order."""
        log = self.dir / "access.log"
        if not log.exists():
            return []
        return [line.split('"')[1].split()[1] for line in log.read_text().splitlines()]

    def stop(self) -> None:
        if self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(5)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
