use idem_runtime::idempotent;

#[idempotent(ttl = 3600)]
async fn create(body: String) -> String {
    body
}

fn main() {}
