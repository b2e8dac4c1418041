"""django_icache: timeout-less template-fragment caching for Django, on icache's
Rust core.

Add ``"django_icache"`` to ``INSTALLED_APPS``; then, as in the original app::

    from django_icache import icache
    icache.incr("movies")          # after the commit that changed movies

    {% load icache %}
    {% icache 'movies-personal-rating' 'movies' user.id %}…{% endicache %}

The cache is Django's own ``CACHES`` entry (``ICACHE_CACHE``, default
``"default"``) or the ``ICACHE_URL`` setting; see :mod:`django_icache.conf`.
"""

from __future__ import annotations

import os
import pickle
import threading
import weakref
from typing import Any, Callable, Iterable

from ._core import Cache, CacheError, flush_log
from ._tokens import token_value as token

__all__ = ["icache", "ICache", "CacheError", "token", "FLUSH_TOKEN"]

#: The token every block also reads (``ICache::FLUSH_TOKEN``): ``flush()``
#: bumps it, and its surrogate key is on every tagged page.
FLUSH_TOKEN = "icache:flush"

def _tokens(tokens: Iterable[Any]) -> list[str]:
    if isinstance(tokens, (str, bytes)):
        raise TypeError("tokens must be a list of tokens, not one string: incr_many(['movies'])")
    return [token(t) for t in tokens]


class ICache:
    """The original app's ``icache`` object, with the fixed semantics of the
    Rust core. Lazy: the backend is opened on first use, from the settings."""

    def __init__(self, url: str | None = None, raise_errors: bool = False):
        self._url = url
        self._raise_errors = raise_errors
        self._handle: Cache | None = None
        self._lock = threading.Lock()
        _instances.add(self)

    # ---- the handle -------------------------------------------------------------

    @property
    def handle(self) -> Cache:
        """The native handle (opened on first use)."""
        h = self._handle
        if h is None:
            with self._lock:
                h = self._handle
                if h is None:
                    h = self._handle = self._open()
        return h

    def _open(self) -> Cache:
        from django.core.exceptions import ImproperlyConfigured

        if self._url is not None:
            url, source = self._url, "ICache(url=…)"
        else:
            from django.conf import settings

            from .conf import cache_url

            url = cache_url(settings)
            if getattr(settings, "ICACHE_URL", None):
                source = "ICACHE_URL"
            else:
                source = f"CACHES[{getattr(settings, 'ICACHE_CACHE', None) or 'default'!r}]"
        try:
            return Cache(url)
        except ValueError as e:
            raise ImproperlyConfigured(f"django_icache: {source}: {e}; set ICACHE_URL to a valid icache URL") from None

    def reset(self) -> None:
        """Forgets the handle: the next call opens it again from the settings
        (done automatically when a test changes CACHES, ICACHE_URL or
        ICACHE_CACHE)."""
        with self._lock:
            self._handle = None

    @property
    def url(self) -> str:
        """The URL in use, password hidden."""
        return self.handle.url

    @property
    def backend(self) -> str:
        return self.handle.backend

    def stats(self) -> dict:
        """This process's counters: hits, misses, stores, errors, …, and the
        bumps failed, deferred to a commit or written to the outbox."""
        from . import outbox

        return {**self.handle.stats(), **outbox.counts()}

    def ping(self) -> None:
        """Raises CacheError when the backend does not answer."""
        self.handle.ping()

    def flush(self) -> int:
        """Every block misses once (one epoch bump in the backend, seen by
        every process on this cache; nothing is deleted): for the changes no
        token or digest sees. Returns the new epoch. With ``ICACHE_PURGE_URL``,
        every page the middleware tagged is purged at the proxy too (they all
        carry the flush token's key); a purge that fails is logged and
        retried."""
        from . import edge

        epoch = self.handle.flush()
        edge.purge([FLUSH_TOKEN], strict=False)
        return epoch

    # ---- the seed's five methods ------------------------------------------------

    def incr(self, value: Any, *, using: str | None = None, raise_errors: bool | None = None) -> int | None:
        """Bumps a token's generation (atomically, in the backend) and returns
        the new one. A token with no generation gets a fresh random one, never
        0: the first bump is never lost. Inside ``transaction.atomic()`` the
        bump waits for the commit (``None`` is returned) and a rollback
        cancels it; a cache failure is logged, not raised, unless
        ``raise_errors=True`` (see :mod:`django_icache.outbox`)."""
        from . import outbox

        raise_errors = self._raise_errors if raise_errors is None else raise_errors
        done = outbox.bump(self, [token(value)], using, raise_errors, single=True)
        return done[0] if done else None

    def incr_many(
        self, tokens: Iterable[Any], *, using: str | None = None, raise_errors: bool | None = None
    ) -> list[int] | None:
        """Bumps several tokens in one round trip (transactions and failures
        as :meth:`incr`)."""
        from . import outbox

        raise_errors = self._raise_errors if raise_errors is None else raise_errors
        return outbox.bump(self, _tokens(tokens), using, raise_errors)

    def get_sum(self, tokens: Iterable[Any]) -> int:
        """The version of a set of tokens: the sum of their generations."""
        return self.handle.get_sum(_tokens(tokens))

    def set_versioned(self, key: str, value: Any, version: int) -> None:
        """Stores ``value`` with ``version``, without expiry. ``str`` and
        ``bytes`` are stored as they are (a Rust service reads the same text
        or bytes); anything else is pickled, as Django's cache does, and the
        entry's header (not its bytes) records that it is a pickle.

        **Trust.** :meth:`get_versioned` unpickles only entries whose header
        says "pickle", which only this method writes: bytes a Rust service
        stores with ``set_versioned_bytes`` come back as ``bytes`` whatever
        they start with. Whoever can write to the cache server itself can
        still write any entry, header included, as with Django's own cache:
        keep the server private."""
        key = str(key)
        if isinstance(value, (str, bytes)):
            self.handle.set_versioned(key, value, version)
        else:
            self.handle.set_versioned_pickle(key, pickle.dumps(value, pickle.HIGHEST_PROTOCOL), version)

    def get_versioned(self, key: str, version: int) -> Any:
        """The value stored under ``key`` with exactly ``version``, else
        ``None``. A mismatch deletes nothing (the original deleted the entry:
        a slow reader could destroy a fresher one)."""
        found = self.handle.get_versioned_value(str(key), version)
        if found is None:
            return None
        kind, value = found
        if kind == "pickle":
            return pickle.loads(value)
        return value

    # ---- cached blocks in Python code ------------------------------------------

    def fragment(
        self,
        name: str,
        tokens: Iterable[Any],
        render: Callable[[], str],
        stale: bool | None = None,
    ) -> str:
        """A cached block outside templates (Rust's ``fragment``):
        ``render()`` runs only on a miss, once per process for concurrent
        misses; the output is kept until a token is bumped. A Rust service
        using ``fragment(name, tokens, …)`` on the same cache shares the
        entry. ``stale=True`` serves the block's previous body while another
        process renders the new one (``stale=render`` for this block);
        ``None`` keeps the cache's choice."""
        from .middleware import current_page

        options: dict = {} if stale is None else {"stale": bool(stale)}
        page = current_page()  # ICacheMiddleware: the page learns what it read
        if page is not None:
            options["page"] = page
        return self.handle.fragment(str(name), _tokens(tokens), render, **options)

    def __repr__(self) -> str:
        h = self._handle
        return f"<django_icache.ICache {h.url if h is not None else '(not opened yet)'}>"


# A forked worker (gunicorn --preload, multiprocessing) must not share its
# parent's connections: it opens its own handle on first use. The parent's is
# kept, not dropped: its sockets and threads belong to the parent.
_instances: "weakref.WeakSet[ICache]" = weakref.WeakSet()
_inherited: list = []


def _after_fork_in_child() -> None:
    for inst in list(_instances):
        if inst._handle is not None:
            _inherited.append(inst._handle)
        inst._handle = None
        inst._lock = threading.Lock()


if hasattr(os, "register_at_fork"):
    os.register_at_fork(after_in_child=_after_fork_in_child)


#: The process-wide object, as in the original: ``from django_icache import icache``.
icache = ICache()
