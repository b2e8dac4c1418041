"""One process of a deployed site (issue 19's deploy case): renders
`page.html` from the template directory argv[1] on the cache ICACHE_URL
(env), with ICACHE_SALT (env) when set, and prints the output."""

import os
import sys

import django
from django.conf import settings

conf = dict(
    INSTALLED_APPS=["django_icache"],
    TEMPLATES=[
        {
            "BACKEND": "django.template.backends.django.DjangoTemplates",
            "DIRS": [sys.argv[1]],
            # The cached loader, as in production.
            "OPTIONS": {"loaders": [("django.template.loaders.cached.Loader", ["django.template.loaders.filesystem.Loader"])]},
        }
    ],
    ICACHE_URL=os.environ["ICACHE_URL"],
    USE_TZ=True,
)
if os.environ.get("ICACHE_SALT"):
    conf["ICACHE_SALT"] = os.environ["ICACHE_SALT"]
settings.configure(**conf)
django.setup()

from django.template.loader import render_to_string  # noqa: E402

sys.stdout.write(render_to_string("page.html", {"item": "item.html"}))
