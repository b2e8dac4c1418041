"""The near cache through the URL (`ICACHE_URL=…?near=…`): a Django site gets
the Rust core's in-process bodies (the default on Redis and memcached) and
Redis client-side caching (`near=tracking`), and a bump from the CLI is still
seen: at once with `near=entries`, within `max_lag_ms` with `near=tracking`."""

import subprocess
import time

import pytest
from conftest import Counter, render, unique

# `c.tick` counts the body's renders; the block shows `n` as it was then.
SRC = "{% load icache %}{% icache 'movies' %}{{ c.tick }}{{ n }}{% endicache %}"


def run(*args):
    return subprocess.run([str(a) for a in args], capture_output=True, text=True, timeout=30)


@pytest.mark.parametrize("kind", ["redis", "memcached"])
def test_the_default_keeps_bodies_in_process(request, use_url, kind):
    server = request.getfixturevalue(f"{kind}_server")
    icache = use_url(server.url(unique("near")))
    name, c = unique() + ".html", Counter()
    assert render(SRC, {"c": c, "n": 1}, name=name) == "1"
    before = icache.stats()
    assert render(SRC, {"c": c, "n": 2}, name=name) == "1"
    assert c.n == 1
    after = icache.stats()
    assert after["near_hits"] == before["near_hits"] + 1, after
    assert after["near_bytes"] > 0


def test_near_tracking_hits_make_no_round_trip_and_see_bumps(redis_server, use_url, icache_cli):
    url = redis_server.url(unique("track")) + "&near=tracking&max_lag_ms=50"
    icache = use_url(url)
    name, c = unique() + ".html", Counter()
    assert render(SRC, {"c": c, "n": 1}, name=name) == "1"
    # Tracking comes up in the background: soon every hit is served with no
    # round trip at all.
    deadline = time.monotonic() + 10
    while True:
        before = icache.stats()["tracked_hits"]
        assert render(SRC, {"c": c, "n": 0}, name=name) == "1"
        if icache.stats()["tracked_hits"] > before:
            break
        assert time.monotonic() < deadline, icache.stats()
        time.sleep(0.02)
    # A bump from another process (the CLI, same URL) is seen within the bound.
    out = run(icache_cli, "--url", url, "bump", "movies")
    assert out.returncode == 0, out.stderr
    time.sleep(0.05 + 0.05)
    assert render(SRC, {"c": c, "n": 2}, name=name) == "2"
    # This process's own bump is seen at once.
    icache.incr("movies")
    assert render(SRC, {"c": c, "n": 3}, name=name) == "3"
    assert c.n == 3
