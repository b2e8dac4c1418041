"""icache.incr inside transaction.atomic(): bumped after the outermost
commit, never after a rollback; a cache that cannot be reached never fails
the caller's save (the bump is remembered and replayed)."""

import logging
import time

import pytest
from conftest import free_port, unique
from django.contrib import admin
from django.contrib.auth.models import User
from django.db import transaction
from django.test import Client
from django.test.utils import override_settings
from django.urls import path
from movieapp.models import Movie

from django_icache import CacheError, ICache, outbox
from outbox_support import SLOW_MACHINE, PersistentRedis, wait_for


@pytest.fixture(autouse=True)
def movies_table():
    from django.db import connection

    with connection.schema_editor() as editor:
        editor.create_model(Movie)
    yield
    with connection.schema_editor() as editor:
        editor.delete_model(Movie)


@pytest.fixture
def cache(use_url, redis_server):
    """The app's icache on a fresh prefix, and a second handle (another
    process's view of the same cache)."""
    url = redis_server.url(unique("tx")) + SLOW_MACHINE
    return use_url(url), ICache(url)


def test_incr_inside_atomic_is_applied_only_after_commit(cache):
    icache, other = cache
    g0 = other.get_sum(["movies"])
    with transaction.atomic():
        Movie.objects.create(title="Alien")  # the seed's post_save handler bumps 'movies'
        assert icache.incr("movies") is None  # deferred
        # A reader in between sees the old version and caches the old rows...
        assert other.get_sum(["movies"]) == g0
        assert other.fragment("list", ["movies"], lambda: "before commit") == "before commit"
    # ...which the commit's bumps invalidate.
    assert other.get_sum(["movies"]) == g0 + 2
    assert other.fragment("list", ["movies"], lambda: "after commit") == "after commit"
    assert icache.stats()["bumps_deferred"] >= 2


def test_nested_atomic_bumps_after_the_outermost_commit(cache):
    icache, other = cache
    g0 = other.get_sum(["movies", "inner"])
    with transaction.atomic():
        with transaction.atomic():
            icache.incr_many(["movies", "inner"])
        assert other.get_sum(["movies", "inner"]) == g0  # the savepoint's release is no commit
    assert other.get_sum(["movies", "inner"]) == g0 + 2


def test_a_rollback_bumps_nothing(cache):
    icache, other = cache
    g0 = other.get_sum(["movies"])
    with pytest.raises(RuntimeError):
        with transaction.atomic():
            Movie.objects.create(title="Rolled back")
            icache.incr("movies")
            raise RuntimeError("rollback")
    assert other.get_sum(["movies"]) == g0
    # A savepoint rolled back drops its bumps; the outer transaction's stay.
    with transaction.atomic():
        icache.incr("movies")
        try:
            with transaction.atomic():
                icache.incr("movies")
                raise RuntimeError("inner")
        except RuntimeError:
            pass
    assert other.get_sum(["movies"]) == g0 + 1


def test_outside_a_transaction_the_bump_is_immediate(cache):
    icache, other = cache
    g0 = other.get_sum(["movies"])
    assert icache.incr("movies") == g0 + 1
    assert icache.incr_many(["movies"], using="default") == [g0 + 2]


def test_a_dead_cache_never_fails_an_atomic_save(use_url, caplog):
    icache = use_url(f"redis://127.0.0.1:{free_port()}/0?timeout_ms=100&connect_timeout_ms=100")
    failed = icache.stats()["bumps_failed"]
    outbox._warned.reset()  # the warning is rate-limited per process
    with caplog.at_level(logging.WARNING, logger="django_icache"):
        with transaction.atomic():  # what the admin's changeform_view does
            m = Movie.objects.create(title="Saved while the cache is down")
        assert icache.incr("movies") is None  # outside a transaction: not raised either
    assert Movie.objects.filter(pk=m.pk).exists()
    assert icache.stats()["bumps_failed"] >= failed + 2
    assert any("could not be bumped" in r.getMessage() for r in caplog.records)
    # raise_errors=True: the exception, at once or at the commit.
    with pytest.raises(CacheError):
        icache.incr("movies", raise_errors=True)
    with pytest.raises(CacheError):
        with transaction.atomic():
            m2 = Movie.objects.create(title="committed, then raised")
            icache.incr("movies", raise_errors=True)
    assert Movie.objects.filter(pk=m2.pk).exists()  # the data committed before the bump failed
    with pytest.raises(CacheError):
        ICache(f"redis://127.0.0.1:{free_port()}/0?timeout_ms=100", raise_errors=True).incr("x")


site = admin.AdminSite(name="tx_admin")
site.register(Movie)
urlpatterns = [path("admin/", site.urls)]


def test_redis_killed_during_an_admin_save_the_save_succeeds_and_the_bump_lands_when_it_is_back(use_url):
    """The issue's case: the seed's post_save handler bumps inside the
    admin's atomic(); with Redis down that raised and rolled the save back
    (HTTP 500)."""
    redis = PersistentRedis()
    try:
        url = redis.url(unique("kill"))
        icache = use_url(url)
        m = Movie.objects.create(title="Kept")
        client = Client()
        client.force_login(User.objects.create_superuser(unique("admin"), "a@example.com", "pw"))
        g0 = ICache(url).get_sum(["movies"])
        redis.kill()
        # Entered after use_url's override and left before it ends (a
        # decorator's would end first and leave ROOT_URLCONF behind).
        with override_settings(ROOT_URLCONF=__name__):
            response = client.post(f"/admin/movieapp/movie/{m.pk}/change/", {"title": "Kept, edited", "rating": "3"})
        assert response.status_code == 302, response.content[:300]
        assert Movie.objects.get(pk=m.pk).title == "Kept, edited"
        redis.start()
        # The generation survived the restart (append-only file): the lost
        # bump would show. The app's handle replays it before its next read.
        assert ICache(url).get_sum(["movies"]) == g0
        started = time.monotonic()
        wait_for(lambda: _read(icache) > g0, timeout=10, what="the replayed bump")
        assert time.monotonic() - started < 10
        assert ICache(url).get_sum(["movies"]) > g0
    finally:
        redis.stop()


def _read(icache):
    try:
        return icache.get_sum(["movies"])
    except CacheError:
        return 0
