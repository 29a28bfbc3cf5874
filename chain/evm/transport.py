# JSON-RPC over HTTP(S) for chain/evm/client.py, on the standard library's http.client:
# connections kept alive in a small pool (any thread takes an idle one or opens its own, so
# concurrent requests never share a connection), a connect timeout and a read timeout, batches
# with their answers matched by id, HTTP_PROXY / HTTPS_PROXY / NO_PROXY read once at
# construction (http:// proxies; https through a CONNECT tunnel), user:password in the URL as
# Basic auth.
# A request is sent once, except when a *reused* connection turns out to have been closed by
# the server while it sat idle (the write fails, or the connection ends before the first byte
# of the answer): then a request that is safe to repeat (reads, estimates, and
# eth_sendRawTransaction, whose same bytes the node takes at most once) is sent again, once, on
# a new connection, and the calling thread's `resends()` count grows. Failures say whether the
# request can have reached the node: `TransportError.sent` is False only when no byte of it
# was ever written (no connection could be made: refused, connect timeout, DNS, TLS, proxy).
# Must not live here: the meaning of any method or answer (client.py), retries of anything
# else (the caller decides).
from __future__ import annotations

import base64
import http.client
import itertools
import json
import select
import socket
import ssl
import threading
import urllib.request
from collections.abc import Callable, Iterable, Mapping
from typing import Any
from urllib.parse import SplitResult, unquote, urlsplit

from chain.adapter import ChainError, ChainUnavailable

DEFAULT_POOL_SIZE = 8  # idle connections kept; more concurrent requests open (and close) more
MAX_CONNECT_TIMEOUT = 3.0  # seconds; the connect timeout is min(timeout, this)
# answers that may be repeated without changing anything on the node (eth_sendRawTransaction:
# the same signed bytes are taken once; a duplicate is refused as known / nonce too low)
REPEATABLE_METHODS = frozenset({
    "eth_chainId", "net_version", "web3_clientVersion", "eth_syncing", "eth_accounts",
    "eth_blockNumber", "eth_getBlockByNumber", "eth_getBlockByHash", "eth_getBalance",
    "eth_getTransactionCount", "eth_getCode", "eth_getStorageAt", "eth_call",
    "eth_estimateGas", "eth_gasPrice", "eth_maxPriorityFeePerGas", "eth_feeHistory",
    "eth_getLogs", "eth_getTransactionByHash", "eth_getTransactionReceipt",
    "eth_sendRawTransaction", "eth_sendRawTransactionSync",
})  # fmt: skip
# a reused connection found closed while writing the request, or before the answer began
_STALE_ON_WRITE = (BrokenPipeError, ConnectionResetError, ConnectionAbortedError, ssl.SSLEOFError)
_LOST_BEFORE_ANSWER = (ConnectionResetError, ConnectionAbortedError, ssl.SSLEOFError,
                       ssl.SSLZeroReturnError)  # fmt: skip


class TransportError(ChainUnavailable):
    """A request failed in transport (no connection, a timeout, the connection lost, an HTTP
    error status). `sent`: whether it can have reached the node (False only when none of its
    bytes was ever written)."""

    def __init__(self, message: str, *, sent: bool) -> None:
        super().__init__(message)
        self.sent = sent


class _NotConnected(Exception):
    """No connection could be made (its cause says why): nothing was written."""


class _NoAnswer(ConnectionError):
    """The connection ended (closed or reset) before the first byte of the answer."""


class _Response(http.client.HTTPResponse):
    """Waits for the answer's first byte before parsing it, so that a connection lost before
    any of the answer arrived (_NoAnswer) is told from one lost in the middle of it."""

    def begin(self) -> None:  # called once, by HTTPConnection.getresponse
        try:
            first = self.fp.peek(1)
        except _LOST_BEFORE_ANSWER as exc:
            raise _NoAnswer(f"connection lost before any answer: {exc!r}") from exc
        if not first:
            raise _NoAnswer("the server closed the connection without answering")
        super().begin()


class _Connection(http.client.HTTPConnection):
    response_class = _Response


class _TlsConnection(http.client.HTTPSConnection):
    response_class = _Response


class HttpJsonRpc:
    """JSON-RPC 2.0 over HTTP(S) to `url`, safe to use from several threads at once.

    `timeout`: seconds any read of the answer may wait (the read timeout, per socket read, as
    before with requests); connecting (TCP, TLS, a proxy's tunnel) may take min(timeout, 3 s).
    `call` and `batch` return the decoded JSON answer (answers that are not JSON raise
    ChainError); transport failures raise TransportError. `context`: for https, the TLS
    context (default: ssl.create_default_context(), the system's CAs)."""

    def __init__(
        self,
        url: str,
        *,
        timeout: float,
        pool_size: int = DEFAULT_POOL_SIZE,
        context: ssl.SSLContext | None = None,
    ) -> None:
        parts = urlsplit(url)
        if parts.scheme not in ("http", "https") or not parts.hostname:
            raise ValueError(f"not an http(s) URL: {url!r}")
        self.url = url
        self.timeout = timeout
        self.connect_timeout = min(timeout, MAX_CONNECT_TIMEOUT)
        self._tls = parts.scheme == "https"
        self._host = parts.hostname
        self._port = parts.port or (443 if self._tls else 80)
        self._context = (context or ssl.create_default_context()) if self._tls else None
        path = (parts.path or "/") + (f"?{parts.query}" if parts.query else "")
        self._target = path
        self._headers = {"Content-Type": "application/json", "Accept": "application/json",
                         "User-Agent": "tasknet-evm-client"}  # fmt: skip
        if parts.username is not None:
            self._headers["Authorization"] = _basic(parts.username, parts.password)
        self._proxy = _proxy_for(parts)
        self._tunnel_headers: dict[str, str] = {}
        if self._proxy is not None:
            auth = (
                {"Proxy-Authorization": _basic(self._proxy.username, self._proxy.password)}
                if self._proxy.username is not None
                else {}
            )
            if self._tls:
                self._tunnel_headers = auth
            else:  # a plain-HTTP proxy forwards requests given with the absolute URL
                netloc = self._host if ":" not in self._host else f"[{self._host}]"
                self._target = f"http://{netloc}:{self._port}{path}"
                self._headers.update(auth)
        self._pool_size = pool_size
        self._idle: list[http.client.HTTPConnection] = []
        self._lock = threading.Lock()
        self._closed = False
        self._ids = itertools.count(1)
        self._local = threading.local()

    @property
    def proxy(self) -> tuple[str, int] | None:
        """The proxy requests go through (host, port), None when connecting directly."""
        return None if self._proxy is None else (self._proxy.hostname or "", self._proxy.port or 80)

    def resends(self) -> int:
        """How many requests of the calling thread were sent a second time (see the header)."""
        count: int = getattr(self._local, "resends", 0)
        return count

    def call(self, method: str, params: list[Any]) -> Any:
        """One request: the node's answer object (checked to carry the request's id)."""
        request_id = next(self._ids)
        body = {"jsonrpc": "2.0", "id": request_id, "method": method, "params": params}

        def checked(answer: Any) -> Any:
            if not isinstance(answer, dict):
                raise ChainError(f"{method}: malformed JSON-RPC answer {answer!r:.200}")
            # a node that could not read the request answers an error with id null
            found = answer.get("id")
            if found != request_id and not (found is None and "error" in answer):
                raise ChainError(f"{method}: the answer is for request {found!r}, "
                                 f"not {request_id}")  # fmt: skip
            return answer

        return _Exchange(self, body, method, method in REPEATABLE_METHODS, checked).result()

    def batch(self, calls: Iterable[tuple[str, list[Any]]]) -> Any:
        """Several requests in one round trip: their answer objects in the order of `calls`
        (whatever order the node gave them in); a node refusing the whole batch answers a
        single error object, returned as it came."""
        methods: list[str] = []
        body: list[dict[str, Any]] = []
        for method, params in calls:
            methods.append(method)
            body.append({"jsonrpc": "2.0", "id": next(self._ids), "method": method,
                         "params": params})  # fmt: skip
        label = "batch of " + ", ".join(methods)

        def ordered(answer: Any) -> Any:
            if not isinstance(answer, list):
                return answer
            by_id = {a.get("id"): a for a in answer if isinstance(a, dict)}
            found = [by_id.get(request["id"]) for request in body]
            if len(answer) != len(body) or any(a is None for a in found):
                raise ChainError(f"{label}: the answers do not match the requests: "
                                 f"{answer!r:.200}")  # fmt: skip
            return found

        repeatable = all(m in REPEATABLE_METHODS for m in methods)
        return _Exchange(self, body, label, repeatable, ordered).result()

    def close(self) -> None:
        """Close the idle connections; from now on none is kept (a request still works, on a
        connection of its own)."""
        with self._lock:
            self._closed = True
            idle, self._idle = self._idle, []
        for conn in idle:
            conn.close()

    # --- connections --------------------------------------------------------------------

    def _acquire(self) -> tuple[http.client.HTTPConnection, bool]:
        """An idle connection that still looks open (reused: True), else a new one."""
        while True:
            with self._lock:
                conn = self._idle.pop() if self._idle else None
            if conn is None:
                return self._connect(), False
            if conn.sock is not None and not _dropped(conn.sock):
                return conn, True
            conn.close()  # closed by the server while idle: nothing was sent on it

    def _connect(self) -> http.client.HTTPConnection:
        host, port = self.proxy or (self._host, self._port)
        conn: http.client.HTTPConnection
        if self._tls:
            conn = _TlsConnection(host, port, timeout=self.connect_timeout, context=self._context)
            if self._proxy is not None:
                conn.set_tunnel(self._host, self._port, headers=self._tunnel_headers)
        else:
            conn = _Connection(host, port, timeout=self.connect_timeout)
        try:
            conn.connect()  # TCP (TCP_NODELAY), the proxy's tunnel, TLS: nothing of ours sent
        except (OSError, http.client.HTTPException, ValueError) as exc:
            conn.close()
            raise _NotConnected() from exc
        conn.timeout = self.timeout
        conn.sock.settimeout(self.timeout)
        return conn

    def _release(self, conn: http.client.HTTPConnection) -> None:
        if conn.sock is not None:  # None: the server said Connection: close
            with self._lock:
                if not self._closed and len(self._idle) < self._pool_size:
                    self._idle.append(conn)
                    return
        conn.close()


class _Exchange:
    """One request (or batch): written to the node when made, its answer read by `result()`
    (once), sent again when `_may_resend` says so."""

    def __init__(
        self,
        rpc: HttpJsonRpc,
        payload: Any,
        label: str,
        repeatable: bool,
        check: Callable[[Any], Any],
    ) -> None:
        self._rpc = rpc
        self._body = json.dumps(payload, separators=(",", ":")).encode()
        self._label = label
        self._repeatable = repeatable
        self._check = check
        self._attempts = 0
        self._sent = False  # whether any byte of it was ever written
        self._conn: http.client.HTTPConnection | None = None
        self._reused = False
        self._write()

    def result(self) -> Any:
        """The decoded answer (after `check`); TransportError, ChainError for an answer that
        is not JSON."""
        while True:
            conn, self._conn = self._conn, None
            if conn is None:
                raise RuntimeError(f"{self._label}: the answer was read already")
            try:
                response = conn.getresponse()
                data = response.read()
            except BaseException as exc:
                conn.close()
                if self._may_resend(exc, writing=False):
                    self._write()
                    continue
                if isinstance(exc, (OSError, http.client.HTTPException)):
                    raise self._failed(exc) from exc
                raise
            self._rpc._release(conn)
            if not 200 <= response.status < 300:
                raise TransportError(f"HTTP {response.status} {response.reason} from "
                                     f"{self._rpc.url}", sent=True)  # fmt: skip
            try:
                answer = json.loads(data)
            except ValueError as exc:
                raise ChainError(f"{self._label}: {self._rpc.url} did not answer JSON-RPC: "
                                 f"{exc}; {data[:200]!r}") from exc  # fmt: skip
            return self._check(answer)

    def _write(self) -> None:
        while True:
            self._attempts += 1
            try:
                conn, self._reused = self._rpc._acquire()
            except _NotConnected as exc:
                cause = exc.__cause__
                raise TransportError(f"cannot connect to {self._rpc.url}: {cause}",
                                     sent=self._sent) from cause  # fmt: skip
            self._sent = True
            try:
                conn.request("POST", self._rpc._target, self._body, self._rpc._headers)
            except BaseException as exc:
                conn.close()
                if self._may_resend(exc, writing=True):
                    continue
                if isinstance(exc, (OSError, http.client.HTTPException)):
                    raise self._failed(exc) from exc
                raise
            self._conn = conn
            return

    def _may_resend(self, exc: BaseException, *, writing: bool) -> bool:
        """Whether to send it again: a reused connection found closed by the server before any
        byte of the answer, a request safe to repeat, the first attempt."""
        stale = isinstance(exc, _NoAnswer) or (writing and isinstance(exc, _STALE_ON_WRITE))
        if not (stale and self._reused and self._repeatable and self._attempts == 1):
            return False
        self._rpc._local.resends = self._rpc.resends() + 1
        return True

    def _failed(self, exc: BaseException) -> TransportError:
        what = "timed out" if isinstance(exc, TimeoutError) else "failed"
        return TransportError(f"request to {self._rpc.url} {what}: {exc!r}", sent=True)


def _dropped(sock: socket.socket) -> bool:
    """Whether an idle connection was closed (or written to) by the server: readable while no
    answer is due."""
    try:
        if hasattr(select, "poll"):
            poller = select.poll()
            poller.register(sock, select.POLLIN)
            return bool(poller.poll(0))
        return bool(select.select([sock], [], [], 0)[0])
    except (OSError, ValueError):
        return True


def _basic(user: str | None, password: str | None) -> str:
    token = f"{unquote(user or '')}:{unquote(password or '')}".encode()
    return "Basic " + base64.b64encode(token).decode("ascii")


def _proxy_for(parts: SplitResult) -> SplitResult | None:
    """The proxy the environment names for this URL (HTTP(S)_PROXY, ALL_PROXY, NO_PROXY, read
    now), None for a direct connection. Only http:// proxies: anything else is refused here
    rather than bypassed (NO_PROXY=host connects directly)."""
    proxies: Mapping[str, str] = urllib.request.getproxies()
    proxy = proxies.get(parts.scheme) or proxies.get("all")
    if not proxy:
        return None
    host = parts.hostname or ""
    if urllib.request.proxy_bypass(f"{host}:{parts.port}" if parts.port else host):
        return None
    if "://" not in proxy:
        proxy = "http://" + proxy
    found = urlsplit(proxy)
    if found.scheme != "http" or not found.hostname:
        raise ChainError(f"the proxy {proxy!r} for {parts.scheme} is not an http:// proxy; "
                         f"set NO_PROXY={host} to connect to the node directly")  # fmt: skip
    return found
