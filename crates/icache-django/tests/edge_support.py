"""A stand-in for the proxy's purge endpoint, on a free loopback port: the
tests of purges (the middleware's, the relays') point ICACHE_PURGE_URL at
it and read what it was sent. The real CDN APIs are out of reach here; the
real Varnish runs in the demo's and icache-http's tests."""

from __future__ import annotations

import http.server
import threading

import pytest
from django.test.utils import override_settings


class Recorder(http.server.BaseHTTPRequestHandler):
    """A stand-in for Varnish's PURGE endpoint: answers ``status`` (the class
    attribute) and records the keys of each purge it accepted."""

    status = 200
    seen: list = []

    def do_PURGE(self):  # noqa: N802 - the HTTP method
        status = type(self).status
        if status == 200:
            type(self).seen.append(self.headers.get("xkey-purge", ""))
        self.send_response(status)
        self.send_header("Content-Length", "0")
        self.end_headers()

    def log_message(self, *args):
        pass


@pytest.fixture
def proxy():
    """A recording PURGE endpoint; ICACHE_PURGE_URL points at it."""

    class Handler(Recorder):
        seen: list = []
        status = 200

    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    with override_settings(ICACHE_PURGE_URL=f"http://127.0.0.1:{server.server_address[1]}"):
        yield Handler
    server.shutdown()
    server.server_close()


def purged(handler) -> set[str]:
    return {k for line in handler.seen for k in line.split()}


