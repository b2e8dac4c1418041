"""Issue 21, Django: ``django_icache.middleware.ICacheMiddleware`` through the
test client: ETag and surrogate keys from the tokens the page's blocks read
(nested ones too, also when the outer block is a hit), 304 before the view
from the manifest, nothing for pages that are not the same for every
request, and the purge of every bump (``ICACHE_PURGE_URL``) sent to a local
server that records it as Varnish would receive it."""

from __future__ import annotations

import time

import pytest
from conftest import TEMPLATES, client_for, unique
from edge_support import proxy, purged  # noqa: F401 - the fixture
from django.conf import settings
from django.db import transaction
from django.test import Client
from django.test.utils import override_settings
from movieapp.views import CALLS

from django_icache import FLUSH_TOKEN
from django_icache._core import surrogate_key
from django_icache.middleware import pages

MW = "django_icache.middleware.ICacheMiddleware"


@pytest.fixture
def site(use_url, backend_url):
    # use_url's override first: overrides must end in the reverse order.
    icache = use_url(backend_url)
    with override_settings(MIDDLEWARE=[MW, *settings.MIDDLEWARE]):
        yield icache


def page(source: str) -> str:
    name = unique("page") + ".html"
    TEMPLATES[name] = "{% load icache %}" + source
    return name


def keys_of(response) -> set[str]:
    return set(response.headers.get("Surrogate-Key", "").split())


def test_a_page_of_blocks_gets_an_etag_and_surrogate_keys(site):
    movies, top = unique("movies"), unique("top")
    name = page(f"<h1>Movies</h1>{{% icache '{movies}' %}}<ul>list</ul>{{% endicache %}}"
                f"{{% icache '{top}' %}}<p>top</p>{{% endicache %}}")
    r = Client().get(f"/page/{name}")
    assert r.status_code == 200
    assert r.headers["ETag"].startswith('W/"'), r.headers
    # And the flush token's, on every tagged page: icache.flush() purges them all.
    assert keys_of(r) == {surrogate_key(movies), surrogate_key(top), surrogate_key(FLUSH_TOKEN)}
    assert r.headers["Cache-Control"] == "no-cache"


def test_304_before_the_view_until_a_token_the_page_read_moves(site):
    movies, other = unique("movies"), unique("other")
    name = page(f"{{% icache '{movies}' %}}<ul>list</ul>{{% endicache %}}")
    c = Client()
    first = c.get(f"/page/{name}")
    etag = first.headers["ETag"]
    calls = CALLS[name]

    again = c.get(f"/page/{name}", headers={"If-None-Match": etag})
    assert again.status_code == 304
    assert CALLS[name] == calls, "the view ran for a 304"
    assert again.headers["ETag"] == etag
    assert again.headers["Cache-Control"] == first.headers["Cache-Control"]
    assert again.content == b""

    site.incr(other)  # a token the page did not read
    assert c.get(f"/page/{name}", headers={"If-None-Match": etag}).status_code == 304
    assert CALLS[name] == calls

    site.incr(movies)
    fresh = c.get(f"/page/{name}", headers={"If-None-Match": etag})
    assert fresh.status_code == 200
    assert CALLS[name] == calls + 1
    assert fresh.headers["ETag"] != etag
    # The new tag validates again, before the view.
    assert c.get(f"/page/{name}", headers={"If-None-Match": fresh.headers["ETag"]}).status_code == 304
    assert CALLS[name] == calls + 1
    assert site.handle  # the same handle served all of it


def test_head_behaves_like_get(site):
    movies = unique("movies")
    name = page(f"{{% icache '{movies}' %}}<ul>list</ul>{{% endicache %}}")
    c = Client()
    head = c.head(f"/page/{name}")
    assert head.status_code == 200 and head.headers["ETag"].startswith('W/"')
    calls = CALLS[name]
    assert c.head(f"/page/{name}", headers={"If-None-Match": head.headers["ETag"]}).status_code == 304
    assert c.get(f"/page/{name}", headers={"If-None-Match": head.headers["ETag"]}).status_code == 304
    assert CALLS[name] == calls


def test_an_outer_hit_still_names_the_inner_tokens(site):
    """Python sees only the outer block when it hits; the core's reads say
    which inner tokens its output came from, so bumping one of them makes
    the page's tag stale."""
    outer, inner = unique("outer"), unique("inner")
    name = page(f"{{% icache '{outer}' %}}<o>{{% icache '{inner}' %}}<i/>{{% endicache %}}</o>{{% endicache %}}")
    c = Client()
    c.get(f"/page/{name}")  # miss: both stored
    hit = c.get(f"/page/{name}")  # the outer block is a hit
    assert keys_of(hit) == {surrogate_key(outer), surrogate_key(inner), surrogate_key(FLUSH_TOKEN)}
    etag = hit.headers["ETag"]
    assert c.get(f"/page/{name}", headers={"If-None-Match": etag}).status_code == 304
    site.incr(inner)
    assert c.get(f"/page/{name}", headers={"If-None-Match": etag}).status_code == 200


def test_a_stale_tag_gets_200_and_the_new_tag(site):
    movies = unique("movies")
    name = page(f"{{% icache '{movies}' %}}<ul>list</ul>{{% endicache %}}")
    c = Client()
    old = c.get(f"/page/{name}").headers["ETag"]
    site.incr(movies)
    r = c.get(f"/page/{name}", headers={"If-None-Match": old})
    assert r.status_code == 200 and r.headers["ETag"] != old and b"list" in r.content
    assert c.get(f"/page/{name}", headers={"If-None-Match": 'W/"not-a-tag"'}).status_code == 200


@pytest.mark.parametrize(
    "url, source",
    [
        ("cookie", "{% icache 't' %}<p/>{% endicache %}"),  # Set-Cookie
        ("never", "{% icache 't' %}<p/>{% endicache %}"),  # @never_cache: private, no-store
        ("page", "{% icache 't' %}<form>{% csrf_token %}</form>{% endicache %}"),  # a hole per request
        ("page", "{% icache 't' %}<p/>{% endicache %}{% csrf_token %}"),  # CSRF cookie renewed
        ("page", "{% icache 't' %}<p/>{% nocache %}{{ request.path }}{% endnocache %}{% endicache %}"),
        ("page", "{% icache undefined_name %}<p/>{% endicache %}"),  # rendered uncached
        ("page", "<p>no blocks at all</p>"),
    ],
)
def test_pages_that_are_not_the_same_for_every_request_get_no_tag_nor_manifest(site, url, source):
    name = page(source.replace("'t'", f"'{unique('t')}'"))
    c = Client()
    r = c.get(f"/{url}/{name}")
    assert r.status_code == 200
    assert "ETag" not in r.headers and "Surrogate-Key" not in r.headers, r.headers
    calls, before = CALLS[name], pages().stats()
    # No manifest either: a revalidation finds none, and runs the view.
    c.get(f"/{url}/{name}", headers={"If-None-Match": 'W/"anything"'})
    after = pages().stats()
    assert CALLS[name] == calls + 1
    assert after["manifest_hits"] == before["manifest_hits"], "a manifest was kept"
    assert after["manifest_misses"] == before["manifest_misses"] + 1


def test_a_page_for_one_user_is_never_a_304_for_another(site):
    name = page("{% icache 'profile' user.id %}<p>{{ user.username }}</p>{% endicache %}")
    ann, bob = client_for(unique("ann")), client_for(unique("bob"))
    a = ann.get(f"/page/{name}")
    assert "Cookie" in a.headers.get("Vary", ""), a.headers
    assert ann.get(f"/page/{name}", headers={"If-None-Match": a.headers["ETag"]}).status_code == 304
    # Bob presents Ann's tag: his page is another page.
    b = bob.get(f"/page/{name}", headers={"If-None-Match": a.headers["ETag"]})
    assert b.status_code == 200 and bob.session.get("_auth_user_id") != ann.session.get("_auth_user_id")
    assert b.headers["ETag"] != a.headers["ETag"]


def test_python_fragments_are_part_of_the_page(site):
    from django.http import HttpResponse

    from django_icache.middleware import ICacheMiddleware

    token = unique("py")
    calls = []

    def view(request):
        calls.append(1)
        return HttpResponse(site.fragment("py-block", [token], lambda: "<b>py</b>"))

    mw = ICacheMiddleware(view)
    from django.test import RequestFactory

    r = mw(RequestFactory().get("/py"))
    assert keys_of(r) == {surrogate_key(token), surrogate_key(FLUSH_TOKEN)}
    assert mw(RequestFactory().get("/py", headers={"If-None-Match": r.headers["ETag"]})).status_code == 304
    assert len(calls) == 1


def test_a_view_that_shows_a_fallback_for_a_failed_block_is_not_tagged(site):
    from django.http import HttpResponse
    from django.test import RequestFactory

    from django_icache.middleware import ICacheMiddleware

    ok, broken = unique("ok"), unique("broken")

    def fail():
        raise RuntimeError("the database is down")

    def view(request):
        try:
            part = site.fragment("list", [broken], fail)
        except RuntimeError:
            part = "<p>no list right now</p>"
        return HttpResponse(site.fragment("top", [ok], lambda: "<ol/>") + part)

    r = ICacheMiddleware(view)(RequestFactory().get("/fallback"))
    assert r.status_code == 200 and "ETag" not in r.headers, r.headers


def test_another_language_is_another_page(site):
    movies = unique("movies")
    name = page(f"{{% icache '{movies}' %}}<p>list</p>{{% endicache %}}")
    c = Client()
    en = c.get(f"/page/{name}", headers={"Accept-Language": "en"})
    etag = en.headers["ETag"]
    assert c.get(f"/page/{name}", headers={"Accept-Language": "en", "If-None-Match": etag}).status_code == 304
    # The same tag, another language (by cookie: nothing the page varies on).
    c.cookies[settings.LANGUAGE_COOKIE_NAME] = "de"
    de = c.get(f"/page/{name}", headers={"Accept-Language": "en", "If-None-Match": etag})
    assert de.status_code == 200 and de.headers["ETag"] != etag


def test_a_request_with_flash_messages_in_its_cookie_runs_the_view(site):
    movies = unique("movies")
    name = page(f"{{% icache '{movies}' %}}<p>list</p>{{% endicache %}}")
    c = Client()
    etag = c.get(f"/page/{name}").headers["ETag"]
    calls = CALLS[name]
    c.cookies["messages"] = "pending"
    c.get(f"/page/{name}", headers={"If-None-Match": etag})
    assert CALLS[name] == calls + 1, "answered from the manifest: the messages would wait"


def test_bad_settings_are_named(site):
    from django.core.exceptions import ImproperlyConfigured

    from django_icache.edge import check_edge_settings

    name = page("{% icache 'x' %}<p/>{% endicache %}")
    with override_settings(ICACHE_SURROGATE_HEADER="X-Keys"):
        with pytest.raises(ImproperlyConfigured, match="ICACHE_SURROGATE_HEADER"):
            Client().get(f"/page/{name}")
        assert [e.id for e in check_edge_settings()] == ["django_icache.E020"]
    with override_settings(ICACHE_PURGE_URL="cloudflare://zone?token=t"):
        errors = check_edge_settings()
        assert [e.id for e in errors] == ["django_icache.E020"] and "Cache-Tag" in errors[0].msg
    with override_settings(ICACHE_PURGE_URL="cloudflare://zone?token=t", ICACHE_SURROGATE_HEADER="Cache-Tag"):
        assert check_edge_settings() == []
    with override_settings(ICACHE_PURGE_URL="http://127.0.0.1:1", ICACHE_PURGE_TIMEOUT=-1):
        errors = check_edge_settings()
        assert [e.id for e in errors] == ["django_icache.E020"] and "ICACHE_PURGE_TIMEOUT" in errors[0].msg
    with override_settings(ICACHE_PURGE_URL="gopher://proxy"):
        errors = check_edge_settings()
        assert [e.id for e in errors] == ["django_icache.E020"] and "ICACHE_PURGE_URL" in errors[0].msg
    later = [m for m in settings.MIDDLEWARE if m != MW] + [MW]
    with override_settings(MIDDLEWARE=later):
        assert [e.id for e in check_edge_settings()] == ["django_icache.W020"], later


def test_xkey_header_and_budget(site):
    tokens = [unique("k") for _ in range(3)]
    name = page("".join(f"{{% icache '{t}' %}}<p/>{{% endicache %}}" for t in tokens))
    with override_settings(ICACHE_SURROGATE_HEADER="xkey"):
        r = Client().get(f"/page/{name}")
        assert set(r.headers["xkey"].split()) == {surrogate_key(t) for t in [*tokens, FLUSH_TOKEN]}
    with override_settings(ICACHE_SURROGATE_BUDGET=30):
        r = Client().get(f"/page/{name}")
        # Over budget: no shared cache may keep it (fewer keys would let a
        # proxy keep it past a bump).
        assert r.headers["Cache-Control"] == "private, no-cache" and "Surrogate-Key" not in r.headers


# ---- purges -------------------------------------------------------------------------


def test_every_bump_purges_its_pages_keys(site, proxy):
    movies, user = unique("movies"), unique("user")
    site.incr(movies)
    assert purged(proxy) == {surrogate_key(movies)}
    site.incr_many([user, movies])
    assert {surrogate_key(user), surrogate_key(movies)} <= purged(proxy)


def test_a_bump_in_a_transaction_purges_after_the_commit(site, proxy):
    movies = unique("movies")
    with transaction.atomic():
        site.incr(movies)
        assert purged(proxy) == set(), "purged before the commit"
    assert purged(proxy) == {surrogate_key(movies)}
    with pytest.raises(ZeroDivisionError):
        with transaction.atomic():
            site.incr(unique("rolled-back"))
            1 / 0
    assert purged(proxy) == {surrogate_key(movies)}, "a rolled-back bump purged"


def test_a_refused_purge_is_logged_and_sent_with_the_next(site, proxy, caplog):
    from django_icache import edge

    proxy.status = 503
    edge._warned.reset()  # the warning is limited to one every 10 s
    first = unique("first")
    assert site.incr(first) is not None, "the bump itself must not fail"
    assert any("not purged" in r.getMessage() for r in caplog.records)
    assert edge.purger().pending >= 1
    proxy.status = 200
    proxy.seen.clear()
    second = unique("second")
    site.incr(second)
    assert {surrogate_key(first), surrogate_key(second)} <= purged(proxy)
    assert edge.purger().pending == 0


def test_flush_purges_every_tagged_page(site, proxy):
    site.flush()
    assert purged(proxy) == {surrogate_key(FLUSH_TOKEN)}


def test_manage_py_icache_bump_and_flush_purge(site, proxy):
    import io

    from django.core.management import CommandError, call_command

    token = unique("cmd")
    call_command("icache", "bump", token, stdout=io.StringIO())
    assert surrogate_key(token) in purged(proxy)
    call_command("icache", "flush", stdout=io.StringIO())
    assert surrogate_key(FLUSH_TOKEN) in purged(proxy)
    proxy.status = 503
    with pytest.raises(CommandError, match="not purged"):
        call_command("icache", "bump", unique("cmd"), stdout=io.StringIO())


def test_a_failed_bump_purges_now_and_again_after_the_replay(site, proxy, caplog):
    from conftest import free_port

    from django_icache import ICache, edge

    from outbox_support import PersistentRedis, wait_for

    redis = PersistentRedis()
    try:
        url = redis.url(unique("down"))
        handle = ICache(url)
        handle.incr("warm")
        redis.kill()
        token = unique("down")
        assert handle.incr(token) is None  # failed, logged, replayed later by the core
        assert surrogate_key(token) in purged(proxy), "the proxy's old pages were not purged"
        proxy.seen.clear()
        time.sleep(1.2)
        # Not again before the replay: another process could still render
        # the old page and the proxy keep it.
        assert surrogate_key(token) not in purged(proxy)
        redis.start()
        wait_for(lambda: _reads(handle), 10, "the handle's replay")
        wait_for(lambda: surrogate_key(token) in purged(proxy), 10, "the purge after the replay")
    finally:
        redis.stop()
    assert edge.purger() is not None


def _reads(handle) -> bool:
    from django_icache import CacheError

    try:
        handle.get_sum(["x"])
        return True
    except CacheError:
        return False
