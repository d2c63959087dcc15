use idem_runtime::idempotent;

#[idempotent(state = )]
async fn handler(body: String) -> String {
    body
}

fn main() {}
