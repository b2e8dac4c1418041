"""The {% icache %} tag: threads and the GIL, nesting, escaping, errors."""

import threading
import time

import pytest
from conftest import TEMPLATES, Counter, render, render_named, unique
from django.template import TemplateSyntaxError
from django.template.base import VariableDoesNotExist


def run_threads(n, target, timeout=20.0):
    """Runs target(i) on n threads; fails (instead of hanging) on a deadlock."""
    results, errors = [None] * n, []

    def wrap(i):
        try:
            results[i] = target(i)
        except BaseException as e:  # noqa: BLE001
            errors.append(e)

    threads = [threading.Thread(target=wrap, args=(i,), daemon=True) for i in range(n)]
    for t in threads:
        t.start()
    deadline = time.monotonic() + timeout
    for t in threads:
        t.join(max(0.0, deadline - time.monotonic()))
    assert not any(t.is_alive() for t in threads), "threads deadlocked"
    if errors:
        raise errors[0]
    return results


def test_16_threads_render_one_missing_block_once(use_url, backend_url):
    use_url(backend_url)
    name = unique() + ".html"
    TEMPLATES[name] = (
        "{% load icache %}{% icache 'popular' %}{{ c.tick }}{{ slow.work }}"
        "{% for i in items %}<i>{{ i }}</i>{% endfor %}{% endicache %}"
    )
    c = Counter()
    entered = threading.Event()

    class Slow:
        def work(self):
            entered.set()
            # Python work while the others wait: they must not hold the GIL.
            end = time.monotonic() + 0.3
            while time.monotonic() < end:
                sum(range(1000))
            return ""

    ctx = {"c": c, "slow": Slow(), "items": range(50)}
    outs = run_threads(16, lambda i: render_named(name, ctx))
    assert c.n == 1
    assert len(set(outs)) == 1 and outs[0].count("<i>") == 50


def test_waiting_threads_release_the_gil(use_url, backend_url):
    """While 8 threads wait for one render, an unrelated Python thread runs."""
    use_url(backend_url)
    name = unique() + ".html"
    TEMPLATES[name] = "{% load icache %}{% icache 'gil' %}{{ slow.work }}x{% endicache %}"
    ticks = []
    stop = threading.Event()

    def other():
        while not stop.is_set():
            ticks.append(1)
            time.sleep(0.001)

    class Slow:
        def work(self):
            time.sleep(0.5)  # the leader renders (sleep releases the GIL too)
            return ""

    bystander = threading.Thread(target=other, daemon=True)
    bystander.start()
    outs = run_threads(8, lambda i: render_named(name, {"slow": Slow()}))
    stop.set()
    bystander.join()
    assert outs == ["x"] * 8
    assert len(ticks) > 100, "the bystander thread was starved: a waiter held the GIL"


def test_a_block_nested_in_itself_does_not_deadlock(use_url, backend_url):
    use_url(backend_url)
    TEMPLATES["tree.html"] = (
        "{% load icache %}{% icache 'cats' %}<ul>{{ c.tick }}"
        "{% if depth %}{% with depth=depth|add:'-1' %}{% include 'tree.html' %}{% endwith %}"
        "{% else %}leaf{% endif %}</ul>{% endicache %}"
    )
    c = Counter()
    out = run_threads(1, lambda i: render_named("tree.html", {"depth": 3, "c": c}), timeout=15)[0]
    assert out == "<ul>" * 4 + "leaf" + "</ul>" * 4
    # Served from the cache the second time.
    n = c.n
    assert render_named("tree.html", {"depth": 3, "c": c}) == out
    assert c.n == n


def test_crosswise_nesting_never_deadlocks(use_url, backend_url):
    """Thread 1 renders block(a) whose body renders block(b); thread 2
    renders block(b) whose body renders block(a); both at once."""
    use_url(backend_url)
    TEMPLATES["cross.html"] = (
        "{% load icache %}{% icache tok %}<{{ tok }}>{% if other %}{{ sync.wait }}"
        "{% with tok=other other=None %}{% include 'cross.html' %}{% endwith %}"
        "{% endif %}{% endicache %}"
    )
    for _ in range(3):
        a, b = unique("a"), unique("b")
        barrier = threading.Barrier(2)

        class Sync:
            def wait(self):
                barrier.wait(5)
                return ""

        outs = run_threads(
            2,
            lambda i: render_named(
                "cross.html", {"tok": (a, b)[i], "other": (b, a)[i], "sync": Sync()}
            ),
            timeout=20,
        )
        # As in Rust (hardening: crosswise nesting): each thread gets its own
        # block, whichever render of the inner one it was served.
        assert outs[0].startswith(f"<{a}><{b}>"), outs
        assert outs[1].startswith(f"<{b}><{a}>"), outs


def test_nested_blocks_make_outer_ones_depend_on_their_tokens(use_url, backend_url):
    icache = use_url(backend_url)
    inner_tok = unique("inner")
    TEMPLATES["inner.html"] = "{% load icache %}{% icache inner_tok %}{{ ci.tick }}[{{ v }}]{% endicache %}"
    src = "{% load icache %}{% icache 'outer' %}{{ co.tick }}outer{% include 'inner.html' %}{% endicache %}"
    name = unique() + ".html"
    co, ci = Counter(), Counter()

    def page(v):
        return render(src, {"inner_tok": inner_tok, "v": v, "co": co, "ci": ci}, name=name)

    assert page(1) == "outer[1]"
    assert page(2) == "outer[1]" and (co.n, ci.n) == (1, 1)
    icache.incr(inner_tok)  # only the inner token moves
    assert page(3) == "outer[3]" and (co.n, ci.n) == (2, 2)
    assert page(4) == "outer[3]" and (co.n, ci.n) == (2, 2)


def test_output_and_escaping_are_those_of_the_uncached_render(use_url, backend_url):
    use_url(backend_url)
    ctx = {"v": "<b>Tom & \"Jerry\"</b>", "items": ["<i>", "ok"]}
    body = "{{ v }}|{{ v|safe }}|{{ v|upper }}|{% for i in items %}{{ i }},{% endfor %}"
    src = (
        "{% load icache %}<p>{% icache 'esc' %}" + body + "{% endicache %}</p>"
        "{% autoescape off %}<p>{% icache 'esc' %}" + body + "{% endicache %}</p>{% endautoescape %}"
        "{% filter lower %}{% icache 'esc' %}" + body + "{% endicache %}{% endfilter %}"
    )
    plain = src.replace("{% load icache %}", "").replace("{% icache 'esc' %}", "").replace("{% endicache %}", "")
    expected = render(plain, ctx)
    assert "&lt;b&gt;Tom &amp; &quot;Jerry&quot;&lt;/b&gt;" in expected
    assert '<p><b>Tom & "Jerry"</b>|' in expected  # the autoescape-off block
    name = unique() + ".html"
    assert render(src, ctx, name=name) == expected  # miss
    assert render(src, ctx, name=name) == expected  # hit


def test_a_hit_is_safe_string_in_an_outer_expression(use_url, backend_url):
    """The block's output is not escaped again (it is a SafeString)."""
    use_url(backend_url)
    name = unique() + ".html"
    src = "{% load icache %}{% icache 'safe' %}<b>{{ v }}</b>{% endicache %}"
    for _ in range(2):
        assert render(src, {"v": "&"}, name=name) == "<b>&amp;</b>"


class Boom(Exception):
    pass


def test_an_error_in_the_body_propagates_and_nothing_is_stored(use_url, backend_url):
    icache = use_url(backend_url)

    class Data:
        fail = True

        def rows(self):
            if self.fail:
                raise Boom("database is down")
            return "rows"

    d = Data()
    name = unique() + ".html"
    src = "{% load icache %}{% icache 'err' %}{{ d.rows }}{% endicache %}"
    before = icache.stats()["stores"]
    with pytest.raises(Boom, match="database is down") as raised:
        render(src, {"d": d}, name=name)
    # The same exception object Django raises without the tag.
    with pytest.raises(Boom) as plain:
        render("{{ d.rows }}", {"d": d})
    assert type(raised.value) is type(plain.value) and str(raised.value) == str(plain.value)
    assert icache.stats()["stores"] == before
    d.fail = False
    assert render(src, {"d": d}, name=name) == "rows"


def test_template_errors_in_the_body_are_djangos(use_url, backend_url):
    use_url(backend_url)
    with pytest.raises(TemplateSyntaxError):
        render("{% load icache %}{% icache 'x' %}{% if %}{% endif %}{% endicache %}")
    with pytest.raises(TemplateSyntaxError, match="needs at least one token"):
        render("{% load icache %}{% icache %}x{% endicache %}")
    with pytest.raises(TemplateSyntaxError):
        render("{% load icache %}{% icache 'x' %}unclosed")


def test_an_undefined_token_renders_uncached_and_never_merges_users(use_url, backend_url, caplog):
    icache = use_url(backend_url)
    name = unique() + ".html"
    src = "{% load icache %}{% icache 'movies' user.id %}{{ c.tick }}{{ who }}{% endicache %}"
    c = Counter()
    with caplog.at_level("WARNING", logger="django_icache"):
        assert render(src, {"c": c, "who": "ann"}, name=name) == "ann"
        assert render(src, {"c": c, "who": "bob"}, name=name) == "bob"
    assert c.n == 2
    warnings = [r for r in caplog.records if "is undefined" in r.getMessage()]
    assert len(warnings) == 1, "warned more than once per block in 10 s"


def test_icache_fragment_in_python_code(use_url, backend_url):
    icache = use_url(backend_url)
    tok = unique("frag")
    calls = []

    def body():
        calls.append(1)
        return f"<ul>{len(calls)}</ul>"

    assert icache.fragment("list", [tok], body) == "<ul>1</ul>"
    assert icache.fragment("list", [tok], body) == "<ul>1</ul>"
    icache.incr(tok)
    assert icache.fragment("list", [tok], body) == "<ul>2</ul>"


def test_stale_option_parses_and_renders(use_url, backend_url):
    # `stale=True`/`False` is an option, not a token; anything else is a
    # syntax error naming it. (The cross-process behaviour is tested in Rust:
    # conformance fleet::stale_is_chosen_per_block_in_each_api.)
    from django.template import engines

    django_engine = engines["django"]
    for option in ("stale=True", "stale=False"):
        t = django_engine.from_string(
            "{% load icache %}{% icache 'stale-opt' " + option + " %}<p>x</p>{% endicache %}"
        )
        assert t.render({}) == "<p>x</p>"
        assert t.render({}) == "<p>x</p>"
    with pytest.raises(TemplateSyntaxError, match="stale="):
        django_engine.from_string("{% load icache %}{% icache 'stale-opt' stale=maybe %}x{% endicache %}")
