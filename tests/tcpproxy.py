"""A TCP proxy on loopback that injects faults into live connections: resets and stalls.

It sits between an app and PostgreSQL (or anything speaking TCP) and forwards
bytes both ways, from an asyncio loop in a thread of its own. On request it

- resets every live connection: both sides get a TCP RST, as when a firewall,
  NAT or load balancer drops its state;
- stalls every live connection: no byte passes either way until resumed, while
  both TCP peers stay up (a frozen middlebox, or a server that stopped without
  its kernel noticing). New connections pass freely.

Each fault reports how many connections it hit, and how many of those were in
a transaction or waiting for a reply (read from PostgreSQL's ReadyForQuery
message at the end of the last reply, and from which side spoke last). A reset
may wait for a connection inside an open, healthy transaction, so that it is
sure to cut one mid-transaction.
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import socket
import struct
import threading
from collections.abc import Coroutine, Iterator
from typing import Any, TypeVar

#: Seconds any control call waits for the proxy's loop before failing.
TIMEOUT = 10
#: PostgreSQL's ReadyForQuery message with its status byte still to come.
_READY_FOR_QUERY = b"Z\x00\x00\x00\x05"
#: Its status bytes for "in a transaction block" and "in a failed transaction".
_IN_TRANSACTION = frozenset(b"TE")
_IN_BLOCK = ord("T")

T = TypeVar("T")


@dataclasses.dataclass(frozen=True)
class Hit:
    """What one fault hit: connections, and those in a transaction or awaiting a reply."""

    connections: int
    live: int


class _Pair:
    """One proxied connection: the client's and the server's stream writers."""

    def __init__(self, client: asyncio.StreamWriter, server: asyncio.StreamWriter) -> None:
        self.client = client
        self.server = server
        self.flowing = asyncio.Event()
        self.flowing.set()
        #: the client sent the last bytes, so a reply is pending
        self.awaiting_reply = False
        #: the status byte of the last ReadyForQuery seen at the end of a reply
        self.status = ord("I")

    @property
    def live(self) -> bool:
        return self.awaiting_reply or self.status in _IN_TRANSACTION

    def abort(self) -> None:
        """Close both sides with RST: SO_LINGER 0 drops the unsent bytes."""
        for writer in (self.client, self.server):
            sock = writer.get_extra_info("socket")
            if sock is not None:
                with contextlib.suppress(OSError):
                    sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
            writer.transport.abort()


class FaultProxy:
    """Forward 127.0.0.1:``port`` to ``target``; :meth:`reset` and :meth:`stall` on demand."""

    def __init__(self, target_host: str, target_port: int) -> None:
        self.target = (target_host, target_port)
        self.port = 0
        self.accepted = 0
        self._pairs: set[_Pair] = set()
        self._loop = asyncio.new_event_loop()
        self._thread = threading.Thread(target=self._loop.run_forever, name="fault-proxy")
        self._server: asyncio.Server | None = None
        #: set when a reply leaves a connection inside an open, healthy transaction
        self._began = asyncio.Event()

    # -- control, from any thread ----------------------------------------------------

    def start(self, port: int = 0) -> None:
        """Listen on loopback ``port``, by default a free one."""
        self._thread.start()
        self._server = self._call(
            asyncio.start_server(self._handle, "127.0.0.1", port, reuse_address=True)
        )
        self.port = self._server.sockets[0].getsockname()[1]

    def stop(self) -> None:
        """Stop listening, abort every connection, end the loop and its thread."""
        if self._thread.is_alive():
            with contextlib.suppress(Exception):
                self._call(self._shutdown())
            self._loop.call_soon_threadsafe(self._loop.stop)
            self._thread.join(TIMEOUT)
        if not self._thread.is_alive():
            self._loop.close()

    def reset(self, *, in_transaction: bool = False) -> Hit:
        """Reset every live connection; return what it hit.

        :param in_transaction: first wait (up to the control timeout) until a
            connection is inside an open transaction that no error aborted.
        """
        return self._call(self._reset(in_transaction))

    def stall(self) -> Hit:
        """Stop every live connection's traffic until :meth:`resume`; return what it hit."""
        return self._call(self._stall())

    def resume(self) -> int:
        """Let stalled connections flow again; return how many there were."""
        return self._call(self._resume())

    def _call(self, coroutine: Coroutine[Any, Any, T]) -> T:
        return asyncio.run_coroutine_threadsafe(coroutine, self._loop).result(TIMEOUT)

    # -- in the loop -------------------------------------------------------------------

    async def _reset(self, in_transaction: bool) -> Hit:
        # No await between the check and the resets: that connection is still
        # inside its transaction when it is cut.
        while in_transaction and not any(pair.status == _IN_BLOCK for pair in self._pairs):
            self._began.clear()
            await self._began.wait()
        pairs = list(self._pairs)
        for pair in pairs:
            pair.abort()
        return Hit(len(pairs), sum(pair.live for pair in pairs))

    async def _stall(self) -> Hit:
        pairs = [pair for pair in self._pairs if pair.flowing.is_set()]
        for pair in pairs:
            pair.flowing.clear()
        return Hit(len(pairs), sum(pair.live for pair in pairs))

    async def _resume(self) -> int:
        stalled = [pair for pair in self._pairs if not pair.flowing.is_set()]
        for pair in stalled:
            pair.flowing.set()
        return len(stalled)

    async def _shutdown(self) -> None:
        if self._server is not None:
            self._server.close()
        for pair in list(self._pairs):
            pair.abort()

    async def _handle(self, client_in: asyncio.StreamReader, client: asyncio.StreamWriter) -> None:
        self.accepted += 1
        try:
            server_in, server = await asyncio.open_connection(*self.target)
        except OSError:
            client.transport.abort()
            return
        pair = _Pair(client, server)
        self._pairs.add(pair)
        try:
            await asyncio.gather(
                self._pump(client_in, server, pair, from_client=True),
                self._pump(server_in, client, pair, from_client=False),
                return_exceptions=True,
            )
        finally:
            self._pairs.discard(pair)
            for writer in (client, server):
                writer.transport.abort()

    async def _pump(
        self,
        reader: asyncio.StreamReader,
        writer: asyncio.StreamWriter,
        pair: _Pair,
        *,
        from_client: bool,
    ) -> None:
        try:
            while data := await reader.read(65536):
                # A stall holds what was read; the kernel buffers the rest.
                await pair.flowing.wait()
                pair.awaiting_reply = from_client
                if not from_client and data[-6:-1] == _READY_FOR_QUERY:
                    pair.status = data[-1]
                    if pair.status == _IN_BLOCK:
                        self._began.set()
                writer.write(data)
                await writer.drain()
            await pair.flowing.wait()
            if writer.can_write_eof():
                writer.write_eof()
        except OSError:
            # One side reset or failed: the other must not wait on it forever.
            pair.abort()


@contextlib.contextmanager
def running(target_host: str, target_port: int) -> Iterator[FaultProxy]:
    """A started proxy to the target, stopped however the block ends."""
    proxy = FaultProxy(target_host, target_port)
    try:
        proxy.start()
        yield proxy
    finally:
        proxy.stop()
