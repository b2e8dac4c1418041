"""``manage.py icache SUBCOMMAND …``: operating django_icache the Django way,
on the cache the settings name (``ICACHE_URL``/``ICACHE_CACHE``).

- ``bump TOKEN…``: bump tokens (as ``icache.incr``); prints each new generation,
  then purges their pages at the proxy (``ICACHE_PURGE_URL``).
- ``version TOKEN…``: each token's generation and their sum (a block's version).
- ``flush``: one epoch bump: every block misses once (for what no digest or
  token sees). Entries are not deleted; they are overwritten as pages render.
  The proxy's tagged pages are purged too (``ICACHE_PURGE_URL``).
- ``stats``: the backend's own counters (Redis INFO, memcached stats…), then
  this process's (``process.hits``…).

Subcommands are classes in ``SUBCOMMANDS`` (name → class with ``help``,
``add_arguments(parser)`` and ``handle(command, options)``): another part of
the app adds its own there (``install``, ``relay``…) without a new command.
"""

from __future__ import annotations

from django.core.management.base import BaseCommand, CommandError

from ... import CacheError, icache, outbox_commands


class Bump:
    help = "bump tokens (icache.incr): every block using one renders again once"

    def add_arguments(self, parser):
        parser.add_argument("tokens", nargs="+", metavar="TOKEN")

    def handle(self, command, options):
        # Tokens as typed are the token strings themselves (icache:none, the
        # anonymous user's, included): no conversion of Python values here.
        from ... import edge

        tokens = options["tokens"]
        for tok, gen in zip(tokens, icache.handle.incr_many(tokens)):
            command.stdout.write(f"{tok} {gen}")
        try:
            edge.purge(tokens, strict=True)  # ICACHE_PURGE_URL: the proxy's pages of them
        except CacheError as e:
            raise CommandError(f"bumped, but the proxy's pages were not purged (run the bump again): {e}") from None


class Version:
    help = "each token's generation, and their sum (the version of a block with these tokens)"

    def add_arguments(self, parser):
        parser.add_argument("tokens", nargs="+", metavar="TOKEN")

    def handle(self, command, options):
        tokens = options["tokens"]
        gens = icache.handle.generations(tokens)
        for tok, gen in zip(tokens, gens):
            command.stdout.write(f"{tok} {gen}")
        command.stdout.write(f"sum {icache.handle.get_sum(tokens)}")


class Flush:
    help = "every block misses once (one epoch bump; nothing is deleted)"

    def add_arguments(self, parser):
        pass

    def handle(self, command, options):
        epoch = icache.flush()  # and the proxy's tagged pages (ICACHE_PURGE_URL)
        command.stdout.write(f"flushed {icache.url} (epoch {epoch}): every block renders again once")


class Stats:
    help = "the backend's own counters (Redis INFO, memcached stats, …)"

    def add_arguments(self, parser):
        pass

    def handle(self, command, options):
        command.stdout.write(f"url {icache.url}")
        command.stdout.write(f"backend {icache.backend}")
        for name, value in icache.handle.server_stats():
            command.stdout.write(f"{name} {value}")
        # This process's own counters (a fresh manage.py has served nothing;
        # they matter when the command runs inside a long-lived process).
        for name, value in icache.stats().items():
            command.stdout.write(f"process.{name} {value}")


SUBCOMMANDS: dict[str, type] = {"bump": Bump, "version": Version, "flush": Flush, "stats": Stats}
SUBCOMMANDS.update(outbox_commands.SUBCOMMANDS)  # install, relay


class Command(BaseCommand):
    help = "Operate django_icache: " + ", ".join(SUBCOMMANDS) + " (manage.py icache SUBCOMMAND --help)"

    def add_arguments(self, parser):
        sub = parser.add_subparsers(dest="subcommand", metavar="SUBCOMMAND", required=True)
        self._subcommands = {}
        for name, cls in SUBCOMMANDS.items():
            impl = cls()
            impl.add_arguments(sub.add_parser(name, help=cls.help, description=cls.help))
            self._subcommands[name] = impl

    def handle(self, *args, **options):
        impl = self._subcommands.get(options["subcommand"]) if hasattr(self, "_subcommands") else None
        if impl is None:
            impl = SUBCOMMANDS[options["subcommand"]]()
        try:
            impl.handle(self, options)
        except CacheError as e:
            raise CommandError(f"icache {options['subcommand']}: {e}") from None
