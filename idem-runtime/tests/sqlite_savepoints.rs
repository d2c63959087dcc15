//! `SqliteTransaction` with nested savepoints, raw savepoint statements and SQLite's own
//! rollbacks, on a pool of one connection: after each, the connection is in no
//! transaction and fit for the next `SqliteTransaction`, and a 2xx is stored only with
//! the writes.

#![cfg(feature = "sqlite")]
#![allow(clippy::unwrap_used)]

mod common;

use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::Duration;

use axum::Router;
use axum::extract::State;
use axum::http::StatusCode;
use axum::response::{IntoResponse, Response};
use axum::routing::post;
use common::{SqliteFile, post_with, send};
use idem_runtime::store::{SqliteStore, SqliteTransaction};
use idem_runtime::{Idempotency, OnceKey, idempotent};
use sqlx::{Connection as _, SqliteConnection};

struct Db {
    file: SqliteFile,
    store: SqliteStore,
}

impl Db {
    async fn new(test: &str) -> Self {
        let file = SqliteFile::create(test);
        let store = SqliteStore::builder(file.url.as_str())
            .max_connections(1)
            .connect()
            .await
            .unwrap();
        for statement in [
            "CREATE TABLE payments (id INTEGER PRIMARY KEY AUTOINCREMENT, note TEXT NOT NULL)",
            "CREATE TABLE tags (name TEXT PRIMARY KEY)",
            "INSERT INTO tags VALUES ('taken')",
        ] {
            sqlx::query(statement).execute(store.pool()).await.unwrap();
        }
        Self { file, store }
    }

    async fn notes(&self) -> Vec<String> {
        sqlx::query_scalar("SELECT note FROM payments ORDER BY id")
            .fetch_all(self.store.pool())
            .await
            .unwrap()
    }

    fn idem(&self) -> Idempotency {
        Idempotency::builder()
            .shared_scope(true)
            .store(self.store.clone())
            .build()
    }

    /// Another connection can write (no transaction holds the write lock).
    async fn writable(&self) -> Result<(), sqlx::Error> {
        use sqlx::ConnectOptions;
        let mut other = sqlx::sqlite::SqliteConnectOptions::new()
            .filename(&self.file.path)
            .busy_timeout(Duration::from_millis(500))
            .connect()
            .await?;
        sqlx::query("INSERT OR REPLACE INTO tags VALUES ('other')")
            .execute(&mut other)
            .await
            .map(drop)
    }
}

#[derive(Clone)]
struct App {
    runs: Arc<AtomicUsize>,
}

async fn note(conn: &mut SqliteConnection, note: &str) -> Result<(), sqlx::Error> {
    sqlx::query("INSERT INTO payments (note) VALUES (?1)")
        .bind(note)
        .execute(conn)
        .await
        .map(drop)
}

/// What the work does after writing "outer", chosen by the body.
async fn scenario(tx: &SqliteTransaction, body: &str) -> Result<StatusCode, sqlx::Error> {
    let mut conn = tx.conn().await?;
    note(&mut conn, "outer").await?;
    match body {
        // Three levels, SQLite rolls all back from the innermost; the work ignores the
        // errors of its savepoints' rollbacks and answers 201.
        "depth3-ok" | "depth3-fail" => {
            let mut one = conn.begin().await?;
            note(&mut one, "one").await?;
            let mut two = one.begin().await?;
            note(&mut two, "two").await?;
            let conflict = sqlx::query("INSERT OR ROLLBACK INTO tags VALUES ('taken')")
                .execute(&mut *two)
                .await;
            assert!(conflict.is_err());
            let _ = two.rollback().await;
            let _ = one.rollback().await;
            Ok(if body == "depth3-ok" {
                StatusCode::CREATED
            } else {
                StatusCode::INTERNAL_SERVER_ERROR
            })
        }
        // Three levels, all committed: everything stays.
        "depth3-commit" => {
            let mut one = conn.begin().await?;
            note(&mut one, "one").await?;
            let mut two = one.begin().await?;
            note(&mut two, "two").await?;
            two.commit().await?;
            one.commit().await?;
            Ok(StatusCode::CREATED)
        }
        // Three levels, the innermost leaked (forgotten).
        "depth3-leak" => {
            let mut one = conn.begin().await?;
            note(&mut one, "one").await?;
            let mut two = one.begin().await?;
            note(&mut two, "two").await?;
            std::mem::forget(two);
            Ok(StatusCode::CREATED)
        }
        // The work's own raw savepoint, released: its write stays.
        "raw-release" => {
            sqlx::raw_sql("SAVEPOINT mine").execute(&mut *conn).await?;
            note(&mut conn, "mine").await?;
            sqlx::raw_sql("RELEASE mine").execute(&mut *conn).await?;
            Ok(StatusCode::CREATED)
        }
        // The work's own raw savepoint, left open: COMMIT commits it.
        "raw-open" => {
            sqlx::raw_sql("SAVEPOINT mine").execute(&mut *conn).await?;
            note(&mut conn, "mine").await?;
            Ok(StatusCode::CREATED)
        }
        // sqlx's savepoint rolled back by a raw statement, then committed by sqlx.
        "raw-rollback-to" => {
            let mut one = conn.begin().await?;
            note(&mut one, "undone").await?;
            sqlx::raw_sql("ROLLBACK TO SAVEPOINT _sqlx_savepoint_1")
                .execute(&mut *one)
                .await?;
            note(&mut one, "one").await?;
            one.commit().await?;
            Ok(StatusCode::CREATED)
        }
        // sqlx's savepoint released by a raw statement, then sqlx's commit fails.
        "raw-release-sqlx" => {
            let mut one = conn.begin().await?;
            note(&mut one, "one").await?;
            sqlx::raw_sql("RELEASE SAVEPOINT _sqlx_savepoint_1")
                .execute(&mut *one)
                .await?;
            let _ = one.commit().await;
            Ok(StatusCode::CREATED)
        }
        // A savepoint rolled back by sqlx stays on SQLite's stack (ROLLBACK TO does not
        // release): later writes land inside it.
        "rolled-back-then-write" => {
            let mut one = conn.begin().await?;
            note(&mut one, "undone").await?;
            one.rollback().await?;
            note(&mut conn, "after").await?;
            let mut again = conn.begin().await?;
            note(&mut again, "again").await?;
            again.commit().await?;
            Ok(StatusCode::CREATED)
        }
        _ => Ok(StatusCode::CREATED),
    }
}

#[idempotent]
async fn work(State(app): State<App>, tx: SqliteTransaction, body: String) -> Response {
    app.runs.fetch_add(1, Ordering::SeqCst);
    match scenario(&tx, &body).await {
        Ok(status) => (status, body).into_response(),
        Err(error) => (StatusCode::INTERNAL_SERVER_ERROR, error.to_string()).into_response(),
    }
}

#[idempotent]
async fn next(tx: SqliteTransaction) -> Response {
    let mut conn = tx.conn().await.unwrap();
    match note(&mut conn, "next").await {
        Ok(()) => (StatusCode::CREATED, "next").into_response(),
        Err(error) => (StatusCode::INTERNAL_SERVER_ERROR, error.to_string()).into_response(),
    }
}

/// Each scenario, keyed and unkeyed: what a 2xx left must be all of the work's writes
/// that should stand; a non-2xx leaves nothing; the file is writable after; the next
/// transactional request on the one connection commits.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn nested_and_raw_savepoints_keep_the_guarantees() {
    let cases: [(&str, Option<&[&str]>); 9] = [
        ("depth3-ok", None),
        ("depth3-fail", None),
        ("depth3-commit", Some(&["outer", "one", "two"])),
        ("depth3-leak", None),
        ("raw-release", Some(&["outer", "mine"])),
        ("raw-open", Some(&["outer", "mine"])),
        ("raw-rollback-to", Some(&["outer", "one"])),
        ("raw-release-sqlx", None),
        ("rolled-back-then-write", Some(&["outer", "after", "again"])),
    ];
    let mut failures = Vec::new();
    for (body, expected) in cases {
        for key in [Some(body), None] {
            let db = Db::new("depth").await;
            let app = App {
                runs: Arc::default(),
            };
            let routes = Router::new()
                .route("/work", post(work))
                .route("/next", post(next))
                .with_state(app.clone())
                .layer(db.idem().layer());
            let answer = send(&routes, post_with("/work", key, body)).await;
            let notes = db.notes().await;
            let label = format!(
                "{body} key={key:?}: {} {:?}",
                answer.status,
                String::from_utf8_lossy(&answer.body)
            );
            if answer.status.is_success() {
                match expected {
                    Some(expected) if notes == expected => {}
                    _ => failures.push(format!(
                        "{label}: 2xx with notes {notes:?}, expected {expected:?}"
                    )),
                }
            } else if !notes.is_empty() && expected.is_none() {
                failures.push(format!("{label}: not 2xx but notes {notes:?}"));
            } else if !notes.is_empty() {
                failures.push(format!(
                    "{label}: not 2xx but notes {notes:?} (expected a 2xx)"
                ));
            }
            if let Err(error) = db.writable().await {
                failures.push(format!("{label}: file left locked: {error}"));
            }
            let before = db.notes().await.len();
            let paid = send(&routes, post_with("/next", Some("next"), "")).await;
            let after = db.notes().await.len();
            if paid.status != StatusCode::CREATED || after != before + 1 {
                failures.push(format!(
                    "{label}: the next request on the connection: {} {:?}, notes {before} -> {after}",
                    paid.status,
                    String::from_utf8_lossy(&paid.body)
                ));
            }
            if let Some(key) = key {
                let runs = app.runs.load(Ordering::SeqCst);
                let again = send(&routes, post_with("/work", Some(key), body)).await;
                let reran = app.runs.load(Ordering::SeqCst) > runs;
                if answer.status.is_success() == reran {
                    failures.push(format!(
                        "{label}: the retry {} (answered {})",
                        if reran {
                            "ran again after a stored 2xx"
                        } else {
                            "was not run again after a failure"
                        },
                        again.status
                    ));
                }
            }
        }
    }
    assert!(failures.is_empty(), "{failures:#?}");
}

/// `once(..).run_in_transaction` with a depth-3 SQLite rollback: never `Ok` without the
/// writes; the connection is fit after.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn once_with_a_depth3_sqlite_rollback() {
    let db = Db::new("once").await;
    let idem = db.idem();
    let result = idem
        .once(OnceKey::compose(["savepoints", "once"]), &"in")
        .run_in_transaction(|tx: SqliteTransaction| async move {
            scenario(&tx, "depth3-ok")
                .await
                .map(|status| status.as_u16())
        })
        .await;
    let notes = db.notes().await;
    // SQLite rolled "outer" back: an `Ok` would be a result stored without its writes.
    assert!(result.is_err(), "{result:?} with notes {notes:?}");
    assert!(notes.is_empty(), "{notes:?}");
    db.writable().await.unwrap();
    let again = idem
        .once(OnceKey::compose(["savepoints", "once2"]), &"in")
        .run_in_transaction(|tx: SqliteTransaction| async move {
            let mut conn = tx.conn().await?;
            note(&mut conn, "next").await?;
            Ok::<_, sqlx::Error>(1)
        })
        .await;
    assert!(again.is_ok(), "{again:?}");
    assert!(db.notes().await.contains(&"next".to_owned()));
}
