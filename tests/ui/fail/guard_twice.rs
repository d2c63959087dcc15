// The guard taken twice: by hand beside the attribute, or the attribute stacked.
use idem_runtime::{Idempotent, idempotent};

#[idempotent]
async fn by_hand(guard: Idempotent, body: String) -> String {
    drop(guard);
    body
}

#[idempotent]
#[idempotent(ttl = "1h")]
async fn stacked(body: String) -> String {
    body
}

fn main() {}
