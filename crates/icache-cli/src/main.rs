//! Run with: `cargo run -p icache-cli -- --url redis://127.0.0.1:6379 stats`
//!
//! `icache`, the operator command line of the icache library: bump tokens after
//! a manual data fix, read generations and versions, read plain values, and
//! show the backend's own counters.
//!
//! ```text
//! icache [--url URL] bump TOKEN...      # prints `TOKEN NEW_GENERATION` per token
//!        [--purge-url URL]              #   then purges the proxy's pages of them (ICACHE_PURGE_URL)
//! icache [--url URL] version TOKEN...   # `TOKEN GENERATION` per token, then `version SUM`
//! icache [--url URL] get KEY            # the plain value stored by `set()`, as is
//! icache [--url URL] stats              # `backend`, `url`, then the server's counters
//! icache [--url URL] flush              # every cached block misses once; prints `icache:flush NEW_GENERATION`
//!        [--purge-url URL]              #   then purges every tagged page at the proxy
//! icache db install --db DB_URL         # the outbox (and icache_bump on PostgreSQL)
//! icache db watch --db DB_URL TABLE TOKEN_EXPR...   # triggers; prints what changes bump
//! icache db unwatch --db DB_URL TABLE   # drops them
//! icache db status --db DB_URL          # pending rows, oldest, watched tables
//! icache --url URL relay --db DB_URL    # outbox -> cache until SIGINT/SIGTERM
//! ```
//!
//! `DB_URL` is `postgres://…`, `postgresql://…` or `sqlite:///absolute/path.db`;
//! the `db` commands and `relay` exit 1 for database or cache trouble and 2
//! for usage (a bad URL part, a missing table or column).
//!
//! The URL comes from `--url` or the `ICACHE_URL` environment variable. It is
//! meant for `redis://` and `memcached://`: `memory://` (the default) is the
//! command's own in-process cache, gone when it exits, so it prints a warning.
//!
//! Exit codes: 0 ok, 1 backend trouble (unreachable, timed out, backend error),
//! 2 usage (bad arguments, malformed URL), 4 key not found (`get`).
//! Errors go to stderr as `icache: <message>`; passwords are never printed.

use std::borrow::Cow;
use std::io::{self, Write};
use std::process::ExitCode;

use clap::{Parser, Subcommand};
use icache::ICache;

mod db;

/// Exit status: backend trouble (and output that could not be written).
const EXIT_BACKEND: u8 = 1;
/// Exit status: usage error (clap's own errors exit 2 as well).
const EXIT_USAGE: u8 = 2;
/// Exit status: `get` found no value under the key.
const EXIT_NOT_FOUND: u8 = 4;

const EXIT_CODES: &str = "\
Exit codes:
  0  ok
  1  backend trouble: unreachable, timed out, backend error
  2  usage: bad arguments, malformed URL (the message names the bad part)
  4  key not found (get)";

const URL_HELP: &str = "\
Cache URL: redis://[user:password@]host[:port][/db], rediss://..., memcached://host[:port], \
with the library's options (?prefix=, timeout_ms=, connect_timeout_ms=). \
The CLI is meant for redis:// and memcached://: memory:// is this command's own \
in-process cache, empty at start and gone when it exits (a warning is printed)";

/// Operator command line for icache, the timeout-less fragment cache.
#[derive(Debug, Parser)]
#[command(name = "icache", version, after_help = EXIT_CODES)]
struct Cli {
    #[arg(
        long,
        global = true,
        value_name = "URL",
        env = "ICACHE_URL",
        // The variable may hold a password: never show its value in --help.
        hide_env_values = true,
        default_value = "memory://",
        help = URL_HELP
    )]
    url: String,

    #[command(subcommand)]
    command: Command,
}

#[derive(Debug, Subcommand)]
enum Command {
    /// Bump the generation of each token (after the commit that changed its
    /// data): everything cached under it is outdated from now on. Prints
    /// `TOKEN NEW_GENERATION` per token.
    #[command(after_help = EXIT_CODES)]
    Bump {
        /// Tokens to bump, e.g. `movies user:42`.
        #[arg(required = true, value_name = "TOKEN")]
        tokens: Vec<String>,
        /// After the bump, purge the pages of these tokens at the proxy in
        /// front of the site: http://HOST:PORT (Varnish with the repo's
        /// VCL), fastly://SERVICE?token=…, cloudflare://ZONE?token=…. Without
        /// it a proxy keeps serving those pages.
        #[arg(
            long,
            value_name = "URL",
            env = "ICACHE_PURGE_URL",
            hide_env_values = true
        )]
        purge_url: Option<String>,
    },
    /// Print each token's generation (`TOKEN GENERATION`), then the version
    /// of the set, their wrapping sum, as `version SUM`. A token seen for the
    /// first time gets a fresh random generation, as in the library.
    #[command(after_help = EXIT_CODES)]
    Version {
        /// Tokens to read, e.g. `movies user:42`.
        #[arg(required = true, value_name = "TOKEN")]
        tokens: Vec<String>,
    },
    /// Print the plain value stored under KEY by `set()`, exactly as stored
    /// (no newline added; bytes that are not UTF-8 are written raw). A missing
    /// key prints nothing to stdout and exits 4.
    #[command(after_help = EXIT_CODES)]
    Get {
        /// The key, as given to `set()`.
        #[arg(value_name = "KEY")]
        key: String,
    },
    /// Print `backend NAME`, `url URL` (password hidden), then the backend's
    /// own counters, one `name value` per line (Redis INFO, memcached stats).
    #[command(after_help = EXIT_CODES)]
    Stats,
    /// Make every cached block miss once, in every process that shares
    /// this cache and prefix (after a deploy that changed what no token or
    /// template digest sees): one bump of the flush token `icache:flush`,
    /// part of every block's version. Nothing is deleted. Prints
    /// `icache:flush NEW_GENERATION`.
    #[command(after_help = EXIT_CODES)]
    Flush {
        /// After the flush, purge every page icache tagged at the proxy in
        /// front of the site (they all carry the flush token's key): same
        /// forms as `bump --purge-url`.
        #[arg(
            long,
            value_name = "URL",
            env = "ICACHE_PURGE_URL",
            hide_env_values = true
        )]
        purge_url: Option<String>,
    },
    /// The outbox in the database (install, watch, unwatch, status): bumps
    /// written inside the writer's own transaction.
    #[command(subcommand)]
    Db(db::DbCommand),
    /// Move the outbox's bumps to the cache (--url) until SIGINT/SIGTERM.
    #[command(after_help = db::DB_EXIT_CODES)]
    Relay(db::RelayArgs),
}

/// Why a command did not succeed.
enum Failure {
    Cache(icache::Error),
    Usage(String),
    NotFound(String),
    /// Bumped, but the proxy could not be purged.
    Purge(String),
    Output(io::Error),
}

impl From<icache::Error> for Failure {
    fn from(e: icache::Error) -> Self {
        Failure::Cache(e)
    }
}

impl From<io::Error> for Failure {
    fn from(e: io::Error) -> Self {
        Failure::Output(e)
    }
}

fn main() -> ExitCode {
    // Usage errors exit 2; --help and --version exit 0.
    let cli = Cli::parse();
    match &cli.command {
        Command::Db(command) => return db::run_db(command),
        Command::Relay(args) => return db::run_relay(&cli.url, args),
        _ => {}
    }
    match run(&cli) {
        Ok(()) => ExitCode::SUCCESS,
        Err(Failure::Cache(e)) => {
            complain(&e.to_string());
            ExitCode::from(if e.is_config() {
                EXIT_USAGE
            } else {
                EXIT_BACKEND
            })
        }
        Err(Failure::Usage(message)) => {
            complain(&message);
            ExitCode::from(EXIT_USAGE)
        }
        Err(Failure::Purge(message)) => {
            complain(&message);
            ExitCode::from(EXIT_BACKEND)
        }
        Err(Failure::NotFound(key)) => {
            complain(&format!("not found: {}", quoted(&key)));
            ExitCode::from(EXIT_NOT_FOUND)
        }
        // The reader went away (`icache stats | head -1`): nothing to report.
        Err(Failure::Output(e)) if e.kind() == io::ErrorKind::BrokenPipe => ExitCode::SUCCESS,
        Err(Failure::Output(e)) => {
            complain(&format!("cannot write the output: {e}"));
            ExitCode::from(EXIT_BACKEND)
        }
    }
}

/// Writes `icache: message` to stderr (never panics, unlike `eprintln!`).
fn complain(message: &str) {
    let _ = writeln!(io::stderr().lock(), "icache: {message}");
}

fn run(cli: &Cli) -> Result<(), Failure> {
    if cli.url.trim().is_empty() {
        // Most likely an unset shell variable: refuse rather than bump a
        // throw-away memory:// cache and exit 0.
        return Err(Failure::Usage(
            "the cache URL is empty (--url or ICACHE_URL); expected redis://host:port \
             or memcached://host:port"
                .to_owned(),
        ));
    }
    let cache = ICache::from_url(&cli.url)?;
    if cache.backend_name() == "memory" {
        complain(&format!(
            "warning: {} is this command's own in-process cache, empty at start and \
             gone when it exits; use redis:// or memcached:// (--url or ICACHE_URL)",
            cache.url()
        ));
    }
    let mut out = io::stdout().lock();
    match &cli.command {
        Command::Bump { tokens, purge_url } => {
            let tokens = as_strs(tokens);
            // Checked before the bump: a typo must not leave a bump unpurged.
            let purger = purger(purge_url.as_deref())?;
            let generations = cache.incr_many(&tokens)?;
            for (token, generation) in tokens.iter().zip(generations) {
                writeln!(out, "{} {generation}", quoted(token))?;
            }
            if let Some(purger) = purger {
                out.flush()?;
                purger.purge(&tokens).map_err(|e| {
                    Failure::Purge(format!(
                        "bumped, but the proxy's pages were not purged (run the bump again): {e}"
                    ))
                })?;
            }
        }
        Command::Version { tokens } => {
            let tokens = as_strs(tokens);
            let generations = cache.generations(&tokens)?;
            let mut sum = 0u64;
            for (token, generation) in tokens.iter().zip(generations) {
                sum = sum.wrapping_add(generation);
                writeln!(out, "{} {generation}", quoted(token))?;
            }
            writeln!(out, "version {sum}")?;
        }
        Command::Get { key } => match cache.get_bytes(key)? {
            Some(value) => out.write_all(&value)?,
            None => return Err(Failure::NotFound(key.clone())),
        },
        Command::Flush { purge_url } => {
            let purger = purger(purge_url.as_deref())?;
            let generation = cache.flush()?;
            writeln!(out, "{} {generation}", ICache::FLUSH_TOKEN)?;
            if let Some(purger) = purger {
                out.flush()?;
                purger.purge(&[ICache::FLUSH_TOKEN]).map_err(|e| {
                    Failure::Purge(format!(
                        "flushed, but the proxy's pages were not purged (run the flush again): {e}"
                    ))
                })?;
            }
        }
        Command::Stats => {
            // Ask first: an unreachable server prints nothing to stdout.
            let stats = cache.server_stats()?;
            writeln!(out, "backend {}", cache.backend_name())?;
            writeln!(out, "url {}", cache.url())?;
            for (name, value) in stats {
                writeln!(out, "{name} {value}")?;
            }
        }
        // Run by main() before a cache is opened.
        Command::Db(_) | Command::Relay(_) => {}
    }
    out.flush()?;
    Ok(())
}

/// The purger of `--purge-url` (`ICACHE_PURGE_URL`), if one is given.
fn purger(url: Option<&str>) -> Result<Option<icache_http::Purger>, Failure> {
    match url.map(str::trim) {
        Some(url) if !url.is_empty() => icache_http::Purger::from_url(url)
            .map(Some)
            .map_err(|e| Failure::Usage(format!("--purge-url: {e}"))),
        _ => Ok(None),
    }
}

fn as_strs(items: &[String]) -> Vec<&str> {
    items.iter().map(String::as_str).collect()
}

/// A token or key for a `NAME VALUE` line: as is when it is one plain word,
/// quoted and escaped (Rust string syntax) when it is empty or holds
/// whitespace, quotes or control characters, so every line stays parseable.
fn quoted(s: &str) -> Cow<'_, str> {
    let plain = !s.is_empty()
        && !s
            .chars()
            .any(|c| c.is_whitespace() || c.is_control() || c == '"' || c == '\\');
    if plain {
        Cow::Borrowed(s)
    } else {
        Cow::Owned(format!("{s:?}"))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use clap::CommandFactory;

    #[test]
    fn cli_definition_is_valid() {
        Cli::command().debug_assert();
    }

    #[test]
    fn quoting_keeps_lines_parseable() {
        assert_eq!(quoted("user:42"), "user:42");
        assert_eq!(quoted("a b"), "\"a b\"");
        assert_eq!(quoted("a\nb"), "\"a\\nb\"");
        assert_eq!(quoted(""), "\"\"");
    }
}
