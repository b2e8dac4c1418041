//! The SQL of the outbox: pure text, no connection. The same statements are
//! run by [`install`](super::install) / [`watch`](super::watch) and handed to
//! other drivers (Django runs them through its own connection).

use super::{DbError, Dialect};

/// The channel `icache_bump` and the triggers notify, and relays LISTEN on.
pub(crate) const CHANNEL: &str = "icache_outbox";

/// Names of the PostgreSQL triggers on a watched table (fixed: trigger names
/// are per table there).
const PG_TRIGGERS: [&str; 4] = [
    "icache_watch_insert",
    "icache_watch_update",
    "icache_watch_delete",
    "icache_watch_truncate",
];

/// The dollar-quote tag of the generated function bodies; an expression
/// holding it could end the body early, so it is refused.
const BODY_TAG: &str = "$icache_body$";

/// `name` as an SQL identifier: double-quoted, inner quotes doubled.
pub(crate) fn ident(name: &str) -> String {
    format!("\"{}\"", name.replace('"', "\"\""))
}

/// `text` as an SQL string literal (standard-conforming: only `'` doubles).
pub(crate) fn literal(text: &str) -> String {
    format!("'{}'", text.replace('\'', "''"))
}

/// A table name as given (`movies` or, on PostgreSQL, `schema.movies`),
/// split and checked. Names are taken exactly as the catalog spells them
/// (quoted: `Movies` is not `movies`).
#[derive(Debug, Clone)]
pub(crate) struct Table {
    pub(crate) schema: Option<String>,
    pub(crate) name: String,
}

impl Table {
    pub(crate) fn parse(dialect: Dialect, table: &str) -> Result<Table, DbError> {
        let table = table.trim();
        let bad = |why: &str| DbError::usage(format!("table name {table:?}: {why}"));
        if table.is_empty() {
            return Err(bad("empty"));
        }
        if table.chars().any(|c| c.is_control()) {
            return Err(bad("holds a control character"));
        }
        let (schema, name) = match (dialect, table.split_once('.')) {
            (Dialect::Postgres, Some((schema, name))) => (Some(schema), name),
            _ => (None, table),
        };
        if name.is_empty() || schema.is_some_and(str::is_empty) || name.contains('.') {
            return Err(bad("expected NAME or SCHEMA.NAME"));
        }
        if name.starts_with("icache_") {
            return Err(bad("icache's own tables cannot be watched"));
        }
        Ok(Table {
            schema: schema.map(str::to_owned),
            name: name.to_owned(),
        })
    }

    /// The table, quoted (schema-qualified if given).
    pub(crate) fn quoted(&self) -> String {
        match &self.schema {
            Some(schema) => format!("{}.{}", ident(schema), ident(&self.name)),
            None => ident(&self.name),
        }
    }

    /// The name as given, for messages and the `icache_watch` table.
    pub(crate) fn display(&self) -> String {
        match &self.schema {
            Some(schema) => format!("{schema}.{}", self.name),
            None => self.name.clone(),
        }
    }

    /// The PostgreSQL trigger function of this table (in its schema).
    fn pg_function(&self) -> String {
        let name = ident(&format!("icache_watch_{}", self.name));
        match &self.schema {
            Some(schema) => format!("{}.{name}", ident(schema)),
            None => name,
        }
    }

    /// The SQLite trigger of this table for `event` (names are global in a
    /// SQLite schema, so the table is in them).
    fn sqlite_trigger(&self, event: &str) -> String {
        ident(&format!("icache_watch_{}_{event}", self.name))
    }
}

/// Checks the token expressions' text (not their meaning: that needs the
/// database, see [`watch`](super::watch)).
pub(crate) fn check_exprs(token_exprs: &[&str]) -> Result<Vec<String>, DbError> {
    if token_exprs.is_empty() {
        return Err(DbError::usage(
            "no token expression given: name at least one, e.g. 'movies' or 'movie:' || id",
        ));
    }
    token_exprs
        .iter()
        .enumerate()
        .map(|(i, e)| {
            let e = e.trim();
            let bad =
                |why: &str| DbError::usage(format!("token expression {} ({e:?}): {why}", i + 1));
            if e.is_empty() {
                return Err(bad("empty"));
            }
            if e.contains(BODY_TAG) {
                return Err(bad(&format!("must not contain {BODY_TAG}")));
            }
            Ok(e.to_owned())
        })
        .collect()
}

/// The statements that create the outbox (and, on PostgreSQL, the
/// `icache_bump` function). Idempotent: run them again and nothing changes.
///
/// * `icache_outbox(seq, token, created_at)`: one row per bump waiting to
///   reach the cache; `created_at` is when the row was written (inside the
///   writer's transaction, so just before its commit).
/// * `icache_watch(table_name, position, expression)`: what [`watch`]
///   recorded, for `icache db status`.
/// * PostgreSQL: `icache_bump(VARIADIC tokens text[])` inserts the tokens and
///   notifies `icache_outbox`; inside a transaction it bumps exactly when the
///   transaction commits.
///
/// Run them in one transaction. On PostgreSQL the first statement takes a
/// transaction-level advisory lock, so concurrent installs queue up.
///
/// ```
/// use icache::db::{Dialect, install_sql};
/// let statements = install_sql(Dialect::Sqlite);
/// assert!(statements.iter().any(|s| s.contains("icache_outbox")));
/// ```
///
/// [`watch`]: super::watch
pub fn install_sql(dialect: Dialect) -> Vec<String> {
    match dialect {
        Dialect::Postgres => vec![
            // Serializes concurrent installs (CREATE … IF NOT EXISTS races).
            "SELECT pg_advisory_xact_lock(7306874316524413233)".to_owned(),
            "CREATE TABLE IF NOT EXISTS icache_outbox (\n\
             \x20 seq bigint GENERATED ALWAYS AS IDENTITY PRIMARY KEY,\n\
             \x20 token text NOT NULL,\n\
             \x20 created_at timestamptz NOT NULL DEFAULT clock_timestamp()\n\
             )"
            .to_owned(),
            "CREATE TABLE IF NOT EXISTS icache_watch (\n\
             \x20 table_name text NOT NULL,\n\
             \x20 position int NOT NULL,\n\
             \x20 expression text NOT NULL,\n\
             \x20 PRIMARY KEY (table_name, position)\n\
             )"
            .to_owned(),
            format!(
                "CREATE OR REPLACE FUNCTION icache_bump(VARIADIC tokens text[]) RETURNS void\n\
                 LANGUAGE plpgsql SET search_path FROM CURRENT AS {BODY_TAG}\n\
                 BEGIN\n\
                 \x20 INSERT INTO icache_outbox (token)\n\
                 \x20   SELECT DISTINCT t FROM unnest(tokens) AS u(t) WHERE t IS NOT NULL;\n\
                 \x20 IF FOUND THEN PERFORM pg_notify('{CHANNEL}', ''); END IF;\n\
                 END\n\
                 {BODY_TAG}"
            ),
        ],
        Dialect::Sqlite => vec![
            // AUTOINCREMENT: a seq is never reused after a delete, so a relay
            // that deletes `seq <= last it read` never deletes a newer row.
            "CREATE TABLE IF NOT EXISTS icache_outbox (\n\
             \x20 seq INTEGER PRIMARY KEY AUTOINCREMENT,\n\
             \x20 token TEXT NOT NULL,\n\
             \x20 created_at REAL NOT NULL DEFAULT ((julianday('now') - 2440587.5) * 86400.0)\n\
             )"
            .to_owned(),
            "CREATE TABLE IF NOT EXISTS icache_watch (\n\
             \x20 table_name TEXT NOT NULL,\n\
             \x20 position INTEGER NOT NULL,\n\
             \x20 expression TEXT NOT NULL,\n\
             \x20 PRIMARY KEY (table_name, position)\n\
             )"
            .to_owned(),
        ],
    }
}

/// The statements that make every change of `table` bump the tokens that
/// `token_exprs` compute from its rows, replacing earlier ones for the table.
///
/// Token expressions are SQL expressions over the row's columns, unqualified:
/// `'movies'`, `'movie:' || id`, `user_id` (cast to text for you; a NULL
/// value bumps nothing). INSERT bumps the new row's tokens, DELETE the old
/// row's, UPDATE both (a row moved from user 1 to user 2 bumps both), and on
/// PostgreSQL TRUNCATE bumps the tokens of every row it removes.
///
/// On PostgreSQL the triggers are statement-level with transition tables: one
/// outbox row per distinct token per statement, whatever the number of rows.
/// `columns` is ignored there. On SQLite they are row triggers and need the
/// table's `columns` (each row is exposed to the expressions under its
/// column names).
///
/// This checks the text only; [`watch`](super::watch) also checks each
/// expression against the table (a missing table or column is an error
/// naming it) before it runs these.
///
/// ```
/// use icache::db::{Dialect, watch_sql};
/// let sql = watch_sql(Dialect::Postgres, "movies", &[], &["'movies'", "'movie:' || id"])?;
/// assert!(sql.iter().any(|s| s.contains("BEFORE TRUNCATE")));
/// assert!(watch_sql(Dialect::Sqlite, "movies", &[], &["'movies'"]).is_err()); // no columns
/// # Ok::<(), icache::db::DbError>(())
/// ```
pub fn watch_sql(
    dialect: Dialect,
    table: &str,
    columns: &[&str],
    token_exprs: &[&str],
) -> Result<Vec<String>, DbError> {
    let table = Table::parse(dialect, table)?;
    let exprs = check_exprs(token_exprs)?;
    let mut out = match dialect {
        Dialect::Postgres => pg_watch(&table, &exprs),
        Dialect::Sqlite => sqlite_watch(&table, columns, &exprs)?,
    };
    out.extend(record_watch(&table, &exprs));
    Ok(out)
}

/// The statements that drop the triggers [`watch_sql`] made for `table`
/// (and its `icache_watch` rows). Dropping what is not there is no error.
///
/// ```
/// use icache::db::{Dialect, unwatch_sql};
/// assert_eq!(unwatch_sql(Dialect::Sqlite, "movies")?.len(), 4);
/// # Ok::<(), icache::db::DbError>(())
/// ```
pub fn unwatch_sql(dialect: Dialect, table: &str) -> Result<Vec<String>, DbError> {
    let table = Table::parse(dialect, table)?;
    let mut out = Vec::new();
    match dialect {
        Dialect::Postgres => {
            for trigger in PG_TRIGGERS {
                out.push(format!(
                    "DROP TRIGGER IF EXISTS {trigger} ON {}",
                    table.quoted()
                ));
            }
            out.push(format!("DROP FUNCTION IF EXISTS {}()", table.pg_function()));
        }
        Dialect::Sqlite => {
            for event in ["insert", "update", "delete"] {
                out.push(format!(
                    "DROP TRIGGER IF EXISTS {}",
                    table.sqlite_trigger(event)
                ));
            }
        }
    }
    out.push(format!(
        "DELETE FROM icache_watch WHERE table_name = {}",
        literal(&table.display())
    ));
    Ok(out)
}

fn record_watch(table: &Table, exprs: &[String]) -> Vec<String> {
    let name = literal(&table.display());
    let mut out = vec![format!(
        "DELETE FROM icache_watch WHERE table_name = {name}"
    )];
    for (i, e) in exprs.iter().enumerate() {
        out.push(format!(
            "INSERT INTO icache_watch (table_name, position, expression) VALUES ({name}, {}, {})",
            i + 1,
            literal(e)
        ));
    }
    out
}

/// `'a', 'b'` as a LATERAL VALUES list, each expression on its own lines (a
/// trailing `--` comment in one cannot swallow the rest).
fn pg_values(exprs: &[String]) -> String {
    exprs
        .iter()
        .map(|e| format!("((\n{e}\n)::text)"))
        .collect::<Vec<_>>()
        .join(", ")
}

fn pg_watch(table: &Table, exprs: &[String]) -> Vec<String> {
    let values = pg_values(exprs);
    let insert_from = |rows: &str| {
        format!(
            "INSERT INTO icache_outbox (token)\n\
             \x20   SELECT DISTINCT icache_token FROM {rows} AS icache_row\n\
             \x20   CROSS JOIN LATERAL (VALUES {values}) AS icache_v(icache_token)\n\
             \x20   WHERE icache_token IS NOT NULL;"
        )
    };
    let function = table.pg_function();
    let body = format!(
        "CREATE OR REPLACE FUNCTION {function}() RETURNS trigger\n\
         LANGUAGE plpgsql SET search_path FROM CURRENT AS {BODY_TAG}\n\
         BEGIN\n\
         \x20 IF TG_OP = 'INSERT' THEN\n\
         \x20   {}\n\
         \x20 ELSIF TG_OP = 'UPDATE' THEN\n\
         \x20   {}\n\
         \x20 ELSIF TG_OP = 'DELETE' THEN\n\
         \x20   {}\n\
         \x20 ELSE\n\
         \x20   {}\n\
         \x20 END IF;\n\
         \x20 IF FOUND THEN PERFORM pg_notify('{CHANNEL}', ''); END IF;\n\
         \x20 RETURN NULL;\n\
         END\n\
         {BODY_TAG}",
        insert_from("icache_new"),
        insert_from("(SELECT * FROM icache_new UNION ALL SELECT * FROM icache_old)"),
        insert_from("icache_old"),
        // BEFORE TRUNCATE: the rows are still there.
        insert_from(&table.quoted()),
    );
    let on = table.quoted();
    let mut out = vec![body];
    for trigger in PG_TRIGGERS {
        out.push(format!("DROP TRIGGER IF EXISTS {trigger} ON {on}"));
    }
    // Transition tables allow one event per trigger: four triggers, one
    // function.
    out.push(format!(
        "CREATE TRIGGER icache_watch_insert AFTER INSERT ON {on} \
         REFERENCING NEW TABLE AS icache_new FOR EACH STATEMENT EXECUTE FUNCTION {function}()"
    ));
    out.push(format!(
        "CREATE TRIGGER icache_watch_update AFTER UPDATE ON {on} \
         REFERENCING OLD TABLE AS icache_old NEW TABLE AS icache_new \
         FOR EACH STATEMENT EXECUTE FUNCTION {function}()"
    ));
    out.push(format!(
        "CREATE TRIGGER icache_watch_delete AFTER DELETE ON {on} \
         REFERENCING OLD TABLE AS icache_old FOR EACH STATEMENT EXECUTE FUNCTION {function}()"
    ));
    out.push(format!(
        "CREATE TRIGGER icache_watch_truncate BEFORE TRUNCATE ON {on} \
         FOR EACH STATEMENT EXECUTE FUNCTION {function}()"
    ));
    out
}

/// `(SELECT NEW."a" AS "a", NEW."b" AS "b")`: one row under its column names.
fn sqlite_row(columns: &[&str], which: &str) -> String {
    let cols = columns
        .iter()
        .map(|c| format!("{which}.{0} AS {0}", ident(c)))
        .collect::<Vec<_>>()
        .join(", ");
    format!("SELECT {cols}")
}

fn sqlite_watch(table: &Table, columns: &[&str], exprs: &[String]) -> Result<Vec<String>, DbError> {
    if columns.is_empty() {
        return Err(DbError::usage(format!(
            "watch_sql on SQLite needs the columns of table {}",
            table.display()
        )));
    }
    // SQLite allows no WITH inside triggers: the row subquery is repeated per
    // expression. UNION dedupes a row's tokens (both rows' on UPDATE).
    let tokens = |rows: &str| {
        exprs
            .iter()
            .map(|e| format!("SELECT CAST((\n{e}\n) AS TEXT) AS icache_token FROM ({rows})"))
            .collect::<Vec<_>>()
            .join("\nUNION ")
    };
    let new = sqlite_row(columns, "NEW");
    let old = sqlite_row(columns, "OLD");
    let both = format!("{new} UNION ALL {old}");
    let on = table.quoted();
    let mut out = Vec::new();
    for (event, rows) in [("insert", &new), ("update", &both), ("delete", &old)] {
        let trigger = table.sqlite_trigger(event);
        out.push(format!("DROP TRIGGER IF EXISTS {trigger}"));
        out.push(format!(
            "CREATE TRIGGER {trigger} AFTER {} ON {on} BEGIN\n\
             INSERT INTO icache_outbox (token) SELECT icache_token FROM (\n{}\n) WHERE icache_token IS NOT NULL;\n\
             END",
            event.to_uppercase(),
            tokens(rows)
        ));
    }
    Ok(out)
}

/// The statement that checks one expression against the table (prepared,
/// never run: a missing column fails here).
pub(crate) fn probe_sql(dialect: Dialect, table: &Table, expr: &str) -> String {
    match dialect {
        Dialect::Postgres => format!("SELECT (\n{expr}\n)::text FROM {} LIMIT 0", table.quoted()),
        Dialect::Sqlite => format!(
            "SELECT CAST((\n{expr}\n) AS TEXT) FROM {} LIMIT 0",
            table.quoted()
        ),
    }
}

/// The statement that computes every expression on one row of the table, to
/// show what a change of that row would bump.
pub(crate) fn example_sql(dialect: Dialect, table: &Table, exprs: &[String]) -> String {
    let cols = exprs
        .iter()
        .map(|e| match dialect {
            Dialect::Postgres => format!("(\n{e}\n)::text"),
            Dialect::Sqlite => format!("CAST((\n{e}\n) AS TEXT)"),
        })
        .collect::<Vec<_>>()
        .join(", ");
    format!("SELECT {cols} FROM {} LIMIT 1", table.quoted())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn names_are_quoted_and_checked() {
        let t = Table::parse(Dialect::Postgres, "app.Movies").expect("valid");
        assert_eq!(t.quoted(), "\"app\".\"Movies\"");
        assert!(Table::parse(Dialect::Postgres, "a.b.c").is_err());
        assert!(Table::parse(Dialect::Sqlite, "").is_err());
        assert!(Table::parse(Dialect::Sqlite, "icache_outbox").is_err());
        assert_eq!(ident("we\"ird"), "\"we\"\"ird\"");
        assert_eq!(literal("it's"), "'it''s'");
    }

    #[test]
    fn expressions_are_checked() {
        assert!(check_exprs(&[]).is_err());
        assert!(check_exprs(&[" "]).is_err());
        assert!(check_exprs(&["'$icache_body$'"]).is_err());
        assert_eq!(
            check_exprs(&[" 'movies' ", "'a;b'"]).expect("valid"),
            ["'movies'", "'a;b'"]
        );
    }
}
