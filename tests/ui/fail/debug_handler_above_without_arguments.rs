// `#[axum::debug_handler]` above the attribute calls the handler with no argument, but the
// generated handler takes the guard; below the attribute it works.
use idem_runtime::idempotent;

#[axum::debug_handler]
#[idempotent]
async fn ping() -> &'static str {
    "pong"
}

fn main() {}
