"""The real CernVM-FS client from ``../shared/reference`` in tests: unpacked once into a cache,
``cvmfs2`` mounts with a private cache, ``cvmfs_swissknife``/``cvmfs_preload`` runs.

The reference is never part of the project: tests that use it skip, saying why, when
``../shared/reference`` (``HEP_SHARED_DIR``) is absent or FUSE cannot be used here.
"""

from __future__ import annotations

import contextlib
import fcntl
import os
import shutil
import signal
import subprocess
import time
from collections.abc import Iterator, Mapping
from dataclasses import dataclass
from pathlib import Path

from tests.support.repos import SHARED

REFERENCE = SHARED / "reference"
VERSION = "cvmfs-2.11.5"
ARCHIVE = REFERENCE / f"{VERSION}-debian12-x86_64.tar.xz"
UNPACK = REFERENCE / "unpack"
STAMP = ".unpacked"


def cache_root() -> Path:
    """``$HEP_TEST_CACHE`` or ``~/.cache/hep-tests`` (``$XDG_CACHE_HOME`` honoured)."""
    if os.environ.get("HEP_TEST_CACHE"):
        return Path(os.environ["HEP_TEST_CACHE"])
    base = os.environ.get("XDG_CACHE_HOME") or str(Path.home() / ".cache")
    return Path(base) / "hep-tests"


def missing_reason() -> str | None:
    """Why the reference tools cannot be used, or None."""
    if not ARCHIVE.is_file() or not UNPACK.is_file():
        return f"reference CernVM-FS client not found at {REFERENCE} (set HEP_SHARED_DIR)"
    return None


def fuse_reason() -> str | None:
    """Why ``cvmfs2`` cannot mount here, or None."""
    if os.geteuid() != 0:
        return "cvmfs2 mounts need root (CVMFS_USER=root; run ./run-tests as root)"
    try:
        fd = os.open("/dev/fuse", os.O_RDWR)
    except OSError as e:
        return f"/dev/fuse is not usable ({e.strerror})"
    os.close(fd)
    if shutil.which("fusermount3") is None:
        return "fusermount3 not installed (Debian package fuse3)"
    return None


@dataclass(frozen=True)
class Reference:
    """The unpacked tools: ``env`` has PATH, LD_LIBRARY_PATH and CVMFS_LIBRARY_PATH set."""

    dir: Path
    env: Mapping[str, str]

    def run(
        self,
        *args: str | Path,
        timeout: float = 60,
        env: Mapping[str, str] | None = None,
    ) -> subprocess.CompletedProcess[str]:
        """One reference program to completion (stdout and stderr as text)."""
        return subprocess.run(
            [str(a) for a in args],
            env={**self.env, **(env or {})},
            capture_output=True,
            text=True,
            timeout=timeout,
            stdin=subprocess.DEVNULL,
        )

    def check(self, url: str, fqrn: str, key: Path, tmp: Path) -> subprocess.CompletedProcess[str]:
        """``cvmfs_swissknife check -c`` of the repository at ``url``: the signature chain
        (master key -> whitelist -> certificate -> manifest), every catalog's hash and
        consistency, and that every object it names is there. With a directory instead of a
        URL, swissknife skips the signatures, so give it a URL."""
        tmp.mkdir(parents=True, exist_ok=True)
        return self.run(
            "cvmfs_swissknife", "check", "-r", url, "-N", fqrn, "-k", key, "-t", tmp, "-c"
        )


def _key() -> str:
    st = ARCHIVE.stat()
    return f"{VERSION}-{st.st_mtime_ns}-{st.st_size}"


def _read_env(env_sh: Path) -> dict[str, str]:
    out = subprocess.run(
        ["sh", "-c", '. "$1" && env -0', "sh", str(env_sh)],
        capture_output=True,
        timeout=30,
        check=True,
    ).stdout
    return dict(
        item.split("=", 1) for item in out.decode().split("\0") if "=" in item
    )  # the environment as env.sh leaves it


def unpack_reference(cache: Path | None = None) -> Reference:
    """Unpack with ``../shared/reference/unpack`` into ``cache/reference/<version-mtime-size>``
    once (later sessions reuse it; a new archive gets a new directory), under a lock."""
    root = (cache or cache_root()) / "reference"
    root.mkdir(parents=True, exist_ok=True)
    target = root / _key()
    with open(root / ".lock", "a+") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        if not (target / STAMP).is_file():
            shutil.rmtree(target, ignore_errors=True)  # a run killed while unpacking
            subprocess.run(
                ["sh", str(UNPACK), str(target)], capture_output=True, timeout=300, check=True
            )
            (target / STAMP).write_text(f"{ARCHIVE}\n")
    env = _read_env(target / "env.sh")
    return Reference(target, env)


# -- cvmfs2 mounts ---------------------------------------------------------------------


def _pids_with(needle: str) -> list[int]:
    """Processes whose command line names ``needle`` (our config file: only ours)."""
    out = []
    for d in Path("/proc").iterdir():
        if not d.name.isdigit():
            continue
        try:
            cmdline = (d / "cmdline").read_bytes()
        except OSError:
            continue
        if needle.encode() in cmdline:
            out.append(int(d.name))
    return out


def _unmount(ref: Reference, mnt: Path, config: Path) -> None:
    """``fusermount3 -u``, else ``umount -l``; then wait for our cvmfs2 processes to go."""
    if os.path.ismount(mnt):
        with contextlib.suppress(subprocess.TimeoutExpired):
            subprocess.run(["fusermount3", "-u", str(mnt)], capture_output=True, timeout=20)
    if os.path.ismount(mnt):
        subprocess.run(["umount", "-l", str(mnt)], capture_output=True, timeout=20)
    deadline = time.monotonic() + 15
    while (pids := _pids_with(str(config))) and time.monotonic() < deadline:
        time.sleep(0.05)
    for pid in pids:  # cvmfs2 processes of this mount that did not exit by themselves
        with contextlib.suppress(ProcessLookupError):
            os.kill(pid, signal.SIGKILL)


def site_files(site: Path, fqrn: str) -> list[Path]:
    """The files of a configuration directory that apply to ``fqrn``, in the client's order
    (the order hep-exec reads them in: cvmfs_format.client_config)."""
    from cvmfs_format.client_config import config_paths

    out: list[Path] = []
    for rel in config_paths(fqrn):
        out += sorted(site.glob(rel)) if "*" in rel else [site / rel]
    return [f for f in out if f.is_file()]


@contextlib.contextmanager
def mounted(
    ref: Reference,
    workdir: Path,
    fqrn: str,
    public_key: Path,
    server_url: str,
    proxy: str = "DIRECT",
    env: Mapping[str, str] | None = None,
    site: Path | None = None,
) -> Iterator[Path]:
    """``cvmfs2`` mounts ``fqrn`` from ``server_url`` (through ``proxy``) on a fresh mount
    point with a fresh private cache in ``workdir``; unmounted however the block ends.

    With ``site`` (a CernVM-FS configuration directory), servers, proxies and keys come from
    its files instead, in the order the client reads them; only the cache settings are ours.
    """
    cache = workdir / "cache"
    mnt = workdir / "mnt"
    cache.mkdir(parents=True)
    mnt.mkdir()
    config = workdir / "client.conf"
    chain = [] if site is None else site_files(site, fqrn)
    ours = {
        "CVMFS_SERVER_URL": server_url,
        "CVMFS_HTTP_PROXY": proxy,
        "CVMFS_PUBLIC_KEY": str(public_key),
    }
    settings = {
        **({} if site is not None else ours),
        "CVMFS_CACHE_BASE": str(cache),
        "CVMFS_RELOAD_SOCKETS": str(cache),
        "CVMFS_USER": "root",
        "CVMFS_SHARED_CACHE": "no",
        "CVMFS_QUOTA_LIMIT": "-1",
        "CVMFS_TIMEOUT": "10",
        "CVMFS_TIMEOUT_DIRECT": "10",
    }
    config.write_text("".join(f"{k}={v}\n" for k, v in settings.items()))
    try:
        files = ":".join(str(f) for f in [*chain, config])
        p = ref.run("cvmfs2", "-o", f"config={files},fsname=cvmfs2", fqrn, mnt, timeout=60, env=env)
        if p.returncode != 0 or not os.path.ismount(mnt):
            raise AssertionError(
                f"cvmfs2 did not mount {fqrn} from {server_url} (proxy {proxy}): "
                f"exit {p.returncode}\n{p.stdout}{p.stderr}"
            )
        yield mnt
    finally:
        _unmount(ref, mnt, config)
