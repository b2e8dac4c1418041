"""Views of the test site: pages render templates of conftest.TEMPLATES by
name, with the request (so context processors run: csrf, user, messages)."""

from django.contrib import messages
from django.http import HttpResponse
from django.shortcuts import render


def page(request, name):
    return render(request, name, {"movies": getattr(request, "_movies", None)})


def post(request):
    return HttpResponse("posted")


def note(request, text):
    messages.info(request, text)
    return HttpResponse("noted")
