"""Helpers for hep-proxy tests: start the real CLI on a free loopback port, read its access
log and metrics, raw HTTP on sockets."""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import urllib.request
import uuid
from dataclasses import dataclass
from pathlib import Path

from prometheus_client.parser import text_string_to_metric_families

from tests.support.network import free_port
from tests.support.repos import PROJECT
from tests.support.waiting import wait_until


@dataclass
class ProxyProcess:
    proc: subprocess.Popen[bytes]
    port: int
    stderr: Path
    access_log: Path

    def url(self, path: str) -> str:
        return f"http://127.0.0.1:{self.port}{path}"

    def errors(self) -> str:
        return self.stderr.read_text(errors="replace")

    def stop(self, timeout: float = 30) -> int:
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
        try:
            return self.proc.wait(timeout)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait()
            raise

    def worker_pids(self) -> list[int]:
        out = subprocess.run(
            ["ps", "-o", "pid=", "--ppid", str(self.proc.pid)], capture_output=True, text=True
        ).stdout.split()
        return [int(p) for p in out] or [self.proc.pid]

    def log_lines(self) -> list[str]:
        """The access log as written so far (workers write it in batches twice a second)."""
        if not self.access_log.exists():
            return []
        return self.access_log.read_text(errors="replace").splitlines()

    def flushed_log(self, timeout: float = 10) -> list[str]:
        """The access log once every request answered before this call is in it.

        Sends a marker request and waits for its line: a worker writes its lines in order, so
        whatever it answered earlier is in the file by then. Only meaningful with one worker
        (the marker reaches one worker of several). The marker's line is left out.
        """
        token = uuid.uuid4().hex
        with urllib.request.urlopen(self.url(f"/healthz?flush={token}"), timeout=5) as r:
            r.read()

        wait_until(
            lambda: any(token in line for line in self.log_lines()),
            timeout,
            what=f"the access log of {self.url('')} flushed",
        )
        return [line for line in self.log_lines() if token not in line]

    def metrics(self) -> dict[str, float]:
        """One scrape of /metrics: ``name{label="v",…}`` (labels sorted) → value."""
        with urllib.request.urlopen(self.url("/metrics"), timeout=10) as r:
            text = r.read().decode()
        out: dict[str, float] = {}
        for family in text_string_to_metric_families(text):
            for s in family.samples:
                out[sample_key(s.name, **s.labels)] = s.value
        return out


def sample_key(name: str, **labels: str) -> str:
    """The key :meth:`ProxyProcess.metrics` uses for one sample."""
    if not labels:
        return name
    return name + "{" + ",".join(f'{k}="{v}"' for k, v in sorted(labels.items())) + "}"


def proxy_env() -> dict[str, str]:
    return dict(os.environ, PYTHONPATH=str(PROJECT))


def run_cli(*args: str, timeout: float = 30) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "proxy.cli", *args],
        env=proxy_env(),
        capture_output=True,
        text=True,
        timeout=timeout,
    )


def start_proxy(tmp: Path, *args: str, workers: int = 1, port: int | None = None) -> ProxyProcess:
    """Start ``hep-proxy serve`` and wait until /healthz answers."""
    port = port or free_port()
    tmp.mkdir(parents=True, exist_ok=True)
    stderr = tmp / f"proxy-{port}.err"
    access = tmp / f"proxy-{port}.access.log"
    cmd = [
        sys.executable, "-m", "proxy.cli", "serve",
        "--listen", f"127.0.0.1:{port}",
        "--workers", str(workers),
        "--access-log", str(access),
        *args,
    ]  # fmt: skip
    with stderr.open("wb") as err:
        proc = subprocess.Popen(cmd, env=proxy_env(), stderr=err, stdout=subprocess.DEVNULL)
    p = ProxyProcess(proc, port, stderr, access)

    def healthy() -> bool:
        if proc.poll() is not None:
            raise AssertionError(f"hep-proxy exited with {proc.returncode}: {p.errors()}")
        try:
            with urllib.request.urlopen(p.url("/healthz"), timeout=1) as r:
                status: int = r.status
        except OSError:
            return False
        return status == 200

    try:
        wait_until(healthy, 20, what=f"hep-proxy answering /healthz on port {port}", interval=0.05)
    except BaseException:
        if proc.poll() is None:
            p.stop()
        raise
    return p


@dataclass
class Response:
    status: int
    headers: list[tuple[str, str]]
    body: bytes

    def header(self, name: str) -> str | None:
        for k, v in self.headers:
            if k.lower() == name.lower():
                return v
        return None

    @property
    def names(self) -> set[str]:
        return {k.lower() for k, _ in self.headers}


def _recv_until(sock: socket.socket, buf: bytearray, marker: bytes) -> int:
    while (i := buf.find(marker)) < 0:
        chunk = sock.recv(65536)
        if not chunk:
            raise ConnectionError(f"connection closed before {marker!r}; got {bytes(buf)[:200]!r}")
        buf += chunk
    return i


def read_response(sock: socket.socket, buf: bytearray, head: bool = False) -> Response:
    """One HTTP/1.1 response with Content-Length from ``sock`` (``buf`` keeps the excess)."""
    end = _recv_until(sock, buf, b"\r\n\r\n")
    lines = bytes(buf[:end]).decode("latin-1").split("\r\n")
    del buf[: end + 4]
    status = int(lines[0].split(" ", 2)[1])
    headers = [(k, v.strip()) for k, v in (line.split(":", 1) for line in lines[1:])]
    resp = Response(status, headers, b"")
    length = 0 if head else int(resp.header("Content-Length") or 0)
    while len(buf) < length:
        chunk = sock.recv(1 << 20)
        if not chunk:
            raise ConnectionError("connection closed inside the body")
        buf += chunk
    resp.body = bytes(buf[:length])
    del buf[:length]
    return resp


def raw_exchange(port: int, raw: bytes, timeout: float = 10, source: str | None = None) -> bytes:
    """Send raw bytes, read until the server closes; returns everything received."""
    with socket.create_connection(
        ("127.0.0.1", port), timeout=timeout, source_address=(source, 0) if source else None
    ) as s:
        s.sendall(raw)
        out = bytearray()
        while True:
            try:
                chunk = s.recv(65536)
            except ConnectionResetError:
                break
            if not chunk:
                break
            out += chunk
        return bytes(out)


def status_of(raw: bytes) -> int:
    if not raw.startswith(b"HTTP/1."):
        raise AssertionError(f"not an HTTP response: {raw[:100]!r}")
    return int(raw.split(b" ", 2)[1])
