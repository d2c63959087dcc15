use idem_runtime::idempotent;

#[idempotent]
async fn handler(body: String, ...) -> String {
    body
}

fn main() {}
