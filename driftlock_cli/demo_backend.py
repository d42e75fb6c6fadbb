"""A stand-in for the Go backend, for `dev` and the end-to-end tests: it answers every request with what it
received (method, path, headers) and the verified claims of the context token, checked the way the gateway is
configured to sign it (EdDSA with the public halves of its signing keys, or HS256 with the shared secret)."""

import argparse
import asyncio
import signal

import jwt
from aiohttp import web

from driftlock_kernel import context_keys
from driftlock_kernel.context_keys import ContextKeys
from driftlock_kernel.errors import OperatorError
from driftlock_kernel.settings import Settings


def create_app(keys: ContextKeys | None) -> web.Application:
    async def echo(request: web.Request) -> web.Response:
        body = await request.read()
        claims = None
        token = request.headers.get("x-driftlock-context")
        if token and keys is not None:
            try:
                claims = keys.verify(token)
            except jwt.PyJWTError as error:
                claims = {"invalid": str(error)}
        return web.json_response(
            {
                "method": request.method,
                "path": request.raw_path,
                "headers": {name.lower(): value for name, value in request.headers.items()},
                "body_bytes": len(body),
                "context_claims": claims,
            }
        )

    app = web.Application()
    app.router.add_route("*", "/{tail:.*}", echo)
    return app


async def run(host: str, port: int, keys: ContextKeys | None) -> None:
    runner = web.AppRunner(create_app(keys), access_log=None)
    await runner.setup()
    await web.TCPSite(runner, host, port).start()
    stopping = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stopping.set)
    await stopping.wait()
    await runner.cleanup()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--host", default="127.0.0.1")
    parser.add_argument("--port", type=int, default=8000)
    args = parser.parse_args()
    try:
        keys: ContextKeys | None = context_keys.load(Settings.from_env())
    except OperatorError as error:  # it still echoes, without claims
        print(f"demo backend: context tokens will not be verified: {error}", flush=True)
        keys = None
    asyncio.run(run(args.host, args.port, keys))


if __name__ == "__main__":
    main()
