"""hep-publish's command line for a newcomer: names it refuses, unusable stores and key
directories found before any key is made, and --out as the old name of --store."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

from tests.support.repos import PROJECT

FQRN = "cli.example.org"


def _cli(*args: str | Path) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "publish.cli", *map(str, args)],
        capture_output=True,
        text=True,
        env={**os.environ, "PYTHONPATH": str(PROJECT)},
        timeout=120,
    )


@pytest.fixture
def src(tmp_path: Path) -> Path:
    d = tmp_path / "src"
    d.mkdir()
    (d / "hello.txt").write_text("hello\n")
    return d


def _one_line(r: subprocess.CompletedProcess[str], code: int, *needles: str) -> None:
    assert r.returncode == code, r
    assert r.stderr.count("\n") == 1 and "Traceback" not in r.stderr, r.stderr
    for n in needles:
        assert n in r.stderr, r.stderr


@pytest.mark.parametrize("name", ["bad name", "myrepo", "a..b.org", ".hidden.org", "x.org/"])
def test_refuses_what_is_not_a_fully_qualified_name(tmp_path: Path, src: Path, name: str) -> None:
    store = tmp_path / "store"
    r = _cli(src, "--name", name, "--store", store, "--keys", tmp_path / "keys")
    _one_line(r, 2, f"--name {name!r}: not a fully qualified repository name")
    assert not store.exists() and not (tmp_path / "keys").exists()


def test_keys_that_is_a_file(tmp_path: Path, src: Path) -> None:
    keys = tmp_path / "keys"
    keys.write_text("not a directory")
    r = _cli(src, "--name", FQRN, "--store", tmp_path / "store", "--keys", keys)
    _one_line(r, 2, f"--keys {keys}: is a file, not a directory")
    assert "File exists" not in r.stderr


def test_unwritable_store_is_found_before_keys_are_made(tmp_path: Path, src: Path) -> None:
    keys = tmp_path / "keys"
    r = _cli(src, "--name", FQRN, "--store", "/proc/nope", "--keys", keys)
    _one_line(r, 2, "--store /proc/nope: cannot write there")
    assert not keys.exists()
    blocker = tmp_path / "file"
    blocker.write_text("x")
    r = _cli(src, "--name", FQRN, "--store", blocker / "store", "--keys", keys)
    _one_line(r, 2, f"{blocker} is a file, not a directory")
    assert not keys.exists()


def test_out_is_the_old_name_of_store(tmp_path: Path, src: Path) -> None:
    store, keys = tmp_path / "store", tmp_path / "keys"
    r = _cli(src, "--name", FQRN, "--out", store, "--keys", keys)
    assert r.returncode == 0, r.stderr
    assert r.stderr == f"hep-publish: --out is the old name of --store; write --store {store}\n"
    assert (store / FQRN / ".cvmfspublished").is_file()
    r = _cli(src, "--name", FQRN, "--store", store, "--keys", keys)
    assert r.returncode == 0 and r.stderr == "" and "revision 2" in r.stdout
    r = _cli(src, "--name", FQRN, "--store", store, "--out", tmp_path / "other")
    _one_line(r, 2, "give the store once")
    r = _cli(src, "--name", FQRN)
    _one_line(r, 2, "required: --store")


def test_log_level_error_hides_the_note(tmp_path: Path, src: Path) -> None:
    r = _cli(
        src, "--name", FQRN, "--out", tmp_path / "s", "--keys", tmp_path / "k",
        "--log-level", "error",
    )  # fmt: skip
    assert r.returncode == 0 and r.stderr == "", r.stderr
