# Helpers for tests of the control API: serving a ControlApi on a free loopback port.
from __future__ import annotations

from collections.abc import AsyncIterator
from contextlib import asynccontextmanager

import httpx
import trio

from tasknet_node.api import ControlApi, bind_socket, serve_api


@asynccontextmanager
async def served(api: ControlApi) -> AsyncIterator[httpx.AsyncClient]:
    """`api` served on a free loopback port; an httpx client for it."""
    sock = bind_socket("127.0.0.1", 0)
    port = sock.getsockname()[1]
    async with trio.open_nursery() as nursery:
        await nursery.start(serve_api, api, sock)
        try:
            async with httpx.AsyncClient(base_url=f"http://127.0.0.1:{port}") as client:
                yield client
        finally:
            nursery.cancel_scope.cancel()
