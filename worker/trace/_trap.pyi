"""Type stub of the C trap loop (worker/trace/_trap.c)."""

from collections.abc import Callable, Sequence
from mmap import mmap
from typing import TypedDict

Action = tuple[bool, int, int, bytes | None, tuple[int, ...] | None, list[bytes] | None]

class RawStats(TypedDict):
    trapped: dict[str, int]  # by call name
    passed: int
    hits: int
    upcalls: int
    absent: int
    cached: int
    notified: int
    mode: str
    inproc_opens: int
    inproc_misses: int
    inproc_stats: int
    inproc_stat_misses: int
    inproc_sites: int
    inproc_images: int
    inproc_host: int
    node_puts: int
    node_dirs: int
    opens_put: int
    inproc_answers: int
    inproc_slots: int
    inproc_moves: int
    inproc_given: int  # the table was one the node's service made ahead (make_table)

def run(
    argv: Sequence[bytes],
    env: Sequence[bytes],
    mount: bytes,
    shadow: bytes,
    handler: Callable[[int, int, int, bytes], Action],
    spin_us: int = 0,
    mode: int = 2,
    in_process: bool = True,
    io_uring: bool = False,
    rendered: bytes = ...,
    write: bytes = ...,
    object_dirs: list[bytes] = ...,
    /,
) -> tuple[int, int, RawStats]: ...
def filter_program(notify: bool, cookie: int | None, /) -> bytes: ...
def forget(path: bytes, /) -> int: ...
def put(answers: list[tuple[int, int, bytes, Action]], /) -> int: ...
def pack(
    answers: list[tuple[int, int, bytes, Action]], prefix: bytes, uid: int, gid: int, dev: int, /
) -> bytes: ...
def put_table(
    table: bytes | memoryview | mmap,
    within: bytes,
    eager: int,
    prefix: bytes,
    uid: int,
    gid: int,
    dev: int,
    dirfd: int,
    /,
) -> tuple[int, list[bytes], list[tuple[bytes, bytes]]] | None: ...
def holding(fn: Callable[[], None], /) -> None: ...
def running() -> bool: ...
def read_table(
    table: bytes | memoryview | mmap, within: bytes, eager: int, /
) -> tuple[list[bytes], list[bytes], dict[bytes, bytes], list[bytes]] | None: ...
def node_listing(directory: bytes, /) -> bytes | None: ...
def opens_looked(directory: bytes, /) -> bool: ...
def put_staged(
    directory: bytes, /
) -> tuple[int, list[bytes], list[tuple[bytes, bytes]]] | None: ...
def take_notes() -> list[tuple[bytes, bytes]]: ...
def mirrored(directory: bytes, /) -> None: ...
def take_mirrored() -> list[bytes]: ...
def set_cmdline(title: bytes) -> bool: ...
def expect(nbytes: int, /) -> None: ...
def make_table(directory: str | None, answers: int, arena: int) -> int: ...
def give_table(fd: int) -> None: ...
