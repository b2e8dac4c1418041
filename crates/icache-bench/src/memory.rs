//! Bytes per cached entry on the memory backend, measured as the growth of
//! the process's resident memory (VmRSS) while entries are inserted.
//!
//! Each measurement runs in a fresh child process (this binary with the
//! hidden `--memory-child` flag): memory freed by earlier work would
//! otherwise be reused by the allocator and hide part of the growth.

use std::hint::black_box;
use std::process::Command;
use std::sync::Arc;

use icache::ICache;

/// What is inserted.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Kind {
    /// `fragment(name_i, ["movies"], …)`: a cached block per entry.
    Fragment,
    /// `set_versioned(key_i, …, version)`.
    Versioned,
    /// quick_cache alone, `String` → `Arc<str>`: the floor.
    QuickCache,
}

impl Kind {
    /// All kinds, in report order.
    pub const ALL: [Kind; 3] = [Kind::Fragment, Kind::Versioned, Kind::QuickCache];

    fn arg(self) -> &'static str {
        match self {
            Kind::Fragment => "fragment",
            Kind::Versioned => "versioned",
            Kind::QuickCache => "quick_cache",
        }
    }

    /// How the report names it.
    pub fn label(self) -> &'static str {
        match self {
            Kind::Fragment => "icache fragment (`fragment`)",
            Kind::Versioned => "icache `set_versioned`",
            Kind::QuickCache => "quick_cache alone (`String` → `Arc<str>`)",
        }
    }

    fn parse(s: &str) -> Option<Kind> {
        Kind::ALL.into_iter().find(|k| k.arg() == s)
    }

    fn key(self, i: usize) -> String {
        match self {
            Kind::Fragment => format!("fragment-{i:07}"),
            Kind::Versioned | Kind::QuickCache => format!("movies-personal-rating#{i:07}"),
        }
    }
}

/// One measurement.
#[derive(Debug, Clone)]
pub struct Measured {
    /// What was inserted.
    pub kind: Kind,
    /// How many entries.
    pub entries: usize,
    /// Payload bytes per entry.
    pub payload: usize,
    /// Bytes of the key string given per entry.
    pub key_bytes: usize,
    /// Resident memory growth, bytes.
    pub rss_growth: u64,
    /// What the memory backend charges against `max_bytes` for them
    /// (`server_stats` "bytes"); `None` for quick_cache alone.
    pub charged: Option<u64>,
}

impl Measured {
    /// Resident bytes per entry beyond the payload (key, bookkeeping,
    /// allocator rounding, table slots).
    pub fn overhead(&self) -> f64 {
        (self.rss_growth as f64 - (self.entries * self.payload) as f64) / self.entries as f64
    }
}

/// Runs one measurement in a child process of `exe`.
pub fn measure(exe: &std::path::Path, kind: Kind, entries: usize, payload: usize) -> Measured {
    let spec = format!("{}:{entries}:{payload}", kind.arg());
    let out = Command::new(exe)
        .args(["--memory-child", &spec])
        .output()
        .unwrap_or_else(|e| panic!("cannot run {} --memory-child: {e}", exe.display()));
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(
        out.status.success(),
        "{} --memory-child {spec} failed ({}): {}{}",
        exe.display(),
        out.status,
        stdout,
        String::from_utf8_lossy(&out.stderr)
    );
    let field = |name: &str| -> Option<u64> {
        stdout
            .split_whitespace()
            .find_map(|f| f.strip_prefix(name)?.strip_prefix('=')?.parse().ok())
    };
    let rss_growth = field("rss_growth")
        .unwrap_or_else(|| panic!("--memory-child {spec} printed no rss_growth: {stdout}"));
    Measured {
        kind,
        entries,
        payload,
        key_bytes: kind.key(0).len(),
        rss_growth,
        charged: field("charged"),
    }
}

/// Resident set size of this process, bytes (Linux: /proc/self/status).
fn rss() -> u64 {
    let status = std::fs::read_to_string("/proc/self/status")
        .expect("read /proc/self/status (the memory measurement needs Linux)");
    status
        .lines()
        .find_map(|l| l.strip_prefix("VmRSS:"))
        .and_then(|v| v.trim().trim_end_matches("kB").trim().parse::<u64>().ok())
        .map(|kb| kb * 1024)
        .expect("VmRSS in /proc/self/status")
}

/// The child's side: `spec` is `kind:entries:payload`. Prints
/// `rss_growth=N [charged=N]` on stdout.
pub fn child(spec: &str) -> Result<String, String> {
    let mut parts = spec.split(':');
    let (Some(kind), Some(Ok(entries)), Some(Ok(payload)), None) = (
        parts.next().and_then(Kind::parse),
        parts.next().map(str::parse::<usize>),
        parts.next().map(str::parse::<usize>),
        parts.next(),
    ) else {
        return Err(format!(
            "--memory-child wants kind:entries:payload, got {spec:?}"
        ));
    };
    // One payload, copied per entry as an application's rendered HTML would be.
    let html: String = "<li>movie</li>".chars().cycle().take(payload).collect();
    // Everything the loop needs exists before the baseline, so the growth is
    // the entries and nothing else.
    let before = rss();
    let line = match kind {
        Kind::QuickCache => {
            let store: quick_cache::sync::Cache<String, Arc<str>> =
                quick_cache::sync::Cache::new(entries + entries / 4);
            for i in 0..entries {
                store.insert(kind.key(i), Arc::from(html.as_str()));
            }
            let after = rss();
            assert_eq!(store.len(), entries, "quick_cache evicted entries");
            black_box(&store);
            format!("rss_growth={}", after.saturating_sub(before))
        }
        Kind::Fragment | Kind::Versioned => {
            // The default memory:// (64 MiB), as an application gets it; the
            // caller keeps entries × payload well below it.
            let cache = ICache::from_url("memory://").map_err(|e| e.to_string())?;
            let version = cache.get_sum(&["movies"]).map_err(|e| e.to_string())?;
            for i in 0..entries {
                let key = kind.key(i);
                if kind == Kind::Fragment {
                    let got =
                        cache.fragment(&key, &["movies"], || Ok::<_, String>(html.clone()))?;
                    black_box(got);
                } else {
                    cache
                        .set_versioned(&key, html.as_str(), version)
                        .map_err(|e| e.to_string())?;
                }
            }
            let after = rss();
            let stats: Vec<(String, String)> = cache.server_stats().map_err(|e| e.to_string())?;
            let stat = |name: &str| -> u64 {
                stats
                    .iter()
                    .find(|(k, _)| k == name)
                    .and_then(|(_, v)| v.parse().ok())
                    .unwrap_or(0)
            };
            // All entries plus the generations (`movies`, and for blocks the
            // flush token every block reads), nothing evicted: otherwise the
            // growth would be for fewer entries than we divide by.
            let gens = if kind == Kind::Fragment { 2 } else { 1 };
            if stat("entries") != (entries + gens) as u64 || stat("evictions") != 0 {
                return Err(format!(
                    "the memory backend holds {} entries after {} inserts ({} evicted): \
                     lower the entry count or payload",
                    stat("entries"),
                    entries + gens,
                    stat("evictions")
                ));
            }
            black_box(&cache);
            format!(
                "rss_growth={} charged={}",
                after.saturating_sub(before),
                stat("bytes")
            )
        }
    };
    Ok(line)
}
