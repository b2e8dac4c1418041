"""``InstallOutbox``: ``manage.py icache install`` as a migration operation.

::

    from django.db import migrations
    from django_icache.operations import InstallOutbox

    class Migration(migrations.Migration):
        dependencies = [("movies", "0002_rating")]
        operations = [InstallOutbox()]

It creates the outbox and the triggers of ``ICACHE_WATCH`` (or of
``watch=``, the same mapping) with the migration's own models, so the
columns are those of that point in the history; idempotent. Run it again in
a later migration after changing a watched model or the mapping. Backwards,
it drops the triggers it made (the outbox stays: rows may still wait in
it).
"""

from __future__ import annotations

from django.db.migrations.operations.base import Operation


class _Watch:
    def __init__(self, watch):
        self.ICACHE_WATCH = watch


class InstallOutbox(Operation):
    reduces_to_sql = False
    reversible = True
    elidable = False

    def __init__(self, watch: dict | None = None):
        self.watch = watch

    def deconstruct(self):
        kwargs = {} if self.watch is None else {"watch": self.watch}
        return (self.__class__.__qualname__, [], kwargs)

    def state_forwards(self, app_label, state):
        pass

    def _settings(self):
        return None if self.watch is None else _Watch(self.watch)

    def database_forwards(self, app_label, schema_editor, from_state, to_state):
        from .outbox import install

        install(schema_editor.connection, apps=to_state.apps, settings=self._settings())

    def database_backwards(self, app_label, schema_editor, from_state, to_state):
        from . import _core
        from .outbox import dialect
        from .watch import watched

        connection = schema_editor.connection
        d = dialect(connection)
        with connection.cursor() as c:
            for w in watched(connection.vendor, apps=from_state.apps, settings=self._settings()):
                for sql in _core.outbox_unwatch_sql(d, w.table):
                    c.execute(sql)

    def describe(self):
        return "Install the icache outbox and the triggers of " + ("ICACHE_WATCH" if self.watch is None else "watch=")

    @property
    def migration_name_fragment(self):
        return "icache_install_outbox"
