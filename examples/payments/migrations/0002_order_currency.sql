-- Orders carry their currency (ISO 4217); a payment must be in it. Orders created before
-- this migration were priced in euros.
ALTER TABLE orders ADD COLUMN currency TEXT NOT NULL DEFAULT 'EUR';
