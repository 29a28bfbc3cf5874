# The operator dashboard: one HTML page, its CSS and its JS, shipped as package data beside
# this file and served by the control API at GET / and GET /dashboard/{name}. The page polls
# the JSON endpoints the node already has (/status, /kv-partitions, /tasks, /wallet, round
# views) and draws its chart as SVG by hand: no build step, nothing loaded from outside the
# node (nodes run offline), which the Content-Security-Policy header enforces in the browser.
# Lives here: loading the assets and their routes. Must not live here: any figure the page
# shows (the JSON endpoints compute them) or the HTTP server (http.py).
from __future__ import annotations

from importlib.resources import files
from typing import TYPE_CHECKING

from ..http import Request, Response

if TYPE_CHECKING:
    from ..api import ControlApi

ASSETS = {
    "index.html": "text/html; charset=utf-8",
    "dashboard.css": "text/css; charset=utf-8",
    "dashboard.js": "text/javascript; charset=utf-8",
}
# the page may load and fetch from this node only; no inline script or style, no framing
SECURITY_HEADERS = {
    "content-security-policy": "default-src 'self'; img-src 'self' data:; "
                               "frame-ancestors 'none'; base-uri 'none'; form-action 'none'",
    "x-content-type-options": "nosniff",
    "referrer-policy": "no-referrer",
    "cache-control": "no-cache",
}


def load_assets() -> dict[str, bytes]:
    """The dashboard's files, read once from the installed package."""
    folder = files(__name__)
    return {name: folder.joinpath(name).read_bytes() for name in ASSETS}


def register_dashboard(api: ControlApi) -> None:
    """Serve the dashboard at / and its assets at /dashboard/{name} on `api`."""
    assets = load_assets()

    def answer(name: str) -> Response:
        return Response(assets[name], media_type=ASSETS[name], headers=dict(SECURITY_HEADERS))

    async def index(request: Request) -> Response:
        return answer("index.html")

    async def asset(request: Request) -> Response:
        name = request.path_params["name"]
        if name not in assets:
            return Response("Not Found", 404)
        return answer(name)

    api.add_route("/", index)
    api.add_route("/dashboard/{name}", asset)
