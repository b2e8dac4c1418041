"""Issue 21, Django behind a real Varnish running the repository's
``deploy/varnish/icache.vcl``: pages tagged by ``ICacheMiddleware`` are
served by Varnish after the first request, a bump purges exactly the pages
that read its token (no TTL involved), and one user's page never reaches
another. Django is served by a WSGI server on a free loopback port in this
process; Varnish is started on another and stopped after."""

from __future__ import annotations

import http.client
import os
import shutil
import socketserver
import subprocess
import tempfile
import threading
import time
from pathlib import Path
from wsgiref.simple_server import WSGIRequestHandler, WSGIServer, make_server

import pytest
from conftest import REPO, TEMPLATES, free_port, missing, unique
from django.conf import settings
from django.core.handlers.wsgi import WSGIHandler
from django.test.utils import override_settings
from movieapp.views import CALLS, DATA

MW = "django_icache.middleware.ICacheMiddleware"


class _Quiet(WSGIRequestHandler):
    def log_message(self, *args):
        pass


class _ThreadingWSGIServer(socketserver.ThreadingMixIn, WSGIServer):
    daemon_threads = True


@pytest.fixture(scope="module")
def django_server():
    server = make_server("127.0.0.1", 0, WSGIHandler(), server_class=_ThreadingWSGIServer, handler_class=_Quiet)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    yield server
    server.shutdown()
    server.server_close()


def _answers(port: int) -> bool:
    try:
        c = http.client.HTTPConnection("127.0.0.1", port, timeout=1)
        c.request("PURGE", "/ready")  # answered by the VCL itself (400)
        c.getresponse().read()
        c.close()
        return True
    except OSError:
        return False


@pytest.fixture(scope="module")
def varnish(django_server):
    if shutil.which("varnishd") is None:
        missing("varnishd (Debian packages varnish and varnish-modules)")
    source = (REPO / "deploy/varnish/icache.vcl").read_text()
    assert '.port = "3000";' in source
    tmp = tempfile.mkdtemp(prefix="icache-varnish-")
    vcl = Path(tmp, "icache.vcl")
    backend = django_server.server_address[1]
    vcl.write_text(source.replace('.port = "3000";', f'.port = "{backend}";', 1))
    last = ""
    for _ in range(3):
        port = free_port()
        log = open(Path(tmp, "varnishd.log"), "w")
        # -j none: as root varnishd otherwise wants users of its own.
        proc = subprocess.Popen(
            ["varnishd", "-F", "-j", "none", "-n", str(Path(tmp, f"work-{port}")), "-a", f"127.0.0.1:{port}",
             "-T", "none", "-f", str(vcl), "-s", "malloc,64m", "-p", "default_grace=0"],
            stdout=log, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL,
        )
        deadline = time.monotonic() + 20
        while time.monotonic() < deadline and proc.poll() is None and not _answers(port):
            time.sleep(0.05)
        if proc.poll() is None and _answers(port):
            break
        proc.kill()
        proc.wait()
        log.close()
        last = Path(tmp, "varnishd.log").read_text(errors="replace")
    else:
        pytest.fail(f"varnishd did not start: {last}")
    yield port
    proc.terminate()
    try:
        proc.wait(5)
    except subprocess.TimeoutExpired:
        proc.kill()
        proc.wait()
    log.close()
    shutil.rmtree(tmp, ignore_errors=True)


@pytest.fixture
def site(use_url, redis_server, django_server, varnish):
    # use_url's override first: overrides must end in the reverse order.
    icache = use_url(redis_server.url(unique("edge")))
    with override_settings(MIDDLEWARE=[MW, *settings.MIDDLEWARE], ICACHE_PURGE_URL=f"http://127.0.0.1:{varnish}"):
        # A handler loads MIDDLEWARE when built: built under the override.
        django_server.set_app(WSGIHandler())
        yield icache


def get(port: int, path: str, cookie: str | None = None):
    c = http.client.HTTPConnection("127.0.0.1", port, timeout=10)
    c.request("GET", path, headers={"Cookie": cookie} if cookie else {})
    r = c.getresponse()
    body = r.read().decode()
    c.close()
    return r.status, dict(r.getheaders()), body


def data_page(token: str) -> str:
    name = unique("data") + ".html"
    TEMPLATES[name] = f"{{% load icache %}}<h1>Page</h1>{{% icache '{token}' %}}<p>{{{{ value }}}}</p>{{% endicache %}}"
    return name


def test_pages_are_served_by_varnish_and_a_bump_shows_at_once(site, varnish):
    token = unique("movies")
    name = data_page(token)
    DATA[name] = "rating 3"
    status, first, body = get(varnish, f"/data/{name}")
    assert status == 200 and "rating 3" in body and first["X-Cache"] == "MISS", first
    status, h, body = get(varnish, f"/data/{name}")
    assert h["X-Cache"] == "HIT" and "rating 3" in body, repr((h, first))
    assert CALLS[name] == 1, "Varnish asked Django again"

    DATA[name] = "rating 5"
    site.incr(token)  # the purge goes out right after the bump
    status, h, body = get(varnish, f"/data/{name}")
    assert "rating 5" in body and h["X-Cache"] == "MISS", (h, body)
    assert get(varnish, f"/data/{name}")[1]["X-Cache"] == "HIT"


def test_a_page_whose_tokens_did_not_move_stays_cached(site, varnish):
    mine, other = unique("mine"), unique("other")
    name = data_page(mine)
    get(varnish, f"/data/{name}")
    assert get(varnish, f"/data/{name}")[1]["X-Cache"] == "HIT"
    site.incr(other)
    assert get(varnish, f"/data/{name}")[1]["X-Cache"] == "HIT"


def test_one_users_page_never_reaches_another(site, varnish):
    name = unique("profile") + ".html"
    TEMPLATES[name] = "{% load icache %}{% icache 'profile' who %}<p>hello {{ who }}</p>{% endicache %}"
    ann, bob = unique("ann"), unique("bob")
    _, h, body = get(varnish, f"/session/{name}", f"sessionid={ann}")
    assert f"hello {ann}" in body and "Cookie" in h.get("Vary", ""), h
    _, h, body = get(varnish, f"/session/{name}", f"sessionid={ann}")
    assert h["X-Cache"] == "HIT" and f"hello {ann}" in body, h
    _, h, body = get(varnish, f"/session/{name}", f"sessionid={bob}")
    assert f"hello {bob}" in body and ann not in body, body
    _, h, body = get(varnish, f"/session/{name}")  # no cookie at all
    assert ann not in body and bob not in body, body
    # A bump of Ann's token purges her page only.
    site.incr(ann)
    assert get(varnish, f"/session/{name}", f"sessionid={ann}")[1]["X-Cache"] == "MISS"
    assert get(varnish, f"/session/{name}", f"sessionid={bob}")[1]["X-Cache"] == "HIT"


def test_varnish_stores_pages_gzipped_and_unzips_for_clients_that_do_not_accept_it(site, varnish):
    import gzip

    token = unique("gz")
    name = data_page(token)
    DATA[name] = "x" * 2000
    _, plain_h, plain = get(varnish, f"/data/{name}")
    c = http.client.HTTPConnection("127.0.0.1", varnish, timeout=10)
    c.request("GET", f"/data/{name}", headers={"Accept-Encoding": "gzip"})
    r = c.getresponse()
    raw = r.read()
    c.close()
    assert r.getheader("X-Cache") == "HIT" and r.getheader("Content-Encoding") == "gzip"
    assert len(raw) < len(plain) / 4, (len(raw), len(plain))
    assert gzip.decompress(raw).decode() == plain
    assert "Content-Encoding" not in plain_h
