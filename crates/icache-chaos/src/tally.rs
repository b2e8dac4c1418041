//! Named counters, summed across threads and processes, printed as one
//! `key=value …` line (children report to the orchestrator that way, and the
//! orchestrator's `RESULT` line is what tests parse).

use std::collections::BTreeMap;

/// Named counters. Keys starting with `max_` merge by maximum, the rest by
/// sum; a key never set reads as 0.
#[derive(Debug, Default, Clone, PartialEq, Eq)]
pub struct Tally(BTreeMap<String, u64>);

impl Tally {
    /// Adds `n` to `key` (or raises it to `n` for a `max_` key).
    pub fn add(&mut self, key: &str, n: u64) {
        let slot = self.0.entry(key.to_owned()).or_insert(0);
        if key.starts_with("max_") {
            *slot = (*slot).max(n);
        } else {
            *slot += n;
        }
    }

    /// The value of `key` (0 if never set).
    pub fn get(&self, key: &str) -> u64 {
        self.0.get(key).copied().unwrap_or(0)
    }

    /// Adds every counter of `other`.
    pub fn merge(&mut self, other: &Tally) {
        for (k, v) in &other.0 {
            self.add(k, *v);
        }
    }

    /// The counters whose key starts with `prefix`, prefix removed.
    pub fn with_prefix<'a>(&'a self, prefix: &'a str) -> impl Iterator<Item = (&'a str, u64)> + 'a {
        self.0
            .iter()
            .filter_map(move |(k, v)| k.strip_prefix(prefix).map(|k| (k, *v)))
    }

    /// `key=value` pairs separated by spaces.
    pub fn to_line(&self) -> String {
        self.0
            .iter()
            .map(|(k, v)| format!("{k}={v}"))
            .collect::<Vec<_>>()
            .join(" ")
    }

    /// Parses [`to_line`](Self::to_line)'s output; words that are not
    /// `key=number` are ignored.
    pub fn parse(line: &str) -> Tally {
        let mut t = Tally::default();
        for word in line.split_whitespace() {
            if let Some((k, v)) = word.split_once('=')
                && let Ok(v) = v.parse()
            {
                t.add(k, v);
            }
        }
        t
    }
}

#[cfg(test)]
mod tests {
    use super::Tally;

    #[test]
    fn round_trip_and_merge() {
        let mut a = Tally::default();
        a.add("reads", 3);
        a.add("max_call_ms", 40);
        let mut b = Tally::parse(&a.to_line());
        assert_eq!(a, b);
        b.add("max_call_ms", 10);
        b.merge(&a);
        assert_eq!(b.get("reads"), 6);
        assert_eq!(b.get("max_call_ms"), 40);
        assert_eq!(b.get("never"), 0);
    }
}
