"""``ICACHE_WATCH``: which rows bump which tokens, turned into the SQL token
expressions of the database triggers (``manage.py icache install``).

::

    ICACHE_WATCH = {
        "movies.Movie": ["movies", "movie:{pk}"],
        "movies.Rating": ["movies", "{user_id}"],
    }

Keys are model labels (``app_label.ModelName``); values are token
templates. Text outside braces is literal; ``{field}`` is replaced by the
row's value of that field, read from its real column:

* ``{pk}``: the primary key's column (``id``, or a custom one);
* ``{user}`` and ``{user_id}`` (a foreign key): the key's column
  (``user_id``), the related row's primary key;
* any other concrete field of the model's own table, by name or attname.

Each value is rendered as :func:`django_icache.token` renders the same
Python value, so a trigger bumps exactly the token a template names:
integers as their digits (``{% icache user.id %}`` and ``{user_id}`` are one
token), text as itself, UUIDs in their canonical form, booleans as
``icache:true``/``icache:false``, NULL as ``icache:none``. Other field types
(dates, decimals, floats, JSON…) have no SQL spelling equal to their Python
token and are refused. ``{{`` and ``}}`` are literal braces.

A bad label, an unknown field, a field of another table (a multi-table
parent, a many-to-many) or an unusable template raises
``ImproperlyConfigured`` naming it.
"""

from __future__ import annotations

from dataclasses import dataclass
from string import Formatter

from django.core.exceptions import FieldDoesNotExist, ImproperlyConfigured

from ._tokens import NONE, RESERVED

INTEGER_TYPES = {
    "AutoField",
    "BigAutoField",
    "SmallAutoField",
    "IntegerField",
    "BigIntegerField",
    "SmallIntegerField",
    "PositiveIntegerField",
    "PositiveBigIntegerField",
    "PositiveSmallIntegerField",
}
TEXT_TYPES = {"CharField", "TextField", "SlugField", "EmailField", "URLField", "FilePathField", "GenericIPAddressField"}


@dataclass(frozen=True)
class Watched:
    """One watched model: its label, table, token templates and the SQL
    token expressions they became."""

    label: str
    table: str
    templates: tuple[str, ...]
    expressions: tuple[str, ...]


def _bad(label: str, why: str) -> ImproperlyConfigured:
    return ImproperlyConfigured(f"django_icache: ICACHE_WATCH[{label!r}]: {why}")


def ident(name: str) -> str:
    """An SQL identifier, double-quoted (both PostgreSQL and SQLite)."""
    return '"' + name.replace('"', '""') + '"'


def literal(text: str) -> str:
    """An SQL string literal (standard quoting: only ``'`` doubles)."""
    return "'" + text.replace("'", "''") + "'"


def _column_expr(label: str, model, name: str, vendor: str) -> str:
    meta = model._meta
    if name == "pk":
        field = meta.pk
    else:
        try:
            field = meta.get_field(name)
        except FieldDoesNotExist:
            names = sorted({"pk"} | {f.name for f in meta.concrete_fields} | {f.attname for f in meta.concrete_fields})
            raise _bad(label, f"{meta.label} has no field {name!r} (fields: {', '.join(names)})") from None
    column = getattr(field, "column", None)
    if (
        not getattr(field, "concrete", False)
        or column is None
        or getattr(field, "many_to_many", False)
        or getattr(field, "one_to_many", False)
    ):
        raise _bad(label, f"{meta.label}.{name} has no column in {meta.db_table!r} (a many-to-many or reverse relation)")
    if field.model._meta.db_table != meta.db_table:
        raise _bad(
            label,
            f"{meta.label}.{name} lives in the table {field.model._meta.db_table!r} of {field.model._meta.label} "
            f"(multi-table inheritance), not in {meta.db_table!r}: watch {field.model._meta.label} for it",
        )
    # A foreign key's column holds the related row's key: its type decides.
    target = field
    while getattr(target, "remote_field", None) is not None and getattr(target, "target_field", None) is not None:
        target = target.target_field
    kind = target.get_internal_type()
    col = ident(column)
    none = literal(NONE)
    if kind in INTEGER_TYPES or kind in TEXT_TYPES:
        value = f"CAST({col} AS TEXT)"
    elif kind == "UUIDField":
        if vendor == "postgresql":
            value = f"CAST({col} AS TEXT)"
        else:
            # Django keeps UUIDs as 32 hex digits on SQLite; the token is
            # the canonical hyphenated form (str(uuid)).
            value = (
                f"lower(substr({col}, 1, 8) || '-' || substr({col}, 9, 4) || '-' || substr({col}, 13, 4)"
                f" || '-' || substr({col}, 17, 4) || '-' || substr({col}, 21, 12))"
            )
    elif kind == "BooleanField":
        value = f"CASE WHEN {col} THEN 'icache:true' WHEN NOT {col} THEN 'icache:false' END"
    else:
        raise _bad(
            label,
            f"{meta.label}.{name} is a {kind}, whose SQL text differs from its token "
            "(integer, text, UUID and boolean fields, and foreign keys to them, can be watched)",
        )
    return f"COALESCE({value}, {none})"


def token_expressions(label: str, model, templates, vendor: str) -> list[str]:
    """The SQL token expressions for ``templates`` over ``model``'s table."""
    if isinstance(templates, str) or not hasattr(templates, "__iter__"):
        raise _bad(label, f"expected a list of token templates, got {templates!r}")
    out = []
    for template in templates:
        if not isinstance(template, str) or not template:
            raise _bad(label, f"a token template must be a non-empty str, got {template!r}")
        parts = []
        try:
            parsed = list(Formatter().parse(template))
        except ValueError as e:
            raise _bad(label, f"token template {template!r}: {e} (write {{{{ and }}}} for literal braces)") from None
        for text, field, spec, conversion in parsed:
            if text:
                parts.append(literal(text))
            if field is None:
                continue
            if not field or spec or conversion or not field.isidentifier():
                raise _bad(label, f"token template {template!r}: {{{field}{'!' + conversion if conversion else ''}"
                                  f"{':' + spec if spec else ''}}} is not a field name (write {{pk}}, {{user_id}}…)")
            parts.append(_column_expr(label, model, field, vendor))
        if len(parts) == 1 and parts[0].startswith("'") and template.startswith(RESERVED):
            raise _bad(label, f"token template {template!r}: tokens starting with {RESERVED!r} are reserved")
        out.append(" || ".join(parts))
    if not out:
        raise _bad(label, "no token templates")
    return out


def watch_setting(settings=None) -> dict:
    """``ICACHE_WATCH`` as a dict (empty when unset)."""
    if settings is None:
        from django.conf import settings
    value = getattr(settings, "ICACHE_WATCH", None) or {}
    if not isinstance(value, dict):
        raise ImproperlyConfigured(
            f"django_icache: ICACHE_WATCH must be a dict of model labels to token templates, got {type(value).__name__}"
        )
    return value


def watched(vendor: str, apps=None, settings=None) -> list[Watched]:
    """Every model of ``ICACHE_WATCH`` with its token expressions for a
    database of ``vendor`` (``"postgresql"`` or ``"sqlite"``). ``apps`` is
    the app registry (a migration's historical one, or the live one)."""
    if apps is None:
        from django.apps import apps
    out = []
    for label, templates in watch_setting(settings).items():
        if not isinstance(label, str) or label.count(".") != 1:
            raise ImproperlyConfigured(
                f"django_icache: ICACHE_WATCH key {label!r} is not a model label (app_label.ModelName, e.g. 'movies.Movie')"
            )
        try:
            model = apps.get_model(label)
        except LookupError as e:
            raise _bad(label, f"no such model ({e})") from None
        meta = model._meta
        if meta.proxy:
            model = meta.concrete_model
            meta = model._meta
        exprs = token_expressions(label, model, templates, vendor)
        out.append(Watched(label, meta.db_table, tuple(templates), tuple(exprs)))
    tables = [w.table for w in out]
    for t in set(tables):
        if tables.count(t) > 1:
            labels = [w.label for w in out if w.table == t]
            raise ImproperlyConfigured(
                f"django_icache: ICACHE_WATCH names the table {t!r} more than once ({', '.join(labels)}); "
                "give it one list of templates"
            )
    return out
