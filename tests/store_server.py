"""A real S3 endpoint for the tests: moto's server on 127.0.0.1, behind a small proxy that
injects the faults object storage has (throttling, a body cut off, a flipped byte, access
denied), and the environment a client finds it through (nothing from the machine's own AWS
settings)."""

from __future__ import annotations

import http.client
import http.server
import itertools
import logging
import socket
import threading
from dataclasses import dataclass, field

import pytest

from tests.conftest import free_port

SLOW_DOWN = (
    b'<?xml version="1.0" encoding="UTF-8"?><Error><Code>SlowDown</Code>'
    b"<Message>Please reduce your request rate.</Message></Error>"
)
DENIED = (
    b'<?xml version="1.0" encoding="UTF-8"?><Error><Code>AccessDenied</Code>'
    b"<Message>Access Denied</Message></Error>"
)
_buckets = itertools.count()


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


def _handler(upstream: tuple[str, int], faults: Faults):
    class Proxy(http.server.BaseHTTPRequestHandler):
        protocol_version = "HTTP/1.1"

        def log_message(self, *args) -> None:  # quiet
            pass

        def _forward(self) -> None:
            chunked = "chunked" in self.headers.get("Transfer-Encoding", "").lower()
            body = (
                self._chunked()
                if chunked
                else self.rfile.read(int(self.headers.get("Content-Length") or 0))
            )
            faults.log.append((self.command, self.path))
            if faults.deny or faults.take("throttle"):
                status, payload = (403, DENIED) if faults.deny else (503, SLOW_DOWN)
                self.send_response(status)
                self.send_header("Content-Type", "application/xml")
                self.send_header("Content-Length", str(len(payload)))
                self.end_headers()
                if self.command != "HEAD":
                    self.wfile.write(payload)
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
            if self.command == "GET" and reply.status in (200, 206) and data:
                if faults.corrupt:
                    data = bytes([data[0] ^ 0xFF]) + data[1:]
                if faults.take("cut"):
                    self.send_response(reply.status)
                    for name, value in reply.getheaders():
                        if name.lower() not in ("transfer-encoding", "connection"):
                            self.send_header(name, value)
                    self.end_headers()
                    self.wfile.write(data[: len(data) // 2])
                    self.wfile.flush()
                    self.close_connection = True
                    self.connection.shutdown(socket.SHUT_RDWR)
                    return
            self.send_response(reply.status)
            keep_length = self.command == "HEAD"  # a HEAD's length is the object's, not its body's
            for name, value in reply.getheaders():
                if name.lower() in ("transfer-encoding", "connection"):
                    continue
                if name.lower() != "content-length" or keep_length:
                    self.send_header(name, value)
            if not keep_length:
                self.send_header("Content-Length", str(len(data)))
            self.end_headers()
            if self.command != "HEAD":
                self.wfile.write(data)

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


@pytest.fixture(scope="module")
def moto_server():
    """moto's S3 server on 127.0.0.1 for one test module (it starts in about a second): its
    threads end with the module, so no later test forks a process beside them."""
    from moto.server import ThreadedMotoServer

    logging.getLogger("werkzeug").setLevel(logging.WARNING)  # a line per request otherwise

    port = free_port()
    server = ThreadedMotoServer(ip_address="127.0.0.1", port=port, verbose=False)
    server.start()
    yield ("127.0.0.1", port)
    server.stop()


@pytest.fixture
def s3(moto_server, monkeypatch, tmp_path):
    """A fresh bucket on the endpoint, reached through the fault proxy: ``(bucket, faults)``."""
    faults = Faults()
    proxy = http.server.ThreadingHTTPServer(("127.0.0.1", 0), _handler(moto_server, faults))
    proxy.daemon_threads = True
    thread = threading.Thread(target=proxy.serve_forever, daemon=True)
    thread.start()
    for name in ("AWS_PROFILE", "AWS_SESSION_TOKEN", "AWS_ENDPOINT_URL_S3", "AWS_CA_BUNDLE"):
        monkeypatch.delenv(name, raising=False)
    monkeypatch.setenv("AWS_CONFIG_FILE", str(tmp_path / "no-aws-config"))
    monkeypatch.setenv("AWS_SHARED_CREDENTIALS_FILE", str(tmp_path / "no-aws-credentials"))
    monkeypatch.setenv("AWS_ACCESS_KEY_ID", "testing")
    monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", "testing")
    monkeypatch.setenv("AWS_DEFAULT_REGION", "us-east-1")
    monkeypatch.setenv("AWS_EC2_METADATA_DISABLED", "true")
    monkeypatch.setenv("AWS_ENDPOINT_URL", f"http://127.0.0.1:{proxy.server_address[1]}")
    bucket = f"moco-test-{next(_buckets)}"
    conn = http.client.HTTPConnection(*moto_server, timeout=30)
    conn.request("PUT", f"/{bucket}")  # moto takes an unsigned request
    assert conn.getresponse().status == 200
    conn.close()
    yield bucket, faults
    proxy.shutdown()
    proxy.server_close()
