//! Section 2 of the report: Hit vs the bare minimum.

use std::hint::black_box;

use icache::ICache;

use crate::report::{self, Goal, Table, Target};
use crate::timing::{self, Case};
use crate::{Section, Settings};

use super::*;

pub(crate) fn hit_vs_bare(servers: &Servers<'_>, settings: &Settings) -> Section {
    let body = html(STANDARD_SIZE);
    let caches: Vec<ICache> = BACKENDS.iter().map(|b| servers.open(b)).collect();
    for c in &caches {
        fill(c, "standard", &TOKENS, &body);
    }
    let direct = Direct::new("standard", &TOKENS, &body);
    let mut redis = servers.raw("redis", STANDARD_SIZE);
    let mut memcached = servers.raw("memcached", STANDARD_SIZE);
    let checks: Vec<AllHits> = caches
        .iter()
        .map(|c| AllHits::new(c, format!("{} bare", c.backend_name())))
        .collect();
    let mut cases = vec![
        Case::new("memory hit", || {
            black_box(hit(&caches[0], "standard", &TOKENS));
        }),
        Case::new("quick_cache gets", || {
            black_box(direct.get());
        }),
        Case::new("quick_cache gets + copy", || {
            black_box(direct.get().to_string());
        }),
        Case::new("redis hit", || {
            black_box(hit(&caches[1], "standard", &TOKENS));
        }),
        Case::new("redis bare GET", || {
            black_box(redis.get().unwrap_or_else(|e| panic!("bare GET: {e}")));
        }),
        Case::new("memcached hit", || {
            black_box(hit(&caches[2], "standard", &TOKENS));
        }),
        Case::new("memcached bare get", || {
            black_box(memcached.get().unwrap_or_else(|e| panic!("bare get: {e}")));
        }),
    ];
    let t = timing::interleaved(&settings.plan, &mut cases);
    drop(cases);
    checks.into_iter().for_each(AllHits::check);

    let gets = TOKENS.len() + 1;
    let mut md = format!(
        "## 2. Hit vs the bare minimum\n\n\
         A fragment hit (`fragment_arc()`, which hands out the stored text) of {size} of HTML with {n} tokens (as the demo's block), \
         one client thread. **Memory**: the bare minimum is the {gets} lookups a hit \
         needs ({n} generations and the entry) made directly on quick_cache, the \
         crate under the memory backend, with the same key strings; the second row \
         adds copying the value into a `String`, which a hit through `fragment()` \
         returns. \
         **Redis, memcached**: one bare `GET` of a {size} value on a raw TCP \
         connection (no client library: write the request, read the length, read \
         the bytes), against the icache hit on its own pooled connection, which \
         fetches the {n} generations and the entry in one round trip.\n\n",
        size = report::bytes(STANDARD_SIZE),
        n = TOKENS.len(),
    );
    let mut table = Table::new(&["comparison", "icache hit", "bare minimum", "hit ÷ bare"]);
    let rows = [
        (format!("memory vs {gets} quick_cache gets"), t[0], t[1]),
        (
            format!("memory vs {gets} quick_cache gets + copy to `String`"),
            t[0],
            t[2],
        ),
        ("redis vs one bare `GET`".to_owned(), t[3], t[4]),
        ("memcached vs one bare `get`".to_owned(), t[5], t[6]),
    ];
    for (label, icache, bare) in &rows {
        table.row(&[
            label.clone(),
            report::time(*icache),
            report::time(*bare),
            report::ratio(icache / bare),
        ]);
    }
    md.push_str(&table.finish());
    let targets = vec![
        Target {
            section: 2,
            what: format!("memory: hit ÷ {gets} direct quick_cache gets"),
            goal: Goal::AtMost(2.0),
            measured: t[0] / t[1],
        },
        Target {
            section: 2,
            what: "redis: hit ÷ one bare GET".to_owned(),
            goal: Goal::AtMost(1.3),
            measured: t[3] / t[4],
        },
        Target {
            section: 2,
            what: "memcached: hit ÷ one bare get".to_owned(),
            goal: Goal::AtMost(1.3),
            measured: t[5] / t[6],
        },
    ];
    for t in &targets {
        md.push_str(&t.line());
    }
    let mut missed_notes = Vec::new();
    if !targets[0].met() {
        missed_notes.push(format!(
            "**2. {what}** ({measured} measured, {goal} wanted). The {gets} lookups take \
             {lookups} of the hit's {hit} ({size}, {n} tokens; the copy into a `String` \
             that `fragment()` adds would make {copied}). A memory hit of a block \
             without nested tokens builds the block's name in a reused buffer, reads \
             the generations into a stack buffer, checks the stored version against \
             their sum and hands out the stored `Arc<str>`: nothing is allocated. \
             What remains besides the lookups is the name itself (built and hashed \
             per hit, as the entry's key includes the tokens), the counters (its own \
             and the `metrics` ones) and the checks for an enclosing render and an \
             observer (two thread-local reads); on a noisy machine the ratio also \
             moves with the lookups' own time.",
            what = targets[0].what,
            measured = report::ratio(targets[0].measured),
            goal = targets[0].goal_text(),
            lookups = report::time(t[1]),
            size = report::bytes(STANDARD_SIZE),
            copied = report::time(t[2]),
            hit = report::time(t[0]),
            n = TOKENS.len(),
        ));
    }
    for (target, (hit_ns, bare_ns)) in targets[1..].iter().zip([(t[3], t[4]), (t[5], t[6])]) {
        if !target.met() {
            missed_notes.push(format!(
                "**2. {}** ({} measured, {} wanted). Both are one round trip on the same \
                 server thread; the hit takes {} more ({} against {}). icache's own \
                 bookkeeping is about the memory backend's whole hit, {}; the rest is \
                 the request itself and its client: one multi-key get of {} keys \
                 instead of a `GET` of one, {} values to parse, the entry to decode \
                 (header, version, server instance) and its payload copied out. On \
                 this VM a round trip's own cost also moves with what the other CPU \
                 is doing, which the alternating batches spread over both sides but \
                 cannot remove. What would close it: a client that parses the answer \
                 in place (no copy of the payload before decoding) and sends the \
                 request from a reused buffer.",
                target.what,
                report::ratio(target.measured),
                target.goal_text(),
                report::time((hit_ns - bare_ns).max(1.0)),
                report::time(hit_ns),
                report::time(bare_ns),
                report::time(t[0]),
                TOKENS.len() + 1,
                TOKENS.len() + 1,
            ));
        }
    }
    Section {
        markdown: md,
        targets,
        missed_notes,
    }
}
