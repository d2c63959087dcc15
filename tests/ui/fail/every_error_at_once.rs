// Every mistake is reported in one pass, each on its own token.
use idem_runtime::idempotent;

struct Orders;

impl Orders {
    #[idempotent(ttl = "soon", retries = 3, required = true, required = false)]
    fn create(self, body: String) -> String {
        body
    }
}

fn main() {}
