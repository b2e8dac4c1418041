"""ICACHE_WATCH: model labels and token templates become SQL token
expressions over the real columns; bad ones are ImproperlyConfigured naming
them."""

import sqlite3
import uuid

import pytest
from django.apps import apps
from django.core.exceptions import ImproperlyConfigured

import outbox_models  # noqa: F401 - registers the models
from django_icache.watch import watched


class S:
    def __init__(self, watch):
        self.ICACHE_WATCH = watch


def exprs(watch, vendor="sqlite"):
    return {w.label: list(w.expressions) for w in watched(vendor, settings=S(watch))}


def test_templates_become_expressions_over_real_columns():
    out = exprs({"movieapp.ObFilm": ["movies", "movie:{pk}"], "movieapp.ObRating": ["movies", "{user_id}", "u:{user}"]})
    assert out["movieapp.ObFilm"] == ["'movies'", "'movie:' || COALESCE(CAST(\"id\" AS TEXT), 'icache:none')"]
    user = "COALESCE(CAST(\"user_id\" AS TEXT), 'icache:none')"
    assert out["movieapp.ObRating"] == ["'movies'", user, "'u:' || " + user]
    w = watched("postgresql", settings=S({"movieapp.ObRating": ["{film}"]}))[0]
    assert w.table == "movieapp_obrating"


def test_quotes_braces_proxies_and_odd_columns():
    out = exprs({"movieapp.ObFilmProxy": ["it's {{{pk}}}"], "movieapp.ObOdd": ["{weird}", "{flag}"]})
    assert out["movieapp.ObFilmProxy"] == ["'it''s {' || COALESCE(CAST(\"id\" AS TEXT), 'icache:none') || '}'"]
    assert out["movieapp.ObOdd"][0] == "COALESCE(CAST(\"Weird Col\" AS TEXT), 'icache:none')"
    from django_icache.watch import ident

    assert ident('we"ird') == '"we""ird"'


def evaluate(expr, columns, row):
    """Runs an expression on SQLite over one row, as the triggers do."""
    db = sqlite3.connect(":memory:")
    cols = ", ".join(f'"{c}"' for c in columns)
    db.execute(f"CREATE TABLE t ({cols})")
    db.execute(f"INSERT INTO t VALUES ({', '.join('?' * len(columns))})", row)
    return db.execute(f"SELECT {expr} FROM t").fetchone()[0]


def test_sqlite_values_are_spelled_as_python_tokens():
    from django_icache import token

    out = exprs({"movieapp.ObOdd": ["{pk}", "{flag}"], "movieapp.ObRating": ["{user_id}"]})
    u = uuid.uuid4()
    assert evaluate(out["movieapp.ObOdd"][0], ["code"], [u.hex]) == token(u)
    assert evaluate(out["movieapp.ObOdd"][1], ["flag"], [1]) == token(True)
    assert evaluate(out["movieapp.ObOdd"][1], ["flag"], [0]) == token(False)
    assert evaluate(out["movieapp.ObRating"][0], ["user_id"], [42]) == token(42)
    assert evaluate(out["movieapp.ObRating"][0], ["user_id"], [None]) == token(None)


@pytest.mark.parametrize(
    "watch, needle",
    [
        ({"movieapp.Nope": ["x"]}, "'movieapp.Nope'"),
        ({"nolabel": ["x"]}, "'nolabel'"),
        ({"movieapp.ObFilm": ["movie:{titel}"]}, "no field 'titel'"),
        ({"movieapp.ObFilm": ["movie:{pk!r}"]}, "not a field name"),
        ({"movieapp.ObFilm": ["movie:{pk:>3}"]}, "not a field name"),
        ({"movieapp.ObFilm": ["movie:{}"]}, "not a field name"),
        ({"movieapp.ObFilm": ["movie:{pk"]}, "literal braces"),
        ({"movieapp.ObFilm": "movies"}, "a list of token templates"),
        ({"movieapp.ObFilm": [""]}, "non-empty"),
        ({"movieapp.ObFilm": []}, "no token templates"),
        ({"movieapp.ObFilm": ["icache:x"]}, "reserved"),
        ({"movieapp.ObOdd": ["{when}"]}, "DateTimeField"),
        ({"movieapp.ObOdd": ["{tags}"]}, "many-to-many"),
        ({"movieapp.ObSpecialFilm": ["{title}"]}, "multi-table"),
        ({"movieapp.ObFilm": ["a"], "movieapp.ObFilmProxy": ["b"]}, "more than once"),
    ],
)
def test_bad_labels_fields_and_templates_name_what_is_wrong(watch, needle):
    with pytest.raises(ImproperlyConfigured) as e:
        exprs(watch)
    assert needle in str(e.value) and "ICACHE_WATCH" in str(e.value)


def test_multi_table_child_pk_is_its_own_column():
    out = exprs({"movieapp.ObSpecialFilm": ["{pk}", "{extra}"]})
    pk = apps.get_model("movieapp.ObSpecialFilm")._meta.pk.column
    assert pk in out["movieapp.ObSpecialFilm"][0] and "extra" in out["movieapp.ObSpecialFilm"][1]


def test_manage_py_check_reports_bad_outbox_settings():
    from django.core.checks import run_checks
    from django.test.utils import override_settings

    def ids(**s):
        with override_settings(**s):
            return {(e.id, e.msg.split(":")[1].strip() if ":" in e.msg else e.msg)
                    for e in run_checks(tags=["database"], databases=None) if e.id.startswith("django_icache.E01")}

    assert ids() == set()
    found = ids(ICACHE_WATCH={"movieapp.ObFilm": ["{nope}"]})
    assert [i for i, _ in found] == ["django_icache.E010"]
    assert ids(ICACHE_WATCH={"movieapp.ObFilm": ["movies", "movie:{pk}"]}) == set()
    assert [i for i, _ in ids(ICACHE_RELAY="yes")] == ["django_icache.E011"]
    # The suite's default database is SQLite in memory: no relay needed (its
    # outbox is applied at each commit).
    assert ids(ICACHE_RELAY="thread") == set()
    assert [i for i, _ in ids(ICACHE_RELAY="thread", ICACHE_DATABASE="nope")] == ["django_icache.E011"]
