use idem_runtime::idempotent;

#[idempotent(crate = idem_runtime)]
async fn unquoted(body: String) -> String {
    body
}

#[idempotent(crate = "idem runtime")]
async fn not_a_path(body: String) -> String {
    body
}

fn main() {}
