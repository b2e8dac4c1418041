//! Bumps from the database: an outbox table written inside the writer's own
//! transaction, and a relay that moves it to the cache (features `postgres`,
//! `sqlite`).
//!
//! "Commit, then bump" in application code loses bumps: a save inside a
//! transaction bumps before the commit, a bulk update or a `psql` fix bumps
//! nothing, a process killed between its commit and its bump never bumps.
//! Here the bump is a row of `icache_outbox`, written by a trigger (or by
//! `icache_bump(...)`) **in the same transaction** as the change: it exists
//! exactly when the change is committed. A [`Relay`] then applies it to the
//! cache with [`ICache::incr_many`] and deletes the row **only after** the
//! bump succeeded: at least once, never lost.
//!
//! # In the database
//!
//! * [`install`] (`icache db install`): the `icache_outbox` table (`seq`,
//!   `token`, `created_at`), the `icache_watch` table, and on PostgreSQL the
//!   function `icache_bump(VARIADIC tokens text[])`, which inserts the tokens
//!   and notifies the channel `icache_outbox`. Idempotent.
//! * [`watch`] (`icache db watch`): triggers on a table that bump the tokens
//!   computed by SQL **token expressions** over its rows (`'movies'`,
//!   `'movie:' || id`, `user_id`): INSERT the new row's, DELETE the old row's,
//!   UPDATE both, TRUNCATE (PostgreSQL) every row's. On PostgreSQL they are
//!   statement-level (one outbox row per distinct token per statement); on
//!   SQLite row triggers. [`unwatch`] drops them, [`status`] shows what waits.
//!
//! Any writer, in any language, then bumps by committing: no code of ours
//! has to run after the commit.
//!
//! # The relay
//!
//! ```no_run
//! # fn main() -> Result<(), Box<dyn std::error::Error>> {
//! use std::time::Duration;
//! let cache = icache::ICache::from_url("redis://127.0.0.1:6379")?;
//! // A background thread; several relays (one per process, plus
//! // `icache relay`) may run at once.
//! let relay = icache::db::Relay::builder("postgres://app@127.0.0.1/app", cache)?.spawn()?;
//! // ... the request commits its transaction, then, to read its own writes:
//! relay.flush(Duration::from_secs(2))?;
//! relay.stop();
//! # Ok(()) }
//! ```
//!
//! * On PostgreSQL each batch is one transaction:
//!   `DELETE FROM icache_outbox WHERE seq IN (SELECT seq … ORDER BY seq FOR
//!   UPDATE SKIP LOCKED LIMIT n) RETURNING token`, the distinct tokens bumped
//!   with one `incr_many`, then [`after_bump`](RelayBuilder::after_bump), then
//!   COMMIT. Relays share the queue without bumping the same rows, and the
//!   rows of a relay killed mid-batch come back when its transaction dies.
//! * On SQLite a batch is read, bumped, then deleted (`seq <=` the last one
//!   read; `seq` is `AUTOINCREMENT`, never reused): no write lock is held
//!   while the cache is asked. Two relays on one file may bump a row twice,
//!   which costs a render, never a stale page.
//! * It wakes on `LISTEN icache_outbox` (PostgreSQL, on a connection of its
//!   own), on [`Relay::wake`] / [`Relay::flush`] in its process, and polls
//!   every [`poll_interval`](RelayBuilder::poll_interval) (1 s). A
//!   notification is only a wake-up, never the data: it is lost while the
//!   listener is disconnected, so the relay drains the whole outbox after
//!   every (re)connect.
//! * Cache down: the rows stay, the relay backs off (100 ms doubling to 2 s)
//!   and retries; the cache handle itself remembers the failed bump and
//!   renders uncached until it is applied. Database down: it reconnects with
//!   the same back-off; pages are not affected.
//! * Metrics (`metrics` facade): `icache_relay_bumps_total` (tokens
//!   applied), `icache_relay_rows_total` (outbox rows deleted),
//!   `icache_relay_errors_total`, the gauge `icache_relay_pending_rows`, the
//!   histogram `icache_relay_lag_seconds` (row written → bump applied); a
//!   warning at most every 10 s while rows wait longer than 5 s.
//!   [`Relay::stats`] gives the same numbers.
//!
//! # Read your own writes
//!
//! A request that committed calls [`Relay::flush`] before it answers: it
//! returns once every outbox row committed before the call is applied (by
//! this relay or by another one), so the user's next page is never the old
//! one. It times out (an error) when the cache does not answer; the bumps
//! are then applied when it does.
//!
//! # For other drivers (the Django integration)
//!
//! The SQL is available as text, to run through another driver's own
//! connection, in one transaction per call:
//!
//! * [`install_sql`]`(dialect)`, [`watch_sql`]`(dialect, table, columns,
//!   token_exprs)` (`columns` is needed on SQLite only: the table's column
//!   names), [`unwatch_sql`]`(dialect, table)`: lists of statements, one
//!   statement each, no parameters.
//! * A bump inside the caller's transaction: on PostgreSQL
//!   `SELECT icache_bump(%s, %s, …)`; on SQLite
//!   `INSERT INTO icache_outbox (token) VALUES (%s)` per token.
//! * The relay: [`Relay::builder`]`(db_url, cache)` takes a URL
//!   (`postgres://…`, `postgresql://…`, `sqlite:///absolute/path.db`), then
//!   [`RelayBuilder::spawn`] starts it in a background thread and returns a
//!   [`Relay`] handle: [`flush`](Relay::flush)`(timeout)` waits until what was
//!   committed is applied, [`stop`](Relay::stop) finishes the batch in hand
//!   and joins the thread (dropping the handle does the same).
//!   [`RelayBuilder::run`] runs it on the calling thread until a stop flag is
//!   set (what `icache relay` does).
//!
//! # Limits
//!
//! LISTEN needs the primary (a read replica delivers no notification; the
//! relay still polls). A long transaction delays its own bumps until it
//! commits, as it delays its data. TLS connections to PostgreSQL are not
//! supported yet (`sslmode=disable` or a local socket). The token
//! expressions are SQL written by the operator and run inside every write
//! of the table: keep them to column arithmetic.
//!
//! [`ICache::incr_many`]: crate::ICache::incr_many

mod admin;
mod error;
#[cfg(feature = "postgres")]
mod pg;
mod relay;
mod sql;
#[cfg(feature = "sqlite")]
mod sqlite;
mod url;

pub use admin::{Status, Watch, Watched, install, status, unwatch, watch};
pub use error::{DbError, DbErrorKind};
pub use relay::{Relay, RelayBuilder, RelayStats};
pub use sql::{install_sql, unwatch_sql, watch_sql};
pub use url::{DbUrl, Dialect};
