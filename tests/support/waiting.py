"""Waiting for what a test awaits, by polling it: never a sleep and a hope."""

from __future__ import annotations

import asyncio
import time
from collections.abc import Awaitable, Callable
from typing import TypeVar

T = TypeVar("T")


class WaitTimeout(AssertionError):
    """The awaited condition did not come true in time; says what was awaited and last seen."""


def wait_until(
    predicate: Callable[[], T], timeout: float = 10.0, *, what: str = "", interval: float = 0.02
) -> T:
    """Poll ``predicate`` until it returns something true; return that value.

    Raises :class:`WaitTimeout` (an ``AssertionError``) naming ``what`` and the last value seen.
    """
    deadline = time.monotonic() + timeout
    while True:
        value = predicate()
        if value:
            return value
        if time.monotonic() > deadline:
            raise WaitTimeout(f"waited {timeout:g} s for {what or predicate!r}; last: {value!r}")
        time.sleep(interval)


async def async_wait_until(
    predicate: Callable[[], T | Awaitable[T]],
    timeout: float = 10.0,
    *,
    what: str = "",
    interval: float = 0.02,
) -> T:
    """:func:`wait_until` for tests running inside an event loop (the loop keeps running)."""
    deadline = time.monotonic() + timeout
    while True:
        value = predicate()
        if isinstance(value, Awaitable):
            value = await value
        if value:
            return value
        if time.monotonic() > deadline:
            raise WaitTimeout(f"waited {timeout:g} s for {what or predicate!r}; last: {value!r}")
        await asyncio.sleep(interval)
