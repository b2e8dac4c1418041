"""``{% load icache %}`` ``{% icache token… %}…{% endicache %}`` and
``{% nocache %}…{% endnocache %}``.

Each argument of ``icache`` is a template expression (a literal, a variable,
with filters) and a token: the block is kept until one of them is bumped
(``icache.incr(token)``), never by time. The body is rendered only on a miss.
Token values take the forms of :func:`django_icache.token` (a model instance
is ``app_label.model:pk``, ``None`` a value of its own); an undefined
variable renders the block uncached (warned at most once per block per 10 s).

**What identifies a block** (two blocks never share an entry unless all of
it is equal):

- its template's name, its position (line and order) and a digest of its
  source;
- the digests of the templates it ``{% include %}``\\ s with a literal name,
  and of what those include or ``{% extends %}``, recursively (an include
  whose name is a variable is *not* followed: bump a token, set
  ``ICACHE_SALT`` or run ``manage.py icache flush`` when such a template
  changes);
- when its body holds ``{% block %}`` tags: the template actually rendered
  and the digest of every template of its ``{% extends %}`` chain (a child
  template's override changes the block's output);
- the autoescape mode, and (unless ``ICACHE_VARY_ON_LANGUAGE = False``) the
  active language and time zone;
- its tokens' values.

**Holes.** ``{% csrf_token %}`` (and ``{{ csrf_token }}``) inside a block,
anywhere in its body (included templates too), and everything between ``{% nocache %}`` and
``{% endnocache %}`` are never stored: the entry keeps their positions in its
own header (not a marker in the text), and they are rendered for each
request, with Django's own CSRF masking, on hits and misses alike. A
``nocache`` body sees the page's context (the variables of the ``icache``
tag's place), not variables set inside the block by ``{% for %}`` or
``{% with %}``. A block without holes costs one character per entry.
"""

from __future__ import annotations

import contextvars
import hashlib
import json
import logging
import re
import secrets
import threading
import time
import weakref

from django import template
from django.template.base import TokenType, Variable, VariableDoesNotExist
from django.template.defaulttags import CsrfTokenNode
from django.template.loader_tags import BLOCK_CONTEXT_KEY, BlockNode, ExtendsNode, IncludeNode
from django.utils.html import conditional_escape
from django.utils.safestring import SafeString

from .. import icache
from .._tokens import token_value
from ..middleware import current_page, taint

register = template.Library()
logger = logging.getLogger("django_icache")

# The entry's format: the first character says whether a header of holes
# follows. Part of every block's identity, so entries of an older format are
# never read.
_FORMAT = "django-block-2"
_PLAIN = "\x01"
_HOLES = "\x02"

# ---- holes ------------------------------------------------------------------------


class _Collector:
    """The holes of the block being rendered on this thread (a miss).

    A hole is rendered as a placeholder carrying a random nonce drawn for
    this render: only the holes this render made are found in its output, and
    no value rendered into the block can forge one (it would have to guess
    the nonce). The stored entry then records the holes' positions in its
    header; nothing in the stored text is ever scanned for placeholders."""

    __slots__ = ("holes", "nonce", "_pattern")

    def __init__(self):
        self.holes: list[list] = []
        self.nonce = secrets.token_hex(16)
        self._pattern = None

    def placeholder(self, hole: list) -> str:
        self.holes.append(hole)
        return SafeString(f"\x00icache:{self.nonce}:{len(self.holes) - 1}\x00")

    def store(self, html: str) -> str:
        """The entry for `html`: its text without the placeholders, with a
        header of (position, hole) pairs."""
        if not self.holes:
            return _PLAIN + html
        pattern = re.compile("\x00icache:" + self.nonce + r":(\d+)\x00")
        header, text, last, seen = [], [], 0, set()
        length = 0
        for m in pattern.finditer(html):
            i = int(m.group(1))
            if i >= len(self.holes) or i in seen:
                raise _Mangled()
            seen.add(i)
            chunk = html[last : m.start()]
            text.append(chunk)
            length += len(chunk)
            header.append([length, *self.holes[i]])
            last = m.end()
        if len(seen) != len(self.holes):
            # A filter around the hole changed its placeholder: nothing
            # trustworthy can be stored.
            raise _Mangled()
        text.append(html[last:])
        return _HOLES + json.dumps(header, separators=(",", ":")) + "\n" + "".join(text)


class _Mangled(Exception):
    """A hole's placeholder did not survive the body's filters."""


class _Unfillable(Exception):
    """A stored hole cannot be filled here (its template is gone)."""


_current: contextvars.ContextVar[_Collector | None] = contextvars.ContextVar("django_icache_holes", default=None)

# {% nocache %} nodes by key, to fill their holes on a hit (a node whose
# template is not loaded yet is loaded by name).
_NOCACHE: "weakref.WeakValueDictionary[str, NocacheNode]" = weakref.WeakValueDictionary()

_csrf_render = CsrfTokenNode.render


def _csrf_token_render(self, context):
    c = _current.get()
    if c is not None:
        return c.placeholder(["csrf"])
    return _csrf_render(self, context)


def install_csrf_hole() -> None:
    """Makes ``{% csrf_token %}`` a hole inside blocks (outside them it renders
    as Django renders it). Done when the tag library or the app loads."""
    if CsrfTokenNode.render is not _csrf_token_render:
        CsrfTokenNode.render = _csrf_token_render


install_csrf_hole()


class _CsrfValue:
    """``{{ csrf_token }}`` inside a block being rendered: each use is a
    hole, filled with the request's own (masked) token."""

    __slots__ = ("_collector",)

    def __init__(self, collector: _Collector):
        self._collector = collector

    def __str__(self) -> str:
        return self._collector.placeholder(["csrf_value"])

    __html__ = __str__

    def __bool__(self) -> bool:
        return True


def _fill_hole(hole: list, context) -> str:
    kind = hole[0]
    if kind == "csrf":
        return _csrf_render(CsrfTokenNode(), context)
    if kind == "csrf_value":
        return conditional_escape(str(context.get("csrf_token", "")))
    if kind == "nocache" and len(hole) == 3:
        template_name, key = hole[1], hole[2]
        node = _NOCACHE.get(key)
        loaded = None
        if node is None and template_name and context.template is not None:
            # Its template was not loaded in this process yet (or was freed):
            # loading it registers the node (kept alive by `loaded` here).
            try:
                loaded = context.template.engine.get_template(template_name)
            except (template.TemplateDoesNotExist, template.TemplateSyntaxError):
                pass
            node = _NOCACHE.get(key)
        if node is None:
            raise _Unfillable(f"{{% nocache %}} of {template_name} is not in the template any more")
        out = node.nodelist.render(context)
        del loaded
        return out
    raise _Unfillable(f"unknown hole {kind!r}")


def _fill(stored: str, context) -> str:
    tag = stored[:1]
    if tag == _PLAIN:
        return stored[1:]
    if tag != _HOLES:
        raise _Unfillable("not an entry of this version")
    end = stored.find("\n")
    if end < 0:
        raise _Unfillable("truncated entry")
    try:
        header = json.loads(stored[1:end])
    except ValueError:
        raise _Unfillable("corrupt entry") from None
    text = stored[end + 1 :]
    outer = _current.get()
    out, last = [], 0
    for pos, *hole in header:
        if not isinstance(pos, int) or not last <= pos <= len(text) or not hole:
            raise _Unfillable("corrupt entry")
        out.append(text[last:pos])
        last = pos
        # Inside an outer block being rendered, the hole stays a hole of the
        # outer entry; at the top it is rendered for this request (so the
        # page is not the same for every request: no ETag).
        if outer is not None:
            out.append(outer.placeholder(hole))
        else:
            taint()
            out.append(_fill_hole(hole, context))
    out.append(text[last:])
    return "".join(out)


# ---- identity ----------------------------------------------------------------------


def _sha(*parts: str) -> str:
    h = hashlib.sha256()
    for p in parts:
        b = p.encode("utf-8", "surrogatepass")
        h.update(b"%d:" % len(b))
        h.update(b)
    return h.hexdigest()[:32]


def _origin_digest(origin) -> str:
    """The digest of the source of the template `origin` names (kept on the
    origin: a template loader makes a new one when it reloads)."""
    d = getattr(origin, "_icache_digest", None)
    if d is None:
        try:
            source = origin.loader.get_contents(origin)
        except Exception:  # noqa: BLE001 - an origin without a loader (a string template)
            source = ""
        d = _sha(str(getattr(origin, "name", "")), source)
        try:
            origin._icache_digest = d
        except AttributeError:
            pass
    return d


def _literal_name(expr) -> str | None:
    """The template name of an include/extends when it is a literal."""
    if expr is None or getattr(expr, "is_var", True) or getattr(expr, "filters", None):
        return None
    return expr.var if isinstance(expr.var, str) else None


def _static_digest(nodelist, engine, seen: set[str]) -> list[str]:
    """Digests of the templates `nodelist` includes by literal name, and of
    what they include or extend, recursively (each template once)."""
    out = []
    names = [_literal_name(n.template) for n in nodelist.get_nodes_by_type(IncludeNode)]
    names += [_literal_name(n.parent_name) for n in nodelist.get_nodes_by_type(ExtendsNode)]
    for name in names:
        if name is None or name in seen:
            continue
        seen.add(name)
        try:
            t = engine.get_template(name)
        except template.TemplateDoesNotExist:
            out.append(_sha("missing", name))
            continue
        except template.TemplateSyntaxError:
            out.append(_sha("broken", name))
            continue
        t = getattr(t, "template", t)
        out.append(_sha(name, getattr(t, "source", "")))
        out.extend(_static_digest(t.nodelist, engine, seen))
    return out


def _per_user_reads(tokens) -> set[str]:
    """Per-user or per-request names the block's own source reads outside
    ``{% nocache %}``."""
    found, bound, depth = set(), set(), 0
    for t in tokens:
        if t.token_type == TokenType.BLOCK:
            word = t.contents.split(None, 1)[0] if t.contents.strip() else ""
            if word == "nocache":
                depth += 1
            elif word == "endnocache":
                depth = max(0, depth - 1)
        if depth or t.token_type not in (TokenType.VAR, TokenType.BLOCK):
            continue
        # A tag's own name is not a read ({% csrf_token %} is a hole).
        contents = t.contents
        if t.token_type == TokenType.BLOCK:
            parts = contents.split(None, 1)
            contents = parts[1] if len(parts) > 1 else ""
        if t.token_type == TokenType.BLOCK:
            bound.update(_bound_names(t.contents))
        for m in _PER_USER.finditer(contents):
            found.add(m.group(1))
    # A name the block binds itself ({% for user in users %}) is its own.
    return found - bound


def _bound_names(contents: str) -> set[str]:
    names = set()
    m = re.match(r"for\s+(.+?)\s+in\s", contents)
    if m:
        names.update(n.strip() for n in m.group(1).split(","))
    if contents.startswith("with"):
        names.update(re.findall(r"(\w+)=", contents))
    m = re.search(r"\bas\s+(\w+)\s*$", contents)
    if m:
        names.add(m.group(1))
    return {n for n in names if n in ("user", "messages", "perms")}


_PER_USER = re.compile(r"(?<![\w.])(request\.user|user(?=\.|\s*\||\s*$)|messages|perms)(?!\w)")
_USER_TOKEN = re.compile(r"^(?:request\.)?user(?:$|[.|])")

_warned_blocks: set[str] = set()
_warned_lock = threading.Lock()


def _warn_once(key: str, msg: str, *args) -> None:
    with _warned_lock:
        if key in _warned_blocks:
            return
        _warned_blocks.add(key)
    logger.warning(msg, *args)


# ---- the tags ----------------------------------------------------------------------

UNDEFINED_WARNING_EVERY = 10.0
# When each block (by identity: a template loaded twice is one block) last
# warned of an undefined token.
_undefined_at: dict[str, float] = {}


class ICacheNode(template.Node):
    child_nodelists = ("nodelist",)

    def __init__(self, nodelist, tokens, ident, where, leaks, stale=None):
        self.nodelist = nodelist
        self.tokens = tokens
        # ``stale=True``/``False`` on the tag; None: the cache's ``stale=``.
        self.stale = stale
        # Template name, position and source digest, hashed.
        self.ident = ident
        # "template.html:12", for people (log lines, block names).
        self.where = where
        self.leaks = leaks
        self.has_blocks = bool(nodelist.get_nodes_by_type(BlockNode))
        self._static: tuple | None = None
        self._names: dict = {}

    def _token_values(self, context) -> list[str] | None:
        values = []
        for expr in self.tokens:
            if expr.is_var and isinstance(expr.var, Variable):
                try:
                    value = expr.var.resolve(context)
                except VariableDoesNotExist:
                    now = time.monotonic()
                    with _warned_lock:
                        due = now - _undefined_at.get(self.ident, -UNDEFINED_WARNING_EVERY) >= UNDEFINED_WARNING_EVERY
                        if due:
                            if len(_undefined_at) > 4096:
                                _undefined_at.clear()
                            _undefined_at[self.ident] = now
                    if due:
                        logger.warning(
                            "django_icache: %s: token %s is undefined; the block is rendered uncached "
                            "(this warning at most every 10 s per block)",
                            self.where,
                            expr.token,
                        )
                    return None
                if expr.filters:
                    value = expr.resolve(context, ignore_failures=True)
            else:
                value = expr.resolve(context, ignore_failures=True)
            try:
                values.append(token_value(value))
            except TypeError as e:
                raise TypeError(f"django_icache: {self.where}: token {expr.token}: {e}") from None
        return values

    def _name(self, context) -> str:
        from django.conf import settings

        ae = "1" if context.autoescape else "0"
        if getattr(settings, "ICACHE_VARY_ON_LANGUAGE", True):
            from django.utils import timezone, translation

            lang = translation.get_language() or ""
            tz = timezone.get_current_timezone_name() if settings.USE_TZ else ""
        else:
            lang = tz = ""
        engine = context.template.engine if context.template is not None else None
        if self._static is None or self._static[0] is not engine:
            digests = _static_digest(self.nodelist, engine, set()) if engine is not None else []
            self._static = (engine, _sha(*digests) if digests else "")
        chain = ""
        if self.has_blocks:
            # A child template's {% block %} override changes this body: the
            # template rendered and every template of the chain are identity.
            top = context.template
            parts = [str(getattr(getattr(top, "origin", None), "name", "") or getattr(top, "name", ""))]
            block_context = context.render_context.get(BLOCK_CONTEXT_KEY)
            if block_context is not None:
                origins = {}
                for nodes in block_context.blocks.values():
                    for n in nodes:
                        o = getattr(n, "origin", None)
                        if o is not None:
                            origins[id(o)] = o
                parts += sorted(_origin_digest(o) for o in origins.values())
            chain = _sha(*parts)
        key = (ae, lang, tz, self._static[1], chain)
        name = self._names.get(key)
        if name is None:
            if len(self._names) > 256:
                self._names.clear()
            name = self._names[key] = f"{self.where} " + _sha(_FORMAT, self.ident, *key)
        return name

    def _miss(self, context) -> str:
        collector = _Collector()
        reset = _current.set(collector)
        try:
            if "csrf_token" in context:
                # {{ csrf_token }} read in the body is a hole too.
                with context.push(csrf_token=_CsrfValue(collector)):
                    html = self.nodelist.render(context)
            else:
                html = self.nodelist.render(context)
        finally:
            _current.reset(reset)
        return collector.store(html)

    def render(self, context):
        if self.leaks:
            _warn_once(
                self.ident,
                "django_icache: %s: the block reads %s, which differ per user or per request, but "
                "its tokens do not: every visitor is served the first visitor's render. Add user.id "
                "to its tokens for per-user parts, and put per-request parts (flash messages) in "
                "{%% nocache %%}…{%% endnocache %%} ({%% csrf_token %%} is always a hole)",
                self.where,
                ", ".join(sorted(self.leaks)),
            )
        values = self._token_values(context)
        if values is None:
            taint()  # rendered uncached: nothing covers it
            return self.nodelist.render(context)
        try:
            options = {} if self.stale is None else {"stale": self.stale}
            # The page learns what the block read; a block inside another's
            # render is already part of that block's reads.
            page = current_page() if _current.get() is None else None
            if page is not None:
                options["page"] = page
            stored = icache.handle.fragment(
                self._name(context), values, lambda: self._miss(context), **options
            )
            return SafeString(_fill(stored, context))
        except _Mangled:
            logger.warning(
                "django_icache: %s: a filter changed a {%% csrf_token %%} or {%% nocache %%} inside the "
                "block; it is rendered uncached",
                self.where,
            )
        except _Unfillable as e:
            logger.warning("django_icache: %s: %s; the block is rendered uncached", self.where, e)
        taint()
        return self.nodelist.render(context)


class NocacheNode(template.Node):
    child_nodelists = ("nodelist",)

    def __init__(self, nodelist, template_name, key):
        self.nodelist = nodelist
        self.template_name = template_name
        self.key = key
        _NOCACHE[key] = self

    def render(self, context):
        c = _current.get()
        if c is None:
            return self.nodelist.render(context)
        return c.placeholder(["nocache", self.template_name, self.key])


def _template_name(parser) -> str:
    origin = getattr(parser, "origin", None)
    return (getattr(origin, "template_name", None) or getattr(origin, "name", None)) or "<string>"


def _parse_body(parser, end: str):
    # The body's tokens are popped from the end of parser.tokens as it is
    # parsed: keep a view of what is left to digest what was consumed.
    remaining = list(parser.tokens)
    nodelist = parser.parse((end,))
    consumed = list(reversed(remaining[len(parser.tokens) :]))
    parser.delete_first_token()
    return nodelist, consumed


def _source_digest(tokens) -> str:
    digest = hashlib.sha256()
    for t in tokens:
        digest.update(f"{t.token_type.value}:{len(t.contents)}:".encode())
        digest.update(t.contents.encode("utf-8", "surrogatepass"))
    return digest.hexdigest()[:32]


def _next_seq(parser) -> int:
    seq = getattr(parser, "_icache_seq", 0)
    parser._icache_seq = seq + 1
    return seq


@register.tag("icache")
def do_icache(parser, token):
    bits = token.split_contents()
    if len(bits) < 2:
        raise template.TemplateSyntaxError(
            "'icache' needs at least one token: {% icache 'movies' user.id %}…{% endicache %}"
        )
    # ``stale=True`` (last): serve the previous body while another process
    # renders the new one. Never a token: a filter expression has no ``=``.
    stale = None
    if len(bits) > 2 and bits[-1].startswith("stale="):
        value = bits.pop()[len("stale=") :]
        if value not in ("True", "False"):
            raise template.TemplateSyntaxError(
                f"'icache' option stale= takes True or False, not {value!r}: "
                "{% icache 'movies' stale=True %}…{% endicache %}"
            )
        stale = value == "True"
    exprs = [parser.compile_filter(b) for b in bits[1:]]
    nodelist, consumed = _parse_body(parser, "endicache")
    name = _template_name(parser)
    seq = _next_seq(parser)
    ident = _sha(name, str(token.lineno), str(seq), _source_digest([token, *consumed]))
    leaks = _per_user_reads(consumed)
    if any(_USER_TOKEN.match(b) for b in bits[1:]):
        leaks -= {"request.user", "user", "perms"}
    return ICacheNode(nodelist, exprs, ident, f"{name}:{token.lineno}", leaks, stale)


@register.tag("nocache")
def do_nocache(parser, token):
    if len(token.split_contents()) != 1:
        raise template.TemplateSyntaxError("'nocache' takes no arguments: {% nocache %}…{% endnocache %}")
    nodelist, consumed = _parse_body(parser, "endnocache")
    name = _template_name(parser)
    key = _sha("nocache", name, str(token.lineno), str(_next_seq(parser)), _source_digest([token, *consumed]))
    return NocacheNode(nodelist, name if name != "<string>" else "", key)
