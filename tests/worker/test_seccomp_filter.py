"""The seccomp filter a run installs (worker/trace/trap/filter.c), run here by a small
classic-BPF interpreter over every x86_64 syscall number: what it traps, how, and that every
other call is let through on its number alone (the kernel's action cache then allows it from a
bitmap without running the filter)."""

from __future__ import annotations

import ctypes
import errno
import os
import struct

import pytest

_trap = pytest.importorskip("worker.trace._trap", reason="the C extension is not built")

ALLOW, TRACE, NOTIFY = 0x7FFF0000, 0x7FF00000, 0x7FC00000
ERRNO = 0x00050000
ENOSYS = 38
X86_64, I386 = 0xC000003E, 0x40000003
X32_BIT = 0x40000000
COOKIE = 0x1234_5678_9ABC_DEF0

# the calls the filter traps (x86_64 numbers), as worker/trace/trap/filter.c lists them
TRAPPED = {
    "open": 2, "openat": 257, "openat2": 437, "creat": 85, "stat": 4, "lstat": 6,
    "newfstatat": 262, "statx": 332, "fstat": 5, "access": 21, "faccessat": 269,
    "faccessat2": 439, "readlink": 89, "readlinkat": 267, "execve": 59, "execveat": 322,
    "chdir": 80, "fchdir": 81, "fchmod": 91, "fchown": 93, "fsetxattr": 190,
    "fremovexattr": 199, "getcwd": 79, "statfs": 137, "truncate": 76, "mkdir": 83,
    "mkdirat": 258, "rmdir": 84, "unlink": 87, "unlinkat": 263, "rename": 82, "renameat": 264,
    "renameat2": 316, "link": 86, "linkat": 265, "symlink": 88, "symlinkat": 266, "chmod": 90,
    "fchmodat": 268, "fchmodat2": 452, "chown": 92, "lchown": 94, "fchownat": 260, "utime": 132,
    "utimes": 235, "futimesat": 261, "utimensat": 280, "mknod": 133, "mknodat": 259,
    "setxattr": 188, "lsetxattr": 189, "removexattr": 197, "lremovexattr": 198,
    "getxattr": 191, "lgetxattr": 192, "listxattr": 194, "llistxattr": 195, "setxattrat": 463,
    "getxattrat": 464, "listxattrat": 465, "removexattrat": 466, "inotify_add_watch": 254,
    "getdents64": 217, "ptrace": 101,
}  # fmt: skip
# ... of which these stop for ptrace in notify mode too (exec and chdir change the tracee, a
# watch's path is rewritten)
PTRACE_ONLY = {59, 322, 80, 81, 437, 464, 465, 254}
# getdents64 only where the tracer can renumber a listing's entries (pidfd_getfd, Linux 5.6)
_libc = ctypes.CDLL(None, use_errno=True)
if _libc.syscall(438, -1, 0, 0) < 0 and ctypes.get_errno() == errno.ENOSYS:
    del TRAPPED["getdents64"]
IO_URING_SETUP = 425


def run_filter(
    prog: bytes, nr: int, args: tuple[int, ...] = (0,) * 6, arch: int = X86_64
) -> tuple[int, bool]:
    """What the kernel's BPF interpreter answers for one call, and whether the answer looked at
    any argument (struct seccomp_data: nr, arch, instruction pointer, six arguments)."""
    data = struct.pack("<iIQ6Q", nr, arch, 0, *args)
    code_of = [struct.unpack_from("<HBBI", prog, i) for i in range(0, len(prog), 8)]
    pc, acc, looked = 0, 0, False
    while True:
        code, jt, jf, k = code_of[pc]
        if code == 0x20:  # BPF_LD | BPF_W | BPF_ABS
            acc = struct.unpack_from("<I", data, k)[0]
            looked |= k >= 16
            pc += 1
        elif code & 0x07 == 0x05 and code & 0x08 == 0:  # BPF_JMP, BPF_K
            op = code & 0xF0
            taken = {0x10: acc == k, 0x20: acc > k, 0x30: acc >= k, 0x40: acc & k != 0}[op]
            pc += 1 + (jt if taken else jf)
        elif code == 0x06:  # BPF_RET | BPF_K
            return k, looked
        else:
            raise AssertionError(f"instruction {code:#x} at {pc}: not one this filter uses")


@pytest.mark.parametrize("notify", [True, False], ids=["notify", "ptrace"])
@pytest.mark.parametrize("cookie", [COOKIE, None], ids=["handler", "no-handler"])
def test_the_filter_traps_its_calls_and_lets_every_other_one_through_by_number(
    notify: bool, cookie: int | None
) -> None:
    prog = _trap.filter_program(notify, cookie)
    trapped = set(TRAPPED.values())
    for nr in range(0, 512):
        answer, looked = run_filter(prog, nr)
        if nr == IO_URING_SETUP:
            assert (answer, looked) == (ERRNO | ENOSYS, False)
        elif nr not in trapped:
            # no argument looked at: the kernel's action cache allows it without the filter
            assert (answer, looked) == (ALLOW, False), f"syscall {nr}"
        else:
            hot = NOTIFY if notify and nr not in PTRACE_ONLY else TRACE
            assert answer == hot, f"syscall {nr}"
    # O_PATH opens stop for ptrace (an O_PATH fd cannot be installed with ADDFD)
    o_path = os.O_PATH | os.O_CLOEXEC
    assert run_filter(prog, TRAPPED["open"], (0, o_path, 0, 0, 0, 0))[0] == TRACE
    assert run_filter(prog, TRAPPED["openat"], (0, 0, o_path, 0, 0, 0))[0] == TRACE
    # other ABIs do not see /cvmfs
    assert run_filter(prog, TRAPPED["openat"] | X32_BIT)[0] == ALLOW
    assert run_filter(prog, 5, arch=I386)[0] == ALLOW  # i386 open
    # the in-process handler's own calls carry the run's cookie as a 6th argument
    for name, nr in TRAPPED.items():
        with_cookie = run_filter(prog, nr, (0, 0, 0, 0, 0, COOKIE))[0]
        if notify and cookie is not None:
            assert with_cookie == ALLOW, name
        else:
            assert with_cookie != ALLOW, name
        near = run_filter(prog, nr, (0, 0, 0, 0, 0, COOKIE ^ 1 << 40))[0]
        assert near != ALLOW, f"{name}: half a cookie let through"
