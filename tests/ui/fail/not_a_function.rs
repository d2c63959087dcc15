use idem_runtime::idempotent;

#[idempotent]
struct Handler;

fn main() {}
