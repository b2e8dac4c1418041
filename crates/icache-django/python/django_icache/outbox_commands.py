"""``manage.py icache install`` and ``manage.py icache relay`` (registered
in the ``icache`` command's ``SUBCOMMANDS``)."""

from __future__ import annotations

import signal
import threading

from django.core.exceptions import ImproperlyConfigured
from django.core.management.base import CommandError


def _alias(options) -> str:
    from .outbox import database_alias

    return options.get("database") or database_alias()


class Install:
    help = "create the outbox (icache_outbox, icache_bump) and the triggers of ICACHE_WATCH; idempotent"

    def add_arguments(self, parser):
        parser.add_argument("--database", help="the DATABASES alias (default: ICACHE_DATABASE, else 'default')")
        parser.add_argument("--prune", action="store_true",
                            help="also drop the triggers of tables watched before but no longer in ICACHE_WATCH")

    def handle(self, command, options):
        from django.db import DatabaseError, connections

        from . import outbox, relay

        alias = _alias(options)
        if alias not in connections:
            raise CommandError(f"icache install: DATABASES has no alias {alias!r}")
        connection = connections[alias]
        try:
            models = outbox.install(connection, verbosity=options.get("verbosity", 1), stdout=command.stdout,
                                    prune=options.get("prune", False))
        except (ImproperlyConfigured, ValueError) as e:
            raise CommandError(f"icache install: {e}") from None
        except DatabaseError as e:
            raise CommandError(f"icache install: DATABASES[{alias!r}]: {e}") from None
        command.stdout.write(
            f"installed the icache outbox in DATABASES[{alias!r}] ({connection.vendor}); "
            f"{len(models)} model(s) watched"
        )
        if relay.mode() is None:
            command.stdout.write(
                "bumps now wait in icache_outbox until a relay applies them: set ICACHE_RELAY = \"thread\" "
                "or run `manage.py icache relay`"
            )


class Relay:
    help = "run the relay (outbox -> cache) in the foreground until SIGINT/SIGTERM"

    def add_arguments(self, parser):
        parser.add_argument("--database", help="the DATABASES alias (default: ICACHE_DATABASE, else 'default')")
        parser.add_argument("--poll", type=float, default=None, metavar="SECONDS",
                            help="look at the outbox at least this often (default ICACHE_RELAY_POLL, 1 s)")

    def handle(self, command, options):
        from django.db import connections

        from . import icache, relay

        alias = _alias(options)
        if alias not in connections:
            raise CommandError(f"icache relay: DATABASES has no alias {alias!r}")
        if options.get("poll") is not None and not options["poll"] > 0:
            raise CommandError("icache relay: --poll must be a number of seconds above 0")
        stop = threading.Event()

        def on_signal(signum, frame):
            stop.set()

        previous = {s: signal.signal(s, on_signal) for s in (signal.SIGINT, signal.SIGTERM)}
        try:
            try:
                r = relay.open_relay(connections[alias], icache, poll=options.get("poll"))
            except (ImproperlyConfigured, ValueError) as e:
                raise CommandError(f"icache relay: {e}") from None
            # The relay has its own connection; Django's is not needed.
            connections[alias].close()
            command.stdout.write(f"relaying DATABASES[{alias!r}] -> {icache.url} (Ctrl-C to stop)")
            command.stdout.flush()
            try:
                while not stop.wait(1.0):
                    if options.get("verbosity", 1) >= 2:
                        command.stdout.write(f"{r.stats()}")
            finally:
                r.stop()
            s = r.stats()
            command.stdout.write(f"stopped: {s.get('rows', 0)} row(s), {s.get('bumps', 0)} bump(s) applied")
        finally:
            for s, handler in previous.items():
                signal.signal(s, handler)


SUBCOMMANDS = {"install": Install, "relay": Relay}
