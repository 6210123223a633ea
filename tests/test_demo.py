"""``./demo`` as a newcomer meets it: every command it runs is printed before it runs (the
exact command to type, with .venv/bin on PATH), and it ends with the line that puts the
commands on PATH. Runs scripts/demo.py with this interpreter (./demo = scripts/venv + that)."""

from __future__ import annotations

import shlex
import socket
import subprocess
import sys

import pytest

from tests.support.repos import PROJECT

pytestmark = pytest.mark.slow


def test_demo_prints_each_command_and_how_to_get_them_on_path() -> None:
    with socket.socket() as s:
        if s.connect_ex(("127.0.0.1", 8000)) == 0:
            pytest.skip("127.0.0.1:8000 is in use (configs/demo.yaml serves the demo there)")
    r = subprocess.run(
        [sys.executable, "scripts/demo.py"], cwd=PROJECT, capture_output=True, text=True,
        timeout=300,
    )  # fmt: skip
    assert r.returncode == 0, r.stdout + r.stderr
    lines = r.stdout.splitlines()
    commands = [ln.strip().removeprefix("$ ") for ln in lines if ln.strip().startswith("$ ")]
    tools = [shlex.split(c)[0] for c in commands]
    for tool in ("hep-publish", "hep-proxy", "preload", "hep-exec"):
        assert tool in tools, commands
    # each step's command comes before that step's output
    publish = next(i for i, ln in enumerate(lines) if ln.strip().startswith("$ hep-publish"))
    assert any("published demo.example.org" in ln for ln in lines[publish + 1 :])
    assert lines[-1].strip() == f'export PATH="{sys.executable.rsplit("/", 1)[0]}:$PATH"'
    assert "hello from a compiled program in /cvmfs" in r.stdout or "python import" in r.stdout
