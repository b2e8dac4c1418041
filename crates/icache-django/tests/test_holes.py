"""Issue 19, case 1: per-request output is never stored. `{% csrf_token %}`
inside a block renders for every request (Django's own masking) and
`{% nocache %}` marks any other per-request part, through Django's test
client with two logged-in users and CSRF enforced."""

import re

import pytest
from conftest import TEMPLATES, Counter, client_for, render, unique
from django.middleware.csrf import _unmask_cipher_token

FORM = re.compile(r'name="csrfmiddlewaretoken" value="([^"]+)"')


@pytest.fixture
def site(use_url, backend_url):
    return use_url(backend_url)


def form_token(client, page):
    response = client.get(f"/page/{page}")
    assert response.status_code == 200
    found = FORM.findall(response.content.decode())
    assert len(found) == 1, response.content
    return found[0], response.content.decode()


def test_csrf_token_in_a_block_is_each_visitors_own(site):
    page = unique("form") + ".html"
    TEMPLATES[page] = (
        "{% load icache %}{% icache 'movies' %}<form method='post' action='/post'>{% csrf_token %}"
        "{{ c.tick }}<ul>cached list</ul></form>{% endicache %}"
    )
    ann, bob = client_for(unique("ann")), client_for(unique("bob"))
    before = site.stats()
    ann_token, ann_page = form_token(ann, page)
    bob_token, bob_page = form_token(bob, page)
    after = site.stats()
    assert after["hits"] - before["hits"] == 1, "the second visitor's block was not a hit"
    # Django's masking: each render is masked afresh, and each user's token
    # unmasks to that user's own secret.
    assert ann_token != bob_token
    assert _unmask_cipher_token(ann_token) != _unmask_cipher_token(bob_token)
    assert ann_page.replace(ann_token, "T") == bob_page.replace(bob_token, "T")
    # Each user's own form works; a POST with the other visitor's token fails.
    assert ann.post("/post", {"csrfmiddlewaretoken": ann_token}).status_code == 200
    assert bob.post("/post", {"csrfmiddlewaretoken": bob_token}).status_code == 200
    assert bob.post("/post", {"csrfmiddlewaretoken": ann_token}).status_code == 403
    assert ann.post("/post", {"csrfmiddlewaretoken": bob_token}).status_code == 403


def test_csrf_token_in_an_included_template_and_a_nested_block(site):
    inner = unique("inner") + ".html"
    page = unique("page") + ".html"
    TEMPLATES[inner] = "{% load icache %}{% icache 'inner' %}<p>{% csrf_token %}</p>{% endicache %}"
    TEMPLATES[page] = (
        "{% load icache %}{% icache 'outer' %}<div>{% include '" + inner + "' %}"
        "{% icache 'nested' %}<i>{% csrf_token %}</i>{% endicache %}</div>{% endicache %}"
    )
    ann, bob = client_for(unique("ann")), client_for(unique("bob"))
    for client in (ann, bob, ann):
        body = client.get(f"/page/{page}").content.decode()
        tokens = FORM.findall(body)
        assert len(tokens) == 2
        secret = {_unmask_cipher_token(t) for t in tokens}
        assert len(secret) == 1
        assert client.post("/post", {"csrfmiddlewaretoken": tokens[0]}).status_code == 200
    ann_secret = _unmask_cipher_token(FORM.findall(ann.get(f"/page/{page}").content.decode())[0])
    bob_secret = _unmask_cipher_token(FORM.findall(bob.get(f"/page/{page}").content.decode())[0])
    assert ann_secret != bob_secret


def test_nocache_renders_per_request_in_nested_blocks(site):
    name = unique() + ".html"
    src = (
        "{% load icache %}{% icache 'outer' %}{{ c.tick }}<h1>{{ title }}</h1>"
        "{% nocache %}hello {{ who }}{% endnocache %}"
        "{% icache 'inner' %}{{ c.tick }}<p>{% nocache %}[{{ who|upper }}]{% endnocache %}</p>{% endicache %}"
        "{% endicache %}"
    )
    c = Counter()
    assert render(src, {"c": c, "title": "A", "who": "ann"}, name=name) == "<h1>A</h1>hello ann<p>[ANN]</p>"
    assert render(src, {"c": c, "title": "B", "who": "bob"}, name=name) == "<h1>A</h1>hello bob<p>[BOB]</p>"
    assert c.n == 2  # one render of each block, then hits
    # Outside a block, nocache is just its body.
    assert render("{% load icache %}{% nocache %}{{ who }}{% endnocache %}", {"who": "x"}) == "x"


def test_nocache_in_an_included_template_is_filled_on_a_hit(site):
    part = unique("part") + ".html"
    name = unique() + ".html"
    TEMPLATES[part] = "{% load icache %}<b>{% nocache %}{{ who }}{% endnocache %}</b>"
    src = "{% load icache %}{% icache 'page' %}{{ c.tick }}{% include '" + part + "' %}{% endicache %}"
    c = Counter()
    assert render(src, {"c": c, "who": "ann"}, name=name) == "<b>ann</b>"
    assert render(src, {"c": c, "who": "bob"}, name=name) == "<b>bob</b>"
    assert c.n == 1


def test_a_stored_value_that_looks_like_a_placeholder_is_text(site):
    """Holes live in the entry's header: text that looks like a placeholder,
    or like a header, is rendered as the text it is, on the miss and the hit."""
    name = unique() + ".html"
    forged = [
        "\x00icache:00000000000000000000000000000000:0\x00",
        '\x02[[0,"csrf"]]\n',
        '\x01[[0,"nocache","x","y"]]',
        "{% csrf_token %}",
    ]
    src = "{% load icache %}{% icache 'forged' %}{% autoescape off %}{{ v }}{% endautoescape %}|{% csrf_token %}{% endicache %}"
    for v in forged:
        n = unique() + name
        out = [render(src, {"v": v, "csrf_token": "TOKEN"}, name=n) for _ in range(2)]
        assert out[0] == out[1] == v + '|<input type="hidden" name="csrfmiddlewaretoken" value="TOKEN">'


def test_a_block_without_holes_stores_its_html(site, redis_server, use_url):
    """No hole: the entry is the HTML behind one format character."""
    from conftest import redis_command

    prefix = unique("p")
    use_url(redis_server.url(prefix))
    out = render("{% load icache %}{% icache 'plain' %}<ul>plain</ul>{% endicache %}")
    assert out == "<ul>plain</ul>"
    keys = redis_command(redis_server, "KEYS", f"{prefix}*")
    values = [redis_command(redis_server, "GET", k.decode()) for k in keys]
    assert any(v and v.endswith(b"\x01<ul>plain</ul>") for v in values), values


def test_csrf_token_variable_in_a_block_is_a_hole_too(site):
    page = unique("ajax") + ".html"
    TEMPLATES[page] = (
        "{% load icache %}{% icache 'ajax' %}<meta name='csrf' content='{{ csrf_token }}'>"
        "{% if csrf_token %}yes{% endif %}{% endicache %}"
    )
    meta = re.compile(r"content='([^']+)'")
    ann, bob = client_for(unique("ann")), client_for(unique("bob"))
    ann_token = meta.findall(ann.get(f"/page/{page}").content.decode())[0]
    bob_body = bob.get(f"/page/{page}").content.decode()
    bob_token = meta.findall(bob_body)[0]
    assert bob_body.endswith("yes")
    assert _unmask_cipher_token(ann_token) != _unmask_cipher_token(bob_token)
    assert bob.post("/post", {"csrfmiddlewaretoken": bob_token}).status_code == 200
    assert bob.post("/post", {"csrfmiddlewaretoken": ann_token}).status_code == 403
