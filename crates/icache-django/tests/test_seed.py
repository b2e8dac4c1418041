"""The original app's README example, run as its users wrote it (bar the
`{% load icache}` typo, which Django itself would reject)."""

import pytest
from conftest import Counter, render, render_named, TEMPLATES, unique
from django.db import connection

from movieapp.models import Movie

SEED_TEMPLATE = """{% load icache %}
{% icache 'movies-personal-rating' 'movies' %}
... list of ordered by personal rating movies ...
{% endicache %}"""


@pytest.fixture
def movies_table(use_url, backend_url):
    use_url(backend_url)
    with connection.schema_editor() as editor:
        editor.create_model(Movie)
    yield
    with connection.schema_editor() as editor:
        editor.delete_model(Movie)


def test_seed_template_verbatim_renders_and_caches(movies_table):
    from django_icache import icache

    TEMPLATES["seed.html"] = SEED_TEMPLATE
    expected = "\n\n... list of ordered by personal rating movies ...\n"
    before = icache.stats()
    assert render_named("seed.html") == expected
    assert render_named("seed.html") == expected
    after = icache.stats()
    assert after["misses"] - before["misses"] == 1
    assert after["stores"] - before["stores"] == 1
    assert after["hits"] - before["hits"] == 1
    # Saving a Movie runs the seed's post_save handler: icache.incr('movies').
    Movie.objects.create(title="Alien", rating=5)
    assert render_named("seed.html") == expected
    assert icache.stats()["misses"] - before["misses"] == 2


def test_seed_example_with_a_real_list_is_invalidated_by_post_save(movies_table):
    """The seed's "... list of ordered by personal rating movies ..." filled
    in with a query: a hit does not run it; saving a Movie does."""
    TEMPLATES["seed-list.html"] = SEED_TEMPLATE.replace(
        "... list of ordered by personal rating movies ...",
        "{{ counter.tick }}<ul>{% for m in movies %}<li>{{ m.title }}</li>{% endfor %}</ul>",
    )
    Movie.objects.create(title="Alien", rating=5)
    counter = Counter()

    def page():
        return render_named(
            "seed-list.html", {"movies": Movie.objects.order_by("-rating"), "counter": counter}
        )

    first = page()
    assert "<li>Alien</li>" in first
    assert page() == first and counter.n == 1, "a hit rendered the body"
    Movie.objects.create(title="Brazil", rating=9)
    third = page()
    assert counter.n == 2
    assert third.index("Brazil") < third.index("Alien")
    assert page() == third and counter.n == 2


def test_every_unique_set_of_arguments_is_its_own_entry(use_url, backend_url):
    use_url(backend_url)
    src = "{% load icache %}{% icache 'movies-personal-rating' 'movies' user.id %}{{ c.tick }}u{{ user.id }}{% endicache %}"
    name = unique() + ".html"
    c = Counter()
    TEMPLATES[name] = src
    outs = [render_named(name, {"user": {"id": i}, "c": c}) for i in (1, 2, 1, 2)]
    assert outs == ["u1", "u2", "u1", "u2"]
    assert c.n == 2
