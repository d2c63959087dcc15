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

pub use self::contract::{BoxFuture, ConnectError, Store, StoreError};
pub use self::memory::{BoundsError, MemoryStore};
#[cfg(feature = "postgres")]
pub use self::postgres::{PgTransaction, PostgresStore, PostgresStoreBuilder};
#[cfg(feature = "redis")]
pub use self::redis::{RedisStore, RedisStoreBuilder};
