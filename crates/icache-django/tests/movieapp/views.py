"""Views of the test site: pages render templates of conftest.TEMPLATES by
name, with the request (so context processors run: csrf, user, messages)."""

import collections

from django.contrib import messages
from django.http import HttpResponse
from django.shortcuts import render
from django.views.decorators.cache import never_cache

# How many times each view ran, by template name (the middleware tests count
# the views a 304 spared).
CALLS: collections.Counter = collections.Counter()


def page(request, name):
    CALLS[name] += 1
    return render(request, name, {"movies": getattr(request, "_movies", None)})


# What the data pages show, by template name (the Varnish tests change it,
# then bump, as a model's save would).
DATA: dict = {}


def data_page(request, name):
    CALLS[name] += 1
    return render(request, name, {"value": DATA.get(name, "")})


def session_page(request, name):
    """A per-user page without the database (the Varnish tests serve Django
    from another thread, which the in-memory test database does not reach):
    the "user" is the session cookie's value, and the page varies on Cookie
    as a page reading request.user does."""
    from django.utils.cache import patch_vary_headers

    CALLS[name] += 1
    response = render(request, name, {"who": request.COOKIES.get("sessionid", "anonymous")})
    patch_vary_headers(response, ["Cookie"])
    return response


def cookie_page(request, name):
    CALLS[name] += 1
    response = render(request, name, {})
    response.set_cookie("seen", "1")
    return response


@never_cache
def never_page(request, name):
    CALLS[name] += 1
    return render(request, name, {})


def post(request):
    return HttpResponse("posted")


def note(request, text):
    messages.info(request, text)
    return HttpResponse("noted")
