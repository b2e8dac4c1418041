"""A dead or hung cache never takes the site down: blocks render uncached
within the time-out, and Python's logging (logger `django_icache`) hears of
it at most every 10 s."""

import logging
import socket
import threading
import time

import pytest
from conftest import Counter, free_port, render, unique
from django.template import engines

from django_icache import CacheError


def trouble(caplog):
    return [
        r for r in caplog.records
        if r.name == "django_icache" and r.levelno == logging.WARNING and "backend trouble" in r.getMessage()
    ]


@pytest.fixture
def hung_server():
    """Accepts connections and never answers."""
    s = socket.socket()
    s.bind(("127.0.0.1", 0))
    s.listen(64)
    held, stop = [], threading.Event()

    def accept():
        s.settimeout(0.1)
        while not stop.is_set():
            try:
                held.append(s.accept()[0])
            except OSError:
                pass

    t = threading.Thread(target=accept, daemon=True)
    t.start()
    yield s.getsockname()[1]
    stop.set()
    t.join()
    for c in held:
        c.close()
    s.close()


@pytest.mark.parametrize("scheme", ["redis", "memcached"])
@pytest.mark.parametrize("state", ["dead", "hung"])
def test_a_dead_or_hung_cache_renders_uncached_and_logs_once(use_url, caplog, scheme, state, request):
    port = free_port() if state == "dead" else request.getfixturevalue("hung_server")
    url = f"{scheme}://127.0.0.1:{port}" + ("/0" if scheme == "redis" else "")
    use_url(url + "?timeout_ms=100&connect_timeout_ms=100")
    name = unique() + ".html"
    src = "{% load icache %}{% icache 'movies' user %}{{ c.tick }}<p>{{ user }}</p>{% endicache %}"
    c = Counter()
    with caplog.at_level(logging.INFO, logger="django_icache"):
        for i in range(20):
            started = time.monotonic()
            assert render(src, {"c": c, "user": i}, name=name) == f"<p>{i}</p>"
            # One time-out at most (connect + answer), never a hang.
            assert time.monotonic() - started < 0.5, f"render {i} took too long"
    assert c.n == 20  # every render ran its body: uncached
    logged = trouble(caplog)
    assert len(logged) == 1, [r.getMessage() for r in caplog.records]
    assert scheme in logged[0].getMessage()


def test_the_seed_api_on_a_dead_cache_raises_cache_error(use_url):
    icache = use_url(f"redis://127.0.0.1:{free_port()}/0")
    with pytest.raises(CacheError):
        icache.get_sum(["movies"])
    with pytest.raises(CacheError):
        icache.incr("movies", raise_errors=True)  # remembered, replayed once the server is back
    assert icache.incr("movies") is None  # by default never raised (test_transactions.py)


def test_a_cache_that_comes_back_is_used_again(use_url):
    """Down: uncached. Back (same port, emptied by the restart): cached again,
    and a bump that failed while it was down does not leave stale output."""
    from conftest import start_server, wait_port
    import subprocess

    server = start_server("redis")
    try:
        icache = use_url(server.url() + "?timeout_ms=100&connect_timeout_ms=100")
        name = unique() + ".html"
        src = "{% load icache %}{% icache 'movies' %}{{ c.tick }}{{ v }}{% endicache %}"
        c = Counter()
        assert render(src, {"c": c, "v": 1}, name=name) == "1"
        assert render(src, {"c": c, "v": 2}, name=name) == "1"
        server.proc.terminate()
        server.proc.wait(5)
        assert render(src, {"c": c, "v": 3}, name=name) == "3"  # uncached
        with pytest.raises(CacheError):
            icache.incr("movies", raise_errors=True)
        server.proc = subprocess.Popen(server.proc.args, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        assert wait_port(server.port, server.proc, "redis")
        deadline = time.monotonic() + 10
        while True:  # the circuit breaker lets a probe through within 4 s
            out = render(src, {"c": c, "v": 4}, name=name)
            if icache.stats()["stores"] >= 2 or time.monotonic() > deadline:
                break
            time.sleep(0.1)
        assert out == "4"
        assert render(src, {"c": c, "v": 5}, name=name) == "4"  # cached again
    finally:
        server.stop()
