"""The HTTP server under the API: uvicorn with its h11 protocol, plus what uvicorn lacks.

* **Header timeout.** A client has ``header_timeout`` seconds to send a request's headers,
  counted from the moment it connects (or its previous answer ended); then the connection
  is closed. Slow-header ("slowloris") sockets cannot stay open.
* **Connection caps.** At most ``max_connections_per_address`` open connections from one
  address: one more gets ``503`` with the one-line JSON error and is closed at once. At
  most ``max_connections`` in all: a new connection over it closes the oldest connection
  that has no request under way (idle, or still sending its headers) to take its place, so
  a flood of idle connections cannot lock everyone else out; only when every connection
  is busy with a request does the new one get the 503.

A request the HTTP layer cannot parse (a malformed request line, headers over
``h11_max_incomplete_event_size``) gets the one-line JSON 400 as well.

The body read timeout is the :class:`~.guard.Guard`'s (``body_timeout``), the keep-alive
timeout uvicorn's own (``timeout_keep_alive``).
"""

from __future__ import annotations

import json
import time
from typing import Any

from uvicorn.protocols.http.h11_impl import H11Protocol


def _peer_host(connection: object) -> str | None:
    """The peer's address of an open connection; uvicorn's set of connections is typed with
    every protocol it has, and not all of them name their client."""
    client = getattr(connection, "client", None)
    return str(client[0]) if client else None


def guarded_protocol(header_timeout: float, max_connections: int, max_per_address: int) -> type:
    """An h11 protocol class with a header timeout and connection caps."""

    body = json.dumps({"detail": "this worker has too many open connections; try again later"}).encode()
    busy = (
        b"HTTP/1.1 503 Service Unavailable\r\ncontent-type: application/json\r\n"
        + f"content-length: {len(body)}\r\n".encode()
        + b"retry-after: 5\r\nconnection: close\r\n\r\n"
        + body
    )

    class GuardedH11Protocol(H11Protocol):
        def connection_made(self, transport: Any) -> None:
            super().connection_made(transport)
            self._opened = time.monotonic()
            address = self.client[0] if self.client else None
            same = sum(1 for c in self.connections if _peer_host(c) == address) if address else 0
            if same > max_per_address or (len(self.connections) > max_connections and not self._evict_one()):
                transport.write(busy)
                transport.close()
                return
            self._arm_header_timer()

        def _idle(self) -> bool:
            return self.cycle is None or self.cycle.response_complete

        def _evict_one(self) -> bool:
            """Close the oldest connection without a request under way; False if there is none."""
            idle = [c for c in self.connections if c is not self and isinstance(c, GuardedH11Protocol) and c._idle()]
            idle = [c for c in idle if not c.transport.is_closing()]
            if not idle:
                return False
            oldest = min(idle, key=lambda c: c._opened)
            oldest.transport.close()
            self.connections.discard(oldest)
            return True

        def send_400_response(self, msg: str) -> None:
            """A request the HTTP layer cannot parse: the one-line JSON error too."""
            import h11

            data = json.dumps({"detail": f"malformed HTTP request ({msg.rstrip('.').lower()})"}).encode()
            headers = [(b"content-type", b"application/json"), (b"connection", b"close")]
            self.transport.write(self.conn.send(h11.Response(status_code=400, headers=headers, reason=b"Bad Request")))
            self.transport.write(self.conn.send(h11.Data(data=data)))
            self.transport.write(self.conn.send(h11.EndOfMessage()))
            self.transport.close()

        def on_response_complete(self) -> None:
            super().on_response_complete()
            self._arm_header_timer()

        def _arm_header_timer(self) -> None:
            self.loop.call_later(header_timeout, self._header_timeout, self.cycle)

        def _header_timeout(self, cycle: Any) -> None:
            if self.transport.is_closing():
                return
            # no request has begun since the timer was armed (the headers are still coming)
            if self.cycle is cycle and (cycle is None or cycle.response_complete):
                self.transport.close()

    return GuardedH11Protocol
