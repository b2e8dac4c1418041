//! `icache db install|watch|unwatch|status` and `icache relay`: the outbox
//! in the database and the relay that moves its bumps to the cache
//! (`icache::db`).

use std::io::{self, Write};
use std::process::ExitCode;
use std::time::Duration;

use clap::{Args, Subcommand};
use icache::ICache;
use icache::db::{self, DbError, DbErrorKind, Relay};

/// Exit status: database or cache trouble.
const EXIT_TROUBLE: u8 = 1;
/// Exit status: usage (bad arguments, bad URL, missing table or column).
const EXIT_USAGE: u8 = 2;

pub(crate) const DB_EXIT_CODES: &str = "\
Exit codes:
  0  ok
  1  database or cache trouble: unreachable, outbox not installed, a statement failed
  2  usage: bad arguments, a malformed or unsupported URL (the message names the bad part),
     a missing table or column";

const DB_URL_HELP: &str = "Database URL: postgres://user[:password]@host[:port]/dbname, postgresql://…, \
     or sqlite:///absolute/path.db";

/// The outbox in the database: bumps written by triggers inside the
/// writer's own transaction.
#[derive(Debug, Subcommand)]
pub(crate) enum DbCommand {
    /// Create the outbox table (and the `icache_bump(VARIADIC text[])`
    /// function on PostgreSQL). Idempotent.
    #[command(after_help = DB_EXIT_CODES)]
    Install {
        #[arg(long, value_name = "DB_URL", help = DB_URL_HELP)]
        db: String,
    },
    /// Create or replace the triggers of TABLE: every INSERT, UPDATE,
    /// DELETE (and TRUNCATE on PostgreSQL) bumps the tokens the expressions
    /// compute from the old and new rows. Prints what each change will bump.
    #[command(after_help = DB_EXIT_CODES)]
    Watch {
        #[arg(long, value_name = "DB_URL", help = DB_URL_HELP)]
        db: String,
        /// The table (`name`, or `schema.name` on PostgreSQL), as the catalog
        /// spells it.
        #[arg(value_name = "TABLE")]
        table: String,
        /// SQL expressions over the row's columns, one per token, e.g.
        /// `"'movies'"` `"'movie:' || id"` `user_id`.
        #[arg(required = true, value_name = "TOKEN_EXPR", allow_hyphen_values = true)]
        token_exprs: Vec<String>,
    },
    /// Drop the triggers of TABLE.
    #[command(after_help = DB_EXIT_CODES)]
    Unwatch {
        #[arg(long, value_name = "DB_URL", help = DB_URL_HELP)]
        db: String,
        #[arg(value_name = "TABLE")]
        table: String,
    },
    /// Print the rows waiting (`pending N`), the age of the oldest
    /// (`oldest 0.120s`) and each watched table with its expressions.
    #[command(after_help = DB_EXIT_CODES)]
    Status {
        #[arg(long, value_name = "DB_URL", help = DB_URL_HELP)]
        db: String,
    },
}

/// `icache relay`'s arguments.
#[derive(Debug, Args)]
pub(crate) struct RelayArgs {
    #[arg(long, value_name = "DB_URL", help = DB_URL_HELP)]
    db: String,
    /// Look at the outbox at least this often, in milliseconds (LISTEN
    /// wakes it at once on PostgreSQL).
    #[arg(long, value_name = "MS", default_value_t = 1000)]
    poll_ms: u64,
    /// Outbox rows per batch (one `incr_many` round trip each).
    #[arg(long, value_name = "ROWS", default_value_t = 1000)]
    batch: usize,
}

fn complain(message: &str) {
    let _ = writeln!(io::stderr().lock(), "icache: {message}");
}

fn failed(e: &DbError) -> ExitCode {
    complain(&e.to_string());
    ExitCode::from(match e.kind() {
        DbErrorKind::Usage | DbErrorKind::Schema => EXIT_USAGE,
        _ => EXIT_TROUBLE,
    })
}

/// Runs `icache db …`.
pub(crate) fn run_db(command: &DbCommand) -> ExitCode {
    let mut out = io::stdout().lock();
    let written = match command {
        DbCommand::Install { db } => match db::install(db) {
            Ok(()) => writeln!(out, "installed the icache outbox in {}", shown(db)),
            Err(e) => return failed(&e),
        },
        DbCommand::Watch {
            db,
            table,
            token_exprs,
        } => {
            let exprs: Vec<&str> = token_exprs.iter().map(String::as_str).collect();
            match db::watch(db, table, &exprs) {
                Ok(watch) => writeln!(out, "{watch}"),
                Err(e) => return failed(&e),
            }
        }
        DbCommand::Unwatch { db, table } => match db::unwatch(db, table) {
            Ok(true) => writeln!(out, "unwatched {table}"),
            Ok(false) => writeln!(out, "{table} was not watched (nothing dropped)"),
            Err(e) => return failed(&e),
        },
        DbCommand::Status { db } => match db::status(db) {
            Ok(status) => writeln!(out, "{status}"),
            Err(e) => return failed(&e),
        },
    };
    match written.and_then(|()| out.flush()) {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) if e.kind() == io::ErrorKind::BrokenPipe => ExitCode::SUCCESS,
        Err(e) => {
            complain(&format!("cannot write the output: {e}"));
            ExitCode::from(EXIT_TROUBLE)
        }
    }
}

/// The database URL for messages, password hidden.
fn shown(db: &str) -> String {
    db::DbUrl::parse(db).map_or_else(|_| String::from("the database"), |u| u.to_string())
}

/// Runs `icache relay` until SIGINT or SIGTERM.
pub(crate) fn run_relay(cache_url: &str, args: &RelayArgs) -> ExitCode {
    use signal_hook::consts::{SIGINT, SIGTERM};

    let _ = tracing_subscriber::fmt()
        .with_writer(io::stderr)
        .with_target(false)
        .try_init();
    if cache_url.trim().is_empty() || cache_url.trim().starts_with("memory:") {
        complain(
            "icache relay needs the shared cache the application uses: \
             --url redis://host:port or memcached://host:port (or ICACHE_URL)",
        );
        return ExitCode::from(EXIT_USAGE);
    }
    let cache = match ICache::from_url(cache_url) {
        Ok(cache) => cache,
        Err(e) => {
            complain(&e.to_string());
            return ExitCode::from(if e.is_config() {
                EXIT_USAGE
            } else {
                EXIT_TROUBLE
            });
        }
    };
    // Checked once up front: a wrong URL or a missing outbox is an error
    // now, not a retry loop. Later outages are retried.
    if let Err(e) = db::status(&args.db) {
        return failed(&e);
    }
    // Registered before the relay starts: a signal from now on stops it.
    let mut signals = match signal_hook::iterator::Signals::new([SIGINT, SIGTERM]) {
        Ok(signals) => signals,
        Err(e) => {
            complain(&format!("cannot handle SIGINT/SIGTERM: {e}"));
            return ExitCode::from(EXIT_TROUBLE);
        }
    };
    let relay = match Relay::builder(&args.db, cache.clone()).map(|b| {
        b.poll_interval(Duration::from_millis(args.poll_ms))
            .batch_size(args.batch)
            .spawn()
    }) {
        Ok(Ok(relay)) => relay,
        Ok(Err(e)) | Err(e) => return failed(&e),
    };
    complain(&format!(
        "relay running: {} -> {} (poll {} ms); SIGINT or SIGTERM stops it",
        shown(&args.db),
        cache.url(),
        args.poll_ms
    ));
    let signal = signals.forever().next();
    // Finishes the batch in hand: its rows are bumped and deleted, or left
    // for the next relay.
    let stats = relay.stop();
    complain(&format!(
        "relay stopped{}: {} rows, {} bumps in {} batches, {} errors retried",
        signal
            .map(|s| format!(" by signal {s}"))
            .unwrap_or_default(),
        stats.rows,
        stats.bumps,
        stats.batches,
        stats.errors
    ));
    ExitCode::SUCCESS
}
