# The node's local control API: HTTP + JSON on loopback (served by tasknet_node.http under
# trio).
# Lives here: the route and metric registry other packages extend (`ControlApi.add_route`,
# `ControlApi.add_metrics`, `ControlApi.add_status`), the built-in endpoints (/status,
# /peers, /metrics, /publish; the dashboard at / from tasknet_node.dashboard; /subscribe and
# /gossip come from tasknet_node.gossipwatch), the one check of a topic name both /publish and
# /subscribe use (`bad_topic`), the Prometheus text rendering, and binding + serving the socket.
# Must not live here: node lifecycle (runner.py) or argument parsing (cli.py).
from __future__ import annotations

import ipaddress
import logging
import math
import re
import socket
import time
from collections.abc import Awaitable, Callable, Iterable, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Literal

import trio

from p2p import MemberState, Network
from p2p.network import GAUGE_METRICS

from .dashboard import register_dashboard
from .errors import NodeError
from .http import HttpApp, JSONResponse, Request, Response, Route, error_response, serve_http

if TYPE_CHECKING:
    from trio_typing import TaskStatus  # trio's own name for it is hidden by trio-stubs

log = logging.getLogger(__name__)

Endpoint = Callable[[Request], Awaitable[Response]]
RESERVED_TOPICS = frozenset({"members"})  # the p2p layer's own membership gossip
MAX_TOPIC_CHARS = 200  # the longest topic name /publish and /subscribe take
PROMETHEUS_CONTENT_TYPE = "text/plain; version=0.0.4; charset=utf-8"
_METRIC_NAME = re.compile(r"^[a-zA-Z_:][a-zA-Z0-9_:]*$")
_LABEL_NAME = re.compile(r"^[a-zA-Z_][a-zA-Z0-9_]*$")


@dataclass(frozen=True)
class Metric:
    """One Prometheus sample. Counters get the conventional `_total` suffix when rendered."""

    name: str
    value: float
    kind: Literal["counter", "gauge"] = "gauge"
    help: str = ""
    labels: tuple[tuple[str, str], ...] = ()


MetricSource = Callable[[], Iterable[Metric]]
StatusSource = Callable[[], Any]


class ControlApi:
    """The routes and metrics of one node's control API.

    Other packages add endpoints (say a KV store's `/kv/{key:path}` with GET, PUT and DELETE)
    with `add_route`, and samples for /metrics with `add_metrics`, before the API starts
    serving; see `runner.NodeExtension` for how they get hold of the `ControlApi`."""

    def __init__(self, net: Network) -> None:
        self.net = net
        self._routes: list[Route] = []
        self._taken: set[tuple[str, str]] = set()
        self._metric_sources: list[MetricSource] = [lambda: network_metrics(net)]
        self._status_sections: dict[str, StatusSource] = {}
        self._frozen = False
        self.add_route("/status", self._status)
        self.add_route("/peers", self._peers)
        self.add_route("/metrics", self._metrics)
        self.add_route("/publish", self._publish, methods=("POST",))
        register_dashboard(self)

    def add_route(self, path: str, endpoint: Endpoint, methods: Sequence[str] = ("GET",)) -> None:
        """Serve `path` (a pattern such as "/kv/{key:path}"; `{name}` matches one path
        segment, `{name:path}` the rest of the path) for `methods`."""
        if self._frozen:
            raise RuntimeError("the control API is already serving; add routes before that")
        wanted = {(path, m.upper()) for m in methods}
        clash = wanted & self._taken
        if clash:
            raise ValueError(f"route already registered: {sorted(clash)}")
        self._taken |= wanted
        self._routes.append(Route(path, endpoint, frozenset(m.upper() for m in methods)))

    def add_metrics(self, source: MetricSource) -> None:
        """Call `source` on every /metrics request and include its samples."""
        self._metric_sources.append(source)

    def add_status(self, name: str, source: StatusSource) -> None:
        """Add `source()` to every /status answer, under the key `name`."""
        if name in self._status_sections or name in self.net.status():
            raise ValueError(f"status section already taken: {name!r}")
        self._status_sections[name] = source

    def status(self) -> dict[str, Any]:
        """The network's status with the sections other packages added."""
        status = self.net.status()
        for name, source in self._status_sections.items():
            status[name] = source()
        return status

    def metrics(self) -> list[Metric]:
        return [metric for source in self._metric_sources for metric in source()]

    def app(self, *, trusted_hosts: Sequence[str] = ("*",)) -> HttpApp:
        """The HTTP app. `trusted_hosts` limits the Host header a request may carry (against
        DNS rebinding: a web page must not reach a loopback API through its own domain)."""
        self._frozen = True
        return HttpApp(self._routes, trusted_hosts)

    # -- built-in endpoints --------------------------------------------------------------
    async def _status(self, request: Request) -> Response:
        return JSONResponse(self.status())

    async def _peers(self, request: Request) -> Response:
        now = time.monotonic()
        others = [m for m in self.net.members() if m.peer_id != self.net.peer_id]
        return JSONResponse({
            "connected": self.net.connected_peers(),
            "members": [m.to_dict(now) for m in others],
        })

    async def _metrics(self, request: Request) -> Response:
        return Response(render_prometheus(self.metrics()), media_type=PROMETHEUS_CONTENT_TYPE)

    async def _publish(self, request: Request) -> Response:
        # A JSON content type cannot be sent cross-origin without a CORS preflight, which this
        # API never grants: a web page cannot make the node publish.
        if request.media_type != "application/json":
            return error_response(415, "unsupported_media_type",
                                  "send the message as application/json")
        try:
            body = await request.json()
        except ValueError as exc:
            return error_response(400, "bad_json", f"body is not JSON: {exc}")
        if not isinstance(body, dict) or not isinstance(body.get("topic"), str) \
                or "payload" not in body:
            return error_response(400, "bad_request",
                                  'expected {"topic": "...", "payload": ...}')
        topic = body["topic"]
        refused = bad_topic(topic)
        if refused is not None:
            return refused
        try:
            await self.net.publish(topic, body["payload"])
        except UnicodeEncodeError:  # a lone surrogate (a JSON \ud800 escape) in the payload
            return error_response(400, "bad_request",
                                  "the payload must be valid Unicode (no lone surrogates)")
        except ValueError as exc:
            return error_response(413, "too_large", str(exc))
        return JSONResponse({"published": True, "topic": topic})


def bad_topic(topic: str) -> Response | None:
    """The answer to a request naming a topic this API does not publish or subscribe to
    (400 `bad_topic`, the same from /publish and /subscribe); None for a good name."""
    if not topic:
        problem = "the topic name is empty"
    elif topic in RESERVED_TOPICS:
        problem = f"topic {topic!r} is the p2p layer's own (membership gossip)"
    elif len(topic) > MAX_TOPIC_CHARS:
        problem = f"a topic name has at most {MAX_TOPIC_CHARS} characters"
    else:
        try:
            topic.encode()
            return None
        except UnicodeEncodeError:  # a lone surrogate (a JSON \ud800 escape)
            problem = "the topic name must be valid Unicode (no lone surrogates)"
    return error_response(400, "bad_topic", problem)


def network_metrics(net: Network) -> list[Metric]:
    status = net.status()
    samples = [
        Metric(name, value, "gauge" if name in GAUGE_METRICS else "counter",
               f"p2p {name.replace('_', ' ')}")
        for name, value in sorted(status["metrics"].items())
    ]
    states = {state.value: 0 for state in MemberState}
    for member in status["members"]:
        states[member["state"]] = states.get(member["state"], 0) + 1
    samples += [
        Metric("members", count, "gauge", "known members by state, this node included",
               (("state", state),))
        for state, count in sorted(states.items())
    ]
    samples += [
        Metric("connected_peers", len(status["connected_peers"]), "gauge",
               "peers with an open libp2p connection"),
        Metric("uptime_seconds", status["uptime_s"], "gauge", "seconds since the node started"),
        Metric("incarnation", status["incarnation"], "gauge",
               "how many times this data dir has started a node"),
    ]
    return samples


def render_prometheus(metrics: Iterable[Metric], prefix: str = "tasknet_") -> str:
    """Prometheus text exposition format 0.0.4: HELP and TYPE once per metric family."""
    families: dict[str, list[Metric]] = {}
    for metric in metrics:
        name = prefix + metric.name + ("_total" if metric.kind == "counter" else "")
        if not _METRIC_NAME.match(name):
            raise ValueError(f"not a Prometheus metric name: {name!r}")
        family = families.setdefault(name, [])
        if family and family[0].kind != metric.kind:
            raise ValueError(f"metric {name} is both a {family[0].kind} and a {metric.kind}")
        family.append(metric)
    lines: list[str] = []
    for name, family in families.items():
        help_text = next((m.help for m in family if m.help), "")
        if help_text:
            lines.append(f"# HELP {name} {_escape(help_text, quote=False)}")
        lines.append(f"# TYPE {name} {family[0].kind}")
        for metric in family:
            lines.append(f"{name}{_labels(metric.labels)} {_number(metric.value)}")
    return "\n".join(lines) + "\n"


def _labels(labels: tuple[tuple[str, str], ...]) -> str:
    if not labels:
        return ""
    for key, _ in labels:
        if not _LABEL_NAME.match(key) or key.startswith("__"):
            raise ValueError(f"not a Prometheus label name: {key!r}")
    return "{" + ",".join(f'{k}="{_escape(v, quote=True)}"' for k, v in labels) + "}"


def _escape(text: str, *, quote: bool) -> str:
    text = text.replace("\\", "\\\\").replace("\n", "\\n")
    return text.replace('"', '\\"') if quote else text


def _number(value: float) -> str:
    if math.isnan(value):
        return "NaN"
    if math.isinf(value):
        return "+Inf" if value > 0 else "-Inf"
    return str(int(value)) if float(value).is_integer() else repr(float(value))


# -- serving ---------------------------------------------------------------------------------
def is_loopback(host: str) -> bool:
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


def bind_socket(host: str, port: int) -> socket.socket:
    """Bind the API's listening socket now, so a port in use fails before the node starts."""
    try:
        family, kind, proto, _, address = socket.getaddrinfo(
            host, port, type=socket.SOCK_STREAM)[0]
        sock = socket.socket(family, kind, proto)
    except OSError as exc:
        raise NodeError(f"cannot serve the control API on {host}:{port}: {exc}") from None
    try:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        sock.bind(address)
    except OSError as exc:
        sock.close()
        raise NodeError(
            f"cannot serve the control API on {host}:{port}: {exc.strerror or exc}") from None
    return sock


async def serve_api(
    api: ControlApi, sock: socket.socket,
    *, task_status: TaskStatus[None] = trio.TASK_STATUS_IGNORED,
) -> None:
    """Serve `api` on the bound `sock` (which this takes over) until cancelled."""
    host = sock.getsockname()[0]
    trusted = ("127.0.0.1", "localhost", "[::1]") if is_loopback(host) else ("*",)
    sock.listen(1024)
    await serve_http(api.app(trusted_hosts=trusted), sock, task_status=task_status)
