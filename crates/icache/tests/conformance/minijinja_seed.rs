//! MiniJinja's seed syntax as users write it: tokens that are template
//! expressions, errors against the user's own text, a block met twice in one
//! render, blocks with no token, and per-request holes (`{% nocache %}`).
//! Each through the loader (positioned blocks) and through `rewrite()`.

use std::sync::{Arc, Mutex};

use icache::ICache;
use minijinja::{Environment, context};

/// Collects what icache logs (through `tracing`) while `f` runs.
fn logged<T>(f: impl FnOnce() -> T) -> (T, String) {
    #[derive(Clone, Default)]
    struct Buf(Arc<Mutex<Vec<u8>>>);
    impl std::io::Write for Buf {
        fn write(&mut self, b: &[u8]) -> std::io::Result<usize> {
            self.0.lock().expect("log buffer").extend_from_slice(b);
            Ok(b.len())
        }
        fn flush(&mut self) -> std::io::Result<()> {
            Ok(())
        }
    }
    let buf = Buf::default();
    let writer = buf.clone();
    let subscriber = tracing_subscriber::fmt()
        .with_writer(move || writer.clone())
        .with_ansi(false)
        .finish();
    let out = tracing::subscriber::with_default(subscriber, f);
    let text = buf.0.lock().expect("log buffer").clone();
    (out, String::from_utf8_lossy(&text).into_owned())
}

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
            assert!(!shown.contains("call icache"), "{src:?}: {shown}");
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
            warnings[0].contains("incr"),
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
