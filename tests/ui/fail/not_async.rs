use idem_runtime::idempotent;

#[idempotent]
fn create(body: String) -> String {
    body
}

fn main() {}
