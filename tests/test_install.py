"""Installs as sites get them: the wheel (pip, no compiler) and the worker bundle (no Python).

Both are made by the project's own scripts (scripts/wheel, scripts/bundle), whose tools go to
venvs under the cache directory, never into the project's. What they build is kept there too,
keyed by a hash of every file that goes into it, so a rerun on unchanged sources costs only
the checks. Each test then runs hep-exec from the installed copy against a repository our
publisher made, served by tests.support.store_server on loopback, and compares what the job
sees with the source tree.
"""

from __future__ import annotations

import hashlib
import os
import random
import re
import shutil
import signal
import subprocess
import sys
import tarfile
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest

from tests.support.oracle import SCRIPT, SECTIONS, WALKER, compare
from tests.support.processes import gone
from tests.support.processes import started as process_started
from tests.support.repos import Repo, publish_tree
from tests.support.store_server import StoreServer
from tests.support.tracing import compile_c, ensure_built, native, needs_ptrace, ram_dir
from tests.support.trees import make_random_tree
from tests.support.waiting import wait_until

pytestmark = [needs_ptrace, pytest.mark.slow]

PROJECT = Path(__file__).resolve().parent.parent
PACKAGES = ("cvmfs_format", "cvmfs_download", "publish", "preload", "proxy", "worker")
BUILD_INPUTS = (
    "pyproject.toml",
    "setup.py",
    "MANIFEST.in",
    "scripts/wheel",
    "scripts/bundle",
    "scripts/bundle_entry.py",
    "scripts/tools-venv",
    "scripts/build-tools.txt",
)
CACHE = (
    Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache")
    / "hep-cvmfs-hpc"
    / "test-install"
)
FQRN = "install.test.org"
FILE = "pkg/data.bin"
NO_SERVER = ["--cvmfs-config", "none"]  # no /etc/cvmfs of this machine: only what we pass


def sources_hash() -> str:
    """What the wheel and the bundle are made of: the packages' files and the build files."""
    h = hashlib.sha256(f"{sys.version_info[:2]}".encode())
    files = [PROJECT / p for p in BUILD_INPUTS]
    for pkg in PACKAGES:
        files += (
            p
            for p in (PROJECT / pkg).rglob("*")
            if "__pycache__" not in p.parts and p.suffix not in (".so", ".pyc")
        )
    for path in sorted(files):
        h.update(str(path.relative_to(PROJECT)).encode() + b"\0")
        if path.is_symlink():
            h.update(os.readlink(path).encode())
        elif path.is_file():
            h.update(path.read_bytes())
    return h.hexdigest()[:16]


def built(kind: str, script: str) -> Path:
    """``scripts/SCRIPT`` run once per sources hash; its output directory, from the cache.

    Built next to its final place and renamed into it, so a killed or concurrent run never
    leaves half a build where the next one looks; older builds are removed."""
    if shutil.which("gcc") is None:
        pytest.skip(f"gcc not installed (scripts/{script} compiles the C extensions)")
    key = sources_hash()
    final = CACHE / kind / key
    if not final.is_dir():
        final.parent.mkdir(parents=True, exist_ok=True)
        tmp = final.parent / f"{key}.tmp-{os.getpid()}"
        shutil.rmtree(tmp, ignore_errors=True)
        done = subprocess.run(
            [str(PROJECT / "scripts" / script), str(tmp)],
            env={**os.environ, "PYTHON": sys.executable},
            capture_output=True,
            text=True,
            timeout=600,
        )
        assert done.returncode == 0, done.stderr[-4000:]
        try:
            tmp.rename(final)
        except OSError:  # another session got there first
            shutil.rmtree(tmp, ignore_errors=True)
        for old in final.parent.iterdir():
            if old.name != key and ".tmp-" not in old.name:
                shutil.rmtree(old, ignore_errors=True)
    return final


@dataclass
class Published:
    repo: Repo
    src: Path
    server: StoreServer
    walker: Path

    def options(self) -> list[str]:
        """hep-exec options that name our server and key and nothing of this machine's."""
        return ["--server", self.server.url, "--keys", str(self.repo.master_pub), *NO_SERVER]


@pytest.fixture(scope="module")
def published(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Published]:
    """A random tree (every kind of entry, nested catalogs) and one file of known bytes,
    published and served; sources on tmpfs so directory sizes compare equal."""
    ensure_built()  # skips where this host forbids ptrace or seccomp
    base = tmp_path_factory.mktemp("install")
    walker = compile_c(WALKER, base / "walker")
    with ram_dir() as src:
        make_random_tree(src / "top", random.Random(7), 50, every_kind=True, catalogs=True)
        (src / "pkg").mkdir()
        (src / FILE).write_bytes(random.Random(8).randbytes(300_000))
        repo, _ = publish_tree(src, base / "store", FQRN, base / "keys")
        server = StoreServer(base / "store")
        try:
            yield Published(repo, src, server, walker)
        finally:
            server.stop()


def clean_env(path: str, **extra: str) -> dict[str, str]:
    """This environment without anything that points Python at this source tree."""
    env = {k: v for k, v in os.environ.items() if not k.startswith(("PYTHON", "VIRTUAL_ENV"))}
    return {**env, "PATH": path, **extra}


# ------------------------------------------------------------------------------ the wheel


def test_sdist_has_what_setup_py_compiles() -> None:
    """The sdist builds from source: every C file and header, the handler's included."""
    dist = built("wheel", "wheel")
    (sdist,) = dist.glob("*.tar.gz")
    with tarfile.open(sdist) as tar:
        names = {n.split("/", 1)[1] for n in tar.getnames() if "/" in n}
    want = {str(p.relative_to(PROJECT)) for p in (PROJECT / "worker").rglob("*.[ch]")}
    assert want and want <= names, want - names
    assert "setup.py" in names and "publish/sample_tree/lib/.cvmfscatalog" in names
    assert not [n for n in names if n.endswith((".so", ".o"))]


def test_wheel_installs_without_a_compiler_and_runs_the_oracle(
    published: Published, tmp_path: Path
) -> None:
    """A fresh venv, pip with binaries only and no compiler on PATH; then the oracle walk of
    the published tree under that install's hep-exec agrees with the source tree."""
    dist = built("wheel", "wheel")
    (wheel,) = dist.glob("*.whl")
    tag = re.search(r"-(manylinux_\d+_\d+_\w+)\.whl$", wheel.name)
    assert tag, wheel.name
    venv = tmp_path / "venv"
    subprocess.run([sys.executable, "-m", "venv", str(venv)], check=True, timeout=120)
    nothing = tmp_path / "empty-bin"  # PATH: no gcc, no cc, nothing at all
    nothing.mkdir()
    pip = subprocess.run(
        [str(venv / "bin/python"), "-m", "pip", "install", "-q", "--disable-pip-version-check",
         "--no-build-isolation", "--only-binary", ":all:", str(wheel)],
        env=clean_env(str(nothing)),
        cwd=tmp_path,
        capture_output=True,
        text=True,
        timeout=300,
    )  # fmt: skip
    assert pip.returncode == 0, pip.stderr[-3000:]
    where = subprocess.run(
        [str(venv / "bin/python"), "-c", "import worker.trace._trap as t; print(t.__file__)"],
        env=clean_env(str(nothing)),
        cwd=tmp_path,
        capture_output=True,
        text=True,
        check=True,
    ).stdout
    assert where.startswith(str(venv)), where

    src, mount = published.src, f"/cvmfs/{FQRN}"
    want = native(["bash", "-c", SCRIPT, "x", str(src), str(published.walker)])
    got = subprocess.run(
        [str(venv / "bin/hep-exec"), *published.options(), "--no-shared-cache", "--",
         "bash", "-c", SCRIPT, "x", mount, str(published.walker)],
        env=clean_env(f"{venv / 'bin'}:/usr/bin:/bin"),
        cwd=tmp_path,
        capture_output=True,
        text=True,
        timeout=120,
    )  # fmt: skip
    w, g = compare(want.stdout, got.stdout, str(src), mount)
    assert want.returncode == 0, want.stderr
    assert got.returncode == 0, got.stderr[-3000:]
    assert list(g) == SECTIONS
    for name in SECTIONS:
        assert g[name] == w[name], (name, got.stderr[-3000:])
    assert f"cwd {mount}/top" in g["walker"]


# ------------------------------------------------------------------------------ the bundle


@pytest.fixture(scope="module")
def bundle(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The bundle, copied (symlinks kept, as cp -a would) to a directory of its own."""
    import sysconfig

    if not sysconfig.get_config_var("Py_ENABLE_SHARED"):
        pytest.skip(f"{sys.executable} has no shared libpython (PyInstaller needs one)")
    copy = tmp_path_factory.mktemp("elsewhere") / "hep-cvmfs-hpc"
    shutil.copytree(built("bundle", "bundle"), copy, symlinks=True)
    return copy


@pytest.fixture
def bare(tmp_path: Path) -> dict[str, str]:
    """``env -i`` with PATH a directory of a few tools and no Python anywhere on it."""
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    for tool in ("sh", "cat", "ls", "env"):
        found = shutil.which(tool, path="/usr/bin:/bin")
        assert found, tool
        (bin_dir / tool).symlink_to(found)
    assert shutil.which("python3", path=str(bin_dir)) is None
    return {"PATH": str(bin_dir)}


def run_bare(
    argv: list[str], env: dict[str, str], cwd: Path, timeout: float = 60
) -> subprocess.CompletedProcess[bytes]:
    """``env -i PATH=… ARGV``: nothing of this environment, Python's least of all."""
    return subprocess.run(
        ["/usr/bin/env", "-i", *(f"{k}={v}" for k, v in env.items()), *argv],
        env={},
        cwd=cwd,
        capture_output=True,
        timeout=timeout,
    )


def service_pid(stderr: bytes) -> int:
    """The node service's pid from ``--stats``."""
    m = re.search(rb"service pid (\d+)", stderr)
    assert m, stderr[-2000:]
    return int(m[1])


def test_bundle_runs_without_python(
    bundle: Path, published: Published, bare: dict[str, str], tmp_path: Path
) -> None:
    """hep-exec from the copied bundle reads a /cvmfs file byte for byte, with a private
    cache; the job sees none of the bootloader's variables; the other tools start."""
    want = (published.src / FILE).read_bytes()
    job = run_bare(
        [str(bundle / "hep-exec"), *published.options(), "--no-shared-cache", "--",
         "sh", "-c", f"cat /cvmfs/{FQRN}/{FILE}; env >&2"],
        bare,
        tmp_path,
    )  # fmt: skip
    assert job.returncode == 0, job.stderr[-3000:]
    assert job.stdout == want
    leaked = [v for v in job.stderr.splitlines() if v.startswith((b"_PYI_", b"LD_LIBRARY"))]
    assert not leaked, leaked
    for tool in ("preload", "hep-proxy", "hep-publish"):
        done = run_bare([str(bundle / tool), "--help"], bare, tmp_path)
        assert done.returncode == 0, (tool, done.stderr[-2000:])
        assert done.stdout.startswith(f"usage: {tool}".encode()), done.stdout[:200]


def test_bundle_starts_the_node_cache_service(
    bundle: Path, published: Published, bare: dict[str, str], tmp_path: Path
) -> None:
    """With the shared cache on, the service the frozen hep-exec starts (a fork of itself) is
    the bundle's program and serves the file; and the way hep-exec starts it when it already
    runs threads, ``sys.executable -m worker.node.cache_service --background …``, works with the
    bundle's program as sys.executable."""
    want = (published.src / FILE).read_bytes()
    started: list[tuple[int, int | None]] = []  # (pid, start time)
    try:
        for how in ("fork", "background"):
            cache_dir = tmp_path / f"cache-{how}"
            options = [*published.options(), "--cache-dir", str(cache_dir), "--cache-idle", "30"]
            if how == "background":
                begun = run_bare(
                    [str(bundle / "hep-exec"), "-m", "worker.node.cache_service", "--background",
                     *options],
                    bare,
                    tmp_path,
                )  # fmt: skip
                assert begun.returncode == 0, begun.stderr[-2000:]
            job = run_bare(
                [str(bundle / "hep-exec"), *options, "--stats", "--",
                 "cat", f"/cvmfs/{FQRN}/{FILE}"],
                bare,
                tmp_path,
            )  # fmt: skip
            assert job.returncode == 0, job.stderr[-3000:]
            assert job.stdout == want
            pid = service_pid(job.stderr)
            started.append((pid, process_started(pid)))
            assert Path(f"/proc/{pid}/exe").resolve() == (bundle / "hep-exec").resolve()
            argv = Path(f"/proc/{pid}/cmdline").read_bytes().split(b"\0")
            assert (b"worker.node.cache_service" in argv) == (how == "background"), argv
            assert re.search(rb"shared cache: [1-9]\d* objects received", job.stderr), how
    finally:  # the services would leave by themselves after --cache-idle
        for pid, since in started:
            if not gone(pid, since):
                os.kill(pid, signal.SIGTERM)
        wait_until(lambda: all(gone(pid, since) for pid, since in started), timeout=10)
