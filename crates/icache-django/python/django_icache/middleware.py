"""``ICacheMiddleware``: pages at the edge for Django views.

Add it **first** in ``MIDDLEWARE`` (outermost, like Django's
``UpdateCacheMiddleware``), so it sees the headers every other middleware
adds (``Vary: Cookie``, ``Set-Cookie``)::

    MIDDLEWARE = ["django_icache.middleware.ICacheMiddleware", …]

For a ``GET`` or ``HEAD`` answered ``200`` whose render read ``{% icache %}``
blocks (or :meth:`ICache.fragment`), all of them from known generations, the
response gets, exactly as a Rust page behind ``icache_http::PageLayer``:

- ``ETag: W/"…"``: a digest of the page (path, query, and the request
  headers its response ``Vary``\\ s on), every token its blocks read with its
  generation (nested blocks' tokens too, also when the outer block was a
  hit) and the blocks' identities;
- the surrogate keys of those tokens (``ICACHE_SURROGATE_HEADER``:
  ``"Surrogate-Key"`` by default, ``"xkey"`` or ``"Cache-Tag"``), within
  ``ICACHE_SURROGATE_BUDGET`` bytes (default 8192; over it the page is marked
  ``private, no-cache``: fewer keys would let a proxy keep it past a bump);
- ``Cache-Control: no-cache`` (``ICACHE_PAGE_CACHE_CONTROL``) unless the view
  set one.

The middleware then keeps a *manifest* of the page (in this process): a
request with ``If-None-Match`` whose page's tokens are all where they were is
answered ``304 Not Modified`` **before the view runs** (one read of the
generations; none with ``near=tracking``). The purges of the same bumps are
:mod:`django_icache.edge`'s (``ICACHE_PURGE_URL``).

**What is never tagged**: other methods and statuses; streaming responses;
responses with cookies (``Set-Cookie``, a CSRF cookie to renew), their own
``ETag``, ``Vary: *`` or ``Cache-Control: private`` / ``no-store``
(``@never_cache``); pages with a block rendered uncached (the cache down, an
undefined token, a mangled hole) or a hole filled for the request
(``{% csrf_token %}``, ``{% nocache %}``); pages that read no token.

**Language and time zone.** The page key holds the language the request
asks for (cookie or ``Accept-Language``, as ``LocaleMiddleware`` picks it);
a time zone activated per user (a middleware of the site's) is in the
blocks' identities, so in the ETag, but not in the key of the 304 answered
before the view: such a site should vary its pages on ``Cookie`` (Django
does when the session is read). A request carrying flash messages in its
cookie is never answered from the manifest.

**Threads.** Blocks are seen through a context variable: a block rendered
in a thread the view starts itself (a ``ThreadPoolExecutor``) is seen only
if the work runs in a copy of the view's context
(``contextvars.copy_context().run``); otherwise the page is tagged from
its other blocks alone.

**The rule the page must keep**: what a tagged page shows outside its blocks
must depend only on its URL and the headers it ``Vary``\\ s on (like the
template around the blocks). Anything else (the time, a per-user greeting
outside a block keyed by ``user.id``) belongs in a block's tokens, in a
``{% nocache %}`` hole, or the view is marked ``@never_cache``.
"""

from __future__ import annotations

import contextvars
import threading

from django.core.exceptions import ImproperlyConfigured
from django.http import HttpResponseNotModified

_page: contextvars.ContextVar = contextvars.ContextVar("django_icache_page", default=None)

_lock = threading.Lock()
# (handle, settings, Pages) last built.
_pages: list = [None]


def current_page():
    """The ``_core.Page`` of the request being rendered, if the middleware
    observes it."""
    return _page.get()


def taint() -> None:
    """The page being rendered showed something no token covers: it gets no
    ETag (and no manifest)."""
    p = _page.get()
    if p is not None:
        p.taint()


def _options():
    from django.conf import settings

    header = getattr(settings, "ICACHE_SURROGATE_HEADER", "Surrogate-Key")
    budget = getattr(settings, "ICACHE_SURROGATE_BUDGET", 8192)
    control = getattr(settings, "ICACHE_PAGE_CACHE_CONTROL", "no-cache")
    if not isinstance(header, str):
        raise ImproperlyConfigured(
            f"django_icache: ICACHE_SURROGATE_HEADER must be \"Surrogate-Key\", \"xkey\" or \"Cache-Tag\", not {header!r}"
        )
    if isinstance(budget, bool) or not isinstance(budget, int) or budget < 0:
        raise ImproperlyConfigured(f"django_icache: ICACHE_SURROGATE_BUDGET must be a number of bytes, not {budget!r}")
    if not isinstance(control, str) or not control.strip():
        raise ImproperlyConfigured(f"django_icache: ICACHE_PAGE_CACHE_CONTROL must be a header value, not {control!r}")
    return header, budget, control


def check_options() -> None:
    """Raises ``ImproperlyConfigured`` for middleware settings that cannot be
    used (``manage.py check`` calls it)."""
    header, budget, control = _options()
    if header.lower() not in ("surrogate-key", "xkey", "cache-tag"):
        raise ImproperlyConfigured(
            f"django_icache: ICACHE_SURROGATE_HEADER must be \"Surrogate-Key\", \"xkey\" or \"Cache-Tag\", "
            f"not {header!r}"
        )


def pages():
    """The ``_core.Pages`` of the current cache and settings."""
    from . import icache
    from ._core import Pages

    handle = icache.handle
    opts = _options()
    held = _pages[0]
    if held is not None and held[0] is handle and held[1] == opts:
        return held[2]
    with _lock:
        held = _pages[0]
        if held is not None and held[0] is handle and held[1] == opts:
            return held[2]
        header, budget, control = opts
        try:
            p = Pages(handle, header=header, budget=budget, cache_control=control)
        except ValueError as e:
            name = "ICACHE_SURROGATE_HEADER" if "surrogate header" in str(e) else "ICACHE_PAGE_CACHE_CONTROL"
            raise ImproperlyConfigured(f"django_icache: {name}: {e}") from None
        _pages[0] = (handle, opts, p)
        return p


def _page_uri(request) -> str:
    """The page's path and query, and the language this request will be
    served in (a ``django_language`` cookie or ``Accept-Language`` choose
    it, before the view runs): a revalidation in another language is
    another page. (``#`` is never part of a request's path.)"""
    from django.conf import settings

    uri = request.get_full_path()
    if getattr(settings, "USE_I18N", False) and getattr(settings, "ICACHE_VARY_ON_LANGUAGE", True):
        from django.utils import translation

        uri += "#lang=" + (translation.get_language_from_request(request) or "")
    return uri


def _pending_messages(request) -> bool:
    """Flash messages wait in the request's cookie: the view must run (a
    304 would show the old page and keep them for later)."""
    try:
        from django.contrib.messages.storage.cookie import CookieStorage
    except ImportError:  # pragma: no cover - contrib.messages is part of Django
        return False
    return CookieStorage.cookie_name in request.COOKIES


def _request_headers(request) -> list[tuple[str, str]]:
    return [(k, v) for k, v in request.headers.items() if isinstance(v, str)]


class ICacheMiddleware:
    """ETags, surrogate keys and 304s before the view for pages made of
    ``{% icache %}`` blocks (see the module docs)."""

    sync_capable = True
    async_capable = False

    def __init__(self, get_response):
        self.get_response = get_response

    def __call__(self, request):
        if request.method not in ("GET", "HEAD"):
            return self.get_response(request)
        from ._core import Page

        p = pages()
        uri = _page_uri(request)
        headers = _request_headers(request)
        if "If-None-Match" in request.headers and not _pending_messages(request):
            kept = p.not_modified(uri, headers)
            if kept is not None:
                return _not_modified(kept)
        page = Page()
        token = _page.set(page)
        try:
            response = self.get_response(request)
        finally:
            _page.reset(token)
        if (
            getattr(response, "streaming", False)
            or page.tainted
            or page.blocks == 0
            or response.cookies
            or request.META.get("CSRF_COOKIE_NEEDS_UPDATE")
        ):
            return response
        out = list(response.headers.items())
        what, set_headers = p.tag(uri, headers, response.status_code, out, page)
        if what == "not_modified":
            return _not_modified(set_headers)
        for name, value in set_headers:
            response[name] = value
        return response


def _not_modified(headers) -> HttpResponseNotModified:
    resp = HttpResponseNotModified()
    for name, value in headers:
        # A header the 200 had twice (Vary) is one list here.
        resp[name] = f"{resp[name]}, {value}" if name in resp.headers else value
    return resp
