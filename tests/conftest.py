"""Shared fixtures: the real 2015 repository and freshly published ones, the reference
CernVM-FS client."""

from __future__ import annotations

import os
import subprocess

import pytest

from tests.support.reference import Reference, fuse_reason, missing_reason, unpack_reference
from tests.support.repos import Repo, unpack_fixture


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    """Tests marked ``needs_root`` skip for ordinary users, saying why (CI runs as root)."""
    if os.geteuid() == 0:
        return
    skip = pytest.mark.skip(reason="needs root (run ./run-tests as root, as CI does)")
    for item in items:
        if item.get_closest_marker("needs_root"):
            item.add_marker(skip)


@pytest.fixture(scope="session")
def fixture_repo(tmp_path_factory: pytest.TempPathFactory) -> Repo:
    """The real ``legacy_aufs.cern.ch`` repository with a re-signed (valid) whitelist (the
    tests using it skip, saying why, without ../shared: see unpack_fixture)."""
    return unpack_fixture(tmp_path_factory.mktemp("legacy_aufs"))


@pytest.fixture(params=["notify", "ptrace"])
def trap_mode(request: pytest.FixtureRequest, monkeypatch: pytest.MonkeyPatch) -> str:
    """Run a tracer test in both trap modes (HEP_EXEC_TRAP, inherited by traced commands):
    seccomp user notification where the kernel has it, and ptrace stops only, which is what
    kernels older than 6.6 get."""
    mode: str = request.param
    monkeypatch.setenv("HEP_EXEC_TRAP", mode)
    return mode


@pytest.fixture(params=["tmpfs", "memfd"])
def ram_files(request: pytest.FixtureRequest, monkeypatch: pytest.MonkeyPatch) -> str:
    """Run a hep-exec test with both kinds of RAM file (HEP_EXEC_RAM_FILES): the private
    huge-page tmpfs that ``auto`` picks on most nodes, and the sealed memfds it falls back to."""
    kind: str = request.param
    if kind == "tmpfs":
        from worker.ram.ramfiles import RamFiles, RamFilesError

        try:
            RamFiles("tmpfs").close()
        except RamFilesError as e:
            pytest.skip(f"no private tmpfs on this machine: {e}")
    monkeypatch.setenv("HEP_EXEC_RAM_FILES", kind)
    return kind


@pytest.fixture(scope="session")
def reference_or_reason(tmp_path_factory: pytest.TempPathFactory) -> Reference | str:
    """The reference CernVM-FS tools from ``../shared/reference``, unpacked once into
    ``~/.cache/hep-tests`` (or this session's temp dir where that is not writable), or why
    they cannot be had: for tests that run without them and only check more with them."""
    reason = missing_reason()
    if reason is not None:
        return reason
    try:
        try:
            return unpack_reference()
        except OSError:
            return unpack_reference(tmp_path_factory.mktemp("reference-cache"))
    except (OSError, subprocess.SubprocessError) as e:
        return f"reference CernVM-FS client could not be unpacked: {e}"


@pytest.fixture(scope="session")
def reference(reference_or_reason: Reference | str) -> Reference:
    """The reference CernVM-FS tools; the test skips, saying why, without them."""
    if isinstance(reference_or_reason, str):
        pytest.skip(reference_or_reason)
    return reference_or_reason


@pytest.fixture(scope="session")
def fuse(reference: Reference) -> Reference:
    """The reference tools, where ``cvmfs2`` can mount (root, a usable /dev/fuse)."""
    reason = fuse_reason()
    if reason is not None:
        pytest.skip(reason)
    return reference
