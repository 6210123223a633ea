"""Loopback addresses for tests: a free port to listen on, a port where nothing listens."""

from __future__ import annotations

import socket


def free_port() -> int:
    """A port on 127.0.0.1 that was free a moment ago (the caller binds it next)."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def dead_url() -> str:
    """A loopback URL with nothing listening (connection refused)."""
    return f"http://127.0.0.1:{free_port()}"
