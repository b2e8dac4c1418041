"""Issue 19, cases 6 and 7: tokens never go through str(), and stored bytes
are data, never code."""

import pickle
import subprocess

import pytest
from conftest import Counter, client_for, render, unique
from django.db import connection

from django_icache import token
from movieapp.models import Film


@pytest.fixture
def films(use_url, backend_url):
    icache = use_url(backend_url)
    with connection.schema_editor() as editor:
        editor.create_model(Film)
    yield icache
    with connection.schema_editor() as editor:
        editor.delete_model(Film)


def test_two_models_with_the_same_str_are_two_tokens(films):
    a = Film.objects.create(title="Solaris", rating=5)
    b = Film.objects.create(title="Solaris", rating=2)
    assert str(a) == str(b)
    assert token(a) == f"movieapp.film:{a.pk}" != token(b)
    name = unique() + ".html"
    src = "{% load icache %}{% icache film %}{{ film.title }}: {{ film.rating }}{% endicache %}"
    assert render(src, {"film": a}, name=name) == "Solaris: 5"
    assert render(src, {"film": b}, name=name) == "Solaris: 2"
    # Bumping one film's token leaves the other's entry alone.
    c = Counter()
    src2 = "{% load icache %}{% icache film %}{{ c.tick }}{{ film.rating }}{% endicache %}"
    name2 = unique() + ".html"
    render(src2, {"film": a, "c": c}, name=name2)
    render(src2, {"film": b, "c": c}, name=name2)
    films.incr(a)
    assert render(src2, {"film": b, "c": c}, name=name2) == "2" and c.n == 2
    a.rating = 4
    assert render(src2, {"film": a, "c": c}, name=name2) == "4" and c.n == 3


def test_none_is_a_token_of_its_own_and_the_anonymous_page_is_one_entry(use_url, backend_url, caplog):
    from conftest import TEMPLATES

    icache = use_url(backend_url)
    page = unique("anon") + ".html"
    TEMPLATES[page] = "{% load icache %}{% icache 'movies' user.id %}{{ c.tick }}<p>{{ user.username }}</p>{% endicache %}"
    assert token(None) == "icache:none" != token("None")
    before = icache.stats()
    with caplog.at_level("WARNING", logger="django_icache"):
        for _ in range(3):
            assert client_for(None).get(f"/page/{page}").status_code == 200
    after = icache.stats()
    assert after["misses"] - before["misses"] == 1
    assert after["hits"] - before["hits"] == 2
    assert not [r for r in caplog.records if "undefined" in r.getMessage()]
    # A logged-in user's block is another entry.
    ann = unique("ann")
    assert ann in client_for(ann).get(f"/page/{page}").content.decode()


def test_token_forms_are_unambiguous():
    import datetime
    import decimal
    import uuid

    values = [
        "x", 1, True, None, 1.5, decimal.Decimal("1.5"), b"x", uuid.UUID(int=1),
        datetime.date(2026, 12, 1), "icache-ok",
    ]
    forms = [token(v) for v in values]
    assert len(set(forms)) == len(forms), forms
    assert token(42) == token("42") == "42"
    with pytest.raises(TypeError, match="reserved"):
        token("icache:none")
    with pytest.raises(TypeError, match="has no token form"):
        token(object())

    class Tagged:
        def __icache_token__(self):
            return "tag:7"

    assert token(Tagged()) == "tag:7"
    with pytest.raises(TypeError, match=r"html:1: token v: a builtins.object has no token form"):
        render("{% load icache %}{% icache v %}x{% endicache %}", {"v": object()})


def test_bytes_stored_from_rust_are_bytes_whatever_they_start_with(use_url, redis_server, memcached_server, rust_peer):
    """A Rust service's set_versioned_bytes of bytes that look like a pickle
    (with django_icache's old marker, or a raw pickle) comes back as bytes:
    nothing is unpickled, so nothing runs."""

    class Boom:
        def __reduce__(self):
            return (exec, ("raise SystemExit('unpickled attacker bytes')",))

    evil = pickle.dumps(Boom())
    for server in (redis_server, memcached_server):
        url = server.url(unique("p"))
        icache = use_url(url)
        tok = unique("tok")
        for payload in (b"\xffiCpyp" + evil, evil):
            key = unique("k")
            subprocess.run([str(rust_peer), url, "set-versioned-bytes", key, payload.hex(), tok], check=True)
            got = icache.get_versioned(key, icache.get_sum([tok]))
            assert got == payload and isinstance(got, bytes)
        # What Python pickles itself still round-trips (the header says so).
        key = unique("k")
        icache.set_versioned(key, {"a": [1, 2]}, 7)
        assert icache.get_versioned(key, 7) == {"a": [1, 2]}
        icache.set_versioned(key, b"\xffiCpyp" + evil, 8)
        assert icache.get_versioned(key, 8) == b"\xffiCpyp" + evil
