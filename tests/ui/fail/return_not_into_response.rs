use idem_runtime::idempotent;

struct Order {
    id: u64,
}

#[derive(Debug)]
struct DbError;

#[idempotent]
async fn create(body: String) -> Order {
    Order { id: body.len() as u64 }
}

#[idempotent]
async fn fallible(body: String) -> Result<String, DbError> {
    Ok(body)
}

fn main() {}
