//! A cached block vs rendering it: a realistic 200-row list in MiniJinja.
//!
//! Run with: `cargo bench -p icache --all-features --bench fragments`
//!
//! `render/uncached` renders the list; `hit/<backend>` renders the same
//! template with the list inside `{% icache %}`, served from the cache.

use icache_test_support as support;

use criterion::{Criterion, criterion_group, criterion_main};
use icache::ICache;
use minijinja::{Environment, context};

const LIST: &str = r#"<table class="ratings">
{%- for m in movies %}
  <tr class="{{ loop.cycle('odd', 'even') }}"><td>{{ loop.index }}</td><td><a href="/movies/{{ m.id }}">{{ m.title|title }}</a></td><td>{{ m.year }}</td><td>{{ "%.1f"|format(m.rating) }}</td><td>{{ m.note }}</td></tr>
{%- endfor %}
</table>"#;

fn movies() -> minijinja::Value {
    let rows: Vec<minijinja::Value> = (0..200)
        .map(|i| {
            context! {
                id => i,
                title => format!("the movie number {i} & friends"),
                year => 1950 + (i * 7) % 70,
                rating => f64::from((i * 37) % 50) / 10.0,
                note => "<i>a note that needs escaping</i>",
            }
        })
        .collect();
    minijinja::Value::from(rows)
}

fn env(cache: &ICache) -> Environment<'static> {
    let mut env = Environment::new();
    icache::minijinja::register(&mut env, cache.clone());
    env.add_template("plain.html", LIST).expect("plain");
    let cached =
        format!("{{% icache 'movies-personal-rating' 'movies' user %}}{LIST}{{% endicache %}}");
    env.add_template_owned(
        "cached.html",
        icache::minijinja::rewrite("cached.html", &cached).expect("rewrite"),
    )
    .expect("cached");
    env
}

fn benches(c: &mut Criterion) {
    let ctx = context! { movies => movies(), user => 42 };
    let mut g = c.benchmark_group("fragment_200_rows");
    let memory = ICache::memory();
    let e = env(&memory);
    let plain = e.get_template("plain.html").expect("t");
    let want = plain.render(&ctx).expect("render");
    g.bench_function("render/uncached", |b| {
        b.iter(|| plain.render(&ctx).expect("render"))
    });

    let redis = support::RedisServer::start();
    let memcached = support::MemcachedServer::start();
    let mut caches = vec![("memory", memory)];
    // Each network backend with its default near cache (`entries`: the
    // body is kept in process) and without it; Redis also with `tracking`
    // (no round trip on a hit).
    if let Some(s) = &redis {
        for (name, near) in [
            ("redis", "near=entries"),
            ("redis-near-off", "near=off"),
            ("redis-near-tracking", "near=tracking"),
        ] {
            let cache = ICache::from_url(&format!("{}?{near}", s.url())).expect("redis");
            caches.push((name, cache));
        }
    }
    if let Some(s) = &memcached {
        for (name, near) in [
            ("memcached", "near=entries"),
            ("memcached-near-off", "near=off"),
        ] {
            let cache = ICache::from_url(&format!("{}?{near}", s.url())).expect("memcached");
            caches.push((name, cache));
        }
    }
    for (name, cache) in caches {
        let e = env(&cache);
        let t = e.get_template("cached.html").expect("t");
        assert_eq!(t.render(&ctx).expect("miss"), want);
        g.bench_function(format!("hit/{name}"), |b| {
            b.iter(|| t.render(&ctx).expect("hit"))
        });
        // fragment() without a template engine around it, for the bare cost.
        let html = want.clone();
        cache
            .fragment("t", &["movies-personal-rating", "movies", "42"], || {
                Ok::<_, ()>(html.clone())
            })
            .expect("f");
        g.bench_function(format!("fragment_hit/{name}"), |b| {
            b.iter(|| {
                cache
                    .fragment("t", &["movies-personal-rating", "movies", "42"], || {
                        Ok::<_, ()>(String::new())
                    })
                    .expect("hit")
            })
        });
        assert!(cache.stats().hits > 0);
    }
    g.finish();
}

criterion_group! {
    name = fragments;
    config = Criterion::default()
        .sample_size(30)
        .warm_up_time(std::time::Duration::from_millis(500))
        .measurement_time(std::time::Duration::from_secs(2));
    targets = benches
}
criterion_main!(fragments);
