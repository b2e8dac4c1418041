"""Issue 19: operating django_icache the Django way: `manage.py icache
bump|version|flush|stats`, `CacheError` with a readable message and `.kind`,
block names in log lines as template:line, the package's typing and metadata."""

import io
import re
from pathlib import Path

import pytest
from conftest import HERE, Counter, free_port, render, unique
from django.core.management import call_command
from django.core.management.base import CommandError

import django_icache
from django_icache import CacheError


def run(*args) -> str:
    out = io.StringIO()
    call_command("icache", *args, stdout=out)
    return out.getvalue()


def test_bump_and_version(use_url, backend_url):
    icache = use_url(backend_url)
    a, b = unique("a"), unique("b")
    lines = run("bump", a, b).split()
    assert lines[0] == a and lines[2] == b
    ga, gb = int(lines[1]), int(lines[3])
    assert icache.handle.generations([a, b]) == [ga, gb]
    out = run("version", a, b)
    assert f"{a} {ga}" in out and f"sum {icache.get_sum([a, b])}" in out
    # The typed forms are tokens like any other: the anonymous visitor's.
    assert run("bump", "icache:none").startswith("icache:none ")


def test_bump_invalidates_a_block(use_url, backend_url):
    use_url(backend_url)
    tok = unique("tok")
    name = unique() + ".html"
    c = Counter()
    src = "{% load icache %}{% icache tok %}{{ c.tick }}x{% endicache %}"
    render(src, {"tok": tok, "c": c}, name=name)
    render(src, {"tok": tok, "c": c}, name=name)
    run("bump", tok)
    render(src, {"tok": tok, "c": c}, name=name)
    assert c.n == 2


def test_flush_makes_every_block_miss_once(use_url, backend_url):
    use_url(backend_url)
    c = Counter()
    names = [unique() + ".html" for _ in range(2)]
    src = "{% load icache %}{% icache 'movies' %}{{ c.tick }}x{% endicache %}"
    for _ in range(2):
        for n in names:
            render(src, {"c": c}, name=n)
    assert c.n == 2
    assert "flushed" in run("flush")
    for _ in range(2):
        for n in names:
            render(src, {"c": c}, name=n)
    assert c.n == 4


def test_stats_shows_the_backends_counters(use_url, redis_server):
    use_url(redis_server.url(unique("p")))
    out = run("stats")
    assert "backend redis" in out and "used_memory" in out and "process.hits " in out


def test_a_subcommand_is_required():
    with pytest.raises(CommandError):
        call_command("icache")


def test_cache_error_is_readable_and_has_a_kind(use_url):
    icache = use_url(f"redis://127.0.0.1:{free_port()}/0?timeout_ms=200&connect_timeout_ms=200")
    with pytest.raises(CacheError) as e:
        icache.get_sum(["movies", "user:1"])
    assert str(e.value).startswith("get_sum(['movies', 'user:1']): ") or str(e.value).startswith('get_sum(["movies", "user:1"]): ')
    assert e.value.kind in ("unavailable", "timeout")
    assert "(" not in str(e.value)[:4]
    with pytest.raises(CacheError) as e:
        icache.incr("movies", raise_errors=True)  # by default logged, not raised (test_transactions.py)
    assert str(e.value).startswith('incr("movies"): ')
    with pytest.raises(CommandError, match="icache bump: incr_many"):
        run("bump", "movies")


def test_log_lines_name_blocks_as_template_and_line(use_url, memcached_server, caplog):
    """The core's own warnings (here: an entry too large for memcached) show
    the block as template:line, with no raw separator bytes."""
    use_url(memcached_server.url(unique("p")))
    name = unique("big") + ".html"
    with caplog.at_level("WARNING", logger="django_icache"):
        out = render("{% load icache %}\n\n{% icache 'big' %}{{ v }}{% endicache %}", {"v": "x" * (2 << 20)}, name=name)
        django_icache.flush_log()
    assert len(out) == (2 << 20) + 2
    lines = [r.getMessage() for r in caplog.records]
    assert any(f"{name}:3" in m for m in lines), lines
    assert not any("\x1f" in m for m in lines)


def test_package_ships_types_and_metadata():
    pkg = Path(django_icache.__file__).parent
    assert (pkg / "py.typed").exists() and (pkg / "_core.pyi").exists()
    # (tomllib is Python >= 3.11; the package supports 3.10.)
    meta = (HERE.parent / "pyproject.toml").read_text()
    assert re.search(r'^readme = "README.md"$', meta, re.M) and (HERE.parent / "README.md").exists()
    for url in ("Homepage", "Source", "Issues"):
        assert re.search(rf"^{url} = \"https://", meta, re.M), url
    assert '"Framework :: Django"' in meta and '"Typing :: Typed"' in meta
