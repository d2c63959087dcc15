use idem_runtime::idempotent;

struct Orders;

impl Orders {
    #[idempotent]
    async fn create(&self, body: String) -> String {
        body
    }
}

fn main() {}
