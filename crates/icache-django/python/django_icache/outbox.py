"""Bumps that cannot be lost: deferred to the commit, or written to the
database's outbox in the writer's own transaction.

**Inside ``transaction.atomic()``**, :meth:`ICache.incr` / ``incr_many`` do
not bump at once (a reader in another process could cache the old rows
between the bump and the commit, and serve them until the next bump):

* with the outbox installed (``manage.py icache install``) on the
  database of ``ICACHE_DATABASE`` (default ``"default"``), the tokens go
  into ``icache_outbox`` in the same transaction (``icache_bump(…)`` on
  PostgreSQL): they exist exactly when the transaction commits, and a relay
  (``ICACHE_RELAY = "thread"`` or ``manage.py icache relay``) applies them;
* otherwise they are bumped by ``transaction.on_commit`` after the
  outermost commit of every database whose atomic block is open (or of
  ``using=``), and not at all after a rollback.

Outside a transaction the bump happens at once, as before.

**A bump that cannot reach the cache never raises** into the caller (an
admin save must not be rolled back because Redis is down): the core
remembers the tokens and replays them before that process reads any
generation again; a warning is logged on ``django_icache`` (at most every
10 s) and ``icache.stats()["bumps_failed"]`` counts it. Pass
``raise_errors=True`` (or build ``ICache(raise_errors=True)``) to get the
``CacheError``.

**Read your own writes** (``ICACHE_RELAY = "thread"``): when a transaction
that wrote a watched table or the outbox commits, the committing thread
waits (at most ``ICACHE_RELAY_FLUSH_TIMEOUT`` seconds, default 2) until the
in-process relay has applied what was committed, so the response that
follows never leads to the old page.
"""

from __future__ import annotations

import logging
import threading
import time
from typing import Any

from django.core.exceptions import ImproperlyConfigured

from ._every import Every

logger = logging.getLogger("django_icache")

SUPPORTED = {"postgresql": "postgres", "sqlite": "sqlite"}

# Process-wide counters, reported by icache.stats().
_counts = {"bumps_failed": 0, "bumps_deferred": 0, "bumps_to_outbox": 0}
_counts_lock = threading.Lock()
_warned = Every()


def _count(name: str, n: int = 1) -> None:
    with _counts_lock:
        _counts[name] += n


def counts() -> dict:
    """The bump counters, and this process's relay's (``relay_rows``,
    ``relay_bumps``, ``relay_errors``, ``relay_pending``…) when one runs."""
    with _counts_lock:
        out = dict(_counts)
    from . import relay

    try:
        r = relay.get(start=False)
    except ImproperlyConfigured:
        r = None
    if r is not None:
        for k, v in r.stats().items():
            if k != "last_error":
                out[f"relay_{k}"] = v
    return out


# ---- settings ---------------------------------------------------------------


def database_alias() -> str:
    from django.conf import settings

    return getattr(settings, "ICACHE_DATABASE", None) or "default"


def dialect(connection) -> str:
    """``"postgres"`` or ``"sqlite"`` for a Django connection; any other
    engine is ``ImproperlyConfigured`` naming it."""
    d = SUPPORTED.get(connection.vendor)
    if d is None:
        engine = connection.settings_dict.get("ENGINE", connection.vendor)
        raise ImproperlyConfigured(
            f"django_icache: DATABASES[{connection.alias!r}] uses {engine} ({connection.vendor}); the icache outbox "
            "and relay support PostgreSQL (django.db.backends.postgresql) and SQLite (django.db.backends.sqlite3) only"
        )
    return d


# ---- is the outbox there? -------------------------------------------------------

# alias -> (installed, checked_at). A "yes" is kept (a failing insert turns it
# back to "no"); a "no" is asked again after RECHECK seconds, so an install
# done by another process is picked up.
_installed: dict[str, tuple[bool, float]] = {}
RECHECK = 30.0


def outbox_installed(connection) -> bool:
    if connection.vendor not in SUPPORTED:
        return False
    known = _installed.get(connection.alias)
    now = time.monotonic()
    if known is not None and (known[0] or now - known[1] < RECHECK):
        return known[0]
    try:
        with connection.cursor() as c:
            if connection.vendor == "postgresql":
                c.execute(
                    "SELECT to_regclass('icache_outbox') IS NOT NULL"
                    " AND to_regprocedure('icache_bump(text[])') IS NOT NULL"
                )
            else:
                c.execute("SELECT count(*) > 0 FROM sqlite_master WHERE type = 'table' AND name = 'icache_outbox'")
            found = bool(c.fetchone()[0])
    except Exception:  # noqa: BLE001 - a failed look is a "no": bump after commit
        logger.debug("django_icache: cannot tell whether %r has the outbox", connection.alias, exc_info=True)
        found = False
    _installed[connection.alias] = (found, now)
    return found


def forget_installed(alias: str | None = None) -> None:
    if alias is None:
        _installed.clear()
    else:
        _installed.pop(alias, None)


def outbox_insert(connection, tokens: list[str]) -> None:
    """Writes ``tokens`` to the outbox in ``connection``'s transaction."""
    with connection.cursor() as c:
        if connection.vendor == "postgresql":
            c.execute("SELECT icache_bump(%s)" % ", ".join(["%s"] * len(tokens)), tokens)
        else:
            c.executemany("INSERT INTO icache_outbox (token) VALUES (%s)", [(t,) for t in tokens])


# ---- the bump -------------------------------------------------------------------


def apply(cache, tokens: list[str], raise_errors: bool, single: bool = False):
    """Bumps now. A cache failure is remembered by the core (replayed before
    the next read), logged, counted, and raised only if asked."""
    from ._core import CacheError

    from . import edge

    try:
        if single:  # incr(): its own call, so an error names incr("token")
            done = [cache.handle.incr(tokens[0])]
        else:
            done = cache.handle.incr_many(tokens)
        edge.purge(tokens, strict=False)  # ICACHE_PURGE_URL: the proxy's pages
        return done
    except CacheError as e:
        _count("bumps_failed", len(tokens))
        # The proxy's old pages go now, and once more with the next purge,
        # after the core's replay (a page fetched meanwhile from another
        # process, still at the old generations, goes then).
        edge.purge(tokens, strict=False)
        edge.defer(cache.handle, tokens)
        if _warned.due():
            logger.warning(
                "django_icache: %d token(s) could not be bumped (%s); they are replayed before this process "
                "reads the cache again",
                len(tokens),
                e,
            )
        if raise_errors:
            raise
        return None


def bump(cache, tokens: list[str], using: str | None, raise_errors: bool, single: bool = False):
    """``incr_many`` with the transaction rules of the module docs. Returns
    the new generations when bumped at once, ``None`` when deferred (or
    failed without ``raise_errors``)."""
    from django.db import connections, transaction

    if not tokens:
        return []
    cache.handle  # a configuration error raises here, not at the commit
    if using is not None:
        open_ = [connections[using]] if connections[using].in_atomic_block else []
    else:
        open_ = [c for c in connections.all(initialized_only=True) if c.in_atomic_block]
    if not open_:
        return apply(cache, tokens, raise_errors, single)
    for conn in open_:
        if conn.alias == database_alias() and outbox_installed(conn):
            try:
                # A savepoint: a failing insert (the outbox dropped meanwhile)
                # must not abort the caller's transaction on PostgreSQL.
                with transaction.atomic(using=conn.alias):
                    outbox_insert(conn, tokens)
            except Exception:  # noqa: BLE001 - fall back to the commit hook
                logger.warning("django_icache: the outbox of %r refused a bump; bumping after commit", conn.alias,
                               exc_info=True)
                forget_installed(conn.alias)
            else:
                _count("bumps_to_outbox", len(tokens))
                from . import relay

                relay.flush_on_commit(conn)
                continue
        _count("bumps_deferred", len(tokens))
        transaction.on_commit(
            lambda: apply(cache, tokens, raise_errors), using=conn.alias, robust=not raise_errors
        )
    return None


# ---- install --------------------------------------------------------------------


def install(connection, apps=None, settings=None, verbosity: int = 1, stdout=None, prune: bool = False) -> list:
    """Creates the outbox on ``connection``'s database and the triggers of
    every model in ``ICACHE_WATCH`` (replacing earlier ones): idempotent,
    one transaction. Tables watched before but no longer in the setting are
    reported, and unwatched with ``prune=True``. Returns the watched models
    (:class:`django_icache.watch.Watched`)."""
    from django.db import transaction

    from . import _core
    from .watch import watched

    d = dialect(connection)
    models = watched(connection.vendor, apps=apps, settings=settings)
    statements = list(_core.outbox_install_sql(d))
    with transaction.atomic(using=connection.alias):
        with connection.cursor() as c:
            for sql in statements:
                c.execute(sql)
            for w in models:
                if w.table not in connection.introspection.table_names(c):
                    raise ImproperlyConfigured(
                        f"django_icache: ICACHE_WATCH[{w.label!r}]: the table {w.table!r} does not exist in "
                        f"DATABASES[{connection.alias!r}] (run migrate first)"
                    )
                columns = [col.name for col in connection.introspection.get_table_description(c, w.table)]
                for sql in _core.outbox_watch_sql(d, w.table, columns, list(w.expressions)):
                    c.execute(sql)
                if stdout is not None and verbosity >= 1:
                    stdout.write(f"  {w.label} ({w.table}): every insert, update and delete bumps "
                                 + ", ".join(w.expressions))
            c.execute("SELECT DISTINCT table_name FROM icache_watch ORDER BY table_name")
            stale = [t for (t,) in c.fetchall() if t not in {w.table for w in models}]
            for table in stale:
                if prune:
                    for sql in _core.outbox_unwatch_sql(d, table):
                        c.execute(sql)
                if stdout is not None:
                    stdout.write(
                        f"  {table}: unwatched (not in ICACHE_WATCH)" if prune else
                        f"  {table}: still watched, but not in ICACHE_WATCH (--prune unwatches it)"
                    )
    _installed[connection.alias] = (True, time.monotonic())
    return models


def watched_tables() -> frozenset:
    """The tables of ``ICACHE_WATCH`` (empty when unset or wrong: install
    reports those errors)."""
    from django.conf import settings

    raw = getattr(settings, "ICACHE_WATCH", None) or {}
    cached = _tables_cache.get("v")
    if cached is not None and cached[0] is raw:
        return cached[1]
    from django.apps import apps

    tables = set()
    if isinstance(raw, dict):
        for label in raw:
            try:
                tables.add(apps.get_model(label)._meta.concrete_model._meta.db_table)
            except (LookupError, ValueError, TypeError, AttributeError):
                pass
    out = frozenset(tables)
    _tables_cache["v"] = (raw, out)
    return out


_tables_cache: dict[str, Any] = {}
