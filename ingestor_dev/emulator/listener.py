"""The listening socket, which the `refuse_connections` fault closes and reopens on the same port.

Closing the listening socket makes new connections fail with ECONNREFUSED; reopening binds and
listens synchronously (so the port is back the moment the fault is switched off) and registers the
socket with the event loop in a task that `settle()` awaits.
"""

from __future__ import annotations

import asyncio
import socket
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from collections.abc import Callable


class Listener:
    def __init__(self, protocol_factory: Callable[[], asyncio.BaseProtocol], host: str, port: int) -> None:
        self._factory = protocol_factory
        self.host = host
        self.port = port
        self._server: asyncio.Server | None = None
        self._opening: asyncio.Task[None] | None = None

    @property
    def listening(self) -> bool:
        return self._server is not None or self._opening is not None

    async def start(self) -> None:
        self.resume()
        await self.settle()

    def pause(self) -> None:
        """Stop listening now (new connections are refused)."""
        if self._opening is not None:
            self._opening.cancel()
            self._opening = None
        if self._server is not None:
            self._server.close()
            self._server = None

    def resume(self) -> None:
        """Listen again on the same port (now), and serve it (once the loop runs the task)."""
        if self.listening:
            return
        sock = self._bind()
        self._opening = asyncio.get_running_loop().create_task(self._serve(sock))

    async def settle(self) -> None:
        if self._opening is not None:
            await asyncio.shield(self._opening)

    async def close(self) -> None:
        opening = self._opening
        self.pause()
        if opening is not None:
            await asyncio.gather(opening, return_exceptions=True)

    def _bind(self) -> socket.socket:
        family = socket.AF_INET6 if ":" in self.host else socket.AF_INET
        sock = socket.socket(family, socket.SOCK_STREAM)
        try:
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
            sock.bind((self.host, self.port))
            sock.listen(1024)
        except OSError:
            sock.close()
            raise
        self.port = sock.getsockname()[1]
        return sock

    async def _serve(self, sock: socket.socket) -> None:
        try:
            server = await asyncio.get_running_loop().create_server(self._factory, sock=sock, backlog=1024)
        except BaseException:
            sock.close()
            raise
        finally:
            self._opening = None
        self._server = server
