//! Where records live: the [`Store`] trait and its implementations.
//!
//! A store is a small, atomic key-value protocol over encoded records. The protocol owns the
//! logic (what a record means, when to replay); a store only has to make each of the four
//! steps of [`Store`] atomic. Each step is one round trip in the stores idem ships.

mod contract;
mod memory;
#[cfg(feature = "postgres")]
mod postgres;
#[cfg(feature = "redis")]
mod redis;
#[cfg(feature = "sqlite")]
mod sqlite;
#[cfg(any(feature = "postgres", feature = "sqlite"))]
mod sweeper;
#[cfg(any(feature = "postgres", feature = "sqlite"))]
mod transaction;

pub use self::contract::{BoxFuture, ConnectError, Store, StoreError};
pub use self::memory::{BoundsError, MemoryStore};
#[cfg(feature = "postgres")]
pub use self::postgres::{PgTransaction, PostgresStore, PostgresStoreBuilder};
#[cfg(feature = "redis")]
pub use self::redis::{RedisStore, RedisStoreBuilder};
#[cfg(feature = "sqlite")]
pub use self::sqlite::{SqliteStore, SqliteStoreBuilder, SqliteTransaction};
#[cfg(any(feature = "postgres", feature = "sqlite"))]
pub use self::transaction::DatabaseTransaction;

/// Polls `timer`, the timeout of a store step that has just waited; outside tokio's
/// cooperative budget where the task has spent it: a step that spends the budget on
/// every poll (a client draining a busy channel for its reply) would otherwise keep its
/// timer from ever firing.
pub(crate) fn poll_timer(
    timer: std::pin::Pin<&mut tokio::time::Sleep>,
    cx: &mut std::task::Context<'_>,
) -> std::task::Poll<()> {
    use std::future::Future as _;
    if tokio::task::coop::has_budget_remaining() {
        timer.poll(cx)
    } else {
        std::pin::Pin::new(&mut tokio::task::coop::unconstrained(timer)).poll(cx)
    }
}
