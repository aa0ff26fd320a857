"""A fault-injecting HTTP proxy on 127.0.0.1 in front of the local S3 server (tests/s3server.py).

Every request is forwarded to ``upstream`` unless a rule matches it; a rule answers with an error status
(500, 503, 503 SlowDown, or 403 InvalidAccessKeyId / SignatureDoesNotMatch, with S3's XML error body) or drops the connection: an upload (PUT, POST) is
not forwarded and gets no answer, any other request is forwarded and its answer cut half way through the body. Rules match a method and a path substring, and either every matching
request, or only the n-th one (1-based, counted among the requests that rule matches).

>>> with FaultProxy("http://127.0.0.1:5000") as proxy:  # doctest: +SKIP
...     proxy.fail(status=503, method="PUT", nth=1)     # the first PUT gets a 503
...     proxy.endpoint                                  # "http://127.0.0.1:<port>"
"""

from __future__ import annotations

import dataclasses
import http.client
import http.server
import socket
import threading
import urllib.parse
from typing import Literal

Action = Literal["500", "503", "slowdown", "drop", "badkey", "badsig"]

# the error bodies S3 sends; botocore reads the code from them
BODIES: dict[Action, tuple[int, bytes]] = {
    "500": (500, b"<Error><Code>InternalError</Code><Message>injected</Message></Error>"),
    "503": (503, b"<Error><Code>ServiceUnavailable</Code><Message>injected</Message></Error>"),
    "slowdown": (503, b"<Error><Code>SlowDown</Code><Message>Please reduce your request rate.</Message></Error>"),
    # a server refusing the credentials, as S3 does
    "badkey": (
        403,
        b"<Error><Code>InvalidAccessKeyId</Code><Message>The AWS Access Key Id you provided does not exist in our "
        b"records.</Message></Error>",
    ),
    "badsig": (
        403,
        b"<Error><Code>SignatureDoesNotMatch</Code><Message>The request signature we calculated does not match the "
        b"signature you provided. Check your key and signing method.</Message></Error>",
    ),
}
HOP_BY_HOP = frozenset({"connection", "keep-alive", "proxy-connection", "transfer-encoding", "te", "upgrade"})
UPSTREAM_TIMEOUT = 30.0


@dataclasses.dataclass
class Rule:
    action: Action
    method: str | None = None  # None: any
    path: str = ""  # a substring of the request target (path and query)
    nth: int | None = None  # None: every matching request
    seen: int = 0
    fired: int = 0

    def matches(self, method: str, target: str) -> bool:
        if (self.method is not None and method != self.method) or self.path not in target:
            return False
        self.seen += 1
        hit = self.nth is None or self.seen == self.nth
        self.fired += hit
        return hit


class FaultProxy:
    """Starts on ``__enter__`` (a free port), stops on ``__exit__``. ``requests``: (method, target) of every
    request received, faulted or not."""

    def __init__(self, upstream: str) -> None:
        parsed = urllib.parse.urlsplit(upstream)
        self.upstream = (parsed.hostname or "127.0.0.1", parsed.port or 80)
        self.rules: list[Rule] = []
        self.requests: list[tuple[str, str]] = []
        self.lock = threading.Lock()
        self.server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), self._handler())
        self.server.daemon_threads = True
        self.thread = threading.Thread(target=self.server.serve_forever, name="s3proxy", daemon=True)

    @property
    def endpoint(self) -> str:
        return f"http://127.0.0.1:{self.server.server_address[1]}"

    def fail(self, action: Action, *, method: str | None = None, path: str = "", nth: int | None = None) -> Rule:
        rule = Rule(action, method, path, nth)
        with self.lock:
            self.rules.append(rule)
        return rule

    def clear(self) -> None:
        with self.lock:
            self.rules.clear()
            self.requests.clear()

    def count(self, method: str | None = None, path: str = "") -> int:
        with self.lock:
            return sum(1 for m, t in self.requests if (method is None or m == method) and path in t)

    def __enter__(self) -> FaultProxy:
        self.thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.server.shutdown()
        self.server.server_close()
        self.thread.join(timeout=10)

    def _decide(self, method: str, target: str) -> Action | None:
        with self.lock:
            self.requests.append((method, target))
            for rule in self.rules:
                if rule.matches(method, target):
                    return rule.action
        return None

    def _handler(self) -> type[http.server.BaseHTTPRequestHandler]:
        proxy = self

        class Handler(http.server.BaseHTTPRequestHandler):
            protocol_version = "HTTP/1.1"
            timeout = UPSTREAM_TIMEOUT

            def log_message(self, format: str, *args: object) -> None:
                pass

            def body(self) -> bytes:
                if self.headers.get("Transfer-Encoding", "").lower() == "chunked":
                    out = bytearray()
                    while True:
                        size = int(self.rfile.readline().split(b";", 1)[0], 16)
                        if size == 0:
                            while self.rfile.readline() not in (b"\r\n", b"\n", b""):
                                pass
                            return bytes(out)
                        out += self.rfile.read(size)
                        self.rfile.readline()
                return self.rfile.read(int(self.headers.get("Content-Length") or 0))

            def handle_any(self) -> None:
                data = self.body()  # read whole, so the connection stays usable after an error answer
                action = proxy._decide(self.command, self.path)
                if action in BODIES:
                    status, text = BODIES[action]
                    self.send_response(status)
                    self.send_header("Content-Type", "application/xml")
                    self.send_header("Content-Length", str(len(text)))
                    self.end_headers()
                    if self.command != "HEAD":  # an answer to HEAD has no body
                        self.wfile.write(text)
                    return
                if action == "drop" and self.command in ("PUT", "POST"):
                    self.hang_up()  # the upload is lost on the way: nothing reaches the server
                    return
                conn = http.client.HTTPConnection(*proxy.upstream, timeout=UPSTREAM_TIMEOUT)
                try:
                    headers = {k: v for k, v in self.headers.items() if k.lower() not in HOP_BY_HOP}
                    if self.headers.get("Transfer-Encoding", "").lower() == "chunked":
                        headers["Content-Length"] = str(len(data))
                    conn.request(self.command, self.path, body=data or None, headers=headers)
                    answer = conn.getresponse()
                    payload = answer.read()
                finally:
                    conn.close()
                self.send_response(answer.status, answer.reason)
                for k, v in answer.getheaders():
                    if k.lower() not in HOP_BY_HOP and (k.lower() != "content-length" or self.command == "HEAD"):
                        self.send_header(k, v)
                if self.command != "HEAD":
                    self.send_header("Content-Length", str(len(payload)))
                self.end_headers()
                if action == "drop" and payload:
                    # half the body, then the connection goes: the client sees a short read
                    self.wfile.write(payload[: len(payload) // 2])
                    self.hang_up()
                    return
                if self.command != "HEAD":
                    self.wfile.write(payload)

            def hang_up(self) -> None:
                self.wfile.flush()
                self.close_connection = True
                self.connection.shutdown(socket.SHUT_RDWR)

            do_GET = do_PUT = do_POST = do_DELETE = do_HEAD = handle_any

        return Handler
