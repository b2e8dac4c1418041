"""Issue 19, cases 2, 3 and 5: everything that changes a block's output is
in its identity: child templates' {% block %} overrides, the templates it
includes or extends (across a restart, in two processes), the active
language and time zone; flash messages stay per request."""

import os
import subprocess
import sys
from pathlib import Path

import pytest
from conftest import HERE, TEMPLATES, Counter, client_for, render, render_named, unique
from django.test.utils import override_settings
from django.utils import timezone, translation


@pytest.fixture
def site(use_url, backend_url):
    return use_url(backend_url)


def test_child_block_overrides_are_not_shared(site):
    base = unique("base") + ".html"
    TEMPLATES[base] = (
        "{% load icache %}<html>{% icache 'layout' %}<main>{% block content %}default{% endblock %}</main>"
        "{% endicache %}</html>"
    )
    pages = {}
    for i in (1, 2):
        pages[i] = unique(f"page{i}") + ".html"
        TEMPLATES[pages[i]] = "{% extends '" + base + "' %}{% block content %}page " + str(i) + "{% endblock %}"
    for _ in range(2):
        assert render_named(pages[1]) == "<html><main>page 1</main></html>"
        assert render_named(pages[2]) == "<html><main>page 2</main></html>"
        assert render_named(base) == "<html><main>default</main></html>"
    # Through the test client too.
    assert client_for(None).get(f"/page/{pages[2]}").content.decode() == "<html><main>page 2</main></html>"


def test_block_super_and_a_middle_template(site):
    base, middle, leaf = (unique(n) + ".html" for n in ("base", "mid", "leaf"))
    TEMPLATES[base] = "{% load icache %}{% icache 'l' %}[{% block b %}base{% endblock %}]{% endicache %}"
    TEMPLATES[middle] = "{% extends '" + base + "' %}{% block b %}mid+{{ block.super }}{% endblock %}"
    TEMPLATES[leaf] = "{% extends '" + middle + "' %}"
    assert render_named(leaf) == "[mid+base]"
    TEMPLATES[middle] = "{% extends '" + base + "' %}{% block b %}MID+{{ block.super }}{% endblock %}"
    assert render_named(leaf) == "[MID+base]"


def test_editing_an_included_template_invalidates_the_block(site):
    item, page = unique("item") + ".html", unique("page") + ".html"
    deep = unique("deep") + ".html"
    TEMPLATES[deep] = "(deep 1)"
    TEMPLATES[item] = "<li>item 1{% include '" + deep + "' %}</li>"
    TEMPLATES[page] = "{% load icache %}{% icache 'list' %}<ul>{% include '" + item + "' %}</ul>{% endicache %}"
    assert render_named(page) == "<ul><li>item 1(deep 1)</li></ul>"
    assert render_named(page) == "<ul><li>item 1(deep 1)</li></ul>"
    TEMPLATES[item] = "<li>item 2{% include '" + deep + "' %}</li>"
    assert render_named(page) == "<ul><li>item 2(deep 1)</li></ul>"
    TEMPLATES[deep] = "(deep 2)"  # two levels down
    assert render_named(page) == "<ul><li>item 2(deep 2)</li></ul>"


def test_an_included_template_that_extends_is_followed(site):
    parent, item, page = (unique(n) + ".html" for n in ("parent", "item", "page"))
    TEMPLATES[parent] = "<p>{% block x %}{% endblock %} parent 1</p>"
    TEMPLATES[item] = "{% extends '" + parent + "' %}{% block x %}item{% endblock %}"
    TEMPLATES[page] = "{% load icache %}{% icache 'l' %}{% include '" + item + "' %}{% endicache %}"
    assert render_named(page) == "<p>item parent 1</p>"
    TEMPLATES[parent] = "<p>{% block x %}{% endblock %} parent 2</p>"
    assert render_named(page) == "<p>item parent 2</p>"


def _run_site(tmp: Path, url: str, salt: str | None = None) -> str:
    env = dict(os.environ, ICACHE_URL=url, PYTHONPATH=str(HERE))
    env.pop("ICACHE_SALT", None)
    if salt is not None:
        env["ICACHE_SALT"] = salt
    out = subprocess.run(
        [sys.executable, str(HERE / "deploy_site.py"), str(tmp)], env=env, capture_output=True, text=True, timeout=60
    )
    assert out.returncode == 0, out.stderr
    return out.stdout


def test_a_template_edit_across_a_restart_two_processes(redis_server, tmp_path):
    url = redis_server.url(unique("p"))
    (tmp_path / "item.html").write_text("<li>old markup</li>")
    (tmp_path / "page.html").write_text(
        "{% load icache %}{% icache 'list' %}<ul>{% include 'item.html' %}</ul>{% endicache %}"
    )
    assert _run_site(tmp_path, url) == "<ul><li>old markup</li></ul>"
    assert _run_site(tmp_path, url) == "<ul><li>old markup</li></ul>"
    (tmp_path / "item.html").write_text("<li>new markup</li>")
    assert _run_site(tmp_path, url) == "<ul><li>new markup</li></ul>"


def test_the_active_language_and_time_zone_are_in_the_key(site):
    name = unique() + ".html"
    src = "{% load icache %}{% icache 'hello' %}{{ c.tick }}{% get_current_language as L %}{{ L }}{% endicache %}"
    src = "{% load i18n %}" + src
    c = Counter()
    with translation.override("de"):
        assert render(src, {"c": c}, name=name) == "de"
    with translation.override("en"):
        assert render(src, {"c": c}, name=name) == "en"
        assert render(src, {"c": c}, name=name) == "en"
    assert c.n == 2
    tzsrc = "{% load icache %}{% icache 'now' %}{{ when|date:'H' }}{% endicache %}"
    tzname = unique() + ".html"
    import datetime

    when = datetime.datetime(2026, 12, 1, 12, tzinfo=datetime.timezone.utc)
    with timezone.override("Europe/Berlin"):
        assert render(tzsrc, {"when": when}, name=tzname) == "13"
    with timezone.override("America/New_York"):
        assert render(tzsrc, {"when": when}, name=tzname) == "07"
    # Turned off: one entry for every language.
    with override_settings(ICACHE_VARY_ON_LANGUAGE=False):
        offname = unique() + ".html"
        with translation.override("de"):
            assert render(src, {"c": c}, name=offname) == "de"
        with translation.override("en"):
            assert render(src, {"c": c}, name=offname) == "de"


def test_accept_language_through_the_client(site):
    page = unique("lang") + ".html"
    TEMPLATES[page] = "{% load i18n icache %}{% icache 'greeting' %}{% get_current_language as L %}{{ L }}{% endicache %}"
    client = client_for(None)
    assert client.get(f"/page/{page}", HTTP_ACCEPT_LANGUAGE="de").content == b"de"
    assert client.get(f"/page/{page}", HTTP_ACCEPT_LANGUAGE="en").content == b"en"


def test_flash_messages_in_nocache_are_never_shared(site, caplog):
    page = unique("msg") + ".html"
    TEMPLATES[page] = (
        "{% load icache %}{% icache 'page' %}<h1>list</h1>{% nocache %}"
        "{% for m in messages %}<p>{{ m }}</p>{% endfor %}{% endnocache %}{% endicache %}"
    )
    ann, bob = client_for(unique("ann")), client_for(unique("bob"))
    ann.get("/note/private-note-for-ann")
    assert "private-note-for-ann" in ann.get(f"/page/{page}").content.decode()
    bob_page = bob.get(f"/page/{page}").content.decode()
    assert bob_page == "<h1>list</h1>"
    # Read once, as Django's messages are.
    assert ann.get(f"/page/{page}").content.decode() == "<h1>list</h1>"


def test_a_block_reading_messages_or_the_user_without_a_user_token_warns_once(site, caplog):
    bad = unique("bad") + ".html"
    TEMPLATES[bad] = "{% load icache %}{% icache 'x' %}{% for m in messages %}{{ m }}{% endfor %}{{ request.user.username }}{% endicache %}"
    good = unique("good") + ".html"
    TEMPLATES[good] = "{% load icache %}{% icache 'x' user.id %}{{ user.username }}{% endicache %}"
    with caplog.at_level("WARNING", logger="django_icache"):
        for _ in range(3):
            client_for(None).get(f"/page/{bad}")
            client_for(None).get(f"/page/{good}")
    warnings = [r.getMessage() for r in caplog.records if "differ per user" in r.getMessage()]
    assert len(warnings) == 1, warnings
    assert f"{bad}:1" in warnings[0] and "messages" in warnings[0] and "request.user" in warnings[0]
    assert "\x1f" not in warnings[0]


def test_icache_salt_starts_every_block_afresh_across_a_deploy(redis_server, tmp_path):
    """A template included by a variable name is not followed (documented):
    a new ICACHE_SALT at deploy time is what starts such blocks afresh."""
    url = redis_server.url(unique("p"))
    (tmp_path / "item.html").write_text("<li>old markup</li>")
    (tmp_path / "page.html").write_text(
        "{% load icache %}{% icache 'list' %}<ul>{% include item %}</ul>{% endicache %}"
    )
    assert _run_site(tmp_path, url, salt="deploy-1") == "<ul><li>old markup</li></ul>"
    (tmp_path / "item.html").write_text("<li>new markup</li>")
    assert _run_site(tmp_path, url, salt="deploy-1") == "<ul><li>old markup</li></ul>"
    assert _run_site(tmp_path, url, salt="deploy-2") == "<ul><li>new markup</li></ul>"
    assert _run_site(tmp_path, url, salt="deploy-2") == "<ul><li>new markup</li></ul>"


def test_the_per_user_warning_reads_the_blocks_source(site, caplog):
    cases = {
        "{% icache 'x' %}{{ user.username }}{% endicache %}": "user",
        "{% icache 'x' %}{% if perms.movieapp %}p{% endif %}{% endicache %}": "perms",
        "{% icache 'x' %}{% for user in users %}{{ user }}{% endfor %}{% endicache %}": None,
        "{% icache 'x' %}{% nocache %}{{ user.username }}{% endnocache %}{% endicache %}": None,
        "{% icache 'x' request.user.pk %}{{ request.user.username }}{% endicache %}": None,
    }
    for src, word in cases.items():
        caplog.clear()
        with caplog.at_level("WARNING", logger="django_icache"):
            render("{% load icache %}" + src, {"users": ["a"]})
        warned = [r.getMessage() for r in caplog.records if "differ per user" in r.getMessage()]
        if word is None:
            assert not warned, (src, warned)
        else:
            assert len(warned) == 1 and f"reads {word}," in warned[0], (src, warned)
