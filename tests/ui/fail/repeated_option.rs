use idem_runtime::idempotent;

#[idempotent(ttl = "1h", required = true, ttl = "2h")]
async fn create(body: String) -> String {
    body
}

fn main() {}
