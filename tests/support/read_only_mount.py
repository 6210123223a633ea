"""The kernel's own answers for a read-only tree: a command run over a read-only bind mount
of a directory, in a user and mount namespace of its own (``unshare -rm``), as the oracle for
what hep-exec must answer over the same tree published in /cvmfs."""

from __future__ import annotations

import subprocess
from pathlib import Path

import pytest


def on_a_read_only_mount(src: Path, mnt: Path, argv: list[str]) -> str:
    """stdout of ``argv`` with ``{mnt}`` in it standing for ``src`` bind-mounted read-only
    at ``mnt``; the test skips where no such mount can be made here."""
    mnt.mkdir(exist_ok=True)
    script = 'mount --bind "$1" "$2" && mount -o remount,bind,ro "$2" && shift 2 && exec "$@"'
    args = [a.replace("{mnt}", str(mnt)) for a in argv]
    r = subprocess.run(
        ["unshare", "-rm", "sh", "-c", script, "sh", str(src), str(mnt), *args],
        capture_output=True, text=True, timeout=120,
    )  # fmt: skip
    if r.returncode != 0 and not r.stdout:
        pytest.skip(f"no read-only bind mount in a user namespace here: {r.stderr.strip()}")
    assert r.returncode == 0, r.stderr
    return r.stdout


def make_probe_tree(src: Path) -> None:
    """The small tree the oracle tests publish and bind-mount alike: a file ``f``, directories
    ``d`` (with ``d/inner``) and ``e``, symlinks to the file and to ``d``, and a dangling one."""
    (src / "d" / "inner").mkdir(parents=True)
    (src / "e").mkdir()
    (src / "f").write_bytes(b"bytes of f\n")
    (src / "link_f").symlink_to("f")
    (src / "link_d").symlink_to("d")
    (src / "dangling").symlink_to("nothere")
