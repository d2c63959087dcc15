//! Orders and payments in SQLite or PostgreSQL, through one code path: sqlx's `Any`
//! driver picks the database from the URL, and every statement is portable SQL.

use std::borrow::Cow;
use std::pin::Pin;
use std::time::{Duration, SystemTime};

use sqlx::any::{AnyPoolOptions, AnyRow};
use sqlx::error::BoxDynError;
use sqlx::migrate::{Migration, MigrationSource, MigrationType, Migrator};
use sqlx::{AnyPool, Row, SqlSafeStr};

use crate::error::ApiError;
use crate::model::{
    Item, NewOrder, NewPayment, ORDER_PAID, ORDER_PENDING, Order, PAYMENT_CAPTURED, Payment,
};

/// The migrations, embedded in the binary; the files follow sqlx-cli's naming, so
/// `sqlx migrate run --source examples/payments/migrations` applies the same ones.
const MIGRATIONS: &[(i64, &str, &str)] = &[
    (
        1,
        "orders and payments",
        include_str!("../migrations/0001_orders_and_payments.sql"),
    ),
    (
        2,
        "order currency",
        include_str!("../migrations/0002_order_currency.sql"),
    ),
];

/// A pool of connections to the app's database, SQLite or PostgreSQL.
#[derive(Clone, Debug)]
pub struct Db {
    pool: AnyPool,
}

impl Db {
    /// Connects to `url` and brings the schema up to date.
    ///
    /// `sqlite://payments.db?mode=rwc` is a SQLite file, created if missing;
    /// `postgres://user@host:port/database` is PostgreSQL (add
    /// `?options=-csearch_path%3Dschema` to work in another schema).
    pub async fn connect(url: &str) -> Result<Self, sqlx::Error> {
        sqlx::any::install_default_drivers();
        let pool = AnyPoolOptions::new()
            .max_connections(10)
            .acquire_timeout(Duration::from_secs(5))
            .connect(url)
            .await?;
        Migrator::new(EmbeddedMigrations).await?.run(&pool).await?;
        Ok(Self { pool })
    }

    /// The pool, for queries of your own.
    pub fn pool(&self) -> &AnyPool {
        &self.pool
    }

    /// Whether the database answers.
    pub async fn ping(&self) -> Result<(), sqlx::Error> {
        sqlx::query("SELECT 1").execute(&self.pool).await.map(drop)
    }

    /// Stores a new order with `total_cents` (checked by the caller) under `key`, or,
    /// if `key` already created an order, returns that one: the second guard.
    pub async fn create_order(
        &self,
        request: &NewOrder,
        total_cents: i64,
        key: Option<&str>,
    ) -> Result<Order, ApiError> {
        let order = Order {
            id: new_id("ord"),
            customer_id: request.customer_id.clone(),
            items: request.items.clone(),
            total_cents,
            currency: request.currency.clone(),
            status: ORDER_PENDING.to_owned(),
            created_at: now(),
        };
        let mut tx = self.pool.begin().await?;
        let inserted = sqlx::query(
            "INSERT INTO orders (id, idempotency_key, customer_id, total_cents, currency, status, created_at) \
             VALUES ($1, $2, $3, $4, $5, $6, $7)",
        )
        .bind(&order.id)
        .bind(key)
        .bind(&order.customer_id)
        .bind(order.total_cents)
        .bind(&order.currency)
        .bind(&order.status)
        .bind(&order.created_at)
        .execute(&mut *tx)
        .await;
        match inserted {
            Ok(_) => {}
            Err(error) if is_unique_violation(&error) => {
                tx.rollback().await?;
                let Some(key) = key else {
                    return Err(error.into());
                };
                return self.order_created_under(key, request).await;
            }
            Err(error) => return Err(error.into()),
        }
        for (line, item) in (0_i64..).zip(&order.items) {
            sqlx::query(
                "INSERT INTO order_items (order_id, line, sku, quantity, unit_price_cents) \
                 VALUES ($1, $2, $3, $4, $5)",
            )
            .bind(&order.id)
            .bind(line)
            .bind(&item.sku)
            .bind(item.quantity)
            .bind(item.unit_price_cents)
            .execute(&mut *tx)
            .await?;
        }
        tx.commit().await?;
        Ok(order)
    }

    async fn order_created_under(&self, key: &str, request: &NewOrder) -> Result<Order, ApiError> {
        let row = sqlx::query("SELECT id FROM orders WHERE idempotency_key = $1")
            .bind(key)
            .fetch_one(&self.pool)
            .await?;
        let id: String = row.try_get("id")?;
        let existing = self
            .order(&id)
            .await?
            .ok_or_else(|| ApiError::OrderNotFound(id))?;
        if existing.customer_id != request.customer_id
            || existing.items != request.items
            || existing.currency != request.currency
        {
            return Err(ApiError::KeyReused);
        }
        tracing::info!(order_id = %existing.id, "second guard: this key already created the order; returning it");
        Ok(existing)
    }

    /// The order with this id, with its items.
    pub async fn order(&self, id: &str) -> Result<Option<Order>, sqlx::Error> {
        let Some(row) = sqlx::query(
            "SELECT id, customer_id, total_cents, currency, status, created_at FROM orders WHERE id = $1",
        )
        .bind(id)
        .fetch_optional(&self.pool)
        .await?
        else {
            return Ok(None);
        };
        let items = sqlx::query(
            "SELECT sku, quantity, unit_price_cents FROM order_items \
             WHERE order_id = $1 ORDER BY line",
        )
        .bind(id)
        .fetch_all(&self.pool)
        .await?
        .iter()
        .map(|item| {
            Ok(Item {
                sku: item.try_get("sku")?,
                quantity: item.try_get("quantity")?,
                unit_price_cents: item.try_get("unit_price_cents")?,
            })
        })
        .collect::<Result<_, sqlx::Error>>()?;
        Ok(Some(Order {
            id: row.try_get("id")?,
            customer_id: row.try_get("customer_id")?,
            items,
            total_cents: row.try_get("total_cents")?,
            currency: row.try_get("currency")?,
            status: row.try_get("status")?,
            created_at: row.try_get("created_at")?,
        }))
    }

    /// Captures a payment for an order and marks the order paid, in one transaction.
    ///
    /// Two UNIQUE constraints guard it, whatever the idempotency store remembers: one on
    /// `idempotency_key`, so a retry whose record was lost gets the payment it already
    /// made, and one on `order_id`, so a second key cannot pay the same order (409).
    pub async fn pay(&self, request: &NewPayment, key: Option<&str>) -> Result<Payment, ApiError> {
        let Some(order) = self.order(&request.order_id).await? else {
            return Err(ApiError::OrderNotFound(request.order_id.clone()));
        };
        if request.amount_cents != order.total_cents {
            return Err(ApiError::AmountMismatch {
                total_cents: order.total_cents,
                amount_cents: request.amount_cents,
            });
        }
        if request.currency != order.currency {
            return Err(ApiError::CurrencyMismatch {
                order: order.currency,
                payment: request.currency.clone(),
            });
        }
        let payment = Payment {
            id: new_id("pay"),
            order_id: order.id,
            amount_cents: request.amount_cents,
            currency: request.currency.clone(),
            status: PAYMENT_CAPTURED.to_owned(),
            created_at: now(),
        };
        // The insert comes first so that it takes the write lock: on SQLite a transaction
        // that reads before it writes can fail at once instead of waiting its turn.
        let mut tx = self.pool.begin().await?;
        let inserted = sqlx::query(
            "INSERT INTO payments (id, idempotency_key, order_id, amount_cents, currency, status, created_at) \
             VALUES ($1, $2, $3, $4, $5, $6, $7)",
        )
        .bind(&payment.id)
        .bind(key)
        .bind(&payment.order_id)
        .bind(payment.amount_cents)
        .bind(&payment.currency)
        .bind(&payment.status)
        .bind(&payment.created_at)
        .execute(&mut *tx)
        .await;
        match inserted {
            Ok(_) => {}
            Err(error) if is_unique_violation(&error) => {
                tx.rollback().await?;
                return self.payment_made_under(key, request).await;
            }
            Err(error) => return Err(error.into()),
        }
        sqlx::query("UPDATE orders SET status = $1 WHERE id = $2")
            .bind(ORDER_PAID)
            .bind(&payment.order_id)
            .execute(&mut *tx)
            .await?;
        tx.commit().await?;
        Ok(payment)
    }

    /// After a unique violation: the payment `key` already made, or 409 when the order
    /// was paid under another key.
    async fn payment_made_under(
        &self,
        key: Option<&str>,
        request: &NewPayment,
    ) -> Result<Payment, ApiError> {
        if let Some(key) = key
            && let Some(row) = sqlx::query(PAYMENT_BY_KEY)
                .bind(key)
                .fetch_optional(&self.pool)
                .await?
        {
            let existing = payment_from(&row)?;
            if existing.order_id != request.order_id
                || existing.amount_cents != request.amount_cents
                || existing.currency != request.currency
            {
                return Err(ApiError::KeyReused);
            }
            tracing::info!(payment_id = %existing.id, "second guard: this key already paid; returning the payment instead of charging again");
            return Ok(existing);
        }
        Err(ApiError::AlreadyPaid(request.order_id.clone()))
    }

    /// The payment with this id.
    pub async fn payment(&self, id: &str) -> Result<Option<Payment>, sqlx::Error> {
        sqlx::query(PAYMENT_BY_ID)
            .bind(id)
            .fetch_optional(&self.pool)
            .await?
            .as_ref()
            .map(payment_from)
            .transpose()
    }
}

const PAYMENT_BY_ID: &str = "SELECT id, order_id, amount_cents, currency, status, created_at \
                             FROM payments WHERE id = $1";
const PAYMENT_BY_KEY: &str = "SELECT id, order_id, amount_cents, currency, status, created_at \
                              FROM payments WHERE idempotency_key = $1";

fn payment_from(row: &AnyRow) -> Result<Payment, sqlx::Error> {
    Ok(Payment {
        id: row.try_get("id")?,
        order_id: row.try_get("order_id")?,
        amount_cents: row.try_get("amount_cents")?,
        currency: row.try_get("currency")?,
        status: row.try_get("status")?,
        created_at: row.try_get("created_at")?,
    })
}

fn is_unique_violation(error: &sqlx::Error) -> bool {
    matches!(error, sqlx::Error::Database(db) if db.is_unique_violation())
}

fn new_id(prefix: &str) -> String {
    format!("{prefix}_{}", uuid::Uuid::new_v4().simple())
}

fn now() -> String {
    humantime::format_rfc3339_millis(SystemTime::now()).to_string()
}

/// The embedded [`MIGRATIONS`] as a source for sqlx's migrator.
#[derive(Debug)]
struct EmbeddedMigrations;

impl<'s> MigrationSource<'s> for EmbeddedMigrations {
    fn resolve(
        self,
    ) -> Pin<Box<dyn Future<Output = Result<Vec<Migration>, BoxDynError>> + Send + 's>> {
        let migrations = MIGRATIONS
            .iter()
            .map(|&(version, description, sql)| {
                Migration::new(
                    version,
                    Cow::Borrowed(description),
                    MigrationType::Simple,
                    sql.into_sql_str(),
                    false,
                )
            })
            .collect();
        Box::pin(std::future::ready(Ok(migrations)))
    }
}
