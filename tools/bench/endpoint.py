"""A local S3 endpoint with the behaviour of a real one: moto's server on 127.0.0.1 behind a proxy
that shapes the link (a first-byte latency, a bandwidth shared by every connection of the
client, as a rank's network share is) and injects the faults object storage has (throttling, a
body cut off mid-object, a flipped byte, access denied).

``moco-bench store`` measures reading from it when no real store is given, in a process of its
own (``python -m moco_dali.tools.bench.endpoint``: the proxy's Python threads do not take the
measured process's interpreter); the tests start it in-process to inject faults. moto is a
development dependency: ``pip install 'moco-dali[dev]'``.
"""

from __future__ import annotations

import http.client
import http.server
import logging
import socket
import sys
import threading
import time
from dataclasses import dataclass, field
from typing import Optional

__all__ = ["Faults", "Link", "Endpoint", "start_moto"]

SLOW_DOWN = (
    b'<?xml version="1.0" encoding="UTF-8"?><Error><Code>SlowDown</Code>'
    b"<Message>Please reduce your request rate.</Message></Error>"
)
DENIED = (
    b'<?xml version="1.0" encoding="UTF-8"?><Error><Code>AccessDenied</Code>'
    b"<Message>Access Denied</Message></Error>"
)
_BLOCK = 64 << 10


@dataclass
class Faults:
    """What the proxy does to the next requests; ``log`` holds ``(method, path)`` of each."""

    throttle: int = 0  # answer this many requests 503 SlowDown
    cut: int = 0  # send this many GET bodies half-way, then drop the connection
    corrupt: bool = False  # flip a byte of every GET body
    deny: bool = False  # answer every request 403 AccessDenied
    log: list = field(default_factory=list)
    lock: threading.Lock = field(default_factory=threading.Lock)

    def take(self, name: str) -> bool:
        with self.lock:
            left = getattr(self, name)
            if left:
                setattr(self, name, left - 1)
            return bool(left)


class Link:
    """A client's share of the network: ``latency_s`` before a GET's first byte, then its bytes
    at ``bytes_per_s`` for all connections together (each block waits for its turn)."""

    def __init__(self, bytes_per_s: Optional[float] = None, latency_s: float = 0.0):
        self.bytes_per_s, self.latency_s = bytes_per_s, latency_s
        self._free = time.monotonic()
        self._lock = threading.Lock()

    def send(self, size: int) -> None:
        """Wait until ``size`` more bytes may leave."""
        if not self.bytes_per_s:
            return
        with self._lock:
            now = time.monotonic()
            self._free = max(self._free, now) + size / self.bytes_per_s
            wait = self._free - now
        time.sleep(wait)


def _handler(upstream: tuple[str, int], faults: Faults, link: Link):
    class Proxy(http.server.BaseHTTPRequestHandler):
        protocol_version = "HTTP/1.1"

        def log_message(self, *args) -> None:  # quiet
            pass

        def _answer(self, status: int, payload: bytes) -> None:
            self.send_response(status)
            self.send_header("Content-Type", "application/xml")
            self.send_header("Content-Length", str(len(payload)))
            self.end_headers()
            if self.command != "HEAD":
                self.wfile.write(payload)

        def _forward(self) -> None:
            chunked = "chunked" in self.headers.get("Transfer-Encoding", "").lower()
            body = (
                self._chunked()
                if chunked
                else self.rfile.read(int(self.headers.get("Content-Length") or 0))
            )
            faults.log.append((self.command, self.path))
            if faults.deny or faults.take("throttle"):
                self._answer(*((403, DENIED) if faults.deny else (503, SLOW_DOWN)))
                return
            conn = http.client.HTTPConnection(*upstream, timeout=30)
            conn.putrequest(self.command, self.path, skip_host=True, skip_accept_encoding=True)
            for name, value in self.headers.items():
                if name.lower() not in ("transfer-encoding", "content-length", "expect"):
                    conn.putheader(name, value)
            conn.putheader("Content-Length", str(len(body)))
            conn.endheaders(body)
            reply = conn.getresponse()
            data = reply.read()
            conn.close()
            get = self.command == "GET" and reply.status in (200, 206) and data
            if get:
                time.sleep(link.latency_s)
                if faults.corrupt:
                    data = bytes([data[0] ^ 0xFF]) + data[1:]
                if faults.take("cut"):
                    self._head(reply, len(data), keep_length=True)
                    self._send(data[: len(data) // 2])
                    self.close_connection = True
                    self.connection.shutdown(socket.SHUT_RDWR)
                    return
            keep_length = self.command == "HEAD"  # a HEAD's length is the object's, not its body's
            self._head(reply, len(data), keep_length)
            if self.command != "HEAD":
                self._send(data) if get else self.wfile.write(data)

        def _head(self, reply, size: int, keep_length: bool) -> None:
            self.send_response(reply.status)
            for name, value in reply.getheaders():
                if name.lower() in ("transfer-encoding", "connection"):
                    continue
                if name.lower() != "content-length" or keep_length:
                    self.send_header(name, value)
            if not keep_length:
                self.send_header("Content-Length", str(size))
            self.end_headers()

        def _send(self, data: bytes) -> None:
            for start in range(0, len(data), _BLOCK):
                block = data[start : start + _BLOCK]
                link.send(len(block))
                self.wfile.write(block)
            self.wfile.flush()

        def _chunked(self) -> bytes:
            """A chunked request body, whole (botocore streams uploads so)."""
            body = b""
            while True:
                size = int(self.rfile.readline().split(b";")[0].strip() or b"0", 16)
                if size == 0:
                    while self.rfile.readline() not in (b"\r\n", b"\n", b""):
                        pass  # trailers
                    return body
                body += self.rfile.read(size)
                self.rfile.readline()

        do_GET = do_PUT = do_POST = do_HEAD = do_DELETE = _forward

    return Proxy


def start_moto(port: int = 0):
    """moto's S3 server on 127.0.0.1 (``port`` 0: a free one); ``(server, (host, port))``."""
    try:
        from moto.server import ThreadedMotoServer
    except ImportError:
        raise ValueError(
            "a local S3 endpoint needs moto: pip install 'moco-dali[dev]' (or give a real store)"
        ) from None
    logging.getLogger("werkzeug").setLevel(logging.WARNING)  # a line per request otherwise
    if not port:
        with socket.socket() as s:
            s.bind(("127.0.0.1", 0))
            port = s.getsockname()[1]
    server = ThreadedMotoServer(ip_address="127.0.0.1", port=port, verbose=False)
    server.start()
    return server, ("127.0.0.1", port)


class Endpoint:
    """The proxy in front of ``upstream`` on a free port of 127.0.0.1, served by daemon threads."""

    def __init__(self, upstream: tuple[str, int], link: Optional[Link] = None):
        self.faults, self.link = Faults(), link or Link()
        self._server = http.server.ThreadingHTTPServer(
            ("127.0.0.1", 0), _handler(upstream, self.faults, self.link)
        )
        self._server.daemon_threads = True
        self.url = f"http://127.0.0.1:{self._server.server_address[1]}"
        self._thread = threading.Thread(target=self._server.serve_forever, daemon=True)
        self._thread.start()

    def make_bucket(self, bucket: str) -> None:
        """A bucket, made straight on the server (moto takes an unsigned request)."""
        host, port = self._server.server_address[0], self._server.server_address[1]
        conn = http.client.HTTPConnection(host, port, timeout=30)
        conn.request("PUT", f"/{bucket}")
        status = conn.getresponse().status
        conn.close()
        if status != 200:
            raise ValueError(f"the local endpoint did not make bucket {bucket}: HTTP {status}")
        self.faults.log.clear()  # the log is the client's requests

    def close(self) -> None:
        self._server.shutdown()
        self._server.server_close()


def main(argv: Optional[list[str]] = None) -> int:
    """``BANDWIDTH_MB_S LATENCY_MS``: serve an endpoint until stdin closes; its URL is the first
    line written to stdout. Not a command: ``moco-bench store`` starts it, its options checked."""
    bandwidth_mb_s, latency_ms = (float(v) for v in (sys.argv[1:] if argv is None else argv))
    server, upstream = start_moto()
    endpoint = Endpoint(upstream, Link(bandwidth_mb_s * 1e6 or None, latency_ms / 1e3))
    print(endpoint.url, flush=True)
    sys.stdin.read()  # the parent's end: it closes our stdin, or exits
    endpoint.close()
    server.stop()
    return 0


if __name__ == "__main__":
    sys.exit(main())
