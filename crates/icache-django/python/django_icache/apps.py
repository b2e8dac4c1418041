from django.apps import AppConfig
from django.core.signals import setting_changed


class DjangoICacheConfig(AppConfig):
    name = "django_icache"
    verbose_name = "icache (timeout-less fragment caching)"

    def ready(self):
        setting_changed.connect(_reset_on_change, dispatch_uid="django_icache.reset")


def _reset_on_change(setting, **kwargs):
    if setting in {"CACHES", "ICACHE_URL", "ICACHE_CACHE"}:
        from . import icache

        icache.reset()
