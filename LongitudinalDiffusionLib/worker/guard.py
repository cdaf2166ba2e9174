"""The worker's front door: the token and the body limits, checked before any route runs.

An ASGI middleware, not a FastAPI dependency, so an unauthenticated client cannot make the
worker receive, parse or spool a byte of an upload.
"""

from __future__ import annotations

import asyncio
import json
from typing import Any

from .users import Users

#: the request scope's key for the :class:`~.users.User` the token names
USER_KEY = "longdiff.user"

PUBLIC_PATHS = frozenset({"/v1/health"})


def bearer_token(header: bytes | None) -> bytes | None:
    """The token of an ``Authorization: Bearer <token>`` header, else None."""
    if not header:
        return None
    scheme, _, value = header.partition(b" ")
    if scheme.lower() != b"bearer" or not value.strip():
        return None
    return value.strip()


class Guard:
    """The worker's front door, before any route runs or any body byte is read.

    * The ``Authorization`` header is read here, once: a request with two gets 400, one
      without a known token 401 (every path but ``/v1/health``) - an unauthenticated client
      cannot make the worker receive, parse or spool an upload. The user it names is put
      in the request's scope for the routes.
    * Request bodies over the limit get 413: by ``Content-Length`` at once, and while
      streaming (chunked uploads) as soon as the limit is passed - the application then
      sees a disconnected client and whatever it would answer is dropped.
    * A client that stops sending its body for ``body_timeout`` seconds gets 408.
    """

    def __init__(self, app: Any, limit: int, users: Users, body_timeout: float = 30.0) -> None:
        self.app, self.limit, self.users, self.body_timeout = app, limit, users, body_timeout

    async def __call__(self, scope: dict, receive: Any, send: Any) -> None:
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        raw = scope.get("headers") or []
        auth = [v for k, v in raw if k.lower() == b"authorization"]
        if len(auth) > 1:
            return await _send_json(send, 400, "send one Authorization header, not several")
        headers = dict(raw)
        user = None
        token = bearer_token(auth[0]) if auth else None
        if token is not None:
            user = self.users.lookup(token)
        if scope.get("path") not in PUBLIC_PATHS and user is None:
            problem = "wrong access token" if auth else "missing access token"
            detail = f"{problem} (send 'Authorization: Bearer <token>')"
            return await _send_json(send, 401, detail, [(b"www-authenticate", b"Bearer")])
        scope[USER_KEY] = user
        message = f"request body exceeds this worker's upload limit of {self.limit / 2**20:g} MB"
        length = headers.get(b"content-length")
        if length is not None and length.isdigit() and int(length) > self.limit:
            return await _send_json(send, 413, message)
        seen, started, refused, body_done = 0, False, False, False

        async def limited() -> dict:
            nonlocal seen, refused, body_done
            if refused:
                return {"type": "http.disconnect"}
            if body_done:  # afterwards only a disconnect can come: wait for it as long as it takes
                return await receive()
            try:
                msg = await asyncio.wait_for(receive(), self.body_timeout)
            except asyncio.TimeoutError:
                if not started:
                    await _send_json(send, 408, f"no part of the request body came for {self.body_timeout:g} s")
                refused = True
                return {"type": "http.disconnect"}
            if msg["type"] == "http.request":
                seen += len(msg.get("body", b""))
                body_done = not msg.get("more_body", False)
                if seen > self.limit:
                    if not started:
                        await _send_json(send, 413, message)
                    refused = True
                    return {"type": "http.disconnect"}
            return msg

        async def guarded_send(msg: dict) -> None:
            nonlocal started
            if refused:
                return  # the 413 has been answered; the application's reply goes nowhere
            if msg["type"] == "http.response.start":
                started = True
            await send(msg)

        await self.app(scope, limited, guarded_send)


async def _send_json(send: Any, status: int, message: str, extra: list | None = None) -> None:
    body = json.dumps({"detail": message}).encode()
    headers = [(b"content-type", b"application/json"), (b"content-length", str(len(body)).encode())]
    headers += extra or []
    await send({"type": "http.response.start", "status": status, "headers": headers})
    await send({"type": "http.response.body", "body": body})
