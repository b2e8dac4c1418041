"""``manage.py check`` for the outbox settings (registered by the app's
``ready()``), so a mistake shows at start-up, not on the first write:

- ``django_icache.E010``: ``ICACHE_WATCH`` names a model, field or template
  that cannot be watched (the message names it).
- ``django_icache.E011``: ``ICACHE_RELAY`` is not ``"thread"``/``None``, or
  the relay cannot run on ``ICACHE_DATABASE`` (no such alias, an engine
  other than PostgreSQL or SQLite). An in-memory SQLite database (tests)
  needs no relay: its outbox is applied at each commit.
"""

from __future__ import annotations

from django.core import checks
from django.core.exceptions import ImproperlyConfigured


def check_outbox_settings(app_configs=None, **kwargs):
    from django.conf import settings
    from django.db import connections

    from . import relay
    from .outbox import database_alias, dialect
    from .watch import watched

    out = []
    watch = getattr(settings, "ICACHE_WATCH", None)
    try:
        mode = relay.mode()
    except ImproperlyConfigured as e:
        out.append(checks.Error(str(e), id="django_icache.E011"))
        mode = None
    if not watch and mode is None:
        return out
    alias = database_alias()
    if alias not in connections:
        out.append(checks.Error(f"django_icache: ICACHE_DATABASE = {alias!r}, but DATABASES has no such alias",
                                id="django_icache.E011"))
        return out
    connection = connections[alias]
    try:
        dialect(connection)
    except ImproperlyConfigured as e:
        out.append(checks.Error(str(e), id="django_icache.E011"))
        return out
    if watch:
        try:
            watched(connection.vendor)
        except ImproperlyConfigured as e:
            out.append(checks.Error(str(e), id="django_icache.E010"))
    if mode == "thread" and not (connection.vendor == "sqlite" and connection.is_in_memory_db()):
        try:
            relay.database_url(connection)
        except ImproperlyConfigured as e:
            out.append(checks.Error(str(e), id="django_icache.E011"))
    return out


def register() -> None:
    checks.register(check_outbox_settings, checks.Tags.database)
