"""``manage.py check``: what of the cache settings icache cannot honour.

- ``django_icache.E001``: the backend is not one icache can share.
- ``django_icache.E002``: an option (OPTIONS, LOCATION) cannot be honoured.
- ``django_icache.E003``: ``KEY_FUNCTION`` (icache's keys are its own).
- ``django_icache.E004``: no such alias, or no LOCATION.
- ``django_icache.E005``: the URL does not open (the message names the part).
- ``django_icache.W001``: LocMemCache: one cache per process, so with several
  workers (gunicorn, uwsgi) a bump reaches only the worker that made it and
  the others keep serving what they stored.
- ``django_icache.W002``: an option that is not honoured (LocMem's
  MAX_ENTRIES: memory:// is bounded by bytes).
"""

from __future__ import annotations

from django.core import checks


@checks.register(checks.Tags.caches)
def check_icache_settings(app_configs=None, **kwargs):
    from django.conf import settings

    from ._core import Cache
    from .conf import translate

    url, problems = translate(settings)
    out = []
    for p in problems:
        cls = checks.Error if p.level == "error" else checks.Warning
        out.append(cls(f"django_icache: {p.msg}", hint=p.hint or None, id=p.id))
    if url is not None:
        try:
            cache = Cache(url)
        except ValueError as e:
            source = "ICACHE_URL" if getattr(settings, "ICACHE_URL", None) else "CACHES"
            out.append(checks.Error(f"django_icache: {source}: {e}", hint="set ICACHE_URL to a valid icache URL", id="django_icache.E005"))
        else:
            if cache.backend == "memory" and not getattr(settings, "ICACHE_URL", None):
                out.append(checks.Warning(
                    "django_icache: the cache is LocMemCache (memory://), one per process: with several "
                    "worker processes a bump (icache.incr) reaches only the worker that made it, and the "
                    "others keep serving their old blocks",
                    hint="use Redis or memcached in production (or ICACHE_URL), or silence "
                    "django_icache.W001 for a single-process site",
                    id="django_icache.W001",
                ))
    return out
