"""The relay: moves ``icache_outbox`` rows to the cache, in this process.

``ICACHE_RELAY = "thread"`` runs one relay per process (started on the
first request, the first write or the first bump that needs it; a forked
child starts its own) for the database ``ICACHE_DATABASE`` (default
``"default"``); ``manage.py icache relay`` runs one in the foreground. Any
number may run at once, against one database: every committed row is
bumped at least once and deleted only after its bump succeeded.

* **PostgreSQL**: icache's Rust relay (``icache::db::Relay``): a
  ``DELETE … FOR UPDATE SKIP LOCKED … RETURNING`` transaction per batch,
  committed after the bump, woken by ``LISTEN icache_outbox``, polling
  every ``ICACHE_RELAY_POLL`` seconds (default 1) and draining after every
  reconnect.
* **SQLite**: the same loop in Python, through Python's own ``sqlite3``. Not
  the Rust one: that links its own copy of SQLite, and two copies in one
  process break SQLite's locks (closing a file in one copy drops the
  other's POSIX locks; sqlite.org/howtocorrupt.html, 2.2.1), and Django
  closes its connection after every request. Rows are read, bumped, then
  deleted (``seq <=`` the last one read; ``AUTOINCREMENT`` never reuses a
  seq, and SQLite commits writers one at a time, so no later commit can
  hold a smaller one).

The database URL comes from ``DATABASES``: PostgreSQL's ``HOST``,
``PORT``, ``USER``, ``PASSWORD``, ``NAME`` (and ``OPTIONS["sslmode"]``,
``connect_timeout``, ``application_name``); SQLite's ``NAME``, which must be
a file. An in-memory SQLite database (Django's test database) cannot be
opened by a relay: its outbox is applied through Django's own connection
right after each commit (:func:`drain_inline`), whatever ``ICACHE_RELAY``.
"""

from __future__ import annotations

import logging
import os
import sqlite3
import threading
import time
from urllib.parse import quote

from django.core.exceptions import ImproperlyConfigured

from . import edge
from ._every import Every

logger = logging.getLogger("django_icache")

OFF = {None, "", False, "off", "none"}


def mode() -> str | None:
    """``"thread"`` or ``None`` (``ICACHE_RELAY``)."""
    from django.conf import settings

    value = getattr(settings, "ICACHE_RELAY", None)
    if value in OFF:
        return None
    if value == "thread":
        return "thread"
    raise ImproperlyConfigured(
        f"django_icache: ICACHE_RELAY = {value!r}; expected \"thread\" (a relay in every process) or None "
        "(run `manage.py icache relay` yourself)"
    )


def _seconds(name: str, default: float) -> float:
    from django.conf import settings

    value = getattr(settings, name, None)
    if value is None:
        return default
    try:
        value = float(value)
    except (TypeError, ValueError):
        raise ImproperlyConfigured(f"django_icache: {name} = {value!r}; expected a number of seconds") from None
    if not value > 0:
        raise ImproperlyConfigured(f"django_icache: {name} = {value!r}; expected a number of seconds above 0")
    return value


def poll_interval() -> float:
    return _seconds("ICACHE_RELAY_POLL", 1.0)


def flush_timeout() -> float:
    return _seconds("ICACHE_RELAY_FLUSH_TIMEOUT", 2.0)


def database_url(connection) -> str:
    """The icache database URL of a Django connection."""
    from .outbox import dialect

    d = dialect(connection)
    s = connection.settings_dict
    if d == "sqlite":
        name = str(s.get("NAME") or "")
        if not name or name == ":memory:" or "mode=memory" in name or name.startswith("file:"):
            raise ImproperlyConfigured(
                f"django_icache: DATABASES[{connection.alias!r}] is an in-memory SQLite database ({name!r}); "
                "a relay needs a database file"
            )
        return "sqlite://" + quote(os.path.abspath(name))
    user = quote(str(s.get("USER") or ""), safe="")
    password = str(s.get("PASSWORD") or "")
    auth = user + (":" + quote(password, safe="") if password else "")
    host = str(s.get("HOST") or "")
    port = str(s.get("PORT") or "")
    query = []
    if not host or host.startswith("/"):
        # A Unix socket (libpq's default when HOST is empty).
        query.append("host=" + quote(host or "/var/run/postgresql", safe=""))
        netloc = ""
    else:
        netloc = ("[" + host + "]" if ":" in host else host) + (":" + port if port else "")
    if port and netloc == "":
        query.append("port=" + quote(port, safe=""))
    options = s.get("OPTIONS") or {}
    for key in ("sslmode", "connect_timeout", "application_name"):
        if options.get(key) not in (None, ""):
            query.append(f"{key}={quote(str(options[key]), safe='')}")
    url = f"postgresql://{auth + '@' if auth else ''}{netloc}/{quote(str(s.get('NAME') or ''), safe='')}"
    return url + ("?" + "&".join(query) if query else "")


# ---- the SQLite relay (Python's sqlite3) --------------------------------------------


class SqliteRelay:
    """The relay loop on a SQLite file, in a thread (see the module docs)."""

    def __init__(self, path: str, cache, poll: float = 1.0, batch: int = 1000):
        self.path, self._cache, self._poll, self._batch = path, cache, poll, batch
        self._cond = threading.Condition()
        self._requested = self._done = 0
        self._woken = self._stopped = False
        self._stats = {"batches": 0, "rows": 0, "bumps": 0, "errors": 0, "pending": 0, "last_error": None}
        self._warned = Every()
        self._thread = threading.Thread(target=self._run, name="icache-relay-sqlite", daemon=True)
        self._thread.start()

    def wake(self) -> None:
        with self._cond:
            self._woken = True
            self._cond.notify_all()

    def flush(self, timeout: float) -> bool:
        """Waits until every row committed before the call is applied;
        ``False`` after ``timeout`` seconds (or when stopped)."""
        deadline = time.monotonic() + timeout
        with self._cond:
            self._requested += 1
            mine = self._requested
            self._woken = True
            self._cond.notify_all()
            while self._done < mine:
                left = deadline - time.monotonic()
                if self._stopped or left <= 0:
                    return False
                self._cond.wait(left)
        return True

    def stats(self) -> dict:
        with self._cond:
            return dict(self._stats)

    def stop(self) -> None:
        """Finishes the batch in hand, then ends the thread."""
        with self._cond:
            self._stopped = True
            self._cond.notify_all()
        if self._thread is not threading.current_thread():
            self._thread.join()

    def _run(self) -> None:
        from ._core import CacheError

        conn = None
        backoff = 0.0
        while True:
            with self._cond:
                if not self._woken and not self._stopped:
                    self._cond.wait(backoff or self._poll)
                if self._stopped:
                    break
                self._woken = False
                target = self._requested
            try:
                if conn is None:
                    conn = sqlite3.connect(self.path, timeout=5.0, isolation_level=None, check_same_thread=False)
                self._drain(conn)
            except (sqlite3.Error, CacheError, OSError) as e:
                if isinstance(e, sqlite3.Error) and conn is not None:
                    conn.close()
                    conn = None
                backoff = min(2.0, max(0.1, backoff * 2))
                with self._cond:
                    self._stats["errors"] += 1
                    self._stats["last_error"] = str(e)
                if self._warned.due():
                    logger.warning("django_icache: relay on %s: %s; retrying (rows stay in the outbox)", self.path, e)
                continue
            backoff = 0.0
            with self._cond:
                self._stats["last_error"] = None
                self._done = max(self._done, target)
                self._cond.notify_all()
        if conn is not None:
            conn.close()

    def _drain(self, conn) -> None:
        while True:
            rows = conn.execute("SELECT seq, token FROM icache_outbox ORDER BY seq LIMIT ?", (self._batch,)).fetchall()
            if not rows:
                with self._cond:
                    self._stats["pending"] = 0
                return
            with self._cond:
                self._stats["pending"] = len(rows)
            tokens = list(dict.fromkeys(t for _, t in rows))
            self._cache.handle.incr_many(tokens)
            # A purge the proxy refuses keeps the rows: at least once.
            edge.purge(tokens, strict=True)
            conn.execute("DELETE FROM icache_outbox WHERE seq <= ?", (rows[-1][0],))
            with self._cond:
                self._stats["batches"] += 1
                self._stats["rows"] += len(rows)
                self._stats["bumps"] += len(tokens)
            if self._stopped:
                return


class PgRelay:
    """icache's Rust relay on PostgreSQL (see the module docs)."""

    def __init__(self, url: str, cache, poll: float = 1.0, batch: int = 1000):
        from ._core import Relay

        self._inner = Relay(url, cache.handle, int(poll * 1000), batch, edge.purger())

    def wake(self) -> None:
        self._inner.wake()

    def flush(self, timeout: float) -> bool:
        return self._inner.flush(timeout)

    def stats(self) -> dict:
        return self._inner.stats()

    def stop(self) -> None:
        self._inner.stop()


def open_relay(connection, cache=None, poll: float | None = None):
    """A running relay for ``connection``'s database (the caller stops it)."""
    from . import icache
    from .outbox import dialect

    cache = cache or icache
    poll = poll_interval() if poll is None else poll
    url = database_url(connection)
    if dialect(connection) == "sqlite":
        return SqliteRelay(os.path.abspath(str(connection.settings_dict["NAME"])), cache, poll)
    return PgRelay(url, cache, poll)


# ---- one relay per process (ICACHE_RELAY = "thread") -------------------------------

_lock = threading.Lock()
_relays: dict = {}
_pid = [os.getpid()]
# A forked child must not use (or join, or drop) its parent's relay threads:
# they do not exist in it. Kept here, never stopped.
_inherited: list = []


def _after_fork_in_child() -> None:
    global _lock
    _inherited.extend(_relays.values())
    _relays.clear()
    _lock = threading.Lock()
    _pid[0] = os.getpid()


if hasattr(os, "register_at_fork"):
    os.register_at_fork(after_in_child=_after_fork_in_child)


def get(alias: str | None = None, start: bool = True):
    """This process's relay for ``alias`` (default ``ICACHE_DATABASE``) when
    ``ICACHE_RELAY = "thread"``, started on first use; else ``None``."""
    if mode() != "thread":
        return None
    from django.db import connections

    from .outbox import database_alias

    alias = alias or database_alias()
    if alias in connections and in_memory(connections[alias]):
        return None  # applied at each commit instead (drain_inline)
    if _pid[0] != os.getpid():
        _after_fork_in_child()
    relay = _relays.get(alias)
    if relay is not None or not start:
        return relay
    with _lock:
        relay = _relays.get(alias)
        if relay is None:
            relay = _relays[alias] = open_relay(connections[alias])
    return relay


def stop_all() -> None:
    """Stops this process's relays (they start again on next use)."""
    with _lock:
        relays = list(_relays.values())
        _relays.clear()
    for r in relays:
        r.stop()


def flush(alias: str | None = None, timeout: float | None = None) -> bool:
    """Read your own writes: waits until what was committed is applied by
    this process's relay. ``True`` when applied (or when there is no relay
    here); ``False`` after the timeout (the bumps stay in the outbox and are
    applied when the cache answers)."""
    from django.db import connections

    from .outbox import database_alias, outbox_installed

    name = alias or database_alias()
    if name in connections and in_memory(connections[name]):
        conn = connections[name]
        return drain_inline(conn) if outbox_installed(conn) else True
    relay = get(alias)
    if relay is None:
        return True
    timeout = flush_timeout() if timeout is None else timeout
    if relay.stats().get("last_error"):
        # The last attempt failed: the cache (or the database) may be down.
        # The wake-up retries at once, which heals a passing error; a real
        # outage must not make every write wait out the whole time-out.
        timeout = min(timeout, 0.2)
    ok = relay.flush(timeout)
    if not ok:
        logger.warning("django_icache: the relay did not apply this commit's bumps in time; they stay in the outbox")
    return ok


def _flush_callback() -> None:
    flush()


def in_memory(connection) -> bool:
    """An in-memory SQLite database: no other connection can see it."""
    return connection.vendor == "sqlite" and connection.is_in_memory_db()


_draining = threading.local()
_drain_warned = Every()


def drain_inline(connection) -> bool:
    """Applies the outbox through ``connection`` itself, at once: the relay
    of an in-memory SQLite database (Django's default test database), which
    no relay thread or command can open. Rows are deleted only after their
    bump; a failure leaves them for the next commit. ``True`` when empty."""
    from django.db import DatabaseError

    from . import icache
    from ._core import CacheError

    if getattr(_draining, "on", False):
        return True  # our own DELETE, seen by the execute wrapper
    _draining.on = True
    try:
        while True:
            with connection.cursor() as c:
                c.execute("SELECT seq, token FROM icache_outbox ORDER BY seq LIMIT 1000")
                rows = c.fetchall()
            if not rows:
                return True
            tokens = list(dict.fromkeys(t for _, t in rows))
            icache.handle.incr_many(tokens)
            edge.purge(tokens, strict=True)
            with connection.cursor() as c:
                c.execute("DELETE FROM icache_outbox WHERE seq <= %s", [rows[-1][0]])
    except (CacheError, DatabaseError) as e:
        if _drain_warned.due():
            logger.warning("django_icache: outbox of %r not applied yet (%s); retried after the next commit",
                           connection.alias, e)
        return False
    finally:
        _draining.on = False


def _drain_callback() -> None:
    from django.db import connections

    from .outbox import database_alias

    drain_inline(connections[database_alias()])


def flush_on_commit(connection) -> None:
    """After ``connection``'s transaction commits, waits for its bumps
    (once per transaction): through this process's relay, or, on an
    in-memory SQLite database, by applying them at once."""
    from .outbox import database_alias, outbox_installed

    if connection.alias != database_alias() or getattr(_draining, "on", False):
        return
    memory = in_memory(connection)
    if not memory and mode() != "thread":
        return
    if not outbox_installed(connection):
        # Triggers without an outbox cannot exist; `install` not run yet:
        # nothing to wait for.
        return
    if not connection.in_atomic_block:
        if connection.get_autocommit():
            drain_inline(connection) if memory else flush()
        return
    callback = _drain_callback if memory else _flush_callback
    if any(cb is callback for _, cb, _ in connection.run_on_commit):
        return
    from django.db import transaction

    transaction.on_commit(callback, using=connection.alias, robust=True)


WRITES = ("INSERT", "UPDATE", "DELETE", "TRUNCA", "REPLAC", "WITH", "MERGE")


def _execute_wrapper(execute, sql, params, many, context):
    result = execute(sql, params, many, context)
    try:
        head = sql.lstrip()[:6].upper() if isinstance(sql, str) else ""
        if head.startswith(WRITES):
            from .outbox import watched_tables

            if "icache_outbox" in sql or any(t in sql for t in watched_tables()):
                conn = context["connection"]
                if conn.vendor == "sqlite" and "RETURNING" in sql and not conn.in_atomic_block:
                    # SQLite commits an autocommit statement when it is
                    # reset, after the caller fetched what it returns (a
                    # save()'s new id): flush at its post_save instead.
                    conn._icache_flush_after_fetch = True
                else:
                    flush_on_commit(conn)
    except Exception:  # noqa: BLE001 - never fail the caller's query
        logger.debug("django_icache: read-your-writes hook failed", exc_info=True)
    return result


def on_connection_created(sender, connection, **kwargs) -> None:
    """Hooks every new connection so that a commit that wrote a watched
    table of ``ICACHE_DATABASE`` waits for its bumps (the hook itself looks
    at the settings, which tests change)."""
    if _execute_wrapper not in connection.execute_wrappers:
        connection.execute_wrappers.append(_execute_wrapper)


def on_saved(sender, using=None, **kwargs) -> None:
    from django.db import connections

    if using is None or using not in connections:
        return
    conn = connections[using]
    if getattr(conn, "_icache_flush_after_fetch", False):
        conn._icache_flush_after_fetch = False
        flush_on_commit(conn)


def on_request_started(sender, **kwargs) -> None:
    if mode() == "thread":
        get()


def on_setting_changed(setting, **kwargs) -> None:
    if setting in {"CACHES", "ICACHE_URL", "ICACHE_CACHE", "ICACHE_RELAY", "ICACHE_DATABASE", "DATABASES",
                   "ICACHE_PURGE_URL"}:
        stop_all()
    if setting in {"ICACHE_WATCH", "ICACHE_DATABASE", "DATABASES"}:
        from . import outbox

        outbox.forget_installed()


def connect_signals() -> None:
    """Called by the app's ``ready()``."""
    import atexit

    from django.core.signals import request_started, setting_changed
    from django.db.backends.signals import connection_created
    from django.db.models.signals import post_save

    connection_created.connect(on_connection_created, dispatch_uid="django_icache.relay.connection")
    request_started.connect(on_request_started, dispatch_uid="django_icache.relay.request")
    post_save.connect(on_saved, dispatch_uid="django_icache.relay.saved")
    setting_changed.connect(on_setting_changed, dispatch_uid="django_icache.relay.settings")
    atexit.register(stop_all)
    from . import outbox_checks

    outbox_checks.register()
