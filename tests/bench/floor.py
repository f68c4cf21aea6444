"""The floor: a bare aiohttp app that answers a constant ``status=ACK``.

Same framework, same response type, no access log (gated runs without one
too): whatever gated costs above this is gated's own work.
"""

from __future__ import annotations

import argparse

from aiohttp import web

BODY = "status=ACK"


async def answer(request: web.Request) -> web.Response:
    return web.Response(text=BODY, content_type="text/plain")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--port", type=int, required=True)
    parser.add_argument("--path", default="/voipgrid")
    args = parser.parse_args()
    app = web.Application()
    app.router.add_route("GET", args.path, answer)
    app.router.add_route("POST", args.path, answer)
    web.run_app(app, host="127.0.0.1", port=args.port, access_log=None, print=None,
                handle_signals=True)


if __name__ == "__main__":
    main()
