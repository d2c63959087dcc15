use idem_runtime::idempotent;

#[idempotent(ttl = "99999999999999999999d")]
async fn create(body: String) -> String {
    body
}

fn main() {}
