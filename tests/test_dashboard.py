# The dashboard's assets as the control API serves them (content types, security headers, no
# load from outside the node, package data complete) and the ring shares its ring table shows
# (tasknet_node.kv_extension.ring_shares). The page in a browser: test_dashboard_browser.py.
import re
import socket
import tomllib
from contextlib import asynccontextmanager

import trio

from shard import Ring
from tasknet_node.dashboard import ASSETS, load_assets, register_dashboard
from tasknet_node.http import HttpApp, Route, serve_http
from tasknet_node.kv_extension import ring_shares

from process_helpers import ROOT


class Routes:
    """Stands in for ControlApi: collects what register_dashboard adds."""

    def __init__(self) -> None:
        self.routes: list[Route] = []

    def add_route(self, path, endpoint, methods=("GET",)) -> None:
        self.routes.append(Route(path, endpoint, frozenset(methods)))


@asynccontextmanager
async def dashboard_server():
    routes = Routes()
    register_dashboard(routes)
    sock = socket.socket()
    sock.bind(("127.0.0.1", 0))
    sock.listen(16)
    port = sock.getsockname()[1]
    async with trio.open_nursery() as nursery:
        await nursery.start(serve_http, HttpApp(routes.routes, ("127.0.0.1",)), sock)
        try:
            yield port
        finally:
            nursery.cancel_scope.cancel()


async def get(port: int, path: str) -> tuple[int, dict[str, str], bytes]:
    with trio.fail_after(10):
        stream = await trio.open_tcp_stream("127.0.0.1", port)
        async with stream:
            await stream.send_all(f"GET {path} HTTP/1.1\r\nHost: 127.0.0.1\r\n"
                                  "Connection: close\r\n\r\n".encode())
            data = b""
            while chunk := await stream.receive_some(65536):
                data += chunk
    head, _, body = data.partition(b"\r\n\r\n")
    lines = head.decode("latin-1").split("\r\n")
    headers = {k.lower(): v.strip() for k, _, v in (line.partition(":") for line in lines[1:])}
    return int(lines[0].split(" ")[1]), headers, body


async def test_dashboard_and_its_assets_are_served_with_types_and_csp():
    async with dashboard_server() as port:
        status, headers, body = await get(port, "/")
        assert status == 200 and headers["content-type"] == "text/html; charset=utf-8"
        assert headers["content-security-policy"].startswith("default-src 'self'")
        assert headers["x-content-type-options"] == "nosniff"
        referenced = re.findall(r'(?:src|href)="([^"]+)"', body.decode())
        assert sorted(referenced) == ["/dashboard/dashboard.css", "/dashboard/dashboard.js"]
        for path, kind in (("/dashboard/dashboard.css", "text/css"),
                           ("/dashboard/dashboard.js", "text/javascript")):
            status, headers, body = await get(port, path)
            assert status == 200 and headers["content-type"].startswith(kind), path
            assert body == load_assets()[path.rsplit("/", 1)[1]]
        assert (await get(port, "/dashboard/secret.txt"))[0] == 404
        assert (await get(port, "/dashboard/../api.py"))[0] == 404


def test_assets_load_nothing_from_outside_and_ship_as_package_data():
    for name, text in load_assets().items():
        source = text.decode()
        # the SVG namespace is a name, not a load; anything else with a scheme would be one
        outside = re.findall(r"(?:https?:)?//[\w.-]+\.[a-z]{2,}",
                             source.replace("http://www.w3.org/2000/svg", ""))
        assert not outside, (name, outside)
        assert "@import" not in source and "url(" not in source, name
    pyproject = tomllib.loads((ROOT / "pyproject.toml").read_text())
    shipped = pyproject["tool"]["setuptools"]["package-data"]["tasknet_node.dashboard"]
    assert sorted(shipped) == sorted(ASSETS)


def test_ring_shares_count_every_replica_and_one_primary_per_partition():
    members = ["a", "b", "c", "d"]
    ring = Ring(members, partitions=256, replicas=3, vnodes=16)
    shares = ring_shares(ring)
    assert sorted(shares) == members
    assert sum(s["partitions"] for s in shares.values()) == 256 * 3
    assert sum(s["primary"] for s in shares.values()) == 256
    for member in members:
        owned = [p for p in range(256) if member in ring.owners(p)]
        assert shares[member]["partitions"] == len(owned)
        assert shares[member]["primary"] == sum(ring.owners(p)[0] == member for p in owned)
    assert ring_shares(Ring(["solo"], partitions=256, replicas=3, vnodes=16)) == {
        "solo": {"partitions": 256, "primary": 256}}
