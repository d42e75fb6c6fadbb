"""A stand-in for the Go backend, for `dev` and the end-to-end tests: it answers every request with what it
received (method, path, headers) and, given the JWT secret, the verified claims of the context token."""

import argparse
import asyncio
import signal

import jwt
from aiohttp import web

from driftlock_kernel.settings import Settings
from driftlock_kernel.tokens import verify


def create_app(jwt_secret: bytes | None) -> web.Application:
    async def echo(request: web.Request) -> web.Response:
        body = await request.read()
        claims = None
        token = request.headers.get("x-driftlock-context")
        if token and jwt_secret:
            try:
                claims = verify(token, jwt_secret)
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


async def run(host: str, port: int, jwt_secret: bytes | None) -> None:
    runner = web.AppRunner(create_app(jwt_secret), access_log=None)
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
    secret = Settings.from_env().jwt_secret
    asyncio.run(run(args.host, args.port, secret.encode() if secret else None))


if __name__ == "__main__":
    main()
