"""inotify watches on /cvmfs paths succeed and fail as on a read-only mount.

``tail -f``, file watchers and IDEs add watches on the files and directories they use; under
hep-exec every such watch failed with ENOENT (``tail: cannot watch ...: No such file or
directory``), where the FUSE client and the kernel on a read-only tree give one.  The oracle is
the kernel: the same probe runs over a read-only bind mount of the published source tree and
under hep-exec over the repository, and must print the same lines.
"""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest

from tests.support.hep_exec import hep_exec, serving
from tests.support.read_only_mount import make_probe_tree, on_a_read_only_mount
from tests.support.tracing import ensure_built

pytestmark = pytest.mark.slow  # real servers and traced programs

FQRN = "inotify.test.org"

# "<path> <mask> ok|ERRNO" per watch; then the events of listing a watched directory
PROBE = r"""
import ctypes, errno, os, select, struct, sys, time
root = sys.argv[1]
libc = ctypes.CDLL(None, use_errno=True)
libc.inotify_add_watch.argtypes = [ctypes.c_int, ctypes.c_char_p, ctypes.c_uint32]
ino = libc.inotify_init1(os.O_NONBLOCK)
MASKS = {"modify": 0x2, "dont_follow": 0x2 | 0x02000000, "onlydir": 0x2 | 0x01000000}
PATHS = ["", "f", "d", "d/inner", "e", "link_f", "link_d", "dangling", "nothere", "f/x",
         "d/", "link_d/inner", "d/../f"]

def watch(path, mask):
    wd = libc.inotify_add_watch(ino, path.encode(), mask)
    return "ok" if wd >= 0 else errno.errorcode[ctypes.get_errno()]

for rel in PATHS:
    for name, mask in MASKS.items():
        print("watch", rel or ".", name, watch(os.path.join(root, rel), mask))
os.chdir(os.path.join(root, "d"))
print("watch relative inner", watch("inner", 0x2))
print("watch relative ../f", watch("../f", 0x2))

# a directory listed while watched: open, access and close, as the kernel says them
listed = libc.inotify_init1(os.O_NONBLOCK)
wd = libc.inotify_add_watch(listed, os.path.join(root, "e").encode(), 0x1 | 0x20 | 0x10)
os.listdir(os.path.join(root, "e"))
events = []
end = time.monotonic() + 5  # (under hep-exec the close may come a moment later: see below)
while time.monotonic() < end and "0x40000010" not in events:
    if not select.select([listed], [], [], 0.1)[0]:
        continue
    buf = os.read(listed, 4096)
    while buf:
        w, mask, cookie, n = struct.unpack_from("iIII", buf)
        events.append(hex(mask))
        buf = buf[16 + n:]
print("listing e:", wd >= 0, " ".join(events))
"""


@dataclass(frozen=True)
class Tree:
    proxy: str
    key: Path
    src: Path


@pytest.fixture(scope="module")
def tree(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Tree]:
    ensure_built()
    base = tmp_path_factory.mktemp("inotify")
    src = base / "src"
    make_probe_tree(src)
    with serving(src, FQRN, base) as (proxy, repo):
        yield Tree(proxy, repo.master_pub, src)


def test_watches_as_on_a_read_only_mount(tree: Tree, tmp_path: Path, trap_mode: str) -> None:
    """Every watch as the kernel makes or refuses it; and a watched directory's listing reports
    its open, access and close (the close a moment later under hep-exec, in notify mode: the
    tracer's own reference to the directory it opened for the program goes after the
    program's, and the close is reported on the last)."""
    native = on_a_read_only_mount(tree.src, tmp_path / "mnt", ["python3", "-c", PROBE, "{mnt}"])
    lines = native.splitlines()
    for expected in [
        "watch f modify ok", "watch nothere modify ENOENT", "watch f onlydir ENOTDIR",
        "watch dangling modify ENOENT", "watch dangling dont_follow ok", "watch f/x modify ENOTDIR",
        "watch relative ../f ok",
    ]:  # fmt: skip
        assert expected in lines, (expected, native)  # the oracle is one
    assert lines[-1].startswith("listing e: True 0x40000020")  # IN_OPEN | IN_ISDIR first
    root = f"/cvmfs/{FQRN}"
    twice = f'python3 -c "$0" {root} && python3 -c "$0" {root}'
    r = hep_exec(tree.proxy, ["sh", "-c", twice, PROBE], keys=tree.key)  # (HEP_EXEC_TRAP set)
    assert r.returncode == 0, r.stderr
    got = r.stdout.splitlines()
    first, second = got[: len(lines)], got[len(lines) :]
    wrong = [(a, b) for a, b in zip(lines, first, strict=True) if a != b]
    assert not wrong, wrong
    assert second == first  # the second time, from the answers at hand


def test_tail_follows_a_file_without_complaint(tree: Tree) -> None:
    """``tail -f`` watches the file it follows: no "cannot watch" line, no fallback to polling."""
    path = f"/cvmfs/{FQRN}/f"
    r = hep_exec(tree.proxy, ["timeout", "1", "tail", "-f", path], keys=tree.key)
    assert r.returncode == 124, r.stderr  # (ended by timeout, following)
    assert r.stdout == "bytes of f\n"
    assert "cannot watch" not in r.stderr and "polling" not in r.stderr, r.stderr
