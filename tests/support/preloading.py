"""The real ``preload`` CLI in tests: specs, runs, and what nginx answered it."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
from collections.abc import Sequence
from pathlib import Path

from tests.support.nginx import Nginx
from tests.support.repos import PROJECT, Repo

# Quick retries: a dead server must not cost the test seconds of back-off.
SPEC_HEAD = "concurrency: 4\ntimeout: 5\nretries: 1\nbackoff_init: 0.05\nbackoff_max: 0.1\n"


def preload_env() -> dict[str, str]:
    return {**os.environ, "PYTHONPATH": str(PROJECT)}


def preload_cmd(spec: Path, *args: str) -> list[str]:
    return [sys.executable, "-m", "preload.cli", "--spec", str(spec), *args]


def run_preload(spec: Path, *args: str, timeout: float = 120) -> subprocess.CompletedProcess[str]:
    """``preload --spec SPEC ARGS…`` to completion, output captured as text."""
    return subprocess.run(
        preload_cmd(spec, *args),
        env=preload_env(),
        capture_output=True,
        text=True,
        timeout=timeout,
    )


def start_preload(spec: Path, *args: str) -> subprocess.Popen[str]:
    """``preload`` started in the background (the caller waits for it, or signals it), with
    SIGINT at its default as in a terminal's foreground job: a test suite started as a
    background job inherits SIGINT ignored, and so would preload."""
    return subprocess.Popen(
        preload_cmd(spec, *args),
        env=preload_env(),
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_DFL),
    )


def repo_entry(repo: Repo, servers: Sequence[str], rules: str = "", extra: str = "") -> str:
    """One item of a spec's ``repositories:`` list; ``rules``/``extra`` are indented lines."""
    server_lines = "".join(f"      - {s}\n" for s in servers)
    return (
        f"  - name: {repo.fqrn}\n    servers:\n{server_lines}"
        f"    keys: {repo.keys_dir}\n{rules}{extra}"
    )


def write_specs(path: Path, store: Path, entries: Sequence[str], head: str = SPEC_HEAD) -> Path:
    """A spec with several repositories (:func:`repo_entry` items)."""
    path.write_text(f"store: {store}\n{head}repositories:\n{''.join(entries)}")
    return path


def write_spec(
    path: Path, store: Path, repo: Repo, servers: Sequence[str], rules: str = "", extra: str = ""
) -> Path:
    """A spec for one repository: ``store`` on line 1, ``concurrency`` on line 2."""
    return write_specs(path, store, [repo_entry(repo, servers, rules, extra)])


def object_requests(nginx: Nginx, fqrn: str, since: int = 0) -> list[str]:
    """``data/…`` paths of ``fqrn`` that nginx answered (its access log from line ``since``):
    a line is written when a response is complete."""
    prefix = f"/cvmfs/{fqrn}/"
    return [
        q.removeprefix(prefix) for q in nginx.requests()[since:] if q.startswith(prefix + "data/")
    ]
