//! Section 5 of the report: Memory per entry.

use std::fmt::Write as _;

use crate::report::{self, Table};
use crate::{Options, Section, Settings, memory};

pub(crate) fn memory_per_entry(options: &Options, settings: &Settings) -> Section {
    let (entries, payload) = (settings.memory_entries, settings.memory_payload);
    let measured: Vec<memory::Measured> = memory::Kind::ALL
        .iter()
        .map(|&k| memory::measure(&options.exe, k, entries, payload))
        .collect();
    let mut md = format!(
        "## 5. Memory per entry\n\n\
         {entries} entries of {payload} bytes each inserted into a fresh `memory://` \
         cache (default 64 MiB bound; nothing evicted, checked) in a fresh process; \
         the growth of the process's resident memory (`VmRSS` in \
         `/proc/self/status`, read before the cache is created and after the last \
         insert), minus the payload bytes, divided by the entry count. So the \
         overhead is everything an entry costs beyond its payload: key string, \
         entry header, hash-table slot, `Arc`s, allocator rounding, and the \
         cache's own tables amortised over the entries. The last row is \
         quick_cache alone with the same keys and `Arc<str>` values, for \
         reference. *Charged* is what the memory backend counts against its \
         `max_bytes` bound per entry.\n\n",
        entries = report::count(entries as f64),
    );
    let mut table = Table::new(&[
        "entries",
        "key length",
        "RSS growth",
        "resident per entry",
        "overhead per entry",
        "charged per entry",
    ]);
    for m in &measured {
        table.row(&[
            m.kind.label().to_owned(),
            format!("{} B", m.key_bytes),
            format!("{:.1} MB", m.rss_growth as f64 / f64::from(1 << 20)),
            format!("{:.0} B", m.rss_growth as f64 / m.entries as f64),
            format!("{:.0} B", m.overhead()),
            m.charged.map_or("—".to_owned(), |c| {
                format!("{:.0} B", c as f64 / m.entries as f64)
            }),
        ]);
    }
    md.push_str(&table.finish());
    if let Some(fragment) = measured.iter().find(|m| m.kind == memory::Kind::Fragment)
        && let Some(charged) = fragment.charged
    {
        let _ = writeln!(
            md,
            "The `max_bytes` bound counts {:.0}% of what a fragment entry really \
             occupies here ({:.0} of {:.0} bytes): a `memory://?max_bytes=N` cache \
             full of entries like these takes about {:.2} × N of resident memory.\n",
            charged as f64 / fragment.rss_growth as f64 * 100.0,
            charged as f64 / fragment.entries as f64,
            fragment.rss_growth as f64 / fragment.entries as f64,
            fragment.rss_growth as f64 / charged as f64,
        );
    }
    Section {
        markdown: md,
        targets: Vec::new(),
        missed_notes: Vec::new(),
    }
}
