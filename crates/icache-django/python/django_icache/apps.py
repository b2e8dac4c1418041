from django.apps import AppConfig
from django.core.signals import setting_changed


class DjangoICacheConfig(AppConfig):
    name = "django_icache"
    verbose_name = "icache (timeout-less fragment caching)"

    def ready(self):
        from . import checks  # noqa: F401 - registers the system check
        from .templatetags.icache import install_csrf_hole

        # {% csrf_token %} must be a hole in every block, also in templates
        # rendered before the tag library is first loaded elsewhere.
        install_csrf_hole()
        setting_changed.connect(_reset_on_change, dispatch_uid="django_icache.reset")
        from . import relay

        relay.connect_signals()  # the outbox relay (ICACHE_RELAY) and read-your-writes
        from django.core import checks as django_checks

        from . import edge

        django_checks.register(edge.check_edge_settings, django_checks.Tags.caches)


def _reset_on_change(setting, **kwargs):
    if setting in {"CACHES", "ICACHE_URL", "ICACHE_CACHE", "ICACHE_SALT"}:
        from . import icache

        icache.reset()
    if setting == "ICACHE_PURGE_URL":
        from . import edge

        edge.reset()
