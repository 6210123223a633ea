"""Fixtures shared by the tracer and hep-exec tests: the programs tree, a store that nginx
serves on loopback, and ``driver``: the tracer driven by the host-directory policy or by the
real hep-exec over the same tree (:mod:`tests.support.drivers`)."""

from __future__ import annotations

import subprocess
import tempfile
from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.support.drivers import (
    DRIVERS,
    VARIANTS,
    Driver,
    HepExecDriver,
    HostPolicyDriver,
    Store,
)
from tests.support.hep_exec import Served, ram_files_refused
from tests.support.node_cache import kill_service
from tests.support.programs import make_programs_tree
from tests.support.tracing import ensure_built


@pytest.fixture(scope="session")
def programs_tree(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """:func:`tests.support.programs.make_programs_tree`, built once."""
    ensure_built()
    base = tmp_path_factory.mktemp("programs")
    return make_programs_tree(base / "tree", base / "build")


@pytest.fixture(scope="session")
def hep_exec_store(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Store]:
    """One store and nginx for the ``hep-exec`` driver; trees are published on first use."""
    ensure_built()
    base = tmp_path_factory.mktemp("hep-exec-store")
    served = Served(base / "store", base / "keys")
    served.store.mkdir()
    try:
        yield Store(served, served.serve(base / "nginx"))
    finally:
        served.stop()


@pytest.fixture(params=DRIVERS)
def driver(
    request: pytest.FixtureRequest, monkeypatch: pytest.MonkeyPatch, programs_tree: Path
) -> Driver:
    """The tracer driven one way (a variant of :data:`tests.support.drivers.VARIANTS`), with
    the programs tree at /cvmfs/test.repo (``driver.root``; its source: ``driver.source``).

    Tests pick other variants with ``@pytest.mark.parametrize("driver", [...],
    indirect=True)``, e.g. :data:`tests.support.drivers.DRIVERS_RAM_FILES`."""
    variant: str = request.param
    kind, env = VARIANTS[variant]
    ram_files = env.get("HEP_EXEC_RAM_FILES")
    if ram_files and (why := ram_files_refused(ram_files)):
        pytest.skip(f"no {ram_files} RAM files on this machine: {why}")
    for name, value in env.items():
        monkeypatch.setenv(name, value)
    d: Driver
    if kind == "hostpolicy":
        d = HostPolicyDriver(variant)
    else:
        d = HepExecDriver(variant, request.getfixturevalue("hep_exec_store"))
    d.root = d.mount(programs_tree)
    d.source = programs_tree
    return d


@pytest.fixture
def cache_dir() -> Iterator[Path]:
    """A node's private runtime directory; the service started in it is killed at the end."""
    d = Path(tempfile.mkdtemp(prefix="hepnc-", dir="/dev/shm"))
    yield d
    kill_service(d)
    subprocess.run(["rm", "-rf", str(d)], check=False)
