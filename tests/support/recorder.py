"""An in-process HTTP server that records every request it gets and echoes it back as JSON.

A request may ask for a failure with `x-test-respond`: a status (`503`), `reset` (the connection is closed without
an answer), `sleep:<seconds>` (answered late, for Envoy's route timeout) or `large:<bytes>` (a 200 with a body of
that size, streamed, for a client that stops reading)."""

import asyncio
import contextlib
from dataclasses import dataclass

from aiohttp import web


@dataclass
class Received:
    method: str
    path: str
    headers: list[tuple[str, str]]  # in order, names lower-cased, repeats kept
    body: bytes

    def header(self, name: str) -> str | None:
        values = [v for k, v in self.headers if k == name]
        assert len(values) <= 1, f"{name} arrived {len(values)} times"
        return values[0] if values else None

    def names(self) -> set[str]:
        return {k for k, _ in self.headers}


class Recorder:
    def __init__(self):
        self.received: list[Received] = []
        self._runner: web.AppRunner | None = None
        self.port = 0

    async def _handle(self, request: web.Request) -> web.StreamResponse:
        body = await request.read()
        entry = Received(request.method, request.raw_path, [(k.lower(), v) for k, v in request.headers.items()], body)
        self.received.append(entry)
        respond = request.headers.get("x-test-respond", "")
        if respond == "reset":
            if request.transport is not None:
                request.transport.close()
            return web.Response(status=500)  # never written: the connection is gone
        if respond.startswith("large:"):
            size = int(respond.removeprefix("large:"))
            response = web.StreamResponse(status=200, headers={"content-type": "application/octet-stream"})
            response.content_length = size
            await response.prepare(request)
            chunk = b"x" * 65536
            with contextlib.suppress(ConnectionError):
                for offset in range(0, size, len(chunk)):
                    await response.write(chunk[: size - offset])
            return response
        if respond.startswith("sleep:"):
            await asyncio.sleep(float(respond.removeprefix("sleep:")))
        status = int(respond) if respond.isdigit() else 200
        return web.json_response({"path": entry.path, "headers": dict(entry.headers)}, status=status)

    async def start(self, port: int) -> "Recorder":
        # Up to the gateway's default body cap (DRIFTLOCK_MAX_REQUEST_BYTES) and a little more: the edge decides.
        app = web.Application(client_max_size=16 * 1024 * 1024)
        app.router.add_route("*", "/{tail:.*}", self._handle)
        self._runner = web.AppRunner(app, access_log=None)
        await self._runner.setup()
        await web.TCPSite(self._runner, "127.0.0.1", port).start()
        self.port = port
        return self

    async def stop(self) -> None:
        if self._runner is not None:
            await self._runner.cleanup()

    def by_request_id(self, request_id: str) -> Received:
        matches = [r for r in self.received if r.header("x-request-id") == request_id]
        assert len(matches) == 1, f"{len(matches)} requests with id {request_id} reached the backend"
        return matches[0]
