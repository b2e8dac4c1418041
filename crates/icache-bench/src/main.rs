//! `icache-bench`: measures icache side by side and writes a markdown report.
//!
//! ```sh
//! cargo run --release -p icache-bench -- --out bench/REPORT.md
//! ```
//!
//! Exit codes: 0 report written, 1 failure, 2 usage, 3 `redis-server` or
//! `memcached` not installed (outside CI; in CI that is a failure).

use std::path::PathBuf;
use std::process::ExitCode;

use clap::Parser;

/// Measures icache side by side (hits, renders, bare round trips, pages,
/// memory) in one run and writes a markdown report of ratios. Starts its own
/// redis-server and memcached on free loopback ports.
#[derive(Debug, Parser)]
#[command(version, about)]
struct Args {
    /// Where to write the report (directories are created).
    #[arg(long, default_value = "bench/REPORT.md")]
    out: PathBuf,
    /// Few iterations: the whole run in under two minutes, to check that the
    /// tool works (numbers rough).
    #[arg(long)]
    quick: bool,
    /// Internal: one memory measurement in a fresh process (`kind:entries:payload`).
    #[arg(long, hide = true, value_name = "SPEC")]
    memory_child: Option<String>,
    /// Internal: one app process of section 7 (`url|origin_ms|seconds`).
    #[arg(long, hide = true, value_name = "SPEC")]
    bump_child: Option<String>,
}

/// The command line as the report shows it: how to run it again.
fn command_line() -> String {
    let args: Vec<String> = std::env::args().skip(1).map(|a| quote(&a)).collect();
    let profile = if cfg!(debug_assertions) {
        ""
    } else {
        " --release"
    };
    format!("cargo run{profile} -p icache-bench -- {}", args.join(" "))
        .trim_end()
        .to_owned()
}

/// Single-quotes an argument for a POSIX shell when it needs it.
fn quote(arg: &str) -> String {
    let plain = !arg.is_empty()
        && arg
            .chars()
            .all(|c| c.is_ascii_alphanumeric() || "-_./=:@%+,".contains(c));
    if plain {
        arg.to_owned()
    } else {
        format!("'{}'", arg.replace('\'', r"'\''"))
    }
}

fn main() -> ExitCode {
    let args = Args::parse();
    if let Some(spec) = args.memory_child {
        return match icache_bench::memory_child(&spec) {
            Ok(line) => {
                println!("{line}");
                ExitCode::SUCCESS
            }
            Err(e) => {
                eprintln!("icache-bench --memory-child: {e}");
                ExitCode::FAILURE
            }
        };
    }
    if let Some(spec) = args.bump_child {
        return match icache_bench::bump_child(&spec) {
            Ok(out) => {
                print!("{out}");
                ExitCode::SUCCESS
            }
            Err(e) => {
                eprintln!("icache-bench --bump-child: {e}");
                ExitCode::FAILURE
            }
        };
    }
    let exe = match std::env::current_exe() {
        Ok(exe) => exe,
        Err(e) => {
            eprintln!("icache-bench: cannot find its own executable: {e}");
            return ExitCode::FAILURE;
        }
    };
    let options = icache_bench::Options {
        out: args.out,
        quick: args.quick,
        command: command_line(),
        exe,
    };
    match icache_bench::run(&options) {
        Ok(path) => {
            println!("icache-bench: wrote {}", path.display());
            ExitCode::SUCCESS
        }
        Err(e @ icache_bench::Error::ServerMissing(_)) => {
            eprintln!("icache-bench: {e}");
            ExitCode::from(3)
        }
        Err(e) => {
            eprintln!("icache-bench: {e}");
            ExitCode::FAILURE
        }
    }
}
