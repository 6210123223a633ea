"""Without ../shared (HEP_SHARED_DIR), every test of the 2015 repository skips saying why,
and nothing else is lost: collection works and the other tests run."""

from __future__ import annotations

import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

from tests.support.repos import PROJECT

pytestmark = pytest.mark.slow  # pytest in pytest, and a hep-proxy start

# Every test that reads the 2015 repository (fixture_repo, unpack_fixture), and one beside
# them that must still run.
USERS = [
    "tests/format/test_fixture_repo.py",
    "tests/preload/test_preload_integration.py::test_fixture_selection_with_nested_catalogs",
    "tests/preload/test_preload_integration.py::test_expired_whitelist_proxy_and_file_source",
    "tests/worker/test_worker_repository.py::test_the_real_2015_repository",
    "tests/proxy/test_proxy_serve.py",
]


def _pytest(shared: Path, *args: str) -> subprocess.CompletedProcess[str]:
    env = {**os.environ, "HEP_SHARED_DIR": str(shared), "PYTHONPATH": str(PROJECT)}
    return subprocess.run(
        [sys.executable, "-m", "pytest", "-p", "no:cacheprovider", "-q", "-rs", *args],
        cwd=PROJECT,
        env=env,
        capture_output=True,
        text=True,
        timeout=600,
    )


def test_every_user_of_the_fixture_is_listed_here() -> None:
    """A new test of the 2015 repository belongs in USERS (so that this file checks it)."""
    listed = {u.split("::")[0] for u in USERS}
    for path in (PROJECT / "tests").rglob("test_*.py"):
        if path == Path(__file__).resolve():
            continue
        text = path.read_text()
        if re.search(r"\bfixture_repo\b|\bunpack_fixture\(", text):
            assert str(path.relative_to(PROJECT)) in listed, path


@pytest.mark.parametrize("layout", ["absent", "incomplete"])
def test_without_shared_the_fixture_tests_skip_and_say_why(tmp_path: Path, layout: str) -> None:
    shared = tmp_path / "shared"
    if layout == "incomplete":  # a shared/ without the repository's tarballs
        (shared / "fixtures" / "legacy_aufs_repo_21").mkdir(parents=True)
    collected = _pytest(shared, "--collect-only", "tests")
    assert collected.returncode == 0, collected.stdout[-2000:]
    run = _pytest(shared, *USERS)
    out = run.stdout
    assert run.returncode == 0, out[-3000:]
    assert not re.search(r"\d+ (failed|errors?)\b", out), out[-3000:]
    reason = "shared material not found" if layout == "absent" else "shared fixture incomplete"
    skips = [line for line in out.splitlines() if line.startswith("SKIPPED")]
    assert skips and all(reason in line for line in skips), out[-3000:]
    # the proxy's tests need no ../shared (only the half of one that reads the 2015
    # repository skips): they ran
    passed = re.search(r"(\d+) passed", out)
    assert passed and int(passed[1]) >= 10, out[-3000:]
