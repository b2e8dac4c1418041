//! Part of section 1 of the report: a block hit in each template engine
//! (Askama, maud, Tera) against rendering the same block uncached.

use std::hint::black_box;

use askama::Template;
use icache::ICache;
use icache_demo::db::Rated;

use crate::Settings;
use crate::report::{self, Table};
use crate::timing::{self, Case};

use super::*;

/// The demo's personal-rating list, as an Askama template.
#[derive(Template)]
#[template(
    source = "<ol id=\"personal\">{% for m in movies %}<li data-movie=\"{{ m.id }}\"><span class=\"rating\">{{ m.rating }}/5</span> <span class=\"title\">{{ m.title }}</span> <span class=\"year\">({{ m.year }})</span></li>{% endfor %}</ol>",
    ext = "html"
)]
struct List<'a> {
    movies: &'a [Rated],
}

fn maud_list(movies: &[Rated]) -> maud::Markup {
    maud::html! {
        ol #personal {
            @for m in movies {
                li data-movie=(m.id) {
                    span.rating { (m.rating) "/5" } " " span.title { (m.title) } " " span.year { "(" (m.year) ")" }
                }
            }
        }
    }
}

/// The engines' table: for each engine, its uncached render of the list
/// (query included) and its block hit on each backend.
pub(crate) fn engines(servers: &Servers<'_>, settings: &Settings) -> String {
    let dir = TempDir::new("engines");
    let state = icache_demo::open(&dir.0, ICache::memory())
        .unwrap_or_else(|e| panic!("open the demo database: {e}"));
    let db = state.db();
    let query = || {
        db.personal_ratings_page(USER, 1, icache_demo::PER_PAGE)
            .unwrap_or_else(|e| panic!("query the list: {e}"))
    };
    let caches: Vec<(&str, ICache)> = BACKENDS.iter().map(|&b| (b, servers.open(b))).collect();
    let tokens = ["engines", "movies", "7"];
    let askama_render = || {
        let movies = query();
        List { movies: &movies }
            .render()
            .unwrap_or_else(|e| panic!("askama: {e}"))
    };
    let maud_render = || maud_list(&query()).into_string();
    // Tera: the same list from a template function (so a hit skips the
    // query), the block written in the seed's syntax and rewritten.
    const TERA_BODY: &str = "<ol id=\"personal\">{% for m in movies() %}<li data-movie=\"{{ m.id }}\"><span class=\"rating\">{{ m.rating }}/5</span> <span class=\"title\">{{ m.title }}</span> <span class=\"year\">({{ m.year }})</span></li>{% endfor %}</ol>";
    let teras: Vec<tera::Tera> = caches
        .iter()
        .map(|(_, cache)| {
            let mut t = tera::Tera::default();
            icache::tera::register(&mut t, cache.clone());
            let site = state.clone();
            t.register_function("movies", move |_: tera::Kwargs, _: &tera::State| {
                let rows = site
                    .db()
                    .personal_ratings_page(USER, 1, icache_demo::PER_PAGE)
                    .map_err(|e| tera::Error::message(e.to_string()))?;
                Ok::<_, tera::Error>(tera::Value::from_serializable(&rows))
            });
            let block = format!("{{% load icache %}}{{% icache 'engines' 'movies' '7' %}}{TERA_BODY}{{% endicache %}}");
            let rewritten = icache::tera::rewrite("block.html", &block).unwrap_or_else(|e| panic!("tera rewrite: {e}"));
            t.add_raw_template("block.html", &rewritten)
                .unwrap_or_else(|e| panic!("tera template: {e}"));
            t.add_raw_template("plain.html", TERA_BODY)
                .unwrap_or_else(|e| panic!("tera template: {e}"));
            t
        })
        .collect();
    let ctx = tera::Context::new();
    let tera_render = || {
        teras[0]
            .render("plain.html", &ctx)
            .unwrap_or_else(|e| panic!("tera: {e}"))
    };
    let tera_hit = |i: usize| {
        icache::tera::render(&teras[i], "block.html", &ctx).unwrap_or_else(|e| panic!("tera: {e}"))
    };
    let askama_hit = |cache: &ICache| {
        icache::askama::cached(cache, "list", &tokens, || List { movies: &[] }).to_string()
    };
    let maud_hit = |cache: &ICache| {
        maud::html! { (icache::maud::cached(cache, "list", &tokens, || maud_list(&query()))) }
            .into_string()
    };
    // Fill each cache with each engine's block (askama's closure is never
    // called on a hit: the empty list above only types it).
    let askama_html = askama_render();
    let maud_html = maud_render();
    let tera_html = tera_render();
    for (i, (name, _)) in caches.iter().enumerate() {
        assert_eq!(tera_hit(i), tera_html, "{name}: tera block differs");
        assert_eq!(tera_hit(i), tera_html, "{name}: tera hit");
    }
    for (name, cache) in &caches {
        let movies = query();
        let real =
            icache::askama::cached(cache, "list", &tokens, || List { movies: &movies }).to_string();
        assert_eq!(real, askama_html, "{name}: askama block differs");
        assert_eq!(askama_hit(cache), askama_html, "{name}: askama hit");
        assert_eq!(maud_hit(cache), maud_html, "{name}: maud block differs");
        assert_eq!(maud_hit(cache), maud_html, "{name}: maud hit");
    }
    let checks: Vec<AllHits> = caches
        .iter()
        .map(|(n, c)| AllHits::new(c, format!("{n} engines")))
        .collect();
    let mut cases = vec![
        Case::new("askama render", || {
            black_box(askama_render());
        }),
        Case::new("maud render", || {
            black_box(maud_render());
        }),
        Case::new("tera render", || {
            black_box(tera_render());
        }),
    ];
    for (name, cache) in &caches {
        cases.push(Case::new(format!("askama {name} hit"), move || {
            black_box(askama_hit(cache));
        }));
        cases.push(Case::new(format!("maud {name} hit"), move || {
            black_box(maud_hit(cache));
        }));
    }
    for (i, (name, _)) in caches.iter().enumerate() {
        cases.push(Case::new(format!("tera {name} hit"), move || {
            black_box(tera_hit(i));
        }));
    }
    let t = timing::interleaved(&settings.plan, &mut cases);
    drop(cases);
    checks.into_iter().for_each(AllHits::check);

    let mut md = format!(
        "\n### Other engines\n\n\
         The same list ({} of HTML, query included in the render) as an Askama \
         template in a `icache::askama::cached` sub-template, as maud markup in \
         an `icache::maud::cached` block, and as a Tera template with the seed's \
         `{{% icache %}}` block (rewritten by `icache::tera::rewrite`, rendered by \
         `icache::tera::render`); each engine's block hit against its own \
         uncached render.\n\n",
        report::bytes(askama_html.len())
    );
    let mut table = Table::new(&[
        "engine",
        "render uncached",
        "hit, memory",
        "hit, redis",
        "hit, memcached",
        "render ÷ hit (memory / redis / memcached)",
    ]);
    let n = BACKENDS.len();
    for (e, engine) in ["Askama", "maud", "Tera"].iter().enumerate() {
        let render = t[e];
        // Cases: 3 renders, then askama/maud hits interleaved per backend,
        // then the Tera hits.
        let hits: Vec<f64> = (0..n)
            .map(|i| {
                if e < 2 {
                    t[3 + 2 * i + e]
                } else {
                    t[3 + 2 * n + i]
                }
            })
            .collect();
        table.row(&[
            (*engine).to_owned(),
            report::time(render),
            report::time(hits[0]),
            report::time(hits[1]),
            report::time(hits[2]),
            hits.iter()
                .map(|h| report::ratio(render / h))
                .collect::<Vec<_>>()
                .join(" / "),
        ]);
    }
    md.push_str(&table.finish());
    md
}
