"""What stands between `rag serve` and a browser tab: the Host and Origin checks, JSON-only POSTs, a bounded body
however it arrives, and a time limit on a request's headers.

A server on loopback is still reachable from every page the user opens: a page can POST to it (a "simple"
cross-site request needs no preflight) and, through DNS rebinding, read from it under a name it controls. So every
request must name an allowed Host, every POST must come from an allowed Origin (or from no browser at all) and be
JSON (a cross-site form cannot send `application/json` without a preflight, which this server never grants).
"""

from __future__ import annotations

import json
from urllib.parse import urlsplit

LOOPBACK = ("localhost", "127.0.0.1", "::1")


def host_name(value: str) -> str:
    """'Host' header or URL netloc -> its lower-case name without port or IPv6 brackets ('' if malformed)."""
    try:
        return (urlsplit(f"//{value}").hostname or "").lower()
    except ValueError:
        return ""


def allowed_hosts(bind: str, extra: tuple[str, ...] = ()) -> frozenset[str]:
    """Loopback names, the address the server binds (unless a wildcard), and the names `--allow-host` adds."""
    names = {*LOOPBACK, *(host_name(h) or h.lower() for h in extra)}
    if bind not in ("0.0.0.0", "::", ""):
        names.add(host_name(bind) or bind.strip("[]").lower())
    return frozenset(names)


class Guard:
    """ASGI middleware: refuses a request before it reaches the app when its Host, Origin, content type or body
    size is not allowed. The body is read here, bounded whether it comes with Content-Length or chunked."""

    def __init__(self, app, hosts: frozenset[str], body_bytes: int):
        self.app, self.hosts, self.body_bytes = app, hosts, body_bytes

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        headers = {k.decode("latin-1").lower(): v.decode("latin-1") for k, v in scope["headers"]}
        refusal = self.refuse(scope["method"], headers)
        if refusal is None and scope["method"] == "POST":
            body, refusal = await self.read_body(receive, headers)
            receive = _replay(body, receive)
        if refusal is not None:
            return await _reply(send, *refusal)
        return await self.app(scope, receive, send)

    def refuse(self, method: str, headers: dict) -> tuple[int, str] | None:
        if host_name(headers.get("host", "")) not in self.hosts:
            return 421, ("Host not allowed; start the server with --allow-host NAME to serve under another name")
        if method != "POST":
            return None
        origin = headers.get("origin")
        if origin is not None and (origin == "null" or host_name(urlsplit(origin).netloc) not in self.hosts):
            return 403, "cross-origin POST refused: only this server's own page may post to it"
        if headers.get("content-type", "").split(";")[0].strip().lower() != "application/json":
            return 415, "POST bodies must be JSON (Content-Type: application/json)"
        size = headers.get("content-length")
        if size is not None and (not size.isdigit() or int(size) > self.body_bytes):
            return 413, f"request body over {self.body_bytes} bytes"
        return None

    async def read_body(self, receive, headers: dict) -> tuple[bytes, tuple[int, str] | None]:
        chunks, size = [], 0
        while True:
            message = await receive()
            if message["type"] == "http.disconnect":
                return b"", (400, "client disconnected")
            chunk = message.get("body", b"")
            size += len(chunk)
            if size > self.body_bytes:
                return b"", (413, f"request body over {self.body_bytes} bytes")
            chunks.append(chunk)
            if not message.get("more_body", False):
                return b"".join(chunks), None


def _replay(body: bytes, receive):
    sent = False

    async def again():
        nonlocal sent
        if not sent:
            sent = True
            return {"type": "http.request", "body": body, "more_body": False}
        return await receive()

    return again


async def _reply(send, status: int, message: str) -> None:
    body = json.dumps({"error": message}).encode()
    await send({"type": "http.response.start", "status": status,
                "headers": [(b"content-type", b"application/json"), (b"content-length", str(len(body)).encode()),
                            (b"connection", b"close")]})
    await send({"type": "http.response.body", "body": body})


def header_timeout_protocol(seconds: float):
    """uvicorn's h11 protocol with a limit on how long a new connection may take to send its first request's
    headers (uvicorn bounds only the idle time between requests): a slow client cannot hold a connection open."""
    from uvicorn.protocols.http.h11_impl import H11Protocol

    class HeaderTimeout(H11Protocol):
        def connection_made(self, transport):
            super().connection_made(transport)
            self._header_timer = self.loop.call_later(seconds, self._headers_too_slow)

        def handle_events(self):
            super().handle_events()
            if self.cycle is not None:  # a whole request line and headers arrived
                self._header_timer.cancel()

        def connection_lost(self, exc):
            self._header_timer.cancel()
            super().connection_lost(exc)

        def _headers_too_slow(self):
            if self.cycle is None and not self.transport.is_closing():
                self.transport.close()

    return HeaderTimeout
