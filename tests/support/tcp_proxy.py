"""A TCP proxy in front of PostgreSQL that a test can cut, to play a database outage for any server.

`cut()` closes every proxied connection and refuses new ones (as a stopped server would); `restore()` accepts
again.
"""

import asyncio
import contextlib
from urllib.parse import parse_qs, urlsplit, urlunsplit


def upstream_of(url: str) -> tuple[str, int | None, str | None]:
    """(host, port, unix_socket_path) that a DSN connects to."""
    parts = urlsplit(url)
    query = parse_qs(parts.query)
    host = parts.hostname or (query.get("host") or ["localhost"])[0]
    port = parts.port or int((query.get("port") or ["5432"])[0])
    if host.startswith("/"):
        return host, None, f"{host}/.s.PGSQL.{port}"
    return host, port, None


class FaultProxy:
    def __init__(self, upstream_url: str):
        self.host, self.port_upstream, self.socket_path = upstream_of(upstream_url)
        self._upstream_url = upstream_url
        self._server: asyncio.Server | None = None
        self._pipes: set[asyncio.Task] = set()
        self._writers: set[asyncio.StreamWriter] = set()
        self.port = 0

    def url(self) -> str:
        """The upstream DSN, rewritten to go through this proxy over TCP."""
        parts = urlsplit(self._upstream_url)
        user = parts.username or "postgres"
        password = f":{parts.password}" if parts.password else ""
        query = "&".join(f"{k}={v[0]}" for k, v in parse_qs(parts.query).items() if k not in ("host", "port"))
        return urlunsplit(parts._replace(netloc=f"{user}{password}@127.0.0.1:{self.port}", query=query))

    async def start(self, port: int = 0) -> "FaultProxy":
        self._server = await asyncio.start_server(self._accept, "127.0.0.1", port or self.port)
        self.port = self._server.sockets[0].getsockname()[1]
        return self

    async def _accept(self, client_reader, client_writer) -> None:
        try:
            if self.socket_path:
                up_reader, up_writer = await asyncio.open_unix_connection(self.socket_path)
            else:
                up_reader, up_writer = await asyncio.open_connection(self.host, self.port_upstream)
        except OSError:
            client_writer.close()
            return
        self._writers.update((client_writer, up_writer))
        for source, sink in ((client_reader, up_writer), (up_reader, client_writer)):
            task = asyncio.create_task(self._pipe(source, sink))
            self._pipes.add(task)
            task.add_done_callback(self._pipes.discard)

    async def _pipe(self, reader, writer) -> None:
        try:
            while data := await reader.read(65536):
                writer.write(data)
                await writer.drain()
        except (OSError, asyncio.CancelledError):
            pass
        finally:
            writer.close()
            self._writers.discard(writer)

    async def cut(self) -> None:
        if self._server is not None:
            self._server.close()
            await self._server.wait_closed()
            self._server = None
        for writer in list(self._writers):
            with contextlib.suppress(Exception):
                writer.transport.abort()
        for task in list(self._pipes):
            task.cancel()
        self._writers.clear()

    async def restore(self) -> None:
        await self.start(self.port)

    async def stop(self) -> None:
        await self.cut()
