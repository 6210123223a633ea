"""Two ways to drive the tracer over the same source tree, for tests that must hold for both:

* ``hostpolicy``: ``python -m worker.trace.hostpolicy --map NAME=DIR`` shows the host directory
  itself as /cvmfs/NAME (:func:`tests.support.tracing.traced`);
* ``hep-exec``: the real ``hep-exec`` with the directory published by our publisher into a
  store that nginx serves on loopback (:mod:`tests.support.hep_exec`), signatures checked.

A variant names the driver and what it sets in the environment (inherited by the tracer and
the traced command): the trap mode for the host-directory policy, the kind of RAM file for
hep-exec.  ``tests/worker/conftest.py`` makes a ``driver`` fixture of them.
"""

from __future__ import annotations

import subprocess
import sys
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path

from tests.support.hep_exec import Served, hep_exec_cmd
from tests.support.tracing import env_with

# variant -> (driver, environment)
VARIANTS: dict[str, tuple[str, dict[str, str]]] = {
    "hostpolicy-notify": ("hostpolicy", {"HEP_EXEC_TRAP": "notify"}),
    "hostpolicy-ptrace": ("hostpolicy", {"HEP_EXEC_TRAP": "ptrace"}),
    "hep-exec": ("hep-exec", {}),
    "hep-exec-tmpfs": ("hep-exec", {"HEP_EXEC_RAM_FILES": "tmpfs"}),
    "hep-exec-memfd": ("hep-exec", {"HEP_EXEC_RAM_FILES": "memfd"}),
}
# the host-directory policy in both trap modes, hep-exec as it picks
DRIVERS = ["hostpolicy-notify", "hostpolicy-ptrace", "hep-exec"]
# ... and hep-exec with either kind of RAM file (the host-directory policy has none)
DRIVERS_RAM_FILES = ["hostpolicy-notify", "hostpolicy-ptrace", "hep-exec-tmpfs", "hep-exec-memfd"]


@dataclass
class Store:
    """A store that nginx serves on loopback; trees are published into it on first use."""

    served: Served
    proxy: str
    sources: dict[str, Path] = field(default_factory=dict)  # fqrn -> source published

    def publish(self, source: Path, fqrn: str) -> None:
        known = self.sources.get(fqrn)
        if known is None:
            self.served.publish(source, fqrn)
            self.sources[fqrn] = source
        elif known != source:
            raise ValueError(f"{fqrn} is already published from {known}, not {source}")


class Driver:
    """Runs commands under the tracer with source trees shown as /cvmfs/NAME."""

    kind: str  # "hostpolicy" or "hep-exec"

    def __init__(self, variant: str, root: str = "", source: Path | None = None) -> None:
        self.variant = variant
        self.root = root  # /cvmfs/NAME of the tree the fixture mounted
        self.source = source or Path()  # ... and its source directory

    def mount(self, source: Path, name: str = "test.repo") -> str:
        """Show ``source`` as /cvmfs/``name``; returns that path."""
        raise NotImplementedError

    def cmd(self, argv: Sequence[str], *, stats: bool = False) -> list[str]:
        """The command line that runs ``argv`` under the tracer (``--stats`` if asked)."""
        raise NotImplementedError

    def run(
        self,
        argv: Sequence[str],
        *,
        env: Mapping[str, str] | None = None,
        cwd: str | Path | None = None,
        timeout: float = 120,
        stats: bool = False,
    ) -> subprocess.CompletedProcess[str]:
        return subprocess.run(
            self.cmd(argv, stats=stats),
            env=env_with(env),
            cwd=cwd,
            capture_output=True,
            text=True,
            timeout=timeout,
        )

    def __repr__(self) -> str:
        return f"<{self.variant} {self.root} from {self.source}>"


class HostPolicyDriver(Driver):
    kind = "hostpolicy"

    def __init__(self, variant: str) -> None:
        super().__init__(variant)
        self.maps: dict[str, Path] = {}

    def mount(self, source: Path, name: str = "test.repo") -> str:
        self.maps[name] = source
        return f"/cvmfs/{name}"

    def cmd(self, argv: Sequence[str], *, stats: bool = False) -> list[str]:
        maps = [a for name, d in self.maps.items() for a in ("--map", f"{name}={d}")]
        extra = ["--stats"] if stats else []
        return [sys.executable, "-m", "worker.trace.hostpolicy", *maps, *extra, "--", *argv]


class HepExecDriver(Driver):
    kind = "hep-exec"

    def __init__(self, variant: str, store: Store) -> None:
        super().__init__(variant)
        self.store = store

    def mount(self, source: Path, name: str = "test.repo") -> str:
        self.store.publish(source, name)
        return f"/cvmfs/{name}"

    def cmd(self, argv: Sequence[str], *, stats: bool = False) -> list[str]:
        options = ["--stats-internals"] if stats else []
        return hep_exec_cmd(
            self.store.proxy, argv, keys=self.store.served.keys_dir, options=options
        )
