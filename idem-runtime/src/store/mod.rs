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
