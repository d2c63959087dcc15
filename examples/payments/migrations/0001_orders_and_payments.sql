-- Portable SQL: the same file runs on SQLite and PostgreSQL.
-- Money is in cents (BIGINT), identifiers and timestamps (RFC 3339, UTC) are TEXT.
-- `idempotency_key` holds the scoped key (`scope-hex:key`) of the request that created
-- the row, NULL for requests sent without a key: the second guard behind the
-- idempotency store.

CREATE TABLE orders (
    id              TEXT PRIMARY KEY,
    idempotency_key TEXT,
    customer_id     TEXT NOT NULL,
    total_cents     BIGINT NOT NULL CHECK (total_cents >= 0),
    status          TEXT NOT NULL,
    created_at      TEXT NOT NULL,
    CONSTRAINT orders_idempotency_key_unique UNIQUE (idempotency_key)
);

CREATE TABLE order_items (
    order_id         TEXT NOT NULL REFERENCES orders (id),
    line             BIGINT NOT NULL,
    sku              TEXT NOT NULL,
    quantity         BIGINT NOT NULL CHECK (quantity > 0),
    unit_price_cents BIGINT NOT NULL CHECK (unit_price_cents >= 0),
    PRIMARY KEY (order_id, line)
);

CREATE TABLE payments (
    id              TEXT PRIMARY KEY,
    idempotency_key TEXT,
    order_id        TEXT NOT NULL REFERENCES orders (id),
    amount_cents    BIGINT NOT NULL CHECK (amount_cents >= 0),
    currency        TEXT NOT NULL,
    status          TEXT NOT NULL,
    created_at      TEXT NOT NULL,
    CONSTRAINT payments_idempotency_key_unique UNIQUE (idempotency_key),
    -- One payment per order, whatever key it came with.
    CONSTRAINT payments_order_id_unique UNIQUE (order_id)
);
