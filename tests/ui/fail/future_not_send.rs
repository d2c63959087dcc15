use std::rc::Rc;

use idem_runtime::idempotent;

async fn save(_order: &str) {}

#[idempotent]
async fn create(body: String) -> String {
    let order = Rc::new(body);
    save(&order).await;
    order.to_string()
}

fn main() {}
