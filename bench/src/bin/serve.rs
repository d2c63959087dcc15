//! Serves every row of the load test, on loopback beside a private `redis-server`, until
//! its standard input closes: for profiling one row at a time (`perf stat`, `perf record`,
//! Redis' `INFO commandstats`) under a `wrk` started by hand.
//!
//! Prints one line once the server listens: `http://ADDRESS redis=URL`.
//!
//! `sleep infinity | cargo run --release -p idem-bench --bin serve`

use std::io::Read;

fn main() -> Result<(), Box<dyn std::error::Error>> {
    let served = idem_bench::Served::start()?;
    println!("http://{} redis={}", served.address, served.redis.url());
    // Serves until standard input closes.
    let mut rest = Vec::new();
    std::io::stdin().read_to_end(&mut rest)?;
    Ok(())
}

#[cfg(feature = "mimalloc")]
#[global_allocator]
static ALLOCATOR: mimalloc::MiMalloc = mimalloc::MiMalloc;
