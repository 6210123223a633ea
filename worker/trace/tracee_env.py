"""A traced process's environment, read from /proc only when a variant symlink needs it."""

from __future__ import annotations

import os
from collections.abc import Iterator, Mapping
from pathlib import Path


def read_environ(pid: int) -> dict[str, str]:
    """The environment ``pid`` was exec'ed with (empty if it is gone)."""
    try:
        raw = Path(f"/proc/{pid}/environ").read_bytes()
    except OSError:
        return {}
    env: dict[str, str] = {}
    for item in raw.split(b"\0"):
        key, sep, value = item.partition(b"=")
        if sep:
            env[os.fsdecode(key)] = os.fsdecode(value)
    return env


class LazyEnviron(Mapping[str, str]):
    """Reads /proc/<pid>/environ on first use: most lookups never touch a variant symlink."""

    def __init__(self, pid: int) -> None:
        self.pid = pid
        self._env: dict[str, str] | None = None

    def _load(self) -> dict[str, str]:
        if self._env is None:
            self._env = read_environ(self.pid)
        return self._env

    def __getitem__(self, key: str) -> str:
        return self._load()[key]

    def __iter__(self) -> Iterator[str]:
        return iter(self._load())

    def __len__(self) -> int:
        return len(self._load())

    def __contains__(self, key: object) -> bool:
        return key in self._load()
