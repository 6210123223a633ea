"""scripts/prereqs, which ./demo and ./run-tests (through scripts/venv) run first on a fresh
machine: nothing to say when python3-venv, python3-dev and gcc are there; one line naming
what is missing when it may not install it."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from tests.support.repos import PROJECT

PREREQS = PROJECT / "scripts" / "prereqs"


def _prereqs(*args: str, **env: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [str(PREREQS), *args],
        env={**os.environ, "PYTHON": sys.executable, **env},
        capture_output=True,
        text=True,
        timeout=60,
    )


def test_nothing_missing_is_silent() -> None:
    if shutil.which(os.environ.get("CC", "gcc").split()[0]) is None:
        pytest.skip("no C compiler here (the C extension could not be built either)")
    p = _prereqs(HEP_PREREQS_NO_INSTALL="1")
    assert p.returncode == 0 and p.stdout == "" and p.stderr == "", p


def test_what_is_missing_is_one_line(tmp_path: Path) -> None:
    # a python3 without venv or headers (Debian's before python3-venv/python3-dev): the
    # interpreter answers, every module import it is asked for fails
    bare = tmp_path / "python3"
    bare.write_text("#!/bin/sh\nexit 1\n")
    bare.chmod(0o755)
    p = _prereqs(
        PYTHON=str(bare),
        CC=str(tmp_path / "no-cc"),
        HEP_PREREQS_NO_INSTALL="1",
        HEP_PREREQS_FOR="demo",
    )
    assert p.returncode == 1 and p.stdout == ""
    assert p.stderr == (
        "demo: missing python3-venv python3-dev gcc; "
        "as root: apt-get install python3-venv python3-dev gcc\n"
    )
    p = _prereqs(PYTHON=str(tmp_path / "nowhere"), HEP_PREREQS_FOR="run-tests")
    assert p.returncode == 1 and p.stderr.count("\n") == 1
    assert p.stderr.startswith(f"run-tests: {tmp_path / 'nowhere'} not found: install python3")


def test_named_debian_packages_are_checked() -> None:
    if shutil.which("dpkg-query") is None:
        pytest.skip("not a Debian machine (no dpkg-query)")
    p = _prereqs("hep-no-such-package", HEP_PREREQS_NO_INSTALL="1", CC="true")
    assert p.returncode == 1 and p.stderr.count("\n") == 1
    assert "missing hep-no-such-package;" in p.stderr
