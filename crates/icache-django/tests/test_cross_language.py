"""One invalidation across languages: with the same URL and prefix, the CLI
(`icache bump movies`), a Rust handle and Python's icache share tokens and
entries, whichever language rendered them."""

import subprocess

import pytest
from conftest import Counter, render, unique


@pytest.fixture(params=["redis", "memcached"])
def shared_url(request):
    server = request.getfixturevalue(f"{request.param}_server")
    return server.url(unique("shop"))


def run(*args):
    return subprocess.run([str(a) for a in args], capture_output=True, text=True, timeout=30)


def test_cli_bump_invalidates_a_django_block(use_url, shared_url, icache_cli):
    use_url(shared_url)
    name = unique() + ".html"
    src = "{% load icache %}{% icache 'movies-personal-rating' 'movies' user.id %}{{ c.tick }}{{ n }}{% endicache %}"
    c = Counter()
    ctx = lambda n: {"user": {"id": 7}, "n": n, "c": c}  # noqa: E731
    assert render(src, ctx(1), name=name) == "1"
    assert render(src, ctx(2), name=name) == "1"
    out = run(icache_cli, "--url", shared_url, "bump", "movies")
    assert out.returncode == 0, out.stderr
    assert render(src, ctx(3), name=name) == "3"
    # The user's token (the demo's: the id) from the CLI too.
    assert run(icache_cli, "--url", shared_url, "bump", "7").returncode == 0
    assert render(src, ctx(4), name=name) == "4"
    assert c.n == 3


def test_python_and_the_cli_read_the_same_generations(use_url, shared_url, icache_cli):
    icache = use_url(shared_url)
    g = icache.incr("movies")
    out = run(icache_cli, "--url", shared_url, "version", "movies", "users")
    assert out.returncode == 0, out.stderr
    lines = dict(line.split(" ", 1) for line in out.stdout.splitlines())
    assert int(lines["movies"]) == g
    assert int(lines["version"]) == icache.get_sum(["movies", "users"])
    bumped = run(icache_cli, "--url", shared_url, "bump", "movies")
    assert bumped.stdout.split() == ["movies", str(g + 1)]
    assert icache.get_sum(["movies"]) == g + 1


def test_a_rust_handle_and_python_share_entries_and_tokens(use_url, shared_url, rust_peer):
    icache = use_url(shared_url)
    tok = unique("movies")
    # Rust renders and stores a named block; Python is served it (a hit).
    r = run(rust_peer, shared_url, "fragment", "top-list", "<ul>from rust</ul>", tok)
    assert (r.returncode, r.stdout, r.stderr.strip()) == (0, "<ul>from rust</ul>", "rendered")
    calls = []
    body = lambda: calls.append(1) or "<ul>from python</ul>"  # noqa: E731
    assert icache.fragment("top-list", [tok], body) == "<ul>from rust</ul>" and calls == []
    # Python bumps: Rust re-renders. Python renders: Rust is served it.
    icache.incr(tok)
    r = run(rust_peer, shared_url, "fragment", "top-list", "<ul>rust again</ul>", tok)
    assert (r.stdout, r.stderr.strip()) == ("<ul>rust again</ul>", "rendered")
    run(rust_peer, shared_url, "incr", tok)
    assert icache.fragment("top-list", [tok], body) == "<ul>from python</ul>" and calls == [1]
    r = run(rust_peer, shared_url, "fragment", "top-list", "unused", tok)
    assert (r.stdout, r.stderr.strip()) == ("<ul>from python</ul>", "hit")


def test_a_rust_bump_invalidates_a_django_block(use_url, shared_url, rust_peer):
    use_url(shared_url)
    name = unique() + ".html"
    src = "{% load icache %}{% icache 'movies' %}{{ n }}{% endicache %}"
    assert render(src, {"n": 1}, name=name) == "1"
    assert render(src, {"n": 2}, name=name) == "1"
    assert run(rust_peer, shared_url, "incr", "movies").returncode == 0
    assert render(src, {"n": 3}, name=name) == "3"


def test_rust_reads_the_text_python_stored(use_url, shared_url, rust_peer):
    icache = use_url(shared_url)
    v = icache.get_sum(["movies", "users"])
    icache.set_versioned("greeting", "héllo <b>wörld</b>", v)
    r = run(rust_peer, shared_url, "get-versioned", "greeting", "movies", "users")
    assert (r.returncode, r.stdout) == (0, "héllo <b>wörld</b>")
    icache.set_versioned("raw", b"plain bytes", v)
    r = run(rust_peer, shared_url, "get-versioned", "raw", "movies", "users")
    assert (r.returncode, r.stdout) == (0, "plain bytes")
    icache.incr("users")
    r = run(rust_peer, shared_url, "get-versioned", "greeting", "movies", "users")
    assert r.returncode == 4  # outdated for Rust too
