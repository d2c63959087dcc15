use idem_runtime::idempotent;

const TTL: &str = "1h";
const REQUIRED: bool = true;

#[idempotent(ttl = TTL, required = REQUIRED)]
async fn create(body: String) -> String {
    body
}

#[idempotent(required = "true", state = "AppState")]
async fn quoted(body: String) -> String {
    body
}

fn main() {}
