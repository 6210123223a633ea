"""Running real commands under the tracer with a host directory mounted as /cvmfs/test.repo."""

from __future__ import annotations

import os
import subprocess
import sys
import tempfile
from collections.abc import Iterator, Mapping, Sequence
from contextlib import contextmanager
from pathlib import Path

import pytest

PROJECT = Path(__file__).resolve().parents[2]
MOUNT = "/cvmfs/test.repo"


_unavailable: list[str | None] = []


def ensure_built() -> None:
    """Build the extensions in place when a C source is newer than the build (or absent), and
    skip when this host forbids ptrace or seccomp (some containers)."""
    newest = max(p.stat().st_mtime for p in (PROJECT / "worker").glob("_*.[ch]"))
    built = list((PROJECT / "worker").glob("_trap.*.so"))
    if not built or any(so.stat().st_mtime < newest for so in built):
        subprocess.run(
            [sys.executable, "setup.py", "-q", "build_ext", "--inplace"],
            cwd=PROJECT,
            check=True,
            capture_output=True,
        )
    if not _unavailable:
        from worker.tracer import check

        _unavailable.append(check())
    if _unavailable[0]:
        pytest.skip(f"tracing unavailable here: {_unavailable[0]}")


def env_with(extra: Mapping[str, str] | None = None) -> dict[str, str]:
    env = dict(os.environ)
    env["PYTHONPATH"] = str(PROJECT) + os.pathsep + env.get("PYTHONPATH", "")
    env.update(extra or {})
    return env


def hep_cmd(repo: Path, argv: Sequence[str], *, stats: bool = False) -> list[str]:
    """The command line running ``argv`` with ``repo`` at /cvmfs/test.repo."""
    extra = ["--stats"] if stats else []
    return [sys.executable, "-m", "worker.hostpolicy", "--map", f"test.repo={repo}", *extra,
            "--", *argv]  # fmt: skip


def traced(
    repo: Path,
    argv: Sequence[str],
    *,
    env: Mapping[str, str] | None = None,
    cwd: str | Path | None = None,
    timeout: float = 60,
    stats: bool = False,
) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        hep_cmd(repo, argv, stats=stats),
        env=env_with(env),
        cwd=cwd,
        capture_output=True,
        text=True,
        timeout=timeout,
    )


def native(
    argv: Sequence[str], *, env: Mapping[str, str] | None = None, cwd: str | Path | None = None
) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        argv, env=env_with(env), cwd=cwd, capture_output=True, text=True, timeout=60
    )


def compile_c(source: str, out: Path, *flags: str) -> Path:
    src = out.with_suffix(".c")
    src.write_text(source)
    subprocess.run(["gcc", "-O1", "-o", str(out), str(src), *flags], check=True)
    return out


@contextmanager
def ram_dir() -> Iterator[Path]:
    """A directory on tmpfs (like the shadow tree), so directory sizes compare equal."""
    base = "/dev/shm" if os.access("/dev/shm", os.W_OK) else None
    with tempfile.TemporaryDirectory(prefix="tracer-test-", dir=base) as d:
        os.chmod(d, 0o755)
        yield Path(d)


needs_ptrace = pytest.mark.skipif(sys.platform != "linux", reason="ptrace tracer is Linux-only")
