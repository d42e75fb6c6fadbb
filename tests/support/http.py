"""A raw HTTP/1.1 request over a socket, so that a path reaches Envoy exactly as written (clients normalise)."""

import asyncio
import json
from collections.abc import Sequence
from dataclasses import dataclass


@dataclass
class RawResponse:
    status: int
    headers: dict[str, str]  # lower-cased names; a repeated header keeps the last value
    header_lines: list[tuple[str, str]]
    body: bytes

    def json(self):
        return json.loads(self.body)

    @property
    def request_id(self) -> str | None:
        return self.headers.get("x-request-id")


async def raw_request(
    port: int,
    method: str,
    target: str,
    headers: dict[str, str] | Sequence[tuple[str, str]] = (),
    body: bytes = b"",
    host: str = "127.0.0.1",
    source: str | None = None,
) -> RawResponse:
    """`source`: the local address to send from (another client, as far as Envoy can tell)."""
    reader, writer = await asyncio.open_connection(host, port, local_addr=(source, 0) if source else None)
    try:
        pairs = list(headers.items()) if isinstance(headers, dict) else list(headers)
        lines = [
            f"{method} {target} HTTP/1.1",
            f"Host: {host}:{port}",
            "Connection: close",
            f"Content-Length: {len(body)}",
        ]
        lines += [f"{name}: {value}" for name, value in pairs]
        writer.write(("\r\n".join(lines) + "\r\n\r\n").encode() + body)
        await writer.drain()
        head = await asyncio.wait_for(reader.readuntil(b"\r\n\r\n"), 30)
        status_line, *header_lines = head.decode("latin-1").rstrip("\r\n").split("\r\n")
        parsed = [(k.strip().lower(), v.strip()) for k, _, v in (line.partition(":") for line in header_lines)]
        parsed_headers = dict(parsed)
        # Read exactly the body: Envoy may hold a connection open for a moment after a local reply.
        if method == "HEAD" or status_line.split()[1] in ("204", "304"):
            rest = b""
        elif "content-length" in parsed_headers:
            rest = await asyncio.wait_for(reader.readexactly(int(parsed_headers["content-length"])), 30)
        else:
            rest = await asyncio.wait_for(reader.read(), 30)
            if parsed_headers.get("transfer-encoding") == "chunked":
                rest = _dechunk(rest)
    finally:
        writer.close()
    return RawResponse(int(status_line.split()[1]), parsed_headers, parsed, rest)


def _dechunk(data: bytes) -> bytes:
    out = b""
    while data:
        size_line, _, data = data.partition(b"\r\n")
        size = int(size_line.split(b";")[0], 16)
        if size == 0:
            break
        out, data = out + data[:size], data[size + 2 :]
    return out
