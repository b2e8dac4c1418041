"""Which cache django_icache uses: Django's own ``CACHES`` setting.

``ICACHE_URL`` (a setting) overrides everything and takes every option of the
Rust URL (``?prefix=``, ``timeout_ms=``, ``near=``…). Otherwise the entry of
``CACHES`` named by ``ICACHE_CACHE`` (default ``"default"``) is translated:

==============================================  =======================================
``BACKEND``                                     icache URL
==============================================  =======================================
``…locmem.LocMemCache``                         ``memory://`` (in-process)
``…redis.RedisCache`` / ``django_redis…``       ``LOCATION`` (the first: the primary)
``…memcached.PyMemcacheCache`` / ``PyLibMCCache`` ``memcached://a:p[,b:p…]`` (a pool)
``…dummy.DummyCache``                           ``none://`` (caching off)
==============================================  =======================================

``KEY_PREFIX`` becomes ``?prefix=``. Anything else (database, file-based…)
raises ``ImproperlyConfigured`` naming the alias and pointing at ``ICACHE_URL``.
"""

from __future__ import annotations

import re
from urllib.parse import quote

from django.core.exceptions import ImproperlyConfigured

LOCMEM = {"django.core.cache.backends.locmem.LocMemCache"}
DUMMY = {"django.core.cache.backends.dummy.DummyCache"}
REDIS = {
    "django.core.cache.backends.redis.RedisCache",
    "django_redis.cache.RedisCache",
}
MEMCACHED = {
    "django.core.cache.backends.memcached.PyMemcacheCache",
    "django.core.cache.backends.memcached.PyLibMCCache",
}


def _servers(location) -> list[str]:
    """LOCATION as Django reads it: a list, or one string split on ``;``/``,``."""
    if not location:
        return []
    if isinstance(location, str):
        return [s.strip() for s in re.split("[;,]", location) if s.strip()]
    return [str(s).strip() for s in location if str(s).strip()]


def _with_prefix(url: str, prefix: str) -> str:
    if not prefix:
        return url
    sep = "&" if "?" in url else "?"
    return f"{url}{sep}prefix={quote(str(prefix), safe='')}"


def cache_url(settings) -> str:
    """The icache URL for these Django settings (see the module docs)."""
    url = getattr(settings, "ICACHE_URL", None)
    if url:
        return str(url)
    alias = getattr(settings, "ICACHE_CACHE", None) or "default"
    caches = getattr(settings, "CACHES", None) or {}
    if alias not in caches:
        raise ImproperlyConfigured(
            f"django_icache: ICACHE_CACHE = {alias!r}, but CACHES has no such alias "
            f"(it has {sorted(caches)!r}); name one, or set ICACHE_URL"
        )
    conf = caches[alias]
    backend = conf.get("BACKEND", "")
    location = conf.get("LOCATION", "")
    prefix = conf.get("KEY_PREFIX", "")
    if backend in LOCMEM:
        return _with_prefix("memory://", prefix)
    if backend in DUMMY:
        return _with_prefix("none://", prefix)
    if backend in REDIS:
        servers = _servers(location)
        if not servers:
            raise ImproperlyConfigured(
                f"django_icache: CACHES[{alias!r}] ({backend}) has no LOCATION; set it, or set ICACHE_URL"
            )
        # Several servers: the first is the primary and serves reads and
        # writes alike (a lagging replica's generations could serve stale
        # output). A Redis Cluster goes through ICACHE_URL (redis+cluster://).
        return _with_prefix(servers[0], prefix)
    if backend in MEMCACHED:
        servers = _servers(location)
        if not servers:
            raise ImproperlyConfigured(
                f"django_icache: CACHES[{alias!r}] ({backend}) has no LOCATION; set it, or set ICACHE_URL"
            )
        for s in servers:
            if s.startswith("unix:") or "/" in s:
                raise ImproperlyConfigured(
                    f"django_icache: CACHES[{alias!r}] LOCATION {s!r} is a Unix socket, which icache "
                    "does not support; set ICACHE_URL to memcached://host:port"
                )
        return _with_prefix("memcached://" + ",".join(servers), prefix)
    raise ImproperlyConfigured(
        f"django_icache: CACHES[{alias!r}] uses {backend or '(no BACKEND)'}, which icache cannot "
        "share (supported: LocMemCache, RedisCache, django-redis, PyMemcacheCache, PyLibMCCache, "
        "DummyCache); point ICACHE_CACHE at another alias, or set ICACHE_URL "
        "(memory://, redis://host:port/db, memcached://host:port, …)"
    )
