"""A site's own subclass of Django's Redis backend (issue 19: subclasses of
supported backends are translated as their base)."""

from django.core.cache.backends.redis import RedisCache


class SiteRedisCache(RedisCache):
    pass
