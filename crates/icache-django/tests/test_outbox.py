"""The outbox from Django, on a real PostgreSQL and a SQLite file, with
Redis: ICACHE_WATCH triggers made by `manage.py icache install`, the relay
in the process (ICACHE_RELAY = "thread") or in the foreground
(`manage.py icache relay`), and read-your-writes: when a write returns, its
bumps are applied.

Every writer counts, not only our code: QuerySet.update(), bulk_create,
delete(), the admin's save inside atomic(), raw SQL from another client.
"""

from __future__ import annotations

import io
import os
import signal
import sqlite3
import threading
import time

import pytest
from conftest import missing, unique
from django.contrib import admin
from django.contrib.auth.models import User
from django.core.exceptions import ImproperlyConfigured
from django.core.management import CommandError, call_command
from django.db import connection as default_connection
from django.db import router, transaction
from django.test import Client
from django.test.utils import override_settings
from django.urls import path

import outbox_models  # noqa: F401 - registers the models
from django_icache import ICache, relay
from outbox_models import ObFilm, ObOdd, ObRating, ObSpecialFilm, ObViewer
from outbox_support import SLOW_MACHINE, PersistentRedis, create_tables, database, start_postgres, wait_for

ALIAS = "outbox"
WATCH = {"movieapp.ObFilm": ["movies", "movie:{pk}"], "movieapp.ObRating": ["movies", "{user_id}"]}

# ---- the admin, on the outbox database ------------------------------------------

site = admin.AdminSite(name="outbox_admin")
site.register(ObFilm)
urlpatterns = [path("admin/", site.urls)]


class Router:
    """The Ob* models live in the outbox database (so the admin's atomic()
    is opened there, as on a site with one database)."""

    def _route(self, model, **hints):
        return ALIAS if model._meta.model_name.startswith("ob") else None

    db_for_read = db_for_write = _route

    def allow_relation(self, a, b, **hints):
        return True


@pytest.fixture(scope="module")
def pg():
    try:
        import psycopg  # noqa: F401 - Django's PostgreSQL driver
    except ImportError:
        missing("psycopg (pip install 'psycopg[binary]')")
    server = start_postgres()
    yield server
    server.stop()


class Env:
    def __init__(self, kind, conn, icache, other, url, pg=None, path=None):
        self.kind, self.conn, self.icache, self.other, self.url = kind, conn, icache, other, url
        self.pg, self.path, self.dbname = pg, path, conn.settings_dict["NAME"]

    def sql(self, statement: str) -> str:
        """Runs SQL as another client of the database (psql, or Python's
        sqlite3 on the file): no code of ours runs."""
        if self.kind == "postgres":
            return self.pg.psql(statement, db=self.dbname)
        db = sqlite3.connect(self.path, timeout=10, isolation_level=None)
        try:
            rows = db.execute(statement).fetchall()
        finally:
            db.close()
        return "\n".join("|".join(str(c) for c in r) for r in rows)

    def pending(self) -> int:
        return int(self.sql("SELECT count(*) FROM icache_outbox"))

    def gen(self, *tokens) -> int:
        return self.other.get_sum(list(tokens))

    def block(self, value, tokens=("movies",)) -> str:
        return self.icache.fragment("films", list(tokens), lambda: value)


def _open(request, kind, tmp_path):
    if kind == "postgres":
        server = request.getfixturevalue("pg")
        name = unique("db")
        server.psql(f"CREATE DATABASE {name}")
        conf, path = server.settings(name), None
    else:
        server, path = None, str(tmp_path / "app.db")
        conf = {"ENGINE": "django.db.backends.sqlite3", "NAME": path}
    return server, conf, path


@pytest.fixture(params=["postgres", "sqlite"])
def env(request, tmp_path, use_url, redis_server):
    kind = request.param
    server, conf, path = _open(request, kind, tmp_path)
    url = redis_server.url(unique("ob")) + SLOW_MACHINE
    icache = use_url(url)
    overrides = override_settings(
        ICACHE_DATABASE=ALIAS, ICACHE_RELAY="thread", ICACHE_WATCH=WATCH,
        ICACHE_RELAY_POLL=0.2, ROOT_URLCONF=__name__,
    )
    overrides.enable()
    router.__dict__["routers"] = [Router()]
    try:
        with database(ALIAS, conf) as conn:
            create_tables(conn, ObViewer, ObFilm, ObRating, ObSpecialFilm, ObOdd)
            call_command("icache", "install", database=ALIAS, stdout=io.StringIO())
            yield Env(kind, conn, icache, ICache(url), url, server, path)
            relay.stop_all()
    finally:
        router.__dict__.pop("routers", None)
        overrides.disable()
        relay.stop_all()


def test_install_is_idempotent_and_raw_sql_from_another_client_invalidates(env):
    out = io.StringIO()
    call_command("icache", "install", database=ALIAS, stdout=out)  # again: nothing breaks
    assert "movieapp.ObFilm" in out.getvalue() and "installed" in out.getvalue()
    film = ObFilm.objects.create(title="Alien")
    assert env.block("v1") == "v1" and env.block("v2") == "v1"  # cached
    g0, m0 = env.gen("movies"), env.gen(f"movie:{film.pk}")
    env.sql(f"UPDATE movieapp_obfilm SET title = 'Aliens' WHERE id = {film.pk}")
    wait_for(lambda: env.gen("movies") > g0, what="the relay applying psql's update")
    assert env.gen(f"movie:{film.pk}") > m0
    assert env.block("v3") == "v3"
    wait_for(lambda: env.pending() == 0, what="an empty outbox")


def test_update_bulk_create_and_delete_invalidate_at_once(env):
    films = ObFilm.objects.bulk_create([ObFilm(title=f"f{i}") for i in range(3)])
    shown = env.block("initial")
    for step, write in enumerate(
        [
            lambda: ObFilm.objects.filter(title__startswith="f").update(title="g"),
            lambda: ObFilm.objects.bulk_create([ObFilm(title="new")]),
            lambda: ObFilm.objects.filter(title="new").delete(),
            lambda: ObFilm.objects.all().delete(),
        ]
    ):
        assert env.block("stale") == shown  # cached
        write()
        # Read your own writes: applied before the write returned.
        shown = f"after {step}"
        assert env.block(shown) == shown, f"step {step} did not invalidate"
    assert not ObFilm.objects.exists() and films


def test_an_admin_save_inside_atomic_invalidates_before_the_response(env):
    film = ObFilm.objects.create(title="Alien")
    user = User.objects.create_superuser(unique("admin"), "a@example.com", "pw")
    client = Client()
    client.force_login(user)
    assert env.block("old title") == "old title"
    g = env.gen(f"movie:{film.pk}")
    response = client.post(f"/admin/movieapp/obfilm/{film.pk}/change/", {"title": "Aliens"})
    assert response.status_code == 302, response.content[:500]
    assert ObFilm.objects.get(pk=film.pk).title == "Aliens"
    assert env.gen(f"movie:{film.pk}") > g  # applied before the response
    assert env.block("new title") == "new title"


def test_a_rollback_invalidates_nothing(env):
    film = ObFilm.objects.create(title="Alien")
    assert env.block("v1") == "v1"
    g0 = env.gen("movies", f"movie:{film.pk}")
    with pytest.raises(RuntimeError):
        with transaction.atomic(using=ALIAS):
            ObFilm.objects.filter(pk=film.pk).update(title="never")
            env.icache.incr("movies")
            raise RuntimeError("rollback")
    assert relay.flush(ALIAS, timeout=5)
    assert env.pending() == 0
    assert env.gen("movies", f"movie:{film.pk}") == g0
    assert env.block("v2") == "v1"


def test_a_rating_moved_between_users_invalidates_both(env):
    a, b = ObViewer.objects.create(name="a"), ObViewer.objects.create(name="b")
    film = ObFilm.objects.create(title="Alien")
    rating = ObRating.objects.create(user=a, film=film, stars=3)
    ga, gb = env.gen(str(a.pk)), env.gen(str(b.pk))
    ObRating.objects.filter(pk=rating.pk).update(user=b)
    assert env.gen(str(a.pk)) > ga and env.gen(str(b.pk)) > gb
    # A NULL user is the token of None (django_icache.token(None)).
    gn = env.gen(None)
    ObRating.objects.filter(pk=rating.pk).update(user=None)
    assert env.gen(None) > gn


def test_incr_inside_atomic_goes_through_the_outbox(env):
    before = env.icache.stats()["bumps_to_outbox"]
    g0 = env.gen("custom")
    with transaction.atomic(using=ALIAS):
        ObViewer.objects.create(name="x")
        assert env.icache.incr("custom") is None
        assert env.gen("custom") == g0  # a reader in between: the old version
    assert env.gen("custom") == g0 + 1  # applied by the relay before atomic() returned
    stats = env.icache.stats()
    assert stats["bumps_to_outbox"] == before + 1
    assert stats["relay_rows"] >= 1 and stats["relay_bumps"] >= 1
    assert env.pending() == 0


def test_redis_killed_during_an_admin_save_the_save_succeeds_and_the_relay_applies_it_later(env, use_url):
    redis = PersistentRedis()
    try:
        relay.stop_all()
        url = redis.url(unique("kill"))
        icache = use_url(url)
        film = ObFilm.objects.create(title="Alien")
        user = User.objects.create_superuser(unique("admin"), "a@example.com", "pw")
        client = Client()
        client.force_login(user)
        g0 = ICache(url).get_sum([f"movie:{film.pk}"])
        redis.kill()
        started = time.monotonic()
        response = client.post(f"/admin/movieapp/obfilm/{film.pk}/change/", {"title": "Aliens"})
        assert response.status_code == 302
        assert time.monotonic() - started < 5  # the flush does not hang the response
        assert ObFilm.objects.get(pk=film.pk).title == "Aliens"
        assert env.pending() > 0  # the bumps wait in the outbox
        redis.start()
        assert ICache(url).get_sum([f"movie:{film.pk}"]) == g0  # the data survived; the bump is not there yet
        wait_for(lambda: env.pending() == 0, timeout=15, what="the relay draining the outbox")
        assert ICache(url).get_sum([f"movie:{film.pk}"]) > g0
        assert icache is not None
    finally:
        redis.stop()


@pytest.mark.parametrize("signum", [signal.SIGTERM, signal.SIGINT])
def test_relay_command_runs_in_the_foreground_until_sigterm(env, signum):
    relay.stop_all()
    with override_settings(ICACHE_RELAY=None):
        film = ObFilm.objects.create(title="Alien")
        g0 = env.gen(f"movie:{film.pk}")
        env.sql(f"DELETE FROM movieapp_obfilm WHERE id = {film.pk}")
        assert env.pending() > 0  # nobody relays
        done = threading.Event()

        def stop_when_applied():
            try:
                wait_for(lambda: env.gen(f"movie:{film.pk}") > g0, timeout=15, what="the relay command")
            finally:
                done.set()
                os.kill(os.getpid(), signum)

        t = threading.Thread(target=stop_when_applied)
        t.start()
        out = io.StringIO()
        call_command("icache", "relay", database=ALIAS, poll=0.2, stdout=out)
        t.join()
        assert done.is_set()
        assert "relaying" in out.getvalue() and "stopped" in out.getvalue()
        assert env.gen(f"movie:{film.pk}") > g0
        assert env.pending() == 0


def test_the_migration_operation_installs_the_same_triggers(env):
    from django.apps import apps
    from django.db.migrations.state import ProjectState

    from django_icache.operations import InstallOutbox

    call_command("icache", "install", database=ALIAS, stdout=io.StringIO())
    op = InstallOutbox(watch={"movieapp.ObViewer": ["viewer:{pk}"]})
    state = ProjectState.from_apps(apps)
    with env.conn.schema_editor() as editor:
        op.database_forwards("movieapp", editor, state, state)
    v = ObViewer.objects.create(name="x")
    g = env.gen(f"viewer:{v.pk}")
    env.sql(f"UPDATE movieapp_obviewer SET name = 'y' WHERE id = {v.pk}")
    wait_for(lambda: env.gen(f"viewer:{v.pk}") > g, what="the migration's trigger")
    with env.conn.schema_editor() as editor:
        op.database_backwards("movieapp", editor, state, state)
    assert env.sql("SELECT count(*) FROM icache_watch WHERE table_name = 'movieapp_obviewer'") == "0"
    wait_for(lambda: env.pending() == 0, what="an empty outbox")
    g = env.gen(f"viewer:{v.pk}")
    env.sql(f"UPDATE movieapp_obviewer SET name = 'z' WHERE id = {v.pk}")
    assert env.pending() == 0  # no trigger wrote a row
    assert relay.flush(ALIAS, 5), relay.get().stats()
    assert env.gen(f"viewer:{v.pk}") == g  # unwatched
    assert op.deconstruct()[2] == {"watch": {"movieapp.ObViewer": ["viewer:{pk}"]}}


def test_other_engines_are_improperly_configured_by_name():
    with database("elsewhere", {"ENGINE": "django.db.backends.dummy"}):
        with pytest.raises(CommandError, match="django.db.backends.dummy"):
            call_command("icache", "install", database="elsewhere", stdout=io.StringIO())
        with override_settings(ICACHE_RELAY="thread", ICACHE_DATABASE="elsewhere"):
            with pytest.raises(ImproperlyConfigured, match="django.db.backends.dummy.*PostgreSQL.*SQLite"):
                relay.get()
    with override_settings(ICACHE_RELAY="process"):
        with pytest.raises(ImproperlyConfigured, match="ICACHE_RELAY = 'process'"):
            relay.mode()
    with override_settings(ICACHE_RELAY="thread"):  # the suite's default database is in memory
        with pytest.raises(ImproperlyConfigured, match="in-memory"):
            relay.database_url(default_connection)


def test_database_urls_from_databases_settings():
    from types import SimpleNamespace

    def url(**s):
        return relay.database_url(SimpleNamespace(vendor="postgresql", alias="default", settings_dict=s))

    assert url(NAME="app", USER="u", PASSWORD="p@ss", HOST="db.local", PORT="5433") == \
        "postgresql://u:p%40ss@db.local:5433/app"
    assert url(NAME="app", USER="u") == "postgresql://u@/app?host=%2Fvar%2Frun%2Fpostgresql"
    assert url(NAME="app", HOST="/run/pg", PORT="6000", OPTIONS={"sslmode": "disable"}) == \
        "postgresql:///app?host=%2Frun%2Fpg&port=6000&sslmode=disable"
    assert url(NAME="app", HOST="::1") == "postgresql://[::1]/app"


def test_a_forked_worker_runs_its_own_relay(env):
    """gunicorn --preload, multiprocessing: the parent's relay threads do
    not exist in a forked child; it starts its own on first use (and never
    joins the parent's)."""
    parent = relay.get()
    film = ObFilm.objects.create(title="Alien")
    g0 = env.gen(f"movie:{film.pk}")
    pid = os.fork()
    if pid == 0:  # the child: no pytest, no cleanup, an exit code only
        code = 1
        try:
            mine = relay.get()
            env.sql(f"UPDATE movieapp_obfilm SET title = 'forked' WHERE id = {film.pk}")
            if mine is not parent and relay.flush(ALIAS, 10) and ICache(env.url).get_sum([f"movie:{film.pk}"]) > g0:
                code = 0
        finally:
            os._exit(code)
    _, status = os.waitpid(pid, 0)
    assert os.waitstatus_to_exitcode(status) == 0
    assert relay.get() is parent
    assert env.gen(f"movie:{film.pk}") > g0


def test_install_reports_and_prunes_tables_no_longer_in_icache_watch(env):
    with override_settings(ICACHE_WATCH={"movieapp.ObFilm": WATCH["movieapp.ObFilm"]}):
        out = io.StringIO()
        call_command("icache", "install", database=ALIAS, stdout=out)
        assert "movieapp_obrating: still watched" in out.getvalue()
        out = io.StringIO()
        call_command("icache", "install", "--prune", database=ALIAS, stdout=out)
        assert "movieapp_obrating: unwatched" in out.getvalue()
        a = ObViewer.objects.create(name="a")
        film = ObFilm.objects.create(title="Alien")
        ga = env.gen(str(a.pk))
        ObRating.objects.create(user=a, film=film)
        assert relay.flush(ALIAS, 5)
        assert env.gen(str(a.pk)) == ga  # ratings bump nothing any more
        assert env.sql("SELECT DISTINCT table_name FROM icache_watch") == "movieapp_obfilm"


def _child_connection() -> None:
    """In a forked child: a connection of its own. The parent's is kept
    referenced (never closed here: closing would end the parent's session)."""
    from django.db import connections

    conn = connections[ALIAS]
    _kept.append(conn.connection)
    conn.connection = None


_kept: list = []


def test_a_writer_killed_right_after_its_commit_loses_no_bump(env):
    """incr inside atomic() with the outbox installed writes the token in the
    transaction itself: a process SIGKILLed right after COMMIT, before any
    code of ours runs, still bumps (through this process's relay)."""
    from django.conf import settings

    relay.get()
    g0 = env.gen("killed")
    pid = os.fork()
    if pid == 0:
        try:
            _child_connection()
            settings.ICACHE_RELAY = None  # no read-your-writes wait: nothing of ours after COMMIT
            with transaction.atomic(using=ALIAS):
                # The first callback after COMMIT kills the process: a bump
                # deferred to on_commit would never run.
                transaction.on_commit(lambda: os.kill(os.getpid(), signal.SIGKILL), using=ALIAS)
                ObViewer.objects.create(name="doomed writer")
                env.icache.incr("killed")
        finally:
            os._exit(3)
    _, status = os.waitpid(pid, 0)
    assert os.WIFSIGNALED(status) and os.WTERMSIG(status) == signal.SIGKILL, status
    assert ObViewer.objects.filter(name="doomed writer").exists()
    assert relay.flush(ALIAS, 10)
    assert env.gen("killed") == g0 + 1


def test_the_native_relay_names_bad_urls_and_survives_a_database_that_is_down(use_url):
    from conftest import free_port

    from django_icache import _core

    icache = use_url("memory://")
    with pytest.raises(ValueError, match="mysql"):
        _core.Relay("mysql://root:secret@db/app", icache.handle)
    with pytest.raises(ValueError) as e:
        _core.Relay("postgresql://u:hunter2@127.0.0.1:notaport/app", icache.handle)
    assert "hunter2" not in str(e.value)
    with pytest.raises(ValueError, match="dialect"):
        _core.outbox_install_sql("mysql")
    # Nothing listens there: the relay starts anyway and retries.
    r = _core.Relay(f"postgresql://postgres@127.0.0.1:{free_port()}/app", icache.handle, 50)
    try:
        assert r.flush(float("nan")) is False
        assert r.flush(0.05) is False
        wait_for(lambda: r.stats()["errors"] > 0, what="a failed connect")
        assert r.stats()["last_error"]
    finally:
        r.stop()
    assert r.flush(1.0) is False  # stopped
    r.stop()  # twice is fine


def test_in_memory_sqlite_applies_its_outbox_at_each_commit(use_url, redis_server):
    """Django's default test database is SQLite in memory, which no relay
    thread or command can open: its outbox is applied through Django's own
    connection right after each commit, with or without ICACHE_RELAY."""
    from django.db import connection

    from django_icache import outbox

    url = redis_server.url(unique("mem")) + SLOW_MACHINE
    icache, other = use_url(url), ICache(url)
    block = lambda v: icache.fragment("films", ["movies"], lambda: v)  # noqa: E731
    watch = {"movieapp.ObFilm": ["movies", "movie:{pk}"], "movieapp.ObRating": ["movies", "{user_id}"]}
    models = (ObViewer, ObFilm, ObRating, ObSpecialFilm, ObOdd)
    for relay_mode in ("thread", None):
        with override_settings(ICACHE_WATCH=watch, ICACHE_RELAY=relay_mode, ROOT_URLCONF=__name__):
            create_tables(connection, *models)
            try:
                call_command("icache", "install", stdout=io.StringIO())
                film = ObFilm.objects.create(title="Alien")
                shown = block(f"{relay_mode} 0")
                for step, write in enumerate([
                    lambda: ObFilm.objects.filter(pk=film.pk).update(title="Aliens"),
                    lambda: ObFilm.objects.bulk_create([ObFilm(title="new")]),
                    lambda: ObFilm.objects.filter(title="new").delete(),
                ]):
                    assert block("stale") == shown
                    write()
                    shown = f"{relay_mode} {step + 1}"
                    assert block(shown) == shown, f"step {step} did not invalidate"
                g = other.get_sum(["movies"])
                with pytest.raises(RuntimeError):
                    with transaction.atomic():
                        ObFilm.objects.update(title="never")
                        raise RuntimeError("rollback")
                assert other.get_sum(["movies"]) == g
                client = Client()
                client.force_login(User.objects.create_superuser(unique("admin"), "a@example.com", "pw"))
                response = client.post(f"/admin/movieapp/obfilm/{film.pk}/change/", {"title": "Admin's"})
                assert response.status_code == 302
                assert other.get_sum(["movies"]) > g
                with connection.cursor() as c:
                    c.execute("SELECT count(*) FROM icache_outbox")
                    assert c.fetchone()[0] == 0
            finally:
                with connection.schema_editor() as editor:
                    for m in reversed(models):
                        editor.delete_model(m)
                with connection.cursor() as c:
                    c.execute("DROP TABLE IF EXISTS icache_outbox")
                    c.execute("DROP TABLE IF EXISTS icache_watch")
                outbox.forget_installed()


# ---- purges ride on the relay (issue 21) ---------------------------------------------

from django_icache._core import surrogate_key  # noqa: E402
from edge_support import proxy, purged  # noqa: E402, F401 - the fixture


def test_the_relay_purges_each_batch_after_its_bump(env, proxy):
    token = unique("edge")
    with transaction.atomic(using=ALIAS):
        ObViewer.objects.create(name="x")
        env.icache.incr(token)
        assert purged(proxy) == set(), "purged before the commit"
    assert wait_for(lambda: surrogate_key(token) in purged(proxy), 10), proxy.seen
    assert env.pending() == 0


def test_a_refused_purge_keeps_the_rows_until_the_proxy_takes_it(env, proxy):
    token = unique("edge")
    proxy.status = 503
    with override_settings(ICACHE_RELAY_FLUSH_TIMEOUT=0.5):
        g0 = env.gen(token)
        with transaction.atomic(using=ALIAS):
            env.icache.incr(token)
        assert wait_for(lambda: env.gen(token) > g0, 10), "the relay did not bump"
        assert env.pending() >= 1, "rows deleted although their purge failed"
        proxy.status = 200
        assert wait_for(lambda: env.pending() == 0, 15), "rows not applied after the proxy came back"
    assert surrogate_key(token) in purged(proxy)
