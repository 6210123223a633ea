"""What a rewritten exec runs: the file the kernel can open for a /cvmfs program, under a
name that makes the process what it would be natively.

Programs whose ELF interpreter lives under the mount (EESSI's compat layer, Compute Canada's
Gentoo Prefix: every program of theirs names ``/cvmfs/…/ld-linux-x86-64.so.2``): the kernel
opens a program's interpreter (PT_INTERP) itself, inside execve, where no filter sees it;
``/cvmfs/…`` does not exist on the host, and the exec failed with ENOENT.  Such a program is
exec'd from a copy of it in RAM whose PT_INTERP names the interpreter's file through an fd of
ours (``/proc/<tracer>/fd/<n>``, which the kernel opens like any path); the program's own
bytes are otherwise the same, and /proc/self/exe still says its own path (worker.trace.answers,
Session._exec).  :func:`interp_span` is the parse, without I/O.

The kernel names a process after the last component of the path it was exec'd by (``comm``:
what ps, top, pgrep, pidof and killall show, and a batch system's per-process accounting):
for a /cvmfs program run from its RAM file, a content hash or an fd number.
:class:`ExecFiles` gives each rewritten exec a symlink in the run's private tree named as the
caller named the program (a script's own name for a ``#!`` script, as binfmt_script does), and
holds the run's copies and the fds they name.
"""

from __future__ import annotations

import fcntl
import logging
import os
import stat
import struct
from collections.abc import Callable, Mapping

from worker.trace.shebang import exe_link, file_head, parse_shebang

log = logging.getLogger(__name__)

PT_INTERP = 3
_ET_EXEC, _ET_DYN = 2, 3
# (program header format, its size as the kernel insists on it) for ELFCLASS32 and ELFCLASS64
_PHDR = {1: ("IIIIIIII", 32), 2: ("IIQQQQQQ", 56)}
_PHDRS_MAX = 65536  # the kernel reads at most this much of the program header table
_PATH_MAX = 4096
MFD_EXEC = 0x10  # Linux 6.3: executable even where vm.memfd_noexec makes memfds noexec
_SEALS = fcntl.F_SEAL_SEAL | fcntl.F_SEAL_SHRINK | fcntl.F_SEAL_GROW | fcntl.F_SEAL_WRITE


def interp_span(read: Callable[[int, int], bytes]) -> tuple[int, int] | None:
    """Where an ELF program names its interpreter: (file offset, size of the field with its
    NUL), or None (no ELF program, no interpreter, or one the kernel would refuse to load).
    ``read(offset, size)`` gives the file's bytes there (fewer at its end)."""
    head = read(0, 64)
    if len(head) < 52 or head[:4] != b"\x7fELF" or head[4] not in _PHDR or head[5] not in (1, 2):
        return None
    end = "<" if head[5] == 1 else ">"
    fmt, entsize = _PHDR[head[4]]
    if head[4] == 2:
        if len(head) < 64:
            return None
        (phoff,) = struct.unpack_from(end + "Q", head, 0x20)
        phentsize, phnum = struct.unpack_from(end + "HH", head, 0x36)
    else:
        (phoff,) = struct.unpack_from(end + "I", head, 0x1C)
        phentsize, phnum = struct.unpack_from(end + "HH", head, 0x2A)
    (e_type,) = struct.unpack_from(end + "H", head, 0x10)
    size = phnum * phentsize
    if e_type not in (_ET_EXEC, _ET_DYN) or phentsize != entsize or not 0 < size <= _PHDRS_MAX:
        return None
    table = read(phoff, size)
    if len(table) < size:
        return None
    for i in range(phnum):
        ph = struct.unpack_from(end + fmt, table, i * entsize)
        if ph[0] == PT_INTERP:  # the first one, as the kernel takes it
            offset, filesz = (ph[2], ph[5]) if head[4] == 2 else (ph[1], ph[4])
            return (offset, filesz) if 2 <= filesz <= _PATH_MAX else None
    return None


class ExecFiles:
    """A run's copies of programs whose interpreter is under the mount, the fds through which
    the kernel opens those interpreters, and the links programs are exec'd by; kept until
    :meth:`close` (a program may be exec'd again, and the kernel opens the interpreter of each
    exec anew).  ``shadow``, ``shadow_write``: the mount's mirror in the run's private tree, as
    tracees reach it and as we write it; the links go beside it."""

    def __init__(
        self, in_mount: Callable[[bytes], bool], shadow: bytes, shadow_write: bytes
    ) -> None:
        self._in_mount = in_mount
        self._images: dict[tuple[int, int, int, int, bytes], bytes] = {}
        self._interp_fds: dict[bytes, int] = {}  # interpreter's file -> our fd of it
        self._copy_fds: list[int] = []  # the copies'
        self._link_dir = shadow_write.rpartition(b"/")[0] + b"/exec"
        self._link_access = shadow.rpartition(b"/")[0] + b"/exec"
        self._links: dict[tuple[bytes, bytes], bytes] = {}
        self.exe_paths: dict[bytes, bytes] = {}  # exec'd file -> what /proc/<pid>/exe says

    def decide(
        self,
        path: bytes,
        target: Callable[[bytes], tuple[bytes, bytes] | int],
        opened_as: Mapping[bytes, bytes],
    ) -> tuple[bytes, list[bytes]] | int | None:
        """An execve of ``path``: (the file to exec instead, the argv prefix before the
        caller's argv[1:]), an errno, or None (exec it as it is).  /cvmfs programs run from
        the file ``target`` gives ((file, its first bytes), or an errno); ``#!`` interpreters
        under the mount are exec'd directly with the script's path as argument, as
        binfmt_script would have done; ELF interpreters under the mount are named anew
        (:meth:`image`); and every rewritten exec goes by a link with the caller's name for
        the program (:meth:`named`).  ``opened_as``: RAM file -> the /cvmfs path it holds."""
        got = target(path) if self._in_mount(path) else (path, file_head(path))
        if isinstance(got, int):
            return got
        file, head = got
        script = path
        prefix: list[bytes] = []
        for _ in range(4):  # nested interpreters, as binfmt_script allows
            shebang = parse_shebang(head)
            if shebang is None:
                break
            interp, arg = shebang
            if not self._in_mount(interp) and not self._in_mount(script):
                break  # host script, host interpreter: the kernel's business
            prefix = [interp, *([arg] if arg else []), script, *prefix[1:]]
            if not self._in_mount(interp):
                file = interp
                break
            got = target(interp)
            if isinstance(got, int):
                return got
            file, head = got
            script = interp
        shown = exe_link(file)  # what /proc/self/exe is to say: exe
        exe = script if self._in_mount(script) else opened_as.get(shown, shown)
        image = self.image(file, exe, target)
        if isinstance(image, int):  # its ELF interpreter is under the mount, and not there
            return image
        if image is not None or self._in_mount(script):
            self.exe_paths[shown if image is None else exe_link(image)] = exe
            file = image or file
        if not prefix and file == path:
            return None
        return self.named(file, os.path.basename(path)), prefix  # ps, top: its own name

    def image(
        self, file: bytes, name: bytes, interp_file: Callable[[bytes], tuple[bytes, bytes] | int]
    ) -> bytes | int | None:
        """The file to exec instead of ``file`` (program ``name``) when its interpreter is
        under the mount (a copy naming the interpreter's file, made once), an errno the exec
        must fail with (``interp_file`` of the interpreter's /cvmfs path: (its file, its
        head), or why there is none), or None: ``file`` is exec'd as it is."""
        try:
            fd = os.open(file, os.O_RDONLY | os.O_NONBLOCK | os.O_NOCTTY | os.O_CLOEXEC)
        except OSError:
            return None
        try:
            st = os.fstat(fd)
            if not stat.S_ISREG(st.st_mode):
                return None
            span = interp_span(lambda offset, size: os.pread(fd, size, offset))
            if span is None:
                return None
            offset, size = span
            field = os.pread(fd, size, offset)
            if len(field) < size or field[-1:] != b"\0":
                return None  # (the kernel's ENOEXEC)
            interp = field[:-1]
            if not self._in_mount(interp):
                return None
            got = interp_file(interp)
            if isinstance(got, int):
                return got
            target = got[0]
            key = (st.st_dev, st.st_ino, st.st_size, st.st_mtime_ns, target)
            known = self._images.get(key)
            if known is None:
                made = self._copy(fd, st.st_size, span, target, name, interp)
                if isinstance(made, int):
                    return made
                known = self._images[key] = made
            return known
        except OSError as e:
            log.warning("%s: cannot make its copy to exec: %s", os.fsdecode(name), e.strerror)
            return e.errno or None
        finally:
            os.close(fd)

    def _copy(
        self, fd: int, length: int, span: tuple[int, int], target: bytes, name: bytes, interp: bytes
    ) -> bytes | int:
        offset, size = span
        ifd = self._interp_fds.get(target)
        if ifd is None:
            ifd = self._interp_fds[target] = os.open(target, os.O_RDONLY | os.O_CLOEXEC)
        via = f"/proc/{os.getpid()}/fd/{ifd}".encode()
        if len(via) >= size:  # (every real one is longer: /cvmfs/<repository>/…)
            log.warning(
                "%s: its ELF interpreter %s has too short a name to be given another",
                os.fsdecode(name),
                os.fsdecode(interp),
            )
            return 2  # ENOENT, as before
        label = os.path.basename(name).decode(errors="replace")[:200]
        flags = os.MFD_CLOEXEC | os.MFD_ALLOW_SEALING
        try:
            copy = os.memfd_create(f"hep-exec {label}", flags | MFD_EXEC)
        except OSError:  # (before Linux 6.3)
            copy = os.memfd_create(f"hep-exec {label}", flags)
        self._copy_fds.append(copy)
        done = 0
        while done < length:  # (copy_file_range: EXDEV between file systems)
            n = os.sendfile(copy, fd, done, length - done)
            if n == 0:
                break
            done += n
        os.pwrite(copy, via.ljust(size, b"\0"), offset)
        fcntl.fcntl(copy, fcntl.F_ADD_SEALS, _SEALS)
        return f"/proc/{os.getpid()}/fd/{copy}".encode()

    def named(self, file: bytes, name: bytes) -> bytes:
        """A path to exec ``file`` by that makes the process ``name`` (``file`` itself where
        no link could be made: the exec runs, named as before)."""
        if not name or name in (b".", b".."):
            return file
        known = self._links.get((name, file))
        if known is None:
            k = b"%d" % len(self._links)
            try:
                if not self._links:
                    os.makedirs(self._link_dir, 0o755, exist_ok=True)
                os.mkdir(self._link_dir + b"/" + k, 0o755)
                os.symlink(file, self._link_dir + b"/" + k + b"/" + name)
            except OSError as e:
                log.debug("%s: no link to exec it by: %s", os.fsdecode(name), e.strerror)
                return file
            known = self._links[(name, file)] = self._link_access + b"/" + k + b"/" + name
        return known

    def close(self) -> None:
        for fd in [*self._interp_fds.values(), *self._copy_fds]:
            os.close(fd)
        self._interp_fds.clear()
        self._copy_fds.clear()
        self._images.clear()
        self._links.clear()  # (in the run's private tree, which goes with it)
        self.exe_paths.clear()
