//! The JSON the API speaks, shared by the server and the client.

use serde::{Deserialize, Serialize};

/// `status` of an order that has not been paid yet.
pub const ORDER_PENDING: &str = "pending";
/// `status` of an order with a captured payment.
pub const ORDER_PAID: &str = "paid";
/// `status` of a payment: the example captures at once.
pub const PAYMENT_CAPTURED: &str = "captured";

/// The currency of an order that names none.
pub const DEFAULT_CURRENCY: &str = "EUR";

/// The ISO 4217 codes of the currencies in use (funds, precious metals and the testing
/// and no-currency codes `XTS` and `XXX` left out).
pub const ISO_4217: &[&str] = &[
    "AED", "AFN", "ALL", "AMD", "ANG", "AOA", "ARS", "AUD", "AWG", "AZN", "BAM", "BBD", "BDT",
    "BGN", "BHD", "BIF", "BMD", "BND", "BOB", "BRL", "BSD", "BTN", "BWP", "BYN", "BZD", "CAD",
    "CDF", "CHF", "CLP", "CNY", "COP", "CRC", "CUP", "CVE", "CZK", "DJF", "DKK", "DOP", "DZD",
    "EGP", "ERN", "ETB", "EUR", "FJD", "FKP", "GBP", "GEL", "GHS", "GIP", "GMD", "GNF", "GTQ",
    "GYD", "HKD", "HNL", "HTG", "HUF", "IDR", "ILS", "INR", "IQD", "IRR", "ISK", "JMD", "JOD",
    "JPY", "KES", "KGS", "KHR", "KMF", "KPW", "KRW", "KWD", "KYD", "KZT", "LAK", "LBP", "LKR",
    "LRD", "LSL", "LYD", "MAD", "MDL", "MGA", "MKD", "MMK", "MNT", "MOP", "MRU", "MUR", "MVR",
    "MWK", "MXN", "MYR", "MZN", "NAD", "NGN", "NIO", "NOK", "NPR", "NZD", "OMR", "PAB", "PEN",
    "PGK", "PHP", "PKR", "PLN", "PYG", "QAR", "RON", "RSD", "RUB", "RWF", "SAR", "SBD", "SCR",
    "SDG", "SEK", "SGD", "SHP", "SLE", "SOS", "SRD", "SSP", "STN", "SVC", "SYP", "SZL", "THB",
    "TJS", "TMT", "TND", "TOP", "TRY", "TTD", "TWD", "TZS", "UAH", "UGX", "USD", "UYU", "UZS",
    "VED", "VES", "VND", "VUV", "WST", "XAF", "XCD", "XCG", "XOF", "XPF", "YER", "ZAR", "ZMW",
    "ZWG",
];

fn default_currency() -> String {
    DEFAULT_CURRENCY.to_owned()
}

/// The body of `POST /orders`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct NewOrder {
    /// Who places the order.
    pub customer_id: String,
    /// What is ordered; at least one line.
    pub items: Vec<Item>,
    /// ISO 4217 code of the prices (default [`DEFAULT_CURRENCY`]); a payment must be in it.
    #[serde(default = "default_currency")]
    pub currency: String,
}

/// One line of an order.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Item {
    /// The product.
    pub sku: String,
    /// How many; at least one.
    pub quantity: i64,
    /// Price of one unit in cents; not negative.
    pub unit_price_cents: i64,
}

/// An order as the API returns it.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Order {
    /// `ord_` and 32 hex digits.
    pub id: String,
    /// Who placed the order.
    pub customer_id: String,
    /// The lines, in the order they were sent.
    pub items: Vec<Item>,
    /// Sum of quantity × unit price over the lines.
    pub total_cents: i64,
    /// ISO 4217 code of the prices.
    pub currency: String,
    /// [`ORDER_PENDING`] or [`ORDER_PAID`].
    pub status: String,
    /// When the order was created (RFC 3339, UTC).
    pub created_at: String,
}

/// The body of `POST /payments`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct NewPayment {
    /// The order to pay.
    pub order_id: String,
    /// Must equal the order's `total_cents`.
    pub amount_cents: i64,
    /// ISO 4217 code, e.g. `EUR`; must be the order's.
    pub currency: String,
}

/// A payment as the API returns it.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Payment {
    /// `pay_` and 32 hex digits.
    pub id: String,
    /// The order it pays.
    pub order_id: String,
    /// The amount captured, in cents.
    pub amount_cents: i64,
    /// ISO 4217 code.
    pub currency: String,
    /// [`PAYMENT_CAPTURED`].
    pub status: String,
    /// When the payment was captured (RFC 3339, UTC).
    pub created_at: String,
}

impl NewOrder {
    /// Checks the order and returns its total in cents, or says what is wrong.
    pub fn total_cents(&self) -> Result<i64, String> {
        if self.customer_id.trim().is_empty() {
            return Err("`customer_id` must not be empty.".into());
        }
        printable("customer_id", &self.customer_id)?;
        currency(&self.currency)?;
        if self.items.is_empty() {
            return Err("`items` must contain at least one item.".into());
        }
        let mut total: i64 = 0;
        for (index, item) in self.items.iter().enumerate() {
            if item.sku.trim().is_empty() {
                return Err(format!("`items[{index}].sku` must not be empty."));
            }
            printable(&format!("items[{index}].sku"), &item.sku)?;
            if item.quantity <= 0 {
                return Err(format!(
                    "`items[{index}].quantity` must be at least 1, got {}.",
                    item.quantity
                ));
            }
            if item.unit_price_cents < 0 {
                return Err(format!(
                    "`items[{index}].unit_price_cents` must not be negative, got {}.",
                    item.unit_price_cents
                ));
            }
            total = item
                .quantity
                .checked_mul(item.unit_price_cents)
                .and_then(|line| total.checked_add(line))
                .ok_or_else(|| {
                    format!("The order total overflows at `items[{index}]`; order fewer or cheaper items.")
                })?;
        }
        Ok(total)
    }
}

impl NewPayment {
    /// Checks what can be checked without the order, or says what is wrong.
    pub fn check(&self) -> Result<(), String> {
        if self.amount_cents < 0 {
            return Err(format!(
                "`amount_cents` must not be negative, got {}.",
                self.amount_cents
            ));
        }
        printable("order_id", &self.order_id)?;
        currency(&self.currency)
    }
}

/// A request body whose values can be checked on their own, without the database.
pub(crate) trait Validate {
    /// What is wrong with the values, if anything, as a sentence for the client.
    fn validate(&self) -> Result<(), String>;
}

impl Validate for NewOrder {
    fn validate(&self) -> Result<(), String> {
        self.total_cents().map(drop)
    }
}

impl Validate for NewPayment {
    fn validate(&self) -> Result<(), String> {
        self.check()
    }
}

/// Refuses control characters (NUL above all, which PostgreSQL cannot store in text).
fn printable(field: &str, value: &str) -> Result<(), String> {
    if value.chars().any(char::is_control) {
        return Err(format!("`{field}` must not contain control characters."));
    }
    Ok(())
}

fn currency(code: &str) -> Result<(), String> {
    if ISO_4217.contains(&code) {
        Ok(())
    } else {
        Err(format!(
            "`currency` must be an ISO 4217 currency code such as \"EUR\" or \"USD\", got {code:?}."
        ))
    }
}
