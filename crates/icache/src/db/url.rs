//! Database URLs: `postgres://…`, `postgresql://…`, `sqlite:///absolute/path.db`.

use std::fmt;
use std::path::PathBuf;

use super::DbError;

/// The SQL dialect of a database.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Dialect {
    /// PostgreSQL 13 or later.
    Postgres,
    /// SQLite 3.35 or later.
    Sqlite,
}

impl fmt::Display for Dialect {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            Dialect::Postgres => "PostgreSQL",
            Dialect::Sqlite => "SQLite",
        })
    }
}

/// A parsed database URL. Its `Display` hides the password.
///
/// ```
/// use icache::db::{DbUrl, Dialect};
/// let url = DbUrl::parse("sqlite:///var/lib/app/app.db")?;
/// assert_eq!(url.dialect(), Dialect::Sqlite);
/// let e = DbUrl::parse("sqlite://app.db").expect_err("relative");
/// assert!(e.to_string().contains("absolute"));
/// # Ok::<(), icache::db::DbError>(())
/// ```
#[derive(Clone)]
pub struct DbUrl {
    dialect: Dialect,
    redacted: String,
    target: Target,
}

#[derive(Clone)]
pub(crate) enum Target {
    #[cfg(feature = "postgres")]
    Postgres(Box<postgres::Config>),
    #[cfg(feature = "sqlite")]
    Sqlite(PathBuf),
    /// A dialect whose cargo feature is off: SQL text only.
    #[allow(dead_code)]
    Unavailable,
}

const EXPECTED: &str = "expected postgres://user[:password]@host[:port]/dbname, postgresql://… or sqlite:///absolute/path.db";

impl DbUrl {
    /// Parses `url`. The error names the bad part (the scheme, the path, the
    /// option), never the password.
    pub fn parse(url: &str) -> Result<DbUrl, DbError> {
        let trimmed = url.trim();
        if trimmed.is_empty() {
            return Err(DbError::usage(format!(
                "the database URL is empty; {EXPECTED}"
            )));
        }
        let parsed = ::url::Url::parse(trimmed).map_err(|e| {
            DbError::usage(format!(
                "database URL {:?} is malformed ({e}); {EXPECTED}",
                redact_raw(trimmed)
            ))
        })?;
        let redacted = {
            let mut shown = parsed.clone();
            if shown.password().is_some() {
                let _ = shown.set_password(Some("***"));
            }
            shown.to_string()
        };
        match parsed.scheme() {
            "postgres" | "postgresql" => Ok(DbUrl {
                dialect: Dialect::Postgres,
                target: postgres_target(trimmed, &redacted)?,
                redacted,
            }),
            "sqlite" => {
                if parsed.host_str().is_some_and(|h| !h.is_empty()) {
                    return Err(DbError::usage(format!(
                        "database URL {redacted}: a SQLite path must be absolute, \
                         sqlite:///absolute/path.db (three slashes), not a host {:?}",
                        parsed.host_str().unwrap_or_default()
                    )));
                }
                let path = parsed
                    .to_file_path()
                    .ok()
                    .filter(|p| p.is_absolute() && p.file_name().is_some())
                    .ok_or_else(|| {
                        DbError::usage(format!(
                            "database URL {redacted}: the SQLite path must be absolute \
                             and name a file, sqlite:///absolute/path.db"
                        ))
                    })?;
                Ok(DbUrl {
                    dialect: Dialect::Sqlite,
                    target: sqlite_target(path, &redacted)?,
                    redacted,
                })
            }
            other => Err(DbError::usage(format!(
                "database URL {redacted}: {other}:// is not a supported database \
                 (PostgreSQL or SQLite only); {EXPECTED}"
            ))),
        }
    }

    /// The dialect.
    pub fn dialect(&self) -> Dialect {
        self.dialect
    }

    pub(crate) fn target(&self) -> &Target {
        &self.target
    }
}

impl fmt::Display for DbUrl {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.redacted)
    }
}

impl fmt::Debug for DbUrl {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "DbUrl({})", self.redacted)
    }
}

/// Best effort for a URL that does not even parse: drop what sits between
/// `://` and `@`.
fn redact_raw(url: &str) -> String {
    match (url.find("://"), url.rfind('@')) {
        (Some(start), Some(at)) if at > start => format!("{}://***{}", &url[..start], &url[at..]),
        _ => url.to_owned(),
    }
}

#[cfg(feature = "postgres")]
fn postgres_target(url: &str, redacted: &str) -> Result<Target, DbError> {
    let mut config: postgres::Config = url
        .parse()
        .map_err(|e| DbError::usage(format!("database URL {redacted}: {e}; {EXPECTED}")))?;
    if config.get_connect_timeout().is_none() {
        config.connect_timeout(std::time::Duration::from_secs(5));
    }
    Ok(Target::Postgres(Box::new(config)))
}

#[cfg(not(feature = "postgres"))]
fn postgres_target(_url: &str, redacted: &str) -> Result<Target, DbError> {
    Err(DbError::usage(format!(
        "database URL {redacted}: PostgreSQL needs icache's `postgres` cargo feature"
    )))
}

#[cfg(feature = "sqlite")]
fn sqlite_target(path: PathBuf, _redacted: &str) -> Result<Target, DbError> {
    Ok(Target::Sqlite(path))
}

#[cfg(not(feature = "sqlite"))]
fn sqlite_target(_path: PathBuf, redacted: &str) -> Result<Target, DbError> {
    Err(DbError::usage(format!(
        "database URL {redacted}: SQLite needs icache's `sqlite` cargo feature"
    )))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn bad_urls_name_the_bad_part_and_hide_passwords() {
        let e = DbUrl::parse("mysql://root:hunter2@db/app").expect_err("unsupported");
        assert!(e.to_string().contains("mysql://"), "{e}");
        assert!(!e.to_string().contains("hunter2"), "{e}");
        let e = DbUrl::parse("sqlite://relative.db").expect_err("relative");
        assert!(e.to_string().contains("absolute"), "{e}");
        let e = DbUrl::parse("").expect_err("empty");
        assert!(e.to_string().contains("empty"), "{e}");
        let e = DbUrl::parse("not a url").expect_err("malformed");
        assert!(e.to_string().contains("malformed"), "{e}");
    }

    #[cfg(feature = "postgres")]
    #[test]
    fn postgres_urls_parse_and_display_redacted() {
        let url = DbUrl::parse("postgresql://app:s3cret@127.0.0.1:5433/app").expect("valid");
        assert_eq!(url.dialect(), Dialect::Postgres);
        assert!(!url.to_string().contains("s3cret"));
        let e = DbUrl::parse("postgres://app@127.0.0.1/app?sslmode=bogus").expect_err("bad option");
        assert!(e.to_string().contains("sslmode"), "{e}");
    }
}
