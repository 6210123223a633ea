"""cvmfs_download.heap: a downloading process reuses its big buffers instead of faulting in
fresh pages for each (the default cost ~490 page faults per 1 MiB object fetched)."""

from __future__ import annotations

import os
import platform
import subprocess
import sys

import pytest

from tests.support.repos import PROJECT

pytestmark = pytest.mark.skipif(
    platform.libc_ver()[0] != "glibc", reason="the thresholds are glibc's"
)

# one object's worth of buffers, made and dropped as a download does: faults per round
ROUNDS = """
import resource, sys
from cvmfs_download.heap import reuse_big_buffers
tuned = reuse_big_buffers() if sys.argv[1] == "tune" else False
def one_object():  # four socket reads of 256 KiB, joined into the body, all dropped
    reads = [bytearray(256 << 10) for _ in range(4)]  # zeroed: every page touched
    body = b"".join(reads)
    del reads, body
for _ in range(5):  # the first rounds may grow the heap
    one_object()
before = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
for _ in range(50):
    one_object()
print(tuned, (resource.getrusage(resource.RUSAGE_SELF).ru_minflt - before) / 50)
"""


def _faults(how: str, **env: str) -> tuple[bool, float]:
    r = subprocess.run(
        [sys.executable, "-c", ROUNDS, how],
        capture_output=True,
        text=True,
        timeout=60,
        cwd=PROJECT,
        env={**os.environ, "PYTHONPATH": str(PROJECT), **env},
        check=True,
    )
    tuned, faults = r.stdout.split()
    return tuned == "True", float(faults)


def test_big_buffers_are_reused_once_tuned() -> None:
    tuned, faults = _faults("tune")
    assert tuned
    assert faults < 8, f"{faults} page faults per object"
    # what it saves: glibc gives the heap's top back and faults it in again (2 MiB)
    assert _faults("leave")[1] > 100


def test_a_users_own_setting_is_left_alone() -> None:
    tuned, faults = _faults("tune", GLIBC_TUNABLES="glibc.malloc.trim_threshold=1")
    assert not tuned and faults > 100
