"""Running real commands under the tracer with a host directory mounted as /cvmfs/test.repo."""

from __future__ import annotations

import os
import pickle
import subprocess
import sys
import tempfile
import traceback
from collections.abc import Callable, Iterator, Mapping, Sequence
from contextlib import contextmanager
from pathlib import Path
from typing import TypeVar

import pytest

PROJECT = Path(__file__).resolve().parents[2]
MOUNT = "/cvmfs/test.repo"


_unavailable: list[str | None] = []

T = TypeVar("T")


def in_child(fn: Callable[[], T]) -> T:
    """``fn()`` called in a forked child of this process; its result (pickled back), or an
    AssertionError carrying the child's traceback.

    For calls of ``worker.trace.tracer.run`` (and ``check``) from the test process: the tracer reaps
    with ``waitpid(-1, __WALL)`` (worker/trace/README.md, known limits: its caller must have no
    other children), so in a test process that also has nginx or a proxy as children it would
    not return before they exit.  A fresh child has only the tracees as children.  Its output
    goes to the same file descriptors (``capfd`` sees it)."""
    r, w = os.pipe()
    sys.stdout.flush()
    sys.stderr.flush()
    pid = os.fork()
    if pid == 0:  # pragma: no cover - the child
        try:
            os.close(r)
            try:
                data = pickle.dumps((True, fn()))
            except BaseException:
                data = pickle.dumps((False, traceback.format_exc()))
            sys.stdout.flush()
            sys.stderr.flush()
            with os.fdopen(w, "wb") as out:
                out.write(data)
        finally:
            os._exit(0)
    os.close(w)
    with os.fdopen(r, "rb") as inp:
        data = inp.read()
    _, status = os.waitpid(pid, 0)
    if not data:
        raise AssertionError(f"the child calling {fn!r} died (wait status {status:#x})")
    ok, value = pickle.loads(data)
    if not ok:
        raise AssertionError(f"in the child calling {fn!r}:\n{value}")
    return value  # type: ignore[no-any-return]


def ensure_built() -> None:
    """Build the extensions in place when a C source is newer than the build (or absent), and
    skip when this host forbids ptrace or seccomp (some containers)."""
    newest = max(p.stat().st_mtime for p in (PROJECT / "worker").rglob("*.[ch]"))
    built = list((PROJECT / "worker" / "trace").glob("_trap.*.so"))
    if not built or any(so.stat().st_mtime < newest for so in built):
        subprocess.run(
            [sys.executable, "setup.py", "-q", "build_ext", "--inplace"],
            cwd=PROJECT,
            check=True,
            capture_output=True,
        )
    if not _unavailable:
        from worker.trace.tracer import check

        _unavailable.append(in_child(check))
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
    return [sys.executable, "-m", "worker.trace.hostpolicy", "--map", f"test.repo={repo}", *extra,
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
