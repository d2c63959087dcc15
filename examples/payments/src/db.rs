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
use crate::tx::{Tx, execute};

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

    /// Stores a new order with `total_cents` (checked by the caller), written in `tx`,
    /// under the scoped `key` of the request that created it (if it sent one).
    pub(crate) async fn create_order(
        &self,
        tx: &Tx,
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
        let mut writes = tx.writes().await?;
        let inserted = execute!(
            writes,
            "INSERT INTO orders (id, idempotency_key, customer_id, total_cents, currency, status, created_at) \
             VALUES ($1, $2, $3, $4, $5, $6, $7)",
            &order.id,
            key,
            &order.customer_id,
            order.total_cents,
            &order.currency,
            &order.status,
            &order.created_at,
        );
        match inserted {
            Ok(()) => {}
            // Only an idempotency store that forgot the key lets its retry get this far.
            Err(error) if is_unique_violation(&error) => return Err(ApiError::KeyUsed),
            Err(error) => return Err(error.into()),
        }
        for (line, item) in (0_i64..).zip(&order.items) {
            execute!(
                writes,
                "INSERT INTO order_items (order_id, line, sku, quantity, unit_price_cents) \
                 VALUES ($1, $2, $3, $4, $5)",
                &order.id,
                line,
                &item.sku,
                item.quantity,
                item.unit_price_cents,
            )?;
        }
        writes.done().await?;
        Ok(order)
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

    /// Captures a payment for an order and marks the order paid, written in `tx`, under
    /// the scoped `key` of the request that made it (if it sent one).
    ///
    /// The UNIQUE constraint on `payments.order_id` is the business rule "one payment per
    /// order": a second payment of a paid order, whatever its key, is refused (`409`).
    pub(crate) async fn pay(
        &self,
        tx: &Tx,
        request: &NewPayment,
        key: Option<&str>,
    ) -> Result<Payment, ApiError> {
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
        let mut writes = tx.writes().await?;
        let inserted = execute!(
            writes,
            "INSERT INTO payments (id, idempotency_key, order_id, amount_cents, currency, status, created_at) \
             VALUES ($1, $2, $3, $4, $5, $6, $7)",
            &payment.id,
            key,
            &payment.order_id,
            payment.amount_cents,
            &payment.currency,
            &payment.status,
            &payment.created_at,
        );
        match inserted {
            Ok(()) => {}
            Err(error) if is_unique_violation(&error) => {
                return Err(ApiError::AlreadyPaid(request.order_id.clone()));
            }
            Err(error) => return Err(error.into()),
        }
        execute!(
            writes,
            "UPDATE orders SET status = $1 WHERE id = $2",
            ORDER_PAID,
            &payment.order_id,
        )?;
        writes.done().await?;
        Ok(payment)
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
