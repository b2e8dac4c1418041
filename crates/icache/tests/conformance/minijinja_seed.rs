//! MiniJinja's seed syntax as users write it: tokens that are template
//! expressions, errors against the user's own text, a block met twice in one
//! render, blocks with no token, and per-request holes (`{% nocache %}`).
//! Each through the loader (positioned blocks) and through `rewrite()`.

use std::sync::Arc;

use icache::ICache;
use minijinja::{Environment, context};

use crate::guidance::logged_with as logged;

/// An environment whose templates come from `templates` through
/// `icache::minijinja::loader` (the positioned-block path).
fn loader_env(cache: &ICache, templates: &[(&str, &str)]) -> Environment<'static> {
    let mut env = Environment::new();
    icache::minijinja::register(&mut env, cache.clone());
    let templates: Vec<(String, String)> = templates
        .iter()
        .map(|(n, s)| ((*n).to_owned(), (*s).to_owned()))
        .collect();
    env.set_loader(icache::minijinja::loader(move |name: &str| {
        Ok(templates
            .iter()
            .find(|(n, _)| n == name)
            .map(|(_, s)| s.clone()))
    }));
    env
}

/// The same templates added with `add_template_owned(rewrite(…))`.
fn rewrite_env(cache: &ICache, templates: &[(&str, &str)]) -> Environment<'static> {
    let mut env = Environment::new();
    icache::minijinja::register(&mut env, cache.clone());
    for (name, src) in templates {
        let out = icache::minijinja::rewrite(name, src).expect("rewrites");
        env.add_template_owned((*name).to_owned(), out)
            .expect("valid");
    }
    env
}

type MakeEnv = fn(&ICache, &[(&str, &str)]) -> Environment<'static>;
const PATHS: [(&str, MakeEnv); 2] = [("loader", loader_env), ("rewrite", rewrite_env)];

fn render(env: &Environment<'_>, name: &str, ctx: minijinja::Value) -> String {
    env.get_template(name)
        .and_then(|t| t.render(ctx))
        .unwrap_or_else(|e| panic!("{name}: {e:#}"))
}

// ---- tokens that are expressions ------------------------------------------

/// Every form the docs promise: each block renders, is served from the
/// cache for the same token values, and is a separate entry for other ones.
#[test]
fn expression_tokens_are_split_where_an_expression_ends() {
    for (form, tokens) in [
        ("concatenation", "'items' 'user:' ~ user.id"),
        ("filter", "'items' user.name | upper"),
        ("arithmetic", "'items' user.id + 1"),
        ("call with commas", "'items' [user.id, 'a b'] | join(', ')"),
        ("string with spaces", "'items of user' user.id"),
        ("ternary", "'items' user.id if user.id > 1 else 'one'"),
        ("test", "'items' (user.id is odd) user.id"),
        ("option", "'items' user.id name='list'"),
    ] {
        for (path, make) in PATHS {
            let cache = ICache::memory();
            let src = format!(
                "{{% load icache %}}\n<h1>{{{{ user.name }}}}</h1>{{% icache {tokens} %}}<p>{{{{ user.name }}}}</p>{{% endicache %}}"
            );
            let env = make(&cache, &[("page.html", &src)]);
            let ann = context! { user => context! { id => 7, name => "Ann" } };
            let bob = context! { user => context! { id => 8, name => "Bob" } };
            let first = render(&env, "page.html", ann.clone());
            assert_eq!(first, "\n<h1>Ann</h1><p>Ann</p>", "{form} ({path})");
            assert_eq!(render(&env, "page.html", ann), first, "{form} ({path})");
            assert_eq!(cache.stats().hits, 1, "{form} ({path}): a hit");
            // Another user is another entry: the expression is a token.
            assert_eq!(
                render(&env, "page.html", bob),
                "\n<h1>Bob</h1><p>Bob</p>",
                "{form} ({path})"
            );
        }
    }
}

/// The token's value is the expression's value: bumping `user:7` (the value
/// of `'user:' ~ user.id`) re-renders that user's block.
#[test]
fn an_expression_token_is_bumped_by_its_value() {
    for (path, make) in PATHS {
        let cache = ICache::memory();
        let env = make(
            &cache,
            &[(
                "p.html",
                "{% icache 'items' 'user:' ~ user.id %}{{ n }}{% endicache %}",
            )],
        );
        let ctx = |n: i32| context! { user => context! { id => 7 }, n };
        assert_eq!(render(&env, "p.html", ctx(1)), "1", "{path}");
        assert_eq!(render(&env, "p.html", ctx(2)), "1", "{path}: cached");
        cache.incr("user:7").expect("bump");
        assert_eq!(render(&env, "p.html", ctx(3)), "3", "{path}: re-rendered");
    }
}

/// A bad expression and an unclosed block name the user's template, line
/// and text, never the rewritten `{% call icache(…) %}`.
#[test]
fn errors_show_the_users_line_and_text() {
    for (src, line, text) in [
        (
            "a\n\n{% icache 'items' 'user:' ~ %}x{% endicache %}",
            3,
            "'user:' ~",
        ),
        (
            "{% load icache %}\n{% icache 'items'\n   user.id | %}x{% endicache %}",
            3,
            "user.id |",
        ),
        ("\n{% icache 'items' a b * %}x{% endicache %}", 2, "`b *`"),
        (
            "x\n{% icache 'items' user.id %}never closed",
            2,
            "{% icache 'items' user.id %}",
        ),
        (
            "{% icache 'a' colour='red' %}x{% endicache %}",
            1,
            "colour=",
        ),
        (
            "\n{% call icache('a' ~) %}x{% endcall %}",
            2,
            "{% call icache('a' ~) %}",
        ),
    ] {
        let loaded = {
            let env = loader_env(&ICache::memory(), &[("page.html", src)]);
            env.get_template("page.html").map(|_| ()).expect_err(src)
        };
        let rewritten = icache::minijinja::rewrite("page.html", src).expect_err(src);
        for err in [loaded, rewritten] {
            let shown = format!("{err:#}");
            assert!(
                shown.contains(&format!("page.html line {line}")),
                "{src:?}: {shown}"
            );
            assert!(shown.contains(text), "{src:?}: {shown}");
            // The rewrite's call form never shows (except where the user
            // wrote one).
            assert!(
                src.contains("call icache") || !shown.contains("call icache"),
                "{src:?}: {shown}"
            );
            assert!(!shown.contains("__icache"), "{src:?}: {shown}");
        }
    }
}

/// The Tera form shares the scanner and the split.
#[test]
fn tera_blocks_take_expression_tokens() {
    let cache = ICache::memory();
    let mut tera = tera::Tera::default();
    icache::tera::register(&mut tera, cache.clone());
    let src = "{% icache 'items' 'user:' ~ user %}{{ n }}{% endicache %}";
    tera.add_raw_template(
        "t.html",
        &icache::tera::rewrite("t.html", src).expect("rewrites"),
    )
    .expect("valid");
    let ctx = |n: i32| {
        let mut c = tera::Context::new();
        c.insert("user", &7);
        c.insert("n", &n);
        c
    };
    assert_eq!(
        icache::tera::render(&tera, "t.html", &ctx(1)).expect("renders"),
        "1"
    );
    assert_eq!(
        icache::tera::render(&tera, "t.html", &ctx(2)).expect("renders"),
        "1"
    );
    cache.incr("user:7").expect("bump");
    assert_eq!(
        icache::tera::render(&tera, "t.html", &ctx(3)).expect("renders"),
        "3"
    );
    let err = icache::tera::rewrite("t.html", "\n{% icache 'a' ~ %}x{% endicache %}")
        .expect_err("bad token");
    let err = err.to_string();
    assert!(
        err.contains("t.html line 2") && err.contains("'a' ~"),
        "{err}"
    );
}

// ---- a block met twice in one render ---------------------------------------

/// A block in a loop whose loop variable is not a token shows the first
/// iteration everywhere (`<1><1><1>`): one warning per block however often,
/// naming the block and the loop variable it probably misses.
#[test]
fn a_block_met_twice_warns_once_naming_the_loop_variable() {
    const SRC: &str = "{% load icache %}<ul>\n{% for item in items %}{% icache 'items' %}<{{ item }}>{% endicache %}{% endfor %}</ul>";
    for (path, make) in PATHS {
        let cache = ICache::memory();
        let env = make(&cache, &[("list.html", SRC)]);
        let (pages, log) = logged(|| {
            (0..3)
                .map(|_| render(&env, "list.html", context! { items => [1, 2, 3] }))
                .collect::<Vec<_>>()
        });
        assert_eq!(
            pages[0], "<ul>\n<1><1><1></ul>",
            "{path}: what the warning is about"
        );
        let warnings: Vec<&str> = log.lines().filter(|l| l.contains("met twice")).collect();
        assert_eq!(warnings.len(), 1, "{path}: once per block: {log}");
        assert!(
            warnings[0].contains("\"list.html\" line 2 col 24"),
            "{path}: {log}"
        );
        assert!(
            warnings[0].contains("item"),
            "{path}: names the loop variable: {log}"
        );
        assert!(
            warnings[0].contains("[\"items\"]"),
            "{path}: names the tokens: {log}"
        );
    }
}

/// With the loop variable among its tokens, a block in a loop is one entry
/// per iteration and nothing is logged; nor for two separate blocks.
#[test]
fn a_block_with_its_loop_variable_is_not_warned_about() {
    const SRC: &str = "{% for item in items %}{% icache 'items' item %}<{{ item }}>{% endicache %}{% endfor %}{% icache 'items' %}a{% endicache %}{% icache 'items' %}b{% endicache %}";
    for (path, make) in PATHS {
        let cache = ICache::memory();
        let env = make(&cache, &[("list.html", SRC)]);
        let (page, log) = logged(|| render(&env, "list.html", context! { items => [1, 2, 3] }));
        assert_eq!(page, "<1><2><3>ab", "{path}");
        assert!(!log.contains("met twice"), "{path}: {log}");
    }
}

/// A block in a macro called twice: the macro's argument is named.
#[test]
fn a_block_in_a_macro_names_its_arguments() {
    const SRC: &str = "{% macro card(user) %}{% icache 'card' %}{{ user }}{% endicache %}{% endmacro %}{{ card('ann') }}{{ card('bob') }}";
    let cache = ICache::memory();
    let env = loader_env(&cache, &[("m.html", SRC)]);
    let (page, log) = logged(|| render(&env, "m.html", context! {}));
    assert_eq!(page, "annann");
    let warning = log
        .lines()
        .find(|l| l.contains("met twice"))
        .unwrap_or_else(|| panic!("{log}"));
    assert!(warning.contains("user"), "{log}");
}

// ---- blocks with no token --------------------------------------------------

/// `{% icache %}` with no token can never be invalidated: one warning per
/// block saying how to flush it; none when a nested block gives it tokens.
#[test]
fn a_block_with_no_token_warns_once_how_to_flush_it() {
    for (path, make) in PATHS {
        let cache = ICache::memory();
        let env = make(
            &cache,
            &[
                ("bare.html", "\n{% icache %}{{ n }}{% endicache %}"),
                (
                    "nested.html",
                    "{% icache %}<{% icache 'movies' %}{{ n }}{% endicache %}>{% endicache %}",
                ),
            ],
        );
        let (_, log) = logged(|| {
            for n in 0..3 {
                render(&env, "bare.html", context! { n });
                render(&env, "nested.html", context! { n });
            }
        });
        let warnings: Vec<&str> = log.lines().filter(|l| l.contains("no tokens")).collect();
        assert_eq!(
            warnings.len(),
            1,
            "{path}: once, and not for the nested one: {log}"
        );
        assert!(
            warnings[0].contains("\"bare.html\" line 2 col 1"),
            "{path}: {log}"
        );
        assert!(
            warnings[0].contains("incr") && warnings[0].contains("cache.flush()"),
            "{path}: says how to flush: {log}"
        );
        // The nested one is invalidated through its inner token.
        cache.incr("movies").expect("bump");
        assert_eq!(
            render(&env, "nested.html", context! { n => 9 }),
            "<9>",
            "{path}"
        );
    }
}

// ---- per-request holes -----------------------------------------------------

const FORM: &str = "{% load icache %}{% icache 'movies' %}<form>{% nocache %}<input value=\"{{ csrf }}\">{% endnocache %}<p>{{ n }}</p></form>{% endicache %}";
const FORM_CALL: &str = "{% icache 'movies' %}<form>{% call icache_nocache() %}<input value=\"{{ csrf }}\">{% endcall %}<p>{{ n }}</p></form>{% endicache %}";

/// A CSRF-like value inside a cached block is the current request's on
/// every hit, escaped as the template escapes it; the rest is cached.
#[test]
fn a_hole_is_rendered_on_every_hit_with_the_current_values() {
    for src in [FORM, FORM_CALL] {
        for (path, make) in PATHS {
            let cache = ICache::memory();
            let env = make(&cache, &[("form.html", src)]);
            let page = |csrf: &str, n: i32| render(&env, "form.html", context! { csrf, n });
            assert_eq!(
                page("a1", 1),
                "<form><input value=\"a1\"><p>1</p></form>",
                "{path}"
            );
            assert_eq!(
                page("b2", 2),
                "<form><input value=\"b2\"><p>1</p></form>",
                "{path}: the hole is this request's, the rest the cached render"
            );
            assert_eq!(
                page("<\"&'>", 3),
                "<form><input value=\"&lt;&quot;&amp;&#x27;&gt;\"><p>1</p></form>",
                "{path}: escaped as the template escapes"
            );
            assert_eq!(cache.stats().hits, 2, "{path}");
            cache.incr("movies").expect("bump");
            assert_eq!(
                page("c3", 4),
                "<form><input value=\"c3\"><p>4</p></form>",
                "{path}"
            );
        }
    }
}

/// The same through a real Redis: the stored entry (header and body) goes
/// through the server, and another process's cache reads it.
#[test]
fn a_hole_survives_a_real_backend() {
    let Some(redis) = crate::support::RedisServer::start() else {
        return;
    };
    let url = format!("{}?timeout_ms=2000&near=off", redis.url());
    let writer = ICache::from_url(&url).expect("redis");
    let reader = ICache::from_url(&url).expect("redis");
    let page = |cache: &ICache, csrf: &str, n: i32| {
        render(
            &loader_env(cache, &[("form.html", FORM)]),
            "form.html",
            context! { csrf, n },
        )
    };
    assert_eq!(
        page(&writer, "w", 1),
        "<form><input value=\"w\"><p>1</p></form>"
    );
    assert_eq!(
        page(&reader, "r", 2),
        "<form><input value=\"r\"><p>1</p></form>"
    );
    assert_eq!(reader.stats().hits, 1);
}

/// An inner block's hole inside an outer block's stored body is still
/// filled on an outer hit, and after an inner bump re-renders the outer.
#[test]
fn holes_in_nested_blocks_are_filled_on_outer_hits() {
    const SRC: &str = "{% icache 'page' %}[{% icache 'side' %}({% nocache %}{{ flash }}{% endnocache %}{{ n }}){% endicache %}{{ n }}]{% endicache %}";
    for (path, make) in PATHS {
        let cache = ICache::memory();
        let env = make(&cache, &[("p.html", SRC)]);
        let page = |flash: &str, n: i32| render(&env, "p.html", context! { flash, n });
        assert_eq!(page("hi", 1), "[(hi1)1]", "{path}");
        assert_eq!(
            page("bye", 2),
            "[(bye1)1]",
            "{path}: outer hit, hole filled"
        );
        cache.incr("side").expect("bump the inner token");
        assert_eq!(page("again", 3), "[(again3)3]", "{path}: outer re-rendered");
        assert_eq!(page("more", 4), "[(more3)3]", "{path}");
        // The outer re-rendered around an inner hit: the inner entry's hole
        // becomes the outer's again.
        cache.incr("page").expect("bump the outer token");
        assert_eq!(
            page("x", 5),
            "[(x3)5]",
            "{path}: inner hit in an outer miss"
        );
        assert_eq!(page("y", 6), "[(y3)5]", "{path}: outer hit");
    }
}

/// Text from data that looks like a hole (the stored header at the very
/// start of a body, or a marker) is rendered literally, hit or miss.
#[test]
fn a_value_that_looks_like_a_hole_is_text() {
    const SRC: &str = "{% icache 'x' %}{{ v }}{% nocache %}{{ csrf }}{% endnocache %}{{ v }}{% endicache %}|{% icache 'y' %}{{ v }}{% endicache %}";
    let fakes = [
        "\u{0}icache-holes:1\u{0}1\u{0}0:3:a:b\u{0}zz".to_owned(),
        "\u{1e}0.0\u{1f}\u{1e}1.0\u{1f}".to_owned(),
        format!("\u{1e}{}.0\u{1f}", u128::MAX),
    ];
    for fake in fakes {
        for (path, make) in PATHS {
            let cache = ICache::memory();
            let env = make(&cache, &[("t.txt", SRC)]);
            let want = |csrf: &str| format!("{fake}{csrf}{fake}|{fake}");
            for csrf in ["one", "two"] {
                let got = render(&env, "t.txt", context! { v => fake.clone(), csrf });
                assert_eq!(got, want(csrf), "{path}: {fake:?}");
            }
            assert_eq!(cache.stats().hits, 2, "{path}");
        }
    }
}

/// A hole keeps its newlines and whitespace control, as it would inline.
#[test]
fn a_hole_renders_as_it_would_inline() {
    const SRC: &str = "{% icache 'a' %}[{% nocache %}\n{{ v }}\n{% endnocache %}]({%- nocache -%}\n {{ v }} \n{%- endnocache -%})\n{% endicache %}";
    let mut plain = Environment::new();
    plain
        .add_template_owned(
            "t.txt",
            SRC.replace("nocache", "if true")
                .replace("icache 'a'", "if true")
                .replace("endicache", "endif")
                .replace("endif true", "endif"),
        )
        .expect("valid");
    let expected = plain
        .get_template("t.txt")
        .and_then(|t| t.render(context! { v => 1 }))
        .expect("renders");
    assert_eq!(expected, "[\n1\n](1)\n");
    for (path, make) in PATHS {
        let cache = ICache::memory();
        let env = make(&cache, &[("t.txt", SRC)]);
        for _ in 0..2 {
            assert_eq!(
                render(&env, "t.txt", context! { v => 1 }),
                expected,
                "{path}"
            );
        }
        assert_eq!(cache.stats().hits, 1, "{path}");
    }
}

/// What a hole sees: the variables visible where its block opens (the
/// render's context, a loop around the block), not those set inside the
/// block; the same on a miss and on a hit.
#[test]
fn a_hole_sees_what_its_block_opening_sees() {
    const SRC: &str = "{% for u in users %}{% icache 'row' u %}{% set inner = 'set inside' %}<{% nocache %}{{ u }} {{ csrf }} {{ inner }}{% endnocache %}>{% endicache %}{% endfor %}";
    for (path, make) in PATHS {
        let cache = ICache::memory();
        let env = make(&cache, &[("t.txt", SRC)]);
        for csrf in ["k1", "k2"] {
            assert_eq!(
                render(&env, "t.txt", context! { users => ["ann", "bob"], csrf }),
                format!("<ann {csrf} ><bob {csrf} >"),
                "{path}"
            );
        }
        assert_eq!(cache.stats().hits, 2, "{path}");
    }
}

/// A hole in a template included by a cached block is still a hole.
#[test]
fn a_hole_in_an_included_template_is_filled() {
    let cache = ICache::memory();
    let env = loader_env(
        &cache,
        &[
            (
                "page.txt",
                "{% icache 'p' %}<{% include 'part.html' %}>{% endicache %}",
            ),
            (
                "part.html",
                "{% nocache %}{{ csrf }}{% endnocache %}{{ n }}",
            ),
        ],
    );
    // The hole is escaped as its own template (`.html`) escapes.
    let page = |csrf: &str, n: i32| render(&env, "page.txt", context! { csrf, n });
    assert_eq!(page("&", 1), "<&amp;1>");
    assert_eq!(page("b", 2), "<b1>");
    assert_eq!(cache.stats().hits, 1);
}

/// Outside a cached block a hole is plain template text (it sees local
/// variables). A hand-written `icache_nocache` call inside a block of a
/// template that skipped the rewrite cannot be rendered again on a hit (its
/// source is unknown): the blocks around it render uncached, with one
/// warning, and the per-request value is never stored for everyone.
#[test]
fn holes_outside_blocks_and_without_the_rewrite() {
    let cache = ICache::memory();
    let env = loader_env(
        &cache,
        &[(
            "t.txt",
            "{% for i in [1, 2] %}{% nocache %}{{ i }}{% endnocache %}{% endfor %}",
        )],
    );
    assert_eq!(render(&env, "t.txt", context! {}), "12");

    let mut env = Environment::new();
    icache::minijinja::register(&mut env, cache.clone());
    env.add_template(
        "raw.html",
        "{% call icache('page', name='outer') %}<{% call icache('side', name='inner') %}{% call icache_nocache() %}{{ csrf }}{% endcall %}{{ n }}{% endcall %}>{% endcall %}",
    )
    .expect("valid");
    let (pages, log) = logged(|| {
        [("x", 1), ("y", 2), ("z", 3)]
            .map(|(csrf, n)| render(&env, "raw.html", context! { csrf, n }))
    });
    assert_eq!(
        pages,
        ["<x1>", "<y2>", "<z3>"],
        "this request's value, never a stored one"
    );
    assert_eq!(cache.stats().hits, 0);
    let warnings: Vec<&str> = log
        .lines()
        .filter(|l| l.contains("icache_nocache"))
        .collect();
    assert_eq!(warnings.len(), 1, "{log}");
    assert!(warnings[0].contains("icache::minijinja::loader"), "{log}");
    env.add_template(
        "outside.html",
        "{% call icache_nocache() %}{{ csrf }}{% endcall %}",
    )
    .expect("valid");
    assert_eq!(render(&env, "outside.html", context! { csrf => "y" }), "y");
}

/// Holes cannot hold blocks; an unclosed one names its line.
#[test]
fn hole_syntax_errors() {
    for (src, needle) in [
        (
            "{% nocache %}{% icache 'a' %}x{% endicache %}{% endnocache %}",
            "inside the {% nocache %} section opened on line 1",
        ),
        ("\n{% nocache %}x", "t.html line 2: unclosed {% nocache %}"),
        ("{% endnocache %}", "without an open {% nocache %}"),
        (
            "{% call icache_nocache(1) %}{% endcall %}",
            "takes no arguments",
        ),
    ] {
        let err = icache::minijinja::rewrite("t.html", src).expect_err(src);
        assert!(err.to_string().contains(needle), "{src:?}: {err}");
    }
    let err = icache::tera::rewrite(
        "t.html",
        "{% icache 'a' %}{% nocache %}{% endnocache %}{% endicache %}",
    )
    .expect_err("Tera");
    assert!(err.to_string().contains("Per-request parts"), "{err}");
}

/// `render_async` (the render on tokio's blocking pool) fills holes too.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn holes_work_through_render_async() {
    let cache = ICache::memory();
    let env = Arc::new(loader_env(&cache, &[("form.html", FORM)]));
    for (csrf, n, want) in [("a", 1, "a\">1"), ("b", 2, "b\">1")] {
        let page = icache::minijinja::render_async(env.clone(), "form.html", context! { csrf, n })
            .await
            .expect("renders");
        assert!(
            page.ends_with(&format!("{want}</p></form>").replace("\">", "\"><p>")),
            "{page}"
        );
    }
    assert_eq!(cache.stats().hits, 1);
}

/// A hole that uses a name set inside its cached block (which a hit does
/// not run) is warned about when the template is rewritten.
#[test]
fn a_hole_using_a_variable_set_inside_its_block_is_warned_about() {
    let (out, log) = logged(|| {
        icache::minijinja::rewrite(
            "t.html",
            "{% icache 'x' %}{% for u in users %}{% set tone = 'hi' %}{% nocache %}user {{ u }} {{ tone }} {{ csrf }}{% endnocache %}{% endfor %}{% endicache %}",
        )
    });
    out.expect("rewrites");
    let warning = log
        .lines()
        .find(|l| l.contains("nocache"))
        .unwrap_or_else(|| panic!("{log}"));
    assert!(warning.contains("tone, u"), "{log}");
    assert!(
        !warning.contains("csrf") && !warning.contains("user,"),
        "{log}"
    );
    // Nothing to say when the hole uses what the block's opening sees.
    let (_, log) = logged(|| {
        icache::minijinja::rewrite(
            "t.html",
            "{% for u in users %}{% icache 'x' u %}{% nocache %}{{ u }}{% endnocache %}{% endicache %}{% endfor %}",
        )
    });
    assert!(!log.contains("nocache"), "{log}");
}
