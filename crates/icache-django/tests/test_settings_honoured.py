"""Issue 19, case 4: Django's cache settings are honoured or refused, never
dropped: OPTIONS (db, password, username, timeouts), VERSION, KEY_FUNCTION,
LOCATION lists, unix:// sockets, subclasses, and `manage.py check`."""

import os
import shutil
import socket
import subprocess
import tempfile

import pytest
from conftest import (
    TEMPLATES, Server, free_port, missing, render_named, unique, wait_port, _resp,
)
from django.core.exceptions import ImproperlyConfigured
from django.core.management import call_command
from django.core.management.base import SystemCheckError
from django.test.utils import override_settings

from django_icache import icache
from django_icache.checks import check_icache_settings

REDIS = "django.core.cache.backends.redis.RedisCache"
DJANGO_REDIS = "django_redis.cache.RedisCache"
PYMEMCACHE = "django.core.cache.backends.memcached.PyMemcacheCache"
LOCMEM = "django.core.cache.backends.locmem.LocMemCache"


def start_redis(*extra: str, unix: str | None = None) -> Server:
    program = shutil.which("redis-server")
    if program is None:
        missing("redis-server")
    for _ in range(5):
        port = free_port()
        tmp = tempfile.mkdtemp(prefix="icache-django-redis-")
        args = [program, "--port", str(port), "--bind", "127.0.0.1", "--save", "", "--appendonly", "no",
                "--dir", tmp, *extra]
        if unix:
            args += ["--unixsocket", os.path.join(tmp, unix), "--unixsocketperm", "700"]
        log = open(os.path.join(tmp, "stdio.log"), "wb")
        proc = subprocess.Popen(args, stdout=log, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL)
        if wait_port(port, proc, "redis"):
            return Server("redis", port, proc, tmp)
        proc.kill()
        proc.wait()
        shutil.rmtree(tmp, ignore_errors=True)
    pytest.fail("redis-server did not come up")


def redis_on(server: Server, *commands: tuple[str, ...], auth: tuple[str, ...] = ()):
    """Several RESP commands on one connection; the last reply."""
    with socket.create_connection(("127.0.0.1", server.port), timeout=2) as s:
        f = s.makefile("rb")
        reply = None
        for args in ([("AUTH", *auth)] if auth else []) + list(commands):
            out = f"*{len(args)}\r\n".encode()
            for a in args:
                b = str(a).encode()
                out += b"$%d\r\n%s\r\n" % (len(b), b)
            s.sendall(out)
            reply = _resp(f)
        return reply


@pytest.fixture
def private_page():
    page = unique("private") + ".html"
    TEMPLATES[page] = "{% load icache %}{% icache 'private-list' %}<ul>{{ secret }}</ul>{% endicache %}"
    return page


def test_two_tenants_on_two_redis_databases_share_nothing(redis_server, private_page):
    prefix = unique("p")
    outs = []
    for db, secret in ((1, "tenant A private list"), (2, "tenant B private list")):
        caches = {"default": {"BACKEND": REDIS, "LOCATION": f"redis://127.0.0.1:{redis_server.port}",
                              "KEY_PREFIX": prefix, "OPTIONS": {"db": db}}}
        with override_settings(CACHES=caches):
            outs.append(render_named(private_page, {"secret": secret}))
            outs.append(render_named(private_page, {"secret": "changed"}))
    assert outs == ["<ul>tenant A private list</ul>"] * 2 + ["<ul>tenant B private list</ul>"] * 2
    for db in (1, 2):
        keys = redis_on(redis_server, ("SELECT", str(db)), ("KEYS", f"{prefix}*"))
        assert keys, f"nothing stored in database {db}"
    assert not redis_on(redis_server, ("SELECT", "0"), ("KEYS", f"{prefix}*"))


@pytest.fixture(scope="module")
def redis_with_password():
    s = start_redis("--requirepass", "s3cret", "--user", "alice", "on", ">alicepw", "~*", "&*", "+@all")
    yield s
    s.stop()


@pytest.mark.parametrize("backend, options", [
    (DJANGO_REDIS, {"PASSWORD": "s3cret"}),
    (DJANGO_REDIS, {"CONNECTION_POOL_KWARGS": {"password": "s3cret"}, "SOCKET_TIMEOUT": 2}),
    (REDIS, {"password": "s3cret", "socket_connect_timeout": 1.5}),
    (REDIS, {"username": "alice", "password": "alicepw"}),
])
def test_redis_password_and_username_options_are_used(redis_with_password, private_page, backend, options):
    caches = {"default": {"BACKEND": backend, "LOCATION": f"redis://127.0.0.1:{redis_with_password.port}/0",
                          "KEY_PREFIX": unique("p"), "OPTIONS": options}}
    with override_settings(CACHES=caches):
        before = icache.stats()
        assert render_named(private_page, {"secret": "one"}) == "<ul>one</ul>"
        assert render_named(private_page, {"secret": "two"}) == "<ul>one</ul>"
        after = icache.stats()
        assert after["errors"] == before["errors"], "the block was not cached: the password was dropped"
        assert after["stores"] - before["stores"] == 1 and after["hits"] - before["hits"] == 1
        assert "s3cret" not in icache.url and "alicepw" not in icache.url


def test_version_is_a_cache_of_its_own(redis_server, private_page):
    prefix = unique("p")
    outs = []
    for version in (1, 2, 1):
        caches = {"default": {"BACKEND": REDIS, "LOCATION": redis_server.url(), "KEY_PREFIX": prefix,
                              "VERSION": version}}
        with override_settings(CACHES=caches):
            outs.append(render_named(private_page, {"secret": f"v{version}"}))
    assert outs == ["<ul>v1</ul>", "<ul>v2</ul>", "<ul>v1</ul>"]


def test_key_function_is_a_clear_error():
    caches = {"default": {"BACKEND": REDIS, "LOCATION": "redis://127.0.0.1:6379", "KEY_FUNCTION": "x.make_key"}}
    with override_settings(CACHES=caches):
        with pytest.raises(ImproperlyConfigured, match="KEY_FUNCTION.*icache.*its keys are its own"):
            icache.incr("movies")
        ids = [m.id for m in check_icache_settings()]
        assert "django_icache.E003" in ids


def test_a_subclass_of_a_supported_backend_is_supported(redis_server, private_page):
    caches = {"default": {"BACKEND": "movieapp.backends.SiteRedisCache", "LOCATION": redis_server.url(),
                          "KEY_PREFIX": unique("p")}}
    with override_settings(CACHES=caches):
        assert icache.backend == "redis"
        assert render_named(private_page, {"secret": "x"}) == "<ul>x</ul>"
        assert render_named(private_page, {"secret": "y"}) == "<ul>x</ul>"


@pytest.fixture(scope="module")
def redis_on_a_socket():
    s = start_redis(unix="redis.sock")
    yield s, os.path.join(s.tmp, "redis.sock")
    s.stop()


def test_a_unix_socket_location_is_used(redis_on_a_socket, private_page):
    server, path = redis_on_a_socket
    prefix = unique("p")
    caches = {"default": {"BACKEND": REDIS, "LOCATION": f"unix://{path}?db=3", "KEY_PREFIX": prefix}}
    with override_settings(CACHES=caches):
        assert icache.url.startswith("redis+unix://")
        assert render_named(private_page, {"secret": "over the socket"}) == "<ul>over the socket</ul>"
        assert render_named(private_page, {"secret": "y"}) == "<ul>over the socket</ul>"
    assert redis_on(server, ("SELECT", "3"), ("KEYS", f"{prefix}*"))


def test_options_that_cannot_be_honoured_are_refused_and_checked():
    bad = [
        {"BACKEND": REDIS, "LOCATION": "redis://h:1", "OPTIONS": {"ssl_certfile": "/c.pem"}},
        {"BACKEND": DJANGO_REDIS, "LOCATION": "redis://h:1", "OPTIONS": {"CLIENT_CLASS": "django_redis.client.ShardClient"}},
        {"BACKEND": PYMEMCACHE, "LOCATION": "h:1", "OPTIONS": {"username": "u", "password": "p"}},
        {"BACKEND": PYMEMCACHE, "LOCATION": "unix:/tmp/memcached.sock"},
        {"BACKEND": REDIS, "LOCATION": "redis://h:1/1", "OPTIONS": {"db": 2}},
    ]
    for conf in bad:
        with override_settings(CACHES={"default": conf}):
            with pytest.raises(ImproperlyConfigured, match="CACHES\\['default'\\]"):
                icache.incr("movies")
            ids = [m.id for m in check_icache_settings()]
            assert "django_icache.E002" in ids, (conf, ids)


def test_memcached_timeouts_reach_the_url(memcached_server, private_page):
    caches = {"default": {"BACKEND": PYMEMCACHE, "LOCATION": memcached_server.address,
                          "OPTIONS": {"timeout": 0.5, "connect_timeout": 0.25, "no_delay": True}}}
    with override_settings(CACHES=caches):
        assert "timeout_ms=500" in icache.url and "connect_timeout_ms=250" in icache.url
        assert render_named(private_page, {"secret": unique()}).startswith("<ul>")


def test_manage_py_check_reports_unsupported_backends_and_warns_of_locmem():
    with override_settings(CACHES={"default": {"BACKEND": "django.core.cache.backends.db.DatabaseCache", "LOCATION": "t"}}):
        with pytest.raises(SystemCheckError, match="django_icache.E001"):
            call_command("check")
    with override_settings(CACHES={"default": {"BACKEND": LOCMEM}}):
        msgs = check_icache_settings()
        assert [m.id for m in msgs] == ["django_icache.W001"]
        assert "per process" in msgs[0].msg or "one per process" in msgs[0].msg
    with override_settings(CACHES={"default": {"BACKEND": REDIS, "LOCATION": "redis://127.0.0.1:6379"}}):
        assert check_icache_settings() == []


@pytest.mark.parametrize("conf, url", [
    ({"BACKEND": REDIS, "LOCATION": "redis://h:6379", "OPTIONS": {"db": 3, "password": "p w"}},
     "redis://:p%20w@h:6379/3"),
    ({"BACKEND": DJANGO_REDIS, "LOCATION": "redis://h:6379/0",
      "OPTIONS": {"PASSWORD": "pw", "SOCKET_TIMEOUT": 0.05, "SOCKET_CONNECT_TIMEOUT": 1, "SERIALIZER": "x.Json"}},
     "redis://:pw@h:6379/0?timeout_ms=50&connect_timeout_ms=1000"),
    ({"BACKEND": REDIS, "LOCATION": "redis://h:6379", "OPTIONS": {"username": "u", "password": "p", "ssl": True,
                                                               "ssl_cert_reqs": None}},
     "rediss://u:p@h:6379#insecure"),
    ({"BACKEND": REDIS, "LOCATION": "rediss://h:6380", "OPTIONS": {"ssl_ca_certs": "/ca.pem"}},
     "rediss://h:6380?ca_file=%2Fca.pem"),
    ({"BACKEND": REDIS, "LOCATION": "unix:///run/redis.sock?db=2", "KEY_PREFIX": "k"},
     "redis+unix:///run/redis.sock?db=2&prefix=k"),
    ({"BACKEND": REDIS, "LOCATION": "redis://h:6379", "KEY_PREFIX": "shop", "VERSION": 3},
     "redis://h:6379?prefix=shop%3Av3"),
    ({"BACKEND": PYMEMCACHE, "LOCATION": "h:1", "OPTIONS": {"max_pool_size": 8}}, "memcached://h:1?pool_size=8"),
])
def test_settings_map_to_icache_urls(conf, url):
    from django.conf import settings

    from django_icache.conf import cache_url

    with override_settings(CACHES={"default": conf}):
        assert cache_url(settings) == url


def test_icache_salt_is_added_to_the_url():
    from django.conf import settings

    from django_icache.conf import cache_url

    with override_settings(CACHES={"default": {"BACKEND": LOCMEM}}, ICACHE_SALT="git 1a2b"):
        assert cache_url(settings) == "memory://?salt=git%201a2b"
    with override_settings(ICACHE_URL="redis://h:1/0?prefix=x", ICACHE_SALT="s"):
        assert cache_url(settings) == "redis://h:1/0?prefix=x&salt=s"


def test_location_query_options_are_checked_like_options():
    from django.conf import settings

    from django_icache.conf import cache_url

    conf = {"BACKEND": REDIS, "LOCATION": "rediss://:pw@h:6380/0?ssl_cert_reqs=none"}
    with override_settings(CACHES={"default": conf}):
        assert cache_url(settings) == "rediss://:pw@h:6380/0#insecure"
    conf = {"BACKEND": REDIS, "LOCATION": "redis://h:6379?frobnicate=1"}
    with override_settings(CACHES={"default": conf}):
        with pytest.raises(ImproperlyConfigured, match="frobnicate"):
            cache_url(settings)
