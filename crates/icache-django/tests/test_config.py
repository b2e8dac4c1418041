"""Configuration is Django's: CACHES (alias ICACHE_CACHE), KEY_PREFIX,
ICACHE_URL overriding everything."""

import pytest
from conftest import memcached_command, redis_command, render, unique
from django.conf import settings
from django.core.exceptions import ImproperlyConfigured
from django.test.utils import override_settings

from django_icache import icache
from django_icache.conf import cache_url

LOCMEM = "django.core.cache.backends.locmem.LocMemCache"
REDIS = "django.core.cache.backends.redis.RedisCache"
DJANGO_REDIS = "django_redis.cache.RedisCache"
PYMEMCACHE = "django.core.cache.backends.memcached.PyMemcacheCache"
PYLIBMC = "django.core.cache.backends.memcached.PyLibMCCache"
DUMMY = "django.core.cache.backends.dummy.DummyCache"
DB = "django.core.cache.backends.db.DatabaseCache"
FILE = "django.core.cache.backends.filebased.FileBasedCache"


def url_for(caches, **extra):
    with override_settings(CACHES=caches, **extra):
        return cache_url(settings)


@pytest.mark.parametrize(
    "conf, url",
    [
        ({"BACKEND": LOCMEM}, "memory://"),
        ({"BACKEND": LOCMEM, "LOCATION": "unique-snowflake", "KEY_PREFIX": "shop"}, "memory://?prefix=shop"),
        ({"BACKEND": DUMMY}, "none://"),
        ({"BACKEND": REDIS, "LOCATION": "redis://127.0.0.1:6379"}, "redis://127.0.0.1:6379"),
        ({"BACKEND": REDIS, "LOCATION": "redis://:pw@10.0.0.1:6379/2", "KEY_PREFIX": "a b:c"},
         "redis://:pw@10.0.0.1:6379/2?prefix=a%20b%3Ac"),
        # Several servers: the first (the primary) serves reads and writes.
        ({"BACKEND": REDIS, "LOCATION": ["redis://primary:6379", "redis://replica:6379"]}, "redis://primary:6379"),
        ({"BACKEND": REDIS, "LOCATION": "redis://primary:6379,redis://replica:6379"}, "redis://primary:6379"),
        ({"BACKEND": DJANGO_REDIS, "LOCATION": "redis://127.0.0.1:6379/1", "KEY_PREFIX": "p"},
         "redis://127.0.0.1:6379/1?prefix=p"),
        ({"BACKEND": DJANGO_REDIS, "LOCATION": ["rediss://a:6380/0", "redis://b:6379/0"]}, "rediss://a:6380/0"),
        ({"BACKEND": PYMEMCACHE, "LOCATION": "127.0.0.1:11211"}, "memcached://127.0.0.1:11211"),
        ({"BACKEND": PYMEMCACHE, "LOCATION": ["10.0.0.1:11211", "10.0.0.2:11211"], "KEY_PREFIX": "k"},
         "memcached://10.0.0.1:11211,10.0.0.2:11211?prefix=k"),
        ({"BACKEND": PYLIBMC, "LOCATION": "10.0.0.1:11211;10.0.0.2:11211"}, "memcached://10.0.0.1:11211,10.0.0.2:11211"),
    ],
)
def test_caches_map_to_icache_urls(conf, url):
    assert url_for({"default": conf}) == url


def test_icache_cache_picks_the_alias():
    caches = {"default": {"BACKEND": LOCMEM}, "fragments": {"BACKEND": PYMEMCACHE, "LOCATION": "h:1"}}
    assert url_for(caches, ICACHE_CACHE="fragments") == "memcached://h:1"
    assert url_for(caches) == "memory://"


def test_icache_url_overrides_everything_and_passes_every_option():
    caches = {"default": {"BACKEND": DB, "LOCATION": "cache_table"}}
    url = "redis://127.0.0.1:6379/0?prefix=x&timeout_ms=50&near=tracking"
    assert url_for(caches, ICACHE_URL=url) == url


@pytest.mark.parametrize("backend", [DB, FILE, "myproject.cache.Custom"])
def test_unsupported_backends_are_improperly_configured(backend):
    caches = {"default": {"BACKEND": LOCMEM}, "pages": {"BACKEND": backend, "LOCATION": "/tmp/x"}}
    with override_settings(CACHES=caches, ICACHE_CACHE="pages"):
        with pytest.raises(ImproperlyConfigured) as e:
            icache.incr("movies")
    msg = str(e.value)
    assert "'pages'" in msg and "ICACHE_URL" in msg and backend in msg


def test_a_missing_alias_is_improperly_configured():
    with override_settings(ICACHE_CACHE="nope"):
        with pytest.raises(ImproperlyConfigured, match="'nope'.*ICACHE_URL"):
            icache.get_sum(["movies"])


def test_a_malformed_url_is_improperly_configured_naming_the_part():
    with override_settings(ICACHE_URL="redis://127.0.0.1:notaport"):
        with pytest.raises(ImproperlyConfigured, match="ICACHE_URL.*port"):
            icache.incr("movies")
    with override_settings(ICACHE_URL="memory://?colour=red"):
        with pytest.raises(ImproperlyConfigured, match="colour"):
            icache.incr("movies")


def test_the_handle_is_lazy_and_follows_setting_changes(redis_server, memcached_server):
    import django_icache

    fresh = django_icache.ICache()
    assert fresh._handle is None  # nothing opened at import or construction
    assert "not opened" in repr(fresh)
    with override_settings(CACHES={"default": {"BACKEND": DUMMY}}):
        assert icache.backend == "none"
        with override_settings(CACHES={"default": {"BACKEND": REDIS, "LOCATION": redis_server.url()}}):
            assert icache.backend == "redis"
            with override_settings(ICACHE_URL=memcached_server.url()):
                assert icache.backend == "memcached"
            assert icache.backend == "redis"
        assert icache.backend == "none"


def test_dummy_cache_turns_caching_off():
    with override_settings(CACHES={"default": {"BACKEND": DUMMY}}):
        name = unique() + ".html"
        src = "{% load icache %}{% icache 'off' %}{{ v }}{% endicache %}"
        assert render(src, {"v": 1}, name=name) == "1"
        assert render(src, {"v": 2}, name=name) == "2"


def test_django_redis_settings_reach_the_server_with_the_key_prefix(redis_server):
    prefix = unique("site")
    for backend in (REDIS, DJANGO_REDIS):
        caches = {"default": {"BACKEND": backend, "LOCATION": [redis_server.url(), "redis://127.0.0.1:1"],
                              "KEY_PREFIX": prefix}}
        with override_settings(CACHES=caches):
            g = icache.incr("movies")
            stored = redis_command(redis_server, "GET", f"{prefix}:ic:g:movies")
            assert stored is not None and int(stored) == g


def test_memcached_settings_reach_the_pool_with_the_key_prefix(memcached_server):
    prefix = unique("site")
    for backend in (PYMEMCACHE, PYLIBMC):
        caches = {"default": {"BACKEND": backend, "LOCATION": [memcached_server.address], "KEY_PREFIX": prefix}}
        with override_settings(CACHES=caches):
            g = icache.incr("movies")
            got = memcached_command(memcached_server, f"get {prefix}:ic:g:movies")
            assert f"\r\n{g}\r\n" in got, got


def test_a_memcached_location_list_is_a_live_pool(memcached_server, memcached_server_2):
    """A LOCATION list becomes a pool: tokens spread over both servers, and
    bumps and sums go to the server each token lives on."""
    servers = (memcached_server, memcached_server_2)
    caches = {"default": {"BACKEND": PYMEMCACHE, "LOCATION": [s.address for s in servers],
                          "KEY_PREFIX": unique("pool")}}

    def items(server):
        stats = memcached_command(server, "stats")
        return int(stats.split("STAT curr_items ")[1].split()[0])

    before = [items(s) for s in servers]
    with override_settings(CACHES=caches):
        tokens = [f"t{i}" for i in range(32)]
        gens = icache.incr_many(tokens)
        assert icache.get_sum(tokens) == sum(gens) % 2**64  # the wrapping sum
        assert icache.incr("t0") == gens[0] + 1
    grew = [items(s) - b for s, b in zip(servers, before)]
    assert all(n > 0 for n in grew) and sum(grew) >= len(tokens), grew


def test_values_str_bytes_and_pickled(redis_server, memcached_server):
    """str and bytes as they are; anything else pickled, as Django's cache does."""
    for url in ("memory://", redis_server.url(unique("v")), memcached_server.url(unique("v"))):
        with override_settings(ICACHE_URL=url):
            v = icache.get_sum(["movies"])
            cases = [
                "héllo <b>",
                "",
                b"\x00\xffraw",
                b"\xffiCpyp not a pickle",  # looks like our marker: still bytes
                b"\xffiCpyb",
                {"a": [1, 2.5, None], "b": ("t",)},
                42,
                None,
            ]
            for i, value in enumerate(cases):
                icache.set_versioned(f"k{i}", value, v)
                got = icache.get_versioned(f"k{i}", v)
                assert got == value and type(got) is type(value), (url, value, got)
                assert icache.get_versioned(f"k{i}", v + 1) is None


@pytest.mark.skipif(not hasattr(__import__("os"), "fork"), reason="needs fork")
def test_a_forked_worker_opens_its_own_handle(redis_server):
    import os

    with override_settings(ICACHE_URL=redis_server.url(unique("fork"))):
        parent = icache.handle
        icache.incr("movies")
        r, w = os.pipe()
        pid = os.fork()
        if pid == 0:  # the child: a fresh handle, and it works
            ok = icache._handle is None and icache.handle is not parent and icache.incr("movies") > 0
            os.write(w, b"1" if ok else b"0")
            os._exit(0)
        os.close(w)
        assert os.read(r, 1) == b"1"
        os.waitpid(pid, 0)
        assert icache.handle is parent
