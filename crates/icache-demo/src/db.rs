//! The movies database: schema, deterministic seed data, queries.
//!
//! One SQLite file in the data directory, created and seeded on first start.
//! A `Mutex<Connection>` is enough here: queries run only on cache misses and
//! for the few rows every page needs.
//!
//! Invalidation lives in the database too: `icache::db` triggers on
//! `ratings` and `movies` write the tokens a change invalidates into the
//! outbox inside the writer's own transaction, and a relay in this process
//! bumps them in the cache. Any writer (this site, the `sqlite3` shell, a
//! script) invalidates the right blocks; no request code bumps anything.

use std::path::{Path, PathBuf};
use std::sync::{Mutex, OnceLock, PoisonError};
use std::time::Duration;

use icache::ICache;
use icache::db::{DbError, Relay};

use rusqlite::{Connection, OptionalExtension, params};
use serde::Serialize;

/// Movies in the seed data.
pub const MOVIES: i64 = 5_000;
/// Users in the seed data.
pub const USERS: i64 = 50;
/// How many movies each user has rated.
pub const RATED_PER_USER: i64 = 400;

/// What the triggers bump: (table, token expressions). The tokens are the
/// ones the templates name: `movies` and a user's id.
pub const WATCH: &[(&str, &[&str])] = &[
    ("ratings", &["'movies'", "user_id"]),
    ("movies", &["'movies'"]),
];

/// How long a rating waits for its bumps before it answers (read your own
/// writes); past it the bumps are applied when the cache answers.
const FLUSH_TIMEOUT: Duration = Duration::from_secs(2);

/// The database handle.
pub struct Db {
    conn: Mutex<Connection>,
    path: PathBuf,
    /// The outbox relay, once [`start_relay`](Self::start_relay) ran.
    relay: OnceLock<Relay>,
}

/// A user.
#[derive(Debug, Clone, Serialize)]
#[allow(missing_docs)]
pub struct User {
    pub id: i64,
    pub name: String,
}

/// A movie with one user's rating.
#[derive(Debug, Clone, Serialize)]
#[allow(missing_docs)]
pub struct Rated {
    pub id: i64,
    pub title: String,
    pub year: i64,
    pub rating: i64,
}

/// A movie with its average rating.
#[derive(Debug, Clone, Serialize)]
#[allow(missing_docs)]
pub struct Top {
    pub id: i64,
    pub title: String,
    pub year: i64,
    pub average: f64,
    pub votes: i64,
}

/// splitmix64: a tiny deterministic generator, so every fresh database holds
/// the same movies, users and ratings (the benchmark tool uses it too).
pub struct Seq(pub u64);

impl Seq {
    /// The next number.
    pub fn next_u64(&mut self) -> u64 {
        self.0 = self.0.wrapping_add(0x9E37_79B9_7F4A_7C15);
        let mut z = self.0;
        z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
        z ^ (z >> 31)
    }
    /// A number below `n` (`n` > 0).
    pub fn below(&mut self, n: u64) -> u64 {
        self.next_u64() % n
    }
}

const ADJECTIVES: &[&str] = &[
    "Silent",
    "Crimson",
    "Broken",
    "Golden",
    "Hidden",
    "Last",
    "Electric",
    "Frozen",
    "Wild",
    "Lonely",
    "Burning",
    "Secret",
    "Dark",
    "Bright",
    "Lost",
    "Final",
    "Savage",
    "Gentle",
    "Iron",
    "Velvet",
    "Restless",
    "Midnight",
    "Hollow",
    "Distant",
    "Quiet",
    "Scarlet",
    "Wandering",
    "Forgotten",
    "Sudden",
    "Endless",
];
const NOUNS: &[&str] = &[
    "River",
    "Empire",
    "Garden",
    "Stranger",
    "Horizon",
    "Machine",
    "Harbor",
    "Orchard",
    "Signal",
    "Kingdom",
    "Mirror",
    "Voyage",
    "Letter",
    "Canyon",
    "Winter",
    "Station",
    "Promise",
    "Shadow",
    "Island",
    "Circus",
    "Frontier",
    "Lantern",
    "Summer",
    "Detective",
    "Symphony",
    "Desert",
    "Citadel",
    "Tide",
    "Witness",
    "Carnival",
];
const NAMES: &[&str] = &[
    "Ann", "Bob", "Chidi", "Dana", "Emil", "Fatima", "Goran", "Hana", "Ivo", "Jun",
];

impl Db {
    /// Opens (creating and seeding if needed) `movies.db` in `dir`.
    pub fn open(dir: &Path) -> rusqlite::Result<Db> {
        std::fs::create_dir_all(dir).map_err(|e| {
            rusqlite::Error::ToSqlConversionFailure(
                format!("cannot create {}: {e}", dir.display()).into(),
            )
        })?;
        let path = std::path::absolute(dir.join("movies.db")).map_err(|e| {
            rusqlite::Error::ToSqlConversionFailure(
                format!("cannot resolve {}: {e}", dir.display()).into(),
            )
        })?;
        let conn = Connection::open(&path)?;
        conn.pragma_update(None, "journal_mode", "WAL")?;
        conn.pragma_update(None, "synchronous", "NORMAL")?;
        conn.pragma_update(None, "foreign_keys", "ON")?;
        conn.busy_timeout(std::time::Duration::from_secs(5))?;
        let db = Db {
            conn: Mutex::new(conn),
            path,
            relay: OnceLock::new(),
        };
        db.seed()?;
        db.watch().map_err(|e| {
            rusqlite::Error::ToSqlConversionFailure(
                format!("cannot install the icache outbox: {e}").into(),
            )
        })?;
        Ok(db)
    }

    /// `sqlite:///absolute/path/movies.db`.
    pub fn url(&self) -> String {
        format!("sqlite://{}", self.path.display())
    }

    /// Installs the outbox and the triggers of [`WATCH`] (idempotent).
    fn watch(&self) -> Result<(), DbError> {
        let url = self.url();
        icache::db::install(&url)?;
        for (table, exprs) in WATCH {
            icache::db::watch(&url, table, exprs)?;
        }
        Ok(())
    }

    /// Starts the in-process relay that moves the outbox's bumps to `cache`
    /// (once; later calls do nothing).
    pub fn start_relay(
        &self,
        cache: ICache,
        after_bump: impl Fn(&[String]) -> Result<(), String> + Send + Sync + 'static,
    ) -> Result<(), DbError> {
        if self.relay.get().is_none() {
            let relay = Relay::builder(&self.url(), cache)?
                .after_bump(after_bump)
                .spawn()?;
            // Lost a race with another caller: theirs runs, ours stops.
            let _ = self.relay.set(relay);
        }
        Ok(())
    }

    /// Read your own writes: waits until the bumps the triggers wrote for
    /// what was just committed are applied to the cache, and returns those
    /// tokens (sorted). Without a relay nothing is applied: an error.
    pub fn applied_bumps(&self) -> Result<Vec<String>, String> {
        let relay = self
            .relay
            .get()
            .ok_or("the outbox relay is not running (Db::start_relay)")?;
        let mut tokens = relay.flush(FLUSH_TIMEOUT).map_err(|e| e.to_string())?;
        tokens.sort();
        Ok(tokens)
    }

    fn conn(&self) -> std::sync::MutexGuard<'_, Connection> {
        self.conn.lock().unwrap_or_else(PoisonError::into_inner)
    }

    fn seed(&self) -> rusqlite::Result<()> {
        let mut conn = self.conn();
        conn.execute_batch(
            "CREATE TABLE IF NOT EXISTS movies (id INTEGER PRIMARY KEY, title TEXT NOT NULL, year INTEGER NOT NULL);
             CREATE TABLE IF NOT EXISTS users (id INTEGER PRIMARY KEY, name TEXT NOT NULL);
             CREATE TABLE IF NOT EXISTS ratings (
                 user_id INTEGER NOT NULL REFERENCES users(id),
                 movie_id INTEGER NOT NULL REFERENCES movies(id),
                 rating INTEGER NOT NULL CHECK (rating BETWEEN 1 AND 5),
                 PRIMARY KEY (user_id, movie_id));
             CREATE INDEX IF NOT EXISTS ratings_by_movie ON ratings(movie_id);",
        )?;
        let seeded: i64 = conn.query_row("SELECT COUNT(*) FROM users", [], |r| r.get(0))?;
        if seeded > 0 {
            return Ok(());
        }
        let tx = conn.transaction()?;
        let mut seq = Seq(42);
        {
            let mut movie =
                tx.prepare("INSERT INTO movies (id, title, year) VALUES (?1, ?2, ?3)")?;
            for id in 1..=MOVIES {
                let adj = ADJECTIVES[seq.below(ADJECTIVES.len() as u64) as usize];
                let noun = NOUNS[seq.below(NOUNS.len() as u64) as usize];
                let part = seq.below(4);
                let title = if part == 0 {
                    format!("The {adj} {noun}")
                } else {
                    format!("The {adj} {noun} {}", part + 1)
                };
                movie.execute(params![id, title, 1950 + seq.below(75) as i64])?;
            }
            let mut user = tx.prepare("INSERT INTO users (id, name) VALUES (?1, ?2)")?;
            let mut rating = tx.prepare(
                "INSERT OR IGNORE INTO ratings (user_id, movie_id, rating) VALUES (?1, ?2, ?3)",
            )?;
            for id in 1..=USERS {
                let name = format!("{} {}", NAMES[(id as usize - 1) % NAMES.len()], id);
                user.execute(params![id, name])?;
                for _ in 0..RATED_PER_USER {
                    let movie = 1 + seq.below(MOVIES as u64) as i64;
                    rating.execute(params![id, movie, 1 + seq.below(5) as i64])?;
                }
            }
        }
        tx.commit()
    }

    /// All users.
    pub fn users(&self) -> rusqlite::Result<Vec<User>> {
        let conn = self.conn();
        let mut st = conn.prepare_cached("SELECT id, name FROM users ORDER BY id")?;
        st.query_map([], |r| {
            Ok(User {
                id: r.get(0)?,
                name: r.get(1)?,
            })
        })?
        .collect()
    }

    /// One user.
    pub fn user(&self, id: i64) -> rusqlite::Result<Option<User>> {
        self.conn()
            .query_row("SELECT id, name FROM users WHERE id = ?1", [id], |r| {
                Ok(User {
                    id: r.get(0)?,
                    name: r.get(1)?,
                })
            })
            .optional()
    }

    /// Is there such a movie?
    pub fn movie_exists(&self, id: i64) -> rusqlite::Result<bool> {
        Ok(self
            .conn()
            .query_row("SELECT 1 FROM movies WHERE id = ?1", [id], |_| Ok(()))
            .optional()?
            .is_some())
    }

    /// How many movies a user rated.
    pub fn rated_count(&self, user: i64) -> rusqlite::Result<i64> {
        self.conn().query_row(
            "SELECT COUNT(*) FROM ratings WHERE user_id = ?1",
            [user],
            |r| r.get(0),
        )
    }

    /// A movie's title, if there is such a movie.
    pub fn movie_title(&self, id: i64) -> rusqlite::Result<Option<String>> {
        self.conn()
            .query_row("SELECT title FROM movies WHERE id = ?1", [id], |r| r.get(0))
            .optional()
    }

    /// A user's movies, best rated first: the seed's "personal rating" list.
    pub fn personal_ratings(&self, user: i64) -> rusqlite::Result<Vec<Rated>> {
        self.personal_ratings_page(user, 1, i64::MAX)
    }

    /// Page `page` (from 1) of [`personal_ratings`](Self::personal_ratings),
    /// `per_page` movies a page.
    pub fn personal_ratings_page(
        &self,
        user: i64,
        page: i64,
        per_page: i64,
    ) -> rusqlite::Result<Vec<Rated>> {
        let conn = self.conn();
        let mut st = conn.prepare_cached(
            "SELECT m.id, m.title, m.year, r.rating FROM ratings r JOIN movies m ON m.id = r.movie_id
             WHERE r.user_id = ?1 ORDER BY r.rating DESC, m.title, m.id LIMIT ?2 OFFSET ?3",
        )?;
        let offset = page.saturating_sub(1).saturating_mul(per_page);
        st.query_map([user, per_page, offset], |r| {
            Ok(Rated {
                id: r.get(0)?,
                title: r.get(1)?,
                year: r.get(2)?,
                rating: r.get(3)?,
            })
        })?
        .collect()
    }

    /// The best movies by average rating (at least 3 votes).
    pub fn top_movies(&self, limit: i64) -> rusqlite::Result<Vec<Top>> {
        let conn = self.conn();
        let mut st = conn.prepare_cached(
            "SELECT m.id, m.title, m.year, AVG(r.rating) AS a, COUNT(*) AS n
             FROM ratings r JOIN movies m ON m.id = r.movie_id
             GROUP BY m.id HAVING n >= 3 ORDER BY a DESC, n DESC, m.title, m.id LIMIT ?1",
        )?;
        st.query_map([limit], |r| {
            Ok(Top {
                id: r.get(0)?,
                title: r.get(1)?,
                year: r.get(2)?,
                average: r.get(3)?,
                votes: r.get(4)?,
            })
        })?
        .collect()
    }

    /// Records a rating (a new one or a change) and commits. Its triggers
    /// wrote the bumps (`movies`, the user's id) in the same transaction.
    pub fn rate(&self, user: i64, movie: i64, rating: i64) -> rusqlite::Result<()> {
        self.conn().execute(
            "INSERT INTO ratings (user_id, movie_id, rating) VALUES (?1, ?2, ?3)
             ON CONFLICT(user_id, movie_id) DO UPDATE SET rating = excluded.rating",
            params![user, movie, rating],
        )?;
        Ok(())
    }

    /// How many ratings there are.
    pub fn count_ratings(&self) -> rusqlite::Result<i64> {
        self.conn()
            .query_row("SELECT COUNT(*) FROM ratings", [], |r| r.get(0))
    }
}
