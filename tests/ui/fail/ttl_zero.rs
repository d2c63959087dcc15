use idem_runtime::idempotent;

#[idempotent(ttl = "0s")]
async fn create(body: String) -> String {
    body
}

fn main() {}
