"""``{% load icache %}`` ``{% icache token… %}…{% endicache %}``.

Each argument is a template expression (a literal, a variable, with filters)
and a token: the block is kept until one of them is bumped
(``icache.incr(token)``), never by time. The body is rendered only on a miss.

A block is identified by its template's name, its position (line and order in
the template) and a digest of its source, plus the autoescape mode and its
tokens' values: two blocks never share an entry, and editing a block
invalidates it. Blocks rendered inside a block (nested, or in an
``{% include %}``) make their tokens the outer block's tokens too.
"""

from __future__ import annotations

import hashlib
import logging

from django import template
from django.utils.safestring import SafeString

from .. import icache

register = template.Library()
logger = logging.getLogger("django_icache")


class ICacheNode(template.Node):
    child_nodelists = ("nodelist",)

    def __init__(self, nodelist, tokens, names, where):
        self.nodelist = nodelist
        self.tokens = tokens
        # The block's identity, without and with autoescape.
        self.names = names
        self.where = where

    def render(self, context):
        values = []
        for expr in self.tokens:
            value = expr.resolve(context, ignore_failures=True)
            if value is None:
                # An undefined (or None) token must never merge entries that
                # should differ (every user's block under one key): render.
                logger.warning(
                    "django_icache: %s: token %r is undefined or None; the block is rendered uncached",
                    self.where,
                    expr.token,
                )
                return self.nodelist.render(context)
            values.append(str(value))
        html = icache.handle.fragment(
            self.names[1 if context.autoescape else 0],
            values,
            lambda: self.nodelist.render(context),
        )
        return SafeString(html)


@register.tag("icache")
def do_icache(parser, token):
    bits = token.split_contents()
    if len(bits) < 2:
        raise template.TemplateSyntaxError(
            "'icache' needs at least one token: {% icache 'movies' user.id %}…{% endicache %}"
        )
    exprs = [parser.compile_filter(b) for b in bits[1:]]
    # The body's tokens are popped from the end of parser.tokens as it is
    # parsed: keep a view of what is left to digest what was consumed.
    remaining = list(parser.tokens)
    nodelist = parser.parse(("endicache",))
    consumed = remaining[len(parser.tokens) :]
    parser.delete_first_token()

    digest = hashlib.sha256()
    for t in [token, *reversed(consumed)]:
        digest.update(f"{t.token_type.value}:{len(t.contents)}:".encode())
        digest.update(t.contents.encode())
    origin = getattr(parser, "origin", None)
    name = (getattr(origin, "template_name", None) or getattr(origin, "name", None)) or "<string>"
    seq = getattr(parser, "_icache_seq", 0)
    parser._icache_seq = seq + 1
    ident = f"{name}\x1f{token.lineno}\x1f{seq}\x1f{digest.hexdigest()[:32]}"
    names = ("django\x1fae=0\x1f" + ident, "django\x1fae=1\x1f" + ident)
    return ICacheNode(nodelist, exprs, names, f"{name}:{token.lineno}")
