"""A fault-injecting HTTP proxy on loopback, for testing S3 clients against a real server.

Stdlib only. It forwards each request verbatim (headers included, so SigV4 signatures
stay valid) to one upstream and, when a rule of its schedule matches, answers with a
fault instead of the upstream's answer:

* ``slowdown``  — 503 SlowDown (S3's throttling answer); the upstream is not called.
* ``reset``     — the request reaches the upstream, then the client gets the status line,
  headers and half the body, and the connection is reset (RST).
* ``truncate``  — the upstream's headers (with the full Content-Length) and half the body,
  then a clean close.
* ``slow``      — the answer comes ``delay_s`` late (past a client's read timeout this is a
  timeout).

Rules match by method and key substring and fire for the first ``first`` matching
requests, or every ``every``-th one, counted over all keys or per key. The proxy counts
requests and injected faults, and stops itself after ``max_lifetime_s``.
"""

from __future__ import annotations

import http.client
import http.server
import socket
import struct
import threading
import time
from collections import Counter
from dataclasses import dataclass, field
from urllib.parse import unquote, urlsplit

FAULTS = ("slowdown", "reset", "truncate", "slow")
_HOP_BY_HOP = {"connection", "keep-alive", "proxy-connection", "transfer-encoding", "te", "upgrade", "expect"}

SLOWDOWN_BODY = (
    b'<?xml version="1.0" encoding="UTF-8"?>\n<Error><Code>SlowDown</Code>'
    b"<Message>Please reduce your request rate.</Message><RequestId>fault-proxy</RequestId></Error>"
)


@dataclass
class Rule:
    """Inject ``fault`` into matching requests: the first ``first`` of them, or every ``every``-th."""

    fault: str
    method: str | None = None  # e.g. "GET"; None: any
    key_contains: str | None = None  # substring of the unquoted request target (path?query); None: any
    first: int | None = None
    every: int | None = None
    per_key: bool = False  # count matches separately for each request target
    delay_s: float = 2.0  # for "slow"
    seen: Counter = field(default_factory=Counter)

    def __post_init__(self):
        if self.fault not in FAULTS:
            raise ValueError(f"unknown fault {self.fault!r}; one of {FAULTS}")
        if (self.first is None) == (self.every is None):
            raise ValueError("give exactly one of first= or every=")

    def fires(self, method: str, path: str) -> bool:
        if self.method and method != self.method:
            return False
        if self.key_contains and self.key_contains not in path:
            return False
        counter = path if self.per_key else ""
        self.seen[counter] += 1
        n = self.seen[counter]
        return n <= self.first if self.first is not None else n % self.every == 0


class FaultProxy:
    """``with FaultProxy(upstream) as proxy:`` clients use ``proxy.endpoint``; ``proxy.rules`` is the schedule."""

    def __init__(self, upstream: str, rules: list[Rule] | None = None, max_lifetime_s: float = 300.0):
        parts = urlsplit(upstream)
        self.upstream_host, self.upstream_port = parts.hostname, parts.port or 80
        self.rules: list[Rule] = list(rules or [])
        self.max_lifetime_s = max_lifetime_s
        self.requests = 0
        self.injected: Counter = Counter()
        self.events: list[tuple[str, str, str | None]] = []  # (method, path, fault)
        self._lock = threading.Lock()
        self._server: http.server.ThreadingHTTPServer | None = None
        self._thread: threading.Thread | None = None
        self._timer: threading.Timer | None = None

    # -- lifecycle ------------------------------------------------------------------------

    @property
    def endpoint(self) -> str:
        host, port = self._server.server_address[:2]
        return f"http://{host}:{port}"

    def start(self) -> FaultProxy:
        proxy = self

        class Handler(_ProxyHandler):
            owner = proxy

        self._server = _QuietServer(("127.0.0.1", 0), Handler)
        self._server.daemon_threads = True
        self._thread = threading.Thread(target=self._server.serve_forever, kwargs={"poll_interval": 0.1}, daemon=True)
        self._thread.start()
        self._timer = threading.Timer(self.max_lifetime_s, self.stop)
        self._timer.daemon = True
        self._timer.start()
        return self

    def stop(self) -> None:
        if self._timer is not None:
            self._timer.cancel()
        server = self._server
        if server is not None and self._thread is not None and self._thread.is_alive():
            server.shutdown()
            server.server_close()
            self._thread.join(timeout=5)

    def __enter__(self) -> FaultProxy:
        return self.start()

    def __exit__(self, *exc) -> None:
        self.stop()

    # -- schedule -------------------------------------------------------------------------

    def set_rules(self, *rules: Rule) -> None:
        with self._lock:
            self.rules = list(rules)

    def reset_counts(self) -> None:
        with self._lock:
            self.requests = 0
            self.injected.clear()
            self.events.clear()

    def _decide(self, method: str, path: str) -> Rule | None:
        with self._lock:
            self.requests += 1
            chosen = None
            for rule in self.rules:  # every rule counts its matches; the first that fires wins
                if rule.fires(method, path) and chosen is None:
                    chosen = rule
            if chosen is not None:
                self.injected[chosen.fault] += 1
            self.events.append((method, path, chosen.fault if chosen else None))
            return chosen


class _QuietServer(http.server.ThreadingHTTPServer):
    daemon_threads = True

    def handle_error(self, request, client_address):  # a client that went away mid-answer is expected here
        pass


class _ProxyHandler(http.server.BaseHTTPRequestHandler):
    owner: FaultProxy
    protocol_version = "HTTP/1.1"
    timeout = 30  # an idle keep-alive connection is dropped after this

    def log_message(self, format, *args):  # quiet
        pass

    def _handle(self) -> None:
        owner = self.owner
        length = int(self.headers.get("Content-Length") or 0)
        body = self.rfile.read(length) if length else b""
        path = unquote(self.path)
        rule = owner._decide(self.command, path)
        if rule is not None and rule.fault == "slowdown":
            self._send(503, "Slow Down", [("Content-Type", "application/xml")], SLOWDOWN_BODY)
            return
        status, reason, headers, payload = self._forward(body)
        if rule is None:
            self._send(status, reason, headers, payload)
        elif rule.fault == "slow":
            time.sleep(rule.delay_s)
            self._send(status, reason, headers, payload)
        elif not payload or self.command == "HEAD":
            # no body to cut: "reset" and "truncate" both drop the connection before answering
            if rule.fault == "reset":
                self.connection.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
            self.close_connection = True
            self.connection.close()
        elif rule.fault == "truncate":
            self._send(status, reason, headers, payload[: len(payload) // 2], length=len(payload))
            self.close_connection = True
            self.wfile.flush()
            self.connection.shutdown(socket.SHUT_WR)
        elif rule.fault == "reset":
            self._send(status, reason, headers, payload[: len(payload) // 2], length=len(payload))
            self.wfile.flush()
            self.close_connection = True
            # SO_LINGER 0: close sends RST instead of FIN
            self.connection.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
            self.connection.close()

    def _forward(self, body: bytes):
        owner = self.owner
        conn = http.client.HTTPConnection(owner.upstream_host, owner.upstream_port, timeout=60)
        try:
            conn.putrequest(self.command, self.path, skip_host=True, skip_accept_encoding=True)
            for name, value in self.headers.items():
                if name.lower() not in _HOP_BY_HOP:
                    conn.putheader(name, value)
            conn.endheaders(body or None)
            response = conn.getresponse()
            payload = response.read()
            headers = [(k, v) for k, v in response.getheaders() if k.lower() not in _HOP_BY_HOP]
            return response.status, response.reason, headers, payload
        finally:
            conn.close()

    def _send(self, status, reason, headers, payload: bytes, length: int | None = None) -> None:
        self.send_response_only(status, reason)
        declared = None
        for name, value in headers:
            if name.lower() == "content-length":
                declared = value
                continue
            self.send_header(name, value)
        if self.command == "HEAD":
            if declared is not None:
                self.send_header("Content-Length", declared)
        else:
            self.send_header("Content-Length", str(length if length is not None else len(payload)))
        self.end_headers()
        if self.command != "HEAD" and payload:
            self.wfile.write(payload)

    do_GET = do_PUT = do_POST = do_HEAD = do_DELETE = _handle
