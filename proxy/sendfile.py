"""Zero-copy send of a file range on an asyncio transport's socket.

uvloop transports have no native ``loop.sendfile``; we wait until the transport's own buffer
is empty (headers went out), then ``os.sendfile`` on a duplicate of the socket descriptor,
waiting for writability on the duplicate when the socket buffer is full.
"""

from __future__ import annotations

import asyncio
import os
from typing import cast


class SendTimeout(Exception):
    """The client did not read for ``stall_timeout`` seconds."""


async def _writable(loop: asyncio.AbstractEventLoop, fd: int, timeout: float) -> None:
    fut: asyncio.Future[None] = loop.create_future()

    def ready() -> None:
        if not fut.done():
            fut.set_result(None)

    loop.add_writer(fd, ready)
    try:
        await asyncio.wait_for(fut, timeout)
    except TimeoutError:
        raise SendTimeout(f"client stalled for {timeout:g} s") from None
    finally:
        loop.remove_writer(fd)


async def sendfile(
    transport: asyncio.BaseTransport, fd: int, offset: int, count: int, stall_timeout: float
) -> int:
    """Send ``count`` bytes of ``fd`` from ``offset``; returns bytes sent."""
    loop = asyncio.get_running_loop()
    # uvloop's transports do not subclass asyncio.WriteTransport; use it by duck typing
    transport = cast(asyncio.WriteTransport, transport)
    waited = 0.0
    while transport.get_write_buffer_size():
        if transport.is_closing():
            raise ConnectionResetError("connection lost")
        await asyncio.sleep(0.001)
        waited += 0.001
        if waited > stall_timeout:
            raise SendTimeout(f"client stalled for {stall_timeout:g} s")
    sock = transport.get_extra_info("socket")
    if sock is None or transport.is_closing():
        raise ConnectionResetError("connection lost")
    out = os.dup(sock.fileno())
    sent = 0
    try:
        while sent < count:
            try:
                n = os.sendfile(out, fd, offset + sent, count - sent)
            except BlockingIOError:
                await _writable(loop, out, stall_timeout)
                continue
            if n == 0:
                raise ConnectionResetError("file shrank while sending")
            sent += n
    finally:
        os.close(out)
    return sent
