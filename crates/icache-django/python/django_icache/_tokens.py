"""How Python values become icache tokens (strings).

==========================  ===============================================
value                       token
==========================  ===============================================
``str``                     itself (the token a Rust service names alike)
``int``                     its decimal digits: ``42`` and ``"42"`` are one
                            token (``user.id`` and ``icache.incr("42")``)
model instance              ``app_label.model:pk`` (``movieapp.movie:7``),
                            never its ``str()``; an unsaved one (no pk) is
                            refused
``None``, ``AnonymousUser`` ``icache:none``: a value of its own (the
                            anonymous visitor's block is one entry)
``bool``                    ``icache:true`` / ``icache:false``
``float``                   ``icache:float:`` + ``repr()``
``Decimal``                 ``icache:decimal:`` + ``str()``
``bytes``                   ``icache:bytes:`` + hex
``UUID``                    its canonical string
date, time, datetime        ``icache:date:`` + ISO 8601
lazy translation            its text in the active language
an ``__icache_token__()``   what it returns (a str, or a value above)
==========================  ===============================================

Strings starting with ``icache:`` are reserved for these forms and refused
as tokens, so no two different values share a token by accident; any other
type is refused with a ``TypeError`` naming it (``str()`` of an object is
rarely unique).
"""

from __future__ import annotations

import datetime
import decimal
import uuid
from typing import Any

RESERVED = "icache:"
NONE = "icache:none"


def token_value(value: Any, _depth: int = 0) -> str:
    """The token for `value` (see the module docs)."""
    if isinstance(value, str):
        if value.startswith(RESERVED):
            raise TypeError(f"tokens starting with {RESERVED!r} are reserved (got {value!r})")
        return str(value)
    if value is None:
        return NONE
    if isinstance(value, bool):
        return "icache:true" if value else "icache:false"
    if isinstance(value, int):
        return int.__repr__(value)
    from django.db.models import Model

    if isinstance(value, Model):
        if value.pk is None:
            raise TypeError(f"an unsaved {value._meta.label} (no primary key) cannot be a token")
        return f"{value._meta.label_lower}:{token_value(value.pk, _depth + 1)}"
    if getattr(value, "is_anonymous", False) is True and getattr(value, "pk", 0) is None:
        # AnonymousUser (django.contrib.auth), as its `id` would be.
        return NONE
    if isinstance(value, float):
        return "icache:float:" + repr(value)
    if isinstance(value, decimal.Decimal):
        return "icache:decimal:" + str(value)
    if isinstance(value, (bytes, bytearray, memoryview)):
        return "icache:bytes:" + bytes(value).hex()
    if isinstance(value, uuid.UUID):
        return str(value)
    if isinstance(value, (datetime.date, datetime.time)):
        return "icache:date:" + value.isoformat()
    from django.utils.functional import Promise

    if isinstance(value, Promise):
        return token_value(str(value), _depth + 1)
    hook = getattr(type(value), "__icache_token__", None)
    if hook is not None and _depth < 4:
        return token_value(hook(value), _depth + 1)
    raise TypeError(
        f"a {type(value).__module__}.{type(value).__qualname__} has no token form; use a str, an int, "
        "a model instance, None (see django_icache.token), or give the class an __icache_token__() method"
    )
