//! Markdown building blocks: number formats, tables, target verdicts.

use std::fmt::Write as _;

/// `85 ns`, `4.21 µs`, `1.23 ms`, `1.05 s`.
pub fn time(ns: f64) -> String {
    if ns < 1_000.0 {
        format!("{ns:.0} ns")
    } else if ns < 1_000_000.0 {
        format!("{} µs", sig(ns / 1_000.0))
    } else if ns < 1_000_000_000.0 {
        format!("{} ms", sig(ns / 1_000_000.0))
    } else {
        format!("{} s", sig(ns / 1_000_000_000.0))
    }
}

/// Microseconds as a time.
pub fn micros(us: u64) -> String {
    time(us as f64 * 1_000.0)
}

/// Three significant digits, at most two decimals.
fn sig(x: f64) -> String {
    if x >= 100.0 {
        format!("{x:.0}")
    } else if x >= 10.0 {
        format!("{x:.1}")
    } else {
        format!("{x:.2}")
    }
}

/// `2.41×`, `18.3×`, `812×`.
pub fn ratio(x: f64) -> String {
    format!("{}×", sig(x))
}

/// `1,234,567`.
pub fn count(n: f64) -> String {
    let digits = format!("{:.0}", n.max(0.0));
    let mut out = String::new();
    for (i, c) in digits.chars().enumerate() {
        if i > 0 && (digits.len() - i) % 3 == 0 {
            out.push(',');
        }
        out.push(c);
    }
    out
}

/// `512 B`, `4 KB`, `1 MB` (powers of 1024, as the sizes are chosen).
pub fn bytes(n: usize) -> String {
    if n >= 1 << 20 && n & ((1 << 20) - 1) == 0 {
        format!("{} MB", n >> 20)
    } else if n >= 1 << 10 && n & ((1 << 10) - 1) == 0 {
        format!("{} KB", n >> 10)
    } else if n >= 1 << 20 {
        format!("{:.1} MB", n as f64 / f64::from(1 << 20))
    } else if n >= 10 << 10 {
        format!("{:.0} KB", n as f64 / 1024.0)
    } else {
        format!("{} B", count(n as f64))
    }
}

/// A markdown table.
pub struct Table {
    out: String,
}

impl Table {
    /// A table with these column headings.
    pub fn new(headings: &[&str]) -> Self {
        let mut out = String::new();
        let _ = writeln!(out, "| {} |", headings.join(" | "));
        let _ = writeln!(out, "|{}", "---|".repeat(headings.len()));
        Table { out }
    }

    /// One row; the first cell names the case.
    pub fn row(&mut self, cells: &[String]) {
        let _ = writeln!(self.out, "| {} |", cells.join(" | "));
    }

    /// The markdown, ending with a blank line.
    pub fn finish(mut self) -> String {
        self.out.push('\n');
        self.out
    }
}

/// Which way a target goes.
#[derive(Debug, Clone, Copy)]
pub enum Goal {
    /// The measured ratio must be at least this.
    AtLeast(f64),
    /// The measured ratio must be at most this.
    AtMost(f64),
}

/// A target from the issue, with what was measured.
#[derive(Debug, Clone)]
pub struct Target {
    /// Section number, 1 to 6.
    pub section: u8,
    /// What is compared, e.g. "memory: render ÷ hit".
    pub what: String,
    /// The goal.
    pub goal: Goal,
    /// The measured ratio.
    pub measured: f64,
}

impl Target {
    /// Whether the measurement, as the report shows it (three significant
    /// digits), meets the goal: a line never reads "MISSED (measured 1.50×)"
    /// against a goal of 1.5×.
    pub fn met(&self) -> bool {
        let shown: f64 = ratio(self.measured)
            .trim_end_matches('×')
            .parse()
            .unwrap_or(self.measured);
        match self.goal {
            Goal::AtLeast(g) => shown >= g,
            Goal::AtMost(g) => shown <= g,
        }
    }

    /// `≥ 100×` / `≤ 1.3×`.
    pub fn goal_text(&self) -> String {
        match self.goal {
            // `{}` prints 2.0 as "2" and 1.3 as "1.3": the goal as written.
            Goal::AtLeast(g) => format!("≥ {g}×"),
            Goal::AtMost(g) => format!("≤ {g}×"),
        }
    }

    /// `met` or `MISSED`.
    pub fn verdict(&self) -> &'static str {
        if self.met() { "met" } else { "MISSED" }
    }

    /// `- memory: render ÷ hit: target: ≥ 100× — met (measured 812×)`.
    pub fn line(&self) -> String {
        format!(
            "- {}: target: {} — {} (measured {})\n",
            self.what,
            self.goal_text(),
            self.verdict(),
            ratio(self.measured)
        )
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn formats() {
        assert_eq!(time(85.2), "85 ns");
        assert_eq!(time(4_213.0), "4.21 µs");
        assert_eq!(time(18_320.0), "18.3 µs");
        assert_eq!(time(1_234_000.0), "1.23 ms");
        assert_eq!(ratio(812.4), "812×");
        assert_eq!(count(1_234_567.0), "1,234,567");
        assert_eq!(bytes(4096), "4 KB");
        assert_eq!(bytes(1 << 20), "1 MB");
        assert_eq!(bytes(190_567), "186 KB");
    }

    #[test]
    fn verdicts_follow_the_number_shown() {
        let t = |goal, measured| Target {
            section: 2,
            what: "x".into(),
            goal,
            measured,
        };
        assert!(t(Goal::AtMost(1.5), 1.5004).met());
        assert!(!t(Goal::AtMost(1.5), 1.506).met());
        assert!(t(Goal::AtLeast(100.0), 99.96).met());
        assert!(!t(Goal::AtLeast(100.0), 99.6).met());
        assert_eq!(
            t(Goal::AtMost(2.0), 2.4).line(),
            "- x: target: ≤ 2× — MISSED (measured 2.40×)\n"
        );
        assert_eq!(
            t(Goal::AtLeast(20.0), 23.61).line(),
            "- x: target: ≥ 20× — met (measured 23.6×)\n"
        );
    }
}
