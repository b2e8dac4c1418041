"""Purges at the edge: for every bumped token, the purge the proxy in front
of the site understands, from the same bumps as the blocks'.

``ICACHE_PURGE_URL`` names the proxy (unset: no purges;
``ICACHE_PURGE_TIMEOUT``, seconds, bounds each purge request: default 2, and
each is tried 3 times, so a proxy that hangs costs a bump about 6 s):

- ``http://127.0.0.1:6081``: Varnish running the repository's
  ``deploy/varnish/icache.vcl`` (``PURGE`` with ``xkey-purge``, vmod xkey);
- ``fastly://SERVICE_ID?token=API_TOKEN``: Fastly's surrogate-key purge;
- ``cloudflare://ZONE_ID?token=API_TOKEN``: Cloudflare's purge by cache tag
  (set ``ICACHE_SURROGATE_HEADER = "Cache-Tag"`` for the middleware).

Where the purge runs:

- **with the outbox's relay** (``ICACHE_RELAY``; the PostgreSQL relay, the
  SQLite relay thread, the in-memory SQLite drain): after each batch's bump,
  before its rows are deleted. A purge the proxy refuses keeps the rows, so
  the batch is bumped and purged again: purges are at least once. A proxy
  that has refused for over 10 s no longer holds the rows (the site's own
  bumps must go on): its purges wait in the process, retried in the
  background until it takes them;
- **otherwise right after** ``icache.incr`` / ``incr_many`` (after the commit
  inside ``transaction.atomic()``): a purge that fails is logged and retried
  in the background (and with the next purge). A bump that failed is
  purged now and once more after the core has replayed it (it does before
  its next use of the cache), checked in the background;
- ``manage.py icache bump`` purges its tokens (an error if the proxy
  refuses); ``icache.flush()`` and ``manage.py icache flush`` purge every
  tagged page (each carries the flush token's key).

The pages' keys are the ones :class:`django_icache.middleware.ICacheMiddleware`
puts in their surrogate-key header, and the same as a Rust service's behind
``icache_http::PageLayer``: one purge reaches the pages of both.
"""

from __future__ import annotations

import logging
import threading

from ._every import Every

logger = logging.getLogger("django_icache")

_lock = threading.Lock()
# (url, Purger) of the setting last read; ("", None): no purges.
_purger: list = [None]
_warned = Every()


def purger():
    """The ``_core.Purger`` of ``ICACHE_PURGE_URL``, or ``None`` when unset.
    A malformed URL raises ``ImproperlyConfigured`` naming the bad part."""
    from django.conf import settings
    from django.core.exceptions import ImproperlyConfigured

    url = getattr(settings, "ICACHE_PURGE_URL", None) or ""
    timeout = getattr(settings, "ICACHE_PURGE_TIMEOUT", None)
    key = (url, timeout)
    held = _purger[0]
    if held is not None and held[0] == key:
        return held[1]
    with _lock:
        held = _purger[0]
        if held is not None and held[0] == key:
            return held[1]
        p = None
        if url:
            from ._core import Purger

            if timeout is not None and (isinstance(timeout, bool) or not isinstance(timeout, (int, float))):
                raise ImproperlyConfigured(
                    f"django_icache: ICACHE_PURGE_TIMEOUT must be a number of seconds, not {timeout!r}"
                )
            try:
                p = Purger(url, None if timeout is None else float(timeout))
            except ValueError as e:
                name = "ICACHE_PURGE_TIMEOUT" if "timeout" in str(e) else "ICACHE_PURGE_URL"
                raise ImproperlyConfigured(f"django_icache: {name}: {e}") from None
        _purger[0] = (key, p)
        return p


def reset() -> None:
    with _lock:
        _purger[0] = None


def defer(handle, tokens: list[str]) -> None:
    """A bump of `tokens` on `handle` (a ``_core.Cache``) failed: the core
    replays it before its next use of the cache, and until then another
    process may render these pages at the old generations. Their purge is
    sent once the handle has replayed it (checked in the background)."""
    try:
        p = purger()
    except Exception:  # noqa: BLE001 - a bad setting is reported by check and by purge()
        return
    if p is not None and tokens:
        p.defer(handle, list(tokens))


def purge(tokens: list[str], strict: bool) -> None:
    """Purges the pages of `tokens` after their bump. `strict` (a relay):
    while the proxy has refused for less than 10 s a failure raises
    ``CacheError`` so the rows stay and are retried; after that the purge
    waits in the purger (retried in the background) and the relay goes on,
    so a proxy that is down never holds back the site's bumps. Not strict:
    a failure is logged (at most every 10 s) and retried in the background."""
    from ._core import CacheError

    p = purger()
    if p is None or not tokens:
        return
    try:
        if strict:
            p.purge_for_relay(list(tokens))
        else:
            p.purge(list(tokens))
    except CacheError as e:
        if strict:
            raise
        if _warned.due():
            logger.warning(
                "django_icache: the proxy's pages of %d bumped token(s) were not purged (%s); "
                "they are sent again with the next purge",
                len(tokens),
                e,
            )


def check_edge_settings(app_configs=None, **kwargs):
    """``manage.py check``: ``django_icache.E020`` for an ``ICACHE_PURGE_URL``
    or a middleware option that cannot be used (the message names it);
    ``django_icache.W020`` when ``ICacheMiddleware`` is in ``MIDDLEWARE`` but
    not first (it would not see the cookies and ``Vary`` of the middleware
    around it)."""
    from django.conf import settings
    from django.core import checks
    from django.core.exceptions import ImproperlyConfigured

    out = []
    try:
        purger()
    except ImproperlyConfigured as e:
        out.append(checks.Error(str(e), hint="http://HOST:PORT, fastly://SERVICE?token=… or cloudflare://ZONE?token=…",
                                id="django_icache.E020"))
    url = getattr(settings, "ICACHE_PURGE_URL", None) or ""
    header = str(getattr(settings, "ICACHE_SURROGATE_HEADER", "Surrogate-Key")).lower()
    if url.startswith("cloudflare://") and header != "cache-tag":
        out.append(checks.Error(
            "django_icache: ICACHE_PURGE_URL is Cloudflare, which purges by Cache-Tag, but "
            f"ICACHE_SURROGATE_HEADER is {header!r}: no page would carry the keys its purges name",
            hint='set ICACHE_SURROGATE_HEADER = "Cache-Tag"',
            id="django_icache.E020",
        ))
    middleware = list(getattr(settings, "MIDDLEWARE", None) or [])
    name = "django_icache.middleware.ICacheMiddleware"
    if name in middleware:
        from . import middleware as mw

        try:
            mw.check_options()
        except ImproperlyConfigured as e:
            out.append(checks.Error(str(e), id="django_icache.E020"))
        if middleware[0] != name:
            out.append(checks.Warning(
                "django_icache: ICacheMiddleware is not first in MIDDLEWARE: it does not see the cookies and "
                "Vary headers the middleware around it add, and could tag pages that set a cookie",
                hint="put \"django_icache.middleware.ICacheMiddleware\" first in MIDDLEWARE",
                id="django_icache.W020",
            ))
    return out
