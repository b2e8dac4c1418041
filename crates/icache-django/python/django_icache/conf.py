"""Which cache django_icache uses: Django's own ``CACHES`` setting, every part
of it honoured or refused, never dropped.

``ICACHE_URL`` (a setting) overrides everything and takes every option of the
Rust URL (``?prefix=``, ``timeout_ms=``, ``near=``…). Otherwise the entry of
``CACHES`` named by ``ICACHE_CACHE`` (default ``"default"``) is translated
(a subclass of these backends is translated as its base):

==============================================  =======================================
``BACKEND``                                     icache URL
==============================================  =======================================
``…locmem.LocMemCache``                         ``memory://`` (in-process)
``…redis.RedisCache`` / ``django_redis…``       ``LOCATION`` (the first: the primary);
                                                ``unix://…`` becomes ``redis+unix://…``
``…memcached.PyMemcacheCache`` / ``PyLibMCCache`` ``memcached://a:p[,b:p…]`` (a pool)
``…dummy.DummyCache``                           ``none://`` (caching off)
==============================================  =======================================

- ``KEY_PREFIX`` becomes ``?prefix=``; a ``VERSION`` other than 1 is added to
  it (``prefix:v2``): a new version is a new, empty cache, as in Django.
- ``OPTIONS``: Redis ``db``, ``password``, ``username``, ``socket_timeout``,
  ``socket_connect_timeout``, ``max_connections``, ``ssl``, ``ssl_cert_reqs``
  (``None``/``"none"``: no verification), ``ssl_ca_certs`` (django-redis'
  upper-case names and ``CONNECTION_POOL_KWARGS`` alike); memcached
  ``timeout``, ``connect_timeout``, ``max_pool_size``. Options that only shape
  how Django's own cache client serializes or pools (``serializer``,
  ``parser_class``, ``no_delay``…) do not apply to icache's entries and are
  accepted. Any other option (client certificates, SASL, a sharding client…)
  cannot be honoured and is refused.
- ``KEY_FUNCTION`` is refused: icache's keys are its own (unambiguous,
  memcached-safe), a key function cannot apply to them.
- ``TIMEOUT`` does not apply: icache never expires entries by time.
- ``ICACHE_SALT`` becomes ``?salt=`` (on ``ICACHE_URL`` too): mixed into every
  block's key, so a new salt (a deploy) starts every block afresh.

Anything refused raises ``ImproperlyConfigured`` naming the alias and the
setting; ``manage.py check`` reports the same (see :mod:`django_icache.checks`).
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from urllib.parse import parse_qsl, quote, unquote, urlsplit

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
KINDS = (("locmem", LOCMEM), ("dummy", DUMMY), ("redis", REDIS), ("memcached", MEMCACHED))

# Options that shape only how Django's own cache client talks to the server
# or serializes its values: icache has its own client and entry format.
REDIS_NOT_APPLICABLE = {
    "pool_class", "parser_class", "serializer", "serializer_class", "compressor", "connection_pool_class",
    "connection_pool_class_kwargs", "ignore_exceptions", "log_ignored_exceptions", "health_check_interval",
    "retry_on_timeout", "retry_on_error", "retry", "socket_keepalive", "socket_keepalive_options",
    "decode_responses", "encoding", "encoding_errors", "client_name", "close_connection",
}
MEMCACHED_NOT_APPLICABLE = {
    "no_delay", "ignore_exc", "use_pooling", "default_noreply", "serde", "serializer", "deserializer",
    "allow_unicode_keys", "encoding", "binary", "behaviors", "pool_idle_timeout", "lock_generator",
    "socket_keepalive", "retry_attempts", "retry_delay", "dead_timeout",
}
LOCMEM_NOT_HONOURED = {"max_entries", "cull_frequency"}


@dataclass
class Problem:
    """A setting icache cannot take as it is. ``level``: "error" (refused) or
    "warning"; ``id``: the system check's id."""

    level: str
    id: str
    msg: str
    hint: str = ""


def _servers(location) -> list[str]:
    """LOCATION as Django reads it: a list, or one string split on ``;``/``,``."""
    if not location:
        return []
    if isinstance(location, str):
        return [s.strip() for s in re.split("[;,]", location) if s.strip()]
    return [str(s).strip() for s in location if str(s).strip()]


def _with_query(url: str, pairs: list[tuple[str, str]]) -> str:
    pairs = [(k, v) for k, v in pairs if v != ""]
    if not pairs:
        return url
    sep = "&" if "?" in url else "?"
    return url + sep + "&".join(f"{k}={quote(str(v), safe='')}" for k, v in pairs)


def _seconds_ms(alias, name, value, problems) -> str:
    try:
        ms = round(float(value) * 1000)
    except (TypeError, ValueError):
        problems.append(Problem("error", "django_icache.E002", f"CACHES[{alias!r}] OPTIONS[{name!r}] = {value!r} is not a number of seconds"))
        return ""
    return str(max(1, ms))


def _backend_kind(backend: str) -> str | None:
    """The supported backend `backend` is, or subclasses."""
    for kind, names in KINDS:
        if backend in names:
            return kind
    try:
        from django.utils.module_loading import import_string

        cls = import_string(backend)
    except Exception:  # noqa: BLE001 - not importable: not supported
        return None
    for kind, names in KINDS:
        for name in names:
            try:
                from django.utils.module_loading import import_string

                base = import_string(name)
            except Exception:  # noqa: BLE001 - django_redis / pylibmc missing
                continue
            if isinstance(cls, type) and issubclass(cls, base):
                return kind
    return None


def _options(conf) -> dict:
    """OPTIONS with django-redis' upper-case names and CONNECTION_POOL_KWARGS
    folded in, lower-cased."""
    out = {}
    for k, v in (conf.get("OPTIONS") or {}).items():
        if str(k).upper() == "CONNECTION_POOL_KWARGS" and isinstance(v, dict):
            for k2, v2 in v.items():
                out[str(k2).lower()] = v2
        else:
            out[str(k).lower()] = v
    return out


def _redis_url(alias, server, opts, problems) -> str | None:
    where = f"CACHES[{alias!r}]"
    if server.startswith("unix:"):
        # redis-py's unix:///path/redis.sock?db=N; the core's redis+unix://.
        parts = urlsplit(server)
        query = dict(parse_qsl(parts.query))
        scheme, netloc, path = "redis+unix", parts.netloc, parts.path
        db = query.pop("db", None)
        if parts.username or parts.password:
            opts.setdefault("username", unquote(parts.username or "") or None)
            opts.setdefault("password", unquote(parts.password or "") or None)
            netloc = ""
        if query.get("password"):
            opts.setdefault("password", query.pop("password"))
    else:
        parts = urlsplit(server)
        scheme, netloc, path = parts.scheme, parts.netloc, parts.path
        if scheme not in ("redis", "rediss"):
            problems.append(Problem("error", "django_icache.E002", f"{where} LOCATION {server!r} is not a redis://, rediss:// or unix:// URL"))
            return None
        query = dict(parse_qsl(parts.query))
        db = path.strip("/") or query.pop("db", None)
        path = ""
    pairs: list[tuple[str, str]] = []
    # redis-py takes options in LOCATION's query too (?ssl_cert_reqs=none):
    # they are checked like OPTIONS.
    for k, v in query.items():
        opts.setdefault(k.lower(), None if v.lower() == "none" and k.lower() == "ssl_cert_reqs" else v)

    userinfo_user = unquote(urlsplit(f"x://{netloc}").username or "") if "@" in netloc else ""
    userinfo_pass = unquote(urlsplit(f"x://{netloc}").password or "") if "@" in netloc else ""
    hostport = netloc.rsplit("@", 1)[-1]
    user, password = userinfo_user, userinfo_pass
    insecure = False
    for k, v in opts.items():
        if k == "db":
            if db not in (None, "") and str(db) != str(v):
                problems.append(Problem("error", "django_icache.E002", f"{where}: OPTIONS db={v!r} contradicts LOCATION's database {db}"))
            db = str(v)
        elif k == "password":
            if v is None:
                continue
            if password and password != str(v):
                problems.append(Problem("error", "django_icache.E002", f"{where}: OPTIONS password contradicts the password in LOCATION"))
            password = str(v)
        elif k == "username":
            if v is None:
                continue
            if user and user != str(v):
                problems.append(Problem("error", "django_icache.E002", f"{where}: OPTIONS username contradicts the user in LOCATION"))
            user = str(v)
        elif k == "socket_timeout":
            pairs.append(("timeout_ms", _seconds_ms(alias, k, v, problems)))
        elif k == "socket_connect_timeout":
            pairs.append(("connect_timeout_ms", _seconds_ms(alias, k, v, problems)))
        elif k == "max_connections":
            try:
                pairs.append(("pool_size", str(min(1024, max(1, int(v))))))
            except (TypeError, ValueError):
                problems.append(Problem("error", "django_icache.E002", f"{where} OPTIONS max_connections={v!r} is not a number"))
        elif k == "ssl":
            if v and scheme == "redis":
                scheme = "rediss"
            elif not v and scheme == "rediss":
                problems.append(Problem("error", "django_icache.E002", f"{where}: OPTIONS ssl=False contradicts rediss:// in LOCATION"))
        elif k == "ssl_cert_reqs":
            name = str(getattr(v, "name", v)).lower().replace("cert_", "")
            if v is None or name in ("none", "0"):
                insecure = True
            elif name not in ("required", "2"):
                problems.append(Problem("error", "django_icache.E002", f"{where} OPTIONS ssl_cert_reqs={v!r} cannot be honoured (icache verifies the certificate, or not at all: None)"))
        elif k == "ssl_ca_certs":
            pairs.append(("ca_file", str(v)))
        elif k == "ssl_check_hostname" and not v and not insecure and opts.get("ssl_cert_reqs", "x") is not None:
            problems.append(Problem("error", "django_icache.E002", f"{where} OPTIONS ssl_check_hostname=False cannot be honoured without ssl_cert_reqs=None"))
        elif k == "ssl_check_hostname":
            pass
        elif k == "client_class":
            if not str(v).endswith("DefaultClient"):
                problems.append(Problem("error", "django_icache.E002", f"{where} OPTIONS CLIENT_CLASS={v!r} cannot be honoured (icache talks to one primary)", "point ICACHE_CACHE at a plain Redis alias, or set ICACHE_URL (redis+cluster:// for a cluster)"))
        elif k in REDIS_NOT_APPLICABLE:
            pass
        else:
            problems.append(Problem("error", "django_icache.E002", f"{where} OPTIONS[{k!r}] cannot be honoured by icache", "remove it, or set ICACHE_URL to an icache URL"))
    if scheme == "redis+unix":
        url = f"redis+unix://{path}"
        # redis-rs' form: database, user and password are query options.
        head = [("db", str(db))] if db not in (None, "") else []
        head += [("user", user)] if user else []
        head += [("pass", password)] if password else []
        pairs = head + pairs
    else:
        auth = ""
        if user or password:
            auth = quote(user, safe="") + (":" + quote(password, safe="") if password else "") + "@"
        url = f"{scheme}://{auth}{hostport}" + (f"/{db}" if db not in (None, "") else "")
    if insecure:
        if scheme != "rediss":
            problems.append(Problem("error", "django_icache.E002", f"{where}: OPTIONS ssl_cert_reqs=None without TLS"))
        pairs = [p for p in pairs if p[0] != "ca_file"]
    url = _with_query(url, pairs)
    return url + ("#insecure" if insecure and scheme == "rediss" else "")


def _memcached_url(alias, servers, opts, problems) -> str | None:
    where = f"CACHES[{alias!r}]"
    for s in servers:
        if s.startswith("unix:") or "/" in s:
            problems.append(Problem(
                "error", "django_icache.E002",
                f"{where} LOCATION {s!r} is a Unix socket, which icache's memcached client cannot use",
                "set ICACHE_URL to memcached://host:port",
            ))
            return None
    pairs = []
    for k, v in opts.items():
        if k == "timeout":
            pairs.append(("timeout_ms", _seconds_ms(alias, k, v, problems)))
        elif k == "connect_timeout":
            pairs.append(("connect_timeout_ms", _seconds_ms(alias, k, v, problems)))
        elif k == "max_pool_size":
            try:
                pairs.append(("pool_size", str(min(1024, max(1, int(v))))))
            except (TypeError, ValueError):
                problems.append(Problem("error", "django_icache.E002", f"{where} OPTIONS max_pool_size={v!r} is not a number"))
        elif k in MEMCACHED_NOT_APPLICABLE:
            pass
        else:
            problems.append(Problem("error", "django_icache.E002", f"{where} OPTIONS[{k!r}] cannot be honoured by icache (no SASL, TLS or key function for memcached)", "remove it, or set ICACHE_URL"))
    return _with_query("memcached://" + ",".join(servers), pairs)


def translate(settings) -> tuple[str | None, list[Problem]]:
    """The icache URL for these settings, and what in them icache cannot take
    (a URL of None when something is refused)."""
    problems: list[Problem] = []
    salt = getattr(settings, "ICACHE_SALT", None)
    salt_pairs = [("salt", str(salt))] if salt not in (None, "") else []
    url = getattr(settings, "ICACHE_URL", None)
    if url:
        url = str(url)
        if salt_pairs and "salt=" not in url:
            base, _, frag = url.partition("#")
            url = _with_query(base, salt_pairs) + (f"#{frag}" if frag else "")
        return url, problems
    alias = getattr(settings, "ICACHE_CACHE", None) or "default"
    caches = getattr(settings, "CACHES", None) or {}
    if alias not in caches:
        problems.append(Problem(
            "error", "django_icache.E004",
            f"ICACHE_CACHE = {alias!r}, but CACHES has no such alias (it has {sorted(caches)!r})",
            "name one, or set ICACHE_URL",
        ))
        return None, problems
    conf = caches[alias]
    where = f"CACHES[{alias!r}]"
    backend = conf.get("BACKEND", "")
    kind = _backend_kind(backend)
    if kind is None:
        problems.append(Problem(
            "error", "django_icache.E001",
            f"{where} uses {backend or '(no BACKEND)'}, which icache cannot share (supported: LocMemCache, "
            "RedisCache, django-redis, PyMemcacheCache, PyLibMCCache, DummyCache, and their subclasses)",
            "point ICACHE_CACHE at another alias, or set ICACHE_URL (memory://, redis://host:port/db, "
            "memcached://host:port, …)",
        ))
        return None, problems
    if conf.get("KEY_FUNCTION"):
        problems.append(Problem(
            "error", "django_icache.E003",
            f"{where} sets KEY_FUNCTION, which cannot apply to icache: its keys are its own "
            "(unambiguous, memcached-safe, holding a block's identity and tokens)",
            "point ICACHE_CACHE at an alias without KEY_FUNCTION, or set ICACHE_URL (use ?prefix= to namespace)",
        ))
    prefix = str(conf.get("KEY_PREFIX", "") or "")
    version = conf.get("VERSION", 1)
    if version not in (None, 1, "1"):
        prefix = f"{prefix}:v{version}" if prefix else f"v{version}"
    head = [("prefix", prefix)] if prefix else []
    opts = _options(conf)
    location = conf.get("LOCATION", "")
    if kind == "locmem":
        for k in opts:
            if k in LOCMEM_NOT_HONOURED:
                problems.append(Problem("warning", "django_icache.W002", f"{where} OPTIONS[{k!r}] is not honoured: icache's memory:// is bounded by bytes", "set ICACHE_URL = 'memory://?max_bytes=N'"))
            else:
                problems.append(Problem("error", "django_icache.E002", f"{where} OPTIONS[{k!r}] cannot be honoured by icache"))
        url = _with_query("memory://", head)
    elif kind == "dummy":
        url = _with_query("none://", head)
    elif kind == "redis":
        servers = _servers(location)
        if not servers:
            problems.append(Problem("error", "django_icache.E004", f"{where} ({backend}) has no LOCATION", "set it, or set ICACHE_URL"))
            return None, problems
        # Several servers: the first is the primary and serves reads and
        # writes alike (a lagging replica's generations could serve stale
        # output). A Redis Cluster goes through ICACHE_URL (redis+cluster://).
        url = _redis_url(alias, servers[0], opts, problems)
        if url is not None:
            base, _, frag = url.partition("#")
            url = _with_query(base, head) + (f"#{frag}" if frag else "")
    else:
        servers = _servers(location)
        if not servers:
            problems.append(Problem("error", "django_icache.E004", f"{where} ({backend}) has no LOCATION", "set it, or set ICACHE_URL"))
            return None, problems
        url = _memcached_url(alias, servers, opts, problems)
        if url is not None:
            url = _with_query(url, head)
    if url is not None and salt_pairs:
        base, _, frag = url.partition("#")
        url = _with_query(base, salt_pairs) + (f"#{frag}" if frag else "")
    if any(p.level == "error" for p in problems):
        return None, problems
    return url, problems


def cache_url(settings) -> str:
    """The icache URL for these Django settings (see the module docs); raises
    ``ImproperlyConfigured`` for anything that cannot be honoured."""
    url, problems = translate(settings)
    errors = [p for p in problems if p.level == "error"]
    if errors or url is None:
        p = errors[0]
        more = f" (and {len(errors) - 1} more: manage.py check lists them)" if len(errors) > 1 else ""
        raise ImproperlyConfigured(f"django_icache: {p.msg}{more}; {p.hint or 'set ICACHE_URL to a valid icache URL'}")
    return url
