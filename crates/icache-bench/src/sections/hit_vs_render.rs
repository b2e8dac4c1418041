//! Section 1 of the report: Hit vs render.

use std::fmt::Write as _;
use std::hint::black_box;

use icache_demo::AppState;

use crate::report::{self, Goal, Table, Target};
use crate::timing::{self, Case};
use crate::{Section, Settings};

use super::*;

/// The block's cache in each row: the backends with their default options
/// (`near=entries` on Redis and memcached), then the other near-cache modes.
const SITES: [&str; 6] = [
    "memory",
    "redis",
    "memcached",
    "redis near=tracking",
    "redis near=off",
    "memcached near=off",
];

/// A page size larger than any user's list.
const UNPAGED: i64 = 100_000;

pub(crate) fn hit_vs_render(servers: &Servers<'_>, settings: &Settings) -> Section {
    let dir = TempDir::new("block");
    let sites: Vec<(&str, AppState)> = SITES
        .iter()
        .map(|&b| {
            // Unpaged: the whole list in one block, as when the targets
            // were set (the site shows it 100 movies per page).
            let state = icache_demo::open_paged(&dir.0, servers.open(b), UNPAGED)
                .unwrap_or_else(|e| panic!("open the demo on {b}: {e}"));
            (b, state)
        })
        .collect();
    let render = |state: &AppState, cached: bool| -> String {
        state
            .render_personal_rating(USER, cached)
            .unwrap_or_else(|e| panic!("render the personal-rating block: {e}"))
    };
    let plain = render(&sites[0].1, false);
    let rows = plain.matches("<li data-movie=").count();
    assert!(rows >= 100, "the block lists {rows} movies");
    for (name, state) in &sites {
        render(state, true);
        let hits = state.cache().stats().hits;
        let cached = render(state, true);
        assert!(
            state.cache().stats().hits > hits,
            "{name}: the block was not served from the cache"
        );
        // Byte for byte the block the uncached render produces (MiniJinja
        // drops the final newline of the body-only template).
        assert_eq!(cached.trim_end(), plain.trim_end(), "{name}: block differs");
        fill(state.cache(), "block", &TOKENS, &plain);
    }

    let checks: Vec<AllHits> = sites
        .iter()
        .map(|(n, s)| AllHits::new(s.cache(), format!("{n} block")))
        .collect();
    // The floor for a remote hit: one bare round trip moving as many bytes.
    let mut bare_redis = servers.raw("redis", plain.len());
    let mut bare_memcached = servers.raw("memcached", plain.len());
    let mut cases = vec![Case::new("render", || {
        black_box(render(&sites[0].1, false));
    })];
    for (name, state) in &sites {
        cases.push(Case::new(format!("{name} block hit"), move || {
            black_box(render(state, true));
        }));
    }
    for (name, state) in &sites {
        cases.push(Case::new(format!("{name} fragment() hit"), move || {
            black_box(hit(state.cache(), "block", &TOKENS));
        }));
    }
    cases.push(Case::new("redis bare GET", || {
        black_box(bare_redis.get().unwrap_or_else(|e| panic!("bare GET: {e}")));
    }));
    cases.push(Case::new("memcached bare get", || {
        black_box(
            bare_memcached
                .get()
                .unwrap_or_else(|e| panic!("bare get: {e}")),
        );
    }));
    let t = timing::interleaved(&settings.plan, &mut cases);
    drop(cases);
    checks.into_iter().for_each(AllHits::check);

    let n = SITES.len();
    let render_ns = t[0];
    let block_at = |i: usize| t[1 + i];
    let fragment_at = |i: usize| t[1 + n + i];
    // Then the bare GETs of the block's size on redis, memcached.
    let bare_block = |name: &str| match name {
        "redis near=off" => Some(t[1 + 2 * n]),
        "memcached near=off" => Some(t[2 + 2 * n]),
        _ => None,
    };
    let mut md = format!(
        "## 1. Hit vs render\n\n\
         The demo's personal-rating block for user {USER}, unpaged: {rows} movies from SQLite \
         through MiniJinja, {} of HTML. *Render* is the block's body without the \
         cache (query and template every time); a *block hit* renders the same \
         block, `{{% icache 'movies-personal-rating' 'movies' user.id page %}}` (page 1) \
         included, through the demo's MiniJinja environment, served from the \
         cache. A *fragment hit* is the same HTML served by `fragment()` (the \
         block API for any renderer), without a template engine around it. \
         One client thread.\n\n",
        report::bytes(plain.len())
    );
    let mut table = Table::new(&["case", "time per block", "render ÷ this"]);
    table.row(&[
        "render uncached (SQLite + MiniJinja)".into(),
        report::time(render_ns),
        report::ratio(1.0),
    ]);
    for (i, name) in SITES.iter().enumerate() {
        table.row(&[
            format!("block hit, {name}"),
            report::time(block_at(i)),
            report::ratio(render_ns / block_at(i)),
        ]);
    }
    for (i, name) in SITES.iter().enumerate() {
        table.row(&[
            format!("fragment hit, {name}"),
            report::time(fragment_at(i)),
            report::ratio(render_ns / fragment_at(i)),
        ]);
    }
    for (i, name) in ["redis", "memcached"].iter().enumerate() {
        table.row(&[
            format!(
                "bare `GET` of {}, {name} (no icache: the floor)",
                report::bytes(plain.len())
            ),
            report::time(t[1 + 2 * n + i]),
            report::ratio(render_ns / t[1 + 2 * n + i]),
        ]);
    }
    md.push_str(&table.finish());

    // Default options on every backend, then near=tracking's two targets.
    let tracking = SITES
        .iter()
        .position(|s| *s == "redis near=tracking")
        .unwrap_or_else(|| unreachable!("a tracking row"));
    let mut targets: Vec<Target> = SITES[..3]
        .iter()
        .enumerate()
        .map(|(i, name)| Target {
            section: 1,
            what: format!("{name}: render ÷ block hit"),
            goal: Goal::AtLeast(if *name == "memory" { 100.0 } else { 20.0 }),
            measured: render_ns / block_at(i),
        })
        .collect();
    targets.push(Target {
        section: 1,
        what: "redis near=tracking: render ÷ block hit".into(),
        goal: Goal::AtLeast(100.0),
        measured: render_ns / block_at(tracking),
    });
    targets.push(Target {
        section: 1,
        what: "redis near=tracking block hit ÷ memory block hit".into(),
        goal: Goal::AtMost(1.5),
        measured: block_at(tracking) / block_at(0),
    });
    for t in &targets {
        md.push_str(&t.line());
    }
    md.push_str(&super::engines::engines(servers, settings));
    let mut missed_notes = Vec::new();
    for (i, target) in targets.iter().enumerate().take(4) {
        if target.met() {
            continue;
        }
        let i = if i == 3 { tracking } else { i };
        let name = SITES[i];
        let (block, fragment) = (block_at(i), fragment_at(i));
        let mut note = format!(
            "**1. {}** ({} measured, {} wanted). The block hit took {}; the fragment hit \
             of the same HTML without the template engine took {} (render ÷ fragment \
             hit: {}).",
            target.what,
            report::ratio(target.measured),
            target.goal_text(),
            report::time(block),
            report::time(fragment),
            report::ratio(render_ns / fragment),
        );
        if block > fragment * 1.05 {
            let _ = write!(
                note,
                " So {} of the block hit is MiniJinja around the block: the template \
                 writes the {} string into its output (the template value made from \
                 the text kept in process is reused from hit to hit).",
                report::time(block - fragment),
                report::bytes(plain.len()),
            );
        }
        if name == "redis" || name == "memcached" {
            let _ = write!(
                note,
                " With the default `near=entries` the hit moves no HTML: one round trip \
                 carries the generations only (section 6 counts its bytes), and the body \
                 is served from process. What is left is the round trip itself, the \
                 loopback and the client's system calls on this shared VM: render ÷ hit \
                 ≥ 20× needs a whole hit under {} here. What would close it: \
                 `near=tracking` (no round trip, see its row), or a network stack with \
                 a cheaper round trip.",
                report::time(render_ns / 20.0),
            );
        } else if let Some(bare) = bare_block(name) {
            let _ = write!(
                note,
                " The rest is the wire: one bare `GET` of a {} value, with no client \
                 library and no icache at all, takes {} on this machine's loopback, so \
                 no {name} client could do better than render ÷ bare = {} here; the \
                 fragment hit is {} of that floor. The block renders in only {}, and it \
                 is large, so the round trip that moves it dominates. What would close \
                 it: fewer bytes on the wire per hit, either by compressing entries \
                 (HTML shrinks several-fold) or by keeping a copy of the entry in \
                 process and fetching only the generations from {name} (a hit would \
                 then move a few dozen bytes); or a network where a 200 KB transfer is \
                 cheaper than on this VM.",
                report::bytes(plain.len()),
                report::time(bare),
                report::ratio(render_ns / bare),
                report::ratio(fragment / bare),
                report::time(render_ns),
            );
        } else {
            let _ = write!(
                note,
                " What would close it: fewer copies of the stored HTML per hit. The \
                 hit returns a fresh `String` (copy one), the template function turns \
                 it into a safe MiniJinja string (copy two) and the template writes it \
                 to the output (copy three). Handing MiniJinja the stored `Arc<str>` \
                 would leave only the last; it needs a change in `crates/icache`, and \
                 MiniJinja 3.1 has no public way to make a safe string from an \
                 `Arc<str>` without copying, so possibly one upstream too."
            );
        }
        missed_notes.push(note);
    }
    if let Some(target) = targets.get(4).filter(|t| !t.met()) {
        missed_notes.push(format!(
            "**1. {}** ({} measured, {} wanted). The tracking block hit took {}, the \
             memory one {}; as fragment hits (no template engine) {} and {}. Both \
             serve the body from process; what the tracking hit adds is checking \
             the block's generations in the in-process table (one lock, one \
             hash lookup per token, one clock read for the bound) where memory \
             reads them from its own store, so the gap is a few hundred \
             nanoseconds plus this shared VM's noise on a hit of a few \
             microseconds.",
            target.what,
            report::ratio(target.measured),
            target.goal_text(),
            report::time(block_at(tracking)),
            report::time(block_at(0)),
            report::time(fragment_at(tracking)),
            report::time(fragment_at(0)),
        ));
    }
    Section {
        markdown: md,
        targets,
        missed_notes,
    }
}
