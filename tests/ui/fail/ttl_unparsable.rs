use idem_runtime::idempotent;

#[idempotent(ttl = "1.5 hours")]
async fn create(body: String) -> String {
    body
}

fn main() {}
