//! Keeps the benchmark tool working: runs `icache-bench --quick` (the real
//! binary, which starts its own redis-server and memcached) into a temporary
//! directory and checks that the report is complete: every section, every
//! case row, every target line, and numbers that are finite and positive.
//! No timing is asserted: this machine may be as noisy as it likes.
//!
//! Without redis-server or memcached the tool exits with code 3: the test
//! then skips loudly, except under `CI=true`, where the harness inside the
//! tool aborts instead and the test fails.

use std::io::Write;
use std::path::PathBuf;
use std::process::Command;

fn in_ci() -> bool {
    std::env::var("CI").is_ok_and(|v| v.eq_ignore_ascii_case("true") || v == "1")
}

/// The cells of the table row whose first cell is `label`.
fn row<'a>(report: &'a str, label: &str) -> Vec<&'a str> {
    let prefix = format!("| {label} |");
    let line = report
        .lines()
        .find(|l| l.starts_with(&prefix))
        .unwrap_or_else(|| panic!("no row {label:?} in the report:\n{report}"));
    line.trim_matches('|').split(" | ").map(str::trim).collect()
}

/// The leading number of a cell such as `1.65 ms`, `87.7×` or `7,456`.
fn number(cell: &str) -> Option<f64> {
    let cleaned = cell.replace(',', "");
    let digits: String = cleaned
        .chars()
        .take_while(|c| c.is_ascii_digit() || *c == '.')
        .collect();
    digits.parse().ok()
}

/// Checks a row: `numbers` cells after the label, each a finite positive
/// number (or `—` where `dash_ok`).
fn check_row(report: &str, label: &str, numbers: usize, dash_ok: bool) {
    let cells = row(report, label);
    assert_eq!(
        cells.len(),
        numbers + 1,
        "row {label:?} has {} cells: {cells:?}",
        cells.len()
    );
    for cell in &cells[1..] {
        if dash_ok && *cell == "—" {
            continue;
        }
        let n = number(cell).unwrap_or_else(|| panic!("row {label:?}: {cell:?} is not a number"));
        assert!(
            n.is_finite() && n > 0.0,
            "row {label:?}: {cell:?} is not finite and positive"
        );
    }
}

#[test]
fn quick_mode_writes_a_complete_report() {
    let dir = std::env::temp_dir().join(format!("icache-bench-quick-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&dir);
    // A directory that does not exist yet: the tool creates it.
    let out: PathBuf = dir.join("nested").join("REPORT.md");
    let started = std::time::Instant::now();
    let status = Command::new(env!("CARGO_BIN_EXE_icache-bench"))
        .arg("--quick")
        .arg("--out")
        .arg(&out)
        .status()
        .expect("run icache-bench");
    if status.code() == Some(3) && !in_ci() {
        let bar = "!".repeat(78);
        let _ = write!(
            std::io::stderr().lock(),
            "\n{bar}\n!!! SKIPPING icache-bench --quick: redis-server or memcached is not \
             installed; run scripts/test.sh to install them\n{bar}\n\n"
        );
        return;
    }
    assert!(status.success(), "icache-bench --quick failed: {status}");
    eprintln!("icache-bench --quick took {:.1?}", started.elapsed());
    let report = std::fs::read_to_string(&out).expect("the report was written");
    let _ = std::fs::remove_dir_all(&dir);
    assert!(
        report.contains("--quick"),
        "the header names the quick mode"
    );
    check_report(&report);
}

/// The committed report is a complete one from the full run of the
/// documented command, in release: it must be regenerated, not patched, when
/// the tool's output changes.
#[test]
fn the_committed_report_is_a_complete_full_run() {
    let path = concat!(env!("CARGO_MANIFEST_DIR"), "/../../bench/REPORT.md");
    let report = std::fs::read_to_string(path).expect("bench/REPORT.md is committed");
    for header in [
        "Written by `cargo run --release -p icache-bench -- --out bench/REPORT.md`;",
        "- build: release; mode: full;",
    ] {
        assert!(report.contains(header), "bench/REPORT.md lacks {header:?}");
    }
    check_report(&report);
}

/// Every section, every case row, every target line, and numbers that are
/// finite and positive.
fn check_report(report: &str) {
    for heading in [
        "# icache benchmark report",
        "## Targets",
        "## 1. Hit vs render",
        "## 2. Hit vs the bare minimum",
        "## 3. How the cost grows",
        "### Tokens per block",
        "### Fragment size",
        "### Client threads",
        "## 4. Page level",
        "## 5. Memory per entry",
        "## 6. Bytes on the wire per hit",
        "## 7. Bumps from the database",
        "## 8. A bump under load",
        "## 9. Pages at the edge",
        "## Missed targets",
    ] {
        assert!(
            report.lines().any(|l| l == heading),
            "no heading {heading:?} in the report:\n{report}"
        );
    }
    for header in [
        "Written by `cargo run",
        "- date: ",
        "- machine: ",
        "- rustc: ",
        "- servers: ",
    ] {
        assert!(report.contains(header), "no {header:?} in the header");
    }

    // 1. Hit vs render.
    check_row(report, "render uncached (SQLite + MiniJinja)", 2, false);
    for backend in [
        "memory",
        "redis",
        "memcached",
        "redis near=tracking",
        "redis near=off",
        "memcached near=off",
    ] {
        check_row(report, &format!("block hit, {backend}"), 2, false);
        check_row(report, &format!("fragment hit, {backend}"), 2, false);
    }
    for backend in ["redis", "memcached"] {
        let label = report
            .lines()
            .filter_map(|l| l.strip_prefix("| "))
            .filter_map(|l| l.split(" |").next())
            .find(|l| l.starts_with("bare `GET` of ") && l.contains(&format!(", {backend} (")))
            .unwrap_or_else(|| panic!("no bare GET row for {backend}"))
            .to_owned();
        check_row(report, &label, 2, false);
    }
    // 2. Hit vs the bare minimum.
    for label in [
        "memory vs 4 quick_cache gets",
        "memory vs 4 quick_cache gets + copy to `String`",
        "redis vs one bare `GET`",
        "memcached vs one bare `get`",
    ] {
        check_row(report, label, 3, false);
    }
    // 3. How the cost grows.
    for label in ["1 token", "4 tokens", "16 tokens", "64 tokens"] {
        check_row(report, label, 12, false);
    }
    for label in ["1 KB", "64 KB", "1 MB"] {
        check_row(report, label, 10, false);
    }
    for label in ["1 thread", "2 threads", "4 threads", "8 threads"] {
        check_row(report, label, 6, false);
    }
    // 1. Other engines.
    for label in ["Askama", "maud", "Tera"] {
        check_row(report, label, 5, false);
    }
    // 4. Page level.
    for label in [
        "icache on, memory",
        "icache on, redis",
        "icache on, memcached",
        "icache on, redis near=tracking",
        "redis hung (accepts, never answers)",
        "icache off (`none://`)",
    ] {
        check_row(report, label, 5, false);
    }
    // 5. Memory per entry (quick_cache alone has no "charged" figure).
    check_row(report, "icache fragment (`fragment`)", 5, false);
    // 7. Pages at the edge.
    check_row(report, "user page through Varnish (Varnish hit)", 4, false);
    check_row(
        report,
        "user page straight from the app (block hits)",
        4,
        false,
    );
    check_row(report, "304 from the layer (handler not run)", 4, false);
    check_row(
        report,
        "`incr` returned → first GET showing the new data",
        2,
        false,
    );
    check_row(report, "icache `set_versioned`", 5, false);
    check_row(report, "quick_cache alone (`String` → `Arc<str>`)", 5, true);
    // 6. Bytes on the wire: the body on every hit with near=off, a few
    // bytes with near=entries, nothing per hit with near=tracking.
    let wire = |label: &str| -> Vec<f64> {
        row(report, label)[1..]
            .iter()
            .map(|c| number(c).unwrap_or_else(|| panic!("{label}: {c:?}")))
            .collect()
    };
    for backend in ["redis", "memcached"] {
        let off = wire(&format!("{backend}, `near=off`"));
        let entries = wire(&format!("{backend}, `near=entries`"));
        assert!(
            off[0] > 100_000.0,
            "{backend} near=off moves the body: {off:?}"
        );
        assert!(
            entries[0] > 0.0 && entries[0] <= 220.0,
            "{backend}: {entries:?}"
        );
        assert_eq!((off[2], entries[2]), (1.0, 1.0), "one round trip per hit");
    }
    let tracking = wire("redis, `near=tracking`");
    assert!(
        tracking[2] < 0.05,
        "near=tracking makes no round trip per hit: {tracking:?}"
    );

    // Every target, once in the summary and once in its section, each with
    // a plain verdict and the measured ratio.
    let targets: Vec<&str> = report.lines().filter(|l| l.contains("target: ")).collect();
    // Sections 1-6 have 14 targets, section 8 has 5 and section 9 has 3;
    // section 7 has 6, none when PostgreSQL is missing (outside CI).
    let expected = if report.contains("## 7. Bumps from the database\n\nSkipped") {
        2 * (14 + 5 + 3)
    } else {
        2 * (14 + 6 + 5 + 3)
    };
    assert_eq!(
        targets.len(),
        expected,
        "expected every target twice: {targets:#?}"
    );
    for line in &targets {
        let measured = line
            .split_once(" — met (measured ")
            .or_else(|| line.split_once(" — MISSED (measured "))
            .and_then(|(_, m)| number(m))
            .unwrap_or_else(|| panic!("target line without a verdict: {line}"));
        assert!(measured.is_finite() && measured > 0.0, "{line}");
    }
    let missed = targets.iter().filter(|l| l.contains("MISSED")).count() / 2;
    let notes = report
        .split_once("## Missed targets")
        .map(|(_, notes)| notes.matches("\n**").count())
        .unwrap_or(0);
    assert_eq!(
        notes, missed,
        "every missed target must have its note:\n{report}"
    );
}
